//! The records body of a [`RecordBatch`](crate::v1::RecordBatch): per record a protobuf
//! varint length and an encoded `Event`, compressed as a whole or not. Producers build it
//! with [`encode`] (and [`compress`]); consumers of raw batches read it with [`decode`].

use crate::v1::{Compression, Event};
use bytes::{Buf, Bytes};
use prost::Message;
use std::borrow::Cow;

/// Why a records body cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct RecordsError(String);

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

/// The uncompressed body, refusing anything that would grow past `max_len` bytes.
fn decompressed(
    compression: Compression,
    records: &[u8],
    max_len: usize,
) -> Result<Cow<'_, [u8]>, RecordsError> {
    match compression {
        Compression::None => Ok(Cow::Borrowed(records)),
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
                .map(Cow::Owned)
                .map_err(|e| RecordsError(format!("lz4 body does not decompress: {e}")))
        }
    }
}

/// Decodes every record of a body that uncompresses to at most `max_len` bytes.
pub fn decode(
    compression: Compression,
    records: &[u8],
    max_len: usize,
) -> Result<Vec<Event>, RecordsError> {
    decode_range(compression, records, max_len, 0, usize::MAX)
}

/// Decodes at most `take` records after the first `skip`, which are stepped over by their
/// lengths without being decoded: a reader that wants a few records from the middle of a
/// large batch pays for those few.
pub fn decode_range(
    compression: Compression,
    records: &[u8],
    max_len: usize,
    skip: usize,
    take: usize,
) -> Result<Vec<Event>, RecordsError> {
    let body = decompressed(compression, records, max_len)?;
    let mut buf: &[u8] = &body;
    let mut events = Vec::new();
    let mut index = 0usize;
    while buf.has_remaining() && events.len() < take {
        if index < skip {
            let len = prost::decode_length_delimiter(&mut buf)
                .map_err(|e| RecordsError(format!("record {index} has no length: {e}")))?;
            if len > buf.remaining() {
                return Err(RecordsError(format!(
                    "record {index} runs past the end of the body"
                )));
            }
            buf.advance(len);
        } else {
            let event = Event::decode_length_delimited(&mut buf)
                .map_err(|e| RecordsError(format!("record {index} does not decode: {e}")))?;
            events.push(event);
        }
        index += 1;
    }
    Ok(events)
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
            decode(Compression::Lz4, &forged, 1 << 20)
                .unwrap_err()
                .0
                .contains("claims")
        );
        assert!(decode(Compression::Lz4, &[1, 2], 1 << 20).is_err());
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
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300), lz4 in any::<bool>()) {
            let codec = if lz4 { Compression::Lz4 } else { Compression::None };
            let _ = decode(codec, &bytes, 1 << 16);
        }
    }
}
