//! [`LogFile`]: one append-only file of CRC32C-framed records.

use crate::faults::{self, Op};
use crate::{Error, FORMAT_VERSION, FsyncPolicy, Result};
use bytes::Bytes;
use std::fs::{File, OpenOptions};
use std::io::{BufReader, IoSlice, Read, Seek, SeekFrom, Write};
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

/// An open record file, positioned at its end. Everything [`LogFile::open`] found in it is
/// durable by the time it returns: it fsyncs what a crashed writer left unsynced.
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
    /// Whether a failed write may have left bytes past `len` that could not be cut off
    /// yet: the next append cuts them first, or fails.
    torn: bool,
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
        visit: impl FnMut(u64, &[u8]),
    ) -> Result<(LogFile, Recovery)> {
        Self::open_keeping(path, magic, policy, 0, visit)
    }

    /// [`LogFile::open`] for a file whose first `durable` bytes are known to have been
    /// fsync'd (a recovery point the caller saved): a frame that does not check out there
    /// is damage, not a torn tail, and is refused with [`Error::Damaged`] instead of being
    /// cut off with everything after it. Beyond `durable`, a bad frame is a torn tail.
    pub fn open_keeping(
        path: &Path,
        magic: [u8; 8],
        policy: FsyncPolicy,
        durable: u64,
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
            let _permit = faults::before(path, Op::Write)?;
            file.set_len(0)?;
            file.write_all_at(&header, 0)?;
            file.sync_all()?;
            sync_parent(path)?;
            faults::truncated(path, 0);
            faults::synced(path, HEADER_LEN);
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
        if end < durable {
            return Err(Error::Damaged {
                position: end,
                durable,
            });
        }
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
            faults::truncated(path, end);
            faults::synced(path, end);
        } else if recovery.frames > 0 {
            // A process killed before its fsync left its frames in the page cache: readable,
            // so found here, but not yet durable. The callers treat what recovery found as
            // durable (acknowledged, served to readers), so make it so before they do.
            let _permit = faults::before(path, Op::Sync)?;
            file.sync_data()?;
            faults::synced(path, end);
        }
        Ok((
            LogFile {
                path: path.to_owned(),
                file,
                len: end,
                policy,
                dirty: false,
                torn: false,
                last_sync: Instant::now(),
            },
            recovery,
        ))
    }

    /// Opens a sealed file — one no longer appended to, synced when it was sealed — without
    /// scanning it: the header is checked and the file's length taken as it is. Reads still
    /// check every frame they return.
    pub fn open_sealed(path: &Path, magic: [u8; 8]) -> Result<LogFile> {
        let file = OpenOptions::new().read(true).open(path)?;
        let mut found = [0u8; HEADER_LEN as usize];
        file.read_exact_at(&mut found, 0)?;
        check_header(magic, &found)?;
        let len = file.metadata()?.len();
        Ok(LogFile {
            path: path.to_owned(),
            file,
            len,
            policy: FsyncPolicy::Never,
            dirty: false,
            torn: false,
            last_sync: Instant::now(),
        })
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
    /// cut back off so that the next append starts at a frame boundary — if that cut fails
    /// too, the next append makes it first — so after a failed *write* (a full disk, say)
    /// appending again is safe, and succeeds once the disk takes writes.
    pub fn append(&mut self, payloads: &[&[u8]]) -> Result<Vec<u64>> {
        let frames: Vec<[&[u8]; 1]> = payloads.iter().map(|p| [*p]).collect();
        let frames: Vec<&[&[u8]]> = frames.iter().map(|f| f.as_slice()).collect();
        self.append_parts(&frames)
    }

    /// Like [`LogFile::append`], with each frame's payload given in parts that are written
    /// back to back (a header and a body, say) with one vectored write: a body received
    /// from the network reaches the file without being copied into a buffer first.
    pub fn append_parts(&mut self, frames: &[&[&[u8]]]) -> Result<Vec<u64>> {
        let mut heads = Vec::with_capacity(frames.len());
        let mut positions = Vec::with_capacity(frames.len());
        let mut at = self.len;
        for parts in frames {
            let len: usize = parts.iter().map(|p| p.len()).sum();
            if len == 0 || len > MAX_FRAME_LEN {
                return Err(Error::PayloadSize(len));
            }
            let crc = parts
                .iter()
                .fold(0, |crc, part| crc32c::crc32c_append(crc, part));
            let mut head = [0u8; FRAME_HEADER_LEN as usize];
            // Checked above: the length fits in a u32.
            head[..4].copy_from_slice(&(len as u32).to_le_bytes());
            head[4..].copy_from_slice(&crc.to_le_bytes());
            heads.push(head);
            positions.push(at);
            at += FRAME_HEADER_LEN + len as u64;
        }
        let mut slices = Vec::with_capacity(frames.len() * 3);
        for (head, parts) in heads.iter().zip(frames) {
            slices.push(IoSlice::new(head));
            slices.extend(
                parts
                    .iter()
                    .filter(|p| !p.is_empty())
                    .map(|p| IoSlice::new(p)),
            );
        }
        if self.torn {
            self.cut_back()?;
        }
        if let Err(error) = self.write_vectored_at(&mut slices) {
            // What the failed write left past the last whole frame goes, now or before the
            // next append (a torn tail that outlived a crash is cut by the next open).
            self.torn = true;
            let _ = self.cut_back();
            return Err(error.into());
        }
        self.len = at;
        self.dirty = true;
        if self.policy == FsyncPolicy::Always {
            self.sync()?;
        }
        Ok(positions)
    }

    /// Cuts off whatever a failed write left past the last whole frame.
    fn cut_back(&mut self) -> std::io::Result<()> {
        let _permit = faults::before(&self.path, Op::Write)?;
        self.file.set_len(self.len)?;
        self.torn = false;
        Ok(())
    }

    /// Writes every slice at the end of the file, however many calls that takes.
    fn write_vectored_at(&mut self, mut slices: &mut [IoSlice<'_>]) -> std::io::Result<()> {
        let _permit = faults::before(&self.path, Op::Write)?;
        (&self.file).seek(SeekFrom::Start(self.len))?;
        while !slices.is_empty() {
            match (&self.file).write_vectored(slices) {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(written) => IoSlice::advance_slices(&mut slices, written),
                Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
                Err(error) => return Err(error),
            }
        }
        Ok(())
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

    /// Reads `len` bytes at `position` into a buffer that is not zeroed first: a read of
    /// megabytes would otherwise write every byte twice (the zeroing, then the copy from
    /// the page cache), and a fresh allocation's zeroing faults in every page.
    fn read_uninit(&self, position: u64, len: usize) -> Result<Vec<u8>> {
        let mut buffer = Vec::with_capacity(len);
        while buffer.len() < len {
            let at = position + buffer.len() as u64;
            let read =
                rustix::io::pread(&self.file, rustix::buffer::spare_capacity(&mut buffer), at)
                    .map_err(std::io::Error::from)?;
            if read == 0 {
                return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
            }
        }
        // The capacity may exceed `len`: what was read past it is not this read's.
        buffer.truncate(len);
        Ok(buffer)
    }

    /// Reads the whole frames that start at `position` and end within `max_bytes` of it
    /// (at least one, however big), with one read: each frame's position and payload, the
    /// payloads sharing one buffer. Stops early at the end of the file.
    pub fn read_frames(&self, position: u64, max_bytes: usize) -> Result<Vec<(u64, Bytes)>> {
        if position < HEADER_LEN || position > self.len {
            return Err(Error::BadFrame {
                position,
                reason: "outside the file",
            });
        }
        let available = self.len - position;
        let want = (max_bytes as u64).clamp(FRAME_HEADER_LEN, available.max(FRAME_HEADER_LEN));
        let buffer = Bytes::from(self.read_uninit(position, want.min(available) as usize)?);
        let mut frames = Vec::new();
        let mut at = 0usize;
        while at + FRAME_HEADER_LEN as usize <= buffer.len() {
            let frame_position = position + at as u64;
            let head: [u8; FRAME_HEADER_LEN as usize] = buffer[at..at + FRAME_HEADER_LEN as usize]
                .try_into()
                .unwrap_or_default();
            let (len, crc) = frame_header(head);
            let body = at + FRAME_HEADER_LEN as usize;
            if len == 0
                || len > MAX_FRAME_LEN
                || frame_position + FRAME_HEADER_LEN + len as u64 > self.len
            {
                return Err(Error::BadFrame {
                    position: frame_position,
                    reason: "the length is impossible",
                });
            }
            if body + len > buffer.len() {
                if frames.is_empty() {
                    // The first frame is bigger than the budget: read it on its own.
                    let (payload, _) = self.read_at(frame_position)?;
                    frames.push((frame_position, Bytes::from(payload)));
                }
                break;
            }
            let payload = buffer.slice(body..body + len);
            if crc32c::crc32c(&payload) != crc {
                return Err(Error::BadFrame {
                    position: frame_position,
                    reason: "the checksum does not match",
                });
            }
            frames.push((frame_position, payload));
            at = body + len;
        }
        Ok(frames)
    }

    /// A second handle on the file that syncs it from another thread while appends go on:
    /// what a group commit fsyncs without holding up writers.
    pub fn sync_handle(&self) -> Result<SyncHandle> {
        Ok(SyncHandle {
            file: self.file.try_clone()?,
            path: self.path.clone(),
        })
    }

    /// Forces everything appended so far to disk.
    pub fn sync(&mut self) -> Result<()> {
        if self.dirty {
            let _permit = faults::before(&self.path, Op::Sync)?;
            self.file.sync_data()?;
            faults::synced(&self.path, self.len);
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

/// Syncs a [`LogFile`]'s data from anywhere: see [`LogFile::sync_handle`].
#[derive(Debug)]
pub struct SyncHandle {
    file: File,
    path: PathBuf,
}

impl SyncHandle {
    /// `fdatasync`s everything written to the file so far, by any handle.
    pub fn sync(&self) -> std::io::Result<()> {
        let _permit = faults::before(&self.path, Op::Sync)?;
        let written = faults::written(&self.file);
        self.file.sync_data()?;
        faults::synced(&self.path, written);
        Ok(())
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
    fn damage_inside_what_was_durable_is_refused_not_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let (mut file, _, _) = open(&path);
        let positions = file
            .append(&[b"first frame".as_slice(), b"second frame", b"third frame"])
            .unwrap();
        file.sync().unwrap();
        let durable = file.len();
        drop(file);
        // A flipped byte in the second frame's payload.
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[positions[1] as usize + FRAME_HEADER_LEN as usize + 2] ^= 0x20;
        std::fs::write(&path, &bytes).unwrap();
        let error = LogFile::open_keeping(&path, MAGIC, FsyncPolicy::Never, durable, |_, _| {})
            .expect_err("damage is refused");
        assert!(
            matches!(error, Error::Damaged { position, .. } if position == positions[1]),
            "{error}"
        );
        assert_eq!(std::fs::read(&path).unwrap(), bytes, "nothing was cut off");
        // A file cut short below what was durable is damage too.
        std::fs::write(&path, &bytes[..positions[1] as usize]).unwrap();
        assert!(matches!(
            LogFile::open_keeping(&path, MAGIC, FsyncPolicy::Never, durable, |_, _| {}),
            Err(Error::Damaged { .. })
        ));
        // Beyond what was durable, the same damage is a torn tail, cut off.
        std::fs::write(&path, &bytes).unwrap();
        let (file, recovery) =
            LogFile::open_keeping(&path, MAGIC, FsyncPolicy::Never, positions[1], |_, _| {})
                .unwrap();
        assert_eq!(file.len(), positions[1]);
        assert!(recovery.truncated_bytes > 0);
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

    #[test]
    fn frames_written_in_parts_equal_frames_written_whole() {
        let dir = tempfile::tempdir().unwrap();
        let (mut whole, _, _) = open(&dir.path().join("whole.log"));
        let (mut parts, _, _) = open(&dir.path().join("parts.log"));
        whole.append(&[b"headerbody", b"x"]).unwrap();
        let positions = parts
            .append_parts(&[&[b"header", b"", b"body"], &[b"x"]])
            .unwrap();
        assert_eq!(positions, [HEADER_LEN, HEADER_LEN + FRAME_HEADER_LEN + 10]);
        assert_eq!(
            fs::read(whole.path()).unwrap(),
            fs::read(parts.path()).unwrap()
        );
        assert!(matches!(
            parts.append_parts(&[&[b"", b""]]),
            Err(Error::PayloadSize(0))
        ));
    }

    #[test]
    fn read_frames_reads_whole_frames_within_the_budget() {
        let dir = tempfile::tempdir().unwrap();
        let (mut file, _, _) = open(&dir.path().join("a.log"));
        let big = vec![7u8; 500];
        let positions = file.append(&[b"aaaa", b"bbbb", &big, b"cccc"]).unwrap();
        // 12 bytes per small frame: a 30-byte budget holds two.
        let frames = file.read_frames(positions[0], 30).unwrap();
        let found: Vec<(u64, &[u8])> = frames.iter().map(|(p, b)| (*p, b.as_ref())).collect();
        assert_eq!(
            found,
            [(positions[0], &b"aaaa"[..]), (positions[1], &b"bbbb"[..])]
        );
        // A frame bigger than the budget still comes, alone.
        let frames = file.read_frames(positions[2], 30).unwrap();
        assert_eq!(frames.len(), 1);
        assert_eq!(frames[0].1.as_ref(), big.as_slice());
        // Everything to the end.
        let frames = file.read_frames(positions[0], usize::MAX).unwrap();
        assert_eq!(frames.len(), 4);
        assert!(file.read_frames(file.len(), 100).unwrap().is_empty());
        assert!(file.read_frames(positions[0] + 1, 100).is_err());
        assert!(file.read_frames(file.len() + 1, 100).is_err());
    }

    #[test]
    fn sealed_files_open_without_a_scan_and_still_check_reads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.log");
        let (mut file, _, _) = open(&path);
        let positions = file.append(&[b"one", b"two"]).unwrap();
        file.sync_handle().unwrap().sync().unwrap();
        drop(file);
        let sealed = LogFile::open_sealed(&path, MAGIC).unwrap();
        assert_eq!(sealed.read_at(positions[1]).unwrap().0, b"two");
        let mut bytes = fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        fs::write(&path, &bytes).unwrap();
        let sealed = LogFile::open_sealed(&path, MAGIC).unwrap();
        assert!(sealed.read_at(positions[1]).is_err());
        assert!(sealed.read_frames(positions[0], 1000).is_err());
        assert!(LogFile::open_sealed(&path, *b"RNLOTHR1").is_err());
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

        /// Reading a file with `read_frames` under any budget yields every frame once, in
        /// order.
        #[test]
        fn read_frames_under_any_budget_yields_every_frame(
            records in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..100), 1..20),
            budget in 1usize..400,
        ) {
            let dir = tempfile::tempdir().unwrap();
            let (mut file, _, _) = open(&dir.path().join("a.log"));
            let slices: Vec<&[u8]> = records.iter().map(Vec::as_slice).collect();
            file.append(&slices).unwrap();
            let mut found = Vec::new();
            let mut position = HEADER_LEN;
            while position < file.len() {
                let frames = file.read_frames(position, budget).unwrap();
                prop_assert!(!frames.is_empty());
                for (at, payload) in frames {
                    prop_assert_eq!(at, position);
                    position = at + FRAME_HEADER_LEN + payload.len() as u64;
                    found.push(payload.to_vec());
                }
            }
            prop_assert_eq!(found, records);
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
