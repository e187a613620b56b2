//! The broker's checks of a producer's pre-encoded batch, and the parse of a stored
//! batch frame: an accepted batch always reads back whole.
#![no_main]

use libfuzzer_sys::fuzz_target;
use runnel_proto::v1::Compression;

fuzz_target!(|data: &[u8]| {
    let Some((head, records)) = data.split_first_chunk::<3>() else {
        return;
    };
    let compression = if head[0] & 1 == 0 {
        Compression::None
    } else {
        Compression::Lz4
    };
    let count = u32::from(u16::from_le_bytes([head[1], head[2]]));
    runnel_broker::fuzzing::producer_batch(compression, count, records);
    runnel_broker::fuzzing::stored_header(data);
});
