//! The message queue tier: durable, partitioned topics on local disk, with consumer
//! groups and committed offsets.
//!
//! A topic has a fixed number of partitions; each partition is a log of record batches in
//! segments, numbered by offset from 0. Producers send events (a keyed event always goes to
//! the partition its key hashes to, see [`runnel_proto::partition_for_key`], so one key's events keep
//! their order) or pre-encoded batches with a producer id and sequence, which makes their
//! retries free of duplicates. Consumers read a partition from an offset or a time with
//! `Fetch`, follow it live with `Subscribe`, or join a consumer group that shares a topic's
//! partitions among its members and keeps their offsets.
//!
//! Nothing is acknowledged before it is written — and fsync'd, for DURABLE acks, many
//! producers sharing one fsync — and an acknowledged offset is never reused, across crashes
//! included: recovery cuts off only a torn tail that was never acknowledged. Retention
//! deletes whole sealed segments by age and size.
//!
//! [`run`] is the whole service, runnable in-process (tests, the all-in-one CLI) as well as
//! from the `runnel-broker` binary.

mod batch;
pub mod config;
mod error;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
mod groups;
mod produce_stream;
mod service;
mod storage;
mod subscribe;
mod topic;

pub use config::{BrokerConfig, JetStreamConfig, JetStreamStorage, NatsTlsConfig, StorageEngine};
pub use error::BrokerError;
pub use storage::embedded::repair::{Damage, Repair, repair};
pub use storage::embedded::segment::SegmentError;

use groups::Coordinator;
use runnel_log::FsyncPolicy;
use runnel_proto::v1::broker_server::BrokerServer;
use runnel_server::{Listeners, ServiceConfig, Shutdown};
use std::sync::Arc;
use std::time::Duration;
use storage::embedded::durability::GroupCommit;
use storage::embedded::offsets::OffsetStore;
use storage::embedded::topics::Topics;
use storage::jetstream;

/// How often group members' sessions are checked.
const SESSION_CHECK: Duration = Duration::from_millis(250);
/// How often consumer lag is recomputed for the metrics (commits update it too).
const LAG_REFRESH: Duration = Duration::from_secs(10);

/// Sets `runnel_broker_consumer_lag{group, topic, partition}` for every group with
/// committed offsets: the partition's end offset minus the group's committed offset.
async fn publish_lag(storage: Arc<dyn storage::Storage>) {
    let topics = match storage.list_topics().await {
        Ok(topics) => topics,
        Err(error) => {
            tracing::debug!(%error, "consumer lag not refreshed");
            return;
        }
    };
    for topic in topics {
        let Ok(groups) = storage.groups_of(&topic.name).await else {
            continue;
        };
        for (group, offsets) in groups {
            for partition in &topic.partitions {
                if let Some(committed) = offsets.get(&partition.partition) {
                    metrics::gauge!(
                        "runnel_broker_consumer_lag",
                        "group" => group.clone(),
                        "topic" => topic.name.clone(),
                        "partition" => partition.partition.to_string()
                    )
                    .set(partition.end_offset.saturating_sub(*committed) as f64);
                }
            }
        }
    }
}

/// Runs the broker on `listeners` until `shutdown` fires: opens its storage engine
/// (recovering every topic and the groups' offsets under `config.data_dir`, or connecting
/// to JetStream), serves, drains, and — for the embedded engine — syncs every partition
/// before returning.
pub async fn run(
    config: BrokerConfig,
    listeners: Listeners,
    shutdown: Shutdown,
) -> Result<(), BrokerError> {
    config.validate()?;
    // Background work runs until the drain is over: producers still in flight may be
    // waiting on a group commit.
    let (stop_background, background) = Shutdown::new();
    let mut tasks = Vec::new();
    let (storage, embedded, coordinator): (
        Arc<dyn storage::Storage>,
        Option<Arc<Topics>>,
        Arc<Coordinator>,
    ) = match config.storage {
        StorageEngine::Embedded => {
            let (storage, topics) = open_embedded(&config, &background, &mut tasks).await?;
            (storage, Some(topics), Coordinator::in_memory())
        }
        StorageEngine::Jetstream => {
            let engine =
                jetstream::JetStream::connect(config.jetstream.clone(), config.default_retention())
                    .await?;
            // Groups live in JetStream too: every broker in front of it serves them together.
            let coordinator = Coordinator::new(Arc::new(engine.groups()));
            (Arc::new(engine), None, coordinator)
        }
    };
    tasks.push(tokio::spawn(
        Arc::clone(&coordinator).follow_ledger(background.clone()),
    ));
    {
        let storage = Arc::clone(&storage);
        let background = background.clone();
        tasks.push(tokio::spawn(async move {
            background
                .run_every(LAG_REFRESH, || publish_lag(Arc::clone(&storage)))
                .await;
        }));
    }
    {
        let coordinator = Arc::clone(&coordinator);
        let background = background.clone();
        tasks.push(tokio::spawn(async move {
            background
                .run_every(SESSION_CHECK, || {
                    let coordinator = Arc::clone(&coordinator);
                    async move {
                        if let Err(error) = coordinator.expire(groups::now_ms()).await {
                            tracing::warn!(%error, "could not evict members whose session ran out; trying again");
                        }
                    }
                })
                .await;
        }));
    }

    let service = service::BrokerService::new(storage, coordinator, &config, shutdown.clone());
    let served = runnel_server::serve_grpc!(
        BrokerServer::new(service),
        listeners,
        &config.server,
        shutdown
    )
    .await;

    stop_background.trigger();
    for task in tasks {
        let _ = task.await;
    }
    if let Some(topics) = embedded {
        // Whatever the policy, a clean stop leaves everything acknowledged on disk.
        let synced = tokio::task::spawn_blocking(move || topics.sync_all()).await;
        served?;
        synced??;
        tracing::info!("broker stopped; every partition synced");
    } else {
        served?;
        tracing::info!("broker stopped");
    }
    Ok(())
}

/// Runs `work` over the topics on a blocking thread every `every`, until `background`
/// stops; a tick that panics is logged as `what`'s failure and the next one runs anyway.
fn every_tick(
    background: &Shutdown,
    every: std::time::Duration,
    topics: &Arc<Topics>,
    what: &'static str,
    work: fn(&Topics),
) -> tokio::task::JoinHandle<()> {
    let (background, topics) = (background.clone(), Arc::clone(topics));
    tokio::spawn(async move {
        background
            .run_every(every, || {
                let topics = Arc::clone(&topics);
                async move {
                    if let Err(error) = tokio::task::spawn_blocking(move || work(&topics)).await {
                        tracing::error!(%error, task = what, "background task failed");
                    }
                }
            })
            .await;
    })
}

/// How often each partition's recovery point is saved, when more is known fsync'd.
const RECOVERY_POINT_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// Opens the embedded engine — topics, offsets, group commit — and starts its background
/// work (group commits, interval fsyncs, retention) on `background`.
async fn open_embedded(
    config: &BrokerConfig,
    background: &Shutdown,
    tasks: &mut Vec<tokio::task::JoinHandle<()>>,
) -> Result<(Arc<dyn storage::Storage>, Arc<Topics>), BrokerError> {
    let data_dir = config.data_dir.clone();
    let (settings, defaults) = (config.log_settings(), config.default_retention());
    let topics = Arc::new(
        tokio::task::spawn_blocking(move || Topics::open(&data_dir, settings, defaults)).await??,
    );
    let data_dir = config.data_dir.clone();
    let offsets = Arc::new(
        tokio::task::spawn_blocking(move || OffsetStore::open(&data_dir, FsyncPolicy::Always))
            .await??,
    );
    // Retention is due at start too: a broker that was down for a week must not serve a
    // week of expired records until its first check.
    let expired = Arc::clone(&topics);
    let now = runnel_proto::now_millis();
    tokio::task::spawn_blocking(move || expired.enforce_retention(now)).await?;

    if config.verify_sealed {
        // In the background: serving does not wait for a read of every sealed segment.
        let (verified, stop) = (Arc::clone(&topics), background.clone());
        tasks.push(tokio::task::spawn_blocking(move || {
            verified.verify_sealed(&|| stop.is_triggered())
        }));
    }

    let group_commit = Arc::new(GroupCommit::default());
    tasks.push(tokio::spawn(
        Arc::clone(&group_commit).run(background.clone()),
    ));
    if let FsyncPolicy::Interval(every) = config.fsync {
        // Errors are logged where they happen; the next tick tries again.
        tasks.push(every_tick(
            background,
            every,
            &topics,
            "periodic fsync",
            |topics| {
                let _ = topics.sync_due();
            },
        ));
    }
    // Recovery points: what recovery must find intact (see `partition`).
    tasks.push(every_tick(
        background,
        RECOVERY_POINT_INTERVAL,
        &topics,
        "recovery point",
        |topics| {
            let _ = topics.save_recovery_points();
        },
    ));
    tasks.push(every_tick(
        background,
        config.retention_check_interval,
        &topics,
        "retention",
        |topics| {
            let deleted = topics.enforce_retention(runnel_proto::now_millis());
            if deleted > 0 {
                metrics::counter!("runnel_broker_segments_deleted_total").increment(deleted as u64);
            }
        },
    ));
    let storage = storage::Embedded::new(
        Arc::clone(&topics),
        offsets,
        group_commit,
        config.writeback_bytes,
        config.fsync == FsyncPolicy::Always,
    );
    Ok((Arc::new(storage), topics))
}
