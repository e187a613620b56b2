//! The analyzer's value paths over event payloads (any bytes a producer sent, JSON or
//! not): never a panic, never a number that is not finite.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first line is the value path, the rest the payload.
    let split = data.iter().position(|&b| b == b'\n').unwrap_or(data.len());
    let Ok(path) = std::str::from_utf8(&data[..split]) else {
        return;
    };
    let payload = data.get(split + 1..).unwrap_or_default();
    runnel_analyzer::fuzzing::extract(path, payload);
    runnel_analyzer::fuzzing::extract("payload.value", data);
    runnel_analyzer::fuzzing::extract("payload.a.0.b", data);
});
