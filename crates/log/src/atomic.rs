//! Files replaced whole: a header and one frame, written beside the target and renamed
//! over it, so a reader sees the old contents or the new ones and never a mix.

use crate::file::{FRAME_HEADER_LEN, HEADER_LEN, check_header, header, sync_parent};
use crate::{Error, MAX_FRAME_LEN, Result};
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

/// The bytes of a file holding `payload` framed under `magic`.
fn encode(magic: [u8; 8], payload: &[u8]) -> Result<Vec<u8>> {
    if payload.is_empty() || payload.len() > MAX_FRAME_LEN {
        return Err(Error::PayloadSize(payload.len()));
    }
    let mut bytes =
        Vec::with_capacity(HEADER_LEN as usize + FRAME_HEADER_LEN as usize + payload.len());
    bytes.extend_from_slice(&header(magic));
    bytes.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    bytes.extend_from_slice(&crc32c::crc32c(payload).to_le_bytes());
    bytes.extend_from_slice(payload);
    Ok(bytes)
}

/// Rewrites the file [`write_atomic`] made at `path` in place with a `payload` of the same
/// length, without an fsync: for a small record whose newer value is good to have on disk
/// but may be lost (a recovery point refreshed after every fsync of what it describes,
/// between durable saves). After a crash the file holds the old value or the new one, or
/// — should the write tear — one that [`read_atomic`] refuses. `false` (nothing written)
/// if there is no such file yet.
pub fn overwrite_in_place(path: &Path, magic: [u8; 8], payload: &[u8]) -> Result<bool> {
    let bytes = encode(magic, payload)?;
    let file = match fs::OpenOptions::new().write(true).open(path) {
        Ok(file) => file,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(error) => return Err(error.into()),
    };
    if file.metadata()?.len() != bytes.len() as u64 {
        return Ok(false);
    }
    std::os::unix::fs::FileExt::write_all_at(&file, &bytes, 0)?;
    Ok(true)
}

/// Durably replaces `path` with `payload` framed under `magic`: writes `<path>.tmp`,
/// fsyncs it, renames it over `path` and fsyncs the directory.
pub fn write_atomic(path: &Path, magic: [u8; 8], payload: &[u8]) -> Result<()> {
    write_atomic_via(path, &temporary_path(path), magic, payload)
}

/// [`write_atomic`] through the temporary file `temporary` (in the same directory), for
/// writers that may race on one `path` — several processes replacing a shared checkpoint:
/// each writes its own temporary, and the last rename wins whole.
pub fn write_atomic_via(
    path: &Path,
    temporary: &Path,
    magic: [u8; 8],
    payload: &[u8],
) -> Result<()> {
    let bytes = encode(magic, payload)?;
    let mut file = File::create(temporary)?;
    file.write_all(&bytes)?;
    file.sync_all()?;
    drop(file);
    fs::rename(temporary, path)?;
    sync_parent(path)
}

/// Reads what [`write_atomic`] wrote: `None` if `path` does not exist. A file that does
/// exist but does not check out is an error, never a silent `None`: a checkpoint that
/// cannot be read must not be mistaken for no checkpoint.
pub fn read_atomic(path: &Path, magic: [u8; 8]) -> Result<Option<Vec<u8>>> {
    let bytes = match fs::read(path) {
        Ok(bytes) => bytes,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(error.into()),
    };
    let bad = |reason| Error::BadFrame {
        position: HEADER_LEN,
        reason,
    };
    let Some(head) = bytes.first_chunk::<{ HEADER_LEN as usize }>() else {
        return Err(Error::DamagedHeader);
    };
    check_header(magic, head)?;
    let frame = &bytes[HEADER_LEN as usize..];
    let Some(frame_head) = frame.first_chunk::<{ FRAME_HEADER_LEN as usize }>() else {
        return Err(bad("the file ends before its frame"));
    };
    let len = u32::from_le_bytes([frame_head[0], frame_head[1], frame_head[2], frame_head[3]]);
    let crc = u32::from_le_bytes([frame_head[4], frame_head[5], frame_head[6], frame_head[7]]);
    let payload = &frame[FRAME_HEADER_LEN as usize..];
    if payload.len() != len as usize {
        return Err(bad("the frame's length does not match the file"));
    }
    if crc32c::crc32c(payload) != crc {
        return Err(bad("the checksum does not match"));
    }
    Ok(Some(payload.to_vec()))
}

fn temporary_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAGIC: [u8; 8] = *b"RNLTEST1";

    #[test]
    fn round_trips_and_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("checkpoint");
        assert_eq!(read_atomic(&path, MAGIC).unwrap(), None);
        write_atomic(&path, MAGIC, b"first").unwrap();
        write_atomic(&path, MAGIC, b"second, longer").unwrap();
        assert_eq!(
            read_atomic(&path, MAGIC).unwrap().unwrap(),
            b"second, longer"
        );
        assert!(!temporary_path(&path).exists());
    }

    #[test]
    fn every_damage_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("checkpoint");
        write_atomic(&path, MAGIC, b"the state").unwrap();
        let good = fs::read(&path).unwrap();
        for cut in 0..good.len() {
            fs::write(&path, &good[..cut]).unwrap();
            assert!(read_atomic(&path, MAGIC).is_err(), "cut at {cut}");
        }
        for flip in 0..good.len() {
            let mut damaged = good.clone();
            damaged[flip] ^= 0x10;
            fs::write(&path, &damaged).unwrap();
            assert!(read_atomic(&path, MAGIC).is_err(), "flip at {flip}");
        }
        fs::write(&path, &good).unwrap();
        assert!(read_atomic(&path, *b"RNLOTHR1").is_err());
    }

    #[test]
    fn an_overwrite_in_place_needs_the_file_and_its_length() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("point");
        assert!(!overwrite_in_place(&path, MAGIC, b"12345678").unwrap());
        assert!(!path.exists(), "nothing is created");
        write_atomic(&path, MAGIC, b"12345678").unwrap();
        assert!(overwrite_in_place(&path, MAGIC, b"87654321").unwrap());
        assert_eq!(read_atomic(&path, MAGIC).unwrap().unwrap(), b"87654321");
        assert!(!overwrite_in_place(&path, MAGIC, b"longer than before").unwrap());
        assert_eq!(read_atomic(&path, MAGIC).unwrap().unwrap(), b"87654321");
    }
}
