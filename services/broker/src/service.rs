//! The `runnel.v1.Broker` gRPC service: request checks, partition choice, acks, and the
//! hand-off of every disk operation to blocking threads.
//!
//! `Produce` is atomic per batch, not per request: everything in a request is checked
//! before anything is written; then events are stored as one batch per partition,
//! pre-encoded batches as they come, partitions in parallel and each partition's batches in
//! request order. If one fails, others may already be stored; the call fails, and only an
//! idempotent producer's retry is then free of duplicates (events carry ids so that
//! consumers can recognise them otherwise).
//!
//! The unary `Produce` and each run of a `ProduceStream` (see [`crate::produce_stream`])
//! share the same two steps: [`BrokerService::prepare_produce`] checks one request,
//! [`BrokerService::store`] stores any number of checked requests together.

use crate::batch::{self, StoredBatch};
use crate::config::{BrokerConfig, MAX_SESSION_TIMEOUT};
use crate::error::{BrokerError, Result};
use crate::groups::{self, Coordinator};
use crate::produce_stream;
use crate::storage::{Appended, Committed, Incoming, MAX_COMMIT_METADATA, Storage};
use crate::subscribe::{MemberStream, stream_partition};
use crate::topic::{self, RetentionOverride};
use prost::Message;
use runnel_log::FsyncPolicy;
use runnel_proto::Millis;
use runnel_proto::names;
use runnel_proto::v1::broker_server::Broker;
use runnel_proto::v1::{
    Acks, BatchAck, CommitOffsetsRequest, CommitOffsetsResponse, Compression, CreateTopicRequest,
    CreateTopicResponse, DescribeTopicRequest, Event, FetchRequest, FetchResponse, GroupFence,
    GroupMember, GroupStatus, ListTopicsRequest, ListTopicsResponse, PartitionLag, PartitionOffset,
    ProduceRequest, ProduceResponse, ProduceStreamRequest, ProduceStreamResponse, Record,
    RecordBatch, RecordPosition, SubscribeRequest, SubscribeResponse, TopicDescription,
};
use runnel_security::{Action, Caller, Resource, authorize};
use runnel_server::Shutdown;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

/// Records per `Fetch` when the request does not say.
const DEFAULT_FETCH_RECORDS: usize = 500;
/// The most records one `Fetch` returns.
const MAX_FETCH_RECORDS: usize = 10_000;
/// Room kept in a `Fetch` answer for everything but the records.
const FETCH_HEADROOM: usize = 64 * 1024;
/// Messages buffered per subscription stream.
const SUBSCRIBE_BUFFER: usize = 16;
/// Pre-encoded batches up to this many bytes are checked on the runtime thread.
const INLINE_CHECK_BYTES: usize = 16 * 1024;
/// Room left for a record's own fields (partition, offset, append time) and framing around
/// an event when deciding whether the event is small enough to store.
const RECORD_OVERHEAD: usize = 64;

/// The broker's gRPC handlers. Clones share everything (a `ProduceStream` runs on one).
#[derive(Debug, Clone)]
pub(crate) struct BrokerService {
    storage: Arc<dyn Storage>,
    coordinator: Arc<Coordinator>,
    /// The next round-robin turn for events without a key (shared by every clone).
    round_robin: Arc<AtomicU32>,
    auto_create_topics: bool,
    default_partitions: u32,
    max_batch_events: usize,
    default_durable: bool,
    session_timeout: Duration,
    /// The most bytes of records in one `Fetch` answer, and so also the most one batch may
    /// hold (compressed or not): whatever is stored can be read back.
    max_read_bytes: usize,
    /// Ends subscriptions when the broker stops, so they do not hold the drain open.
    shutdown: Shutdown,
}

/// A `Produce` request checked and split into the units it stores, nothing written yet.
#[derive(Debug)]
pub(crate) struct PlannedProduce {
    topic: String,
    durable: bool,
    event_count: usize,
    batch_count: usize,
    units: Vec<Unit>,
}

/// What [`BrokerService::store`] did with a run of requests.
#[derive(Debug)]
pub(crate) struct StoredRun {
    /// The answers of the leading requests stored at their acks level, in order.
    pub(crate) answers: Vec<ProduceResponse>,
    /// The earliest request (by its index in the run) one of whose units failed, and why.
    pub(crate) failure: Option<(usize, BrokerError)>,
}

/// One stored unit: a batch for one partition, and where the answers of its records go.
#[derive(Debug)]
struct Unit {
    partition: u32,
    batch: Incoming,
    /// Check the records body first (pre-encoded batches only).
    validate: bool,
    /// More than one when [`coalesce`] joined units of several requests.
    parts: Vec<Part>,
}

/// A unit's records that came from one place of one request.
#[derive(Debug)]
struct Part {
    /// The request's index in the run being stored.
    request: usize,
    origin: Origin,
    /// How many of the unit's records, in order, are this part's.
    records: u32,
}

/// What happened to one partition's units.
struct PartitionOutcome {
    name: String,
    partition: u32,
    stored: Vec<(Vec<Part>, Appended, u64, u64)>,
    /// The first request of the failed unit, the error, and every request whose units are
    /// not known to be stored at their acks level.
    failure: Option<(usize, BrokerError, Vec<usize>)>,
}

#[derive(Debug)]
enum Origin {
    /// These indexes of `events`, in order.
    Events(Vec<usize>),
    /// This index of `batches`.
    Batch(usize),
}

impl BrokerService {
    /// Handlers over `topics`.
    pub(crate) fn new(
        storage: Arc<dyn Storage>,
        coordinator: Arc<Coordinator>,
        config: &BrokerConfig,
        shutdown: Shutdown,
    ) -> Self {
        let max_message = config.server.max_message_bytes;
        BrokerService {
            storage,
            coordinator,
            round_robin: Arc::new(AtomicU32::new(0)),
            auto_create_topics: config.auto_create_topics,
            default_partitions: config.default_partitions,
            max_batch_events: config.max_batch_events,
            default_durable: config.fsync == FsyncPolicy::Always,
            session_timeout: config.group_session_timeout,
            max_read_bytes: max_message - FETCH_HEADROOM.min(max_message / 2),
            shutdown,
        }
    }

    /// Fires when the broker stops.
    pub(crate) fn shutdown(&self) -> &Shutdown {
        &self.shutdown
    }

    /// An existing topic's partition count, checking the name first.
    async fn existing_topic(&self, name: &str) -> Result<u32> {
        topic::validate_name(name)?;
        self.storage
            .partitions(name)
            .await?
            .ok_or_else(|| BrokerError::TopicNotFound(name.to_owned()))
    }

    /// Checks that `partition` is one of the topic's `count` partitions.
    fn check_partition(topic: &str, partition: u32, count: u32) -> Result<()> {
        if partition >= count {
            return Err(BrokerError::InvalidArgument(format!(
                "partition {partition} does not exist: topic {topic:?} has partitions 0 to {}",
                count.saturating_sub(1)
            )));
        }
        Ok(())
    }

    #[tracing::instrument(name = "create_topic", skip_all, fields(topic = %request.name, partitions = request.partitions))]
    async fn serve_create_topic(&self, request: CreateTopicRequest) -> Result<CreateTopicResponse> {
        topic::validate_name(&request.name)?;
        topic::validate_partitions(request.partitions)?;
        let retention = RetentionOverride::from_proto(request.retention.as_ref())?;
        let topic = self
            .storage
            .create_topic(&request.name, request.partitions, retention)
            .await?;
        Ok(CreateTopicResponse { topic: Some(topic) })
    }

    async fn serve_describe_topic(
        &self,
        request: DescribeTopicRequest,
    ) -> Result<TopicDescription> {
        topic::validate_name(&request.name)?;
        let info = self.storage.topic_info(&request.name).await?;
        let live = self.coordinator.describe(&info.name);
        let mut committed = self.storage.groups_of(&info.name).await?;
        for name in live.keys() {
            committed.entry(name.clone()).or_default();
        }
        let groups = committed
            .into_iter()
            .map(|(name, offsets)| {
                let snapshot = live.get(&name);
                GroupStatus {
                    generation: snapshot.map_or(0, |s| s.generation),
                    members: snapshot
                        .map(|s| {
                            s.members
                                .iter()
                                .map(|(id, partitions)| GroupMember {
                                    member_id: id.clone(),
                                    partitions: partitions.clone(),
                                })
                                .collect()
                        })
                        .unwrap_or_default(),
                    partitions: info
                        .partitions
                        .iter()
                        .map(|p| {
                            let committed = offsets.get(&p.partition).copied();
                            PartitionLag {
                                partition: p.partition,
                                committed_offset: committed,
                                lag: p
                                    .end_offset
                                    .saturating_sub(committed.unwrap_or(p.start_offset)),
                            }
                        })
                        .collect(),
                    group: name,
                }
            })
            .collect();
        Ok(TopicDescription {
            topic: Some(info),
            groups,
        })
    }

    /// The topic's partition count, creating the topic if it is missing and allowed.
    async fn produce_target(&self, name: &str) -> Result<u32> {
        if let Some(count) = self.storage.partitions(name).await? {
            return Ok(count);
        }
        if !self.auto_create_topics {
            return Err(BrokerError::TopicNotFound(name.to_owned()));
        }
        match self
            .storage
            .create_topic(name, self.default_partitions, RetentionOverride::default())
            .await
        {
            Ok(info) => Ok(info.partitions.len() as u32),
            // Someone else created it between our look and our create.
            Err(BrokerError::TopicExists(_)) => self
                .storage
                .partitions(name)
                .await?
                .ok_or_else(|| BrokerError::TopicNotFound(name.to_owned())),
            Err(error) => Err(error),
        }
    }

    /// Checks events before anything is written.
    fn check_events(&self, events: &[Event]) -> Result<()> {
        if events.len() > self.max_batch_events {
            return Err(BrokerError::InvalidArgument(format!(
                "events has {} events; at most {} are accepted per call",
                events.len(),
                self.max_batch_events
            )));
        }
        for (i, event) in events.iter().enumerate() {
            if event.id.is_empty() {
                return Err(BrokerError::InvalidArgument(format!(
                    "events[{i}].id is empty"
                )));
            }
            let size = event.encoded_len() + RECORD_OVERHEAD;
            if size > self.max_read_bytes {
                return Err(BrokerError::InvalidArgument(format!(
                    "events[{i}] takes {size} bytes as a record; at most {} are accepted",
                    self.max_read_bytes
                )));
            }
        }
        Ok(())
    }

    /// Splits a request into stored units, checking everything that can be checked cheaply.
    fn plan(
        &self,
        topic: &str,
        count: u32,
        events: Vec<Event>,
        partition: Option<u32>,
        batches: Vec<RecordBatch>,
        deduplicate: bool,
    ) -> Result<Vec<Unit>> {
        let mut units = Vec::new();
        if !events.is_empty() {
            self.check_events(&events)?;
            if let Some(partition) = partition {
                Self::check_partition(topic, partition, count)?;
            }
            let identities: Vec<u128> = if deduplicate {
                events
                    .iter()
                    .map(|e| runnel_proto::event_identity(&e.source, &e.id))
                    .collect()
            } else {
                Vec::new()
            };
            let mut groups: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
            for (i, event) in events.iter().enumerate() {
                let p = partition.unwrap_or_else(|| {
                    if deduplicate {
                        // A retry must meet its original: keyless events go by identity.
                        runnel_proto::partition_for_event(&event.key, identities[i], count)
                    } else if event.key.is_empty() {
                        self.round_robin.fetch_add(1, Ordering::Relaxed) % count
                    } else {
                        runnel_proto::partition_for_key(&event.key, count)
                    }
                });
                groups.entry(p).or_default().push(i);
            }
            for (p, indexes) in groups {
                let chosen: Vec<Event> = indexes.iter().map(|&i| events[i].clone()).collect();
                let records = runnel_proto::records::encode(&chosen);
                if records.len() > self.max_read_bytes {
                    return Err(BrokerError::InvalidArgument(format!(
                        "the {} events for partition {p} take {} bytes; at most {} fit one batch",
                        chosen.len(),
                        records.len(),
                        self.max_read_bytes
                    )));
                }
                units.push(Unit {
                    partition: p,
                    batch: Incoming {
                        compression: Compression::None,
                        record_count: chosen.len() as u32,
                        records,
                        producer_id: 0,
                        base_sequence: 0,
                        identities: deduplicate
                            .then(|| indexes.iter().map(|&i| identities[i]).collect()),
                    },
                    validate: false,
                    parts: vec![Part {
                        request: 0,
                        origin: Origin::Events(indexes),
                        records: chosen.len() as u32,
                    }],
                });
            }
        }
        for (i, batch) in batches.into_iter().enumerate() {
            let field = |name: &str| format!("batches[{i}].{name}");
            Self::check_partition(topic, batch.partition, count).map_err(|e| {
                BrokerError::InvalidArgument(format!("{}: {e}", field("partition")))
            })?;
            let compression = Compression::try_from(batch.compression).map_err(|_| {
                BrokerError::InvalidArgument(format!(
                    "{} {} is unknown",
                    field("compression"),
                    batch.compression
                ))
            })?;
            if batch.records.len() > self.max_read_bytes {
                return Err(BrokerError::InvalidArgument(format!(
                    "{} takes {} bytes; at most {} are accepted",
                    field("records"),
                    batch.records.len(),
                    self.max_read_bytes
                )));
            }
            if batch.record_count == 0 || batch.record_count as usize > self.max_batch_events {
                return Err(BrokerError::InvalidArgument(format!(
                    "{} must be between 1 and {}",
                    field("record_count"),
                    self.max_batch_events
                )));
            }
            units.push(Unit {
                partition: batch.partition,
                batch: Incoming {
                    compression,
                    record_count: batch.record_count,
                    records: batch.records,
                    producer_id: batch.producer_id,
                    base_sequence: batch.base_sequence,
                    identities: None,
                },
                validate: true,
                parts: vec![Part {
                    request: 0,
                    origin: Origin::Batch(i),
                    records: batch.record_count,
                }],
            });
        }
        Ok(units)
    }

    #[tracing::instrument(name = "produce", skip_all, fields(topic = %request.topic, events = request.events.len(), batches = request.batches.len()))]
    async fn serve_produce(&self, request: ProduceRequest) -> Result<ProduceResponse> {
        let planned = self.prepare_produce(request).await?;
        let mut stored = self.store(vec![planned]).await;
        match stored.failure {
            Some((_, error)) => Err(error),
            // With no failure, the one request is answered.
            None => Ok(stored.answers.pop().unwrap_or_default()),
        }
    }

    /// Everything `Produce` checks before writing: the topic (created if allowed), the
    /// fence, the acks, every event and every pre-encoded batch. Nothing is written.
    pub(crate) async fn prepare_produce(&self, request: ProduceRequest) -> Result<PlannedProduce> {
        let ProduceRequest {
            topic: name,
            events,
            acks,
            partition,
            batches,
            fence,
            deduplicate,
        } = request;
        topic::validate_name(&name)?;
        if let Some(fence) = &fence {
            self.check_fence(fence).await?;
        }
        if events.is_empty() && batches.is_empty() {
            return Err(BrokerError::InvalidArgument(
                "events and batches are both empty: send at least one event".into(),
            ));
        }
        let durable = match Acks::try_from(acks) {
            Ok(Acks::Durable) => true,
            Ok(Acks::Leader) => false,
            Ok(Acks::Default) => self.default_durable,
            Err(_) => {
                return Err(BrokerError::InvalidArgument(format!(
                    "acks {acks} is unknown"
                )));
            }
        };
        let event_count = events.len();
        let batch_count = batches.len();
        let count = self.produce_target(&name).await?;
        let mut units = self.plan(&name, count, events, partition, batches, deduplicate)?;
        // Pre-encoded bodies are decoded to be checked: CPU work, off the runtime unless
        // there is little of it (a hand-off costs more than a few records).
        let max_len = self.max_read_bytes;
        let checked: usize = units
            .iter()
            .filter(|u| u.validate)
            .map(|u| u.batch.records.len())
            .sum();
        if checked <= INLINE_CHECK_BYTES {
            validate_units(&mut units, max_len, deduplicate)?;
        } else {
            units = tokio::task::spawn_blocking(move || {
                validate_units(&mut units, max_len, deduplicate).map(|()| units)
            })
            .await??;
        }
        Ok(PlannedProduce {
            topic: name,
            durable,
            event_count,
            batch_count,
            units,
        })
    }

    /// Stores checked requests in order and answers them.
    ///
    /// Each partition's units are appended in request order, partitions (of any topic) in
    /// parallel; adjacent plain batches of one partition are appended as one (see
    /// [`coalesce`]), and a partition waits for durability once, after its last append,
    /// if any request writing to it asked for durable acks. Requests answered are the
    /// leading ones whose every unit was stored at its acks level; the failure, if any, is
    /// the error of the earliest request one of whose units failed.
    pub(crate) async fn store(&self, run: Vec<PlannedProduce>) -> StoredRun {
        let started = Instant::now();
        let mut answers: Vec<ProduceResponse> = run
            .iter()
            .map(|planned| ProduceResponse {
                positions: vec![RecordPosition::default(); planned.event_count],
                batch_acks: vec![BatchAck::default(); planned.batch_count],
                duplicates: 0,
            })
            .collect();
        let any_durable = run.iter().any(|planned| planned.durable);
        // Per (topic, partition): whether to wait for durability, and the units in order.
        let mut per_partition: BTreeMap<(String, u32), (bool, Vec<Unit>)> = BTreeMap::new();
        for (request, planned) in run.into_iter().enumerate() {
            for mut unit in planned.units {
                for part in &mut unit.parts {
                    part.request = request;
                }
                let entry = per_partition
                    .entry((planned.topic.clone(), unit.partition))
                    .or_default();
                entry.0 |= planned.durable;
                entry.1.push(unit);
            }
        }
        let (max_bytes, max_records) = (self.max_read_bytes, self.max_batch_events);
        let appends = per_partition
            .into_iter()
            .map(|((name, p), (durable, units))| {
                let storage = Arc::clone(&self.storage);
                async move {
                    let units = coalesce(units, max_bytes, max_records);
                    let last = units.len().saturating_sub(1);
                    let mut stored = Vec::with_capacity(units.len());
                    let mut units = units.into_iter().enumerate();
                    while let Some((i, unit)) = units.next() {
                        let count = u64::from(unit.batch.record_count);
                        let bytes = unit.batch.records.len() as u64;
                        // One durable wait per partition: the last batch's covers the others.
                        match storage
                            .append(&name, p, unit.batch, durable && i == last)
                            .await
                        {
                            Ok(appended) => stored.push((unit.parts, appended, count, bytes)),
                            Err(error) => {
                                let owner = unit.parts.iter().map(|part| part.request).min();
                                // Not stored, or not known to be: the failed unit's requests,
                                // the later ones, and — the durable wait never came — the
                                // earlier ones too when they asked for durability.
                                let mut unsure: Vec<usize> =
                                    unit.parts.iter().map(|part| part.request).collect();
                                for (_, later) in units {
                                    unsure.extend(later.parts.iter().map(|part| part.request));
                                }
                                if durable {
                                    for (parts, ..) in &stored {
                                        unsure.extend(parts.iter().map(|part| part.request));
                                    }
                                }
                                return PartitionOutcome {
                                    name,
                                    partition: p,
                                    stored,
                                    failure: Some((owner.unwrap_or(0), error, unsure)),
                                };
                            }
                        }
                    }
                    PartitionOutcome {
                        name,
                        partition: p,
                        stored,
                        failure: None,
                    }
                }
            });
        let outcomes = futures::future::join_all(appends).await;

        let mut confirmed = vec![true; answers.len()];
        let mut failure: Option<(usize, BrokerError)> = None;
        for outcome in outcomes {
            let (p, name) = (outcome.partition, outcome.name);
            if let Some((owner, error, unsure)) = outcome.failure {
                for request in unsure {
                    confirmed[request] = false;
                }
                if failure.as_ref().is_none_or(|(first, _)| owner < *first) {
                    failure = Some((owner, error));
                }
            }
            let (mut records, mut bytes) = (0u64, 0u64);
            for (parts, appended, count, size) in outcome.stored {
                let (base_offset, duplicate, scattered) = match appended {
                    Appended::Stored {
                        base_offset,
                        scattered,
                        duplicates: retried,
                        ..
                    } => {
                        records += count - u64::from(retried);
                        // A batch partly stored counts its share of the bytes.
                        bytes += size * (count - u64::from(retried)) / count.max(1);
                        // Only a unit of one part can hold retries (see `coalesce`).
                        if let Some(part) = parts.first() {
                            answers[part.request].duplicates += u64::from(retried);
                        }
                        (base_offset, false, scattered)
                    }
                    Appended::Duplicate { base_offset } => (base_offset, true, None),
                };
                if let [part] = parts.as_slice() {
                    let dense = scattered.is_none();
                    let offsets =
                        scattered.unwrap_or_else(|| (base_offset..base_offset + count).collect());
                    answer_part(
                        &mut answers[part.request],
                        &name,
                        p,
                        &part.origin,
                        base_offset,
                        duplicate,
                        offsets,
                        dense,
                    );
                    continue;
                }
                // A coalesced unit: each part has its share of the offsets, in order.
                let was_scattered = scattered.is_some();
                let mut offsets = scattered
                    .unwrap_or_else(|| (base_offset..base_offset + count).collect())
                    .into_iter();
                for part in &parts {
                    let share: Vec<u64> = offsets.by_ref().take(part.records as usize).collect();
                    let base = share.first().copied().unwrap_or(base_offset);
                    answer_part(
                        &mut answers[part.request],
                        &name,
                        p,
                        &part.origin,
                        base,
                        duplicate,
                        share,
                        !was_scattered,
                    );
                }
            }
            metrics::counter!("runnel_broker_records_appended_total", "topic" => name.clone())
                .increment(records);
            metrics::counter!("runnel_broker_bytes_appended_total", "topic" => name)
                .increment(bytes);
        }
        metrics::histogram!("runnel_broker_produce_seconds", "acks" => if any_durable { "durable" } else { "leader" })
            .record(started.elapsed().as_secs_f64());
        let answered = confirmed.iter().take_while(|c| **c).count();
        answers.truncate(answered);
        if let Some((_, error)) = &failure
            && answered > 0
        {
            tracing::warn!(answered, %error, "produce failed after earlier requests were stored");
        }
        StoredRun { answers, failure }
    }

    #[tracing::instrument(name = "fetch", skip_all, fields(topic = %request.topic, partition = request.partition, offset = request.offset))]
    async fn serve_fetch(&self, request: FetchRequest) -> Result<FetchResponse> {
        let count = self.existing_topic(&request.topic).await?;
        Self::check_partition(&request.topic, request.partition, count)?;
        let max_records = match request.max_records as usize {
            0 => DEFAULT_FETCH_RECORDS,
            n => n.min(MAX_FETCH_RECORDS),
        };
        let max_bytes = match request.max_bytes as usize {
            0 => self.max_read_bytes,
            n => n.min(self.max_read_bytes),
        };
        let (topic, partition) = (request.topic.as_str(), request.partition);
        let from = match request.timestamp {
            Some(ts) => {
                self.storage
                    .offset_for_time(topic, partition, Millis::from(ts))
                    .await?
            }
            None => request.offset,
        };
        let read = self.storage.read(topic, partition, from, max_bytes).await?;
        let mut response = FetchResponse {
            next_offset: from,
            end_offset: read.end,
            start_offset: read.start,
            ..FetchResponse::default()
        };
        if request.stored {
            response.next_offset = read.batches.last().map_or(from, |b| b.header.next_offset());
            response.stored_batches = read.batches.into_iter().map(|b| b.stored).collect();
        } else if request.as_batches {
            response.next_offset = read.batches.last().map_or(from, |b| b.header.next_offset());
            response.batches = read.batches.iter().map(|b| b.to_proto(partition)).collect();
        } else {
            let records = tokio::task::spawn_blocking(move || {
                decode_records(&read.batches, partition, from, max_records, max_bytes)
            })
            .await??;
            response.next_offset = records.last().map_or(from, |r| r.offset + 1);
            response.records = records;
        }
        let delivered = response.next_offset - from;
        metrics::counter!("runnel_broker_fetch_records_total", "topic" => request.topic.clone(), "rpc" => "fetch").increment(delivered);
        Ok(response)
    }

    async fn serve_subscribe(
        &self,
        request: SubscribeRequest,
    ) -> Result<ReceiverStream<std::result::Result<SubscribeResponse, Status>>> {
        let count = self.existing_topic(&request.topic).await?;
        let (sender, receiver) = mpsc::channel(SUBSCRIBE_BUFFER);
        if request.group.is_empty() {
            Self::check_partition(&request.topic, request.partition, count)?;
            let (start, end) = self
                .storage
                .bounds(&request.topic, request.partition)
                .await?;
            if request.offset < start || request.offset > end {
                return Err(BrokerError::OffsetOutOfRange {
                    topic: request.topic,
                    partition: request.partition,
                    offset: request.offset,
                    start,
                    end,
                });
            }
            let follow = self
                .storage
                .follow(
                    &request.topic,
                    request.partition,
                    request.offset,
                    self.max_read_bytes,
                    self.shutdown.clone(),
                )
                .await?;
            tokio::spawn(
                stream_partition(
                    request.topic,
                    request.partition,
                    request.stored,
                    follow,
                    sender,
                    self.shutdown.clone(),
                )
                .in_current_span(),
            );
            return Ok(ReceiverStream::new(receiver));
        }
        names::validate_group_name(&request.group)
            .and_then(|()| names::validate_member_id(&request.member_id))
            .map_err(|error| BrokerError::InvalidArgument(error.to_string()))?;
        let delivery = runnel_proto::v1::Delivery::try_from(request.delivery).map_err(|_| {
            BrokerError::InvalidArgument(format!("delivery {} is unknown", request.delivery))
        })?;
        let start_from =
            runnel_proto::v1::StartFrom::try_from(request.start_from).map_err(|_| {
                BrokerError::InvalidArgument(format!(
                    "start_from {} is unknown",
                    request.start_from
                ))
            })?;
        let session_timeout = match request.session_timeout {
            None => self.session_timeout,
            Some(d) => {
                let d = Duration::try_from(d).map_err(|_| {
                    BrokerError::InvalidArgument("session_timeout must not be negative".into())
                })?;
                if !(Duration::from_millis(100)..=MAX_SESSION_TIMEOUT).contains(&d) {
                    return Err(BrokerError::InvalidArgument(
                        "session_timeout must be between 100ms and 5m".into(),
                    ));
                }
                d
            }
        };
        let membership = self
            .coordinator
            .join(
                &request.group,
                &request.topic,
                count,
                &request.member_id,
                session_timeout,
                groups::now_ms(),
            )
            .await?;
        let member = MemberStream {
            membership,
            storage: Arc::clone(&self.storage),
            coordinator: Arc::clone(&self.coordinator),
            group: request.group,
            topic: request.topic,
            member_id: request.member_id,
            delivery,
            start_from,
            max_bytes: self.max_read_bytes,
            stored: request.stored,
            shutdown: self.shutdown.clone(),
        };
        tokio::spawn(member.run(sender).in_current_span());
        Ok(ReceiverStream::new(receiver))
    }

    /// Refuses a write on behalf of a group member that no longer owns what it writes for
    /// (FAILED_PRECONDITION), and counts it as the member's heartbeat.
    async fn check_fence(&self, fence: &GroupFence) -> Result<()> {
        self.coordinator
            .heartbeat(
                &fence.group,
                &fence.topic,
                &fence.member_id,
                fence.generation,
                &fence.partitions,
                groups::now_ms(),
            )
            .await
            .inspect_err(|_| {
                metrics::counter!("runnel_broker_fenced_writes_total", "group" => fence.group.clone())
                    .increment(1);
            })
    }

    #[tracing::instrument(name = "commit_offsets", skip_all, fields(group = %request.group, topic = %request.topic, member = %request.member_id))]
    async fn serve_commit(&self, request: CommitOffsetsRequest) -> Result<CommitOffsetsResponse> {
        let count = self.existing_topic(&request.topic).await?;
        let mut offsets = BTreeMap::new();
        let mut ends = BTreeMap::new();
        for (i, o) in request.offsets.iter().enumerate() {
            Self::check_partition(&request.topic, o.partition, count).map_err(|e| {
                BrokerError::InvalidArgument(format!("offsets[{i}].partition: {e}"))
            })?;
            if o.metadata.len() > MAX_COMMIT_METADATA {
                return Err(BrokerError::InvalidArgument(format!(
                    "offsets[{i}].metadata has {} bytes; at most {MAX_COMMIT_METADATA} may be committed with an offset",
                    o.metadata.len()
                )));
            }
            let (_, end) = self.storage.bounds(&request.topic, o.partition).await?;
            if o.offset > end {
                return Err(BrokerError::InvalidArgument(format!(
                    "offsets[{i}].offset {} is beyond partition {}'s end offset {end}",
                    o.offset, o.partition
                )));
            }
            offsets.insert(
                o.partition,
                Committed {
                    offset: o.offset,
                    metadata: bytes::Bytes::copy_from_slice(&o.metadata),
                },
            );
            ends.insert(o.partition, end);
        }
        let partitions: Vec<u32> = offsets.keys().copied().collect();
        self.coordinator
            .heartbeat(
                &request.group,
                &request.topic,
                &request.member_id,
                request.generation,
                &partitions,
                groups::now_ms(),
            )
            .await?;
        let committed = if offsets.is_empty() {
            self.storage
                .committed(&request.group, &request.topic)
                .await?
        } else {
            self.storage
                .commit(&request.group, &request.topic, offsets)
                .await?
        };
        for (p, end) in ends {
            if let Some(commit) = committed.get(&p) {
                metrics::gauge!("runnel_broker_consumer_lag", "group" => request.group.clone(), "topic" => request.topic.clone(), "partition" => p.to_string())
                    .set(end.saturating_sub(commit.offset) as f64);
            }
        }
        Ok(CommitOffsetsResponse {
            committed: committed
                .into_iter()
                .map(|(partition, commit)| PartitionOffset {
                    partition,
                    offset: commit.offset,
                    metadata: commit.metadata.to_vec(),
                })
                .collect(),
        })
    }
}

/// Checks the pre-encoded batches among `units`; with `deduplicate`, also gives each its
/// records' identities.
fn validate_units(units: &mut [Unit], max_len: usize, deduplicate: bool) -> Result<()> {
    for unit in units.iter_mut().filter(|u| u.validate) {
        let mut identities = deduplicate.then(Vec::new);
        batch::validate(
            unit.batch.compression,
            &unit.batch.records,
            unit.batch.record_count,
            max_len,
            identities.as_mut(),
        )
        .map_err(|reason| {
            BrokerError::InvalidArgument(format!(
                "batch for partition {}: {reason}",
                unit.partition
            ))
        })?;
        unit.batch.identities = identities;
    }
    Ok(())
}

/// Joins adjacent plain units of one partition — no producer id, no deduplication, not
/// compressed: nothing the broker must recognise per batch — into one batch each, as long
/// as the batch stays within `max_bytes` and `max_records`. Order is kept: the records of a
/// joined unit are its parts' records one after the other.
fn coalesce(units: Vec<Unit>, max_bytes: usize, max_records: usize) -> Vec<Unit> {
    fn plain(batch: &Incoming) -> bool {
        batch.producer_id == 0
            && batch.identities.is_none()
            && batch.compression == Compression::None
    }
    let mut runs: Vec<Vec<Unit>> = Vec::new();
    let (mut run_bytes, mut run_records) = (0usize, 0usize);
    for unit in units {
        let (bytes, records) = (unit.batch.records.len(), unit.batch.record_count as usize);
        match runs.last_mut() {
            Some(run)
                if plain(&unit.batch)
                    && run.first().is_some_and(|u| plain(&u.batch))
                    && run_bytes + bytes <= max_bytes
                    && run_records + records <= max_records =>
            {
                run_bytes += bytes;
                run_records += records;
                run.push(unit);
            }
            _ => {
                (run_bytes, run_records) = (bytes, records);
                runs.push(vec![unit]);
            }
        }
    }
    runs.into_iter()
        .filter_map(|mut run| {
            if run.len() < 2 {
                return run.pop();
            }
            let bytes: usize = run.iter().map(|u| u.batch.records.len()).sum();
            let mut records = bytes::BytesMut::with_capacity(bytes);
            let mut parts = Vec::with_capacity(run.len());
            let mut record_count = 0;
            let partition = run[0].partition;
            for unit in run {
                records.extend_from_slice(&unit.batch.records);
                record_count += unit.batch.record_count;
                parts.extend(unit.parts);
            }
            Some(Unit {
                partition,
                batch: Incoming {
                    compression: Compression::None,
                    record_count,
                    records: records.freeze(),
                    producer_id: 0,
                    base_sequence: 0,
                    identities: None,
                },
                validate: false,
                parts,
            })
        })
        .collect()
}

/// Writes where one part's records were stored into its request's answer: `offsets` are
/// its records' offsets, in order; `dense` says they are `base_offset`, `base_offset + 1`,
/// … (a batch ack then leaves them out).
#[allow(clippy::too_many_arguments)]
fn answer_part(
    answer: &mut ProduceResponse,
    topic: &str,
    partition: u32,
    origin: &Origin,
    base_offset: u64,
    duplicate: bool,
    offsets: Vec<u64>,
    dense: bool,
) {
    match origin {
        Origin::Events(indexes) => {
            for (&i, offset) in indexes.iter().zip(offsets) {
                if let Some(position) = answer.positions.get_mut(i) {
                    *position = RecordPosition {
                        topic: topic.to_owned(),
                        partition,
                        offset,
                    };
                }
            }
        }
        Origin::Batch(i) => {
            if let Some(ack) = answer.batch_acks.get_mut(*i) {
                *ack = BatchAck {
                    partition,
                    base_offset,
                    duplicate,
                    offsets: if dense { Vec::new() } else { offsets },
                };
            }
        }
    }
}

/// The records of `batches` from `from` on: at most `max_records`, and no more than
/// `max_bytes` as encoded in a response unless the first one alone is bigger.
fn decode_records(
    batches: &[StoredBatch],
    partition: u32,
    from: u64,
    max_records: usize,
    max_bytes: usize,
) -> Result<Vec<Record>> {
    let mut records = Vec::new();
    let mut bytes = 0usize;
    for batch in batches {
        if records.len() >= max_records {
            break;
        }
        let decoded = batch
            .records(partition, from, max_records - records.len(), usize::MAX)
            .map_err(|reason| BrokerError::Corrupt {
                path: format!("partition {partition}").into(),
                position: batch.header.base_offset,
                reason: reason.to_string(),
            })?;
        for record in decoded {
            let size = {
                let n = record.encoded_len();
                1 + prost::length_delimiter_len(n) + n
            };
            if records.len() >= max_records || (!records.is_empty() && bytes + size > max_bytes) {
                return Ok(records);
            }
            bytes += size;
            records.push(record);
        }
    }
    Ok(records)
}

/// Checks that the caller of `request` may consume `topic` through consumer group
/// `group`: joining the group, committing its offsets and heartbeating in it each need
/// `consume` on both, so that a reader of a topic cannot take another group's partitions
/// or move its offsets.
fn authorize_group<T>(
    request: &Request<T>,
    group: &str,
    topic: &str,
) -> std::result::Result<(), Status> {
    authorize(request, Action::Consume, Resource::Topic(topic))?;
    authorize(request, Action::Consume, Resource::Group(group))
}

/// Checks that `caller` may make `request`: produce on its topic, and — a fenced write is
/// a heartbeat of the group's member — consume through the fence's group (the store, which
/// relays the analyzer's fenced results, has that permission too). `Produce` and every
/// request of a `ProduceStream` go through here.
pub(crate) fn authorize_produce(
    caller: &Caller,
    request: &ProduceRequest,
) -> std::result::Result<(), Status> {
    caller.authorize(Action::Produce, Resource::Topic(&request.topic))?;
    if let Some(fence) = &request.fence {
        caller.authorize(Action::Consume, Resource::Group(&fence.group))?;
    }
    Ok(())
}

/// Whether `caller` may do anything with `topic`: produce, consume or manage it.
fn may_use(caller: &Caller, topic: &str) -> bool {
    [Action::Produce, Action::Consume, Action::Manage]
        .into_iter()
        .any(|action| caller.may(action, Resource::Topic(topic)))
}

#[tonic::async_trait]
impl Broker for BrokerService {
    async fn create_topic(
        &self,
        request: Request<CreateTopicRequest>,
    ) -> std::result::Result<Response<CreateTopicResponse>, Status> {
        authorize(
            &request,
            Action::Manage,
            Resource::Topic(&request.get_ref().name),
        )?;
        Ok(Response::new(
            self.serve_create_topic(request.into_inner()).await?,
        ))
    }

    async fn list_topics(
        &self,
        request: Request<ListTopicsRequest>,
    ) -> std::result::Result<Response<ListTopicsResponse>, Status> {
        // Each caller sees the topics it may do something with.
        let caller = runnel_security::caller(&request)?;
        let mut topics = self.storage.list_topics().await?;
        topics.retain(|topic| may_use(caller, &topic.name));
        Ok(Response::new(ListTopicsResponse { topics }))
    }

    async fn describe_topic(
        &self,
        request: Request<DescribeTopicRequest>,
    ) -> std::result::Result<Response<TopicDescription>, Status> {
        // Producers and consumers describe a topic to learn its partitions.
        if !may_use(runnel_security::caller(&request)?, &request.get_ref().name) {
            authorize(
                &request,
                Action::Consume,
                Resource::Topic(&request.get_ref().name),
            )?;
        }
        let caller = runnel_security::caller(&request)?.clone();
        let mut description = self.serve_describe_topic(request.into_inner()).await?;
        // A group is described only to callers that may consume through it.
        description
            .groups
            .retain(|group| caller.may(Action::Consume, Resource::Group(&group.group)));
        Ok(Response::new(description))
    }

    async fn produce(
        &self,
        request: Request<ProduceRequest>,
    ) -> std::result::Result<Response<ProduceResponse>, Status> {
        authorize_produce(runnel_security::caller(&request)?, request.get_ref())?;
        Ok(Response::new(
            self.serve_produce(request.into_inner()).await?,
        ))
    }

    type ProduceStreamStream = ReceiverStream<std::result::Result<ProduceStreamResponse, Status>>;

    async fn produce_stream(
        &self,
        request: Request<Streaming<ProduceStreamRequest>>,
    ) -> std::result::Result<Response<Self::ProduceStreamStream>, Status> {
        // Each request on the stream is authorized on its own, by this caller.
        let caller = runnel_security::caller(&request)?.clone();
        let (answers, receiver) = mpsc::channel(produce_stream::ANSWER_BUFFER);
        tokio::spawn(
            produce_stream::serve(
                self.clone(),
                caller,
                request.into_inner(),
                answers,
                self.max_read_bytes,
            )
            .in_current_span(),
        );
        Ok(Response::new(ReceiverStream::new(receiver)))
    }

    async fn fetch(
        &self,
        request: Request<FetchRequest>,
    ) -> std::result::Result<Response<FetchResponse>, Status> {
        authorize(
            &request,
            Action::Consume,
            Resource::Topic(&request.get_ref().topic),
        )?;
        Ok(Response::new(self.serve_fetch(request.into_inner()).await?))
    }

    type SubscribeStream = ReceiverStream<std::result::Result<SubscribeResponse, Status>>;

    async fn subscribe(
        &self,
        request: Request<SubscribeRequest>,
    ) -> std::result::Result<Response<Self::SubscribeStream>, Status> {
        authorize(
            &request,
            Action::Consume,
            Resource::Topic(&request.get_ref().topic),
        )?;
        if !request.get_ref().group.is_empty() {
            authorize_group(&request, &request.get_ref().group, &request.get_ref().topic)?;
        }
        Ok(Response::new(
            self.serve_subscribe(request.into_inner()).await?,
        ))
    }

    async fn commit_offsets(
        &self,
        request: Request<CommitOffsetsRequest>,
    ) -> std::result::Result<Response<CommitOffsetsResponse>, Status> {
        authorize_group(&request, &request.get_ref().group, &request.get_ref().topic)?;
        Ok(Response::new(
            self.serve_commit(request.into_inner()).await?,
        ))
    }
}

#[cfg(test)]
mod tests {
    //! [`BrokerService::store`] over a storage engine in memory that can scatter a batch
    //! (as JetStream does when two brokers append at once): for any mix of requests, each
    //! partition holds its records in send order, every answer points at its own records,
    //! and adjacent plain units of a partition were appended as one.

    use super::*;
    use crate::storage::{Follow, Read};
    use proptest::prelude::*;
    use runnel_proto::v1::TopicInfo;
    use std::sync::Mutex;

    const TOPICS: [(&str, u32); 2] = [("alpha", 3), ("beta", 2)];

    /// Topics in memory; each append is counted per partition.
    #[derive(Debug, Default)]
    struct MemoryStorage {
        /// Put a foreign record after the first record of every batch of two or more.
        scatter: bool,
        /// Refuse every append to this partition of the first topic.
        broken: Option<u32>,
        /// Per (topic, partition): the stored event ids, and how many appends there were.
        logs: Mutex<BTreeMap<(String, u32), PartitionLog>>,
    }

    /// A partition's stored event ids and its number of appends.
    type PartitionLog = (Vec<String>, usize);

    fn not_here<T>() -> Result<T> {
        Err(BrokerError::Engine("not in this test".into()))
    }

    #[tonic::async_trait]
    impl Storage for MemoryStorage {
        async fn create_topic(&self, _: &str, _: u32, _: RetentionOverride) -> Result<TopicInfo> {
            not_here()
        }
        async fn partitions(&self, topic: &str) -> Result<Option<u32>> {
            Ok(TOPICS.iter().find(|(t, _)| *t == topic).map(|(_, n)| *n))
        }
        async fn list_topics(&self) -> Result<Vec<TopicInfo>> {
            not_here()
        }
        async fn topic_info(&self, _: &str) -> Result<TopicInfo> {
            not_here()
        }
        async fn append(
            &self,
            topic: &str,
            partition: u32,
            batch: Incoming,
            _durable: bool,
        ) -> Result<Appended> {
            let ids: Vec<String> = batch
                .split_records(usize::MAX)?
                .into_iter()
                .map(|b| Event::decode(b).map(|e| e.id))
                .collect::<std::result::Result<_, _>>()
                .map_err(|e| BrokerError::InvalidArgument(e.to_string()))?;
            if topic == TOPICS[0].0 && self.broken == Some(partition) {
                return Err(BrokerError::Engine("the disk is on fire".into()));
            }
            let mut logs = self.logs.lock().unwrap();
            let (log, appends) = logs.entry((topic.to_owned(), partition)).or_default();
            *appends += 1;
            let base_offset = log.len() as u64;
            let mut offsets = Vec::new();
            for (i, id) in ids.into_iter().enumerate() {
                if self.scatter && i == 1 {
                    log.push("foreign".into());
                }
                offsets.push(log.len() as u64);
                log.push(id);
            }
            let scattered = offsets.windows(2).any(|w| w[1] != w[0] + 1);
            Ok(Appended::Stored {
                base_offset,
                next_offset: log.len() as u64,
                scattered: scattered.then_some(offsets),
                duplicates: 0,
            })
        }
        async fn read(&self, _: &str, _: u32, _: u64, _: usize) -> Result<Read> {
            not_here()
        }
        async fn offset_for_time(&self, _: &str, _: u32, _: Millis) -> Result<u64> {
            not_here()
        }
        async fn bounds(&self, _: &str, _: u32) -> Result<(u64, u64)> {
            not_here()
        }
        async fn follow(&self, _: &str, _: u32, _: u64, _: usize, _: Shutdown) -> Result<Follow> {
            not_here()
        }
        async fn commit(
            &self,
            _: &str,
            _: &str,
            _: BTreeMap<u32, Committed>,
        ) -> Result<BTreeMap<u32, Committed>> {
            not_here()
        }
        async fn committed(&self, _: &str, _: &str) -> Result<BTreeMap<u32, Committed>> {
            not_here()
        }
        async fn groups_of(&self, _: &str) -> Result<BTreeMap<String, BTreeMap<u32, u64>>> {
            not_here()
        }
    }

    /// One request of a generated run.
    #[derive(Debug, Clone)]
    enum Sent {
        /// Keyed events: the broker picks each one's partition.
        Events { topic: usize, keys: Vec<u8> },
        /// A pre-encoded batch, from an idempotent producer or not.
        Batch {
            topic: usize,
            partition: u32,
            records: usize,
            idempotent: bool,
        },
    }

    fn sent() -> impl Strategy<Value = Sent> {
        prop_oneof![
            (0..2usize, proptest::collection::vec(0..8u8, 1..5))
                .prop_map(|(topic, keys)| Sent::Events { topic, keys }),
            (0..2usize, 0..3u32, 1..4usize, any::<bool>()).prop_map(
                |(topic, partition, records, idempotent)| Sent::Batch {
                    topic,
                    partition: partition % TOPICS[topic].1,
                    records,
                    idempotent,
                }
            ),
        ]
    }

    fn event(id: String, key: String) -> Event {
        Event {
            id,
            key,
            source: "test".into(),
            ..Event::default()
        }
    }

    /// The request for `sent`, the `r`th of the run, and where each of its records must go
    /// (topic, partition, id) with whether it is plain (may share an append).
    fn request(r: usize, sent: &Sent) -> (ProduceRequest, Vec<(String, u32, String, bool)>) {
        match sent {
            Sent::Events { topic, keys } => {
                let (name, count) = TOPICS[*topic];
                let events: Vec<Event> = keys
                    .iter()
                    .enumerate()
                    .map(|(i, k)| event(format!("r{r}-{i}"), format!("key-{k}")))
                    .collect();
                let placed = events
                    .iter()
                    .map(|e| {
                        let p = runnel_proto::partition_for_key(&e.key, count);
                        (name.to_owned(), p, e.id.clone(), true)
                    })
                    .collect();
                let request = ProduceRequest {
                    topic: name.into(),
                    events,
                    acks: if r.is_multiple_of(2) {
                        Acks::Durable
                    } else {
                        Acks::Leader
                    } as i32,
                    ..ProduceRequest::default()
                };
                (request, placed)
            }
            Sent::Batch {
                topic,
                partition,
                records: n,
                idempotent,
            } => {
                let name = TOPICS[*topic].0;
                let events: Vec<Event> = (0..*n)
                    .map(|i| event(format!("r{r}-{i}"), String::new()))
                    .collect();
                let placed = events
                    .iter()
                    .map(|e| (name.to_owned(), *partition, e.id.clone(), !idempotent))
                    .collect();
                let request = ProduceRequest {
                    topic: name.into(),
                    batches: vec![RecordBatch {
                        partition: *partition,
                        record_count: *n as u32,
                        records: runnel_proto::records::encode(&events),
                        producer_id: if *idempotent { 7 + r as u64 } else { 0 },
                        ..RecordBatch::default()
                    }],
                    ..ProduceRequest::default()
                };
                (request, placed)
            }
        }
    }

    fn service(storage: Arc<MemoryStorage>) -> (BrokerService, runnel_server::ShutdownTrigger) {
        let (trigger, shutdown) = Shutdown::new();
        let service = BrokerService::new(
            storage,
            Coordinator::in_memory(),
            &BrokerConfig::default(),
            shutdown,
        );
        (service, trigger)
    }

    /// A failed append answers the requests before the earliest one it leaves unsure, and
    /// names that one; a later request stored elsewhere is not acknowledged past it.
    #[tokio::test]
    async fn a_failed_append_answers_only_the_requests_before_it() {
        let storage = Arc::new(MemoryStorage {
            broken: Some(1),
            ..MemoryStorage::default()
        });
        let (service, _trigger) = service(Arc::clone(&storage));
        let to = |r: usize, partition: u32| {
            request(
                r,
                &Sent::Batch {
                    topic: 0,
                    partition,
                    records: 1,
                    idempotent: false,
                },
            )
            .0
        };
        let mut planned = Vec::new();
        for (r, partition) in [(0, 0), (1, 2), (2, 1), (3, 0)] {
            planned.push(service.prepare_produce(to(r, partition)).await.unwrap());
        }
        let stored = service.store(planned).await;
        assert_eq!(
            stored.answers.len(),
            2,
            "requests 0 and 1, before the failed one"
        );
        let (failed, error) = stored.failure.expect("the append to partition 1 failed");
        assert_eq!(failed, 2);
        assert!(error.to_string().contains("on fire"), "{error}");
        // Request 3 went to a healthy partition and is stored, just not acknowledged.
        let logs = storage.logs.lock().unwrap();
        assert_eq!(logs[&("alpha".to_owned(), 0)].0, ["r0-0", "r3-0"]);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn a_stored_run_keeps_each_partitions_send_order_and_answers_each_request_with_its_own_records(
            run in proptest::collection::vec(sent(), 1..30),
            scatter in any::<bool>(),
        ) {
            let storage = Arc::new(MemoryStorage { scatter, ..MemoryStorage::default() });
            let (service, _trigger) = service(Arc::clone(&storage));
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let (requests, placed): (Vec<_>, Vec<_>) =
                run.iter().enumerate().map(|(r, s)| request(r, s)).unzip();
            let stored = runtime.block_on(async {
                let mut planned = Vec::new();
                for request in requests.iter().cloned() {
                    planned.push(service.prepare_produce(request).await.unwrap());
                }
                service.store(planned).await
            });
            prop_assert!(stored.failure.is_none());
            prop_assert_eq!(stored.answers.len(), run.len());
            let logs = storage.logs.lock().unwrap();

            // Send order per partition, and the appends coalescing must have left.
            let mut expected: BTreeMap<(String, u32), (Vec<String>, usize, bool)> = BTreeMap::new();
            for (name, p, id, plain) in placed.iter().flatten() {
                let (ids, appends, last_plain) =
                    expected.entry((name.clone(), *p)).or_insert((Vec::new(), 0, false));
                // A record starts a new append unless it and the one before are both plain
                // and came from different requests (one request's records for a partition
                // are one unit already).
                let same_unit = ids.last().is_some_and(|last: &String| {
                    last.split('-').next() == id.split('-').next()
                });
                if !(same_unit || *plain && *last_plain) {
                    *appends += 1;
                }
                *last_plain = *plain;
                ids.push(id.clone());
            }
            for (key, (ids, appends, _)) in &expected {
                let (log, made) = &logs[key];
                let kept: Vec<&String> = log.iter().filter(|id| *id != "foreign").collect();
                prop_assert_eq!(kept, ids.iter().collect::<Vec<_>>(), "order in {:?}", key);
                prop_assert_eq!(made, appends, "appends to {:?}", key);
            }

            // Every answer points at its own request's records.
            for (r, (answer, request)) in stored.answers.iter().zip(&requests).enumerate() {
                for (event, position) in request.events.iter().zip(&answer.positions) {
                    let log = &logs[&(position.topic.clone(), position.partition)].0;
                    prop_assert_eq!(&log[position.offset as usize], &event.id, "request {}", r);
                }
                prop_assert_eq!(answer.batch_acks.len(), request.batches.len());
                for (batch, ack) in request.batches.iter().zip(&answer.batch_acks) {
                    let log = &logs[&(request.topic.clone(), ack.partition)].0;
                    let offsets: Vec<u64> = if ack.offsets.is_empty() {
                        (ack.base_offset..ack.base_offset + u64::from(batch.record_count)).collect()
                    } else {
                        ack.offsets.clone()
                    };
                    let ids: Vec<&String> = offsets.iter().map(|&o| &log[o as usize]).collect();
                    let sent: Vec<String> = (0..batch.record_count).map(|i| format!("r{r}-{i}")).collect();
                    prop_assert_eq!(ids, sent.iter().collect::<Vec<_>>(), "request {}", r);
                    prop_assert_eq!(ack.base_offset, offsets[0]);
                }
            }
        }
    }
}
