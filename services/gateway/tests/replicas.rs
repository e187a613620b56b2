//! Two gateway replicas over one broker and one store, all in-process on ephemeral ports:
//! webhooks registered through one are listed by both, each result reaches a webhook once
//! across both, the survivor takes a stopped replica's webhooks over from their committed
//! cursors, and a deletion through one replica stops delivery on the other.

use runnel_broker::BrokerConfig;
use runnel_gateway::GatewayConfig;
use runnel_proto::Millis;
use runnel_proto::v1::store_client::StoreClient;
use runnel_proto::v1::{PutRequest, QueryResult};
use runnel_store::StoreConfig;
use runnel_testkit::{Services, eventually};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tonic::transport::Channel;

const WAIT: Duration = Duration::from_secs(60);
/// Short, so that a stopped replica's webhooks move within the test's patience.
const SESSION_TIMEOUT: Duration = Duration::from_secs(1);
const MAX_BATCH: usize = 5;

/// One result as a receiver identifies it.
type ResultId = (String, String, i64, u64);

/// Deliveries a receiver accepted, in arrival order: each one's results.
#[derive(Clone, Default)]
struct Receiver {
    url: String,
    deliveries: Arc<Mutex<Vec<Vec<ResultId>>>>,
}

impl Receiver {
    async fn start() -> Receiver {
        use axum::routing::post;
        let deliveries: Arc<Mutex<Vec<Vec<ResultId>>>> = Arc::default();
        let recorded = Arc::clone(&deliveries);
        let app = axum::Router::new().route(
            "/hook",
            post(move |body: axum::Json<serde_json::Value>| {
                let recorded = Arc::clone(&recorded);
                async move {
                    let results = body["results"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|r| {
                            (
                                r["query"].as_str().unwrap().to_owned(),
                                r["key"].as_str().unwrap().to_owned(),
                                r["window_start_ms"]
                                    .as_i64()
                                    .unwrap_or_else(|| panic!("no window_start_ms in {r}")),
                                r["sequence"].as_u64().unwrap(),
                            )
                        })
                        .collect();
                    recorded.lock().unwrap().push(results);
                    axum::http::StatusCode::NO_CONTENT
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Receiver { url, deliveries }
    }

    /// How often each result arrived.
    fn counts(&self) -> BTreeMap<ResultId, usize> {
        let mut counts = BTreeMap::new();
        for delivery in self.deliveries.lock().unwrap().iter() {
            for id in delivery {
                *counts.entry(id.clone()).or_insert(0) += 1;
            }
        }
        counts
    }

    fn keys(&self) -> Vec<String> {
        self.counts()
            .keys()
            .map(|(_, key, _, _)| key.clone())
            .collect()
    }
}

/// A broker and a store, shared by the gateways.
struct Core {
    _dir: tempfile::TempDir,
    services: Services,
    store: StoreClient<Channel>,
    store_url: String,
    broker_url: String,
}

impl Core {
    async fn start() -> Core {
        let dir = tempfile::tempdir().unwrap();
        let mut services = Services::new();
        let store = services
            .start_on_loopback(
                "store",
                runnel_store::run,
                StoreConfig {
                    data_dir: dir.path().join("store"),
                    fsync: runnel_log::FsyncPolicy::Never,
                    ..StoreConfig::default()
                },
            )
            .await;
        let broker = services
            .start_on_loopback(
                "broker",
                runnel_broker::run,
                BrokerConfig {
                    data_dir: dir.path().join("broker"),
                    ..BrokerConfig::default()
                },
            )
            .await;
        let store_url = format!("http://{}", store.grpc);
        Core {
            _dir: dir,
            services,
            store: StoreClient::connect(store_url.clone()).await.unwrap(),
            store_url,
            broker_url: format!("http://{}", broker.grpc),
        }
    }

    async fn gateway(&self) -> Gateway {
        let mut services = Services::new();
        let mut config = GatewayConfig {
            store: self.store_url.clone(),
            broker: self.broker_url.clone(),
            ..GatewayConfig::default()
        };
        config.webhooks.max_batch = MAX_BATCH;
        config.webhooks.initial_backoff = Duration::from_millis(20);
        config.webhooks.session_timeout = SESSION_TIMEOUT;
        // The receivers are on loopback, plain http: allowlisted.
        config.webhooks.allow = vec!["127.0.0.1/32".into()];
        let gateway = services
            .start_on_loopback("gateway", runnel_gateway::run, config)
            .await;
        let gateway = Gateway {
            http: gateway.http.unwrap(),
            services,
        };
        eventually(WAIT, "the gateway to follow the store", || async {
            gateway
                .get("/v1/pipeline")
                .await
                .is_some_and(|json| json["gateway"]["store_stream"] == "connected")
        })
        .await;
        gateway
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

struct Gateway {
    http: SocketAddr,
    services: Services,
}

impl Gateway {
    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.http)
    }

    /// The JSON answer to a GET, if it succeeded.
    async fn get(&self, path: &str) -> Option<serde_json::Value> {
        let response = reqwest::get(self.url(path)).await.ok()?;
        if !response.status().is_success() {
            return None;
        }
        response.json().await.ok()
    }

    async fn register(&self, receiver: &Receiver) -> u64 {
        let response = reqwest::Client::new()
            .post(self.url("/v1/webhooks"))
            .json(&serde_json::json!({ "url": receiver.url, "query": "q" }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201);
        let created: serde_json::Value = response.json().await.unwrap();
        created["id"].as_u64().unwrap()
    }

    /// Whether this replica delivers webhook `id` now.
    async fn delivers(&self, id: u64) -> bool {
        self.get(&format!("/v1/webhooks/{id}"))
            .await
            .is_some_and(|hook| hook["delivered_here"] == true)
    }

    async fn stop(self) {
        self.services
            .stop(Duration::from_secs(15))
            .await
            .expect("stops cleanly in time");
    }
}

fn result(key: &str, start: i64) -> QueryResult {
    QueryResult {
        query: "q".into(),
        key: key.into(),
        window_start: Some(Millis(start).into()),
        window_end: Some(Millis(start + 10_000).into()),
        values: [("count".to_owned(), 1.0)].into(),
        emitted_at: Some(Millis(start + 12_000).into()),
        ..Default::default()
    }
}

/// Waits until every one of `gateways` lists webhook `id` and exactly one delivers it;
/// that one's index.
async fn owner(gateways: &[&Gateway], id: u64) -> usize {
    eventually(WAIT, "one replica to deliver the webhook", || async {
        let mut delivering = Vec::new();
        for (i, gateway) in gateways.iter().enumerate() {
            // Every replica lists it, one delivers it.
            let hook = gateway.get(&format!("/v1/webhooks/{id}")).await?;
            if hook["delivered_here"] == true {
                delivering.push(i);
            }
        }
        (delivering.len() == 1).then(|| delivering[0])
    })
    .await
}

#[tokio::test]
async fn replicas_share_webhooks_and_deliver_each_result_once() {
    let mut core = Core::start().await;
    let (a, b) = (core.gateway().await, core.gateway().await);
    let receiver = Receiver::start().await;
    let id = a.register(&receiver).await;
    let listed = eventually(WAIT, "the webhook listed on the other replica", || async {
        b.get("/v1/webhooks").await.filter(|json| {
            json["webhooks"]
                .as_array()
                .is_some_and(|hooks| hooks.len() == 1 && hooks[0]["id"] == id)
        })
    })
    .await;
    assert_eq!(listed["webhooks"][0]["url"], receiver.url.as_str());
    assert!(
        listed["webhooks"][0].get("secret").is_none(),
        "secrets are shown only once"
    );
    owner(&[&a, &b], id).await;

    let keys: Vec<String> = (0..40).map(|i| format!("k{i:02}")).collect();
    for chunk in keys.chunks(4) {
        core.put(chunk.iter().map(|k| result(k, 0)).collect()).await;
    }
    // Delivery is in sequence order: once the last result is in, every earlier one is.
    core.put(vec![result("last", 0)]).await;
    eventually(WAIT, "every result delivered", || async {
        receiver.keys().contains(&"last".to_owned())
    })
    .await;
    let counts = receiver.counts();
    assert_eq!(counts.len(), keys.len() + 1, "every result: {counts:?}");
    let twice: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "delivered more than once: {twice:?}");

    // Either replica tells how delivery went: the one delivering from its own task, the
    // other from the cursors committed to the group — the same count once committed.
    let delivering = owner(&[&a, &b], id).await;
    for (replica, gateway) in [&a, &b].into_iter().enumerate() {
        let from = if replica == delivering {
            "this replica"
        } else {
            "last commit"
        };
        let hook = eventually(WAIT, "the delivery status on every replica", || async {
            gateway
                .get(&format!("/v1/webhooks/{id}"))
                .await
                .filter(|hook| hook["status"]["delivered"] == counts.len() as u64)
        })
        .await;
        assert_eq!(hook["status_from"], from, "{hook}");
        assert_eq!(hook["delivered_here"], replica == delivering, "{hook}");
        assert_eq!(hook["status"]["failures"], 0, "{hook}");
    }
    let listed = b.get("/v1/webhooks").await.expect("list");
    assert_eq!(
        listed["webhooks"][0]["status"]["delivered"],
        counts.len() as u64,
        "{listed}"
    );

    a.stop().await;
    b.stop().await;
    core.services.stop(Duration::from_secs(15)).await.unwrap();
}

/// Every result `k000`… below `total` arrived; a result arrived twice only within one batch
/// — the batch a replica had delivered but not yet committed the cursor of when it stopped
/// or lost the webhook, delivered again by the next owner from the committed cursor.
fn assert_every_result_once_but_one_batch(receiver: &Receiver, total: usize) {
    let counts = receiver.counts();
    let missing: Vec<usize> = (0..total)
        .filter(|i| {
            !counts
                .keys()
                .any(|(_, key, _, _)| *key == format!("k{i:03}"))
        })
        .collect();
    assert!(missing.is_empty(), "results never delivered: {missing:?}");
    let twice: Vec<ResultId> = counts
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(id, _)| id.clone())
        .collect();
    assert!(
        counts.values().all(|n| *n <= 2),
        "a result delivered more than twice: {counts:?}"
    );
    if !twice.is_empty() {
        let deliveries = receiver.deliveries.lock().unwrap();
        let within_one_batch = deliveries
            .iter()
            .any(|batch| twice.iter().all(|id| batch.contains(id)));
        assert!(
            within_one_batch && twice.len() <= MAX_BATCH,
            "duplicates beyond one unacknowledged batch: {twice:?}"
        );
    }
}

#[tokio::test]
async fn the_survivor_takes_a_stopped_replicas_webhooks_over_from_their_cursors() {
    let mut core = Core::start().await;
    let gateways = vec![core.gateway().await, core.gateway().await];
    let receiver = Receiver::start().await;
    let id = gateways[0].register(&receiver).await;
    let owner_index = owner(&[&gateways[0], &gateways[1]], id).await;

    // Results flow while the owner is stopped.
    let total = 120usize;
    let mut sent = 0usize;
    while sent < 40 {
        core.put(
            (sent..sent + 4)
                .map(|i| result(&format!("k{i:03}"), 0))
                .collect(),
        )
        .await;
        sent += 4;
    }
    eventually(WAIT, "the owner to deliver some results", || async {
        receiver.counts().len() >= 8
    })
    .await;
    let mut gateways = gateways;
    let stopped = gateways.remove(owner_index);
    let survivor = gateways.remove(0);
    let stopping = tokio::spawn(stopped.stop());
    while sent < total {
        core.put(
            (sent..sent + 4)
                .map(|i| result(&format!("k{i:03}"), 0))
                .collect(),
        )
        .await;
        sent += 4;
    }
    stopping.await.unwrap();
    core.put(vec![result("last", 0)]).await;
    eventually(WAIT, "the survivor to deliver everything", || async {
        receiver.keys().contains(&"last".to_owned())
    })
    .await;
    assert!(survivor.delivers(id).await, "the survivor took it over");

    assert_every_result_once_but_one_batch(&receiver, total);

    survivor.stop().await;
    core.services.stop(Duration::from_secs(15)).await.unwrap();
}

#[tokio::test]
async fn a_deletion_through_one_replica_stops_delivery_on_the_other() {
    let mut core = Core::start().await;
    let (a, b) = (core.gateway().await, core.gateway().await);
    let deleted = Receiver::start().await;
    let id = a.register(&deleted).await;
    let owner_index = owner(&[&a, &b], id).await;
    let (delivering, other) = if owner_index == 0 { (&a, &b) } else { (&b, &a) };
    core.put(vec![result("before", 0)]).await;
    eventually(WAIT, "a delivery before the deletion", || async {
        deleted.keys() == ["before"]
    })
    .await;

    let response = reqwest::Client::new()
        .delete(other.url(&format!("/v1/webhooks/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 204);
    // Once the owner has read the deletion, it no longer lists or delivers the webhook.
    eventually(WAIT, "the owner to read the deletion", || async {
        let response = reqwest::get(delivering.url(&format!("/v1/webhooks/{id}")))
            .await
            .unwrap();
        response.status() == 404
    })
    .await;
    // A second webhook shows when results written after the deletion have been delivered.
    let witness = Receiver::start().await;
    let witness_id = b.register(&witness).await;
    owner(&[&a, &b], witness_id).await;
    core.put(vec![result("after", 0)]).await;
    eventually(WAIT, "the witness to receive the later result", || async {
        witness.keys() == ["after"]
    })
    .await;
    assert_eq!(deleted.keys(), ["before"], "nothing after the deletion");

    a.stop().await;
    b.stop().await;
    core.services.stop(Duration::from_secs(15)).await.unwrap();
}

#[tokio::test]
async fn a_replica_that_joins_while_results_flow_takes_its_share_and_loses_nothing() {
    let mut core = Core::start().await;
    let first = core.gateway().await;
    // Webhooks in at least five of the eight partitions: whichever four the joining
    // replica is given, it takes some of them over.
    let mut hooks: Vec<(u64, Receiver)> = Vec::new();
    let mut partitions = std::collections::BTreeSet::new();
    while partitions.len() < 5 {
        assert!(hooks.len() < 64, "ids spread over partitions");
        let receiver = Receiver::start().await;
        let id = first.register(&receiver).await;
        let hook = first.get(&format!("/v1/webhooks/{id}")).await.unwrap();
        partitions.insert(hook["partition"].as_u64().unwrap());
        hooks.push((id, receiver));
    }
    for (id, _) in &hooks {
        owner(&[&first], *id).await;
    }

    let total = 120usize;
    let mut sent = 0usize;
    while sent < 40 {
        core.put(
            (sent..sent + 4)
                .map(|i| result(&format!("k{i:03}"), 0))
                .collect(),
        )
        .await;
        sent += 4;
    }
    let second = core.gateway().await;
    while sent < total {
        core.put(
            (sent..sent + 4)
                .map(|i| result(&format!("k{i:03}"), 0))
                .collect(),
        )
        .await;
        sent += 4;
    }
    core.put(vec![result("last", 0)]).await;
    for (id, receiver) in &hooks {
        eventually(
            WAIT,
            format!("webhook {id} to receive everything"),
            || async { receiver.keys().contains(&"last".to_owned()) },
        )
        .await;
        assert_every_result_once_but_one_batch(receiver, total);
    }
    let mut taken = 0;
    for (id, _) in &hooks {
        if owner(&[&first, &second], *id).await == 1 {
            taken += 1;
        }
    }
    assert!(taken > 0, "the joining replica delivers some webhooks");

    first.stop().await;
    second.stop().await;
    core.services.stop(Duration::from_secs(15)).await.unwrap();
}
