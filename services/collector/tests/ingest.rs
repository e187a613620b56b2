//! `Ingest` against a real broker, both in-process on ephemeral ports.

use runnel_broker::BrokerConfig;
use runnel_collector::CollectorConfig;
use runnel_proto::Millis;
use runnel_proto::v1::broker_client::BrokerClient;
use runnel_proto::v1::collector_client::CollectorClient;
use runnel_proto::v1::{Event, FetchRequest, IngestRequest, ListTopicsRequest};
use runnel_server::{Listeners, Shutdown, ShutdownTrigger};
use tokio::net::TcpListener;
use tonic::Code;
use tonic::transport::Channel;

struct Stack {
    _dir: tempfile::TempDir,
    collector: CollectorClient<Channel>,
    broker: BrokerClient<Channel>,
    trigger: ShutdownTrigger,
}

async fn listeners() -> Listeners {
    Listeners {
        grpc: TcpListener::bind("127.0.0.1:0").await.unwrap(),
        admin: TcpListener::bind("127.0.0.1:0").await.unwrap(),
        http: None,
    }
}

/// Tracing as the binaries set it up, so that spans carry OpenTelemetry context.
fn telemetry() {
    static INIT: std::sync::Once = std::sync::Once::new();
    INIT.call_once(|| {
        let guard = runnel_telemetry::init("collector-test", runnel_telemetry::LogFormat::Human)
            .expect("telemetry");
        // Kept for the whole test binary; nothing is exported, so nothing needs flushing.
        Box::leak(Box::new(guard));
    });
}

async fn start(max_batch_events: usize) -> Stack {
    telemetry();
    let dir = tempfile::tempdir().unwrap();
    let (trigger, shutdown) = Shutdown::new();
    let broker_listeners = listeners().await;
    let broker_url = format!("http://{}", broker_listeners.grpc.local_addr().unwrap());
    let broker_config = BrokerConfig {
        data_dir: dir.path().to_path_buf(),
        ..BrokerConfig::default()
    };
    tokio::spawn(runnel_broker::run(
        broker_config,
        broker_listeners,
        shutdown.clone(),
    ));
    let collector_listeners = listeners().await;
    let collector_url = format!("http://{}", collector_listeners.grpc.local_addr().unwrap());
    let collector_config = CollectorConfig {
        broker: broker_url.clone(),
        max_batch_events,
        ..CollectorConfig::default()
    };
    tokio::spawn(runnel_collector::run(
        collector_config,
        collector_listeners,
        shutdown,
    ));
    Stack {
        _dir: dir,
        collector: CollectorClient::connect(collector_url).await.unwrap(),
        broker: BrokerClient::connect(broker_url).await.unwrap(),
        trigger,
    }
}

fn event(id: &str, key: &str) -> Event {
    Event {
        id: id.into(),
        key: key.into(),
        payload: br#"{"value": 1}"#.to_vec().into(),
        event_time: Some(Millis(1_714_564_805_000).into()),
        ..Default::default()
    }
}

#[tokio::test]
async fn receipts_say_where_the_broker_wrote_each_event() {
    let mut stack = start(100).await;
    let events: Vec<Event> = (0..20)
        .map(|i| event(&format!("e-{i}"), &format!("k-{}", i % 5)))
        .collect();
    let receipts = stack
        .collector
        .ingest(IngestRequest {
            events: events.clone(),
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
    stack.trigger.trigger();
}

#[tokio::test]
async fn invalid_batches_are_refused_whole_naming_the_field() {
    let mut stack = start(3).await;
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
            .ingest(IngestRequest { events })
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
    stack.trigger.trigger();
}
