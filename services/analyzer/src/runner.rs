//! Running one continuous query: read every partition of its topic from the broker, feed
//! the records to the windows, write closed windows to the store, and checkpoint.
//!
//! ```text
//! partition readers ──records──► runner ──Put──► store
//!   (one task each,              │  └─ then checkpoint(offsets + open windows)
//!    resubscribing on failure)   └─ status ──► DescribeQuery
//! ```
//!
//! The order is what makes results exactly-once: a checkpoint is written only after the
//! store has acknowledged every window the state no longer holds. If the store is down,
//! the runner retries (with backoff) and stops reading meanwhile — the bounded record
//! channel pushes back on the readers, and the broker keeps everything.

use crate::checkpoint;
use crate::config::QueryConfig;
use crate::error::AnalyzerError;
use crate::extract::ValuePath;
use crate::window::{ClosedWindow, Counters, Outcome, Windows, millis};
use runnel_proto::v1::broker_client::BrokerClient;
use runnel_proto::v1::store_client::StoreClient;
use runnel_proto::v1::{
    ListTopicsRequest, PutRequest, QueryResult, Record, SubscribeRequest, subscribe_response,
};
use runnel_proto::{Millis, now_millis};
use runnel_security::Peer;
use runnel_server::Shutdown;
use runnel_telemetry::propagation::{TRACEPARENT, continue_trace, inject_into_headers};
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tonic::Code;

pub(crate) type Broker = BrokerClient<Peer>;
pub(crate) type Store = StoreClient<Peer>;

/// Records buffered between the partition readers and the runner.
const RECORD_BUFFER: usize = 4096;
/// Records applied before closed windows are written and progress is published.
const BATCH: usize = 1024;
/// Results per `Put` call.
const PUT_CHUNK: usize = 1000;

/// A query's progress, as `DescribeQuery` reports it.
#[derive(Debug, Clone, Default)]
pub(crate) struct QueryStatus {
    pub(crate) watermark: Option<i64>,
    pub(crate) counters: Counters,
    pub(crate) open_windows: usize,
}

/// Retries with exponential backoff, giving up only at shutdown.
struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    fn new(max: Duration) -> Backoff {
        Backoff {
            next: Duration::from_millis(50),
            max,
        }
    }

    fn reset(&mut self) {
        self.next = Duration::from_millis(50);
    }

    /// Waits before the next attempt; false if shutdown came first.
    async fn wait(&mut self, shutdown: &Shutdown) -> bool {
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        tokio::select! {
            () = tokio::time::sleep(delay) => true,
            () = shutdown.wait() => false,
        }
    }
}

/// One query at work.
pub(crate) struct QueryRunner {
    pub(crate) query: QueryConfig,
    pub(crate) value: ValuePath,
    pub(crate) broker: Broker,
    pub(crate) store: Store,
    pub(crate) checkpoint_path: PathBuf,
    pub(crate) checkpoint_interval: Duration,
    pub(crate) status: watch::Sender<QueryStatus>,
    pub(crate) shutdown: Shutdown,
}

impl QueryRunner {
    /// Runs until shutdown (`Ok`) or a failure that retrying cannot fix (`Err`).
    pub(crate) async fn run(self) -> Result<(), AnalyzerError> {
        let Some(partitions) = self.wait_for_topic().await else {
            return Ok(());
        };
        let mut windows = self.resume(partitions).await?;
        self.publish(&windows);
        let (sink, mut records) = mpsc::channel(RECORD_BUFFER);
        let mut readers = JoinSet::new();
        for (partition, offset) in windows.next_offsets().into_iter().enumerate() {
            readers.spawn(read_partition(
                self.broker.clone(),
                self.query.topic.clone(),
                partition as u32,
                offset,
                sink.clone(),
                self.shutdown.clone(),
            ));
        }
        drop(sink);
        tracing::info!(query = %self.query.name, partitions, "query running");

        let mut ticker =
            tokio::time::interval(self.checkpoint_interval.min(Duration::from_secs(1)));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_checkpoint = Instant::now();
        let mut unsaved = false;
        let mut batch = Vec::with_capacity(BATCH);
        loop {
            tokio::select! {
                received = records.recv_many(&mut batch, BATCH) => {
                    if received == 0 {
                        break; // every reader ended: shutdown
                    }
                }
                _ = ticker.tick() => {}
                () = self.shutdown.wait() => break,
            }
            let mut closed = Vec::new();
            for record in batch.drain(..) {
                self.apply(&mut windows, record);
                closed.extend(windows.advance(Instant::now()));
                unsaved = true;
            }
            // Time passes even without records: idle partitions release the watermark.
            closed.extend(windows.advance(Instant::now()));
            if !closed.is_empty() {
                if !self.emit(closed).await? {
                    // Shutdown while the store was unreachable: the closed windows are not
                    // in the store, so the last checkpoint must stay; they are read again.
                    self.publish(&windows);
                    return Ok(());
                }
                self.save(&windows).await?;
                (last_checkpoint, unsaved) = (Instant::now(), false);
            } else if unsaved && last_checkpoint.elapsed() >= self.checkpoint_interval {
                self.save(&windows).await?;
                (last_checkpoint, unsaved) = (Instant::now(), false);
            }
            self.publish(&windows);
        }
        readers.shutdown().await;
        if unsaved {
            self.save(&windows).await?;
        }
        tracing::info!(query = %self.query.name, "query stopped; progress checkpointed");
        Ok(())
    }

    /// The topic's partition count, once the topic exists; `None` at shutdown.
    async fn wait_for_topic(&self) -> Option<u32> {
        let mut backoff = Backoff::new(Duration::from_secs(1));
        let mut told = false;
        loop {
            match self.broker.clone().list_topics(ListTopicsRequest {}).await {
                Ok(response) => {
                    let topics = response.into_inner().topics;
                    if let Some(topic) = topics.iter().find(|t| t.name == self.query.topic) {
                        return Some(topic.partitions.len() as u32);
                    }
                    if !told {
                        tracing::info!(query = %self.query.name, topic = %self.query.topic, "waiting for the topic to be created");
                        told = true;
                    }
                }
                Err(status) => {
                    tracing::warn!(query = %self.query.name, error = %status.message(), "cannot list topics; retrying");
                }
            }
            if !backoff.wait(&self.shutdown).await {
                return None;
            }
        }
    }

    /// The windows as the last checkpoint left them, or empty ones reading from offset 0.
    async fn resume(&self, partitions: u32) -> Result<Windows, AnalyzerError> {
        let (path, name, topic) = (
            self.checkpoint_path.clone(),
            self.query.name.clone(),
            self.query.topic.clone(),
        );
        let saved =
            tokio::task::spawn_blocking(move || checkpoint::load(&path, &name, &topic)).await??;
        let q = &self.query;
        match saved {
            None => Ok(Windows::new(
                q.window,
                q.out_of_orderness,
                q.idle_timeout,
                partitions,
                Instant::now(),
            )),
            Some(state) => {
                let windows = Windows::restore(
                    state,
                    q.window,
                    q.out_of_orderness,
                    q.idle_timeout,
                    partitions,
                    Instant::now(),
                )
                .map_err(|reason| AnalyzerError::Checkpoint {
                    path: self.checkpoint_path.clone(),
                    reason,
                })?;
                tracing::info!(
                    query = %q.name,
                    offsets = ?windows.next_offsets(),
                    open_windows = windows.open_windows(),
                    "resuming from checkpoint"
                );
                Ok(windows)
            }
        }
    }

    fn apply(&self, windows: &mut Windows, record: Record) {
        let event = record.event.unwrap_or_default();
        let event_time = event
            .event_time
            .or(record.append_time)
            .map(Millis::from)
            .unwrap_or_else(now_millis)
            .0;
        let wanted = self
            .query
            .event_type
            .as_ref()
            .is_none_or(|t| *t == event.r#type);
        let value = if wanted {
            self.value.extract(&event)
        } else {
            None
        };
        let traceparent = event.headers.get(TRACEPARENT).map(String::as_str);
        let entry = value.map(|v| (event.key.as_str(), v, traceparent));
        let outcome = windows.observe(
            record.partition,
            record.offset,
            event_time,
            entry,
            Instant::now(),
        );
        let label = match outcome {
            Outcome::Counted => "counted",
            Outcome::Late => "late",
            Outcome::Skipped if wanted => "no_value",
            Outcome::Skipped => "filtered",
        };
        metrics::counter!("runnel_analyzer_events_total", "query" => self.query.name.clone(), "outcome" => label).increment(1);
    }

    /// Writes closed windows to the store, retrying until it takes them. False if shutdown
    /// came first.
    async fn emit(&self, closed: Vec<ClosedWindow>) -> Result<bool, AnalyzerError> {
        let emitted_at = Some(now_millis().into());
        let mut spans = Vec::with_capacity(closed.len());
        let results: Vec<QueryResult> = closed
            .into_iter()
            .map(|window| {
                // The result continues the trace of the first event in its window.
                let span = tracing::info_span!("analyzer.emit_window", query = %self.query.name, key = %window.key, window_start = window.start);
                let mut headers = HashMap::new();
                if let Some(traceparent) = window.traceparent {
                    continue_trace(&span, &HashMap::from([(TRACEPARENT.to_owned(), traceparent)]));
                }
                inject_into_headers(&span, &mut headers);
                spans.push(span);
                QueryResult {
                    query: self.query.name.clone(),
                    key: window.key,
                    window_start: Some(Millis(window.start).into()),
                    window_end: Some(Millis(window.end).into()),
                    values: window.values,
                    emitted_at,
                    headers,
                }
            })
            .collect();
        let count = results.len();
        for chunk in results.chunks(PUT_CHUNK) {
            let mut backoff = Backoff::new(Duration::from_secs(2));
            loop {
                let request = PutRequest {
                    results: chunk.to_vec(),
                };
                match self.store.clone().put(request).await {
                    Ok(_) => break,
                    Err(status) if status.code() == Code::InvalidArgument => {
                        return Err(AnalyzerError::StoreRejected {
                            query: self.query.name.clone(),
                            message: status.message().to_owned(),
                        });
                    }
                    Err(status) => {
                        metrics::counter!("runnel_analyzer_store_retries_total", "query" => self.query.name.clone()).increment(1);
                        tracing::warn!(query = %self.query.name, code = ?status.code(), error = %status.message(), "store did not take results; retrying");
                        if !backoff.wait(&self.shutdown).await {
                            return Ok(false);
                        }
                    }
                }
            }
        }
        drop(spans);
        metrics::counter!("runnel_analyzer_results_total", "query" => self.query.name.clone())
            .increment(count as u64);
        Ok(true)
    }

    async fn save(&self, windows: &Windows) -> Result<(), AnalyzerError> {
        let (path, name, topic, state) = (
            self.checkpoint_path.clone(),
            self.query.name.clone(),
            self.query.topic.clone(),
            windows.state(),
        );
        tokio::task::spawn_blocking(move || checkpoint::save(&path, &name, &topic, state)).await?
    }

    fn publish(&self, windows: &Windows) {
        let status = QueryStatus {
            watermark: windows.watermark(),
            counters: windows.counters(),
            open_windows: windows.open_windows(),
        };
        if let Some(watermark) = status.watermark {
            metrics::gauge!("runnel_analyzer_watermark_lag_seconds", "query" => self.query.name.clone())
                .set((now_millis().0.saturating_sub(watermark)) as f64 / 1000.0);
        }
        metrics::gauge!("runnel_analyzer_open_windows", "query" => self.query.name.clone())
            .set(status.open_windows as f64);
        self.status.send_replace(status);
    }
}

/// Reads one partition from `next` on and hands its records to the runner, subscribing
/// again (with backoff) whenever the stream breaks — a broker restart, say — from the
/// first offset not yet handed over.
async fn read_partition(
    broker: Broker,
    topic: String,
    partition: u32,
    mut next: u64,
    sink: mpsc::Sender<Record>,
    shutdown: Shutdown,
) {
    let mut broker = broker;
    let mut backoff = Backoff::new(Duration::from_secs(2));
    loop {
        let request = SubscribeRequest {
            topic: topic.clone(),
            partition,
            offset: next,
            ..Default::default()
        };
        let subscribed = tokio::select! {
            subscribed = broker.subscribe(request) => subscribed,
            () = shutdown.wait() => return,
        };
        match subscribed {
            Ok(response) => {
                let mut stream = response.into_inner();
                loop {
                    let message = tokio::select! {
                        message = stream.message() => message,
                        () = shutdown.wait() => return,
                    };
                    match message {
                        Ok(Some(message)) => {
                            backoff.reset();
                            let Some(subscribe_response::Message::Records(chunk)) = message.message
                            else {
                                continue;
                            };
                            for record in chunk.records {
                                if record.offset < next {
                                    continue; // already handed over
                                }
                                if record.offset > next {
                                    tracing::error!(
                                        topic,
                                        partition,
                                        expected = next,
                                        found = record.offset,
                                        "the broker skipped offsets"
                                    );
                                }
                                next = record.offset + 1;
                                if sink.send(record).await.is_err() {
                                    return;
                                }
                            }
                        }
                        Ok(None) => break,
                        Err(status) => {
                            tracing::warn!(topic, partition, code = ?status.code(), error = %status.message(), "subscription broke; resubscribing");
                            break;
                        }
                    }
                }
            }
            Err(status) if status.code() == Code::OutOfRange => {
                // The broker does not hold the offset this query is at: retention deleted
                // records before they were read, or the broker lost acknowledged data (it ran
                // with fsync "never" and crashed). Nothing here can bring them back: carry on
                // from what the broker has, and say so loudly.
                let (start, end) = bounds(&broker, &topic, partition)
                    .await
                    .unwrap_or((next, next));
                let resumed = next.clamp(start, end);
                tracing::error!(
                    topic,
                    partition,
                    wanted = next,
                    broker_start = start,
                    broker_end = end,
                    resumed,
                    "the broker does not hold the next offset; records were skipped"
                );
                metrics::counter!("runnel_analyzer_offset_resets_total", "topic" => topic.clone())
                    .increment(1);
                next = resumed;
            }
            Err(status) => {
                tracing::warn!(topic, partition, code = ?status.code(), error = %status.message(), "cannot subscribe; retrying");
            }
        }
        if !backoff.wait(&shutdown).await {
            return;
        }
    }
}

/// The first offset a partition holds and its end offset.
async fn bounds(broker: &Broker, topic: &str, partition: u32) -> Option<(u64, u64)> {
    let topics = broker
        .clone()
        .list_topics(ListTopicsRequest {})
        .await
        .ok()?
        .into_inner()
        .topics;
    let topic = topics.into_iter().find(|t| t.name == topic)?;
    topic
        .partitions
        .into_iter()
        .find(|p| p.partition == partition)
        .map(|p| (p.start_offset, p.end_offset))
}

/// The query in words, for `DescribeQuery`.
pub(crate) fn definition(query: &QueryConfig) -> String {
    let filter = query
        .event_type
        .as_ref()
        .map(|t| format!(" of events of type {t:?}"))
        .unwrap_or_default();
    format!(
        "count, sum, avg, min, max of {}{filter} per key in tumbling {}ms event-time windows, {}ms out-of-orderness",
        query.value,
        millis(query.window),
        millis(query.out_of_orderness)
    )
}
