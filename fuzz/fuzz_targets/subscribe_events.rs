//! The broker's `Subscribe` stream as the analyzer decodes it — events left encoded and
//! read in place — against the generated decoder: where both read an event, they see the
//! same fields.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    runnel_analyzer::fuzzing::subscribe_message(data);
});
