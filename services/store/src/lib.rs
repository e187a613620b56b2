//! The storage tier: an in-memory data store over long-term storage.
//!
//! - **Long-term storage** ([`durable`]): every result in an embedded redb database,
//!   committed (and fsync'd, per policy) before `Put` answers, so an acknowledged result
//!   survives `kill -9`; range scans by key and window time; retention by window age and
//!   compaction; and a change feed of every write in sequence order.
//! - **The in-memory data store** ([`hot`]): per `(query, key)` the latest result and a
//!   bounded recent history, per query the ranking of its keys in the most recent window
//!   (`TopK`); in this process (bounded by bytes, LRU eviction) or in a Redis server shared
//!   by every store replica.
//! - **Caching strategies** ([`tiers`]): write-through, read-through or refresh-ahead, per
//!   query.
//!
//! - **Replicas** ([`results_log`]): with `store.broker` set, results are a log in the
//!   broker that every replica materialises; any replica answers any read, and a `Watch`
//!   cursor from one is valid on every other.
//!
//! Writing `(query, key, window_start)` again replaces the result. `Watch` streams results
//! once they are durable, filtered, and resumes after a sequence without a gap.
//! `DeleteQuery` deletes every result of one query (on every replica: it is a record of the
//! results log); watchers are not told.
//!
//! [`run`] is the whole service, runnable in-process (tests, the all-in-one CLI) as well as
//! from the `runnel-store` binary.

mod apply;
pub mod config;
mod durable;
mod error;
mod hot;
mod results_log;
mod service;
mod tiers;
mod validate;

pub use config::{CacheStrategy, HotBackend, HotConfig, StoreConfig};
pub use error::StoreError;

use apply::Applier;
use durable::{Durable, Sequencing};
use hot::{HotTier, Memory, Redis};
use results_log::ResultsLog;
use runnel_proto::v1::store_server::StoreServer;
use runnel_server::{Listeners, ServiceConfig, Shutdown};
use service::Writes;
use std::sync::Arc;
use std::time::Duration;
use tiers::Tiers;
use tokio::sync::watch;

/// How often the Redis backend's memory and eviction figures are exported.
const REDIS_STATS_INTERVAL: Duration = Duration::from_secs(5);

/// Runs the store on `listeners` until `shutdown` fires: opens (recovering) long-term
/// storage, connects the hot tier, serves, drains, and syncs before returning.
pub async fn run(
    config: StoreConfig,
    listeners: Listeners,
    shutdown: Shutdown,
) -> Result<(), StoreError> {
    config.validate()?;
    let (data_dir, policy, feed) = (config.data_dir.clone(), config.fsync, config.feed_entries);
    let sequencing = if config.broker.is_empty() {
        Sequencing::Local
    } else {
        Sequencing::Log
    };
    let durable = Arc::new(
        tokio::task::spawn_blocking(move || Durable::open(&data_dir, policy, feed, sequencing))
            .await??,
    );
    let served = match config.hot.backend {
        HotBackend::Memory => {
            let hot = Memory::new(config.hot.max_bytes);
            serve(config, listeners, shutdown, Arc::clone(&durable), hot).await
        }
        HotBackend::Redis => {
            let hot = Redis::connect(&config.hot.redis_url, &config.hot.redis_prefix).await?;
            let stats = {
                let (hot, shutdown) = (hot.clone(), shutdown.clone());
                tokio::spawn(async move {
                    shutdown
                        .run_every(REDIS_STATS_INTERVAL, || async {
                            if let Err(error) = hot.publish_stats().await {
                                tracing::debug!(%error, "cannot read redis stats");
                            }
                        })
                        .await;
                })
            };
            let served = serve(config, listeners, shutdown, Arc::clone(&durable), hot).await;
            stats.abort();
            served
        }
    };
    // Whatever the policy, a clean stop leaves every acknowledged result on disk.
    let synced = tokio::task::spawn_blocking(move || durable.sync()).await;
    served?;
    synced??;
    tracing::info!("store stopped; long-term storage synced");
    Ok(())
}

async fn serve<H: HotTier>(
    config: StoreConfig,
    listeners: Listeners,
    shutdown: Shutdown,
    durable: Arc<Durable>,
    hot: H,
) -> Result<(), StoreError> {
    let tiers = Tiers::new(Arc::clone(&durable), hot, config.hot.clone());
    let last_sequence = {
        let durable = Arc::clone(&durable);
        tokio::task::spawn_blocking(move || durable.last_sequence()).await??
    };
    let applier = Arc::new(Applier::new(
        Arc::clone(&tiers),
        last_sequence,
        config.watch_buffer,
    ));

    // A replica stops with the first error of its follower (a record it cannot apply), not
    // only on the caller's shutdown.
    let (stop, local) = Shutdown::new();
    let forward = {
        let (stop, shutdown) = (stop.clone(), shutdown.clone());
        tokio::spawn(async move {
            shutdown.wait().await;
            stop.trigger();
        })
    };
    let (writes, follower, ready) = if config.broker.is_empty() {
        tiers.rank_from_disk().await?;
        let ready: ReadyFuture = Box::pin(std::future::ready(()));
        (Writes::Local, None, ready)
    } else {
        let log = Arc::new(
            ResultsLog::open(
                &config.broker,
                &config.server.connect,
                config.retention,
                config.server.max_message_bytes,
                &local,
            )
            .await?,
        );
        let target = log.resume_from(last_sequence).await?;
        tracing::info!(
            applied = last_sequence,
            log_end = target,
            "following the results log"
        );
        let (caught_up, mut watching) = watch::channel(false);
        let reading = watching.clone();
        let follower = {
            let (log, applier, local, stop) = (
                Arc::clone(&log),
                Arc::clone(&applier),
                local.clone(),
                stop.clone(),
            );
            tokio::spawn(async move {
                let followed = log.follow(applier, target, caught_up, local).await;
                if let Err(error) = &followed {
                    tracing::error!(%error, "the store cannot apply the results log; stopping");
                }
                stop.trigger();
                followed
            })
        };
        let ready: ReadyFuture = Box::pin(async move {
            // An error means the follower stopped: the store is stopping, never ready.
            if watching.wait_for(|&caught_up| caught_up).await.is_err() {
                std::future::pending::<()>().await;
            }
        });
        let writes = Writes::Log {
            log,
            caught_up: reading,
            target,
        };
        (writes, Some(follower), ready)
    };
    let mut background = Vec::new();
    // A replica cannot know whether it stopped owing the hot tier an invalidation: it pays
    // one now if the hot tier answers, else as soon as it does.
    tiers.owe_invalidation();
    tiers.settle().await;
    {
        let (tiers, shutdown) = (Arc::clone(&tiers), local.clone());
        background.push(tokio::spawn(async move {
            shutdown
                .run_every(tiers::SETTLE_INTERVAL, || {
                    let tiers = Arc::clone(&tiers);
                    async move {
                        tiers.settle().await;
                    }
                })
                .await;
        }));
    }
    if let Some(every) = durable.sync_every() {
        let (durable, shutdown) = (Arc::clone(&durable), local.clone());
        background.push(tokio::spawn(async move {
            shutdown
                .run_every(every, || {
                    let durable = Arc::clone(&durable);
                    async move {
                        let synced = tokio::task::spawn_blocking(move || durable.sync()).await;
                        if let Ok(Err(error)) = synced {
                            tracing::error!(%error, "periodic fsync failed");
                        }
                    }
                })
                .await;
        }));
    }
    if !config.retention.is_zero() {
        let (tiers, shutdown, retention) = (Arc::clone(&tiers), local.clone(), config.retention);
        background.push(tokio::spawn(async move {
            shutdown
                .run_every(config.retention_interval, || {
                    enforce_retention(&tiers, retention)
                })
                .await;
        }));
    }

    let service =
        service::StoreService::new(applier, writes, config.max_batch_results, local.clone());
    let served = runnel_server::serve_grpc!(
        StoreServer::new(service),
        listeners,
        &config.server,
        local,
        ready = ready
    )
    .await;
    for task in background {
        task.abort();
    }
    forward.abort();
    if let Some(follower) = follower {
        follower.await??;
    }
    Ok(served?)
}

/// Completes when the store may take traffic.
type ReadyFuture = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// One retention pass: delete results whose window started more than `retention` ago,
/// forget them in the hot tier, and compact the file if anything went.
async fn enforce_retention<H: HotTier>(tiers: &Arc<Tiers<H>>, retention: Duration) {
    let cutoff = runnel_proto::now_millis()
        .0
        .saturating_sub(i64::try_from(retention.as_millis()).unwrap_or(i64::MAX));
    let durable = Arc::clone(tiers.durable());
    let expired = match tokio::task::spawn_blocking(move || durable.expire(cutoff)).await {
        Ok(Ok(expired)) => expired,
        Ok(Err(error)) => return tracing::error!(%error, "retention failed"),
        Err(error) => return tracing::error!(%error, "retention task failed"),
    };
    if expired.results == 0 {
        return;
    }
    metrics::counter!("runnel_store_results_expired_total").increment(expired.results);
    tiers.forget_expired(expired.series).await;
    let durable = Arc::clone(tiers.durable());
    match tokio::task::spawn_blocking(move || durable.compact()).await {
        Ok(Ok(_)) => tracing::info!(deleted = expired.results, "retention and compaction done"),
        Ok(Err(error)) => tracing::warn!(%error, "compaction failed"),
        Err(error) => tracing::warn!(%error, "compaction task failed"),
    }
}
