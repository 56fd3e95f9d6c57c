//! Issue 14: the Kubernetes manifests hang together where no schema validator looks (scripts/test
//! validates them against the Kubernetes schemas and runs checkov): every file under
//! `deploy/kubernetes/` is listed in `kustomization.yaml` and every listed file exists; every
//! name one object gives another resolves (Service and PDB selectors, the HPA's target, the
//! StatefulSet's Service, service accounts, volumes, probe ports, `<NAME>_FILE` paths under a
//! mounted Secret); the agents' grace period covers their drain, in Kubernetes and in the Swarm
//! stack; the probes are liveness for restarts and readiness for traffic.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
};

use fondation_testkit::support::compose::repo_root;
use serde::Deserialize;
use serde_yaml::Value;

fn k8s_dir() -> PathBuf {
    repo_root().join("deploy/kubernetes")
}

/// Every object of the files `kustomization.yaml` lists, by (kind, name).
fn objects() -> BTreeMap<(String, String), Value> {
    let kustomization: Value = serde_yaml::from_str(
        &std::fs::read_to_string(k8s_dir().join("kustomization.yaml")).unwrap(),
    )
    .expect("kustomization.yaml parses");
    let mut found = BTreeMap::new();
    for file in kustomization["resources"].as_sequence().expect("resources") {
        let file = file.as_str().expect("a file name");
        let text = std::fs::read_to_string(k8s_dir().join(file))
            .unwrap_or_else(|e| panic!("{file} is listed but cannot be read: {e}"));
        for document in serde_yaml::Deserializer::from_str(&text) {
            let object = Value::deserialize(document).unwrap_or_else(|e| panic!("{file}: {e}"));
            let kind = object["kind"].as_str().expect("kind").to_string();
            let name = object["metadata"]["name"]
                .as_str()
                .expect("name")
                .to_string();
            assert_eq!(
                object["metadata"]["namespace"].as_str(),
                Some("fondation"),
                "{kind}/{name} names its namespace"
            );
            assert!(
                found.insert((kind.clone(), name.clone()), object).is_none(),
                "{kind}/{name} is defined twice"
            );
        }
    }
    found
}

fn get<'a>(objects: &'a BTreeMap<(String, String), Value>, kind: &str, name: &str) -> &'a Value {
    objects
        .get(&(kind.to_string(), name.to_string()))
        .unwrap_or_else(|| panic!("{kind}/{name} is referenced but not defined"))
}

/// Whether `selector` (matchLabels, or a Service's plain map) selects `labels`.
fn selects(selector: &Value, labels: &Value) -> bool {
    let selector = selector.get("matchLabels").unwrap_or(selector);
    let selector = selector.as_mapping().expect("a label map");
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

fn pod_labels(workload: &Value) -> &Value {
    &workload["spec"]["template"]["metadata"]["labels"]
}

fn env_value<'a>(container: &'a Value, name: &str) -> Option<&'a str> {
    container["env"]
        .as_sequence()?
        .iter()
        .find(|e| e["name"].as_str() == Some(name))?["value"]
        .as_str()
}

fn millis(container: &Value, name: &str) -> u64 {
    env_value(container, name)
        .unwrap_or_else(|| panic!("{name} is set explicitly"))
        .parse()
        .unwrap_or_else(|_| panic!("{name} is a number of ms"))
}

#[test]
fn every_manifest_is_listed_and_every_listed_file_exists() {
    let kustomization: Value = serde_yaml::from_str(
        &std::fs::read_to_string(k8s_dir().join("kustomization.yaml")).unwrap(),
    )
    .unwrap();
    let listed: BTreeSet<String> = kustomization["resources"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap().to_string())
        .collect();
    let on_disk: BTreeSet<String> = std::fs::read_dir(k8s_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".yaml") && name != "kustomization.yaml")
        .collect();
    assert_eq!(
        listed, on_disk,
        "kustomization.yaml lists exactly the files"
    );
    let _ = objects();
}

#[test]
fn every_reference_between_objects_resolves() {
    let objects = objects();
    let coordinator = get(&objects, "StatefulSet", "coordinator");
    let agent = get(&objects, "Deployment", "agent");

    // The StatefulSet's governing Service selects its pods; so does nothing else's.
    let service_name = coordinator["spec"]["serviceName"].as_str().unwrap();
    let service = get(&objects, "Service", service_name);
    assert!(selects(
        &service["spec"]["selector"],
        pod_labels(coordinator)
    ));
    assert!(!selects(&service["spec"]["selector"], pod_labels(agent)));
    for workload in [coordinator, agent] {
        assert!(
            selects(&workload["spec"]["selector"], pod_labels(workload)),
            "a workload's selector matches its own pods"
        );
    }

    // The PDB and HPA name the agents.
    let pdb = get(&objects, "PodDisruptionBudget", "agent");
    assert!(selects(&pdb["spec"]["selector"], pod_labels(agent)));
    let target = &get(&objects, "HorizontalPodAutoscaler", "agent")["spec"]["scaleTargetRef"];
    get(
        &objects,
        target["kind"].as_str().unwrap(),
        target["name"].as_str().unwrap(),
    );

    // Each workload's NetworkPolicy selects it; the agents may reach the coordinator's port.
    let agent_policy = get(&objects, "NetworkPolicy", "agent");
    assert!(selects(
        &agent_policy["spec"]["podSelector"],
        pod_labels(agent)
    ));
    let coordinator_policy = get(&objects, "NetworkPolicy", "coordinator");
    assert!(selects(
        &coordinator_policy["spec"]["podSelector"],
        pod_labels(coordinator)
    ));
    let to_coordinator = agent_policy["spec"]["egress"]
        .as_sequence()
        .unwrap()
        .iter()
        .any(|rule| {
            rule["to"].as_sequence().is_some_and(|to| {
                to.iter()
                    .any(|peer| selects(&peer["podSelector"], pod_labels(coordinator)))
            }) && rule["ports"][0]["port"] == service["spec"]["ports"][0]["port"]
        });
    assert!(to_coordinator, "agents may reach the coordinator's port");

    for workload in [coordinator, agent] {
        let pod = &workload["spec"]["template"]["spec"];
        get(
            &objects,
            "ServiceAccount",
            pod["serviceAccountName"].as_str().unwrap(),
        );
        let mut volumes: BTreeMap<String, &Value> = pod["volumes"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|v| (v["name"].as_str().unwrap().to_string(), v))
            .collect();
        for claim in workload["spec"]["volumeClaimTemplates"]
            .as_sequence()
            .into_iter()
            .flatten()
        {
            volumes.insert(claim["metadata"]["name"].as_str().unwrap().into(), claim);
        }
        for container in pod["containers"].as_sequence().unwrap() {
            let mounts: Vec<(&str, &str)> = container["volumeMounts"]
                .as_sequence()
                .unwrap()
                .iter()
                .map(|m| {
                    let name = m["name"].as_str().unwrap();
                    assert!(volumes.contains_key(name), "volume {name} is defined");
                    (name, m["mountPath"].as_str().unwrap())
                })
                .collect();
            // Settings naming files point under a mounted Secret.
            for env in container["env"].as_sequence().unwrap() {
                let name = env["name"].as_str().unwrap();
                let Some(value) = env["value"].as_str() else {
                    continue;
                };
                if name.ends_with("_FILE") || name.starts_with("TLS_") {
                    let under_secret = mounts.iter().any(|(volume, path)| {
                        value.starts_with(&format!("{path}/"))
                            && volumes[*volume].get("secret").is_some()
                    });
                    assert!(under_secret, "{name}={value} is a file of a mounted Secret");
                }
            }
            // Probes dial declared ports.
            let ports: BTreeSet<u64> = container["ports"]
                .as_sequence()
                .unwrap()
                .iter()
                .map(|p| p["containerPort"].as_u64().unwrap())
                .collect();
            for probe in ["livenessProbe", "readinessProbe"] {
                if let Some(port) = container[probe]["grpc"]["port"].as_u64() {
                    assert!(ports.contains(&port), "{probe} port {port} is declared");
                }
            }
        }
    }
}

#[test]
fn agents_are_restarted_on_liveness_and_given_time_to_drain() {
    let objects = objects();
    let agent = get(&objects, "Deployment", "agent");
    let pod = &agent["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    assert_eq!(container["livenessProbe"]["grpc"]["service"], "liveness");
    assert!(
        container["readinessProbe"]["grpc"]["service"].is_null(),
        "readiness is the \"\" service"
    );
    let grace_ms = pod["terminationGracePeriodSeconds"].as_u64().unwrap() * 1000;
    let drain_ms = millis(container, "SHUTDOWN_GRACE") + millis(container, "KILL_GRACE");
    assert!(
        grace_ms > drain_ms,
        "terminationGracePeriodSeconds ({grace_ms} ms) covers the drain ({drain_ms} ms)"
    );
    assert_eq!(env_value(container, "ANALYZER_ISOLATION"), Some("required"));
    let security = &container["securityContext"];
    assert_eq!(security["readOnlyRootFilesystem"], true);
    assert_eq!(security["allowPrivilegeEscalation"], false);
    assert_eq!(security["capabilities"]["drop"][0], "ALL");

    // The Swarm stack: stop_grace_period's default above the default drain.
    let stack = std::fs::read_to_string(repo_root().join("deploy/swarm/stack.yml")).unwrap();
    assert!(
        stack.contains("SHUTDOWN_GRACE=${SHUTDOWN_GRACE:-600000}")
            && stack.contains("KILL_GRACE=${KILL_GRACE:-10000}")
            && stack.contains("stop_grace_period: ${AGENT_STOP_GRACE_PERIOD:-11m}"),
        "the stack's agent grace (11 min) covers SHUTDOWN_GRACE + KILL_GRACE (10 min 10 s)"
    );
}
