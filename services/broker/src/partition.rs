//! One partition: its record log on disk, the in-memory offset index, and the end-offset
//! watch that wakes subscribers.
//!
//! The log is a single [`LogFile`] (`<partition>/00000000000000000000.log`, named after
//! its first offset so that later segments can sort after it). Each frame holds one
//! protobuf-encoded [`Record`] — partition, offset, append time and event — so a file is
//! self-describing: recovery rebuilds the index from the frames alone and checks that the
//! offsets run 0, 1, 2, … without a gap. A torn tail (a crash mid-append) is cut off by
//! [`LogFile::open`]; anything else that is wrong stops the broker rather than let it hand
//! out an offset twice.
//!
//! The index is a `Vec<u64>` of frame positions, one per offset: 8 bytes of memory per
//! record, rebuilt by reading the whole file at start. That is fine for the single-segment
//! logs of today; segments with sparse on-disk indexes will replace it.
//!
//! [`PartitionLog`] is synchronous and does disk I/O: call it from blocking threads only.
//! [`Partition`] wraps it in a lock and publishes the end offset for async readers.

use crate::error::{BrokerError, Result};
use prost::Message;
use runnel_log::{FsyncPolicy, LogFile};
use runnel_proto::Millis;
use runnel_proto::v1::{Event, Record};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};
use tokio::sync::watch;

/// The file name of a partition's (only) segment: its base offset, zero-padded to 20 digits.
pub(crate) const SEGMENT_FILE: &str = "00000000000000000000.log";

/// The magic of partition log files; the trailing digit is the format version.
const MAGIC: [u8; 8] = *b"RNLPART1";

/// Room left for a record's own fields (partition, offset, append time) and framing around
/// an event when deciding whether the event is small enough to store.
pub(crate) const RECORD_OVERHEAD: usize = 64;

/// What one append wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Appended {
    /// The offset of the first record appended.
    pub(crate) base_offset: u64,
    /// How many records were appended.
    pub(crate) records: u64,
    /// Encoded record bytes appended (without framing).
    pub(crate) bytes: u64,
}

/// A partition's log file and its offset index.
#[derive(Debug)]
pub(crate) struct PartitionLog {
    topic: String,
    partition: u32,
    path: PathBuf,
    file: LogFile,
    /// `positions[offset]` is where the frame of the record with that offset starts.
    positions: Vec<u64>,
    /// Set when an append fails: the file may then hold frames the index does not know
    /// about, so appending more could write an offset twice. Only a reopen clears it.
    failed: bool,
}

impl PartitionLog {
    /// Opens (creating if needed) the log of `topic`/`partition` in `dir` and recovers it.
    pub(crate) fn open(
        dir: &Path,
        topic: &str,
        partition: u32,
        policy: FsyncPolicy,
    ) -> Result<PartitionLog> {
        let path = dir.join(SEGMENT_FILE);
        let mut positions: Vec<u64> = Vec::new();
        // The visitor notes the first problem and ignores the rest of the file; the problem
        // becomes our error below.
        let mut corruption: Option<(u64, String)> = None;
        let (file, recovery) = LogFile::open(&path, MAGIC, policy, |position, payload| {
            if corruption.is_none() {
                let expected = positions.len() as u64;
                match Record::decode(payload) {
                    Err(error) => {
                        corruption =
                            Some((position, format!("the record does not decode: {error}")))
                    }
                    Ok(record) if record.offset != expected => {
                        corruption = Some((
                            position,
                            format!("expected offset {expected}, found offset {}", record.offset),
                        ))
                    }
                    Ok(record) if record.partition != partition => {
                        corruption = Some((
                            position,
                            format!(
                                "the record belongs to partition {}, not {partition}",
                                record.partition
                            ),
                        ))
                    }
                    Ok(_) => positions.push(position),
                }
            }
        })
        .map_err(BrokerError::log(&path))?;
        if let Some((position, reason)) = corruption {
            return Err(BrokerError::Corrupt {
                path,
                position,
                reason,
            });
        }
        tracing::debug!(
            topic,
            partition,
            records = positions.len(),
            size_bytes = file.len(),
            ?recovery,
            "partition recovered"
        );
        Ok(PartitionLog {
            topic: topic.to_owned(),
            partition,
            path,
            file,
            positions,
            failed: false,
        })
    }

    /// The offset the next record will get.
    pub(crate) fn end_offset(&self) -> u64 {
        self.positions.len() as u64
    }

    /// The size of the log file in bytes.
    pub(crate) fn size_bytes(&self) -> u64 {
        self.file.len()
    }

    /// Appends `events` as consecutive records stamped `append_time`, with one write and
    /// (per the fsync policy) one fsync.
    pub(crate) fn append(&mut self, events: Vec<Event>, append_time: Millis) -> Result<Appended> {
        if self.failed {
            return Err(self.failed_error());
        }
        let base_offset = self.end_offset();
        let append_time = prost_types::Timestamp::from(append_time);
        let frames: Vec<Vec<u8>> = events
            .into_iter()
            .zip(base_offset..)
            .map(|(event, offset)| {
                Record {
                    partition: self.partition,
                    offset,
                    append_time: Some(append_time),
                    event: Some(event),
                }
                .encode_to_vec()
            })
            .collect();
        let slices: Vec<&[u8]> = frames.iter().map(Vec::as_slice).collect();
        let positions = match self.file.append(&slices) {
            Ok(positions) if positions.len() == frames.len() => positions,
            Ok(positions) => {
                self.failed = true;
                return Err(BrokerError::Corrupt {
                    path: self.path.clone(),
                    position: self.file.len(),
                    reason: format!(
                        "appending {} records reported {} positions",
                        frames.len(),
                        positions.len()
                    ),
                });
            }
            Err(error) => {
                self.failed = true;
                tracing::error!(
                    topic = %self.topic,
                    partition = self.partition,
                    %error,
                    "append failed; the partition takes no more appends until a restart"
                );
                return Err(BrokerError::log(&self.path)(error));
            }
        };
        self.positions.extend(positions);
        Ok(Appended {
            base_offset,
            records: frames.len() as u64,
            bytes: frames.iter().map(|f| f.len() as u64).sum(),
        })
    }

    /// Reads records from `offset`: at most `max_records`, and no more than `max_bytes` as
    /// encoded in a response unless the first one alone is bigger. Returns them with the end
    /// offset at the time of the read. `offset == end` gives no records; beyond it,
    /// `OffsetOutOfRange`.
    pub(crate) fn read(
        &self,
        offset: u64,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<(Vec<Record>, u64)> {
        let end = self.end_offset();
        if offset > end {
            return Err(BrokerError::OffsetOutOfRange {
                topic: self.topic.clone(),
                partition: self.partition,
                offset,
                start: 0,
                end,
            });
        }
        // `offset <= end == positions.len()`, so it fits in a usize.
        let first = offset as usize;
        let mut records = Vec::new();
        let mut bytes = 0usize;
        for (&position, expected) in self.positions[first..].iter().zip(offset..) {
            if records.len() >= max_records {
                break;
            }
            let (payload, _next) = self
                .file
                .read_at(position)
                .map_err(BrokerError::log(&self.path))?;
            // What the record will take inside a response: tag, length, then the record.
            let size = 1 + prost::length_delimiter_len(payload.len()) + payload.len();
            if !records.is_empty() && bytes + size > max_bytes {
                break;
            }
            bytes += size;
            let record =
                Record::decode(payload.as_slice()).map_err(|error| BrokerError::Corrupt {
                    path: self.path.clone(),
                    position,
                    reason: format!("the record does not decode: {error}"),
                })?;
            if record.offset != expected {
                return Err(BrokerError::Corrupt {
                    path: self.path.clone(),
                    position,
                    reason: format!("expected offset {expected}, found offset {}", record.offset),
                });
            }
            records.push(record);
        }
        Ok((records, end))
    }

    /// Forces everything appended to disk.
    pub(crate) fn sync(&mut self) -> Result<()> {
        self.file.sync().map_err(BrokerError::log(&self.path))
    }

    /// Syncs if the interval policy's time has come.
    pub(crate) fn sync_if_due(&mut self) -> Result<()> {
        self.file
            .sync_if_due()
            .map_err(BrokerError::log(&self.path))
    }

    fn failed_error(&self) -> BrokerError {
        BrokerError::PartitionFailed {
            topic: self.topic.clone(),
            partition: self.partition,
        }
    }
}

/// A partition as the service shares it: the log behind a lock, plus lock-free views of
/// its end offset and size for listing and for waking subscribers.
#[derive(Debug)]
pub(crate) struct Partition {
    id: u32,
    topic: String,
    /// Appends and syncs take it for writing, reads for reading. Only blocking threads
    /// take it: an fsync can hold it for milliseconds.
    log: RwLock<PartitionLog>,
    /// The end offset, published after every append (while the lock is still held, so it
    /// never goes backwards).
    end: watch::Sender<u64>,
    size_bytes: AtomicU64,
}

impl Partition {
    /// Shares an opened log.
    pub(crate) fn new(log: PartitionLog) -> Partition {
        Partition {
            id: log.partition,
            topic: log.topic.clone(),
            end: watch::Sender::new(log.end_offset()),
            size_bytes: AtomicU64::new(log.size_bytes()),
            log: RwLock::new(log),
        }
    }

    /// The partition's number within its topic.
    pub(crate) fn id(&self) -> u32 {
        self.id
    }

    /// The offset the next record will get.
    pub(crate) fn end_offset(&self) -> u64 {
        *self.end.borrow()
    }

    /// The log's size on disk.
    pub(crate) fn size_bytes(&self) -> u64 {
        self.size_bytes.load(Ordering::Acquire)
    }

    /// A receiver that sees every new end offset.
    pub(crate) fn watch_end(&self) -> watch::Receiver<u64> {
        self.end.subscribe()
    }

    /// Blocking: appends `events` and publishes the new end offset.
    pub(crate) fn append(&self, events: Vec<Event>, append_time: Millis) -> Result<Appended> {
        let mut log = self.write()?;
        let appended = log.append(events, append_time)?;
        self.size_bytes.store(log.size_bytes(), Ordering::Release);
        self.end.send_replace(log.end_offset());
        Ok(appended)
    }

    /// Blocking: see [`PartitionLog::read`].
    pub(crate) fn read(
        &self,
        offset: u64,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<(Vec<Record>, u64)> {
        self.read_lock()?.read(offset, max_records, max_bytes)
    }

    /// Blocking: forces everything appended to disk.
    pub(crate) fn sync(&self) -> Result<()> {
        self.write()?.sync()
    }

    /// Blocking: syncs if the interval policy's time has come.
    pub(crate) fn sync_if_due(&self) -> Result<()> {
        self.write()?.sync_if_due()
    }

    // A poisoned lock means a panic mid-operation: the index may not match the file, so
    // the partition is treated like one whose append failed.
    fn write(&self) -> Result<RwLockWriteGuard<'_, PartitionLog>> {
        self.log.write().map_err(|_| self.failed_error())
    }

    fn read_lock(&self) -> Result<RwLockReadGuard<'_, PartitionLog>> {
        self.log.read().map_err(|_| self.failed_error())
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
    use std::fs;

    fn event(i: u64) -> Event {
        Event {
            id: format!("e-{i}"),
            key: format!("k-{}", i % 3),
            payload: format!("payload of event {i}").into_bytes().into(),
            ..Event::default()
        }
    }

    fn open(dir: &Path) -> Result<PartitionLog> {
        PartitionLog::open(dir, "t", 0, FsyncPolicy::Never)
    }

    fn read_all(log: &PartitionLog) -> Vec<Record> {
        let (records, end) = log.read(0, usize::MAX, usize::MAX).unwrap();
        assert_eq!(records.len() as u64, end);
        records
    }

    /// A log of `n` records appended in a few batches, with where each frame starts and
    /// the file's length.
    fn log_of(dir: &Path, n: u64) -> (Vec<u64>, u64) {
        let mut log = open(dir).unwrap();
        for batch in (0..n).collect::<Vec<_>>().chunks(3) {
            log.append(batch.iter().copied().map(event).collect(), Millis(1))
                .unwrap();
        }
        log.sync().unwrap();
        (log.positions.clone(), log.size_bytes())
    }

    #[test]
    fn offsets_start_at_zero_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = open(dir.path()).unwrap();
        assert_eq!(log.end_offset(), 0);
        let first = log.append(vec![event(0), event(1)], Millis(7)).unwrap();
        let second = log.append(vec![event(2)], Millis(8)).unwrap();
        assert_eq!((first.base_offset, first.records), (0, 2));
        assert_eq!((second.base_offset, second.records), (2, 1));
        let records = read_all(&log);
        for (i, record) in records.iter().enumerate() {
            assert_eq!(record.offset, i as u64);
            assert_eq!(record.partition, 0);
            assert_eq!(record.event, Some(event(i as u64)));
        }
        assert_eq!(records[2].append_time, Some(Millis(8).into()));
    }

    #[test]
    fn reads_respect_their_limits_but_always_make_progress() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = open(dir.path()).unwrap();
        log.append((0..10).map(event).collect(), Millis(0)).unwrap();
        let (records, end) = log.read(2, 3, usize::MAX).unwrap();
        assert_eq!(
            records.iter().map(|r| r.offset).collect::<Vec<_>>(),
            [2, 3, 4]
        );
        assert_eq!(end, 10);
        // A byte budget smaller than one record still yields that record.
        let (records, _) = log.read(5, 100, 1).unwrap();
        assert_eq!(records.len(), 1);
        let one = records[0].encoded_len() + 2;
        let (records, _) = log.read(0, 100, 3 * one + 1).unwrap();
        assert_eq!(records.len(), 3);
        let (records, end) = log.read(10, 100, usize::MAX).unwrap();
        assert!(records.is_empty());
        assert_eq!(end, 10);
        let error = log.read(11, 100, usize::MAX).unwrap_err();
        assert!(
            matches!(
                error,
                BrokerError::OffsetOutOfRange {
                    offset: 11,
                    end: 10,
                    ..
                }
            ),
            "{error:?}"
        );
    }

    #[test]
    fn a_torn_tail_is_cut_back_to_the_last_whole_record() {
        let dir = tempfile::tempdir().unwrap();
        let (positions, len) = log_of(dir.path(), 10);
        let path = dir.path().join(SEGMENT_FILE);
        let original = fs::read(&path).unwrap();
        assert_eq!(original.len() as u64, len);
        // Frame k occupies positions[k]..ends[k].
        let ends: Vec<u64> = positions[1..].iter().copied().chain([len]).collect();
        let cuts = [
            len - 1,
            len - 5,
            ends[8] + 1,
            ends[7],
            ends[7] + 3,
            positions[5] + 4,
            positions[5] + 8,
            positions[0] + 1,
            positions[0],
        ];
        for cut in cuts {
            fs::write(&path, &original[..cut as usize]).unwrap();
            let whole = ends.iter().filter(|&&end| end <= cut).count() as u64;
            let mut log = open(dir.path()).unwrap();
            assert_eq!(log.end_offset(), whole, "cut at byte {cut}");
            let appended = log.append(vec![event(100)], Millis(0)).unwrap();
            assert_eq!(
                appended.base_offset, whole,
                "cut at byte {cut}: offset reused or skipped"
            );
            drop(log);
            let log = open(dir.path()).unwrap();
            let records = read_all(&log);
            assert_eq!(records.len() as u64, whole + 1);
            assert_eq!(records.last().unwrap().event, Some(event(100)));
        }
    }

    #[test]
    fn garbage_after_the_last_record_is_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        let (_, len) = log_of(dir.path(), 4);
        let path = dir.path().join(SEGMENT_FILE);
        let original = fs::read(&path).unwrap();
        let tails: [&[u8]; 4] = [
            &[0xff; 3],
            &[0xff; 64],
            // A frame header promising far more than the file holds.
            &[0xff, 0xff, 0xff, 0x7f, 1, 2, 3, 4, 5],
            // A whole-looking frame whose checksum is wrong.
            &[4, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4],
        ];
        for tail in tails {
            let mut damaged = original.clone();
            damaged.extend_from_slice(tail);
            fs::write(&path, &damaged).unwrap();
            let mut log = open(dir.path()).unwrap();
            assert_eq!(log.end_offset(), 4, "tail {tail:?}");
            assert_eq!(log.size_bytes(), len, "tail {tail:?}");
            assert_eq!(
                log.append(vec![event(9)], Millis(0)).unwrap().base_offset,
                4
            );
            drop(log);
            fs::write(&path, &original).unwrap();
        }
    }

    #[test]
    fn a_damaged_last_record_is_dropped_not_served() {
        let dir = tempfile::tempdir().unwrap();
        let (_, len) = log_of(dir.path(), 5);
        let path = dir.path().join(SEGMENT_FILE);
        let mut damaged = fs::read(&path).unwrap();
        damaged[len as usize - 2] ^= 0x5a;
        fs::write(&path, &damaged).unwrap();
        let log = open(dir.path()).unwrap();
        assert_eq!(log.end_offset(), 4);
        assert_eq!(read_all(&log).len(), 4);
    }

    /// Frames that pass their checksum but break the offset sequence are corruption: the
    /// broker must stop rather than guess (and maybe hand out an offset twice).
    #[test]
    fn records_out_of_sequence_stop_recovery_naming_the_file_and_position() {
        let frames: [(&str, Vec<Vec<u8>>); 4] = [
            ("a gap", vec![record(0, 0), record(0, 2)]),
            ("a repeat", vec![record(0, 0), record(0, 1), record(0, 1)]),
            ("a foreign partition", vec![record(0, 0), record(3, 1)]),
            ("an undecodable record", vec![record(0, 0), vec![0xff; 12]]),
        ];
        for (what, frames) in frames {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join(SEGMENT_FILE);
            let (mut file, _) = LogFile::open(&path, MAGIC, FsyncPolicy::Never, |_, _| {}).unwrap();
            let slices: Vec<&[u8]> = frames.iter().map(Vec::as_slice).collect();
            let positions = file.append(&slices).unwrap();
            drop(file);
            match open(dir.path()) {
                Err(BrokerError::Corrupt {
                    path: at,
                    position,
                    reason,
                }) => {
                    assert_eq!(at, path, "{what}");
                    assert_eq!(position, *positions.last().unwrap(), "{what}: {reason}");
                }
                other => panic!("{what}: expected corruption, got {other:?}"),
            }
        }
    }

    fn record(partition: u32, offset: u64) -> Vec<u8> {
        Record {
            partition,
            offset,
            append_time: None,
            event: Some(event(offset)),
        }
        .encode_to_vec()
    }

    #[test]
    fn the_end_offset_watch_follows_appends() {
        let dir = tempfile::tempdir().unwrap();
        let partition = Partition::new(open(dir.path()).unwrap());
        let mut end = partition.watch_end();
        assert_eq!(*end.borrow_and_update(), 0);
        partition
            .append(vec![event(0), event(1)], Millis(0))
            .unwrap();
        assert!(end.has_changed().unwrap());
        assert_eq!(*end.borrow_and_update(), 2);
        assert_eq!(partition.end_offset(), 2);
        assert!(partition.size_bytes() > 0);
    }

    fn any_event() -> impl Strategy<Value = Event> {
        (
            "[a-z0-9-]{1,12}",
            ".{0,12}",
            proptest::collection::hash_map("[a-z]{1,4}", ".{0,6}", 0..3),
            proptest::collection::vec(any::<u8>(), 0..300),
            proptest::option::of(any::<i32>()),
        )
            .prop_map(|(id, key, attributes, payload, millis)| Event {
                id,
                key,
                attributes,
                payload: payload.into(),
                event_time: millis.map(|ms| Millis(i64::from(ms)).into()),
                ..Event::default()
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        #[test]
        fn appended_batches_survive_a_reopen(
            batches in proptest::collection::vec(
                proptest::collection::vec(any_event(), 1..8),
                1..8,
            ),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let mut log = open(dir.path()).unwrap();
            let mut expected = Vec::new();
            for (i, batch) in batches.into_iter().enumerate() {
                let appended = log.append(batch.clone(), Millis(i as i64)).unwrap();
                prop_assert_eq!(appended.base_offset, expected.len() as u64);
                expected.extend(batch.into_iter().map(|e| (e, i as i64)));
            }
            drop(log);

            let log = open(dir.path()).unwrap();
            prop_assert_eq!(log.end_offset(), expected.len() as u64);
            let records = read_all(&log);
            let found = records.into_iter().zip(expected).enumerate();
            for (offset, (record, (event, batch))) in found {
                prop_assert_eq!(record.offset, offset as u64);
                prop_assert_eq!(record.append_time, Some(Millis(batch).into()));
                prop_assert_eq!(record.event, Some(event));
            }
        }
    }
}
