//! `runnel send`: JSON lines on stdin → `Ingest` batches, with progress and a summary.

use crate::client::ClientArgs;
use crate::json::parse_event;
use anyhow::{Context, Result};
use runnel_proto::v1::collector_client::CollectorClient;
use runnel_proto::v1::{Event, IngestRequest};
use std::process::ExitCode;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, BufReader};

/// Arguments of `runnel send`.
#[derive(Debug, clap::Args)]
pub(crate) struct SendArgs {
    /// The collector's gRPC URL.
    #[arg(
        long,
        env = "RUNNEL_COLLECTOR_URL",
        default_value = "http://127.0.0.1:7101"
    )]
    collector: String,
    /// Events per `Ingest` call.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    batch: u32,
    #[command(flatten)]
    client: ClientArgs,
}

struct Progress {
    started: Instant,
    last_report: Instant,
    sent: u64,
    rejected_lines: u64,
}

impl Progress {
    fn maybe_report(&mut self) {
        if self.last_report.elapsed() >= Duration::from_secs(1) {
            self.last_report = Instant::now();
            let rate = self.sent as f64 / self.started.elapsed().as_secs_f64();
            eprintln!("sent {} events ({rate:.0}/s)", self.sent);
        }
    }
}

pub(crate) async fn run(args: SendArgs) -> Result<ExitCode> {
    let mut collector =
        CollectorClient::new(args.client.connect(&args.collector, "collector").await?);
    let run_id = runnel_proto::now_millis().0;
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut batch: Vec<Event> = Vec::with_capacity(args.batch as usize);
    let mut progress = Progress {
        started: Instant::now(),
        last_report: Instant::now(),
        sent: 0,
        rejected_lines: 0,
    };
    let mut line_number = 0u64;
    while let Some(line) = lines.next_line().await.context("reading stdin")? {
        line_number += 1;
        if line.trim().is_empty() {
            continue;
        }
        match parse_event(&line, || format!("cli-{run_id}-{line_number}")) {
            Ok(event) => batch.push(event),
            Err(error) => {
                progress.rejected_lines += 1;
                eprintln!("line {line_number}: {error:#}; skipped");
            }
        }
        if batch.len() == args.batch as usize {
            flush(&mut collector, &mut batch, &mut progress).await?;
        }
    }
    flush(&mut collector, &mut batch, &mut progress).await?;
    let elapsed = progress.started.elapsed().as_secs_f64();
    eprintln!(
        "sent {} events in {elapsed:.2}s ({:.0}/s); {} lines rejected",
        progress.sent,
        progress.sent as f64 / elapsed.max(f64::EPSILON),
        progress.rejected_lines
    );
    Ok(if progress.rejected_lines == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

async fn flush(
    collector: &mut CollectorClient<runnel_security::Peer>,
    batch: &mut Vec<Event>,
    progress: &mut Progress,
) -> Result<()> {
    if batch.is_empty() {
        return Ok(());
    }
    let events = std::mem::take(batch);
    let count = events.len() as u64;
    collector
        .ingest(IngestRequest {
            events,
            ..Default::default()
        })
        .await
        .map_err(|s| {
            anyhow::anyhow!(
                "ingest failed after {} events: {}: {}",
                progress.sent,
                s.code(),
                s.message()
            )
        })?;
    progress.sent += count;
    progress.maybe_report();
    Ok(())
}
