//! Recovery points: how far which segment of a log is known fsync'd — `(segment, bytes)`,
//! the segment named by the number its file is named by — so that recovery can tell damage
//! (a bad frame inside what was fsync'd, refused) from a torn tail (one beyond it, cut).
//! The broker's partitions and the collector's message-log shards each keep one, in a file
//! `recovery-point` beside their segments, under a magic of their own.
//!
//! A point is saved durably ([`save`]: temporary file, fsync, rename) now and then, and
//! rewritten in place after every fsync in between ([`refresh`]: one write, no fsync). A
//! crash that loses a rewrite leaves the older point, which only says less.

use crate::{overwrite_in_place, read_atomic, write_atomic};
use std::path::Path;

/// The file a recovery point is kept in, in its log's directory.
pub const FILE_NAME: &str = "recovery-point";

/// A segment and how many of its bytes are known fsync'd.
pub type Extent = (u64, u64);

fn encode((segment, len): Extent) -> [u8; 16] {
    let mut payload = [0u8; 16];
    payload[..8].copy_from_slice(&segment.to_le_bytes());
    payload[8..].copy_from_slice(&len.to_le_bytes());
    payload
}

/// Blocking: the recovery point saved in `dir` under `magic`, if there is one that reads
/// back whole. One that does not is logged and taken for none: recovery is then as it was
/// without recovery points (a bad frame in the active segment passes for a torn tail).
pub fn load(dir: &Path, magic: [u8; 8]) -> Option<Extent> {
    let path = dir.join(FILE_NAME);
    let bytes = match read_atomic(&path, magic) {
        Ok(bytes) => bytes?,
        Err(error) => {
            tracing::warn!(path = %path.display(), %error, "the recovery point cannot be read; recovering without it");
            return None;
        }
    };
    let segment = bytes.get(..8)?.try_into().ok().map(u64::from_le_bytes)?;
    let len = bytes.get(8..16)?.try_into().ok().map(u64::from_le_bytes)?;
    Some((segment, len))
}

/// Blocking: saves `extent` as the recovery point in `dir`, durably.
pub fn save(dir: &Path, magic: [u8; 8], extent: Extent) -> crate::Result<()> {
    write_atomic(&dir.join(FILE_NAME), magic, &encode(extent))
}

/// Blocking: rewrites the saved recovery point in `dir` in place with `extent`, without an
/// fsync (see [`overwrite_in_place`]); nothing when none was saved yet.
pub fn refresh(dir: &Path, magic: [u8; 8], extent: Extent) -> crate::Result<()> {
    overwrite_in_place(&dir.join(FILE_NAME), magic, &encode(extent)).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAGIC: [u8; 8] = *b"RNLTEST1";

    #[test]
    fn a_point_saved_and_refreshed_reads_back_and_a_damaged_one_is_none() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load(dir.path(), MAGIC), None);
        refresh(dir.path(), MAGIC, (1, 2)).unwrap();
        assert_eq!(load(dir.path(), MAGIC), None, "a refresh creates nothing");
        save(dir.path(), MAGIC, (3, 4096)).unwrap();
        assert_eq!(load(dir.path(), MAGIC), Some((3, 4096)));
        refresh(dir.path(), MAGIC, (3, 8192)).unwrap();
        assert_eq!(load(dir.path(), MAGIC), Some((3, 8192)));
        assert_eq!(load(dir.path(), *b"RNLOTHR1"), None, "another log's point");
        let path = dir.path().join(FILE_NAME);
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x01;
        std::fs::write(&path, bytes).unwrap();
        assert_eq!(load(dir.path(), MAGIC), None);
    }
}
