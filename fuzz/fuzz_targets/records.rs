//! The records body of a batch (`runnel_proto::records`): per record a varint length and
//! an encoded `Event`, plain or LZ4. What decodes re-encodes to the same events.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use runnel_proto::records;
use runnel_proto::v1::Compression;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    let compression = if selector & 1 == 0 {
        Compression::None
    } else {
        Compression::Lz4
    };
    let body = Bytes::copy_from_slice(body);
    let Ok(events) = records::decode(compression, &body, 1 << 20) else {
        return;
    };
    let again = records::decode(Compression::None, &records::encode(&events), 1 << 20)
        .expect("encoded events decode");
    assert_eq!(again, events);
    let skip = usize::from(selector >> 1) % (events.len() + 1);
    let range = records::decode_range(compression, &body, 1 << 20, skip, 2)
        .expect("a range of a good body decodes");
    assert_eq!(range.as_slice(), &events[skip..(skip + 2).min(events.len())]);
});
