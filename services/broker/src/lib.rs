//! The message queue tier: durable, partitioned topics on local disk.
//!
//! A topic has a fixed number of partitions; each partition is an append-only log of
//! records numbered by offset from 0. Producers append batches of events (a keyed event
//! always goes to the partition its key hashes to, see [`partition_for_key`], so one key's
//! events keep their order); consumers read a partition from any offset with `Fetch`, or
//! follow it live with `Subscribe`. Nothing is acknowledged before it is written as the
//! fsync policy says, and an acknowledged offset is never reused, across crashes
//! included: recovery cuts off only a torn tail that was never acknowledged.
//!
//! [`run`] is the whole service, runnable in-process (tests, the all-in-one CLI) as well as
//! from the `runnel-broker` binary.

pub mod config;
mod error;
mod partition;
mod partitioner;
mod service;
mod topic;
mod topics;

pub use config::BrokerConfig;
pub use error::BrokerError;
pub use partitioner::partition_for_key;

use runnel_log::FsyncPolicy;
use runnel_proto::v1::broker_server::BrokerServer;
use runnel_server::{Listeners, ServiceConfig, Shutdown};
use std::sync::Arc;
use std::time::Duration;
use topics::Topics;

/// Runs the broker on `listeners` until `shutdown` fires: recovers every topic under
/// `config.data_dir`, serves, drains, and syncs every partition before returning.
pub async fn run(
    config: BrokerConfig,
    listeners: Listeners,
    shutdown: Shutdown,
) -> Result<(), BrokerError> {
    config.validate()?;
    let data_dir = config.data_dir.clone();
    let policy = config.fsync;
    let topics =
        Arc::new(tokio::task::spawn_blocking(move || Topics::open(&data_dir, policy)).await??);

    let syncer = match config.fsync {
        FsyncPolicy::Interval(every) => Some(tokio::spawn(sync_periodically(
            Arc::clone(&topics),
            every,
            shutdown.clone(),
        ))),
        _ => None,
    };

    let service = service::BrokerService::new(Arc::clone(&topics), &config, shutdown.clone());
    let max_message = config.server.max_message_bytes;
    let grpc = BrokerServer::new(service)
        .max_decoding_message_size(max_message)
        .max_encoding_message_size(max_message);
    let served = runnel_server::serve(
        runnel_proto::service_name::BROKER,
        tonic::service::Routes::new(grpc),
        listeners.grpc,
        listeners.admin,
        &config.server,
        shutdown.clone(),
    )
    .await;

    // Shutdown has stopped it already unless `serve` failed; the final sync below covers
    // anything it did not get to.
    if let Some(syncer) = syncer {
        syncer.abort();
    }
    // Whatever the policy, a clean stop leaves everything acknowledged on disk.
    let synced = tokio::task::spawn_blocking(move || topics.sync_all()).await;
    served?;
    synced??;
    tracing::info!("broker stopped; every partition synced");
    Ok(())
}

/// Syncs every partition whose interval has elapsed, every `every`, until shutdown.
async fn sync_periodically(topics: Arc<Topics>, every: Duration, shutdown: Shutdown) {
    shutdown
        .run_every(every, || {
            let topics = Arc::clone(&topics);
            async move {
                // Errors are logged where they happen; the next tick tries again.
                if let Err(error) = tokio::task::spawn_blocking(move || topics.sync_due()).await {
                    tracing::error!(%error, "periodic fsync task failed");
                }
            }
        })
        .await;
}
