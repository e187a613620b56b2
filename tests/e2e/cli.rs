//! The `runnel` command as a user runs it: `up` (all five services in one process), `send`
//! and `get`; and a service binary refusing a bad configuration before it binds anything.

use crate::{T0, clock_events};
use runnel_e2e::process::binary_dir;
use runnel_proto::Millis;
use runnel_proto::v1::gateway_client::GatewayClient;
use runnel_proto::v1::{Event, WatchRequest};
use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;

const WAIT: Duration = Duration::from_secs(60);

/// `runnel up`'s own config: every port ephemeral, 10 s windows, no idleness.
fn up_config() -> String {
    let mut toml =
        String::from("[gateway]\nhttp = \"127.0.0.1:0\"\n[collector]\nudp = \"127.0.0.1:0\"\n");
    for service in ["collector", "broker", "analyzer", "store", "gateway"] {
        toml.push_str(&format!(
            "[{service}.server]\ngrpc = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n"
        ));
    }
    toml.push_str(crate::ANALYZER_TOML);
    toml
}

/// An event as one `runnel send` input line.
fn json_line(event: &Event, value: Option<f64>) -> String {
    let time = Millis::from(event.event_time.expect("time")).0;
    let mut line = serde_json::json!({ "id": event.id, "key": event.key, "time": time });
    if let Some(value) = value {
        line["payload"] = serde_json::json!({ "value": value });
    }
    line.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runnel_up_send_and_get_work_as_the_readme_says() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("runnel.toml");
    std::fs::write(&config, up_config()).expect("config");
    let runnel = binary_dir().join("runnel");
    let mut up = Command::new(&runnel)
        .args(["up", "--data-dir"])
        .arg(dir.path().join("data"))
        .arg("--config")
        .arg(&config)
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn runnel up");

    // The banner names every service's address; "Ctrl-C stops." ends it.
    let mut banner = BufReader::new(up.stderr.take().expect("stderr")).lines();
    let mut grpc = BTreeMap::new();
    let mut http = None;
    let read_banner = async {
        while let Some(line) = banner.next_line().await.expect("stderr") {
            let words: Vec<&str> = line.split_whitespace().collect();
            if let [service, "grpc", addr, ..] = words[..] {
                grpc.insert(service.to_owned(), addr.to_owned());
            }
            if let Some(i) = words.iter().position(|w| *w == "http") {
                http = words.get(i + 1).map(|url| url.to_string());
            }
            if line == "Ctrl-C stops." {
                return;
            }
        }
        panic!("runnel up ended before its banner");
    };
    tokio::time::timeout(WAIT, read_banner)
        .await
        .expect("banner in time");
    assert_eq!(grpc.len(), 5, "{grpc:?}");
    assert!(http.is_some_and(|url| url.starts_with("http://127.0.0.1:")));
    let collector = format!("http://{}", grpc["collector"]);
    let gateway = format!("http://{}", grpc["gateway"]);
    // Keep draining the log so the process never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = banner.next_line().await {} });

    let mut live = GatewayClient::connect(gateway.clone())
        .await
        .expect("gateway")
        .watch(WatchRequest {
            query: "avg_value_per_key".into(),
            key_prefix: "sensor".into(),
            ..Default::default()
        })
        .await
        .expect("watch")
        .into_inner();

    // Two readings in one window, then every partition's clock past it; one bad line.
    let mut lines = vec![
        json_line(
            &crate::event("s-1", "sensor-1", T0 + 1000, None),
            Some(21.5),
        ),
        json_line(
            &crate::event("s-2", "sensor-1", T0 + 5000, None),
            Some(22.5),
        ),
        "{\"key\": \"sensor-1\", \"time\": \"yesterday\"}".to_owned(),
    ];
    lines.extend(
        clock_events("cli-clock", T0 + 60_000)
            .iter()
            .map(|e| json_line(e, None)),
    );
    let mut send = Command::new(&runnel)
        .args(["send", "--collector", &collector])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn runnel send");
    let mut stdin = send.stdin.take().expect("stdin");
    stdin
        .write_all(lines.join("\n").as_bytes())
        .await
        .expect("write");
    drop(stdin);
    let sent = send.wait_with_output().await.expect("runnel send");
    let summary = String::from_utf8_lossy(&sent.stderr);
    // One line was rejected: exit 1, with the line number and the reason.
    assert_eq!(sent.status.code(), Some(1), "{summary}");
    assert!(summary.contains("line 3: time"), "{summary}");
    assert!(summary.contains("sent 6 events"), "{summary}");
    assert!(summary.contains("1 lines rejected"), "{summary}");

    let result = tokio::time::timeout(WAIT, live.message())
        .await
        .expect("a result in time")
        .expect("watch")
        .expect("a result");
    assert_eq!(result.values["count"], 2.0);
    assert_eq!(result.values["avg"], 22.0);

    let got = Command::new(&runnel)
        .args([
            "get",
            "avg_value_per_key",
            "sensor-1",
            "--gateway",
            &gateway,
        ])
        .output()
        .await
        .expect("runnel get");
    assert!(got.status.success(), "{got:?}");
    let json: serde_json::Value = serde_json::from_slice(&got.stdout).expect("one JSON object");
    assert_eq!(json["window_start_ms"], T0);
    assert_eq!(json["values"]["sum"], 44.0);
    let missing = Command::new(&runnel)
        .args(["get", "avg_value_per_key", "nobody", "--gateway", &gateway])
        .output()
        .await
        .expect("runnel get");
    assert_eq!(missing.status.code(), Some(3), "{missing:?}");

    // Ctrl-C: every service drains and the command exits 0.
    let pid = nix::unistd::Pid::from_raw(i32::try_from(up.id().expect("pid")).expect("pid"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).expect("SIGINT");
    let status = tokio::time::timeout(WAIT, up.wait())
        .await
        .expect("runnel up stops in time")
        .expect("wait");
    assert!(status.success(), "{status}");
}

#[tokio::test]
async fn a_bad_setting_stops_a_service_before_it_binds_naming_the_key() {
    let binary = binary_dir().join("runnel-broker");
    let cases = [
        (
            "RUNNEL_BROKER__DEFAULT_PARTITIONS",
            "0",
            "invalid configuration: broker.default_partitions: ",
        ),
        (
            "RUNNEL_BROKER__SERVER__GRPC",
            "localhost",
            "invalid configuration: broker.server.grpc: ",
        ),
        (
            "RUNNEL_BROKER__FSYNC",
            "sometimes",
            "invalid configuration: broker.fsync: ",
        ),
    ];
    for (key, value, expected) in cases {
        let output = Command::new(&binary)
            .env(key, value)
            .env("RUNNEL_BROKER__SERVER__ADMIN", "127.0.0.1:0")
            .env("RUNNEL_BROKER__DATA_DIR", "/nonexistent/never-created")
            .output()
            .await
            .expect("run runnel-broker");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{key}: {stderr}");
        assert!(
            output.stdout.is_empty(),
            "{key}: nothing was bound or announced"
        );
        let line = stderr.trim_end();
        assert!(
            line.starts_with(&format!("runnel-broker: {expected}")),
            "{key}: {line}"
        );
        assert!(!line.contains('\n'), "{key}: one line: {line}");
    }
}
