//! End-to-end tests: the five real service binaries, each its own process, on ephemeral
//! ports. Run with `cargo xtask test` (which builds the binaries first).
//!
//! Nothing here sleeps to wait: services are ready once their health check answers, and
//! results are awaited on live streams (a gateway `Watch`, the OTLP receiver's exports),
//! each bounded by a timeout that fails the test with every service's log.

mod access;
mod analyzer;
mod cli;
mod collector;
mod crash;
mod healthcheck;
mod hostile;
mod pipeline;
mod repair;
mod scale;
mod tracing;
mod track;

use runnel_e2e::PARTITIONS;
use runnel_proto::Millis;
use runnel_proto::v1::Event;

/// Window starts used by the tests: aligned to 10 s.
pub(crate) const T0: i64 = 1_700_000_000_000;

/// The analyzer part of the config: 10 s tumbling windows, 2 s of allowed disorder, and no
/// idleness, so that only event time decides when a window closes.
pub(crate) const ANALYZER_TOML: &str = r#"
[[analyzer.queries]]
name = "avg_value_per_key"
topic = "events"
value = "payload.value"
window = "10s"
out_of_orderness = "2s"
idle_timeout = "1h"
"#;

/// An event whose JSON payload carries `value` (or no value at all).
pub(crate) fn event(id: &str, key: &str, at_ms: i64, value: Option<f64>) -> Event {
    let payload = match value {
        Some(v) => serde_json::json!({ "value": v }),
        None => serde_json::json!({ "other": 1 }),
    };
    Event {
        id: id.into(),
        source: "e2e".into(),
        r#type: "reading".into(),
        key: key.into(),
        event_time: Some(Millis(at_ms).into()),
        payload: serde_json::to_vec(&payload).expect("json").into(),
        ..Default::default()
    }
}

/// One event without a value on every partition, at `at_ms`: they aggregate nothing but
/// move every partition's event-time clock, so that windows before `at_ms - 2 s` close.
/// (With no idleness, a partition that never hears of the time holds every window open.)
pub(crate) fn clock_events(tag: &str, at_ms: i64) -> Vec<Event> {
    (0..PARTITIONS)
        .map(|partition| {
            let key = (0..)
                .map(|i| format!("clock-{i}"))
                .find(|key| runnel_proto::partition_for_key(key, PARTITIONS) == partition)
                .expect("some key lands on every partition");
            event(&format!("{tag}-{key}"), &key, at_ms, None)
        })
        .collect()
}
