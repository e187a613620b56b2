//! Fault-tolerant message logging between receiving messages and delivering them
//! downstream: what the collector uses so that nothing it acknowledged is lost when it
//! crashes, the broker is away, or the disk fills up.
//!
//! A [`MessageLog`] takes [`Submission`]s — messages for one or more [`Destination`]s (a
//! topic's partition) — and delivers them, in order per destination, to a [`Downstream`]
//! (the broker). Where it logs them depends on the [`Mode`]:
//!
//! | mode | logged | delivery starts | a `Logged` ack waits for |
//! |---|---|---|---|
//! | [`Mode::None`] | never (memory only) | at once | — (refused) |
//! | [`Mode::Rbml`] | on arrival (`Received`) | once the entry is durable | its group commit |
//! | [`Mode::Sbml`] | just before sending (`Sent`) | once the entry is durable | the send's log write |
//! | [`Mode::Hml`] | on arrival (`Received`) | at once, while the write completes | its group commit |
//!
//! In every mode an entry stays in the log until the downstream acknowledged it, and is
//! replayed after a crash: receiver-based logging replays what was received but not yet
//! processed, sender-based logging what was sent but not yet acknowledged, and the hybrid
//! both, from one store.
//!
//! **Sharding.** Each destination belongs to one of N shards (by a hash of topic and
//! partition), so its messages keep their order. A shard has a writer thread that owns its
//! segment files, takes everything queued since its last write as one group (one vectored
//! write — group commit), and a syncer thread that fsyncs behind it, so that the next
//! group is written while the last one is being synced. The messages are not copied on
//! the way to the file: an entry merged from several submissions is written as their
//! chunks (its frame's checksum computed over them), and copied once, when the delivery
//! task joins a batch of several chunks for the downstream, into a buffer reused from
//! call to call. A delivery task per shard sends
//! one call at a time downstream, taking everything ready. Submitters never wait on a
//! disk: a submission is queued (or refused when the log is full), and the caller awaits
//! the [`AckLevel`] it asked for.
//!
//! **Idempotence.** Each entry carries a producer id (chosen afresh every time the log is
//! opened) and the sequence number of its first message for its destination. A delivery
//! is a run of whole entries; after a crash, replayed entries are sent one per batch under
//! their original producer id and sequence, so a downstream that remembers producers (the
//! broker) recognises what it already stored, and nothing is stored twice.
//!
//! **Bounds.** Every message not yet acknowledged downstream is held in memory for
//! delivery and counted against `max_bytes`; a submission that does not fit is refused
//! with [`Error::Full`], and after a failed write (a full disk) with [`Error::DiskFull`]
//! until the log can write again. Outside that budget, each delivery task keeps one
//! buffer for joining batches, as large as the largest call it made (at most
//! `max_call_bytes` and one entry).

mod forward;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
mod record;
mod segment;
mod shard;

use bytes::Bytes;
use runnel_log::FsyncPolicy;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::oneshot;

pub use forward::{Batch, DeliveryError, Downstream, Placement};

/// Where, relative to delivery, messages are logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// No log: messages live in memory until delivered. A crash loses what was accepted
    /// and not yet delivered.
    None,
    /// Receiver-based: logged as they arrive, delivered once durable.
    Rbml,
    /// Sender-based: logged as they are about to be sent, released when acknowledged.
    Sbml,
    /// Hybrid: logged as they arrive while delivery goes on; acks wait for what was asked.
    #[default]
    Hml,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::None => "none",
            Mode::Rbml => "rbml",
            Mode::Sbml => "sbml",
            Mode::Hml => "hml",
        })
    }
}

impl std::str::FromStr for Mode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "none" => Ok(Mode::None),
            "rbml" => Ok(Mode::Rbml),
            "sbml" => Ok(Mode::Sbml),
            "hml" => Ok(Mode::Hml),
            other => Err(format!(
                "{other:?} is not a mode: use none, rbml, sbml or hml"
            )),
        }
    }
}

/// How far a submission must get before its caller is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum AckLevel {
    /// Queued in memory.
    Accepted,
    /// Durable in the log (as the fsync policy defines), or already delivered.
    Logged,
    /// Acknowledged by the downstream.
    Stored,
}

/// How a [`MessageLog`] runs.
#[derive(Debug, Clone)]
pub struct LogConfig {
    /// Where messages are logged.
    pub mode: Mode,
    /// When log writes are forced to disk: `Always` fsyncs each group commit before its
    /// `Logged` acks, an interval fsyncs at most that often (acks wait for it), `Never`
    /// acks once written.
    pub fsync: FsyncPolicy,
    /// Writer shards, each with its own files, threads and delivery task (at least 1).
    pub shards: usize,
    /// The most bytes of messages not yet delivered (in memory and in the log).
    pub max_bytes: u64,
    /// A segment is sealed once it is this large.
    pub segment_bytes: u64,
    /// The most message bytes in one entry, and in one batch sent downstream.
    pub max_batch_bytes: usize,
    /// The most messages in one entry, and in one batch sent downstream.
    pub max_batch_messages: u32,
    /// The most message bytes in one call downstream.
    pub max_call_bytes: usize,
    /// How long one call downstream may take before it is tried again.
    pub call_timeout: Duration,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            mode: Mode::Hml,
            fsync: FsyncPolicy::Always,
            shards: std::thread::available_parallelism().map_or(1, |n| n.get()),
            max_bytes: 256 * 1024 * 1024,
            segment_bytes: 16 * 1024 * 1024,
            max_batch_bytes: 1024 * 1024,
            max_batch_messages: 10_000,
            max_call_bytes: 2 * 1024 * 1024,
            call_timeout: Duration::from_secs(10),
        }
    }
}

/// A topic's partition: the unit of ordering.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Destination {
    /// The topic.
    pub topic: Arc<str>,
    /// The partition.
    pub partition: u32,
}

/// Messages for one destination: `count` of them, self-delimiting, back to back in `body`
/// (so that two bodies for one destination concatenate into one).
#[derive(Debug, Clone)]
pub struct Part {
    /// Where the messages go.
    pub destination: Destination,
    /// The messages.
    pub body: Bytes,
    /// How many there are (at least 1).
    pub count: u32,
}

/// W3C trace-context headers of the call that submitted something, so that its delivery
/// continues that trace.
pub type TraceHeaders = Arc<HashMap<String, String>>;

/// Messages to log and deliver.
#[derive(Debug, Clone)]
pub struct Submission {
    /// The messages, by destination.
    pub parts: Vec<Part>,
    /// When to answer.
    pub level: AckLevel,
    /// The submitting call's trace context.
    pub trace: Option<TraceHeaders>,
}

/// Messages of one destination as logged and delivered.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Entry {
    /// Consecutive within a shard.
    pub id: u64,
    /// Where the messages go.
    pub destination: Destination,
    /// The producer the log was when it wrote the entry.
    pub producer_id: u64,
    /// The sequence number of the first message, per producer and destination.
    pub base_sequence: u64,
    /// Messages in `body`.
    pub count: u32,
    /// The messages, as the chunks the submissions brought them in.
    pub body: Body,
}

/// An entry's messages: the chunks of the submissions merged into it, in order, kept as
/// they came. They reach the segment file as parts of one vectored write (the frame's
/// checksum is computed over the parts, so the bytes on disk are those of the chunks
/// concatenated), and are copied at most once, into the batch delivered downstream.
#[derive(Debug, Clone, Default)]
pub(crate) struct Body {
    /// One `Bytes` for a single chunk, so that the common entry clones without allocating.
    chunks: BodyChunks,
    len: usize,
}

#[derive(Debug, Clone)]
enum BodyChunks {
    One(Bytes),
    Many(Arc<[Bytes]>),
}

impl Default for BodyChunks {
    fn default() -> Self {
        BodyChunks::One(Bytes::new())
    }
}

impl Body {
    /// The chunks, in order.
    pub(crate) fn from_chunks(mut chunks: Vec<Bytes>) -> Body {
        let len = chunks.iter().map(Bytes::len).sum();
        let chunks = if chunks.len() == 1 {
            BodyChunks::One(chunks.pop().unwrap_or_default())
        } else {
            BodyChunks::Many(chunks.into())
        };
        Body { chunks, len }
    }

    /// The chunks, in order; their concatenation is the messages.
    pub(crate) fn chunks(&self) -> &[Bytes] {
        match &self.chunks {
            BodyChunks::One(chunk) => std::slice::from_ref(chunk),
            BodyChunks::Many(chunks) => chunks,
        }
    }

    /// Bytes of messages.
    pub(crate) fn len(&self) -> usize {
        self.len
    }
}

impl From<Bytes> for Body {
    fn from(chunk: Bytes) -> Body {
        Body {
            len: chunk.len(),
            chunks: BodyChunks::One(chunk),
        }
    }
}

/// Two bodies are equal when they hold the same bytes, however these are chunked.
impl PartialEq for Body {
    fn eq(&self, other: &Body) -> bool {
        let bytes = |body: &Body| {
            body.chunks()
                .iter()
                .flat_map(|chunk| chunk.iter().copied())
                .collect::<Vec<u8>>()
        };
        self.len == other.len && bytes(self) == bytes(other)
    }
}

/// What can go wrong.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Accepting the submission would hold more than `max_bytes` undelivered.
    #[error("the message log is full ({max_bytes} bytes undelivered); retry later")]
    Full {
        /// The bound.
        max_bytes: u64,
    },
    /// The last write failed (the disk is full, or refused it); nothing more is accepted
    /// until a write succeeds again.
    #[error("the message log cannot write: {0}; retry later")]
    DiskFull(String),
    /// An fsync of the log failed. What it covered may not be on disk even if a later
    /// fsync succeeds (the kernel may drop the dirty pages and clear the error), so the log
    /// accepts nothing more — and never says `Logged` again — until it is reopened.
    #[error(
        "the message log could not make its writes durable ({0}); it accepts nothing until \
         it is reopened (restart the collector)"
    )]
    SyncFailed(String),
    /// `Logged` was asked of a log in [`Mode::None`].
    #[error("ack level LOGGED needs a message log (mode rbml, sbml or hml); this one is mode none")]
    NotLogging,
    /// The submission is malformed.
    #[error("{0}")]
    Invalid(String),
    /// The log is closing.
    #[error("the message log is closing")]
    Closed,
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What failed.
        source: runnel_log::Error,
    },
    /// A segment holds a frame that checks out but is not a record.
    #[error("{} is corrupt: {reason}", path.display())]
    Corrupt {
        /// The segment.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A frame that was fsync'd does not check out: damage (a flipped bit, a bad sector, a
    /// file cut by hand), not the torn tail of a crash. Nothing was cut off; the log does
    /// not open until an operator decides (see "A damaged message log" in
    /// docs/collector.md).
    #[error(
        "{} is damaged at byte {position}, inside what was fsync'd: not a torn tail, so nothing was cut off (see \"A damaged message log\" in docs/collector.md)",
        path.display()
    )]
    Damaged {
        /// The segment.
        path: PathBuf,
        /// Where the first bad frame starts.
        position: u64,
    },
    /// Entry ids do not run on: a segment is missing or was cut short.
    #[error("{}: ids jump from {expected} to {found}: a segment is missing or damaged", path.display())]
    Gap {
        /// The segment after the gap.
        path: PathBuf,
        /// The id that should have come next.
        expected: u64,
        /// The id found.
        found: u64,
    },
}

/// The bytes held undelivered, and whether writes are failing.
#[derive(Debug)]
pub(crate) struct Budget {
    used: AtomicU64,
    max: u64,
    failing: Mutex<Option<String>>,
    is_failing: AtomicBool,
    /// Set for good by a failed fsync: see [`Error::SyncFailed`].
    sync_failed: Mutex<Option<String>>,
}

impl Budget {
    fn new(max: u64) -> Budget {
        Budget {
            used: AtomicU64::new(0),
            max,
            failing: Mutex::new(None),
            is_failing: AtomicBool::new(false),
            sync_failed: Mutex::new(None),
        }
    }

    fn try_reserve(&self, bytes: u64) -> Result<(), Error> {
        if self.is_failing.load(Ordering::Acquire) {
            if let Some(reason) = self.sync_failure() {
                return Err(Error::SyncFailed(reason));
            }
            let reason = self
                .failing
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
                .unwrap_or_default();
            return Err(Error::DiskFull(reason));
        }
        let mut used = self.used.load(Ordering::Relaxed);
        loop {
            if used + bytes > self.max {
                return Err(Error::Full {
                    max_bytes: self.max,
                });
            }
            match self.used.compare_exchange_weak(
                used,
                used + bytes,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Ok(()),
                Err(now) => used = now,
            }
        }
    }

    /// Counts bytes that are held whatever the bound (recovered entries).
    pub(crate) fn force(&self, bytes: u64) {
        self.used.fetch_add(bytes, Ordering::AcqRel);
    }

    pub(crate) fn release(&self, bytes: u64) {
        let before = self.used.fetch_sub(bytes, Ordering::AcqRel);
        debug_assert!(before >= bytes, "released more than was reserved");
    }

    pub(crate) fn used(&self) -> u64 {
        self.used.load(Ordering::Acquire)
    }

    /// Whether writes fail and may succeed again: the writer then tries now and then. (A
    /// failed fsync is not retried: only reopening the log clears it.)
    pub(crate) fn writes_failing(&self) -> bool {
        self.is_failing.load(Ordering::Acquire) && self.sync_failure().is_none()
    }

    /// Why an fsync failed, if one did: the log refuses everything until reopened.
    pub(crate) fn sync_failure(&self) -> Option<String> {
        self.sync_failed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// An fsync failed: refuse submissions for good (until the log is reopened).
    pub(crate) fn set_sync_failed(&self, reason: String) {
        let mut sync_failed = self.sync_failed.lock().unwrap_or_else(|e| e.into_inner());
        if sync_failed.is_none() {
            tracing::error!(
                error = %reason,
                "message log fsync failed: refusing submissions until the log is reopened"
            );
            metrics::counter!("runnel_msglog_sync_failures_total").increment(1);
        }
        *sync_failed = Some(reason.clone());
        drop(sync_failed);
        *self.failing.lock().unwrap_or_else(|e| e.into_inner()) = Some(reason);
        self.is_failing.store(true, Ordering::Release);
    }

    /// Writes fail: refuse submissions until one succeeds (a failed fsync stays failed).
    pub(crate) fn set_failing(&self, reason: Option<String>) {
        if self.sync_failure().is_some() {
            return;
        }
        let failing = reason.is_some();
        *self.failing.lock().unwrap_or_else(|e| e.into_inner()) = reason;
        if self.is_failing.swap(failing, Ordering::AcqRel) != failing {
            if failing {
                tracing::error!("message log writes fail: refusing submissions until one succeeds");
            } else {
                tracing::info!("message log writes succeed again: accepting submissions");
            }
        }
    }
}

/// Where a `Stored` submission's parts ended up: filled in by the delivery tasks.
#[derive(Debug)]
pub(crate) struct StoredTicket {
    remaining: AtomicUsize,
    offsets: Mutex<Vec<Option<u64>>>,
    done: Mutex<Option<oneshot::Sender<Vec<Option<u64>>>>>,
}

impl StoredTicket {
    /// Records the downstream offset of a part's first message.
    pub(crate) fn part_done(&self, part: usize, offset: Option<u64>) {
        {
            let mut offsets = self.offsets.lock().unwrap_or_else(|e| e.into_inner());
            offsets[part] = offset;
        }
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            let offsets =
                std::mem::take(&mut *self.offsets.lock().unwrap_or_else(|e| e.into_inner()));
            if let Some(done) = self.done.lock().unwrap_or_else(|e| e.into_inner()).take() {
                let _ = done.send(offsets);
            }
        }
    }
}

/// A `Stored` waiter for one part inside an entry.
#[derive(Debug, Clone)]
pub(crate) struct PartWaiter {
    pub(crate) ticket: Arc<StoredTicket>,
    /// The part's index in its submission.
    pub(crate) part: usize,
    /// Messages in the entry before the part's first.
    pub(crate) offset: u32,
}

/// Answers `Logged` waiters.
pub(crate) type LoggedSender = oneshot::Sender<Result<(), Error>>;

/// A submission's promise: await it for the level it asked for.
#[derive(Debug)]
pub struct Ticket {
    level: AckLevel,
    logged: Vec<oneshot::Receiver<Result<(), Error>>>,
    stored: Option<oneshot::Receiver<Vec<Option<u64>>>>,
}

impl Ticket {
    /// Resolves once the submission reached its level. At `Stored`, the downstream offset
    /// of each part's first message, in submission order (`None` for a part the downstream
    /// had already stored and could not place again); otherwise `None`.
    pub async fn wait(self) -> Result<Option<Vec<Option<u64>>>, Error> {
        match self.level {
            AckLevel::Accepted => Ok(None),
            AckLevel::Logged => {
                for logged in self.logged {
                    logged.await.map_err(|_| Error::Closed)??;
                }
                Ok(None)
            }
            AckLevel::Stored => match self.stored {
                Some(stored) => Ok(Some(stored.await.map_err(|_| Error::Closed)?)),
                None => Ok(Some(Vec::new())),
            },
        }
    }
}

/// What opening the log found.
#[derive(Debug, Clone, Copy, Default)]
pub struct Recovery {
    /// Entries replayed (not yet acknowledged downstream when the log last stopped).
    pub entries: u64,
    /// Their messages.
    pub messages: u64,
    /// Bytes cut from torn tails.
    pub truncated_bytes: u64,
}

/// Counters for metrics and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Bytes of messages not yet delivered.
    pub pending_bytes: u64,
    /// Bytes in segment files.
    pub disk_bytes: u64,
    /// Segment files.
    pub segments: u64,
}

/// The fault-tolerant message log: shards, their writer and syncer threads, and their
/// delivery tasks.
pub struct MessageLog {
    config: LogConfig,
    shards: Vec<shard::ShardHandle>,
    budget: Arc<Budget>,
    closed: AtomicBool,
}

impl fmt::Debug for MessageLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MessageLog")
            .field("mode", &self.config.mode)
            .field("shards", &self.shards.len())
            .finish_non_exhaustive()
    }
}

/// The file in the log directory that records the shard count, which must not change
/// while entries are pending (a destination's shard would move and its order with it).
const SHARDS_FILE: &str = "shards";
const SHARDS_MAGIC: [u8; 8] = *b"RNLMSGS1";

impl MessageLog {
    /// Opens the log in `dir` (unused in [`Mode::None`]), replays what it holds, and starts
    /// delivering to `downstream`. Must be called inside a Tokio runtime.
    pub fn open<D: Downstream>(
        mut config: LogConfig,
        dir: &Path,
        downstream: D,
    ) -> Result<(MessageLog, Recovery), Error> {
        if config.shards == 0 {
            return Err(Error::Invalid("shards must be at least 1".into()));
        }
        if config.mode != Mode::None {
            config.shards = Self::shard_count(dir, config.shards)?;
        }
        let budget = Arc::new(Budget::new(config.max_bytes));
        let downstream = Arc::new(downstream);
        let mut recovery = Recovery::default();
        let mut shards = Vec::with_capacity(config.shards);
        for index in 0..config.shards {
            let shard_dir = dir.join(format!("shard-{index:02}"));
            let (handle, found) = shard::start(
                index,
                &config,
                (config.mode != Mode::None).then_some(shard_dir.as_path()),
                Arc::clone(&budget),
                Arc::clone(&downstream),
            )?;
            recovery.entries += found.entries;
            recovery.messages += found.messages;
            recovery.truncated_bytes += found.truncated_bytes;
            shards.push(handle);
        }
        if recovery.entries > 0 {
            tracing::info!(
                entries = recovery.entries,
                messages = recovery.messages,
                "replaying what was not acknowledged before the last stop"
            );
        }
        Ok((
            MessageLog {
                config,
                shards,
                budget,
                closed: AtomicBool::new(false),
            },
            recovery,
        ))
    }

    /// The shard count recorded in `dir`, or `wanted` (recorded now) for a new log.
    fn shard_count(dir: &Path, wanted: usize) -> Result<usize, Error> {
        std::fs::create_dir_all(dir).map_err(|e| Error::Io {
            path: dir.to_owned(),
            source: e.into(),
        })?;
        let path = dir.join(SHARDS_FILE);
        let io = |source| Error::Io {
            path: path.clone(),
            source,
        };
        match runnel_log::read_atomic(&path, SHARDS_MAGIC).map_err(io)? {
            Some(bytes) => {
                let text = String::from_utf8_lossy(&bytes);
                let found: usize = text.trim().parse().map_err(|_| Error::Corrupt {
                    path: path.clone(),
                    reason: format!("{text:?} is not a shard count"),
                })?;
                if found != wanted {
                    tracing::warn!(
                        found,
                        wanted,
                        "keeping the shard count the log was created with"
                    );
                }
                Ok(found.max(1))
            }
            None => {
                runnel_log::write_atomic(&path, SHARDS_MAGIC, wanted.to_string().as_bytes())
                    .map_err(io)?;
                Ok(wanted)
            }
        }
    }

    /// The mode.
    pub fn mode(&self) -> Mode {
        self.config.mode
    }

    /// The shard a destination belongs to.
    pub fn shard_of(&self, destination: &Destination) -> usize {
        shard_of(destination, self.shards.len())
    }

    /// Queues a submission, or refuses it whole: [`Error::Full`] or [`Error::DiskFull`]
    /// when it does not fit, [`Error::NotLogging`] for `Logged` without a log. Never waits.
    pub fn submit(&self, submission: Submission) -> Result<Ticket, Error> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::Closed);
        }
        let Submission {
            parts,
            level,
            trace,
        } = submission;
        if level == AckLevel::Logged && self.config.mode == Mode::None {
            return Err(Error::NotLogging);
        }
        if parts.is_empty() {
            return Err(Error::Invalid(
                "a submission needs at least one part".into(),
            ));
        }
        let mut per_shard: Vec<Vec<(usize, Part)>> = vec![Vec::new(); self.shards.len()];
        let mut reserved = vec![0u64; self.shards.len()];
        for (index, part) in parts.into_iter().enumerate() {
            if part.count == 0 || part.body.is_empty() {
                return Err(Error::Invalid(format!("part {index} holds no messages")));
            }
            if part.destination.topic.is_empty()
                || part.destination.topic.len() > record::MAX_TOPIC_LEN
            {
                return Err(Error::Invalid(format!(
                    "part {index}: a topic needs 1 to {} bytes",
                    record::MAX_TOPIC_LEN
                )));
            }
            let shard = self.shard_of(&part.destination);
            reserved[shard] += record::entry_frame_len(&part.destination.topic, part.body.len());
            per_shard[shard].push((index, part));
        }
        let total: u64 = reserved.iter().sum();
        self.budget.try_reserve(total)?;
        let parts_count: usize = per_shard.iter().map(Vec::len).sum();
        let (stored, stored_rx) = if level == AckLevel::Stored {
            let (tx, rx) = oneshot::channel();
            let ticket = Arc::new(StoredTicket {
                remaining: AtomicUsize::new(parts_count),
                offsets: Mutex::new(vec![None; parts_count]),
                done: Mutex::new(Some(tx)),
            });
            (Some(ticket), Some(rx))
        } else {
            (None, None)
        };
        let mut logged = Vec::new();
        for (index, parts) in per_shard.into_iter().enumerate() {
            if parts.is_empty() {
                continue;
            }
            let logged_tx = if level == AckLevel::Logged {
                let (tx, rx) = oneshot::channel();
                logged.push(rx);
                Some(tx)
            } else {
                None
            };
            let queued = self.shards[index].submit(shard::ShardSubmission {
                parts,
                logged: logged_tx,
                stored: stored.clone(),
                trace: trace.clone(),
                reserved: reserved[index],
            });
            if !queued {
                // The shard stopped between the check above and now: only at close.
                self.budget.release(reserved[index]);
                return Err(Error::Closed);
            }
        }
        Ok(Ticket {
            level,
            logged,
            stored: stored_rx,
        })
    }

    /// Counters.
    pub fn stats(&self) -> Stats {
        let mut stats = Stats {
            pending_bytes: self.budget.used(),
            ..Stats::default()
        };
        for shard in &self.shards {
            let (bytes, segments) = shard.disk();
            stats.disk_bytes += bytes;
            stats.segments += segments;
        }
        stats
    }

    /// Stops taking submissions, logs and delivers what was queued — giving delivery at
    /// most `grace` — and stops the threads after a final fsync. What is still undelivered
    /// then stays in the log for the next start (in [`Mode::None`], it is lost and said so).
    pub async fn close(&self, grace: Duration) {
        self.closed.store(true, Ordering::Release);
        let deadline = tokio::time::Instant::now() + grace;
        for shard in &self.shards {
            shard.close(deadline);
        }
        for shard in &self.shards {
            shard.stopped().await;
        }
    }
}

/// The shard of a destination among `shards`.
pub(crate) fn shard_of(destination: &Destination, shards: usize) -> usize {
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    hasher.update(destination.topic.as_bytes());
    hasher.update(&destination.partition.to_le_bytes());
    (hasher.digest() % shards as u64) as usize
}

impl Drop for MessageLog {
    /// A log dropped without [`MessageLog::close`] stops at once: its threads and tasks
    /// end, and what was not delivered stays in the log.
    fn drop(&mut self) {
        if !self.closed.swap(true, Ordering::AcqRel) {
            let now = tokio::time::Instant::now();
            for shard in &self.shards {
                shard.close(now);
            }
        }
    }
}
