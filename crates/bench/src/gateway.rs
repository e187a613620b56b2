//! `runnel bench gateway`: the data access tier's read throughput and latency, and how many
//! live watchers it holds and how fast it reaches them.
//!
//! It starts a store and a gateway in this process on ephemeral loopback ports (fresh
//! temporary data directory, in-process hot tier), writes `--keys` results, then:
//!
//! 1. **Get over gRPC**: `--concurrency` callers over `--connections` HTTP/2 connections
//!    call `Gateway/Get` for random keys, one call in flight each, for `--seconds`;
//! 2. **Get over HTTP**: the same through `GET /v1/results/{query}/{key}` (HTTP/1.1
//!    keep-alive, one connection per caller);
//! 3. **Redis, the peer**: `redis-benchmark -t get -c <concurrency>` against a
//!    `redis-server` the harness starts on a free loopback port (and stops), when both are
//!    installed ([`crate::redis_peer`]);
//!
//!    the three alternate, `--runs` times, and each figure is printed as min / median /
//!    max over the runs, with Runnel's gRPC `Get` over Redis's GET as a ratio;
//! 4. **fan-out**: opens `--watchers` live streams (`--protocol sse`, `ws` or `grpc`), then writes
//!    `--events` results one at a time, each stamped with the time just before its `Put`,
//!    and measures the delay from that stamp to each watcher's receipt (the store's commit
//!    included).
//!
//! Every watcher is its own TCP connection, so the harness raises its open-file limit as
//! far as it may; it says so and holds fewer watchers when the limit is too low.

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use hdrhistogram::Histogram;
use runnel_gateway::GatewayConfig;
use runnel_proto::Millis;
use runnel_proto::v1::gateway_client::GatewayClient;
use runnel_proto::v1::store_client::StoreClient;
use runnel_proto::v1::{GetRequest, PutRequest, QueryResult, WatchRequest};
use runnel_server::ServiceConfig;
use runnel_store::StoreConfig;
use runnel_testkit::Services;
use runnel_testkit::process::ServiceProcess;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const QUERY: &str = "bench";
const FANOUT_QUERY: &str = "fanout";
/// The value each fan-out result carries its send time in (Unix µs; exact in an f64).
const SENT_AT: &str = "sent_at_us";

/// Which live protocol the fan-out phase uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Protocol {
    /// Server-sent events (`/v1/watch`).
    Sse,
    /// WebSockets (`/v1/ws`).
    Ws,
    /// gRPC `Gateway/Watch`, one HTTP/2 connection per watcher.
    Grpc,
}

/// Arguments of `runnel bench gateway`.
#[derive(Debug, clap::Args)]
pub struct GatewayArgs {
    /// Keys written before the reads, each read at random.
    #[arg(long, default_value_t = 10_000)]
    keys: u64,
    /// Concurrent callers in the Get phases, one call in flight each.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=4096))]
    concurrency: u64,
    /// HTTP/2 connections the gRPC callers share.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=256))]
    connections: u64,
    /// Length of each Get phase, after a one-second warm-up.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Live watchers in the fan-out phase (0 skips it).
    #[arg(long, default_value_t = 10_000)]
    watchers: u64,
    /// The fan-out phase's protocol.
    #[arg(long, value_enum, default_value_t = Protocol::Sse)]
    protocol: Protocol,
    /// Results written in the fan-out phase, one every `--interval-ms`.
    #[arg(long, default_value_t = 20)]
    events: u64,
    /// Milliseconds between fan-out writes.
    #[arg(long, default_value_t = 250)]
    interval_ms: u64,
    /// Skip the Get phases.
    #[arg(long)]
    fanout_only: bool,
    /// Runs of the Get phases (gRPC, HTTP and Redis alternately); figures are min /
    /// median / max over them.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=50))]
    runs: u64,
    /// Run the store and the gateway as processes of their own (the `runnel-store` and
    /// `runnel-gateway` binaries beside this one, which `cargo build --release --workspace
    /// --bins` makes) instead of in this one: each fan-out watcher is then one socket here
    /// and one there, so 10 000 of them fit an open-file limit of 20 000 on each side.
    #[arg(long)]
    processes: bool,
}

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 120_000_000, 3).expect("valid bounds")
}

fn ms(histogram: &Histogram<u64>, quantile: f64) -> f64 {
    histogram.value_at_quantile(quantile) as f64 / 1000.0
}

struct Running {
    store: String,
    gateway: String,
    http: SocketAddr,
    /// With `--processes`: the store and the gateway (killed when dropped).
    _processes: Vec<ServiceProcess>,
    _dir: tempfile::TempDir,
}

/// Starts the store and the gateway as processes of their own, configured as [`start`]
/// configures them in process.
async fn start_processes(args: &GatewayArgs) -> Result<Running> {
    let dir = tempfile::Builder::new().prefix("runnel-bench-").tempdir()?;
    let config = dir.path().join("runnel.toml");
    let server = |section: &str| {
        format!("[{section}.server]\ngrpc = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n")
    };
    std::fs::write(
        &config,
        format!(
            "[store]\ndata_dir = {:?}\n{}[gateway]\nhttp = \"127.0.0.1:0\"\ndata_dir = {:?}\nmax_watchers = {}\n{}",
            dir.path().join("store"),
            server("store"),
            dir.path().join("gateway"),
            args.watchers + args.concurrency + 16,
            server("gateway"),
        ),
    )?;
    let store =
        ServiceProcess::start("runnel-store", &config, &BTreeMap::new(), dir.path()).await?;
    let env = BTreeMap::from([("RUNNEL_GATEWAY__STORE".to_owned(), store.url())]);
    let gateway = ServiceProcess::start("runnel-gateway", &config, &env, dir.path()).await?;
    eprintln!(
        "bench: the store and the gateway run as processes {} and {}",
        store.grpc, gateway.grpc
    );
    Ok(Running {
        store: store.url(),
        gateway: gateway.url(),
        http: gateway.http.context("the gateway's http listener")?,
        _processes: vec![gateway, store],
        _dir: dir,
    })
}

async fn start(args: &GatewayArgs, services: &mut Services) -> Result<Running> {
    if args.processes {
        return start_processes(args).await;
    }
    let dir = tempfile::Builder::new().prefix("runnel-bench-").tempdir()?;
    let store = StoreConfig {
        server: runnel_server::ServerConfig::loopback(0, 0),
        data_dir: dir.path().join("store"),
        ..StoreConfig::default()
    };
    store.validate()?;
    let store = services
        .start_on_loopback("store", runnel_store::run, store)
        .await;
    let store_url = format!("http://{}", store.grpc);
    let gateway = GatewayConfig {
        server: runnel_server::ServerConfig::loopback(0, 0),
        store: store_url.clone(),
        http: SocketAddr::from(([127, 0, 0, 1], 0)),
        max_watchers: usize::try_from(args.watchers + args.concurrency + 16)?,
        ..GatewayConfig::default()
    };
    gateway.validate()?;
    let gateway = services
        .start_on_loopback("gateway", runnel_gateway::run, gateway)
        .await;
    let gateway_url = format!("http://{}", gateway.grpc);
    let http = gateway.http.context("an http listener")?;
    Ok(Running {
        store: store_url,
        gateway: gateway_url,
        http,
        _processes: Vec::new(),
        _dir: dir,
    })
}

fn result(query: &str, key: String, start: i64, values: Vec<(String, f64)>) -> QueryResult {
    QueryResult {
        query: query.into(),
        key,
        window_start: Some(Millis(start).into()),
        window_end: Some(Millis(start + 60_000).into()),
        values: values.into_iter().collect(),
        ..Default::default()
    }
}

pub(crate) async fn run(args: GatewayArgs) -> Result<ExitCode> {
    let mut services = Services::new();
    let running = start(&args, &mut services).await?;
    services
        .during(measure(&args, &running))
        .await
        .map_err(anyhow::Error::msg)??;
    crate::stop(services).await?;
    Ok(ExitCode::SUCCESS)
}

/// Writes `args.keys` results to the store, then measures the gateway's reads and fan-out.
async fn measure(args: &GatewayArgs, running: &Running) -> Result<()> {
    let mut store = StoreClient::connect(running.store.clone()).await?;
    eprintln!("bench: writing {} keys", args.keys);
    for chunk in (0..args.keys).collect::<Vec<_>>().chunks(5000) {
        let results = chunk
            .iter()
            .map(|k| {
                let values = vec![("count".into(), *k as f64), ("avg".into(), 1.5)];
                result(QUERY, format!("key-{k}"), 0, values)
            })
            .collect();
        store
            .put(PutRequest {
                results,
                fence: None,
            })
            .await?;
    }
    if !args.fanout_only {
        gets(args, running).await?;
    }
    if args.watchers > 0 {
        fan_out(args, running, &mut store).await?;
    }
    Ok(())
}

/// One run's figures of one system: calls per second and p99 in ms.
#[derive(Debug, Clone, Copy)]
struct Figures {
    rate: f64,
    p99_ms: Option<f64>,
}

/// `min / median / max` of `values` (the median of an even count is the upper middle one).
fn spread(values: impl IntoIterator<Item = f64>, decimals: usize) -> String {
    let mut values: Vec<f64> = values.into_iter().collect();
    if values.is_empty() {
        return "n/a".into();
    }
    values.sort_by(f64::total_cmp);
    let (min, median, max) = (
        values[0],
        values[values.len() / 2],
        values[values.len() - 1],
    );
    format!("{min:.decimals$} / {median:.decimals$} / {max:.decimals$}")
}

/// The Get phases, `--runs` times: Runnel over gRPC and HTTP and, when it is installed,
/// Redis — alternately, so that all three meet the same machine — then the spreads.
async fn gets(args: &GatewayArgs, running: &Running) -> Result<()> {
    let redis = match crate::redis_peer::RedisPeer::start().await {
        Ok(redis) => redis,
        Err(error) => {
            eprintln!(
                "bench: cannot start redis-server ({error:#}); measuring without the Redis peer"
            );
            None
        }
    };
    // About as many requests as Redis serves in `--seconds` on this machine kind.
    let redis_requests = (args.seconds * 150_000).max(10_000);
    let (mut grpc, mut http, mut peer) = (Vec::new(), Vec::new(), Vec::new());
    let measured = async {
        for run in 1..=args.runs {
            eprintln!("bench: run {run} of {}", args.runs);
            let (rate, latency, errors) = get_grpc(args, &running.gateway).await?;
            report("Get over gRPC", args, rate, &latency, errors);
            grpc.push(Figures {
                rate,
                p99_ms: Some(ms(&latency, 0.99)),
            });
            let (rate, latency, errors) = get_http(args, running.http).await?;
            report("Get over HTTP", args, rate, &latency, errors);
            http.push(Figures {
                rate,
                p99_ms: Some(ms(&latency, 0.99)),
            });
            if let Some(redis) = &redis {
                eprintln!(
                    "bench: redis-benchmark -t get -c {} -n {redis_requests}",
                    args.concurrency
                );
                let figures = redis.get(args.concurrency, redis_requests).await?;
                println!(
                    "Redis GET      {:.0} calls/s  p99 {} ms  ({} clients)",
                    figures.rate,
                    figures.p99_ms.map_or("n/a".into(), |p| format!("{p:.3}")),
                    args.concurrency
                );
                peer.push(Figures {
                    rate: figures.rate,
                    p99_ms: figures.p99_ms,
                });
            }
        }
        anyhow::Ok(())
    }
    .await;
    if let Some(redis) = redis {
        redis.stop().await?;
    }
    measured?;
    let runs = args.runs;
    println!();
    println!(
        "| Get, {} callers, {runs} runs | calls/s: min / median / max | p99 ms: min / median / max |",
        args.concurrency
    );
    println!("|---|---:|---:|");
    let row = |name: &str, figures: &[Figures]| {
        println!(
            "| {name} | {} | {} |",
            spread(figures.iter().map(|f| f.rate), 0),
            spread(figures.iter().filter_map(|f| f.p99_ms), 3)
        );
    };
    row("Runnel gateway, gRPC", &grpc);
    row("Runnel gateway, HTTP", &http);
    if peer.is_empty() {
        println!("| Redis GET (redis-benchmark) | not measured | not measured |");
    } else {
        row("Redis GET (redis-benchmark)", &peer);
        // Each run's ratio, so that a slow moment of the machine hits both sides of it.
        let ratios = grpc.iter().zip(&peer).map(|(g, r)| g.rate / r.rate);
        let http_ratios = http.iter().zip(&peer).map(|(h, r)| h.rate / r.rate);
        println!();
        println!(
            "Runnel ÷ Redis, calls/s per run, min / median / max: gRPC {}, HTTP {}",
            spread(ratios, 2),
            spread(http_ratios, 2)
        );
    }
    Ok(())
}

fn report(what: &str, args: &GatewayArgs, rate: f64, latency: &Histogram<u64>, errors: u64) {
    println!(
        "{what:<14} {rate:.0} calls/s  p50 {:.3} ms  p99 {:.3} ms  max {:.2} ms  ({errors} failed; {} callers)",
        ms(latency, 0.5),
        ms(latency, 0.99),
        latency.max() as f64 / 1000.0,
        args.concurrency,
    );
}

/// Runs `call` from `concurrency` tasks for a warm-up second, then `seconds`; returns calls
/// per second, latencies (µs) and failures.
async fn drive<F, Fut>(args: &GatewayArgs, call: F) -> Result<(f64, Histogram<u64>, u64)>
where
    F: Fn(u64, u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let call = Arc::new(call);
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let (calls, errors) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut tasks = tokio::task::JoinSet::new();
    for caller in 0..args.concurrency {
        let (call, measuring, stop) = (call.clone(), measuring.clone(), stop.clone());
        let (calls, errors, keys) = (calls.clone(), errors.clone(), args.keys.max(1));
        tasks.spawn(async move {
            let mut latency = histogram();
            let mut n = caller.wrapping_mul(2_654_435_761);
            while !stop.load(Ordering::Relaxed) {
                n = n.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                let started = Instant::now();
                let ok = call(caller, (n >> 33) % keys).await;
                if measuring.load(Ordering::Relaxed) {
                    let micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
                    let _ = latency.record(micros.max(1));
                    calls.fetch_add(1, Ordering::Relaxed);
                    if !ok {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            latency
        });
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    measuring.store(true, Ordering::Relaxed);
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.seconds)).await;
    measuring.store(false, Ordering::Relaxed);
    let elapsed = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let mut merged = histogram();
    while let Some(joined) = tasks.join_next().await {
        merged.add(joined?)?;
    }
    let rate = calls.load(Ordering::Relaxed) as f64 / elapsed;
    Ok((rate, merged, errors.load(Ordering::Relaxed)))
}

async fn get_grpc(args: &GatewayArgs, url: &str) -> Result<(f64, Histogram<u64>, u64)> {
    let mut clients = Vec::new();
    for _ in 0..args.connections {
        let channel = tonic::transport::Endpoint::from_shared(url.to_owned())?
            .tcp_nodelay(true)
            .connect()
            .await?;
        clients.push(GatewayClient::new(channel));
    }
    eprintln!(
        "bench: Get over gRPC, {} callers on {} connections, {} s",
        args.concurrency, args.connections, args.seconds
    );
    drive(args, move |caller, key| {
        let mut client = clients[(caller as usize) % clients.len()].clone();
        async move {
            let request = GetRequest {
                query: QUERY.into(),
                key: format!("key-{key}"),
            };
            matches!(client.get(request).await, Ok(r) if r.get_ref().result.is_some())
        }
    })
    .await
}

async fn get_http(args: &GatewayArgs, http: SocketAddr) -> Result<(f64, Histogram<u64>, u64)> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(usize::try_from(args.concurrency)?)
        .tcp_nodelay(true)
        .build()?;
    eprintln!(
        "bench: Get over HTTP, {} callers, {} s",
        args.concurrency, args.seconds
    );
    drive(args, move |_, key| {
        let client = client.clone();
        async move {
            let url = format!("http://{http}/v1/results/{QUERY}/key-{key}");
            match client.get(url).send().await {
                Ok(response) if response.status().is_success() => response.bytes().await.is_ok(),
                _ => false,
            }
        }
    })
    .await
}

/// Raises the soft open-file limit to the hard one (and the hard one, if allowed, to what
/// `wanted` needs); returns the soft limit in force.
fn raise_file_limit(wanted: u64) -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return 1024;
    };
    let target_hard = hard.max(wanted);
    if setrlimit(Resource::RLIMIT_NOFILE, target_hard, target_hard).is_ok() {
        return target_hard;
    }
    if setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        return hard;
    }
    soft
}

/// One watcher's delays (µs), one per result it got. A plain vector, merged into one
/// histogram at the end: a histogram per watcher is ~0.5 MB, and faulting in 10 000 of them
/// while results are delivered was most of what the first runs of this harness measured.
type Deliveries = Vec<u64>;

async fn fan_out(
    args: &GatewayArgs,
    running: &Running,
    store: &mut StoreClient<tonic::transport::Channel>,
) -> Result<()> {
    // Each watcher is a client socket here, and a server socket here too unless the
    // gateway runs as its own process.
    let per_watcher = if args.processes { 1 } else { 2 };
    let wanted = args.watchers * per_watcher + 1024;
    let limit = raise_file_limit(wanted);
    let watchers = if limit < wanted {
        let fit = limit.saturating_sub(1024) / per_watcher;
        eprintln!(
            "bench: the open-file limit is {limit}; holding {fit} watchers instead of {}",
            args.watchers
        );
        fit
    } else {
        args.watchers
    };
    eprintln!("bench: opening {watchers} {:?} watchers", args.protocol);
    let opened = Arc::new(AtomicU64::new(0));
    let (all_open, ready) = tokio::sync::watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    let total = args.events;
    for i in 0..watchers {
        let opened = opened.clone();
        let mut ready = ready.clone();
        let protocol = args.protocol;
        let (http, grpc) = (running.http, running.gateway.clone());
        tasks.spawn(async move {
            let watched = watch(protocol, http, &grpc, total, &opened, &mut ready).await;
            if let Err(error) = &watched
                && i == 0
            {
                eprintln!("bench: watcher failed: {error:#}");
            }
            watched.ok()
        });
        // Open gently: a burst of connects overflows the listen backlog.
        if i % 500 == 499 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let started = Instant::now();
    while opened.load(Ordering::Relaxed) < watchers && started.elapsed() < Duration::from_secs(120)
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let open = opened.load(Ordering::Relaxed);
    eprintln!(
        "bench: {open} watchers subscribed in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    let _ = all_open.send(true);
    if open == 0 {
        bail!("no watcher could subscribe");
    }
    for event in 0..args.events {
        tokio::time::sleep(Duration::from_millis(args.interval_ms)).await;
        let sent_at = now_micros();
        let values = vec![(SENT_AT.to_owned(), sent_at as f64)];
        let results = vec![result(
            FANOUT_QUERY,
            "k".into(),
            i64::try_from(event)? * 60_000,
            values,
        )];
        store
            .put(PutRequest {
                results,
                fence: None,
            })
            .await?;
    }
    let mut delays = histogram();
    let mut delivered = 0;
    let deadline = tokio::time::sleep(Duration::from_secs(60));
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            joined = tasks.join_next() => match joined {
                Some(Ok(Some(got))) => {
                    for delay in &got {
                        let _ = delays.record((*delay).max(1));
                    }
                    delivered += got.len() as u64;
                }
                Some(_) => {}
                None => break,
            },
            () = &mut deadline => {
                eprintln!("bench: {} watchers still waiting after 60 s; stopping them", tasks.len());
                tasks.abort_all();
                break;
            }
        }
    }
    println!(
        "fan-out {:?}    {open} watchers held; {delivered} of {} deliveries; delay from Put to receipt p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms",
        args.protocol,
        open * args.events,
        ms(&delays, 0.5),
        ms(&delays, 0.99),
        delays.max() as f64 / 1000.0
    );
    Ok(())
}

/// One watcher: subscribes, counts itself open, and records the delay of each result.
async fn watch(
    protocol: Protocol,
    http: SocketAddr,
    grpc: &str,
    total: u64,
    opened: &AtomicU64,
    ready: &mut tokio::sync::watch::Receiver<bool>,
) -> Result<Deliveries> {
    match protocol {
        Protocol::Sse => watch_sse(http, total, opened, ready).await,
        Protocol::Ws => watch_ws(http, total, opened, ready).await,
        Protocol::Grpc => watch_grpc(grpc, total, opened, ready).await,
    }
}

/// The send stamp in `text` after `from`, and where it ends.
fn stamp(text: &[u8], from: usize) -> Option<(u64, usize)> {
    let needle = format!("\"{SENT_AT}\":");
    let at = text[from..]
        .windows(needle.len())
        .position(|w| w == needle.as_bytes())?
        + from
        + needle.len();
    let end = text[at..]
        .iter()
        .position(|b| !(b.is_ascii_digit() || matches!(b, b'.' | b'e' | b'E' | b'+' | b'-')))?
        + at;
    let value: f64 = std::str::from_utf8(&text[at..end]).ok()?.parse().ok()?;
    Some((value as u64, end))
}

async fn watch_sse(
    http: SocketAddr,
    total: u64,
    opened: &AtomicU64,
    ready: &mut tokio::sync::watch::Receiver<bool>,
) -> Result<Deliveries> {
    let mut stream = tokio::net::TcpStream::connect(http).await?;
    stream.set_nodelay(true)?;
    let request = format!(
        "GET /v1/watch?query={FANOUT_QUERY} HTTP/1.1\r\nHost: {http}\r\nAccept: text/event-stream\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    let mut buffer = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    // The headers arrive once the gateway has subscribed this client.
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            bail!("closed before the headers");
        }
        buffer.extend_from_slice(&chunk[..n]);
        if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            if !buffer.starts_with(b"HTTP/1.1 200") {
                bail!("{}", String::from_utf8_lossy(&buffer[..end]));
            }
            buffer.drain(..end + 4);
            break;
        }
    }
    opened.fetch_add(1, Ordering::Relaxed);
    let _ = ready.wait_for(|open| *open).await;
    let mut delays = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
    while (delays.len() as u64) < total {
        let mut from = 0;
        while let Some((sent_at, end)) = stamp(&buffer, from) {
            delays.push(now_micros().saturating_sub(sent_at));
            from = end;
        }
        buffer.drain(..from);
        if delays.len() as u64 >= total {
            break;
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buffer.extend_from_slice(&chunk[..n]);
    }
    Ok(delays)
}

async fn watch_grpc(
    url: &str,
    total: u64,
    opened: &AtomicU64,
    ready: &mut tokio::sync::watch::Receiver<bool>,
) -> Result<Deliveries> {
    // Its own connection, as each SSE or WebSocket watcher has.
    let channel = tonic::transport::Endpoint::from_shared(url.to_owned())?
        .tcp_nodelay(true)
        .connect()
        .await?;
    let mut client = GatewayClient::new(channel);
    let request = WatchRequest {
        query: FANOUT_QUERY.into(),
        ..Default::default()
    };
    let mut stream = client.watch(request).await?.into_inner();
    opened.fetch_add(1, Ordering::Relaxed);
    let _ = ready.wait_for(|open| *open).await;
    let mut delays = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
    while (delays.len() as u64) < total {
        let Some(result) = stream.message().await? else {
            break;
        };
        if let Some(sent_at) = result.values.get(SENT_AT) {
            delays.push(now_micros().saturating_sub(*sent_at as u64));
        }
    }
    Ok(delays)
}

async fn watch_ws(
    http: SocketAddr,
    total: u64,
    opened: &AtomicU64,
    ready: &mut tokio::sync::watch::Receiver<bool>,
) -> Result<Deliveries> {
    let url = format!("ws://{http}/v1/ws?query={FANOUT_QUERY}");
    let (mut socket, _) = tokio_tungstenite::connect_async(url.as_str()).await?;
    opened.fetch_add(1, Ordering::Relaxed);
    let _ = ready.wait_for(|open| *open).await;
    let mut delays = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
    while (delays.len() as u64) < total {
        let Some(message) = socket.next().await else {
            break;
        };
        let message = message?;
        if let Ok(text) = message.to_text()
            && let Some((sent_at, _)) = stamp(text.as_bytes(), 0)
        {
            delays.push(now_micros().saturating_sub(sent_at));
        }
    }
    Ok(delays)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_are_found_across_events() {
        let text = br#"data: {"values":{"sent_at_us":1764619000000000.0}}

data: {"values":{"sent_at_us":1764619000000001}}"#;
        let (first, end) = stamp(text, 0).unwrap();
        assert_eq!(first, 1_764_619_000_000_000);
        let (second, _) = stamp(text, end).unwrap();
        assert_eq!(second, 1_764_619_000_000_001);
        assert!(
            stamp(br#"{"sent_at_us":12"#, 0).is_none(),
            "an unfinished number waits"
        );
    }
}
