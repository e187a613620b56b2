//! The JSON forms of the contract's messages, and the time formats they accept.
//!
//! **An event** is one JSON object — one line for `runnel send`, one datagram for the
//! collector's UDP listener:
//!
//! ```json
//! {"id": "e-1", "key": "sensor-1", "type": "reading", "source": "cli",
//!  "time": "2024-05-01T12:00:00Z", "attributes": {"site": "a"}, "payload": {"value": 21.5}}
//! ```
//!
//! Only `key` is usually needed. `id` and `source` left out are empty, for the reader to
//! fill in (a unique id, its own name); `time` is integer Unix milliseconds or strict RFC
//! 3339 in UTC (`Z`), and left out the collector's clock; `payload` is any JSON, sent as
//! its JSON text; any other field is refused.
//!
//! **A result** is one object with both time forms, so that humans and programs each get
//! the one they want:
//!
//! ```json
//! {"query": "avg_value_per_key", "key": "sensor-1",
//!  "window_start": "2024-05-01T12:00:00.000Z", "window_start_ms": 1714564800000,
//!  "window_end": "2024-05-01T12:01:00.000Z", "window_end_ms": 1714564860000,
//!  "values": {"count": 3.0, "sum": 61.5, "avg": 20.5},
//!  "emitted_at": "2024-05-01T12:01:05.120Z", "sequence": 42}
//! ```
//!
//! Results of list-valued aggregates (top-k, samples) also have
//! `"items": {"<name>": [{"item": "/home", "value": 9.0}, …]}`.
//! `sequence` is the store's position of the write in its change feed (0 before the result
//! is stored): the cursor live clients resume after. An early version of an open window
//! (a query with `emit = "on_update"`) has `"partial": true`; a final one has no `partial`.

use crate::Millis;
use crate::v1::{Event, QueryResult};
use serde::Deserialize;
use std::collections::HashMap;
use std::time::{Duration, UNIX_EPOCH};

/// Why a JSON event was refused.
#[derive(Debug, thiserror::Error)]
pub enum EventJsonError {
    /// Not JSON, not an object, a field of the wrong type or a field no event has.
    #[error("not an event object: {0}")]
    NotAnEvent(#[from] serde_json::Error),
    /// `time` is neither integer milliseconds nor strict RFC 3339.
    #[error("time: {0}")]
    Time(String),
}

/// An event as its JSON object spells it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EventObject {
    #[serde(default)]
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

/// Parses one JSON event object (see the module docs). An event without `id` or
/// `source` has them empty; the caller fills them in.
pub fn parse_event(json: &[u8]) -> Result<Event, EventJsonError> {
    let object: EventObject = serde_json::from_slice(json)?;
    let event_time = match object.time {
        None => None,
        Some(serde_json::Value::Number(ms)) => Some(
            Millis(ms.as_i64().ok_or_else(|| {
                EventJsonError::Time(format!("{ms}: milliseconds must be an integer"))
            })?)
            .into(),
        ),
        Some(serde_json::Value::String(text)) => {
            let at = humantime::parse_rfc3339(&text).map_err(|e| {
                EventJsonError::Time(format!(
                    "{text:?} is not RFC 3339 in UTC, e.g. 2024-05-01T12:00:00Z ({e})"
                ))
            })?;
            Some(prost_types::Timestamp::from(at))
        }
        Some(other) => {
            return Err(EventJsonError::Time(format!(
                "{other}: use Unix milliseconds or RFC 3339 text"
            )));
        }
    };
    let payload = match object.payload {
        None => Vec::new(),
        Some(value) => serde_json::to_vec(&value)?,
    };
    Ok(Event {
        id: object.id.unwrap_or_default(),
        source: object.source,
        r#type: object.kind,
        key: object.key,
        event_time,
        attributes: object.attributes,
        payload: payload.into(),
        headers: HashMap::new(),
    })
}

/// RFC 3339 in UTC with milliseconds, e.g. `2024-05-01T12:00:00.000Z`; times before 1970
/// (which RFC 3339 tools rarely expect) as `<n>ms`.
pub fn rfc3339(ms: Millis) -> String {
    if ms.0 >= 0 {
        let t = UNIX_EPOCH + Duration::from_millis(ms.0.unsigned_abs());
        humantime::format_rfc3339_millis(t).to_string()
    } else {
        format!("{}ms", ms.0)
    }
}

/// Parses RFC 3339 text (`2024-05-01T12:00:00Z`) or integer Unix milliseconds.
pub fn parse_time(text: &str) -> Result<Millis, String> {
    let text = text.trim();
    if let Ok(ms) = text.parse::<i64>() {
        return Ok(Millis(ms));
    }
    let t = humantime::parse_rfc3339_weak(text)
        .map_err(|_| format!("{text:?} is neither RFC 3339 nor Unix milliseconds"))?;
    let ms = match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_millis()),
        Err(e) => i64::try_from(e.duration().as_millis()).map(|ms| -ms),
    };
    ms.map(Millis)
        .map_err(|_| format!("{text:?} is out of range"))
}

/// A query result as one JSON object.
pub fn result_json(result: &QueryResult) -> serde_json::Value {
    let ms = |ts: Option<prost_types::Timestamp>| ts.map(Millis::from).unwrap_or_default();
    let start = ms(result.window_start);
    let end = ms(result.window_end);
    let values: serde_json::Map<String, serde_json::Value> = result
        .values
        .iter()
        .map(|(name, value)| (name.clone(), serde_json::json!(value)))
        .collect();
    let mut json = serde_json::json!({
        "query": result.query,
        "key": result.key,
        "window_start": rfc3339(start),
        "window_start_ms": start.0,
        "window_end": rfc3339(end),
        "window_end_ms": end.0,
        "values": values,
        "emitted_at": rfc3339(ms(result.emitted_at)),
        "sequence": result.sequence,
    });
    if result.partial {
        json["partial"] = serde_json::Value::Bool(true);
    }
    // Only results of list-valued aggregates (top-k, samples) carry items.
    if !result.items.is_empty() {
        let items: serde_json::Map<String, serde_json::Value> = result
            .items
            .iter()
            .map(|(name, list)| {
                let ranked: Vec<serde_json::Value> = list
                    .items
                    .iter()
                    .map(|i| serde_json::json!({ "item": i.item, "value": i.value }))
                    .collect();
                (name.clone(), serde_json::Value::Array(ranked))
            })
            .collect();
        json["items"] = serde_json::Value::Object(items);
    }
    json
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_print_with_both_time_forms() {
        let result = QueryResult {
            query: "q".into(),
            key: "k".into(),
            window_start: Some(Millis(1_714_564_800_000).into()),
            window_end: Some(Millis(1_714_564_860_000).into()),
            values: [("count".to_owned(), 3.0)].into(),
            sequence: 42,
            ..Default::default()
        };
        let json = result_json(&result);
        assert_eq!(json["sequence"], 42);
        assert_eq!(json["window_start"], "2024-05-01T12:00:00.000Z");
        assert_eq!(json["window_end_ms"], 1_714_564_860_000i64);
        assert_eq!(json["values"]["count"], 3.0);
        assert!(json.get("items").is_none(), "no lists, no items: {json}");
        assert!(json.get("partial").is_none(), "final: {json}");
        let early = result_json(&QueryResult {
            partial: true,
            ..result
        });
        assert_eq!(early["partial"], true);
    }

    #[test]
    fn list_valued_results_carry_their_items_in_rank_order() {
        use crate::v1::{RankedItem, RankedItems};
        let ranked = |pairs: &[(&str, f64)]| RankedItems {
            items: pairs
                .iter()
                .map(|(item, value)| RankedItem {
                    item: (*item).to_owned(),
                    value: *value,
                })
                .collect(),
        };
        let result = QueryResult {
            items: [(
                "top_k".to_owned(),
                ranked(&[("/home", 9.0), ("/cart", 4.0)]),
            )]
            .into(),
            ..Default::default()
        };
        let json = result_json(&result);
        assert_eq!(json["items"]["top_k"][0]["item"], "/home");
        assert_eq!(json["items"]["top_k"][1]["value"], 4.0);
    }

    #[test]
    fn a_full_event_object_parses() {
        let event = parse_event(
            br#"{"id":"a","key":"k","type":"t","source":"s","time":"2024-05-01T12:00:00.250Z",
                 "attributes":{"x":"y"},"payload":{"value":2}}"#,
        )
        .unwrap();
        assert_eq!((event.id.as_str(), event.key.as_str()), ("a", "k"));
        assert_eq!((event.r#type.as_str(), event.source.as_str()), ("t", "s"));
        assert_eq!(
            Millis::from(event.event_time.unwrap()),
            Millis(1_714_564_800_250)
        );
        assert_eq!(event.attributes["x"], "y");
        assert_eq!(&event.payload[..], br#"{"value":2}"#);
    }

    #[test]
    fn what_an_event_object_leaves_out_is_empty_and_millis_are_a_time() {
        let event = parse_event(br#"{"key":"k","time":-1000}"#).unwrap();
        assert_eq!((event.id.as_str(), event.source.as_str()), ("", ""));
        assert_eq!(Millis::from(event.event_time.unwrap()), Millis(-1000));
        assert!(event.payload.is_empty());
        assert!(parse_event(br#"{"key":"k"}"#).unwrap().event_time.is_none());
    }

    #[test]
    fn event_times_are_strict() {
        let error = |json: &str| parse_event(json.as_bytes()).unwrap_err().to_string();
        // What the weak parser let through: no zone, a space for the T, milliseconds as text.
        for loose in [
            r#"{"key":"k","time":"2024-05-01T12:00:00"}"#,
            r#"{"key":"k","time":"2024-05-01 12:00:00Z"}"#,
            r#"{"key":"k","time":"1714564800000"}"#,
        ] {
            let message = error(loose);
            assert!(
                message.starts_with("time: ") && message.contains("RFC 3339"),
                "{message}"
            );
        }
        assert!(error(r#"{"key":"k","time":1.5}"#).contains("integer"));
        assert!(error(r#"{"key":"k","time":true}"#).starts_with("time: "));
    }

    #[test]
    fn what_is_not_an_event_object_says_so() {
        let error = |json: &str| parse_event(json.as_bytes()).unwrap_err().to_string();
        assert!(error("not json").starts_with("not an event object"));
        assert!(error("[1]").starts_with("not an event object"));
        assert!(error(r#"{"key":"k","tyme":1}"#).contains("tyme"));
        assert!(error(r#"{"key":7}"#).starts_with("not an event object"));
    }

    proptest::proptest! {
        #[test]
        fn every_field_of_an_event_object_reaches_the_event(
            id in ".{1,12}", key in ".{0,12}", kind in ".{0,8}", source in ".{0,8}",
            ms in -10_000_000_000_000i64..10_000_000_000_000,
            attributes in proptest::collection::hash_map(".{1,6}", ".{0,6}", 0..4),
            value in proptest::num::f64::NORMAL,
        ) {
            let json = serde_json::json!({
                "id": id, "key": key, "type": kind, "source": source, "time": ms,
                "attributes": attributes, "payload": {"value": value},
            });
            let event = parse_event(json.to_string().as_bytes()).unwrap();
            proptest::prop_assert_eq!(&event.id, &id);
            proptest::prop_assert_eq!(&event.key, &key);
            proptest::prop_assert_eq!(&event.r#type, &kind);
            proptest::prop_assert_eq!(&event.source, &source);
            proptest::prop_assert_eq!(Millis::from(event.event_time.unwrap()), Millis(ms));
            proptest::prop_assert_eq!(&event.attributes, &attributes);
            let payload: serde_json::Value = serde_json::from_slice(&event.payload).unwrap();
            proptest::prop_assert_eq!(payload, serde_json::json!({"value": value}));
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200)) {
            let _ = parse_event(&bytes);
        }
    }

    #[test]
    fn times_parse_in_both_forms() {
        assert_eq!(
            parse_time("2024-05-01T12:00:00Z"),
            Ok(Millis(1_714_564_800_000))
        );
        assert_eq!(
            parse_time("2024-05-01T12:00:00.250Z"),
            Ok(Millis(1_714_564_800_250))
        );
        assert_eq!(parse_time("1714564800000"), Ok(Millis(1_714_564_800_000)));
        assert_eq!(parse_time("-5"), Ok(Millis(-5)));
        assert!(parse_time("yesterday").unwrap_err().contains("RFC 3339"));
        assert_eq!(
            rfc3339(Millis(1_714_564_800_250)),
            "2024-05-01T12:00:00.250Z"
        );
    }
}
