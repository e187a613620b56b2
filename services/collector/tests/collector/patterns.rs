//! The other four patterns: `Publish`, `Send` and UDP, `Stream`, `Tap`, and `Track`'s
//! read path against a real store.

use crate::{event, start, stored_ids};
use prost::Message;
use runnel_client::{ConsumerOptions, GroupConsumer, GroupEvent};
use runnel_proto::Millis;
use runnel_proto::v1::{
    AckLevel, CreateTopicRequest, Event, IngestRequest, PublishRequest, PutRequest, QueryResult,
    SendRequest, StreamRequest, TapFilter, TapRequest, TrackRequest,
};
use std::collections::HashMap;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

const WAIT: Duration = Duration::from_secs(30);

/// Reads group events until `want` records arrived.
async fn read_records(consumer: &mut GroupConsumer, want: usize) -> Vec<String> {
    let mut ids = Vec::new();
    while ids.len() < want {
        match tokio::time::timeout(WAIT, consumer.next()).await {
            Ok(Ok(Some(GroupEvent::Records { records, .. }))) => {
                ids.extend(records.into_iter().map(|r| r.event.unwrap().id))
            }
            Ok(Ok(Some(GroupEvent::Assigned { .. }))) => {}
            other => panic!("{other:?} with {} of {want} records", ids.len()),
        }
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_works_without_a_subscriber_and_a_subscriber_without_a_publisher() {
    let mut stack = start(|_| {}).await;
    // A producer with no subscriber: the topic is created on demand and keeps the events.
    let events: Vec<Event> = (0..5)
        .map(|i| event(&format!("o-{i}"), "order-1"))
        .collect();
    let receipts = stack
        .collector
        .publish(PublishRequest {
            topic: "orders".into(),
            events,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .receipts;
    assert!(
        receipts
            .iter()
            .all(|r| r.position.as_ref().unwrap().topic == "orders")
    );
    let mut late = GroupConsumer::join(
        stack.broker.clone(),
        "billing",
        "orders",
        ConsumerOptions::default(),
    )
    .await
    .unwrap();
    assert_eq!(read_records(&mut late, 5).await.len(), 5);

    // A subscriber with no producer: it waits, and gets what is published later.
    stack
        .broker
        .create_topic(CreateTopicRequest {
            name: "alerts".into(),
            partitions: 2,
            retention: None,
        })
        .await
        .unwrap();
    let mut early = GroupConsumer::join(
        stack.broker.clone(),
        "pager",
        "alerts",
        ConsumerOptions::default(),
    )
    .await
    .unwrap();
    match tokio::time::timeout(WAIT, early.next()).await {
        Ok(Ok(Some(GroupEvent::Assigned { partitions, .. }))) => assert_eq!(partitions.len(), 2),
        other => panic!("{other:?}"),
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(300), early.next())
            .await
            .is_err(),
        "nothing to read yet"
    );
    stack
        .collector
        .publish(PublishRequest {
            topic: "alerts".into(),
            events: vec![event("a-1", "disk"), event("a-2", "cpu")],
            ack_level: AckLevel::Logged as i32,
        })
        .await
        .unwrap();
    let mut ids = read_records(&mut early, 2).await;
    ids.sort();
    assert_eq!(ids, ["a-1", "a-2"]);
}

#[tokio::test]
async fn publish_to_a_missing_topic_is_refused_when_creation_is_off() {
    let mut stack = start(|c| c.auto_create_topics = false).await;
    let status = stack
        .collector
        .publish(PublishRequest {
            topic: "nowhere".into(),
            events: vec![event("x", "k")],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert!(
        status.message().contains("auto_create_topics"),
        "{status:?}"
    );
    let status = stack
        .collector
        .publish(PublishRequest {
            topic: "bad name".into(),
            events: vec![event("x", "k")],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_counts_what_it_took_and_what_it_refused() {
    let mut stack = start(|_| {}).await;
    let mut messages: Vec<SendRequest> = (0..20)
        .map(|i| SendRequest {
            events: vec![event(&format!("hr-{i}"), &format!("athlete-{}", i % 3))],
        })
        .collect();
    messages.push(SendRequest {
        events: vec![event("", "athlete-1")],
    });
    let response = stack
        .collector
        .send(tokio_stream::iter(messages))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (response.accepted, response.invalid, response.dropped),
        (20, 1, 0)
    );
    assert!(
        response.first_invalid.contains("id is required"),
        "{response:?}"
    );
    let stored = stored_ids(&mut stack.broker, "events", 4, 20).await;
    assert_eq!(stored.iter().map(Vec::len).sum::<usize>(), 20);
}

/// With the broker gone and a small log, `Send` sheds instead of waiting, and counts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_sheds_load_instead_of_slowing_the_sender() {
    let mut stack = start(|c| c.msglog.max_bytes = 64 * 1024).await;
    stack
        .collector
        .ingest(IngestRequest {
            events: vec![event("learn", "k")],
            ..Default::default()
        })
        .await
        .unwrap();
    stack.broker_service.trigger();
    let messages: Vec<SendRequest> = (0..500)
        .map(|i| {
            let mut e = event(&format!("s-{i}"), "sensor");
            e.payload = vec![b'x'; 400].into();
            SendRequest { events: vec![e] }
        })
        .collect();
    let response = tokio::time::timeout(WAIT, stack.collector.send(tokio_stream::iter(messages)))
        .await
        .expect("answered without waiting for the broker")
        .unwrap()
        .into_inner();
    assert_eq!(response.accepted + response.dropped, 500, "{response:?}");
    assert!(
        response.dropped > 0 && response.accepted > 0,
        "{response:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_datagrams_of_json_or_protobuf_reach_the_broker() {
    let mut stack = start(|_| {}).await;
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for i in 0..10 {
        let json = format!(
            r#"{{"id":"u-json-{i}","key":"athlete-{i}","type":"heart_rate","payload":{{"bpm":{}}}}}"#,
            120 + i
        );
        socket.send_to(json.as_bytes(), stack.udp).await.unwrap();
        let proto = event(&format!("u-proto-{i}"), "athlete-x").encode_to_vec();
        socket.send_to(&proto, stack.udp).await.unwrap();
    }
    socket.send_to(b"{broken", stack.udp).await.unwrap();
    let stored = stored_ids(&mut stack.broker, "events", 4, 20).await;
    let mut ids: Vec<String> = stored.into_iter().flatten().collect();
    ids.sort();
    let mut expected: Vec<String> = (0..10)
        .flat_map(|i| [format!("u-json-{i}"), format!("u-proto-{i}")])
        .collect();
    expected.sort();
    assert_eq!(ids, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_acknowledges_cumulatively_within_its_window() {
    let mut stack = start(|c| c.stream_window = 4).await;
    let (requests, receiver) = mpsc::channel(16);
    let mut responses = stack
        .collector
        .stream(ReceiverStream::new(receiver))
        .await
        .unwrap()
        .into_inner();
    let first = responses.message().await.unwrap().unwrap();
    assert_eq!((first.acknowledged, first.window), (0, 4));
    let batches = 50u64;
    let mut sent = 0u64;
    let mut acknowledged = 0u64;
    while acknowledged < batches {
        while sent < batches && sent < acknowledged + u64::from(first.window) {
            sent += 1;
            let events = (0..10)
                .map(|i| event(&format!("b{sent}-{i}"), &format!("k-{i}")))
                .collect();
            let level = [AckLevel::Accepted, AckLevel::Logged, AckLevel::Stored][sent as usize % 3];
            requests
                .send(StreamRequest {
                    sequence: sent,
                    events,
                    ack_level: level as i32,
                })
                .await
                .unwrap();
        }
        let ack = tokio::time::timeout(WAIT, responses.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(
            ack.acknowledged >= acknowledged && ack.acknowledged <= sent,
            "{ack:?}"
        );
        acknowledged = ack.acknowledged;
    }
    // A batch out of sequence ends the stream, after a last acknowledgement.
    requests
        .send(StreamRequest {
            sequence: batches + 5,
            events: vec![event("late", "k")],
            ..Default::default()
        })
        .await
        .unwrap();
    let last = responses.message().await.unwrap().unwrap();
    assert_eq!(last.acknowledged, batches);
    let status = responses.message().await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("expected 51"), "{status:?}");
    let stored = stored_ids(&mut stack.broker, "events", 4, 500).await;
    assert_eq!(stored.iter().map(Vec::len).sum::<usize>(), 500);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tap_streams_live_events_through_its_filter() {
    let mut stack = start(|_| {}).await;
    // The topic exists before the tap, with an event the tap must not see (it is older).
    stack
        .collector
        .ingest(IngestRequest {
            events: vec![event("before", "tap-1")],
            ..Default::default()
        })
        .await
        .unwrap();
    let mut tap = stack
        .collector
        .tap(TapRequest {
            topic: String::new(),
            filter: Some(TapFilter {
                key_prefix: "tap-".into(),
                r#type: "click".into(),
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner();
    let events: Vec<Event> = (0..12)
        .map(|i| {
            let mut e = event(
                &format!("t-{i}"),
                if i % 2 == 0 { "tap-a" } else { "other" },
            );
            e.r#type = if i % 3 == 0 { "view" } else { "click" }.into();
            e
        })
        .collect();
    let wanted: Vec<String> = events
        .iter()
        .filter(|e| e.key.starts_with("tap-") && e.r#type == "click")
        .map(|e| e.id.clone())
        .collect();
    stack
        .collector
        .ingest(IngestRequest {
            events,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut seen = Vec::new();
    while seen.len() < wanted.len() {
        let tapped = tokio::time::timeout(WAIT, tap.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let position = tapped.position.unwrap();
        assert_eq!(position.topic, "events");
        seen.push(tapped.event.unwrap().id);
    }
    assert_eq!(seen, wanted, "same key, so one partition, so in order");
    let status = stack
        .collector
        .tap(TapRequest {
            topic: "missing".into(),
            filter: None,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
}

fn result(token: &str, window_start_ms: i64, score: f64) -> QueryResult {
    QueryResult {
        query: "purchase_propensity".into(),
        key: token.into(),
        window_start: Some(Millis(window_start_ms).into()),
        window_end: Some(Millis(window_start_ms + 60_000).into()),
        values: HashMap::from([("score".to_owned(), score)]),
        emitted_at: Some(runnel_proto::now_millis().into()),
        headers: HashMap::new(),
        ..QueryResult::default()
    }
}

/// `Track` issues a token, collects the token's events into the default topic keyed by
/// it, and answers with the latest score the store holds for it — changing as the store's
/// result does (after the cache's time to live).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn track_issues_a_token_and_answers_with_its_latest_score() {
    let mut stack = start(|c| c.track.cache_ttl = Duration::from_millis(50)).await;
    let first = stack
        .collector
        .track(TrackRequest {
            r#type: "click".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(first.token.starts_with("tk-"), "{first:?}");
    assert_eq!(first.score, None);
    let token = first.token.clone();

    let track = |kind: &str| TrackRequest {
        token: token.clone(),
        r#type: kind.into(),
        ack_level: AckLevel::Logged as i32,
        ..Default::default()
    };
    let unscored = stack
        .collector
        .track(track("click"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (unscored.token.as_str(), unscored.score),
        (token.as_str(), None)
    );

    stack
        .store
        .put(PutRequest {
            results: vec![result(&token, 1_700_000_000_000, 0.2)],
            fence: None,
        })
        .await
        .unwrap();
    // The unscored answer above is cached for the time to live: let it pass.
    tokio::time::sleep(Duration::from_millis(60)).await;
    let mut scores = Vec::new();
    for kind in ["cart", "purchase", "cart"] {
        let answer = stack
            .collector
            .track(track(kind))
            .await
            .unwrap()
            .into_inner();
        scores.push(answer.score);
        if kind == "purchase" {
            stack
                .store
                .put(PutRequest {
                    results: vec![result(&token, 1_700_000_060_000, 0.7)],
                    fence: None,
                })
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(60)).await;
        }
    }
    assert_eq!(scores, [Some(0.2), Some(0.2), Some(0.7)]);

    let status = stack.collector.track(track("refund")).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let status = stack
        .collector
        .track(TrackRequest {
            token: "not a token".into(),
            r#type: "click".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);

    // The events went to the default topic, keyed by the token.
    let partition = runnel_proto::partition_for_key(&token, 4) as usize;
    let stored = stored_ids(&mut stack.broker, "events", 4, 5).await;
    assert_eq!(stored[partition].len(), 5, "{stored:?}");
}

/// With authentication on, a `Track` token is bound to the caller it was issued to: its
/// owner goes on with it, while another caller who learnt it can neither read its score nor
/// add events to it (`PERMISSION_DENIED`), and gets tokens of its own.
#[tokio::test]
async fn track_tokens_are_bound_to_the_caller_they_were_issued_to() {
    use runnel_security::auth::token_sha256;
    use runnel_security::{Action, AuthConfig, ConnectConfig, GrantConfig, TokenConfig};
    let token = |principal: &str, secret: &str| TokenConfig {
        principal: principal.into(),
        sha256: token_sha256(secret),
    };
    let stack = start(|c| {
        c.server.auth = AuthConfig {
            enabled: true,
            tokens: vec![token("alice", "rnl_alice"), token("mallory", "rnl_mallory")],
            grants: vec![GrantConfig {
                principal: "*".into(),
                allow: vec![Action::Produce],
                topics: vec!["*".into()],
                queries: vec![],
                groups: vec![],
            }],
            ..AuthConfig::default()
        };
    })
    .await;
    let url = format!("http://{}", stack.collector_addr);
    let as_caller = |secret: &'static str| {
        let url = url.clone();
        async move {
            let peer = runnel_security::connect(&url, &ConnectConfig::default(), Some(secret))
                .await
                .unwrap();
            runnel_proto::v1::collector_client::CollectorClient::new(peer)
        }
    };
    let (mut alice, mut mallory) = (as_caller("rnl_alice").await, as_caller("rnl_mallory").await);
    let track = |token: &str| TrackRequest {
        token: token.into(),
        r#type: "click".into(),
        ..Default::default()
    };
    let issued = alice.track(track("")).await.unwrap().into_inner().token;
    let again = alice.track(track(&issued)).await.unwrap().into_inner();
    assert_eq!(again.token, issued, "its owner goes on with it");
    let stolen = mallory.track(track(&issued)).await.unwrap_err();
    assert_eq!(stolen.code(), tonic::Code::PermissionDenied, "{stolen:?}");
    // Nor does a token issued without authentication (no owner) pass.
    let unbound = format!("tk-{:032x}", 7u128);
    let refused = alice.track(track(&unbound)).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    let own = mallory.track(track("")).await.unwrap().into_inner().token;
    assert_ne!(own, issued);
    mallory.track(track(&own)).await.unwrap();
}
