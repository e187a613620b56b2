//! The whole data path: collect → queue → analyse → store → serve, with crashes.

use crate::{ANALYZER_TOML, T0, clock_events, event};
use runnel_e2e::Pipeline;
use runnel_proto::Millis;
use runnel_proto::v1::analyzer_client::AnalyzerClient;
use runnel_proto::v1::broker_client::BrokerClient;
use runnel_proto::v1::collector_client::CollectorClient;
use runnel_proto::v1::gateway_client::GatewayClient;
use runnel_proto::v1::{
    DescribeQueryRequest, Event, FetchRequest, GetRequest, IngestRequest, ListTopicsRequest,
    QueryResult, RangeRequest, WatchRequest,
};
use runnel_testkit::{Deferred, eventually};
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;
use tonic::Streaming;
use tonic::transport::Channel;

const QUERY: &str = "avg_value_per_key";
const KEYS: [&str; 3] = ["k1", "k2", "k3"];
const WAIT: Duration = Duration::from_secs(60);
const S: i64 = 1000;

/// (key, window start) → (count, avg).
type Windows = BTreeMap<(String, i64), (f64, f64)>;

fn expected(entries: &[(&str, i64, f64, f64)]) -> Windows {
    entries
        .iter()
        .map(|(key, start, count, avg)| (((*key).to_owned(), *start), (*count, *avg)))
        .collect()
}

fn window_of(result: &QueryResult) -> ((String, i64), (f64, f64)) {
    let start = Millis::from(result.window_start.expect("window_start")).0;
    let values = (result.values["count"], result.values["avg"]);
    ((result.key.clone(), start), values)
}

async fn ingest(pipeline: &Pipeline, events: Vec<Event>, acked: &mut Vec<String>) {
    let mut collector = CollectorClient::connect(pipeline.collector.url())
        .await
        .expect("collector");
    let ids: Vec<String> = events.iter().map(|e| e.id.clone()).collect();
    let response = collector
        .ingest(IngestRequest {
            events,
            ..Default::default()
        })
        .await
        .unwrap_or_else(|status| panic!("ingest failed: {status}\n{}", pipeline.logs()))
        .into_inner();
    let receipt_ids: Vec<String> = response.receipts.iter().map(|r| r.id.clone()).collect();
    assert_eq!(receipt_ids, ids, "one receipt per event, in order");
    for receipt in &response.receipts {
        let position = receipt.position.as_ref().expect("position");
        assert_eq!(position.topic, "events");
    }
    acked.extend(ids);
}

/// A gateway `Watch` on the test's keys, opened before the events that it should see are
/// sent (the call returns once the subscription is live).
async fn watch(pipeline: &Pipeline) -> Streaming<QueryResult> {
    let mut gateway = GatewayClient::connect(pipeline.gateway.url())
        .await
        .expect("gateway");
    gateway
        .watch(WatchRequest {
            query: QUERY.into(),
            key_prefix: "k".into(),
            ..Default::default()
        })
        .await
        .expect("watch")
        .into_inner()
}

/// Every window of the test's keys that the store holds, through the gateway's `Range`.
async fn stored_windows(pipeline: &Pipeline) -> Windows {
    let mut gateway = GatewayClient::connect(pipeline.gateway.url())
        .await
        .expect("gateway");
    let mut all = Windows::new();
    for key in KEYS {
        let results = gateway
            .range(RangeRequest {
                query: QUERY.into(),
                key: key.into(),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|status| panic!("range failed: {status}\n{}", pipeline.logs()))
            .into_inner()
            .results;
        all.extend(results.iter().map(window_of));
    }
    all
}

/// Follows `live` until the windows seen (on top of `seen`) are exactly `expected`, then
/// checks that the store holds exactly those too. A dropped, duplicated or mis-windowed
/// event shows as a window that never matches.
async fn expect_windows(
    pipeline: &Pipeline,
    live: &mut Streaming<QueryResult>,
    seen: &mut Windows,
    expected: &Windows,
) {
    let arrived = tokio::time::timeout(WAIT, async {
        while seen != expected {
            match live.message().await {
                Ok(Some(result)) => {
                    let (window, values) = window_of(&result);
                    seen.insert(window, values);
                }
                other => return Err(format!("the watch ended: {other:?}")),
            }
        }
        Ok(())
    })
    .await;
    match arrived {
        Ok(Ok(())) => {}
        Ok(Err(why)) => panic!("{why}\nseen {seen:?}\n{}", pipeline.logs()),
        Err(_) => panic!(
            "windows never matched\nexpected {expected:?}\nseen     {seen:?}\n{}",
            pipeline.logs()
        ),
    }
    assert_eq!(
        &stored_windows(pipeline).await,
        expected,
        "the store's windows"
    );
}

/// Every event id the broker stores in `events`, checking offsets are dense.
pub(crate) async fn stored_ids(pipeline: &Pipeline) -> Vec<String> {
    let mut broker = BrokerClient::connect(pipeline.broker.url())
        .await
        .expect("broker");
    let topics = broker
        .list_topics(ListTopicsRequest {})
        .await
        .expect("list")
        .into_inner()
        .topics;
    let topic = topics
        .iter()
        .find(|t| t.name == "events")
        .expect("events topic");
    let mut ids = Vec::new();
    for partition in &topic.partitions {
        let mut offset = 0;
        loop {
            let page = broker
                .fetch(FetchRequest {
                    topic: "events".into(),
                    partition: partition.partition,
                    offset,
                    max_records: 1000,
                    ..Default::default()
                })
                .await
                .expect("fetch")
                .into_inner();
            if page.records.is_empty() {
                break;
            }
            for record in &page.records {
                assert_eq!(record.offset, offset, "offsets are dense");
                offset += 1;
                ids.push(record.event.as_ref().expect("event").id.clone());
            }
        }
    }
    ids
}

async fn http_json(url: String) -> (u16, serde_json::Value) {
    let response = reqwest::get(url).await.expect("http");
    let status = response.status().as_u16();
    (status, response.json().await.expect("json body"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn windows_are_exact_through_every_tier_and_survive_kills() {
    let mut pipeline = Pipeline::start(ANALYZER_TOML, BTreeMap::new())
        .await
        .expect("pipeline starts");
    let mut acked = Vec::new();
    let mut live = watch(&pipeline).await;
    let mut seen = Windows::new();

    // Phase 1: out-of-order events within windows, an event with no value, three keys.
    ingest(
        &pipeline,
        vec![
            event("k1-a", "k1", T0 + 5 * S, Some(10.0)),
            event("k1-b", "k1", T0 + S, Some(20.0)),
            event("k1-novalue", "k1", T0 + 4 * S, None),
            event("k1-c", "k1", T0 + 9 * S, Some(30.0)),
        ],
        &mut acked,
    )
    .await;
    ingest(
        &pipeline,
        vec![
            event("k2-a", "k2", T0 + 2 * S, Some(1.5)),
            event("k2-b", "k2", T0 + 11 * S, Some(100.0)),
            // 8 s behind the newest k2 event, but its window is still open (watermark ≤ 9 s).
            event("k2-c", "k2", T0 + 3 * S, Some(2.5)),
        ],
        &mut acked,
    )
    .await;
    ingest(
        &pipeline,
        vec![event("k3-a", "k3", T0 + 7 * S, Some(7.0))],
        &mut acked,
    )
    .await;
    // Nothing can close before every partition has told the analyzer how late it is.
    ingest(&pipeline, clock_events("clock1", T0 + 100 * S), &mut acked).await;
    let phase1 = expected(&[
        ("k1", T0, 3.0, 20.0),
        ("k2", T0, 2.0, 2.0),
        ("k2", T0 + 10 * S, 1.0, 100.0),
        ("k3", T0, 1.0, 7.0),
    ]);
    expect_windows(&pipeline, &mut live, &mut seen, &phase1).await;

    // A late event for a closed window: counted (checked at the end), not applied.
    ingest(
        &pipeline,
        vec![event("k1-late", "k1", T0 + 3 * S, Some(1000.0))],
        &mut acked,
    )
    .await;

    // The same results over HTTP/JSON.
    let http = pipeline.gateway.http.expect("gateway http");
    let (status, latest) = http_json(format!("http://{http}/v1/results/{QUERY}/k1")).await;
    assert_eq!(status, 200, "{latest}");
    assert_eq!(latest["values"]["count"], 3.0, "{latest}");
    assert_eq!(latest["values"]["avg"], 20.0, "{latest}");
    assert_eq!(latest["window_start_ms"], T0, "{latest}");
    let (_, range) = http_json(format!("http://{http}/v1/results/{QUERY}/k2/range")).await;
    let windows: Vec<(i64, f64, f64)> = range["results"]
        .as_array()
        .expect("results array")
        .iter()
        .map(|r| {
            let values = &r["values"];
            let start = r["window_start_ms"].as_i64().expect("start");
            (
                start,
                values["count"].as_f64().expect("count"),
                values["avg"].as_f64().expect("avg"),
            )
        })
        .collect();
    assert_eq!(
        windows,
        [(T0, 2.0, 2.0), (T0 + 10 * S, 1.0, 100.0)],
        "{range}"
    );
    let (status, _) = http_json(format!("http://{http}/v1/results/{QUERY}/nobody")).await;
    assert_eq!(status, 404);

    // Phase 2: SIGKILL the broker, the store and the analyzer, and start them again on the
    // same data and ports.
    for service in [
        &mut pipeline.broker,
        &mut pipeline.store,
        &mut pipeline.analyzer,
    ] {
        service.kill().await.expect("kill");
    }
    pipeline.broker = pipeline.broker.restart().await.expect("broker restarts");
    pipeline.store = pipeline.store.restart().await.expect("store restarts");
    pipeline.analyzer = pipeline
        .analyzer
        .restart()
        .await
        .expect("analyzer restarts");

    // Everything the broker acknowledged is still there, once.
    let stored = stored_ids(&pipeline).await;
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for id in &stored {
        *counts.entry(id.as_str()).or_default() += 1;
    }
    for id in &acked {
        assert_eq!(
            counts.get(id.as_str()),
            Some(&1),
            "acknowledged event {id} stored once"
        );
    }
    assert_eq!(stored.len(), acked.len(), "nothing unacknowledged appeared");
    // Every result the store acknowledged survived too.
    let mut seen = stored_windows(&pipeline).await;
    assert_eq!(seen, phase1, "results after the store's restart");

    // The pipeline keeps working across the restarts: new windows close, exactly, and the
    // analyzer's restart neither lost nor double-counted anything.
    let mut live = watch(&pipeline).await;
    ingest(
        &pipeline,
        vec![
            event("k1-d", "k1", T0 + 205 * S, Some(3.0)),
            event("k1-e", "k1", T0 + 201 * S, Some(1.0)),
            event("k3-b", "k3", T0 + 150 * S, Some(-4.0)),
        ],
        &mut acked,
    )
    .await;
    ingest(&pipeline, clock_events("clock2", T0 + 300 * S), &mut acked).await;
    let mut phase2 = phase1.clone();
    phase2.extend(expected(&[
        ("k1", T0 + 200 * S, 2.0, 2.0),
        ("k3", T0 + 150 * S, 1.0, -4.0),
    ]));
    expect_windows(&pipeline, &mut live, &mut seen, &phase2).await;

    let mut gateway = GatewayClient::connect(pipeline.gateway.url())
        .await
        .expect("gateway");
    let latest = gateway
        .get(GetRequest {
            query: QUERY.into(),
            key: "k1".into(),
        })
        .await
        .expect("get")
        .into_inner()
        .result
        .expect("a latest result");
    assert_eq!(
        Millis::from(latest.window_start.expect("start")).0,
        T0 + 200 * S
    );

    // The analyzer read k1-late before k1-d (same partition): it was counted as late once,
    // across its restart.
    let analyzer = AnalyzerClient::connect(pipeline.analyzer.url())
        .await
        .expect("analyzer");
    // A result reaches watchers once the store has it, which can be before the analyzer's
    // counters take in the events behind it: wait for them, within a generous bound.
    let described = eventually(
        WAIT,
        Deferred(|| format!("the analyzer to count every event\n{}", pipeline.logs())),
        || async {
            let described = analyzer
                .clone()
                .describe_query(DescribeQueryRequest { name: QUERY.into() })
                .await
                .expect("describe")
                .into_inner();
            (described.events_processed >= acked.len() as u64).then_some(described)
        },
    )
    .await;
    assert_eq!(described.late_events, 1, "{described:?}");
    assert_eq!(
        described.events_processed,
        acked.len() as u64,
        "{described:?}"
    );
    assert!(
        described
            .watermark
            .is_some_and(|w| Millis::from(w).0 == T0 + 298 * S),
        "{described:?}"
    );

    // A clean stop: SIGTERM → drain → exit 0, for every service.
    for process in [
        pipeline.gateway,
        pipeline.analyzer,
        pipeline.collector,
        pipeline.store,
        pipeline.broker,
    ] {
        let name = process.name;
        let status = process.terminate().await.expect("terminate");
        assert!(
            status.success(),
            "{name} exited with {status} after SIGTERM"
        );
    }
}

/// The first event a client sends may meet a broker that is not there; the collector must
/// say so (UNAVAILABLE, retryable), and take the retry once the broker is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_fails_retryably_while_the_broker_is_down() {
    let mut pipeline = Pipeline::start(ANALYZER_TOML, BTreeMap::new())
        .await
        .expect("pipeline starts");
    pipeline.broker.kill().await.expect("kill broker");
    let mut collector: CollectorClient<Channel> =
        CollectorClient::connect(pipeline.collector.url())
            .await
            .expect("collector");
    let events = vec![event("retry-1", "k1", T0, Some(1.0))];
    let status = collector
        .ingest(IngestRequest {
            events: events.clone(),
            ..Default::default()
        })
        .await
        .expect_err("no broker, no acknowledgement");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    pipeline.broker = pipeline.broker.restart().await.expect("broker restarts");
    let receipts = collector
        .ingest(IngestRequest {
            events,
            ..Default::default()
        })
        .await
        .unwrap_or_else(|status| panic!("retry failed: {status}\n{}", pipeline.logs()))
        .into_inner()
        .receipts;
    assert_eq!(receipts.len(), 1);
    assert_eq!(stored_ids(&pipeline).await, ["retry-1"]);
}
