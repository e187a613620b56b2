//! `Ingest`: receipts at each ack level, refusals naming the field.

use crate::{event, start, start_with_broker};
use runnel_proto::v1::{
    AckLevel, DescribeTopicRequest, Event, FetchRequest, IngestRequest, ListTopicsRequest,
};
use tonic::Code;

/// The collector frees its message log's entries once the broker acknowledged them, so
/// the broker must have fsync'd them by then — also on a broker that, left to itself,
/// syncs only every hour: what `STORED` answered is on the broker's disk.
#[tokio::test]
async fn what_the_collector_stored_is_fsynced_by_a_broker_that_syncs_on_an_interval() {
    let mut stack = start_with_broker(
        |broker| {
            broker.fsync = runnel_log::FsyncPolicy::Interval(std::time::Duration::from_secs(3600));
        },
        |_| {},
    )
    .await;
    let events: Vec<Event> = (0..40)
        .map(|i| event(&format!("d-{i}"), &format!("k-{}", i % 8)))
        .collect();
    let receipts = stack
        .collector
        .ingest(IngestRequest {
            events,
            ack_level: AckLevel::Stored as i32,
        })
        .await
        .unwrap()
        .into_inner()
        .receipts;
    assert_eq!(receipts.len(), 40);
    let topic = stack
        .broker
        .describe_topic(DescribeTopicRequest {
            name: "events".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .topic
        .unwrap();
    let stored: u64 = topic.partitions.iter().map(|p| p.end_offset).sum();
    assert_eq!(stored, 40);
    for partition in &topic.partitions {
        assert_eq!(
            partition.durable_offset, partition.end_offset,
            "partition {} acknowledged records the broker had not fsync'd",
            partition.partition
        );
    }
}

#[tokio::test]
async fn receipts_say_where_the_broker_wrote_each_event() {
    let mut stack = start(|c| c.max_batch_events = 100).await;
    let events: Vec<Event> = (0..20)
        .map(|i| event(&format!("e-{i}"), &format!("k-{}", i % 5)))
        .collect();
    let receipts = stack
        .collector
        .ingest(IngestRequest {
            events: events.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .receipts;
    assert_eq!(receipts.len(), 20);
    for (event, receipt) in events.iter().zip(&receipts) {
        assert_eq!(receipt.id, event.id);
        let position = receipt.position.clone().unwrap();
        assert_eq!(position.topic, "events");
        assert_eq!(
            position.partition,
            runnel_proto::partition_for_key(&event.key, 4)
        );
        let stored = stack
            .broker
            .fetch(FetchRequest {
                topic: "events".into(),
                partition: position.partition,
                offset: position.offset,
                max_records: 1,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .records
            .remove(0)
            .event
            .unwrap();
        assert_eq!(stored.id, event.id);
        assert_eq!(stored.payload, event.payload);
        // Stamped with the trace of the call that ingested it.
        let traceparent = &stored.headers["traceparent"];
        assert!(
            traceparent.starts_with("00-") && traceparent.len() == 55,
            "{traceparent}"
        );
    }
}

#[tokio::test]
async fn invalid_batches_are_refused_whole_naming_the_field() {
    let mut stack = start(|c| c.max_batch_events = 3).await;
    let cases: Vec<(Vec<Event>, &str)> = vec![
        (vec![], "events"),
        (
            vec![
                event("a", "k"),
                event("b", "k"),
                event("c", "k"),
                event("d", "k"),
            ],
            "limit is 3",
        ),
        (
            vec![event("a", "k"), event("", "k")],
            "events[1].id is required",
        ),
        (
            vec![event("a", "k"), event("a", "k")],
            "events[1].id \"a\" appears twice",
        ),
    ];
    for (events, needle) in cases {
        let status = stack
            .collector
            .ingest(IngestRequest {
                events,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(
            status.message().contains(needle),
            "{:?} should contain {needle:?}",
            status.message()
        );
    }
    // Nothing reached the broker: it never even created the topic.
    let topics = stack
        .broker
        .list_topics(ListTopicsRequest {})
        .await
        .unwrap()
        .into_inner()
        .topics;
    assert!(topics.is_empty(), "{topics:?}");
}

#[tokio::test]
async fn each_ack_level_answers_when_it_is_reached() {
    let mut stack = start(|_| {}).await;
    for (level, positioned) in [
        (AckLevel::Accepted, false),
        (AckLevel::Logged, false),
        (AckLevel::Stored, true),
    ] {
        let tag = format!("{level:?}");
        let events: Vec<Event> = (0..10)
            .map(|i| event(&format!("{tag}-{i}"), &format!("k-{i}")))
            .collect();
        let response = stack
            .collector
            .ingest(IngestRequest {
                events,
                ack_level: level as i32,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(response.ack_level, level as i32);
        assert_eq!(response.receipts.len(), 10);
        assert!(
            response
                .receipts
                .iter()
                .all(|r| r.position.is_some() == positioned),
            "{tag}: {:?}",
            response.receipts
        );
    }
    // Whatever the level, everything reaches the broker, once.
    let stored = crate::stored_ids(&mut stack.broker, "events", 4, 30).await;
    let mut ids: Vec<String> = stored.into_iter().flatten().collect();
    ids.sort();
    let before = ids.len();
    ids.dedup();
    assert_eq!((before, ids.len()), (30, 30));
}

#[tokio::test]
async fn logged_without_a_message_log_is_refused() {
    let mut stack = start(|c| c.msglog.mode = runnel_msglog::Mode::None).await;
    let status = stack
        .collector
        .ingest(IngestRequest {
            events: vec![event("a", "k")],
            ack_level: AckLevel::Logged as i32,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("mode none"), "{status:?}");
}

/// A log bounded at 64 KiB, with the broker gone: it fills, refuses with
/// RESOURCE_EXHAUSTED (saying why), and what it accepted is still there.
#[tokio::test]
async fn a_full_log_refuses_with_resource_exhausted() {
    let mut stack = start(|c| c.msglog.max_bytes = 64 * 1024).await;
    // The collector learns the topic while the broker is there...
    stack
        .collector
        .ingest(IngestRequest {
            events: vec![event("first", "k")],
            ..Default::default()
        })
        .await
        .unwrap();
    // ...then the broker goes away.
    stack.broker_service.trigger();
    let mut accepted = 0;
    let mut refused = None;
    for i in 0..200 {
        let events: Vec<Event> = (0..10)
            .map(|j| {
                let mut e = event(&format!("f-{i}-{j}"), "k");
                e.payload = vec![b'x'; 500].into();
                e
            })
            .collect();
        let call = stack.collector.ingest(IngestRequest {
            events,
            ack_level: AckLevel::Accepted as i32,
        });
        match call.await {
            Ok(_) => accepted += 1,
            Err(status) => {
                refused = Some(status);
                break;
            }
        }
    }
    let status = refused.expect("the log fills");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("full"), "{status:?}");
    assert!(accepted >= 5, "accepted {accepted} batches before filling");
}

/// One connection, many calls in flight: each is answered on its own, none waits for the
/// others to finish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_connection_keeps_many_calls_in_flight() {
    let stack = start(|_| {}).await;
    let calls = (0..64).map(|i| {
        let mut client = stack.collector.clone();
        async move {
            client
                .ingest(IngestRequest {
                    events: vec![event(&format!("par-{i}"), &format!("k-{i}"))],
                    ack_level: AckLevel::Stored as i32,
                })
                .await
        }
    });
    let answers = futures::future::join_all(calls).await;
    let mut offsets = std::collections::HashSet::new();
    for answer in answers {
        let position = answer.unwrap().into_inner().receipts[0]
            .position
            .clone()
            .unwrap();
        assert!(
            offsets.insert((position.partition, position.offset)),
            "{position:?}"
        );
    }
    assert_eq!(offsets.len(), 64);
}
