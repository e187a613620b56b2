//! What one frame of a segment holds: `kind u8 | id u64 LE | payload`.
//!
//! `runnel-log` frames every record (`len u32 | crc32c u32 | …`), so a record on disk reads
//! `len | crc32c | kind | id | payload`. The kinds:
//!
//! | kind | name | id | payload |
//! |---:|---|---|---|
//! | 1 | `Received` | the entry's id | entry header, then the messages (RBML, HML) |
//! | 2 | `Sent` | the entry's id | the same, written just before sending (SBML) |
//! | 3 | `Released` | every entry up to this id was acknowledged downstream | empty |
//! | 4 | `Skipped` | the first of a run of ids that could not be written | the last id, u64 LE |
//!
//! The entry header: `producer_id u64 | base_sequence u64 | count u32 | partition u32 |
//! topic_len u8 | topic`. Entry ids are consecutive within a shard, so a lost entry shows
//! as a gap; `Skipped` accounts for ids that a full disk refused, so that only a real loss
//! is one.

use crate::{Destination, Entry};
use bytes::Bytes;
use std::sync::Arc;

/// The magic of segment files; the trailing digit is the content's version.
pub(crate) const MAGIC: [u8; 8] = *b"RNLMSGL1";

const KIND_RECEIVED: u8 = 1;
const KIND_SENT: u8 = 2;
const KIND_RELEASED: u8 = 3;
const KIND_SKIPPED: u8 = 4;

/// Bytes of `kind | id`.
const PREFIX_LEN: usize = 9;
/// Bytes of an entry header without its topic.
const ENTRY_FIXED_LEN: usize = 8 + 8 + 4 + 4 + 1;
/// The longest topic name an entry can hold.
pub(crate) const MAX_TOPIC_LEN: usize = u8::MAX as usize;

/// Whether an entry was logged on arrival or just before it was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EntryKind {
    /// Receiver-based (RBML and HML): logged as it arrived.
    Received,
    /// Sender-based (SBML): logged as it was about to be sent.
    Sent,
}

/// One decoded record.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Record {
    /// Messages for one destination.
    Entry(EntryKind, Entry),
    /// Every entry up to `through` was acknowledged downstream.
    Released { through: u64 },
    /// Ids `first..=last` were never written (the disk refused them).
    Skipped { first: u64, last: u64 },
}

/// The head of an entry's frame (everything but the messages), so that the messages can
/// go to the file straight from the buffer they arrived in.
pub(crate) fn entry_head(kind: EntryKind, entry: &Entry) -> Vec<u8> {
    let topic = entry.destination.topic.as_bytes();
    let mut head = Vec::with_capacity(PREFIX_LEN + ENTRY_FIXED_LEN + topic.len());
    head.push(match kind {
        EntryKind::Received => KIND_RECEIVED,
        EntryKind::Sent => KIND_SENT,
    });
    head.extend_from_slice(&entry.id.to_le_bytes());
    head.extend_from_slice(&entry.producer_id.to_le_bytes());
    head.extend_from_slice(&entry.base_sequence.to_le_bytes());
    head.extend_from_slice(&entry.count.to_le_bytes());
    head.extend_from_slice(&entry.destination.partition.to_le_bytes());
    // Topic names are checked against MAX_TOPIC_LEN when a message is submitted.
    head.push(topic.len() as u8);
    head.extend_from_slice(topic);
    head
}

/// The bytes an entry's frame takes on disk, frame header included.
pub(crate) fn entry_frame_len(topic: &str, body: usize) -> u64 {
    (runnel_log::FRAME_HEADER_LEN as usize + PREFIX_LEN + ENTRY_FIXED_LEN + topic.len() + body)
        as u64
}

/// A `Released` record.
pub(crate) fn released(through: u64) -> Vec<u8> {
    let mut frame = Vec::with_capacity(PREFIX_LEN);
    frame.push(KIND_RELEASED);
    frame.extend_from_slice(&through.to_le_bytes());
    frame
}

/// A `Skipped` record.
pub(crate) fn skipped(first: u64, last: u64) -> Vec<u8> {
    let mut frame = Vec::with_capacity(PREFIX_LEN + 8);
    frame.push(KIND_SKIPPED);
    frame.extend_from_slice(&first.to_le_bytes());
    frame.extend_from_slice(&last.to_le_bytes());
    frame
}

/// Decodes a frame's payload. Every error is a frame that passed its checksum but does
/// not hold a record: corruption, or a file written by something else.
pub(crate) fn decode(payload: &[u8]) -> Result<Record, String> {
    let mut reader = Reader(payload);
    let kind = reader.u8()?;
    let id = reader.u64()?;
    match kind {
        KIND_RECEIVED | KIND_SENT => {
            let producer_id = reader.u64()?;
            let base_sequence = reader.u64()?;
            let count = reader.u32()?;
            let partition = reader.u32()?;
            let topic_len = reader.u8()? as usize;
            let topic = std::str::from_utf8(reader.take(topic_len)?)
                .map_err(|_| "the topic is not UTF-8".to_owned())?;
            let body = reader.0;
            if count == 0 || body.is_empty() {
                return Err(format!("entry {id} holds no messages"));
            }
            let kind = if kind == KIND_RECEIVED {
                EntryKind::Received
            } else {
                EntryKind::Sent
            };
            Ok(Record::Entry(
                kind,
                Entry {
                    id,
                    destination: Destination {
                        topic: Arc::from(topic),
                        partition,
                    },
                    producer_id,
                    base_sequence,
                    count,
                    body: Bytes::copy_from_slice(body).into(),
                },
            ))
        }
        KIND_RELEASED if reader.0.is_empty() => Ok(Record::Released { through: id }),
        KIND_SKIPPED => {
            let last = reader.u64()?;
            if !reader.0.is_empty() || last < id {
                return Err(format!("skipped record {id} is malformed"));
            }
            Ok(Record::Skipped { first: id, last })
        }
        other => Err(format!("unknown record kind {other} (id {id})")),
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err("the record ends early".into());
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, String> {
        let bytes = self.take(4)?;
        Ok(u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
    }

    fn u64(&mut self) -> Result<u64, String> {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn entry_strategy() -> impl Strategy<Value = Entry> {
        (
            any::<u64>(),
            "[a-z0-9._-]{1,40}",
            any::<u32>(),
            any::<u64>(),
            any::<u64>(),
            1u32..10_000,
            proptest::collection::vec(any::<u8>(), 1..300),
        )
            .prop_map(
                |(id, topic, partition, producer_id, base_sequence, count, body)| Entry {
                    id,
                    destination: Destination {
                        topic: Arc::from(topic.as_str()),
                        partition,
                    },
                    producer_id,
                    base_sequence,
                    count,
                    body: Bytes::from(body).into(),
                },
            )
    }

    proptest! {
        #[test]
        fn entries_round_trip(entry in entry_strategy(), sent in any::<bool>()) {
            let kind = if sent { EntryKind::Sent } else { EntryKind::Received };
            let mut frame = entry_head(kind, &entry);
            for chunk in entry.body.chunks() {
                frame.extend_from_slice(chunk);
            }
            prop_assert_eq!(
                frame.len() as u64 + runnel_log::FRAME_HEADER_LEN,
                entry_frame_len(&entry.destination.topic, entry.body.len())
            );
            prop_assert_eq!(decode(&frame).unwrap(), Record::Entry(kind, entry));
        }

        #[test]
        fn markers_round_trip(first in any::<u64>(), extra in 0u64..1000) {
            let last = first.saturating_add(extra);
            prop_assert_eq!(decode(&released(first)).unwrap(), Record::Released { through: first });
            prop_assert_eq!(decode(&skipped(first, last)).unwrap(), Record::Skipped { first, last });
        }

        #[test]
        fn garbage_is_an_error_never_a_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode(&bytes);
        }
    }

    #[test]
    fn truncated_and_empty_entries_are_refused() {
        let entry = Entry {
            id: 7,
            destination: Destination {
                topic: Arc::from("events"),
                partition: 1,
            },
            producer_id: 9,
            base_sequence: 0,
            count: 1,
            body: Bytes::from_static(b"x").into(),
        };
        let head = entry_head(EntryKind::Received, &entry);
        for cut in 0..head.len() {
            assert!(decode(&head[..cut]).is_err(), "cut at {cut}");
        }
        assert!(decode(&head).unwrap_err().contains("no messages"));
        assert!(decode(&[9, 0, 0, 0, 0, 0, 0, 0, 0]).is_err());
        let mut bad_skip = skipped(5, 9);
        bad_skip.truncate(12);
        assert!(decode(&bad_skip).is_err());
        assert!(decode(&skipped(9, 5)).is_err());
    }
}
