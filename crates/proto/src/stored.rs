//! Batches as the broker stores them, which is also how `Fetch` and `Subscribe` deliver
//! them when asked for `stored` batches: a fixed 40-byte little-endian header followed by
//! the records body exactly as the producer sent it (see [`crate::records`]), compressed or
//! not. Nothing is re-encoded record by record on the way in or out.
//!
//! ```text
//! offset  size  field
//!      0     1  format version (1)
//!      1     1  compression (0 none, 1 lz4)
//!      2     1  flags: bit 0 set when the batch was deduplicated (its events'
//!                 identities are remembered by the broker)
//!      3     1  reserved (0)
//!      4     4  record count            u32 LE
//!      8     8  base offset             u64 LE  (assigned by the broker)
//!     16     8  append time, Unix ms    i64 LE  (assigned by the broker)
//!     24     8  producer id             u64 LE  (0: not idempotent)
//!     32     8  base sequence           u64 LE
//!     40     …  records: per record a protobuf varint length and an encoded `Event`
//! ```
//!
//! Offsets are per record (`base offset + index`); every record of a batch has the batch's
//! append time.

use crate::Millis;
use crate::records::{self, RecordsError};
use crate::v1::{Compression, Record, RecordBatch};
use bytes::Bytes;

/// Bytes of the header.
pub const HEADER_LEN: usize = 40;
const FORMAT_VERSION: u8 = 1;
/// Header flag: [`BatchHeader::deduplicated`].
const DEDUPLICATED: u8 = 1;

/// The header of a stored batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchHeader {
    /// How the records body is compressed.
    pub compression: Compression,
    /// How many records the body holds (at least one).
    pub record_count: u32,
    /// The first record's offset.
    pub base_offset: u64,
    /// When the broker appended the batch.
    pub append_time: Millis,
    /// The idempotent producer's id; 0 when it was not idempotent.
    pub producer_id: u64,
    /// The producer's sequence number of the first record.
    pub base_sequence: u64,
    /// Stored by a producer that asked for deduplication: the broker remembers its
    /// events' identities (also when the partition is recovered).
    pub deduplicated: bool,
}

impl BatchHeader {
    /// The offset after this batch's last record.
    pub fn next_offset(&self) -> u64 {
        self.base_offset + u64::from(self.record_count)
    }

    /// The stored form.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[0] = FORMAT_VERSION;
        out[1] = self.compression as u8;
        out[2] = if self.deduplicated { DEDUPLICATED } else { 0 };
        out[4..8].copy_from_slice(&self.record_count.to_le_bytes());
        out[8..16].copy_from_slice(&self.base_offset.to_le_bytes());
        out[16..24].copy_from_slice(&self.append_time.0.to_le_bytes());
        out[24..32].copy_from_slice(&self.producer_id.to_le_bytes());
        out[32..40].copy_from_slice(&self.base_sequence.to_le_bytes());
        out
    }

    /// Reads a stored header.
    pub fn decode(bytes: &[u8]) -> Result<BatchHeader, String> {
        let Some(head) = bytes.first_chunk::<HEADER_LEN>() else {
            return Err(format!(
                "a batch needs {HEADER_LEN} header bytes, found {}",
                bytes.len()
            ));
        };
        if head[0] != FORMAT_VERSION {
            return Err(format!("unknown batch format version {}", head[0]));
        }
        let compression = Compression::try_from(i32::from(head[1]))
            .map_err(|_| format!("unknown compression {}", head[1]))?;
        let u64_at =
            |at: usize| u64::from_le_bytes(head[at..at + 8].try_into().unwrap_or_default());
        Ok(BatchHeader {
            compression,
            record_count: u32::from_le_bytes(head[4..8].try_into().unwrap_or_default()),
            base_offset: u64_at(8),
            append_time: Millis(u64_at(16) as i64),
            producer_id: u64_at(24),
            base_sequence: u64_at(32),
            deduplicated: head[2] & DEDUPLICATED != 0,
        })
    }
}

/// A stored batch: its header, its records body, and the two together as stored (what
/// `stored_batches` carries), all sharing one buffer.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredBatch {
    /// The header.
    pub header: BatchHeader,
    /// The records body.
    pub records: Bytes,
    /// Header and records body, as stored.
    pub stored: Bytes,
}

impl StoredBatch {
    /// Splits a stored batch into header and records, without copying.
    pub fn parse(stored: Bytes) -> Result<StoredBatch, String> {
        let header = BatchHeader::decode(&stored)?;
        if header.record_count == 0 {
            return Err("a stored batch holds no records".into());
        }
        Ok(StoredBatch {
            header,
            records: stored.slice(HEADER_LEN..),
            stored,
        })
    }

    /// A batch of `header` and `records` (one copy of the records).
    pub fn new(header: BatchHeader, records: &[u8]) -> StoredBatch {
        let mut stored = Vec::with_capacity(HEADER_LEN + records.len());
        stored.extend_from_slice(&header.encode());
        stored.extend_from_slice(records);
        let stored = Bytes::from(stored);
        StoredBatch {
            header,
            records: stored.slice(HEADER_LEN..),
            stored,
        }
    }

    /// The batch as a `RecordBatch` message.
    pub fn to_proto(&self, partition: u32) -> RecordBatch {
        RecordBatch {
            partition,
            record_count: self.header.record_count,
            compression: self.header.compression as i32,
            records: self.records.clone(),
            producer_id: self.header.producer_id,
            base_sequence: self.header.base_sequence,
            base_offset: self.header.base_offset,
            append_time: Some(self.header.append_time.into()),
        }
    }

    /// The batch's records from offset `from` on, at most `max` of them, decoded (the
    /// ones before `from` are stepped over, not decoded), as records of `partition`. A
    /// compressed body may uncompress to at most `max_len` bytes.
    pub fn records(
        &self,
        partition: u32,
        from: u64,
        max: usize,
        max_len: usize,
    ) -> Result<Vec<Record>, RecordsError> {
        let skip = from.saturating_sub(self.header.base_offset);
        let first = self.header.base_offset + skip;
        let skip = usize::try_from(skip).unwrap_or(usize::MAX);
        let events =
            records::decode_range(self.header.compression, &self.records, max_len, skip, max)?;
        let append_time = Some(self.header.append_time.into());
        Ok(events
            .into_iter()
            .zip(first..)
            .map(|(event, offset)| Record {
                partition,
                offset,
                append_time,
                event: Some(event),
            })
            .collect())
    }

    /// Each record from offset `from` on with its offset, the event still encoded (a
    /// slice of the body, decompressed once if it was compressed, to at most `max_len`
    /// bytes).
    pub fn encoded_events(
        &self,
        from: u64,
        max_len: usize,
        mut each: impl FnMut(u64, Bytes),
    ) -> Result<(), RecordsError> {
        let skip = from.saturating_sub(self.header.base_offset);
        let base = self.header.base_offset;
        records::visit_encoded(
            self.header.compression,
            &self.records,
            max_len,
            usize::try_from(skip).unwrap_or(usize::MAX),
            usize::MAX,
            |index, event| {
                each(base + index as u64, event);
                Ok(())
            },
        )?;
        Ok(())
    }
}

/// The records of stored batches `stored` of `partition` (as `Fetch` or `Subscribe`
/// deliver them), from offset `from` on: what a reader of the stored form decodes. Each
/// compressed body may uncompress to at most `max_len` bytes.
pub fn decode_records(
    stored: &[Bytes],
    partition: u32,
    from: u64,
    max_len: usize,
) -> Result<Vec<Record>, RecordsError> {
    let mut out = Vec::new();
    for bytes in stored {
        let batch = StoredBatch::parse(bytes.clone()).map_err(RecordsError::from)?;
        if batch.header.next_offset() <= from {
            continue;
        }
        out.extend(batch.records(partition, from, usize::MAX, max_len)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::{compress, encode};
    use crate::v1::Event;
    use proptest::prelude::*;

    fn event(i: u32) -> Event {
        Event {
            id: format!("e-{i}"),
            key: format!("k-{}", i % 3),
            payload: vec![i as u8; (i % 50) as usize].into(),
            ..Event::default()
        }
    }

    fn header(base_offset: u64, record_count: u32, compression: Compression) -> BatchHeader {
        BatchHeader {
            compression,
            record_count,
            base_offset,
            append_time: Millis(42),
            producer_id: 0,
            base_sequence: 0,
            deduplicated: false,
        }
    }

    #[test]
    fn headers_round_trip_and_refuse_garbage() {
        let header = BatchHeader {
            compression: Compression::Lz4,
            record_count: 1000,
            base_offset: 1 << 40,
            append_time: Millis(1_714_564_800_123),
            producer_id: u64::MAX,
            base_sequence: 77,
            deduplicated: true,
        };
        assert_eq!(BatchHeader::decode(&header.encode()), Ok(header));
        assert_eq!(header.next_offset(), (1 << 40) + 1000);
        let mut bad = header.encode();
        bad[0] = 9;
        assert!(BatchHeader::decode(&bad).unwrap_err().contains("version"));
        let mut bad = header.encode();
        bad[1] = 7;
        assert!(
            BatchHeader::decode(&bad)
                .unwrap_err()
                .contains("compression")
        );
        assert!(BatchHeader::decode(&bad[..39]).is_err());
    }

    #[test]
    fn stored_batches_yield_records_from_an_offset() {
        let events: Vec<Event> = (0..5).map(event).collect();
        let body = compress(Compression::Lz4, &encode(&events));
        let stored = StoredBatch::new(header(100, 5, Compression::Lz4), &body);
        assert_eq!(
            StoredBatch::parse(stored.stored.clone()),
            Ok(stored.clone())
        );
        let records = stored.records(3, 102, usize::MAX, 1 << 20).unwrap();
        assert_eq!(
            stored
                .records(3, 101, 2, 1 << 20)
                .unwrap()
                .iter()
                .map(|r| r.offset)
                .collect::<Vec<_>>(),
            [101, 102]
        );
        assert_eq!(
            records.iter().map(|r| r.offset).collect::<Vec<_>>(),
            [102, 103, 104]
        );
        assert_eq!(records[0].event.as_ref(), Some(&events[2]));
        assert!(
            records
                .iter()
                .all(|r| r.partition == 3 && r.append_time == Some(Millis(42).into()))
        );
        let proto = stored.to_proto(3);
        assert_eq!((proto.base_offset, proto.record_count), (100, 5));
        assert_eq!(proto.records, body);
        assert!(
            stored.records(3, 100, 5, 10).is_err(),
            "over the size limit"
        );
    }

    proptest! {
        /// Whatever batches a fetch answers with, reading them from an offset yields
        /// exactly the records at and after it, in order, each with its own offset.
        #[test]
        fn reading_stored_batches_from_an_offset(
            sizes in proptest::collection::vec(1u32..6, 1..8),
            lz4 in any::<bool>(),
            from_step in 0u64..40,
        ) {
            let compression = if lz4 { Compression::Lz4 } else { Compression::None };
            let mut stored = Vec::new();
            let mut all = Vec::new();
            let mut offset = 10u64;
            for size in sizes {
                let events: Vec<Event> = (0..size).map(|i| event(offset as u32 + i)).collect();
                let body = compress(compression, &encode(&events));
                stored.push(StoredBatch::new(header(offset, size, compression), &body).stored);
                all.extend(events.into_iter().zip(offset..));
                offset += u64::from(size);
            }
            let from = 10 + from_step;
            let read = decode_records(&stored, 7, from, 1 << 20).unwrap();
            let expected: Vec<(u64, Event)> = all.into_iter().filter(|(_, o)| *o >= from).map(|(e, o)| (o, e)).collect();
            let got: Vec<(u64, Event)> = read.into_iter().map(|r| (r.offset, r.event.unwrap_or_default())).collect();
            prop_assert_eq!(got, expected);
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300), from in 0u64..50) {
            let bytes = Bytes::from(bytes);
            let _ = BatchHeader::decode(&bytes);
            let _ = StoredBatch::parse(bytes.clone());
            let _ = decode_records(&[bytes], 0, from, 1 << 16);
        }
    }
}
