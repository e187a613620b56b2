//! The analysis tier: continuous queries defined in configuration — filters, one-to-many
//! keys, tumbling, sliding and session windows on event time with watermarks and allowed
//! lateness, exact aggregates and stream summaries (HyperLogLog, Space-Saving, DDSketch,
//! bottom-k samples, Bloom filters) — with per-partition state checkpointed into the broker
//! so that results are exactly-once across crashes, and shared out over any number of
//! instances, on any machines, as a consumer group.
//!
//! ```text
//!             ┌────────────── one query ────────────────┐
//! topic ──► source stage ─(re-keyed queries only)─► _analyzer.<query>.keyed ──► keyed stage
//!             │ filter, keys, time, lateness                                     │ windows
//!             └ windows (keyed by the event key) ──────────────────────────────► store / topic
//! ```
//!
//! Each stage is a member of a consumer group and runs one [`task`] per partition it owns;
//! see [`runner`] for the loop and [`checkpoint`] for where state lives. [`run`] is the
//! whole service, runnable in-process (tests, the all-in-one CLI, the benchmarks) as well
//! as from the `runnel-analyzer` binary.

mod aggregate;
mod checkpoint;
pub mod config;
mod error;
mod event;
mod filter;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
mod path;
mod plan;
mod queries;
mod registry;
mod rekey;
mod runner;
mod service;
mod sketch;
mod sql;
mod task;
mod window;

pub mod bench;
pub use aggregate::{AggregateConfig, Function};
pub use config::{AnalyzerConfig, QueryConfig, WindowConfig, default_queries};
pub use error::AnalyzerError;
pub use filter::{Literal, Predicate};
pub use window::EmitMode;

use queries::Queries;
use registry::Registry;
use runnel_proto::v1::analyzer_server::AnalyzerServer;
use runnel_proto::v1::store_client::StoreClient;
use runnel_security::{ConnectConfig, Peer};
use runnel_server::{Listeners, ServiceConfig, Shutdown};
use runner::Context;
use service::AnalyzerService;
use std::sync::Arc;

fn channel(key: &'static str, url: &str, connect: &ConnectConfig) -> Result<Peer, AnalyzerError> {
    // Lazy: the broker and the store may start after us, or restart; tonic reconnects. With
    // keepalive: a subscription on a connection that died unseen would wait forever.
    runnel_security::connect_lazy(url, connect).map_err(|source| AnalyzerError::Url {
        key,
        url: url.to_owned(),
        source,
    })
}

/// Runs every configured query and serves `ListQueries`/`DescribeQuery` on `listeners`
/// until `shutdown` fires, or until a query fails in a way retrying cannot fix (a
/// checkpoint that does not fit, a gap in a partition's offsets, results the store
/// rejects), which stops the analyzer with that error. On shutdown each stage checkpoints what has been written downstream.
pub async fn run(
    config: AnalyzerConfig,
    listeners: Listeners,
    shutdown: Shutdown,
) -> Result<(), AnalyzerError> {
    config.validate()?;
    let plans = config.plans()?;
    if let Some(dir) = &config.data_dir {
        tracing::warn!(data_dir = %dir.display(), "analyzer.data_dir is deprecated and ignored: checkpoints live in the broker (topics _analyzer.<query>.<stage>.checkpoints); remove the setting and the directory");
    }
    let max_message = config.server.max_message_bytes;
    let connect = &config.server.connect;
    let broker = channel("broker", &config.broker, connect)?;
    let store = StoreClient::new(channel("store", &config.store, connect)?)
        .max_encoding_message_size(max_message);

    // Our own trigger, so that a failing query can stop the whole analyzer.
    let (stop, local) = Shutdown::new();
    let forward = {
        let (stop, shutdown) = (stop.clone(), shutdown.clone());
        tokio::spawn(async move {
            shutdown.wait().await;
            stop.trigger();
        })
    };
    let member_id = config
        .member_id
        .clone()
        .unwrap_or_else(|| format!("analyzer-{:016x}", rand::random::<u64>()));
    let context = Context {
        broker,
        store,
        checkpoint_interval: config.checkpoint_interval,
        checkpoint_refresh: config.checkpoint_refresh,
        checkpoint_retention: config.checkpoint_retention,
        checkpoint_retention_bytes: config.checkpoint_retention_bytes,
        group: config.group.clone(),
        member_id,
        session_timeout: config.session_timeout,
        max_message,
        shutdown: local.clone(),
    };

    let (failures, mut failed) = tokio::sync::mpsc::unbounded_channel();
    let queries = Queries::new(context.clone(), failures);
    for (plan, query) in plans.into_iter().zip(&config.queries) {
        queries.start_configured(plan, query.sql.clone());
    }
    // Queries created at run time: every replica follows the same log in the broker.
    let registry = Registry::start(
        context.broker.clone(),
        max_message,
        config.server.request_timeout,
        local.clone(),
    );
    tokio::spawn(Arc::clone(&queries).follow(registry.watch()));

    let service = AnalyzerService::new(
        Arc::clone(&queries),
        registry,
        context.store.clone(),
        config.server.request_timeout,
    );
    let serve = runnel_server::serve_grpc!(
        AnalyzerServer::new(service),
        listeners,
        &config.server,
        local.clone()
    );
    let mut serve = std::pin::pin!(serve);
    let mut failure = None;
    let served = loop {
        tokio::select! {
            served = &mut serve => break served,
            Some(error) = failed.recv(), if failure.is_none() => {
                tracing::error!(%error, "a query failed; stopping the analyzer");
                failure = Some(error);
                stop.trigger();
            }
        }
    };
    // The stages stop on the same trigger; what is left of the grace is theirs to
    // checkpoint in.
    if !queries
        .drained(local.remaining(config.server.drain_timeout))
        .await
    {
        tracing::warn!(
            "queries did not stop within the drain timeout; their last checkpoints stand"
        );
    }
    if let Ok(error) = failed.try_recv() {
        failure.get_or_insert(error);
    }
    forward.abort();
    if let Some(error) = failure {
        return Err(error);
    }
    served?;
    tracing::info!("analyzer stopped");
    Ok(())
}
