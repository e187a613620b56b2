//! Re-keying: how a query whose key is not the event key still keeps each key's state in
//! one partition.
//!
//! The broker places an event by its key, so a query keyed by the event key finds all of
//! a key's events in one partition and can keep that key's windows there. A query keyed by
//! anything else — a payload field, or one-to-many like every topic of a Meetup RSVP —
//! would see the same key in every partition, and instances owning different partitions
//! would write partial results over each other. Such a query runs in two stages, as Kafka
//! Streams does with its repartition topics:
//!
//! 1. the **source stage** reads the query's topic, filters, takes each event's keys and
//!    the aggregates' inputs, and produces one small event per key to the internal topic
//!    `_analyzer.<query>.keyed` (as many partitions as the source), keyed by the result
//!    key — so the broker puts each key in one partition;
//! 2. the **keyed stage** reads that topic and keeps the windows.
//!
//! Each forwarded event's id is its source position `<partition>/<offset>/<index>`; the
//! keyed stage drops any position it has passed, so a source task that replays after a
//! crash (or a stale owner during a rebalance) adds nothing twice. The source stage also
//! announces each source partition's watermark to every keyed partition (an event of type
//! [`MARK`]); a keyed partition's watermark is the least of them. Lateness is decided in
//! the source stage, by the source partition's watermark, exactly as for a direct query.

use crate::event::EventView;
use crate::path::Scalar;
use runnel_proto::Millis;
use runnel_proto::v1::Event;
use runnel_telemetry::propagation::TRACEPARENT;
use std::collections::HashMap;

/// The prefix of internal topics.
pub(crate) const TOPIC_PREFIX: &str = "_analyzer";
/// The type of a watermark announcement.
pub(crate) const MARK: &str = "runnel.watermark";

/// The forwarded event for one key of a source event.
pub(crate) fn keyed_event(
    partition: u32,
    offset: u64,
    index: u32,
    key: &str,
    time: i64,
    inputs: &[(usize, Scalar<'_>)],
    trace: Option<&str>,
) -> Event {
    Event {
        id: format!("{partition}/{offset}/{index}"),
        key: key.to_owned(),
        event_time: Some(Millis(time).into()),
        // Inputs are small scalars: JSON keeps them exact and readable.
        payload: serde_json::to_vec(inputs).unwrap_or_default().into(),
        headers: trace
            .map(|t| HashMap::from([(TRACEPARENT.to_owned(), t.to_owned())]))
            .unwrap_or_default(),
        ..Event::default()
    }
}

/// Source partition `partition`'s watermark, as of `offset`, for every keyed partition.
pub(crate) fn mark(partition: u32, offset: u64, watermark: i64) -> Event {
    Event {
        id: format!("{partition}/{offset}"),
        r#type: MARK.to_owned(),
        event_time: Some(Millis(watermark).into()),
        ..Event::default()
    }
}

/// A record of the internal topic.
#[derive(Debug, PartialEq)]
pub(crate) enum Keyed<'a> {
    Mark {
        source: u32,
        watermark: i64,
    },
    Event {
        source: u32,
        offset: u64,
        index: u32,
        time: i64,
        inputs: Vec<(usize, Scalar<'a>)>,
    },
}

impl Keyed<'_> {
    /// The source partition it came from.
    pub(crate) fn source(&self) -> u32 {
        match self {
            Keyed::Mark { source, .. } | Keyed::Event { source, .. } => *source,
        }
    }
}

/// Reads a record of the internal topic; `None` if it is not one.
pub(crate) fn parse<'a>(event: &EventView<'a>) -> Option<Keyed<'a>> {
    let mut parts = event.id.split('/');
    let source = parts.next()?.parse().ok()?;
    let offset = parts.next()?.parse().ok()?;
    let time = event.event_time?;
    if event.kind == MARK {
        return Some(Keyed::Mark {
            source,
            watermark: time,
        });
    }
    let index = parts.next()?.parse().ok()?;
    let inputs = serde_json::from_slice(event.payload).ok()?;
    Some(Keyed::Event {
        source,
        offset,
        index,
        time,
        inputs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;
    use std::borrow::Cow;

    #[test]
    fn forwarded_events_and_marks_read_back() {
        let inputs = vec![
            (0, Scalar::Num(1.5)),
            (2, Scalar::Text(Cow::Borrowed("a \"quoted\" topic"))),
            (3, Scalar::Bool(true)),
        ];
        let event = keyed_event(3, 77, 2, "Social", 1234, &inputs, Some("00-ab-cd-01"));
        let bytes = event.encode_to_vec();
        let view = EventView::parse(&bytes).unwrap();
        assert_eq!(view.key, "Social");
        assert_eq!(view.header(TRACEPARENT), Some("00-ab-cd-01"));
        assert_eq!(
            parse(&view),
            Some(Keyed::Event {
                source: 3,
                offset: 77,
                index: 2,
                time: 1234,
                inputs
            })
        );
        let bytes = mark(1, 9, -5).encode_to_vec();
        assert_eq!(
            parse(&EventView::parse(&bytes).unwrap()),
            Some(Keyed::Mark {
                source: 1,
                watermark: -5
            })
        );
        let stranger = Event {
            id: "not-a-position".into(),
            ..Event::default()
        }
        .encode_to_vec();
        assert_eq!(parse(&EventView::parse(&stranger).unwrap()), None);
    }
}
