//! `runnel-log` recovery: a file with a good header and then anything — a torn write, a
//! damaged length, garbage. Opening keeps whole frames, cuts the rest, never panics, and
//! a second open finds exactly what the first kept.
#![no_main]

use libfuzzer_sys::fuzz_target;
use runnel_log::{FsyncPolicy, HEADER_LEN, LogFile};
use std::io::Write;

const MAGIC: [u8; 8] = *b"RNLFUZZ1";

fuzz_target!(|data: &[u8]| {
    // tmpfs when there is one: the target writes a file per input.
    let base = std::path::Path::new("/dev/shm");
    let dir = if base.is_dir() {
        tempfile::tempdir_in(base)
    } else {
        tempfile::tempdir()
    }
    .expect("temp dir");
    let path = dir.path().join("fuzz.log");
    drop(LogFile::open(&path, MAGIC, FsyncPolicy::Never, |_, _| {}).expect("create"));
    std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .and_then(|mut f| f.write_all(data))
        .expect("append");

    let mut first = Vec::new();
    let (log, recovery) = match LogFile::open(&path, MAGIC, FsyncPolicy::Never, |at, payload| {
        first.push((at, payload.to_vec()))
    }) {
        Ok(opened) => opened,
        // A frame that cannot be read back is an error, not a panic.
        Err(_) => return,
    };
    assert_eq!(recovery.frames as usize, first.len());
    let read = log.read_frames(HEADER_LEN, usize::MAX).expect("kept frames read back");
    assert_eq!(read.len(), first.len());
    for ((at, payload), (read_at, read_payload)) in first.iter().zip(&read) {
        assert_eq!(at, read_at);
        assert_eq!(payload.as_slice(), read_payload.as_ref());
    }
    drop(log);

    let mut second = Vec::new();
    let (_, again) = LogFile::open(&path, MAGIC, FsyncPolicy::Never, |at, payload| {
        second.push((at, payload.to_vec()))
    })
    .expect("a recovered log opens again");
    assert_eq!(again.truncated_bytes, 0, "recovery is done in one pass");
    assert_eq!(first, second);

    // The same bytes as a whole file, header included: refused or recovered, never a panic.
    let whole = dir.path().join("whole.log");
    std::fs::write(&whole, data).expect("write");
    let _ = LogFile::open(&whole, MAGIC, FsyncPolicy::Never, |_, _| {});
});
