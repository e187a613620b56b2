//! The gateway over real gRPC and HTTP, in front of a real store, all in-process on
//! ephemeral ports.

use futures::StreamExt;
use runnel_gateway::GatewayConfig;
use runnel_proto::Millis;
use runnel_proto::v1::gateway_client::GatewayClient;
use runnel_proto::v1::store_client::StoreClient;
use runnel_proto::v1::{GetRequest, PutRequest, QueryResult, RangeRequest, WatchRequest};
use runnel_server::{Listeners, Shutdown, ShutdownTrigger};
use runnel_store::StoreConfig;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tonic::Code;
use tonic::transport::Channel;

struct Stack {
    _dir: tempfile::TempDir,
    store: StoreClient<Channel>,
    gateway: GatewayClient<Channel>,
    http: SocketAddr,
    trigger: ShutdownTrigger,
    tasks: Vec<JoinHandle<Result<(), String>>>,
}

async fn listener() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").await.unwrap()
}

async fn start(max_watchers: usize) -> Stack {
    let dir = tempfile::tempdir().unwrap();
    let (trigger, shutdown) = Shutdown::new();
    let store_listeners = Listeners {
        grpc: listener().await,
        admin: listener().await,
        http: None,
    };
    let store_addr = store_listeners.grpc.local_addr().unwrap();
    let store_config = StoreConfig {
        data_dir: dir.path().to_path_buf(),
        ..StoreConfig::default()
    };
    let gateway_listeners = Listeners {
        grpc: listener().await,
        admin: listener().await,
        http: Some(listener().await),
    };
    let gateway_addr = gateway_listeners.grpc.local_addr().unwrap();
    let http = gateway_listeners
        .http
        .as_ref()
        .unwrap()
        .local_addr()
        .unwrap();
    let gateway_config = GatewayConfig {
        store: format!("http://{store_addr}"),
        max_watchers,
        ..GatewayConfig::default()
    };
    let tasks = vec![
        tokio::spawn({
            let shutdown = shutdown.clone();
            async move {
                runnel_store::run(store_config, store_listeners, shutdown)
                    .await
                    .map_err(|e| e.to_string())
            }
        }),
        tokio::spawn(async move {
            runnel_gateway::run(gateway_config, gateway_listeners, shutdown)
                .await
                .map_err(|e| e.to_string())
        }),
    ];
    Stack {
        _dir: dir,
        store: StoreClient::connect(format!("http://{store_addr}"))
            .await
            .unwrap(),
        gateway: GatewayClient::connect(format!("http://{gateway_addr}"))
            .await
            .unwrap(),
        http,
        trigger,
        tasks,
    }
}

impl Stack {
    async fn stop(self) {
        self.trigger.trigger();
        for task in self.tasks {
            tokio::time::timeout(Duration::from_secs(15), task)
                .await
                .expect("stops in time")
                .unwrap()
                .unwrap();
        }
    }
}

fn result(key: &str, start: i64, count: f64) -> QueryResult {
    QueryResult {
        query: "q".into(),
        key: key.into(),
        window_start: Some(Millis(start).into()),
        window_end: Some(Millis(start + 10_000).into()),
        values: [("count".to_owned(), count)].into(),
        emitted_at: Some(Millis(start + 12_000).into()),
        headers: Default::default(),
        items: Default::default(),
    }
}

#[tokio::test]
async fn get_and_range_over_grpc_and_http() {
    let mut stack = start(8).await;
    let t0 = 1_714_564_800_000;
    let written = vec![
        result("sensor/1", t0, 1.0),
        result("sensor/1", t0 + 10_000, 2.0),
        result("sensor/1", t0 + 20_000, 3.0),
    ];
    stack
        .store
        .put(PutRequest {
            results: written.clone(),
        })
        .await
        .unwrap();

    let latest = stack
        .gateway
        .get(GetRequest {
            query: "q".into(),
            key: "sensor/1".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .result;
    assert_eq!(latest.as_ref(), written.last());
    let ranged = stack
        .gateway
        .range(RangeRequest {
            query: "q".into(),
            key: "sensor/1".into(),
            from: Some(Millis(t0 + 10_000).into()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(ranged, written[1..]);
    let status = stack
        .gateway
        .get(GetRequest {
            query: String::new(),
            key: "k".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().starts_with("query"), "{status:?}");

    // The same over HTTP; a key with a slash is percent-encoded in the path.
    let base = format!("http://{}/v1/results/q/sensor%2F1", stack.http);
    let json: serde_json::Value = reqwest::get(&base).await.unwrap().json().await.unwrap();
    assert_eq!(json["key"], "sensor/1");
    assert_eq!(json["window_start"], "2024-05-01T12:00:20.000Z");
    assert_eq!(json["window_start_ms"], t0 + 20_000);
    assert_eq!(json["values"]["count"], 3.0);
    let json: serde_json::Value = reqwest::get(format!(
        "{base}/range?from=2024-05-01T12:00:00Z&to={}&limit=5",
        t0 + 20_000
    ))
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    let counts: Vec<f64> = json["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["values"]["count"].as_f64().unwrap())
        .collect();
    assert_eq!(counts, [1.0, 2.0]);

    let missing = reqwest::get(format!("http://{}/v1/results/q/nobody", stack.http))
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    let body: serde_json::Value = missing.json().await.unwrap();
    assert!(body["error"].as_str().unwrap().contains("nobody"), "{body}");
    let bad = reqwest::get(format!("{base}/range?from=yesterday"))
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    let body: serde_json::Value = bad.json().await.unwrap();
    assert!(
        body["error"].as_str().unwrap().starts_with("from:"),
        "{body}"
    );
    let nowhere = reqwest::get(format!("http://{}/v2/anything", stack.http))
        .await
        .unwrap();
    assert_eq!(nowhere.status(), 404);
    stack.stop().await;
}

/// Reads server-sent events until `n` `result` events have arrived.
async fn sse_results(response: reqwest::Response, n: usize) -> Vec<serde_json::Value> {
    let mut body = response.bytes_stream();
    let mut text = String::new();
    let mut results = Vec::new();
    while results.len() < n {
        let chunk = body.next().await.expect("the stream stays open").unwrap();
        text.push_str(std::str::from_utf8(&chunk).unwrap());
        while let Some(end) = text.find("\n\n") {
            let event: String = text.drain(..end + 2).collect();
            if event.lines().any(|l| l == "event: result") {
                let data = event
                    .lines()
                    .find_map(|l| l.strip_prefix("data: "))
                    .unwrap();
                results.push(serde_json::from_str(data).unwrap());
            }
        }
    }
    results
}

#[tokio::test]
async fn live_results_over_grpc_watch_and_server_sent_events() {
    let mut stack = start(8).await;
    let mut watch = stack
        .gateway
        .watch(WatchRequest {
            query: "q".into(),
            key_prefix: "sensor-".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let sse = reqwest::get(format!(
        "http://{}/v1/watch?query=q&key_prefix=sensor-",
        stack.http
    ))
    .await
    .unwrap();
    assert_eq!(sse.status(), 200);
    assert_eq!(sse.headers()["content-type"], "text/event-stream");
    // The SSE handler has subscribed by the time its headers arrive.
    let batch = vec![
        result("sensor-1", 0, 1.0),
        result("other", 0, 2.0),
        result("sensor-2", 0, 3.0),
    ];
    stack
        .store
        .put(PutRequest {
            results: batch.clone(),
        })
        .await
        .unwrap();
    assert_eq!(watch.message().await.unwrap().as_ref(), Some(&batch[0]));
    assert_eq!(watch.message().await.unwrap().as_ref(), Some(&batch[2]));
    let events = sse_results(sse, 2).await;
    let keys: Vec<&str> = events.iter().map(|e| e["key"].as_str().unwrap()).collect();
    assert_eq!(keys, ["sensor-1", "sensor-2"]);
    stack.stop().await;
}

#[tokio::test]
async fn live_streams_are_bounded() {
    let mut stack = start(1).await;
    let _first = stack
        .gateway
        .watch(WatchRequest::default())
        .await
        .unwrap()
        .into_inner();
    let status = stack
        .gateway
        .watch(WatchRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    let refused = reqwest::get(format!("http://{}/v1/watch", stack.http))
        .await
        .unwrap();
    assert_eq!(refused.status(), 503);
    stack.stop().await;
}
