//! One partition: its segments, its idempotent producers, and the offsets that readers and
//! durable producers wait on.
//!
//! ```text
//! <partition dir>/00000000000000000000.log        sealed segment (offsets 0 …)
//!                 00000000000000000000.index      its sparse index
//!                 00000000000000052311.producers  producer table as of offset 52311
//!                 00000000000000052311.log        the active segment
//! ```
//!
//! [`PartitionLog`] is the synchronous state behind a lock; it does disk I/O, so only
//! blocking threads call it. [`Partition`] shares it and publishes two offsets: the end
//! (after every append, waking subscribers) and the durable offset (after every group
//! commit of [`super::durability`], waking producers that asked for DURABLE acks).
//!
//! Offsets are never reissued: an append takes the end offset and moves it on only after
//! the batch is written, recovery cuts only a batch that was torn mid-write (never
//! acknowledged, never visible), and anything else that does not run on is damage that
//! stops the partition ([`Partition::damaged`]): every read and write of it is refused.

use super::producers::{ProducerTable, StoredRun, Verdict};
use super::recent::{RecentEvents, Window};
use super::segment::{Segment, SegmentError, file_stem};
use crate::batch::{BatchHeader, StoredBatch};
use crate::error::{BrokerError, Result};
use crate::storage::{Appended, Incoming, Read, Retention};
use runnel_log::{FsyncPolicy, SyncHandle};
use runnel_proto::Millis;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;
use tokio::sync::watch;

/// How a partition lays out and keeps its log.
#[derive(Debug, Clone)]
pub(crate) struct LogSettings {
    pub(crate) policy: FsyncPolicy,
    /// A segment is sealed once it is this big …
    pub(crate) segment_bytes: u64,
    /// … or once its first batch is this old.
    pub(crate) segment_age: Duration,
    /// Bytes of log between two index entries.
    pub(crate) index_interval: u64,
    /// Producers silent this long are forgotten.
    pub(crate) producer_expiry: Duration,
    /// How long and how many event identities are remembered to recognise retries.
    pub(crate) dedup: Window,
}

impl LogSettings {
    /// What segment files do on their own: sync on an interval if the broker's policy is
    /// one. Never on every append — DURABLE acks are made durable by the group commit,
    /// which shares one fsync among every producer waiting.
    pub(crate) fn segment_policy(&self) -> FsyncPolicy {
        match self.policy {
            FsyncPolicy::Interval(every) => FsyncPolicy::Interval(every),
            FsyncPolicy::Always | FsyncPolicy::Never => FsyncPolicy::Never,
        }
    }
}

/// Bytes of records a batch may have to be appended on the calling (async) thread.
const INLINE_APPEND_BYTES: usize = 16 * 1024;

/// A partition's segments and producer table.
#[derive(Debug)]
pub(crate) struct PartitionLog {
    topic: String,
    partition: u32,
    dir: PathBuf,
    settings: LogSettings,
    /// Oldest first; the last one takes appends. Never empty.
    segments: Vec<Segment>,
    producers: ProducerTable,
    /// The identities of recent deduplicated events.
    recent: RecentEvents,
    /// The append clock: never goes back, so append times order like offsets.
    last_time: i64,
    /// Set when a write or an fsync failed: the files may then hold what the state does not
    /// know about, so appending more could reissue an offset. Only a restart clears it.
    failed: bool,
}

fn producers_path(dir: &Path, offset: u64) -> PathBuf {
    dir.join(format!("{}.producers", file_stem(offset)))
}

/// The magic of the partition's recovery point ([`runnel_log::recovery`]: how much of which
/// segment, by base offset, is known fsync'd); the trailing digit is the content's version.
const RECOVERY_POINT_MAGIC: [u8; 8] = *b"RNLRCPT1";

/// A segment's base offset and how many bytes of it are known fsync'd.
pub(crate) use runnel_log::recovery::Extent;

/// Blocking: the partition's saved recovery point, if there is a readable one.
pub(crate) fn read_recovery_point(dir: &Path) -> Option<Extent> {
    runnel_log::recovery::load(dir, RECOVERY_POINT_MAGIC)
}

/// Blocking: saves a recovery point.
fn write_recovery_point(dir: &Path, extent: Extent) -> Result<()> {
    runnel_log::recovery::save(dir, RECOVERY_POINT_MAGIC, extent).map_err(|source| {
        let path = dir.join(runnel_log::recovery::FILE_NAME);
        BrokerError::Segment(super::segment::SegmentError::Log { path, source })
    })
}

/// The base offsets named by files with `extension` in `dir`, sorted.
pub(crate) fn offsets_of(dir: &Path, extension: &str) -> std::io::Result<Vec<u64>> {
    let mut offsets = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let name = entry?.file_name();
        let name = name.to_string_lossy();
        if let Some(stem) = name.strip_suffix(extension)
            && stem.len() == 20
            && let Ok(offset) = stem.parse::<u64>()
        {
            offsets.push(offset);
        }
    }
    offsets.sort_unstable();
    Ok(offsets)
}

impl PartitionLog {
    /// Blocking: opens (creating if needed) the partition in `dir` and recovers it.
    pub(crate) fn open(
        dir: &Path,
        topic: &str,
        partition: u32,
        settings: LogSettings,
    ) -> Result<PartitionLog> {
        std::fs::create_dir_all(dir).map_err(BrokerError::io(dir))?;
        let bases = offsets_of(dir, ".log").map_err(BrokerError::io(dir))?;
        let snapshots = offsets_of(dir, ".producers").map_err(BrokerError::io(dir))?;
        let (mut producers, replay_from) = match snapshots.last() {
            None => (ProducerTable::default(), 0),
            Some(&offset) => {
                let path = producers_path(dir, offset);
                let (table, at) = ProducerTable::load(&path)
                    .map_err(|reason| BrokerError::Corrupt {
                        path: path.clone(),
                        position: 0,
                        reason,
                    })?
                    .unwrap_or_default();
                (table, at)
            }
        };
        let record = |producers: &mut ProducerTable, header: &BatchHeader| {
            if header.producer_id != 0 && header.base_offset >= replay_from {
                let run = StoredRun {
                    base_sequence: header.base_sequence,
                    record_count: header.record_count,
                    base_offset: header.base_offset,
                };
                producers.record(header.producer_id, run, header.append_time.0);
            }
        };

        let interval = settings.index_interval;
        let mut segments = Vec::with_capacity(bases.len().max(1));
        if let Some((&active, sealed)) = bases.split_last() {
            for &base in sealed {
                let segment =
                    Segment::open_sealed(dir, base, interval).map_err(BrokerError::Segment)?;
                if segment.next_offset() > replay_from {
                    for batch in segment
                        .read(replay_from.max(base), usize::MAX, true)
                        .map_err(BrokerError::Segment)?
                    {
                        record(&mut producers, &batch.header);
                    }
                }
                segments.push(segment);
            }
            // What the recovery point says was fsync'd of the active segment must be there,
            // frame for frame: a bad frame inside it is damage, refused, never cut off.
            let durable = match read_recovery_point(dir) {
                Some((base, len)) if base == active => len,
                _ => 0,
            };
            let segment = Segment::recover(
                dir,
                active,
                settings.segment_policy(),
                interval,
                durable,
                |header| record(&mut producers, header),
            )
            .map_err(BrokerError::Segment)?;
            // Opening the segment fsync'd what a crash left in the page cache
            // (`LogFile::open`), so the durable offset can start at the end.
            segments.push(segment);
        } else {
            segments.push(
                Segment::create(dir, 0, settings.segment_policy(), interval)
                    .map_err(BrokerError::Segment)?,
            );
        }
        for pair in segments.windows(2) {
            if pair[0].next_offset() != pair[1].base_offset() {
                return Err(BrokerError::Corrupt {
                    path: dir.to_owned(),
                    position: 0,
                    reason: format!(
                        "segment {} ends at offset {} but the next one starts at {}",
                        pair[0].base_offset(),
                        pair[0].next_offset(),
                        pair[1].base_offset()
                    ),
                });
            }
        }
        let last_time = segments
            .iter()
            .rev()
            .find_map(Segment::last_time)
            .unwrap_or(i64::MIN);
        let recent = RecentEvents::new(settings.dedup);
        let mut log = PartitionLog {
            topic: topic.to_owned(),
            partition,
            dir: dir.to_owned(),
            settings,
            segments,
            producers,
            recent,
            last_time,
            failed: false,
        };
        log.remember_recent_events()?;
        tracing::debug!(
            topic,
            partition,
            start = log.start_offset(),
            end = log.end_offset(),
            segments = log.segments.len(),
            producers = log.producers.len(),
            recent_events = log.recent.len(),
            "partition recovered"
        );
        Ok(log)
    }

    /// Recovery: reads back the identities of the deduplicated events the window still
    /// holds — those appended within its age of the newest append, at most its count —
    /// so that retries are recognised across restarts as they were before.
    fn remember_recent_events(&mut self) -> Result<()> {
        let window = self.settings.dedup;
        if window.max_events == 0 || self.last_time == i64::MIN {
            return Ok(());
        }
        let age = i64::try_from(window.age.as_millis()).unwrap_or(i64::MAX);
        let since = self.offset_for_time(self.last_time.saturating_sub(age))?;
        let end = self.end_offset();
        let mut next = since.max(end.saturating_sub(window.max_events as u64));
        while next < end {
            let read = self.read(next, 1 << 20)?;
            let Some(last) = read.batches.last() else {
                break;
            };
            let after = last.header.next_offset();
            for batch in read.batches.iter().filter(|b| b.header.deduplicated) {
                let first = batch.header.base_offset;
                let skip = usize::try_from(next.saturating_sub(first)).unwrap_or(usize::MAX);
                let corrupt = |reason: String| BrokerError::Corrupt {
                    path: self.dir.clone(),
                    position: first,
                    reason,
                };
                runnel_proto::records::visit(
                    batch.header.compression,
                    &batch.records,
                    usize::MAX,
                    skip,
                    usize::MAX,
                    |i, event| {
                        let identity = runnel_proto::event_identity(&event.source, &event.id);
                        self.recent
                            .insert(identity, first + i as u64, batch.header.append_time.0);
                        Ok(())
                    },
                )
                .map_err(|e| corrupt(e.to_string()))?;
            }
            next = after;
        }
        self.recent.expire(self.last_time);
        Ok(())
    }

    fn active(&mut self) -> &mut Segment {
        let last = self.segments.len() - 1;
        &mut self.segments[last]
    }

    /// The first offset still stored.
    pub(crate) fn start_offset(&self) -> u64 {
        self.segments[0].base_offset()
    }

    /// The base offsets of the sealed segments.
    fn sealed_bases(&self) -> Vec<u64> {
        let sealed = &self.segments[..self.segments.len() - 1];
        sealed.iter().map(Segment::base_offset).collect()
    }

    /// The offset the next record will get.
    pub(crate) fn end_offset(&self) -> u64 {
        self.segments[self.segments.len() - 1].next_offset()
    }

    /// Bytes of every segment file.
    pub(crate) fn size_bytes(&self) -> u64 {
        self.segments.iter().map(Segment::size_bytes).sum()
    }

    /// Segment files.
    pub(crate) fn segment_count(&self) -> usize {
        self.segments.len()
    }

    fn failed_error(&self) -> BrokerError {
        BrokerError::PartitionFailed {
            topic: self.topic.clone(),
            partition: self.partition,
        }
    }

    /// Marks the partition failed after an error that may have left the files ahead of the
    /// state, and passes the error on.
    fn fail(&mut self, error: BrokerError) -> BrokerError {
        self.failed = true;
        tracing::error!(
            topic = %self.topic,
            partition = self.partition,
            %error,
            "write failed; the partition takes no more appends until a restart"
        );
        error
    }

    /// Blocking: stores a batch (or recognises a retry), appended at `now` or later.
    pub(crate) fn append(&mut self, mut batch: Incoming, now: Millis) -> Result<Appended> {
        if self.failed {
            return Err(self.failed_error());
        }
        if let Some(identities) = batch.identities.take() {
            return self.append_deduplicated(batch, &identities, now);
        }
        if batch.producer_id != 0 {
            match self
                .producers
                .check(batch.producer_id, batch.base_sequence, batch.record_count)
            {
                Verdict::Append => {}
                Verdict::Duplicate(base_offset) => return Ok(Appended::Duplicate { base_offset }),
                Verdict::OutOfSequence { expected } => {
                    return Err(BrokerError::OutOfSequence {
                        producer_id: batch.producer_id,
                        partition: self.partition,
                        expected,
                        found: batch.base_sequence,
                    });
                }
                Verdict::TooOld { last } => {
                    return Err(BrokerError::SequenceTooOld {
                        producer_id: batch.producer_id,
                        partition: self.partition,
                        last,
                        found: batch.base_sequence,
                    });
                }
            }
        }
        let (time, base_offset) = self.write(&batch, false, now)?;
        self.record_run(&batch, base_offset, time);
        Ok(Appended::Stored {
            base_offset,
            next_offset: self.end_offset(),
            scattered: None,
            duplicates: 0,
        })
    }

    /// Stores the records of a batch whose identities are not remembered (nor repeated
    /// earlier in the batch) and remembers them; the others are retries, answered with
    /// their originals' offsets.
    ///
    /// A producer's sequence still recognises a whole batch it stored before — which
    /// outlasts the identities' window (a collector replaying its log after a long
    /// outage) — but is never a reason to refuse one: a batch partly recognised by its
    /// events is stored without its producer id, so the next one seems to leave a gap.
    fn append_deduplicated(
        &mut self,
        batch: Incoming,
        identities: &[u128],
        now: Millis,
    ) -> Result<Appended> {
        if batch.producer_id != 0
            && let Verdict::Duplicate(base_offset) =
                self.producers
                    .check(batch.producer_id, batch.base_sequence, batch.record_count)
        {
            return Ok(Appended::Duplicate { base_offset });
        }
        if identities.len() != batch.record_count as usize {
            return Err(BrokerError::InvalidArgument(format!(
                "{} identities for a batch of {} records",
                identities.len(),
                batch.record_count
            )));
        }
        let time = now.0.max(self.last_time);
        self.recent.expire(time);
        let end = self.end_offset();
        let (offsets, kept) = self.recent.classify(identities, end);
        let duplicates = (identities.len() - kept.len()) as u32;
        if duplicates > 0 {
            metrics::counter!("runnel_broker_duplicate_events_total", "topic" => self.topic.clone())
                .increment(u64::from(duplicates));
        }
        if kept.is_empty() {
            return Ok(Appended::Stored {
                base_offset: offsets[0],
                next_offset: end,
                scattered: Some(offsets),
                duplicates,
            });
        }
        let batch = if duplicates == 0 {
            batch
        } else {
            let records = batch.split_records(usize::MAX)?;
            let mut body = bytes::BytesMut::new();
            for &i in &kept {
                let mut length = Vec::with_capacity(5);
                prost::encode_length_delimiter(records[i].len(), &mut length)
                    .map_err(|e| BrokerError::InvalidArgument(e.to_string()))?;
                body.extend_from_slice(&length);
                body.extend_from_slice(&records[i]);
            }
            Incoming {
                compression: runnel_proto::v1::Compression::None,
                record_count: kept.len() as u32,
                records: body.freeze(),
                producer_id: 0,
                base_sequence: 0,
                identities: None,
            }
        };
        let (time, base_offset) = self.write(&batch, true, now)?;
        for (n, &i) in kept.iter().enumerate() {
            self.recent
                .insert(identities[i], base_offset + n as u64, time);
        }
        self.record_run(&batch, base_offset, time);
        let contiguous = duplicates == 0;
        Ok(Appended::Stored {
            base_offset: offsets[0],
            next_offset: self.end_offset(),
            scattered: (!contiguous).then_some(offsets),
            duplicates,
        })
    }

    /// Remembers an idempotent producer's batch, stored at `base_offset` at `time`.
    fn record_run(&mut self, batch: &Incoming, base_offset: u64, time: i64) {
        if batch.producer_id != 0 {
            let run = StoredRun {
                base_sequence: batch.base_sequence,
                record_count: batch.record_count,
                base_offset,
            };
            self.producers.record(batch.producer_id, run, time);
        }
    }

    /// Writes a batch at the end of the log (rolling first if due), and returns its append
    /// time and base offset.
    fn write(&mut self, batch: &Incoming, deduplicated: bool, now: Millis) -> Result<(i64, u64)> {
        let time = now.0.max(self.last_time);
        if self.needs_roll(time) {
            self.roll(time)?;
        }
        let base_offset = self.end_offset();
        let header = BatchHeader {
            compression: batch.compression,
            record_count: batch.record_count,
            base_offset,
            append_time: Millis(time),
            producer_id: batch.producer_id,
            base_sequence: batch.base_sequence,
            deduplicated,
        };
        if let Err(error) = self.active().append(&header, &batch.records) {
            // The write failed (a full disk, say) and was cut back off: nothing of the batch
            // is in the file or the index, and the next append tries again — unlike a failed
            // fsync or roll, which may have left the files ahead of the state.
            tracing::warn!(
                topic = %self.topic,
                partition = self.partition,
                %error,
                "a batch could not be written; nothing of it was stored"
            );
            metrics::counter!("runnel_broker_write_errors_total").increment(1);
            return Err(BrokerError::NotWritten {
                topic: self.topic.clone(),
                partition: self.partition,
                reason: not_written_reason(&error),
            });
        }
        self.last_time = time;
        Ok((time, base_offset))
    }

    /// Whether the active segment is full or old enough to be sealed before an append at
    /// `time`.
    fn needs_roll(&self, time: i64) -> bool {
        let segment_age = i64::try_from(self.settings.segment_age.as_millis()).unwrap_or(i64::MAX);
        let active = &self.segments[self.segments.len() - 1];
        active.size_bytes() >= self.settings.segment_bytes
            || active
                .first_time()
                .is_some_and(|first| time.saturating_sub(first) >= segment_age)
    }

    /// Blocking: seals the active segment and starts the next one. The producer table is
    /// saved as of the boundary first, so recovery never replays more than one segment.
    ///
    /// A failed fsync of the segment stops the partition (what it was to write may be lost).
    /// Whatever fails after it — the index, the snapshot, the next segment's file, on a full
    /// disk say — leaves the files consistent: the segment is whole and fsync'd, and a
    /// snapshot or a next segment that was not finished is redone by the next try. So the
    /// append is refused as not written, and the next one rolls again.
    fn roll(&mut self, now: i64) -> Result<()> {
        let end = self.end_offset();
        if let Err(error) = self.active().sync() {
            return Err(self.fail(BrokerError::Segment(error)));
        }
        self.start_next_segment(end, now).map_err(|error| {
            tracing::warn!(topic = %self.topic, partition = self.partition, %error, "a new segment could not be started; the next append tries again");
            metrics::counter!("runnel_broker_write_errors_total").increment(1);
            let reason = match &error {
                BrokerError::Segment(error) => not_written_reason(error),
                BrokerError::Io { source, .. } if source.kind() == std::io::ErrorKind::StorageFull => {
                    "the broker's disk is full".into()
                }
                _ => "the broker could not start a new segment".into(),
            };
            BrokerError::NotWritten {
                topic: self.topic.clone(),
                partition: self.partition,
                reason,
            }
        })
    }

    /// The rest of [`PartitionLog::roll`], once the active segment is fsync'd.
    fn start_next_segment(&mut self, end: u64, now: i64) -> Result<()> {
        self.active().write_index().map_err(BrokerError::Segment)?;
        let expiry = i64::try_from(self.settings.producer_expiry.as_millis()).unwrap_or(i64::MAX);
        self.producers.expire(now.saturating_sub(expiry));
        let path = producers_path(&self.dir, end);
        self.producers
            .save(&path, end)
            .map_err(BrokerError::log(&path))?;
        for old in offsets_of(&self.dir, ".producers").map_err(BrokerError::io(&self.dir))? {
            if old < end {
                let stale = producers_path(&self.dir, old);
                std::fs::remove_file(&stale).map_err(BrokerError::io(&stale))?;
            }
        }
        let next = Segment::create(
            &self.dir,
            end,
            self.settings.segment_policy(),
            self.settings.index_interval,
        )
        .map_err(BrokerError::Segment)?;
        sync_dir(&self.dir)?;
        tracing::debug!(topic = %self.topic, partition = self.partition, base_offset = end, "segment rolled");
        self.segments.push(next);
        Ok(())
    }

    /// Blocking: the batches holding offsets from `from` on, about `max_bytes` of them
    /// (at least one if there is one), across segments.
    pub(crate) fn read(&self, from: u64, max_bytes: usize) -> Result<Read> {
        let (start, end) = (self.start_offset(), self.end_offset());
        if from < start || from > end {
            return Err(BrokerError::OffsetOutOfRange {
                topic: self.topic.clone(),
                partition: self.partition,
                offset: from,
                start,
                end,
            });
        }
        let first = self
            .segments
            .partition_point(|s| s.base_offset() <= from)
            .saturating_sub(1);
        let mut batches: Vec<StoredBatch> = Vec::new();
        let mut taken = 0usize;
        for segment in &self.segments[first..] {
            if !batches.is_empty() && taken >= max_bytes {
                break;
            }
            let found = segment
                .read(from, max_bytes.saturating_sub(taken), batches.is_empty())
                .map_err(BrokerError::Segment)?;
            taken += found.iter().map(|b| b.records.len()).sum::<usize>();
            batches.extend(found);
        }
        Ok(Read {
            batches,
            start,
            end,
        })
    }

    /// Blocking: the offset of the first record appended at or after `time` (Unix ms), or
    /// the end offset if there is none.
    pub(crate) fn offset_for_time(&self, time: i64) -> Result<u64> {
        for segment in &self.segments {
            if let Some(offset) = segment
                .offset_for_time(time)
                .map_err(BrokerError::Segment)?
            {
                return Ok(offset);
            }
        }
        Ok(self.end_offset())
    }

    /// Blocking: deletes the sealed segments that `retention` no longer keeps, oldest first,
    /// and rolls an active segment older than the segment age so that it can expire too.
    /// Returns how many segments were deleted.
    pub(crate) fn enforce_retention(&mut self, retention: Retention, now: Millis) -> Result<usize> {
        if self.failed {
            return Ok(0);
        }
        let segment_age = i64::try_from(self.settings.segment_age.as_millis()).unwrap_or(i64::MAX);
        let idle_active = self
            .active()
            .first_time()
            .is_some_and(|first| now.0.saturating_sub(first) >= segment_age);
        if idle_active {
            self.roll(now.0.max(self.last_time))
                .map_err(|e| self.fail(e))?;
        }
        let mut deleted = 0;
        let mut total = self.size_bytes();
        while self.segments.len() > 1 {
            let oldest = &self.segments[0];
            let expired = retention.max_age.is_some_and(|age| {
                let age = i64::try_from(age.as_millis()).unwrap_or(i64::MAX);
                oldest
                    .last_time()
                    .is_some_and(|last| now.0.saturating_sub(last) > age)
            });
            let oversize = retention.max_bytes.is_some_and(|max| total > max);
            if !expired && !oversize {
                break;
            }
            let segment = self.segments.remove(0);
            total -= segment.size_bytes();
            segment.delete().map_err(BrokerError::io(&self.dir))?;
            tracing::info!(
                topic = %self.topic,
                partition = self.partition,
                base_offset = segment.base_offset(),
                next_offset = segment.next_offset(),
                reason = if expired { "age" } else { "size" },
                "segment deleted by retention"
            );
            deleted += 1;
        }
        Ok(deleted)
    }

    /// What a group commit needs: the end offset now and a handle that syncs everything
    /// up to it (older segments were synced when sealed).
    pub(crate) fn sync_point(&self) -> Result<(u64, SyncHandle, Extent)> {
        let active = &self.segments[self.segments.len() - 1];
        Ok((
            self.end_offset(),
            active.sync_handle().map_err(BrokerError::Segment)?,
            self.active_extent(),
        ))
    }

    /// The active segment's base offset and its length in bytes.
    pub(crate) fn active_extent(&self) -> Extent {
        let active = &self.segments[self.segments.len() - 1];
        (active.base_offset(), active.size_bytes())
    }

    /// Blocking: fsyncs if the interval policy's time has come.
    pub(crate) fn sync_if_due(&mut self) -> Result<()> {
        self.active().sync_if_due().map_err(BrokerError::Segment)
    }

    /// Blocking: fsyncs everything (at shutdown).
    pub(crate) fn sync(&mut self) -> Result<()> {
        self.active().sync().map_err(BrokerError::Segment)
    }
}

/// What a client is told about a failed write: the kind of OS error, never a path.
fn not_written_reason(error: &super::segment::SegmentError) -> String {
    let super::segment::SegmentError::Log {
        source: runnel_log::Error::Io(io),
        ..
    } = error
    else {
        return "the broker could not write it".into();
    };
    match io.kind() {
        std::io::ErrorKind::StorageFull => "the broker's disk is full".into(),
        kind => format!("the broker's disk refused the write ({kind})"),
    }
}

/// Makes a directory's entries (files created, renamed or removed in it) durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(BrokerError::io(dir))
}

/// The durable offset, or that fsync failed for good.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Durable {
    pub(crate) offset: u64,
    pub(crate) failed: bool,
}

/// A partition as the service shares it: the log behind a lock, plus lock-free views of
/// its offsets and size.
#[derive(Debug)]
pub(crate) struct Partition {
    id: u32,
    topic: String,
    /// Appends, rolls and retention take it for writing, reads for reading. Only blocking
    /// threads take it. None for a partition found damaged when the broker started.
    log: Option<RwLock<PartitionLog>>,
    /// What damage was found in the partition's files, at start or since: then it takes
    /// no reads and no writes.
    damage: OnceLock<String>,
    /// The end offset, published after every append while the lock is still held, so it
    /// never goes backwards and never shows a record that is not fully written.
    end: watch::Sender<u64>,
    durable: watch::Sender<Durable>,
    start: AtomicU64,
    size_bytes: AtomicU64,
    segments: AtomicU64,
    /// Bytes appended since a background writeback was last asked for.
    unsynced: AtomicU64,
    /// The partition's directory, for its recovery point.
    dir: PathBuf,
    /// How much of which segment is known fsync'd …
    synced: Mutex<Extent>,
    /// … and what the saved recovery point says.
    saved: Mutex<Extent>,
}

impl Partition {
    /// Shares an opened log. Everything recovered counts as durable: recovery read it
    /// back from the files.
    pub(crate) fn new(log: PartitionLog) -> Partition {
        let end = log.end_offset();
        Partition {
            id: log.partition,
            topic: log.topic.clone(),
            end: watch::Sender::new(end),
            durable: watch::Sender::new(Durable {
                offset: end,
                failed: false,
            }),
            start: AtomicU64::new(log.start_offset()),
            size_bytes: AtomicU64::new(log.size_bytes()),
            segments: AtomicU64::new(log.segment_count() as u64),
            unsynced: AtomicU64::new(0),
            dir: log.dir.clone(),
            // Recovery fsync'd what it found.
            synced: Mutex::new(log.active_extent()),
            saved: Mutex::new((0, 0)),
            log: Some(RwLock::new(log)),
            damage: OnceLock::new(),
        }
    }

    /// A partition whose files were found damaged when the broker started (`detail` says
    /// what and where): it is there, and answers every read and write with
    /// [`BrokerError::Damaged`].
    pub(crate) fn damaged(topic: &str, id: u32, dir: &Path, detail: String) -> Partition {
        let partition = Partition {
            id,
            topic: topic.to_owned(),
            end: watch::Sender::new(0),
            durable: watch::Sender::new(Durable {
                offset: 0,
                failed: true,
            }),
            start: AtomicU64::new(0),
            size_bytes: AtomicU64::new(0),
            segments: AtomicU64::new(0),
            unsynced: AtomicU64::new(0),
            dir: dir.to_owned(),
            synced: Mutex::new((0, 0)),
            saved: Mutex::new((0, 0)),
            log: None,
            damage: OnceLock::new(),
        };
        partition.mark_damaged(detail);
        partition
    }

    /// Stops the partition for good (until an operator repairs it and restarts the
    /// broker): damage was found in its files.
    pub(crate) fn mark_damaged(&self, detail: String) {
        if self.damage.set(detail).is_ok() {
            let detail = self.damage.get().map(String::as_str).unwrap_or_default();
            tracing::error!(topic = %self.topic, partition = self.id, %detail, "partition damaged: it takes no reads or writes until repaired (see \"A damaged partition\" in docs/broker.md)");
            metrics::gauge!("runnel_broker_damaged_partitions").increment(1.0);
            self.durable.send_modify(|d| d.failed = true);
        }
    }

    /// Blocking: reads every sealed segment back and checks every frame (see
    /// [`Segment::check`]), without holding the partition's lock while it reads: damage
    /// stops the partition. A segment retention deletes meanwhile is skipped. Returns the
    /// segments and bytes verified.
    pub(crate) fn verify_sealed(&self) -> (u64, u64) {
        let Ok(bases) = self.read_lock().map(|log| log.sealed_bases()) else {
            return (0, 0);
        };
        let (mut segments, mut bytes) = (0, 0);
        for base in bases {
            let checked =
                Segment::check(&self.dir, base).and_then(|checked| match checked.damage() {
                    Some(damage) => Err(damage),
                    None => Ok(checked.len),
                });
            match checked {
                Ok(len) => {
                    segments += 1;
                    bytes += len;
                    metrics::counter!("runnel_broker_verified_bytes_total").increment(len);
                }
                Err(SegmentError::Log {
                    source: runnel_log::Error::Io(error),
                    ..
                }) if error.kind() == std::io::ErrorKind::NotFound => {}
                Err(error) => {
                    let error = BrokerError::Segment(error);
                    if error.is_damage() {
                        self.mark_damaged(error.to_string());
                        break;
                    }
                    tracing::warn!(topic = %self.topic, partition = self.id, %error, "a sealed segment could not be verified");
                }
            }
        }
        (segments, bytes)
    }

    /// Whether damage stopped the partition.
    pub(crate) fn is_damaged(&self) -> bool {
        self.damage.get().is_some()
    }

    /// [`BrokerError::Damaged`] if damage stopped the partition.
    pub(crate) fn usable(&self) -> Result<()> {
        match self.is_damaged() {
            true => Err(self.damaged_error()),
            false => Ok(()),
        }
    }

    fn damaged_error(&self) -> BrokerError {
        BrokerError::Damaged {
            topic: self.topic.clone(),
            partition: self.id,
            detail: self.damage.get().cloned().unwrap_or_default(),
        }
    }

    /// The log, unless damage stopped the partition.
    fn log(&self) -> Result<&RwLock<PartitionLog>> {
        match (&self.log, self.is_damaged()) {
            (Some(log), false) => Ok(log),
            _ => Err(self.damaged_error()),
        }
    }

    /// Stops the partition if `result` failed on damage in its files.
    fn noting_damage<T>(&self, result: Result<T>) -> Result<T> {
        match result {
            Err(error) if error.is_damage() => {
                self.mark_damaged(error.to_string());
                Err(self.damaged_error())
            }
            other => other,
        }
    }

    /// Blocking: saves the recovery point durably if more is known fsync'd than it says —
    /// every second or so, and at a clean stop. Between saves, group commits refresh it in
    /// place ([`Partition::refresh_recovery_point`]).
    pub(crate) fn save_recovery_point(&self) -> Result<()> {
        let synced = *self.synced.lock().map_err(|_| self.failed_error())?;
        let mut saved = self.saved.lock().map_err(|_| self.failed_error())?;
        if synced <= *saved {
            return Ok(());
        }
        write_recovery_point(&self.dir, synced)?;
        *saved = synced;
        Ok(())
    }

    fn record_synced(&self, extent: Extent) {
        if let Ok(mut synced) = self.synced.lock() {
            *synced = (*synced).max(extent);
        }
    }

    /// Blocking, after a group commit made `extent` durable: rewrites the saved recovery
    /// point in place, without an fsync (a pwrite, not two fsyncs and a rename), so that
    /// damage to what was fsync'd since the last save is told from a torn tail too. If a
    /// crash loses the rewrite, the older point stands, which only says less.
    fn refresh_recovery_point(&self, extent: Extent) {
        let Ok(saved) = self.saved.lock() else {
            return;
        };
        if extent <= *saved {
            return;
        }
        if let Err(error) = runnel_log::recovery::refresh(&self.dir, RECOVERY_POINT_MAGIC, extent) {
            tracing::debug!(dir = %self.dir.display(), %error, "the recovery point was not refreshed");
        }
        drop(saved);
    }

    /// The partition's number within its topic.
    pub(crate) fn id(&self) -> u32 {
        self.id
    }

    /// The topic's name.
    pub(crate) fn topic(&self) -> &str {
        &self.topic
    }

    /// The offset the next record will get.
    pub(crate) fn end_offset(&self) -> u64 {
        *self.end.borrow()
    }

    /// The first offset still stored.
    pub(crate) fn start_offset(&self) -> u64 {
        self.start.load(Ordering::Acquire)
    }

    /// Everything below this is fsync'd.
    pub(crate) fn durable_offset(&self) -> u64 {
        self.durable.borrow().offset
    }

    /// The log's size on disk.
    pub(crate) fn size_bytes(&self) -> u64 {
        self.size_bytes.load(Ordering::Acquire)
    }

    /// Segment files.
    pub(crate) fn segment_count(&self) -> u64 {
        self.segments.load(Ordering::Acquire)
    }

    /// Counts `bytes` more appended without a durable ack, and says whether they bring
    /// the partition to `writeback_bytes` since the last writeback: then (and for only
    /// one of the appenders that get there) it is time to ask for one.
    pub(crate) fn writeback_due(&self, bytes: u64, writeback_bytes: u64) -> bool {
        let before = self
            .unsynced
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |unsynced| {
                let total = unsynced.saturating_add(bytes);
                Some(if total >= writeback_bytes { 0 } else { total })
            })
            .unwrap_or_default();
        before.saturating_add(bytes) >= writeback_bytes
    }

    /// A receiver that sees every new end offset.
    pub(crate) fn watch_end(&self) -> watch::Receiver<u64> {
        self.end.subscribe()
    }

    /// A receiver that sees every new durable offset (and a failed fsync).
    pub(crate) fn watch_durable(&self) -> watch::Receiver<Durable> {
        self.durable.subscribe()
    }

    /// Blocking: [`Partition::read`], without the batches at or beyond `limit` (a durable
    /// offset, which is always a batch boundary).
    pub(crate) fn read_below(&self, from: u64, max_bytes: usize, limit: u64) -> Result<Read> {
        let mut read = self.read(from, max_bytes)?;
        read.batches
            .retain(|batch| batch.header.base_offset < limit);
        read.end = read.end.min(limit);
        Ok(read)
    }

    fn publish(&self, log: &PartitionLog) {
        self.start.store(log.start_offset(), Ordering::Release);
        self.size_bytes.store(log.size_bytes(), Ordering::Release);
        self.segments
            .store(log.segment_count() as u64, Ordering::Release);
        self.end.send_if_modified(|end| {
            let changed = *end != log.end_offset();
            *end = log.end_offset();
            changed
        });
    }

    /// Blocking: stores a batch and publishes the new end offset.
    pub(crate) fn append(&self, batch: Incoming, now: Millis) -> Result<Appended> {
        let mut log = self.write()?;
        let appended = log.append(batch, now);
        self.publish(&log);
        appended
    }

    /// Appends on the calling thread when that is cheap — a small batch, no segment to seal
    /// first (sealing fsyncs), and nobody else holding the partition — and gives the batch
    /// back otherwise, for [`Partition::append`] on a blocking thread. Handing a small
    /// batch to a blocking thread costs more than writing it to the page cache.
    pub(crate) fn try_append_inline(
        &self,
        batch: Incoming,
        now: Millis,
    ) -> std::result::Result<Result<Appended>, Incoming> {
        if batch.records.len() > INLINE_APPEND_BYTES {
            return Err(batch);
        }
        let lock = match self.log() {
            Ok(lock) => lock,
            Err(damaged) => return Ok(Err(damaged)),
        };
        let Ok(mut log) = lock.try_write() else {
            return Err(batch);
        };
        if log.needs_roll(now.0.max(log.last_time)) {
            return Err(batch);
        }
        let appended = log.append(batch, now);
        self.publish(&log);
        Ok(appended)
    }

    /// Blocking: see [`PartitionLog::read`].
    pub(crate) fn read(&self, from: u64, max_bytes: usize) -> Result<Read> {
        let read = self.read_lock()?.read(from, max_bytes);
        self.noting_damage(read)
    }

    /// Blocking: see [`PartitionLog::offset_for_time`].
    pub(crate) fn offset_for_time(&self, time: i64) -> Result<u64> {
        self.read_lock()?.offset_for_time(time)
    }

    /// Blocking: see [`PartitionLog::enforce_retention`].
    pub(crate) fn enforce_retention(&self, retention: Retention, now: Millis) -> Result<usize> {
        let mut log = self.write()?;
        let deleted = log.enforce_retention(retention, now);
        self.publish(&log);
        deleted
    }

    /// Waits until everything below `offset` is fsync'd (the caller asks the group commit
    /// for it).
    pub(crate) async fn wait_durable(&self, offset: u64) -> Result<()> {
        let mut durable = self.durable.subscribe();
        let reached = durable
            .wait_for(|d| d.failed || d.offset >= offset)
            .await
            .map(|d| *d);
        match reached {
            Ok(Durable { failed: false, .. }) => Ok(()),
            _ if self.is_damaged() => Err(self.damaged_error()),
            _ => Err(BrokerError::PartitionFailed {
                topic: self.topic.clone(),
                partition: self.id,
            }),
        }
    }

    /// Blocking: fsyncs up to the end offset as of now, without holding the lock during
    /// the fsync, and publishes the durable offset. What one group commit does.
    pub(crate) fn sync_to_end(&self) -> Result<()> {
        let (end, handle, extent) = self.read_lock()?.sync_point()?;
        if end <= self.durable_offset() {
            return Ok(());
        }
        if let Err(error) = handle.sync() {
            // After a failed fsync the kernel may have dropped the dirty pages: what was
            // written is no longer known to be anywhere. Stop, loudly.
            tracing::error!(topic = %self.topic, partition = self.id, %error, "fsync failed");
            if let Ok(mut log) = self.write() {
                log.failed = true;
            }
            self.durable.send_modify(|d| d.failed = true);
            return Err(self.failed_error());
        }
        self.record_synced(extent);
        self.refresh_recovery_point(extent);
        self.durable.send_if_modified(|d| {
            let more = end > d.offset;
            d.offset = d.offset.max(end);
            more
        });
        Ok(())
    }

    /// Blocking: fsyncs if the interval policy's time has come.
    pub(crate) fn sync_if_due(&self) -> Result<()> {
        self.write()?.sync_if_due()
    }

    /// Blocking: fsyncs everything (at shutdown).
    pub(crate) fn sync(&self) -> Result<()> {
        let extent = {
            let mut log = self.write()?;
            log.sync()?;
            log.active_extent()
        };
        self.record_synced(extent);
        let end = self.end_offset();
        self.durable.send_modify(|d| d.offset = d.offset.max(end));
        Ok(())
    }

    // A poisoned lock means a panic mid-operation: the state may not match the files, so
    // the partition is treated like one whose write failed.
    fn write(&self) -> Result<RwLockWriteGuard<'_, PartitionLog>> {
        self.log()?.write().map_err(|_| self.failed_error())
    }

    fn read_lock(&self) -> Result<RwLockReadGuard<'_, PartitionLog>> {
        self.log()?.read().map_err(|_| self.failed_error())
    }

    fn failed_error(&self) -> BrokerError {
        BrokerError::PartitionFailed {
            topic: self.topic.clone(),
            partition: self.id,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use runnel_proto::records;
    use runnel_proto::v1::{Compression, Event};

    fn settings(segment_bytes: u64) -> LogSettings {
        LogSettings {
            policy: FsyncPolicy::Never,
            segment_bytes,
            segment_age: Duration::from_secs(3600),
            index_interval: 128,
            producer_expiry: Duration::from_secs(3600),
            dedup: crate::storage::embedded::recent::Window {
                age: Duration::from_secs(900),
                max_events: 1000,
            },
        }
    }

    fn open(dir: &Path, segment_bytes: u64) -> PartitionLog {
        PartitionLog::open(dir, "t", 0, settings(segment_bytes)).unwrap()
    }

    fn events(first: u64, count: u64) -> Vec<Event> {
        (first..first + count)
            .map(|i| Event {
                id: format!("e-{i}"),
                payload: format!("payload of record {i:>200}").into_bytes().into(),
                ..Event::default()
            })
            .collect()
    }

    fn incoming(first: u64, count: u64) -> Incoming {
        Incoming {
            compression: Compression::None,
            record_count: count as u32,
            records: records::encode(&events(first, count)),
            producer_id: 0,
            base_sequence: 0,
            identities: None,
        }
    }

    fn idempotent(producer: u64, sequence: u64, count: u64) -> Incoming {
        Incoming {
            producer_id: producer,
            base_sequence: sequence,
            ..incoming(sequence, count)
        }
    }

    /// Every record id from `from` on, in offset order.
    fn ids_from(log: &PartitionLog, from: u64) -> Vec<String> {
        let mut ids = Vec::new();
        let mut next = from;
        while next < log.end_offset() {
            let read = log.read(next, 4096).unwrap();
            for batch in &read.batches {
                for record in batch.records(0, next, usize::MAX, usize::MAX).unwrap() {
                    assert_eq!(record.offset, next, "offsets are dense");
                    next += 1;
                    ids.push(record.event.unwrap().id);
                }
            }
        }
        ids
    }

    fn expected_ids(range: std::ops::Range<u64>) -> Vec<String> {
        range.map(|i| format!("e-{i}")).collect()
    }

    #[test]
    fn appends_roll_into_segments_and_read_back_across_them() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = open(dir.path(), 64 * 1024);
        for i in 0..200 {
            let appended = log.append(incoming(i * 10, 10), Millis(i as i64)).unwrap();
            assert_eq!(
                appended,
                Appended::Stored {
                    base_offset: i * 10,
                    next_offset: i * 10 + 10,
                    scattered: None,
                    duplicates: 0,
                }
            );
        }
        assert!(log.segment_count() > 2, "{} segments", log.segment_count());
        assert_eq!(ids_from(&log, 0), expected_ids(0..2000));
        assert_eq!(ids_from(&log, 1234), expected_ids(1234..2000));
        assert_eq!(log.offset_for_time(57).unwrap(), 570);
        assert_eq!(log.offset_for_time(10_000).unwrap(), 2000);
        let error = log.read(2001, 10).unwrap_err();
        assert!(
            matches!(error, BrokerError::OffsetOutOfRange { end: 2000, .. }),
            "{error}"
        );
        assert!(log.read(2000, 10).unwrap().batches.is_empty());
        drop(log);
        // Sealed segments reopen from their index files, the active one by a scan.
        let log = open(dir.path(), 64 * 1024);
        assert_eq!(log.end_offset(), 2000);
        assert_eq!(ids_from(&log, 0), expected_ids(0..2000));
        assert_eq!(log.offset_for_time(57).unwrap(), 570);
    }

    #[test]
    fn the_append_clock_never_goes_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = open(dir.path(), 1 << 20);
        log.append(incoming(0, 1), Millis(100)).unwrap();
        log.append(incoming(1, 1), Millis(50)).unwrap();
        let read = log.read(0, usize::MAX).unwrap();
        let times: Vec<i64> = read
            .batches
            .iter()
            .map(|b| b.header.append_time.0)
            .collect();
        assert_eq!(times, [100, 100]);
    }

    #[test]
    fn retention_deletes_whole_sealed_segments_by_age_and_size() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = open(dir.path(), 64 * 1024);
        for i in 0..300u64 {
            log.append(incoming(i * 10, 10), Millis(1000 * i as i64))
                .unwrap();
        }
        let segments = log.segment_count();
        // Nothing is old enough and there is no size limit.
        let keep_all = Retention {
            max_age: Some(Duration::from_secs(100_000)),
            max_bytes: None,
        };
        assert_eq!(log.enforce_retention(keep_all, Millis(300_000)).unwrap(), 0);
        // Everything older than 100 s at t = 300 s goes, whole segments only.
        let by_age = Retention {
            max_age: Some(Duration::from_secs(100)),
            max_bytes: None,
        };
        let deleted = log.enforce_retention(by_age, Millis(300_000)).unwrap();
        assert!(deleted > 0 && deleted < segments);
        let start = log.start_offset();
        assert!(start > 0 && start <= 2000, "start {start}");
        assert_eq!(ids_from(&log, start), expected_ids(start..3000));
        assert!(matches!(
            log.read(0, 10),
            Err(BrokerError::OffsetOutOfRange { .. })
        ));
        // Size: down to the limit, but never the active segment.
        let by_size = Retention {
            max_age: None,
            max_bytes: Some(1),
        };
        log.enforce_retention(by_size, Millis(300_000)).unwrap();
        assert_eq!(log.segment_count(), 1);
        assert_eq!(log.end_offset(), 3000);
        drop(log);
        let log = open(dir.path(), 64 * 1024);
        assert_eq!(log.end_offset(), 3000, "deleting never moves the end");
        assert_eq!(log.segment_count(), 1);
    }

    #[test]
    fn an_idle_active_segment_rolls_so_that_it_can_expire() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = PartitionLog::open(
            dir.path(),
            "t",
            0,
            LogSettings {
                segment_age: Duration::from_secs(10),
                ..settings(1 << 30)
            },
        )
        .unwrap();
        log.append(incoming(0, 5), Millis(0)).unwrap();
        let retention = Retention {
            max_age: Some(Duration::from_secs(20)),
            max_bytes: None,
        };
        assert_eq!(log.enforce_retention(retention, Millis(15_000)).unwrap(), 0);
        assert_eq!(log.segment_count(), 2, "rolled at 15 s");
        assert_eq!(log.enforce_retention(retention, Millis(25_000)).unwrap(), 1);
        assert_eq!((log.start_offset(), log.end_offset()), (5, 5));
        log.append(incoming(5, 1), Millis(25_000)).unwrap();
        assert_eq!(ids_from(&log, 5), expected_ids(5..6));
    }

    #[test]
    fn retries_of_idempotent_batches_are_recognised_across_restarts_and_rolls() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = open(dir.path(), 64 * 1024);
        let mut sequence = 0;
        for _ in 0..100 {
            log.append(idempotent(7, sequence, 10), Millis(0)).unwrap();
            sequence += 10;
        }
        assert!(log.segment_count() > 1);
        let retry = log
            .append(idempotent(7, sequence - 10, 10), Millis(0))
            .unwrap();
        assert_eq!(retry, Appended::Duplicate { base_offset: 990 });
        drop(log);
        // After a restart (snapshot at the last roll + replay of the active segment).
        let mut log = open(dir.path(), 64 * 1024);
        let retry = log
            .append(idempotent(7, sequence - 20, 10), Millis(0))
            .unwrap();
        assert_eq!(retry, Appended::Duplicate { base_offset: 980 });
        let gap = log
            .append(idempotent(7, sequence + 5, 1), Millis(0))
            .unwrap_err();
        assert!(
            matches!(gap, BrokerError::OutOfSequence { expected, .. } if expected == sequence),
            "{gap}"
        );
        let old = log.append(idempotent(7, 0, 10), Millis(0)).unwrap_err();
        assert!(matches!(old, BrokerError::SequenceTooOld { .. }), "{old}");
        assert_eq!(log.end_offset(), 1000, "nothing refused was written");
        log.append(idempotent(7, sequence, 1), Millis(0)).unwrap();
        assert_eq!(log.end_offset(), 1001);
    }

    /// A deduplicated batch of the events with these ids (source "app").
    fn deduplicated(ids: &[u64]) -> Incoming {
        let events: Vec<Event> = ids
            .iter()
            .map(|&i| Event {
                id: format!("e-{i}"),
                source: "app".into(),
                payload: format!("payload of record {i:>200}").into_bytes().into(),
                ..Event::default()
            })
            .collect();
        Incoming {
            compression: Compression::None,
            record_count: events.len() as u32,
            records: records::encode(&events),
            producer_id: 0,
            base_sequence: 0,
            identities: Some(
                events
                    .iter()
                    .map(|e| runnel_proto::event_identity(&e.source, &e.id))
                    .collect(),
            ),
        }
    }

    fn ids(list: &[u64]) -> Vec<String> {
        list.iter().map(|i| format!("e-{i}")).collect()
    }

    #[test]
    fn retried_events_are_stored_once_and_answered_with_their_offsets() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = open(dir.path(), 64 * 1024);
        let first = log.append(deduplicated(&[0, 1, 2]), Millis(0)).unwrap();
        assert_eq!(
            first,
            Appended::Stored {
                base_offset: 0,
                next_offset: 3,
                scattered: None,
                duplicates: 0
            }
        );
        // The whole batch again: nothing written, the original offsets.
        let again = log.append(deduplicated(&[0, 1, 2]), Millis(1)).unwrap();
        assert_eq!(
            again,
            Appended::Stored {
                base_offset: 0,
                next_offset: 3,
                scattered: Some(vec![0, 1, 2]),
                duplicates: 3
            }
        );
        // Part old, part new, and one id twice within the batch.
        let mixed = log.append(deduplicated(&[3, 1, 4, 3]), Millis(2)).unwrap();
        assert_eq!(
            mixed,
            Appended::Stored {
                base_offset: 3,
                next_offset: 5,
                scattered: Some(vec![3, 1, 4, 3]),
                duplicates: 2
            }
        );
        assert_eq!(ids_from(&log, 0), ids(&[0, 1, 2, 3, 4]));
        // Another source's event with the same id is another event.
        let mut other = deduplicated(&[0]);
        other.identities = Some(vec![runnel_proto::event_identity("other", "e-0")]);
        log.append(other, Millis(3)).unwrap();
        assert_eq!(log.end_offset(), 6);
        // A batch that does not ask for deduplication is stored as it is.
        log.append(incoming(0, 1), Millis(4)).unwrap();
        assert_eq!(log.end_offset(), 7);
        // A producer sequence that leaves a gap is no reason to refuse a batch whose
        // events are what the broker goes by.
        for (sequence, id) in [(100, 10), (500, 11)] {
            let mut batch = deduplicated(&[id]);
            (batch.producer_id, batch.base_sequence) = (9, sequence);
            log.append(batch, Millis(5)).unwrap();
        }
        assert_eq!(log.end_offset(), 9);
    }

    #[test]
    fn retries_are_recognised_across_restarts_within_the_window_only() {
        let dir = tempfile::tempdir().unwrap();
        let window = |max_events| LogSettings {
            dedup: crate::storage::embedded::recent::Window {
                age: Duration::from_secs(60),
                max_events,
            },
            ..settings(2048)
        };
        let mut log = PartitionLog::open(dir.path(), "t", 0, window(1000)).unwrap();
        for i in 0..50u64 {
            // Appended one second apart, rolling segments on the way.
            log.append(deduplicated(&[i]), Millis(i as i64 * 1000))
                .unwrap();
        }
        // Events that did not ask for deduplication are not remembered.
        log.append(incoming(100, 1), Millis(50_000)).unwrap();
        assert!(log.segment_count() > 1);
        drop(log);

        let mut log = PartitionLog::open(dir.path(), "t", 0, window(1000)).unwrap();
        let retry = log.append(deduplicated(&[0, 49]), Millis(50_000)).unwrap();
        assert_eq!(
            retry,
            Appended::Stored {
                base_offset: 0,
                next_offset: 51,
                scattered: Some(vec![0, 49]),
                duplicates: 2
            }
        );
        let mut not_remembered = deduplicated(&[100]);
        not_remembered.identities = Some(vec![runnel_proto::event_identity("", "e-100")]);
        log.append(not_remembered, Millis(50_000)).unwrap();
        assert_eq!(log.end_offset(), 52, "the plain event was not recognised");
        // Within the window of its append, 49 is recognised at 61 s; past twice the
        // window nothing is, and both are stored again.
        let late = log.append(deduplicated(&[49]), Millis(61_000)).unwrap();
        assert_eq!(
            late,
            Appended::Stored {
                base_offset: 49,
                next_offset: 52,
                scattered: Some(vec![49]),
                duplicates: 1
            }
        );
        let later = log.append(deduplicated(&[0, 49]), Millis(200_000)).unwrap();
        assert_eq!(
            later,
            Appended::Stored {
                base_offset: 52,
                next_offset: 54,
                scattered: None,
                duplicates: 0
            }
        );
        let ids: Vec<u64> = (100..120).collect();
        log.append(deduplicated(&ids), Millis(200_000)).unwrap();
        assert_eq!(log.end_offset(), 74);
        drop(log);

        // With a count of 10, only the last 10 deduplicated records are read back.
        let mut log = PartitionLog::open(dir.path(), "t", 0, window(10)).unwrap();
        let retry = log
            .append(deduplicated(&[119, 100]), Millis(200_000))
            .unwrap();
        assert_eq!(
            retry,
            Appended::Stored {
                base_offset: 73,
                next_offset: 75,
                scattered: Some(vec![73, 74]),
                duplicates: 1
            }
        );
        // A producer's whole batch is recognised by its sequence after its events left
        // the window (a collector replaying its log after a long outage), across restarts.
        let mut whole = deduplicated(&[70, 71]);
        (whole.producer_id, whole.base_sequence) = (5, 0);
        log.append(whole.clone(), Millis(200_000)).unwrap();
        assert_eq!(log.end_offset(), 77);
        assert_eq!(
            log.append(whole.clone(), Millis(900_000)).unwrap(),
            Appended::Duplicate { base_offset: 75 }
        );
        drop(log);
        let mut log = PartitionLog::open(dir.path(), "t", 0, window(10)).unwrap();
        assert_eq!(
            log.append(whole, Millis(900_000)).unwrap(),
            Appended::Duplicate { base_offset: 75 }
        );
    }

    #[test]
    fn a_damaged_frame_inside_what_was_fsynced_stops_recovery_instead_of_cutting_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path(), 1 << 30);
        let partition = Partition::new(log);
        for i in 0..10 {
            partition.append(incoming(i * 10, 10), Millis(0)).unwrap();
        }
        partition.sync().unwrap();
        partition.save_recovery_point().unwrap();
        // Appended after the recovery point was saved: beyond it, a torn tail is cut.
        partition.append(incoming(100, 10), Millis(0)).unwrap();
        drop(partition);
        let segment = dir.path().join(format!("{}.log", file_stem(0)));
        let intact = std::fs::read(&segment).unwrap();

        let mut torn = intact.clone();
        torn.extend_from_slice(&[0xAB; 100]);
        std::fs::write(&segment, &torn).unwrap();
        let log = open(dir.path(), 1 << 30);
        assert_eq!(
            log.end_offset(),
            110,
            "a torn tail beyond the recovery point is cut"
        );
        drop(log);

        // A flipped byte in the middle of what was fsync'd: refused, nothing cut off.
        let mut damaged = std::fs::read(&segment).unwrap();
        let middle = damaged.len() / 3;
        damaged[middle] ^= 0x01;
        std::fs::write(&segment, &damaged).unwrap();
        let error = PartitionLog::open(dir.path(), "t", 0, settings(1 << 30)).unwrap_err();
        let message = error.to_string();
        assert!(
            message.contains("damaged") && message.contains("docs/broker.md"),
            "{message}"
        );
        assert_eq!(
            std::fs::read(&segment).unwrap(),
            damaged,
            "nothing was cut off"
        );

        // Without a recovery point the damage would pass for a torn tail and take every
        // later record with it: what the recovery point is for.
        std::fs::remove_file(dir.path().join(runnel_log::recovery::FILE_NAME)).unwrap();
        let log = open(dir.path(), 1 << 30);
        assert!(log.end_offset() < 100, "{}", log.end_offset());
    }

    #[test]
    fn damage_to_what_a_group_commit_fsynced_since_the_last_save_is_refused_too() {
        let dir = tempfile::tempdir().unwrap();
        let partition = Partition::new(open(dir.path(), 1 << 30));
        partition.append(incoming(0, 10), Millis(0)).unwrap();
        partition.sync().unwrap();
        partition.save_recovery_point().unwrap();
        let saved = std::fs::metadata(dir.path().join(format!("{}.log", file_stem(0))))
            .unwrap()
            .len();
        // Group commits after the last durable save (within the second before a crash).
        for i in 1..10 {
            partition.append(incoming(i * 10, 10), Millis(0)).unwrap();
            partition.sync_to_end().unwrap();
        }
        drop(partition);
        let segment = dir.path().join(format!("{}.log", file_stem(0)));
        let mut damaged = std::fs::read(&segment).unwrap();
        let at = (saved as usize + damaged.len()) / 2;
        damaged[at] ^= 0x01;
        std::fs::write(&segment, &damaged).unwrap();
        let error = PartitionLog::open(dir.path(), "t", 0, settings(1 << 30)).unwrap_err();
        assert!(error.to_string().contains("damaged"), "{error}");
        assert_eq!(
            std::fs::read(&segment).unwrap(),
            damaged,
            "nothing was cut off"
        );
    }

    #[test]
    fn offsets_that_do_not_run_on_across_segments_stop_recovery() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = open(dir.path(), 64 * 1024);
        for i in 0..100u64 {
            log.append(incoming(i * 10, 10), Millis(0)).unwrap();
        }
        drop(log);
        let mut logs: Vec<PathBuf> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "log"))
            .collect();
        logs.sort();
        assert!(logs.len() >= 3);
        // A sealed segment in the middle disappears: offsets would jump.
        std::fs::remove_file(&logs[1]).unwrap();
        let error = PartitionLog::open(dir.path(), "t", 0, settings(64 * 1024)).unwrap_err();
        assert!(error.to_string().contains("ends at offset"), "{error}");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        /// A crash can tear the active segment at any byte: recovery keeps exactly the
        /// whole batches before the tear, the next append gets the next offset, and no
        /// offset is ever handed out twice.
        #[test]
        fn a_tear_anywhere_recovers_to_the_whole_batches(
            sizes in proptest::collection::vec(1u64..20, 1..30),
            tear in any::<prop::sample::Index>(),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let mut log = open(dir.path(), 1 << 20);
            let mut ends = Vec::new();
            let mut next = 0;
            for size in &sizes {
                log.append(incoming(next, *size), Millis(0)).unwrap();
                next += size;
                ends.push((next, log.size_bytes()));
            }
            drop(log);
            let path = dir.path().join(format!("{}.log", file_stem(0)));
            let bytes = std::fs::read(&path).unwrap();
            let cut = tear.index(bytes.len() - runnel_log::HEADER_LEN as usize) + runnel_log::HEADER_LEN as usize;
            std::fs::write(&path, &bytes[..cut]).unwrap();
            let mut log = open(dir.path(), 1 << 20);
            let kept = ends.iter().filter(|(_, size)| *size <= cut as u64).map(|(end, _)| *end).next_back().unwrap_or(0);
            prop_assert_eq!(log.end_offset(), kept);
            prop_assert_eq!(ids_from(&log, 0), expected_ids(0..kept));
            let appended = log.append(incoming(kept, 3), Millis(0)).unwrap();
            prop_assert_eq!(appended, Appended::Stored { base_offset: kept, next_offset: kept + 3, scattered: None, duplicates: 0 });
        }
    }
}
