//! Entry points for the fuzz targets in `fuzz/` (the `fuzzing` feature only): the bytes a
//! message log reads back after a crash, which may be anything a torn write, a bad disk or
//! another program left there.

use crate::record::{self, EntryKind, Record};
use crate::segment::Segments;

/// Decodes `bytes` as one record's payload (what a frame that passed its checksum holds).
/// A record that decodes writes back to exactly the same bytes: the decoder accepts only
/// what the log itself writes, so nothing is silently reinterpreted.
pub fn record(bytes: &[u8]) {
    let Ok(decoded) = record::decode(bytes) else {
        return;
    };
    let encoded = match &decoded {
        Record::Entry(kind, entry) => {
            let mut head = record::entry_head(*kind, entry);
            for chunk in entry.body.chunks() {
                head.extend_from_slice(chunk);
            }
            assert!(matches!(kind, EntryKind::Received | EntryKind::Sent));
            assert!(entry.count > 0 && entry.body.len() > 0);
            head
        }
        Record::Released { through } => record::released(*through),
        Record::Skipped { first, last } => {
            assert!(first <= last);
            record::skipped(*first, *last)
        }
    };
    assert_eq!(
        encoded, bytes,
        "{decoded:?} does not write back as it was read"
    );
}

/// Recovers a shard in the empty directory `dir` whose only segment holds what `bytes`
/// describes: an error or a recovered log, never a panic. What is pending is in id order,
/// below the next id to be given.
///
/// The first byte chooses the damage: 0 appends the rest as it is after a good header (a
/// torn write, garbage); anything else writes the rest, split at every `0xff`, as frames
/// with good checksums (empty pieces left out: the log writes no empty frame), so that the
/// records inside them are what gets tested.
pub fn recover(dir: &std::path::Path, bytes: &[u8]) {
    use runnel_log::{FsyncPolicy, LogFile};
    use std::io::Write;
    let path = dir.join(format!("{:020}.log", 0));
    let (mut file, _) =
        LogFile::open(&path, record::MAGIC, FsyncPolicy::Never, |_, _| {}).expect("create");
    match bytes.split_first() {
        Some((0, rest)) => {
            drop(file);
            std::fs::OpenOptions::new()
                .append(true)
                .open(&path)
                .and_then(|mut f| f.write_all(rest))
                .expect("append");
        }
        Some((_, rest)) => {
            let frames: Vec<&[u8]> = rest
                .split(|&b| b == 0xff)
                .filter(|frame| !frame.is_empty())
                .collect();
            file.append(&frames).expect("append frames");
            drop(file);
        }
        None => drop(file),
    }
    if let Ok((segments, recovered)) = Segments::open(dir, 1 << 20) {
        assert!(segments.count() >= 1);
        let ids: Vec<u64> = recovered.pending.iter().map(|(_, e)| e.id).collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids in order: {ids:?}");
        assert!(ids.iter().all(|&id| id < recovered.next_id), "{ids:?}");
    }
}
