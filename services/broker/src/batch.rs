//! Record batches: how a producer's batch is checked, stored and read back.
//!
//! A batch is stored as one frame of the partition's segment file (`runnel_log` framing:
//! length and CRC32C over the whole frame) holding a fixed header and the records exactly
//! as the producer sent them — compressed or not — so that nothing is re-encoded record by
//! record on the way in or out:
//!
//! ```text
//! offset  size  field
//!      0     1  format version (1)
//!      1     1  compression (0 none, 1 lz4)
//!      2     1  flags: bit 0 set when the batch was deduplicated (its events'
//!                 identities are remembered, see `storage::embedded::recent`)
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

use bytes::Bytes;
use runnel_proto::Millis;
use runnel_proto::records::{self, RecordsError};
use runnel_proto::v1::{Compression, Record, RecordBatch};

/// Bytes of the stored header.
pub(crate) const HEADER_LEN: usize = 40;
const FORMAT_VERSION: u8 = 1;

/// The header of a stored batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BatchHeader {
    pub(crate) compression: Compression,
    pub(crate) record_count: u32,
    pub(crate) base_offset: u64,
    pub(crate) append_time: Millis,
    pub(crate) producer_id: u64,
    pub(crate) base_sequence: u64,
    /// Stored by a producer that asked for deduplication: its events' identities are to be
    /// remembered (also when the partition is recovered).
    pub(crate) deduplicated: bool,
}

/// Header flag: [`BatchHeader::deduplicated`].
const DEDUPLICATED: u8 = 1;

impl BatchHeader {
    /// The offset after this batch's last record.
    pub(crate) fn next_offset(&self) -> u64 {
        self.base_offset + u64::from(self.record_count)
    }

    /// The stored form.
    pub(crate) fn encode(&self) -> [u8; HEADER_LEN] {
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
    pub(crate) fn decode(bytes: &[u8]) -> Result<BatchHeader, String> {
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

/// A batch as read back from a segment: its header and its records, still as stored.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct StoredBatch {
    pub(crate) header: BatchHeader,
    pub(crate) records: Bytes,
}

impl StoredBatch {
    /// Splits a frame's payload into header and records, without copying.
    pub(crate) fn parse(frame: Bytes) -> Result<StoredBatch, String> {
        let header = BatchHeader::decode(&frame)?;
        if header.record_count == 0 {
            return Err("a stored batch holds no records".into());
        }
        Ok(StoredBatch {
            header,
            records: frame.slice(HEADER_LEN..),
        })
    }

    /// The batch as `Fetch` returns it.
    pub(crate) fn to_proto(&self, partition: u32) -> RecordBatch {
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

    /// The batch's records from offset `from` on, decoded.
    /// The batch's records from offset `from` on, at most `max` of them, decoded (the
    /// ones before `from` are stepped over, not decoded).
    pub(crate) fn records(
        &self,
        partition: u32,
        from: u64,
        max: usize,
    ) -> Result<Vec<Record>, String> {
        let skip = from.saturating_sub(self.header.base_offset);
        let first = self.header.base_offset + skip;
        let skip = usize::try_from(skip).unwrap_or(usize::MAX);
        let events = records::decode_range(
            self.header.compression,
            &self.records,
            usize::MAX,
            skip,
            max,
        )
        .map_err(|e| e.to_string())?;
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
}

/// Checks a producer's records body before anything is stored: it decompresses within
/// `max_len` bytes and holds exactly `count` records that are each a valid `Event` with an
/// id. Consumers rely on this: one malformed batch would otherwise stop every reader of
/// the partition at its offset. With `identities`, each record's identity (see
/// [`runnel_proto::event_identity`]) is pushed onto it, in order.
pub(crate) fn validate(
    compression: Compression,
    records: &Bytes,
    count: u32,
    max_len: usize,
    mut identities: Option<&mut Vec<u128>>,
) -> Result<(), String> {
    if count == 0 {
        return Err("record_count is 0: a batch needs at least one record".into());
    }
    let held = records::visit(compression, records, max_len, 0, usize::MAX, |i, event| {
        if event.id.is_empty() {
            return Err(RecordsError::from(format!("record {i} has no event id")));
        }
        if let Some(identities) = identities.as_deref_mut() {
            identities.push(runnel_proto::event_identity(&event.source, &event.id));
        }
        Ok(())
    })
    .map_err(|e| e.to_string())?;
    if held != count as usize {
        return Err(format!(
            "record_count says {count} records, the body holds {held}"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use runnel_proto::records::{compress, encode as encode_events};
    use runnel_proto::v1::Event;

    fn event(i: u32) -> Event {
        Event {
            id: format!("e-{i}"),
            key: format!("k-{}", i % 3),
            payload: vec![i as u8; (i % 50) as usize].into(),
            ..Event::default()
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
    fn validation_says_what_is_wrong() {
        let body = encode_events(&[event(1), event(2)]);
        validate(Compression::None, &body, 2, 1 << 20, None).unwrap();
        assert!(
            validate(Compression::None, &body, 3, 1 << 20, None)
                .unwrap_err()
                .contains("says 3 records")
        );
        assert!(
            validate(Compression::None, &body, 0, 1 << 20, None)
                .unwrap_err()
                .contains("record_count is 0")
        );
        assert!(
            validate(
                Compression::None,
                &body.slice(..body.len() - 1),
                2,
                1 << 20,
                None
            )
            .unwrap_err()
            .contains("record 1")
        );
        let no_id = encode_events(&[Event::default()]);
        assert!(
            validate(Compression::None, &no_id, 1, 1 << 20, None)
                .unwrap_err()
                .contains("no event id")
        );
        let compressed = compress(Compression::Lz4, &body);
        validate(Compression::Lz4, &compressed, 2, 1 << 20, None).unwrap();
        assert!(
            validate(Compression::Lz4, &compressed, 2, 10, None)
                .unwrap_err()
                .contains("limit is 10")
        );
        assert!(
            validate(
                Compression::Lz4,
                &Bytes::from_static(&[1, 2]),
                2,
                1 << 20,
                None
            )
            .is_err()
        );
    }

    #[test]
    fn stored_batches_yield_records_from_an_offset() {
        let events: Vec<Event> = (0..5).map(event).collect();
        let header = BatchHeader {
            compression: Compression::Lz4,
            record_count: 5,
            base_offset: 100,
            append_time: Millis(42),
            producer_id: 0,
            base_sequence: 0,
            deduplicated: false,
        };
        let body = compress(Compression::Lz4, &encode_events(&events));
        let mut frame = header.encode().to_vec();
        frame.extend_from_slice(&body);
        let stored = StoredBatch::parse(Bytes::from(frame)).unwrap();
        let records = stored.records(3, 102, usize::MAX).unwrap();
        assert_eq!(
            stored
                .records(3, 101, 2)
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
    }

    proptest! {
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300), count in 0u32..10, lz4 in any::<bool>()) {
            let codec = if lz4 { Compression::Lz4 } else { Compression::None };
            let bytes = Bytes::from(bytes);
            let _ = validate(codec, &bytes, count, 1 << 16, None);
            let _ = BatchHeader::decode(&bytes);
            let _ = StoredBatch::parse(bytes);
        }
    }
}
