//! The collection tier: the edge where clients hand events to Runnel, through five
//! interaction patterns — `Ingest` (request/response), `Track` (request/acknowledge),
//! `Publish` (publish/subscribe), `Send` and UDP (one-way), `Stream` and `Tap` (streams).
//!
//! Every pattern validates events, stamps them with the trace context of the call that
//! brought them, partitions them and hands them to the fault-tolerant message log
//! (`runnel-msglog`), which logs them (RBML, SBML or HML, per `collector.msglog.mode`) and
//! delivers them to the broker as idempotent batches. A caller chooses how far its events
//! must get before it is answered: `ACCEPTED` (in memory), `LOGGED` (durable in the
//! collector's log) or `STORED` (acknowledged by the broker, the default). Whatever was
//! acknowledged survives the collector's crash, a broker outage and a full disk: the log
//! replays it after a restart, the broker recognises what it already has, and a full log
//! refuses new events (`RESOURCE_EXHAUSTED`) instead of losing old ones. See
//! `docs/collector.md`.

pub mod config;
mod error;
mod forward;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
mod intake;
mod oneway;
mod service;
mod stream;
mod tap;
mod topics;
mod track;
mod validate;

pub use config::CollectorConfig;
pub use error::CollectorError;

use runnel_msglog::{LogConfig, MessageLog};
use runnel_proto::v1::broker_client::BrokerClient;
use runnel_proto::v1::collector_server::CollectorServer;
use runnel_proto::v1::store_client::StoreClient;
use runnel_server::{Listeners, Shutdown};
use std::sync::Arc;
use tokio::net::UdpSocket;

/// Runs the collector on `listeners` (and its UDP listener, if configured) until
/// `shutdown` fires, then drains.
pub async fn run(
    config: CollectorConfig,
    listeners: Listeners,
    shutdown: Shutdown,
) -> Result<(), CollectorError> {
    let udp = match config.udp {
        Some(addr) => Some(
            UdpSocket::bind(addr)
                .await
                .map_err(|source| CollectorError::Io {
                    what: format!("bind udp {addr}"),
                    source,
                })?,
        ),
        None => None,
    };
    serve(config, listeners, udp, shutdown).await
}

/// Like [`run`], with the UDP socket (if any) bound by the caller — so that tests and the
/// all-in-one CLI can pass port 0 and learn the port.
pub async fn serve(
    config: CollectorConfig,
    listeners: Listeners,
    udp: Option<UdpSocket>,
    shutdown: Shutdown,
) -> Result<(), CollectorError> {
    // The recorder first, so that what recovery counts is exported.
    runnel_server::admin::metrics_handle();
    // Lazy: the broker and the store may start after us or restart; tonic reconnects. With
    // keepalive, so a connection that died unseen fails instead of hanging.
    // TLS, credentials and trace context as the `connect` settings say.
    let endpoint = |url: &str| runnel_security::connect_lazy(url, &config.server.connect);
    let channel = endpoint(&config.broker).map_err(|source| CollectorError::BrokerUrl {
        url: config.broker.clone(),
        source,
    })?;
    let max_message = config.server.max_message_bytes;
    let broker = BrokerClient::new(channel)
        .max_decoding_message_size(max_message)
        .max_encoding_message_size(max_message);
    let store_channel = endpoint(&config.store).map_err(|source| CollectorError::StoreUrl {
        url: config.store.clone(),
        source,
    })?;
    let store = StoreClient::new(store_channel);

    let log_config = LogConfig {
        mode: config.msglog.mode,
        fsync: config.msglog.fsync,
        shards: config.msglog.shard_count(),
        max_bytes: config.msglog.max_bytes,
        segment_bytes: config.msglog.segment_bytes,
        max_batch_bytes: config.msglog.batch_bytes,
        max_batch_messages: config.msglog.batch_events,
        max_call_bytes: config.msglog.batch_bytes * 2,
        call_timeout: config
            .server
            .request_timeout
            .min(std::time::Duration::from_secs(10)),
    };
    let topics = topics::Topics::open(&config.data_dir, broker.clone(), config.topic_partitions)?;
    let downstream = forward::BrokerDownstream {
        broker: broker.clone(),
    };
    let (log, recovery) = MessageLog::open(log_config, &config.data_dir, downstream)?;
    tracing::info!(
        mode = %config.msglog.mode,
        fsync = %config.msglog.fsync,
        data_dir = %config.data_dir.display(),
        replayed_events = recovery.messages,
        "message log open"
    );
    metrics::counter!("runnel_collector_replayed_events_total").increment(recovery.messages);
    let log = Arc::new(log);
    let intake = Arc::new(intake::Intake::new(
        Arc::clone(&log),
        topics,
        validate::Limits {
            max_batch_events: config.max_batch_events,
            max_payload_bytes: config.max_payload_bytes,
        },
        &config.topic,
        config.auto_create_topics,
        config.msglog.batch_bytes - 64 * 1024,
        config.msglog.batch_events,
    ));
    if let Some(socket) = udp {
        if let Ok(addr) = socket.local_addr() {
            tracing::info!(udp = %addr, "listening for one-way events over udp");
        }
        tokio::spawn(oneway::listen_udp(
            Arc::clone(&intake),
            socket,
            shutdown.clone(),
        ));
    }
    let gauges = Arc::clone(&log);
    let gauge_shutdown = shutdown.clone();
    tokio::spawn(async move {
        gauge_shutdown
            .run_every(std::time::Duration::from_secs(2), || {
                let stats = gauges.stats();
                metrics::gauge!("runnel_collector_log_pending_bytes")
                    .set(stats.pending_bytes as f64);
                metrics::gauge!("runnel_collector_log_disk_bytes").set(stats.disk_bytes as f64);
                metrics::gauge!("runnel_collector_log_segments").set(stats.segments as f64);
                async {}
            })
            .await;
    });

    let service = service::CollectorService {
        intake: Arc::clone(&intake),
        tracker: Arc::new(track::Tracker::new(store, &config.track)),
        taps: Arc::new(tap::Taps::new(broker, config.max_taps)),
        stream_window: config.stream_window,
        shutdown: shutdown.clone(),
    };
    let grace = shutdown.clone();
    let served = runnel_server::serve_grpc!(
        CollectorServer::new(service),
        listeners,
        &config.server,
        shutdown
    )
    .await;
    // Calls have drained: deliver what the log holds while the grace lasts; the rest stays
    // logged for the next start.
    log.close(grace.remaining(config.server.drain_timeout))
        .await;
    served?;
    Ok(())
}
