//! The log over gRPC: pre-encoded batches, idempotent producers, acks, time lookups and
//! retention.

use super::{Engine, Harness, connect, create, event, fetch_all, keyed_events, stop};
use runnel_client::{Producer, ProducerOptions};
use runnel_log::faults::{self, Fault, Op};
use runnel_proto::records;
use runnel_proto::stored::{self, StoredBatch};
use runnel_proto::v1::{
    Acks, Compression, CreateTopicRequest, DescribeTopicRequest, Event, FetchRequest,
    ListTopicsRequest, ProduceRequest, RecordBatch, RetentionPolicy, SubscribeRequest,
    subscribe_response,
};
use runnel_testkit::Tool;
use runnel_testkit::nats::NatsNode;
use std::collections::BTreeSet;
use std::time::Duration;
use tonic::Code;

fn batch(partition: u32, events: &[Event], compression: Compression) -> RecordBatch {
    let plain = records::encode(events);
    RecordBatch {
        partition,
        record_count: events.len() as u32,
        compression: compression as i32,
        records: if compression == Compression::None {
            plain
        } else {
            records::compress(compression, &plain)
        },
        ..RecordBatch::default()
    }
}

fn batches_request(topic: &str, batches: Vec<RecordBatch>) -> ProduceRequest {
    ProduceRequest {
        topic: topic.into(),
        batches,
        ..Default::default()
    }
}

both_engines!(pre_encoded_batches_are_stored_as_sent_and_read_back_either_way);
async fn pre_encoded_batches_are_stored_as_sent_and_read_back_either_way(engine: Engine) {
    let Some(harness) = Harness::new(engine).await else {
        return;
    };
    let (addr, broker) = harness.spawn().await;
    let mut client = connect(addr).await;
    create(&mut client, "raw", 2).await.unwrap();
    let first = keyed_events(10);
    let second = keyed_events(5);
    let sent = vec![
        batch(1, &first, Compression::Lz4),
        batch(1, &second, Compression::None),
    ];
    let acks = client
        .produce(batches_request("raw", sent.clone()))
        .await
        .unwrap()
        .into_inner()
        .batch_acks;
    assert_eq!(
        acks.iter()
            .map(|a| (a.partition, a.base_offset, a.duplicate))
            .collect::<Vec<_>>(),
        [(1, 0, false), (1, 10, false)]
    );

    let fetched = client
        .fetch(FetchRequest {
            topic: "raw".into(),
            partition: 1,
            offset: 3,
            as_batches: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(fetched.next_offset, 15);
    assert!(fetched.batches.iter().all(|b| b.append_time.is_some()));
    let decoded: usize = fetched
        .batches
        .iter()
        .map(|b| b.record_count as usize)
        .sum();
    if harness.engine == Engine::Embedded {
        // Stored as sent: the compressed bytes come back untouched, whole batches.
        assert_eq!(fetched.batches.len(), 2);
        assert_eq!(fetched.batches[0].records, sent[0].records);
        assert_eq!(
            fetched.batches[0].base_offset, 0,
            "the whole batch holding offset 3"
        );
        assert_eq!(
            Compression::try_from(fetched.batches[0].compression),
            Ok(Compression::Lz4)
        );
        assert_eq!(decoded, 15);
    } else {
        // JetStream keeps a message per record: batches of one, from the offset asked for.
        assert_eq!(fetched.batches[0].base_offset, 3);
        assert_eq!(decoded, 12);
    }

    let records = fetch_all(&mut client, "raw", 1).await;
    let ids: Vec<String> = records
        .iter()
        .map(|r| r.event.as_ref().unwrap().id.clone())
        .collect();
    let expected: Vec<String> = first.iter().chain(&second).map(|e| e.id.clone()).collect();
    assert_eq!(ids, expected);
    assert!(fetch_all(&mut client, "raw", 0).await.is_empty());
    stop(broker).await;
}

both_engines!(stored_batches_are_delivered_as_kept_by_fetch_and_subscribe);
/// Asked for stored batches, `Fetch` and `Subscribe` hand over each batch as the broker
/// keeps it (header and body, compressed bodies untouched), and a reader of that form gets
/// exactly the records from the offset it asked for.
async fn stored_batches_are_delivered_as_kept_by_fetch_and_subscribe(engine: Engine) {
    let Some(harness) = Harness::new(engine).await else {
        return;
    };
    let (addr, broker) = harness.spawn().await;
    let mut client = connect(addr).await;
    create(&mut client, "kept", 2).await.unwrap();
    let first = keyed_events(10);
    let second = keyed_events(5);
    let sent = vec![
        batch(1, &first, Compression::Lz4),
        batch(1, &second, Compression::None),
    ];
    client
        .produce(batches_request("kept", sent.clone()))
        .await
        .unwrap();
    let all: Vec<Event> = first.iter().chain(&second).cloned().collect();

    let fetched = client
        .fetch(FetchRequest {
            topic: "kept".into(),
            partition: 1,
            offset: 3,
            stored: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(fetched.next_offset, 15);
    assert!(fetched.records.is_empty() && fetched.batches.is_empty());
    let read = stored::decode_records(&fetched.stored_batches, 1, 3, 1 << 20).unwrap();
    assert_eq!(
        read.iter().map(|r| r.offset).collect::<Vec<_>>(),
        (3..15).collect::<Vec<_>>()
    );
    assert_eq!(
        read.iter()
            .map(|r| r.event.clone().unwrap())
            .collect::<Vec<_>>(),
        all[3..]
    );
    assert!(
        read.iter()
            .all(|r| r.partition == 1 && r.append_time.is_some())
    );
    if harness.engine == Engine::Embedded {
        // The batches as stored: the producer's compressed body, byte for byte.
        let kept: Vec<StoredBatch> = fetched
            .stored_batches
            .iter()
            .map(|b| StoredBatch::parse(b.clone()).unwrap())
            .collect();
        assert_eq!(kept.len(), 2);
        assert_eq!(kept[0].records, sent[0].records);
        assert_eq!(
            (kept[0].header.base_offset, kept[0].header.compression),
            (0, Compression::Lz4)
        );
        assert_eq!(
            (kept[1].header.base_offset, kept[1].header.record_count),
            (10, 5)
        );
    }

    let mut stream = client
        .subscribe(SubscribeRequest {
            topic: "kept".into(),
            partition: 1,
            offset: 3,
            stored: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut streamed = Vec::new();
    while streamed.len() < 12 {
        let message = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("records arrive")
            .unwrap()
            .expect("the stream stays open");
        let Some(subscribe_response::Message::Records(chunk)) = message.message else {
            panic!("records expected, got {message:?}");
        };
        assert!(chunk.records.is_empty(), "stored batches only");
        streamed.extend(
            stored::decode_records(&chunk.stored_batches, 1, chunk.first_offset, 1 << 20).unwrap(),
        );
    }
    assert_eq!(
        streamed.iter().map(|r| r.offset).collect::<Vec<_>>(),
        (3..15).collect::<Vec<_>>()
    );
    assert_eq!(
        streamed
            .into_iter()
            .map(|r| r.event.unwrap())
            .collect::<Vec<_>>(),
        all[3..]
    );
    drop(stream);
    stop(broker).await;
}

both_engines!(batches_that_do_not_check_out_are_refused_and_nothing_is_stored);
async fn batches_that_do_not_check_out_are_refused_and_nothing_is_stored(engine: Engine) {
    let Some(harness) = Harness::new(engine).await else {
        return;
    };
    let (addr, broker) = harness.spawn().await;
    let mut client = connect(addr).await;
    create(&mut client, "strict", 1).await.unwrap();
    let events = keyed_events(3);
    let mut miscounted = batch(0, &events, Compression::None);
    miscounted.record_count = 4;
    let mut garbage = batch(0, &events, Compression::Lz4);
    garbage.records = vec![0xff; 40].into();
    let mut no_id = batch(0, &[Event::default()], Compression::None);
    no_id.record_count = 1;
    let wrong_partition = batch(7, &events, Compression::None);
    let mut unknown_codec = batch(0, &events, Compression::None);
    unknown_codec.compression = 9;
    let cases = [
        (miscounted, "record_count says 4"),
        (garbage, "lz4"),
        (no_id, "no event id"),
        (wrong_partition, "batches[0].partition"),
        (unknown_codec, "batches[0].compression"),
    ];
    for (bad, needle) in cases {
        // A good batch for another partition... in the same call: the bad one fails the call.
        let status = client
            .produce(batches_request("strict", vec![bad]))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(
            status.message().contains(needle),
            "{:?} should mention {needle}",
            status.message()
        );
    }
    assert!(fetch_all(&mut client, "strict", 0).await.is_empty());
    stop(broker).await;
}

both_engines!(an_idempotent_producer_stores_each_batch_once_across_retries_and_restarts);
async fn an_idempotent_producer_stores_each_batch_once_across_retries_and_restarts(engine: Engine) {
    let Some(harness) = Harness::new(engine).await else {
        return;
    };
    let (addr, broker) = harness.spawn().await;
    let mut client = connect(addr).await;
    create(&mut client, "once", 3).await.unwrap();
    let mut producer = Producer::new(client.clone(), "once", ProducerOptions::default())
        .await
        .unwrap();
    let events = keyed_events(30);
    let positions = producer.send(events.clone()).await.unwrap();
    for (event, position) in events.iter().zip(&positions) {
        assert_eq!(
            position.partition,
            runnel_proto::partition_for_key(&event.key, 3)
        );
    }

    // The same batch again — a retry after a lost answer — is acknowledged, not stored.
    let mut retry = batch(0, &events[..2], Compression::None);
    retry.producer_id = 4242;
    retry.base_sequence = 0;
    let first = client
        .produce(batches_request("once", vec![retry.clone()]))
        .await
        .unwrap()
        .into_inner()
        .batch_acks
        .remove(0);
    let again = client
        .produce(batches_request("once", vec![retry.clone()]))
        .await
        .unwrap()
        .into_inner()
        .batch_acks
        .remove(0);
    assert!(!first.duplicate && again.duplicate);
    assert_eq!(again.base_offset, first.base_offset);
    stop(broker).await;

    // The broker remembers across a restart.
    let (addr, broker) = harness.spawn().await;
    let mut client = connect(addr).await;
    let after = client
        .produce(batches_request("once", vec![retry.clone()]))
        .await
        .unwrap()
        .into_inner()
        .batch_acks
        .remove(0);
    assert!(after.duplicate);
    assert_eq!(after.base_offset, first.base_offset);
    if harness.engine == Engine::Embedded {
        // A gap in the sequence is refused: a batch in between was lost. (JetStream only
        // recognises ids it has seen; it does not track sequences.)
        let mut gap = retry.clone();
        gap.base_sequence = 5;
        let status = client
            .produce(batches_request("once", vec![gap]))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
        assert!(
            status.message().contains("expected sequence 2"),
            "{status:?}"
        );
    }

    let mut stored = 0;
    for partition in 0..3 {
        stored += fetch_all(&mut client, "once", partition).await.len();
    }
    assert_eq!(stored, 30 + 2, "every event exactly once");
    stop(broker).await;
}

both_engines!(retried_events_are_stored_once_across_requests_batches_and_restarts);
async fn retried_events_are_stored_once_across_requests_batches_and_restarts(engine: Engine) {
    let Some(harness) = Harness::new(engine).await else {
        return;
    };
    let (addr, broker) = harness.spawn().await;
    let mut client = connect(addr).await;
    create(&mut client, "dedup", 3).await.unwrap();
    // Keyless events: placed by identity, so a retry meets its original.
    let events: Vec<Event> = (0..12)
        .map(|i| event(&format!("e-{i}"), "", b"body"))
        .collect();
    let request = |events: Vec<Event>| ProduceRequest {
        topic: "dedup".into(),
        events,
        deduplicate: true,
        ..Default::default()
    };
    let first = client
        .produce(request(events.clone()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.duplicates, 0);
    // Sent again, with two new events in between: the twelve are recognised.
    let mut again = events.clone();
    again.insert(5, event("new-1", "", b"body"));
    again.push(event("new-2", "", b"body"));
    let second = client.produce(request(again)).await.unwrap().into_inner();
    assert_eq!(second.duplicates, 12);
    let mut answered = second.positions.clone();
    answered.remove(5);
    answered.pop();
    assert_eq!(
        answered, first.positions,
        "a retry is answered where its original is"
    );

    // As a pre-encoded batch (what the collector sends), with another producer id and
    // sequence: the events, not the sequence, are what is recognised.
    let partition = first.positions[0].partition;
    let in_partition: Vec<Event> = events
        .iter()
        .zip(&first.positions)
        .filter(|(_, p)| p.partition == partition)
        .map(|(e, _)| e.clone())
        .collect();
    let mut retry = batch(partition, &in_partition, Compression::Lz4);
    retry.producer_id = 77;
    let answer = client
        .produce(ProduceRequest {
            topic: "dedup".into(),
            batches: vec![retry.clone()],
            deduplicate: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.duplicates, in_partition.len() as u64);
    let expected: Vec<u64> = first
        .positions
        .iter()
        .filter(|p| p.partition == partition)
        .map(|p| p.offset)
        .collect();
    let ack = &answer.batch_acks[0];
    let offsets = if ack.offsets.is_empty() {
        (ack.base_offset..ack.base_offset + expected.len() as u64).collect()
    } else {
        ack.offsets.clone()
    };
    assert_eq!(offsets, expected);
    stop(broker).await;

    // After a restart the broker still recognises them.
    let (addr, broker) = harness.spawn().await;
    let mut client = connect(addr).await;
    let third = client
        .produce(request(events.clone()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(third.duplicates, 12);
    assert_eq!(third.positions, first.positions);
    let mut stored = Vec::new();
    for p in 0..3 {
        stored.extend(
            fetch_all(&mut client, "dedup", p)
                .await
                .into_iter()
                .map(|r| r.event.unwrap().id),
        );
    }
    stored.sort();
    let mut expected: Vec<String> = (0..12).map(|i| format!("e-{i}")).collect();
    expected.extend(["new-1".to_string(), "new-2".to_string()]);
    expected.sort();
    assert_eq!(stored, expected, "every event once, nothing more");
    // Without `deduplicate` an event is stored as sent.
    let plain = client
        .produce(ProduceRequest {
            topic: "dedup".into(),
            events: events[..1].to_vec(),
            partition: Some(partition),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(plain.duplicates, 0);
    assert_eq!(
        plain.positions[0].offset,
        fetch_all(&mut client, "dedup", partition).await.len() as u64 - 1
    );
    stop(broker).await;
}

both_engines!(durable_acks_wait_for_an_fsync_even_on_a_broker_that_does_not_sync);
async fn durable_acks_wait_for_an_fsync_even_on_a_broker_that_does_not_sync(engine: Engine) {
    let Some(harness) = Harness::new(engine).await else {
        return;
    };
    let (addr, broker) = harness
        .spawn_with(|c| c.fsync = runnel_log::FsyncPolicy::Never)
        .await;
    let mut client = connect(addr).await;
    create(&mut client, "d", 1).await.unwrap();
    // Many producers at once share group commits; each is answered only once its batch
    // is durable.
    let producers: Vec<_> = (0..16)
        .map(|p| {
            let mut client = client.clone();
            tokio::spawn(async move {
                let mut offsets = Vec::new();
                for round in 0..20 {
                    let events = vec![event(&format!("p{p}-r{round}"), "k", b"x")];
                    let answer = client
                        .produce(ProduceRequest {
                            topic: "d".into(),
                            events,
                            acks: Acks::Durable as i32,
                            ..Default::default()
                        })
                        .await
                        .unwrap()
                        .into_inner();
                    offsets.push(answer.positions[0].offset);
                    let partition = describe(&mut client, "d").await.remove(0);
                    assert!(
                        partition.durable_offset > answer.positions[0].offset,
                        "acknowledged before durable: {partition:?}"
                    );
                }
                offsets
            })
        })
        .collect();
    let mut all = BTreeSet::new();
    for producer in producers {
        for offset in producer.await.unwrap() {
            assert!(all.insert(offset), "offset {offset} handed out twice");
        }
    }
    assert_eq!(
        all.into_iter().collect::<Vec<_>>(),
        (0..320).collect::<Vec<_>>()
    );
    stop(broker).await;
}

async fn describe(client: &mut super::Client, topic: &str) -> Vec<runnel_proto::v1::PartitionInfo> {
    client
        .describe_topic(DescribeTopicRequest { name: topic.into() })
        .await
        .unwrap()
        .into_inner()
        .topic
        .unwrap()
        .partitions
}

both_engines!(fetch_by_time_starts_at_the_first_record_appended_at_or_after_it);
async fn fetch_by_time_starts_at_the_first_record_appended_at_or_after_it(engine: Engine) {
    let Some(harness) = Harness::new(engine).await else {
        return;
    };
    let (addr, broker) = harness.spawn().await;
    let mut client = connect(addr).await;
    create(&mut client, "timed", 1).await.unwrap();
    let mut times = Vec::new();
    for i in 0..5 {
        client
            .produce(ProduceRequest {
                topic: "timed".into(),
                events: vec![event(&format!("t-{i}"), "k", b"x")],
                ..Default::default()
            })
            .await
            .unwrap();
        times.push(
            fetch_all(&mut client, "timed", 0)
                .await
                .last()
                .unwrap()
                .append_time
                .unwrap(),
        );
    }
    let at = |ts: prost_types::Timestamp| FetchRequest {
        topic: "timed".into(),
        partition: 0,
        timestamp: Some(ts),
        ..Default::default()
    };
    let from_third = client.fetch(at(times[2])).await.unwrap().into_inner();
    assert_eq!(
        from_third.records[0].offset,
        times.iter().position(|t| *t == times[2]).unwrap() as u64
    );
    let future = runnel_proto::Millis::from(times[4]).0 + 60_000;
    let nothing = client
        .fetch(at(runnel_proto::Millis(future).into()))
        .await
        .unwrap()
        .into_inner();
    assert!(nothing.records.is_empty());
    assert_eq!(nothing.next_offset, 5);
    stop(broker).await;
}

/// Segments are the embedded engine's; JetStream enforces a stream's limits itself.
#[tokio::test]
async fn retention_deletes_old_segments_and_moves_the_start_offset() {
    let Some(harness) = Harness::new(Engine::Embedded).await else {
        return;
    };
    let small_segments = |c: &mut runnel_broker::BrokerConfig| {
        c.segment_bytes = 64 * 1024;
        c.fsync = runnel_log::FsyncPolicy::Never;
    };
    let (addr, broker) = harness.spawn_with(small_segments).await;
    let mut client = connect(addr).await;
    let created = client
        .create_topic(CreateTopicRequest {
            name: "short".into(),
            partitions: 1,
            retention: Some(RetentionPolicy {
                max_age: None,
                max_bytes: Some(128 * 1024),
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .topic
        .unwrap();
    let retention = created.retention.unwrap();
    assert_eq!(retention.max_bytes, Some(128 * 1024));
    assert_eq!(
        retention.max_age.unwrap().seconds,
        7 * 24 * 3600,
        "the broker's default age"
    );
    for round in 0..40 {
        let events = (0..20)
            .map(|i| event(&format!("r{round}-{i}"), "k", &[7u8; 1000]))
            .collect();
        client
            .produce(ProduceRequest {
                topic: "short".into(),
                events,
                ..Default::default()
            })
            .await
            .unwrap();
    }
    stop(broker).await;

    // Retention runs at start (and then periodically).
    let (addr, broker) = harness.spawn_with(small_segments).await;
    let mut client = connect(addr).await;
    let partition = describe(&mut client, "short").await.remove(0);
    assert_eq!(partition.end_offset, 800);
    assert!(partition.start_offset > 0, "{partition:?}");
    assert!(
        partition.size_bytes <= 128 * 1024 + 70 * 1024,
        "{partition:?}"
    );
    let status = client
        .fetch(FetchRequest {
            topic: "short".into(),
            partition: 0,
            offset: 0,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange);
    let first = client
        .fetch(FetchRequest {
            topic: "short".into(),
            partition: 0,
            offset: partition.start_offset,
            max_records: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.records[0].offset, partition.start_offset);
    assert_eq!(first.start_offset, partition.start_offset);
    stop(broker).await;
}

/// JetStream reserves a stream's size retention against its store limit when the stream
/// is created. A topic that does not fit is refused as RESOURCE_EXHAUSTED, with a message
/// that says what would help — not as UNAVAILABLE, which a client would retry forever —
/// and is not listed; what fits is created and works.
#[tokio::test]
async fn a_topic_jetstream_has_no_room_for_is_refused_as_resource_exhausted() {
    if !runnel_testkit::require(Tool::NatsServer) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let nats_dir = dir.path().join("nats");
    std::fs::create_dir_all(&nats_dir).unwrap();
    let nats = NatsNode::start_with_store_limit(&nats_dir, &[], 64 << 20).await;
    let harness = Harness {
        engine: Engine::JetStream,
        dir,
        nats: Some(nats),
    };
    let (addr, broker) = harness.spawn().await;
    let mut client = connect(addr).await;
    let request = |name: &str, partitions, max_bytes| CreateTopicRequest {
        name: name.into(),
        partitions,
        retention: Some(RetentionPolicy {
            max_age: None,
            max_bytes: Some(max_bytes),
        }),
    };
    client
        .create_topic(request("fits", 2, 16 << 20))
        .await
        .expect("2 × 16 MiB fit in 64 MiB");
    for _ in 0..2 {
        let refused = client
            .create_topic(request("too-big", 1, 1 << 30))
            .await
            .expect_err("1 GiB does not fit in what is left of 64 MiB");
        assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
        for needle in ["\"too-big\"", "max_file_store", "retention.max_bytes"] {
            assert!(refused.message().contains(needle), "{needle}: {refused:?}");
        }
    }
    let names: Vec<String> = client
        .list_topics(ListTopicsRequest {})
        .await
        .unwrap()
        .into_inner()
        .topics
        .into_iter()
        .map(|t| t.name)
        .collect();
    assert!(names.contains(&"fits".to_owned()), "{names:?}");
    assert!(!names.contains(&"too-big".to_owned()), "{names:?}");
    let mut producer = Producer::new(client.clone(), "fits", ProducerOptions::default())
        .await
        .unwrap();
    producer
        .send(vec![event("e1", "k", b"fits")])
        .await
        .expect("the topic that fit takes events");
    stop(broker).await;
}

both_engines!(a_batch_larger_than_any_publish_window_is_stored_whole);
async fn a_batch_larger_than_any_publish_window_is_stored_whole(engine: Engine) {
    let Some(harness) = Harness::new(engine).await else {
        return;
    };
    let (addr, broker) = harness.spawn().await;
    let mut client = connect(addr).await;
    create(&mut client, "wide", 1).await.unwrap();
    // More records in one call than JetStream's client allows acks pending at once (5000).
    let events: Vec<Event> = (0..6000)
        .map(|i| event(&format!("w{i}"), "k", b"x"))
        .collect();
    let positions = client
        .produce(ProduceRequest {
            topic: "wide".into(),
            events,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .positions;
    assert_eq!(
        positions.iter().map(|p| p.offset).collect::<Vec<_>>(),
        (0..6000).collect::<Vec<_>>()
    );
    let fetched = client
        .fetch(FetchRequest {
            topic: "wide".into(),
            partition: 0,
            offset: 5990,
            max_records: 5,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let offsets: Vec<u64> = fetched.records.iter().map(|r| r.offset).collect();
    assert_eq!(offsets, [5990, 5991, 5992, 5993, 5994]);
    assert_eq!(fetched.records[0].event.as_ref().unwrap().id, "w5990");
    assert_eq!(fetched.end_offset, 6000);
    stop(broker).await;
}

both_engines!(fetched_batches_stay_within_the_byte_budget);
async fn fetched_batches_stay_within_the_byte_budget(engine: Engine) {
    let Some(harness) = Harness::new(engine).await else {
        return;
    };
    let (addr, broker) = harness.spawn().await;
    let mut client = connect(addr).await;
    create(&mut client, "budget", 1).await.unwrap();
    for round in 0..5 {
        client
            .produce(ProduceRequest {
                topic: "budget".into(),
                events: vec![event(&format!("big-{round}"), "k", &[1u8; 1000])],
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let fetch = |max_bytes| FetchRequest {
        topic: "budget".into(),
        partition: 0,
        offset: 0,
        as_batches: true,
        max_bytes,
        ..Default::default()
    };
    let two = client.fetch(fetch(2500)).await.unwrap().into_inner();
    assert_eq!(
        two.batches.len(),
        2,
        "two ~1 KB records fit 2500 bytes, three do not"
    );
    assert_eq!(two.next_offset, 2);
    // A budget smaller than one batch still returns that batch: progress is always made.
    let one = client.fetch(fetch(10)).await.unwrap().into_inner();
    assert_eq!(one.batches.len(), 1);
    stop(broker).await;
}

both_engines!(a_producer_whose_sends_are_cancelled_midway_never_loses_a_later_batch);
/// A send whose future is dropped midway (a caller's timeout, a cancelled handler) may or
/// may not have reached the broker. Whichever it was, the producer's next send must not
/// reuse its sequences — the broker would take the new batch for a retry of the old one and
/// drop it. Cancelled at every moment from before the call leaves to after the broker
/// stored it, every send that completed is stored, and nothing is stored twice.
async fn a_producer_whose_sends_are_cancelled_midway_never_loses_a_later_batch(engine: Engine) {
    let Some(harness) = Harness::new(engine).await else {
        return;
    };
    let (addr, broker) = harness.spawn().await;
    let mut client = connect(addr).await;
    create(&mut client, "cancelled", 2).await.unwrap();
    let mut producer = Producer::new(client.clone(), "cancelled", ProducerOptions::default())
        .await
        .unwrap();
    let mut completed = BTreeSet::new();
    let mut attempted = BTreeSet::new();
    for round in 0..60u64 {
        let events: Vec<Event> = (0..4)
            .map(|i| event(&format!("r{round:02}-{i}"), &format!("k{i}"), b"x"))
            .collect();
        let ids: Vec<String> = events.iter().map(|e| e.id.clone()).collect();
        attempted.extend(ids.iter().cloned());
        // From no time at all to well past a durable round trip, in 50 µs steps.
        let patience = std::time::Duration::from_micros(50 * (round % 40));
        if let Ok(sent) = tokio::time::timeout(patience, producer.send(events)).await {
            sent.expect("a send that completes succeeds");
            completed.extend(ids);
        }
    }
    let last: Vec<Event> = (0..4)
        .map(|i| event(&format!("last-{i}"), &format!("k{i}"), b"x"))
        .collect();
    producer.send(last).await.unwrap();
    completed.extend((0..4).map(|i| format!("last-{i}")));
    attempted.extend((0..4).map(|i| format!("last-{i}")));

    let mut stored = Vec::new();
    for partition in 0..2 {
        stored.extend(
            fetch_all(&mut client, "cancelled", partition)
                .await
                .into_iter()
                .map(|r| r.event.unwrap().id),
        );
    }
    let unique: BTreeSet<String> = stored.iter().cloned().collect();
    assert_eq!(unique.len(), stored.len(), "nothing stored twice");
    let lost: Vec<&String> = completed.difference(&unique).collect();
    assert!(lost.is_empty(), "acknowledged but not stored: {lost:?}");
    assert!(unique.is_subset(&attempted));
    assert!(
        completed.len() < attempted.len(),
        "some sends were cancelled (else the test tested nothing)"
    );
    stop(broker).await;
}

both_engines!(a_producer_on_the_stream_has_its_resends_recognised_across_broker_restarts);
/// The idempotent producer sends over `ProduceStream`; a send cancelled midway (its batches
/// perhaps stored, never acknowledged) is followed by a broker restart, and the producer's
/// next send first sends those batches again — on a new stream, to the new broker, which
/// recognises what it already has. Every completed send is stored, nothing twice.
async fn a_producer_on_the_stream_has_its_resends_recognised_across_broker_restarts(
    engine: Engine,
) {
    let Some(harness) = Harness::new(engine).await else {
        return;
    };
    let (addr, mut broker) = harness.spawn().await;
    let mut client = connect(addr).await;
    create(&mut client, "restarts", 2).await.unwrap();
    let mut producer = Producer::new(client.clone(), "restarts", ProducerOptions::default())
        .await
        .unwrap();
    let round = |name: String| -> Vec<Event> {
        (0..4)
            .map(|i| event(&format!("{name}-{i}"), &format!("k{i}"), b"x"))
            .collect()
    };
    producer.send(round("first".into())).await.unwrap();
    assert!(
        producer.on_stream(),
        "the producer sends on a ProduceStream"
    );
    let mut completed: BTreeSet<String> = (0..4).map(|i| format!("first-{i}")).collect();
    let mut attempted = completed.clone();
    let mut restarts = 0;
    for r in 0..16u64 {
        let events = round(format!("r{r:02}"));
        let ids: Vec<String> = events.iter().map(|e| e.id.clone()).collect();
        attempted.extend(ids.iter().cloned());
        // From no time at all to about a durable round trip, in 100 µs steps.
        let patience = std::time::Duration::from_micros(100 * (r % 8));
        match tokio::time::timeout(patience, producer.send(events)).await {
            Ok(sent) => {
                sent.expect("a send that completes succeeds");
                completed.extend(ids);
            }
            Err(_) => {
                stop(broker).await;
                broker = harness.respawn_at(addr).await;
                restarts += 1;
            }
        }
    }
    producer.send(round("last".into())).await.unwrap();
    assert!(producer.on_stream(), "back on a stream after the restarts");
    completed.extend((0..4).map(|i| format!("last-{i}")));
    attempted.extend((0..4).map(|i| format!("last-{i}")));

    let mut stored = Vec::new();
    for partition in 0..2 {
        stored.extend(
            fetch_all(&mut client, "restarts", partition)
                .await
                .into_iter()
                .map(|r| r.event.unwrap().id),
        );
    }
    let unique: BTreeSet<String> = stored.iter().cloned().collect();
    assert_eq!(unique.len(), stored.len(), "nothing stored twice");
    let lost: Vec<&String> = completed.difference(&unique).collect();
    assert!(lost.is_empty(), "acknowledged but not stored: {lost:?}");
    assert!(unique.is_subset(&attempted));
    assert!(
        restarts > 0,
        "some sends were cancelled (else the test tested nothing)"
    );
    stop(broker).await;
}

/// A full disk refuses a batch — UNAVAILABLE, saying so, nothing of it stored — and the
/// partition takes the next batch as soon as the disk does, rather than staying disabled
/// until a restart; a restart then finds exactly what was acknowledged.
#[tokio::test]
async fn a_partition_takes_appends_again_once_the_disk_has_room() {
    let Some(harness) = Harness::new(Engine::Embedded).await else {
        return;
    };
    let (addr, broker) = harness.spawn().await;
    let mut client = connect(addr).await;
    create(&mut client, "full", 1).await.unwrap();
    let produce = |id: &str| {
        batches_request(
            "full",
            vec![batch(0, &[event(id, "k", b"x")], Compression::None)],
        )
    };
    client.produce(produce("e1")).await.unwrap();

    faults::fail_next(harness.dir.path(), Op::Write, Fault::Enospc);
    let refused = client.produce(produce("e2")).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert!(refused.message().contains("disk is full"), "{refused:?}");
    assert!(
        !refused
            .message()
            .contains(&harness.dir.path().display().to_string()),
        "no paths: {refused:?}"
    );

    let acks = client
        .produce(produce("e3"))
        .await
        .expect("the partition takes appends again")
        .into_inner()
        .batch_acks;
    assert_eq!(acks[0].base_offset, 1, "the refused batch took no offset");
    let ids = |records: Vec<runnel_proto::v1::Record>| -> Vec<String> {
        records.into_iter().map(|r| r.event.unwrap().id).collect()
    };
    assert_eq!(ids(fetch_all(&mut client, "full", 0).await), ["e1", "e3"]);
    stop(broker).await;

    let (addr, broker) = harness.spawn().await;
    let mut client = connect(addr).await;
    assert_eq!(ids(fetch_all(&mut client, "full", 0).await), ["e1", "e3"]);
    stop(broker).await;
}

/// A full disk when a segment is to be started: the append that would start it is refused
/// (UNAVAILABLE, nothing stored), and the next one starts it — before, the partition took
/// no append until the broker was restarted.
#[tokio::test]
async fn a_segment_a_full_disk_kept_from_starting_is_started_by_the_next_append() {
    let Some(harness) = Harness::new(Engine::Embedded).await else {
        return;
    };
    let small_segments = |c: &mut runnel_broker::BrokerConfig| c.segment_bytes = 64 * 1024;
    let (addr, broker) = harness.spawn_with(small_segments).await;
    let mut client = connect(addr).await;
    create(&mut client, "rolling", 1).await.unwrap();
    let produce = |round: usize| {
        let events: Vec<Event> = (0..4)
            .map(|i| event(&format!("r{round}-{i}"), "k", &[9u8; 1000]))
            .collect();
        batches_request("rolling", vec![batch(0, &events, Compression::None)])
    };
    let mut round = 0;
    // Until the active segment is full: the next append starts a new one.
    while describe(&mut client, "rolling").await[0].size_bytes < 64 * 1024 {
        client.produce(produce(round)).await.unwrap();
        round += 1;
    }
    faults::fail_next(harness.dir.path(), Op::Write, Fault::Enospc);
    let refused = client.produce(produce(round)).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert!(refused.message().contains("disk is full"), "{refused:?}");
    client
        .produce(produce(round + 1))
        .await
        .expect("the next append starts the segment");
    let stored = fetch_all(&mut client, "rolling", 0).await;
    let offsets: Vec<u64> = stored.iter().map(|r| r.offset).collect();
    assert_eq!(offsets, (0..(round as u64 + 1) * 4).collect::<Vec<_>>());
    stop(broker).await;
    let (addr, broker) = harness.spawn_with(small_segments).await;
    let mut client = connect(addr).await;
    assert_eq!(fetch_all(&mut client, "rolling", 0).await, stored);
    stop(broker).await;
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(100))]

    /// Simulated power cuts (runnel-log's fault layer: every file back to what its last
    /// fsync covered, every later write and fsync failing) while two clients produce with
    /// DURABLE acks and one with LEADER acks, one record per request, to a partition with
    /// small segments (so cuts land around rolls too), and a reader follows it with Fetch:
    /// after the power is back
    /// and the broker restarted, every acknowledged record — and every record the reader
    /// saw — is at the offset it had, and offsets still run on without a gap.
    #[test]
    fn a_power_cut_loses_nothing_acknowledged_durable(
        cut_after in 0usize..40,
        per_client in 1usize..40,
    ) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(power_cut_round(cut_after, per_client));
    }
}

async fn power_cut_round(cut_after: usize, per_client: usize) {
    let harness = Harness::new(Engine::Embedded).await.expect("embedded");
    faults::watch(harness.dir.path());
    let small_segments = |c: &mut runnel_broker::BrokerConfig| c.segment_bytes = 64 * 1024;
    let (addr, broker) = harness.spawn_with(small_segments).await;
    let mut client = connect(addr).await;
    create(&mut client, "cut", 1).await.unwrap();
    let acked = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(String, u64)>::new()));
    let cut = std::sync::Arc::new(tokio::sync::Notify::new());
    let mut clients = Vec::new();
    // `c` asks only for LEADER acks: nothing of its own makes its records durable.
    for (name, acks) in [
        ("a", Acks::Durable),
        ("b", Acks::Durable),
        ("c", Acks::Leader),
    ] {
        let mut client = client.clone();
        let acked = std::sync::Arc::clone(&acked);
        let cut = std::sync::Arc::clone(&cut);
        clients.push(tokio::spawn(async move {
            for i in 0..per_client {
                let id = format!("{name}{i}");
                let request = ProduceRequest {
                    topic: "cut".into(),
                    events: vec![event(&id, "k", &[7u8; 2000])],
                    acks: acks as i32,
                    ..Default::default()
                };
                let Ok(response) = client.produce(request).await else {
                    continue;
                };
                if acks != Acks::Durable {
                    continue;
                }
                let offset = response.into_inner().positions[0].offset;
                let mut acked = acked.lock().unwrap();
                acked.push((id, offset));
                if acked.len() == cut_after {
                    cut.notify_one();
                }
            }
        }));
    }
    // A reader follows the partition with Fetch meanwhile: what it sees must never be
    // taken back by the cut (the broker shows only what is fsync'd).
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(u64, String)>::new()));
    let reading = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let reader = tokio::spawn({
        let mut client = client.clone();
        let seen = std::sync::Arc::clone(&seen);
        let reading = std::sync::Arc::clone(&reading);
        async move {
            let mut next = 0;
            let mut poll = tokio::time::interval(Duration::from_millis(1));
            while reading.load(std::sync::atomic::Ordering::Relaxed) {
                poll.tick().await;
                let Ok(fetched) = client
                    .fetch(FetchRequest {
                        topic: "cut".into(),
                        partition: 0,
                        offset: next,
                        max_records: 100,
                        ..Default::default()
                    })
                    .await
                else {
                    continue;
                };
                let mut seen = seen.lock().unwrap();
                for record in fetched.into_inner().records {
                    next = record.offset + 1;
                    seen.push((
                        record.offset,
                        record.event.map(|e| e.id).unwrap_or_default(),
                    ));
                }
            }
        }
    });
    let power = tokio::spawn({
        let dir = harness.dir.path().to_owned();
        async move {
            cut.notified().await;
            faults::power_cut(&dir).unwrap();
        }
    });
    for client in clients {
        client.await.unwrap();
    }
    if !power.is_finished() {
        power.abort();
        faults::power_cut(harness.dir.path()).unwrap();
    }
    reading.store(false, std::sync::atomic::Ordering::Relaxed);
    reader.await.unwrap();
    // The machine is off: the broker's shutdown cannot write either.
    let _ = broker.stop(Duration::from_secs(10)).await;
    faults::heal(harness.dir.path());

    let (addr, broker) = harness.spawn_with(small_segments).await;
    let mut client = connect(addr).await;
    let stored = fetch_all(&mut client, "cut", 0).await;
    for (at, record) in stored.iter().enumerate() {
        assert_eq!(record.offset, at as u64, "offsets run on");
    }
    let id_at = |offset: u64| {
        stored
            .get(offset as usize)
            .and_then(|r| r.event.as_ref())
            .map(|e| e.id.as_str())
    };
    for (offset, id) in seen.lock().unwrap().iter() {
        assert_eq!(
            id_at(*offset),
            Some(id.as_str()),
            "a reader saw {id} at offset {offset}"
        );
    }
    for (id, offset) in acked.lock().unwrap().iter() {
        assert_eq!(
            id_at(*offset),
            Some(id.as_str()),
            "{id} was acknowledged DURABLE at offset {offset}"
        );
    }
    stop(broker).await;
}

/// After a failed fsync a partition shows readers what is durable and nothing more: a
/// reader behind the durable offset still gets it, one past it gets the failure, never a
/// record that may not be on disk.
#[tokio::test]
async fn a_partition_whose_fsync_failed_shows_only_what_is_durable() {
    let Some(harness) = Harness::new(Engine::Embedded).await else {
        return;
    };
    let (addr, broker) = harness.spawn().await;
    let mut client = connect(addr).await;
    create(&mut client, "synced", 1).await.unwrap();
    let produce = |id: &str, acks: Acks| ProduceRequest {
        topic: "synced".into(),
        events: vec![event(id, "k", b"x")],
        acks: acks as i32,
        ..Default::default()
    };
    client
        .produce(produce("durable", Acks::Durable))
        .await
        .unwrap();
    faults::fail_every(harness.dir.path(), Op::Sync, Fault::Eio);
    client
        .produce(produce("in the page cache", Acks::Leader))
        .await
        .unwrap();
    let fetch = |offset| FetchRequest {
        topic: "synced".into(),
        partition: 0,
        offset,
        ..Default::default()
    };
    let past = client.fetch(fetch(1)).await.unwrap_err();
    assert_eq!(past.code(), Code::Internal, "{past:?}");
    let behind = client.fetch(fetch(0)).await.unwrap().into_inner();
    let ids: Vec<String> = behind
        .records
        .into_iter()
        .map(|r| r.event.unwrap().id)
        .collect();
    assert_eq!(ids, ["durable"]);
    faults::heal(harness.dir.path());
    let _ = broker.stop(Duration::from_secs(10)).await;
}

/// The segment files of `partition` of `topic` under a test broker's data directory, in
/// offset order.
fn segment_files(harness: &Harness, topic: &str, partition: u32) -> Vec<std::path::PathBuf> {
    let dir = harness
        .dir
        .path()
        .join("broker/topics")
        .join(topic)
        .join(partition.to_string());
    let mut logs: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    logs.sort();
    logs
}

/// Flips one bit in the middle of `path`.
fn flip_middle(path: &std::path::Path) {
    let mut bytes = std::fs::read(path).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x10;
    std::fs::write(path, bytes).unwrap();
}

/// A flipped bit in the middle of a sealed segment (found by the read-back of sealed
/// segments at start) and one inside the fsync'd part of an active segment (found by
/// recovery) stop those two partitions — every read and write answered DATA_LOSS — while
/// the topic's third partition, and the broker, go on. Neither file is cut.
#[tokio::test]
async fn a_flipped_bit_stops_its_partition_with_data_loss_and_cuts_nothing() {
    let Some(harness) = Harness::new(Engine::Embedded).await else {
        return;
    };
    // Recovery reads back no events for retries (it would find the damage to the first
    // segment): that is left to the read-back of sealed segments.
    let small_segments = |c: &mut runnel_broker::BrokerConfig| {
        c.segment_bytes = 64 * 1024;
        c.dedup_max_events = 0;
    };
    let (addr, broker) = harness.spawn_with(small_segments).await;
    let mut client = connect(addr).await;
    create(&mut client, "flipped", 3).await.unwrap();
    let events = |partition: u32, round: usize| -> Vec<Event> {
        (0..20)
            .map(|i| event(&format!("p{partition}-{round}-{i}"), "k", &[7u8; 1000]))
            .collect()
    };
    for partition in 0..3 {
        for round in 0..40 {
            let request = batches_request(
                "flipped",
                vec![batch(
                    partition,
                    &events(partition, round),
                    Compression::None,
                )],
            );
            client.produce(request).await.unwrap();
        }
    }
    stop(broker).await;

    let sealed = segment_files(&harness, "flipped", 0);
    assert!(sealed.len() > 3, "several segments: {sealed:?}");
    flip_middle(&sealed[0]);
    let active = segment_files(&harness, "flipped", 1);
    flip_middle(active.last().unwrap());
    let sizes = |files: &[std::path::PathBuf]| -> Vec<u64> {
        files
            .iter()
            .map(|f| std::fs::metadata(f).unwrap().len())
            .collect()
    };
    let (sealed_sizes, active_sizes) = (sizes(&sealed), sizes(&active));

    let (addr, broker) = harness.spawn_with(small_segments).await;
    let mut client = connect(addr).await;
    let fetch = |partition: u32, offset: u64| FetchRequest {
        topic: "flipped".into(),
        partition,
        offset,
        ..Default::default()
    };
    let produce = |partition: u32| {
        batches_request(
            "flipped",
            vec![batch(partition, &events(partition, 99), Compression::None)],
        )
    };
    // The active segment's damage is found by recovery: stopped from the start.
    let status = client.fetch(fetch(1, 0)).await.unwrap_err();
    assert_eq!(status.code(), Code::DataLoss, "{status:?}");
    assert!(status.message().contains("damaged"), "{status:?}");
    let status = client.produce(produce(1)).await.unwrap_err();
    assert_eq!(status.code(), Code::DataLoss, "{status:?}");
    // The sealed segment's damage is found by the read-back in the background: then even a
    // read far beyond it, in an intact segment, is refused, and so is a write.
    runnel_testkit::eventually(
        Duration::from_secs(30),
        "the sealed segment's damage to stop partition 0",
        || {
            let mut client = client.clone();
            async move {
                matches!(client.fetch(fetch(0, 790)).await, Err(s) if s.code() == Code::DataLoss)
            }
        },
    )
    .await;
    let status = client.produce(produce(0)).await.unwrap_err();
    assert_eq!(status.code(), Code::DataLoss, "{status:?}");
    // The other partition serves on.
    client.produce(produce(2)).await.unwrap();
    assert_eq!(fetch_all(&mut client, "flipped", 2).await.len(), 820);
    stop(broker).await;
    assert_eq!(sizes(&sealed), sealed_sizes, "nothing cut from partition 0");
    assert_eq!(sizes(&active), active_sizes, "nothing cut from partition 1");
}
