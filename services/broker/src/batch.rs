//! Record batches: how a producer's batch is checked, stored and read back.
//!
//! A batch is stored as one frame of the partition's segment file (`runnel_log` framing:
//! length and CRC32C over the whole frame) holding a fixed header and the records exactly
//! as the producer sent them — compressed or not — so that nothing is re-encoded record by
//! record on the way in or out. The layout is public ([`runnel_proto::stored`]): `Fetch`
//! and `Subscribe` hand stored batches to readers that ask for them as they are.

use bytes::Bytes;
use runnel_proto::records::{self, RecordsError};
pub(crate) use runnel_proto::stored::{BatchHeader, StoredBatch};
use runnel_proto::v1::Compression;

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

    proptest! {
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300), count in 0u32..10, lz4 in any::<bool>()) {
            let codec = if lz4 { Compression::Lz4 } else { Compression::None };
            let bytes = Bytes::from(bytes);
            let _ = validate(codec, &bytes, count, 1 << 16, None);
        }
    }
}
