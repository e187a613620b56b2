//! `runnel`: the whole pipeline in one process (`runnel up`), the client commands `send`,
//! `get`, `watch` and `bench` (the harnesses are in `runnel-bench`), `certs` / `auth`
//! for a secured pipeline, and `broker repair` for a damaged partition.
//!
//! An app crate: `runnel up` runs the five services in-process. The two app crates,
//! `runnel-cli` and `runnel-bench`, are the only crates that import services; every other
//! crate of the workspace is a library that no service is imported into.

mod certs;
mod client;
mod demo;
mod json;
mod query;
mod read;
mod repair;
mod send;
mod up;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// Runnel, a real-time data pipeline: collect → queue → analyse → store → serve.
#[derive(Debug, Parser)]
#[command(name = "runnel", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run all five services in this process, on loopback, with local files.
    Up(up::UpArgs),
    /// Send events, one JSON object per line on stdin, to the collector.
    Send(send::SendArgs),
    /// Print the latest result of a query for a key.
    Get(read::GetArgs),
    /// Print results as they are produced (one JSON object per line).
    Watch(read::WatchArgs),
    /// Create, list, describe and drop continuous queries in SQL while the pipeline runs.
    Query {
        #[command(subcommand)]
        what: query::QueryCommand,
    },
    /// Measure throughput and latency: ingest or stream through collector → broker, the
    /// broker alone (side by side with NATS JetStream), the analyzer's operators, or the
    /// gateway's reads and fan-out.
    Bench {
        #[command(subcommand)]
        what: runnel_bench::BenchCommand,
    },
    /// Look after an embedded broker's files (with the broker stopped).
    Broker {
        #[command(subcommand)]
        what: repair::BrokerCommand,
    },
    /// Make a development CA and certificates for TLS and mutual TLS.
    Certs {
        #[command(subcommand)]
        what: certs::CertsCommand,
    },
    /// Make bearer tokens for authentication.
    Auth {
        #[command(subcommand)]
        what: certs::AuthCommand,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("runnel: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Up(args) => up::run(args).await,
            Command::Send(args) => send::run(args).await,
            Command::Get(args) => read::get(args).await,
            Command::Watch(args) => read::watch(args).await,
            Command::Query { what } => query::run(what).await,
            Command::Bench { what } => runnel_bench::run(what).await,
            Command::Broker { what } => repair::run(what),
            Command::Certs { what } => certs::certs(what),
            Command::Auth { what } => certs::auth(what),
        }
    });
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("runnel: {error:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// clap checks a command line's definition only when it is parsed in a debug build:
    /// two arguments with one name (`get`'s key and a flag) failed only at run time.
    #[test]
    fn every_subcommand_is_well_formed() {
        super::Cli::command().debug_assert();
    }
}
