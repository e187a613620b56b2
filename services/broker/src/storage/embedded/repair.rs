//! `runnel broker repair`: the way back for a partition that damage stopped (see "A damaged
//! partition" in docs/broker.md), run with the broker stopped.
//!
//! It reads the partition's segments back as the broker's checks do — every frame's
//! checksum, every batch header, offsets running on, and in the active segment only what the
//! recovery point says was fsync'd (beyond it is a torn tail, which the broker cuts itself) —
//! and finds the first damage. Applied, it keeps every batch before the damage and moves
//! everything from the damage on (the rest of that segment, every later segment, the
//! producer snapshots taken after it) into `damaged-<unix ms>/` inside the partition's
//! directory, deleting nothing. The broker then opens the partition with the damaged
//! segment as its active one, and the offsets from the damage on are given to new records:
//! consumers that had read past it must be reset.
//!
//! It holds the data directory's lock, so it refuses to run beside a broker.

use super::partition::{offsets_of, read_recovery_point, sync_dir};
use super::segment::{Checked, Segment, file_stem};
use super::topics::lock_data_dir;
use crate::error::{BrokerError, Result};
use runnel_log::recovery::FILE_NAME as RECOVERY_POINT;
use runnel_log::{FsyncPolicy, HEADER_LEN};
use std::fs;
use std::path::{Path, PathBuf};

/// The first damage in a partition, and what repairing it moves aside.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    /// The damaged segment's log file.
    pub segment: PathBuf,
    /// Where in it the damage starts: everything before is kept.
    pub position: u64,
    /// What is wrong there.
    pub reason: String,
    /// The offset of the first record lost: the partition's end offset after the repair.
    pub first_lost_offset: u64,
    /// Files moved aside whole (later segments, their indexes, later producer snapshots).
    pub later_files: Vec<PathBuf>,
    /// Bytes moved aside: the damaged segment's rest and the later files.
    pub bytes: u64,
}

/// What `repair` found, and did.
#[derive(Debug)]
pub struct Repair {
    /// The partition's directory.
    pub partition_dir: PathBuf,
    /// The first damage, if there is any.
    pub damage: Option<Damage>,
    /// Where what was cut is kept, when the repair was applied.
    pub moved_to: Option<PathBuf>,
}

/// Blocking: finds the first damage in `partition` of `topic` under the broker's
/// `data_dir` and, with `apply`, repairs it (see the module's documentation). Refuses
/// with [`BrokerError::DataDirInUse`] while a broker runs on `data_dir`.
pub fn repair(data_dir: &Path, topic: &str, partition: u32, apply: bool) -> Result<Repair> {
    let dir = data_dir
        .join("topics")
        .join(topic)
        .join(partition.to_string());
    if !dir.is_dir() {
        return Err(BrokerError::InvalidArgument(format!(
            "{} holds no partition {partition} of topic {topic:?}",
            data_dir.display()
        )));
    }
    let lock = lock_data_dir(data_dir)?;
    let damage = find_damage(&dir)?;
    let moved_to = match (&damage, apply) {
        (Some(damage), true) => Some(cut(&dir, damage)?),
        _ => None,
    };
    drop(lock);
    Ok(Repair {
        partition_dir: dir,
        damage,
        moved_to,
    })
}

/// The first damage in the partition in `dir`, if any.
fn find_damage(dir: &Path) -> Result<Option<Damage>> {
    let bases = offsets_of(dir, ".log").map_err(BrokerError::io(dir))?;
    let durable = read_recovery_point(dir);
    let mut expected = bases.first().copied().unwrap_or_default();
    for (i, &base) in bases.iter().enumerate() {
        let checked = Segment::check(dir, base).map_err(BrokerError::Segment)?;
        let damage = if base != expected {
            // Records are missing before this segment: it does not follow on.
            Some((
                0,
                format!(
                    "the segment starts at offset {base}, but the one before ends at {expected}"
                ),
            ))
        } else {
            let active = i + 1 == bases.len();
            let fsynced = match durable {
                Some((segment, len)) if segment == base => len,
                _ => 0,
            };
            // In the active segment, a bad frame beyond what was fsync'd is a torn tail.
            let torn = active && checked.good_bytes >= fsynced;
            checked
                .damage
                .clone()
                .filter(|_| !torn)
                .map(|reason| (checked.good_bytes, reason))
        };
        if let Some((position, reason)) = damage {
            return Ok(Some(plan(
                dir,
                &bases[i..],
                &checked,
                position,
                reason,
                expected,
            )?));
        }
        expected = checked.next_offset;
    }
    Ok(None)
}

/// What cutting at `position` of the first of `from` moves aside.
fn plan(
    dir: &Path,
    from: &[u64],
    checked: &Checked,
    position: u64,
    reason: String,
    expected: u64,
) -> Result<Damage> {
    let first_lost_offset = if position == 0 {
        expected
    } else {
        checked.next_offset
    };
    let mut later_files = Vec::new();
    for &base in &from[1..] {
        for extension in ["log", "index"] {
            later_files.push(dir.join(format!("{}.{extension}", file_stem(base))));
        }
    }
    let snapshots = offsets_of(dir, ".producers").map_err(BrokerError::io(dir))?;
    for snapshot in snapshots.into_iter().filter(|&s| s > first_lost_offset) {
        later_files.push(dir.join(format!("{}.producers", file_stem(snapshot))));
    }
    later_files.retain(|f| f.exists());
    let mut bytes = checked.len - position;
    for file in &later_files {
        bytes += fs::metadata(file).map_err(BrokerError::io(file))?.len();
    }
    Ok(Damage {
        segment: checked.path.clone(),
        position,
        reason,
        first_lost_offset,
        later_files,
        bytes,
    })
}

/// Moves everything from the damage on into `damaged-<unix ms>/` in `dir`.
fn cut(dir: &Path, damage: &Damage) -> Result<PathBuf> {
    let aside = dir.join(format!("damaged-{}", runnel_proto::now_millis().0));
    fs::create_dir(&aside).map_err(BrokerError::io(&aside))?;
    for file in &damage.later_files {
        let name = file.file_name().unwrap_or_default();
        fs::rename(file, aside.join(name)).map_err(BrokerError::io(file))?;
    }
    // The damaged segment's rest is copied out, then cut off (or the whole file replaced
    // by an empty segment at its base, when not even its header is whole).
    let segment = &damage.segment;
    let bytes = fs::read(segment).map_err(BrokerError::io(segment))?;
    let from = usize::try_from(damage.position)
        .unwrap_or(usize::MAX)
        .min(bytes.len());
    let name = segment.file_name().unwrap_or_default().to_string_lossy();
    let rest = aside.join(format!("{name}.from-{}", damage.position));
    fs::write(&rest, &bytes[from..]).map_err(BrokerError::io(&rest))?;
    fs::File::open(&rest)
        .and_then(|f| f.sync_all())
        .map_err(BrokerError::io(&rest))?;
    sync_dir(&aside)?;
    if damage.position < HEADER_LEN {
        Segment::create(dir, damage.first_lost_offset, FsyncPolicy::Always, 4096)
            .map_err(BrokerError::Segment)?;
    } else {
        let file = fs::OpenOptions::new()
            .write(true)
            .open(segment)
            .map_err(BrokerError::io(segment))?;
        file.set_len(damage.position)
            .and_then(|()| file.sync_all())
            .map_err(BrokerError::io(segment))?;
    }
    // The segment is the active one now: its index is rebuilt, and the recovery point
    // spoke of another.
    for stale in [segment.with_extension("index"), dir.join(RECOVERY_POINT)] {
        match fs::remove_file(&stale) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(BrokerError::Io {
                    path: stale,
                    source: e,
                });
            }
        }
    }
    sync_dir(dir)?;
    Ok(aside)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::Incoming;
    use crate::storage::embedded::partition::{LogSettings, PartitionLog};
    use crate::storage::embedded::recent::Window;
    use runnel_proto::Millis;
    use runnel_proto::records;
    use runnel_proto::v1::{Compression, Event};
    use std::time::Duration;

    fn settings() -> LogSettings {
        LogSettings {
            policy: FsyncPolicy::Never,
            segment_bytes: 64 * 1024,
            segment_age: Duration::from_secs(3600),
            index_interval: 4096,
            producer_expiry: Duration::from_secs(3600),
            dedup: Window {
                age: Duration::from_secs(900),
                max_events: 0,
            },
        }
    }

    fn batch(first: u64) -> Incoming {
        let events: Vec<Event> = (first..first + 10)
            .map(|i| Event {
                id: format!("e-{i}"),
                payload: vec![b'x'; 500].into(),
                ..Event::default()
            })
            .collect();
        Incoming {
            compression: Compression::None,
            record_count: 10,
            records: records::encode(&events),
            producer_id: 0,
            base_sequence: 0,
            identities: None,
        }
    }

    /// The bytes of every file under `dir`, by path.
    fn contents(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
        let mut files: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_file())
            .map(|p| {
                let bytes = fs::read(&p).unwrap();
                (p, bytes)
            })
            .collect();
        files.sort();
        files
    }

    #[test]
    fn a_repair_keeps_what_comes_before_the_damage_and_moves_the_rest_aside() {
        let data = tempfile::tempdir().unwrap();
        let dir = data.path().join("topics/t/0");
        let mut log = PartitionLog::open(&dir, "t", 0, settings()).unwrap();
        for i in 0..60 {
            log.append(batch(i * 10), Millis(0)).unwrap();
        }
        drop(log);
        let mut segments = offsets_of(&dir, ".log").unwrap();
        assert!(segments.len() >= 4, "{segments:?}");
        let damaged = dir.join(format!("{}.log", file_stem(segments[1])));
        let mut bytes = fs::read(&damaged).unwrap();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0x20;
        fs::write(&damaged, &bytes).unwrap();
        let before = contents(&dir);
        let total: usize = before.iter().map(|(_, b)| b.len()).sum();

        // Not beside a running broker.
        let broker = lock_data_dir(data.path()).unwrap();
        let refused = repair(data.path(), "t", 0, true).unwrap_err();
        assert!(matches!(refused, BrokerError::DataDirInUse(_)), "{refused}");
        drop(broker);

        // A look first: it finds the damage and changes nothing.
        let found = repair(data.path(), "t", 0, false).unwrap();
        let damage = found.damage.clone().expect("the damage is found");
        assert_eq!(damage.segment, damaged);
        assert!(damage.position > HEADER_LEN && damage.position <= middle as u64);
        assert!(damage.first_lost_offset > segments[1], "{damage:?}");
        assert!(found.moved_to.is_none());
        assert_eq!(contents(&dir), before, "a look changes nothing");

        let repaired = repair(data.path(), "t", 0, true).unwrap();
        let aside = repaired.moved_to.expect("applied");
        assert_eq!(repaired.damage, Some(damage.clone()));
        // Nothing is deleted: what left the partition is in `aside`, byte for byte.
        let kept: usize = contents(&dir).iter().map(|(_, b)| b.len()).sum();
        let moved: usize = contents(&aside).iter().map(|(_, b)| b.len()).sum();
        let dropped_index = before
            .iter()
            .find(|(p, _)| *p == damaged.with_extension("index"))
            .map_or(0, |(_, b)| b.len());
        let old_recovery = before
            .iter()
            .find(|(p, _)| p.ends_with(RECOVERY_POINT))
            .map_or(0, |(_, b)| b.len());
        assert_eq!(kept + moved + dropped_index + old_recovery, total);
        assert_eq!(moved as u64, damage.bytes);

        // The broker opens it: every record before the damage, and it goes on from there.
        let mut log = PartitionLog::open(&dir, "t", 0, settings()).unwrap();
        assert_eq!(log.end_offset(), damage.first_lost_offset);
        let mut next = 0;
        while next < log.end_offset() {
            let read = log.read(next, 1 << 20).unwrap();
            for batch in &read.batches {
                assert_eq!(batch.header.base_offset, next);
                next = batch.header.next_offset();
            }
        }
        log.append(batch(10_000), Millis(0)).unwrap();
        assert_eq!(log.end_offset(), damage.first_lost_offset + 10);
        drop(log);
        segments = offsets_of(&dir, ".log").unwrap();
        assert_eq!(segments.len(), 2, "the damaged segment is the active one");
        assert!(repair(data.path(), "t", 0, false).unwrap().damage.is_none());
    }

    #[test]
    fn in_the_active_segment_only_what_was_fsynced_counts_as_damage() {
        use crate::storage::embedded::partition::Partition;
        let data = tempfile::tempdir().unwrap();
        let dir = data.path().join("topics/t/0");
        let log = PartitionLog::open(&dir, "t", 0, settings()).unwrap();
        let partition = Partition::new(log);
        for i in 0..5 {
            partition.append(batch(i * 10), Millis(0)).unwrap();
        }
        partition.sync().unwrap();
        partition.save_recovery_point().unwrap();
        drop(partition);
        let active = dir.join(format!("{}.log", file_stem(0)));
        let mut bytes = fs::read(&active).unwrap();
        let fsynced = bytes.len();
        // A torn tail beyond the recovery point: the broker cuts it, no repair needed.
        bytes.extend_from_slice(&[0xAB; 64]);
        fs::write(&active, &bytes).unwrap();
        assert!(repair(data.path(), "t", 0, false).unwrap().damage.is_none());
        // A flipped byte inside it: damage.
        bytes[fsynced / 2] ^= 0x01;
        fs::write(&active, &bytes).unwrap();
        let damage = repair(data.path(), "t", 0, true).unwrap().damage.unwrap();
        assert!(damage.position <= fsynced as u64 / 2);
        let log = PartitionLog::open(&dir, "t", 0, settings()).unwrap();
        assert_eq!(log.end_offset(), damage.first_lost_offset);
    }
}
