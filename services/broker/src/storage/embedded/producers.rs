//! Idempotent producers: what a partition remembers of each producer so that a retried
//! batch is acknowledged again instead of stored twice.
//!
//! A producer numbers its records per partition from 0 and stamps each batch with its id
//! and the sequence of its first record. Per producer the partition keeps the last
//! sequence it stored and the last few batches (sequence range → base offset):
//!
//! - the next batch in sequence is appended;
//! - a batch equal to one of the remembered ones is a retry: acknowledged with the offsets
//!   it was stored at, nothing written;
//! - a batch behind that is not remembered, or one that leaves a gap, is refused — the
//!   producer lost track, and guessing would either duplicate or lose records.
//!
//! The table is rebuilt on recovery from a snapshot taken whenever a segment is sealed plus
//! the batches after it (every stored batch carries its producer id and sequence), and it
//! survives retention: snapshots outlive the segments they summarise. Producers silent for
//! longer than the expiry are forgotten; if one comes back, its next batch is accepted as
//! the start of a new run.

use serde::{Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};
use std::path::Path;

/// Batches remembered per producer: a producer keeps at most this many in flight per
/// partition and can have any of them retried.
pub(crate) const REMEMBERED_BATCHES: usize = 5;
/// The magic of producer snapshot files; the trailing digit is the content's version.
const MAGIC: [u8; 8] = *b"RNLPRDS1";

/// One stored batch, as the table remembers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct StoredRun {
    pub(crate) base_sequence: u64,
    pub(crate) record_count: u32,
    pub(crate) base_offset: u64,
}

/// What one producer has stored in the partition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ProducerState {
    /// The newest batches, oldest first.
    recent: VecDeque<StoredRun>,
    /// When the producer last stored a batch (append time, Unix ms).
    last_append: i64,
}

impl ProducerState {
    fn last_sequence(&self) -> Option<u64> {
        self.recent
            .back()
            .map(|run| run.base_sequence + u64::from(run.record_count) - 1)
    }
}

/// What to do with an incoming idempotent batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// New: store it.
    Append,
    /// A retry of a batch stored at this base offset.
    Duplicate(u64),
    /// Refused; the message says why.
    OutOfSequence { expected: u64 },
    /// Behind the last stored sequence but not one of the remembered batches.
    TooOld { last: u64 },
}

/// The producers of one partition.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ProducerTable {
    producers: HashMap<u64, ProducerState>,
}

impl ProducerTable {
    /// Decides what to do with a batch of `count` records from `producer` starting at
    /// sequence `base_sequence`.
    pub(crate) fn check(&self, producer: u64, base_sequence: u64, count: u32) -> Verdict {
        let Some(state) = self.producers.get(&producer) else {
            return Verdict::Append;
        };
        if let Some(run) = state
            .recent
            .iter()
            .find(|run| run.base_sequence == base_sequence && run.record_count == count)
        {
            return Verdict::Duplicate(run.base_offset);
        }
        match state.last_sequence() {
            Some(last) if base_sequence == last + 1 => Verdict::Append,
            Some(last) if base_sequence <= last => Verdict::TooOld { last },
            Some(last) => Verdict::OutOfSequence { expected: last + 1 },
            None => Verdict::Append,
        }
    }

    /// Records a batch stored at `base_offset`.
    pub(crate) fn record(&mut self, producer: u64, run: StoredRun, append_time: i64) {
        let state = self
            .producers
            .entry(producer)
            .or_insert_with(|| ProducerState {
                recent: VecDeque::with_capacity(REMEMBERED_BATCHES),
                last_append: append_time,
            });
        // A run that does not follow on (a producer back after expiry) starts afresh.
        if state
            .last_sequence()
            .is_some_and(|last| run.base_sequence != last + 1)
        {
            state.recent.clear();
        }
        if state.recent.len() == REMEMBERED_BATCHES {
            state.recent.pop_front();
        }
        state.recent.push_back(run);
        state.last_append = append_time;
    }

    /// Forgets producers that have stored nothing since `before` (Unix ms).
    pub(crate) fn expire(&mut self, before: i64) {
        self.producers
            .retain(|_, state| state.last_append >= before);
    }

    /// Producers remembered.
    pub(crate) fn len(&self) -> usize {
        self.producers.len()
    }

    /// Blocking: saves the table as of `offset` (every batch before it is in the table).
    pub(crate) fn save(&self, path: &Path, offset: u64) -> runnel_log::Result<()> {
        let snapshot = Snapshot {
            offset,
            table: self.clone(),
        };
        let json = serde_json::to_vec(&snapshot)
            .map_err(|e| runnel_log::Error::Io(std::io::Error::other(e)))?;
        runnel_log::write_atomic(path, MAGIC, &json)
    }

    /// Blocking: reads a snapshot and the offset it was taken at.
    pub(crate) fn load(path: &Path) -> Result<Option<(ProducerTable, u64)>, String> {
        let Some(bytes) = runnel_log::read_atomic(path, MAGIC).map_err(|e| e.to_string())? else {
            return Ok(None);
        };
        let snapshot: Snapshot =
            serde_json::from_slice(&bytes).map_err(|e| format!("it does not parse: {e}"))?;
        Ok(Some((snapshot.table, snapshot.offset)))
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Snapshot {
    offset: u64,
    table: ProducerTable,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(base_sequence: u64, record_count: u32, base_offset: u64) -> StoredRun {
        StoredRun {
            base_sequence,
            record_count,
            base_offset,
        }
    }

    #[test]
    fn in_sequence_batches_append_and_retries_are_recognised() {
        let mut table = ProducerTable::default();
        assert_eq!(table.check(7, 0, 10), Verdict::Append);
        table.record(7, run(0, 10, 100), 1);
        assert_eq!(table.check(7, 10, 5), Verdict::Append);
        table.record(7, run(10, 5, 200), 2);
        assert_eq!(table.check(7, 0, 10), Verdict::Duplicate(100));
        assert_eq!(table.check(7, 10, 5), Verdict::Duplicate(200));
        assert_eq!(
            table.check(7, 16, 1),
            Verdict::OutOfSequence { expected: 15 }
        );
        assert_eq!(table.check(7, 3, 1), Verdict::TooOld { last: 14 });
        // Other producers are independent.
        assert_eq!(table.check(8, 42, 1), Verdict::Append);
    }

    #[test]
    fn only_the_last_few_batches_are_remembered() {
        let mut table = ProducerTable::default();
        for i in 0..=REMEMBERED_BATCHES as u64 {
            table.record(1, run(i, 1, 1000 + i), 0);
        }
        assert_eq!(
            table.check(1, 0, 1),
            Verdict::TooOld {
                last: REMEMBERED_BATCHES as u64
            }
        );
        assert_eq!(table.check(1, 1, 1), Verdict::Duplicate(1001));
    }

    #[test]
    fn expiry_forgets_silent_producers_and_snapshots_round_trip() {
        let mut table = ProducerTable::default();
        table.record(1, run(0, 1, 0), 10);
        table.record(2, run(0, 1, 1), 20);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("producers");
        table.save(&path, 2).unwrap();
        assert_eq!(
            ProducerTable::load(&path).unwrap(),
            Some((table.clone(), 2))
        );
        table.expire(15);
        assert_eq!(table.len(), 1);
        assert_eq!(
            table.check(1, 5, 1),
            Verdict::Append,
            "forgotten: a fresh start"
        );
        assert_eq!(ProducerTable::load(&dir.path().join("none")).unwrap(), None);
    }

    #[test]
    fn a_producer_back_after_a_gap_starts_a_new_run() {
        let mut table = ProducerTable::default();
        table.record(1, run(0, 5, 0), 0);
        table.record(1, run(100, 5, 50), 1);
        assert_eq!(table.check(1, 0, 5), Verdict::TooOld { last: 104 });
        assert_eq!(table.check(1, 105, 1), Verdict::Append);
    }
}
