//! `runnel bench ingest`: ingest throughput and ack latency through collector → broker.
//!
//! By default it starts a collector and a broker in this process on ephemeral loopback
//! ports with a temporary data directory, so the figure measures Runnel and nothing else;
//! `--collector` points it at a running pipeline instead. Each of `--concurrency` clients
//! sends `Ingest` batches of `--batch` events with `--size`-byte payloads, one call in
//! flight per client, answered at `--ack`; latency is measured per call, from send to
//! acknowledgement. `--log` and `--log-fsync` choose the collector's message log.
//! `--secure` runs both hops over mutual TLS with certificate authentication and grants,
//! to measure what security costs.

use anyhow::{Context, Result};
use hdrhistogram::Histogram;
use runnel_broker::BrokerConfig;
use runnel_collector::CollectorConfig;
use runnel_log::FsyncPolicy;
use runnel_msglog::Mode;
use runnel_proto::v1::collector_client::CollectorClient;
use runnel_proto::v1::{AckLevel, Event, IngestRequest};
use runnel_security::certs::{
    CLIENT, DevCa, default_names, pipeline_grants, write_file, write_pair,
};
use runnel_security::{ConnectConfig, GrantConfig, Peer};
use runnel_server::ServiceConfig;
use runnel_testkit::Services;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Arguments of `runnel bench ingest`.
#[derive(Debug, clap::Args)]
pub struct IngestArgs {
    /// Events to send in total (after the warm-up).
    #[arg(long, default_value_t = 200_000)]
    events: u64,
    /// Events per `Ingest` call.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    batch: u64,
    /// Payload bytes per event.
    #[arg(long, default_value_t = 100)]
    size: usize,
    /// Clients sending concurrently, each with one call in flight.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=1024))]
    concurrency: u64,
    /// The in-process broker's fsync policy: always, never, or an interval such as 10ms.
    #[arg(long, default_value = "always")]
    fsync: FsyncPolicy,
    /// Benchmark a running collector instead of an in-process one.
    #[arg(long)]
    collector: Option<String>,
    /// Keys to spread events over (and so partitions).
    #[arg(long, default_value_t = 64)]
    keys: u64,
    /// When calls are answered.
    #[arg(long, value_enum, default_value_t = Ack::Stored)]
    ack: Ack,
    #[command(flatten)]
    log: LogArgs,
    /// Event identities each partition of the in-process broker remembers to recognise
    /// retries (`broker.dedup_max_events`); 0 turns recognition off, to measure its cost.
    #[arg(long, default_value_t = BrokerConfig::default().dedup_max_events)]
    dedup_events: usize,
    /// Mutual TLS on both hops (client → collector → broker), certificate authentication
    /// and grants checked on every call, with development certificates made for the run.
    #[arg(long, conflicts_with = "collector")]
    secure: bool,
}

/// The in-process collector's message log.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct LogArgs {
    /// The collector's message log: none, rbml, sbml or hml.
    #[arg(id = "log_mode", long = "log", default_value = "hml")]
    pub(crate) mode: Mode,
    /// The message log's fsync policy: always (per group commit), never, or an interval.
    #[arg(id = "log_fsync", long = "log-fsync", default_value = "always")]
    pub(crate) fsync: FsyncPolicy,
}

/// The ack level asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Ack {
    /// In the collector's memory.
    Accepted,
    /// In the collector's message log.
    Logged,
    /// Acknowledged by the broker.
    Stored,
}

impl Ack {
    pub(crate) fn level(self) -> AckLevel {
        match self {
            Ack::Accepted => AckLevel::Accepted,
            Ack::Logged => AckLevel::Logged,
            Ack::Stored => AckLevel::Stored,
        }
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Ack::Accepted => "accepted",
            Ack::Logged => "logged",
            Ack::Stored => "stored",
        }
    }
}

struct Totals {
    sent: AtomicU64,
    errors: AtomicU64,
    /// The first failed call's status, said once so a broken setup does not pass for a
    /// slow one.
    first_error: std::sync::OnceLock<tonic::Status>,
}

pub(crate) async fn run(args: IngestArgs) -> Result<ExitCode> {
    let data = tempfile_dir()?;
    let mut services = Services::new();
    let (collector_url, connect) = match &args.collector {
        Some(url) => (url.clone(), ConnectConfig::default()),
        None => {
            let certs = args.secure.then(|| data.path().join("certs"));
            start_in_process(
                args.fsync,
                args.dedup_events,
                &args.log,
                certs.as_deref(),
                data.path(),
                &mut services,
            )
            .await?
        }
    };
    let (histogram, totals, elapsed) = services
        .during(measure(&args, &collector_url, &connect))
        .await
        .map_err(anyhow::Error::msg)??;

    let sent = totals.sent.load(Ordering::Relaxed);
    let errors = totals.errors.load(Ordering::Relaxed);
    let rate = sent as f64 / elapsed;
    let mb = rate * args.size as f64 / 1e6;
    let ms = |q: f64| histogram.value_at_quantile(q) as f64 / 1000.0;
    println!("events acknowledged   {sent} in {elapsed:.2}s ({errors} failed calls)");
    println!("throughput            {rate:.0} events/s ({mb:.1} MB/s of payload)");
    println!(
        "ack latency per call  p50 {:.2} ms  p90 {:.2} ms  p99 {:.2} ms  p999 {:.2} ms  max {:.2} ms",
        ms(0.5),
        ms(0.9),
        ms(0.99),
        ms(0.999),
        histogram.max() as f64 / 1000.0
    );
    println!(
        "markdown row          | ingest | {} | {} | {} | {} | {} | {} | {} | {rate:.0} | {:.2} | {:.2} | {:.2} |",
        args.log.mode,
        args.log.fsync,
        args.ack.name(),
        args.batch,
        args.concurrency,
        args.fsync,
        args.size,
        ms(0.5),
        ms(0.99),
        ms(0.999)
    );
    crate::stop(services).await?;
    Ok(if errors == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Warms up, then sends `args.events` events to the collector at `url`; returns per-call
/// latencies (µs), the totals and the seconds the run took.
async fn measure(
    args: &IngestArgs,
    url: &str,
    connect: &ConnectConfig,
) -> Result<(Histogram<u64>, Arc<Totals>, f64)> {
    let channel = runnel_security::connect(url, connect, None)
        .await
        .with_context(|| format!("cannot reach the collector at {url}"))?;

    // Warm-up: connections, topic creation, page cache.
    let warmup = (args.batch * args.concurrency * 5).min(args.events);
    eprintln!("bench: warming up with {warmup} events");
    drive(args, channel.clone(), warmup, "warmup").await?;

    eprintln!(
        "bench: {} events of {} bytes, batches of {}, {} concurrent clients, broker fsync {} (remembering {} event ids per partition), log {} (fsync {}), ack {}{}",
        args.events,
        args.size,
        args.batch,
        args.concurrency,
        args.fsync,
        args.dedup_events,
        args.log.mode,
        args.log.fsync,
        args.ack.name(),
        if args.secure {
            ", mutual TLS and authentication on both hops"
        } else {
            ""
        }
    );
    let started = Instant::now();
    let (histogram, totals) = drive(args, channel, args.events, "run").await?;
    let elapsed = started.elapsed().as_secs_f64();
    Ok((histogram, totals, elapsed))
}

pub(crate) fn tempfile_dir() -> Result<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix("runnel-bench-")
        .tempdir()
        .context("temporary data directory")
}

/// The security settings of `--secure`: each of `name`'s listeners over mutual TLS with
/// certificate authentication, and its calls with its own certificate.
fn secure_server(
    certs: &std::path::Path,
    name: &str,
    grants: Vec<GrantConfig>,
) -> runnel_server::ServerConfig {
    let pem = certs.join(format!("{name}.pem"));
    let key = certs.join(format!("{name}.key"));
    let ca = certs.join("ca.pem");
    runnel_server::ServerConfig {
        tls: Some(runnel_security::TlsConfig {
            cert: pem.clone(),
            key: key.clone(),
            client_ca: Some(ca.clone()),
            client_auth: runnel_security::ClientAuth::Required,
            reload_interval: Duration::from_secs(10),
        }),
        connect: ConnectConfig {
            ca: Some(ca),
            cert: Some(pem),
            key: Some(key),
            ..ConnectConfig::default()
        },
        auth: runnel_security::AuthConfig {
            enabled: true,
            mtls: true,
            grants,
            ..runnel_security::AuthConfig::default()
        },
        ..runnel_server::ServerConfig::loopback(0, 0)
    }
}

/// Makes a CA and certificates for the collector, the broker and the bench client.
fn make_certs(dir: &std::path::Path) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let (ca, _) = DevCa::generate("runnel bench CA", 1)?;
    write_file(&dir.join("ca.pem"), &ca.cert_pem, false, true)?;
    for name in ["collector", "broker", CLIENT] {
        write_pair(dir, name, &ca.issue(name, &default_names(name), 1)?, true)?;
    }
    Ok(())
}

/// A broker and a collector started in `services`, on ephemeral ports; the collector's URL
/// and how to connect to it. With `secure_certs`, development certificates are made there and
/// both hops run over mutual TLS with authentication and grants.
pub(crate) async fn start_in_process(
    broker_fsync: FsyncPolicy,
    dedup_max_events: usize,
    log: &LogArgs,
    secure_certs: Option<&std::path::Path>,
    data: &std::path::Path,
    services: &mut Services,
) -> Result<(String, ConnectConfig)> {
    let (broker_server, collector_server, client) = match secure_certs {
        Some(certs) => {
            make_certs(certs)?;
            let client = secure_server(certs, CLIENT, Vec::new()).connect;
            (
                secure_server(certs, "broker", pipeline_grants("broker")),
                secure_server(certs, "collector", pipeline_grants("collector")),
                client,
            )
        }
        None => (
            runnel_server::ServerConfig::loopback(0, 0),
            runnel_server::ServerConfig::loopback(0, 0),
            ConnectConfig::default(),
        ),
    };
    let scheme = if secure_certs.is_some() {
        "https"
    } else {
        "http"
    };
    let broker = BrokerConfig {
        server: broker_server,
        data_dir: data.join("broker"),
        fsync: broker_fsync,
        dedup_max_events,
        ..BrokerConfig::default()
    };
    broker.validate()?;
    let broker = services
        .start_on_loopback("broker", runnel_broker::run, broker)
        .await;
    let mut collector = CollectorConfig {
        server: collector_server,
        broker: format!("{scheme}://{}", broker.grpc),
        data_dir: data.join("collector"),
        udp: None,
        ..CollectorConfig::default()
    };
    collector.msglog.mode = log.mode;
    collector.msglog.fsync = log.fsync;
    collector.validate()?;
    let collector = services
        .start_on_loopback("collector", runnel_collector::run, collector)
        .await;
    Ok((format!("{scheme}://{}", collector.grpc), client))
}

/// Sends `total` events from `args.concurrency` clients; returns per-call latencies (µs).
async fn drive(
    args: &IngestArgs,
    channel: Peer,
    total: u64,
    label: &'static str,
) -> Result<(Histogram<u64>, Arc<Totals>)> {
    let totals = Arc::new(Totals {
        sent: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        first_error: std::sync::OnceLock::new(),
    });
    let next_batch = Arc::new(AtomicU64::new(0));
    let batches = total.div_ceil(args.batch);
    let payload = bytes::Bytes::from(vec![b'x'; args.size]);
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..args.concurrency {
        let mut client = CollectorClient::new(channel.clone());
        let (totals, next_batch, payload) = (totals.clone(), next_batch.clone(), payload.clone());
        let (batch, keys) = (args.batch, args.keys.max(1));
        let ack_level = args.ack.level() as i32;
        clients.spawn(async move {
            let mut histogram =
                Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid bounds");
            loop {
                let n = next_batch.fetch_add(1, Ordering::Relaxed);
                if n >= batches {
                    break;
                }
                let events = (0..batch)
                    .map(|i| {
                        let seq = n * batch + i;
                        Event {
                            id: format!("{label}-{seq}"),
                            key: format!("key-{}", seq % keys),
                            r#type: "bench".into(),
                            payload: payload.clone(),
                            ..Default::default()
                        }
                    })
                    .collect();
                let started = Instant::now();
                match client.ingest(IngestRequest { events, ack_level }).await {
                    Ok(_) => {
                        let micros =
                            u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
                        let _ = histogram.record(micros.max(1));
                        totals.sent.fetch_add(batch, Ordering::Relaxed);
                    }
                    Err(status) => {
                        totals.errors.fetch_add(1, Ordering::Relaxed);
                        if totals.first_error.set(status.clone()).is_ok() {
                            eprintln!(
                                "bench: a call failed ({label}): {:?}: {}",
                                status.code(),
                                status.message()
                            );
                        }
                    }
                }
            }
            histogram
        });
    }
    let progress_totals = totals.clone();
    let progress = tokio::spawn(async move {
        let started = Instant::now();
        let mut tick = tokio::time::interval(Duration::from_secs(2));
        tick.tick().await;
        loop {
            tick.tick().await;
            let sent = progress_totals.sent.load(Ordering::Relaxed);
            eprintln!(
                "bench {label}: {sent}/{total} events ({:.0}/s)",
                sent as f64 / started.elapsed().as_secs_f64()
            );
        }
    });
    let mut merged = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    while let Some(joined) = clients.join_next().await {
        merged.add(joined?)?;
    }
    progress.abort();
    Ok((merged, totals))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The secure pipeline `--secure` measures must actually accept events: a grant
    /// missing for one hop would make every call fail, and a benchmark of failures.
    #[tokio::test]
    async fn the_secure_in_process_pipeline_acknowledges_what_it_is_sent() {
        let data = tempfile_dir().unwrap();
        let mut services = Services::new();
        let log = LogArgs {
            mode: Mode::Hml,
            fsync: FsyncPolicy::Never,
        };
        let certs = data.path().join("certs");
        let (url, connect) = start_in_process(
            FsyncPolicy::Never,
            BrokerConfig::default().dedup_max_events,
            &log,
            Some(&certs),
            data.path(),
            &mut services,
        )
        .await
        .unwrap();
        assert!(url.starts_with("https://"), "{url}");
        let channel = runnel_security::connect(&url, &connect, None)
            .await
            .unwrap();
        let mut client = CollectorClient::new(channel);
        let event = Event {
            id: "secure-1".into(),
            key: "k".into(),
            r#type: "bench".into(),
            payload: bytes::Bytes::from_static(b"x"),
            ..Default::default()
        };
        let response = client
            .ingest(IngestRequest {
                events: vec![event],
                ack_level: AckLevel::Stored as i32,
            })
            .await
            .unwrap_or_else(|status| panic!("{status:?}"));
        assert_eq!(response.into_inner().receipts.len(), 1);
        // In plaintext the same collector refuses to talk.
        let plain = url.replacen("https://", "http://", 1);
        let plain = runnel_security::connect(&plain, &ConnectConfig::default(), None).await;
        if let Ok(channel) = plain {
            assert!(
                CollectorClient::new(channel)
                    .ingest(IngestRequest::default())
                    .await
                    .is_err()
            );
        }
        drop(client);
        crate::stop(services).await.unwrap();
    }
}
