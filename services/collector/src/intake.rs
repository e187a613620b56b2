//! What every interaction pattern shares: validate a batch, stamp each event with the
//! trace of the call that brought it, partition it, encode it once (as the broker's
//! records body), hand it to the message log, and await the ack level asked for.

use crate::error::CollectorError;
use crate::topics::Topics;
use crate::validate::{Limits, validate_batch};
use bytes::BytesMut;
use prost::Message;
use runnel_msglog::{AckLevel as LogLevel, Destination, MessageLog, Part, Submission, Ticket};
use runnel_proto::v1::{AckLevel, Event, EventReceipt, RecordPosition};
use runnel_telemetry::propagation::inject_into_headers;
use std::collections::HashMap;
use std::sync::Arc;

/// A batch's events encoded as the message log's parts.
#[derive(Debug)]
struct Encoded {
    parts: Vec<EncodedPart>,
    /// Per event: its part and its place in that part.
    placement: Vec<(usize, u32)>,
    /// Per event, its id.
    ids: Vec<String>,
}

/// Events of one partition, length-delimited and back to back (the broker's records body).
#[derive(Debug)]
struct EncodedPart {
    partition: u32,
    body: BytesMut,
    count: u32,
}

/// Partitions `events`, stamps each with `trace`, and encodes them into parts: per
/// partition in arrival order, a new part started when the open one would pass
/// `max_part_events` or `max_part_bytes` (a single event larger than that has a part of its
/// own).
///
/// Two passes, so that no buffer grows: the first decides each event's part and sums the
/// parts' encoded sizes, the second encodes into buffers allocated at exactly those sizes
/// (a buffer grown by doubling copies what it holds and touches fresh pages every time).
fn encode(
    mut events: Vec<Event>,
    partitions: u32,
    trace: &HashMap<String, String>,
    max_part_bytes: usize,
    max_part_events: u32,
) -> Encoded {
    // Per part: partition, encoded bytes, events.
    let mut sizes: Vec<(u32, usize, u32)> = Vec::new();
    let mut open: HashMap<u32, usize> = HashMap::new();
    let mut placement = Vec::with_capacity(events.len());
    for event in &mut events {
        // Keyless events go by identity, so that a client's retry meets its original in
        // the broker, which recognises it there.
        let identity = runnel_proto::event_identity(&event.source, &event.id);
        let partition = runnel_proto::partition_for_event(&event.key, identity, partitions);
        event
            .headers
            .extend(trace.iter().map(|(k, v)| (k.clone(), v.clone())));
        let len = event.encoded_len();
        let framed = prost::length_delimiter_len(len) + len;
        let index = match open.get(&partition) {
            Some(&i) if sizes[i].2 < max_part_events && sizes[i].1 + framed <= max_part_bytes => i,
            _ => {
                sizes.push((partition, 0, 0));
                open.insert(partition, sizes.len() - 1);
                sizes.len() - 1
            }
        };
        let part = &mut sizes[index];
        placement.push((index, part.2));
        part.1 += framed;
        part.2 += 1;
    }
    let mut parts: Vec<EncodedPart> = sizes
        .into_iter()
        .map(|(partition, bytes, count)| EncodedPart {
            partition,
            body: BytesMut::with_capacity(bytes),
            count,
        })
        .collect();
    let mut ids = Vec::with_capacity(events.len());
    for (event, &(index, _)) in events.into_iter().zip(&placement) {
        // Writing into a BytesMut cannot fail; the room was sized above.
        let _ = event.encode_length_delimited(&mut parts[index].body);
        ids.push(event.id);
    }
    Encoded {
        parts,
        placement,
        ids,
    }
}

/// The collector's way into the message log.
#[derive(Debug)]
pub(crate) struct Intake {
    log: Arc<MessageLog>,
    topics: Topics,
    limits: Limits,
    /// The topic of `Ingest`, `Track`, `Send` and `Stream`.
    pub(crate) default_topic: Arc<str>,
    auto_create_topics: bool,
    max_part_bytes: usize,
    max_part_events: u32,
}

/// A batch taken in: await it with [`Accepted::receipts`].
#[derive(Debug)]
pub(crate) struct Accepted {
    ticket: Ticket,
    topic: Arc<str>,
    ids: Vec<String>,
    /// Per event: its part in the submission and its place in that part.
    placement: Vec<(usize, u32)>,
    /// Per part: its partition.
    partitions: Vec<u32>,
    level: LogLevel,
}

impl Accepted {
    /// Waits for the ack level and answers with one receipt per event (with positions at
    /// `STORED`).
    pub(crate) async fn receipts(self) -> Result<Vec<EventReceipt>, CollectorError> {
        let offsets = self.ticket.wait().await?;
        let topic = self.topic.to_string();
        let receipts = self
            .ids
            .into_iter()
            .zip(self.placement)
            .map(|(id, (part, index))| {
                let position = offsets.as_ref().and_then(|offsets| {
                    offsets
                        .get(part)
                        .copied()
                        .flatten()
                        .map(|base| RecordPosition {
                            topic: topic.clone(),
                            partition: self.partitions[part],
                            offset: base + u64::from(index),
                        })
                });
                EventReceipt { id, position }
            })
            .collect();
        if self.level == LogLevel::Stored {
            metrics::counter!("runnel_collector_stored_batches_total").increment(1);
        }
        Ok(receipts)
    }

    /// Waits for the ack level without building receipts.
    pub(crate) async fn done(self) -> Result<(), CollectorError> {
        self.ticket.wait().await?;
        Ok(())
    }
}

/// The message log's level for a request's ack level.
pub(crate) fn log_level(level: i32) -> Result<LogLevel, CollectorError> {
    match AckLevel::try_from(level) {
        Ok(AckLevel::Default | AckLevel::Stored) => Ok(LogLevel::Stored),
        Ok(AckLevel::Logged) => Ok(LogLevel::Logged),
        Ok(AckLevel::Accepted) => Ok(LogLevel::Accepted),
        Err(_) => Err(CollectorError::InvalidEvent(format!(
            "ack_level {level} is unknown"
        ))),
    }
}

impl Intake {
    pub(crate) fn new(
        log: Arc<MessageLog>,
        topics: Topics,
        limits: Limits,
        default_topic: &str,
        auto_create_topics: bool,
        max_part_bytes: usize,
        max_part_events: u32,
    ) -> Intake {
        Intake {
            log,
            topics,
            limits,
            default_topic: Arc::from(default_topic),
            auto_create_topics,
            max_part_bytes,
            max_part_events,
        }
    }

    /// The limits every event is checked against.
    pub(crate) fn limits(&self) -> Limits {
        self.limits
    }

    /// Takes `events` in for `topic` (the default topic when `None`), or refuses them all.
    /// `pattern` labels the metrics.
    pub(crate) async fn submit(
        &self,
        topic: Option<&str>,
        mut events: Vec<Event>,
        level: LogLevel,
        pattern: &'static str,
    ) -> Result<Accepted, CollectorError> {
        if let Err(error) = validate_batch(&mut events, self.limits, runnel_proto::now_millis()) {
            metrics::counter!("runnel_collector_batches_total", "pattern" => pattern, "outcome" => "invalid")
                .increment(1);
            return Err(error);
        }
        let topic: Arc<str> = match topic {
            None => Arc::clone(&self.default_topic),
            Some(name) => {
                crate::validate::validate_topic(name)?;
                Arc::from(name)
            }
        };
        let create = self.auto_create_topics || topic == self.default_topic;
        let partitions = self.topics.partitions(&topic, create).await?;

        // Every event carries the trace of the call that took it in, so that the broker,
        // the analyzer, the store and the gateway continue that trace.
        let mut trace = HashMap::new();
        inject_into_headers(&tracing::Span::current(), &mut trace);

        let Encoded {
            parts,
            placement,
            ids,
        } = encode(
            events,
            partitions,
            &trace,
            self.max_part_bytes,
            self.max_part_events,
        );
        let count = ids.len() as u64;
        let partitions_of: Vec<u32> = parts.iter().map(|p| p.partition).collect();
        let submission = Submission {
            parts: parts
                .into_iter()
                .map(
                    |EncodedPart {
                         partition,
                         body,
                         count,
                     }| Part {
                        destination: Destination {
                            topic: Arc::clone(&topic),
                            partition,
                        },
                        body: body.freeze(),
                        count,
                    },
                )
                .collect(),
            level,
            trace: Some(Arc::new(trace)),
        };
        let ticket = match self.log.submit(submission) {
            Ok(ticket) => ticket,
            Err(error) => {
                metrics::counter!("runnel_collector_batches_total", "pattern" => pattern, "outcome" => "refused")
                    .increment(1);
                return Err(error.into());
            }
        };
        metrics::counter!("runnel_collector_batches_total", "pattern" => pattern, "outcome" => "accepted")
            .increment(1);
        metrics::counter!("runnel_collector_events_total", "pattern" => pattern).increment(count);
        Ok(Accepted {
            ticket,
            topic,
            ids,
            placement,
            partitions: partitions_of,
            level,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// How parts were encoded before they were sized up front: one buffer per part, grown
    /// as events are encoded into it. The reference the two-pass encoding must match.
    fn encode_growing(
        events: Vec<Event>,
        partitions: u32,
        trace: &HashMap<String, String>,
        max_part_bytes: usize,
        max_part_events: u32,
    ) -> Encoded {
        let mut parts: Vec<(u32, BytesMut, u32)> = Vec::new();
        let mut open: HashMap<u32, usize> = HashMap::new();
        let mut placement = Vec::new();
        let mut ids = Vec::new();
        for mut event in events {
            let identity = runnel_proto::event_identity(&event.source, &event.id);
            let partition = runnel_proto::partition_for_event(&event.key, identity, partitions);
            event
                .headers
                .extend(trace.iter().map(|(k, v)| (k.clone(), v.clone())));
            let len = event.encoded_len();
            let framed = prost::length_delimiter_len(len) + len;
            let index = match open.get(&partition) {
                Some(&i)
                    if parts[i].2 < max_part_events
                        && parts[i].1.len() + framed <= max_part_bytes =>
                {
                    i
                }
                _ => {
                    parts.push((partition, BytesMut::new(), 0));
                    open.insert(partition, parts.len() - 1);
                    parts.len() - 1
                }
            };
            let part = &mut parts[index];
            event.encode_length_delimited(&mut part.1).unwrap();
            placement.push((index, part.2));
            part.2 += 1;
            ids.push(event.id);
        }
        let parts = parts
            .into_iter()
            .map(|(partition, body, count)| EncodedPart {
                partition,
                body,
                count,
            })
            .collect();
        Encoded {
            parts,
            placement,
            ids,
        }
    }

    /// A part as what it holds, its buffer's capacity aside.
    fn held(parts: Vec<EncodedPart>) -> Vec<(u32, Vec<u8>, u32)> {
        parts
            .into_iter()
            .map(|p| (p.partition, p.body.to_vec(), p.count))
            .collect()
    }

    fn event_strategy() -> impl Strategy<Value = Event> {
        (
            "[a-d]{1,3}",
            "[a-b]{0,2}",
            "[a-c]{0,2}",
            proptest::collection::vec(any::<u8>(), 0..300),
            proptest::collection::hash_map("[a-z]{1,4}", "[a-z]{0,6}", 0..3),
        )
            .prop_map(|(id, source, key, payload, attributes)| Event {
                id,
                source,
                r#type: "reading".into(),
                key,
                payload: payload.into(),
                attributes,
                ..Event::default()
            })
    }

    proptest! {
        /// Parts are split exactly as when they grew while being encoded, hold the same
        /// bytes, and each was allocated at exactly its size.
        #[test]
        fn parts_are_exactly_sized_and_split_as_before(
            events in proptest::collection::vec(event_strategy(), 1..60),
            partitions in 1u32..6,
            trace in proptest::collection::hash_map("[a-z]{1,11}", "[a-f0-9-]{0,55}", 0..3),
            max_part_bytes in 1usize..3000,
            max_part_events in 1u32..25,
        ) {
            let expected = encode_growing(
                events.clone(), partitions, &trace, max_part_bytes, max_part_events,
            );
            let encoded = encode(events, partitions, &trace, max_part_bytes, max_part_events);
            for part in &encoded.parts {
                prop_assert_eq!(part.body.capacity(), part.body.len(), "sized exactly");
            }
            prop_assert_eq!(held(encoded.parts), held(expected.parts));
            prop_assert_eq!(encoded.placement, expected.placement);
            prop_assert_eq!(encoded.ids, expected.ids);
        }
    }
}
