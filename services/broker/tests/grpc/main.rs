//! The broker over real gRPC: `run()` in-process on ephemeral ports, driven by the
//! generated `BrokerClient` and the client SDK — on both storage engines.

use runnel_broker::BrokerConfig;
use runnel_proto::partition_for_key;
use runnel_proto::v1::broker_client::BrokerClient;
use runnel_proto::v1::{
    CreateTopicRequest, Event, FetchRequest, ListTopicsRequest, ProduceRequest, Record,
    SubscribeRequest, SubscribeResponse, subscribe_response,
};
use runnel_testkit::nats::NatsNode;
use runnel_testkit::{Services, Tool};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;
use tokio_stream::StreamExt;
use tonic::Code;

type Client = BrokerClient<runnel_security::Peer>;

/// The storage engine a test broker runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Engine {
    Embedded,
    JetStream,
}

/// Runs `async fn $test(engine: Engine)` once per engine, as `$test::embedded` and
/// `$test::jetstream`: the two engines must pass the same API tests.
macro_rules! both_engines {
    ($test:ident) => {
        mod $test {
            #[tokio::test]
            async fn embedded() {
                super::$test(crate::Engine::Embedded).await
            }

            #[tokio::test]
            async fn jetstream() {
                super::$test(crate::Engine::JetStream).await
            }
        }
    };
}

mod cluster;
mod groups;
mod log;
mod security;
mod stream;

/// What a test's brokers share across restarts: the data directory and, for JetStream,
/// the NATS server.
struct Harness {
    engine: Engine,
    dir: tempfile::TempDir,
    nats: Option<NatsNode>,
}

impl Harness {
    /// `None` (the test skips) when the engine needs a `nats-server` that is not installed.
    async fn new(engine: Engine) -> Option<Harness> {
        let dir = tempfile::tempdir().unwrap();
        let nats = match engine {
            Engine::Embedded => None,
            Engine::JetStream => {
                if !runnel_testkit::require(Tool::NatsServer) {
                    return None;
                }
                let nats_dir = dir.path().join("nats");
                std::fs::create_dir_all(&nats_dir).unwrap();
                Some(NatsNode::start(&nats_dir, &[]).await)
            }
        };
        Some(Harness { engine, dir, nats })
    }

    async fn spawn(&self) -> (SocketAddr, Services) {
        self.spawn_with(|_| {}).await
    }

    /// Starts a broker with ephemeral ports. The listeners are bound before `run` starts,
    /// so the client can connect at once.
    async fn spawn_with(
        &self,
        configure: impl FnOnce(&mut BrokerConfig),
    ) -> (SocketAddr, Services) {
        let mut config = self.config();
        configure(&mut config);
        let mut broker = Services::new();
        let addrs = broker
            .start_on_loopback("broker", runnel_broker::run, config)
            .await;
        (addrs.grpc, broker)
    }

    /// Starts a broker again where a stopped one served gRPC (`grpc`, the address it was
    /// given on an ephemeral port), so that clients of the old one reach the new one.
    async fn respawn_at(&self, grpc: SocketAddr) -> Services {
        let listeners = runnel_server::Listeners {
            grpc: tokio::net::TcpListener::bind(grpc).await.unwrap(),
            admin: tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
            http: None,
        };
        let mut broker = Services::new();
        broker
            .start("broker", runnel_broker::run, self.config(), listeners)
            .unwrap();
        broker
    }

    /// A broker on this harness's data directory and engine.
    fn config(&self) -> BrokerConfig {
        let mut config = BrokerConfig {
            data_dir: self.dir.path().join("broker"),
            ..BrokerConfig::default()
        };
        if let Some(nats) = &self.nats {
            config.storage = runnel_broker::StorageEngine::Jetstream;
            config.jetstream.servers = vec![nats.url.clone()];
        }
        config
    }
}

async fn connect(addr: SocketAddr) -> Client {
    let url = format!("http://{addr}");
    let peer = runnel_security::connect(&url, &Default::default(), None)
        .await
        .unwrap();
    BrokerClient::new(peer)
}

/// Triggers shutdown and waits for `run` to return cleanly.
async fn stop(broker: Services) {
    broker
        .stop(Duration::from_secs(10))
        .await
        .expect("the broker stops cleanly within its drain timeout");
}

fn event(id: &str, key: &str, payload: &[u8]) -> Event {
    Event {
        id: id.into(),
        source: "grpc-test".into(),
        r#type: "reading".into(),
        key: key.into(),
        event_time: Some(runnel_proto::Millis(1_714_564_805_000).into()),
        attributes: [("unit".to_string(), "celsius".to_string())].into(),
        payload: payload.to_vec().into(),
        headers: [("traceparent".to_string(), "00-abc-def-01".to_string())].into(),
    }
}

fn keyed_events(count: usize) -> Vec<Event> {
    (0..count)
        .map(|i| {
            event(
                &format!("e-{i}"),
                &format!("key-{}", i % 13),
                format!("payload {i} \u{0}\u{ff}").as_bytes(),
            )
        })
        .collect()
}

async fn create(client: &mut Client, name: &str, partitions: u32) -> Result<(), tonic::Status> {
    client
        .create_topic(CreateTopicRequest {
            name: name.into(),
            partitions,
            ..Default::default()
        })
        .await
        .map(|_| ())
}

async fn fetch_all(client: &mut Client, topic: &str, partition: u32) -> Vec<Record> {
    let mut records = Vec::new();
    loop {
        let response = client
            .fetch(FetchRequest {
                topic: topic.into(),
                partition,
                offset: records.len() as u64,
                max_records: 7,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            response.next_offset,
            records.len() as u64 + response.records.len() as u64
        );
        if response.records.is_empty() {
            assert_eq!(response.next_offset, response.end_offset);
            return records;
        }
        records.extend(response.records);
    }
}

both_engines!(create_and_list_topics);
async fn create_and_list_topics(engine: Engine) {
    let Some(harness) = Harness::new(engine).await else {
        return;
    };
    let (addr, broker) = harness.spawn().await;
    let mut client = connect(addr).await;

    let created = client
        .create_topic(CreateTopicRequest {
            name: "zeta".into(),
            partitions: 3,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .topic
        .unwrap();
    assert_eq!(created.name, "zeta");
    assert_eq!(created.partitions.len(), 3);
    create(&mut client, "alpha", 1).await.unwrap();

    let error = create(&mut client, "zeta", 3).await.unwrap_err();
    assert_eq!(error.code(), Code::AlreadyExists, "{error:?}");
    let error = create(&mut client, "zeta", 5).await.unwrap_err();
    assert_eq!(error.code(), Code::AlreadyExists, "{error:?}");

    let topics = client
        .list_topics(ListTopicsRequest {})
        .await
        .unwrap()
        .into_inner()
        .topics;
    let names: Vec<&str> = topics.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["alpha", "zeta"]);
    let zeta = &topics[1];
    let partitions: Vec<u32> = zeta.partitions.iter().map(|p| p.partition).collect();
    assert_eq!(partitions, [0, 1, 2]);
    for p in &zeta.partitions {
        assert_eq!((p.start_offset, p.end_offset), (0, 0));
        if harness.engine == Engine::Embedded {
            assert!(p.size_bytes > 0, "the segment header is on disk: {p:?}");
        }
    }

    client
        .produce(ProduceRequest {
            topic: "alpha".into(),
            events: keyed_events(5),
            ..Default::default()
        })
        .await
        .unwrap();
    let topics = client
        .list_topics(ListTopicsRequest {})
        .await
        .unwrap()
        .into_inner()
        .topics;
    let alpha = &topics[0].partitions[0];
    assert_eq!(alpha.end_offset, 5);
    assert!(alpha.size_bytes > zeta.partitions[0].size_bytes);
    assert_eq!(alpha.durable_offset, 5);
    stop(broker).await;
}

both_engines!(concurrent_creates_of_one_topic_make_exactly_one);
async fn concurrent_creates_of_one_topic_make_exactly_one(engine: Engine) {
    let Some(harness) = Harness::new(engine).await else {
        return;
    };
    let (addr, broker) = harness.spawn().await;
    let client = connect(addr).await;
    let attempts: Vec<_> = (0..8)
        .map(|_| {
            let mut client = client.clone();
            tokio::spawn(async move { create(&mut client, "contended", 4).await })
        })
        .collect();
    let mut created = 0;
    for attempt in attempts {
        match attempt.await.unwrap() {
            Ok(()) => created += 1,
            Err(status) => assert_eq!(status.code(), Code::AlreadyExists, "{status:?}"),
        }
    }
    assert_eq!(created, 1);
    stop(broker).await;
}

both_engines!(bad_requests_are_invalid_arguments_naming_the_field);
async fn bad_requests_are_invalid_arguments_naming_the_field(engine: Engine) {
    let Some(harness) = Harness::new(engine).await else {
        return;
    };
    let (addr, broker) = harness.spawn_with(|c| c.max_batch_events = 10).await;
    let mut client = connect(addr).await;
    create(&mut client, "t", 2).await.unwrap();

    let invalid = |status: tonic::Status, needle: &str| {
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(
            status.message().contains(needle),
            "{:?} should mention {needle}",
            status.message()
        );
    };
    invalid(
        create(&mut client, "a b", 1).await.unwrap_err(),
        "topic name \"a b\" is invalid",
    );
    invalid(
        create(&mut client, "..", 1).await.unwrap_err(),
        "topic name",
    );
    invalid(create(&mut client, "", 1).await.unwrap_err(), "topic name");
    invalid(
        create(&mut client, "fine", 0).await.unwrap_err(),
        "partitions",
    );
    invalid(
        create(&mut client, "fine", 1025).await.unwrap_err(),
        "partitions",
    );

    let produce = |topic: &str, events: Vec<Event>| ProduceRequest {
        topic: topic.into(),
        events,
        ..Default::default()
    };
    invalid(
        client.produce(produce("t", vec![])).await.unwrap_err(),
        "events",
    );
    invalid(
        client
            .produce(produce("t", keyed_events(11)))
            .await
            .unwrap_err(),
        "at most 10",
    );
    let mut events = keyed_events(3);
    events[2].id.clear();
    invalid(
        client.produce(produce("t", events)).await.unwrap_err(),
        "events[2].id",
    );
    invalid(
        client
            .produce(produce("no/such", keyed_events(1)))
            .await
            .unwrap_err(),
        "topic name",
    );

    let fetch = |partition, offset| FetchRequest {
        topic: "t".into(),
        partition,
        offset,
        max_records: 0,
        ..Default::default()
    };
    invalid(client.fetch(fetch(2, 0)).await.unwrap_err(), "partition 2");
    let subscribe = SubscribeRequest {
        topic: "t".into(),
        partition: 9,
        offset: 0,
        ..Default::default()
    };
    invalid(
        client.subscribe(subscribe).await.unwrap_err(),
        "partition 9",
    );

    // Nothing invalid was written.
    let topics = client
        .list_topics(ListTopicsRequest {})
        .await
        .unwrap()
        .into_inner()
        .topics;
    assert_eq!(topics.len(), 1);
    assert!(topics[0].partitions.iter().all(|p| p.end_offset == 0));
    stop(broker).await;
}

both_engines!(unknown_topics_are_not_found_unless_auto_created);
async fn unknown_topics_are_not_found_unless_auto_created(engine: Engine) {
    let Some(harness) = Harness::new(engine).await else {
        return;
    };
    let (addr, broker) = harness.spawn_with(|c| c.auto_create_topics = false).await;
    let mut client = connect(addr).await;
    let status = client
        .produce(ProduceRequest {
            topic: "missing".into(),
            events: keyed_events(1),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    let status = client
        .fetch(FetchRequest {
            topic: "missing".into(),
            partition: 0,
            offset: 0,
            max_records: 0,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    stop(broker).await;

    let (addr, broker) = harness.spawn_with(|c| c.default_partitions = 3).await;
    let mut client = connect(addr).await;
    client
        .produce(ProduceRequest {
            topic: "auto".into(),
            events: keyed_events(4),
            ..Default::default()
        })
        .await
        .unwrap();
    let topics = client
        .list_topics(ListTopicsRequest {})
        .await
        .unwrap()
        .into_inner()
        .topics;
    assert_eq!(topics.len(), 1);
    assert_eq!(topics[0].name, "auto");
    assert_eq!(topics[0].partitions.len(), 3);
    assert_eq!(
        topics[0]
            .partitions
            .iter()
            .map(|p| p.end_offset)
            .sum::<u64>(),
        4
    );
    stop(broker).await;
}

both_engines!(produce_partitions_by_key_and_fetch_returns_every_event);
async fn produce_partitions_by_key_and_fetch_returns_every_event(engine: Engine) {
    let Some(harness) = Harness::new(engine).await else {
        return;
    };
    let (addr, broker) = harness.spawn().await;
    let mut client = connect(addr).await;
    create(&mut client, "readings", 4).await.unwrap();

    let events = keyed_events(100);
    let positions = client
        .produce(ProduceRequest {
            topic: "readings".into(),
            events: events.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .positions;
    assert_eq!(positions.len(), events.len());
    let mut per_partition: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
    for (event, position) in events.iter().zip(&positions) {
        assert_eq!(position.topic, "readings");
        assert_eq!(
            position.partition,
            partition_for_key(&event.key, 4),
            "{}",
            event.key
        );
        per_partition
            .entry(position.partition)
            .or_default()
            .push(position.offset);
    }
    assert!(
        per_partition.len() > 1,
        "13 keys should use more than one partition"
    );
    for offsets in per_partition.values() {
        // Dense from 0, in request order.
        assert_eq!(*offsets, (0..offsets.len() as u64).collect::<Vec<_>>());
    }

    for partition in 0..4 {
        let records = fetch_all(&mut client, "readings", partition).await;
        let expected: Vec<&Event> = events
            .iter()
            .zip(&positions)
            .filter(|(_, p)| p.partition == partition)
            .map(|(e, _)| e)
            .collect();
        assert_eq!(records.len(), expected.len());
        for (offset, (record, event)) in records.iter().zip(expected).enumerate() {
            assert_eq!(record.partition, partition);
            assert_eq!(record.offset, offset as u64);
            assert!(record.append_time.is_some());
            assert_eq!(record.event.as_ref(), Some(event));
            assert_eq!(record.event.as_ref().unwrap().payload, event.payload);
        }
    }

    // Reading at the end is empty; past it is out of range.
    let end = per_partition[&0].len() as u64;
    let at_end = client
        .fetch(FetchRequest {
            topic: "readings".into(),
            partition: 0,
            offset: end,
            max_records: 0,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(at_end.records.is_empty());
    assert_eq!((at_end.next_offset, at_end.end_offset), (end, end));
    let status = client
        .fetch(FetchRequest {
            topic: "readings".into(),
            partition: 0,
            offset: end + 1,
            max_records: 0,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    stop(broker).await;
}

both_engines!(fetch_answers_stay_under_the_message_limit);
async fn fetch_answers_stay_under_the_message_limit(engine: Engine) {
    let Some(harness) = Harness::new(engine).await else {
        return;
    };
    // 128 KiB messages leave 64 KiB for records per fetch.
    let (addr, broker) = harness
        .spawn_with(|c| c.server.max_message_bytes = 128 * 1024)
        .await;
    let mut client = connect(addr).await;
    create(&mut client, "big", 1).await.unwrap();
    let events: Vec<Event> = (0..10)
        .map(|i| event(&format!("b-{i}"), "k", &[i as u8; 20_000]))
        .collect();
    // Two per call: ten would not fit in one request either.
    for pair in events.chunks(2) {
        client
            .produce(ProduceRequest {
                topic: "big".into(),
                events: pair.to_vec(),
                ..Default::default()
            })
            .await
            .unwrap();
    }

    let first = client
        .fetch(FetchRequest {
            topic: "big".into(),
            partition: 0,
            offset: 0,
            max_records: 0,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        (1..10).contains(&first.records.len()),
        "got {}",
        first.records.len()
    );
    let all = fetch_all(&mut client, "big", 0).await;
    let got: Vec<Event> = all.into_iter().filter_map(|r| r.event).collect();
    assert_eq!(got, events);

    // An event that could never be fetched back is refused up front.
    let status = client
        .produce(ProduceRequest {
            topic: "big".into(),
            events: vec![event("huge", "k", &[0; 70_000])],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("events[0]"), "{status:?}");
    stop(broker).await;
}

/// A subscription, record by record.
struct Records {
    stream: tonic::Streaming<SubscribeResponse>,
    buffered: std::collections::VecDeque<Record>,
}

impl Records {
    fn new(stream: tonic::Streaming<SubscribeResponse>) -> Records {
        Records {
            stream,
            buffered: Default::default(),
        }
    }
}

async fn next_record(records: &mut Records) -> Record {
    while records.buffered.is_empty() {
        let message = tokio::time::timeout(Duration::from_secs(5), records.stream.next())
            .await
            .expect("a record within 5s")
            .expect("the stream is open")
            .expect("a record, not an error");
        match message.message {
            Some(subscribe_response::Message::Records(chunk)) => {
                records.buffered.extend(chunk.records)
            }
            other => panic!("expected records, got {other:?}"),
        }
    }
    records.buffered.pop_front().unwrap()
}

both_engines!(subscribe_delivers_history_then_new_records);
async fn subscribe_delivers_history_then_new_records(engine: Engine) {
    let Some(harness) = Harness::new(engine).await else {
        return;
    };
    let (addr, broker) = harness.spawn().await;
    let mut client = connect(addr).await;
    create(&mut client, "live", 1).await.unwrap();
    let history = keyed_events(3);
    client
        .produce(ProduceRequest {
            topic: "live".into(),
            events: history.clone(),
            ..Default::default()
        })
        .await
        .unwrap();

    let status = client
        .subscribe(SubscribeRequest {
            topic: "live".into(),
            partition: 0,
            offset: 4,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");

    let stream = client
        .subscribe(SubscribeRequest {
            topic: "live".into(),
            partition: 0,
            offset: 0,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut stream = Records::new(stream);
    for (offset, event) in history.iter().enumerate() {
        let record = next_record(&mut stream).await;
        assert_eq!(record.offset, offset as u64);
        assert_eq!(record.event.as_ref(), Some(event));
    }

    // Produced after the subscriber caught up: the end-offset watch wakes it.
    let later = event("later", "k", b"new");
    client
        .produce(ProduceRequest {
            topic: "live".into(),
            events: vec![later.clone()],
            ..Default::default()
        })
        .await
        .unwrap();
    let record = next_record(&mut stream).await;
    assert_eq!(record.offset, 3);
    assert_eq!(record.event, Some(later));

    // Shutdown ends the stream (with UNAVAILABLE, so the client knows to resubscribe)
    // instead of holding the drain open.
    broker.trigger();
    let end = tokio::time::timeout(Duration::from_secs(5), stream.stream.next())
        .await
        .expect("the stream ends on shutdown");
    match end {
        None => {}
        Some(Err(status)) => assert_eq!(status.code(), Code::Unavailable, "{status:?}"),
        Some(Ok(record)) => panic!("unexpected record {record:?}"),
    }
    broker
        .stop(Duration::from_secs(5))
        .await
        .expect("run returns promptly with a subscriber open");
}

both_engines!(a_restart_keeps_everything_acknowledged_and_never_reuses_an_offset);
async fn a_restart_keeps_everything_acknowledged_and_never_reuses_an_offset(engine: Engine) {
    let Some(harness) = Harness::new(engine).await else {
        return;
    };
    let (addr, broker) = harness.spawn().await;
    let mut client = connect(addr).await;
    create(&mut client, "durable", 2).await.unwrap();
    let before = keyed_events(40);
    let positions = client
        .produce(ProduceRequest {
            topic: "durable".into(),
            events: before.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .positions;
    let mut stored: BTreeMap<u32, Vec<Record>> = BTreeMap::new();
    for partition in 0..2 {
        stored.insert(
            partition,
            fetch_all(&mut client, "durable", partition).await,
        );
    }
    stop(broker).await;

    let (addr, broker) = harness.spawn().await;
    let mut client = connect(addr).await;
    let topics = client
        .list_topics(ListTopicsRequest {})
        .await
        .unwrap()
        .into_inner()
        .topics;
    assert_eq!(topics.len(), 1);
    assert_eq!(topics[0].partitions.len(), 2);
    for partition in 0..2 {
        // Byte-for-byte what was acknowledged, append times included.
        assert_eq!(
            fetch_all(&mut client, "durable", partition).await,
            stored[&partition]
        );
    }
    assert_eq!(
        stored.values().map(Vec::len).sum::<usize>(),
        positions.len()
    );

    let after = keyed_events(40);
    let new_positions = client
        .produce(ProduceRequest {
            topic: "durable".into(),
            events: after,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .positions;
    for partition in 0..2u32 {
        let old_end = stored[&partition].len() as u64;
        let new_offsets: Vec<u64> = new_positions
            .iter()
            .filter(|p| p.partition == partition)
            .map(|p| p.offset)
            .collect();
        let expected: Vec<u64> = (old_end..old_end + new_offsets.len() as u64).collect();
        assert_eq!(
            new_offsets, expected,
            "partition {partition} continues at its end offset"
        );
    }
    stop(broker).await;
}
