//! `runnel bench analyzer`: the analysis tier's throughput per core and its latency.
//!
//! 1. **Operators**, one thread each (so the rate is per core): a partition's task fed the
//!    encoded `Subscribe` messages the broker would send — decode, filter, window,
//!    aggregate, fire — for a keyed tumbling count, a sliding average, top-k and a
//!    distinct count; each without checkpoints and with a checkpoint every second
//!    (serialised, checksummed and cut into the chunk events that go to the broker's
//!    checkpoint topic), which gives the checkpointing overhead on the analyzer's core.
//!    The end-to-end runs below checkpoint into a real broker every second (the default).
//! 2. **End to end**: a broker, a store and an analyzer in this process on loopback with a
//!    temporary data directory. A flood of `--e2e-events` events measures the analyzer's
//!    throughput through the broker; then events are produced at `--rate` for
//!    `--seconds`, stamped with the wall clock, into 1 s tumbling counts, and each
//!    result's latency is the time from its window's end — when the event that closes the
//!    window is produced — to the result arriving from the store's `Watch`: event in,
//!    result in the store.
//! 3. **Failover**, between the two: a second analyzer joins the group and takes some of
//!    the partitions; then it is killed (its task aborted: connections drop, nothing is
//!    flushed or checkpointed, as with `kill -9`) while events flow at `--rate`, and the
//!    figure is the time from the kill until every partition it had has produced a
//!    result on the surviving analyzer — restored from the checkpoint in the broker.

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use hdrhistogram::Histogram;
use runnel_analyzer::bench::{Form, Operator, encode_stream, run_operator};
use runnel_analyzer::{AggregateConfig, AnalyzerConfig, QueryConfig, WindowConfig};
use runnel_broker::BrokerConfig;
use runnel_client::{Producer, ProducerOptions};
use runnel_proto::v1::analyzer_client::AnalyzerClient;
use runnel_proto::v1::broker_client::BrokerClient;
use runnel_proto::v1::store_client::StoreClient;
use runnel_proto::v1::{Acks, DescribeQueryRequest, Event, WatchRequest};
use runnel_proto::{Millis, now_millis};
use runnel_store::StoreConfig;
use runnel_testkit::Services;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Arguments of `runnel bench analyzer`.
#[derive(Debug, clap::Args)]
pub struct AnalyzerArgs {
    /// Events per operator run.
    #[arg(long, default_value_t = 2_000_000)]
    events: u64,
    /// Keys the events are spread over.
    #[arg(long, default_value_t = 1000)]
    keys: u64,
    /// Events of the end-to-end throughput run (0: skip the end-to-end runs).
    #[arg(long, default_value_t = 500_000)]
    e2e_events: u64,
    /// Events per second of the latency run.
    #[arg(long, default_value_t = 20_000)]
    rate: u64,
    /// Seconds of the latency run.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Also run every operator written in SQL beside its table form, alternately, three
    /// times each: min / median / max events/s of both (the same plan: the same speed).
    #[arg(long)]
    sql: bool,
}

pub(crate) async fn run(args: AnalyzerArgs) -> Result<ExitCode> {
    let dir = tempfile::Builder::new()
        .prefix("runnel-bench-")
        .tempdir_in(".")?;
    eprintln!(
        "bench: encoding {} events over {} keys",
        args.events, args.keys
    );
    let stream: Arc<Vec<Bytes>> = Arc::new(encode_stream(args.events, args.keys));
    println!(
        "| operator | events/s, no checkpoints | events/s, checkpoint every 1 s | overhead | checkpoint size |"
    );
    println!("|---|---:|---:|---:|---:|");
    for operator in Operator::ALL {
        let (plain, checkpointed) = {
            let stream = Arc::clone(&stream);
            tokio::task::spawn_blocking(move || {
                let plain = run_operator(operator, Form::Table, &stream, None)?;
                let every = Some(Duration::from_secs(1));
                let checkpointed = run_operator(operator, Form::Table, &stream, every)?;
                Ok::<_, String>((plain, checkpointed))
            })
            .await?
            .map_err(anyhow::Error::msg)?
        };
        let overhead = 100.0 * (1.0 - checkpointed.rate() / plain.rate());
        println!(
            "| {} | {:.0} | {:.0} ({} checkpoints) | {overhead:.1} % | {} KiB |",
            operator.name(),
            plain.rate(),
            checkpointed.rate(),
            checkpointed.checkpoints,
            checkpointed.checkpoint_bytes / 1024
        );
        if plain.results == 0 {
            bail!(
                "{} emitted no results: the benchmark is broken",
                operator.name()
            );
        }
    }
    if args.sql {
        forms(&stream).await?;
    }
    if args.e2e_events > 0 {
        end_to_end(&args, dir.path()).await?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Every operator as a table and in SQL, alternately, three runs each.
async fn forms(stream: &Arc<Vec<Bytes>>) -> Result<()> {
    println!();
    println!(
        "| operator | table: min / median / max events/s | SQL: min / median / max events/s | SQL ÷ table (medians) |"
    );
    println!("|---|---:|---:|---:|");
    for operator in Operator::ALL {
        let stream = Arc::clone(stream);
        let (table, sql) = tokio::task::spawn_blocking(move || {
            let (mut table, mut sql) = (Vec::new(), Vec::new());
            for _ in 0..3 {
                table.push(run_operator(operator, Form::Table, &stream, None)?.rate());
                sql.push(run_operator(operator, Form::Sql, &stream, None)?.rate());
            }
            Ok::<_, String>((table, sql))
        })
        .await?
        .map_err(anyhow::Error::msg)?;
        let spread = |mut rates: Vec<f64>| {
            rates.sort_by(f64::total_cmp);
            (rates[0], rates[1], rates[2])
        };
        let ((t0, t1, t2), (s0, s1, s2)) = (spread(table), spread(sql));
        println!(
            "| {} | {t0:.0} / {t1:.0} / {t2:.0} | {s0:.0} / {s1:.0} / {s2:.0} | {:.3} |",
            operator.name(),
            s1 / t1
        );
    }
    Ok(())
}

/// The 1 s tumbling count the end-to-end runs measure.
fn query() -> Result<QueryConfig> {
    let count: AggregateConfig = toml::from_str("fn = \"count\"")?;
    Ok(QueryConfig {
        name: "bench_count".into(),
        topic: "bench".into(),
        value: None,
        window: WindowConfig::Tumbling {
            size: Duration::from_secs(1),
        },
        out_of_orderness: Duration::ZERO,
        idle_timeout: Duration::from_secs(1),
        aggregates: vec![count],
        ..QueryConfig::default()
    })
}

async fn end_to_end(args: &AnalyzerArgs, dir: &std::path::Path) -> Result<()> {
    let mut services = Services::new();
    let broker = BrokerConfig {
        data_dir: dir.join("broker"),
        fsync: runnel_log::FsyncPolicy::Never,
        ..BrokerConfig::default()
    };
    let store = StoreConfig {
        data_dir: dir.join("store"),
        ..StoreConfig::default()
    };
    let mut analyzer = AnalyzerConfig {
        queries: vec![query()?],
        ..AnalyzerConfig::default()
    };
    let broker = services
        .start_on_loopback("broker", runnel_broker::run, broker)
        .await;
    let store = services
        .start_on_loopback("store", runnel_store::run, store)
        .await;
    let broker_url = format!("http://{}", broker.grpc);
    let store_url = format!("http://{}", store.grpc);
    analyzer.broker = broker_url.clone();
    analyzer.store = store_url.clone();
    let analyzer = services
        .start_on_loopback("analyzer", runnel_analyzer::run, analyzer)
        .await;
    let analyzer_url = format!("http://{}", analyzer.grpc);
    let collector = services
        .during(load(args, &broker_url, &store_url, &analyzer_url))
        .await
        .map_err(anyhow::Error::msg)??;
    // The store's Watch ends when it stops, and with it the collector.
    services.trigger();
    let latency = tokio::time::timeout(Duration::from_secs(30), collector).await??;
    println!(
        "latency at {} events/s over {} keys, 1 s tumbling count: window end → result in the store: p50 {} ms, p99 {} ms, max {} ms ({} results)",
        args.rate,
        args.keys,
        latency.value_at_quantile(0.5),
        latency.value_at_quantile(0.99),
        latency.max(),
        latency.len()
    );
    crate::stop(services).await
}

/// Measures end-to-end throughput, then produces at `args.rate` for the latency: the task
/// that collects it from the store's Watch, which ends when the store stops.
async fn load(
    args: &AnalyzerArgs,
    broker_url: &str,
    store_url: &str,
    analyzer_url: &str,
) -> Result<tokio::task::JoinHandle<Histogram<u64>>> {
    let channel = runnel_security::connect_lazy(broker_url, &Default::default())?;
    let options = ProducerOptions {
        acks: Acks::Leader,
        create_partitions: Some(4),
        ..ProducerOptions::default()
    };
    let mut producer = Producer::new(BrokerClient::new(channel), "bench", options)
        .await
        .context("producer")?;
    let batch = |from: u64, n: u64, at: i64| -> Vec<Event> {
        (from..from + n)
            .map(|i| Event {
                id: format!("b{i}"),
                key: format!("key-{}", i % args.keys),
                event_time: Some(Millis(at).into()),
                payload: Bytes::from_static(b"{}"),
                ..Event::default()
            })
            .collect()
    };

    // Throughput: a flood, then wait until the analyzer has read all of it.
    let mut analyzer_client = connect_analyzer(analyzer_url).await?;
    let started = Instant::now();
    let mut sent = 0;
    while sent < args.e2e_events {
        let n = (args.e2e_events - sent).min(1000);
        producer.send(batch(sent, n, now_millis().0)).await?;
        sent += n;
    }
    let produced = started.elapsed();
    loop {
        let described = analyzer_client
            .describe_query(DescribeQueryRequest {
                name: "bench_count".into(),
            })
            .await?
            .into_inner();
        if described.events_processed >= args.e2e_events {
            break;
        }
        if started.elapsed() > Duration::from_secs(600) {
            bail!(
                "the analyzer read {} of {} events in 10 minutes",
                described.events_processed,
                args.e2e_events
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let read = started.elapsed();
    println!();
    println!(
        "end to end, {} events over {} keys, 4 partitions: produced in {:.2} s, analysed in {:.2} s: {:.0} events/s through broker → analyzer",
        args.e2e_events,
        args.keys,
        produced.as_secs_f64(),
        read.as_secs_f64(),
        args.e2e_events as f64 / read.as_secs_f64()
    );

    failover(
        args,
        broker_url,
        store_url,
        &mut producer,
        &mut sent,
        &batch,
    )
    .await?;

    // Latency: a steady rate, results timed from the store's Watch.
    let mut store_client = StoreClient::connect(store_url.to_owned()).await?;
    let mut watch = store_client
        .watch(WatchRequest {
            query: "bench_count".into(),
            ..WatchRequest::default()
        })
        .await?
        .into_inner();
    let measure_from = now_millis().0 + 1000;
    let collector = tokio::spawn(async move {
        let mut latency = Histogram::<u64>::new(3).expect("histogram");
        while let Ok(Some(result)) = watch.message().await {
            let end = result.window_end.map(Millis::from).unwrap_or_default().0;
            if end > measure_from {
                let _ = latency.record(now_millis().0.saturating_sub(end).max(0) as u64);
            }
        }
        latency
    });
    let per_tick = (args.rate / 100).max(1);
    let mut ticker = tokio::time::interval(Duration::from_millis(10));
    let until = Instant::now() + Duration::from_secs(args.seconds);
    while Instant::now() < until {
        ticker.tick().await;
        producer.send(batch(sent, per_tick, now_millis().0)).await?;
        sent += per_tick;
    }
    // One more second of events closes the last measured windows.
    let closing = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < closing {
        ticker.tick().await;
        producer.send(batch(sent, per_tick, now_millis().0)).await?;
        sent += per_tick;
    }
    Ok(collector)
}

async fn connect_analyzer(url: &str) -> Result<AnalyzerClient<tonic::transport::Channel>> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match AnalyzerClient::connect(url.to_owned()).await {
            Ok(client) => return Ok(client),
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(error) => return Err(error.into()),
        }
    }
}

/// Starts a second analyzer in the group, kills it once it owns partitions, and reports
/// how long until each of its partitions produced a result on the other analyzer.
async fn failover(
    args: &AnalyzerArgs,
    broker_url: &str,
    store_url: &str,
    producer: &mut Producer,
    sent: &mut u64,
    batch: &impl Fn(u64, u64, i64) -> Vec<Event>,
) -> Result<()> {
    let bind = || tokio::net::TcpListener::bind("127.0.0.1:0");
    let listeners = runnel_server::Listeners {
        grpc: bind().await?,
        admin: bind().await?,
        http: None,
    };
    let victim_url = format!("http://{}", listeners.grpc.local_addr()?);
    let config = AnalyzerConfig {
        broker: broker_url.to_owned(),
        store: store_url.to_owned(),
        member_id: Some("bench-victim".into()),
        queries: vec![query()?],
        ..AnalyzerConfig::default()
    };
    // Held, not fired: the victim is killed, not stopped.
    let (_trigger, shutdown) = runnel_server::Shutdown::new();
    let victim = tokio::spawn(runnel_analyzer::run(config, listeners, shutdown));
    let per_tick = (args.rate / 100).max(1);
    let mut ticker = tokio::time::interval(Duration::from_millis(10));
    let mut victim_client = connect_analyzer(&victim_url).await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    // Events flow while the group rebalances, so that the victim's tasks have state.
    let owned = loop {
        ticker.tick().await;
        producer
            .send(batch(*sent, per_tick, now_millis().0))
            .await?;
        *sent += per_tick;
        let described = victim_client
            .describe_query(DescribeQueryRequest {
                name: "bench_count".into(),
            })
            .await?
            .into_inner();
        if !described.partitions.is_empty() && described.results_emitted > 0 {
            break described.partitions;
        }
        if Instant::now() > deadline {
            bail!("the second analyzer took no partition with results within 60 s");
        }
    };
    let mut store_client = StoreClient::connect(store_url.to_owned()).await?;
    let mut watch = store_client
        .watch(WatchRequest {
            query: "bench_count".into(),
            ..WatchRequest::default()
        })
        .await?
        .into_inner();
    let killed_at = now_millis().0;
    let killed = Instant::now();
    victim.abort();
    let mut waiting: std::collections::BTreeSet<u32> = owned.iter().copied().collect();
    let deadline = killed + Duration::from_secs(60);
    while !waiting.is_empty() {
        tokio::select! {
            _ = ticker.tick() => {
                producer.send(batch(*sent, per_tick, now_millis().0)).await?;
                *sent += per_tick;
            }
            result = watch.message() => {
                let Some(result) = result? else { bail!("the store's Watch ended") };
                let emitted = result.emitted_at.map(Millis::from).unwrap_or_default().0;
                if emitted > killed_at {
                    waiting.remove(&runnel_proto::partition_for_key(&result.key, 4));
                }
            }
        }
        if Instant::now() > deadline {
            bail!("partitions {waiting:?} produced no result within 60 s of the kill");
        }
    }
    println!(
        "failover: an analyzer owning partitions {owned:?} of 4 killed → each producing results on the other: {} ms (session timeout {} s; a killed instance's connection drops at once)",
        killed.elapsed().as_millis(),
        AnalyzerConfig::default().session_timeout.as_secs()
    );
    Ok(())
}
