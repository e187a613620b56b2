//! [`LogFile`]: one append-only file of CRC32C-framed records.

use crate::{Error, FORMAT_VERSION, FsyncPolicy, Result};
use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Bytes of the file header: magic, format version, header checksum.
pub const HEADER_LEN: u64 = 16;
/// Bytes in front of every payload: length and checksum.
pub const FRAME_HEADER_LEN: u64 = 8;
/// The largest payload one frame may hold. Far above any message the services accept,
/// and low enough that a damaged length cannot make recovery allocate gigabytes.
pub const MAX_FRAME_LEN: usize = 256 * 1024 * 1024;

/// What [`LogFile::open`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Recovery {
    /// Whole frames kept.
    pub frames: u64,
    /// Bytes cut from the tail: a torn or damaged last write.
    pub truncated_bytes: u64,
    /// Whether the file was created (or its torn header rewritten) by this open.
    pub created: bool,
}

/// An open record file, positioned at its end.
///
/// Appends take `&mut self`; reads take `&self` and use positioned reads, so a shared
/// reference can serve readers while no append is running.
#[derive(Debug)]
pub struct LogFile {
    path: PathBuf,
    file: File,
    /// Where the next frame goes: the end of the last whole frame.
    len: u64,
    policy: FsyncPolicy,
    /// Whether bytes were written since the last successful sync.
    dirty: bool,
    last_sync: Instant,
}

impl LogFile {
    /// Opens `path` (creating it with a header if it does not exist), checks the header
    /// against `magic`, calls `visit(position, payload)` for every whole frame in order,
    /// and cuts off whatever follows the last one.
    pub fn open(
        path: &Path,
        magic: [u8; 8],
        policy: FsyncPolicy,
        mut visit: impl FnMut(u64, &[u8]),
    ) -> Result<(LogFile, Recovery)> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let on_disk = file.metadata()?.len();
        let mut recovery = Recovery::default();
        if on_disk < HEADER_LEN {
            // A file shorter than its header was cut short while being created: it cannot
            // hold a record. Anything that is not the start of our header is not ours.
            let mut start = vec![0u8; on_disk as usize];
            file.read_exact_at(&mut start, 0)?;
            let header = header(magic);
            if start[..] != header[..start.len()] {
                return Err(bad_magic(magic, &start));
            }
            file.set_len(0)?;
            file.write_all_at(&header, 0)?;
            file.sync_all()?;
            sync_parent(path)?;
            recovery.created = true;
        } else {
            let mut found = [0u8; HEADER_LEN as usize];
            file.read_exact_at(&mut found, 0)?;
            check_header(magic, &found)?;
        }

        let end = scan(&file, on_disk.max(HEADER_LEN), |position, payload| {
            recovery.frames += 1;
            visit(position, payload);
        })?;
        if end < on_disk {
            recovery.truncated_bytes = on_disk - end;
            tracing::warn!(
                path = %path.display(),
                kept_bytes = end,
                cut_bytes = on_disk - end,
                "cutting a torn or damaged tail"
            );
            file.set_len(end)?;
            file.sync_all()?;
        }
        Ok((
            LogFile {
                path: path.to_owned(),
                file,
                len: end,
                policy,
                dirty: false,
                last_sync: Instant::now(),
            },
            recovery,
        ))
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file's length: header plus every whole frame.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the file holds no frame.
    pub fn is_empty(&self) -> bool {
        self.len == HEADER_LEN
    }

    /// Appends one frame per payload with a single write, then syncs if the policy is
    /// [`FsyncPolicy::Always`]. Returns where each frame starts.
    ///
    /// On error nothing is promised about the frames: the file may or may not hold them
    /// (a failed sync leaves them written but not known to be durable). A failed write is
    /// cut back off so that the next append starts at a frame boundary.
    pub fn append(&mut self, payloads: &[&[u8]]) -> Result<Vec<u64>> {
        let mut buffer = Vec::with_capacity(
            payloads
                .iter()
                .map(|p| p.len() + FRAME_HEADER_LEN as usize)
                .sum(),
        );
        let mut positions = Vec::with_capacity(payloads.len());
        for payload in payloads {
            if payload.is_empty() || payload.len() > MAX_FRAME_LEN {
                return Err(Error::PayloadSize(payload.len()));
            }
            positions.push(self.len + buffer.len() as u64);
            // Checked above: the length fits in a u32.
            buffer.extend_from_slice(&(payload.len() as u32).to_le_bytes());
            buffer.extend_from_slice(&crc32c::crc32c(payload).to_le_bytes());
            buffer.extend_from_slice(payload);
        }
        if let Err(error) = self.file.write_all_at(&buffer, self.len) {
            // Best effort: the next open cuts a partial frame off anyway.
            let _ = self.file.set_len(self.len);
            return Err(error.into());
        }
        self.len += buffer.len() as u64;
        self.dirty = true;
        if self.policy == FsyncPolicy::Always {
            self.sync()?;
        }
        Ok(positions)
    }

    /// Reads the frame at `position`: its payload and where the next frame starts.
    pub fn read_at(&self, position: u64) -> Result<(Vec<u8>, u64)> {
        let bad = |reason| Error::BadFrame { position, reason };
        if position < HEADER_LEN || position.saturating_add(FRAME_HEADER_LEN) > self.len {
            return Err(bad("outside the file"));
        }
        let mut head = [0u8; FRAME_HEADER_LEN as usize];
        self.file.read_exact_at(&mut head, position)?;
        let (len, crc) = frame_header(head);
        let next = position + FRAME_HEADER_LEN + len as u64;
        if len == 0 || len > MAX_FRAME_LEN || next > self.len {
            return Err(bad("the length is impossible"));
        }
        let mut payload = vec![0u8; len];
        self.file
            .read_exact_at(&mut payload, position + FRAME_HEADER_LEN)?;
        if crc32c::crc32c(&payload) != crc {
            return Err(bad("the checksum does not match"));
        }
        Ok((payload, next))
    }

    /// Forces everything appended so far to disk.
    pub fn sync(&mut self) -> Result<()> {
        if self.dirty {
            self.file.sync_data()?;
            self.dirty = false;
        }
        self.last_sync = Instant::now();
        Ok(())
    }

    /// Syncs if the policy is an interval and that long has passed since the last sync.
    pub fn sync_if_due(&mut self) -> Result<()> {
        match self.policy {
            FsyncPolicy::Interval(every) if self.dirty && self.last_sync.elapsed() >= every => {
                self.sync()
            }
            _ => Ok(()),
        }
    }
}

/// The 16-byte header for `magic`.
pub(crate) fn header(magic: [u8; 8]) -> [u8; HEADER_LEN as usize] {
    let mut header = [0u8; HEADER_LEN as usize];
    header[..8].copy_from_slice(&magic);
    header[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    let crc = crc32c::crc32c(&header[..12]);
    header[12..].copy_from_slice(&crc.to_le_bytes());
    header
}

/// Checks a file's first 16 bytes.
pub(crate) fn check_header(magic: [u8; 8], found: &[u8; HEADER_LEN as usize]) -> Result<()> {
    if found[..8] != magic {
        return Err(bad_magic(magic, &found[..8]));
    }
    let crc = u32::from_le_bytes([found[12], found[13], found[14], found[15]]);
    if crc32c::crc32c(&found[..12]) != crc {
        return Err(Error::DamagedHeader);
    }
    let version = u32::from_le_bytes([found[8], found[9], found[10], found[11]]);
    if version != FORMAT_VERSION {
        return Err(Error::UnsupportedVersion(version));
    }
    Ok(())
}

fn bad_magic(expected: [u8; 8], found: &[u8]) -> Error {
    Error::BadMagic {
        expected: String::from_utf8_lossy(&expected).into_owned(),
        found: String::from_utf8_lossy(found).into_owned(),
    }
}

fn frame_header(head: [u8; FRAME_HEADER_LEN as usize]) -> (usize, u32) {
    let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
    let crc = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
    (len, crc)
}

/// Calls `visit` for every whole frame after the header of a file `file_len` bytes long
/// and returns where the last one ends.
pub(crate) fn scan(file: &File, file_len: u64, mut visit: impl FnMut(u64, &[u8])) -> Result<u64> {
    let mut reader = BufReader::with_capacity(1 << 20, file);
    std::io::copy(&mut (&mut reader).take(HEADER_LEN), &mut std::io::sink())?;
    let mut position = HEADER_LEN;
    let mut payload = Vec::new();
    loop {
        if position + FRAME_HEADER_LEN > file_len {
            return Ok(position);
        }
        let mut head = [0u8; FRAME_HEADER_LEN as usize];
        reader.read_exact(&mut head)?;
        let (len, crc) = frame_header(head);
        let next = position + FRAME_HEADER_LEN + len as u64;
        if len == 0 || len > MAX_FRAME_LEN || next > file_len {
            return Ok(position);
        }
        payload.resize(len, 0);
        reader.read_exact(&mut payload)?;
        if crc32c::crc32c(&payload) != crc {
            return Ok(position);
        }
        visit(position, &payload);
        position = next;
    }
}

/// Makes a file's directory entry durable.
pub(crate) fn sync_parent(path: &Path) -> Result<()> {
    let parent = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    File::open(parent)?.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::fs;

    const MAGIC: [u8; 8] = *b"RNLTEST1";

    fn open(path: &Path) -> (LogFile, Recovery, Vec<(u64, Vec<u8>)>) {
        let mut frames = Vec::new();
        let (file, recovery) = LogFile::open(path, MAGIC, FsyncPolicy::Never, |pos, payload| {
            frames.push((pos, payload.to_vec()))
        })
        .unwrap();
        (file, recovery, frames)
    }

    fn payloads(n: usize) -> Vec<Vec<u8>> {
        (0..n)
            .map(|i| format!("record number {i}").into_bytes())
            .collect()
    }

    #[test]
    fn a_new_file_has_only_its_header() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.log");
        let (file, recovery, frames) = open(&path);
        assert!(recovery.created);
        assert!(frames.is_empty());
        assert!(file.is_empty());
        assert_eq!(fs::read(&path).unwrap(), header(MAGIC));
    }

    #[test]
    fn appended_frames_read_back_by_position_and_on_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.log");
        let (mut file, _, _) = open(&path);
        let data = payloads(5);
        let slices: Vec<&[u8]> = data.iter().map(Vec::as_slice).collect();
        let positions = file.append(&slices[..2]).unwrap();
        let more = file.append(&slices[2..]).unwrap();
        let positions: Vec<u64> = positions.into_iter().chain(more).collect();
        assert_eq!(positions[0], HEADER_LEN);
        for (i, &position) in positions.iter().enumerate() {
            let (payload, next) = file.read_at(position).unwrap();
            assert_eq!(payload, data[i]);
            assert_eq!(next, positions.get(i + 1).copied().unwrap_or(file.len()));
        }
        file.sync().unwrap();
        drop(file);
        let (file, recovery, frames) = open(&path);
        assert!(!recovery.created);
        assert_eq!(recovery.frames, 5);
        assert_eq!(recovery.truncated_bytes, 0);
        assert_eq!(frames, positions.into_iter().zip(data).collect::<Vec<_>>());
        assert_eq!(file.len(), fs::metadata(&path).unwrap().len());
    }

    #[test]
    fn empty_and_oversized_payloads_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (mut file, _, _) = open(&dir.path().join("a.log"));
        assert!(matches!(file.append(&[b""]), Err(Error::PayloadSize(0))));
        assert!(file.is_empty());
    }

    #[test]
    fn reads_at_wrong_positions_are_errors_not_panics() {
        let dir = tempfile::tempdir().unwrap();
        let (mut file, _, _) = open(&dir.path().join("a.log"));
        let positions = file.append(&[b"hello world"]).unwrap();
        for position in [0, 3, positions[0] + 1, file.len(), u64::MAX - 4] {
            assert!(file.read_at(position).is_err(), "position {position}");
        }
    }

    #[test]
    fn a_foreign_or_damaged_header_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.log");
        drop(open(&path));
        let good = fs::read(&path).unwrap();

        let foreign = LogFile::open(&path, *b"RNLOTHR1", FsyncPolicy::Never, |_, _| {});
        assert!(
            matches!(foreign, Err(Error::BadMagic { .. })),
            "{foreign:?}"
        );

        let mut damaged = good.clone();
        damaged[9] ^= 1;
        fs::write(&path, &damaged).unwrap();
        let result = LogFile::open(&path, MAGIC, FsyncPolicy::Never, |_, _| {});
        assert!(matches!(result, Err(Error::DamagedHeader)), "{result:?}");

        fs::write(&path, b"#!/bin/sh\necho hi\n").unwrap();
        let result = LogFile::open(&path, MAGIC, FsyncPolicy::Never, |_, _| {});
        assert!(matches!(result, Err(Error::BadMagic { .. })), "{result:?}");
    }

    #[test]
    fn a_header_torn_during_creation_is_rewritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.log");
        for cut in 0..HEADER_LEN as usize {
            fs::write(&path, &header(MAGIC)[..cut]).unwrap();
            let (_, recovery, frames) = open(&path);
            assert!(recovery.created, "cut {cut}");
            assert!(frames.is_empty());
            assert_eq!(fs::read(&path).unwrap(), header(MAGIC));
        }
    }

    /// Every prefix of a file — a crash at any byte of any append — recovers to the frames
    /// that were whole, and the next append lands right after them.
    #[test]
    fn truncation_at_every_byte_recovers_the_whole_frames() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.log");
        let (mut file, _, _) = open(&path);
        let data = payloads(6);
        let slices: Vec<&[u8]> = data.iter().map(Vec::as_slice).collect();
        let positions = file.append(&slices).unwrap();
        let len = file.len();
        drop(file);
        let original = fs::read(&path).unwrap();
        let ends: Vec<u64> = positions[1..].iter().copied().chain([len]).collect();
        for cut in HEADER_LEN..=len {
            fs::write(&path, &original[..cut as usize]).unwrap();
            let (mut file, recovery, frames) = open(&path);
            let whole = ends.iter().filter(|&&end| end <= cut).count();
            assert_eq!(frames.len(), whole, "cut at {cut}");
            let kept = if whole == 0 {
                HEADER_LEN
            } else {
                ends[whole - 1]
            };
            assert_eq!(recovery.truncated_bytes, cut - kept, "cut at {cut}");
            assert_eq!(file.len(), kept);
            let next = file.append(&[b"after the crash"]).unwrap();
            assert_eq!(next, [kept]);
            drop(file);
            let (_, _, frames) = open(&path);
            assert_eq!(frames.len(), whole + 1);
            assert_eq!(frames.last().unwrap().1, b"after the crash");
        }
    }

    #[test]
    fn a_zero_filled_tail_is_not_read_as_frames() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.log");
        let (mut file, _, _) = open(&path);
        file.append(&[b"one", b"two"]).unwrap();
        let len = file.len();
        drop(file);
        let mut bytes = fs::read(&path).unwrap();
        bytes.extend_from_slice(&[0u8; 4096]);
        fs::write(&path, &bytes).unwrap();
        let (file, recovery, frames) = open(&path);
        assert_eq!(frames.len(), 2);
        assert_eq!(file.len(), len);
        assert_eq!(recovery.truncated_bytes, 4096);
    }

    #[test]
    fn interval_policy_syncs_only_when_due() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.log");
        let policy = FsyncPolicy::Interval(std::time::Duration::from_secs(3600));
        let (mut file, _) = LogFile::open(&path, MAGIC, policy, |_, _| {}).unwrap();
        file.append(&[b"x"]).unwrap();
        assert!(file.dirty);
        file.sync_if_due().unwrap();
        assert!(file.dirty, "an hour has not passed");
        file.sync().unwrap();
        assert!(!file.dirty);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Whatever bytes follow a valid file, recovery never panics and keeps every frame
        /// that was whole before the garbage.
        #[test]
        fn garbage_after_whole_frames_never_loses_them(
            records in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..64), 0..8),
            garbage in proptest::collection::vec(any::<u8>(), 0..256),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("a.log");
            let (mut file, _, _) = open(&path);
            let slices: Vec<&[u8]> = records.iter().map(Vec::as_slice).collect();
            if !slices.is_empty() {
                file.append(&slices).unwrap();
            }
            drop(file);
            let mut bytes = fs::read(&path).unwrap();
            bytes.extend_from_slice(&garbage);
            fs::write(&path, &bytes).unwrap();
            let (_, _, frames) = open(&path);
            prop_assert!(frames.len() >= records.len());
            for (found, expected) in frames.iter().zip(&records) {
                prop_assert_eq!(&found.1, expected);
            }
        }

        /// Arbitrary bytes as a whole file: an error or a recovery, never a panic.
        #[test]
        fn arbitrary_files_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512), keep_header in any::<bool>()) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("a.log");
            let mut contents = if keep_header { header(MAGIC).to_vec() } else { Vec::new() };
            contents.extend_from_slice(&bytes);
            fs::write(&path, &contents).unwrap();
            let _ = LogFile::open(&path, MAGIC, FsyncPolicy::Never, |_, _| {});
        }
    }
}
