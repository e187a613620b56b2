//! Running one stage of one query as a member of its consumer group.
//!
//! ```text
//! broker ──Subscribe(group)──► member ──chunks──► tasks (one per owned partition)
//!   ▲                            │                  │ results, re-keyed events, late events
//!   │ Assignment.starts:         │                  ▼
//!   │ offset + checkpoint handle │            write out: store Put / Produce, fenced, retried
//!   └────────────────────────────┴──commit◄── checkpoint every interval (after the writes):
//!                                             state → checkpoint topic, then offset + handle
//! ```
//!
//! The broker deals the topic's partitions over the instances in the group; when one dies
//! or joins, the assignment changes. For every partition whose delivery (re)starts, the
//! assignment says the offset it restarts at and the metadata committed with that offset —
//! the handle of the checkpoint taken at exactly that offset ([`crate::checkpoint`]) — and
//! the runner builds the task from that checkpoint (or fresh, when none was committed);
//! partitions that continue keep their task; the others' tasks are dropped. The state and
//! the read position come from one record, so they cannot disagree: a record past the one
//! a task expects is a gap, which stops the analyzer with an error instead of being
//! skipped.
//!
//! **Fencing.** Every write the stage makes for its tasks — store `Put`s, re-keyed, output
//! and late events, checkpoints, commits — carries the member's [`GroupFence`]: once the
//! group has moved on without this member (it was paused past its session timeout, cut
//! off), the broker and the store refuse them with FAILED_PRECONDITION, and the member
//! drops every task and joins again, so a zombie never overwrites what the partitions'
//! new owner writes.
//!
//! The order is what makes results exactly-once: everything a batch of records produced is
//! acknowledged downstream before any checkpoint that includes those records is written.
//! If the store or broker is down, the runner retries with backoff and stops reading
//! meanwhile (the member keeps heartbeating, so the group does not evict it), and the
//! broker keeps everything.

use crate::checkpoint::{Checkpoints, Handle, SaveError, Stage};
use crate::error::AnalyzerError;
use crate::event::{RawRecordChunk, RawSubscribeResponse};
use crate::path::Scalar;
use crate::plan::Plan;
use crate::rekey;
use crate::task::{Clock, Counters, Outputs, Task};
use crate::window::Emission;
use futures::FutureExt;
use runnel_client::{
    ClientError, ConsumerOptions, GroupConsumer, GroupEvent, Producer, ProducerOptions,
};
use runnel_proto::v1::broker_client::BrokerClient;
use runnel_proto::v1::store_client::StoreClient;
use runnel_proto::v1::{
    CreateTopicRequest, Event, GroupFence, ListTopicsRequest, PartitionOffset, PutRequest,
    QueryResult, RetentionPolicy,
};
use runnel_proto::{Millis, now_millis};
use runnel_security::Peer;
use runnel_server::Shutdown;
use runnel_telemetry::propagation::{TRACEPARENT, continue_trace, inject_into_headers};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tonic::Code;

pub(crate) type Store = StoreClient<Peer>;

/// Records messages one step takes from the group stream at most, when more are there.
const DRAIN_MESSAGES: usize = 256;

/// Outputs (results, re-keyed and late events) after which a step stops draining the
/// stream: what it writes at once stays bounded.
const DRAIN_OUTPUTS: usize = 8 * PUT_CHUNK;

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

/// What the group stream gave: an assignment, records, its end, or why it broke.
type Next = Result<Option<GroupEvent<RawRecordChunk>>, ClientError>;

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
    pub(crate) checkpoint_interval: Duration,
    pub(crate) checkpoint_refresh: Duration,
    pub(crate) checkpoint_retention: Duration,
    pub(crate) checkpoint_retention_bytes: u64,
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
    checkpoints: Option<Producer>,
}

impl Producers {
    /// Every later write carries `fence`.
    fn fence(&mut self, fence: &Option<GroupFence>) {
        for producer in [
            &mut self.keyed,
            &mut self.output,
            &mut self.late,
            &mut self.checkpoints,
        ]
        .into_iter()
        .flatten()
        {
            producer.set_fence(fence.clone());
        }
    }
}

/// Whether the stage should go on.
#[derive(Debug, PartialEq, Eq)]
enum Flow {
    Continue,
    /// Shutdown.
    Stop,
    /// This member's tasks are void (it was fenced, or the assignment does not fit what it
    /// holds): drop them all and join the group again.
    Rejoin,
}

/// Goes on with the caller's work unless `flow` says otherwise, which it returns.
macro_rules! proceed {
    ($flow:expr) => {
        match $flow {
            Flow::Continue => {}
            other => return Ok(other),
        }
    };
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
        if self.stage == Stage::Keyed
            && !self
                .ensure_topic(&self.plan.keyed_topic(), sources, None)
                .await
        {
            return Ok(());
        }
        let checkpoints = Checkpoints::new(
            &self.plan.instance,
            self.stage,
            &self.plan.fingerprint,
            self.context.max_message,
        );
        let retention = RetentionPolicy {
            max_age: Some(prost_types::Duration {
                seconds: self.context.checkpoint_retention.as_secs() as i64,
                nanos: self.context.checkpoint_retention.subsec_nanos() as i32,
            }),
            // Zero: no size limit.
            max_bytes: Some(self.context.checkpoint_retention_bytes),
        };
        if !self
            .ensure_topic(&checkpoints.topic(), sources, Some(retention))
            .await
        {
            return Ok(());
        }
        let group = match self.stage {
            Stage::Source => format!("{}.{}", self.context.group, self.plan.instance),
            Stage::Keyed => format!("{}.{}.keyed", self.context.group, self.plan.instance),
        };
        let mut state = Running {
            tasks: BTreeMap::new(),
            saved: HashMap::new(),
            producers: Producers::default(),
            fence: None,
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
            // A message taken from the stream while draining it that is not records: it
            // is handled after the step that writes out what the drained records made.
            let mut held = None;
            loop {
                let next = match held.take() {
                    Some(next) => Some(next),
                    None => tokio::select! {
                        // The stream before the ticker: a new assignment waiting there must
                        // change this member's fence before a checkpoint goes out under the
                        // old one. (A busy stream starves no checkpoint: every drained batch
                        // of messages is a step.)
                        biased;
                        () = self.context.shutdown.wait() => {
                            self.checkpoint(&mut state, &checkpoints, &mut member).await?;
                            self.publish(&state);
                            return Ok(());
                        }
                        next = member.next() => Some(next),
                        _ = ticker.tick() => None,
                    },
                };
                let flow = match next {
                    None => Flow::Continue,
                    Some(Ok(Some(GroupEvent::Assigned {
                        partitions, starts, ..
                    }))) => {
                        backoff.reset();
                        self.assign(&mut state, &checkpoints, &member, partitions, starts)
                            .await?
                    }
                    Some(Ok(Some(GroupEvent::Records { records: chunk, .. }))) => {
                        backoff.reset();
                        self.consume(&mut state, &chunk)?;
                        // Taking the stream's next message is cancel-safe (the select
                        // above relies on it too): when none is there yet, nothing is lost
                        // by not waiting for it.
                        held = self.drain(&mut state, || member.next().now_or_never())?;
                        Flow::Continue
                    }
                    Some(Ok(None)) => {
                        tracing::warn!(query = %self.plan.name, stage = self.stage.name(), "the broker ended the group stream; rejoining");
                        break;
                    }
                    Some(Err(error)) => {
                        tracing::warn!(query = %self.plan.name, stage = self.stage.name(), %error, "group stream broke; rejoining");
                        break;
                    }
                };
                let flow = match flow {
                    Flow::Continue => self.step(&mut state, &checkpoints, &mut member).await?,
                    other => other,
                };
                match flow {
                    Flow::Continue => {}
                    Flow::Stop => {
                        self.publish(&state);
                        return Ok(());
                    }
                    Flow::Rejoin => {
                        // Whatever this member holds may be behind what the partitions'
                        // new owners hold: nothing of it may be written or kept. The next
                        // assignment restores every partition from its committed checkpoint.
                        tracing::warn!(query = %self.plan.name, stage = self.stage.name(), member = %self.context.member_id, "dropping every task and joining the group again");
                        metrics::counter!("runnel_analyzer_rejoins_total", "query" => self.plan.name.clone(), "stage" => self.stage.name()).increment(1);
                        state.drop_tasks();
                        self.publish(&state);
                        break;
                    }
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

    /// Creates an internal topic — a re-keyed query's, or a stage's checkpoints (as many
    /// partitions as the query's source) — unless it exists; false at shutdown.
    async fn ensure_topic(
        &self,
        name: &str,
        partitions: u32,
        retention: Option<RetentionPolicy>,
    ) -> bool {
        let mut backoff = Backoff::new(Duration::from_secs(1));
        loop {
            let request = CreateTopicRequest {
                name: name.to_owned(),
                partitions,
                retention,
            };
            match self.broker().create_topic(request).await {
                Ok(_) => return true,
                Err(status) if status.code() == Code::AlreadyExists => return true,
                Err(status) => {
                    tracing::warn!(query = %self.plan.name, topic = name, error = %status.message(), "cannot create an internal topic; retrying");
                }
            }
            if !backoff.wait(&self.context.shutdown).await {
                return false;
            }
        }
    }

    /// Takes on a new assignment: drops the tasks of partitions gone elsewhere, builds the
    /// task of every partition whose delivery (re)starts from the checkpoint committed with
    /// its start offset (fresh at that offset when none was), and keeps the others'.
    async fn assign(
        &self,
        state: &mut Running,
        checkpoints: &Checkpoints,
        member: &Member,
        partitions: Vec<u32>,
        starts: Vec<PartitionOffset>,
    ) -> Result<Flow, AnalyzerError> {
        let owned: BTreeSet<u32> = partitions.iter().copied().collect();
        state.tasks.retain(|p, _| owned.contains(p));
        state.saved.retain(|p, _| owned.contains(p));
        let restarting: BTreeSet<u32> = starts.iter().map(|s| s.partition).collect();
        if let Some(missing) = owned
            .iter()
            .find(|p| !restarting.contains(p) && !state.tasks.contains_key(p))
        {
            tracing::warn!(query = %self.plan.name, stage = self.stage.name(), partition = missing, "the assignment continues a partition this member holds no task for; joining again");
            return Ok(Flow::Rejoin);
        }
        let sources = (self.stage == Stage::Keyed).then_some(state.sources);
        for start in starts {
            let partition = start.partition;
            if !owned.contains(&partition) {
                continue;
            }
            let fail = |reason: String| AnalyzerError::Checkpoint {
                query: self.plan.name.clone(),
                stage: self.stage.name(),
                partition,
                reason,
            };
            let now = Instant::now();
            let task = if start.metadata.is_empty() {
                let mut task = Task::new(&self.plan, partition, sources, now);
                // A query created to read only what came after it skips what was there.
                let first = match self.stage {
                    Stage::Source => self.plan.start_offsets.get(&partition).copied(),
                    Stage::Keyed => None,
                };
                task.next_offset = start.offset.max(first.unwrap_or(0));
                task
            } else {
                let handle = Handle::decode(&start.metadata).map_err(fail)?;
                let Some(saved) = checkpoints
                    .load(&self.broker(), partition, &handle, &self.context.shutdown)
                    .await?
                else {
                    return Ok(Flow::Stop);
                };
                if saved.next_offset != start.offset {
                    return Err(fail(format!(
                        "its state continues at offset {}, but the group delivers from offset {}, committed with it",
                        saved.next_offset, start.offset
                    )));
                }
                let task =
                    Task::restore(&self.plan, partition, sources, saved, now).map_err(fail)?;
                tracing::info!(query = %self.plan.name, stage = self.stage.name(), partition, offset = task.next_offset, checkpoint = handle.first_offset(), open_windows = task.windows.open(), "resuming from checkpoint");
                task
            };
            state.saved.insert(
                partition,
                Saved {
                    offset: task.next_offset,
                    at: now,
                },
            );
            state.tasks.insert(partition, task);
        }
        state.fence = Some(member.fence(partitions));
        state.producers.fence(&state.fence);
        tracing::info!(query = %self.plan.name, stage = self.stage.name(), generation = member.generation(), partitions = ?state.tasks.keys().collect::<Vec<_>>(), "assignment");
        Ok(Flow::Continue)
    }

    /// Feeds a chunk to its task; a gap in its offsets is an error.
    fn consume(&self, state: &mut Running, chunk: &RawRecordChunk) -> Result<(), AnalyzerError> {
        let Some(task) = state.tasks.get_mut(&chunk.partition) else {
            return Ok(());
        };
        let now = Instant::now();
        let mut out = std::mem::take(&mut state.pending);
        // One buffer for every event's aggregate inputs, borrowed from the chunk.
        let mut inputs: Vec<(usize, Scalar<'_>)> = Vec::new();
        for record in &chunk.records {
            if record.offset < task.next_offset {
                continue; // in the task's state already (a replay)
            }
            if record.offset > task.next_offset {
                metrics::counter!("runnel_analyzer_offset_gaps_total", "query" => self.plan.name.clone()).increment(1);
                return Err(AnalyzerError::Gap {
                    query: self.plan.name.clone(),
                    stage: self.stage.name(),
                    partition: chunk.partition,
                    expected: task.next_offset,
                    found: record.offset,
                });
            }
            match self.stage {
                Stage::Source => {
                    task.observe_source(&self.plan, record, &mut inputs, &mut out, now)
                }
                Stage::Keyed => task.observe_keyed(&self.plan, record, now),
            }
        }
        state.pending = out;
        Ok(())
    }

    /// Feeds the tasks the records messages the stream holds already (up to
    /// [`DRAIN_MESSAGES`] of them, or until [`DRAIN_OUTPUTS`] outputs wait), so that one
    /// step — one store `Put`, one produce per output topic — covers them all: a stage that
    /// fell behind catches up in bigger writes instead of staying one write per message
    /// behind, and with `EMIT ON UPDATE` a window changed by many of them is written once.
    /// Returns the first message that is not records, to be handled after that step.
    /// `ready` is the stream's next message if it is there already.
    fn drain(
        &self,
        state: &mut Running,
        mut ready: impl FnMut() -> Option<Next>,
    ) -> Result<Option<Next>, AnalyzerError> {
        for _ in 1..DRAIN_MESSAGES {
            if state.pending.len() >= DRAIN_OUTPUTS {
                break;
            }
            match ready() {
                None => break,
                Some(Ok(Some(GroupEvent::Records { records: chunk, .. }))) => {
                    self.consume(state, &chunk)?;
                }
                Some(other) => return Ok(Some(other)),
            }
        }
        Ok(None)
    }

    /// After every drained batch of messages: fire and drop windows, write out what is due,
    /// and checkpoint when the interval has passed.
    async fn step(
        &self,
        state: &mut Running,
        checkpoints: &Checkpoints,
        member: &mut Member,
    ) -> Result<Flow, AnalyzerError> {
        let mut out = std::mem::take(&mut state.pending);
        let mut marks: Vec<Event> = Vec::new();
        for task in state.tasks.values_mut() {
            if self.re_keys() {
                if let Some(watermark) = task.announce(&self.plan) {
                    marks.push(rekey::mark(task.partition, task.next_offset, watermark));
                }
            } else {
                task.flush(&self.plan, &mut out);
            }
        }
        if !out.is_empty() || !marks.is_empty() {
            proceed!(self.write(state, out, marks).await?);
        }
        if state.last_checkpoint.elapsed() >= self.context.checkpoint_interval {
            proceed!(self.checkpoint(state, checkpoints, member).await?);
        }
        self.publish(state);
        Ok(Flow::Continue)
    }

    /// Whether this stage re-keys events for the keyed stage (and so holds no windows).
    fn re_keys(&self) -> bool {
        self.plan.key.is_some() && self.stage == Stage::Source
    }

    /// What an idle source partition's watermark moves up to: the least watermark of the
    /// instance's partitions that are not idle (all idle: the greatest).
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

    /// Writes a batch's outputs, retrying until taken; `Stop` if shutdown came first (the
    /// last checkpoints stay, and the records behind the outputs are read again), `Rejoin`
    /// if this member was fenced.
    async fn write(
        &self,
        state: &mut Running,
        out: Outputs,
        marks: Vec<Event>,
    ) -> Result<Flow, AnalyzerError> {
        let shutdown = &self.context.shutdown;
        if !out.keyed.is_empty() || !marks.is_empty() {
            let Some(producer) = self
                .producer(
                    &mut state.producers.keyed,
                    &self.plan.keyed_topic(),
                    state.sources,
                    &state.fence,
                )
                .await
            else {
                return Ok(Flow::Stop);
            };
            if !out.keyed.is_empty() {
                proceed!(send(producer, out.keyed, shutdown).await);
            }
            if !marks.is_empty() {
                for partition in 0..producer.partitions() {
                    proceed!(send_to(producer, partition, &marks, shutdown).await);
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
                .producer(
                    &mut state.producers.late,
                    topic,
                    state.sources,
                    &state.fence,
                )
                .await
            else {
                return Ok(Flow::Stop);
            };
            proceed!(send(producer, late, shutdown).await);
        }
        if !out.results.is_empty() {
            let count = out.results.len() as u64;
            let results = self.results(out.results);
            if let Some(topic) = &self.plan.output_topic {
                let events: Vec<Event> = results.iter().map(result_event).collect();
                let Some(producer) = self
                    .producer(
                        &mut state.producers.output,
                        topic,
                        state.sources,
                        &state.fence,
                    )
                    .await
                else {
                    return Ok(Flow::Stop);
                };
                proceed!(send(producer, events, shutdown).await);
            }
            proceed!(self.put(results, &state.fence).await?);
            state.emitted += count;
            metrics::counter!("runnel_analyzer_results_total", "query" => self.plan.name.clone())
                .increment(count);
        }
        Ok(Flow::Continue)
    }

    /// A producer for `topic` whose writes carry `fence`, made (and the topic created) on
    /// first use.
    async fn producer<'p>(
        &self,
        slot: &'p mut Option<Producer>,
        topic: &str,
        partitions: u32,
        fence: &Option<GroupFence>,
    ) -> Option<&'p mut Producer> {
        let mut backoff = Backoff::new(Duration::from_secs(2));
        while slot.is_none() {
            let options = ProducerOptions {
                create_partitions: Some(partitions),
                retry_for: Duration::from_secs(10),
                ..ProducerOptions::default()
            };
            match Producer::new(self.broker(), topic, options).await {
                Ok(mut producer) => {
                    producer.set_fence(fence.clone());
                    *slot = Some(producer);
                }
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
                    input_offset: window.input_offset,
                    partial: window.partial,
                    // Assigned by the store.
                    sequence: 0,
                }
            })
            .collect()
    }

    /// Writes results to the store under `fence`, retrying until it takes them: `Stop` if
    /// shutdown came first, `Rejoin` if the store refused them because this member was
    /// fenced (never retried: the partitions' new owner writes them now).
    async fn put(
        &self,
        results: Vec<QueryResult>,
        fence: &Option<GroupFence>,
    ) -> Result<Flow, AnalyzerError> {
        for chunk in results.chunks(PUT_CHUNK) {
            let mut backoff = Backoff::new(Duration::from_secs(2));
            loop {
                let request = PutRequest {
                    results: chunk.to_vec(),
                    fence: fence.clone(),
                };
                match self.context.store.clone().put(request).await {
                    Ok(_) => break,
                    Err(status) if status.code() == Code::InvalidArgument => {
                        return Err(AnalyzerError::StoreRejected {
                            query: self.plan.name.clone(),
                            message: status.message().to_owned(),
                        });
                    }
                    Err(status) if status.code() == Code::FailedPrecondition => {
                        tracing::warn!(query = %self.plan.name, stage = self.stage.name(), error = %status.message(), "fenced: the store refused results of partitions this member no longer owns");
                        return Ok(Flow::Rejoin);
                    }
                    Err(status) => {
                        metrics::counter!("runnel_analyzer_store_retries_total", "query" => self.plan.name.clone()).increment(1);
                        tracing::warn!(query = %self.plan.name, code = ?status.code(), error = %status.message(), "store did not take results; retrying");
                        if !backoff.wait(&self.context.shutdown).await {
                            return Ok(Flow::Stop);
                        }
                    }
                }
            }
        }
        Ok(Flow::Continue)
    }

    /// Checkpoints every task that moved since its last checkpoint, whose checkpoint is
    /// `checkpoint_refresh` old, or whose idle partition's watermark moved now: its state to
    /// the checkpoint topic, then one commit of every such task's offset with the handle to
    /// its state. Everything the tasks produced has been written by now. `Rejoin` if this
    /// member was fenced.
    async fn checkpoint(
        &self,
        state: &mut Running,
        checkpoints: &Checkpoints,
        member: &mut Member,
    ) -> Result<Flow, AnalyzerError> {
        let now = Instant::now();
        state.last_checkpoint = now;
        // Idle partitions' watermarks move here, so that the checkpoint records the advance
        // before any window it closes is written (the next step writes them).
        let mut advanced: HashMap<u32, Clock> = HashMap::new();
        if !self.re_keys() {
            let target = match self.stage {
                Stage::Source => self.instance_watermark(state, now),
                Stage::Keyed => None,
            };
            for task in state.tasks.values_mut() {
                if let Some(before) = task.advance_idle(&self.plan, target, now) {
                    advanced.insert(task.partition, before);
                }
            }
        }
        let refresh = self.context.checkpoint_refresh;
        let due: Vec<(u32, crate::task::TaskState)> = state
            .tasks
            .values()
            .filter(|t| {
                advanced.contains_key(&t.partition)
                    || state.saved.get(&t.partition).is_none_or(|saved| {
                        saved.offset != t.next_offset || now.duration_since(saved.at) >= refresh
                    })
            })
            .map(|t| (t.partition, t.state()))
            .collect();
        let flow = self.save(state, checkpoints, member, due, now).await;
        for (partition, before) in advanced {
            let committed = state.saved.get(&partition).is_some_and(|s| s.at == now);
            if let (false, Some(task)) = (committed, state.tasks.get_mut(&partition)) {
                task.put_back(before);
            }
        }
        flow
    }

    /// Writes the `due` tasks' states to the checkpoint topic and commits their offsets
    /// with the handles to them, each committed one `saved` at `now`.
    async fn save(
        &self,
        state: &mut Running,
        checkpoints: &Checkpoints,
        member: &mut Member,
        due: Vec<(u32, crate::task::TaskState)>,
        now: Instant,
    ) -> Result<Flow, AnalyzerError> {
        if due.is_empty() {
            return Ok(Flow::Continue);
        }
        let started = Instant::now();
        let Some(producer) = self
            .producer(
                &mut state.producers.checkpoints,
                &checkpoints.topic(),
                state.sources,
                &state.fence,
            )
            .await
        else {
            return Ok(Flow::Stop);
        };
        let mut offsets = Vec::with_capacity(due.len());
        for (partition, task) in due {
            let offset = task.next_offset;
            let bytes = checkpoints.encode(partition, task)?;
            match checkpoints.save(producer, partition, &bytes).await {
                Ok(handle) => {
                    metrics::histogram!("runnel_analyzer_checkpoint_bytes", "query" => self.plan.name.clone())
                        .record(bytes.len() as f64);
                    offsets.push(PartitionOffset {
                        partition,
                        offset,
                        metadata: handle.encode(),
                    });
                }
                Err(SaveError::Fenced(status)) => {
                    tracing::warn!(query = %self.plan.name, stage = self.stage.name(), partition, error = %status.message(), "fenced: the broker refused a checkpoint");
                    return Ok(Flow::Rejoin);
                }
                Err(SaveError::Failed(reason)) => {
                    tracing::warn!(query = %self.plan.name, stage = self.stage.name(), partition, %reason, "checkpoint not written; the next one tries again");
                }
            }
        }
        if offsets.is_empty() {
            return Ok(Flow::Continue);
        }
        match member.commit_with_metadata(offsets.clone()).await {
            Ok(_) => {
                for committed in offsets {
                    state.saved.insert(
                        committed.partition,
                        Saved {
                            offset: committed.offset,
                            at: now,
                        },
                    );
                }
            }
            Err(ClientError::Broker(status)) if status.code() == Code::FailedPrecondition => {
                tracing::warn!(query = %self.plan.name, stage = self.stage.name(), error = %status.message(), "fenced: the group refused this member's commit");
                return Ok(Flow::Rejoin);
            }
            Err(error) => {
                tracing::warn!(query = %self.plan.name, stage = self.stage.name(), %error, "checkpoint not committed; the next one tries again");
            }
        }
        metrics::histogram!("runnel_analyzer_checkpoint_seconds", "query" => self.plan.name.clone())
            .record(started.elapsed().as_secs_f64());
        Ok(Flow::Continue)
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

/// A task's last committed checkpoint.
struct Saved {
    /// The offset it was taken at.
    offset: u64,
    /// When it was committed (or the task restored from it).
    at: Instant,
}

/// A stage's working state.
struct Running {
    tasks: BTreeMap<u32, Task>,
    /// Each task's last committed checkpoint.
    saved: HashMap<u32, Saved>,
    producers: Producers,
    /// What this member's writes carry: its generation and partitions.
    fence: Option<GroupFence>,
    emitted: u64,
    last_checkpoint: Instant,
    /// What the tasks produced since the last write.
    pending: Outputs,
    /// The source topic's partition count.
    sources: u32,
}

impl Running {
    /// Forgets every task and what they had produced, unwritten.
    fn drop_tasks(&mut self) {
        self.tasks.clear();
        self.saved.clear();
        self.pending = Outputs::default();
        self.fence = None;
        self.producers.fence(&None);
    }
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

/// What a refused send means: FAILED_PRECONDITION is the broker fencing this member off
/// (never retried); anything else is retried with backoff.
fn sent<T>(result: Result<T, ClientError>) -> Result<(), Option<ClientError>> {
    match result {
        Ok(_) => Ok(()),
        Err(ClientError::Broker(status)) if status.code() == Code::FailedPrecondition => {
            tracing::warn!(error = %status.message(), "fenced: the broker refused events of partitions this member no longer owns");
            Err(None)
        }
        Err(error) => Err(Some(error)),
    }
}

/// Sends until acknowledged: `Stop` at shutdown, `Rejoin` if fenced.
async fn send(producer: &mut Producer, events: Vec<Event>, shutdown: &Shutdown) -> Flow {
    let mut backoff = Backoff::new(Duration::from_secs(2));
    loop {
        match sent(producer.send(events.clone()).await) {
            Ok(()) => return Flow::Continue,
            Err(None) => return Flow::Rejoin,
            Err(Some(error)) => {
                tracing::warn!(%error, "produce failed; retrying");
                if !backoff.wait(shutdown).await {
                    return Flow::Stop;
                }
            }
        }
    }
}

/// Sends events to one partition until acknowledged: `Stop` at shutdown, `Rejoin` if
/// fenced.
async fn send_to(
    producer: &mut Producer,
    partition: u32,
    events: &[Event],
    shutdown: &Shutdown,
) -> Flow {
    let mut backoff = Backoff::new(Duration::from_secs(2));
    loop {
        match sent(producer.send_to(partition, events).await) {
            Ok(()) => return Flow::Continue,
            Err(None) => return Flow::Rejoin,
            Err(Some(error)) => {
                tracing::warn!(%error, "produce failed; retrying");
                if !backoff.wait(shutdown).await {
                    return Flow::Stop;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::QueryConfig;
    use crate::event::RawRecord;
    use prost::Message;
    use std::collections::VecDeque;

    fn runner(stage: Stage) -> StageRunner {
        let plan = toml::from_str::<QueryConfig>("name = \"q\"\n")
            .unwrap()
            .compile(0)
            .unwrap();
        // Never dialled (lazy, inside a runtime): nothing below leaves the process.
        let nowhere =
            runnel_security::connect_lazy("http://127.0.0.1:9", &Default::default()).unwrap();
        let (_trigger, shutdown) = Shutdown::new();
        StageRunner {
            plan: Arc::new(plan),
            stage,
            context: Context {
                broker: nowhere.clone(),
                store: StoreClient::new(nowhere),
                checkpoint_interval: Duration::from_secs(1),
                checkpoint_refresh: Duration::from_secs(3600),
                checkpoint_retention: Duration::from_secs(7 * 86400),
                checkpoint_retention_bytes: 256 << 20,
                group: "g".into(),
                member_id: "m".into(),
                session_timeout: Duration::from_secs(10),
                max_message: 4 << 20,
                shutdown,
            },
            status: watch::channel(StageStatus::default()).0,
        }
    }

    fn chunk(partition: u32, offsets: &[u64]) -> RawRecordChunk {
        RawRecordChunk {
            partition,
            generation: 1,
            stored_batches: Vec::new(),
            first_offset: offsets.first().copied().unwrap_or_default(),
            records: offsets
                .iter()
                .map(|&offset| RawRecord {
                    partition,
                    offset,
                    append_time: None,
                    event: Event {
                        key: "k".into(),
                        payload: b"{\"value\":1}".to_vec().into(),
                        event_time: Some(Millis(1_700_000_000_000).into()),
                        ..Event::default()
                    }
                    .encode_to_vec()
                    .into(),
                })
                .collect(),
        }
    }

    fn running(runner: &StageRunner, partition: u32, next_offset: u64) -> Running {
        let mut task = Task::new(&runner.plan, partition, None, Instant::now());
        task.next_offset = next_offset;
        Running {
            tasks: BTreeMap::from([(partition, task)]),
            saved: HashMap::new(),
            producers: Producers::default(),
            fence: None,
            emitted: 0,
            last_checkpoint: Instant::now(),
            pending: Outputs::default(),
            sources: 1,
        }
    }

    #[tokio::test]
    async fn records_already_in_the_state_are_skipped_and_the_next_ones_applied() {
        let runner = runner(Stage::Source);
        let mut state = running(&runner, 2, 5);
        runner
            .consume(&mut state, &chunk(2, &[3, 4, 5, 6]))
            .unwrap();
        let task = &state.tasks[&2];
        assert_eq!(task.next_offset, 7);
        assert_eq!(task.counters.processed, 2, "offsets 3 and 4 were replays");
    }

    fn records(partition: u32, offsets: &[u64]) -> Next {
        Ok(Some(GroupEvent::Records {
            partition,
            records: chunk(partition, offsets),
        }))
    }

    #[tokio::test]
    async fn a_drain_takes_the_ready_records_and_holds_back_the_first_other_message() {
        let runner = runner(Stage::Source);
        let mut state = running(&runner, 0, 0);
        let assigned = GroupEvent::Assigned {
            generation: 2,
            partitions: vec![0],
            starts: Vec::new(),
        };
        let mut stream = VecDeque::from([
            records(0, &[0, 1]),
            records(0, &[2]),
            Ok(Some(assigned.clone())),
            records(0, &[3]),
        ]);
        let held = runner
            .drain(&mut state, || stream.pop_front())
            .unwrap()
            .expect("the assignment is held back");
        assert_eq!(held.unwrap(), Some(assigned));
        assert_eq!(
            state.tasks[&0].next_offset, 3,
            "both records messages applied"
        );
        assert_eq!(stream.len(), 1, "nothing after the assignment was taken");

        // Nothing ready: the drain ends without waiting and holds nothing.
        let mut nothing = || None;
        assert!(runner.drain(&mut state, &mut nothing).unwrap().is_none());
    }

    #[tokio::test]
    async fn a_drain_stops_at_its_bound_and_leaves_the_rest_in_the_stream() {
        let runner = runner(Stage::Source);
        let mut state = running(&runner, 0, 0);
        let mut offered = 0;
        let held = runner
            .drain(&mut state, || {
                offered += 1;
                Some(records(0, &[offered - 1]))
            })
            .unwrap();
        assert!(held.is_none());
        // The message before the drain counts as its first.
        assert_eq!(offered, DRAIN_MESSAGES as u64 - 1);
        assert_eq!(state.tasks[&0].next_offset, offered);
    }

    #[tokio::test]
    async fn a_gap_in_a_partition_s_offsets_stops_the_stage_with_an_error() {
        let runner = runner(Stage::Source);
        let mut state = running(&runner, 1, 5);
        let error = runner
            .consume(&mut state, &chunk(1, &[5, 6, 9, 10]))
            .unwrap_err();
        assert!(
            matches!(
                error,
                AnalyzerError::Gap {
                    partition: 1,
                    expected: 7,
                    found: 9,
                    ..
                }
            ),
            "{error:?}"
        );
        assert!(
            error.to_string().contains("records 7..9 are missing"),
            "{error}"
        );
        // Nothing past the gap was applied.
        assert_eq!(state.tasks[&1].next_offset, 7);
    }
}
