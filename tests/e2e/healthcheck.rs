//! `<binary> healthcheck`, as container health checks and exec probes run it: the same
//! configuration as the service, exit 0 while it serves, 1 otherwise.

use crate::ANALYZER_TOML;
use runnel_e2e::binary_dir;
use runnel_e2e::{Pipeline, ServiceProcess};
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Output;

/// Runs `binary healthcheck` with `config` and `env`, nothing else from our environment.
async fn healthcheck(binary: &str, config: &Path, env: &[(String, String)]) -> Output {
    let mut command = tokio::process::Command::new(binary_dir().join(binary));
    command.arg("healthcheck").arg("--config").arg(config);
    for (key, _) in std::env::vars() {
        if key.starts_with("RUNNEL_") || key.starts_with("OTEL_") {
            command.env_remove(key);
        }
    }
    command
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .output()
        .await
        .expect("run healthcheck")
}

fn grpc_env(process: &ServiceProcess) -> Vec<(String, String)> {
    let section = process
        .name
        .trim_start_matches("runnel-")
        .to_ascii_uppercase();
    vec![(
        format!("RUNNEL_{section}__SERVER__GRPC"),
        process.grpc.to_string(),
    )]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_binary_reports_its_own_service_healthy_and_a_stopped_one_not() {
    let pipeline = Pipeline::start(ANALYZER_TOML, BTreeMap::new())
        .await
        .expect("pipeline starts");
    let config = pipeline.dir.path().join("runnel.toml");
    for process in [
        &pipeline.collector,
        &pipeline.broker,
        &pipeline.analyzer,
        &pipeline.store,
        &pipeline.gateway,
    ] {
        let output = healthcheck(process.name, &config, &grpc_env(process)).await;
        assert!(
            output.status.success(),
            "{}: {output:?}\n{}",
            process.name,
            pipeline.logs()
        );
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            stdout.contains(&format!("serving on {}", process.grpc)),
            "{stdout}"
        );
        // A named service that this server does not serve is not healthy.
        let mut env = grpc_env(process);
        env.push(("RUST_LOG".into(), "off".into()));
        let mut command = tokio::process::Command::new(binary_dir().join(process.name));
        let other = command
            .args(["healthcheck", "--service", "runnel.v1.Nothing", "--config"])
            .arg(&config)
            .envs(env)
            .output()
            .await
            .expect("run healthcheck");
        assert_eq!(other.status.code(), Some(1), "{}: {other:?}", process.name);
    }

    // Once the broker has stopped, its health check fails with exit code 1 and says why.
    let broker_env = grpc_env(&pipeline.broker);
    let Pipeline { broker, dir, .. } = pipeline;
    let status = broker.terminate().await.expect("terminate");
    assert!(status.success());
    let output = healthcheck("runnel-broker", &config, &broker_env).await;
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("not healthy: cannot connect"), "{stderr}");
    drop(dir);
}

#[tokio::test]
async fn a_healthcheck_without_a_fixed_port_or_a_valid_config_fails() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("runnel.toml");
    std::fs::write(&config, "[broker.server]\ngrpc = \"127.0.0.1:0\"\n").expect("config");
    let output = healthcheck("runnel-broker", &config, &[]).await;
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("has port 0"),
        "{output:?}"
    );

    std::fs::write(&config, "[broker]\nno_such_key = 1\n").expect("config");
    let output = healthcheck("runnel-broker", &config, &[]).await;
    assert_eq!(
        output.status.code(),
        Some(1),
        "a probe knows one failure code: {output:?}"
    );
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("no_such_key"),
        "{output:?}"
    );
}
