//! The `runnel.v1.Broker` gRPC service: request checks, partition choice, acks, and the
//! hand-off of every disk operation to blocking threads.
//!
//! `Produce` is atomic per batch, not per request: events are stored as one batch per
//! partition, pre-encoded batches as they come, partitions in parallel and each partition's
//! batches in request order. If one fails, others may already be stored; the call fails,
//! and only an idempotent producer's retry is then free of duplicates (events carry ids so
//! that consumers can recognise them otherwise).

use crate::batch::{self, StoredBatch};
use crate::config::{BrokerConfig, MAX_SESSION_TIMEOUT};
use crate::error::{BrokerError, Result};
use crate::groups::{self, Coordinator};
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
    ProduceRequest, ProduceResponse, Record, RecordBatch, RecordPosition, SubscribeRequest,
    SubscribeResponse, TopicDescription,
};
use runnel_security::{Action, Caller, Resource, authorize};
use runnel_server::Shutdown;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
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

/// The broker's gRPC handlers.
#[derive(Debug)]
pub(crate) struct BrokerService {
    storage: Arc<dyn Storage>,
    coordinator: Arc<Coordinator>,
    /// The next round-robin turn for events without a key.
    round_robin: AtomicU32,
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

/// One stored unit of a `Produce` request: a batch for one partition, and where its answer
/// goes.
struct Unit {
    partition: u32,
    batch: Incoming,
    /// Check the records body first (pre-encoded batches only).
    validate: bool,
    origin: Origin,
}

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
            round_robin: AtomicU32::new(0),
            auto_create_topics: config.auto_create_topics,
            default_partitions: config.default_partitions,
            max_batch_events: config.max_batch_events,
            default_durable: config.fsync == FsyncPolicy::Always,
            session_timeout: config.group_session_timeout,
            max_read_bytes: max_message - FETCH_HEADROOM.min(max_message / 2),
            shutdown,
        }
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
                    origin: Origin::Events(indexes),
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
                origin: Origin::Batch(i),
            });
        }
        Ok(units)
    }

    #[tracing::instrument(name = "produce", skip_all, fields(topic = %request.topic, events = request.events.len(), batches = request.batches.len()))]
    async fn serve_produce(&self, request: ProduceRequest) -> Result<ProduceResponse> {
        let started = Instant::now();
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
        let units = self.plan(&name, count, events, partition, batches, deduplicate)?;

        // Each partition's units in request order; partitions in parallel.
        let mut per_partition: BTreeMap<u32, Vec<Unit>> = BTreeMap::new();
        for unit in units {
            per_partition.entry(unit.partition).or_default().push(unit);
        }
        let max_len = self.max_read_bytes;
        let appends = per_partition.into_iter().map(|(p, units)| {
            let storage = Arc::clone(&self.storage);
            let name = name.clone();
            async move {
                // Pre-encoded bodies are decoded to be checked: CPU work, off the runtime
                // unless there is little of it (a hand-off costs more than a few records).
                let checked: usize = units
                    .iter()
                    .filter(|u| u.validate)
                    .map(|u| u.batch.records.len())
                    .sum();
                let units = if checked <= INLINE_CHECK_BYTES {
                    let mut units = units;
                    validate_units(&mut units, max_len, deduplicate)?;
                    units
                } else {
                    tokio::task::spawn_blocking(move || {
                        let mut units = units;
                        validate_units(&mut units, max_len, deduplicate).map(|()| units)
                    })
                    .await
                    .map_err(BrokerError::from)
                    .and_then(|units| units)?
                };
                let last = units.len() - 1;
                let mut stored = Vec::with_capacity(units.len());
                for (i, unit) in units.into_iter().enumerate() {
                    let count = u64::from(unit.batch.record_count);
                    let bytes = unit.batch.records.len() as u64;
                    // One durable wait per partition: the last batch's covers the others.
                    let appended = storage
                        .append(&name, p, unit.batch, durable && i == last)
                        .await?;
                    stored.push((unit.origin, appended, count, bytes));
                }
                Ok::<_, BrokerError>((p, stored))
            }
        });
        let results = futures::future::join_all(appends).await;

        let mut positions = vec![RecordPosition::default(); event_count];
        let mut batch_acks = vec![BatchAck::default(); batch_count];
        let (mut records, mut bytes, mut duplicates, mut first_error) = (0u64, 0u64, 0u64, None);
        for result in results {
            let (p, stored) = match result {
                Ok(done) => done,
                Err(error) => {
                    first_error.get_or_insert(error);
                    continue;
                }
            };
            for (origin, appended, count, size) in stored {
                let (base_offset, duplicate, scattered) = match appended {
                    Appended::Stored {
                        base_offset,
                        scattered,
                        duplicates: retried,
                        ..
                    } => {
                        records += count - u64::from(retried);
                        duplicates += u64::from(retried);
                        // A batch partly stored counts its share of the bytes.
                        bytes += size * (count - u64::from(retried)) / count.max(1);
                        (base_offset, false, scattered)
                    }
                    Appended::Duplicate { base_offset } => (base_offset, true, None),
                };
                match origin {
                    Origin::Events(indexes) => {
                        let offsets = scattered
                            .unwrap_or_else(|| (base_offset..base_offset + count).collect());
                        for (i, offset) in indexes.into_iter().zip(offsets) {
                            positions[i] = RecordPosition {
                                topic: name.clone(),
                                partition: p,
                                offset,
                            };
                        }
                    }
                    Origin::Batch(i) => {
                        batch_acks[i] = BatchAck {
                            partition: p,
                            base_offset,
                            duplicate,
                            offsets: scattered.unwrap_or_default(),
                        };
                    }
                }
            }
        }
        metrics::counter!("runnel_broker_records_appended_total", "topic" => name.clone())
            .increment(records);
        metrics::counter!("runnel_broker_bytes_appended_total", "topic" => name.clone())
            .increment(bytes);
        metrics::histogram!("runnel_broker_produce_seconds", "acks" => if durable { "durable" } else { "leader" })
            .record(started.elapsed().as_secs_f64());
        if let Some(error) = first_error {
            if records > 0 {
                tracing::warn!(records, %error, "produce failed after some partitions stored their batches");
            }
            return Err(error);
        }
        Ok(ProduceResponse {
            positions,
            batch_acks,
            duplicates,
        })
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

/// Checks every pre-encoded batch of `units`.
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
        authorize(
            &request,
            Action::Produce,
            Resource::Topic(&request.get_ref().topic),
        )?;
        // A fenced write is a heartbeat of the group's member: it needs the group's own
        // permission (the store, which relays the analyzer's fenced results, has it too).
        if let Some(fence) = &request.get_ref().fence {
            authorize(&request, Action::Consume, Resource::Group(&fence.group))?;
        }
        Ok(Response::new(
            self.serve_produce(request.into_inner()).await?,
        ))
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
