//! Running one stage of one query as a member of its consumer group.
//!
//! ```text
//! broker ──Subscribe(group)──► member ──chunks──► tasks (one per owned partition)
//!                                │                  │ results, re-keyed events, late events
//!                                │                  ▼
//!                                │            write out: store Put / Produce, retried
//!                                └──commit◄── checkpoint every interval (after the writes)
//! ```
//!
//! The broker deals the topic's partitions over the instances in the group; when one dies
//! or joins, the assignment changes and each instance loads the checkpoints of the
//! partitions it gained (their last state, written by whichever instance had them) and
//! drops the tasks it lost. Records come from the group's committed offset, which is never
//! ahead of the checkpoint (offsets are committed after it); records before a task's
//! checkpointed offset are already in its state and are skipped.
//!
//! The order is what makes results exactly-once: everything a batch of records produced is
//! acknowledged downstream before any checkpoint that includes those records is written.
//! If the store or broker is down, the runner retries with backoff and stops reading
//! meanwhile (the member keeps heartbeating, so the group does not evict it), and the
//! broker keeps everything.

use crate::checkpoint::{Checkpoints, Stage};
use crate::error::AnalyzerError;
use crate::event::{RawRecordChunk, RawSubscribeResponse};
use crate::path::Scalar;
use crate::plan::Plan;
use crate::rekey;
use crate::task::{Counters, Outputs, Task};
use crate::window::Emission;
use runnel_client::{ConsumerOptions, GroupConsumer, GroupEvent, Producer, ProducerOptions};
use runnel_proto::v1::broker_client::BrokerClient;
use runnel_proto::v1::store_client::StoreClient;
use runnel_proto::v1::{CreateTopicRequest, Event, ListTopicsRequest, PutRequest, QueryResult};
use runnel_proto::{Millis, now_millis};
use runnel_security::Peer;
use runnel_server::Shutdown;
use runnel_telemetry::propagation::{TRACEPARENT, continue_trace, inject_into_headers};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tonic::Code;

pub(crate) type Store = StoreClient<Peer>;

/// Results per `Put` call.
const PUT_CHUNK: usize = 1000;

/// One stage's progress, as `DescribeQuery` reports it.
#[derive(Debug, Clone, Default)]
pub(crate) struct StageStatus {
    pub(crate) counters: Counters,
    pub(crate) emitted: u64,
    pub(crate) open_windows: usize,
    pub(crate) watermark: Option<i64>,
    pub(crate) partitions: Vec<u32>,
}

/// A stage's membership of its group, events left encoded until a task reads them.
type Member = GroupConsumer<RawSubscribeResponse>;

/// Retries with exponential backoff, giving up only at shutdown.
pub(crate) struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    pub(crate) fn new(max: Duration) -> Backoff {
        Backoff {
            next: Duration::from_millis(50),
            max,
        }
    }

    fn reset(&mut self) {
        self.next = Duration::from_millis(50);
    }

    /// Waits before the next attempt; false if shutdown came first.
    pub(crate) async fn wait(&mut self, shutdown: &Shutdown) -> bool {
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        tokio::select! {
            () = tokio::time::sleep(delay) => true,
            () = shutdown.wait() => false,
        }
    }
}

/// Everything a stage needs from the analyzer.
#[derive(Clone)]
pub(crate) struct Context {
    pub(crate) broker: Peer,
    pub(crate) store: Store,
    pub(crate) data_dir: std::path::PathBuf,
    pub(crate) checkpoint_interval: Duration,
    pub(crate) group: String,
    pub(crate) member_id: String,
    pub(crate) session_timeout: Duration,
    pub(crate) max_message: usize,
    pub(crate) shutdown: Shutdown,
}

/// One stage of one query at work.
pub(crate) struct StageRunner {
    pub(crate) plan: Arc<Plan>,
    pub(crate) stage: Stage,
    pub(crate) context: Context,
    pub(crate) status: watch::Sender<StageStatus>,
}

/// The producers a stage writes through, made on first use.
#[derive(Default)]
struct Producers {
    keyed: Option<Producer>,
    output: Option<Producer>,
    late: Option<Producer>,
}

/// Whether the stage should go on.
enum Flow {
    Continue,
    Stop,
}

impl StageRunner {
    fn broker(&self) -> BrokerClient<Peer> {
        BrokerClient::new(self.context.broker.clone())
            .max_decoding_message_size(self.context.max_message)
    }

    /// The topic this stage reads.
    fn input_topic(&self) -> String {
        match self.stage {
            Stage::Source => self.plan.topic.clone(),
            Stage::Keyed => self.plan.keyed_topic(),
        }
    }

    /// Runs until shutdown (`Ok`) or a failure that retrying cannot fix (`Err`).
    pub(crate) async fn run(self) -> Result<(), AnalyzerError> {
        let Some(sources) = self.wait_for_topic(&self.plan.topic).await else {
            return Ok(());
        };
        let topic = self.input_topic();
        if self.stage == Stage::Keyed && !self.ensure_keyed_topic(sources).await {
            return Ok(());
        }
        let group = match self.stage {
            Stage::Source => format!("{}.{}", self.context.group, self.plan.name),
            Stage::Keyed => format!("{}.{}.keyed", self.context.group, self.plan.name),
        };
        let checkpoints = Checkpoints::new(
            &self.context.data_dir,
            &self.plan.name,
            self.stage,
            &self.plan.fingerprint,
            &self.context.member_id,
        );
        let mut state = Running {
            tasks: BTreeMap::new(),
            saved: HashMap::new(),
            producers: Producers::default(),
            emitted: 0,
            last_checkpoint: Instant::now(),
            pending: Outputs::default(),
            sources,
        };
        let options = ConsumerOptions {
            member_id: Some(self.context.member_id.clone()),
            session_timeout: self.context.session_timeout,
            ..ConsumerOptions::default()
        };
        let mut backoff = Backoff::new(Duration::from_secs(2));
        loop {
            let joined = tokio::select! {
                joined = Member::join_decoding(self.context.broker.clone(), self.context.max_message, &group, &topic, options.clone()) => joined,
                () = self.context.shutdown.wait() => break,
            };
            let mut member = match joined {
                Ok(member) => member,
                Err(error) => {
                    tracing::warn!(query = %self.plan.name, stage = self.stage.name(), %error, "cannot join the group; retrying");
                    if !backoff.wait(&self.context.shutdown).await {
                        break;
                    }
                    continue;
                }
            };
            tracing::info!(query = %self.plan.name, stage = self.stage.name(), %group, member = %self.context.member_id, "joined the group");
            let mut ticker = tokio::time::interval(
                self.context
                    .checkpoint_interval
                    .min(Duration::from_millis(500)),
            );
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let next = tokio::select! {
                    next = member.next() => Some(next),
                    _ = ticker.tick() => None,
                    () = self.context.shutdown.wait() => {
                        self.checkpoint(&mut state, &checkpoints, &mut member).await?;
                        self.publish(&state);
                        return Ok(());
                    }
                };
                match next {
                    None => {}
                    Some(Ok(Some(GroupEvent::Assigned { partitions, .. }))) => {
                        backoff.reset();
                        self.assign(&mut state, &checkpoints, partitions).await?;
                    }
                    Some(Ok(Some(GroupEvent::Records { records: chunk, .. }))) => {
                        backoff.reset();
                        self.consume(&mut state, &chunk);
                    }
                    Some(Ok(None)) => {
                        tracing::warn!(query = %self.plan.name, stage = self.stage.name(), "the broker ended the group stream; rejoining");
                        break;
                    }
                    Some(Err(error)) => {
                        tracing::warn!(query = %self.plan.name, stage = self.stage.name(), %error, "group stream broke; rejoining");
                        break;
                    }
                }
                if let Flow::Stop = self.step(&mut state, &checkpoints, &mut member).await? {
                    self.publish(&state);
                    return Ok(());
                }
            }
            if !backoff.wait(&self.context.shutdown).await {
                break;
            }
        }
        Ok(())
    }

    /// The partition count of `topic`, once it exists; `None` at shutdown.
    async fn wait_for_topic(&self, topic: &str) -> Option<u32> {
        let mut backoff = Backoff::new(Duration::from_secs(1));
        let mut told = false;
        loop {
            match self.broker().list_topics(ListTopicsRequest {}).await {
                Ok(response) => {
                    let topics = response.into_inner().topics;
                    if let Some(found) = topics.iter().find(|t| t.name == topic) {
                        return Some(found.partitions.len() as u32);
                    }
                    if !told {
                        tracing::info!(query = %self.plan.name, topic, "waiting for the topic to be created");
                        told = true;
                    }
                }
                Err(status) => {
                    tracing::warn!(query = %self.plan.name, error = %status.message(), "cannot list topics; retrying");
                }
            }
            if !backoff.wait(&self.context.shutdown).await {
                return None;
            }
        }
    }

    /// Creates the internal topic of a re-keyed query (as many partitions as its source)
    /// unless it exists; false at shutdown.
    async fn ensure_keyed_topic(&self, partitions: u32) -> bool {
        let mut backoff = Backoff::new(Duration::from_secs(1));
        loop {
            let request = CreateTopicRequest {
                name: self.plan.keyed_topic(),
                partitions,
                retention: None,
            };
            match self.broker().create_topic(request).await {
                Ok(_) => return true,
                Err(status) if status.code() == Code::AlreadyExists => return true,
                Err(status) => {
                    tracing::warn!(query = %self.plan.name, error = %status.message(), "cannot create the internal topic; retrying");
                }
            }
            if !backoff.wait(&self.context.shutdown).await {
                return false;
            }
        }
    }

    /// Takes on a new assignment: drops the tasks of partitions gone elsewhere (their
    /// checkpoints stand for the new owner) and loads the checkpoints of new ones.
    async fn assign(
        &self,
        state: &mut Running,
        checkpoints: &Checkpoints,
        partitions: Vec<u32>,
    ) -> Result<(), AnalyzerError> {
        state.tasks.retain(|p, _| partitions.contains(p));
        state.saved.retain(|p, _| partitions.contains(p));
        let sources = (self.stage == Stage::Keyed).then_some(state.sources);
        for partition in partitions {
            if state.tasks.contains_key(&partition) {
                continue;
            }
            let loader = checkpoints.clone();
            let saved = tokio::task::spawn_blocking(move || loader.load(partition)).await??;
            let now = Instant::now();
            let task = match saved {
                None => Task::new(&self.plan, partition, sources, now),
                Some(saved) => {
                    let task = Task::restore(&self.plan, partition, sources, saved, now).map_err(
                        |reason| AnalyzerError::Checkpoint {
                            path: checkpoints.path(partition),
                            reason,
                        },
                    )?;
                    tracing::info!(query = %self.plan.name, stage = self.stage.name(), partition, offset = task.next_offset, open_windows = task.windows.open(), "resuming from checkpoint");
                    task
                }
            };
            state.saved.insert(partition, task.next_offset);
            state.tasks.insert(partition, task);
        }
        tracing::info!(query = %self.plan.name, stage = self.stage.name(), partitions = ?state.tasks.keys().collect::<Vec<_>>(), "assignment");
        Ok(())
    }

    /// Feeds a chunk to its task.
    fn consume(&self, state: &mut Running, chunk: &RawRecordChunk) {
        let Some(task) = state.tasks.get_mut(&chunk.partition) else {
            return;
        };
        let now = Instant::now();
        let mut out = std::mem::take(&mut state.pending);
        // One buffer for every event's aggregate inputs, borrowed from the chunk.
        let mut inputs: Vec<(usize, Scalar<'_>)> = Vec::new();
        for record in &chunk.records {
            if record.offset < task.next_offset {
                continue; // in the checkpointed state already
            }
            if record.offset > task.next_offset {
                tracing::error!(
                    query = %self.plan.name,
                    stage = self.stage.name(),
                    partition = chunk.partition,
                    expected = task.next_offset,
                    found = record.offset,
                    "records are missing: the group's committed offset is ahead of the checkpoint, or retention deleted them"
                );
                metrics::counter!("runnel_analyzer_offset_gaps_total", "query" => self.plan.name.clone()).increment(1);
            }
            match self.stage {
                Stage::Source => {
                    task.observe_source(&self.plan, record, &mut inputs, &mut out, now)
                }
                Stage::Keyed => task.observe_keyed(&self.plan, record, now),
            }
        }
        state.pending = out;
    }

    /// After every message: fire and drop windows, write out what is due, and checkpoint
    /// when the interval has passed.
    async fn step(
        &self,
        state: &mut Running,
        checkpoints: &Checkpoints,
        member: &mut Member,
    ) -> Result<Flow, AnalyzerError> {
        let now = Instant::now();
        let mut out = std::mem::take(&mut state.pending);
        let instance = self.instance_watermark(state, now);
        let mut marks: Vec<Event> = Vec::new();
        for task in state.tasks.values_mut() {
            let fire = match self.stage {
                Stage::Source => instance,
                Stage::Keyed => task.sources_firing_watermark(&self.plan, now),
            };
            if self.plan.key.is_some() && self.stage == Stage::Source {
                if let Some(watermark) = task.announce(&self.plan) {
                    marks.push(rekey::mark(task.partition, task.next_offset, watermark));
                }
            } else {
                task.flush(&self.plan, fire, &mut out);
            }
        }
        if (!out.is_empty() || !marks.is_empty()) && !self.write(state, out, marks).await? {
            return Ok(Flow::Stop);
        }
        if state.last_checkpoint.elapsed() >= self.context.checkpoint_interval {
            self.checkpoint(state, checkpoints, member).await?;
        }
        self.publish(state);
        Ok(Flow::Continue)
    }

    /// The firing watermark of a source stage's tasks: the least own watermark of the
    /// partitions that are not idle (all idle: the greatest), so that an idle partition's
    /// windows fire as the others move on.
    fn instance_watermark(&self, state: &Running, now: Instant) -> Option<i64> {
        let mut active = state
            .tasks
            .values()
            .filter(|t| !t.idle(&self.plan, now))
            .map(|t| t.own_watermark(&self.plan))
            .peekable();
        if active.peek().is_none() {
            return state
                .tasks
                .values()
                .filter_map(|t| t.own_watermark(&self.plan))
                .max();
        }
        active.try_fold(i64::MAX, |min, w| w.map(|w| min.min(w)))
    }

    /// Writes a batch's outputs, retrying until taken; false if shutdown came first (the
    /// last checkpoints stay, and the records behind the outputs are read again).
    async fn write(
        &self,
        state: &mut Running,
        out: Outputs,
        marks: Vec<Event>,
    ) -> Result<bool, AnalyzerError> {
        let shutdown = &self.context.shutdown;
        if !out.keyed.is_empty() || !marks.is_empty() {
            let partitions = state.sources;
            let Some(producer) = self
                .producer(
                    &mut state.producers.keyed,
                    &self.plan.keyed_topic(),
                    partitions,
                )
                .await
            else {
                return Ok(false);
            };
            if !out.keyed.is_empty() && !send(producer, out.keyed, shutdown).await {
                return Ok(false);
            }
            if !marks.is_empty() {
                for partition in 0..producer.partitions() {
                    if !send_to(producer, partition, &marks, shutdown).await {
                        return Ok(false);
                    }
                }
            }
        }
        if !out.late.is_empty()
            && let Some(topic) = &self.plan.late_topic
        {
            let late: Vec<Event> = out
                .late
                .iter()
                .filter_map(|bytes| prost::Message::decode(bytes.clone()).ok())
                .collect();
            let Some(producer) = self
                .producer(&mut state.producers.late, topic, state.sources)
                .await
            else {
                return Ok(false);
            };
            if !send(producer, late, shutdown).await {
                return Ok(false);
            }
        }
        if !out.results.is_empty() {
            let count = out.results.len() as u64;
            let results = self.results(out.results);
            if let Some(topic) = &self.plan.output_topic {
                let events: Vec<Event> = results.iter().map(result_event).collect();
                let Some(producer) = self
                    .producer(&mut state.producers.output, topic, state.sources)
                    .await
                else {
                    return Ok(false);
                };
                if !send(producer, events, shutdown).await {
                    return Ok(false);
                }
            }
            if !self.put(results).await? {
                return Ok(false);
            }
            state.emitted += count;
            metrics::counter!("runnel_analyzer_results_total", "query" => self.plan.name.clone())
                .increment(count);
        }
        Ok(true)
    }

    /// A producer for `topic`, made (and the topic created) on first use.
    async fn producer<'p>(
        &self,
        slot: &'p mut Option<Producer>,
        topic: &str,
        partitions: u32,
    ) -> Option<&'p mut Producer> {
        let mut backoff = Backoff::new(Duration::from_secs(2));
        while slot.is_none() {
            let options = ProducerOptions {
                create_partitions: Some(partitions),
                retry_for: Duration::from_secs(10),
                ..ProducerOptions::default()
            };
            match Producer::new(self.broker(), topic, options).await {
                Ok(producer) => *slot = Some(producer),
                Err(error) => {
                    tracing::warn!(query = %self.plan.name, topic, %error, "cannot produce to topic; retrying");
                    if !backoff.wait(&self.context.shutdown).await {
                        return None;
                    }
                }
            }
        }
        slot.as_mut()
    }

    fn results(&self, emissions: Vec<Emission>) -> Vec<QueryResult> {
        let emitted_at = Some(now_millis().into());
        emissions
            .into_iter()
            .map(|window| {
                // The result continues the trace of the first event in its window.
                let span = tracing::info_span!("analyzer.emit_window", query = %self.plan.name, key = %window.key, window_start = window.start);
                let mut headers = HashMap::new();
                if let Some(traceparent) = window.trace {
                    continue_trace(&span, &HashMap::from([(TRACEPARENT.to_owned(), traceparent)]));
                }
                inject_into_headers(&span, &mut headers);
                QueryResult {
                    query: self.plan.name.clone(),
                    key: window.key,
                    window_start: Some(Millis(window.start).into()),
                    window_end: Some(Millis(window.end).into()),
                    values: window.values,
                    emitted_at,
                    headers,
                    items: window.items,
                    // Assigned by the store.
                    sequence: 0,
                }
            })
            .collect()
    }

    /// Writes results to the store, retrying until it takes them. False if shutdown came
    /// first.
    async fn put(&self, results: Vec<QueryResult>) -> Result<bool, AnalyzerError> {
        for chunk in results.chunks(PUT_CHUNK) {
            let mut backoff = Backoff::new(Duration::from_secs(2));
            loop {
                let request = PutRequest {
                    results: chunk.to_vec(),
                    fence: None,
                };
                match self.context.store.clone().put(request).await {
                    Ok(_) => break,
                    Err(status) if status.code() == Code::InvalidArgument => {
                        return Err(AnalyzerError::StoreRejected {
                            query: self.plan.name.clone(),
                            message: status.message().to_owned(),
                        });
                    }
                    Err(status) => {
                        metrics::counter!("runnel_analyzer_store_retries_total", "query" => self.plan.name.clone()).increment(1);
                        tracing::warn!(query = %self.plan.name, code = ?status.code(), error = %status.message(), "store did not take results; retrying");
                        if !backoff.wait(&self.context.shutdown).await {
                            return Ok(false);
                        }
                    }
                }
            }
        }
        Ok(true)
    }

    /// Saves every task that moved since its last checkpoint, then commits their offsets
    /// to the group. Everything they produced has been written by now.
    async fn checkpoint(
        &self,
        state: &mut Running,
        checkpoints: &Checkpoints,
        member: &mut Member,
    ) -> Result<(), AnalyzerError> {
        state.last_checkpoint = Instant::now();
        let changed: Vec<(u32, crate::task::TaskState)> = state
            .tasks
            .values()
            .filter(|t| state.saved.get(&t.partition) != Some(&t.next_offset))
            .map(|t| (t.partition, t.state()))
            .collect();
        if changed.is_empty() {
            return Ok(());
        }
        let started = Instant::now();
        let saver = checkpoints.clone();
        let saved =
            tokio::task::spawn_blocking(move || -> Result<Vec<(u32, u64)>, AnalyzerError> {
                let mut offsets = Vec::new();
                for (partition, task) in changed {
                    let offset = task.next_offset;
                    saver.save(partition, task)?;
                    offsets.push((partition, offset));
                }
                Ok(offsets)
            })
            .await??;
        metrics::histogram!("runnel_analyzer_checkpoint_seconds", "query" => self.plan.name.clone())
            .record(started.elapsed().as_secs_f64());
        for (partition, offset) in &saved {
            state.saved.insert(*partition, *offset);
        }
        // A refusal (a rebalance this member has not read yet) is not an error: the
        // checkpoint is what the analyzer resumes from; the group's offsets only shorten a
        // new owner's replay.
        if let Err(error) = member.commit(&saved).await {
            tracing::debug!(query = %self.plan.name, %error, "commit refused");
        }
        Ok(())
    }

    fn publish(&self, state: &Running) {
        let mut status = StageStatus {
            emitted: state.emitted,
            partitions: state.tasks.keys().copied().collect(),
            ..StageStatus::default()
        };
        let mut watermark: Option<i64> = None;
        for task in state.tasks.values() {
            let c = task.counters;
            let total = &mut status.counters;
            total.processed += c.processed;
            total.applied += c.applied;
            total.late += c.late;
            total.filtered += c.filtered;
            total.no_key += c.no_key;
            total.malformed += c.malformed;
            total.duplicates += c.duplicates;
            status.open_windows += task.windows.open();
            if let Some(w) = task.own_watermark(&self.plan) {
                watermark = Some(watermark.map_or(w, |m| m.min(w)));
            }
        }
        status.watermark = watermark;
        let name = self.plan.name.clone();
        metrics::gauge!("runnel_analyzer_open_windows", "query" => name.clone(), "stage" => self.stage.name())
            .set(status.open_windows as f64);
        if let Some(w) = watermark {
            metrics::gauge!("runnel_analyzer_watermark_lag_seconds", "query" => name, "stage" => self.stage.name())
                .set(now_millis().0.saturating_sub(w) as f64 / 1000.0);
        }
        self.status.send_replace(status);
    }
}

/// A stage's working state.
struct Running {
    tasks: BTreeMap<u32, Task>,
    /// The offset of each task's last checkpoint.
    saved: HashMap<u32, u64>,
    producers: Producers,
    emitted: u64,
    last_checkpoint: Instant,
    /// What the tasks produced since the last write.
    pending: Outputs,
    /// The source topic's partition count.
    sources: u32,
}

/// A result as an event of the output topic: JSON, keyed by the result's key, with an id
/// that names the result (a consumer keeps the last one per id).
fn result_event(result: &QueryResult) -> Event {
    let start = result.window_start.map(Millis::from).unwrap_or_default().0;
    Event {
        id: format!("{}/{}/{start}", result.query, result.key),
        source: "runnel-analyzer".into(),
        r#type: "result".into(),
        key: result.key.clone(),
        event_time: result.window_end,
        payload: runnel_proto::json::result_json(result)
            .to_string()
            .into_bytes()
            .into(),
        ..Event::default()
    }
}

/// Sends until acknowledged; false at shutdown.
async fn send(producer: &mut Producer, events: Vec<Event>, shutdown: &Shutdown) -> bool {
    let mut backoff = Backoff::new(Duration::from_secs(2));
    loop {
        match producer.send(events.clone()).await {
            Ok(_) => return true,
            Err(error) => {
                tracing::warn!(%error, "produce failed; retrying");
                if !backoff.wait(shutdown).await {
                    return false;
                }
            }
        }
    }
}

/// Sends events to one partition until acknowledged; false at shutdown.
async fn send_to(
    producer: &mut Producer,
    partition: u32,
    events: &[Event],
    shutdown: &Shutdown,
) -> bool {
    let mut backoff = Backoff::new(Duration::from_secs(2));
    loop {
        match producer.send_to(partition, events).await {
            Ok(_) => return true,
            Err(error) => {
                tracing::warn!(%error, "produce failed; retrying");
                if !backoff.wait(shutdown).await {
                    return false;
                }
            }
        }
    }
}
