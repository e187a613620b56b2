//! The JSON shapes the CLI reads and prints.
//!
//! An input event is one JSON object per line:
//!
//! ```json
//! {"id": "e-1", "key": "sensor-1", "type": "reading", "source": "cli",
//!  "time": "2024-05-01T12:00:00Z", "attributes": {"site": "a"}, "payload": {"value": 21.5}}
//! ```
//!
//! Only `key` is usually needed: `id` defaults to a unique id for this run and line,
//! `time` (RFC 3339 or Unix milliseconds) to the collector's clock, and `payload` (any
//! JSON) is sent as its JSON text.

use anyhow::{Context, Result, bail};
use runnel_proto::Millis;
use runnel_proto::v1::Event;
use serde::Deserialize;
use std::collections::HashMap;

/// An event as written on one input line.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EventLine {
    id: Option<String>,
    #[serde(default)]
    key: String,
    #[serde(default, rename = "type")]
    kind: String,
    #[serde(default)]
    source: String,
    time: Option<serde_json::Value>,
    #[serde(default)]
    attributes: HashMap<String, String>,
    payload: Option<serde_json::Value>,
}

/// Parses one input line; `default_id` is used when the line has no `id`.
pub(crate) fn parse_event(line: &str, default_id: impl FnOnce() -> String) -> Result<Event> {
    let parsed: EventLine = serde_json::from_str(line).context("not an event object")?;
    let event_time = match parsed.time {
        None => None,
        Some(value) => Some(parse_time(&value).context("time")?.into()),
    };
    let payload = match parsed.payload {
        None => Vec::new(),
        Some(value) => serde_json::to_vec(&value)?,
    };
    Ok(Event {
        id: parsed.id.unwrap_or_else(default_id),
        source: if parsed.source.is_empty() {
            "runnel-cli".into()
        } else {
            parsed.source
        },
        r#type: parsed.kind,
        key: parsed.key,
        event_time,
        attributes: parsed.attributes,
        payload: payload.into(),
        headers: HashMap::new(),
    })
}

/// RFC 3339 text or integer Unix milliseconds.
pub(crate) fn parse_time(value: &serde_json::Value) -> Result<Millis> {
    match value {
        serde_json::Value::Number(n) => n
            .as_i64()
            .map(Millis)
            .context("milliseconds must be an integer"),
        serde_json::Value::String(s) => {
            runnel_proto::json::parse_time(s).map_err(anyhow::Error::msg)
        }
        _ => bail!("expected RFC 3339 text or Unix milliseconds"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let err = |line: &str| format!("{:#}", parse_event(line, || "x".into()).unwrap_err());
        assert!(err("not json").contains("not an event object"));
        assert!(err(r#"{"key":"k","tyme":1}"#).contains("tyme"));
        assert!(err(r#"{"key":"k","time":"yesterday"}"#).contains("RFC 3339"));
        assert!(err(r#"{"key":"k","time":1.5}"#).contains("integer"));
    }
}
