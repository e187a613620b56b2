//! The records body of a [`RecordBatch`](crate::v1::RecordBatch): per record a protobuf
//! varint length and an encoded `Event`, compressed as a whole or not. Producers build it
//! with [`encode`] (and [`compress`]); consumers of raw batches read it with [`decode`].

use crate::v1::{Compression, Event};
use bytes::{Buf, Bytes};
use prost::Message;

/// Why a records body cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct RecordsError(String);

impl From<String> for RecordsError {
    /// A reader's own reason to refuse a record, such as a missing field.
    fn from(reason: String) -> Self {
        RecordsError(reason)
    }
}

/// Encodes events as an uncompressed records body.
pub fn encode(events: &[Event]) -> Bytes {
    let len: usize = events
        .iter()
        .map(|e| {
            let n = e.encoded_len();
            prost::length_delimiter_len(n) + n
        })
        .sum();
    let mut body = Vec::with_capacity(len);
    for event in events {
        // Writing into a Vec cannot fail.
        let _ = event.encode_length_delimited(&mut body);
    }
    Bytes::from(body)
}

/// Compresses an uncompressed records body. LZ4 is the block format with the
/// uncompressed size prepended as a little-endian u32.
pub fn compress(compression: Compression, plain: &[u8]) -> Bytes {
    match compression {
        Compression::None => Bytes::copy_from_slice(plain),
        Compression::Lz4 => Bytes::from(lz4_flex::compress_prepend_size(plain)),
    }
}

/// The uncompressed body, refusing anything that would grow past `max_len` bytes. An
/// uncompressed body is returned as is (a reference count, not a copy).
fn decompressed(
    compression: Compression,
    records: &Bytes,
    max_len: usize,
) -> Result<Bytes, RecordsError> {
    match compression {
        Compression::None => Ok(records.clone()),
        Compression::Lz4 => {
            let Some(size) = records.first_chunk::<4>() else {
                return Err(RecordsError(
                    "an lz4 body needs its 4-byte uncompressed size".into(),
                ));
            };
            let size = u32::from_le_bytes(*size) as usize;
            // Checked before allocating: the size is the sender's word, not a fact.
            if size > max_len {
                return Err(RecordsError(format!(
                    "lz4 body claims {size} bytes uncompressed; the limit is {max_len}"
                )));
            }
            lz4_flex::block::decompress(&records[4..], size)
                .map(Bytes::from)
                .map_err(|e| RecordsError(format!("lz4 body does not decompress: {e}")))
        }
    }
}

/// Decodes every record of a body that uncompresses to at most `max_len` bytes.
pub fn decode(
    compression: Compression,
    records: &Bytes,
    max_len: usize,
) -> Result<Vec<Event>, RecordsError> {
    decode_range(compression, records, max_len, 0, usize::MAX)
}

/// Decodes at most `take` records after the first `skip`, which are stepped over by their
/// lengths without being decoded: a reader that wants a few records from the middle of a
/// large batch pays for those few.
pub fn decode_range(
    compression: Compression,
    records: &Bytes,
    max_len: usize,
    skip: usize,
    take: usize,
) -> Result<Vec<Event>, RecordsError> {
    let mut events = Vec::new();
    visit(compression, records, max_len, skip, take, |_, event| {
        events.push(event);
        Ok(())
    })?;
    Ok(events)
}

/// Hands each decoded record (from the `skip`th on, at most `take` of them) to `each`
/// with its index, and returns how many records the body holds up to the last one
/// handed over. Payloads are slices of the (decompressed) body, not copies.
pub fn visit(
    compression: Compression,
    records: &Bytes,
    max_len: usize,
    skip: usize,
    take: usize,
    mut each: impl FnMut(usize, Event) -> Result<(), RecordsError>,
) -> Result<usize, RecordsError> {
    visit_encoded(
        compression,
        records,
        max_len,
        skip,
        take,
        |index, record| {
            let event = Event::decode(record)
                .map_err(|e| RecordsError(format!("record {index} does not decode: {e}")))?;
            each(index, event)
        },
    )
}

/// Hands each record (from the `skip`th on, at most `take` of them) to `each` with its
/// index, still encoded: a slice of the (decompressed) body, not a copy. Returns how many
/// records the body holds up to the last one handed over.
pub fn visit_encoded(
    compression: Compression,
    records: &Bytes,
    max_len: usize,
    skip: usize,
    take: usize,
    mut each: impl FnMut(usize, Bytes) -> Result<(), RecordsError>,
) -> Result<usize, RecordsError> {
    let mut buf = decompressed(compression, records, max_len)?;
    let mut index = 0usize;
    while buf.has_remaining() && index < skip.saturating_add(take) {
        let len = prost::decode_length_delimiter(&mut buf)
            .map_err(|e| RecordsError(format!("record {index} has no length: {e}")))?;
        if len > buf.remaining() {
            return Err(RecordsError(format!(
                "record {index} runs past the end of the body"
            )));
        }
        let record = buf.split_to(len);
        if index >= skip {
            each(index, record)?;
        }
        index += 1;
    }
    Ok(index)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_forged_size_is_refused_before_allocating() {
        let events = vec![Event {
            id: "a".into(),
            ..Event::default()
        }];
        let body = compress(Compression::Lz4, &encode(&events));
        assert_eq!(decode(Compression::Lz4, &body, 1 << 20).unwrap(), events);
        assert!(
            decode(Compression::Lz4, &body, 2)
                .unwrap_err()
                .0
                .contains("limit is 2")
        );
        let mut forged = body.to_vec();
        forged[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(
            decode(Compression::Lz4, &Bytes::from(forged), 1 << 20)
                .unwrap_err()
                .0
                .contains("claims")
        );
        assert!(decode(Compression::Lz4, &Bytes::from_static(&[1, 2]), 1 << 20).is_err());
    }

    proptest! {
        #[test]
        fn a_range_is_the_same_slice_as_a_full_decode(count in 0usize..30, skip in 0usize..35, take in 0usize..35) {
            let events: Vec<Event> = (0..count).map(|i| Event { id: format!("e{i}"), payload: vec![i as u8; i].into(), ..Event::default() }).collect();
            let body = encode(&events);
            let range = decode_range(Compression::None, &body, 1 << 20, skip, take).unwrap();
            let expected: Vec<Event> = events.into_iter().skip(skip).take(take).collect();
            prop_assert_eq!(range, expected);
        }

        #[test]
        fn bodies_round_trip_with_either_codec(
            ids in proptest::collection::vec("[a-z0-9]{1,8}", 0..40),
            payload in proptest::collection::vec(any::<u8>(), 0..200),
            lz4 in any::<bool>(),
        ) {
            let events: Vec<Event> = ids.iter().map(|id| Event { id: id.clone(), payload: payload.clone().into(), ..Event::default() }).collect();
            let codec = if lz4 { Compression::Lz4 } else { Compression::None };
            let body = compress(codec, &encode(&events));
            prop_assert_eq!(decode(codec, &body, 1 << 24).unwrap(), events);
        }

        #[test]
        fn uncompressed_payloads_are_slices_of_the_body_not_copies(count in 1usize..20, len in 1usize..100) {
            let events: Vec<Event> = (0..count).map(|i| Event { id: format!("e{i}"), payload: vec![i as u8; len].into(), ..Event::default() }).collect();
            let body = encode(&events);
            let span = body.as_ptr_range();
            for event in decode(Compression::None, &body, 1 << 20).unwrap() {
                prop_assert!(span.contains(&event.payload.as_ptr()));
            }
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300), lz4 in any::<bool>()) {
            let codec = if lz4 { Compression::Lz4 } else { Compression::None };
            let _ = decode(codec, &Bytes::from(bytes), 1 << 16);
        }
    }
}
