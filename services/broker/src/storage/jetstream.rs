//! The NATS JetStream engine: topics as replicated JetStream streams, for deployments that
//! outgrow one machine.
//!
//! | Runnel | JetStream |
//! |---|---|
//! | partition `p` of topic `t` | stream `RUNNEL_<t>_<p>` bound to subject `runnel.<t>.<p>` (`.` in a topic name becomes `_d`, `_` becomes `__`) |
//! | record at offset `o` | the message at stream sequence `o + 1`, payload the encoded `Event` |
//! | append time | the message's stream timestamp |
//! | idempotent producer `id`, sequence `s` | `Nats-Msg-Id: <id>-<s>`: JetStream drops the copy within its duplicate window |
//! | retention | the stream's `max_age` and `max_bytes` (set when the topic is created) |
//! | topic metadata | subject `runnel.meta.topics.<t>` of stream `RUNNEL_META` (written last: the commit point) |
//! | committed offsets | subject `runnel.meta.offsets.<group>.<t>` of `RUNNEL_META`, updated by compare-and-set |
//! | a consumer group's membership | subject `runnel.meta.groups.<group>.<t>` of `RUNNEL_META` (JSON), updated by compare-and-set and watched by every broker ([`JetStreamGroups`]) |
//!
//! `RUNNEL_META` keeps the last message per subject and is read with direct gets and
//! written with `Nats-Expected-Last-Subject-Sequence` — the mechanism JetStream's own
//! key-value buckets are built on, used directly because it works the same on every
//! server version.
//!
//! Any number of brokers can stand in front of one JetStream cluster: everything durable
//! is in JetStream. A record is acknowledged once JetStream has stored it (on a quorum of
//! replicas for replicated streams), whatever the acks asked for. What differs from the
//! embedded engine: a batch is published record by record (a broker keeps its own batches
//! contiguous, but two brokers writing one partition can interleave them, and a batch
//! interrupted half-way is half stored until retried), duplicates are recognised within
//! the duplicate window only, and retention settings are fixed when the topic is created.

use super::{
    Appended, Committed, FOLLOW_BUFFER, Follow, Followed, Incoming, Read, Retention, Storage,
};
use crate::batch::{BatchHeader, StoredBatch};
use crate::config::{JetStreamConfig, JetStreamStorage};
use crate::error::{BrokerError, Result};
use crate::groups::{Change, GroupKey, GroupLedger, GroupState, Revised};
use crate::topic::{RetentionOverride, TopicMeta, retention_proto};
use async_nats::jetstream::consumer::{DeliverPolicy, ReplayPolicy, pull, push};
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::{self, stream};
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use runnel_proto::Millis;
use runnel_proto::v1::{Compression, PartitionInfo, TopicInfo};
use runnel_server::Shutdown;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tonic::Status;

const META_STREAM: &str = "RUNNEL_META";
const META_SUBJECTS: &str = "runnel.meta.>";
const TOPICS_PREFIX: &str = "runnel.meta.topics.";
const OFFSETS_PREFIX: &str = "runnel.meta.offsets.";
const GROUPS_PREFIX: &str = "runnel.meta.groups.";
/// Direct gets in flight at once when reading.
const READ_CONCURRENCY: usize = 64;
/// Acks one batch may have pending at once while it publishes.
const WINDOW: usize = 256;
/// Batches publishing at once; `APPENDS * WINDOW` stays under the client's limit of
/// pending acks (5000 by default).
const APPENDS: usize = 16;
/// Most records a follower hands on in one chunk.
const FOLLOW_CHUNK: usize = 512;

/// A name made safe for stream names, subjects and KV keys: reversible, and free of `.`.
fn encode(name: &str) -> String {
    name.replace('_', "__").replace('.', "_d")
}

fn decode(encoded: &str) -> String {
    let mut out = String::with_capacity(encoded.len());
    let mut chars = encoded.chars();
    while let Some(c) = chars.next() {
        match (c, chars.clone().next()) {
            ('_', Some('_')) => {
                chars.next();
                out.push('_');
            }
            ('_', Some('d')) => {
                chars.next();
                out.push('.');
            }
            _ => out.push(c),
        }
    }
    out
}

fn stream_name(topic: &str, partition: u32) -> String {
    format!("RUNNEL_{}_{partition}", encode(topic))
}

fn subject(topic: &str, partition: u32) -> String {
    format!("runnel.{}.{partition}", encode(topic))
}

fn topic_key(topic: &str) -> String {
    format!("{TOPICS_PREFIX}{}", encode(topic))
}

fn offsets_key(group: &str, topic: &str) -> String {
    format!("{OFFSETS_PREFIX}{}.{}", encode(group), encode(topic))
}

fn group_key(key: &GroupKey) -> String {
    format!("{GROUPS_PREFIX}{}.{}", encode(&key.0), encode(&key.1))
}

/// The group and topic a group key names, if it is one.
fn parse_group_key(subject: &str) -> Option<GroupKey> {
    let (group, topic) = subject.strip_prefix(GROUPS_PREFIX)?.split_once('.')?;
    Some((decode(group), decode(topic)))
}

/// Unix milliseconds of a JetStream timestamp.
fn millis(time: time::OffsetDateTime) -> Millis {
    Millis(i64::try_from(time.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX))
}

/// An error from NATS, as the broker reports it: the cluster may be electing a leader or
/// be out of reach, which the client can retry.
fn unavailable(what: &str, error: impl std::fmt::Display) -> BrokerError {
    BrokerError::Engine(format!("jetstream {what}: {error}"))
}

/// Why a partition's stream could not be created. JetStream reserves a stream's
/// `max_bytes` against the server's store limit when the stream is created; a refusal for
/// lack of room is final (retrying cannot help), and says what would.
fn stream_not_created(
    topic: &str,
    partition: u32,
    reserved: i64,
    error: &jetstream::context::CreateStreamError,
) -> BrokerError {
    use jetstream::ErrorCode;
    use jetstream::context::CreateStreamErrorKind;
    if let CreateStreamErrorKind::JetStream(js) = error.kind() {
        let code = js.error_code();
        if code == ErrorCode::STORAGE_RESOURCES_EXCEEDED
            || code == ErrorCode::MEMORY_RESOURCES_EXCEEDED
            || code == ErrorCode::INSUFFICIENT_RESOURCES
            || code == ErrorCode::ACCOUNT_RESOURCES_EXCEEDED
        {
            return BrokerError::EngineFull(full_message(topic, partition, reserved, js));
        }
    }
    unavailable("create stream", error)
}

/// What an operator reads when JetStream has no room for a partition's stream.
fn full_message(
    topic: &str,
    partition: u32,
    reserved: i64,
    error: impl std::fmt::Display,
) -> String {
    let asked = if reserved > 0 {
        format!("a retention of {reserved} bytes")
    } else {
        "its stream".to_owned()
    };
    format!(
        "jetstream has no room for topic {topic:?} partition {partition} ({error}): \
         JetStream reserves each stream's retention max_bytes against the server's \
         max_file_store (max_memory_store for memory storage) when it is created, and \
         {asked} does not fit next to the streams already there; lower the topic's \
         retention.max_bytes or raise the server's store limit"
    )
}

/// One broker's turn to publish a batch to a partition.
type PartitionTurn = Arc<tokio::sync::Mutex<()>>;

/// The JetStream engine.
#[derive(Debug)]
pub(crate) struct JetStream {
    context: jetstream::Context,
    meta: MetaStore,
    config: JetStreamConfig,
    defaults: Retention,
    /// Topic metadata, cached: a topic's partitions never change.
    known: Mutex<HashMap<String, TopicMeta>>,
    /// Serialises this broker's appends to a partition, so each of its batches gets
    /// consecutive sequences.
    writers: Mutex<HashMap<(String, u32), PartitionTurn>>,
    /// Batches publishing at once (see [`APPENDS`]).
    appends: tokio::sync::Semaphore,
}

impl JetStream {
    /// Connects to the cluster and opens (creating if needed) the metadata buckets.
    pub(crate) async fn connect(config: JetStreamConfig, defaults: Retention) -> Result<JetStream> {
        let mut options = async_nats::ConnectOptions::new()
            .connection_timeout(config.connect_timeout)
            .request_timeout(Some(config.request_timeout))
            .retry_on_initial_connect();
        let tls = &config.tls;
        if tls.required(&config.servers) {
            options = options.require_tls(true);
            if let Some(ca) = &tls.ca {
                options = options.add_root_certificates(ca.clone());
            }
            if let (Some(cert), Some(key)) = (&tls.cert, &tls.key) {
                options = options.add_client_certificate(cert.clone(), key.clone());
            }
        }
        let client = options
            .connect(config.servers.clone())
            .await
            .map_err(|e| unavailable("connect", e))?;
        let mut context = jetstream::new(client);
        context.set_timeout(config.request_timeout);
        let meta = MetaStore::open(&context, &config).await?;
        tracing::info!(servers = ?config.servers, replicas = config.replicas, tls = config.tls.required(&config.servers), "jetstream engine connected");
        Ok(JetStream {
            context,
            meta,
            config,
            defaults,
            known: Mutex::default(),
            writers: Mutex::default(),
            appends: tokio::sync::Semaphore::new(APPENDS),
        })
    }

    /// The consumer groups' ledger, in this cluster's metadata stream.
    pub(crate) fn groups(&self) -> JetStreamGroups {
        JetStreamGroups {
            meta: self.meta.clone(),
        }
    }

    async fn meta(&self, topic: &str) -> Result<Option<TopicMeta>> {
        if let Some(meta) = self
            .known
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(topic)
        {
            return Ok(Some(meta.clone()));
        }
        let Some((bytes, _)) = self.meta.get(&topic_key(topic)).await? else {
            return Ok(None);
        };
        let meta: TopicMeta = serde_json::from_slice(&bytes).map_err(|e| {
            BrokerError::Engine(format!("topic {topic:?} metadata does not parse: {e}"))
        })?;
        self.known
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(topic.to_owned(), meta.clone());
        Ok(Some(meta))
    }

    async fn existing(&self, topic: &str) -> Result<TopicMeta> {
        self.meta(topic)
            .await?
            .ok_or_else(|| BrokerError::TopicNotFound(topic.to_owned()))
    }

    async fn stream(&self, topic: &str, partition: u32) -> Result<stream::Stream<()>> {
        let meta = self.existing(topic).await?;
        if partition >= meta.partitions {
            return Err(BrokerError::InvalidArgument(format!(
                "partition {partition} does not exist: topic {topic:?} has partitions 0 to {}",
                meta.partitions.saturating_sub(1)
            )));
        }
        self.context
            .get_stream_no_info(stream_name(topic, partition))
            .await
            .map_err(|e| unavailable("stream lookup", e))
    }

    async fn state(&self, topic: &str, partition: u32) -> Result<stream::State> {
        let stream = self.stream(topic, partition).await?;
        Ok(stream
            .get_info()
            .await
            .map_err(|e| unavailable("stream info", e))?
            .state)
    }

    fn writer(&self, topic: &str, partition: u32) -> PartitionTurn {
        let mut writers = self
            .writers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Arc::clone(writers.entry((topic.to_owned(), partition)).or_default())
    }

    async fn info(&self, meta: &TopicMeta) -> Result<TopicInfo> {
        let mut partitions = Vec::with_capacity(meta.partitions as usize);
        for partition in 0..meta.partitions {
            let state = self.state(&meta.name, partition).await?;
            // An empty stream's first sequence is one past its last.
            let start = state
                .first_sequence
                .saturating_sub(1)
                .min(state.last_sequence);
            partitions.push(PartitionInfo {
                partition,
                start_offset: start,
                end_offset: state.last_sequence,
                size_bytes: state.bytes,
                segments: 0,
                durable_offset: state.last_sequence,
            });
        }
        Ok(TopicInfo {
            name: meta.name.clone(),
            partitions,
            retention: Some(retention_proto(meta.retention.resolve(self.defaults))),
        })
    }
}

/// Small values by key, last write wins per key, compare-and-set by revision: a stream
/// that keeps one message per subject.
#[derive(Debug, Clone)]
struct MetaStore {
    context: jetstream::Context,
    stream: stream::Stream<()>,
}

/// Why a conditional write did not happen.
enum Conflict {
    /// Someone wrote the key first (or it already existed).
    Lost,
    Failed(BrokerError),
}

/// How long a starting broker waits for the cluster to serve its metadata stream.
const META_OPEN_PATIENCE: Duration = Duration::from_secs(30);

impl MetaStore {
    async fn open(context: &jetstream::Context, config: &JetStreamConfig) -> Result<MetaStore> {
        let stream_config = stream::Config {
            name: META_STREAM.to_owned(),
            subjects: vec![META_SUBJECTS.to_owned()],
            max_messages_per_subject: 1,
            storage: match config.storage {
                JetStreamStorage::File => stream::StorageType::File,
                JetStreamStorage::Memory => stream::StorageType::Memory,
            },
            num_replicas: config.replicas,
            allow_direct: true,
            ..stream::Config::default()
        };
        // A cluster that has just started may not have elected its JetStream leader yet
        // ("no suitable peers", timeouts): a broker started beside it waits for it instead
        // of failing its start.
        let deadline = tokio::time::Instant::now() + META_OPEN_PATIENCE;
        let mut delay = Duration::from_millis(100);
        loop {
            match context.get_or_create_stream(stream_config.clone()).await {
                Ok(_) => break,
                Err(error) if tokio::time::Instant::now() + delay < deadline => {
                    tracing::warn!(%error, "metadata stream not available yet; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
                Err(error) => return Err(unavailable("metadata stream", error)),
            }
        }
        let stream = context
            .get_stream_no_info(META_STREAM)
            .await
            .map_err(|e| unavailable("metadata stream", e))?;
        Ok(MetaStore {
            context: context.clone(),
            stream,
        })
    }

    /// The value at `key` and its revision.
    async fn get(&self, key: &str) -> Result<Option<(Bytes, u64)>> {
        match self.stream.direct_get_last_for_subject(key).await {
            Ok(message) => Ok(Some((message.payload, message.sequence))),
            // Any replica may answer a direct get, and one that has not caught up yet does
            // not know a write just acknowledged — a topic created a moment ago would look
            // missing. The stream's leader confirms a miss.
            Err(error) if error.kind() == stream::DirectGetErrorKind::NotFound => {
                match self.stream.get_last_raw_message_by_subject(key).await {
                    Ok(message) => Ok(Some((message.payload, message.sequence))),
                    Err(error)
                        if error.kind() == stream::LastRawMessageErrorKind::NoMessageFound =>
                    {
                        Ok(None)
                    }
                    Err(error) => Err(unavailable("metadata read", error)),
                }
            }
            Err(error) => Err(unavailable("metadata read", error)),
        }
    }

    /// Writes `value` at `key` if the key's last revision is `revision` (0: it must not
    /// exist yet).
    /// Answers the key's new revision.
    async fn put_if(
        &self,
        key: &str,
        value: Bytes,
        revision: u64,
    ) -> std::result::Result<u64, Conflict> {
        let message = PublishMessage::build()
            .payload(value)
            .expected_last_subject_sequence(revision);
        let ack = self
            .context
            .send_publish(key.to_owned(), message)
            .await
            .map_err(|e| Conflict::Failed(unavailable("metadata write", e)))?;
        match ack.await {
            Ok(ack) => Ok(ack.sequence),
            Err(error) if error.kind() == PublishErrorKind::WrongLastSequence => {
                Err(Conflict::Lost)
            }
            Err(error) => Err(Conflict::Failed(unavailable("metadata write", error))),
        }
    }

    /// Every key below `prefix` (which ends with a dot).
    async fn keys(&self, prefix: &str) -> Result<Vec<String>> {
        let mut subjects = self
            .stream
            .info_with_subjects(format!("{prefix}>"))
            .await
            .map_err(|e| unavailable("metadata keys", e))?;
        let mut keys = Vec::new();
        while let Some(subject) = subjects.next().await {
            let (subject, _) = subject.map_err(|e| unavailable("metadata keys", e))?;
            keys.push(subject);
        }
        keys.sort();
        Ok(keys)
    }
}

/// Consumer groups' membership in `RUNNEL_META`: one subject per group, so every broker in
/// front of the cluster reads, changes (by compare-and-set) and watches the same groups.
#[derive(Debug)]
pub(crate) struct JetStreamGroups {
    meta: MetaStore,
}

fn parse_group(key: &GroupKey, bytes: &[u8]) -> Result<GroupState> {
    serde_json::from_slice(bytes).map_err(|e| {
        BrokerError::Engine(format!(
            "group {:?} on topic {:?}: its stored membership does not parse: {e}",
            key.0, key.1
        ))
    })
}

#[tonic::async_trait]
impl GroupLedger for JetStreamGroups {
    async fn load(&self, key: &GroupKey) -> Result<Option<Revised>> {
        match self.meta.get(&group_key(key)).await? {
            Some((bytes, revision)) => Ok(Some((parse_group(key, &bytes)?, revision))),
            None => Ok(None),
        }
    }

    async fn store_if(
        &self,
        key: &GroupKey,
        state: &GroupState,
        revision: u64,
    ) -> Result<Option<u64>> {
        let json = serde_json::to_vec(state).map_err(|e| BrokerError::Engine(e.to_string()))?;
        match self
            .meta
            .put_if(&group_key(key), Bytes::from(json), revision)
            .await
        {
            Ok(stored) => Ok(Some(stored)),
            Err(Conflict::Lost) => Ok(None),
            Err(Conflict::Failed(error)) => Err(error),
        }
    }

    async fn watch(&self) -> Result<BoxStream<'static, Result<Change>>> {
        // What a key-value watch is: an ordered consumer from each subject's last message.
        let consumer = self
            .meta
            .stream
            .create_consumer(push::OrderedConfig {
                deliver_subject: self.meta.context.client().new_inbox(),
                description: Some("runnel broker: consumer group watch".into()),
                filter_subject: format!("{GROUPS_PREFIX}>"),
                replay_policy: ReplayPolicy::Instant,
                deliver_policy: DeliverPolicy::LastPerSubject,
                ..push::OrderedConfig::default()
            })
            .await
            .map_err(|e| unavailable("group watch", e))?;
        let messages = consumer
            .messages()
            .await
            .map_err(|e| unavailable("group watch", e))?;
        Ok(Box::pin(messages.filter_map(|message| async move {
            let message = match message {
                Ok(message) => message,
                Err(error) => return Some(Err(unavailable("group watch", error))),
            };
            let key = parse_group_key(message.subject.as_str())?;
            let revision = match message.info() {
                Ok(info) => info.stream_sequence,
                Err(error) => return Some(Err(unavailable("group watch", error))),
            };
            Some(parse_group(&key, &message.payload).map(|state| (key, state, revision)))
        })))
    }
}

/// A stored message as a one-record batch.
fn as_batch(sequence: u64, time: Millis, payload: &[u8]) -> StoredBatch {
    let mut body = Vec::with_capacity(payload.len() + 5);
    prost::encode_length_delimiter(payload.len(), &mut body).unwrap_or_default();
    body.extend_from_slice(payload);
    StoredBatch::new(
        BatchHeader {
            compression: Compression::None,
            record_count: 1,
            base_offset: sequence - 1,
            append_time: time,
            producer_id: 0,
            base_sequence: 0,
            deduplicated: false,
        },
        &body,
    )
}

#[tonic::async_trait]
impl Storage for JetStream {
    async fn create_topic(
        &self,
        name: &str,
        partitions: u32,
        retention: RetentionOverride,
    ) -> Result<TopicInfo> {
        if self.meta(name).await?.is_some() {
            return Err(BrokerError::TopicExists(name.to_owned()));
        }
        let resolved = retention.resolve(self.defaults);
        for partition in 0..partitions {
            let config = stream::Config {
                name: stream_name(name, partition),
                subjects: vec![subject(name, partition)],
                max_age: resolved.max_age.unwrap_or(Duration::ZERO),
                max_bytes: resolved
                    .max_bytes
                    .map_or(-1, |b| i64::try_from(b).unwrap_or(i64::MAX)),
                storage: match self.config.storage {
                    JetStreamStorage::File => stream::StorageType::File,
                    JetStreamStorage::Memory => stream::StorageType::Memory,
                },
                num_replicas: self.config.replicas,
                duplicate_window: self.config.duplicate_window,
                allow_direct: true,
                ..stream::Config::default()
            };
            let reserved = config.max_bytes;
            // Idempotent: a creation that died half-way left empty streams behind.
            self.context
                .get_or_create_stream(config)
                .await
                .map_err(|e| stream_not_created(name, partition, reserved, &e))?;
        }
        let meta = TopicMeta {
            name: name.to_owned(),
            partitions,
            retention,
        };
        let json = serde_json::to_vec(&meta).map_err(|e| BrokerError::Engine(e.to_string()))?;
        match self
            .meta
            .put_if(&topic_key(name), Bytes::from(json), 0)
            .await
        {
            Ok(_) => {}
            Err(Conflict::Lost) => return Err(BrokerError::TopicExists(name.to_owned())),
            Err(Conflict::Failed(error)) => return Err(error),
        }
        tracing::info!(
            topic = name,
            partitions,
            replicas = self.config.replicas,
            "topic created in jetstream"
        );
        self.info(&meta).await
    }

    async fn partitions(&self, topic: &str) -> Result<Option<u32>> {
        Ok(self.meta(topic).await?.map(|m| m.partitions))
    }

    async fn list_topics(&self) -> Result<Vec<TopicInfo>> {
        let names: Vec<String> = self
            .meta
            .keys(TOPICS_PREFIX)
            .await?
            .iter()
            .filter_map(|key| key.strip_prefix(TOPICS_PREFIX).map(decode))
            .collect();
        let mut topics = Vec::with_capacity(names.len());
        for name in names {
            topics.push(self.info(&self.existing(&name).await?).await?);
        }
        Ok(topics)
    }

    async fn topic_info(&self, topic: &str) -> Result<TopicInfo> {
        self.info(&self.existing(topic).await?).await
    }

    async fn append(
        &self,
        topic: &str,
        partition: u32,
        batch: Incoming,
        _durable: bool,
    ) -> Result<Appended> {
        self.stream(topic, partition).await?;
        let records = batch.split_records(usize::MAX)?;
        let subject = subject(topic, partition);
        let writer = self.writer(topic, partition);
        // At most APPENDS batches publish at once, each with at most WINDOW acks pending:
        // the client's own limit on pending acks (it waits when reached) is never hit by
        // tasks that all hold un-awaited acks, which would deadlock.
        let _slot = self
            .appends
            .acquire()
            .await
            .map_err(|e| unavailable("publish", e))?;
        let _turn = writer.lock().await;
        let mut pending: std::collections::VecDeque<jetstream::context::PublishAckFuture> =
            std::collections::VecDeque::with_capacity(WINDOW);
        let mut sequences = Vec::with_capacity(records.len());
        let mut duplicates = 0;
        let mut settle = |ack: async_nats::jetstream::publish::PublishAck| {
            duplicates += usize::from(ack.duplicate);
            sequences.push(ack.sequence);
        };
        for (i, record) in records.into_iter().enumerate() {
            if pending.len() == WINDOW
                && let Some(oldest) = pending.pop_front()
            {
                settle(oldest.await.map_err(|e| unavailable("publish ack", e))?);
            }
            let mut message = PublishMessage::build().payload(record);
            if let Some(identities) = &batch.identities {
                // JetStream recognises the retried event within the stream's duplicate
                // window, and acknowledges it with its original's sequence.
                let Some(identity) = identities.get(i) else {
                    return Err(BrokerError::InvalidArgument(
                        "a batch holds more records than identities".into(),
                    ));
                };
                message = message.message_id(format!("e{identity:032x}"));
            } else if batch.producer_id != 0 {
                message = message.message_id(format!(
                    "{:016x}-{}",
                    batch.producer_id,
                    batch.base_sequence + i as u64
                ));
            }
            let ack = self
                .context
                .send_publish(subject.clone(), message)
                .await
                .map_err(|e| unavailable("publish", e))?;
            pending.push_back(ack);
        }
        for ack in pending {
            settle(ack.await.map_err(|e| unavailable("publish ack", e))?);
        }
        let base_offset = sequences.first().map_or(0, |s| s - 1);
        if duplicates == sequences.len() && batch.identities.is_none() {
            return Ok(Appended::Duplicate { base_offset });
        }
        let contiguous = sequences.windows(2).all(|w| w[1] == w[0] + 1);
        Ok(Appended::Stored {
            base_offset,
            next_offset: sequences.iter().max().copied().unwrap_or(base_offset),
            scattered: (!contiguous).then(|| sequences.iter().map(|s| s - 1).collect()),
            duplicates: if batch.identities.is_some() {
                duplicates as u32
            } else {
                0
            },
        })
    }

    async fn read(&self, topic: &str, partition: u32, from: u64, max_bytes: usize) -> Result<Read> {
        let stream = self.stream(topic, partition).await?;
        let state = stream
            .get_info()
            .await
            .map_err(|e| unavailable("stream info", e))?
            .state;
        let (start, end) = (
            state
                .first_sequence
                .saturating_sub(1)
                .min(state.last_sequence),
            state.last_sequence,
        );
        if from < start || from > end {
            return Err(BrokerError::OffsetOutOfRange {
                topic: topic.to_owned(),
                partition,
                offset: from,
                start,
                end,
            });
        }
        let mut batches = Vec::new();
        let mut taken = 0usize;
        let mut next = from + 1;
        'reading: while next <= end {
            let upto = (next + READ_CONCURRENCY as u64).min(end + 1);
            let gets = (next..upto).map(|sequence| {
                let stream = &stream;
                async move { (sequence, stream.direct_get(sequence).await) }
            });
            for (sequence, got) in futures::future::join_all(gets).await {
                match got {
                    Ok(message) => {
                        // Within the budget, but the first record whatever its size.
                        if !batches.is_empty() && taken + message.payload.len() > max_bytes {
                            break 'reading;
                        }
                        taken += message.payload.len();
                        batches.push(as_batch(sequence, millis(message.time), &message.payload));
                    }
                    // Deleted since the state was read (retention): nothing to return.
                    Err(error) if error.kind() == stream::DirectGetErrorKind::NotFound => {}
                    Err(error) => return Err(unavailable("read", error)),
                }
            }
            next = upto;
        }
        Ok(Read {
            batches,
            start,
            end,
        })
    }

    async fn offset_for_time(&self, topic: &str, partition: u32, time: Millis) -> Result<u64> {
        let stream = self.stream(topic, partition).await?;
        let start_time =
            time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(time.0) * 1_000_000)
                .map_err(|_| BrokerError::InvalidArgument("timestamp is out of range".into()))?;
        let consumer = stream
            .create_consumer(pull::Config {
                deliver_policy: DeliverPolicy::ByStartTime { start_time },
                ack_policy: jetstream::consumer::AckPolicy::None,
                inactive_threshold: Duration::from_secs(30),
                ..pull::Config::default()
            })
            .await
            .map_err(|e| unavailable("time lookup", e))?;
        let mut first = consumer
            .fetch()
            .max_messages(1)
            .expires(Duration::from_millis(200))
            .messages()
            .await
            .map_err(|e| unavailable("time lookup", e))?;
        let found = match first.next().await {
            Some(Ok(message)) => Some(
                message
                    .info()
                    .map_err(|e| unavailable("time lookup", e))?
                    .stream_sequence
                    - 1,
            ),
            _ => None,
        };
        match found {
            Some(offset) => Ok(offset),
            None => Ok(stream
                .get_info()
                .await
                .map_err(|e| unavailable("stream info", e))?
                .state
                .last_sequence),
        }
    }

    async fn bounds(&self, topic: &str, partition: u32) -> Result<(u64, u64)> {
        let state = self.state(topic, partition).await?;
        Ok((
            state
                .first_sequence
                .saturating_sub(1)
                .min(state.last_sequence),
            state.last_sequence,
        ))
    }

    async fn follow(
        &self,
        topic: &str,
        partition: u32,
        from: u64,
        _max_bytes: usize,
        shutdown: Shutdown,
    ) -> Result<Follow> {
        let stream = self.stream(topic, partition).await?;
        let consumer = stream
            .create_consumer(pull::OrderedConfig {
                deliver_policy: DeliverPolicy::ByStartSequence {
                    start_sequence: from + 1,
                },
                ..pull::OrderedConfig::default()
            })
            .await
            .map_err(|e| unavailable("follow", e))?;
        let messages = consumer
            .messages()
            .await
            .map_err(|e| unavailable("follow", e))?;
        let (sender, receiver) = mpsc::channel(FOLLOW_BUFFER);
        let topic = topic.to_owned();
        tokio::spawn(async move {
            let mut chunks = messages.ready_chunks(FOLLOW_CHUNK);
            let mut expected = from;
            loop {
                let chunk = tokio::select! {
                    chunk = chunks.next() => chunk,
                    () = sender.closed() => return,
                    () = shutdown.wait() => return,
                };
                let Some(chunk) = chunk else {
                    return;
                };
                let mut batches = Vec::with_capacity(chunk.len());
                for message in chunk {
                    let converted = message
                        .map_err(|e| Status::unavailable(format!("jetstream follow: {e}")))
                        .and_then(|message| {
                            let info = message.info().map_err(|e| {
                                Status::internal(format!("jetstream message info: {e}"))
                            })?;
                            Ok(as_batch(
                                info.stream_sequence,
                                millis(info.published),
                                &message.payload,
                            ))
                        });
                    match converted {
                        Ok(batch) => {
                            let offset = batch.header.base_offset;
                            if offset > expected {
                                tracing::warn!(
                                    topic,
                                    partition,
                                    from = expected,
                                    to = offset,
                                    "skipping records deleted by retention"
                                );
                            }
                            expected = offset + 1;
                            batches.push(batch);
                        }
                        Err(status) => {
                            let _ = sender.send(Err(status)).await;
                            return;
                        }
                    }
                }
                let Some(from) = batches.first().map(|b| b.header.base_offset) else {
                    continue;
                };
                let followed = Followed { from, batches };
                if sender.send(Ok(followed)).await.is_err() {
                    return;
                }
            }
        });
        Ok(receiver)
    }

    async fn commit(
        &self,
        group: &str,
        topic: &str,
        offsets: BTreeMap<u32, Committed>,
    ) -> Result<BTreeMap<u32, Committed>> {
        let key = offsets_key(group, topic);
        // Compare-and-set: brokers serving the same group in front of one cluster never
        // overwrite each other's commits.
        loop {
            let (mut merged, revision) = match self.meta.get(&key).await? {
                Some((bytes, revision)) => (parse_offsets(group, &bytes)?, revision),
                None => (BTreeMap::new(), 0),
            };
            merged.extend(offsets.iter().map(|(p, c)| (*p, c.clone())));
            let json = Bytes::from(encode_offsets(&merged)?);
            match self.meta.put_if(&key, json, revision).await {
                Ok(_) => return Ok(merged),
                Err(Conflict::Lost) => continue,
                Err(Conflict::Failed(error)) => return Err(error),
            }
        }
    }

    async fn committed(&self, group: &str, topic: &str) -> Result<BTreeMap<u32, Committed>> {
        match self.meta.get(&offsets_key(group, topic)).await? {
            Some((bytes, _)) => parse_offsets(group, &bytes),
            None => Ok(BTreeMap::new()),
        }
    }

    async fn groups_of(&self, topic: &str) -> Result<BTreeMap<String, BTreeMap<u32, u64>>> {
        let suffix = format!(".{}", encode(topic));
        let mut groups = BTreeMap::new();
        for key in self.meta.keys(OFFSETS_PREFIX).await? {
            let Some(group) = key
                .strip_prefix(OFFSETS_PREFIX)
                .and_then(|rest| rest.strip_suffix(&suffix))
                .filter(|group| !group.contains('.'))
            else {
                continue;
            };
            let group = decode(group);
            let offsets = self.committed(&group, topic).await?;
            groups.insert(
                group,
                offsets.into_iter().map(|(p, c)| (p, c.offset)).collect(),
            );
        }
        Ok(groups)
    }
}

/// One partition's commit as the meta stream holds it: `{"offset", "metadata"}` (base64),
/// or a bare offset, as brokers wrote it before commits carried metadata.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
enum StoredCommit {
    Offset(u64),
    WithMetadata { offset: u64, metadata: String },
}

fn encode_offsets(offsets: &BTreeMap<u32, Committed>) -> Result<Vec<u8>> {
    use base64::Engine;
    let stored: BTreeMap<u32, StoredCommit> = offsets
        .iter()
        .map(|(p, c)| {
            let stored = if c.metadata.is_empty() {
                StoredCommit::Offset(c.offset)
            } else {
                StoredCommit::WithMetadata {
                    offset: c.offset,
                    metadata: base64::engine::general_purpose::STANDARD.encode(&c.metadata),
                }
            };
            (*p, stored)
        })
        .collect();
    serde_json::to_vec(&stored).map_err(|e| BrokerError::Engine(e.to_string()))
}

fn parse_offsets(group: &str, bytes: &[u8]) -> Result<BTreeMap<u32, Committed>> {
    use base64::Engine;
    let bad = |reason: String| {
        BrokerError::Engine(format!("offsets of group {group:?} do not parse: {reason}"))
    };
    let stored: BTreeMap<u32, StoredCommit> =
        serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
    stored
        .into_iter()
        .map(|(partition, stored)| {
            Ok(match stored {
                StoredCommit::Offset(offset) => (partition, Committed::offset(offset)),
                StoredCommit::WithMetadata { offset, metadata } => {
                    let metadata = base64::engine::general_purpose::STANDARD
                        .decode(metadata)
                        .map_err(|e| bad(format!("metadata of partition {partition}: {e}")))?;
                    (
                        partition,
                        Committed {
                            offset,
                            metadata: Bytes::from(metadata),
                        },
                    )
                }
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn names_are_safe_and_reversible() {
        assert_eq!(stream_name("events", 3), "RUNNEL_events_3");
        assert_eq!(stream_name("a.b_c", 0), "RUNNEL_a_db__c_0");
        assert_eq!(subject("a.b", 1), "runnel.a_db.1");
        assert_eq!(offsets_key("g.1", "t"), "runnel.meta.offsets.g_d1.t");
        assert_eq!(topic_key("a.b"), "runnel.meta.topics.a_db");
        assert_ne!(stream_name("a.b", 0), stream_name("a_db", 0));
    }

    #[test]
    fn commits_round_trip_with_metadata_and_old_ones_still_parse() {
        let offsets = BTreeMap::from([
            (0, Committed::offset(7)),
            (
                3,
                Committed {
                    offset: 9,
                    metadata: Bytes::from_static(b"\x00checkpoint"),
                },
            ),
        ]);
        let encoded = encode_offsets(&offsets).unwrap();
        assert_eq!(parse_offsets("g", &encoded).unwrap(), offsets);
        assert_eq!(
            parse_offsets("g", br#"{"0":5,"2":6}"#).unwrap(),
            BTreeMap::from([(0, Committed::offset(5)), (2, Committed::offset(6))])
        );
        assert!(parse_offsets("g", br#"{"0":{"offset":1,"metadata":"!!"}}"#).is_err());
    }

    proptest! {
        #[test]
        fn group_keys_round_trip(group in "[a-zA-Z0-9._-]{1,40}", topic in "[a-zA-Z0-9._-]{1,40}") {
            let key = (group, topic);
            prop_assert_eq!(parse_group_key(&group_key(&key)), Some(key));
        }

        #[test]
        fn encoding_round_trips_without_dots(name in "[a-zA-Z0-9._-]{1,40}") {
            let encoded = encode(&name);
            prop_assert!(!encoded.contains('.'));
            prop_assert_eq!(decode(&encoded), name);
        }
    }
}
