//! An `Ingest` request as a client sends it: protobuf decoding, then the collector's
//! validation; a batch that passes has unique ids, bounded payloads and event times.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    runnel_collector::fuzzing::ingest_request(data);
});
