//! One shard: its inbox, its writer thread (groups submissions into entries and writes
//! them), its syncer thread (fsyncs behind the writer and answers `Logged` waiters), and
//! its delivery task (see `forward.rs`).
//!
//! ```text
//! submit ─► inbox ─► writer ──(HML: at once)──────────────────► delivery task ─► downstream
//!                      │ write                                   ▲
//!                      └──► syncer ─ fsync ─► Logged acks ───────┘ (RBML: after the fsync)
//! ```
//!
//! In SBML the writer hands entries over unwritten, and the delivery task sends them back
//! to be logged (as `Sent`) just before it sends them downstream.

use crate::forward::{self, Downstream, Outbound, ToForwarder};
use crate::record::{self, EntryKind};
use crate::segment::Segments;
use crate::{
    Body, Budget, Destination, Entry, Error, LogConfig, LoggedSender, Mode, Part, PartWaiter,
    StoredTicket, TraceHeaders,
};
use bytes::Bytes;
use runnel_log::{FsyncPolicy, SyncHandle};
use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, mpsc};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc as tokio_mpsc, oneshot, watch};

/// One shard's share of a submission.
#[derive(Debug)]
pub(crate) struct ShardSubmission {
    /// The parts, with their index in the whole submission.
    pub(crate) parts: Vec<(usize, Part)>,
    pub(crate) logged: Option<LoggedSender>,
    pub(crate) stored: Option<Arc<StoredTicket>>,
    pub(crate) trace: Option<TraceHeaders>,
    /// Budget bytes reserved for these parts.
    pub(crate) reserved: u64,
}

/// SBML: entries to log as `Sent` before they are sent.
#[derive(Debug)]
pub(crate) struct LogRequest {
    pub(crate) entries: Vec<Entry>,
    pub(crate) done: LoggedSender,
}

#[derive(Debug, Default)]
struct Inbox {
    submissions: VecDeque<ShardSubmission>,
    log_requests: VecDeque<LogRequest>,
    released: Option<u64>,
    /// No more submissions are taken.
    closing: bool,
    /// The delivery task is done: final fsync, then exit.
    stop: bool,
}

/// What the submitters, the writer and the delivery task share.
#[derive(Debug, Default)]
pub(crate) struct Shared {
    inbox: Mutex<Inbox>,
    wake: Condvar,
    disk_bytes: AtomicU64,
    segments: AtomicU64,
}

impl Shared {
    fn inbox(&self) -> std::sync::MutexGuard<'_, Inbox> {
        self.inbox.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// SBML: asks the writer to log entries.
    pub(crate) fn request_log(&self, request: LogRequest) {
        self.inbox().log_requests.push_back(request);
        self.wake.notify_one();
    }

    /// Every entry up to `through` was delivered.
    pub(crate) fn released(&self, through: u64) {
        let mut inbox = self.inbox();
        inbox.released = Some(inbox.released.map_or(through, |r| r.max(through)));
        drop(inbox);
        self.wake.notify_one();
    }

    /// The delivery task has finished: the writer may stop.
    pub(crate) fn stop(&self) {
        self.inbox().stop = true;
        self.wake.notify_one();
    }
}

/// What a shard's recovery found.
#[derive(Debug, Default)]
pub(crate) struct Found {
    pub(crate) entries: u64,
    pub(crate) messages: u64,
    pub(crate) truncated_bytes: u64,
}

/// The submitters' side of a shard.
#[derive(Debug)]
pub(crate) struct ShardHandle {
    shared: Arc<Shared>,
    deadline: watch::Sender<Option<tokio::time::Instant>>,
    stopped: Mutex<Option<oneshot::Receiver<()>>>,
}

impl ShardHandle {
    /// Queues a submission; false once the shard is closing.
    pub(crate) fn submit(&self, submission: ShardSubmission) -> bool {
        let mut inbox = self.shared.inbox();
        if inbox.closing {
            return false;
        }
        inbox.submissions.push_back(submission);
        drop(inbox);
        self.shared.wake.notify_one();
        true
    }

    /// Bytes and files on disk.
    pub(crate) fn disk(&self) -> (u64, u64) {
        (
            self.shared.disk_bytes.load(Ordering::Relaxed),
            self.shared.segments.load(Ordering::Relaxed),
        )
    }

    /// Starts closing: delivery may go on until `deadline`.
    pub(crate) fn close(&self, deadline: tokio::time::Instant) {
        let _ = self.deadline.send(Some(deadline));
        self.shared.inbox().closing = true;
        self.shared.wake.notify_one();
    }

    /// Resolves once the writer thread has made its final fsync and exited.
    pub(crate) async fn stopped(&self) {
        let stopped = self
            .stopped
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(stopped) = stopped {
            let _ = stopped.await;
        }
    }
}

/// Opens a shard (recovering `dir`, if logging) and starts its threads and delivery task.
pub(crate) fn start<D: Downstream>(
    index: usize,
    config: &LogConfig,
    dir: Option<&Path>,
    budget: Arc<Budget>,
    downstream: Arc<D>,
) -> Result<(ShardHandle, Found), Error> {
    let (segments, recovered) = match dir {
        Some(dir) => {
            let (segments, recovered) = Segments::open(dir, config.segment_bytes)?;
            (Some(segments), recovered)
        }
        None => (
            None,
            crate::segment::Recovered {
                next_id: 1,
                ..Default::default()
            },
        ),
    };
    let mut found = Found {
        truncated_bytes: recovered.truncated_bytes,
        ..Found::default()
    };
    let replay: VecDeque<Outbound> = recovered
        .pending
        .into_iter()
        .map(|(_, entry)| {
            found.entries += 1;
            found.messages += u64::from(entry.count);
            let reserved = record::entry_frame_len(&entry.destination.topic, entry.body.len());
            budget.force(reserved);
            Outbound {
                entry,
                logged: true,
                replayed: true,
                waiters: Vec::new(),
                trace: None,
                reserved,
            }
        })
        .collect();
    // A fresh producer every time the log is opened: sequences of entries that a crash
    // lost before they were written must never be reused for new ones.
    let producer_id = rand::random::<u64>().max(1);
    let shared = Arc::new(Shared::default());
    if let Some(segments) = &segments {
        shared.disk_bytes.store(segments.bytes(), Ordering::Relaxed);
        shared
            .segments
            .store(segments.count() as u64, Ordering::Relaxed);
    }
    let (to_forwarder, from_writer) = tokio_mpsc::unbounded_channel();
    let (deadline_tx, deadline_rx) = watch::channel(None);
    let (stopped_tx, stopped_rx) = oneshot::channel();

    let syncer = match (&segments, config.fsync) {
        (Some(_), FsyncPolicy::Always | FsyncPolicy::Interval(_)) => {
            let (jobs, receiver) = mpsc::channel();
            let thread = std::thread::Builder::new()
                .name(format!("msglog-sync-{index}"))
                .spawn({
                    let to_forwarder = to_forwarder.clone();
                    let budget = Arc::clone(&budget);
                    let policy = config.fsync;
                    let dir = dir.map(Path::to_owned).unwrap_or_default();
                    move || sync_loop(receiver, policy, to_forwarder, budget, &dir)
                })
                .map_err(|e| Error::Io {
                    path: dir.map(Path::to_owned).unwrap_or_default(),
                    source: e.into(),
                })?;
            Some((jobs, thread))
        }
        _ => None,
    };
    let writer = Writer {
        mode: config.mode,
        shared: Arc::clone(&shared),
        budget: Arc::clone(&budget),
        segments,
        producer_id,
        sequences: HashMap::new(),
        next_id: recovered.next_id,
        to_forwarder: to_forwarder.clone(),
        syncer,
        max_batch_bytes: config.max_batch_bytes,
        max_batch_messages: config.max_batch_messages,
        unwritten: None,
        next_written: recovered.next_id,
        released_written: recovered.released_through,
    };
    std::thread::Builder::new()
        .name(format!("msglog-write-{index}"))
        .spawn(move || {
            writer.run();
            let _ = stopped_tx.send(());
        })
        .map_err(|e| Error::Io {
            path: dir.map(Path::to_owned).unwrap_or_default(),
            source: e.into(),
        })?;
    tokio::spawn(forward::run(forward::Forwarder {
        shard: index,
        mode: config.mode,
        pending: replay,
        from_writer,
        shared: Arc::clone(&shared),
        budget,
        downstream,
        deadline: deadline_rx,
        max_batch_bytes: config.max_batch_bytes,
        max_batch_messages: config.max_batch_messages,
        max_call_bytes: config.max_call_bytes,
        call_timeout: config.call_timeout,
        joiner: forward::Joiner::default(),
    }));
    Ok((
        ShardHandle {
            shared,
            deadline: deadline_tx,
            stopped: Mutex::new(Some(stopped_rx)),
        },
        found,
    ))
}

/// An fsync for the syncer thread to do, and what to answer once it is done.
struct SyncJob {
    handle: Arc<SyncHandle>,
    /// The last entry id the fsync covers.
    through: u64,
    /// The active segment (by first id) and its length when the job was made: what the
    /// fsync makes durable, for the recovery point.
    extent: (u64, u64),
    waiters: Vec<LoggedSender>,
    /// RBML: entries to deliver once durable.
    handoff: Vec<Outbound>,
    /// Everything queued before the close was handed over.
    drained: bool,
    /// Whether the group is in the file. One whose write failed passes through the syncer
    /// all the same — not synced, its waiters answered once delivered — so that its
    /// entries reach the delivery task after the groups before it, which still wait for
    /// their fsync: delivery must keep id order, or a producer sequence would go backwards
    /// and the broker would take the earlier entries for retries it already stored.
    written: bool,
}

/// The syncer thread: fsyncs whatever the writer wrote since the last fsync (one fsync for
/// every group written meanwhile: the group commit), then answers; about once a second it
/// saves how far the active segment is fsync'd as the shard's recovery point in `dir`.
fn sync_loop(
    jobs: mpsc::Receiver<SyncJob>,
    policy: FsyncPolicy,
    to_forwarder: tokio_mpsc::UnboundedSender<ToForwarder>,
    budget: Arc<Budget>,
    dir: &Path,
) {
    let mut last_sync: Option<Instant> = None;
    let mut recovery = RecoveryPoint::default();
    // After a failed fsync nothing written is known to be durable: every later job is
    // answered as if its fsync failed too (once delivered), until the log is reopened.
    let mut failed: Option<String> = None;
    while let Ok(first) = jobs.recv() {
        if let (FsyncPolicy::Interval(every), Some(last)) = (policy, last_sync) {
            let due = last + every;
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
        }
        let mut batch = vec![first];
        batch.extend(jobs.try_iter());
        let started = Instant::now();
        let mut result = failed.clone().map_or(Ok(()), Err);
        let mut synced: Vec<*const SyncHandle> = Vec::new();
        for job in batch.iter().filter(|job| job.written) {
            let handle = Arc::as_ptr(&job.handle);
            if synced.contains(&handle) {
                continue;
            }
            synced.push(handle);
            if let Err(error) = job.handle.sync() {
                result = Err(error.to_string());
            }
        }
        last_sync = Some(Instant::now());
        if !synced.is_empty() {
            metrics::counter!("runnel_msglog_fsyncs_total").increment(1);
            metrics::histogram!("runnel_msglog_fsync_seconds")
                .record(started.elapsed().as_secs_f64());
        }
        if result.is_ok() {
            let extents = batch.iter().filter(|job| job.written).map(|job| job.extent);
            recovery.durable = recovery.durable.max(extents.max());
        }
        if let Err(reason) = &result
            && failed.is_none()
        {
            let reason = format!("fsync failed: {reason}");
            budget.set_sync_failed(reason.clone());
            failed = Some(reason);
        }
        for job in batch {
            if job.written && result.is_ok() {
                for waiter in job.waiters {
                    let _ = waiter.send(Ok(()));
                }
            } else if !job.waiters.is_empty() {
                // Not known to be durable: answer once delivered instead.
                let _ = to_forwarder.send(ToForwarder::WhenDelivered(job.through, job.waiters));
            }
            if !job.handoff.is_empty() {
                let _ = to_forwarder.send(ToForwarder::Entries(job.handoff));
            }
            if job.drained {
                let _ = to_forwarder.send(ToForwarder::Drained);
            }
        }
        if failed.is_none() {
            recovery.save_if_due(dir);
        }
    }
}

/// What the syncer knows fsync'd, and what the recovery point says.
#[derive(Default)]
struct RecoveryPoint {
    durable: Option<(u64, u64)>,
    /// When it was last saved durably.
    at: Option<Instant>,
    /// What the file says now (rewritten in place since the last durable save).
    written: Option<(u64, u64)>,
}

impl RecoveryPoint {
    /// After an fsync: saves the recovery point durably if more is fsync'd than it says and
    /// a second has passed since it was last saved (two fsyncs and a rename: not for every
    /// group); in between, rewrites it in place (one write, no fsync).
    fn save_if_due(&mut self, dir: &Path) {
        let Some(durable) = self.durable.filter(|d| Some(*d) > self.written) else {
            return;
        };
        let recent = self
            .at
            .is_some_and(|at| at.elapsed() < Duration::from_secs(1));
        let written = if recent {
            crate::segment::refresh_recovery_point(dir, durable)
        } else {
            self.at = Some(Instant::now());
            crate::segment::write_recovery_point(dir, durable)
        };
        match written {
            Ok(()) => self.written = Some(durable),
            Err(error) => {
                tracing::warn!(%error, "the message log's recovery point was not saved; the next one tries again");
            }
        }
    }
}

/// An entry being put together from a group's parts.
struct Building {
    destination: Destination,
    chunks: Vec<Bytes>,
    bytes: usize,
    count: u32,
    waiters: Vec<PartWaiter>,
    trace: Option<TraceHeaders>,
}

impl Building {
    fn new(destination: Destination) -> Building {
        Building {
            destination,
            chunks: Vec::new(),
            bytes: 0,
            count: 0,
            waiters: Vec::new(),
            trace: None,
        }
    }

    /// The entry's messages: the parts' chunks as they are, not concatenated (see [`Body`]).
    fn body(&mut self) -> Body {
        Body::from_chunks(std::mem::take(&mut self.chunks))
    }
}

/// The writer thread's state.
struct Writer {
    mode: Mode,
    shared: Arc<Shared>,
    budget: Arc<Budget>,
    segments: Option<Segments>,
    producer_id: u64,
    /// Per destination, the sequence of the next message under `producer_id`.
    sequences: HashMap<Destination, u64>,
    next_id: u64,
    to_forwarder: tokio_mpsc::UnboundedSender<ToForwarder>,
    syncer: Option<(mpsc::Sender<SyncJob>, std::thread::JoinHandle<()>)>,
    max_batch_bytes: usize,
    max_batch_messages: u32,
    /// Ids whose write failed, to be recorded as skipped by the next write that succeeds.
    unwritten: Option<(u64, u64)>,
    /// The id after the last one written (or skipped): what a new segment is named by.
    /// Ahead of `next_id` never; behind it in SBML, whose entries are written when sent.
    next_written: u64,
    released_written: u64,
}

impl Writer {
    fn run(mut self) {
        let mut drained = false;
        loop {
            let (submissions, requests, released, closing, stop) = {
                let mut inbox = self.shared.inbox();
                loop {
                    let work = !inbox.submissions.is_empty()
                        || !inbox.log_requests.is_empty()
                        || inbox.released.is_some()
                        || inbox.stop
                        || (inbox.closing && !drained);
                    if work {
                        break;
                    }
                    if self.unwritten.is_some() || self.budget.writes_failing() {
                        // Writes failed: try again now and then, so that the log accepts
                        // submissions again as soon as the disk takes writes.
                        let (guard, timeout) = self
                            .shared
                            .wake
                            .wait_timeout(inbox, Duration::from_secs(1))
                            .unwrap_or_else(|e| e.into_inner());
                        inbox = guard;
                        if timeout.timed_out() {
                            break;
                        }
                    } else {
                        inbox = self
                            .shared
                            .wake
                            .wait(inbox)
                            .unwrap_or_else(|e| e.into_inner());
                    }
                }
                (
                    std::mem::take(&mut inbox.submissions),
                    std::mem::take(&mut inbox.log_requests),
                    inbox.released.take(),
                    inbox.closing,
                    inbox.stop,
                )
            };
            for request in requests {
                self.log_sent(request);
            }
            if !submissions.is_empty() {
                self.accept(submissions);
            }
            match released {
                Some(through) => self.release(through),
                None if self.unwritten.is_some() || self.budget.writes_failing() => {
                    self.release(self.released_written);
                }
                None => {}
            }
            if closing && !drained {
                // Every submission is in: `closing` stops new ones before it is seen here.
                drained = true;
                self.after_durable(0, Vec::new(), Vec::new(), true);
            }
            if stop {
                break;
            }
        }
        let mut synced = self.budget.sync_failure().is_none();
        if let Some(segments) = &mut self.segments
            && let Err(error) = segments.sync()
        {
            tracing::error!(%error, "final fsync of the message log failed");
            synced = false;
        }
        if let Some((jobs, thread)) = self.syncer.take() {
            drop(jobs);
            let _ = thread.join();
            // The syncer is done: this is the last word on what is fsync'd.
            if let Some(segments) = &self.segments
                && synced
                && let Err(error) =
                    crate::segment::write_recovery_point(segments.dir(), segments.active_extent())
            {
                tracing::warn!(%error, "the message log's recovery point was not saved at close");
            }
        }
    }

    /// Turns a group of submissions into entries (one per destination, split at the batch
    /// limits), numbers them, and logs and/or hands them over as the mode says.
    fn accept(&mut self, submissions: VecDeque<ShardSubmission>) {
        let mut open: HashMap<Destination, Building> = HashMap::new();
        let mut closed: Vec<Building> = Vec::new();
        let mut waiters = Vec::new();
        let mut reserved = 0u64;
        for submission in submissions {
            reserved += submission.reserved;
            if let Some(logged) = submission.logged {
                waiters.push(logged);
            }
            for (index, part) in submission.parts {
                let building = open
                    .entry(part.destination.clone())
                    .or_insert_with(|| Building::new(part.destination.clone()));
                if building.count > 0
                    && (building.count + part.count > self.max_batch_messages
                        || building.bytes + part.body.len() > self.max_batch_bytes)
                {
                    let full = std::mem::replace(building, Building::new(part.destination.clone()));
                    closed.push(full);
                }
                if let Some(ticket) = &submission.stored {
                    building.waiters.push(PartWaiter {
                        ticket: Arc::clone(ticket),
                        part: index,
                        offset: building.count,
                    });
                }
                if building.trace.is_none() {
                    building.trace = submission.trace.clone();
                }
                building.bytes += part.body.len();
                building.count += part.count;
                building.chunks.push(part.body);
            }
        }
        closed.extend(open.into_values());
        let mut outbound = Vec::with_capacity(closed.len());
        let mut kept = 0u64;
        for mut building in closed {
            let sequence = self
                .sequences
                .entry(building.destination.clone())
                .or_insert(0);
            let entry = Entry {
                id: self.next_id,
                destination: building.destination.clone(),
                producer_id: self.producer_id,
                base_sequence: *sequence,
                count: building.count,
                body: building.body(),
            };
            self.next_id += 1;
            *sequence += u64::from(building.count);
            let entry_reserved =
                record::entry_frame_len(&entry.destination.topic, entry.body.len());
            kept += entry_reserved;
            outbound.push(Outbound {
                entry,
                logged: self.mode != Mode::Sbml,
                replayed: false,
                waiters: std::mem::take(&mut building.waiters),
                trace: building.trace.take(),
                reserved: entry_reserved,
            });
        }
        // Parts merged into one entry share its header: give back what they reserved extra.
        self.budget.release(reserved.saturating_sub(kept));
        let first = outbound.first().map_or(self.next_id, |o| o.entry.id);
        let through = self.next_id - 1;
        match self.mode {
            Mode::None => {
                let _ = self.to_forwarder.send(ToForwarder::Entries(outbound));
            }
            Mode::Sbml => {
                let _ = self.to_forwarder.send(ToForwarder::Entries(outbound));
                if !waiters.is_empty() {
                    let _ = self
                        .to_forwarder
                        .send(ToForwarder::WhenLogged(through, waiters));
                }
            }
            Mode::Hml => {
                let entries: Vec<Entry> = outbound.iter().map(|o| o.entry.clone()).collect();
                let _ = self.to_forwarder.send(ToForwarder::Entries(outbound));
                match self.write(EntryKind::Received, &entries, first, through) {
                    Ok(()) => self.after_durable(through, waiters, Vec::new(), false),
                    Err(()) => self.when_delivered(through, waiters),
                }
            }
            Mode::Rbml => {
                let entries: Vec<Entry> = outbound.iter().map(|o| o.entry.clone()).collect();
                match self.write(EntryKind::Received, &entries, first, through) {
                    Ok(()) => self.after_durable(through, waiters, outbound, false),
                    Err(()) => self.after_unwritten(through, waiters, outbound),
                }
            }
        }
    }

    /// SBML: logs entries the delivery task is about to send.
    fn log_sent(&mut self, request: LogRequest) {
        let (Some(first), Some(last)) = (request.entries.first(), request.entries.last()) else {
            let _ = request.done.send(Ok(()));
            return;
        };
        let (first, through) = (first.id, last.id);
        match self.write(EntryKind::Sent, &request.entries, first, through) {
            Ok(()) => self.after_durable(through, vec![request.done], Vec::new(), false),
            Err(()) => {
                let reason = self.failing_reason();
                let _ = request.done.send(Err(Error::DiskFull(reason)));
            }
        }
    }

    fn failing_reason(&self) -> String {
        self.budget
            .failing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .unwrap_or_else(|| "the write failed".into())
    }

    /// Writes entries `first..=through` (after a `Skipped` record for earlier failures),
    /// rolling the segment if it is full. On failure the ids are remembered as unwritten.
    fn write(
        &mut self,
        kind: EntryKind,
        entries: &[Entry],
        first: u64,
        through: u64,
    ) -> Result<(), ()> {
        let Some(segments) = &mut self.segments else {
            return Ok(());
        };
        let skipped = self.unwritten.map(|(a, b)| record::skipped(a, b));
        let heads: Vec<Vec<u8>> = entries
            .iter()
            .map(|e| record::entry_head(kind, e))
            .collect();
        let mut frames: Vec<(&[u8], &[Bytes])> = Vec::with_capacity(entries.len() + 1);
        if let Some(skipped) = &skipped {
            frames.push((skipped, &[]));
        }
        for (head, entry) in heads.iter().zip(entries) {
            frames.push((head, entry.body.chunks()));
        }
        let bytes: usize = frames.iter().map(|(h, _)| h.len()).sum::<usize>()
            + entries.iter().map(|e| e.body.len()).sum::<usize>();
        match segments.append(&frames) {
            Ok(()) => {
                self.unwritten = None;
                self.next_written = through + 1;
                metrics::counter!("runnel_msglog_writes_total").increment(1);
                metrics::counter!("runnel_msglog_written_bytes_total").increment(bytes as u64);
                if let Err(error) = segments.roll_if_full(self.next_written) {
                    tracing::error!(%error, "cannot roll the message log's segment");
                }
                self.shared
                    .disk_bytes
                    .store(segments.bytes(), Ordering::Relaxed);
                self.shared
                    .segments
                    .store(segments.count() as u64, Ordering::Relaxed);
                self.budget.set_failing(None);
                Ok(())
            }
            Err(error) => {
                tracing::error!(%error, first, through, "message log write failed; delivering from memory");
                metrics::counter!("runnel_msglog_write_errors_total").increment(1);
                self.unwritten = Some(match self.unwritten {
                    Some((a, _)) => (a, through),
                    None => (first, through),
                });
                self.next_written = through + 1;
                self.budget.set_failing(Some(error.to_string()));
                Err(())
            }
        }
    }

    /// Answers `waiters` and hands `handoff` over once what was written through `through`
    /// is durable: now (fsync never) or after the syncer's next fsync.
    fn after_durable(
        &mut self,
        through: u64,
        waiters: Vec<LoggedSender>,
        handoff: Vec<Outbound>,
        drained: bool,
    ) {
        match (&self.syncer, &self.segments) {
            (Some((jobs, _)), Some(segments)) => {
                let job = SyncJob {
                    handle: segments.sync_handle(),
                    through,
                    extent: segments.active_extent(),
                    waiters,
                    handoff,
                    drained,
                    written: true,
                };
                if let Err(mpsc::SendError(job)) = jobs.send(job) {
                    // The syncer only stops after this thread: not reached.
                    self.when_delivered(job.through, job.waiters);
                }
            }
            _ => {
                for waiter in waiters {
                    let _ = waiter.send(Ok(()));
                }
                if !handoff.is_empty() {
                    let _ = self.to_forwarder.send(ToForwarder::Entries(handoff));
                }
                if drained {
                    let _ = self.to_forwarder.send(ToForwarder::Drained);
                }
            }
        }
    }

    /// RBML: the write of entries through `through` failed. They are delivered from memory
    /// and `waiters` answered once they are delivered — in order behind the groups still
    /// waiting for their fsync (see [`SyncJob::written`]).
    fn after_unwritten(
        &mut self,
        through: u64,
        waiters: Vec<LoggedSender>,
        handoff: Vec<Outbound>,
    ) {
        if let (Some((jobs, _)), Some(segments)) = (&self.syncer, &self.segments) {
            let job = SyncJob {
                handle: segments.sync_handle(),
                extent: segments.active_extent(),
                through,
                waiters,
                handoff,
                drained: false,
                written: false,
            };
            // The syncer only stops after this thread: not reached.
            if let Err(mpsc::SendError(job)) = jobs.send(job) {
                let _ = self.to_forwarder.send(ToForwarder::Entries(job.handoff));
                self.when_delivered(job.through, job.waiters);
            }
        } else {
            let _ = self.to_forwarder.send(ToForwarder::Entries(handoff));
            self.when_delivered(through, waiters);
        }
    }

    /// The log write failed: these `Logged` waiters are answered once their entries are
    /// delivered instead (durable downstream is durable enough, and never a lie).
    fn when_delivered(&self, through: u64, waiters: Vec<LoggedSender>) {
        if !waiters.is_empty() {
            let _ = self
                .to_forwarder
                .send(ToForwarder::WhenDelivered(through, waiters));
        }
    }

    /// Records that everything up to `through` was delivered (best effort: a lost
    /// `Released` only means a replay the downstream recognises) and deletes segments.
    fn release(&mut self, through: u64) {
        let Some(segments) = &mut self.segments else {
            return;
        };
        let skipped = self.unwritten.map(|(a, b)| record::skipped(a, b));
        let marker = record::released(through.max(self.released_written));
        let mut frames: Vec<(&[u8], &[Bytes])> = Vec::with_capacity(2);
        if let Some(skipped) = &skipped {
            frames.push((skipped, &[]));
        }
        frames.push((&marker, &[]));
        match segments.append(&frames) {
            Ok(()) => {
                self.unwritten = None;
                self.budget.set_failing(None);
                self.released_written = self.released_written.max(through);
                if let Err(error) = segments.roll_if_full(self.next_written) {
                    tracing::error!(%error, "cannot roll the message log's segment");
                }
            }
            Err(error) => {
                self.budget.set_failing(Some(error.to_string()));
            }
        }
        segments.delete_released(through);
        self.shared
            .disk_bytes
            .store(segments.bytes(), Ordering::Relaxed);
        self.shared
            .segments
            .store(segments.count() as u64, Ordering::Relaxed);
    }
}
