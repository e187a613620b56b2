//! `runnel bench stream`: `Stream` throughput and ack latency through collector → broker.
//!
//! Like `bench ingest` it starts a collector and a broker in this process (or uses
//! `--collector`). Each of `--concurrency` streams keeps up to `--window` batches of
//! `--batch` events with `--size`-byte payloads unacknowledged (within the window the
//! collector grants), each batch answered at `--ack`. Latency is per batch, from its send
//! to the cumulative acknowledgement that covers it. `--rate` caps the offered load (events
//! per second over all streams), for latency at a given share of the peak.

use crate::ingest::{Ack, LogArgs, start_in_process, tempfile_dir};
use anyhow::{Context, Result};
use hdrhistogram::Histogram;
use runnel_log::FsyncPolicy;
use runnel_proto::v1::collector_client::CollectorClient;
use runnel_proto::v1::{Event, StreamRequest};
use runnel_testkit::Services;
use std::collections::VecDeque;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;

/// Arguments of `runnel bench stream`.
#[derive(Debug, clap::Args)]
pub struct StreamArgs {
    /// Events to send in total (after the warm-up).
    #[arg(long, default_value_t = 2_000_000)]
    events: u64,
    /// Events per batch.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    batch: u64,
    /// Payload bytes per event.
    #[arg(long, default_value_t = 100)]
    size: usize,
    /// Streams sending concurrently.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=256))]
    concurrency: u64,
    /// The most unacknowledged batches per stream (within the collector's window).
    #[arg(long, default_value_t = 8)]
    window: u32,
    /// Offered load in events per second over all streams; 0: as fast as acknowledged.
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// When batches are acknowledged.
    #[arg(long, value_enum, default_value_t = Ack::Stored)]
    ack: Ack,
    /// The in-process broker's fsync policy.
    #[arg(long, default_value = "always")]
    fsync: FsyncPolicy,
    #[command(flatten)]
    log: LogArgs,
    /// Benchmark a running collector instead of an in-process one.
    #[arg(long)]
    collector: Option<String>,
    /// Keys to spread events over (and so partitions).
    #[arg(long, default_value_t = 64)]
    keys: u64,
}

pub(crate) async fn run(args: StreamArgs) -> Result<ExitCode> {
    let data = tempfile_dir()?;
    let mut services = Services::new();
    let url = match &args.collector {
        Some(url) => url.clone(),
        None => {
            start_in_process(
                args.fsync,
                runnel_broker::BrokerConfig::default().dedup_max_events,
                &args.log,
                None,
                data.path(),
                &mut services,
            )
            .await?
            .0
        }
    };
    let (histogram, acked, elapsed) = services
        .during(measure(&args, &url))
        .await
        .map_err(anyhow::Error::msg)??;
    let rate = acked as f64 / elapsed;
    let ms = |q: f64| histogram.value_at_quantile(q) as f64 / 1000.0;
    println!("events acknowledged   {acked} in {elapsed:.2}s");
    println!(
        "throughput            {rate:.0} events/s ({:.1} MB/s of payload)",
        rate * args.size as f64 / 1e6
    );
    println!(
        "ack latency per batch p50 {:.2} ms  p99 {:.2} ms  p999 {:.2} ms  max {:.2} ms",
        ms(0.5),
        ms(0.99),
        ms(0.999),
        histogram.max() as f64 / 1000.0
    );
    println!(
        "markdown row          | stream | {} | {} | {} | {} | {}×{} | {} | {} | {rate:.0} | {:.2} | {:.2} | {:.2} |",
        args.log.mode,
        args.log.fsync,
        args.ack.name(),
        args.batch,
        args.concurrency,
        args.window,
        args.fsync,
        args.size,
        ms(0.5),
        ms(0.99),
        ms(0.999)
    );
    crate::stop(services).await?;
    Ok(ExitCode::SUCCESS)
}

/// Warms up, then streams `args.events` events to the collector at `url`; returns per-batch
/// latencies (µs), the events acknowledged and the seconds the run took.
async fn measure(args: &StreamArgs, url: &str) -> Result<(Histogram<u64>, u64, f64)> {
    let channel = tonic::transport::Endpoint::from_shared(url.to_owned())?
        .connect()
        .await
        .with_context(|| format!("cannot reach the collector at {url}"))?;
    let warmup = (args.batch * args.concurrency * 20).min(args.events);
    eprintln!("bench: warming up with {warmup} events");
    drive(args, channel.clone(), warmup).await?;
    eprintln!(
        "bench: {} events of {} bytes over Stream, batches of {}, {} streams × window {}, rate {}, broker fsync {}, log {} (fsync {}), ack {}",
        args.events,
        args.size,
        args.batch,
        args.concurrency,
        args.window,
        if args.rate == 0 {
            "unlimited".to_owned()
        } else {
            args.rate.to_string()
        },
        args.fsync,
        args.log.mode,
        args.log.fsync,
        args.ack.name()
    );
    let started = Instant::now();
    let (histogram, acked) = drive(args, channel, args.events).await?;
    let elapsed = started.elapsed().as_secs_f64();
    Ok((histogram, acked, elapsed))
}

/// Sends `total` events over `args.concurrency` streams; per-batch latencies (µs) and the
/// events acknowledged.
async fn drive(
    args: &StreamArgs,
    channel: tonic::transport::Channel,
    total: u64,
) -> Result<(Histogram<u64>, u64)> {
    let batches = total.div_ceil(args.batch);
    let next_batch = Arc::new(AtomicU64::new(0));
    let acked = Arc::new(AtomicU64::new(0));
    let payload = bytes::Bytes::from(vec![b'x'; args.size]);
    // Per stream, the offered rate in batches per second (0: unlimited).
    let per_stream = if args.rate == 0 {
        0.0
    } else {
        args.rate as f64 / args.batch as f64 / args.concurrency as f64
    };
    let mut streams = tokio::task::JoinSet::new();
    for stream in 0..args.concurrency {
        let mut client = CollectorClient::new(channel.clone());
        let (next_batch, acked, payload) = (next_batch.clone(), acked.clone(), payload.clone());
        let (batch, keys, window, level) = (
            args.batch,
            args.keys.max(1),
            args.window.max(1),
            args.ack.level() as i32,
        );
        streams.spawn(async move {
            let template: Vec<Event> = (0..batch)
                .map(|i| Event {
                    id: format!("s{stream}-{i}"),
                    key: format!("key-{}", (stream * batch + i) % keys),
                    r#type: "bench".into(),
                    payload: payload.clone(),
                    ..Default::default()
                })
                .collect();
            let (requests, receiver) = mpsc::channel(64);
            let mut responses = client
                .stream(ReceiverStream::new(receiver))
                .await
                .context("open stream")?
                .into_inner();
            let granted = responses.message().await?.context("no window")?.window;
            let permits = Arc::new(Semaphore::new(window.min(granted) as usize));
            let sent: Arc<Mutex<VecDeque<(u64, Instant)>>> = Arc::default();
            let reader = {
                let (permits, sent, acked) = (permits.clone(), sent.clone(), acked.clone());
                tokio::spawn(async move {
                    let read = read_acks(&mut responses, &sent, &acked, &permits, batch).await;
                    // No more acknowledgements (the stream ended, or the collector ended it
                    // with a status): the sender must stop waiting for permits.
                    permits.close();
                    read
                })
            };
            let started = Instant::now();
            let mut sequence = 0u64;
            loop {
                let n = next_batch.fetch_add(1, Ordering::Relaxed);
                if n >= batches {
                    break;
                }
                if per_stream > 0.0 {
                    let due = started + Duration::from_secs_f64(sequence as f64 / per_stream);
                    tokio::time::sleep_until(due.into()).await;
                }
                match permits.acquire().await {
                    Ok(permit) => permit.forget(),
                    // The reader has stopped: its result says why.
                    Err(_) => break,
                }
                sequence += 1;
                sent.lock()
                    .expect("sent")
                    .push_back((sequence, Instant::now()));
                let request = StreamRequest {
                    sequence,
                    events: template.clone(),
                    ack_level: level,
                };
                if requests.send(request).await.is_err() {
                    break;
                }
            }
            // Every batch acknowledged before the stream is closed (or the reader stopped).
            let _ = permits.acquire_many(window.min(granted)).await;
            drop(requests);
            reader.await?
        });
    }
    let progress_acked = acked.clone();
    let progress = tokio::spawn(async move {
        let started = Instant::now();
        let mut tick = tokio::time::interval(Duration::from_secs(2));
        tick.tick().await;
        loop {
            tick.tick().await;
            let done = progress_acked.load(Ordering::Relaxed);
            eprintln!(
                "bench: {done}/{total} events ({:.0}/s)",
                done as f64 / started.elapsed().as_secs_f64()
            );
        }
    });
    let mut merged = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    while let Some(joined) = streams.join_next().await {
        merged.add(joined??)?;
    }
    progress.abort();
    Ok((merged, acked.load(Ordering::Relaxed)))
}

/// Reads one stream's cumulative acknowledgements until it ends, recording each batch's
/// latency and giving its window slot back. A status that ends the stream (a full log,
/// say) is the error.
async fn read_acks(
    responses: &mut tonic::Streaming<runnel_proto::v1::StreamResponse>,
    sent: &Mutex<VecDeque<(u64, Instant)>>,
    acked: &AtomicU64,
    permits: &Semaphore,
    batch: u64,
) -> Result<Histogram<u64>> {
    let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    while let Some(ack) = responses.message().await.map_err(|status| {
        anyhow::anyhow!(
            "the stream ended: {:?}: {}",
            status.code(),
            status.message()
        )
    })? {
        let now = Instant::now();
        let mut sent = sent.lock().expect("sent");
        while sent.front().is_some_and(|(s, _)| *s <= ack.acknowledged) {
            if let Some((_, at)) = sent.pop_front() {
                let micros = u64::try_from((now - at).as_micros()).unwrap_or(u64::MAX);
                let _ = histogram.record(micros.max(1));
                acked.fetch_add(batch, Ordering::Relaxed);
                permits.add_permits(1);
            }
        }
    }
    Ok(histogram)
}
