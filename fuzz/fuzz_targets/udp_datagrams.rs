//! A UDP datagram as anyone on the network may send it: JSON or protobuf, one event or
//! nothing, never a panic; its protobuf form means the same; validation takes it whole or
//! refuses it.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    runnel_collector::fuzzing::datagram(data);
});
