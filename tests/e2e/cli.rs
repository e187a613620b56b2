//! The `runnel` command as a user runs it: `up` (all five services in one process), `send`
//! and `get`; and a service binary refusing a bad configuration before it binds anything.

use crate::{T0, clock_events};
use runnel_e2e::binary_dir;
use runnel_proto::Millis;
use runnel_proto::v1::gateway_client::GatewayClient;
use runnel_proto::v1::{Event, WatchRequest};
use runnel_testkit::Tool;
use runnel_testkit::browser::Browser;
use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

const WAIT: Duration = Duration::from_secs(60);

/// `runnel up`'s own config: every port ephemeral, and `analyzer_toml`'s queries (none:
/// the default ones).
fn up_config(analyzer_toml: &str) -> String {
    let mut toml =
        String::from("[gateway]\nhttp = \"127.0.0.1:0\"\n[collector]\nudp = \"127.0.0.1:0\"\n");
    for service in ["collector", "broker", "analyzer", "store", "gateway"] {
        toml.push_str(&format!(
            "[{service}.server]\ngrpc = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n"
        ));
    }
    toml.push_str(analyzer_toml);
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

/// `runnel up` as a user starts it, its output on pipes, once its banner has been read.
struct RunnelUp {
    child: Child,
    /// Each service's gRPC address, from the banner.
    grpc: BTreeMap<String, String>,
    /// The gateway's HTTP address, `http://127.0.0.1:<port>`.
    http: String,
    /// What `runnel up` prints on stdout (the demo's results).
    stdout: Lines<BufReader<ChildStdout>>,
    _dir: tempfile::TempDir,
}

impl RunnelUp {
    /// Starts `runnel up` with `args` and `analyzer_toml`'s queries on ephemeral ports and
    /// a fresh data directory, and reads its banner from the pipe while it runs: a banner
    /// held back until the process ends would time this out.
    async fn start(args: &[&str], analyzer_toml: &str) -> RunnelUp {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("runnel.toml");
        std::fs::write(&config, up_config(analyzer_toml)).expect("config");
        let mut child = Command::new(binary_dir().join("runnel"))
            .args(["up", "--data-dir"])
            .arg(dir.path().join("data"))
            .arg("--config")
            .arg(&config)
            .args(args)
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn runnel up");

        // The banner names every service's address; "Ctrl-C stops." ends it.
        let mut banner = BufReader::new(child.stderr.take().expect("stderr")).lines();
        let mut grpc = BTreeMap::new();
        let mut http = None;
        let read_banner = async {
            let mut up = false;
            while let Some(line) = banner.next_line().await.expect("stderr") {
                up |= line.starts_with("runnel is up: ");
                let words: Vec<&str> = line.split_whitespace().collect();
                if let [service, "grpc", addr, ..] = words[..] {
                    grpc.insert(service.to_owned(), addr.to_owned());
                }
                if let Some(i) = words.iter().position(|w| *w == "http") {
                    http = words
                        .get(i + 1)
                        .map(|url| url.trim_end_matches("/v1/").to_owned());
                }
                if line == "Ctrl-C stops." {
                    return up;
                }
            }
            panic!("runnel up ended before its banner");
        };
        let up = tokio::time::timeout(WAIT, read_banner)
            .await
            .expect("the banner reaches the pipe while runnel up runs");
        assert!(up, "the banner says runnel is up");
        assert!(
            child.try_wait().expect("try_wait").is_none(),
            "still running"
        );
        assert_eq!(grpc.len(), 5, "{grpc:?}");
        let http = http.expect("the gateway's http address");
        assert!(http.starts_with("http://127.0.0.1:"), "{http}");
        // Keep draining the log so the process never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = banner.next_line().await {} });
        let stdout = BufReader::new(child.stdout.take().expect("stdout")).lines();
        RunnelUp {
            child,
            grpc,
            http,
            stdout,
            _dir: dir,
        }
    }

    /// Sends `signal`: every service drains and the command exits 0.
    async fn stop(mut self, signal: nix::sys::signal::Signal) {
        // Keep reading stdout, so a demo result printed while draining cannot block.
        let mut stdout = self.stdout;
        tokio::spawn(async move { while let Ok(Some(_)) = stdout.next_line().await {} });
        let pid = self.child.id().expect("pid");
        let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).expect("pid"));
        nix::sys::signal::kill(pid, signal).expect("signal");
        let status = tokio::time::timeout(WAIT, self.child.wait())
            .await
            .expect("runnel up stops in time")
            .expect("wait");
        assert!(status.success(), "{status}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runnel_up_send_and_get_work_as_the_readme_says() {
    // 10 s windows, no idleness.
    let up = RunnelUp::start(&[], crate::ANALYZER_TOML).await;
    let runnel = binary_dir().join("runnel");
    let collector = format!("http://{}", up.grpc["collector"]);
    let gateway = format!("http://{}", up.grpc["gateway"]);

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

    // In one process the gateway knows the analyzer's queries: a query that does not exist
    // is not found, and says which ones do.
    let unknown = reqwest::get(format!("{}/v1/topk/avg_value_per_kye", up.http))
        .await
        .expect("http");
    assert_eq!(unknown.status(), 404);
    let body: serde_json::Value = unknown.json().await.expect("json");
    assert_eq!(
        body["error"],
        r#"unknown query "avg_value_per_kye"; known queries: avg_value_per_key"#
    );

    // Ctrl-C: every service drains and the command exits 0.
    up.stop(nix::sys::signal::Signal::SIGINT).await;
}

/// The dashboard's chart: `[query, key, latest value shown, points drawn, URL query string]`.
const CHART: &str = "JSON.stringify([document.getElementById('series-query')?.value, \
    document.getElementById('series-key')?.value, \
    document.getElementById('series-latest')?.textContent, \
    document.querySelectorAll('#series-chart circle').length, location.search])";

/// Picks `value` in the select box `id`, as a person would.
fn pick(id: &str, value: &str) -> String {
    format!(
        "(() => {{ const s = document.getElementById('{id}'); s.value = '{value}'; \
         s.dispatchEvent(new Event('change')); return s.value; }})()"
    )
}

/// The latest average of a demo sensor, as the dashboard formats it.
async fn latest_avg(http: &str, key: &str) -> String {
    let url = format!("{http}/v1/results/{}/{key}", "demo_avg_per_sensor");
    let json: serde_json::Value = reqwest::get(url)
        .await
        .expect("get")
        .json()
        .await
        .expect("json");
    format!("{:.2}", json["values"]["avg"].as_f64().expect("an average"))
}

/// Waits until the dashboard charts `key` of the demo query with its latest average (which
/// a new window may change while this looks); the chart as last seen.
async fn wait_for_chart(page: &mut Browser, http: &str, key: &str) -> serde_json::Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let latest = latest_avg(http, key).await;
        let chart: serde_json::Value = serde_json::from_str(
            page.eval(CHART)
                .await
                .expect("eval")
                .as_str()
                .expect("json"),
        )
        .expect("json");
        let shown = chart[0] == "demo_avg_per_sensor" && chart[1] == key && chart[2] == latest;
        if (shown && chart[3].as_u64() > Some(0)) || tokio::time::Instant::now() > deadline {
            return chart;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runnel_up_demo_prints_as_it_runs_and_its_dashboard_charts_what_the_user_picks() {
    // The default queries, and the demo's.
    let mut up = RunnelUp::start(&["--demo"], "").await;

    // The demo's results reach a pipe as they are printed, while runnel up runs.
    let first = tokio::time::timeout(WAIT, up.stdout.next_line())
        .await
        .expect("a demo result in time")
        .expect("stdout")
        .expect("a line");
    let first: serde_json::Value = serde_json::from_str(&first).expect("one JSON result");
    assert_eq!(first["query"], "demo_avg_per_sensor", "{first}");
    assert!(up.child.try_wait().expect("try_wait").is_none());
    let listed: serde_json::Value = reqwest::get(format!("{}/v1/queries", up.http))
        .await
        .expect("queries")
        .json()
        .await
        .expect("json");
    let names: Vec<&str> = listed["queries"]
        .as_array()
        .expect("queries")
        .iter()
        .filter_map(|q| q["name"].as_str())
        .collect();
    assert!(names.contains(&"demo_avg_per_sensor"), "{names:?}");
    assert!(names.contains(&"meetup_topics"), "{names:?}");

    // The browser part needs Chromium; without it that part is reported skipped.
    if runnel_testkit::require(Tool::Chromium) {
        // No parameters: the page picks the query the demo feeds, and its first key.
        let mut page = Browser::open(&format!("{}/dashboard/", up.http))
            .await
            .expect("browser");
        let chart = wait_for_chart(&mut page, &up.http, "sensor-1").await;
        assert_eq!(chart[0], "demo_avg_per_sensor", "{chart}");
        assert_eq!(chart[1], "sensor-1", "{chart}");
        assert_eq!(chart[2], latest_avg(&up.http, "sensor-1").await, "{chart}");
        assert!(chart[3].as_u64() > Some(0), "points drawn: {chart}");
        let topk = page
            .wait_for(
                "document.getElementById('topk-query').value",
                &serde_json::json!("demo_avg_per_sensor"),
                WAIT,
            )
            .await
            .expect("eval");
        assert_eq!(topk, "demo_avg_per_sensor", "meetup_topics has no results");

        // Another key: the chart follows, and the URL keeps the choice.
        assert_eq!(
            page.eval(&pick("series-key", "sensor-3"))
                .await
                .expect("eval"),
            "sensor-3"
        );
        let chart = wait_for_chart(&mut page, &up.http, "sensor-3").await;
        assert_eq!(chart[1], "sensor-3", "{chart}");
        assert_eq!(chart[2], latest_avg(&up.http, "sensor-3").await, "{chart}");
        let search = chart[4].as_str().expect("search");
        assert!(search.contains("series=demo_avg_per_sensor"), "{search}");
        assert!(search.contains("key=sensor-3"), "{search}");

        // Another query, which nothing feeds: nothing to chart, and the URL says so.
        assert_eq!(
            page.eval(&pick("series-query", "meetup_topics"))
                .await
                .expect("eval"),
            "meetup_topics"
        );
        let empty = serde_json::json!([
            "meetup_topics",
            "",
            "–",
            0,
            "?topk=demo_avg_per_sensor&series=meetup_topics"
        ])
        .to_string();
        let chart = page
            .wait_for(CHART, &serde_json::json!(empty), WAIT)
            .await
            .expect("eval");
        assert_eq!(chart, serde_json::json!(empty));
    }

    // SIGTERM: every service drains and the command exits 0.
    up.stop(nix::sys::signal::Signal::SIGTERM).await;
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
