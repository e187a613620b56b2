//! Entry points for the fuzz targets in `fuzz/` (the `fuzzing` feature only): the
//! broker's checks of the record batches producers send.

use crate::batch::{self, BatchHeader, StoredBatch};
use bytes::Bytes;
use runnel_proto::Millis;
use runnel_proto::v1::Compression;

/// The decompressed size a fuzzed batch may claim (the service uses its message limit).
const MAX_LEN: usize = 1 << 20;

/// Checks `records` as a producer's pre-encoded batch of `count` records; a batch that
/// passes must read back whole once stored, since every consumer of the partition depends
/// on that.
pub fn producer_batch(compression: Compression, count: u32, records: &[u8]) {
    let body = Bytes::copy_from_slice(records);
    if batch::validate(compression, &body, count, MAX_LEN, None).is_err() {
        return;
    }
    let header = BatchHeader {
        compression,
        record_count: count,
        base_offset: 1000,
        append_time: Millis(1_714_564_800_000),
        producer_id: 0,
        base_sequence: 0,
        deduplicated: false,
    };
    let mut frame = header.encode().to_vec();
    frame.extend_from_slice(records);
    let stored = StoredBatch::parse(Bytes::from(frame)).expect("an accepted batch parses");
    let read = stored
        .records(0, 1000, usize::MAX, usize::MAX)
        .expect("an accepted batch reads back");
    assert_eq!(read.len(), count as usize);
    assert!(
        read.iter()
            .all(|r| r.event.as_ref().is_some_and(|e| !e.id.is_empty()))
    );
    let tail = stored
        .records(0, 1000 + u64::from(count) / 2, 3, usize::MAX)
        .expect("a range of an accepted batch reads back");
    assert!(tail.len() <= 3);
}

/// Splits a stored frame into header and records, as a read from a segment does.
pub fn stored_header(frame: &[u8]) {
    if let Ok(stored) = StoredBatch::parse(Bytes::copy_from_slice(frame)) {
        assert!(stored.header.record_count > 0);
        assert_eq!(
            stored.records.len(),
            frame.len() - runnel_proto::stored::HEADER_LEN
        );
        assert_eq!(
            BatchHeader::decode(&stored.header.encode()),
            Ok(stored.header)
        );
    }
}
