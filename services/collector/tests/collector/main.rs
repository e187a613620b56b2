//! The collector against a real broker (and, for `Track`, a real store), all in-process on
//! ephemeral ports: every interaction pattern, its ack levels and its limits.

mod ingest;
mod patterns;

use runnel_broker::BrokerConfig;
use runnel_collector::CollectorConfig;
use runnel_proto::Millis;
use runnel_proto::v1::broker_client::BrokerClient;
use runnel_proto::v1::collector_client::CollectorClient;
use runnel_proto::v1::store_client::StoreClient;
use runnel_proto::v1::{Event, FetchRequest};
use runnel_store::StoreConfig;
use runnel_testkit::{Services, eventually};
use std::net::SocketAddr;
use tokio::net::UdpSocket;
use tonic::transport::Channel;

pub(crate) struct Stack {
    _dir: tempfile::TempDir,
    pub(crate) collector: CollectorClient<Channel>,
    /// Where the collector's gRPC API listens, for clients with credentials of their own.
    pub(crate) collector_addr: SocketAddr,
    pub(crate) broker: BrokerClient<runnel_client::Peer>,
    pub(crate) store: StoreClient<Channel>,
    pub(crate) udp: SocketAddr,
    /// The store and the collector; stopped when the stack is dropped.
    _services: Services,
    /// The broker, apart: a test may stop it alone.
    pub(crate) broker_service: Services,
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

/// A broker, a store and a collector configured by `configure`.
pub(crate) async fn start(configure: impl FnOnce(&mut CollectorConfig)) -> Stack {
    start_with_broker(|_| {}, configure).await
}

/// [`start`], with the broker configured by `configure_broker` too.
pub(crate) async fn start_with_broker(
    configure_broker: impl FnOnce(&mut BrokerConfig),
    configure: impl FnOnce(&mut CollectorConfig),
) -> Stack {
    telemetry();
    let dir = tempfile::tempdir().unwrap();
    let mut broker_config = BrokerConfig {
        data_dir: dir.path().join("broker"),
        ..BrokerConfig::default()
    };
    configure_broker(&mut broker_config);
    let mut broker_service = Services::new();
    let broker = broker_service
        .start_on_loopback("broker", runnel_broker::run, broker_config)
        .await;
    let broker_url = format!("http://{}", broker.grpc);
    let store_config = StoreConfig {
        data_dir: dir.path().join("store"),
        ..StoreConfig::default()
    };
    let mut services = Services::new();
    let store = services
        .start_on_loopback("store", runnel_store::run, store_config)
        .await;
    let store_url = format!("http://{}", store.grpc);
    let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let udp_addr = udp.local_addr().unwrap();
    let mut config = CollectorConfig {
        broker: broker_url.clone(),
        store: store_url.clone(),
        data_dir: dir.path().join("collector"),
        udp: None,
        ..CollectorConfig::default()
    };
    config.msglog.shards = 2;
    configure(&mut config);
    let collector = services
        .start_on_loopback(
            "collector",
            |config, listeners, shutdown| {
                runnel_collector::serve(config, listeners, Some(udp), shutdown)
            },
            config,
        )
        .await;
    let collector_url = format!("http://{}", collector.grpc);
    Stack {
        _dir: dir,
        collector: CollectorClient::connect(collector_url).await.unwrap(),
        collector_addr: collector.grpc,
        broker: BrokerClient::new(
            runnel_client::connect(&broker_url, &Default::default(), None)
                .await
                .unwrap(),
        ),
        store: StoreClient::connect(store_url).await.unwrap(),
        udp: udp_addr,
        _services: services,
        broker_service,
    }
}

pub(crate) fn event(id: &str, key: &str) -> Event {
    Event {
        id: id.into(),
        key: key.into(),
        payload: br#"{"value": 1}"#.to_vec().into(),
        event_time: Some(Millis(1_714_564_805_000).into()),
        ..Default::default()
    }
}

/// Every event id the broker holds in `topic`, per partition in offset order, waiting
/// until there are `expected` in all.
pub(crate) async fn stored_ids(
    broker: &mut BrokerClient<runnel_client::Peer>,
    topic: &str,
    partitions: u32,
    expected: usize,
) -> Vec<Vec<String>> {
    let what = format!("{expected} events in {topic}");
    eventually(std::time::Duration::from_secs(30), &what, || async {
        let mut broker = broker.clone();
        let mut all = Vec::new();
        for partition in 0..partitions {
            let mut ids = Vec::new();
            let mut offset = 0;
            loop {
                let page = match broker
                    .fetch(FetchRequest {
                        topic: topic.into(),
                        partition,
                        offset,
                        max_records: 5000,
                        ..Default::default()
                    })
                    .await
                {
                    Ok(page) => page.into_inner(),
                    Err(_) => break,
                };
                if page.records.is_empty() {
                    break;
                }
                offset = page.next_offset;
                ids.extend(page.records.into_iter().map(|r| r.event.unwrap().id));
            }
            all.push(ids);
        }
        let total: usize = all.iter().map(Vec::len).sum();
        (total >= expected).then_some(all)
    })
    .await
}
