//! The storage tier: every query result durable on local disk, the latest per key in
//! memory.
//!
//! `Put` appends results to the result log (CRC32C-framed, fsync'd per policy) before it
//! answers, so an acknowledged result survives `kill -9`; writing a result again replaces
//! it. `Get` serves the latest result per `(query, key)` from memory, `Range` reads a
//! key's history by window start, and `Watch` streams results as they become durable.
//!
//! [`run`] is the whole service, runnable in-process (tests, the all-in-one CLI) as well as
//! from the `runnel-store` binary.

pub mod config;
mod error;
mod results;
mod service;

pub use config::StoreConfig;
pub use error::StoreError;

use results::ResultLog;
use runnel_log::FsyncPolicy;
use runnel_proto::v1::store_server::StoreServer;
use runnel_server::{Listeners, ServiceConfig, Shutdown};
use std::sync::{Arc, RwLock};

/// Runs the store on `listeners` until `shutdown` fires: recovers the result log, serves,
/// drains, and syncs the log before returning.
pub async fn run(
    config: StoreConfig,
    listeners: Listeners,
    shutdown: Shutdown,
) -> Result<(), StoreError> {
    config.validate()?;
    let (data_dir, policy) = (config.data_dir.clone(), config.fsync);
    let log = tokio::task::spawn_blocking(move || ResultLog::open(&data_dir, policy)).await??;
    let log = Arc::new(RwLock::new(log));

    let syncer = match config.fsync {
        FsyncPolicy::Interval(every) => {
            let (log, shutdown) = (Arc::clone(&log), shutdown.clone());
            Some(tokio::spawn(async move {
                shutdown
                    .run_every(every, || {
                        let log = Arc::clone(&log);
                        async move {
                            let synced = tokio::task::spawn_blocking(move || match log.write() {
                                Ok(mut log) => log.sync_if_due(),
                                Err(_) => Err(StoreError::Failed),
                            })
                            .await;
                            if let Ok(Err(error)) = synced {
                                tracing::error!(%error, "periodic fsync failed");
                            }
                        }
                    })
                    .await;
            }))
        }
        FsyncPolicy::Always | FsyncPolicy::Never => None,
    };

    let service = service::StoreService::new(Arc::clone(&log), &config, shutdown.clone());
    let max_message = config.server.max_message_bytes;
    let grpc = StoreServer::new(service)
        .max_decoding_message_size(max_message)
        .max_encoding_message_size(max_message);
    let served = runnel_server::serve(
        runnel_proto::service_name::STORE,
        tonic::service::Routes::new(grpc),
        listeners.grpc,
        listeners.admin,
        &config.server,
        shutdown,
    )
    .await;
    if let Some(syncer) = syncer {
        syncer.abort();
    }
    // Whatever the policy, a clean stop leaves every acknowledged result on disk.
    let synced = tokio::task::spawn_blocking(move || match log.write() {
        Ok(mut log) => log.sync(),
        Err(_) => Err(StoreError::Failed),
    })
    .await;
    served?;
    synced??;
    tracing::info!("store stopped; result log synced");
    Ok(())
}
