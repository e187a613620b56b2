//! The collector's message log read back after a crash: one record's payload (a frame that
//! passed its checksum), and a whole segment of good frames or garbage. Decoding never
//! panics, a record that decodes writes back to the same bytes, and recovery either refuses
//! or yields pending entries in id order.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    runnel_msglog::fuzzing::record(data);
    // tmpfs when there is one: the target writes a file per input.
    let base = std::path::Path::new("/dev/shm");
    let dir = if base.is_dir() {
        tempfile::tempdir_in(base)
    } else {
        tempfile::tempdir()
    }
    .expect("temp dir");
    runnel_msglog::fuzzing::recover(dir.path(), data);
});
