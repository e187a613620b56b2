//! The events `runnel send` reads: one JSON object per line, in the contract's JSON event
//! form ([`runnel_proto::json::parse_event`]):
//!
//! ```json
//! {"id": "e-1", "key": "sensor-1", "type": "reading", "source": "cli",
//!  "time": "2024-05-01T12:00:00Z", "attributes": {"site": "a"}, "payload": {"value": 21.5}}
//! ```
//!
//! Only `key` is usually needed: `id` defaults to a unique id for this run and line,
//! `source` to `runnel-cli`, `time` (strict RFC 3339 in UTC, or integer Unix milliseconds)
//! to the collector's clock, and `payload` (any JSON) is sent as its JSON text.

use runnel_proto::json::EventJsonError;
use runnel_proto::v1::Event;

/// Parses one input line; `default_id` is used when the line has no `id`.
pub(crate) fn parse_event(
    line: &str,
    default_id: impl FnOnce() -> String,
) -> Result<Event, EventJsonError> {
    let mut event = runnel_proto::json::parse_event(line.as_bytes())?;
    if event.id.is_empty() {
        event.id = default_id();
    }
    if event.source.is_empty() {
        event.source = "runnel-cli".into();
    }
    Ok(event)
}

#[cfg(test)]
mod tests {
    use super::*;
    use runnel_proto::Millis;

    #[test]
    fn a_full_line_parses() {
        let e = parse_event(
            r#"{"id":"a","key":"k","type":"t","time":"2024-05-01T12:00:00Z","attributes":{"x":"y"},"payload":{"value":2}}"#,
            || unreachable!(),
        )
        .unwrap();
        assert_eq!(e.id, "a");
        assert_eq!(e.r#type, "t");
        assert_eq!(
            Millis::from(e.event_time.unwrap()),
            Millis(1_714_564_800_000)
        );
        assert_eq!(&e.payload[..], br#"{"value":2}"#);
        assert_eq!(e.attributes["x"], "y");
    }

    #[test]
    fn defaults_fill_in_and_millis_are_accepted() {
        let e = parse_event(r#"{"key":"k","time":1000}"#, || "gen-1".into()).unwrap();
        assert_eq!(e.id, "gen-1");
        assert_eq!(e.source, "runnel-cli");
        assert_eq!(Millis::from(e.event_time.unwrap()), Millis(1000));
        assert!(e.payload.is_empty());
    }

    #[test]
    fn bad_lines_say_why() {
        let err = |line: &str| parse_event(line, || "x".into()).unwrap_err().to_string();
        assert!(err("not json").contains("not an event object"));
        assert!(err(r#"{"key":"k","tyme":1}"#).contains("tyme"));
        assert!(err(r#"{"key":"k","time":"yesterday"}"#).contains("RFC 3339"));
        assert!(err(r#"{"key":"k","time":1.5}"#).contains("integer"));
    }

    /// The CLI once read times with a weak parser that guessed at what a time without a
    /// zone meant; the collector refused the same line as a datagram. Both now refuse it.
    #[test]
    fn a_time_without_a_zone_is_refused_as_the_collector_refuses_it() {
        let error = parse_event(r#"{"key":"k","time":"2024-05-01T12:00:00"}"#, || "x".into())
            .unwrap_err()
            .to_string();
        assert!(error.starts_with("time: "), "{error}");
        assert!(error.contains("RFC 3339"), "{error}");
    }
}
