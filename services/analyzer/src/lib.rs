//! The analysis tier: continuous queries over event-time windows, with checkpointed state
//! that makes their results exactly-once across crashes.
//!
//! Each query in the configuration reads every partition of its topic from the broker,
//! groups events by key into tumbling event-time windows, and — once the watermark passes
//! a window's end — writes the window's count, sum, average, minimum and maximum to the
//! store. Its input offsets are checkpointed together with its open windows, and only after
//! the store has acknowledged the results the checkpoint no longer holds, so a restart
//! re-emits at most the same results, which the store writes over.
//!
//! [`run`] is the whole service, runnable in-process (tests, the all-in-one CLI) as well as
//! from the `runnel-analyzer` binary.

mod checkpoint;
pub mod config;
mod error;
mod extract;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
mod runner;
mod service;
mod window;

pub use config::{AnalyzerConfig, QueryConfig};
pub use error::AnalyzerError;

use extract::ValuePath;
use runnel_proto::v1::analyzer_server::AnalyzerServer;
use runnel_proto::v1::broker_client::BrokerClient;
use runnel_proto::v1::store_client::StoreClient;
use runnel_security::{ConnectConfig, Peer};
use runnel_server::{Listeners, ServiceConfig, Shutdown};
use runner::{QueryRunner, QueryStatus};
use service::{AnalyzerService, QueryView};
use tokio::sync::watch;
use tokio::task::JoinSet;

fn channel(key: &'static str, url: &str, connect: &ConnectConfig) -> Result<Peer, AnalyzerError> {
    // Lazy: the broker and the store may start after us, or restart; tonic reconnects.
    runnel_security::connect_lazy(url, connect).map_err(|source| AnalyzerError::Url {
        key,
        url: url.to_owned(),
        source,
    })
}

/// Runs every configured query and serves `ListQueries`/`DescribeQuery` on `listeners`
/// until `shutdown` fires, or until a query fails in a way retrying cannot fix (a
/// checkpoint that does not fit, results the store rejects), which stops the analyzer with
/// that error. On shutdown each query checkpoints what the store has acknowledged.
pub async fn run(
    config: AnalyzerConfig,
    listeners: Listeners,
    shutdown: Shutdown,
) -> Result<(), AnalyzerError> {
    config.validate()?;
    std::fs::create_dir_all(&config.data_dir).map_err(|source| AnalyzerError::Io {
        path: config.data_dir.clone(),
        source,
    })?;
    let max_message = config.server.max_message_bytes;
    let connect = &config.server.connect;
    let broker = BrokerClient::new(channel("broker", &config.broker, connect)?)
        .max_decoding_message_size(max_message);
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

    let mut runners = JoinSet::new();
    let mut views = Vec::new();
    for query in &config.queries {
        let (status, receiver) = watch::channel(QueryStatus::default());
        let value = ValuePath::parse(&query.value).map_err(|message| {
            AnalyzerError::Config(runnel_server::ConfigError::invalid(
                "analyzer",
                "queries.value",
                message,
            ))
        })?;
        let runner = QueryRunner {
            query: query.clone(),
            value,
            broker: broker.clone(),
            store: store.clone(),
            checkpoint_path: checkpoint::path(&config.data_dir, &query.name),
            checkpoint_interval: config.checkpoint_interval,
            status,
            shutdown: local.clone(),
        };
        runners.spawn(runner.run());
        views.push(QueryView {
            query: query.clone(),
            status: receiver,
        });
    }

    let grpc = AnalyzerServer::new(AnalyzerService::new(views))
        .max_decoding_message_size(max_message)
        .max_encoding_message_size(max_message);
    let serve = runnel_server::serve(
        runnel_proto::service_name::ANALYZER,
        tonic::service::Routes::new(grpc),
        listeners.grpc,
        listeners.admin,
        &config.server,
        local.clone(),
    );
    let mut serve = std::pin::pin!(serve);
    let mut failure = None;
    let served = loop {
        tokio::select! {
            served = &mut serve => break served,
            Some(joined) = runners.join_next(), if failure.is_none() => {
                let outcome = joined.map_err(AnalyzerError::from).and_then(|ended| ended);
                if let Err(error) = outcome {
                    tracing::error!(%error, "a query failed; stopping the analyzer");
                    failure = Some(error);
                    stop.trigger();
                }
            }
        }
    };
    // The runners stop on the same trigger; give them the drain period to checkpoint.
    let drained = tokio::time::timeout(config.server.drain_timeout, async {
        while let Some(joined) = runners.join_next().await {
            if let Err(error) = joined.map_err(AnalyzerError::from).and_then(|ended| ended) {
                failure.get_or_insert(error);
            }
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            "queries did not stop within the drain timeout; their last checkpoints stand"
        );
    }
    forward.abort();
    if let Some(error) = failure {
        return Err(error);
    }
    served?;
    tracing::info!("analyzer stopped");
    Ok(())
}
