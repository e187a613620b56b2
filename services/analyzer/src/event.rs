//! Records as the analyzer reads them: decoded once, without copying or allocating.
//!
//! The broker's `Subscribe` stream carries `Record { partition, offset, append_time, Event
//! event }`. The analyzer decodes that stream with its own message types in which the
//! event stays the encoded bytes it was on the wire ([`RawRecord::event`], a slice of the
//! received frame), then reads the fields a query needs straight out of those bytes with
//! [`EventView`]: strings are borrowed, attributes and headers are looked up by scanning
//! their entries, nothing is allocated per event. The message types are wire-compatible
//! with `runnel.v1.SubscribeResponse` (a message field and a `bytes` field are both
//! length-delimited), which a property test pins against the generated types; the group
//! member is `runnel-client`'s, decoding its stream as [`RawSubscribeResponse`]. The member
//! asks for stored batches (`SubscribeRequest.stored`), so the broker sends each batch as
//! it keeps it, decoding nothing; [`RawRecordChunk::read_stored`] cuts the batch's body into
//! the same records, each event a slice of the body.

use bytes::Bytes;
use runnel_client::StreamPart;
use runnel_proto::records::RecordsError;
use runnel_proto::stored::StoredBatch;
use runnel_proto::v1::Assignment;

/// `runnel.v1.SubscribeResponse`, with the records' events left encoded.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct RawSubscribeResponse {
    #[prost(oneof = "RawMessage", tags = "1, 2")]
    pub(crate) message: Option<RawMessage>,
}

impl runnel_client::SubscribeMessage for RawSubscribeResponse {
    type Records = RawRecordChunk;

    fn into_part(self) -> Result<Option<StreamPart<RawRecordChunk>>, RecordsError> {
        let Some(message) = self.message else {
            return Ok(None);
        };
        Ok(Some(match message {
            RawMessage::Assignment(assignment) => StreamPart::Assignment {
                generation: assignment.generation,
                partitions: assignment.partitions,
                starts: assignment.starts,
            },
            RawMessage::Records(mut chunk) => {
                chunk.read_stored()?;
                StreamPart::Records {
                    generation: chunk.generation,
                    partition: chunk.partition,
                    records: chunk,
                }
            }
        }))
    }
}

/// The largest records body of one stored batch, uncompressed, the analyzer reads.
const MAX_BATCH_BYTES: usize = 256 << 20;

/// `runnel.v1.SubscribeResponse.message`.
#[derive(Clone, PartialEq, prost::Oneof)]
pub(crate) enum RawMessage {
    /// Records of one partition.
    #[prost(message, tag = "1")]
    Records(RawRecordChunk),
    /// A group member's new assignment.
    #[prost(message, tag = "2")]
    Assignment(Assignment),
}

/// `runnel.v1.RecordChunk`.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct RawRecordChunk {
    #[prost(uint32, tag = "1")]
    pub(crate) partition: u32,
    #[prost(message, repeated, tag = "2")]
    pub(crate) records: Vec<RawRecord>,
    #[prost(uint64, tag = "3")]
    pub(crate) generation: u64,
    /// Stored batches as the broker keeps them (`runnel_proto::stored`): what the member
    /// asks for, read into `records` by [`RawRecordChunk::read_stored`].
    #[prost(bytes = "bytes", repeated, tag = "4")]
    pub(crate) stored_batches: Vec<Bytes>,
    #[prost(uint64, tag = "5")]
    pub(crate) first_offset: u64,
}

impl RawRecordChunk {
    /// Turns the chunk's stored batches into records from `first_offset` on, each event
    /// a slice of its batch's body (decompressed once if it was compressed).
    pub(crate) fn read_stored(&mut self) -> Result<(), RecordsError> {
        for stored in std::mem::take(&mut self.stored_batches) {
            let batch = StoredBatch::parse(stored).map_err(RecordsError::from)?;
            let append_time = Some(prost_types::Timestamp::from(batch.header.append_time));
            let partition = self.partition;
            batch.encoded_events(self.first_offset, MAX_BATCH_BYTES, |offset, event| {
                self.records.push(RawRecord {
                    partition,
                    offset,
                    append_time,
                    event,
                });
            })?;
        }
        Ok(())
    }
}

/// `runnel.v1.Record`, its event still encoded.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct RawRecord {
    #[prost(uint32, tag = "1")]
    pub(crate) partition: u32,
    #[prost(uint64, tag = "2")]
    pub(crate) offset: u64,
    #[prost(message, optional, tag = "3")]
    pub(crate) append_time: Option<prost_types::Timestamp>,
    #[prost(bytes = "bytes", tag = "4")]
    pub(crate) event: Bytes,
}

/// Why an encoded event cannot be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Malformed;

/// The fields of one encoded `runnel.v1.Event`, borrowed from its bytes.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct EventView<'a> {
    pub(crate) id: &'a str,
    pub(crate) source: &'a str,
    pub(crate) kind: &'a str,
    pub(crate) key: &'a str,
    /// Unix milliseconds, if the event has a time.
    pub(crate) event_time: Option<i64>,
    pub(crate) payload: &'a [u8],
    /// The encoded map entries, each `bytes` of a `{1: key, 2: value}` message.
    attributes: Entries<'a>,
    headers: Entries<'a>,
}

/// The map entries of one map field, found again by scanning the event.
#[derive(Debug, Clone, Copy, Default)]
struct Entries<'a> {
    event: &'a [u8],
    tag: u32,
    present: bool,
}

impl<'a> Entries<'a> {
    /// The value of the entry with `name` (the last one wins, as in protobuf).
    fn get(&self, name: &str) -> Option<&'a str> {
        if !self.present {
            return None;
        }
        let mut found = None;
        let mut reader = Reader(self.event);
        while let Ok(Some((tag, field))) = reader.field() {
            if tag != self.tag {
                continue;
            }
            let Field::Bytes(entry) = field else { continue };
            let mut entry = Reader(entry);
            let (mut key, mut value) = ("", "");
            while let Ok(Some((tag, field))) = entry.field() {
                match (tag, field) {
                    (1, Field::Bytes(b)) => key = std::str::from_utf8(b).unwrap_or(""),
                    (2, Field::Bytes(b)) => value = std::str::from_utf8(b).unwrap_or(""),
                    _ => {}
                }
            }
            if key == name {
                found = Some(value);
            }
        }
        found
    }
}

impl<'a> EventView<'a> {
    /// Reads an encoded event. Unknown fields are skipped, as protobuf requires.
    pub(crate) fn parse(bytes: &'a [u8]) -> Result<EventView<'a>, Malformed> {
        let mut view = EventView {
            attributes: Entries {
                event: bytes,
                tag: 6,
                present: false,
            },
            headers: Entries {
                event: bytes,
                tag: 8,
                present: false,
            },
            ..EventView::default()
        };
        let text = |b: &'a [u8]| std::str::from_utf8(b).map_err(|_| Malformed);
        let mut reader = Reader(bytes);
        while let Some((tag, field)) = reader.field()? {
            match (tag, field) {
                (1, Field::Bytes(b)) => view.id = text(b)?,
                (2, Field::Bytes(b)) => view.source = text(b)?,
                (3, Field::Bytes(b)) => view.kind = text(b)?,
                (4, Field::Bytes(b)) => view.key = text(b)?,
                (5, Field::Bytes(b)) => view.event_time = Some(timestamp_millis(b)?),
                (6, Field::Bytes(_)) => view.attributes.present = true,
                (7, Field::Bytes(b)) => view.payload = b,
                (8, Field::Bytes(_)) => view.headers.present = true,
                (1..=8, _) => return Err(Malformed),
                _ => {}
            }
        }
        Ok(view)
    }

    /// The attribute `name`, if the event has it.
    pub(crate) fn attribute(&self, name: &str) -> Option<&'a str> {
        self.attributes.get(name)
    }

    /// The header `name` (such as `traceparent`), if the event has it.
    pub(crate) fn header(&self, name: &str) -> Option<&'a str> {
        self.headers.get(name)
    }
}

/// A `google.protobuf.Timestamp` as Unix milliseconds (nanos clamped as `Millis` does).
fn timestamp_millis(bytes: &[u8]) -> Result<i64, Malformed> {
    let (mut seconds, mut nanos) = (0i64, 0i64);
    let mut reader = Reader(bytes);
    while let Some((tag, field)) = reader.field()? {
        match (tag, field) {
            (1, Field::Varint(v)) => seconds = v as i64,
            (2, Field::Varint(v)) => nanos = i64::from(v as i32),
            _ => {}
        }
    }
    Ok(seconds
        .saturating_mul(1000)
        .saturating_add(nanos.clamp(0, 999_999_999) / 1_000_000))
}

/// One field's value on the wire.
enum Field<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
    Fixed,
}

/// A cursor over protobuf wire format.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn varint(&mut self) -> Result<u64, Malformed> {
        let mut value = 0u64;
        for (i, &byte) in self.0.iter().enumerate().take(10) {
            value |= u64::from(byte & 0x7f) << (7 * i);
            if byte < 0x80 {
                self.0 = &self.0[i + 1..];
                return Ok(value);
            }
        }
        Err(Malformed)
    }

    fn skip(&mut self, n: usize) -> Result<&'a [u8], Malformed> {
        if n > self.0.len() {
            return Err(Malformed);
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }

    /// The next field, or `None` at the end.
    fn field(&mut self) -> Result<Option<(u32, Field<'a>)>, Malformed> {
        if self.0.is_empty() {
            return Ok(None);
        }
        let key = self.varint()?;
        let tag = u32::try_from(key >> 3).map_err(|_| Malformed)?;
        let field = match key & 7 {
            0 => Field::Varint(self.varint()?),
            1 => {
                self.skip(8)?;
                Field::Fixed
            }
            2 => {
                let len = usize::try_from(self.varint()?).map_err(|_| Malformed)?;
                Field::Bytes(self.skip(len)?)
            }
            5 => {
                self.skip(4)?;
                Field::Fixed
            }
            _ => return Err(Malformed),
        };
        Ok(Some((tag, field)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use prost::Message;
    use runnel_client::SubscribeMessage as _;
    use runnel_proto::Millis;
    use runnel_proto::records;
    use runnel_proto::stored::BatchHeader;
    use runnel_proto::v1::{
        Compression, Event, Record, RecordChunk, SubscribeResponse, subscribe_response,
    };
    use std::collections::HashMap;

    fn event() -> impl Strategy<Value = Event> {
        (
            ".{0,12}",
            ".{0,12}",
            ".{0,8}",
            ".{0,12}",
            proptest::option::of(-1_000_000_000_000_000i64..1_000_000_000_000_000),
            proptest::collection::hash_map("[a-z]{0,6}", ".{0,8}", 0..4),
            proptest::collection::vec(any::<u8>(), 0..64),
            proptest::collection::hash_map("[a-z]{0,6}", ".{0,8}", 0..3),
        )
            .prop_map(
                |(id, source, kind, key, ms, attributes, payload, headers)| Event {
                    id,
                    source,
                    r#type: kind,
                    key,
                    event_time: ms.map(|ms| Millis(ms).into()),
                    attributes,
                    payload: payload.into(),
                    headers,
                },
            )
    }

    proptest! {
        /// Every field reads back as prost encoded it.
        #[test]
        fn a_view_reads_what_prost_wrote(e in event()) {
            let bytes = e.encode_to_vec();
            let view = EventView::parse(&bytes).unwrap();
            prop_assert_eq!(view.id, e.id.as_str());
            prop_assert_eq!(view.source, e.source.as_str());
            prop_assert_eq!(view.kind, e.r#type.as_str());
            prop_assert_eq!(view.key, e.key.as_str());
            prop_assert_eq!(view.event_time, e.event_time.map(|t| Millis::from(t).0));
            prop_assert_eq!(view.payload, &e.payload[..]);
            for (name, value) in &e.attributes {
                prop_assert_eq!(view.attribute(name), Some(value.as_str()));
            }
            for (name, value) in &e.headers {
                prop_assert_eq!(view.header(name), Some(value.as_str()));
            }
            prop_assert_eq!(view.attribute("NOT-THERE"), None);
        }

        /// The raw stream types decode what the broker's generated types encode.
        #[test]
        fn raw_records_are_wire_compatible(events in proptest::collection::vec(event(), 0..5), partition in 0u32..8, generation in any::<u64>()) {
            let records: Vec<Record> = events.iter().enumerate().map(|(i, e)| Record {
                partition,
                offset: i as u64 * 3,
                append_time: Some(Millis(1000).into()),
                event: Some(e.clone()),
            }).collect();
            let message = SubscribeResponse {
                message: Some(subscribe_response::Message::Records(RecordChunk { partition, records, generation, ..RecordChunk::default() })),
            };
            let raw = RawSubscribeResponse::decode(message.encode_to_vec().as_slice()).unwrap();
            let Some(RawMessage::Records(chunk)) = raw.message else { panic!("records") };
            prop_assert_eq!((chunk.partition, chunk.generation), (partition, generation));
            prop_assert_eq!(chunk.records.len(), events.len());
            for (i, (raw, e)) in chunk.records.iter().zip(&events).enumerate() {
                prop_assert_eq!(raw.offset, i as u64 * 3);
                prop_assert_eq!(Event::decode(raw.event.clone()).unwrap(), e.clone());
            }
        }

        /// A chunk of stored batches reads as the records the broker would have decoded:
        /// from the chunk's first offset on, each with its batch's offset and time.
        #[test]
        fn stored_batches_read_as_records(events in proptest::collection::vec(event(), 1..8), split in 0usize..8, skip in 0u64..8, lz4 in any::<bool>()) {
            let compression = if lz4 { Compression::Lz4 } else { Compression::None };
            let split = split.min(events.len());
            let mut stored_batches = Vec::new();
            for (base, part) in [(50u64, &events[..split]), (50 + split as u64, &events[split..])] {
                if part.is_empty() {
                    continue;
                }
                let header = BatchHeader {
                    compression,
                    record_count: part.len() as u32,
                    base_offset: base,
                    append_time: Millis(base as i64),
                    producer_id: 0,
                    base_sequence: 0,
                    deduplicated: false,
                };
                let body = records::compress(compression, &records::encode(part));
                stored_batches.push(StoredBatch::new(header, &body).stored);
            }
            let first_offset = 50 + skip.min(events.len() as u64 - 1);
            let message = SubscribeResponse {
                message: Some(subscribe_response::Message::Records(RecordChunk { partition: 3, generation: 9, stored_batches, first_offset, records: Vec::new() })),
            };
            let raw = RawSubscribeResponse::decode(message.encode_to_vec().as_slice()).unwrap();
            let Some(StreamPart::Records { records: chunk, .. }) = raw.into_part().unwrap() else { panic!("records") };
            let expected: Vec<(u64, &Event)> = (50u64..).zip(&events).filter(|(o, _)| *o >= first_offset).collect();
            prop_assert_eq!(chunk.records.len(), expected.len());
            for (raw, (offset, e)) in chunk.records.iter().zip(expected) {
                prop_assert_eq!(raw.offset, offset);
                let batch_base = if offset < 50 + split as u64 { 50 } else { 50 + split as u64 };
                prop_assert_eq!(raw.append_time, Some(Millis(batch_base as i64).into()));
                prop_assert_eq!(&Event::decode(raw.event.clone()).unwrap(), e);
            }
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            if let Ok(view) = EventView::parse(&bytes) {
                let _ = (view.attribute("a"), view.header("traceparent"));
            }
        }
    }

    #[test]
    fn the_last_duplicate_map_entry_wins_and_bad_utf8_is_refused() {
        let e = Event {
            headers: HashMap::from([("traceparent".to_owned(), "x".to_owned())]),
            ..Event::default()
        };
        let mut bytes = e.encode_to_vec();
        let again = Event {
            headers: HashMap::from([("traceparent".to_owned(), "y".to_owned())]),
            ..Event::default()
        };
        bytes.extend(again.encode_to_vec());
        assert_eq!(
            EventView::parse(&bytes).unwrap().header("traceparent"),
            Some("y")
        );
        // Field 4 (key) as two bytes that are not UTF-8.
        assert_eq!(
            EventView::parse(&[0x22, 2, 0xff, 0xfe]).unwrap_err(),
            Malformed
        );
    }
}
