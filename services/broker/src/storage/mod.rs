//! Where topics live: the one interface the gRPC service needs from a storage engine, the
//! batches and appends it speaks in, and the two engines behind it.
//!
//! Two engines implement [`Storage`] with the same semantics — dense per-partition
//! offsets from 0, batches idempotent per producer and sequence, retention from the front,
//! committed offsets per group — so the API and its tests do not change with the engine:
//!
//! - [`Embedded`]: this broker's own segmented log on local disk (the default);
//! - [`JetStream`](jetstream::JetStream): NATS JetStream, for deployments that
//!   outgrow one machine (replicated streams, any number of broker replicas in front).
//!
//! Consumer-group *membership* is not here: it is [`crate::groups`]' ledger (in the broker's
//! memory with the embedded engine, in JetStream with JetStream); only the committed
//! offsets are storage.

pub(crate) mod embedded;
pub(crate) mod jetstream;

pub(crate) use embedded::Embedded;

use crate::batch::StoredBatch;
use crate::error::{BrokerError, Result};
use crate::topic::RetentionOverride;
use bytes::Buf;
use bytes::Bytes;
use runnel_proto::Millis;
use runnel_proto::v1::{Compression, RecordChunk, TopicInfo};
use runnel_server::Shutdown;
use std::collections::BTreeMap;
use std::time::Duration;
use tokio::sync::mpsc;
use tonic::Status;

/// Chunks of a partition as a follower hands them on; an error ends the stream.
pub(crate) type Follow = mpsc::Receiver<std::result::Result<Followed, Status>>;

/// What a follower read: the records of `batches` from offset `from` on (the first batch
/// may start before it), in the stored form — decoded only for a reader that asks for
/// decoded records.
#[derive(Debug)]
pub(crate) struct Followed {
    pub(crate) from: u64,
    pub(crate) batches: Vec<StoredBatch>,
}

impl Followed {
    /// The offset after the last record.
    pub(crate) fn next_offset(&self) -> u64 {
        self.batches
            .last()
            .map_or(self.from, |b| b.header.next_offset())
    }

    /// The chunk a stream sends: stored batches as they are, or their records from `from`
    /// on decoded.
    pub(crate) fn into_chunk(
        self,
        partition: u32,
        generation: u64,
        stored: bool,
    ) -> std::result::Result<RecordChunk, Status> {
        if stored {
            return Ok(RecordChunk {
                partition,
                generation,
                first_offset: self.from,
                stored_batches: self.batches.into_iter().map(|b| b.stored).collect(),
                records: Vec::new(),
            });
        }
        let mut records = Vec::new();
        for batch in &self.batches {
            records.extend(
                batch
                    .records(partition, self.from, usize::MAX, usize::MAX)
                    .map_err(|reason| {
                        Status::from(BrokerError::Corrupt {
                            path: format!("partition {partition}").into(),
                            position: batch.header.base_offset,
                            reason: reason.to_string(),
                        })
                    })?,
            );
        }
        Ok(RecordChunk {
            partition,
            generation,
            first_offset: self.from,
            records,
            stored_batches: Vec::new(),
        })
    }
}

/// Chunks buffered between a follower and its reader.
pub(crate) const FOLLOW_BUFFER: usize = 16;

/// The most metadata one committed offset may carry.
pub(crate) const MAX_COMMIT_METADATA: usize = 64 * 1024;

/// A group's commit for one partition: the next offset to read and what the member stored
/// with it (a handle to its checkpointed state, say), written and replaced as one.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct Committed {
    pub(crate) offset: u64,
    pub(crate) metadata: Bytes,
}

impl Committed {
    /// An offset with no metadata.
    pub(crate) fn offset(offset: u64) -> Committed {
        Committed {
            offset,
            metadata: Bytes::new(),
        }
    }
}

/// How long a partition keeps its sealed segments; `None`: no limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Retention {
    pub(crate) max_age: Option<Duration>,
    pub(crate) max_bytes: Option<u64>,
}

/// A batch a producer sent, checked and ready to store.
#[derive(Debug, Clone)]
pub(crate) struct Incoming {
    pub(crate) compression: Compression,
    pub(crate) record_count: u32,
    pub(crate) records: Bytes,
    pub(crate) producer_id: u64,
    pub(crate) base_sequence: u64,
    /// Set when the producer asked for deduplication: each record's identity (its event's
    /// `(source, id)`, see [`runnel_proto::event_identity`]), in batch order. The producer
    /// id and sequence are then not used.
    pub(crate) identities: Option<Vec<u128>>,
}

impl Incoming {
    /// Splits the records body into its records' encoded events, without decoding them
    /// unless the body is compressed.
    pub(crate) fn split_records(&self, max_len: usize) -> Result<Vec<Bytes>> {
        let plain = match self.compression {
            Compression::None => self.records.clone(),
            compressed => {
                let events = runnel_proto::records::decode(compressed, &self.records, max_len)
                    .map_err(|e| BrokerError::InvalidArgument(e.to_string()))?;
                return Ok(events
                    .iter()
                    .map(|e| Bytes::from(prost::Message::encode_to_vec(e)))
                    .collect());
            }
        };
        let mut buf = plain;
        let mut out = Vec::with_capacity(self.record_count as usize);
        while buf.has_remaining() {
            let len = prost::decode_length_delimiter(&mut buf)
                .map_err(|e| BrokerError::InvalidArgument(e.to_string()))?;
            if len > buf.remaining() {
                return Err(BrokerError::InvalidArgument(
                    "a record runs past the end of the batch".into(),
                ));
            }
            out.push(buf.split_to(len));
        }
        Ok(out)
    }
}

/// What an append did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Appended {
    /// Stored at offsets `[base_offset, next_offset)` — or, when `scattered` is set (an
    /// engine that could not keep the batch together, or records recognised as retries of
    /// stored events, which keep their originals' offsets), at exactly those offsets.
    Stored {
        base_offset: u64,
        next_offset: u64,
        scattered: Option<Vec<u64>>,
        /// Records recognised as retries and not written.
        duplicates: u32,
    },
    /// A retry of a batch stored before at `base_offset`: nothing written.
    Duplicate { base_offset: u64 },
}

/// What a read found, with the partition's bounds at the time.
#[derive(Debug)]
pub(crate) struct Read {
    pub(crate) batches: Vec<StoredBatch>,
    pub(crate) start: u64,
    pub(crate) end: u64,
}

/// What the broker's service needs from a storage engine.
#[tonic::async_trait]
pub(crate) trait Storage: Send + Sync + std::fmt::Debug + 'static {
    /// Creates a topic; `AlreadyExists` if it exists.
    async fn create_topic(
        &self,
        name: &str,
        partitions: u32,
        retention: RetentionOverride,
    ) -> Result<TopicInfo>;
    /// A topic's partition count, or `None` if it does not exist.
    async fn partitions(&self, topic: &str) -> Result<Option<u32>>;
    /// Every topic, sorted by name.
    async fn list_topics(&self) -> Result<Vec<TopicInfo>>;
    /// One topic.
    async fn topic_info(&self, topic: &str) -> Result<TopicInfo>;
    /// Stores a batch (or recognises a retry), and makes it durable first if asked.
    async fn append(
        &self,
        topic: &str,
        partition: u32,
        batch: Incoming,
        durable: bool,
    ) -> Result<Appended>;
    /// The batches holding offsets from `from` on, about `max_bytes` of them.
    async fn read(&self, topic: &str, partition: u32, from: u64, max_bytes: usize) -> Result<Read>;
    /// The offset of the first record appended at or after `time`, or the end offset.
    async fn offset_for_time(&self, topic: &str, partition: u32, time: Millis) -> Result<u64>;
    /// The partition's first stored offset and its end offset.
    async fn bounds(&self, topic: &str, partition: u32) -> Result<(u64, u64)>;
    /// Follows a partition from `from`: its records now and as they come, until the
    /// receiver is dropped or `shutdown` fires. Records deleted by retention before they
    /// were read are skipped (and counted).
    async fn follow(
        &self,
        topic: &str,
        partition: u32,
        from: u64,
        max_bytes: usize,
        shutdown: Shutdown,
    ) -> Result<Follow>;
    /// Durably records a group's offsets (each with its metadata, replaced together) on a
    /// topic; returns them all after the commit.
    async fn commit(
        &self,
        group: &str,
        topic: &str,
        offsets: BTreeMap<u32, Committed>,
    ) -> Result<BTreeMap<u32, Committed>>;
    /// A group's committed offsets on a topic.
    async fn committed(&self, group: &str, topic: &str) -> Result<BTreeMap<u32, Committed>>;
    /// Every group with committed offsets on a topic (the offsets alone).
    async fn groups_of(&self, topic: &str) -> Result<BTreeMap<String, BTreeMap<u32, u64>>>;
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message as _;
    use runnel_proto::records;
    use runnel_proto::v1::Event;

    #[test]
    fn records_split_without_decoding() {
        let events: Vec<Event> = (0..3)
            .map(|i| Event {
                id: format!("e{i}"),
                ..Event::default()
            })
            .collect();
        let incoming = Incoming {
            compression: Compression::None,
            record_count: 3,
            records: records::encode(&events),
            producer_id: 0,
            base_sequence: 0,
            identities: None,
        };
        let split = incoming.split_records(usize::MAX).unwrap();
        let decoded: Vec<Event> = split
            .iter()
            .map(|b| Event::decode(b.clone()).unwrap())
            .collect();
        assert_eq!(decoded, events);
        let lz4 = Incoming {
            compression: Compression::Lz4,
            records: records::compress(Compression::Lz4, &records::encode(&events)),
            ..incoming
        };
        assert_eq!(lz4.split_records(1 << 20).unwrap(), split);
    }
}
