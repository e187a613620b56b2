//! `runnel bench`: the benchmark harnesses whose figures go in `docs/benchmarks.md`.
//!
//! An app crate: it starts the services in its own process to measure them, and `runnel
//! bench` (in `runnel-cli`) calls [`run`]. The two app crates, `runnel-cli` and
//! `runnel-bench`, are the only crates that import services; every other crate of the
//! workspace is a library that no service is imported into.

mod analyzer;
mod broker;
mod e2e;
mod gateway;
mod ingest;
mod redis_peer;
mod store_catchup;
mod stream;

use anyhow::Result;
use runnel_testkit::Services;
use std::process::ExitCode;
use std::time::Duration;

/// What to measure.
#[derive(Debug, clap::Subcommand)]
pub enum BenchCommand {
    /// Ingest throughput and ack latency through collector → broker.
    Ingest(ingest::IngestArgs),
    /// Stream throughput and ack latency through collector → broker.
    Stream(stream::StreamArgs),
    /// Produce and consume throughput and produce-ack latency of the broker alone, and of
    /// NATS JetStream through the same load generator.
    Broker(broker::BrokerArgs),
    /// The analyzer's operators per core (with and without checkpoints), and its
    /// end-to-end throughput and latency over a broker and a store.
    Analyzer(analyzer::AnalyzerArgs),
    /// Get throughput and latency over gRPC and HTTP, and live fan-out: how many watchers
    /// the gateway holds and how fast a write reaches them.
    Gateway(gateway::GatewayArgs),
    /// The whole pipeline's latency, from an event's acknowledgement at the collector to
    /// its result at a gateway `Watch` client, emitting on update and on close, at shares
    /// of the pipeline's peak.
    E2e(e2e::E2eArgs),
    /// How fast a new, empty store replica materialises the results log until it serves.
    StoreCatchup(store_catchup::StoreCatchupArgs),
}

/// Runs the benchmark `what` asks for and prints its figures.
pub async fn run(what: BenchCommand) -> Result<ExitCode> {
    match what {
        BenchCommand::Ingest(args) => ingest::run(args).await,
        BenchCommand::Stream(args) => stream::run(args).await,
        BenchCommand::Broker(args) => broker::run(args).await,
        BenchCommand::Analyzer(args) => analyzer::run(args).await,
        BenchCommand::Gateway(args) => gateway::run(args).await,
        BenchCommand::E2e(args) => e2e::run(args).await,
        BenchCommand::StoreCatchup(args) => store_catchup::run(args).await,
    }
}

/// The median of `values` (the upper one of an even count); 0 for none.
fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

/// `min / median / max` of `values`, with `decimals` decimals.
fn spread(mut values: Vec<f64>, decimals: usize) -> String {
    values.sort_by(f64::total_cmp);
    match (values.first(), values.last()) {
        (Some(min), Some(max)) => {
            let mid = values[values.len() / 2];
            format!("{min:.decimals$} / {mid:.decimals$} / {max:.decimals$}")
        }
        _ => String::new(),
    }
}

/// Stops the services a bench started, which drain first: one that failed, or would not
/// stop within 30 s, fails the bench.
async fn stop(services: Services) -> Result<()> {
    services
        .stop(Duration::from_secs(30))
        .await
        .map_err(anyhow::Error::msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spread_is_min_median_max_whatever_the_order() {
        assert_eq!(spread(vec![3.0, 1.0, 2.0], 1), "1.0 / 2.0 / 3.0");
        assert_eq!(spread(vec![5.0], 0), "5 / 5 / 5");
        assert_eq!(median(vec![9.0, 1.0, 4.0]), 4.0);
    }
}
