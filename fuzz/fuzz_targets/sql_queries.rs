//! The analyzer's SQL front end (a query a user or an API caller wrote, any text): never a
//! panic, a refusal always says what is wrong, and what compiles is checked into a plan.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(sql) = std::str::from_utf8(data) {
        runnel_analyzer::fuzzing::compile_sql(sql);
    }
});
