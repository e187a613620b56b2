//! Event validation at the edge: everything the rest of the pipeline may rely on.
//!
//! Checked here so that the broker, the analyzer and the store never see an event they
//! cannot handle: a non-empty id unique within the batch, bounded field sizes, and
//! attributes and payload within limits. A missing event time is filled in with the time
//! the collector received the event (documented in the README), so every event downstream
//! has one.

use crate::error::CollectorError;
use runnel_proto::Millis;
use runnel_proto::v1::Event;
use std::collections::HashSet;

/// Longest id, source, type and attribute name, in bytes.
pub(crate) const MAX_NAME_BYTES: usize = 256;
/// Longest key and attribute value, in bytes.
pub(crate) const MAX_KEY_BYTES: usize = 1024;
/// Most attributes on one event.
pub(crate) const MAX_ATTRIBUTES: usize = 64;

/// `0001-01-01T00:00:00Z` and `9999-12-31T23:59:59Z`: the range a protobuf `Timestamp`
/// may hold, which keeps window arithmetic downstream far from overflow.
const MIN_TIMESTAMP_SECONDS: i64 = -62_135_596_800;
const MAX_TIMESTAMP_SECONDS: i64 = 253_402_300_799;

/// The limits a batch is checked against.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub(crate) max_batch_events: usize,
    pub(crate) max_payload_bytes: usize,
}

/// Checks a batch and fills in missing event times with `now`.
pub(crate) fn validate_batch(
    events: &mut [Event],
    limits: Limits,
    now: Millis,
) -> Result<(), CollectorError> {
    let invalid = |message: String| Err(CollectorError::InvalidEvent(message));
    if events.is_empty() {
        return invalid("events: a batch needs at least one event".into());
    }
    if events.len() > limits.max_batch_events {
        return invalid(format!(
            "events: {} events in one batch; the limit is {}",
            events.len(),
            limits.max_batch_events
        ));
    }
    let mut seen = HashSet::with_capacity(events.len());
    for (i, event) in events.iter_mut().enumerate() {
        let field = |name: &str| format!("events[{i}].{name}");
        if event.id.is_empty() {
            return invalid(format!("{} is required", field("id")));
        }
        for (name, value, limit) in [
            ("id", &event.id, MAX_NAME_BYTES),
            ("source", &event.source, MAX_NAME_BYTES),
            ("type", &event.r#type, MAX_NAME_BYTES),
            ("key", &event.key, MAX_KEY_BYTES),
        ] {
            if value.len() > limit {
                return invalid(format!(
                    "{} is {} bytes; the limit is {limit}",
                    field(name),
                    value.len()
                ));
            }
        }
        if !seen.insert(event.id.as_str()) {
            return invalid(format!(
                "{} {:?} appears twice in the batch",
                field("id"),
                event.id
            ));
        }
        if event.payload.len() > limits.max_payload_bytes {
            return invalid(format!(
                "{} is {} bytes; the limit is {}",
                field("payload"),
                event.payload.len(),
                limits.max_payload_bytes
            ));
        }
        if event.attributes.len() > MAX_ATTRIBUTES {
            return invalid(format!(
                "{} has {} entries; the limit is {MAX_ATTRIBUTES}",
                field("attributes"),
                event.attributes.len()
            ));
        }
        for (name, value) in &event.attributes {
            if name.is_empty() || name.len() > MAX_NAME_BYTES || value.len() > MAX_KEY_BYTES {
                return invalid(format!(
                    "{}[{name:?}]: names need 1-{MAX_NAME_BYTES} bytes and values at most {MAX_KEY_BYTES}",
                    field("attributes")
                ));
            }
        }
        match event.event_time {
            None => event.event_time = Some(now.into()),
            Some(ts) if !(0..1_000_000_000).contains(&ts.nanos) => {
                return invalid(format!(
                    "{} has nanos outside [0, 1e9)",
                    field("event_time")
                ));
            }
            Some(ts) if !(MIN_TIMESTAMP_SECONDS..=MAX_TIMESTAMP_SECONDS).contains(&ts.seconds) => {
                return invalid(format!(
                    "{} is outside the years 1 to 9999",
                    field("event_time")
                ));
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// Checks a topic name by the contract's rule ([`runnel_proto::names`]), the one the
/// broker stores topics under.
pub(crate) fn validate_topic(name: &str) -> Result<(), CollectorError> {
    runnel_proto::names::validate_topic_name(name)
        .map_err(|error| CollectorError::InvalidEvent(error.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const LIMITS: Limits = Limits {
        max_batch_events: 10,
        max_payload_bytes: 100,
    };

    fn event(id: &str) -> Event {
        Event {
            id: id.into(),
            key: "k".into(),
            ..Default::default()
        }
    }

    fn error_of(mut events: Vec<Event>) -> String {
        match validate_batch(&mut events, LIMITS, Millis(5)) {
            Err(CollectorError::InvalidEvent(message)) => message,
            other => panic!("expected InvalidEvent, got {other:?}"),
        }
    }

    #[test]
    fn a_good_batch_passes_and_gets_event_times() {
        let mut events = vec![event("a"), event("b")];
        events[1].event_time = Some(Millis(42).into());
        validate_batch(&mut events, LIMITS, Millis(5)).unwrap();
        assert_eq!(Millis::from(events[0].event_time.unwrap()), Millis(5));
        assert_eq!(Millis::from(events[1].event_time.unwrap()), Millis(42));
    }

    #[test]
    fn each_rule_names_the_field() {
        assert!(error_of(vec![]).starts_with("events:"));
        assert!(error_of((0..11).map(|i| event(&i.to_string())).collect()).contains("limit is 10"));
        assert_eq!(
            error_of(vec![event("a"), event("")]),
            "events[1].id is required"
        );
        assert!(
            error_of(vec![event("a"), event("a")]).starts_with("events[1].id \"a\" appears twice")
        );
        let mut big = event("a");
        big.payload = vec![0; 101].into();
        assert!(error_of(vec![big]).starts_with("events[0].payload is 101 bytes"));
        let mut long_key = event("a");
        long_key.key = "k".repeat(MAX_KEY_BYTES + 1);
        assert!(error_of(vec![long_key]).starts_with("events[0].key is"));
        let mut attrs = event("a");
        attrs.attributes.insert(String::new(), "v".into());
        assert!(error_of(vec![attrs]).starts_with("events[0].attributes"));
        let mut bad_time = event("a");
        bad_time.event_time = Some(prost_types::Timestamp {
            seconds: 1,
            nanos: -5,
        });
        assert!(error_of(vec![bad_time]).starts_with("events[0].event_time"));
        let mut far_future = event("a");
        far_future.event_time = Some(prost_types::Timestamp {
            seconds: MAX_TIMESTAMP_SECONDS + 1,
            nanos: 0,
        });
        assert!(error_of(vec![far_future]).contains("years 1 to 9999"));
        let mut last_second = event("a");
        last_second.event_time = Some(prost_types::Timestamp {
            seconds: MAX_TIMESTAMP_SECONDS,
            nanos: 999_999_999,
        });
        validate_batch(&mut [last_second], LIMITS, Millis(0)).unwrap();
    }

    #[test]
    fn topic_names_are_checked() {
        validate_topic("orders.v1-eu_2").unwrap();
        for bad in ["", "with space", "ünï", &"t".repeat(250), ".."] {
            let error = validate_topic(bad).unwrap_err();
            assert!(matches!(error, CollectorError::InvalidEvent(_)));
            assert!(error.to_string().starts_with("topic name "), "{error}");
        }
    }

    proptest! {
        #[test]
        fn arbitrary_events_never_panic(
            ids in proptest::collection::vec(".{0,300}", 0..12),
            payload in 0usize..150,
        ) {
            let mut events: Vec<Event> = ids
                .iter()
                .map(|id| Event { id: id.clone(), payload: vec![1; payload].into(), ..Default::default() })
                .collect();
            let _ = validate_batch(&mut events, LIMITS, Millis(0));
        }
    }
}
