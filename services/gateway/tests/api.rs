//! The gateway over real gRPC and HTTP, in front of a real store (and a broker for its
//! webhooks), all in-process on ephemeral ports: every read and live protocol, resumption,
//! slow clients and webhooks.

use futures::StreamExt;
use runnel_broker::BrokerConfig;
use runnel_gateway::{GatewayConfig, SlowClientPolicy};
use runnel_proto::Millis;
use runnel_proto::v1::gateway_client::GatewayClient;
use runnel_proto::v1::store_client::StoreClient;
use runnel_proto::v1::{
    GetRequest, PutRequest, QueryResult, RangeRequest, TopKRequest, WatchRequest,
};
use runnel_store::StoreConfig;
use runnel_testkit::{Services, eventually};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tonic::Code;
use tonic::transport::Channel;

const WAIT: Duration = Duration::from_secs(30);

struct Stack {
    dir: tempfile::TempDir,
    store: StoreClient<Channel>,
    gateway: GatewayClient<Channel>,
    gateway_grpc: SocketAddr,
    http: SocketAddr,
    services: Services,
}

async fn start(configure: impl FnOnce(&mut GatewayConfig)) -> Stack {
    let dir = tempfile::tempdir().unwrap();
    start_in(dir, configure).await
}

async fn start_in(dir: tempfile::TempDir, configure: impl FnOnce(&mut GatewayConfig)) -> Stack {
    let mut services = Services::new();
    let store_config = StoreConfig {
        data_dir: dir.path().join("store"),
        fsync: runnel_log::FsyncPolicy::Never,
        ..StoreConfig::default()
    };
    let store = services
        .start_on_loopback("store", runnel_store::run, store_config)
        .await;
    // Webhooks live in the broker.
    let broker_config = BrokerConfig {
        data_dir: dir.path().join("broker"),
        ..BrokerConfig::default()
    };
    let broker = services
        .start_on_loopback("broker", runnel_broker::run, broker_config)
        .await;
    let mut gateway_config = GatewayConfig {
        store: format!("http://{}", store.grpc),
        broker: format!("http://{}", broker.grpc),
        ..GatewayConfig::default()
    };
    configure(&mut gateway_config);
    let gateway = services
        .start_on_loopback("gateway", runnel_gateway::run, gateway_config)
        .await;
    let stack = Stack {
        dir,
        store: StoreClient::connect(format!("http://{}", store.grpc))
            .await
            .unwrap(),
        gateway: GatewayClient::connect(format!("http://{}", gateway.grpc))
            .await
            .unwrap(),
        gateway_grpc: gateway.grpc,
        http: gateway.http.unwrap(),
        services,
    };
    stack.wait_for_hub().await;
    stack
}

impl Stack {
    async fn stop(self) -> tempfile::TempDir {
        self.services
            .stop(Duration::from_secs(15))
            .await
            .expect("stops cleanly in time");
        self.dir
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.http)
    }

    async fn json(&self, path: &str) -> serde_json::Value {
        let response = reqwest::get(self.url(path)).await.unwrap();
        assert!(
            response.status().is_success(),
            "{path}: {}",
            response.status()
        );
        response.json().await.unwrap()
    }

    /// Waits until the gateway's shared stream from the store is up, so that a live client
    /// subscribed "from now" sees the next write.
    async fn wait_for_hub(&self) {
        eventually(WAIT, "the gateway to follow the store", || async {
            if let Ok(response) = reqwest::get(self.url("/v1/pipeline")).await
                && let Ok(json) = response.json::<serde_json::Value>().await
            {
                json["gateway"]["store_stream"] == "connected"
            } else {
                false
            }
        })
        .await;
    }

    async fn put(&mut self, results: Vec<QueryResult>) {
        self.store
            .put(PutRequest {
                results,
                fence: None,
            })
            .await
            .unwrap();
    }
}

fn result(query: &str, key: &str, start: i64, count: f64) -> QueryResult {
    QueryResult {
        query: query.into(),
        key: key.into(),
        window_start: Some(Millis(start).into()),
        window_end: Some(Millis(start + 10_000).into()),
        values: [("count".to_owned(), count)].into(),
        emitted_at: Some(Millis(start + 12_000).into()),
        ..Default::default()
    }
}

#[tokio::test]
async fn get_range_and_top_k_over_grpc_and_http() {
    let mut stack = start(|_| {}).await;
    let t0 = 1_714_564_800_000;
    stack
        .put(vec![
            result("q", "sensor/1", t0, 1.0),
            result("q", "sensor/1", t0 + 10_000, 2.0),
            result("q", "sensor/1", t0 + 20_000, 3.0),
        ])
        .await;

    let latest = stack
        .gateway
        .get(GetRequest {
            query: "q".into(),
            key: "sensor/1".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .result
        .unwrap();
    assert_eq!((latest.values["count"], latest.sequence), (3.0, 3));
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
    let counts: Vec<f64> = ranged.iter().map(|r| r.values["count"]).collect();
    assert_eq!(counts, [2.0, 3.0]);
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
    let json = stack.json("/v1/results/q/sensor%2F1").await;
    assert_eq!(json["key"], "sensor/1");
    assert_eq!(json["window_start"], "2024-05-01T12:00:20.000Z");
    assert_eq!(json["window_start_ms"], t0 + 20_000);
    assert_eq!(json["values"]["count"], 3.0);
    assert_eq!(json["sequence"], 3);
    let json = stack
        .json(&format!(
            "/v1/results/q/sensor%2F1/range?from=2024-05-01T12:00:00Z&to={}&limit=5",
            t0 + 20_000
        ))
        .await;
    let counts: Vec<f64> = json["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["values"]["count"].as_f64().unwrap())
        .collect();
    assert_eq!(counts, [1.0, 2.0]);

    // Top keys of the most recent window, over both.
    stack
        .put(vec![
            result("meetup_topics", "Rust", t0, 4.0),
            result("meetup_topics", "Go", t0, 6.0),
            result("meetup_topics", "Jazz", t0, 1.0),
        ])
        .await;
    let top = stack
        .gateway
        .top_k(TopKRequest {
            query: "meetup_topics".into(),
            k: 2,
        })
        .await
        .unwrap()
        .into_inner();
    let keys: Vec<&str> = top.results.iter().map(|r| r.key.as_str()).collect();
    assert_eq!(keys, ["Go", "Rust"]);
    let json = stack.json("/v1/topk/meetup_topics?k=2").await;
    assert_eq!(json["ranked_by"], "count");
    assert_eq!(json["results"][0]["key"], "Go");
    assert_eq!(json["results"][1]["values"]["count"], 4.0);
    assert_eq!(json["window_start_ms"], t0);

    let missing = reqwest::get(stack.url("/v1/results/q/nobody"))
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    let body: serde_json::Value = missing.json().await.unwrap();
    assert!(body["error"].as_str().unwrap().contains("nobody"), "{body}");
    let bad = reqwest::get(stack.url("/v1/results/q/k/range?from=yesterday"))
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    let body: serde_json::Value = bad.json().await.unwrap();
    assert!(
        body["error"].as_str().unwrap().starts_with("from:"),
        "{body}"
    );
    let bad = reqwest::get(stack.url("/v1/topk/meetup_topics?k=100000"))
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    let nowhere = reqwest::get(stack.url("/v2/anything")).await.unwrap();
    assert_eq!(nowhere.status(), 404);
    let openapi = stack.json("/openapi.json").await;
    assert!(openapi["paths"]["/v1/topk/{query}"].is_object());
    stack.stop().await;
}

/// One server-sent event.
#[derive(Debug)]
struct SseEvent {
    name: String,
    id: Option<String>,
    data: serde_json::Value,
}

/// Reads server-sent events from `response` as they arrive.
struct SseReader {
    body: futures::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    text: String,
}

impl SseReader {
    fn new(response: reqwest::Response) -> SseReader {
        SseReader {
            body: response.bytes_stream().boxed(),
            text: String::new(),
        }
    }

    async fn next(&mut self) -> SseEvent {
        loop {
            while let Some(end) = self.text.find("\n\n") {
                let block: String = self.text.drain(..end + 2).collect();
                let field = |name: &str| {
                    block
                        .lines()
                        .find_map(|l| l.strip_prefix(name).map(|v| v.trim_start().to_owned()))
                };
                if let (Some(name), Some(data)) = (field("event:"), field("data:")) {
                    return SseEvent {
                        name,
                        id: field("id:"),
                        data: serde_json::from_str(&data).unwrap(),
                    };
                }
            }
            let chunk = tokio::time::timeout(WAIT, self.body.next())
                .await
                .expect("an event in time")
                .expect("the stream stays open")
                .unwrap();
            self.text.push_str(std::str::from_utf8(&chunk).unwrap());
        }
    }
}

#[tokio::test]
async fn live_results_over_grpc_sse_websocket_and_long_polling() {
    let mut stack = start(|_| {}).await;
    let filter = "query=q&key_prefix=sensor-&where=count%3E%3D2";
    let mut grpc = stack
        .gateway
        .watch(WatchRequest {
            query: "q".into(),
            key_prefix: "sensor-".into(),
            predicates: vec![runnel_proto::filter::parse_predicate("count>=2").unwrap()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let sse = reqwest::get(stack.url(&format!("/v1/watch?{filter}")))
        .await
        .unwrap();
    assert_eq!(sse.status(), 200);
    assert_eq!(sse.headers()["content-type"], "text/event-stream");
    let mut sse = SseReader::new(sse);
    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("ws://{}/v1/ws?{filter}", stack.http))
            .await
            .unwrap();
    // A long poll after sequence 0: it waits for the first matching write.
    let poll_url = stack.url(&format!("/v1/poll?{filter}&after=0&timeout=20s"));
    let poll = tokio::spawn(async move {
        reqwest::get(poll_url)
            .await
            .unwrap()
            .json::<serde_json::Value>()
            .await
            .unwrap()
    });
    stack
        .put(vec![
            result("q", "sensor-1", 0, 1.0),
            result("q", "other", 0, 5.0),
            result("q", "sensor-2", 0, 3.0),
            result("q2", "sensor-3", 0, 4.0),
            result("q", "sensor-4", 0, 2.0),
        ])
        .await;
    let wanted = [("sensor-2", 3), ("sensor-4", 5)];
    for (key, sequence) in wanted {
        let got = grpc.message().await.unwrap().unwrap();
        assert_eq!((got.key.as_str(), got.sequence), (key, sequence));
        let event = sse.next().await;
        assert_eq!(event.name, "result");
        assert_eq!(event.id.as_deref(), Some(sequence.to_string().as_str()));
        assert_eq!(event.data["key"], key);
        let message = tokio::time::timeout(WAIT, ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let json: serde_json::Value = serde_json::from_str(message.to_text().unwrap()).unwrap();
        assert_eq!(json["type"], "result");
        assert_eq!(json["sequence"], sequence);
        assert_eq!(json["result"]["key"], key);
    }
    let polled = tokio::time::timeout(WAIT, poll).await.unwrap().unwrap();
    let keys: Vec<&str> = polled["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["key"].as_str().unwrap())
        .collect();
    assert_eq!(keys, ["sensor-2", "sensor-4"]);
    assert_eq!(polled["next_after"], 5);
    // Polling on from the cursor waits for what comes next; a timeout answers empty.
    let empty = stack
        .json(&format!("/v1/poll?{filter}&after=5&timeout=50ms"))
        .await;
    assert_eq!(empty["results"].as_array().unwrap().len(), 0);
    assert_eq!(empty["next_after"], 5);
    ws.close(None).await.unwrap();
    stack.stop().await;
}

#[tokio::test]
async fn live_clients_resume_after_their_cursor_without_a_gap() {
    let mut stack = start(|c| c.resume_buffer = 16).await;
    let sse = reqwest::get(stack.url("/v1/watch?query=q")).await.unwrap();
    let mut sse = SseReader::new(sse);
    stack
        .put(vec![result("q", "a", 0, 1.0), result("q", "b", 0, 2.0)])
        .await;
    assert_eq!(sse.next().await.id.as_deref(), Some("1"));
    assert_eq!(sse.next().await.id.as_deref(), Some("2"));
    drop(sse);
    // Written while the client was away: some within the gateway's memory, and (with a
    // resume buffer of 16) many more that only the store's change feed still has.
    for chunk in 0..5 {
        let batch = (0..10)
            .map(|i| result("q", &format!("k{i}"), chunk * 10_000, 1.0))
            .collect();
        stack.put(batch).await;
    }
    let client = reqwest::Client::new();
    for (protocol, after) in [
        ("sse", 2u64),
        ("sse-recent", 45),
        ("websocket", 2),
        ("grpc", 2),
    ] {
        let expected: Vec<u64> = (after + 1..=52).collect();
        let got: Vec<u64> = match protocol {
            "sse" | "sse-recent" => {
                let response = client
                    .get(stack.url("/v1/watch?query=q"))
                    .header("Last-Event-ID", after.to_string())
                    .send()
                    .await
                    .unwrap();
                let mut sse = SseReader::new(response);
                let mut got = Vec::new();
                for _ in &expected {
                    got.push(sse.next().await.id.unwrap().parse().unwrap());
                }
                got
            }
            "websocket" => {
                let url = format!("ws://{}/v1/ws?query=q&after={after}", stack.http);
                let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
                let mut got = Vec::new();
                for _ in &expected {
                    let message = tokio::time::timeout(WAIT, ws.next())
                        .await
                        .unwrap()
                        .unwrap()
                        .unwrap();
                    let json: serde_json::Value =
                        serde_json::from_str(message.to_text().unwrap()).unwrap();
                    got.push(json["sequence"].as_u64().unwrap());
                }
                got
            }
            _ => {
                let mut watch = stack
                    .gateway
                    .watch(WatchRequest {
                        query: "q".into(),
                        after_sequence: Some(after),
                        ..Default::default()
                    })
                    .await
                    .unwrap()
                    .into_inner();
                let mut got = Vec::new();
                for _ in &expected {
                    got.push(watch.message().await.unwrap().unwrap().sequence);
                }
                got
            }
        };
        assert_eq!(got, expected, "{protocol} resumed after {after}");
    }
    // Long polling resumes the same way.
    let polled = stack.json("/v1/poll?query=q&after=50&timeout=1s").await;
    let sequences: Vec<u64> = polled["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["sequence"].as_u64().unwrap())
        .collect();
    assert_eq!(sequences, [51, 52]);
    stack.stop().await;
}

#[tokio::test]
async fn a_slow_client_is_bounded_and_told_while_others_keep_up() {
    for policy in [SlowClientPolicy::DropOldest, SlowClientPolicy::Disconnect] {
        let mut stack = start(|c| {
            c.live_buffer = 256;
            c.slow_clients = policy;
        })
        .await;
        // A slow client: subscribed, never reading while the writes go on.
        let slow = reqwest::get(stack.url("/v1/watch?query=q")).await.unwrap();
        let mut fast = SseReader::new(reqwest::get(stack.url("/v1/watch?query=q")).await.unwrap());
        // Enough that the socket buffers between the gateway and the slow client fill up.
        let total = 20_000u64;
        let mut seen = 0;
        for chunk in 0..(total / 100) {
            let batch = (0..100)
                .map(|i| {
                    result(
                        "q",
                        &format!("key-{i}-{}", "x".repeat(900)),
                        chunk as i64 * 1000,
                        1.0,
                    )
                })
                .collect();
            stack.put(batch).await;
            // The fast client keeps up with every write, whatever the slow one does.
            while seen < (chunk + 1) * 100 {
                let event = fast.next().await;
                assert_eq!(event.name, "result", "{policy:?}: {event:?}");
                seen += 1;
                assert_eq!(event.id.as_deref(), Some(seen.to_string().as_str()));
            }
        }
        // The slow client finally reads: a prefix of results, then what its policy says.
        let mut slow = SseReader::new(slow);
        let mut delivered = 0u64;
        let told = loop {
            let event = slow.next().await;
            match event.name.as_str() {
                "result" => delivered += 1,
                _ => break event,
            }
        };
        assert!(
            delivered < total,
            "{policy:?}: a slow client got everything?"
        );
        match policy {
            SlowClientPolicy::DropOldest => {
                assert_eq!(told.name, "gap", "{told:?}");
                assert_eq!(told.data["after_sequence"], delivered);
                assert!(told.data["missed"].as_u64().unwrap() > 0);
                // ...and the stream goes on with newer results.
                let after_gap = slow.next().await;
                assert_eq!(after_gap.name, "result");
                assert!(after_gap.id.unwrap().parse::<u64>().unwrap() > delivered + 1);
            }
            SlowClientPolicy::Disconnect => {
                assert_eq!(told.name, "error", "{told:?}");
                assert_eq!(told.data["after_sequence"], delivered);
                assert!(
                    told.data["error"]
                        .as_str()
                        .unwrap()
                        .contains("resume after")
                );
            }
        }
        stack.stop().await;
    }
}

/// Webhooks to receivers on this host (loopback, plain http), which only an allowlist
/// lets through, retried quickly.
fn loopback_webhooks(c: &mut GatewayConfig) {
    c.webhooks.allow = vec!["127.0.0.1/32".into()];
    c.webhooks.initial_backoff = Duration::from_millis(20);
}

/// A webhook receiver that fails the first `failures` deliveries, and records the rest.
struct Receiver {
    url: String,
    deliveries: Arc<Mutex<Vec<(axum::http::HeaderMap, serde_json::Value)>>>,
    attempts: Arc<Mutex<u32>>,
}

/// What a receiver records, and the app that records it, failing the first `failures`.
fn receiver_app(failures: u32) -> (axum::Router, Receiver) {
    use axum::routing::post;
    let deliveries = Arc::new(Mutex::new(Vec::new()));
    let attempts = Arc::new(Mutex::new(0u32));
    let (d, a) = (Arc::clone(&deliveries), Arc::clone(&attempts));
    let app = axum::Router::new().route(
        "/hook",
        post(
            move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
                let (d, a) = (Arc::clone(&d), Arc::clone(&a));
                async move {
                    let attempt = {
                        let mut a = a.lock().unwrap();
                        *a += 1;
                        *a
                    };
                    if attempt <= failures {
                        return axum::http::StatusCode::SERVICE_UNAVAILABLE;
                    }
                    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
                    // Check the signature as a receiver would: HMAC-SHA256 of "<ts>.<body>".
                    let ts = headers["x-runnel-timestamp"].to_str().unwrap().to_owned();
                    let mut signed = ts.into_bytes();
                    signed.push(b'.');
                    signed.extend_from_slice(&body);
                    d.lock().unwrap().push((
                        headers,
                        serde_json::json!({"body": json, "signed": hex_of(&signed)}),
                    ));
                    axum::http::StatusCode::NO_CONTENT
                }
            },
        ),
    );
    let receiver = Receiver {
        url: String::new(),
        deliveries,
        attempts,
    };
    (app, receiver)
}

/// A plain-http receiver on loopback.
async fn receiver(failures: u32) -> Receiver {
    let (app, mut receiver) = receiver_app(failures);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    receiver.url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    receiver
}

/// An https receiver on loopback with the certificate `cert`.
async fn tls_receiver(cert: &runnel_security::certs::Issued) -> Receiver {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let (app, mut receiver) = receiver_app(0);
    let chain = CertificateDer::pem_slice_iter(cert.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_slice(cert.key_pem.as_bytes()).unwrap();
    let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .unwrap();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    receiver.url = format!("https://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, app) = (acceptor.clone(), app.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = hyper_util::service::TowerToHyperService::new(app);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    receiver
}

fn hex_of(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test]
async fn webhooks_retry_until_accepted_and_survive_a_restart() {
    let hook = receiver(2).await;
    let mut stack = start(loopback_webhooks).await;
    let client = reqwest::Client::new();
    let secret = "0123456789abcdef-secret";
    let created: serde_json::Value = client
        .post(stack.url("/v1/webhooks"))
        .json(&serde_json::json!({
            "url": hook.url, "query": "q", "where": ["count>1"], "secret": secret,
        }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = created["id"].as_u64().unwrap();
    assert_eq!(created["secret"], secret);
    let bad = client
        .post(stack.url("/v1/webhooks"))
        .json(&serde_json::json!({ "url": "ftp://example" }))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);

    stack
        .put(vec![
            result("q", "a", 0, 5.0),
            result("q", "b", 0, 1.0),
            result("q", "c", 0, 7.0),
        ])
        .await;
    let delivered = eventually(WAIT, "delivered despite the failures", || async {
        let status = stack.json(&format!("/v1/webhooks/{id}")).await;
        (status["status"]["delivered"] == 2).then_some(status)
    })
    .await;
    assert_eq!(delivered["status"]["failures"], 2);
    assert_eq!(delivered["status"]["retrying"], 0);
    assert_eq!(delivered["status"]["last_status"], 204);
    assert_eq!(delivered["status"]["cursor"], 3);
    assert!(
        delivered.get("secret").is_none(),
        "secrets are shown only once"
    );
    assert_eq!(*hook.attempts.lock().unwrap(), 3);
    {
        let deliveries = hook.deliveries.lock().unwrap();
        let (headers, body) = &deliveries[0];
        let keys: Vec<&str> = body["body"]["results"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["key"].as_str().unwrap())
            .collect();
        assert_eq!(keys, ["a", "c"], "filtered: count > 1");
        // The signature is HMAC-SHA256 over what the receiver got.
        let expected = {
            use hmac::Mac;
            let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
            let signed: Vec<u8> = (0..body["signed"].as_str().unwrap().len() / 2)
                .map(|i| {
                    u8::from_str_radix(&body["signed"].as_str().unwrap()[2 * i..2 * i + 2], 16)
                        .unwrap()
                })
                .collect();
            mac.update(&signed);
            format!("sha256={}", hex_of(&mac.finalize().into_bytes()))
        };
        assert_eq!(headers["x-runnel-signature"].to_str().unwrap(), expected);
        assert_eq!(
            headers["x-runnel-webhook"].to_str().unwrap(),
            id.to_string()
        );
    }

    // The registration and its cursor survive a restart of the gateway; what was written
    // meanwhile is delivered once it is back.
    let dir = stack.stop().await;
    let mut stack = start_in(dir, loopback_webhooks).await;
    stack.put(vec![result("q", "d", 0, 9.0)]).await;
    eventually(WAIT, "delivered after the restart", || async {
        hook.deliveries.lock().unwrap().len() == 2
    })
    .await;
    let second = hook.deliveries.lock().unwrap()[1].1.clone();
    assert_eq!(second["body"]["results"][0]["key"], "d");
    let listed = stack.json("/v1/webhooks").await;
    assert_eq!(listed["webhooks"].as_array().unwrap().len(), 1);
    let deleted = client
        .delete(stack.url(&format!("/v1/webhooks/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 204);
    let gone = reqwest::get(stack.url(&format!("/v1/webhooks/{id}")))
        .await
        .unwrap();
    assert_eq!(gone.status(), 404);
    stack.stop().await;
}

#[tokio::test]
async fn without_a_broker_webhooks_are_refused_and_reads_still_work() {
    let mut stack = start(|c| c.broker = String::new()).await;
    let client = reqwest::Client::new();
    let refused = client
        .post(stack.url("/v1/webhooks"))
        .json(&serde_json::json!({ "url": "http://127.0.0.1:9/hook" }))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 503);
    let message: serde_json::Value = refused.json().await.unwrap();
    assert!(
        message["error"]
            .as_str()
            .unwrap()
            .contains("gateway.broker"),
        "{message}"
    );
    let listed = reqwest::get(stack.url("/v1/webhooks")).await.unwrap();
    assert_eq!(listed.status(), 503);
    stack.put(vec![result("q", "a", 0, 5.0)]).await;
    let latest = stack.json("/v1/results/q/a").await;
    assert_eq!(latest["values"]["count"], 5.0);
    let pipeline = stack.json("/v1/pipeline").await;
    assert_eq!(pipeline["gateway"]["webhooks_failing"], 0);
    stack.stop().await;
}

#[tokio::test]
async fn live_streams_are_bounded() {
    let mut stack = start(|c| c.max_watchers = 1).await;
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
    let refused = reqwest::get(stack.url("/v1/watch")).await.unwrap();
    assert_eq!(refused.status(), 503);
    let refused = reqwest::get(stack.url("/v1/poll?timeout=1s"))
        .await
        .unwrap();
    assert_eq!(refused.status(), 503);
    stack.stop().await;
}

#[tokio::test]
async fn the_dashboard_and_its_assets_are_served() {
    let stack = start(|_| {}).await;
    let page = reqwest::get(stack.url("/dashboard/")).await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(
        page.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    assert!(page.text().await.unwrap().contains("/dashboard/app.js"));
    let script = reqwest::get(stack.url("/dashboard/app.js")).await.unwrap();
    assert!(script.text().await.unwrap().contains("EventSource"));
    let root = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
        .get(stack.url("/"))
        .send()
        .await
        .unwrap();
    assert_eq!(root.headers()["location"], "/dashboard/");
    let health = stack.json("/v1/pipeline").await;
    assert_eq!(health["services"][0]["name"], "store");
    assert_eq!(health["services"][0]["status"], "SERVING");
    stack.stop().await;
}

/// The analyzer as the gateway sees it: the queries it runs, and nothing else.
struct Analyzer(Vec<&'static str>);

#[tonic::async_trait]
impl runnel_proto::v1::analyzer_server::Analyzer for Analyzer {
    async fn list_queries(
        &self,
        _: tonic::Request<runnel_proto::v1::ListQueriesRequest>,
    ) -> Result<tonic::Response<runnel_proto::v1::ListQueriesResponse>, tonic::Status> {
        let queries = self
            .0
            .iter()
            .map(|name| runnel_proto::v1::QueryDescription {
                name: (*name).into(),
                source_topic: "events".into(),
                ..Default::default()
            })
            .collect();
        Ok(tonic::Response::new(
            runnel_proto::v1::ListQueriesResponse { queries },
        ))
    }

    async fn describe_query(
        &self,
        _: tonic::Request<runnel_proto::v1::DescribeQueryRequest>,
    ) -> Result<tonic::Response<runnel_proto::v1::QueryDescription>, tonic::Status> {
        Err(tonic::Status::unimplemented("not needed by the gateway"))
    }

    /// Answers as the analyzer would: a name it runs is taken, SQL with "oops" does not
    /// compile, anything else is created.
    async fn create_query(
        &self,
        request: tonic::Request<runnel_proto::v1::CreateQueryRequest>,
    ) -> Result<tonic::Response<runnel_proto::v1::QueryDescription>, tonic::Status> {
        let request = request.into_inner();
        if self.0.contains(&request.name.as_str()) {
            return Err(tonic::Status::already_exists(format!(
                "query {:?} exists already",
                request.name
            )));
        }
        if request.sql.contains("oops") {
            return Err(tonic::Status::invalid_argument(
                "line 1, column 8: oops is not a supported aggregate",
            ));
        }
        Ok(tonic::Response::new(runnel_proto::v1::QueryDescription {
            name: request.name,
            source_topic: "events".into(),
            sql: request.sql,
            created: true,
            start_from: request.start_from,
            ..Default::default()
        }))
    }

    /// Drops anything but the queries it runs from its configuration.
    async fn drop_query(
        &self,
        request: tonic::Request<runnel_proto::v1::DropQueryRequest>,
    ) -> Result<tonic::Response<runnel_proto::v1::DropQueryResponse>, tonic::Status> {
        let request = request.into_inner();
        if self.0.contains(&request.name.as_str()) {
            return Err(tonic::Status::failed_precondition("configured"));
        }
        Ok(tonic::Response::new(runnel_proto::v1::DropQueryResponse {
            results_deleted: if request.delete_results { 7 } else { 0 },
        }))
    }
}

/// Serves `analyzer` on an ephemeral port until the test ends; its URL.
async fn serve_analyzer(analyzer: Analyzer) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(runnel_proto::v1::analyzer_server::AnalyzerServer::new(
                analyzer,
            ))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    url
}

/// An HTTP read's status and JSON body.
async fn http_read(stack: &Stack, path: &str) -> (u16, serde_json::Value) {
    let response = reqwest::get(stack.url(path)).await.unwrap();
    (
        response.status().as_u16(),
        response.json().await.unwrap_or_default(),
    )
}

/// Queries are created and dropped through the HTTP API as through the analyzer's, with
/// the analyzer's answers mapped to HTTP statuses.
#[tokio::test]
async fn queries_are_created_and_dropped_over_http() {
    let analyzer = serve_analyzer(Analyzer(vec!["avg_value_per_key"])).await;
    let stack = start(|config| {
        config.pipeline.insert("analyzer".into(), analyzer);
    })
    .await;
    let client = reqwest::Client::new();
    let create = |body: serde_json::Value| {
        client
            .post(stack.url("/v1/queries"))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
    };
    let sql = "SELECT key, count(*) FROM events GROUP BY key, TUMBLE(event_time, '1m')";
    let created =
        create(serde_json::json!({ "name": "clicks", "sql": sql, "start_from": "earliest" }))
            .await
            .unwrap();
    assert_eq!(created.status().as_u16(), 201);
    let created: serde_json::Value = created.json().await.unwrap();
    assert_eq!(
        (
            created["name"].as_str(),
            created["sql"].as_str(),
            created["created"].as_bool()
        ),
        (Some("clicks"), Some(sql), Some(true))
    );
    for (body, status, says) in [
        (
            serde_json::json!({ "name": "avg_value_per_key", "sql": sql }),
            409,
            "exists already",
        ),
        (
            serde_json::json!({ "name": "q", "sql": "SELECT oops" }),
            400,
            "line 1, column 8",
        ),
        (
            serde_json::json!({ "name": "q", "sql": sql, "start_from": "yesterday" }),
            400,
            "start_from",
        ),
        (serde_json::json!({ "name": "q" }), 400, "not a query"),
    ] {
        let response = create(body.clone()).await.unwrap();
        assert_eq!(response.status().as_u16(), status, "{body}");
        let error: serde_json::Value = response.json().await.unwrap();
        assert!(
            error["error"].as_str().unwrap().contains(says),
            "{body}: {error}"
        );
    }
    let dropped = |path: &'static str| client.delete(stack.url(path)).send();
    let response = dropped("/v1/queries/clicks?delete_results=true")
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["results_deleted"], 7);
    assert_eq!(
        dropped("/v1/queries/avg_value_per_key")
            .await
            .unwrap()
            .status()
            .as_u16(),
        400
    );
    assert_eq!(
        dropped("/v1/queries/clicks?delete_results=maybe")
            .await
            .unwrap()
            .status()
            .as_u16(),
        400
    );
    stack.stop().await;
}

#[tokio::test]
async fn a_query_that_does_not_exist_is_not_found_and_one_without_results_is_empty() {
    let analyzer = serve_analyzer(Analyzer(vec!["avg_value_per_key", "quiet"])).await;
    let mut stack = start(|config| {
        config.pipeline.insert("analyzer".into(), analyzer);
    })
    .await;
    let t0 = 1_714_564_800_000;
    stack
        .put(vec![
            result("avg_value_per_key", "sensor-1", t0, 2.0),
            // A query the analyzer no longer runs: its results are still there to read.
            result("retired", "sensor-1", t0, 5.0),
        ])
        .await;

    // Unknown over gRPC: NOT_FOUND naming the queries there are.
    let expected = r#"unknown query "nope"; known queries: avg_value_per_key, quiet"#;
    let (get, range, top) = (
        GetRequest {
            query: "nope".into(),
            key: "sensor-1".into(),
        },
        RangeRequest {
            query: "nope".into(),
            key: "sensor-1".into(),
            ..Default::default()
        },
        TopKRequest {
            query: "nope".into(),
            k: 3,
        },
    );
    let mut gateway = stack.gateway.clone();
    for status in [
        gateway.get(get).await.map(drop),
        gateway.range(range).await.map(drop),
        gateway.top_k(top).await.map(drop),
    ] {
        let status = status.unwrap_err();
        assert_eq!(
            (status.code(), status.message()),
            (Code::NotFound, expected)
        );
    }
    // And over HTTP: 404 with the same message.
    for path in [
        "/v1/results/nope/sensor-1",
        "/v1/results/nope/sensor-1/range",
        "/v1/topk/nope",
    ] {
        let (status, body) = http_read(&stack, path).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (404, Some(expected)),
            "{path}"
        );
    }

    // Known, with no results: the quiet answers of before.
    let none = stack
        .gateway
        .get(GetRequest {
            query: "quiet".into(),
            key: "sensor-1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(none.result, None);
    let (status, body) = http_read(&stack, "/v1/results/quiet/sensor-1").await;
    assert_eq!(status, 404);
    assert!(
        body["error"].as_str().unwrap().starts_with("no result yet"),
        "{body}"
    );
    for (path, list) in [
        ("/v1/results/quiet/sensor-1/range", "results"),
        ("/v1/topk/quiet", "results"),
        // A key the query has never seen, and a query with results only in the store.
        ("/v1/results/avg_value_per_key/nobody/range", "results"),
        ("/v1/results/retired/nobody/range", "results"),
    ] {
        let (status, body) = http_read(&stack, path).await;
        assert_eq!(status, 200, "{path}: {body}");
        assert_eq!(body[list], serde_json::json!([]), "{path}");
    }
    let (status, body) = http_read(&stack, "/v1/results/retired/sensor-1").await;
    assert_eq!((status, body["values"]["count"].as_f64()), (200, Some(5.0)));

    // The list the dashboard picks from.
    let (status, body) = http_read(&stack, "/v1/queries").await;
    assert_eq!(status, 200);
    let names: Vec<&str> = body["queries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|q| q["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["avg_value_per_key", "quiet"]);
    assert_eq!(body["queries"][0]["source_topic"], "events");
    stack.stop().await;
}

#[tokio::test]
async fn without_an_analyzer_to_ask_every_query_answers_as_if_it_existed() {
    // None configured, or one that does not answer: "unknown" cannot be told from "quiet".
    let gone = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gone_url = format!("http://{}", gone.local_addr().unwrap());
    drop(gone);
    for analyzer in [None, Some(gone_url)] {
        let stack = start(|config| {
            if let Some(url) = analyzer.clone() {
                config.pipeline.insert("analyzer".into(), url);
            }
        })
        .await;
        let (status, body) = http_read(&stack, "/v1/topk/nope").await;
        assert_eq!((status, &body["results"]), (200, &serde_json::json!([])));
        let (status, body) = http_read(&stack, "/v1/results/nope/k/range").await;
        assert_eq!((status, &body["results"]), (200, &serde_json::json!([])));
        let (status, body) = http_read(&stack, "/v1/queries").await;
        let expected = if analyzer.is_some() { 503 } else { 501 };
        assert_eq!(status, expected, "{body}");
        stack.stop().await;
    }
}

/// What a page on another site could make the user's browser send is refused: a webhook
/// registration from a foreign `Origin`, a `text/plain` one (which a page can send without
/// asking first), a WebSocket opened from a foreign page. The gateway's own pages, origins
/// configured in `allowed_origins`, and clients that send no `Origin` get through.
#[tokio::test]
async fn cross_site_requests_from_a_browser_are_refused() {
    let stack = start(|c| {
        c.allowed_origins = vec!["https://ops.example.com".into()];
        c.webhooks.allow = vec!["127.0.0.1/32".into()];
    })
    .await;
    let client = reqwest::Client::new();
    let registration = serde_json::json!({ "url": "http://127.0.0.1:9/hook" });
    let register = |origin: Option<&str>| {
        let mut request = client.post(stack.url("/v1/webhooks")).json(&registration);
        if let Some(origin) = origin {
            request = request.header("Origin", origin);
        }
        request.send()
    };
    let own = format!("http://{}", stack.http);
    for (origin, allowed) in [
        (Some("http://evil.example"), false),
        (Some("null"), false),
        (Some(own.as_str()), true),
        (Some("https://ops.example.com"), true),
        (None, true),
    ] {
        let response = register(origin).await.unwrap();
        let status = response.status().as_u16();
        if allowed {
            assert_eq!(status, 201, "{origin:?}");
        } else {
            assert_eq!(status, 403, "{origin:?}");
            let body: serde_json::Value = response.json().await.unwrap();
            assert!(
                body["error"]
                    .as_str()
                    .unwrap()
                    .contains("gateway.allowed_origins"),
                "{body}"
            );
        }
    }
    // A body a page could post cross-site without a preflight.
    let plain = client
        .post(stack.url("/v1/webhooks"))
        .header("Content-Type", "text/plain")
        .body(registration.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(plain.status(), 415);
    let listed = stack.json("/v1/webhooks").await;
    assert_eq!(
        listed["webhooks"].as_array().unwrap().len(),
        3,
        "only the three allowed registrations"
    );
    // A deletion from a foreign page is refused too.
    let id = listed["webhooks"][0]["id"].as_u64().unwrap();
    let deleted = client
        .delete(stack.url(&format!("/v1/webhooks/{id}")))
        .header("Origin", "http://evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 403);

    // WebSockets: a foreign page's upgrade is refused before it is upgraded.
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut foreign = format!("ws://{}/v1/ws?query=q", stack.http)
        .into_client_request()
        .unwrap();
    foreign
        .headers_mut()
        .insert("Origin", "http://evil.example".parse().unwrap());
    match tokio_tungstenite::connect_async(foreign).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 403);
        }
        other => panic!(
            "a cross-origin WebSocket was not refused: {:?}",
            other.map(|_| ())
        ),
    }
    let mut own_page = format!("ws://{}/v1/ws?query=q", stack.http)
        .into_client_request()
        .unwrap();
    own_page
        .headers_mut()
        .insert("Origin", own.parse().unwrap());
    tokio_tungstenite::connect_async(own_page)
        .await
        .expect("the gateway's own pages open WebSockets");
    stack.stop().await;
}

/// A receiver that answers with a redirect to another receiver is not followed (the
/// redirect is its refusal, not an address to post to), and a receiver that cannot be
/// reached shows the kind of failure — never the network's own error text.
#[tokio::test]
async fn webhooks_follow_no_redirect_and_show_failure_classes_only() {
    use axum::routing::post;
    let target = receiver(0).await;
    let location = target.url.clone();
    let app = axum::Router::new().route(
        "/hook",
        post(move || {
            let location = location.clone();
            async move {
                (
                    axum::http::StatusCode::TEMPORARY_REDIRECT,
                    [(axum::http::header::LOCATION, location)],
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let redirecting = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    // A port nothing listens on: bound, then let go.
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}/hook", listener.local_addr().unwrap())
    };

    let mut stack = start(loopback_webhooks).await;
    let client = reqwest::Client::new();
    let mut ids = Vec::new();
    for url in [&redirecting, &closed] {
        let created: serde_json::Value = client
            .post(stack.url("/v1/webhooks"))
            .json(&serde_json::json!({ "url": url, "query": "q" }))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        ids.push(created["id"].as_u64().unwrap());
    }
    stack.put(vec![result("q", "a", 0, 5.0)]).await;
    let redirected = eventually(
        WAIT,
        "a failed attempt at the redirecting receiver",
        || async {
            let hook = stack.json(&format!("/v1/webhooks/{}", ids[0])).await;
            (hook["status"]["failures"].as_u64() >= Some(2)).then_some(hook)
        },
    )
    .await;
    assert_eq!(redirected["status"]["last_status"], 307, "{redirected}");
    assert_eq!(
        redirected["status"]["last_outcome"], "refused",
        "{redirected}"
    );
    assert!(
        target.deliveries.lock().unwrap().is_empty() && *target.attempts.lock().unwrap() == 0,
        "the redirect was followed"
    );
    let unreachable = eventually(WAIT, "a failed attempt at the closed port", || async {
        let hook = stack.json(&format!("/v1/webhooks/{}", ids[1])).await;
        (hook["status"]["failures"].as_u64() >= Some(1)).then_some(hook)
    })
    .await;
    assert_eq!(
        unreachable["status"]["last_outcome"], "no_answer",
        "{unreachable}"
    );
    assert_eq!(
        unreachable["status"]["last_error"], "could not connect",
        "{unreachable}"
    );
    stack.stop().await;
}

/// Registers a webhook for query `q` at `url`: the answer's status and body.
async fn register(stack: &Stack, url: &str) -> (u16, serde_json::Value) {
    let response = reqwest::Client::new()
        .post(stack.url("/v1/webhooks"))
        .json(&serde_json::json!({ "url": url, "query": "q" }))
        .send()
        .await
        .unwrap();
    (response.status().as_u16(), response.json().await.unwrap())
}

/// Without an allowlist, webhooks may target only public addresses over https: a
/// receiver on loopback is refused however its URL names it — plain http, https, a name
/// resolving to loopback, IPv6 loopback, an IPv4-mapped IPv6 address — and so is a URL
/// with credentials. Nothing is registered and the receiver is never called (these
/// tests reach loopback only; the refusals of private, link-local and unique-local
/// addresses are the target module's unit tests, which connect nowhere).
#[tokio::test]
async fn webhooks_to_loopback_are_refused_without_an_allowlist() {
    let hook = receiver(0).await;
    let port = hook
        .url
        .split(':')
        .nth(2)
        .unwrap()
        .split('/')
        .next()
        .unwrap();
    let mut stack = start(|c| c.webhooks.initial_backoff = Duration::from_millis(20)).await;
    for (url, says) in [
        (hook.url.clone(), "127.0.0.1 is a loopback address"),
        (
            format!("https://127.0.0.1:{port}/hook"),
            "127.0.0.1 is a loopback address",
        ),
        (
            format!("https://localhost:{port}/hook"),
            "localhost resolves to a loopback address",
        ),
        (
            format!("https://[::1]:{port}/hook"),
            "::1 is a loopback address",
        ),
        (
            format!("https://[::ffff:127.0.0.1]:{port}/hook"),
            "is a loopback address",
        ),
        (
            format!("https://user:secret@127.0.0.1:{port}/hook"),
            "user name or password",
        ),
        (format!("ftp://127.0.0.1:{port}/hook"), "https://"),
    ] {
        let (status, body) = register(&stack, &url).await;
        assert_eq!(status, 400, "{url}: {body}");
        let error = body["error"].as_str().unwrap();
        assert!(error.starts_with("url: "), "{url}: {error}");
        assert!(error.contains(says), "{url}: {error}");
    }
    let (status, body) = register(&stack, &format!("http://localhost:{port}/hook")).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("gateway.webhooks.allow"),
        "{body}"
    );
    let listed = stack.json("/v1/webhooks").await;
    assert_eq!(listed["webhooks"], serde_json::json!([]), "{listed}");
    stack.put(vec![result("q", "a", 0, 5.0)]).await;
    assert_eq!(*hook.attempts.lock().unwrap(), 0);
    stack.stop().await;
}

/// An allowlisted host name may be reached over plain http at whatever it resolves to,
/// while an address the allowlist does not list is still refused.
#[tokio::test]
async fn an_allowlisted_name_is_delivered_to() {
    let hook = receiver(0).await;
    let port = hook
        .url
        .split(':')
        .nth(2)
        .unwrap()
        .split('/')
        .next()
        .unwrap();
    let mut stack = start(|c| {
        c.webhooks.allow = vec!["LOCALHOST".into()];
        c.webhooks.initial_backoff = Duration::from_millis(20);
    })
    .await;
    let (status, body) = register(&stack, &hook.url).await;
    assert_eq!(status, 400, "127.0.0.1 is not listed: {body}");
    let (status, body) = register(&stack, &format!("http://localhost:{port}/hook")).await;
    assert_eq!(status, 201, "{body}");
    let id = body["id"].as_u64().unwrap();
    stack.put(vec![result("q", "a", 0, 5.0)]).await;
    eventually(WAIT, "delivered to the listed name", || async {
        let status = stack.json(&format!("/v1/webhooks/{id}")).await;
        status["status"]["delivered"] == 1
    })
    .await;
    assert_eq!(hook.deliveries.lock().unwrap().len(), 1);
    stack.stop().await;
}

/// A target is checked again when a delivery connects, not only when it was registered:
/// a webhook registered while its address was allowlisted gets nothing once the gateway
/// runs without that allowlist (as a name that resolves elsewhere after registering —
/// DNS rebinding — would), and its status says why in one class.
#[tokio::test]
async fn deliveries_check_the_address_again_when_they_connect() {
    let hook = receiver(0).await;
    let mut stack = start(loopback_webhooks).await;
    let (status, body) = register(&stack, &hook.url).await;
    assert_eq!(status, 201, "{body}");
    let id = body["id"].as_u64().unwrap();
    stack.put(vec![result("q", "a", 0, 5.0)]).await;
    eventually(WAIT, "delivered while allowlisted", || async {
        hook.deliveries.lock().unwrap().len() == 1
    })
    .await;

    let dir = stack.stop().await;
    let mut stack = start_in(dir, |c| {
        c.webhooks.initial_backoff = Duration::from_millis(20);
    })
    .await;
    stack.put(vec![result("q", "b", 0, 6.0)]).await;
    let refused = eventually(WAIT, "a refused attempt", || async {
        let hook = stack.json(&format!("/v1/webhooks/{id}")).await;
        (hook["status"]["failures"].as_u64() >= Some(2)).then_some(hook)
    })
    .await;
    assert_eq!(
        refused["status"]["last_error"], "address refused",
        "{refused}"
    );
    assert_eq!(refused["status"]["last_outcome"], "no_answer", "{refused}");
    assert_eq!(refused["status"]["delivered"], 1, "{refused}");
    assert_eq!(
        *hook.attempts.lock().unwrap(),
        1,
        "no connection after the first"
    );
    stack.stop().await;
}

/// https receivers: one whose certificate chains to `webhooks.ca` gets the signed
/// delivery; one whose certificate chains to nothing the gateway trusts gets nothing, and
/// its status says the TLS handshake failed.
#[tokio::test]
async fn https_webhooks_are_delivered_to_trusted_receivers_only() {
    use runnel_security::certs::DevCa;
    let names = ["127.0.0.1".to_owned(), "localhost".to_owned()];
    let (ca, _) = DevCa::generate("webhook receivers' CA", 1).unwrap();
    let (other, _) = DevCa::generate("an unknown CA", 1).unwrap();
    let trusted = tls_receiver(&ca.issue("receiver", &names, 1).unwrap()).await;
    let untrusted = tls_receiver(&other.issue("receiver", &names, 1).unwrap()).await;
    let certs = tempfile::tempdir().unwrap();
    let ca_file = certs.path().join("ca.pem");
    std::fs::write(&ca_file, &ca.cert_pem).unwrap();

    let mut stack = start(|c| {
        loopback_webhooks(c);
        c.webhooks.ca = Some(ca_file);
    })
    .await;
    let mut ids = Vec::new();
    for hook in [&trusted, &untrusted] {
        let (status, body) = register(&stack, &hook.url).await;
        assert_eq!(status, 201, "{}: {body}", hook.url);
        ids.push(body["id"].as_u64().unwrap());
    }
    stack.put(vec![result("q", "a", 0, 5.0)]).await;
    eventually(WAIT, "delivered over https", || async {
        trusted.deliveries.lock().unwrap().len() == 1
    })
    .await;
    {
        let deliveries = trusted.deliveries.lock().unwrap();
        let (headers, body) = &deliveries[0];
        assert!(
            headers["x-runnel-signature"]
                .to_str()
                .unwrap()
                .starts_with("sha256="),
            "{headers:?}"
        );
        assert_eq!(body["body"]["results"][0]["key"], "a");
    }
    let failed = eventually(
        WAIT,
        "a failed attempt at the untrusted receiver",
        || async {
            let hook = stack.json(&format!("/v1/webhooks/{}", ids[1])).await;
            (hook["status"]["failures"].as_u64() >= Some(1)).then_some(hook)
        },
    )
    .await;
    assert_eq!(
        failed["status"]["last_error"], "the TLS handshake failed",
        "{failed}"
    );
    assert_eq!(*untrusted.attempts.lock().unwrap(), 0);
    stack.stop().await;
}

/// A `Get` of `query`/`key` that must reflect every write up to `min_sequence`.
fn get_after(query: &str, key: &str, min_sequence: Option<u64>) -> tonic::Request<GetRequest> {
    let mut request = tonic::Request::new(GetRequest {
        query: query.into(),
        key: key.into(),
    });
    if let Some(sequence) = min_sequence {
        runnel_proto::consistency::set_min_sequence(request.metadata_mut(), sequence);
    }
    request
}

/// The sequence of the store's latest result of `query`/`key`.
async fn stored_sequence(store: &mut StoreClient<Channel>, query: &str, key: &str) -> u64 {
    store
        .get(get_after(query, key, None))
        .await
        .unwrap()
        .into_inner()
        .result
        .expect("the store holds a result")
        .sequence
}

/// The gateway answers `Get` from its cache, which its live stream keeps current: a client
/// naming the sequence of a write it knows of (gRPC metadata `runnel-min-sequence`, HTTP
/// `min_sequence=`) gets that write or a newer one, never the older version the cache held
/// — whether the write opened a new window or rewrote the current one.
#[tokio::test]
async fn a_get_naming_a_sequence_never_answers_with_an_older_version() {
    let mut stack = start(|_| {}).await;
    let t0 = 1_714_564_800_000;
    let mut gateway = stack.gateway.clone();
    for i in 0..40_i32 {
        // Even steps open a new window, odd ones rewrite the one just opened.
        let window = t0 + i64::from(i / 2) * 10_000;
        stack
            .put(vec![result("q", "k", window, f64::from(i))])
            .await;
        let sequence = stored_sequence(&mut stack.store, "q", "k").await;
        let over_grpc = gateway
            .get(get_after("q", "k", Some(sequence)))
            .await
            .unwrap()
            .into_inner()
            .result
            .unwrap();
        assert_eq!(
            (over_grpc.sequence, over_grpc.values["count"]),
            (sequence, f64::from(i)),
            "step {i}"
        );
        let over_http = stack
            .json(&format!("/v1/results/q/k?min_sequence={sequence}"))
            .await;
        assert_eq!(over_http["sequence"], sequence, "step {i}");
        assert_eq!(over_http["values"]["count"], f64::from(i), "step {i}");
    }
    // Range and TopK pass the minimum on to the store.
    let mut range = tonic::Request::new(RangeRequest {
        query: "q".into(),
        key: "k".into(),
        ..Default::default()
    });
    runnel_proto::consistency::set_min_sequence(range.metadata_mut(), 40);
    assert_eq!(
        gateway
            .range(range)
            .await
            .unwrap()
            .into_inner()
            .results
            .len(),
        20
    );
    let top = stack.json("/v1/topk/q?k=1&min_sequence=40").await;
    assert_eq!(top["results"][0]["values"]["count"], 39.0);

    let mut malformed = get_after("q", "k", None);
    malformed.metadata_mut().insert(
        runnel_proto::consistency::MIN_SEQUENCE_METADATA,
        tonic::metadata::MetadataValue::from_static("soon"),
    );
    let status = gateway.get(malformed).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("min_sequence"), "{status:?}");
    let (status, body) = http_read(&stack, "/v1/results/q/k?min_sequence=-3").await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = http_read(&stack, "/v1/results/q/k?fresh=1").await;
    assert_eq!(status, 400, "{body}");
    stack.stop().await;
}

/// Watchers are not told of a query's deletion, but it takes a sequence no result has: a
/// gateway whose stream skips a sequence forgets what it cached, so a client that has seen
/// a later write never gets the deleted result from the cache.
#[tokio::test]
async fn a_query_deleted_behind_the_gateways_back_is_not_served_from_its_cache() {
    let mut stack = start(|_| {}).await;
    let t0 = 1_714_564_800_000;
    let mut gateway = stack.gateway.clone();
    stack.put(vec![result("q", "k", t0, 1.0)]).await;
    let cached = gateway.get(get_after("q", "k", Some(1))).await.unwrap();
    assert_eq!(cached.into_inner().result.map(|r| r.sequence), Some(1));
    stack
        .store
        .delete_query(runnel_proto::v1::DeleteQueryRequest { query: "q".into() })
        .await
        .unwrap();
    // A write of another query carries the stream past the deletion.
    stack.put(vec![result("other", "x", t0, 1.0)]).await;
    let later = stored_sequence(&mut stack.store, "other", "x").await;
    assert_eq!(later, 3, "the deletion took sequence 2");
    let after = gateway
        .get(get_after("q", "k", Some(later)))
        .await
        .unwrap()
        .into_inner()
        .result;
    assert_eq!(after, None);
    let (status, _) = http_read(&stack, &format!("/v1/results/q/k?min_sequence={later}")).await;
    assert_eq!(status, 404);
    stack.stop().await;
}

/// While the gateway's stream from the store is down nothing is answered from its cache,
/// and once the stream is back the cache starts over: a query deleted in between is not
/// served from it.
#[tokio::test]
async fn the_cache_is_not_served_while_the_stream_is_down_and_starts_over_after() {
    let dir = tempfile::tempdir().unwrap();
    let t0 = 1_714_564_800_000;
    let store_config = || StoreConfig {
        data_dir: dir.path().join("store"),
        fsync: runnel_log::FsyncPolicy::Never,
        ..StoreConfig::default()
    };
    let mut first = Services::new();
    let store = first
        .start_on_loopback("store", runnel_store::run, store_config())
        .await;
    let mut gateway_services = Services::new();
    let gateway = gateway_services
        .start_on_loopback(
            "gateway",
            runnel_gateway::run,
            GatewayConfig {
                store: format!("http://{}", store.grpc),
                ..GatewayConfig::default()
            },
        )
        .await;
    let http = gateway.http.unwrap();
    let stream_is = |state: &'static str| {
        let url = format!("http://{http}/v1/pipeline");
        async move {
            eventually(WAIT, "the gateway's stream from the store", || async {
                match reqwest::get(&url).await {
                    Ok(response) => response
                        .json::<serde_json::Value>()
                        .await
                        .is_ok_and(|json| json["gateway"]["store_stream"] == state),
                    Err(_) => false,
                }
            })
            .await;
        }
    };
    stream_is("connected").await;
    let mut store_client = StoreClient::connect(format!("http://{}", store.grpc))
        .await
        .unwrap();
    store_client
        .put(PutRequest {
            results: vec![result("q", "k", t0, 1.0)],
            fence: None,
        })
        .await
        .unwrap();
    let mut client = GatewayClient::connect(format!("http://{}", gateway.grpc))
        .await
        .unwrap();
    let cached = client.get(get_after("q", "k", Some(1))).await.unwrap();
    assert_eq!(cached.into_inner().result.map(|r| r.sequence), Some(1));

    first.stop(WAIT).await.unwrap();
    stream_is("reconnecting").await;
    let status = client.get(get_after("q", "k", None)).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");

    // Meanwhile, the query is deleted: watchers are never told.
    let mut elsewhere = Services::new();
    let other = elsewhere
        .start_on_loopback("store", runnel_store::run, store_config())
        .await;
    StoreClient::connect(format!("http://{}", other.grpc))
        .await
        .unwrap()
        .delete_query(runnel_proto::v1::DeleteQueryRequest { query: "q".into() })
        .await
        .unwrap();
    elsewhere.stop(WAIT).await.unwrap();

    // The store is back where the gateway looks for it.
    let mut back = Services::new();
    let bind = |addr: SocketAddr| async move { tokio::net::TcpListener::bind(addr).await.unwrap() };
    let listeners = runnel_server::Listeners {
        grpc: bind(store.grpc).await,
        admin: bind("127.0.0.1:0".parse().unwrap()).await,
        http: None,
    };
    back.start("store", runnel_store::run, store_config(), listeners)
        .unwrap();
    stream_is("connected").await;
    let after = client
        .get(get_after("q", "k", None))
        .await
        .unwrap()
        .into_inner()
        .result;
    assert_eq!(after, None);
    gateway_services.stop(WAIT).await.unwrap();
    back.stop(WAIT).await.unwrap();
}

/// Many watchers of one filter over each protocol get every result of a burst — the
/// results of one `Put` queue up at once, so each watcher's are written in batches (gRPC:
/// tonic's DATA frames; WebSocket: several messages, one flush; SSE: hyper's write buffer)
/// — in order, none lost, none twice, and gRPC watchers decode the shared encoding.
#[tokio::test]
async fn many_watchers_of_one_filter_get_every_result_of_a_burst_in_order() {
    const WATCHERS: usize = 12;
    const BURSTS: u64 = 3;
    const PER_BURST: u64 = 150;
    let mut stack = start(|_| {}).await;
    let request = WatchRequest {
        query: "burst".into(),
        ..Default::default()
    };
    let mut grpc = Vec::new();
    let mut sse = Vec::new();
    let mut ws = Vec::new();
    for _ in 0..WATCHERS {
        // A connection per gRPC watcher, as separate clients have.
        let mut client = GatewayClient::connect(format!("http://{}", stack.gateway_grpc))
            .await
            .unwrap();
        grpc.push(client.watch(request.clone()).await.unwrap().into_inner());
        let response = reqwest::get(stack.url("/v1/watch?query=burst"))
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        sse.push(SseReader::new(response));
        let (socket, _) =
            tokio_tungstenite::connect_async(format!("ws://{}/v1/ws?query=burst", stack.http))
                .await
                .unwrap();
        ws.push(socket);
    }
    for burst in 0..BURSTS {
        let results = (0..PER_BURST)
            .map(|i| {
                let start = i64::try_from(burst * PER_BURST + i).unwrap() * 10_000;
                result("burst", &format!("k{i}"), start, 1.0)
            })
            .collect();
        stack.put(results).await;
    }
    let wanted: Vec<u64> = (1..=BURSTS * PER_BURST).collect();
    for stream in &mut grpc {
        let mut got = Vec::new();
        while got.len() < wanted.len() {
            let result = tokio::time::timeout(WAIT, stream.message())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            assert_eq!(result.query, "burst");
            got.push(result.sequence);
        }
        assert_eq!(got, wanted);
    }
    for reader in &mut sse {
        let mut got = Vec::new();
        while got.len() < wanted.len() {
            let event = reader.next().await;
            assert_eq!(event.name, "result");
            got.push(event.data["sequence"].as_u64().unwrap());
        }
        assert_eq!(got, wanted);
    }
    for socket in &mut ws {
        let mut got = Vec::new();
        while got.len() < wanted.len() {
            let message = tokio::time::timeout(WAIT, socket.next())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            let json: serde_json::Value = serde_json::from_str(message.to_text().unwrap()).unwrap();
            assert_eq!(json["type"], "result");
            got.push(json["sequence"].as_u64().unwrap());
        }
        assert_eq!(got, wanted);
        socket.close(None).await.unwrap();
    }
    stack.stop().await;
}

/// Readers hammer `Get` while a writer rewrites a few series, each reader naming the
/// greatest sequence it has seen: no answer is older than the last write of its key up to
/// that sequence, and no reader ever sees a key go back — whether the answer came from the
/// gateway's cache, a fill, or the store.
#[tokio::test]
async fn concurrent_readers_naming_what_they_saw_never_read_backwards() {
    const KEYS: u64 = 4;
    const WRITES: u64 = 300;
    const READERS: u64 = 4;
    let stack = start(|_| {}).await;
    // The store numbers writes itself: the i-th result written has sequence i + 1. Every
    // third write of a key rewrites its current window; the others open a new one.
    let write = |i: u64| {
        let key = format!("k{}", i % KEYS);
        let j = i / KEYS;
        let window = i64::try_from(j - j % 3 / 2).unwrap() * 10_000;
        (key, window)
    };
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut readers = tokio::task::JoinSet::new();
    for reader in 0..READERS {
        let mut gateway = stack.gateway.clone();
        let done = Arc::clone(&done);
        readers.spawn(async move {
            let mut seen_max = 0_u64;
            let mut seen: std::collections::BTreeMap<String, (i64, u64)> = Default::default();
            let mut reads = 0_u64;
            let mut n = reader;
            while !done.load(std::sync::atomic::Ordering::Relaxed) || reads < 50 {
                n = n.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                let key = format!("k{}", (n >> 33) % KEYS);
                let named = (seen_max > 0).then_some(seen_max);
                let answer = gateway
                    .get(get_after("q", &key, named))
                    .await
                    .unwrap()
                    .into_inner()
                    .result;
                reads += 1;
                let Some(answer) = answer else {
                    assert!(!seen.contains_key(&key), "{key} disappeared");
                    continue;
                };
                let rank = (
                    Millis::from(answer.window_start.unwrap()).0,
                    answer.sequence,
                );
                // The latest write of this key among those up to the named sequence.
                let floor = (0..named.unwrap_or(0))
                    .map(|i| (write(i), i + 1))
                    .filter(|((k, _), _)| *k == key)
                    .map(|((_, window), sequence)| (window, sequence))
                    .max();
                assert!(Some(rank) >= floor, "{key}: {rank:?} older than {floor:?}");
                let before = seen.entry(key.clone()).or_insert(rank);
                assert!(
                    rank >= *before,
                    "{key} went back: {rank:?} after {before:?}"
                );
                *before = rank;
                seen_max = seen_max.max(answer.sequence);
            }
            reads
        });
    }
    let mut store = stack.store.clone();
    for i in 0..WRITES {
        let (key, window) = write(i);
        store
            .put(PutRequest {
                results: vec![result("q", &key, window, i as f64)],
                fence: None,
            })
            .await
            .unwrap();
    }
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    while let Some(reads) = readers.join_next().await {
        assert!(reads.unwrap() >= 50);
    }
    stack.stop().await;
}

/// A store in front of the real one whose change feed the test can hold back: what it
/// relays to a watcher (the gateway's hub) waits while `held` is true.
#[derive(Clone)]
struct LaggingStore {
    real: StoreClient<Channel>,
    held: tokio::sync::watch::Receiver<bool>,
}

#[tonic::async_trait]
impl runnel_proto::v1::store_server::Store for LaggingStore {
    async fn put(
        &self,
        request: tonic::Request<PutRequest>,
    ) -> Result<tonic::Response<runnel_proto::v1::PutResponse>, tonic::Status> {
        self.real.clone().put(request.into_inner()).await
    }

    async fn get(
        &self,
        request: tonic::Request<GetRequest>,
    ) -> Result<tonic::Response<runnel_proto::v1::GetResponse>, tonic::Status> {
        self.real.clone().get(request.into_inner()).await
    }

    async fn range(
        &self,
        request: tonic::Request<RangeRequest>,
    ) -> Result<tonic::Response<runnel_proto::v1::RangeResponse>, tonic::Status> {
        self.real.clone().range(request.into_inner()).await
    }

    type WatchStream =
        std::pin::Pin<Box<dyn futures::Stream<Item = Result<QueryResult, tonic::Status>> + Send>>;

    async fn watch(
        &self,
        request: tonic::Request<WatchRequest>,
    ) -> Result<tonic::Response<Self::WatchStream>, tonic::Status> {
        let stream = self
            .real
            .clone()
            .watch(request.into_inner())
            .await?
            .into_inner();
        let held = self.held.clone();
        let relayed =
            futures::stream::unfold((stream, held), |(mut stream, mut held)| async move {
                let item = stream.message().await.transpose()?;
                let _ = held.wait_for(|held| !*held).await;
                Some((item, (stream, held)))
            });
        Ok(tonic::Response::new(Box::pin(relayed)))
    }

    async fn top_k(
        &self,
        request: tonic::Request<TopKRequest>,
    ) -> Result<tonic::Response<runnel_proto::v1::TopKResponse>, tonic::Status> {
        self.real.clone().top_k(request.into_inner()).await
    }

    async fn delete_query(
        &self,
        request: tonic::Request<runnel_proto::v1::DeleteQueryRequest>,
    ) -> Result<tonic::Response<runnel_proto::v1::DeleteQueryResponse>, tonic::Status> {
        self.real.clone().delete_query(request.into_inner()).await
    }
}

/// With the gateway's stream from the store held back, its cache still holds the older
/// version: a `Get` naming the newer write's sequence waits for the stream a little, then
/// asks the store, and gets the newer version; one that names nothing gets the cache's.
#[tokio::test]
async fn a_get_naming_a_sequence_the_stream_has_not_reached_asks_the_store() {
    let mut stack = start(|_| {}).await;
    let (hold, held) = tokio::sync::watch::channel(false);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let lagging_url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(runnel_proto::v1::store_server::StoreServer::new(
                LaggingStore {
                    real: stack.store.clone(),
                    held,
                },
            ))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let gateway = stack
        .services
        .start_on_loopback(
            "lagging gateway",
            runnel_gateway::run,
            GatewayConfig {
                store: lagging_url,
                // Long enough for a loaded machine's stream to bring the first write, so
                // that the first read is cached; the held one waits this long, then asks
                // the store.
                cache: runnel_gateway::CacheConfig {
                    wait: Duration::from_secs(3),
                    ..Default::default()
                },
                ..GatewayConfig::default()
            },
        )
        .await;
    let mut client = GatewayClient::connect(format!("http://{}", gateway.grpc))
        .await
        .unwrap();
    let pipeline = format!("http://{}/v1/pipeline", gateway.http.unwrap());
    eventually(WAIT, "the lagging gateway to follow the store", || async {
        match reqwest::get(&pipeline).await {
            Ok(response) => response
                .json::<serde_json::Value>()
                .await
                .is_ok_and(|json| json["gateway"]["store_stream"] == "connected"),
            Err(_) => false,
        }
    })
    .await;
    let t0 = 1_714_564_800_000;
    stack.put(vec![result("q", "k", t0, 1.0)]).await;
    let first = stored_sequence(&mut stack.store, "q", "k").await;
    // Cached once the stream has brought the first write (the read waits for it).
    let cached = client.get(get_after("q", "k", Some(first))).await.unwrap();
    assert_eq!(cached.into_inner().result.unwrap().sequence, first);

    hold.send_replace(true);
    stack.put(vec![result("q", "k", t0 + 10_000, 2.0)]).await;
    let second = stored_sequence(&mut stack.store, "q", "k").await;
    let named = client
        .get(get_after("q", "k", Some(second)))
        .await
        .unwrap()
        .into_inner()
        .result
        .unwrap();
    assert_eq!((named.sequence, named.values["count"]), (second, 2.0));
    let unnamed = client
        .get(get_after("q", "k", None))
        .await
        .unwrap()
        .into_inner()
        .result
        .unwrap();
    assert_eq!(
        unnamed.sequence, first,
        "served from the cache, behind the store"
    );
    hold.send_replace(false);
    stack.stop().await;
}
