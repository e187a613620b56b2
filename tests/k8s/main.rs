//! The Kubernetes manifests (`deploy/k8s`), as `kubectl kustomize` renders every overlay:
//! valid against the Kubernetes API schemas (`kubernetes-validate --strict`), and holding
//! what `docs/operations.md` promises — stateful services on StatefulSets with volumes,
//! the analyzer, store and gateway on several replicas with autoscalers and disruption
//! budgets, the others scaling by replicas, unprivileged read-only containers with limits and
//! gRPC probes, grace periods above each service's drain, configuration every service
//! accepts, and NetworkPolicies that let through the pipeline's own paths and nothing else.
//!
//! Needs `kubectl` (and, for the schema check, `kubernetes-validate` from PyPI). Without
//! them each test is reported skipped, unless `RUNNEL_REQUIRE_K8S_TOOLS=1` (set by
//! `.ci/run`), where a missing tool fails it.

use runnel_server::ServiceConfig;
use runnel_testkit::{Tool, require};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;
use yaml_rust2::{Yaml, YamlLoader};

/// The oldest Kubernetes the manifests are for: native `preStop: sleep` (1.30, on by
/// default) and gRPC probes (1.27) are used.
const OLDEST_KUBERNETES: &str = "1.30.0";

fn repository_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is in the repository")
        .to_path_buf()
}

/// One overlay, rendered.
struct Overlay {
    name: String,
    /// The rendered multi-document YAML, as written to a file for the validator.
    file: PathBuf,
    docs: Vec<Yaml>,
}

/// Every overlay under deploy/k8s/overlays, rendered once per test run.
fn overlays() -> &'static [Overlay] {
    static RENDERED: OnceLock<Vec<Overlay>> = OnceLock::new();
    RENDERED.get_or_init(|| {
        let root = repository_root();
        let out = root.join("target/k8s");
        std::fs::create_dir_all(&out).expect("target/k8s");
        let mut names: Vec<String> = std::fs::read_dir(root.join("deploy/k8s/overlays"))
            .expect("deploy/k8s/overlays")
            .map(|entry| {
                entry
                    .expect("entry")
                    .file_name()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        names.sort();
        assert!(
            names.contains(&"dev".to_owned()) && names.contains(&"prod".to_owned()),
            "{names:?}"
        );
        names
            .into_iter()
            .map(|name| {
                let dir = root.join("deploy/k8s/overlays").join(&name);
                let output = Command::new("kubectl")
                    .arg("kustomize")
                    .arg(&dir)
                    .output()
                    .expect("run kubectl kustomize");
                assert!(
                    output.status.success(),
                    "kubectl kustomize {}: {}",
                    dir.display(),
                    String::from_utf8_lossy(&output.stderr)
                );
                let text = String::from_utf8(output.stdout).expect("utf-8");
                let file = out.join(format!("{name}.yaml"));
                std::fs::write(&file, &text).expect("write the rendering");
                let docs = YamlLoader::load_from_str(&text).expect("kustomize output is YAML");
                Overlay { name, file, docs }
            })
            .collect()
    })
}

fn kind<'a>(overlay: &'a Overlay, kind: &'a str) -> impl Iterator<Item = &'a Yaml> + 'a {
    overlay
        .docs
        .iter()
        .filter(move |doc| doc["kind"].as_str() == Some(kind))
}

fn name(doc: &Yaml) -> &str {
    doc["metadata"]["name"].as_str().unwrap_or("?")
}

fn list(yaml: &Yaml) -> &[Yaml] {
    yaml.as_vec().map(Vec::as_slice).unwrap_or(&[])
}

/// `matchLabels` (or `labels`) as a map; `matchExpressions` is not used by these
/// manifests and would make the checks below wrong, so it fails the test.
fn labels(yaml: &Yaml) -> BTreeMap<String, String> {
    assert!(
        yaml["matchExpressions"].is_badvalue(),
        "matchExpressions are not evaluated here: {yaml:?}"
    );
    let map = if yaml["matchLabels"].is_badvalue() {
        yaml
    } else {
        &yaml["matchLabels"]
    };
    map.as_hash()
        .map(|hash| {
            hash.iter()
                .map(|(k, v)| {
                    (
                        k.as_str().expect("label key").to_owned(),
                        v.as_str().expect("label value").to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// A Deployment's or StatefulSet's pods.
struct Workload<'a> {
    kind: &'a str,
    name: &'a str,
    doc: &'a Yaml,
    pod: &'a Yaml,
    labels: BTreeMap<String, String>,
}

fn workloads(overlay: &Overlay) -> Vec<Workload<'_>> {
    overlay
        .docs
        .iter()
        .filter_map(|doc| {
            let kind = doc["kind"].as_str()?;
            matches!(kind, "Deployment" | "StatefulSet").then(|| Workload {
                kind,
                name: name(doc),
                doc,
                pod: &doc["spec"]["template"]["spec"],
                labels: labels(&doc["spec"]["template"]["metadata"]["labels"]),
            })
        })
        .collect()
}

/// The Runnel service a workload runs (`broker` for `runnel-broker`), if it is one of ours.
fn service_of(workload: &Workload<'_>) -> Option<&'static str> {
    ["collector", "broker", "analyzer", "store", "gateway"]
        .into_iter()
        .find(|s| workload.name == format!("runnel-{s}"))
}

#[test]
fn every_overlay_renders_and_validates_strictly_against_the_kubernetes_schemas() {
    if !require(Tool::Kubectl) || !require(Tool::KubernetesValidate) {
        return;
    }
    for overlay in overlays() {
        assert!(
            !overlay.docs.is_empty(),
            "{}: nothing rendered",
            overlay.name
        );
        // The oldest supported version, and the newest the validator knows.
        for version in [Some(OLDEST_KUBERNETES), None] {
            let mut command = Command::new("kubernetes-validate");
            command.args(["--strict", "--quiet"]);
            if let Some(version) = version {
                command.args(["--kubernetes-version", version]);
            }
            let output = command
                .arg(&overlay.file)
                .output()
                .expect("run the validator");
            assert!(
                output.status.success(),
                "{} against {version:?}:\n{}{}",
                overlay.name,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
    }
}

#[test]
fn containers_run_unprivileged_on_a_read_only_root_with_limits_and_probes() {
    if !require(Tool::Kubectl) {
        return;
    }
    for overlay in overlays() {
        for workload in workloads(overlay) {
            let at = format!("{}: {} {}", overlay.name, workload.kind, workload.name);
            let pod = workload.pod;
            assert_eq!(
                pod["securityContext"]["runAsNonRoot"].as_bool(),
                Some(true),
                "{at}"
            );
            assert_eq!(
                pod["securityContext"]["seccompProfile"]["type"].as_str(),
                Some("RuntimeDefault"),
                "{at}"
            );
            assert_eq!(
                pod["automountServiceAccountToken"].as_bool(),
                Some(false),
                "{at}"
            );
            // Service links would put RUNNEL_BROKER_PORT=tcp://… and the like into every
            // pod's environment, next to the RUNNEL_<SERVICE>__ configuration variables.
            assert_eq!(pod["enableServiceLinks"].as_bool(), Some(false), "{at}");
            let containers = list(&pod["containers"]);
            assert!(!containers.is_empty(), "{at}");
            for container in containers {
                let at = format!("{at}/{}", container["name"].as_str().unwrap_or("?"));
                let security = &container["securityContext"];
                assert_eq!(
                    security["readOnlyRootFilesystem"].as_bool(),
                    Some(true),
                    "{at}"
                );
                assert_eq!(
                    security["allowPrivilegeEscalation"].as_bool(),
                    Some(false),
                    "{at}"
                );
                assert_eq!(
                    list(&security["capabilities"]["drop"])
                        .iter()
                        .filter_map(Yaml::as_str)
                        .collect::<Vec<_>>(),
                    ["ALL"],
                    "{at}"
                );
                for bound in ["requests", "limits"] {
                    for resource in ["cpu", "memory"] {
                        assert!(
                            !container["resources"][bound][resource].is_badvalue(),
                            "{at}: no {bound}.{resource}"
                        );
                    }
                }
                for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
                    assert!(!container[probe].is_badvalue(), "{at}: no {probe}");
                }
                if let Some(service) = service_of(&workload) {
                    // gRPC health on the service's own port; readiness asks for the service
                    // by name, which turns NOT_SERVING as soon as the drain starts. Over
                    // TLS, where kubelet's gRPC probes cannot go, the binary's own
                    // `healthcheck` asks the same (which probes a TLS configuration needs:
                    // the configuration test).
                    let grpc_port = list(&container["ports"])
                        .iter()
                        .find(|p| p["name"].as_str() == Some("grpc"))
                        .and_then(|p| p["containerPort"].as_i64())
                        .unwrap_or_else(|| panic!("{at}: no grpc port"));
                    let mut capitalised = service.to_owned();
                    capitalised[..1].make_ascii_uppercase();
                    for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
                        let probe_of = &container[probe];
                        if probe_of["exec"].is_badvalue() {
                            assert_eq!(
                                probe_of["grpc"]["port"].as_i64(),
                                Some(grpc_port),
                                "{at}: {probe}"
                            );
                        } else {
                            assert_eq!(
                                probe_command(probe_of),
                                healthcheck_command(service),
                                "{at}: {probe}"
                            );
                        }
                    }
                    if container["readinessProbe"]["exec"].is_badvalue() {
                        assert_eq!(
                            container["readinessProbe"]["grpc"]["service"].as_str(),
                            Some(format!("runnel.v1.{capitalised}").as_str()),
                            "{at}"
                        );
                    }
                    assert!(
                        container["image"]
                            .as_str()
                            .is_some_and(|i| i.contains(&format!("runnel-{service}:"))),
                        "{at}: image {:?}",
                        container["image"]
                    );
                }
            }
        }
    }
}

/// The services that scale by replicas with their state in the broker (issue 12), and
/// how many replicas each runs at least in production.
const REPLICATED: [(&str, i64); 3] = [
    ("runnel-analyzer", 3),
    ("runnel-store", 2),
    ("runnel-gateway", 2),
];

/// Whether a PodDisruptionBudget lets at most one pod go at a time, however many there are.
fn one_at_a_time(pdb: &Yaml) -> bool {
    pdb["spec"]["maxUnavailable"].as_i64() == Some(1)
}

#[test]
fn stateful_services_keep_their_data_on_volumes_and_the_others_scale_by_replicas() {
    if !require(Tool::Kubectl) {
        return;
    }
    for overlay in overlays() {
        let workloads = workloads(overlay);
        let by_name: BTreeMap<&str, &Workload<'_>> =
            workloads.iter().map(|w| (w.name, w)).collect();
        let hpas: BTreeMap<&str, &Yaml> = kind(overlay, "HorizontalPodAutoscaler")
            .map(|hpa| {
                (
                    hpa["spec"]["scaleTargetRef"]["name"]
                        .as_str()
                        .expect("target name"),
                    hpa,
                )
            })
            .collect();
        let pdbs: Vec<&Yaml> = kind(overlay, "PodDisruptionBudget").collect();
        let pdb_of = |workload: &Workload<'_>| {
            pdbs.iter()
                .find(|pdb| selects(&labels(&pdb["spec"]["selector"]), &workload.labels))
                .copied()
        };
        let headless: BTreeSet<&str> = kind(overlay, "Service")
            .filter(|s| s["spec"]["clusterIP"].as_str() == Some("None"))
            .map(name)
            .collect();
        let at = |w: &str| format!("{}: {w}", overlay.name);

        // Every HPA scales something that exists, of the kind it says, on CPU.
        for (target, hpa) in &hpas {
            let workload = by_name
                .get(target)
                .unwrap_or_else(|| panic!("{}: no such workload", at(target)));
            assert_eq!(
                hpa["spec"]["scaleTargetRef"]["kind"].as_str(),
                Some(workload.kind),
                "{}",
                at(target)
            );
            assert!(
                list(&hpa["spec"]["metrics"])
                    .iter()
                    .any(|m| m["resource"]["name"].as_str() == Some("cpu")),
                "{}: the HPA does not scale on CPU",
                at(target)
            );
        }
        for workload in &workloads {
            let volumes = list(&workload.pod["volumes"]);
            match workload.kind {
                "StatefulSet" => {
                    let spec = &workload.doc["spec"];
                    let claims: Vec<&str> = list(&spec["volumeClaimTemplates"])
                        .iter()
                        .filter_map(|t| t["metadata"]["name"].as_str())
                        .collect();
                    assert_eq!(claims, ["data"], "{}", at(workload.name));
                    let mounts_data = list(&workload.pod["containers"]).iter().any(|c| {
                        list(&c["volumeMounts"]).iter().any(|m| {
                            m["name"].as_str() == Some("data")
                                && m["mountPath"].as_str() == Some("/data")
                        })
                    });
                    assert!(
                        mounts_data,
                        "{}: /data is not its volume",
                        at(workload.name)
                    );
                    let governing = spec["serviceName"].as_str().expect("serviceName");
                    assert!(
                        headless.contains(governing),
                        "{}: governing Service {governing} is not headless or missing",
                        at(workload.name)
                    );
                    // Only a service whose pods are independent of each other scales by
                    // an HPA: the collectors (each delivers its own log) and the stores
                    // (each a view of the broker's results log).
                    if hpas.contains_key(workload.name) {
                        assert!(
                            ["runnel-collector", "runnel-store"].contains(&workload.name),
                            "{}: a StatefulSet does not scale by an HPA here",
                            at(workload.name)
                        );
                        assert_eq!(
                            spec["podManagementPolicy"].as_str(),
                            Some("Parallel"),
                            "{}: replicas start one by one",
                            at(workload.name)
                        );
                    }
                }
                _ => {
                    // Nothing of a Deployment's pod outlives it.
                    for volume in volumes {
                        assert!(
                            volume["persistentVolumeClaim"].is_badvalue(),
                            "{}: a Deployment with a volume claim",
                            at(workload.name)
                        );
                    }
                    assert!(
                        hpas.contains_key(workload.name),
                        "{}: a stateless service without an HPA",
                        at(workload.name)
                    );
                    assert!(
                        pdb_of(workload).is_some(),
                        "{}: no PodDisruptionBudget",
                        at(workload.name)
                    );
                }
            }
        }
        // Which service is which, as docs/operations.md says.
        for (service, expected) in [
            ("runnel-collector", "StatefulSet"),
            ("runnel-analyzer", "Deployment"),
            ("runnel-store", "StatefulSet"),
            ("runnel-gateway", "Deployment"),
        ] {
            assert_eq!(
                by_name.get(service).map(|w| w.kind),
                Some(expected),
                "{}",
                at(service)
            );
        }
        // The analyzer, store and gateway run several replicas in every overlay (as many
        // as REPLICATED says in production), autoscaled from there, and are disrupted one
        // pod at a time.
        for (service, in_production) in REPLICATED {
            let workload = by_name[service];
            let replicas = workload.doc["spec"]["replicas"].as_i64().unwrap_or(1);
            let least = if overlay.name == "prod" {
                in_production
            } else {
                2
            };
            assert!(
                replicas >= least,
                "{}: {replicas} replicas, fewer than {least}",
                at(service)
            );
            let hpa = hpas
                .get(service)
                .unwrap_or_else(|| panic!("{}: no HPA", at(service)));
            let (min, max) = (
                hpa["spec"]["minReplicas"].as_i64().unwrap_or(1),
                hpa["spec"]["maxReplicas"].as_i64().expect("maxReplicas"),
            );
            assert!(
                least <= min && min <= replicas && replicas <= max,
                "{}: the HPA's {min}..={max} against {replicas} replicas",
                at(service)
            );
            let pdb = pdb_of(workload)
                .unwrap_or_else(|| panic!("{}: no PodDisruptionBudget", at(service)));
            assert!(
                one_at_a_time(pdb),
                "{}: the PodDisruptionBudget lets more than one pod go: {:?}",
                at(service),
                pdb["spec"]
            );
        }
        // The analyzer and the gateway keep nothing on the pod: no volume but their
        // configuration and certificates.
        for service in ["runnel-analyzer", "runnel-gateway"] {
            for volume in list(&by_name[service].pod["volumes"]) {
                assert!(
                    !volume["configMap"].is_badvalue() || !volume["secret"].is_badvalue(),
                    "{}: a volume for state: {:?}",
                    at(service),
                    volume["name"]
                );
            }
        }
        // The collectors, too, are disrupted one at a time.
        let collector = by_name["runnel-collector"];
        assert!(
            pdb_of(collector).is_some_and(one_at_a_time),
            "{}",
            at("runnel-collector")
        );
        // The broker: on its embedded log a single StatefulSet replica; over JetStream, a
        // Deployment in front of a three-node JetStream StatefulSet.
        let broker = by_name.get("runnel-broker").expect("a broker");
        let replicas = broker.doc["spec"]["replicas"].as_i64();
        if broker.kind == "StatefulSet" {
            assert_eq!(replicas, Some(1), "{}", at("runnel-broker"));
            assert!(!by_name.contains_key("runnel-nats"));
        } else {
            let nats = by_name
                .get("runnel-nats")
                .expect("JetStream for the brokers");
            assert_eq!(nats.kind, "StatefulSet");
            assert_eq!(nats.doc["spec"]["replicas"].as_i64(), Some(3));
        }
    }
}

/// An exec probe's command.
fn probe_command(probe: &Yaml) -> Vec<&str> {
    list(&probe["exec"]["command"])
        .iter()
        .filter_map(Yaml::as_str)
        .collect()
}

/// The exec probe that works with TLS: the service binary's own health check.
fn healthcheck_command(service: &str) -> Vec<String> {
    vec![
        format!("/usr/local/bin/runnel-{service}"),
        "healthcheck".to_owned(),
    ]
}

/// What a service's configuration in its container says about stopping and writing.
struct Loaded {
    /// How long stopping may take after SIGTERM: the drain of calls, and for the
    /// collector the delivery of its message log after it, which gets as long again.
    stopping: Duration,
    /// The directory the service writes, if it writes one.
    writes: Option<PathBuf>,
    /// Its listeners' and calls' settings: TLS, authentication, grants.
    server: runnel_server::ServerConfig,
    /// The URLs of the services it calls.
    peers: Vec<String>,
}

/// Loads one service's configuration exactly as the binary would in that container: the
/// ConfigMap's file, then the container's environment.
fn load_service_config(
    service: &str,
    file: &Path,
    env: Vec<(String, String)>,
) -> Result<Loaded, String> {
    fn load<C: ServiceConfig>(file: &Path, env: Vec<(String, String)>) -> Result<C, String> {
        runnel_server::config::load_from::<C>(Some(file), env).map_err(|e| e.to_string())
    }
    fn loaded<C: ServiceConfig>(config: &C, writes: Option<PathBuf>, peers: &[&str]) -> Loaded {
        Loaded {
            stopping: config.server().drain_timeout,
            writes,
            server: config.server().clone(),
            peers: peers.iter().map(|p| (*p).to_owned()).collect(),
        }
    }
    Ok(match service {
        "collector" => {
            let c = load::<runnel_collector::CollectorConfig>(file, env)?;
            let mut loaded = loaded(&c, Some(c.data_dir.clone()), &[&c.broker, &c.store]);
            loaded.stopping *= 2;
            loaded
        }
        "broker" => {
            let c = load::<runnel_broker::BrokerConfig>(file, env)?;
            let embedded = c.storage == runnel_broker::StorageEngine::Embedded;
            loaded(&c, embedded.then(|| c.data_dir.clone()), &[])
        }
        "analyzer" => {
            let c = load::<runnel_analyzer::AnalyzerConfig>(file, env)?;
            // Checkpoints live in the broker: the analyzer writes nothing (its deprecated
            // data_dir is ignored).
            loaded(&c, None, &[&c.broker, &c.store])
        }
        "store" => {
            let c = load::<runnel_store::StoreConfig>(file, env)?;
            loaded(&c, Some(c.data_dir.clone()), &[])
        }
        "gateway" => {
            let c = load::<runnel_gateway::GatewayConfig>(file, env)?;
            // Webhooks live in the broker: the gateway writes nothing.
            loaded(&c, None, &[&c.store])
        }
        other => return Err(format!("unknown service {other}")),
    })
}

#[test]
fn every_service_accepts_its_configuration_and_its_grace_period_outlasts_its_drain() {
    if !require(Tool::Kubectl) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    for overlay in overlays() {
        let configs: BTreeMap<&str, &Yaml> =
            kind(overlay, "ConfigMap").map(|c| (name(c), c)).collect();
        for workload in workloads(overlay) {
            let at = format!("{}: {}", overlay.name, workload.name);
            let grace = workload.pod["terminationGracePeriodSeconds"]
                .as_i64()
                .unwrap_or_else(|| panic!("{at}: no terminationGracePeriodSeconds"));
            let container = &workload.pod["containers"][0];
            let pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
                .as_i64()
                .unwrap_or(0);
            let Some(service) = service_of(&workload) else {
                continue;
            };
            // The file the container reads (RUNNEL_CONFIG), from the ConfigMap it mounts.
            let env: Vec<(String, String)> = list(&container["env"])
                .iter()
                .filter_map(|e| {
                    Some((
                        e["name"].as_str()?.to_owned(),
                        e["value"].as_str()?.to_owned(),
                    ))
                })
                .collect();
            let path = env
                .iter()
                .find(|(k, _)| k == "RUNNEL_CONFIG")
                .map(|(_, v)| v.clone())
                .unwrap_or_else(|| panic!("{at}: no RUNNEL_CONFIG"));
            let mount = list(&container["volumeMounts"])
                .iter()
                .find(|m| m["mountPath"].as_str().is_some_and(|p| path.starts_with(p)))
                .unwrap_or_else(|| panic!("{at}: {path} is not mounted"));
            let volume = list(&workload.pod["volumes"])
                .iter()
                .find(|v| v["name"] == mount["name"])
                .expect("the mounted volume");
            let config_map = volume["configMap"]["name"].as_str().expect("a ConfigMap");
            let file_name = Path::new(&path)
                .file_name()
                .expect("file")
                .to_string_lossy();
            let contents = configs
                .get(config_map)
                .and_then(|c| c["data"][file_name.as_ref()].as_str())
                .unwrap_or_else(|| panic!("{at}: ConfigMap {config_map} has no {file_name}"));
            // Secrets mounted with their keys listed: the files the configuration may name
            // there exist (empty here), under a directory of the test's own.
            let secrets = dir.path().join(format!("{}-{service}", overlay.name));
            let mut contents = contents.to_owned();
            for mount in list(&container["volumeMounts"]) {
                // (A volume claim template's volume is not in the pod's list.)
                let Some(volume) = list(&workload.pod["volumes"])
                    .iter()
                    .find(|v| v["name"] == mount["name"])
                else {
                    continue;
                };
                let (Some(mount_path), false) =
                    (mount["mountPath"].as_str(), volume["secret"].is_badvalue())
                else {
                    continue;
                };
                let local = secrets.join(mount_path.trim_start_matches('/'));
                std::fs::create_dir_all(&local).expect("secret dir");
                for item in list(&volume["secret"]["items"]) {
                    let file = item["path"].as_str().expect("item path");
                    std::fs::write(local.join(file), "").expect("secret file");
                }
                contents = contents.replace(
                    &format!("\"{mount_path}/"),
                    &format!("\"{}/", local.display()),
                );
            }
            let file = dir.path().join(format!("{}-{service}.toml", overlay.name));
            std::fs::write(&file, &contents).expect("write the config");
            let mut loaded = load_service_config(service, &file, env)
                .unwrap_or_else(|e| panic!("{at}: the service refuses its configuration: {e}"));
            // The analyzer, store and gateway keep their shared state in the broker: each
            // names it (an empty `broker` would be the single-replica mode, whose state is
            // on the pod), and calls it like any other peer.
            if ["analyzer", "store", "gateway"].contains(&service) {
                let table: toml::Table = contents.parse().unwrap_or_else(|e| panic!("{at}: {e}"));
                let broker = table
                    .get(service)
                    .and_then(|t| t.get("broker"))
                    .and_then(toml::Value::as_str)
                    .unwrap_or("");
                assert!(
                    broker.ends_with("://runnel-broker:7102"),
                    "{at}: {service}.broker is {broker:?}, not the broker's Service"
                );
                if !loaded.peers.iter().any(|p| p == broker) {
                    loaded.peers.push(broker.to_owned());
                }
            }
            // Production authenticates everyone: TLS with client certificates on every
            // listener, https:// to every peer, the pipeline's own grants and no others,
            // and probes that speak TLS.
            let server = &loaded.server;
            if overlay.name == "prod" {
                assert!(server.tls.is_some(), "{at}: prod without TLS");
            }
            if let Some(tls) = &server.tls {
                assert!(
                    tls.client_ca.is_some(),
                    "{at}: TLS without client certificates"
                );
                assert!(
                    server.auth.enabled && server.auth.mtls,
                    "{at}: not authenticated"
                );
                assert!(!server.allow_unauthenticated, "{at}");
                // The same grants, in any order (grants add up; their order means nothing).
                let in_order = |grants: &[runnel_security::GrantConfig]| {
                    let mut grants: Vec<String> = grants.iter().map(|g| format!("{g:?}")).collect();
                    grants.sort();
                    grants
                };
                assert_eq!(
                    in_order(&server.auth.grants),
                    in_order(&runnel_security::certs::pipeline_grants(service)),
                    "{at}: grants"
                );
                for peer in &loaded.peers {
                    assert!(
                        peer.starts_with("https://"),
                        "{at}: calls {peer} in plaintext"
                    );
                }
                for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
                    assert_eq!(
                        probe_command(&container[probe]),
                        healthcheck_command(service),
                        "{at}: {probe} cannot speak TLS"
                    );
                }
            }
            // SIGTERM comes after the preStop hook; the drain and the final sync or
            // checkpoint must end before the kubelet's SIGKILL.
            let stopping = loaded.stopping;
            let needed = pre_stop as u64 + stopping.as_secs() + 5;
            assert!(
                grace as u64 >= needed,
                "{at}: terminationGracePeriodSeconds {grace} < preStop {pre_stop} s + stopping {stopping:?} + 5 s"
            );
            // The root filesystem is read-only: what the service writes must be on a
            // writable volume, given by an absolute path (a relative one lands in the
            // image's working directory).
            if let Some(dir) = loaded.writes {
                assert!(
                    dir.is_absolute(),
                    "{at}: writes {} (relative)",
                    dir.display()
                );
                let writable = list(&container["volumeMounts"]).iter().any(|m| {
                    m["readOnly"].as_bool() != Some(true)
                        && m["mountPath"].as_str().is_some_and(|p| dir.starts_with(p))
                });
                assert!(
                    writable,
                    "{at}: writes {} on no writable volume",
                    dir.display()
                );
            }
        }
    }
}

#[test]
fn services_select_running_pods_and_name_ports_they_expose() {
    if !require(Tool::Kubectl) {
        return;
    }
    for overlay in overlays() {
        let workloads = workloads(overlay);
        for service in kind(overlay, "Service") {
            let at = format!("{}: Service {}", overlay.name, name(service));
            let selector = labels(&service["spec"]["selector"]);
            let selected: Vec<&Workload<'_>> = workloads
                .iter()
                .filter(|w| selects(&selector, &w.labels))
                .collect();
            assert!(
                !selector.is_empty() && !selected.is_empty(),
                "{at}: selects nothing"
            );
            for port in list(&service["spec"]["ports"]) {
                let target = port["targetPort"].as_str().expect("named target ports");
                for workload in &selected {
                    assert!(
                        list(&workload.pod["containers"])
                            .iter()
                            .any(|c| list(&c["ports"])
                                .iter()
                                .any(|p| p["name"].as_str() == Some(target))),
                        "{at}: {} has no port named {target}",
                        workload.name
                    );
                }
            }
        }
        for pdb in kind(overlay, "PodDisruptionBudget") {
            let selector = labels(&pdb["spec"]["selector"]);
            assert!(
                workloads.iter().any(|w| selects(&selector, &w.labels)),
                "{}: PodDisruptionBudget {} selects nothing",
                overlay.name,
                name(pdb)
            );
        }
    }
}

/// Someone who might open a connection to a pod.
struct Peer {
    name: String,
    namespace_labels: BTreeMap<String, String>,
    /// `None`: not in the overlay's namespace.
    pod_labels: Option<BTreeMap<String, String>>,
}

/// Whether `policy`'s ingress rules admit `peer` on `port`.
fn admits(policy: &Yaml, peer: &Peer, port: i64) -> bool {
    list(&policy["spec"]["ingress"]).iter().any(|rule| {
        let port_ok = rule["ports"].is_badvalue()
            || list(&rule["ports"])
                .iter()
                .any(|p| p["port"].as_i64() == Some(port));
        let from_ok = rule["from"].is_badvalue()
            || list(&rule["from"]).iter().any(|from| {
                let pods = &from["podSelector"];
                let namespaces = &from["namespaceSelector"];
                assert!(
                    from["ipBlock"].is_badvalue(),
                    "ipBlock is not evaluated here"
                );
                let namespace_ok = if namespaces.is_badvalue() {
                    peer.pod_labels.is_some() // a bare podSelector: this namespace only
                } else {
                    selects(&labels(namespaces), &peer.namespace_labels)
                };
                let pod_ok = pods.is_badvalue()
                    || match &peer.pod_labels {
                        Some(pod) => selects(&labels(pods), pod),
                        None => selects(&labels(pods), &BTreeMap::new()),
                    };
                namespace_ok && pod_ok
            });
        port_ok && from_ok
    })
}

#[test]
fn network_policies_allow_the_pipelines_own_paths_and_nothing_else() {
    if !require(Tool::Kubectl) {
        return;
    }
    for overlay in overlays() {
        let namespace = kind(overlay, "Namespace")
            .map(name)
            .next()
            .expect("the overlay creates its namespace")
            .to_owned();
        let workloads = workloads(overlay);
        let policies: Vec<&Yaml> = kind(overlay, "NetworkPolicy").collect();
        let own_namespace =
            BTreeMap::from([("kubernetes.io/metadata.name".to_owned(), namespace.clone())]);
        let mut peers: Vec<Peer> = workloads
            .iter()
            .map(|w| Peer {
                name: w.name.to_owned(),
                namespace_labels: own_namespace.clone(),
                pod_labels: Some(w.labels.clone()),
            })
            .collect();
        peers.push(Peer {
            name: "a pod of another app in the namespace".into(),
            namespace_labels: own_namespace.clone(),
            pod_labels: Some(BTreeMap::new()),
        });
        peers.push(Peer {
            name: "a client in another namespace".into(),
            namespace_labels: BTreeMap::from([(
                "kubernetes.io/metadata.name".into(),
                "elsewhere".into(),
            )]),
            pod_labels: None,
        });
        peers.push(Peer {
            name: "prometheus".into(),
            namespace_labels: BTreeMap::from([(
                "kubernetes.io/metadata.name".into(),
                "monitoring".into(),
            )]),
            pod_labels: None,
        });
        let everyone: Vec<&str> = peers.iter().map(|p| p.name.as_str()).collect();

        // (destination, port) → who may connect.
        let mut expected: BTreeMap<(String, i64), BTreeSet<String>> = BTreeMap::new();
        let mut allow = |dst: &str, port: i64, from: &[&str]| {
            expected
                .entry((dst.to_owned(), port))
                .or_default()
                .extend(from.iter().map(|s| (*s).to_owned()));
        };
        allow("runnel-collector", 7101, &everyone);
        // The store and the gateway keep their shared state in the broker.
        allow(
            "runnel-broker",
            7102,
            &[
                "runnel-collector",
                "runnel-analyzer",
                "runnel-store",
                "runnel-gateway",
            ],
        );
        allow(
            "runnel-store",
            7104,
            &["runnel-analyzer", "runnel-gateway", "runnel-collector"],
        );
        // The gateway asks the analyzer which queries exist.
        allow("runnel-analyzer", 7103, &["runnel-gateway"]);
        allow("runnel-gateway", 7105, &everyone);
        allow("runnel-gateway", 8080, &everyone);
        allow("runnel-nats", 4222, &["runnel-broker"]);
        allow("runnel-nats", 6222, &["runnel-nats"]);
        allow("runnel-nats", 8222, &["prometheus"]);
        for (service, admin) in [
            ("runnel-collector", 9101),
            ("runnel-broker", 9102),
            ("runnel-analyzer", 9103),
            ("runnel-store", 9104),
            ("runnel-gateway", 9105),
        ] {
            allow(service, admin, &["prometheus"]);
        }

        let mut actual: BTreeMap<(String, i64), BTreeSet<String>> = BTreeMap::new();
        for dst in &workloads {
            let selecting: Vec<&&Yaml> = policies
                .iter()
                .filter(|p| selects(&labels(&p["spec"]["podSelector"]), &dst.labels))
                .collect();
            assert!(
                !selecting.is_empty(),
                "{}: {} is open to everything: no NetworkPolicy selects it",
                overlay.name,
                dst.name
            );
            for container in list(&dst.pod["containers"]) {
                for port in list(&container["ports"]) {
                    let port = port["containerPort"].as_i64().expect("containerPort");
                    let admitted: BTreeSet<String> = peers
                        .iter()
                        .filter(|peer| selecting.iter().any(|p| admits(p, peer, port)))
                        .map(|peer| peer.name.clone())
                        .collect();
                    if !admitted.is_empty() {
                        actual.insert((dst.name.to_owned(), port), admitted);
                    }
                }
            }
        }
        // Only paths to workloads this overlay has.
        expected.retain(|(dst, _), _| workloads.iter().any(|w| w.name == dst));
        let wrong: Vec<String> = actual
            .keys()
            .chain(expected.keys())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .filter(|path| actual.get(*path) != expected.get(*path))
            .map(|path| {
                format!(
                    "{}:{} admits {:?}, should admit {:?}",
                    path.0,
                    path.1,
                    actual.get(path),
                    expected.get(path)
                )
            })
            .collect();
        assert!(
            wrong.is_empty(),
            "{}: who may connect where:\n{}",
            overlay.name,
            wrong.join("\n")
        );
    }
}

/// The secure component's configuration is the base one with security turned on: taking
/// TLS, authentication and `https` away, and `allow_unauthenticated` from the base, leaves
/// the same file — so a setting added to one is not forgotten in the other.
#[test]
fn the_secure_configuration_is_the_base_one_with_security_on() {
    fn without_security(value: &mut toml::Value) {
        match value {
            toml::Value::Table(table) => {
                for key in ["tls", "connect", "auth", "allow_unauthenticated"] {
                    table.remove(key);
                }
                for (_, value) in table.iter_mut() {
                    without_security(value);
                }
            }
            toml::Value::String(text) => {
                if let Some(rest) = text.strip_prefix("https://") {
                    *text = format!("http://{rest}");
                }
            }
            _ => {}
        }
    }
    let root = repository_root().join("deploy/k8s");
    let read = |path: &str| -> toml::Value {
        let text = std::fs::read_to_string(root.join(path)).expect(path);
        text.parse::<toml::Table>()
            .map(toml::Value::Table)
            .unwrap_or_else(|e| panic!("{path}: {e}"))
    };
    let (mut base, mut secure) = (
        read("base/runnel.toml"),
        read("components/secure/runnel.toml"),
    );
    for service in runnel_security::certs::SERVICES {
        let server = &secure[service]["server"];
        assert!(
            server.get("tls").is_some(),
            "{service}: no tls in the secure file"
        );
        assert!(
            server.get("allow_unauthenticated").is_none(),
            "{service}: the secure file allows unauthenticated callers"
        );
    }
    without_security(&mut base);
    without_security(&mut secure);
    assert_eq!(base, secure);
}
