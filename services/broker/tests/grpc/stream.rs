//! `ProduceStream`: requests pipelined on one stream, stored in order and answered with
//! cumulative acks; a failed request ends the stream after everything before it is stored.

use crate::{Client, Engine, Harness, connect, create, event, fetch_all, stop};
use runnel_proto::records;
use runnel_proto::v1::{
    Acks, Event, ProduceRequest, ProduceStreamRequest, ProduceStreamResponse, RecordBatch,
};
use std::collections::BTreeMap;
use tonic::Code;

/// Sends `requests` on one stream as fast as flow control lets them go, and collects every
/// answer until the stream ends, with the status it ended with.
async fn pipeline(
    client: &mut Client,
    requests: Vec<ProduceStreamRequest>,
) -> (Vec<ProduceStreamResponse>, Result<(), tonic::Status>) {
    let mut answers = client
        .produce_stream(tokio_stream::iter(requests))
        .await
        .unwrap()
        .into_inner();
    let mut received = Vec::new();
    loop {
        match answers.message().await {
            Ok(Some(answer)) => received.push(answer),
            Ok(None) => return (received, Ok(())),
            Err(status) => return (received, Err(status)),
        }
    }
}

/// Checks that `answers` are cumulative acks covering exactly `sequences`, in order, each
/// once, and returns the per-request answers by sequence.
fn covered(
    answers: &[ProduceStreamResponse],
    sequences: &[u64],
) -> BTreeMap<u64, runnel_proto::v1::ProduceResponse> {
    let mut seen = Vec::new();
    let mut by_sequence = BTreeMap::new();
    let mut last = None;
    for answer in answers {
        assert!(!answer.answers.is_empty(), "an ack that covers nothing");
        assert_eq!(
            answer.acknowledged,
            answer.answers.last().unwrap().sequence,
            "an ack covers up to its last answer"
        );
        assert!(last < Some(answer.acknowledged), "acks move forward");
        last = Some(answer.acknowledged);
        for one in &answer.answers {
            seen.push(one.sequence);
            by_sequence.insert(one.sequence, one.response.clone().unwrap());
        }
    }
    assert_eq!(seen, sequences, "every request answered once, in order");
    by_sequence
}

/// One single-record request: an event for an explicit partition or a pre-encoded batch of
/// one record, alternately, over two topics.
fn single(i: usize, id: &str) -> (ProduceRequest, &'static str, u32) {
    let (topic, partition) = if i % 5 == 4 {
        ("side", (i % 2) as u32)
    } else {
        ("pipe", (i % 3) as u32)
    };
    let acks = if i.is_multiple_of(7) {
        Acks::Durable
    } else {
        Acks::Leader
    } as i32;
    let one = event(id, "", b"x");
    let request = if i.is_multiple_of(2) {
        ProduceRequest {
            topic: topic.into(),
            events: vec![one],
            partition: Some(partition),
            acks,
            ..ProduceRequest::default()
        }
    } else {
        ProduceRequest {
            topic: topic.into(),
            batches: vec![RecordBatch {
                partition,
                record_count: 1,
                records: records::encode(&[one]),
                ..RecordBatch::default()
            }],
            acks,
            ..ProduceRequest::default()
        }
    };
    (request, topic, partition)
}

/// Where an answer says a single-record request's record is.
fn placed(response: &runnel_proto::v1::ProduceResponse) -> (u32, u64) {
    match (
        response.positions.as_slice(),
        response.batch_acks.as_slice(),
    ) {
        ([position], []) => (position.partition, position.offset),
        ([], [ack]) => (
            ack.partition,
            ack.offsets.first().copied().unwrap_or(ack.base_offset),
        ),
        other => panic!("not a single record's answer: {other:?}"),
    }
}

both_engines!(thousands_of_single_records_on_one_stream_arrive_once_in_order_with_cumulative_acks);
async fn thousands_of_single_records_on_one_stream_arrive_once_in_order_with_cumulative_acks(
    engine: Engine,
) {
    let Some(harness) = Harness::new(engine).await else {
        return;
    };
    let (addr, broker) = harness.spawn().await;
    let mut client = connect(addr).await;
    create(&mut client, "pipe", 3).await.unwrap();
    create(&mut client, "side", 2).await.unwrap();

    const COUNT: usize = 3000;
    let mut requests = Vec::with_capacity(COUNT);
    let mut sequences = Vec::with_capacity(COUNT);
    let mut sent: BTreeMap<(&str, u32), Vec<String>> = BTreeMap::new();
    let mut expected = BTreeMap::new();
    for i in 0..COUNT {
        let id = format!("s-{i}");
        let (request, topic, partition) = single(i, &id);
        // Gaps are allowed: answers name requests by the client's sequence.
        let sequence = 10 + 3 * i as u64;
        requests.push(ProduceStreamRequest {
            sequence,
            request: Some(request),
        });
        sequences.push(sequence);
        sent.entry((topic, partition)).or_default().push(id.clone());
        expected.insert(sequence, (topic, partition, id));
    }
    let (answers, ended) = pipeline(&mut client, requests).await;
    ended.unwrap();
    let by_sequence = covered(&answers, &sequences);

    let mut stored: BTreeMap<(&str, u32), Vec<String>> = BTreeMap::new();
    for (topic, partitions) in [("pipe", 3), ("side", 2)] {
        for partition in 0..partitions {
            let records = fetch_all(&mut client, topic, partition).await;
            for (offset, record) in records.iter().enumerate() {
                assert_eq!(record.offset, offset as u64);
            }
            let ids = records.into_iter().map(|r| r.event.unwrap().id).collect();
            stored.insert((topic, partition), ids);
        }
    }
    assert_eq!(
        stored, sent,
        "each record once, in send order per partition"
    );
    for (sequence, response) in &by_sequence {
        let (topic, partition, id) = &expected[sequence];
        let (answered_partition, offset) = placed(response);
        assert_eq!(answered_partition, *partition, "request {sequence}");
        assert_eq!(
            &stored[&(*topic, *partition)][offset as usize],
            id,
            "request {sequence}'s answer points at its record"
        );
    }
    stop(broker).await;
}

both_engines!(an_invalid_request_mid_stream_ends_it_after_the_earlier_ones_are_stored);
async fn an_invalid_request_mid_stream_ends_it_after_the_earlier_ones_are_stored(engine: Engine) {
    let Some(harness) = Harness::new(engine).await else {
        return;
    };
    let (addr, broker) = harness.spawn().await;
    let mut client = connect(addr).await;
    create(&mut client, "pipe", 1).await.unwrap();

    let request = |sequence: u64, event: Event| ProduceStreamRequest {
        sequence,
        request: Some(ProduceRequest {
            topic: "pipe".into(),
            events: vec![event],
            ..ProduceRequest::default()
        }),
    };
    let mut requests: Vec<ProduceStreamRequest> = (0..20)
        .map(|i| request(i, event(&format!("ok-{i}"), "", b"x")))
        .collect();
    // An event without an id is refused, as `Produce` refuses it.
    requests.push(request(20, event("", "", b"x")));
    requests.extend((21..30).map(|i| request(i, event(&format!("late-{i}"), "", b"x"))));
    let (answers, ended) = pipeline(&mut client, requests).await;
    let status = ended.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().starts_with("request 20: "), "{status:?}");
    covered(&answers, &(0..20).collect::<Vec<_>>());
    let ids: Vec<String> = fetch_all(&mut client, "pipe", 0)
        .await
        .into_iter()
        .map(|r| r.event.unwrap().id)
        .collect();
    let acknowledged: Vec<String> = (0..20).map(|i| format!("ok-{i}")).collect();
    assert_eq!(
        ids, acknowledged,
        "what was acknowledged, and nothing after"
    );

    // A sequence that does not increase is refused too, after its predecessor is stored.
    let (answers, ended) = pipeline(
        &mut client,
        vec![
            request(5, event("again-5", "", b"x")),
            request(5, event("again-5b", "", b"x")),
        ],
    )
    .await;
    let status = ended.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().starts_with("request 5: sequence 5"),
        "{status:?}"
    );
    covered(&answers, &[5]);
    assert_eq!(fetch_all(&mut client, "pipe", 0).await.len(), 21);
    stop(broker).await;
}

both_engines!(a_request_larger_than_a_message_ends_the_stream_with_an_error_after_the_earlier_ones);
async fn a_request_larger_than_a_message_ends_the_stream_with_an_error_after_the_earlier_ones(
    engine: Engine,
) {
    let Some(harness) = Harness::new(engine).await else {
        return;
    };
    let (addr, broker) = harness
        .spawn_with(|config| config.server.max_message_bytes = 64 * 1024)
        .await;
    let mut client = connect(addr).await;
    create(&mut client, "pipe", 1).await.unwrap();
    let request = |sequence: u64, payload: &[u8]| ProduceStreamRequest {
        sequence,
        request: Some(ProduceRequest {
            topic: "pipe".into(),
            events: vec![event(&format!("e-{sequence}"), "", payload)],
            ..ProduceRequest::default()
        }),
    };
    let (answers, ended) = pipeline(
        &mut client,
        vec![
            request(1, b"small"),
            request(2, b"small"),
            request(3, &vec![b'x'; 100 * 1024]),
            request(4, b"small"),
        ],
    )
    .await;
    let status = ended.expect_err("a stream cut short does not end as if all was answered");
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    covered(&answers, &[1, 2]);
    let ids: Vec<String> = fetch_all(&mut client, "pipe", 0)
        .await
        .into_iter()
        .map(|r| r.event.unwrap().id)
        .collect();
    assert_eq!(ids, ["e-1", "e-2"]);
    stop(broker).await;
}
