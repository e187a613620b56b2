//! `runnel bench`: the benchmark harnesses whose figures go in `docs/benchmarks.md`.

mod broker;
mod gateway;
mod ingest;

use anyhow::Result;
use std::process::ExitCode;

/// What to measure.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum BenchCommand {
    /// Ingest throughput and ack latency through collector → broker.
    Ingest(ingest::IngestArgs),
    /// Produce and consume throughput and produce-ack latency of the broker alone, and of
    /// NATS JetStream through the same load generator.
    Broker(broker::BrokerArgs),
    /// Get throughput and latency over gRPC and HTTP, and live fan-out: how many watchers
    /// the gateway holds and how fast a write reaches them.
    Gateway(gateway::GatewayArgs),
}

pub(crate) async fn run(what: BenchCommand) -> Result<ExitCode> {
    match what {
        BenchCommand::Ingest(args) => ingest::run(args).await,
        BenchCommand::Broker(args) => broker::run(args).await,
        BenchCommand::Gateway(args) => gateway::run(args).await,
    }
}
