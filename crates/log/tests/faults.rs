//! The fault-injection layer (`runnel_log::faults`) does what the tests of the services
//! that use it rely on: an armed fault fails exactly the operation it names, once or until
//! healed, only under its directory; a power cut keeps exactly what the fsyncs covered.

use proptest::prelude::*;
use runnel_log::faults::{self, Fault, Op};
use runnel_log::{FsyncPolicy, LogFile};
use std::path::Path;

const MAGIC: [u8; 8] = *b"RNLFALT1";

fn open(path: &Path) -> (LogFile, Vec<Vec<u8>>) {
    let mut frames = Vec::new();
    let (file, _) = LogFile::open(path, MAGIC, FsyncPolicy::Never, |_, payload| {
        frames.push(payload.to_vec());
    })
    .expect("open");
    (file, frames)
}

fn os_error(error: &runnel_log::Error) -> Option<i32> {
    match error {
        runnel_log::Error::Io(io) => io.raw_os_error(),
        _ => None,
    }
}

#[test]
fn a_fault_fails_the_operation_it_names_once_and_only_under_its_directory() {
    let dir = tempfile::tempdir().unwrap();
    let other = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.log");
    let (mut file, _) = open(&path);
    let (mut elsewhere, _) = open(&other.path().join("b.log"));
    file.append(&[b"one"]).unwrap();

    faults::fail_next(dir.path(), Op::Write, Fault::Enospc);
    elsewhere
        .append(&[b"not under the directory"])
        .expect("another directory is not hit");
    let error = file.append(&[b"refused"]).unwrap_err();
    assert_eq!(os_error(&error), Some(28), "ENOSPC: {error}");
    file.append(&[b"two"]).expect("the fault fired once");

    faults::fail_next(dir.path(), Op::Sync, Fault::Eio);
    file.append(&[b"three"])
        .expect("a sync fault leaves writes alone");
    let error = file.sync().unwrap_err();
    assert_eq!(os_error(&error), Some(5), "EIO: {error}");
    file.append(&[b"four"]).unwrap();
    file.sync().expect("the fault fired once");
    drop(file);
    let (_, frames) = open(&path);
    assert_eq!(frames, [&b"one"[..], b"two", b"three", b"four"]);
}

#[test]
fn fail_every_fails_until_healed() {
    let dir = tempfile::tempdir().unwrap();
    let (mut file, _) = open(&dir.path().join("a.log"));
    faults::fail_every(dir.path(), Op::Write, Fault::Eio);
    for _ in 0..3 {
        assert_eq!(os_error(&file.append(&[b"x"]).unwrap_err()), Some(5));
    }
    faults::heal(dir.path());
    file.append(&[b"x"]).expect("healed");
}

#[test]
fn a_sync_handle_is_hit_and_counts_as_a_sync() {
    let dir = tempfile::tempdir().unwrap();
    faults::watch(dir.path());
    let path = dir.path().join("a.log");
    let (mut file, _) = open(&path);
    let handle = file.sync_handle().unwrap();
    file.append(&[b"synced by the handle"]).unwrap();
    faults::fail_next(dir.path(), Op::Sync, Fault::Eio);
    assert_eq!(handle.sync().unwrap_err().raw_os_error(), Some(5));
    handle.sync().unwrap();
    file.append(&[b"never synced"]).unwrap();
    assert!(faults::power_cut(dir.path()).unwrap() > 0);
    assert!(handle.sync().is_err(), "the power is off");
    faults::heal(dir.path());
    drop(file);
    let (_, frames) = open(&path);
    assert_eq!(frames, [&b"synced by the handle"[..]]);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Whatever the appends and fsyncs before it, a power cut keeps exactly the frames the
    /// last successful fsync covered, and refuses every write until healed.
    #[test]
    fn a_power_cut_keeps_exactly_what_was_synced(
        steps in proptest::collection::vec((1usize..4, any::<bool>()), 1..30),
    ) {
        let dir = tempfile::tempdir().unwrap();
        faults::watch(dir.path());
        let path = dir.path().join("a.log");
        let (mut file, _) = open(&path);
        let mut written = Vec::new();
        let mut synced = 0;
        for (n, (frames, sync)) in steps.into_iter().enumerate() {
            for i in 0..frames {
                let payload = format!("{n}.{i}").into_bytes();
                file.append(&[&payload]).unwrap();
                written.push(payload);
            }
            if sync {
                file.sync().unwrap();
                synced = written.len();
            }
        }
        faults::power_cut(dir.path()).unwrap();
        prop_assert!(file.append(&[b"after the cut"]).is_err());
        prop_assert!(file.sync().is_err() || synced == written.len());
        faults::heal(dir.path());
        drop(file);
        let (_, frames) = open(&path);
        prop_assert_eq!(frames, written[..synced].to_vec());
    }
}

/// A writer killed before its fsync leaves frames in the page cache; reopening finds them,
/// and its callers count them as durable from then on (the broker serves and acknowledges
/// them), so the open itself must make them durable: a power cut after the reopen keeps them.
#[test]
fn what_recovery_finds_survives_a_power_cut_after_it() {
    let dir = tempfile::tempdir().unwrap();
    faults::watch(dir.path());
    let path = dir.path().join("a.log");
    let (mut file, _) = open(&path);
    file.append(&[b"one", b"two"]).unwrap();
    file.sync().unwrap();
    file.append(&[b"written, never synced"]).unwrap();
    drop(file); // as if killed: no fsync
    let (reopened, frames) = open(&path);
    assert_eq!(frames.len(), 3);
    faults::power_cut(dir.path()).unwrap();
    faults::heal(dir.path());
    drop(reopened);
    let (_, frames) = open(&path);
    assert_eq!(frames, [&b"one"[..], b"two", b"written, never synced"]);
}
