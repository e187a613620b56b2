//! One segment of a partition: `<base offset>.log`, the batches of a contiguous offset
//! range, and `<base offset>.index`, its sparse index (written when the segment is sealed).
//!
//! The active (last) segment takes appends. When it is full or old enough it is *sealed*:
//! fsync'd, its index written, and never written again — which is what lets a restart open
//! it without reading it ([`Segment::open_sealed`]) and retention delete it whole. The
//! active segment is always scanned on open ([`Segment::recover`]): its torn tail cut, its
//! index rebuilt, and its offsets checked to run on without a gap or a repeat.

use super::index::{SegmentSummary, SparseIndex};
use crate::batch::{BatchHeader, StoredBatch};
use bytes::Bytes;
use runnel_log::{FRAME_HEADER_LEN, FsyncPolicy, HEADER_LEN, LogFile, SyncHandle};
use std::path::{Path, PathBuf};

/// The magic of segment files; the trailing digit is the content's version.
pub(crate) const LOG_MAGIC: [u8; 8] = *b"RNLSEGM1";
/// Bytes read from a segment at a time when scanning.
const SCAN_CHUNK: usize = 1 << 20;

/// A segment's file name stem: its base offset, zero-padded so names sort by offset.
pub(crate) fn file_stem(base_offset: u64) -> String {
    format!("{base_offset:020}")
}

/// Why a segment cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SegmentError {
    /// The file could not be read or written.
    #[error("{}: {source}", path.display())]
    Log {
        /// The segment's log or index file.
        path: PathBuf,
        /// What the log layer said.
        source: runnel_log::Error,
    },
    /// The file holds whole, checksummed frames that are not what this segment should hold.
    #[error("{} is corrupt at position {position}: {reason}", path.display())]
    Corrupt {
        /// The segment's log file.
        path: PathBuf,
        /// Where the problem is.
        position: u64,
        /// What is wrong.
        reason: String,
    },
}

/// What reading a segment back found ([`Segment::check`]).
#[derive(Debug)]
pub(crate) struct Checked {
    /// The segment's log file.
    pub(crate) path: PathBuf,
    /// Its length.
    pub(crate) len: u64,
    /// Where its good frames end: the end of the file, or where the damage starts.
    pub(crate) good_bytes: u64,
    /// The offset after the last good batch.
    pub(crate) next_offset: u64,
    /// What is wrong at `good_bytes`, if anything.
    pub(crate) damage: Option<String>,
}

impl Checked {
    /// The damage as an error, if there is any.
    pub(crate) fn damage(&self) -> Option<SegmentError> {
        self.damage.as_ref().map(|reason| SegmentError::Corrupt {
            path: self.path.clone(),
            position: self.good_bytes,
            reason: reason.clone(),
        })
    }
}

/// One segment.
#[derive(Debug)]
pub(crate) struct Segment {
    base_offset: u64,
    next_offset: u64,
    first_time: Option<i64>,
    last_time: Option<i64>,
    file: LogFile,
    index: SparseIndex,
    index_path: PathBuf,
}

/// What a scan found in a segment file: each batch's position, header and frame length.
type Scanned = Vec<(u64, BatchHeader, u64)>;

impl Segment {
    fn paths(dir: &Path, base_offset: u64) -> (PathBuf, PathBuf) {
        let stem = file_stem(base_offset);
        (
            dir.join(format!("{stem}.log")),
            dir.join(format!("{stem}.index")),
        )
    }

    fn from_parts(base_offset: u64, file: LogFile, index_path: PathBuf, interval: u64) -> Segment {
        Segment {
            base_offset,
            next_offset: base_offset,
            first_time: None,
            last_time: None,
            file,
            index: SparseIndex::new(interval),
            index_path,
        }
    }

    /// Blocking: creates an empty segment starting at `base_offset` (its header synced).
    pub(crate) fn create(
        dir: &Path,
        base_offset: u64,
        policy: FsyncPolicy,
        interval: u64,
    ) -> Result<Segment, SegmentError> {
        let (log_path, index_path) = Self::paths(dir, base_offset);
        let log = |source| SegmentError::Log {
            path: log_path.clone(),
            source,
        };
        // A leftover from a roll that did not finish holds no acknowledged record.
        if log_path.exists() {
            std::fs::remove_file(&log_path).map_err(|e| log(e.into()))?;
        }
        let (file, _) = LogFile::open(&log_path, LOG_MAGIC, policy, |_, _| {}).map_err(log)?;
        Ok(Self::from_parts(base_offset, file, index_path, interval))
    }

    /// Blocking: opens the active segment after any kind of stop. Every batch is checked;
    /// a torn tail is cut; `visit` sees every batch header in order.
    ///
    /// `durable` is how many bytes of the file were known fsync'd (the partition's
    /// recovery point; 0 when unknown): a bad frame there is damage, refused as
    /// [`SegmentError::Corrupt`], not a torn tail to cut off.
    pub(crate) fn recover(
        dir: &Path,
        base_offset: u64,
        policy: FsyncPolicy,
        interval: u64,
        durable: u64,
        mut visit: impl FnMut(&BatchHeader),
    ) -> Result<Segment, SegmentError> {
        let (log_path, index_path) = Self::paths(dir, base_offset);
        let mut scanned: Scanned = Vec::new();
        let mut corruption: Option<(u64, String)> = None;
        let opened = LogFile::open_keeping(
            &log_path,
            LOG_MAGIC,
            policy,
            durable,
            |position, payload| {
                if corruption.is_none() {
                    match BatchHeader::decode(payload) {
                        Ok(header) => scanned.push((
                            position,
                            header,
                            FRAME_HEADER_LEN + payload.len() as u64,
                        )),
                        Err(reason) => corruption = Some((position, reason)),
                    }
                }
            },
        );
        let (file, recovery) = match opened {
            Ok(opened) => opened,
            Err(runnel_log::Error::Damaged { position, durable }) => {
                return Err(SegmentError::Corrupt {
                    path: log_path,
                    position,
                    reason: format!(
                        "a damaged frame inside the first {durable} bytes, which were fsync'd: not a torn tail, so nothing after it was cut off (see \"A damaged partition\" in docs/broker.md)"
                    ),
                });
            }
            Err(source) => {
                return Err(SegmentError::Log {
                    path: log_path.clone(),
                    source,
                });
            }
        };
        if let Some((position, reason)) = corruption {
            return Err(SegmentError::Corrupt {
                path: log_path,
                position,
                reason,
            });
        }
        if recovery.truncated_bytes > 0 {
            tracing::warn!(path = %log_path.display(), cut_bytes = recovery.truncated_bytes, "cut a torn tail off the active segment");
        }
        let mut segment = Self::from_parts(base_offset, file, index_path, interval);
        segment.replay(&log_path, &scanned)?;
        for (_, header, _) in &scanned {
            visit(header);
        }
        Ok(segment)
    }

    /// Blocking: opens a sealed segment from its index file, or — when that is missing or
    /// does not fit — by reading it once and writing the index again.
    pub(crate) fn open_sealed(
        dir: &Path,
        base_offset: u64,
        interval: u64,
    ) -> Result<Segment, SegmentError> {
        let (log_path, index_path) = Self::paths(dir, base_offset);
        let file =
            LogFile::open_sealed(&log_path, LOG_MAGIC).map_err(|source| SegmentError::Log {
                path: log_path.clone(),
                source,
            })?;
        if let Some((index, summary)) =
            SparseIndex::load(&index_path, interval, base_offset, file.len())
        {
            return Ok(Segment {
                base_offset,
                next_offset: summary.next_offset,
                first_time: summary.first_time,
                last_time: summary.last_time,
                file,
                index,
                index_path,
            });
        }
        let scanned = scan(&file)?;
        let mut segment = Self::from_parts(base_offset, file, index_path, interval);
        segment.replay(&log_path, &scanned)?;
        segment.save_index()?;
        Ok(segment)
    }

    /// Blocking: reads every frame of the segment at `base_offset` in `dir` back, checking
    /// each one's checksum and batch header and that offsets run on from the base — what
    /// opening a sealed segment from its index skips. Does not write. `Err` only when the
    /// file cannot be read at all.
    pub(crate) fn check(dir: &Path, base_offset: u64) -> Result<Checked, SegmentError> {
        let (log_path, _) = Self::paths(dir, base_offset);
        let failed = |source| SegmentError::Log {
            path: log_path.clone(),
            source,
        };
        let len = std::fs::metadata(&log_path)
            .map_err(|e| failed(e.into()))?
            .len();
        let mut checked = Checked {
            path: log_path.clone(),
            len,
            good_bytes: 0,
            next_offset: base_offset,
            damage: None,
        };
        let file = match LogFile::open_sealed(&log_path, LOG_MAGIC) {
            Ok(file) => file,
            Err(e @ (runnel_log::Error::DamagedHeader | runnel_log::Error::BadMagic { .. })) => {
                checked.damage = Some(e.to_string());
                return Ok(checked);
            }
            Err(e) => return Err(failed(e)),
        };
        let mut position = HEADER_LEN;
        checked.good_bytes = position;
        while position < len {
            let frames = match file.read_frames(position, SCAN_CHUNK) {
                Ok(frames) => frames,
                // The frames before a bad one are read again on their own.
                Err(runnel_log::Error::BadFrame { position: bad, .. }) if bad > position => {
                    let good = usize::try_from(bad - position).unwrap_or(usize::MAX);
                    file.read_frames(position, good).map_err(failed)?
                }
                Err(e @ runnel_log::Error::BadFrame { .. }) => {
                    checked.damage = Some(e.to_string());
                    return Ok(checked);
                }
                Err(e) => return Err(failed(e)),
            };
            for (at, payload) in frames {
                let header = match BatchHeader::decode(&payload) {
                    Ok(header) if header.base_offset == checked.next_offset => header,
                    Ok(header) => {
                        checked.damage = Some(format!(
                            "expected a batch at offset {}, found one at {}",
                            checked.next_offset, header.base_offset
                        ));
                        return Ok(checked);
                    }
                    Err(reason) => {
                        checked.damage = Some(reason);
                        return Ok(checked);
                    }
                };
                position = at + FRAME_HEADER_LEN + payload.len() as u64;
                checked.good_bytes = position;
                checked.next_offset = header.next_offset();
            }
        }
        Ok(checked)
    }

    /// Rebuilds offsets, times and the index from scanned batches, checking that offsets
    /// run on from the base without a gap or a repeat.
    fn replay(&mut self, path: &Path, scanned: &Scanned) -> Result<(), SegmentError> {
        for &(position, header, len) in scanned {
            if header.base_offset != self.next_offset {
                return Err(SegmentError::Corrupt {
                    path: path.to_owned(),
                    position,
                    reason: format!(
                        "expected a batch at offset {}, found one at {}",
                        self.next_offset, header.base_offset
                    ),
                });
            }
            self.note(&header, position, len);
        }
        Ok(())
    }

    fn note(&mut self, header: &BatchHeader, position: u64, len: u64) {
        let time = header.append_time.0;
        self.index.observe(header.base_offset, position, time, len);
        self.next_offset = header.next_offset();
        self.first_time.get_or_insert(time);
        self.last_time = Some(time);
    }

    /// The first offset of this segment.
    pub(crate) fn base_offset(&self) -> u64 {
        self.base_offset
    }

    /// The offset after this segment's last record.
    pub(crate) fn next_offset(&self) -> u64 {
        self.next_offset
    }

    /// When the first batch was appended, if any was.
    pub(crate) fn first_time(&self) -> Option<i64> {
        self.first_time
    }

    /// When the last batch was appended, if any was.
    pub(crate) fn last_time(&self) -> Option<i64> {
        self.last_time
    }

    /// Bytes of the log file.
    pub(crate) fn size_bytes(&self) -> u64 {
        self.file.len()
    }

    /// Blocking: appends one batch (header then the records as received, one vectored
    /// write); syncs if the policy says so.
    pub(crate) fn append(
        &mut self,
        header: &BatchHeader,
        records: &[u8],
    ) -> Result<(), SegmentError> {
        let head = header.encode();
        let positions = self
            .file
            .append_parts(&[&[&head, records]])
            .map_err(|source| SegmentError::Log {
                path: self.file.path().to_owned(),
                source,
            })?;
        let len = FRAME_HEADER_LEN + (head.len() + records.len()) as u64;
        self.note(header, positions[0], len);
        Ok(())
    }

    /// Blocking: the batches holding offsets from `from` on, whole, whose records add up to
    /// at most `max_bytes` — except that the first is taken whatever its size when
    /// `at_least_one` — until the segment's end.
    pub(crate) fn read(
        &self,
        from: u64,
        max_bytes: usize,
        at_least_one: bool,
    ) -> Result<Vec<StoredBatch>, SegmentError> {
        let mut batches = Vec::new();
        if from >= self.next_offset {
            return Ok(batches);
        }
        let mut position = self.index.position_for_offset(from).unwrap_or(HEADER_LEN);
        let mut taken = 0usize;
        while position < self.file.len() {
            let chunk = (max_bytes - taken.min(max_bytes)).clamp(64 * 1024, SCAN_CHUNK);
            for (at, payload) in self.frames(position, chunk)? {
                position = at + FRAME_HEADER_LEN + payload.len() as u64;
                let batch = self.parse(at, payload)?;
                if batch.header.next_offset() <= from {
                    continue;
                }
                let first = batches.is_empty() && at_least_one;
                if !first && taken + batch.records.len() > max_bytes {
                    return Ok(batches);
                }
                taken += batch.records.len();
                batches.push(batch);
            }
        }
        Ok(batches)
    }

    /// Blocking: the base offset of the first batch appended at or after `time`, if any
    /// is in this segment.
    pub(crate) fn offset_for_time(&self, time: i64) -> Result<Option<u64>, SegmentError> {
        if self.last_time.is_none_or(|last| last < time) {
            return Ok(None);
        }
        let mut position = self.index.position_for_time(time).unwrap_or(HEADER_LEN);
        while position < self.file.len() {
            for (at, payload) in self.frames(position, SCAN_CHUNK)? {
                position = at + FRAME_HEADER_LEN + payload.len() as u64;
                let header = self.parse(at, payload)?.header;
                if header.append_time.0 >= time {
                    return Ok(Some(header.base_offset));
                }
            }
        }
        Ok(None)
    }

    fn frames(&self, position: u64, max_bytes: usize) -> Result<Vec<(u64, Bytes)>, SegmentError> {
        self.file
            .read_frames(position, max_bytes)
            .map_err(|source| SegmentError::Log {
                path: self.file.path().to_owned(),
                source,
            })
    }

    fn parse(&self, position: u64, payload: Bytes) -> Result<StoredBatch, SegmentError> {
        StoredBatch::parse(payload).map_err(|reason| SegmentError::Corrupt {
            path: self.file.path().to_owned(),
            position,
            reason,
        })
    }

    /// A handle that fsyncs this segment while appends go on.
    pub(crate) fn sync_handle(&self) -> Result<SyncHandle, SegmentError> {
        self.file.sync_handle().map_err(|source| SegmentError::Log {
            path: self.file.path().to_owned(),
            source,
        })
    }

    /// Blocking: fsyncs the log.
    pub(crate) fn sync(&mut self) -> Result<(), SegmentError> {
        self.file.sync().map_err(|source| SegmentError::Log {
            path: self.file.path().to_owned(),
            source,
        })
    }

    /// Blocking: fsyncs if the interval policy's time has come.
    pub(crate) fn sync_if_due(&mut self) -> Result<(), SegmentError> {
        self.file.sync_if_due().map_err(|source| SegmentError::Log {
            path: self.file.path().to_owned(),
            source,
        })
    }

    fn save_index(&self) -> Result<(), SegmentError> {
        let summary = SegmentSummary {
            next_offset: self.next_offset,
            first_time: self.first_time,
            last_time: self.last_time,
        };
        self.index
            .save(&self.index_path, summary)
            .map_err(|source| SegmentError::Log {
                path: self.index_path.clone(),
                source,
            })
    }

    /// Blocking: writes the index of a segment being sealed, once it is fsync'd whole —
    /// what lets a restart open it without reading it.
    pub(crate) fn write_index(&self) -> Result<(), SegmentError> {
        self.save_index()
    }

    /// Blocking: deletes the segment's files. Readers that still hold it keep reading
    /// (the files live on until the last handle closes).
    pub(crate) fn delete(&self) -> std::io::Result<()> {
        std::fs::remove_file(self.file.path())?;
        match std::fs::remove_file(&self.index_path) {
            Err(error) if error.kind() != std::io::ErrorKind::NotFound => Err(error),
            _ => Ok(()),
        }
    }
}

/// Reads every batch header of a sealed file.
fn scan(file: &LogFile) -> Result<Scanned, SegmentError> {
    let mut scanned = Vec::new();
    let mut position = HEADER_LEN;
    while position < file.len() {
        let frames =
            file.read_frames(position, SCAN_CHUNK)
                .map_err(|source| SegmentError::Log {
                    path: file.path().to_owned(),
                    source,
                })?;
        for (at, payload) in frames {
            let len = FRAME_HEADER_LEN + payload.len() as u64;
            let header = BatchHeader::decode(&payload).map_err(|reason| SegmentError::Corrupt {
                path: file.path().to_owned(),
                position: at,
                reason,
            })?;
            scanned.push((at, header, len));
            position = at + len;
        }
    }
    Ok(scanned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use runnel_proto::Millis;
    use runnel_proto::v1::Compression;

    fn header(base_offset: u64, count: u32, time: i64) -> BatchHeader {
        BatchHeader {
            compression: Compression::None,
            record_count: count,
            base_offset,
            append_time: Millis(time),
            producer_id: 0,
            base_sequence: 0,
            deduplicated: false,
        }
    }

    /// A segment at base 1000 with `n` batches of 10 records of 100 bytes, at times 10 i.
    fn filled(dir: &Path, n: u64) -> Segment {
        let mut segment = Segment::create(dir, 1000, FsyncPolicy::Never, 256).unwrap();
        for i in 0..n {
            segment
                .append(&header(1000 + 10 * i, 10, 10 * i as i64), &[i as u8; 100])
                .unwrap();
        }
        segment
    }

    fn bases(batches: &[StoredBatch]) -> Vec<u64> {
        batches.iter().map(|b| b.header.base_offset).collect()
    }

    #[test]
    fn reads_find_the_batch_holding_an_offset() {
        let dir = tempfile::tempdir().unwrap();
        let segment = filled(dir.path(), 20);
        assert_eq!(segment.next_offset(), 1200);
        assert_eq!(bases(&segment.read(1000, 1, true).unwrap()), [1000]);
        // Whole batches within the budget: 350 bytes hold three 100-byte batches.
        assert_eq!(
            bases(&segment.read(1055, 350, true).unwrap()),
            [1050, 1060, 1070]
        );
        assert_eq!(bases(&segment.read(1055, 299, true).unwrap()), [1050, 1060]);
        // Past the first segment of a read, nothing is forced.
        assert!(segment.read(1055, 50, false).unwrap().is_empty());
        assert_eq!(segment.read(1199, usize::MAX, true).unwrap().len(), 1);
        assert!(segment.read(1200, usize::MAX, true).unwrap().is_empty());
        assert_eq!(segment.read(0, usize::MAX, true).unwrap().len(), 20);
        let batch = &segment.read(1130, 1, true).unwrap()[0];
        assert_eq!(batch.records.as_ref(), &[13u8; 100][..]);
    }

    #[test]
    fn time_lookups_find_the_first_batch_at_or_after() {
        let dir = tempfile::tempdir().unwrap();
        let segment = filled(dir.path(), 20);
        assert_eq!(segment.offset_for_time(0).unwrap(), Some(1000));
        assert_eq!(segment.offset_for_time(-50).unwrap(), Some(1000));
        assert_eq!(segment.offset_for_time(55).unwrap(), Some(1060));
        assert_eq!(segment.offset_for_time(190).unwrap(), Some(1190));
        assert_eq!(segment.offset_for_time(191).unwrap(), None);
    }

    #[test]
    fn sealed_segments_reopen_from_their_index_or_a_scan() {
        let dir = tempfile::tempdir().unwrap();
        let mut segment = filled(dir.path(), 20);
        segment.sync().unwrap();
        segment.write_index().unwrap();
        let expected = segment.read(1000, usize::MAX, true).unwrap();
        drop(segment);
        let reopened = Segment::open_sealed(dir.path(), 1000, 256).unwrap();
        assert_eq!(
            (
                reopened.next_offset(),
                reopened.first_time(),
                reopened.last_time()
            ),
            (1200, Some(0), Some(190))
        );
        assert_eq!(reopened.read(1000, usize::MAX, true).unwrap(), expected);
        // Without its index: read once, index written again.
        let (_, index_path) = Segment::paths(dir.path(), 1000);
        std::fs::remove_file(&index_path).unwrap();
        let rebuilt = Segment::open_sealed(dir.path(), 1000, 256).unwrap();
        assert_eq!(rebuilt.next_offset(), 1200);
        assert_eq!(rebuilt.offset_for_time(55).unwrap(), Some(1060));
        assert!(index_path.exists());
    }

    #[test]
    fn recovery_cuts_a_torn_batch_and_refuses_offsets_that_do_not_run_on() {
        let dir = tempfile::tempdir().unwrap();
        let segment = filled(dir.path(), 5);
        let (log_path, _) = Segment::paths(dir.path(), 1000);
        drop(segment);
        let bytes = std::fs::read(&log_path).unwrap();
        std::fs::write(&log_path, &bytes[..bytes.len() - 7]).unwrap();
        let mut seen = Vec::new();
        let mut segment = Segment::recover(dir.path(), 1000, FsyncPolicy::Never, 256, 0, |h| {
            seen.push(h.base_offset)
        })
        .unwrap();
        assert_eq!(seen, [1000, 1010, 1020, 1030]);
        assert_eq!(segment.next_offset(), 1040);
        // An append after recovery continues at the recovered end.
        segment.append(&header(1040, 1, 99), b"x").unwrap();
        // A batch that repeats offsets is corruption, named with its position.
        segment.append(&header(1040, 1, 99), b"y").unwrap();
        drop(segment);
        let error =
            Segment::recover(dir.path(), 1000, FsyncPolicy::Never, 256, 0, |_| {}).unwrap_err();
        assert!(matches!(error, SegmentError::Corrupt { .. }), "{error}");
        assert!(
            error
                .to_string()
                .contains("expected a batch at offset 1041"),
            "{error}"
        );
    }
}
