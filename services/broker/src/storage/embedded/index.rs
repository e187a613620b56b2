//! A segment's sparse index, which answers both offset and time lookups.
//!
//! Every `interval` bytes of log (and for the first batch) it records where a batch starts,
//! with the batch's base offset and append time. Offsets and append times only grow within
//! a partition (the broker never lets the append clock go back), so one list sorted by
//! position is sorted by both: a lookup is a binary search for the closest entry before
//! the target, then a short scan of the log. At 24 bytes per 4 KiB of log the index of a
//! 128 MiB segment is 768 KiB — kept in memory, and written beside the segment when it is
//! sealed so that a restart does not have to read the segment again.
//!
//! The file holds the segment's summary and the entries, replaced whole
//! ([`runnel_log::write_atomic`]): `next offset | first time | last time | entry*`, each
//! entry `offset | position | time`, all 8-byte little-endian.

use std::path::Path;

/// The magic of index files; the trailing digit is the content's version.
const MAGIC: [u8; 8] = *b"RNLINDX1";
const ENTRY_LEN: usize = 24;
const SUMMARY_LEN: usize = 24;

/// Where one batch starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct IndexEntry {
    pub(crate) offset: u64,
    pub(crate) position: u64,
    pub(crate) time: i64,
}

/// What an index file says about its sealed segment besides the entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SegmentSummary {
    pub(crate) next_offset: u64,
    pub(crate) first_time: Option<i64>,
    pub(crate) last_time: Option<i64>,
}

/// The sparse index of one segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SparseIndex {
    entries: Vec<IndexEntry>,
    interval: u64,
    /// Log bytes appended since the last entry.
    since_last: u64,
}

impl SparseIndex {
    /// An empty index that takes an entry every `interval` bytes of log.
    pub(crate) fn new(interval: u64) -> SparseIndex {
        SparseIndex {
            entries: Vec::new(),
            interval: interval.max(1),
            since_last: 0,
        }
    }

    /// Notes a batch appended at `position`, `len` bytes long.
    pub(crate) fn observe(&mut self, offset: u64, position: u64, time: i64, len: u64) {
        if self.entries.is_empty() || self.since_last >= self.interval {
            self.entries.push(IndexEntry {
                offset,
                position,
                time,
            });
            self.since_last = 0;
        }
        self.since_last += len;
    }

    /// Entries held.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.len()
    }

    /// Where to start scanning for the batch that holds `offset`: the last indexed batch
    /// starting at or before it.
    pub(crate) fn position_for_offset(&self, offset: u64) -> Option<u64> {
        let after = self.entries.partition_point(|e| e.offset <= offset);
        after.checked_sub(1).map(|i| self.entries[i].position)
    }

    /// Where to start scanning for the first batch appended at or after `time`: the last
    /// indexed batch appended before it, or the first one.
    pub(crate) fn position_for_time(&self, time: i64) -> Option<u64> {
        let before = self.entries.partition_point(|e| e.time < time);
        let i = before.saturating_sub(1);
        self.entries.get(i).map(|e| e.position)
    }

    /// The index file's contents.
    fn encode(&self, summary: SegmentSummary) -> Vec<u8> {
        let mut out = Vec::with_capacity(SUMMARY_LEN + self.entries.len() * ENTRY_LEN);
        out.extend_from_slice(&summary.next_offset.to_le_bytes());
        out.extend_from_slice(&summary.first_time.unwrap_or(i64::MIN).to_le_bytes());
        out.extend_from_slice(&summary.last_time.unwrap_or(i64::MIN).to_le_bytes());
        for e in &self.entries {
            out.extend_from_slice(&e.offset.to_le_bytes());
            out.extend_from_slice(&e.position.to_le_bytes());
            out.extend_from_slice(&e.time.to_le_bytes());
        }
        out
    }

    /// Reads an index file's contents, checking them against the segment: entries in order,
    /// inside `[base_offset, next_offset)` and before `log_len`. Anything else is an error
    /// (the caller rebuilds the index from the segment).
    fn decode(
        bytes: &[u8],
        interval: u64,
        base_offset: u64,
        log_len: u64,
    ) -> Result<(SparseIndex, SegmentSummary), String> {
        if bytes.len() < SUMMARY_LEN || !(bytes.len() - SUMMARY_LEN).is_multiple_of(ENTRY_LEN) {
            return Err(format!(
                "{} bytes is not a summary and whole entries",
                bytes.len()
            ));
        }
        let word = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap_or_default());
        let time = |at: usize| Some(word(at) as i64).filter(|t| *t != i64::MIN);
        let summary = SegmentSummary {
            next_offset: word(0),
            first_time: time(8),
            last_time: time(16),
        };
        if summary.next_offset < base_offset {
            return Err("the next offset is before the segment's base".into());
        }
        let mut entries = Vec::with_capacity((bytes.len() - SUMMARY_LEN) / ENTRY_LEN);
        for at in (SUMMARY_LEN..bytes.len()).step_by(ENTRY_LEN) {
            let entry = IndexEntry {
                offset: word(at),
                position: word(at + 8),
                time: word(at + 16) as i64,
            };
            let in_order = entries.last().is_none_or(|last: &IndexEntry| {
                entry.offset > last.offset
                    && entry.position > last.position
                    && entry.time >= last.time
            });
            let inside = entry.offset >= base_offset
                && entry.offset < summary.next_offset
                && entry.position < log_len;
            if !in_order || !inside {
                return Err(format!(
                    "entry {} is out of order or outside the segment",
                    entries.len()
                ));
            }
            entries.push(entry);
        }
        if (summary.next_offset > base_offset) == entries.is_empty() {
            return Err("the entries do not match the segment's record count".into());
        }
        let index = SparseIndex {
            entries,
            interval: interval.max(1),
            since_last: 0,
        };
        Ok((index, summary))
    }

    /// Blocking: writes the index file of a sealed segment.
    pub(crate) fn save(&self, path: &Path, summary: SegmentSummary) -> runnel_log::Result<()> {
        runnel_log::write_atomic(path, MAGIC, &self.encode(summary))
    }

    /// Blocking: reads an index file; `Ok(None)` if it is missing or does not check out.
    pub(crate) fn load(
        path: &Path,
        interval: u64,
        base_offset: u64,
        log_len: u64,
    ) -> Option<(SparseIndex, SegmentSummary)> {
        let bytes = match runnel_log::read_atomic(path, MAGIC) {
            Ok(Some(bytes)) => bytes,
            Ok(None) => return None,
            Err(error) => {
                tracing::warn!(path = %path.display(), %error, "index unreadable; rebuilding it");
                return None;
            }
        };
        match SparseIndex::decode(&bytes, interval, base_offset, log_len) {
            Ok(loaded) => Some(loaded),
            Err(reason) => {
                tracing::warn!(path = %path.display(), reason, "index does not fit its segment; rebuilding it");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Batches of 10 records, 1000 bytes each, appended at 16 + 1000 i; times step by 5.
    fn index_of(batches: u64, interval: u64) -> SparseIndex {
        let mut index = SparseIndex::new(interval);
        for i in 0..batches {
            index.observe(100 + 10 * i, 16 + 1000 * i, 5 * i as i64, 1000);
        }
        index
    }

    #[test]
    fn entries_are_sparse_but_always_include_the_first_batch() {
        let index = index_of(10, 3000);
        // Entries at batches 0, 3, 6, 9.
        assert_eq!(index.len(), 4);
        assert_eq!(index.position_for_offset(100), Some(16));
        assert_eq!(index.position_for_offset(129), Some(16));
        assert_eq!(index.position_for_offset(130), Some(3016));
        assert_eq!(index.position_for_offset(10_000), Some(9016));
        assert_eq!(index.position_for_offset(99), None);
        assert_eq!(index.position_for_time(0), Some(16));
        assert_eq!(
            index.position_for_time(15),
            Some(16),
            "batch 3 (t=15) may be preceded by t<15 batches only before it"
        );
        assert_eq!(index.position_for_time(16), Some(3016));
        assert_eq!(index.position_for_time(-5), Some(16));
        assert_eq!(index.position_for_time(1000), Some(9016));
        assert_eq!(SparseIndex::new(10).position_for_time(0), None);
    }

    #[test]
    fn files_round_trip_and_bad_ones_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("0.index");
        let index = index_of(10, 3000);
        let summary = SegmentSummary {
            next_offset: 200,
            first_time: Some(0),
            last_time: Some(45),
        };
        index.save(&path, summary).unwrap();
        let (loaded, found) = SparseIndex::load(&path, 3000, 100, 10_016).unwrap();
        assert_eq!(found, summary);
        assert_eq!(loaded.entries, index.entries);
        // Positions beyond the log, a wrong base, and a missing file: rebuild instead.
        assert!(SparseIndex::load(&path, 3000, 100, 9000).is_none());
        assert!(SparseIndex::load(&path, 3000, 150, 10_016).is_none());
        assert!(SparseIndex::load(&dir.path().join("none.index"), 3000, 100, 10_016).is_none());
        let empty = SegmentSummary {
            next_offset: 100,
            first_time: None,
            last_time: None,
        };
        SparseIndex::new(3000).save(&path, empty).unwrap();
        assert_eq!(SparseIndex::load(&path, 3000, 100, 16).unwrap().1, empty);
    }

    proptest! {
        #[test]
        fn decoding_garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = SparseIndex::decode(&bytes, 4096, 0, u64::MAX);
        }

        /// Whatever the interval, the position found for an offset is that of a batch at or
        /// before it, and no indexed batch between that one and the offset was skipped.
        #[test]
        fn lookups_land_at_or_before_their_target(interval in 1u64..5000, batches in 1u64..50, target in 0u64..700) {
            let index = index_of(batches, interval);
            match index.position_for_offset(target) {
                None => prop_assert!(target < 100),
                Some(position) => {
                    let batch = (position - 16) / 1000;
                    prop_assert!(100 + 10 * batch <= target);
                    let next = index.entries.iter().find(|e| e.position > position);
                    prop_assert!(next.is_none_or(|e| e.offset > target));
                }
            }
        }
    }
}
