//! Store replicas over one broker: each materialises the broker's results log, so any
//! replica answers any read and a `Watch` cursor from one is valid on every other.

use super::{Backend, backends, delete_query, get, put, range, range_of, result, top_k};
use runnel_broker::BrokerConfig;
use runnel_client::{ConsumerOptions, GroupConsumer, GroupEvent};
use runnel_proto::v1::broker_client::BrokerClient;
use runnel_proto::v1::store_client::StoreClient;
use runnel_proto::v1::{
    CreateTopicRequest, DescribeTopicRequest, GroupFence, PutRequest, QueryResult, TopKRequest,
    TopKResponse, WatchRequest,
};
use runnel_server::ListenAddrs;
use runnel_store::StoreConfig;
use runnel_testkit::{Services, eventually};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tonic::Code;
use tonic::transport::Channel;

const WAIT: Duration = Duration::from_secs(30);
const RESULTS_LOG: &str = "_store.results";

/// A broker on ephemeral ports.
struct Broker {
    url: String,
    _services: Services,
    _dir: tempfile::TempDir,
}

impl Broker {
    async fn start() -> Broker {
        let dir = tempfile::tempdir().unwrap();
        let config = BrokerConfig {
            data_dir: dir.path().join("broker"),
            ..BrokerConfig::default()
        };
        let mut services = Services::new();
        let addrs = services
            .start_on_loopback("broker", runnel_broker::run, config)
            .await;
        Broker {
            url: format!("http://{}", addrs.grpc),
            _services: services,
            _dir: dir,
        }
    }

    async fn client(&self) -> BrokerClient<runnel_client::Peer> {
        BrokerClient::new(
            runnel_client::connect(&self.url, &runnel_client::ConnectConfig::default(), None)
                .await
                .unwrap(),
        )
    }

    /// The results log's end offset.
    async fn log_end(&self) -> u64 {
        let described = self
            .client()
            .await
            .describe_topic(DescribeTopicRequest {
                name: RESULTS_LOG.into(),
            })
            .await
            .unwrap()
            .into_inner();
        described.topic.unwrap().partitions[0].end_offset
    }
}

/// One store replica following `broker`.
struct Replica {
    client: StoreClient<Channel>,
    services: Services,
    dir: PathBuf,
}

impl Replica {
    /// Starts a replica on `dir` and waits until it reports SERVING (it has caught up).
    async fn start(broker: &Broker, dir: &Path, backend: &Backend) -> Replica {
        let mut config = StoreConfig {
            data_dir: dir.to_path_buf(),
            broker: broker.url.clone(),
            ..StoreConfig::default()
        };
        backend.configure(&mut config);
        let mut services = Services::new();
        let addrs = services
            .start_on_loopback("store", runnel_store::run, config)
            .await;
        serving(&addrs).await;
        let client = StoreClient::connect(format!("http://{}", addrs.grpc))
            .await
            .unwrap();
        Replica {
            client,
            services,
            dir: dir.to_path_buf(),
        }
    }

    async fn stop(self) -> PathBuf {
        self.services
            .stop(Duration::from_secs(10))
            .await
            .expect("the replica stops cleanly");
        self.dir
    }

    /// Every result the replica's change feed holds, in sequence order.
    async fn feed(&mut self, after: u64, count: usize) -> Vec<QueryResult> {
        let mut watch = self
            .client
            .watch(WatchRequest {
                after_sequence: Some(after),
                ..WatchRequest::default()
            })
            .await
            .unwrap()
            .into_inner();
        let mut seen = Vec::with_capacity(count);
        while seen.len() < count {
            seen.push(watch.message().await.unwrap().expect("the watch goes on"));
        }
        seen
    }
}

async fn serving(addrs: &ListenAddrs) {
    eventually(WAIT, "the store replica to report SERVING", || async {
        runnel_server::healthcheck::check(
            addrs.grpc,
            runnel_proto::service_name::STORE,
            Duration::from_secs(5),
            None,
        )
        .await
        .is_ok()
    })
    .await;
}

async fn get_eventually(client: &mut StoreClient<Channel>, key: &str) -> QueryResult {
    eventually(WAIT, format!("{key} on the other replica"), || {
        let mut client = client.clone();
        async move { get(&mut client, "q", key).await }
    })
    .await
}

#[tokio::test]
async fn any_replica_answers_and_cursors_are_valid_on_every_replica() {
    for backend in backends().await {
        let broker = Broker::start().await;
        let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let mut a = Replica::start(&broker, dir_a.path(), &backend).await;
        let mut b = Replica::start(&broker, dir_b.path(), &backend).await;

        let first = vec![result("q", "x", 0, 1.0), result("q", "y", 0, 5.0)];
        put(&mut a.client, first).await.unwrap();
        // Read-your-writes on the replica written through, with the log's numbering.
        let x = get(&mut a.client, "q", "x").await.unwrap();
        assert_eq!(x.sequence, 1, "{}", backend.name());
        // Every read on the other replica.
        assert_eq!(get_eventually(&mut b.client, "y").await.sequence, 2);
        assert_eq!(range(&mut b.client, "x", None, None).await, [x]);
        let top = b
            .client
            .top_k(TopKRequest {
                query: "q".into(),
                k: 10,
            })
            .await
            .unwrap()
            .into_inner();
        let keys: Vec<&str> = top.results.iter().map(|r| r.key.as_str()).collect();
        assert_eq!(keys, ["y", "x"]);

        // A cursor from A, used on B: exactly what came after it, through both replicas.
        let cursor = get(&mut a.client, "q", "y").await.unwrap().sequence;
        let mut after = Vec::new();
        for i in 1..=6 {
            let writer = if i % 2 == 0 { &mut a } else { &mut b };
            let batch = vec![result("q", &format!("k{i}"), i * 1000, i as f64)];
            put(&mut writer.client, batch.clone()).await.unwrap();
            after.extend(batch);
        }
        // A rewrite of a window is a new result with its own sequence.
        put(&mut b.client, vec![result("q", "x", 0, 9.0)])
            .await
            .unwrap();
        after.push(result("q", "x", 0, 9.0));
        let resumed = b.feed(cursor, after.len()).await;
        let sequences: Vec<u64> = resumed.iter().map(|r| r.sequence).collect();
        assert_eq!(
            sequences,
            (cursor + 1..=cursor + after.len() as u64).collect::<Vec<_>>()
        );
        for (seen, sent) in resumed.into_iter().zip(&after) {
            assert_eq!(
                QueryResult {
                    sequence: 0,
                    ..seen
                },
                *sent
            );
        }
        // A cursor from the replica written through is valid at once on the other, even
        // before that one has applied it: the watch waits for it, it does not refuse it.
        put(&mut a.client, vec![result("q", "late", 0, 1.0)])
            .await
            .unwrap();
        let newest = get(&mut a.client, "q", "late").await.unwrap().sequence;
        let mut from_newest = b
            .client
            .watch(WatchRequest {
                after_sequence: Some(newest),
                ..WatchRequest::default()
            })
            .await
            .expect("a cursor from another replica is valid here");
        put(&mut a.client, vec![result("q", "later", 0, 1.0)])
            .await
            .unwrap();
        let next = from_newest.get_mut().message().await.unwrap().unwrap();
        assert_eq!((next.key.as_str(), next.sequence), ("later", newest + 1));
        // And the same cursor on A gives the same results, bit for bit.
        let on_a = a.feed(cursor, after.len()).await;
        let on_b = b.feed(cursor, after.len()).await;
        assert_eq!(on_a, on_b);
        a.stop().await;
        b.stop().await;
    }
}

/// Whether `replica` holds no result of query `a` for the keys the tests write.
async fn holds_no_a(client: &mut StoreClient<Channel>) -> bool {
    for key in ["k0", "k1", "k2"] {
        if get(client, "a", key).await.is_some() || !range_of(client, "a", key).await.is_empty() {
            return false;
        }
    }
    top_k(client, "a").await == TopKResponse::default()
}

/// Query `a` over three keys and two windows, and query `b`.
fn a_and_b() -> Vec<QueryResult> {
    (0..6)
        .map(|i| result("a", &format!("k{}", i % 3), (i / 3) * 1000, i as f64))
        .chain([result("b", "k0", 0, 7.0), result("b", "k1", 0, 8.0)])
        .collect()
}

/// A query's deletion goes through the results log: every replica deletes the query's
/// results (the hot tier too), at the same position — other queries untouched, and the
/// query's results written after the deletion kept on all of them.
#[tokio::test]
async fn a_query_deleted_through_one_replica_is_deleted_on_every_replica() {
    for backend in backends().await {
        let broker = Broker::start().await;
        let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let mut one = Replica::start(&broker, dir_a.path(), &backend).await;
        let mut two = Replica::start(&broker, dir_b.path(), &backend).await;
        put(&mut one.client, a_and_b()).await.unwrap();
        // Both replicas serve A, from their hot tiers.
        for replica in [&mut one, &mut two] {
            let client = replica.client.clone();
            eventually(WAIT, "A's newest result on both replicas", || {
                let mut client = client.clone();
                async move { get(&mut client, "a", "k2").await.map(|r| r.sequence == 6) }
            })
            .await;
            assert_eq!(top_k(&mut replica.client, "a").await.results.len(), 3);
        }

        let deleted = delete_query(&mut two.client, "a").await.unwrap();
        assert_eq!(deleted, 6, "{}", backend.name());
        // Applied on the replica that answered, before it answered; and on the other.
        assert!(holds_no_a(&mut two.client).await, "{}", backend.name());
        let client = one.client.clone();
        eventually(WAIT, "the deletion on the other replica", || {
            let mut client = client.clone();
            async move { holds_no_a(&mut client).await }
        })
        .await;
        for replica in [&mut one, &mut two] {
            assert_eq!(range_of(&mut replica.client, "b", "k0").await.len(), 1);
            assert_eq!(top_k(&mut replica.client, "b").await.results.len(), 2);
        }
        assert_eq!(broker.log_end().await, 9, "one record: the tombstone");

        // A is written again after its deletion: stored and served as any result.
        put(&mut one.client, vec![result("a", "k0", 5000, 1.0)])
            .await
            .unwrap();
        for replica in [&mut one, &mut two] {
            let client = replica.client.clone();
            let got = eventually(WAIT, "A's new result on both replicas", || {
                let mut client = client.clone();
                async move { get(&mut client, "a", "k0").await }
            })
            .await;
            assert_eq!((got.sequence, got.values["count"]), (10, 1.0));
            assert_eq!(range_of(&mut replica.client, "a", "k0").await, [got]);
            assert!(get(&mut replica.client, "a", "k1").await.is_none());
        }
        // And both change feeds skip the deleted results alike.
        let fed = one.feed(0, 3).await;
        let sequences: Vec<u64> = fed.iter().map(|r| r.sequence).collect();
        assert_eq!(sequences, [7, 8, 10]);
        assert_eq!(two.feed(0, 3).await, fed);
        one.stop().await;
        two.stop().await;
    }
}

/// A replica that starts after a query's deletion — restarted behind it, or rebuilt from an
/// empty data directory — applies the tombstone as it catches up with the log: it holds
/// none of the deleted results, and everything else.
#[tokio::test]
async fn a_replica_catching_up_applies_a_deletion_too() {
    let backend = Backend::Memory;
    let broker = Broker::start().await;
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut one = Replica::start(&broker, dir_a.path(), &backend).await;
    let two = Replica::start(&broker, dir_b.path(), &backend).await;
    put(&mut one.client, a_and_b()).await.unwrap();
    let mut client = two.client.clone();
    eventually(WAIT, "the other replica to apply A", || {
        let mut client = client.clone();
        async move { get(&mut client, "a", "k2").await }
    })
    .await;
    assert!(!holds_no_a(&mut client).await);
    // The other replica stops, holding A; A is deleted and written again without it.
    let behind = two.stop().await;
    assert_eq!(delete_query(&mut one.client, "a").await.unwrap(), 6);
    put(&mut one.client, vec![result("a", "k0", 5000, 1.0)])
        .await
        .unwrap();
    let fresh = tempfile::tempdir().unwrap();
    for dir in [behind.as_path(), fresh.path()] {
        let mut replica = Replica::start(&broker, dir, &backend).await;
        // Serving means caught up: the deletion is applied, and what came after it.
        let got = get(&mut replica.client, "a", "k0").await.unwrap();
        assert_eq!((got.sequence, got.values["count"]), (10, 1.0));
        assert!(range_of(&mut replica.client, "a", "k1").await.is_empty());
        assert!(range_of(&mut replica.client, "a", "k2").await.is_empty());
        assert_eq!(range_of(&mut replica.client, "a", "k0").await, [got]);
        for key in ["k0", "k1"] {
            assert_eq!(
                range_of(&mut replica.client, "b", key).await,
                range_of(&mut one.client, "b", key).await
            );
        }
        assert_eq!(replica.feed(0, 3).await, one.feed(0, 3).await);
        replica.stop().await;
    }
    one.stop().await;
}

#[tokio::test]
async fn a_replica_that_lost_its_data_directory_rebuilds_every_result() {
    let backend = Backend::Memory;
    let broker = Broker::start().await;
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut a = Replica::start(&broker, dir_a.path(), &backend).await;
    let b = Replica::start(&broker, dir_b.path(), &backend).await;
    for round in 0..5 {
        let batch = (0..40)
            .map(|i| {
                result(
                    "q",
                    &format!("k{}", i % 9),
                    (i / 9 + round) * 1000,
                    i as f64,
                )
            })
            .collect();
        put(&mut a.client, batch).await.unwrap();
    }
    // B dies and its volume with it; writes go on without it.
    let lost = b.stop().await;
    std::fs::remove_dir_all(&lost).unwrap();
    put(&mut a.client, vec![result("q", "k0", 0, 77.0)])
        .await
        .unwrap();
    let total = broker.log_end().await as usize;
    assert_eq!(total, 201);

    let mut b = Replica::start(&broker, &lost, &backend).await;
    // Serving means caught up: everything is there at once.
    for i in 0..9 {
        let key = format!("k{i}");
        let on_a = range(&mut a.client, &key, None, None).await;
        assert!(!on_a.is_empty());
        assert_eq!(range(&mut b.client, &key, None, None).await, on_a, "{key}");
    }
    // The change feeds agree too: each window's newest write, in the same order.
    let current = {
        let mut seen = std::collections::BTreeSet::new();
        for i in 0..9 {
            for r in range(&mut a.client, &format!("k{i}"), None, None).await {
                seen.insert(r.sequence);
            }
        }
        seen.len()
    };
    assert_eq!(a.feed(0, current).await, b.feed(0, current).await);
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn a_restarted_replica_applies_only_what_it_missed() {
    let backend = Backend::Memory;
    let broker = Broker::start().await;
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut a = Replica::start(&broker, dir_a.path(), &backend).await;
    let b = Replica::start(&broker, dir_b.path(), &backend).await;
    put(
        &mut a.client,
        vec![result("q", "k", 0, 1.0), result("q", "k", 1000, 2.0)],
    )
    .await
    .unwrap();
    // B catches up, stops, misses one result, and comes back.
    let mut b_client = b.client.clone();
    get_eventually(&mut b_client, "k").await;
    eventually(WAIT, "B to apply both results", || {
        let mut client = b_client.clone();
        async move { range(&mut client, "k", None, None).await.len() == 2 }
    })
    .await;
    let dir = b.stop().await;
    put(&mut a.client, vec![result("q", "k", 2000, 3.0)])
        .await
        .unwrap();
    let mut b = Replica::start(&broker, &dir, &backend).await;
    let on_b = range(&mut b.client, "k", None, None).await;
    assert_eq!(on_b, range(&mut a.client, "k", None, None).await);
    assert_eq!(
        on_b.iter().map(|r| r.sequence).collect::<Vec<_>>(),
        [1, 2, 3]
    );
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn a_put_fenced_by_a_stale_generation_is_refused_and_writes_nothing() {
    let backend = Backend::Memory;
    let broker = Broker::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut store = Replica::start(&broker, dir.path(), &backend).await;
    broker
        .client()
        .await
        .create_topic(CreateTopicRequest {
            name: "events".into(),
            partitions: 2,
            retention: None,
        })
        .await
        .unwrap();
    let options = ConsumerOptions {
        session_timeout: Duration::from_secs(30),
        ..ConsumerOptions::default()
    };
    let mut first = GroupConsumer::join(
        broker.client().await,
        "analyzers",
        "events",
        options.clone(),
    )
    .await
    .unwrap();
    let assigned = assignment(&mut first, 0).await;
    let stale = first.fence(assigned);
    // A second member joins: the group moves to a new generation.
    let _second = GroupConsumer::join(broker.client().await, "analyzers", "events", options)
        .await
        .unwrap();
    let now_owned = assignment(&mut first, stale.generation).await;

    let end = broker.log_end().await;
    let status = fenced_put(&mut store.client, result("q", "zombie", 0, 1.0), stale)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert_eq!(broker.log_end().await, end, "a refused Put appends nothing");
    assert_eq!(get(&mut store.client, "q", "zombie").await, None);

    // The member's current fence is accepted.
    let current = first.fence(now_owned);
    fenced_put(&mut store.client, result("q", "owner", 0, 1.0), current)
        .await
        .unwrap();
    assert_eq!(
        get(&mut store.client, "q", "owner")
            .await
            .map(|r| r.sequence),
        Some(end + 1)
    );
    store.stop().await;
}

/// The partitions of the member's first assignment of a generation after `after`.
async fn assignment(member: &mut GroupConsumer, after: u64) -> Vec<u32> {
    tokio::time::timeout(WAIT, async {
        loop {
            if let GroupEvent::Assigned {
                generation,
                partitions,
                ..
            } = member.next().await.unwrap().expect("the stream goes on")
                && generation > after
            {
                return partitions;
            }
        }
    })
    .await
    .expect("an assignment")
}

async fn fenced_put(
    client: &mut StoreClient<Channel>,
    result: QueryResult,
    fence: GroupFence,
) -> Result<u32, tonic::Status> {
    client
        .put(PutRequest {
            results: vec![result],
            fence: Some(fence),
        })
        .await
        .map(|r| r.into_inner().written)
}

/// A read naming a minimum sequence (metadata `runnel-min-sequence`) that another replica
/// has applied waits until this one has applied it too: a client, or a gateway filling its
/// cache, that saw a write through one replica reads it on every other.
#[tokio::test]
async fn a_read_naming_a_sequence_waits_until_this_replica_has_applied_it() {
    let broker = Broker::start().await;
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut a = Replica::start(&broker, dir_a.path(), &Backend::Memory).await;
    let mut b = Replica::start(&broker, dir_b.path(), &Backend::Memory).await;
    let named = |query: &str, key: &str, sequence: u64| {
        let mut request = tonic::Request::new(runnel_proto::v1::GetRequest {
            query: query.into(),
            key: key.into(),
        });
        runnel_proto::consistency::set_min_sequence(request.metadata_mut(), sequence);
        request
    };
    for i in 0..30 {
        put(&mut a.client, vec![result("q", "k", i * 1000, i as f64)])
            .await
            .unwrap();
        let written = get(&mut a.client, "q", "k").await.unwrap().sequence;
        let on_b = b
            .client
            .get(named("q", "k", written))
            .await
            .unwrap()
            .into_inner()
            .result;
        assert_eq!(on_b.map(|r| r.sequence), Some(written), "write {i}");
    }
    let mut malformed = named("q", "k", 1);
    malformed.metadata_mut().insert(
        runnel_proto::consistency::MIN_SEQUENCE_METADATA,
        tonic::metadata::MetadataValue::from_static("later"),
    );
    let status = b.client.get(malformed).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    a.stop().await;
    b.stop().await;
}
