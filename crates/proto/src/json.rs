//! The JSON shape of results, shared by the gateway's HTTP API and the CLI, and the time
//! formats both accept.
//!
//! A result is one object with both time forms, so that humans and programs each get the
//! one they want:
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
//! is stored): the cursor live clients resume after.

use crate::Millis;
use crate::v1::QueryResult;
use std::time::{Duration, UNIX_EPOCH};

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
