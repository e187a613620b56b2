//! The analyzer's settings, under `[analyzer]` / `RUNNEL_ANALYZER__…`, and the continuous
//! queries it runs (`[[analyzer.queries]]`): the query configuration language, documented
//! with a worked example of every window and aggregate in `docs/queries.md`.
//!
//! A query is checked as a whole at start-up ([`QueryConfig::compile`], in [`crate::plan`])
//! into a [`Plan`](crate::plan::Plan); a bad definition stops the analyzer before it binds
//! a port, with the query's index and the field at fault
//! (`analyzer.queries[2].aggregates[0].k: must be between 1 and 1000`).

use crate::aggregate::{AggregateConfig, Function};
use crate::filter::Predicate;
use crate::window::EmitMode;
use runnel_proto::names;
use runnel_server::{ConfigError, ServerConfig, ServiceConfig};
use serde::de::{MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};
use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

/// Where the analyzer reads and writes, how it checkpoints, and its queries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AnalyzerConfig {
    /// Listen addresses and call limits.
    pub server: ServerConfig,
    /// The broker's gRPC URL (events are read from it; re-keyed queries also write to it).
    pub broker: String,
    /// The store's gRPC URL (results are written to it).
    pub store: String,
    /// Deprecated and ignored: checkpoints live in the broker now (the internal topics
    /// `_analyzer.<query>.<stage>.checkpoints`, committed with the group's offsets), and the
    /// analyzer keeps nothing on disk. Accepted so that existing configurations still load;
    /// the analyzer logs a warning when it is set.
    pub data_dir: Option<PathBuf>,
    /// How often each partition's state is checkpointed when it changed. Bounds what is
    /// read again after a crash or a rebalance.
    #[serde(with = "humantime_serde")]
    pub checkpoint_interval: Duration,
    /// How often each partition's state is checkpointed even when nothing changed, so
    /// that the checkpoint its group's commit points at never ages out of the checkpoint
    /// topic (at most half of `checkpoint_retention`).
    #[serde(with = "humantime_serde")]
    pub checkpoint_refresh: Duration,
    /// The time retention of the checkpoint topics, set when the analyzer creates them.
    #[serde(with = "humantime_serde")]
    pub checkpoint_retention: Duration,
    /// The size retention of each checkpoint topic partition (0: none), set when the
    /// analyzer creates them. Without compaction a busy partition writes its whole state
    /// every `checkpoint_interval`; this bounds the disk that takes, while the checkpoint
    /// its group's commit points at is always among the newest. Keep it above twice the
    /// largest state a partition holds. JetStream reserves it, per partition, against its
    /// `max_file_store` when the topic is created.
    pub checkpoint_retention_bytes: u64,
    /// The consumer-group prefix: query `q` reads as group `<group>.q` (and, re-keyed,
    /// `<group>.q.keyed`). Instances with the same prefix share the work.
    pub group: String,
    /// This instance's member id in the groups (default: random per start).
    pub member_id: Option<String>,
    /// How long the broker waits for a silent instance before giving its partitions to
    /// the others. A killed instance's connection drops at once; this covers a hung one.
    #[serde(with = "humantime_serde")]
    pub session_timeout: Duration,
    /// The continuous queries.
    pub queries: Vec<QueryConfig>,
}

/// How a query groups events in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum WindowConfig {
    /// Fixed, non-overlapping windows of `size`, aligned to the Unix epoch.
    Tumbling {
        /// The window length.
        #[serde(with = "humantime_serde")]
        size: Duration,
    },
    /// Windows of `size` starting every `slide` (hopping windows).
    Sliding {
        /// The window length.
        #[serde(with = "humantime_serde")]
        size: Duration,
        /// How far apart window starts are.
        #[serde(with = "humantime_serde")]
        slide: Duration,
    },
    /// Per key, events less than `gap` apart.
    Session {
        /// The inactivity that ends a session.
        #[serde(with = "humantime_serde")]
        gap: Duration,
    },
}

/// The table form of a window, as written in TOML.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WindowTable {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default, with = "humantime_serde")]
    size: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    slide: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    gap: Option<Duration>,
}

impl<'de> Deserialize<'de> for WindowConfig {
    /// `"1m"` (tumbling) or `{ type = "tumbling" | "sliding" | "session", size, slide, gap }`.
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Form;
        impl<'de> Visitor<'de> for Form {
            type Value = WindowConfig;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration such as \"1m\" (tumbling) or a table with type = \"tumbling\", \"sliding\" or \"session\"")
            }

            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<WindowConfig, E> {
                let size = humantime::parse_duration(text).map_err(E::custom)?;
                Ok(WindowConfig::Tumbling { size })
            }

            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<WindowConfig, A::Error> {
                use serde::de::Error;
                let t =
                    WindowTable::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                let need = |d: Option<Duration>, name: &str| {
                    d.ok_or_else(|| A::Error::custom(format!("a {} window needs {name}", t.kind)))
                };
                let unused = |d: Option<Duration>, name: &str| match d {
                    Some(_) => Err(A::Error::custom(format!(
                        "a {} window has no {name}",
                        t.kind
                    ))),
                    None => Ok(()),
                };
                match t.kind.as_str() {
                    "tumbling" => {
                        unused(t.slide, "slide")?;
                        unused(t.gap, "gap")?;
                        Ok(WindowConfig::Tumbling {
                            size: need(t.size, "size")?,
                        })
                    }
                    "sliding" | "hopping" => {
                        unused(t.gap, "gap")?;
                        Ok(WindowConfig::Sliding {
                            size: need(t.size, "size")?,
                            slide: need(t.slide, "slide")?,
                        })
                    }
                    "session" => {
                        unused(t.size, "size")?;
                        unused(t.slide, "slide")?;
                        Ok(WindowConfig::Session {
                            gap: need(t.gap, "gap")?,
                        })
                    }
                    other => Err(A::Error::custom(format!(
                        "unknown window type {other:?}: use tumbling, sliding or session"
                    ))),
                }
            }
        }
        deserializer.deserialize_any(Form)
    }
}

/// One continuous query.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueryConfig {
    /// The query's name: `[a-zA-Z0-9_.-]`, unique. Results carry it.
    pub name: String,
    /// The query in SQL (`SELECT … FROM <topic> GROUP BY <key>, TUMBLE(…)`, see
    /// `docs/queries.md`), instead of the fields below: a query gives `name` and `sql`, or
    /// `name` and the table form.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sql: Option<String>,
    /// The topic the query reads.
    pub topic: String,
    /// What results are grouped by: `key` (the event key, the default) or any field —
    /// with `[]`, one event counts for every value (one-to-many).
    pub key: String,
    /// The event time: `event_time` (the default; the broker's append time if an event
    /// has none), or a field holding Unix milliseconds or RFC 3339 text.
    pub time: String,
    /// Shorthand for a filter on the event type.
    pub event_type: Option<String>,
    /// Conditions every event must meet (see `docs/queries.md`).
    pub filter: Vec<Predicate>,
    /// The number that numeric aggregates without `of` read.
    pub value: Option<String>,
    /// How events are grouped in time.
    pub window: WindowConfig,
    /// How far behind the newest event time of its partition an event may be and still
    /// be on time: the watermark trails the partition's event time by this much.
    #[serde(with = "humantime_serde")]
    pub out_of_orderness: Duration,
    /// How long after the watermark passed a window's end it still takes late events
    /// (and is emitted again for each); later events are counted and sent to `late_topic`.
    #[serde(with = "humantime_serde")]
    pub allowed_lateness: Duration,
    /// A partition with no new event for this long (processing time) no longer holds
    /// windows back from firing.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// What is computed per key and window (none given: count, sum, avg, min and max of
    /// `value`).
    pub aggregates: Vec<AggregateConfig>,
    /// When results are emitted.
    pub emit: EmitMode,
    /// Conditions over a result's values; results that do not meet them are not emitted
    /// (alerts: `having = [{ field = "max", gt = 120 }]`).
    pub having: Vec<Predicate>,
    /// Also publish every result to this topic (JSON, keyed by the result's key).
    pub output_topic: Option<String>,
    /// Publish events that came too late to this topic (as they were).
    pub late_topic: Option<String>,
    /// Open windows one partition may hold; beyond it the oldest are emitted and dropped
    /// early (counted). Bounds memory when keys or disorder explode.
    pub max_open_windows: usize,
}

/// `count`, `sum`, `avg`, `min` and `max` of `of`.
pub(crate) fn count_sum_avg_min_max(of: Option<&str>) -> Vec<AggregateConfig> {
    [
        Function::Count,
        Function::Sum,
        Function::Avg,
        Function::Min,
        Function::Max,
    ]
    .into_iter()
    .map(|function| AggregateConfig {
        function,
        of: of.map(str::to_owned),
        name: None,
        k: None,
        counters: None,
        precision: None,
        quantiles: None,
        relative_accuracy: None,
        size: None,
        capacity: None,
        false_positive_rate: None,
        weights: None,
    })
    .collect()
}

impl Default for QueryConfig {
    fn default() -> Self {
        QueryConfig {
            name: "avg_value_per_key".into(),
            sql: None,
            topic: "events".into(),
            key: "key".into(),
            time: "event_time".into(),
            event_type: None,
            filter: Vec::new(),
            value: Some("payload.value".into()),
            window: WindowConfig::Tumbling {
                size: Duration::from_secs(60),
            },
            out_of_orderness: Duration::from_secs(5),
            allowed_lateness: Duration::ZERO,
            idle_timeout: Duration::from_secs(10),
            aggregates: Vec::new(),
            emit: EmitMode::OnClose,
            having: Vec::new(),
            output_topic: None,
            late_topic: None,
            max_open_windows: 1_000_000,
        }
    }
}

/// A query's aggregates from a compact table, for the default queries below.
fn aggregates(list: &[(Function, Option<&str>, Option<&str>)]) -> Vec<AggregateConfig> {
    list.iter()
        .map(|(function, of, name)| AggregateConfig {
            function: *function,
            of: of.map(str::to_owned),
            name: name.map(str::to_owned),
            ..count_sum_avg_min_max(None)[0].clone()
        })
        .collect()
}

/// The queries the rest of the pipeline relies on (see `docs/queries.md`).
pub fn default_queries() -> Vec<QueryConfig> {
    let minutes = |m: u64| Duration::from_secs(60 * m);
    let weights = BTreeMap::from([
        ("click".to_owned(), 0.05),
        ("cart".to_owned(), 0.5),
        ("purchase".to_owned(), 2.0),
    ]);
    let mut propensity_aggregates = aggregates(&[
        (Function::Score, Some("type"), Some("score")),
        (Function::Count, None, Some("events")),
    ]);
    propensity_aggregates[0].weights = Some(weights);
    vec![
        QueryConfig::default(),
        QueryConfig {
            name: "meetup_topics".into(),
            topic: "meetup".into(),
            key: "payload.group.group_topics[].topic_name".into(),
            value: None,
            window: WindowConfig::Tumbling { size: minutes(1) },
            aggregates: aggregates(&[
                (Function::Count, None, None),
                (
                    Function::Distinct,
                    Some("payload.group.group_id"),
                    Some("groups"),
                ),
            ]),
            ..QueryConfig::default()
        },
        QueryConfig {
            name: "purchase_propensity".into(),
            topic: "events".into(),
            filter: vec![Predicate {
                field: Some("type".into()),
                one_of: Some(
                    ["click", "cart", "purchase"]
                        .map(|t| crate::filter::Literal::Text(t.into()))
                        .to_vec(),
                ),
                ..Predicate::default()
            }],
            value: None,
            window: WindowConfig::Session { gap: minutes(30) },
            aggregates: propensity_aggregates,
            emit: EmitMode::OnUpdate,
            ..QueryConfig::default()
        },
        QueryConfig {
            name: "heart_rate_alert".into(),
            topic: "vitals".into(),
            value: Some("payload.bpm".into()),
            window: WindowConfig::Sliding {
                size: minutes(5),
                slide: minutes(1),
            },
            aggregates: aggregates(&[(Function::Max, None, None), (Function::Count, None, None)]),
            having: vec![Predicate {
                field: Some("max".into()),
                gt: Some(120.0),
                ..Predicate::default()
            }],
            emit: EmitMode::OnUpdate,
            ..QueryConfig::default()
        },
        QueryConfig {
            name: "heart_rate_anomaly".into(),
            topic: "vitals".into(),
            value: Some("payload.bpm".into()),
            window: WindowConfig::Sliding {
                size: minutes(10),
                slide: minutes(1),
            },
            aggregates: aggregates(&[
                (Function::Zscore, None, None),
                (Function::Avg, None, None),
                (Function::Stddev, None, None),
                (Function::Count, None, None),
            ]),
            having: vec![Predicate {
                any: Some(vec![
                    Predicate {
                        field: Some("zscore".into()),
                        gt: Some(3.0),
                        ..Predicate::default()
                    },
                    Predicate {
                        field: Some("zscore".into()),
                        lt: Some(-3.0),
                        ..Predicate::default()
                    },
                ]),
                ..Predicate::default()
            }],
            emit: EmitMode::OnUpdate,
            ..QueryConfig::default()
        },
    ]
}

impl Default for AnalyzerConfig {
    fn default() -> Self {
        AnalyzerConfig {
            server: ServerConfig::loopback(7103, 9103),
            broker: "http://127.0.0.1:7102".into(),
            store: "http://127.0.0.1:7104".into(),
            data_dir: None,
            checkpoint_interval: Duration::from_secs(1),
            checkpoint_refresh: Duration::from_secs(3600),
            checkpoint_retention: Duration::from_secs(7 * 24 * 3600),
            checkpoint_retention_bytes: 256 << 20,
            group: "runnel-analyzer".into(),
            member_id: None,
            session_timeout: Duration::from_secs(10),
            queries: default_queries(),
        }
    }
}

impl ServiceConfig for AnalyzerConfig {
    const SECTION: &'static str = "analyzer";

    fn server(&self) -> &ServerConfig {
        &self.server
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let section = Self::SECTION;
        self.server.validate(section)?;
        for (key, url) in [("broker", &self.broker), ("store", &self.store)] {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(ConfigError::invalid(
                    section,
                    key,
                    format!("{url:?} is not an http:// or https:// URL"),
                ));
            }
        }
        if self.checkpoint_interval < Duration::from_millis(10) {
            return Err(ConfigError::invalid(
                section,
                "checkpoint_interval",
                "must be at least 10ms",
            ));
        }
        if self.checkpoint_refresh < self.checkpoint_interval {
            return Err(ConfigError::invalid(
                section,
                "checkpoint_refresh",
                "must be at least checkpoint_interval",
            ));
        }
        if self.checkpoint_retention < self.checkpoint_refresh * 2 {
            return Err(ConfigError::invalid(
                section,
                "checkpoint_retention",
                "must be at least twice checkpoint_refresh, or a committed checkpoint could age out before it is refreshed",
            ));
        }
        if self.session_timeout < Duration::from_millis(300)
            || self.session_timeout > Duration::from_secs(3600)
        {
            return Err(ConfigError::invalid(
                section,
                "session_timeout",
                "must be between 300ms and 1h",
            ));
        }
        if let Err(error) = names::validate_group_name(&self.group) {
            return Err(ConfigError::invalid(section, "group", error.to_string()));
        }
        if let Some(Err(error)) = self.member_id.as_deref().map(names::validate_member_id) {
            return Err(ConfigError::invalid(
                section,
                "member_id",
                error.to_string(),
            ));
        }
        if self.queries.len() > 256 {
            return Err(ConfigError::invalid(
                section,
                "queries",
                "at most 256 queries",
            ));
        }
        let mut names = HashSet::new();
        for (i, query) in self.queries.iter().enumerate() {
            query.compile(i)?;
            if !names.insert(query.name.as_str()) {
                return Err(ConfigError::invalid(
                    section,
                    &format!("queries[{i}].name"),
                    format!("{:?} is used by an earlier query", query.name),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::path::FieldRef;

    #[test]
    fn checkpoints_refresh_well_within_their_retention() {
        let config = |refresh: u64, retention: u64| AnalyzerConfig {
            checkpoint_refresh: Duration::from_secs(refresh),
            checkpoint_retention: Duration::from_secs(retention),
            ..AnalyzerConfig::default()
        };
        assert!(config(3600, 7200).validate().is_ok());
        let error = config(3600, 7199).validate().unwrap_err().to_string();
        assert!(error.contains("checkpoint_retention"), "{error}");
        let error = config(0, 7200).validate().unwrap_err().to_string();
        assert!(error.contains("checkpoint_refresh"), "{error}");
    }

    #[test]
    fn the_deprecated_data_dir_still_loads() {
        let config: AnalyzerConfig = toml::from_str("data_dir = \"/var/lib/runnel\"\n").unwrap();
        assert!(config.validate().is_ok());
    }

    #[test]
    fn defaults_are_valid_and_ship_the_pipeline_s_queries() {
        let config = AnalyzerConfig::default();
        config.validate().unwrap();
        let names: Vec<&str> = config.queries.iter().map(|q| q.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "avg_value_per_key",
                "meetup_topics",
                "purchase_propensity",
                "heart_rate_alert",
                "heart_rate_anomaly"
            ]
        );
        assert!(config.server.grpc.ip().is_loopback());
        let plans = config.plans().unwrap();
        assert!(plans[0].key.is_none(), "keyed by the event key");
        assert!(
            plans[1].key.as_ref().is_some_and(FieldRef::is_multi),
            "one-to-many"
        );
        assert_eq!(plans[2].rules.emit, EmitMode::OnUpdate);
    }

    #[test]
    fn bad_values_name_their_key() {
        type Case = (fn(&mut AnalyzerConfig), &'static str);
        let cases: [Case; 15] = [
            (|c| c.broker = "localhost:7102".into(), "analyzer.broker"),
            (|c| c.store = String::new(), "analyzer.store"),
            (
                |c| c.queries[0].name = "has space".into(),
                "analyzer.queries[0].name",
            ),
            (
                |c| c.queries[0].name = "../escape".into(),
                "analyzer.queries[0].name",
            ),
            (
                |c| c.queries[0].topic = "a/b".into(),
                "analyzer.queries[0].topic",
            ),
            (
                |c| c.queries[0].value = Some("body.value".into()),
                "analyzer.queries[0].value",
            ),
            (
                |c| {
                    c.queries[0].window = WindowConfig::Tumbling {
                        size: Duration::ZERO,
                    }
                },
                "analyzer.queries[0].window.size",
            ),
            (
                |c| {
                    c.queries[0].window = WindowConfig::Tumbling {
                        size: Duration::from_micros(1500),
                    }
                },
                "analyzer.queries[0].window.size",
            ),
            (
                |c| {
                    c.queries[0].window = WindowConfig::Sliding {
                        size: Duration::from_secs(10),
                        slide: Duration::from_secs(20),
                    }
                },
                "analyzer.queries[0].window.slide",
            ),
            (
                |c| c.queries.push(QueryConfig::default()),
                "analyzer.queries[5].name",
            ),
            (
                |c| c.queries[1].key = "payload.a[0]".into(),
                "analyzer.queries[1].key",
            ),
            (
                |c| c.queries[1].aggregates.clear(),
                "analyzer.queries[1].aggregates",
            ),
            (
                |c| c.queries[0].aggregates = vec![count_sum_avg_min_max(None)[0].clone(); 33],
                "analyzer.queries[0].aggregates",
            ),
            (
                |c| c.queries[3].having[0].field = Some("min".into()),
                "analyzer.queries[3].having[0].field",
            ),
            (
                |c| c.queries[0].output_topic = Some("events".into()),
                "analyzer.queries[0].output_topic",
            ),
        ];
        for (mutate, key) in cases {
            let mut config = AnalyzerConfig::default();
            mutate(&mut config);
            let message = config.validate().unwrap_err().to_string();
            assert!(message.contains(key), "{message} should name {key}");
        }
    }

    fn load(toml_text: &str) -> Result<AnalyzerConfig, ConfigError> {
        let file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
        std::fs::write(file.path(), toml_text).unwrap();
        runnel_server::config::load_from(Some(file.path()), Vec::new())
    }

    #[test]
    fn queries_in_a_file_replace_the_default_ones() {
        let config = load(
            "[[analyzer.queries]]\nname = \"hr\"\ntopic = \"vitals\"\nvalue = \"attributes.bpm\"\nwindow = \"10s\"\n",
        )
        .unwrap();
        assert_eq!(config.queries.len(), 1, "{:?}", config.queries);
        let query = &config.queries[0];
        assert_eq!(query.name, "hr");
        assert_eq!(
            query.window,
            WindowConfig::Tumbling {
                size: Duration::from_secs(10)
            }
        );
        // Unset fields take the query defaults.
        assert_eq!(query.out_of_orderness, Duration::from_secs(5));
        assert!(query.aggregates.is_empty());
        let plan = query.compile(0).unwrap();
        assert_eq!(
            plan.rules.aggregates.len(),
            5,
            "count, sum, avg, min, max of the value"
        );
        assert!(!plan.counts_events, "the count is of values");
    }

    #[test]
    fn every_window_form_parses_and_wrong_ones_say_why() {
        let config = load(
            r#"
[[analyzer.queries]]
name = "a"
window = { type = "sliding", size = "5m", slide = "1m" }
aggregates = [{ fn = "max" }]
[[analyzer.queries]]
name = "b"
window = { type = "session", gap = "30m" }
aggregates = [{ fn = "count" }, { fn = "top_k", of = "payload.url", k = 3 }]
emit = "on_update"
filter = [{ field = "type", in = ["click", "cart"] }]
"#,
        )
        .unwrap();
        config.validate().unwrap();
        assert_eq!(
            config.queries[1].window,
            WindowConfig::Session {
                gap: Duration::from_secs(1800)
            }
        );
        for (text, needle) in [
            (
                "window = { type = \"session\", size = \"1m\" }",
                "has no size",
            ),
            (
                "window = { type = \"sliding\", size = \"1m\" }",
                "needs slide",
            ),
            (
                "window = { type = \"weekly\", size = \"1m\" }",
                "unknown window type",
            ),
            (
                "window = { type = \"tumbling\", size = \"1m\", every = \"1m\" }",
                "every",
            ),
            ("aggregates = [{ fn = \"count\", bogus = 1 }]", "bogus"),
            ("emit = \"sometimes\"", "sometimes"),
            ("frobnicate = true", "frobnicate"),
        ] {
            let error = load(&format!("[[analyzer.queries]]\nname = \"q\"\n{text}\n"))
                .unwrap_err()
                .to_string();
            assert!(error.contains(needle), "{text}: {error}");
        }
    }
}
