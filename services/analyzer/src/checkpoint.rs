//! Checkpoints, held by the broker: a task — a query stage's input partition — saves its
//! whole state, and the offset of the next record that state does not reflect, as records
//! of an internal topic, then commits that offset to its consumer group with a small
//! [`Handle`] to those records as the commit's metadata.
//!
//! ```text
//! input topic, partition p ──► task ──state──► _analyzer.<query>.<stage>.checkpoints, partition p
//!                                │                 chunk 0 … chunk n-1  (one checkpoint)
//!                                └──CommitOffsets(p, offset = state.next_offset,
//!                                                 metadata = {first_offset, chunks, bytes, crc32c})
//! ```
//!
//! **One source of truth.** The commit is the checkpoint: the broker stores the offset and
//! the handle as one record, atomically, fenced by the group's generation, and hands both
//! to whichever member is assigned the partition next (`Assignment.starts`). A new owner
//! fetches the records the handle names, checks them (checksum, query, stage, partition,
//! the query's definition, and that the state's offset is the committed one) and reads on
//! from exactly that offset. Records of a checkpoint whose commit never happened (a crash
//! in between, a fenced member) are never pointed at: they are garbage, aged out.
//!
//! **Order.** A checkpoint is written only after everything the task produced from the
//! records before its offset — results, re-keyed events, late events — is acknowledged
//! downstream, so that a crash at any moment re-reads at most what followed the last
//! commit and produces the same again, which the store (and the keyed stage) takes as a
//! replay.
//!
//! **Retention.** The broker has no compaction, so the checkpoint topic is created with a
//! time retention (`checkpoint_retention`, default 7 days) and a size retention per
//! partition (`checkpoint_retention_bytes`, default 256 MiB, which bounds what a busy
//! partition's checkpoints take), and every task checkpoints again at least every
//! `checkpoint_refresh` (default 1 h) even when its partition is idle: the records its
//! group's commit points at are always far younger than the retention and among the newest
//! of their partition (the broker never deletes the segment being written).
//!
//! The state is JSON behind a magic and version (`RNLCKPT3`): readable in an incident,
//! and exact for floating-point sums (serde_json's `float_roundtrip`). A state larger than
//! one event may be is split into chunks, sent in as few batches as the broker takes.

use crate::error::AnalyzerError;
use crate::runner::Backoff;
use crate::task::TaskState;
use runnel_client::{ClientError, Producer, retriable};
use runnel_proto::v1::broker_client::BrokerClient;
use runnel_proto::v1::{Event, FetchRequest};
use runnel_security::Peer;
use runnel_server::Shutdown;
use serde::{Deserialize, Serialize};
use std::time::Duration;
use tonic::Code;

/// The magic in front of a checkpoint's JSON; the trailing digit is the content's version.
const MAGIC: [u8; 8] = *b"RNLCKPT3";

/// The version of [`Handle`]'s encoding.
const HANDLE_VERSION: u32 = 1;

/// The largest checkpoint a handle may describe: bounds what a restore holds in memory
/// before the checksum says whether the bytes are any good.
const MAX_CHECKPOINT_BYTES: u64 = 1 << 30;

/// The event type of a checkpoint's chunks.
const CHUNK_TYPE: &str = "analyzer.checkpoint";

/// Which input a task reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Stage {
    /// The query's topic.
    Source,
    /// A re-keyed query's internal topic.
    Keyed,
}

impl Stage {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Stage::Source => "source",
            Stage::Keyed => "keyed",
        }
    }
}

/// What a checkpoint's bytes hold.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Checkpoint {
    query: String,
    stage: Stage,
    partition: u32,
    /// The query definition the state was built with.
    fingerprint: String,
    state: TaskState,
}

/// Where one checkpoint's records are: the metadata committed with the task's offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Handle {
    /// [`HANDLE_VERSION`].
    v: u32,
    /// The offset of the first chunk in the checkpoint topic's partition; the others
    /// follow it.
    first_offset: u64,
    /// How many chunks.
    chunks: u32,
    /// The checkpoint's size, all chunks together.
    bytes: u64,
    /// CRC-32C of those bytes.
    crc32c: u32,
}

impl Handle {
    /// The bytes committed as the offset's metadata (a few dozen).
    pub(crate) fn encode(&self) -> Vec<u8> {
        // A struct of integers always serialises.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// A handle from commit metadata; the error says what is wrong with it.
    pub(crate) fn decode(metadata: &[u8]) -> Result<Handle, String> {
        let handle: Handle = serde_json::from_slice(metadata)
            .map_err(|e| format!("the commit's metadata is not a checkpoint handle: {e}"))?;
        if handle.v != HANDLE_VERSION {
            return Err(format!(
                "the checkpoint handle has version {}, this analyzer reads {HANDLE_VERSION}",
                handle.v
            ));
        }
        if handle.chunks == 0
            || handle.bytes > MAX_CHECKPOINT_BYTES
            || u64::from(handle.chunks) > handle.bytes
        {
            return Err(format!(
                "the checkpoint handle is inconsistent: {} chunks, {} bytes",
                handle.chunks, handle.bytes
            ));
        }
        Ok(handle)
    }

    /// The offset of the first chunk.
    pub(crate) fn first_offset(&self) -> u64 {
        self.first_offset
    }
}

/// Why a checkpoint was not saved.
#[derive(Debug)]
pub(crate) enum SaveError {
    /// The broker refused the write: this member no longer owns the partition.
    Fenced(tonic::Status),
    /// Anything else (the broker unreachable, chunks interleaved with other writes): the
    /// next checkpoint tries again.
    Failed(String),
}

/// A query stage's checkpoints.
#[derive(Debug, Clone)]
pub(crate) struct Checkpoints {
    query: String,
    stage: Stage,
    fingerprint: String,
    /// The payload of one chunk.
    chunk_bytes: usize,
    /// The payload of one batch of chunks (what the broker stores as one batch).
    batch_bytes: usize,
}

impl Checkpoints {
    /// `max_message` is the largest gRPC message (and broker batch) allowed.
    pub(crate) fn new(
        query: &str,
        stage: Stage,
        fingerprint: &str,
        max_message: usize,
    ) -> Checkpoints {
        // Headroom for the batch's and the request's framing.
        let batch_bytes = (max_message / 2).max(1024);
        Checkpoints {
            query: query.to_owned(),
            stage,
            fingerprint: fingerprint.to_owned(),
            chunk_bytes: batch_bytes.min(1 << 20),
            batch_bytes,
        }
    }

    /// The internal topic holding this stage's checkpoints (partition p: input partition
    /// p's).
    pub(crate) fn topic(&self) -> String {
        topic(&self.query, self.stage)
    }

    fn fail(&self, partition: u32, reason: impl Into<String>) -> AnalyzerError {
        AnalyzerError::Checkpoint {
            query: self.query.clone(),
            stage: self.stage.name(),
            partition,
            reason: reason.into(),
        }
    }

    /// The bytes of a checkpoint of `state`.
    pub(crate) fn encode(
        &self,
        partition: u32,
        state: TaskState,
    ) -> Result<Vec<u8>, AnalyzerError> {
        let checkpoint = Checkpoint {
            query: self.query.clone(),
            stage: self.stage,
            partition,
            fingerprint: self.fingerprint.clone(),
            state,
        };
        let mut bytes = MAGIC.to_vec();
        serde_json::to_writer(&mut bytes, &checkpoint)
            .map_err(|e| self.fail(partition, format!("it does not serialise: {e}")))?;
        Ok(bytes)
    }

    /// The checkpoint in `bytes` (from [`Checkpoints::encode`]), checked to belong here.
    fn decode(&self, partition: u32, bytes: &[u8]) -> Result<TaskState, AnalyzerError> {
        let json = bytes
            .strip_prefix(&MAGIC)
            .ok_or_else(|| self.fail(partition, "its records do not start with RNLCKPT3"))?;
        let checkpoint: Checkpoint = serde_json::from_slice(json)
            .map_err(|e| self.fail(partition, format!("it does not parse: {e}")))?;
        if checkpoint.query != self.query
            || checkpoint.stage != self.stage
            || checkpoint.partition != partition
        {
            return Err(self.fail(
                partition,
                format!(
                    "it belongs to query {:?}, stage {}, partition {}",
                    checkpoint.query,
                    checkpoint.stage.name(),
                    checkpoint.partition
                ),
            ));
        }
        if checkpoint.fingerprint != self.fingerprint {
            return Err(self.fail(
                partition,
                "the query's definition (topic, key, time, filter, value, window or aggregates) changed since it was taken",
            ));
        }
        Ok(checkpoint.state)
    }

    /// The events that carry `bytes` (one checkpoint of `partition`), and their CRC-32C.
    pub(crate) fn chunks(&self, partition: u32, bytes: &[u8]) -> (Vec<Event>, u32) {
        let count = bytes.len().div_ceil(self.chunk_bytes).max(1) as u32;
        let events = bytes
            .chunks(self.chunk_bytes)
            .enumerate()
            .map(|(i, chunk)| Event {
                id: chunk_id(&self.query, self.stage, partition, i as u32, count),
                source: "runnel-analyzer".into(),
                r#type: CHUNK_TYPE.into(),
                payload: bytes::Bytes::copy_from_slice(chunk),
                ..Event::default()
            })
            .collect();
        (events, crc32c::crc32c(bytes))
    }

    /// Writes `bytes` (one checkpoint of `partition`) to the checkpoint topic through
    /// `producer` (which carries this member's fence) and answers the handle to commit.
    pub(crate) async fn save(
        &self,
        producer: &mut Producer,
        partition: u32,
        bytes: &[u8],
    ) -> Result<Handle, SaveError> {
        let (events, crc32c) = self.chunks(partition, bytes);
        let per_batch = (self.batch_bytes / self.chunk_bytes).max(1);
        let mut first_offset = None;
        let mut next = 0;
        for batch in events.chunks(per_batch) {
            let ack = producer
                .send_to(partition, batch)
                .await
                .map_err(|error| match error {
                    ClientError::Broker(status) if status.code() == Code::FailedPrecondition => {
                        SaveError::Fenced(status)
                    }
                    other => SaveError::Failed(other.to_string()),
                })?;
            let first = *first_offset.get_or_insert(ack.base_offset);
            if ack.base_offset != first + next {
                return Err(SaveError::Failed(format!(
                    "the checkpoint's chunks landed apart (offset {} after {}); writing it again next time",
                    ack.base_offset,
                    first + next
                )));
            }
            next += batch.len() as u64;
        }
        Ok(Handle {
            v: HANDLE_VERSION,
            first_offset: first_offset.unwrap_or_default(),
            chunks: events.len() as u32,
            bytes: bytes.len() as u64,
            crc32c,
        })
    }

    /// The state `handle` points at in `partition`'s checkpoints. Retries while the broker
    /// is unreachable; `Ok(None)` if shutdown came first.
    pub(crate) async fn load(
        &self,
        broker: &BrokerClient<Peer>,
        partition: u32,
        handle: &Handle,
        shutdown: &Shutdown,
    ) -> Result<Option<TaskState>, AnalyzerError> {
        let mut bytes: Vec<u8> = Vec::with_capacity(handle.bytes.min(64 << 20) as usize);
        let mut offset = handle.first_offset;
        let end = handle.first_offset + u64::from(handle.chunks);
        let mut backoff = Backoff::new(Duration::from_secs(2));
        while offset < end {
            let request = FetchRequest {
                topic: self.topic(),
                partition,
                offset,
                max_records: (end - offset).min(1000) as u32,
                ..FetchRequest::default()
            };
            let fetched = match broker.clone().fetch(request).await {
                Ok(response) => response.into_inner(),
                Err(status) if retriable(status.code()) => {
                    tracing::warn!(query = %self.query, stage = self.stage.name(), partition, error = %status.message(), "cannot fetch a checkpoint; retrying");
                    if !backoff.wait(shutdown).await {
                        return Ok(None);
                    }
                    continue;
                }
                Err(status) => {
                    return Err(self.fail(
                        partition,
                        format!(
                            "its records at offset {offset} of {} cannot be read ({}: {}): retention deleted them, or the topic is gone",
                            self.topic(),
                            status.code(),
                            status.message()
                        ),
                    ));
                }
            };
            if fetched.records.is_empty() {
                return Err(self.fail(
                    partition,
                    format!(
                        "its records end at offset {} of {}, before the {} chunks its handle names",
                        fetched.end_offset,
                        self.topic(),
                        handle.chunks
                    ),
                ));
            }
            for record in fetched.records {
                if record.offset != offset || offset >= end {
                    break;
                }
                let index = (offset - handle.first_offset) as u32;
                let event = record.event.unwrap_or_default();
                let expected = chunk_id(&self.query, self.stage, partition, index, handle.chunks);
                if event.r#type != CHUNK_TYPE || event.id != expected {
                    return Err(self.fail(
                        partition,
                        format!(
                            "offset {offset} of {} holds {:?}, not chunk {expected:?}",
                            self.topic(),
                            event.id
                        ),
                    ));
                }
                if bytes.len() as u64 + event.payload.len() as u64 > handle.bytes {
                    return Err(self.fail(
                        partition,
                        format!(
                            "its chunks hold more than the {} bytes its handle names",
                            handle.bytes
                        ),
                    ));
                }
                bytes.extend_from_slice(&event.payload);
                offset += 1;
            }
        }
        if bytes.len() as u64 != handle.bytes || crc32c::crc32c(&bytes) != handle.crc32c {
            return Err(self.fail(
                partition,
                format!(
                    "its records at offsets {}..{end} of {} do not match its handle (size or CRC-32C)",
                    handle.first_offset,
                    self.topic()
                ),
            ));
        }
        self.decode(partition, &bytes).map(Some)
    }
}

/// The internal topic holding `query`'s `stage` checkpoints.
pub(crate) fn topic(query: &str, stage: Stage) -> String {
    format!("_analyzer.{query}.{}.checkpoints", stage.name())
}

/// The id of chunk `index` of `count` of a checkpoint.
fn chunk_id(query: &str, stage: Stage, partition: u32, index: u32, count: u32) -> String {
    format!("{query}/{}/{partition}/{index}/{count}", stage.name())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn a_handle_decodes_to_itself(first_offset in any::<u64>(), chunks in 1u32..10_000, extra in 0u64..(1 << 29), crc32c in any::<u32>()) {
            let handle = Handle { v: HANDLE_VERSION, first_offset, chunks, bytes: u64::from(chunks) + extra, crc32c };
            prop_assert_eq!(Handle::decode(&handle.encode()), Ok(handle));
        }

        #[test]
        fn garbage_is_refused_without_panicking(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            // Whatever it answers, it answers; a valid one must satisfy the invariants.
            if let Ok(handle) = Handle::decode(&bytes) {
                prop_assert!(handle.chunks > 0 && u64::from(handle.chunks) <= handle.bytes);
            }
        }

        #[test]
        fn mangled_handles_are_refused_or_consistent(first_offset in any::<u64>(), chunks in 1u32..100, cut in 0usize..80, byte in any::<u8>()) {
            let mut bytes = Handle { v: HANDLE_VERSION, first_offset, chunks, bytes: 1000, crc32c: 7 }.encode();
            let at = cut % bytes.len();
            bytes[at] = byte;
            if let Ok(handle) = Handle::decode(&bytes) {
                prop_assert!(handle.chunks > 0 && handle.bytes <= MAX_CHECKPOINT_BYTES);
            }
        }
    }

    #[test]
    fn handles_that_cannot_be_right_are_refused_with_the_reason() {
        let bad = |json: &str| Handle::decode(json.as_bytes()).unwrap_err();
        assert!(
            bad(r#"{"v":2,"first_offset":0,"chunks":1,"bytes":9,"crc32c":0}"#)
                .contains("version 2")
        );
        assert!(
            bad(r#"{"v":1,"first_offset":0,"chunks":0,"bytes":9,"crc32c":0}"#).contains("0 chunks")
        );
        assert!(
            bad(r#"{"v":1,"first_offset":0,"chunks":3,"bytes":2,"crc32c":0}"#)
                .contains("inconsistent")
        );
        assert!(
            bad(r#"{"v":1,"first_offset":0,"chunks":1,"bytes":9,"crc32c":0,"x":1}"#)
                .contains("not a checkpoint handle")
        );
        assert!(bad("").contains("not a checkpoint handle"));
    }

    #[test]
    fn a_checkpoint_is_checked_to_belong_to_its_query_stage_partition_and_definition() {
        let plan: crate::plan::Plan =
            toml::from_str::<crate::config::QueryConfig>("name = \"q\"\n")
                .unwrap()
                .compile(0)
                .unwrap();
        let task = crate::task::Task::new(&plan, 3, None, std::time::Instant::now());
        let ours = Checkpoints::new("q", Stage::Source, &plan.fingerprint, 4 << 20);
        let bytes = ours.encode(3, task.state()).unwrap();
        assert_eq!(ours.decode(3, &bytes).unwrap().next_offset, 0);
        let wrong = |checkpoints: &Checkpoints, partition: u32| {
            checkpoints
                .decode(partition, &bytes)
                .unwrap_err()
                .to_string()
        };
        assert!(wrong(&ours, 4).contains("partition 3"));
        let other_stage = Checkpoints::new("q", Stage::Keyed, &plan.fingerprint, 4 << 20);
        assert!(wrong(&other_stage, 3).contains("stage source"));
        let other_definition = Checkpoints::new("q", Stage::Source, "changed", 4 << 20);
        assert!(wrong(&other_definition, 3).contains("definition"));
        assert!(ours.decode(3, b"RNLCKPT2{}").is_err());
        assert!(ours.decode(3, &bytes[..bytes.len() - 1]).is_err());
    }
}
