//! The storage and data access tiers as their own processes: a store killed with SIGKILL
//! under write load loses nothing acknowledged, and a live client of the gateway sees
//! every write across the crash, in order, without a gap; the dashboard, in a real
//! headless browser, shows what the store holds and follows it live.

use futures::StreamExt;
use runnel_e2e::{Pipeline, ServiceProcess};
use runnel_proto::Millis;
use runnel_proto::v1::store_client::StoreClient;
use runnel_proto::v1::{PutRequest, QueryResult, RangeRequest};
use runnel_testkit::browser::Browser;
use runnel_testkit::{Deferred, Tool, eventually};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(60);

/// The store and the gateway, each its own process, on ephemeral ports.
struct Access {
    dir: tempfile::TempDir,
    store: ServiceProcess,
    gateway: ServiceProcess,
}

impl Access {
    async fn start() -> Access {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display();
        let config = dir.path().join("runnel.toml");
        std::fs::write(
            &config,
            format!(
                "[store]\ndata_dir = \"{d}/store\"\n[store.server]\ngrpc = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n\
                 [gateway]\nhttp = \"127.0.0.1:0\"\ndata_dir = \"{d}/gateway\"\n[gateway.server]\ngrpc = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n"
            ),
        )
        .unwrap();
        let none = BTreeMap::new();
        let store = ServiceProcess::start("runnel-store", &config, &none, dir.path())
            .await
            .unwrap();
        let env = BTreeMap::from([("RUNNEL_GATEWAY__STORE".to_owned(), store.url())]);
        let gateway = ServiceProcess::start("runnel-gateway", &config, &env, dir.path())
            .await
            .unwrap();
        Access {
            dir,
            store,
            gateway,
        }
    }

    fn http(&self, path: &str) -> String {
        format!("http://{}{path}", self.gateway.http.expect("an http port"))
    }

    fn logs(&self) -> String {
        format!(
            "===== store =====\n{}\n===== gateway =====\n{}",
            self.store.log(),
            self.gateway.log()
        )
    }

    /// Waits until the gateway follows the store, so that "from now" includes what the
    /// test writes next.
    async fn wait_connected(&self) {
        eventually(
            WAIT,
            Deferred(|| format!("the gateway to follow the store\n{}", self.logs())),
            || async {
                if let Ok(response) = reqwest::get(self.http("/v1/pipeline")).await
                    && let Ok(json) = response.json::<serde_json::Value>().await
                {
                    json["gateway"]["store_stream"] == "connected"
                } else {
                    false
                }
            },
        )
        .await;
    }
}

fn result(query: &str, key: &str, start: i64, values: &[(&str, f64)]) -> QueryResult {
    QueryResult {
        query: query.into(),
        key: key.into(),
        window_start: Some(Millis(start).into()),
        window_end: Some(Millis(start + 60_000).into()),
        values: values.iter().map(|(n, v)| ((*n).to_owned(), *v)).collect(),
        ..Default::default()
    }
}

async fn put(url: &str, results: Vec<QueryResult>) -> Result<(), tonic::Status> {
    let mut store = StoreClient::connect(url.to_owned())
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    store
        .put(PutRequest {
            results,
            fence: None,
        })
        .await
        .map(drop)
}

/// Follows a gateway SSE stream, collecting `result` event ids; fails on a gap or error.
fn follow_ids(response: reqwest::Response) -> tokio::sync::watch::Receiver<Vec<u64>> {
    let (sender, receiver) = tokio::sync::watch::channel(Vec::new());
    tokio::spawn(async move {
        let mut body = response.bytes_stream();
        let mut text = String::new();
        while let Some(Ok(chunk)) = body.next().await {
            text.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(end) = text.find("\n\n") {
                let event: String = text.drain(..end + 2).collect();
                assert!(
                    !event.contains("event: gap") && !event.contains("event: error"),
                    "{event}"
                );
                if let Some(id) = event.lines().find_map(|l| l.strip_prefix("id: ")) {
                    let id: u64 = id.parse().expect("numeric ids");
                    sender.send_modify(|ids| ids.push(id));
                }
            }
        }
    });
    receiver
}

#[tokio::test]
async fn a_store_killed_under_load_loses_nothing_and_live_clients_see_no_gap() {
    let mut access = Access::start().await;
    access.wait_connected().await;
    let sse = reqwest::get(access.http("/v1/watch?query=crash"))
        .await
        .unwrap();
    assert_eq!(sse.status(), 200);
    let mut ids = follow_ids(sse);
    let batches = 60;
    let store_url = access.store.url();
    let writer = tokio::spawn(async move {
        for batch in 0..batches {
            let results: Vec<QueryResult> = (0..10)
                .map(|i| {
                    result(
                        "crash",
                        &format!("k{i}"),
                        batch * 60_000,
                        &[("count", batch as f64)],
                    )
                })
                .collect();
            // Retried until acknowledged: through the crash and the restart.
            while put(&store_url, results.clone()).await.is_err() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    });
    // Kill the store once some writes have reached the live client.
    let some = tokio::time::timeout(WAIT, async {
        ids.wait_for(|ids| ids.len() >= 100).await.map(drop)
    })
    .await;
    assert!(
        matches!(some, Ok(Ok(()))),
        "no live results\n{}",
        access.logs()
    );
    access.store.kill().await.unwrap();
    access.store = access.store.restart().await.unwrap();
    tokio::time::timeout(WAIT, writer)
        .await
        .unwrap_or_else(|_| panic!("writes did not finish\n{}", access.logs()))
        .unwrap();

    // Every acknowledged write is there after the crash.
    let mut store = StoreClient::connect(access.store.url()).await.unwrap();
    for i in 0..10 {
        let stored = store
            .range(RangeRequest {
                query: "crash".into(),
                key: format!("k{i}"),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .results;
        let windows: Vec<i64> = stored
            .iter()
            .map(|r| Millis::from(r.window_start.unwrap()).0 / 60_000)
            .collect();
        assert_eq!(
            windows,
            (0..batches).collect::<Vec<_>>(),
            "key k{i}\n{}",
            access.logs()
        );
    }
    // The live client saw every sequence the store assigned, once, in order, though the
    // store died under it: the gateway resumed after the last one it had.
    let last = store
        .get(runnel_proto::v1::GetRequest {
            query: "crash".into(),
            key: "k9".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .result
        .unwrap()
        .sequence;
    let seen = tokio::time::timeout(WAIT, async {
        ids.wait_for(|ids| ids.last() == Some(&last))
            .await
            .map(drop)
    })
    .await;
    let seen = matches!(seen, Ok(Ok(())));
    let last_seen = ids.borrow().last().copied();
    assert!(
        seen,
        "the live stream stalled at {last_seen:?}\n{}",
        access.logs()
    );
    assert_eq!(
        *ids.borrow(),
        (1..=last).collect::<Vec<_>>(),
        "gapless and in order\n{}",
        access.logs()
    );
    drop(access.dir);
}

#[tokio::test]
async fn as_five_services_a_read_of_a_query_that_does_not_exist_is_not_found() {
    let pipeline = Pipeline::start(crate::ANALYZER_TOML, BTreeMap::new())
        .await
        .expect("pipeline");
    let http = pipeline.gateway.http.expect("an http port");
    let read = |path: &str| {
        let url = format!("http://{http}{path}");
        async move {
            let response = reqwest::get(url).await.expect("http");
            let status = response.status().as_u16();
            (
                status,
                response.json::<serde_json::Value>().await.expect("json"),
            )
        }
    };
    // The analyzer runs it and it has no results yet: known, and empty.
    let (status, body) = read("/v1/topk/avg_value_per_key").await;
    assert_eq!(status, 200, "{body}\n{}", pipeline.logs());
    assert_eq!(body["results"], serde_json::json!([]));
    // Nobody runs it: not found, naming what there is.
    let expected = r#"unknown query "avg_per_key"; known queries: avg_value_per_key"#;
    let (status, body) = read("/v1/results/avg_per_key/sensor-1/range").await;
    assert_eq!(
        (status, &body["error"]),
        (404, &serde_json::json!(expected))
    );
    let mut gateway =
        runnel_proto::v1::gateway_client::GatewayClient::connect(pipeline.gateway.url())
            .await
            .expect("gateway");
    let status = gateway
        .get(runnel_proto::v1::GetRequest {
            query: "avg_per_key".into(),
            key: "sensor-1".into(),
        })
        .await
        .expect_err("not found");
    assert_eq!(
        (status.code(), status.message()),
        (tonic::Code::NotFound, expected)
    );
}

/// What the top-keys table shows: `[[key, value], …]`.
const TOP_ROWS: &str = "JSON.stringify([...document.querySelectorAll('#topk-rows tr[data-key]')].map(tr => [tr.dataset.key, Number(tr.dataset.value)]))";

#[tokio::test]
async fn the_dashboard_shows_live_results_in_a_real_browser() {
    if !runnel_testkit::require(Tool::Chromium) {
        return;
    }
    let access = Access::start().await;
    access.wait_connected().await;
    let store = access.store.url();
    let t0 = 1_714_564_800_000;
    // Until the analyzer's meetup_topics query lands, results go into the store directly.
    put(
        &store,
        vec![
            result("meetup_topics", "Rust", t0, &[("count", 5.0)]),
            result("meetup_topics", "Go", t0, &[("count", 3.0)]),
            result("meetup_topics", "Python", t0, &[("count", 8.0)]),
            result(
                "avg_value_per_key",
                "sensor-1",
                t0,
                &[("avg", 20.5), ("count", 2.0)],
            ),
            result(
                "avg_value_per_key",
                "sensor-1",
                t0 + 60_000,
                &[("avg", 22.0), ("count", 3.0)],
            ),
        ],
    )
    .await
    .unwrap();
    let mut page = Browser::open(&access.http("/dashboard/?key=sensor-1"))
        .await
        .unwrap();
    let wanted =
        serde_json::json!(serde_json::json!([["Python", 8], ["Rust", 5], ["Go", 3]]).to_string());
    let shown = page.wait_for(TOP_ROWS, &wanted, WAIT).await.unwrap();
    assert_eq!(shown, wanted, "the first table\n{}", access.logs());
    let live = page
        .wait_for(
            "document.body.dataset.live",
            &serde_json::json!("connected"),
            WAIT,
        )
        .await
        .unwrap();
    assert_eq!(live, "connected");
    assert_chart_latest(&mut page, "22").await;

    // New results arrive: the page follows them without a reload.
    put(
        &store,
        vec![
            result("meetup_topics", "Rust", t0, &[("count", 12.0)]),
            result("meetup_topics", "Hiking", t0, &[("count", 4.0)]),
            result(
                "avg_value_per_key",
                "sensor-1",
                t0 + 120_000,
                &[("avg", 30.25), ("count", 1.0)],
            ),
        ],
    )
    .await
    .unwrap();
    let wanted = serde_json::json!(
        serde_json::json!([["Rust", 12], ["Python", 8], ["Hiking", 4], ["Go", 3]]).to_string()
    );
    let shown = page.wait_for(TOP_ROWS, &wanted, WAIT).await.unwrap();
    assert_eq!(
        shown,
        wanted,
        "the table after live updates\n{}",
        access.logs()
    );
    assert_chart_latest(&mut page, "30.25").await;
    let points = page
        .eval("document.querySelectorAll('#series-chart circle').length")
        .await
        .unwrap();
    assert_eq!(points, 3, "one point per window");
    let health = page
        .wait_for(
            "document.querySelector('#health-rows tr[data-service=\"store\"] td:last-child')?.textContent ?? null",
            &serde_json::json!("SERVING"),
            WAIT,
        )
        .await
        .unwrap();
    assert_eq!(health, "SERVING");
    let shot = screenshot_path();
    page.screenshot(&shot).await.unwrap();
    eprintln!("dashboard screenshot: {}", shot.display());

    // Opened with a query but no key while nothing new arrives: the chart picks the
    // query's first key from what the store holds, without waiting for a live result.
    let mut page = Browser::open(&access.http("/dashboard/?series=avg_value_per_key"))
        .await
        .unwrap();
    let key = page
        .wait_for(
            "document.getElementById('series-key')?.value ?? null",
            &serde_json::json!("sensor-1"),
            WAIT,
        )
        .await
        .unwrap();
    assert_eq!(key, "sensor-1", "the key picked from the stored results");
    assert_chart_latest(&mut page, "30.25").await;
}

/// Waits until the chart's "latest" figure reads `want`, and fails if it never does.
async fn assert_chart_latest(page: &mut Browser, want: &str) {
    let latest = page
        .wait_for(
            "document.getElementById('series-latest').textContent",
            &serde_json::json!(want),
            WAIT,
        )
        .await
        .unwrap();
    assert_eq!(latest, want, "the chart's latest value");
}

/// `target/dashboard.png`, next to the build's profile directories.
fn screenshot_path() -> std::path::PathBuf {
    let profile_dir = runnel_e2e::binary_dir();
    profile_dir
        .parent()
        .unwrap_or(Path::new("."))
        .join("dashboard.png")
}
