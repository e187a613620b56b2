//! The store over real gRPC: `run()` in-process on ephemeral ports, each test once per
//! hot-tier backend — the in-process one, and a real `redis-server` (skipped with a reason
//! when it is not installed, unless `RUNNEL_REQUIRE_REDIS=1`).

mod replicas;
mod security;

use runnel_proto::Millis;
use runnel_proto::v1::store_client::StoreClient;
use runnel_proto::v1::{
    Comparison, DeleteQueryRequest, GetRequest, PutRequest, QueryResult, RangeRequest, TopKRequest,
    TopKResponse, ValuePredicate, WatchRequest,
};
use runnel_store::{CacheStrategy, HotBackend, StoreConfig};
use runnel_testkit::redis::RedisServer;
use runnel_testkit::{Services, Tool};
use std::path::Path;
use std::time::Duration;
use tonic::Code;
use tonic::transport::Channel;

/// One hot-tier backend to run a test on.
enum Backend {
    Memory,
    Redis(Box<RedisServer>),
}

impl Backend {
    fn name(&self) -> &'static str {
        match self {
            Backend::Memory => "memory",
            Backend::Redis(_) => "redis",
        }
    }

    fn configure(&self, config: &mut StoreConfig) {
        if let Backend::Redis(server) = self {
            config.hot.backend = HotBackend::Redis;
            config.hot.redis_url = server.url.clone();
        }
    }
}

/// The backends available here: memory always, Redis when `redis-server` is.
async fn backends() -> Vec<Backend> {
    let mut backends = vec![Backend::Memory];
    if runnel_testkit::require(Tool::RedisServer) {
        backends.push(Backend::Redis(Box::new(
            RedisServer::start().await.expect("redis-server"),
        )));
    }
    backends
}

struct Running {
    client: StoreClient<Channel>,
    store: Services,
}

async fn spawn_store(
    dir: &Path,
    backend: &Backend,
    configure: impl FnOnce(&mut StoreConfig),
) -> Running {
    let mut config = StoreConfig {
        data_dir: dir.to_path_buf(),
        ..StoreConfig::default()
    };
    backend.configure(&mut config);
    configure(&mut config);
    let mut store = Services::new();
    let addrs = store
        .start_on_loopback("store", runnel_store::run, config)
        .await;
    let client = StoreClient::connect(format!("http://{}", addrs.grpc))
        .await
        .unwrap();
    Running { client, store }
}

impl Running {
    async fn stop(self) {
        self.store
            .stop(Duration::from_secs(10))
            .await
            .expect("the store stops cleanly within its drain timeout");
    }
}

fn result(query: &str, key: &str, start: i64, count: f64) -> QueryResult {
    QueryResult {
        query: query.into(),
        key: key.into(),
        window_start: Some(Millis(start).into()),
        window_end: Some(Millis(start + 1000).into()),
        values: [("count".to_owned(), count), ("avg".to_owned(), count / 2.0)].into(),
        emitted_at: Some(Millis(start + 2000).into()),
        headers: [(
            "traceparent".to_owned(),
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".to_owned(),
        )]
        .into(),
        ..QueryResult::default()
    }
}

/// `result` as the store hands it back: with the sequence it was given.
fn stored(mut result: QueryResult, sequence: u64) -> QueryResult {
    result.sequence = sequence;
    result
}

async fn put(
    client: &mut StoreClient<Channel>,
    results: Vec<QueryResult>,
) -> Result<u32, tonic::Status> {
    client
        .put(PutRequest {
            results,
            fence: None,
        })
        .await
        .map(|r| r.into_inner().written)
}

async fn get(client: &mut StoreClient<Channel>, query: &str, key: &str) -> Option<QueryResult> {
    client
        .get(GetRequest {
            query: query.into(),
            key: key.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .result
}

async fn range(
    client: &mut StoreClient<Channel>,
    key: &str,
    from: Option<i64>,
    to: Option<i64>,
) -> Vec<QueryResult> {
    client
        .range(RangeRequest {
            query: "q".into(),
            key: key.into(),
            from: from.map(|m| Millis(m).into()),
            to: to.map(|m| Millis(m).into()),
            limit: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .results
}

async fn delete_query(
    client: &mut StoreClient<Channel>,
    query: &str,
) -> Result<u64, tonic::Status> {
    client
        .delete_query(DeleteQueryRequest {
            query: query.into(),
        })
        .await
        .map(|r| r.into_inner().deleted)
}

async fn top_k(client: &mut StoreClient<Channel>, query: &str) -> TopKResponse {
    client
        .top_k(TopKRequest {
            query: query.into(),
            k: 10,
        })
        .await
        .unwrap()
        .into_inner()
}

/// Every result of query `query` and key `key`.
async fn range_of(client: &mut StoreClient<Channel>, query: &str, key: &str) -> Vec<QueryResult> {
    client
        .range(RangeRequest {
            query: query.into(),
            key: key.into(),
            ..RangeRequest::default()
        })
        .await
        .unwrap()
        .into_inner()
        .results
}

/// One store, no broker: a query's deletion takes every result of it out of both tiers —
/// the hot tier held them, and a read after it finds nothing — leaves other queries alone,
/// tells watchers nothing, survives a restart, and the query can be written again.
#[tokio::test]
async fn delete_query_deletes_every_result_of_one_query_from_both_tiers() {
    for backend in backends().await {
        let dir = tempfile::tempdir().unwrap();
        let mut store = spawn_store(dir.path(), &backend, |_| {}).await;
        let a: Vec<QueryResult> = (0..6)
            .map(|i| result("a", &format!("k{}", i % 2), (i / 2) * 1000, i as f64))
            .collect();
        put(&mut store.client, a).await.unwrap();
        put(&mut store.client, vec![result("b", "k0", 0, 7.0)])
            .await
            .unwrap();
        // The hot tier holds A's series (write-through), and its ranking.
        assert_eq!(get(&mut store.client, "a", "k0").await.unwrap().sequence, 5);
        assert_eq!(top_k(&mut store.client, "a").await.results.len(), 2);
        let mut watcher = store
            .client
            .watch(WatchRequest::default())
            .await
            .unwrap()
            .into_inner();

        assert_eq!(
            delete_query(&mut store.client, "a").await.unwrap(),
            6,
            "{}",
            backend.name()
        );
        for key in ["k0", "k1"] {
            assert_eq!(
                get(&mut store.client, "a", key).await,
                None,
                "{}",
                backend.name()
            );
            assert!(range_of(&mut store.client, "a", key).await.is_empty());
        }
        assert_eq!(top_k(&mut store.client, "a").await, TopKResponse::default());
        assert_eq!(
            get(&mut store.client, "b", "k0").await.unwrap().values["count"],
            7.0
        );
        // Nothing left: nothing deleted. A name that is not a query's is refused.
        assert_eq!(delete_query(&mut store.client, "a").await.unwrap(), 0);
        let status = delete_query(&mut store.client, ".a").await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        let status = delete_query(&mut store.client, "").await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");

        // The query is written again: its new results are stored and served as any.
        let again = result("a", "k0", 0, 42.0);
        put(&mut store.client, vec![again.clone()]).await.unwrap();
        let got = get(&mut store.client, "a", "k0").await.unwrap();
        assert_eq!(got.values["count"], 42.0);
        assert_eq!(
            range_of(&mut store.client, "a", "k0").await,
            std::slice::from_ref(&got)
        );
        // The watcher saw nothing for the deletion: the next thing it sees is that write.
        assert_eq!(watcher.message().await.unwrap(), Some(got.clone()));
        // A resumed watch skips the deleted results.
        let mut resumed = store
            .client
            .watch(WatchRequest {
                after_sequence: Some(0),
                ..WatchRequest::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(resumed.message().await.unwrap().unwrap().query, "b");
        assert_eq!(resumed.message().await.unwrap(), Some(got.clone()));
        store.stop().await;

        // After a restart the deletion holds: long-term storage no longer has A's old
        // results, nor ranks them.
        let mut store = spawn_store(dir.path(), &backend, |_| {}).await;
        assert_eq!(get(&mut store.client, "a", "k1").await, None);
        assert_eq!(get(&mut store.client, "a", "k0").await, Some(got));
        let ranked = top_k(&mut store.client, "a").await;
        let keys: Vec<&str> = ranked.results.iter().map(|r| r.key.as_str()).collect();
        assert_eq!(keys, ["k0"]);
        store.stop().await;
    }
}

#[tokio::test]
async fn put_get_range_and_a_restart_keep_every_result() {
    for backend in backends().await {
        let dir = tempfile::tempdir().unwrap();
        let mut store = spawn_store(dir.path(), &backend, |_| {}).await;
        let written = vec![
            result("q", "a", 0, 1.0),
            result("q", "a", 1000, 2.0),
            result("q", "b", 0, 3.0),
        ];
        assert_eq!(put(&mut store.client, written.clone()).await.unwrap(), 3);
        // Read-your-writes from the hot tier, with the sequence the write got.
        assert_eq!(
            get(&mut store.client, "q", "a").await,
            Some(stored(written[1].clone(), 2)),
            "{}",
            backend.name()
        );
        // A rewrite of a window replaces it and gets a new sequence.
        let rewritten = result("q", "a", 0, 10.0);
        put(&mut store.client, vec![rewritten.clone()])
            .await
            .unwrap();
        store.stop().await;

        let mut store = spawn_store(dir.path(), &backend, |_| {}).await;
        assert_eq!(
            get(&mut store.client, "q", "a").await,
            Some(stored(written[1].clone(), 2))
        );
        assert_eq!(
            range(&mut store.client, "a", None, None).await,
            [stored(rewritten, 4), stored(written[1].clone(), 2)]
        );
        assert_eq!(
            range(&mut store.client, "a", Some(500), None).await,
            [stored(written[1].clone(), 2)]
        );
        assert_eq!(
            range(&mut store.client, "a", None, Some(1000)).await.len(),
            1
        );
        assert!(
            range(&mut store.client, "nobody", None, None)
                .await
                .is_empty()
        );
        assert_eq!(get(&mut store.client, "q", "nobody").await, None);
        // Sequences go on after a restart; they are never reused.
        put(&mut store.client, vec![result("q", "c", 0, 1.0)])
            .await
            .unwrap();
        assert_eq!(get(&mut store.client, "q", "c").await.unwrap().sequence, 5);
        store.stop().await;
    }
}

#[tokio::test]
async fn bad_requests_are_invalid_arguments_and_write_nothing() {
    for backend in backends().await {
        let dir = tempfile::tempdir().unwrap();
        let mut store = spawn_store(dir.path(), &backend, |c| c.max_batch_results = 2).await;
        let status = put(&mut store.client, vec![]).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        let status = put(&mut store.client, vec![result("q", "a", 0, 1.0); 3])
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().contains("limit is 2"), "{status:?}");
        let mut no_window = result("q", "a", 0, 1.0);
        no_window.window_start = None;
        let status = put(&mut store.client, vec![result("q", "a", 0, 1.0), no_window])
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(
            status.message().starts_with("results[1].window_start"),
            "{status:?}"
        );
        assert!(range(&mut store.client, "a", None, None).await.is_empty());
        let status = store
            .client
            .get(GetRequest {
                query: String::new(),
                key: "a".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        let status = store
            .client
            .watch(WatchRequest {
                predicates: vec![ValuePredicate {
                    value: "count".into(),
                    op: 0,
                    operand: 1.0,
                }],
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(
            status.message().starts_with("predicates[0].op"),
            "{status:?}"
        );
        store.stop().await;
    }
}

#[tokio::test]
async fn watchers_see_matching_results_once_they_are_durable() {
    for backend in backends().await {
        let dir = tempfile::tempdir().unwrap();
        let mut store = spawn_store(dir.path(), &backend, |_| {}).await;
        let mut sensors = store
            .client
            .watch(WatchRequest {
                query: "q".into(),
                key_prefix: "sensor-".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let mut busy = store
            .client
            .watch(WatchRequest {
                keys: vec!["sensor-3".into(), "other".into()],
                predicates: vec![ValuePredicate {
                    value: "count".into(),
                    op: Comparison::Ge as i32,
                    operand: 2.0,
                }],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let mut everything = store
            .client
            .watch(WatchRequest::default())
            .await
            .unwrap()
            .into_inner();
        let batch = vec![
            result("q", "sensor-1", 0, 1.0),
            result("q", "other", 0, 2.0),
            result("q2", "sensor-2", 0, 3.0),
            result("q", "sensor-3", 0, 4.0),
        ];
        put(&mut store.client, batch.clone()).await.unwrap();
        for (expected, sequence) in [(&batch[0], 1), (&batch[3], 4)] {
            assert_eq!(
                sensors.message().await.unwrap(),
                Some(stored(expected.clone(), sequence))
            );
        }
        for (expected, sequence) in [(&batch[1], 2), (&batch[3], 4)] {
            assert_eq!(
                busy.message().await.unwrap(),
                Some(stored(expected.clone(), sequence))
            );
        }
        for (i, expected) in batch.iter().enumerate() {
            assert_eq!(
                everything.message().await.unwrap(),
                Some(stored(expected.clone(), i as u64 + 1))
            );
        }
        // Shutdown ends the stream with UNAVAILABLE rather than holding the drain open.
        store.store.trigger();
        let end = sensors.message().await;
        assert!(
            matches!(&end, Ok(None)) || matches!(&end, Err(s) if s.code() == Code::Unavailable),
            "{end:?}"
        );
        store.stop().await;
    }
}

#[tokio::test]
async fn a_watcher_that_falls_behind_catches_up_without_a_gap() {
    for backend in backends().await {
        let dir = tempfile::tempdir().unwrap();
        let mut store = spawn_store(dir.path(), &backend, |c| {
            c.watch_buffer = 4;
            c.fsync = runnel_log::FsyncPolicy::Never;
        })
        .await;
        let mut slow = store
            .client
            .watch(WatchRequest::default())
            .await
            .unwrap()
            .into_inner();
        // Far more than the stream buffer plus the watch buffer, and nobody reading.
        for chunk in 0..40 {
            let batch = (0..10)
                .map(|i| result("q", "k", (chunk * 10 + i) * 1000, 1.0))
                .collect();
            put(&mut store.client, batch).await.unwrap();
        }
        for sequence in 1..=400 {
            let got = slow.message().await.unwrap().expect("the stream goes on");
            assert_eq!(
                got.sequence,
                sequence,
                "{}: in order, none missing",
                backend.name()
            );
        }
        store.stop().await;
    }
}

#[tokio::test]
async fn watch_resumes_after_a_sequence_and_refuses_an_expired_cursor() {
    for backend in backends().await {
        let dir = tempfile::tempdir().unwrap();
        let mut store = spawn_store(dir.path(), &backend, |c| {
            c.feed_entries = 1000;
            c.fsync = runnel_log::FsyncPolicy::Never;
        })
        .await;
        for chunk in 0..3 {
            let batch = (0..500)
                .map(|i| result("q", &format!("k{}", i % 7), (chunk * 500 + i) * 1000, 1.0))
                .collect();
            put(&mut store.client, batch).await.unwrap();
        }
        // Everything after 1200 that passes the filter, then live ones.
        let mut resumed = store
            .client
            .watch(WatchRequest {
                key_prefix: "k3".into(),
                after_sequence: Some(1200),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let expected: Vec<u64> = (1201..=1500).filter(|s| (s - 1) % 500 % 7 == 3).collect();
        for sequence in &expected {
            assert_eq!(
                resumed.message().await.unwrap().unwrap().sequence,
                *sequence
            );
        }
        put(&mut store.client, vec![result("q", "k3", 9_000_000, 2.0)])
            .await
            .unwrap();
        assert_eq!(resumed.message().await.unwrap().unwrap().sequence, 1501);
        // The feed keeps the last 1000 writes: a cursor before them is refused, not skipped.
        let status = store
            .client
            .watch(WatchRequest {
                after_sequence: Some(100),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
        assert!(status.message().contains("Range"), "{status:?}");
        store.stop().await;
    }
}

#[tokio::test]
async fn top_k_ranks_the_most_recent_window_and_survives_a_restart() {
    for backend in backends().await {
        let dir = tempfile::tempdir().unwrap();
        let mut store = spawn_store(dir.path(), &backend, |_| {}).await;
        let top = |client: &mut StoreClient<Channel>, k| {
            let mut client = client.clone();
            async move {
                client
                    .top_k(TopKRequest {
                        query: "meetup_topics".into(),
                        k,
                    })
                    .await
                    .unwrap()
                    .into_inner()
            }
        };
        assert!(top(&mut store.client, 3).await.results.is_empty());
        let topic = |name: &str, start, count| result("meetup_topics", name, start, count);
        put(
            &mut store.client,
            vec![
                topic("Python", 0, 5.0),
                topic("Rust", 60_000, 3.0),
                topic("Go", 60_000, 7.0),
                topic("Hiking", 60_000, 3.0),
                topic("Jazz", 60_000, 1.0),
            ],
        )
        .await
        .unwrap();
        let ranked = top(&mut store.client, 3).await;
        assert_eq!(ranked.ranked_by, "count");
        assert_eq!(ranked.window_start, Some(Millis(60_000).into()));
        let keys: Vec<&str> = ranked.results.iter().map(|r| r.key.as_str()).collect();
        assert_eq!(keys, ["Go", "Hiking", "Rust"], "{}", backend.name());
        // An update in the window moves a key up; an older window changes nothing.
        put(
            &mut store.client,
            vec![topic("Jazz", 60_000, 9.0), topic("Python", 0, 100.0)],
        )
        .await
        .unwrap();
        let ranked = top(&mut store.client, 2).await;
        let keys: Vec<&str> = ranked.results.iter().map(|r| r.key.as_str()).collect();
        assert_eq!(keys, ["Jazz", "Go"]);
        assert_eq!(ranked.results[0].values["count"], 9.0);
        store.stop().await;
        // The ranking is rebuilt from long-term storage (memory) or found in Redis.
        let mut store = spawn_store(dir.path(), &backend, |_| {}).await;
        let ranked = top(&mut store.client, 2).await;
        let keys: Vec<&str> = ranked.results.iter().map(|r| r.key.as_str()).collect();
        assert_eq!(keys, ["Jazz", "Go"]);
        let status = store
            .client
            .top_k(TopKRequest {
                query: "meetup_topics".into(),
                k: 5000,
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        store.stop().await;
    }
}

#[tokio::test]
async fn every_caching_strategy_reads_its_own_writes() {
    for backend in backends().await {
        for strategy in [
            CacheStrategy::WriteThrough,
            CacheStrategy::ReadThrough,
            CacheStrategy::RefreshAhead,
        ] {
            let dir = tempfile::tempdir().unwrap();
            let mut store = spawn_store(dir.path(), &backend, |c| {
                c.hot.strategy = strategy;
                c.hot.ttl = Duration::from_secs(1);
                c.hot.history = 2;
                // A private prefix per run: the Redis server is shared by the loop.
                c.hot.redis_prefix = format!("t{strategy:?}");
            })
            .await;
            for (i, count) in [1.0, 2.0, 3.0].into_iter().enumerate() {
                put(&mut store.client, vec![result("q", "k", 0, count)])
                    .await
                    .unwrap();
                let latest = get(&mut store.client, "q", "k").await.unwrap();
                assert_eq!(
                    latest.values["count"],
                    count,
                    "{strategy:?} on {}",
                    backend.name()
                );
                assert_eq!(latest.sequence, i as u64 + 1);
            }
            // Windows beyond the hot history come from long-term storage, all of them.
            let batch = (1..5)
                .map(|i| result("q", "k", i * 1000, i as f64))
                .collect();
            put(&mut store.client, batch).await.unwrap();
            assert_eq!(range(&mut store.client, "k", None, None).await.len(), 5);
            assert_eq!(
                range(&mut store.client, "k", Some(3000), None).await.len(),
                2
            );
            store.stop().await;
        }
    }
}

/// Two store replicas (each with its own long-term storage) over one Redis: what one
/// writes, the other serves from the shared hot tier.
#[tokio::test]
async fn replicas_over_one_redis_share_the_hot_data() {
    if !runnel_testkit::require(Tool::RedisServer) {
        return;
    }
    let server = RedisServer::start().await.unwrap();
    let backend = Backend::Redis(Box::new(server));
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut a = spawn_store(dir_a.path(), &backend, |_| {}).await;
    let mut b = spawn_store(dir_b.path(), &backend, |_| {}).await;
    put(
        &mut a.client,
        vec![
            result("meetup_topics", "Rust", 0, 4.0),
            result("meetup_topics", "Go", 0, 2.0),
        ],
    )
    .await
    .unwrap();
    let seen = get(&mut b.client, "meetup_topics", "Rust").await;
    assert_eq!(seen.map(|r| r.values["count"]), Some(4.0));
    let ranked = b
        .client
        .top_k(TopKRequest {
            query: "meetup_topics".into(),
            k: 10,
        })
        .await
        .unwrap()
        .into_inner();
    let keys: Vec<&str> = ranked.results.iter().map(|r| r.key.as_str()).collect();
    assert_eq!(keys, ["Rust", "Go"]);
    a.stop().await;
    b.stop().await;
}

/// Redis at `maxmemory` with `noeviction` refuses a write-through: the store then drops
/// the older series Redis holds (a versioned marker, which Redis still takes) rather than
/// leave it to be served instead of what long-term storage has.
#[tokio::test]
async fn a_full_redis_never_serves_a_result_older_than_long_term_storage() {
    if !runnel_testkit::require(Tool::RedisServer) {
        return;
    }
    let server = RedisServer::start().await.unwrap();
    let url = server.url.clone();
    let backend = Backend::Redis(Box::new(server));
    let dir = tempfile::tempdir().unwrap();
    let mut store = spawn_store(dir.path(), &backend, |_| {}).await;
    put(
        &mut store.client,
        vec![result("meetup_topics", "Rust", 0, 4.0)],
    )
    .await
    .unwrap();
    let seen = get(&mut store.client, "meetup_topics", "Rust").await;
    assert_eq!(seen.map(|r| r.values["count"]), Some(4.0));

    let mut redis = redis::Client::open(url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    for (setting, value) in [("maxmemory-policy", "noeviction"), ("maxmemory", "1")] {
        let () = redis::cmd("CONFIG")
            .arg("SET")
            .arg(setting)
            .arg(value)
            .query_async(&mut redis)
            .await
            .unwrap();
    }
    put(
        &mut store.client,
        vec![result("meetup_topics", "Rust", 0, 5.0)],
    )
    .await
    .expect("long-term storage takes it whatever Redis does");
    let seen = get(&mut store.client, "meetup_topics", "Rust").await;
    assert_eq!(
        seen.map(|r| r.values["count"]),
        Some(5.0),
        "not the older result Redis held"
    );
    store.stop().await;
}

/// A way to a Redis server that the test can cut: while cut, every connection through it
/// is dropped and every new one refused, as for a store that lost its network to Redis.
struct CuttableRedis {
    url: String,
    cut: tokio::sync::watch::Sender<bool>,
}

impl CuttableRedis {
    async fn to(server: &RedisServer) -> CuttableRedis {
        let socket = server
            .url
            .strip_prefix("redis+unix://")
            .expect("the test server listens on a socket")
            .to_owned();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("redis://{}", listener.local_addr().unwrap());
        let (cut, cuts) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let mut cuts = cuts.clone();
                if *cuts.borrow() {
                    continue;
                }
                let socket = socket.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::UnixStream::connect(&socket).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cuts.wait_for(|cut| *cut) => {}
                    }
                });
            }
        });
        CuttableRedis { url, cut }
    }
}

/// A write-through that reaches neither Redis nor its marker (Redis unreachable) leaves
/// the older version in Redis, under a key no one knows to drop. The store reads past Redis
/// until it can invalidate everything Redis holds (a new epoch), and never serves the older
/// version — not while Redis is away, not once it is back.
#[tokio::test]
async fn an_unreachable_redis_never_serves_an_older_result_once_it_is_back() {
    if !runnel_testkit::require(Tool::RedisServer) {
        return;
    }
    let server = RedisServer::start().await.unwrap();
    let way = CuttableRedis::to(&server).await;
    let dir = tempfile::tempdir().unwrap();
    let mut store = spawn_store(dir.path(), &Backend::Memory, |c| {
        c.hot.backend = HotBackend::Redis;
        c.hot.redis_url = way.url.clone();
    })
    .await;
    let redis = redis::Client::open(server.url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let epoch_key = format!("{}:epoch", StoreConfig::default().hot.redis_prefix);
    let epoch = || {
        let mut redis = redis.clone();
        let key = epoch_key.clone();
        async move {
            redis::cmd("GET")
                .arg(key)
                .query_async::<Option<i64>>(&mut redis)
                .await
                .unwrap()
                .unwrap_or(0)
        }
    };
    put(&mut store.client, vec![result("q", "k", 0, 4.0)])
        .await
        .unwrap();
    let count = |r: Option<QueryResult>| r.map(|r| r.values["count"]);
    assert_eq!(count(get(&mut store.client, "q", "k").await), Some(4.0));

    way.cut.send_replace(true);
    put(&mut store.client, vec![result("q", "k", 0, 5.0)])
        .await
        .expect("long-term storage takes it whatever Redis does");
    assert_eq!(count(get(&mut store.client, "q", "k").await), Some(5.0));
    let before = epoch().await;

    way.cut.send_replace(false);
    let mut client = store.client.clone();
    runnel_testkit::eventually(
        Duration::from_secs(30),
        "the store to invalidate what Redis held, and never serve the older result",
        || {
            let mut client = client.clone();
            async move {
                let served = count(get(&mut client, "q", "k").await);
                assert_eq!(served, Some(5.0), "never the older result Redis held");
                epoch().await > before
            }
        },
    )
    .await;
    // Redis serves the series again, refilled from long-term storage.
    assert_eq!(count(get(&mut client, "q", "k").await), Some(5.0));
    store.stop().await;
}
