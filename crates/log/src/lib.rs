//! Append-only record files: the one on-disk format that the broker's partitions, the
//! store's result log and the analyzer's checkpoints share.
//!
//! ```text
//! file   = header frame*
//! header = magic[8] | format version u32 LE | crc32c(magic, version) u32 LE   (16 bytes)
//! frame  = len u32 LE | crc32c(payload) u32 LE | payload[len]                  (len ≥ 1)
//! ```
//!
//! The magic names what the file holds (its last byte is that content's own version, e.g.
//! `RNLPART1`); the format version is this crate's framing. A frame is whole or it is not:
//! [`LogFile::open`] walks every frame, checks its length and checksum, and cuts the file
//! back to the end of the last good frame. Only the tail can be torn by a crash — every
//! append is one write at the end — so what is cut was never acknowledged when the file is
//! synced before acknowledging (see [`FsyncPolicy`]). Garbage never panics: a length that
//! runs past the end of the file, a zero length (a pre-allocated or zero-filled tail), or a
//! checksum mismatch all end the scan.
//!
//! With the `faults` feature (tests only), [`faults`] can make appends and fsyncs fail with
//! `EIO` or `ENOSPC` and simulate a power cut that drops everything not yet fsync'd.
//!
//! [`write_atomic`] and [`read_atomic`] store a single framed payload that is replaced
//! whole (write to a temporary file, fsync, rename, fsync the directory): checkpoints and
//! metadata. [`recovery`] keeps a log's recovery point with them.

mod atomic;
#[cfg(feature = "faults")]
pub mod faults;
mod file;
mod policy;
pub mod recovery;

/// Without the `faults` feature, the fault-injection hooks do nothing.
#[cfg(not(feature = "faults"))]
mod faults {
    use std::path::Path;

    /// What a hook is called for.
    #[derive(Debug, Clone, Copy)]
    pub(crate) enum Op {
        /// An append.
        Write,
        /// An fsync.
        Sync,
    }

    /// Nothing to hold.
    #[derive(Debug)]
    pub(crate) struct Permit;

    #[inline(always)]
    pub(crate) fn before(_path: &Path, _op: Op) -> std::io::Result<Permit> {
        Ok(Permit)
    }

    #[inline(always)]
    pub(crate) fn written(_file: &std::fs::File) -> u64 {
        0
    }

    #[inline(always)]
    pub(crate) fn synced(_path: &Path, _len: u64) {}

    #[inline(always)]
    pub(crate) fn truncated(_path: &Path, _len: u64) {}
}

pub use atomic::{overwrite_in_place, read_atomic, write_atomic, write_atomic_via};
pub use file::{FRAME_HEADER_LEN, HEADER_LEN, LogFile, MAX_FRAME_LEN, Recovery, SyncHandle};
pub use policy::FsyncPolicy;

/// The framing version written in every header.
pub const FORMAT_VERSION: u32 = 1;

/// What can go wrong with a record file.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The operating system refused a read, write or sync.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The file is not one of ours, or holds something else than the caller expects.
    #[error("bad header: expected magic {expected:?}, found {found:?}")]
    BadMagic {
        /// The magic the caller asked for.
        expected: String,
        /// What the file starts with.
        found: String,
    },
    /// The header names a framing version this build does not read.
    #[error("unsupported format version {0} (this build reads version {FORMAT_VERSION})")]
    UnsupportedVersion(u32),
    /// The header's own checksum is wrong.
    #[error("the header is damaged")]
    DamagedHeader,
    /// A frame at a position the caller believed valid does not check out.
    #[error("no valid frame at position {position}: {reason}")]
    BadFrame {
        /// Where the frame was expected.
        position: u64,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A payload is empty or larger than [`MAX_FRAME_LEN`].
    #[error("payload of {0} bytes cannot be framed (1 to {MAX_FRAME_LEN} bytes)")]
    PayloadSize(usize),
    /// Recovery met a frame that does not check out inside the part of the file known to
    /// have been made durable: damage (a flipped bit, a bad sector, a file cut by hand), not
    /// the torn tail of a crash. Nothing is cut off.
    #[error(
        "the frame at byte {position} is damaged, inside the first {durable} bytes, which were known durable: not a torn tail, so nothing was cut off"
    )]
    Damaged {
        /// Where the first bad frame starts.
        position: u64,
        /// How much of the file was known durable.
        durable: u64,
    },
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
