//! `runnel bench e2e`: the whole pipeline's latency, from an event's acknowledgement at the
//! collector to its result at a gateway `Watch` client.
//!
//! Each run starts the five services in this process — collector → broker → analyzer →
//! store → gateway, wired as `runnel up` wires them, on ephemeral loopback ports, with the
//! product's default durability (printed) — in a fresh data directory removed afterwards.
//! The analyzer runs one query, given in SQL as `runnel.toml` would give it:
//!
//! - **emit on update**: `max(payload.seq)` per key in a one-hour tumbling window, `EMIT
//!   ON UPDATE`. Every event carries its key's next sequence number, and a key gets its
//!   next event only once the previous one is acknowledged (so stored after it), so a
//!   result whose `seq` is `n` is the first to reflect every event of the key up to `n`:
//!   each event's latency is from its acknowledgement to the first result that reflects it;
//! - **emit on close**: `count(*)` per key in one-second tumbling windows, with no allowed
//!   out-of-orderness or lateness, so a window closes as soon as its partition delivers an
//!   event past its end. The harness knows, per partition, the first event it sent past
//!   each window's end; a window's latency is from the acknowledgement of that event to
//!   the receipt of the window's result (a later call overtaking it on the way to the
//!   broker would close the window a little earlier, which only adds to the figure).
//!
//! Events go in through `Ingest` (acknowledged at the default level, STORED), paced
//! open-loop at `--rate` in calls of at most `--batch` events every millisecond, however
//! slowly earlier calls are answered. Without `--rate`, the pipeline's peak is measured
//! first (or taken from `--peak`): a closed loop in which each of `--keys` keys has one
//! event at a time in the pipeline, sent again (at the next tick) once its result arrives,
//! with the emit-on-update query (every event makes a result: the heavier of the two). Both
//! queries are then measured at 10, 50 and 90 % of it. Every figure is min / median / max
//! over `--runs` runs, each with its own pipeline.

use anyhow::{Context, Result, bail};
use hdrhistogram::Histogram;
use runnel_analyzer::{AnalyzerConfig, QueryConfig};
use runnel_broker::BrokerConfig;
use runnel_collector::CollectorConfig;
use runnel_gateway::GatewayConfig;
use runnel_proto::v1::analyzer_client::AnalyzerClient;
use runnel_proto::v1::broker_client::BrokerClient;
use runnel_proto::v1::collector_client::CollectorClient;
use runnel_proto::v1::gateway_client::GatewayClient;
use runnel_proto::v1::{
    CreateTopicRequest, DescribeQueryRequest, Event, IngestRequest, QueryResult, WatchRequest,
};
use runnel_proto::{Millis, now_millis, partition_for_key};
use runnel_server::ServiceConfig;
use runnel_store::StoreConfig;
use runnel_testkit::Services;
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tonic::transport::Channel;

/// Events sent and not yet answered by a result (or, emitting on close, not yet
/// acknowledged) beyond which the pacer waits: the harness's memory stays bounded when
/// the pipeline falls behind the offered rate.
const MAX_OUTSTANDING: u64 = 1 << 20;

/// How long the first result may take to come out of a fresh pipeline.
const WARMUP_DEADLINE: Duration = Duration::from_secs(60);

/// How long after the measured seconds the results of the measured events may take.
const DRAIN_DEADLINE: Duration = Duration::from_secs(30);

/// Arguments of `runnel bench e2e`.
#[derive(Debug, Clone, clap::Args)]
pub struct E2eArgs {
    /// Measure at this offered rate only (events/s), instead of at 10, 50 and 90 % of the
    /// peak.
    #[arg(long)]
    rate: Option<u64>,
    /// The pipeline's peak (events/s), instead of measuring it.
    #[arg(long, conflicts_with = "rate")]
    peak: Option<u64>,
    /// Runs of every measurement, each with a pipeline of its own.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    runs: u32,
    /// Measured seconds of each run at a share of the peak (after a warm-up).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    seconds: u64,
    /// Measured seconds of each closed-loop run that finds the peak.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=3600))]
    peak_seconds: u64,
    /// Keys the events are spread over; in the closed loop, also the events in flight.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    keys: u32,
    /// The most events in one `Ingest` call.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    batch: u64,
    /// HTTP/2 connections the calls to the collector share.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=64))]
    connections: u64,
    /// Where each run's pipeline keeps its files (default: a temporary directory under the
    /// current one, so the disk measured is the one the repository is on).
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

/// Which query a run measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Emit {
    OnUpdate,
    OnClose,
}

impl Emit {
    fn query(self) -> &'static str {
        match self {
            Emit::OnUpdate => "e2e_update",
            Emit::OnClose => "e2e_close",
        }
    }

    fn sql(self) -> String {
        let topic = CollectorConfig::default().topic;
        match self {
            Emit::OnUpdate => format!(
                "SELECT key, max(payload.seq) AS seq FROM {topic} \
                 GROUP BY key, TUMBLE(event_time, INTERVAL '1' HOUR) EMIT ON UPDATE"
            ),
            Emit::OnClose => format!(
                "SELECT key, count(*) AS count FROM {topic} \
                 GROUP BY key, TUMBLE(event_time, INTERVAL '1' SECOND) EMIT ON CLOSE \
                 WITH (out_of_orderness = '0s', allowed_lateness = '0s')"
            ),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Emit::OnUpdate => "emit on update",
            Emit::OnClose => "emit on close (1 s tumbling)",
        }
    }
}

/// How a run offers its load.
#[derive(Debug, Clone, Copy)]
enum Pace {
    /// Open loop: this many events per second, whatever the answers.
    Rate(u64),
    /// Closed loop: each key's next event once its previous one has its result.
    Closed,
}

/// One run's shape.
#[derive(Debug, Clone, Copy)]
struct Spec {
    emit: Emit,
    pace: Pace,
    seconds: u64,
    keys: u32,
    batch: u64,
    connections: u64,
}

/// One run's figures.
#[derive(Debug)]
struct Figures {
    /// Events acknowledged per second, of those sent in the measured seconds.
    in_rate: f64,
    /// Measured events (on update) or windows (on close) whose result arrived, per second.
    out_rate: f64,
    /// Acknowledgement → receipt, µs, of everything measured.
    latency: Histogram<u64>,
    /// Events (on update) or windows (on close) matched to their result.
    matched: u64,
    /// Results that answered nothing the harness sent (or answered it twice).
    unmatched: u64,
    /// Measured events or windows whose result never came.
    missing: u64,
    /// Results that arrived before the acknowledgement they are timed from (counted as 0).
    before_ack: u64,
    /// Events the analyzer dropped as late: an event overtaken on its way to the broker by
    /// the one that closed its window (on close), whose window may then have no result.
    late: u64,
}

pub(crate) async fn run(args: E2eArgs) -> Result<ExitCode> {
    let base = args.data_dir.clone().unwrap_or_else(|| PathBuf::from("."));
    std::fs::create_dir_all(&base).with_context(|| format!("create {}", base.display()))?;
    let collector = CollectorConfig::default();
    println!(
        "durability (the defaults): Ingest acknowledged at STORED; collector message log {} (fsync {}); broker fsync {}; store fsync {}; analyzer checkpoint every {:?}",
        collector.msglog.mode,
        collector.msglog.fsync,
        BrokerConfig::default().fsync,
        StoreConfig::default().fsync,
        AnalyzerConfig::default().checkpoint_interval,
    );
    for emit in [Emit::OnUpdate, Emit::OnClose] {
        println!("{}: {}", emit.query(), emit.sql());
    }
    let spec = |emit, pace, seconds| Spec {
        emit,
        pace,
        seconds,
        keys: args.keys,
        batch: args.batch,
        connections: args.connections,
    };
    let mut rows = Vec::new();
    let rates: Vec<(String, u64)> = match (args.rate, args.peak) {
        (Some(rate), _) => vec![(format!("{rate} events/s"), rate)],
        (None, peak) => {
            let peak = match peak {
                Some(peak) => peak,
                None => {
                    let runs = runs(
                        &base,
                        args.runs,
                        spec(Emit::OnUpdate, Pace::Closed, args.peak_seconds),
                    )
                    .await?;
                    let peak = crate::median(runs.iter().map(|f| f.out_rate).collect()) as u64;
                    rows.push(Row {
                        emit: Emit::OnUpdate,
                        load: format!("peak: closed loop, {} keys", args.keys),
                        runs,
                    });
                    peak
                }
            };
            if peak == 0 {
                bail!("the pipeline's peak is 0 events/s");
            }
            [10, 50, 90]
                .into_iter()
                .map(|share| {
                    let rate = (peak * share / 100).max(1);
                    (format!("{share} % of {peak}: {rate} events/s"), rate)
                })
                .collect()
        }
    };
    for emit in [Emit::OnUpdate, Emit::OnClose] {
        for (load, rate) in &rates {
            let runs = runs(
                &base,
                args.runs,
                spec(emit, Pace::Rate(*rate), args.seconds),
            )
            .await?;
            rows.push(Row {
                emit,
                load: load.clone(),
                runs,
            });
        }
    }
    println!();
    println!(
        "| query | load | events/s in | results/s out | p50 ms | p99 ms | p999 ms | results before their ack | late events |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|");
    for row in &rows {
        let ms = |q: f64| -> Vec<f64> {
            row.runs
                .iter()
                .map(|f| f.latency.value_at_quantile(q) as f64 / 1000.0)
                .collect()
        };
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            row.emit.name(),
            row.load,
            crate::spread(row.runs.iter().map(|f| f.in_rate).collect(), 0),
            crate::spread(row.runs.iter().map(|f| f.out_rate).collect(), 0),
            crate::spread(ms(0.5), 2),
            crate::spread(ms(0.99), 2),
            crate::spread(ms(0.999), 2),
            row.runs.iter().map(|f| f.before_ack).sum::<u64>(),
            row.runs.iter().map(|f| f.late).sum::<u64>(),
        );
    }
    println!();
    println!(
        "(min / median / max of {} runs; results/s out: measured results matched per second — on update one per event, on close one per key and window; the last two columns: totals over the runs)",
        args.runs
    );
    Ok(ExitCode::SUCCESS)
}

/// A line of the table: one load, its runs.
struct Row {
    emit: Emit,
    load: String,
    runs: Vec<Figures>,
}

/// `runs` runs of `spec`, each on a fresh pipeline; fails when one matched a result to
/// nothing or lost one.
async fn runs(base: &Path, runs: u32, spec: Spec) -> Result<Vec<Figures>> {
    let mut all = Vec::new();
    for run in 1..=runs {
        eprintln!(
            "bench: {} at {:?}, run {run} of {runs}",
            spec.emit.name(),
            spec.pace
        );
        let figures = measure(base, spec).await?;
        eprintln!(
            "bench: {:.0} events/s in, {:.0}/s out, p50 {:.2} ms, p99 {:.2} ms ({} matched)",
            figures.in_rate,
            figures.out_rate,
            figures.latency.value_at_quantile(0.5) as f64 / 1000.0,
            figures.latency.value_at_quantile(0.99) as f64 / 1000.0,
            figures.matched
        );
        if figures.unmatched > 0 || figures.missing > figures.late {
            bail!(
                "{}: {} results matched no event, {} measured results never came ({} events late)",
                spec.emit.name(),
                figures.unmatched,
                figures.missing,
                figures.late
            );
        }
        all.push(figures);
    }
    Ok(all)
}

/// The five services of one run, and where a client reaches them.
struct Pipeline {
    services: Services,
    collector: String,
    analyzer: String,
    gateway: String,
    dir: tempfile::TempDir,
}

/// Starts the pipeline in a fresh directory under `base`, the analyzer running `emit`'s
/// query, and creates its topic with the partitions a collector would give it.
async fn start(base: &Path, emit: Emit) -> Result<(Pipeline, u32)> {
    let dir = tempfile::Builder::new()
        .prefix("runnel-bench-")
        .tempdir_in(base)?;
    let mut services = Services::new();
    let broker = BrokerConfig {
        server: runnel_server::ServerConfig::loopback(0, 0),
        data_dir: dir.path().join("broker"),
        ..BrokerConfig::default()
    };
    broker.validate()?;
    let broker = services
        .start_on_loopback("broker", runnel_broker::run, broker)
        .await;
    let broker_url = format!("http://{}", broker.grpc);
    let collector = CollectorConfig {
        server: runnel_server::ServerConfig::loopback(0, 0),
        broker: broker_url.clone(),
        data_dir: dir.path().join("collector"),
        udp: None,
        ..CollectorConfig::default()
    };
    let partitions = collector.topic_partitions;
    BrokerClient::connect(broker_url.clone())
        .await?
        .create_topic(CreateTopicRequest {
            name: collector.topic.clone(),
            partitions,
            retention: None,
        })
        .await?;
    let store = StoreConfig {
        server: runnel_server::ServerConfig::loopback(0, 0),
        data_dir: dir.path().join("store"),
        broker: broker_url.clone(),
        ..StoreConfig::default()
    };
    store.validate()?;
    let store = services
        .start_on_loopback("store", runnel_store::run, store)
        .await;
    let store_url = format!("http://{}", store.grpc);
    let analyzer = AnalyzerConfig {
        server: runnel_server::ServerConfig::loopback(0, 0),
        broker: broker_url.clone(),
        store: store_url.clone(),
        queries: vec![QueryConfig {
            name: emit.query().into(),
            sql: Some(emit.sql()),
            ..QueryConfig::default()
        }],
        ..AnalyzerConfig::default()
    };
    analyzer.validate()?;
    let analyzer = services
        .start_on_loopback("analyzer", runnel_analyzer::run, analyzer)
        .await;
    let collector = CollectorConfig {
        store: store_url.clone(),
        ..collector
    };
    collector.validate()?;
    let collector = services
        .start_on_loopback("collector", runnel_collector::run, collector)
        .await;
    let gateway = GatewayConfig {
        server: runnel_server::ServerConfig::loopback(0, 0),
        store: store_url,
        broker: broker_url,
        http: SocketAddr::from(([127, 0, 0, 1], 0)),
        ..GatewayConfig::default()
    };
    gateway.validate()?;
    let gateway = services
        .start_on_loopback("gateway", runnel_gateway::run, gateway)
        .await;
    Ok((
        Pipeline {
            services,
            collector: format!("http://{}", collector.grpc),
            analyzer: format!("http://{}", analyzer.grpc),
            gateway: format!("http://{}", gateway.grpc),
            dir,
        },
        partitions,
    ))
}

/// One run of `spec` on a pipeline of its own, stopped and removed afterwards.
async fn measure(base: &Path, spec: Spec) -> Result<Figures> {
    let (pipeline, partitions) = start(base, spec.emit).await?;
    let Pipeline {
        mut services,
        collector,
        analyzer,
        gateway,
        dir,
    } = pipeline;
    let mut figures = services
        .during(drive(&collector, &gateway, partitions, spec))
        .await
        .map_err(anyhow::Error::msg)??;
    figures.late = AnalyzerClient::connect(analyzer)
        .await?
        .describe_query(DescribeQueryRequest {
            name: spec.emit.query().into(),
        })
        .await?
        .into_inner()
        .late_events;
    crate::stop(services).await?;
    let path = dir.path().to_owned();
    dir.close()
        .with_context(|| format!("remove {}", path.display()))?;
    Ok(figures)
}

/// Where the run is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Until the first result and a second after it: nothing is measured.
    Warmup,
    /// Events sent (or windows closed) now are measured.
    Measure,
    /// Events still flow, unmeasured, until every measured one has its result.
    Drain,
}

/// An event sent (emitting on update) and not yet answered by a result.
struct Sent {
    seq: u64,
    acked: Option<Instant>,
    /// When a result reflected it before its acknowledgement came.
    answered: Option<Instant>,
    measured: bool,
}

/// Who closed a window, as far as the harness knows.
enum Closer {
    /// No event past its end has been sent to its partition yet.
    Open,
    /// The call with the first event past its end is on its way.
    Sent,
    /// That call was acknowledged then.
    Acked(Instant),
}

/// A window of one partition (emitting on close): the keys that have events in it, and
/// what became of their results.
struct Window {
    closer: Closer,
    expected: u64,
    received: u64,
    /// Receipts of results that came before the closing call's acknowledgement.
    early: Vec<Instant>,
    measured: bool,
}

/// One `Ingest` call's bookkeeping.
struct Call {
    events: Vec<(u32, u64)>,
    /// The windows (partition, end) whose first event past the end it carries.
    closes: Vec<(u32, i64)>,
    measured: bool,
}

/// Everything the pacer, the acknowledgements and the watcher share.
struct Book {
    spec: Spec,
    partitions: Vec<u32>,
    phase: Phase,
    /// Keys that may be sent next: nothing of theirs unacknowledged (open loop) or without
    /// a result (closed loop).
    free: VecDeque<u32>,
    /// Per key, the sequence number of its last event.
    seq: Vec<u64>,
    /// Per key, its events without a result yet (on update), oldest first.
    waiting: Vec<VecDeque<Sent>>,
    /// Events sent and not yet answered (on update) or acknowledged (on close).
    outstanding: u64,
    /// Per key, the end of the window its last event went to (on close).
    key_window: Vec<i64>,
    /// Per partition, the end of the window its last event went to (on close).
    partition_window: Vec<i64>,
    windows: HashMap<(u32, i64), Window>,
    /// Measured events or windows still without their result.
    measured_waiting: u64,
    first_result: Option<Instant>,
    measured_acked: u64,
    latency: Histogram<u64>,
    matched: u64,
    unmatched: u64,
    before_ack: u64,
    failure: Option<String>,
}

impl Book {
    fn new(spec: Spec, partitions: u32) -> Result<Book> {
        let keys = spec.keys as usize;
        Ok(Book {
            spec,
            partitions: (0..spec.keys)
                .map(|k| partition_for_key(&key_name(k), partitions))
                .collect(),
            phase: Phase::Warmup,
            free: (0..spec.keys).collect(),
            seq: vec![0; keys],
            waiting: (0..keys).map(|_| VecDeque::new()).collect(),
            outstanding: 0,
            key_window: vec![0; keys],
            partition_window: vec![0; partitions as usize],
            windows: HashMap::new(),
            measured_waiting: 0,
            first_result: None,
            measured_acked: 0,
            latency: Histogram::new_with_bounds(1, 600_000_000, 3)?,
            matched: 0,
            unmatched: 0,
            before_ack: 0,
            failure: None,
        })
    }

    fn closed_loop(&self) -> bool {
        matches!(self.spec.pace, Pace::Closed)
    }

    fn record(&mut self, from: Instant, to: Instant) {
        if to < from {
            self.before_ack += 1;
        }
        let micros = u64::try_from(to.saturating_duration_since(from).as_micros());
        let _ = self.latency.record(micros.unwrap_or(u64::MAX).max(1));
    }

    /// Takes up to `n` keys to send now, with their events; `None` when none is free.
    fn take(&mut self, n: u64, time: i64) -> Option<(Vec<Event>, Call)> {
        let measured = self.phase == Phase::Measure;
        let mut events = Vec::new();
        let mut call = Call {
            events: Vec::new(),
            closes: Vec::new(),
            measured,
        };
        while (events.len() as u64) < n && self.outstanding < MAX_OUTSTANDING {
            let Some(key) = self.free.pop_front() else {
                break;
            };
            let k = key as usize;
            self.seq[k] += 1;
            let seq = self.seq[k];
            self.outstanding += 1;
            match self.spec.emit {
                Emit::OnUpdate => {
                    self.waiting[k].push_back(Sent {
                        seq,
                        acked: None,
                        answered: None,
                        measured,
                    });
                    if measured {
                        self.measured_waiting += 1;
                    }
                }
                Emit::OnClose => self.open_window(key, time, &mut call),
            }
            call.events.push((key, seq));
            events.push(Event {
                id: format!("{}-{seq}", key_name(key)),
                key: key_name(key),
                event_time: Some(Millis(time).into()),
                payload: format!("{{\"seq\":{seq}}}").into(),
                ..Event::default()
            });
        }
        (!events.is_empty()).then_some((events, call))
    }

    /// Counts `key`'s event at `time` into its window, and notes in `call` the window of
    /// its partition it is the first event past.
    fn open_window(&mut self, key: u32, time: i64, call: &mut Call) {
        let end = (time.div_euclid(1000) + 1) * 1000;
        let p = self.partitions[key as usize];
        let previous = self.partition_window[p as usize];
        if previous < end {
            if let Some(window) = self.windows.get_mut(&(p, previous))
                && matches!(window.closer, Closer::Open)
            {
                window.closer = Closer::Sent;
                window.measured = call.measured;
                if call.measured {
                    self.measured_waiting += window.expected - window.received;
                }
                call.closes.push((p, previous));
            }
            self.partition_window[p as usize] = end;
        }
        if self.key_window[key as usize] != end {
            self.key_window[key as usize] = end;
            self.windows
                .entry((p, end))
                .or_insert_with(|| Window {
                    closer: Closer::Open,
                    expected: 0,
                    received: 0,
                    early: Vec::new(),
                    measured: false,
                })
                .expected += 1;
        }
    }

    /// `call` was acknowledged at `at`.
    fn acked(&mut self, call: Call, at: Instant) {
        if call.measured {
            self.measured_acked += call.events.len() as u64;
        }
        for (key, seq) in call.events {
            let k = key as usize;
            match self.spec.emit {
                Emit::OnUpdate => {
                    let mut answered = None;
                    // A key's unacknowledged event is its newest.
                    if let Some(sent) = self.waiting[k].iter_mut().rev().find(|s| s.seq == seq) {
                        sent.acked = Some(at);
                        answered = sent.answered.map(|t| (t, sent.measured));
                    }
                    if let Some((receipt, measured)) = answered {
                        self.waiting[k].retain(|s| s.seq != seq);
                        self.answered(measured, at, receipt);
                    }
                    // A key goes again once its event is stored (open loop: events of a
                    // key are stored in the order sent) or answered (closed loop).
                    if !self.closed_loop() || answered.is_some() {
                        self.free.push_back(key);
                    }
                }
                Emit::OnClose => {
                    self.outstanding -= 1;
                    self.free.push_back(key);
                }
            }
        }
        for id in call.closes {
            let Some(window) = self.windows.get_mut(&id) else {
                continue;
            };
            window.closer = Closer::Acked(at);
            let early = std::mem::take(&mut window.early);
            let measured = window.measured;
            let done = window.received == window.expected;
            for receipt in early {
                if measured {
                    self.record(at, receipt);
                }
            }
            if done {
                self.windows.remove(&id);
            }
        }
    }

    /// An event's result arrived at `receipt`; it was acknowledged at `ack`.
    fn answered(&mut self, measured: bool, ack: Instant, receipt: Instant) {
        self.outstanding -= 1;
        self.matched += 1;
        if measured {
            self.measured_waiting -= 1;
            self.record(ack, receipt);
        }
    }

    /// A result arrived at `receipt`.
    fn result(&mut self, result: &QueryResult, receipt: Instant) {
        self.first_result.get_or_insert(receipt);
        let Some(key) = key_index(&result.key).filter(|k| *k < self.spec.keys) else {
            self.unmatched += 1;
            return;
        };
        match self.spec.emit {
            Emit::OnUpdate => self.update(key, result, receipt),
            Emit::OnClose => self.close(key, result, receipt),
        }
    }

    fn update(&mut self, key: u32, result: &QueryResult, receipt: Instant) {
        if !result.partial {
            // The window's final version, emitted when the watermark passed its end:
            // answers no event.
            return;
        }
        let k = key as usize;
        let Some(upto) = result.values.get("seq").map(|s| *s as u64) else {
            self.unmatched += 1;
            return;
        };
        let fresh = self.waiting[k].front().is_some_and(|s| s.seq <= upto);
        if upto > self.seq[k] || !fresh {
            self.unmatched += 1;
            return;
        }
        while let Some(sent) = self.waiting[k].front_mut() {
            if sent.seq > upto {
                break;
            }
            match sent.acked {
                Some(ack) => {
                    let measured = sent.measured;
                    self.waiting[k].pop_front();
                    self.answered(measured, ack, receipt);
                    if self.closed_loop() {
                        self.free.push_back(key);
                    }
                }
                None => {
                    // Only a key's last event can be unacknowledged: timed at its ack.
                    sent.answered.get_or_insert(receipt);
                    break;
                }
            }
        }
    }

    fn close(&mut self, key: u32, result: &QueryResult, receipt: Instant) {
        let p = self.partitions[key as usize];
        let end = result.window_end.map(Millis::from).unwrap_or_default().0;
        let Some(window) = self.windows.get_mut(&(p, end)) else {
            self.unmatched += 1;
            return;
        };
        if window.received == window.expected || matches!(window.closer, Closer::Open) {
            // More results than keys with events there, or a window closed by something
            // other than the event the harness sent past it.
            self.unmatched += 1;
            return;
        }
        window.received += 1;
        self.matched += 1;
        let measured = window.measured;
        if measured {
            self.measured_waiting -= 1;
        }
        match window.closer {
            Closer::Acked(ack) => {
                if window.received == window.expected {
                    self.windows.remove(&(p, end));
                }
                if measured {
                    self.record(ack, receipt);
                }
            }
            _ => window.early.push(receipt),
        }
    }
}

fn key_name(key: u32) -> String {
    format!("k{key}")
}

fn key_index(name: &str) -> Option<u32> {
    name.strip_prefix('k')?.parse().ok()
}

/// Warms up, measures `spec.seconds`, and waits for the measured results.
async fn drive(collector: &str, gateway: &str, partitions: u32, spec: Spec) -> Result<Figures> {
    let book = Arc::new(Mutex::new(Book::new(spec, partitions)?));
    let mut watch = GatewayClient::connect(gateway.to_owned())
        .await?
        .watch(WatchRequest {
            query: spec.emit.query().into(),
            ..WatchRequest::default()
        })
        .await?
        .into_inner();
    let watcher = {
        let book = book.clone();
        tokio::spawn(async move {
            loop {
                let message = watch.message().await;
                let receipt = Instant::now();
                let mut book = book.lock().unwrap_or_else(|e| e.into_inner());
                match message {
                    Ok(Some(result)) => book.result(&result, receipt),
                    Ok(None) => {
                        book.failure
                            .get_or_insert("the gateway's Watch ended".into());
                        return;
                    }
                    Err(status) => {
                        book.failure
                            .get_or_insert(format!("the gateway's Watch failed: {status}"));
                        return;
                    }
                }
            }
        })
    };
    let mut clients = Vec::new();
    for _ in 0..spec.connections {
        let channel = tonic::transport::Endpoint::from_shared(collector.to_owned())?
            .tcp_nodelay(true)
            .connect()
            .await?;
        clients.push(CollectorClient::new(channel));
    }
    let paced = pace(&book, &clients, spec).await;
    watcher.abort();
    let seconds = paced?;
    let mut book = book.lock().unwrap_or_else(|e| e.into_inner());
    let latency = std::mem::replace(&mut book.latency, Histogram::new(3)?);
    Ok(Figures {
        in_rate: book.measured_acked as f64 / seconds,
        out_rate: latency.len() as f64 / seconds,
        matched: book.matched,
        unmatched: book.unmatched,
        missing: book.measured_waiting,
        before_ack: book.before_ack,
        late: 0,
        latency,
    })
}

/// Sends events as `spec.pace` says through the phases; returns the measured seconds.
async fn pace(
    book: &Arc<Mutex<Book>>,
    clients: &[CollectorClient<Channel>],
    spec: Spec,
) -> Result<f64> {
    let lock = || book.lock().unwrap_or_else(|e| e.into_inner());
    let started = Instant::now();
    // Event times from one monotonic clock: a partition's events never go back in time.
    let epoch = now_millis().0;
    let mut ticker = tokio::time::interval(Duration::from_millis(1));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut calls = tokio::task::JoinSet::new();
    let mut sent = 0u64;
    let mut next_client = 0;
    let mut measure_from = None;
    let mut drain_from = None;
    let mut sent_before = 0;
    loop {
        let now = Instant::now();
        {
            let mut book = lock();
            if let Some(failure) = &book.failure {
                bail!("{failure}");
            }
            match book.phase {
                Phase::Warmup => {
                    if book
                        .first_result
                        .is_some_and(|first| now >= first + Duration::from_secs(1))
                    {
                        book.phase = Phase::Measure;
                        measure_from = Some(now);
                        sent_before = sent;
                    } else if now > started + WARMUP_DEADLINE {
                        bail!("no result reached the gateway within {WARMUP_DEADLINE:?}");
                    }
                }
                Phase::Measure => {
                    if measure_from.is_some_and(|m| now >= m + Duration::from_secs(spec.seconds)) {
                        book.phase = Phase::Drain;
                        drain_from = Some(now);
                        if let Pace::Rate(rate) = spec.pace {
                            let offered = (sent - sent_before) as f64 / spec.seconds as f64;
                            if offered < 0.95 * rate as f64 {
                                eprintln!(
                                    "bench: sent {offered:.0} events/s of the {rate} asked: every key had an event unacknowledged (raise --keys) or {MAX_OUTSTANDING} events were without a result"
                                );
                            }
                        }
                    }
                }
                Phase::Drain => {
                    if book.measured_waiting == 0
                        || drain_from.is_some_and(|d| now > d + DRAIN_DEADLINE)
                    {
                        break;
                    }
                }
            }
        }
        let due = match spec.pace {
            Pace::Rate(rate) => {
                let secs = now.duration_since(started).as_secs_f64();
                ((rate as f64 * secs) as u64).saturating_sub(sent)
            }
            // Every key free since the last tick, in calls of at most `spec.batch`.
            Pace::Closed => u64::from(spec.keys),
        };
        let time = epoch + i64::try_from(now.duration_since(started).as_millis())?;
        let mut remaining = due;
        while remaining > 0 {
            let Some((events, call)) = lock().take(remaining.min(spec.batch), time) else {
                break;
            };
            let n = events.len() as u64;
            remaining -= n;
            sent += n;
            let mut client = clients[next_client % clients.len()].clone();
            next_client += 1;
            let book = book.clone();
            calls.spawn(async move {
                let answer = client
                    .ingest(IngestRequest {
                        events,
                        ..IngestRequest::default()
                    })
                    .await;
                let at = Instant::now();
                let mut book = book.lock().unwrap_or_else(|e| e.into_inner());
                match answer {
                    Ok(_) => book.acked(call, at),
                    Err(status) => {
                        book.failure
                            .get_or_insert(format!("Ingest failed: {status}"));
                    }
                }
            });
        }
        while calls.try_join_next().is_some() {}
        ticker.tick().await;
    }
    while calls.join_next().await.is_some() {}
    let measured = match (measure_from, drain_from) {
        (Some(from), Some(to)) => to.duration_since(from).as_secs_f64(),
        _ => bail!("the run ended before it measured"),
    };
    Ok(measured)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny(emit: Emit, pace: Pace, seconds: u64) -> Spec {
        Spec {
            emit,
            pace,
            seconds,
            keys: 16,
            batch: 10,
            connections: 1,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_result_of_a_tiny_run_is_matched_to_the_event_that_caused_it() {
        let dir = tempfile::tempdir().unwrap();
        for spec in [
            tiny(Emit::OnUpdate, Pace::Closed, 1),
            tiny(Emit::OnUpdate, Pace::Rate(200), 1),
            tiny(Emit::OnClose, Pace::Rate(200), 2),
        ] {
            let figures = measure(dir.path(), spec).await.unwrap();
            assert_eq!(figures.unmatched, 0, "{spec:?}: {figures:?}");
            // On close, an event overtaken by the one that closed its window is late, and
            // its window may have no result: the analyzer counts it.
            assert!(figures.missing <= figures.late, "{spec:?}: {figures:?}");
            if spec.emit == Emit::OnUpdate {
                assert_eq!(figures.missing, 0, "{spec:?}: {figures:?}");
            }
            assert!(!figures.latency.is_empty(), "{spec:?}: nothing measured");
            assert!(figures.matched >= figures.latency.len(), "{spec:?}");
        }
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "every run removes its pipeline's files"
        );
    }

    #[test]
    fn keys_read_back_from_results() {
        assert_eq!(key_index(&key_name(42)), Some(42));
        assert_eq!(key_index("sensor-1"), None);
    }
}
