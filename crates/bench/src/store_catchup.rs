//! `runnel bench store-catchup`: how fast a new, empty store replica materialises the
//! results log until it serves.
//!
//! It starts a broker and a first store replica in this process (fresh temporary data
//! directories, loopback ports), writes `--results` results through that replica's `Put`
//! (`--batch` per call, over `--keys` keys and as many windows as it takes), stops it,
//! writes back what the fill left dirty (`sync`, so that the catch-up is not charged for
//! the fill's writeback), and then starts an empty replica and times it from its start
//! until its gRPC health check answers SERVING — which it does once it has applied the
//! whole log into its long-term storage, made that durable, and ranked from disk. Finally it checks the last result on
//! the new replica, so a replica that served without its data fails the bench.

use anyhow::{Context, Result, bail};
use runnel_broker::BrokerConfig;
use runnel_log::FsyncPolicy;
use runnel_proto::Millis;
use runnel_proto::v1::store_client::StoreClient;
use runnel_proto::v1::{GetRequest, PutRequest, QueryResult};
use runnel_server::ServiceConfig;
use runnel_store::StoreConfig;
use runnel_testkit::Services;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

const QUERY: &str = "catchup";

/// Arguments of `runnel bench store-catchup`.
#[derive(Debug, clap::Args)]
pub struct StoreCatchupArgs {
    /// Results in the log before the empty replica starts.
    #[arg(long, default_value_t = 1_000_000)]
    results: u64,
    /// Distinct keys the results spread over (each key gets a window per round).
    #[arg(long, default_value_t = 10_000)]
    keys: u64,
    /// Results per `Put` while filling the log.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    batch: u64,
}

fn store_config(dir: &Path, broker: &str, fsync: FsyncPolicy) -> StoreConfig {
    StoreConfig {
        server: runnel_server::ServerConfig::loopback(0, 0),
        data_dir: dir.to_path_buf(),
        broker: broker.to_owned(),
        fsync,
        max_batch_results: 100_000,
        ..StoreConfig::default()
    }
}

fn result(key: u64, window: u64) -> QueryResult {
    let start = i64::try_from(window).unwrap_or(i64::MAX / 2) * 60_000;
    QueryResult {
        query: QUERY.into(),
        key: format!("key-{key}"),
        window_start: Some(Millis(start).into()),
        window_end: Some(Millis(start + 60_000).into()),
        values: [("count".to_owned(), key as f64), ("avg".to_owned(), 1.5)].into(),
        ..QueryResult::default()
    }
}

pub(crate) async fn run(args: StoreCatchupArgs) -> Result<ExitCode> {
    if args.keys == 0 || args.results == 0 {
        bail!("--keys and --results must be at least 1");
    }
    let dir = tempfile::Builder::new().prefix("runnel-bench-").tempdir()?;
    let mut broker = Services::new();
    let broker_config = BrokerConfig {
        server: runnel_server::ServerConfig::loopback(0, 0),
        data_dir: dir.path().join("broker"),
        ..BrokerConfig::default()
    };
    broker_config.validate()?;
    let addrs = broker
        .start_on_loopback("broker", runnel_broker::run, broker_config)
        .await;
    let broker_url = format!("http://{}", addrs.grpc);

    // Fill the log through a first replica, then stop it: the new one runs alone.
    let mut filler = Services::new();
    let config = store_config(&dir.path().join("filler"), &broker_url, FsyncPolicy::Never);
    config.validate()?;
    let addrs = filler
        .start_on_loopback("store", runnel_store::run, config)
        .await;
    let filled = filler
        .during(fill(&args, addrs.grpc))
        .await
        .map_err(anyhow::Error::msg)??;
    crate::stop(filler).await?;
    eprintln!(
        "bench: {} results in the log in {:.1} s; writing back what the fill left dirty",
        args.results,
        filled.as_secs_f64()
    );
    // The fill leaves hundreds of MB of unwritten pages (the filler's database, written
    // without fsync, and the log): written back during the catch-up, they would be
    // measured as its cost. The replica is timed alone.
    let written_back = Instant::now();
    tokio::task::spawn_blocking(nix::unistd::sync).await?;
    eprintln!(
        "bench: written back in {:.1} s; starting an empty replica",
        written_back.elapsed().as_secs_f64()
    );

    let mut replica = Services::new();
    let config = store_config(
        &dir.path().join("replica"),
        &broker_url,
        FsyncPolicy::Always,
    );
    let started = Instant::now();
    let addrs = replica
        .start_on_loopback("store", runnel_store::run, config)
        .await;
    let caught_up = replica
        .during(serving(addrs.grpc))
        .await
        .map_err(anyhow::Error::msg)??;
    let elapsed = caught_up.duration_since(started);
    let last = args.results - 1;
    let mut client = StoreClient::connect(format!("http://{}", addrs.grpc)).await?;
    let found = client
        .get(GetRequest {
            query: QUERY.into(),
            key: format!("key-{}", last % args.keys),
        })
        .await?
        .into_inner()
        .result
        .context("the new replica serves without the last result")?;
    if found.sequence != args.results {
        bail!(
            "the new replica's last result has sequence {}, not {}",
            found.sequence,
            args.results
        );
    }
    println!(
        "store catch-up  {} results in {:.2} s: {:.0} results/s until serving  ({} keys)",
        args.results,
        elapsed.as_secs_f64(),
        args.results as f64 / elapsed.as_secs_f64(),
        args.keys,
    );
    crate::stop(replica).await?;
    crate::stop(broker).await?;
    Ok(ExitCode::SUCCESS)
}

/// Writes `args.results` results through the store at `grpc`.
async fn fill(args: &StoreCatchupArgs, grpc: std::net::SocketAddr) -> Result<Duration> {
    let started = Instant::now();
    let mut client = StoreClient::connect(format!("http://{grpc}"))
        .await?
        .max_encoding_message_size(64 << 20);
    let mut next = 0;
    while next < args.results {
        let end = (next + args.batch).min(args.results);
        let results = (next..end)
            .map(|i| result(i % args.keys, i / args.keys))
            .collect();
        client
            .put(PutRequest {
                results,
                fence: None,
            })
            .await
            .context("filling the log")?;
        next = end;
    }
    Ok(started.elapsed())
}

/// Waits until the store at `grpc` reports SERVING; answers when it did.
async fn serving(grpc: std::net::SocketAddr) -> Result<Instant> {
    loop {
        let checked = runnel_server::healthcheck::check(
            grpc,
            runnel_proto::service_name::STORE,
            Duration::from_secs(5),
            None,
        )
        .await;
        if checked.is_ok() {
            return Ok(Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
