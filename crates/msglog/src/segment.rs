//! One shard's segment files: appending, rolling, deleting what is released, and the
//! recovery scan.
//!
//! ```text
//! <dir>/<first id, 20 digits>.log    a segment: a runnel-log file of records (see record.rs)
//! ```
//!
//! The last segment is the active one; the others are sealed (fsync'd when they were
//! rolled, never written again). A sealed segment is deleted once every entry in it is
//! released, oldest first, so the segments always hold a run of consecutive ids.

use crate::record::{self, EntryKind, MAGIC, Record};
use crate::{Entry, Error};
use bytes::Bytes;
use runnel_log::{FsyncPolicy, LogFile, SyncHandle};
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A sealed segment, as far as deleting it is concerned.
#[derive(Debug)]
struct Sealed {
    path: PathBuf,
    /// Its last entry id (the id before its first when it holds none).
    last: u64,
    bytes: u64,
}

/// What the recovery scan found in a shard.
#[derive(Debug, Default)]
pub(crate) struct Recovered {
    /// Entries not released, in id order.
    pub(crate) pending: VecDeque<(EntryKind, Entry)>,
    /// The id the next entry gets.
    pub(crate) next_id: u64,
    /// Every entry up to this id was released.
    pub(crate) released_through: u64,
    /// Bytes cut from a torn tail.
    pub(crate) truncated_bytes: u64,
}

/// A shard's segments.
#[derive(Debug)]
pub(crate) struct Segments {
    dir: PathBuf,
    sealed: VecDeque<Sealed>,
    active: LogFile,
    /// The first id of the active segment (its name).
    active_first: u64,
    /// The sync handle of the active segment, shared with the syncer thread.
    active_sync: Arc<SyncHandle>,
    segment_bytes: u64,
}

fn segment_path(dir: &Path, first_id: u64) -> PathBuf {
    dir.join(format!("{first_id:020}.log"))
}

/// The magic of the shard's recovery point ([`runnel_log::recovery`]: which segment, by
/// first id, is fsync'd how far); the trailing digit is the content's version.
const RECOVERY_POINT_MAGIC: [u8; 8] = *b"RNMRCPT1";

/// The recovery point of the shard in `dir`, if one was saved and reads back whole.
fn read_recovery_point(dir: &Path) -> Option<(u64, u64)> {
    runnel_log::recovery::load(dir, RECOVERY_POINT_MAGIC)
}

/// Blocking: saves the recovery point of the shard in `dir` durably.
pub(crate) fn write_recovery_point(dir: &Path, extent: (u64, u64)) -> Result<(), Error> {
    runnel_log::recovery::save(dir, RECOVERY_POINT_MAGIC, extent).map_err(|source| Error::Io {
        path: dir.join(runnel_log::recovery::FILE_NAME),
        source,
    })
}

/// Blocking: rewrites the saved recovery point of the shard in `dir` in place, without an
/// fsync: if a crash loses it, the older point stands, which only says less.
pub(crate) fn refresh_recovery_point(dir: &Path, extent: (u64, u64)) -> Result<(), Error> {
    runnel_log::recovery::refresh(dir, RECOVERY_POINT_MAGIC, extent).map_err(|source| Error::Io {
        path: dir.join(runnel_log::recovery::FILE_NAME),
        source,
    })
}

fn io(path: &Path) -> impl FnOnce(runnel_log::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_owned(),
        source,
    }
}

impl Segments {
    /// Opens (or creates) the shard directory `dir` and scans every segment: checks that
    /// ids run on without a gap, cuts a torn tail off the active segment, and returns the
    /// entries not yet released. Sealed segments that are wholly released are deleted.
    ///
    /// What was fsync'd — a sealed segment whole, the active one as far as the recovery
    /// point says — must be there frame for frame: a bad frame in it is damage, refused as
    /// [`Error::Damaged`] with nothing cut off, never taken for a torn tail.
    pub(crate) fn open(dir: &Path, segment_bytes: u64) -> Result<(Segments, Recovered), Error> {
        std::fs::create_dir_all(dir).map_err(|e| Error::Io {
            path: dir.to_owned(),
            source: e.into(),
        })?;
        let mut firsts = Vec::new();
        let entries = std::fs::read_dir(dir).map_err(|e| Error::Io {
            path: dir.to_owned(),
            source: e.into(),
        })?;
        for entry in entries {
            let entry = entry.map_err(|e| Error::Io {
                path: dir.to_owned(),
                source: e.into(),
            })?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if let Some(stem) = name.strip_suffix(".log")
                && let Ok(first) = stem.parse::<u64>()
            {
                firsts.push(first);
            }
        }
        firsts.sort_unstable();

        let recovery_point = read_recovery_point(dir);
        let mut recovered = Recovered::default();
        let mut expected: Option<u64> = None;
        let mut sealed = VecDeque::new();
        let mut active = None;
        for (i, &first) in firsts.iter().enumerate() {
            let path = segment_path(dir, first);
            if let Some(expected) = expected
                && first != expected
            {
                return Err(Error::Gap {
                    path,
                    expected,
                    found: first,
                });
            }
            let mut next = first;
            let mut problem: Option<String> = None;
            let durable = match recovery_point {
                // A sealed segment was fsync'd whole when it was rolled.
                _ if i + 1 < firsts.len() => std::fs::metadata(&path).map_or(0, |m| m.len()),
                Some((segment, len)) if segment == first => len,
                _ => 0,
            };
            let opened =
                LogFile::open_keeping(&path, MAGIC, FsyncPolicy::Never, durable, |_, payload| {
                    if problem.is_some() {
                        return;
                    }
                    match record::decode(payload) {
                        Ok(Record::Entry(kind, entry)) => {
                            if entry.id != next {
                                problem =
                                    Some(format!("entry {} where {next} was expected", entry.id));
                            } else {
                                next += 1;
                                if entry.id > recovered.released_through {
                                    recovered.pending.push_back((kind, entry));
                                }
                            }
                        }
                        Ok(Record::Skipped { first, last }) => {
                            if first != next {
                                problem = Some(format!(
                                    "skipped {first}..={last} where {next} was expected"
                                ));
                            } else {
                                next = last + 1;
                            }
                        }
                        Ok(Record::Released { through }) => {
                            if through >= next {
                                problem = Some(format!(
                                    "released through {through}, but only {next} ids were written"
                                ));
                            } else if through > recovered.released_through {
                                recovered.released_through = through;
                                while recovered
                                    .pending
                                    .front()
                                    .is_some_and(|(_, e)| e.id <= through)
                                {
                                    recovered.pending.pop_front();
                                }
                            }
                        }
                        Err(reason) => problem = Some(reason),
                    }
                });
            let (file, recovery) = match opened {
                Ok(opened) => opened,
                Err(runnel_log::Error::Damaged { position, .. }) => {
                    return Err(Error::Damaged { path, position });
                }
                Err(source) => return Err(Error::Io { path, source }),
            };
            if let Some(reason) = problem {
                return Err(Error::Corrupt { path, reason });
            }
            recovered.truncated_bytes += recovery.truncated_bytes;
            expected = Some(next);
            if i + 1 == firsts.len() {
                active = Some(file);
            } else {
                sealed.push_back(Sealed {
                    path,
                    last: next - 1,
                    bytes: file.len(),
                });
            }
        }
        // Ids start at 1, so that "released through 0" means nothing was.
        recovered.next_id = expected.unwrap_or(1);
        let (active, active_first) = match (active, firsts.last()) {
            (Some(file), Some(&first)) => (file, first),
            _ => {
                let path = segment_path(dir, recovered.next_id);
                let file = LogFile::open(&path, MAGIC, FsyncPolicy::Never, |_, _| {})
                    .map_err(io(&path))?
                    .0;
                (file, recovered.next_id)
            }
        };
        let active_sync = Arc::new(active.sync_handle().map_err(io(active.path()))?);
        let mut segments = Segments {
            dir: dir.to_owned(),
            sealed,
            active,
            active_first,
            active_sync,
            segment_bytes,
        };
        segments.delete_released(recovered.released_through);
        Ok((segments, recovered))
    }

    /// Appends frames, each given as a head and its body's chunks, with one vectored write:
    /// the chunks go to the file as they are, never concatenated first, and each frame reads
    /// back as its head followed by its chunks, exactly as if it had been written whole.
    pub(crate) fn append(&mut self, frames: &[(&[u8], &[Bytes])]) -> Result<(), Error> {
        let mut slices: Vec<&[u8]> =
            Vec::with_capacity(frames.iter().map(|(_, body)| 1 + body.len()).sum());
        let mut ends = Vec::with_capacity(frames.len());
        for (head, body) in frames {
            slices.push(head);
            slices.extend(body.iter().map(|chunk| chunk.as_ref()));
            ends.push(slices.len());
        }
        let mut start = 0;
        let parts: Vec<&[&[u8]]> = ends
            .iter()
            .map(|&end| {
                let frame = &slices[start..end];
                start = end;
                frame
            })
            .collect();
        let path = self.active.path().to_owned();
        self.active.append_parts(&parts).map_err(io(&path))?;
        Ok(())
    }

    /// The shard's directory.
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// The active segment (by its first id) and its length: what an fsync now covers.
    pub(crate) fn active_extent(&self) -> (u64, u64) {
        (self.active_first, self.active.len())
    }

    /// The sync handle of the active segment.
    pub(crate) fn sync_handle(&self) -> Arc<SyncHandle> {
        Arc::clone(&self.active_sync)
    }

    /// Forces the active segment to disk, here and now.
    pub(crate) fn sync(&mut self) -> Result<(), Error> {
        let path = self.active.path().to_owned();
        self.active.sync().map_err(io(&path))
    }

    /// Seals the active segment if it is full and starts the next one at `next_id`.
    pub(crate) fn roll_if_full(&mut self, next_id: u64) -> Result<(), Error> {
        if self.active.len() < self.segment_bytes {
            return Ok(());
        }
        self.sync()?;
        let path = segment_path(&self.dir, next_id);
        let (file, _) =
            LogFile::open(&path, MAGIC, FsyncPolicy::Never, |_, _| {}).map_err(io(&path))?;
        let sync = Arc::new(file.sync_handle().map_err(io(&path))?);
        let old = std::mem::replace(&mut self.active, file);
        self.active_sync = sync;
        self.active_first = next_id;
        self.sealed.push_back(Sealed {
            path: old.path().to_owned(),
            last: next_id - 1,
            bytes: old.len(),
        });
        Ok(())
    }

    /// Deletes the sealed segments, oldest first, whose entries are all released.
    pub(crate) fn delete_released(&mut self, through: u64) {
        while self.sealed.front().is_some_and(|s| s.last <= through) {
            let Some(segment) = self.sealed.pop_front() else {
                break;
            };
            match std::fs::remove_file(&segment.path) {
                Ok(()) => {
                    tracing::debug!(path = %segment.path.display(), bytes = segment.bytes, "deleted a released segment");
                }
                Err(error) => {
                    // It is retried at the next start, whose scan finds it wholly released.
                    tracing::warn!(path = %segment.path.display(), %error, "cannot delete a released segment");
                }
            }
        }
    }

    /// Bytes on disk.
    pub(crate) fn bytes(&self) -> u64 {
        self.sealed.iter().map(|s| s.bytes).sum::<u64>() + self.active.len()
    }

    /// Segment files.
    pub(crate) fn count(&self) -> usize {
        self.sealed.len() + 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Body, Destination};

    fn entry(id: u64) -> Entry {
        Entry {
            id,
            destination: Destination {
                topic: Arc::from("t"),
                partition: 0,
            },
            producer_id: 1,
            base_sequence: id,
            count: 1,
            body: Bytes::from(format!("message {id}")).into(),
        }
    }

    fn write(segments: &mut Segments, ids: std::ops::RangeInclusive<u64>) {
        for id in ids {
            let e = entry(id);
            let head = record::entry_head(EntryKind::Received, &e);
            segments.append(&[(&head, e.body.chunks())]).unwrap();
            segments.roll_if_full(id + 1).unwrap();
        }
    }

    #[test]
    fn a_new_shard_starts_at_id_one() {
        let dir = tempfile::tempdir().unwrap();
        let (segments, recovered) = Segments::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(recovered.next_id, 1);
        assert!(recovered.pending.is_empty());
        assert_eq!(segments.count(), 1);
    }

    #[test]
    fn pending_entries_survive_a_reopen_and_released_segments_go() {
        let dir = tempfile::tempdir().unwrap();
        let (mut segments, _) = Segments::open(dir.path(), 200).unwrap();
        write(&mut segments, 1..=20);
        assert!(segments.count() > 3, "small segments roll");
        segments.append(&[(&record::released(12), &[])]).unwrap();
        drop(segments);
        let (segments, recovered) = Segments::open(dir.path(), 200).unwrap();
        let ids: Vec<u64> = recovered.pending.iter().map(|(_, e)| e.id).collect();
        assert_eq!(ids, (13..=20).collect::<Vec<_>>());
        assert_eq!(recovered.next_id, 21);
        assert_eq!(recovered.released_through, 12);
        // The oldest segments, wholly released, were deleted; the one holding 13 was not.
        let names: Vec<u64> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| {
                e.unwrap().file_name().to_string_lossy()[..20]
                    .parse()
                    .unwrap()
            })
            .collect();
        assert!(names.iter().all(|&first| first > 1), "{names:?}");
        assert!(names.iter().any(|&first| first <= 13), "{names:?}");
        assert_eq!(segments.count(), names.len());
    }

    /// Flips one bit in the middle of `path`; returns the damaged bytes.
    fn flip_middle(path: &Path) -> Vec<u8> {
        let mut bytes = std::fs::read(path).unwrap();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0x08;
        std::fs::write(path, &bytes).unwrap();
        bytes
    }

    #[test]
    fn a_bad_frame_in_a_sealed_segment_is_damage_and_nothing_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let (mut segments, _) = Segments::open(dir.path(), 400).unwrap();
        write(&mut segments, 1..=30);
        drop(segments);
        let first = segment_path(dir.path(), 1);
        let damaged = flip_middle(&first);
        let error = Segments::open(dir.path(), 400).unwrap_err();
        assert!(
            matches!(error, Error::Damaged { ref path, .. } if *path == first),
            "{error}"
        );
        assert_eq!(
            std::fs::read(&first).unwrap(),
            damaged,
            "nothing was cut off"
        );
    }

    #[test]
    fn in_the_active_segment_a_bad_frame_is_damage_inside_the_recovery_point_and_a_torn_tail_beyond()
     {
        let dir = tempfile::tempdir().unwrap();
        let (mut segments, _) = Segments::open(dir.path(), 1 << 20).unwrap();
        write(&mut segments, 1..=20);
        segments.sync().unwrap();
        write_recovery_point(dir.path(), segments.active_extent()).unwrap();
        // Written after the recovery point was saved: a torn tail there is cut, as ever.
        write(&mut segments, 21..=22);
        drop(segments);
        let active = segment_path(dir.path(), 1);
        let mut torn = std::fs::read(&active).unwrap();
        torn.extend_from_slice(&[0xAB; 40]);
        std::fs::write(&active, &torn).unwrap();
        let (segments, recovered) = Segments::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(recovered.next_id, 23);
        assert!(recovered.truncated_bytes > 0);
        drop(segments);

        let damaged = flip_middle(&active);
        let error = Segments::open(dir.path(), 1 << 20).unwrap_err();
        assert!(matches!(error, Error::Damaged { .. }), "{error}");
        assert_eq!(
            std::fs::read(&active).unwrap(),
            damaged,
            "nothing was cut off"
        );
    }

    #[test]
    fn a_missing_segment_is_a_gap_not_a_silent_loss() {
        let dir = tempfile::tempdir().unwrap();
        let (mut segments, _) = Segments::open(dir.path(), 200).unwrap();
        write(&mut segments, 1..=20);
        drop(segments);
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        std::fs::remove_file(&files[1]).unwrap();
        let error = Segments::open(dir.path(), 200).unwrap_err();
        assert!(matches!(error, Error::Gap { .. }), "{error}");
    }

    #[test]
    fn a_frame_that_checks_out_but_is_not_a_record_is_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let (mut segments, _) = Segments::open(dir.path(), 1 << 20).unwrap();
        write(&mut segments, 1..=2);
        segments.append(&[(b"\x09nonsense", &[])]).unwrap();
        drop(segments);
        let error = Segments::open(dir.path(), 1 << 20).unwrap_err();
        assert!(matches!(error, Error::Corrupt { .. }), "{error}");
    }

    #[test]
    fn skipped_ids_are_accounted_for() {
        let dir = tempfile::tempdir().unwrap();
        let (mut segments, _) = Segments::open(dir.path(), 1 << 20).unwrap();
        write(&mut segments, 1..=2);
        segments.append(&[(&record::skipped(3, 5), &[])]).unwrap();
        write(&mut segments, 6..=6);
        drop(segments);
        let (_, recovered) = Segments::open(dir.path(), 1 << 20).unwrap();
        let ids: Vec<u64> = recovered.pending.iter().map(|(_, e)| e.id).collect();
        assert_eq!(ids, [1, 2, 6]);
        assert_eq!(recovered.next_id, 7);
    }

    /// Cuts `body` at `cuts` (positions, in any order, repeats allowed) into chunks, empty
    /// ones included, as merged submissions can bring them.
    fn chunked(body: &[u8], cuts: &[usize]) -> Vec<Bytes> {
        let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (body.len() + 1)).collect();
        cuts.sort_unstable();
        let mut chunks = Vec::new();
        let mut start = 0;
        for cut in cuts.into_iter().chain([body.len()]) {
            chunks.push(Bytes::copy_from_slice(&body[start..cut]));
            start = cut;
        }
        chunks
    }

    proptest::proptest! {
        /// An entry written as the chunks it was merged from is on disk byte for byte what
        /// the same entry written whole is, and recovers as that entry: writing in parts
        /// changes nothing of the format.
        #[test]
        fn an_entry_written_as_parts_is_byte_identical_to_one_written_whole(
            bodies in proptest::collection::vec(
                (proptest::collection::vec(proptest::prelude::any::<u8>(), 1..400),
                 proptest::collection::vec(proptest::prelude::any::<usize>(), 0..12)),
                1..6,
            ),
            sent in proptest::prelude::any::<bool>(),
        ) {
            let kind = if sent { EntryKind::Sent } else { EntryKind::Received };
            let whole_dir = tempfile::tempdir().unwrap();
            let parts_dir = tempfile::tempdir().unwrap();
            let (mut whole, _) = Segments::open(whole_dir.path(), 1 << 20).unwrap();
            let (mut parts, _) = Segments::open(parts_dir.path(), 1 << 20).unwrap();
            let mut written = Vec::new();
            for (i, (body, cuts)) in bodies.iter().enumerate() {
                let chunks = chunked(body, cuts);
                let mut e = entry(i as u64 + 1);
                e.body = Body::from_chunks(chunks);
                let head = record::entry_head(kind, &e);
                let whole_body = [Bytes::copy_from_slice(body)];
                whole.append(&[(&head, &whole_body)]).unwrap();
                parts.append(&[(&head, e.body.chunks())]).unwrap();
                written.push(e);
            }
            drop((whole, parts));
            let path = |dir: &Path| segment_path(dir, 1);
            let on_disk = std::fs::read(path(parts_dir.path())).unwrap();
            proptest::prop_assert_eq!(&on_disk, &std::fs::read(path(whole_dir.path())).unwrap());
            let (_, recovered) = Segments::open(parts_dir.path(), 1 << 20).unwrap();
            let read: Vec<(EntryKind, Entry)> = recovered.pending.into_iter().collect();
            let expected: Vec<(EntryKind, Entry)> =
                written.into_iter().map(|e| (kind, e)).collect();
            proptest::prop_assert_eq!(read, expected);
        }
    }

    /// A crash can tear the active segment at any byte: every cut recovers exactly the
    /// entries that were whole, and the next entry is numbered right after them.
    #[test]
    fn a_segment_torn_at_every_byte_recovers_its_whole_entries() {
        let dir = tempfile::tempdir().unwrap();
        let (mut segments, _) = Segments::open(dir.path(), 1 << 20).unwrap();
        write(&mut segments, 1..=4);
        drop(segments);
        let path = segment_path(dir.path(), 1);
        let original = std::fs::read(&path).unwrap();
        let mut ends = Vec::new();
        let mut at = runnel_log::HEADER_LEN as usize;
        for id in 1..=4 {
            let e = entry(id);
            at += record::entry_frame_len(&e.destination.topic, e.body.len()) as usize;
            ends.push(at);
        }
        assert_eq!(at, original.len());
        for cut in 0..=original.len() {
            std::fs::write(&path, &original[..cut]).unwrap();
            let (_, recovered) = Segments::open(dir.path(), 1 << 20).unwrap();
            let whole = ends.iter().filter(|&&end| end <= cut).count() as u64;
            let ids: Vec<u64> = recovered.pending.iter().map(|(_, e)| e.id).collect();
            assert_eq!(ids, (1..=whole).collect::<Vec<_>>(), "cut at {cut}");
            assert_eq!(recovered.next_id, whole + 1, "cut at {cut}");
        }
    }
}
