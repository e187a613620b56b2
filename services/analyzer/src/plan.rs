//! The query compiler: turns a [`QueryConfig`] as configured into a [`Plan`], the checked
//! query the runner executes — field paths parsed, filters and `having` compiled, windows
//! and lateness in milliseconds, aggregates resolved (count, sum, avg, min and max of the
//! value when none are given), a fingerprint for checkpoints and the definition in words
//! for `DescribeQuery`. A bad definition is a [`ConfigError`] naming the query's index and
//! the field at fault (`analyzer.queries[2].aggregates[0].k: must be between 1 and 1000`).

use crate::aggregate::{Aggregate, AggregateConfig, Function};
use crate::config::{AnalyzerConfig, QueryConfig, WindowConfig, count_sum_avg_min_max};
use crate::filter::{EventFilter, Predicate, ResultFilter};
use crate::path::FieldRef;
use crate::window::{EmitMode, WindowRules, WindowSpec};
use runnel_proto::names;
use runnel_server::{ConfigError, ServiceConfig};
use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

/// A checked query, ready to run.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    pub(crate) name: String,
    /// What its consumer groups and internal topics are named after: the name, or for a
    /// query created at run time `<name>..<incarnation>` (see [`crate::registry`]).
    pub(crate) instance: String,
    /// Per partition of the topic, the first offset the query reads (a query created to
    /// start from the latest records); partitions not listed are read from the start.
    pub(crate) start_offsets: BTreeMap<u32, u64>,
    pub(crate) topic: String,
    /// `None`: the event key, so that a key's windows live with its partition.
    /// Otherwise results are re-keyed through an internal topic (see [`crate::rekey`]).
    pub(crate) key: Option<FieldRef>,
    pub(crate) time: Option<FieldRef>,
    pub(crate) filter: EventFilter,
    /// Whether an aggregate counts events themselves; if none does, an event with none of
    /// the aggregates' inputs contributes nothing and opens no window.
    pub(crate) counts_events: bool,
    pub(crate) out_of_orderness: i64,
    pub(crate) idle_timeout: Duration,
    pub(crate) rules: WindowRules,
    pub(crate) output_topic: Option<String>,
    pub(crate) late_topic: Option<String>,
    /// What a checkpoint must have been taken with to be usable.
    pub(crate) fingerprint: String,
    pub(crate) definition: String,
}

impl Plan {
    /// The internal topic a re-keyed query's events go through.
    pub(crate) fn keyed_topic(&self) -> String {
        format!("{}.{}.keyed", crate::rekey::TOPIC_PREFIX, self.instance)
    }
}

/// Whole milliseconds of `duration`, saturating.
pub(crate) fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

/// The longest window, lateness or disorder: a week, so that window arithmetic stays far
/// from overflow and a typo (`"1y"`) does not hold results back for a year.
const MAX_SPAN: Duration = Duration::from_secs(7 * 24 * 3600);

impl QueryConfig {
    /// Checks the query — `i` is its index in `queries`, for the error's key — and turns
    /// it into a plan.
    pub(crate) fn compile(&self, i: usize) -> Result<Plan, ConfigError> {
        let section = AnalyzerConfig::SECTION;
        if let Some(sql) = &self.sql {
            let only_sql = QueryConfig {
                name: self.name.clone(),
                sql: Some(sql.clone()),
                ..QueryConfig::default()
            };
            if *self != only_sql {
                return Err(ConfigError::invalid(
                    section,
                    &format!("queries[{i}].sql"),
                    "a query is given either in SQL (name and sql) or as a table, not both",
                ));
            }
            let table = crate::sql::compile(&self.name, sql).map_err(|error| {
                ConfigError::invalid(section, &format!("queries[{i}].sql"), error.to_string())
            })?;
            return table.compile(i);
        }
        let key = |field: &str| format!("queries[{i}].{field}");
        let fail =
            |field: &str, message: String| ConfigError::invalid(section, &key(field), message);
        let fail_at = |(at, message): (String, String)| {
            ConfigError::invalid(section, &format!("queries[{i}].{at}"), message)
        };
        names::validate_query_name(&self.name).map_err(|e| fail("name", e.to_string()))?;
        names::validate_topic_name(&self.topic).map_err(|e| fail("topic", e.to_string()))?;
        for (field, topic) in [
            ("output_topic", &self.output_topic),
            ("late_topic", &self.late_topic),
        ] {
            if let Some(topic) = topic {
                names::validate_topic_name(topic).map_err(|e| fail(field, e.to_string()))?;
                if *topic == self.topic {
                    return Err(fail(field, "must not be the topic the query reads".into()));
                }
            }
        }
        let key_field = FieldRef::parse(&self.key).map_err(|why| fail("key", why))?;
        let time = match self.time.as_str() {
            "event_time" => None,
            other => Some(FieldRef::parse(other).map_err(|why| fail("time", why))?),
        };
        let field = |name: &str| FieldRef::parse(name);
        let mut filter: EventFilter = Vec::new();
        if let Some(kind) = &self.event_type {
            filter.push(
                Predicate {
                    field: Some("type".into()),
                    eq: Some(crate::filter::Literal::Text(kind.clone())),
                    ..Predicate::default()
                }
                .compile("event_type", &field)
                .map_err(fail_at)?,
            );
        }
        for (j, p) in self.filter.iter().enumerate() {
            filter.push(
                p.compile(&format!("filter[{j}]"), &field)
                    .map_err(fail_at)?,
            );
        }
        if let Some(value) = &self.value {
            FieldRef::parse(value).map_err(|why| fail("value", why))?;
        }
        let ms = |d: Duration, name: &str, min: Duration| -> Result<i64, ConfigError> {
            if d < min || d > MAX_SPAN {
                return Err(fail(
                    name,
                    format!(
                        "must be between {} and 7days",
                        humantime::format_duration(min)
                    ),
                ));
            }
            if !d.subsec_nanos().is_multiple_of(1_000_000) {
                return Err(fail(name, "must be a whole number of milliseconds".into()));
            }
            Ok(millis(d))
        };
        let one_ms = Duration::from_millis(1);
        let spec = match self.window {
            WindowConfig::Tumbling { size } => WindowSpec::Tumbling {
                size: ms(size, "window.size", one_ms)?,
            },
            WindowConfig::Sliding { size, slide } => {
                let (size, slide) = (
                    ms(size, "window.size", one_ms)?,
                    ms(slide, "window.slide", one_ms)?,
                );
                if slide > size || size / slide > 100 {
                    return Err(fail(
                        "window.slide",
                        "must be at most the size, and at least a hundredth of it".into(),
                    ));
                }
                WindowSpec::Sliding { size, slide }
            }
            WindowConfig::Session { gap } => WindowSpec::Session {
                gap: ms(gap, "window.gap", one_ms)?,
            },
        };
        let out_of_orderness = ms(self.out_of_orderness, "out_of_orderness", Duration::ZERO)?;
        let lateness = ms(self.allowed_lateness, "allowed_lateness", Duration::ZERO)?;
        if self.idle_timeout < Duration::from_millis(100) {
            return Err(fail("idle_timeout", "must be at least 100ms".into()));
        }
        let configured = match (&self.aggregates[..], &self.value) {
            ([], Some(value)) => count_sum_avg_min_max(Some(value)),
            ([], None) => {
                return Err(fail(
                    "aggregates",
                    "give at least one (or a value, for its count, sum, avg, min and max)".into(),
                ));
            }
            (list, _) => list.to_vec(),
        };
        if configured.len() > 32 {
            return Err(fail("aggregates", "give at most 32 aggregates".into()));
        }
        let mut aggregates: Vec<Aggregate> = Vec::new();
        let mut names = HashSet::new();
        for (j, a) in configured.iter().enumerate() {
            let at = format!("aggregates[{j}]");
            let compiled = a.compile(&at, self.value.as_deref()).map_err(fail_at)?;
            for name in compiled.output_names() {
                if name.is_empty() || name.len() > 128 || !names.insert(name.clone()) {
                    return Err(fail(
                        &format!("{at}.name"),
                        format!(
                            "{name:?} is empty, too long or used by an earlier aggregate: give each a distinct name"
                        ),
                    ));
                }
            }
            aggregates.push(compiled);
        }
        let mut having: ResultFilter = Vec::new();
        for (j, p) in self.having.iter().enumerate() {
            let known = |name: &str| {
                if names.contains(name) {
                    Ok(name.to_owned())
                } else {
                    Err(format!(
                        "{name:?} is not a value of this query (it has {:?})",
                        {
                            let mut n: Vec<_> = names.iter().cloned().collect();
                            n.sort();
                            n
                        }
                    ))
                }
            };
            having.push(
                p.compile(&format!("having[{j}]"), &known)
                    .map_err(fail_at)?,
            );
        }
        if !(1..=100_000_000).contains(&self.max_open_windows) {
            return Err(fail(
                "max_open_windows",
                "must be between 1 and 100000000".into(),
            ));
        }
        let fingerprint = serde_json::to_string(&(
            &self.topic,
            &self.key,
            &self.time,
            &self.event_type,
            &self.filter,
            &self.value,
            &self.window,
            &self.aggregates,
        ))
        .unwrap_or_default();
        let counts_events = aggregates.iter().any(|a| a.input.is_none());
        Ok(Plan {
            counts_events,
            name: self.name.clone(),
            instance: self.name.clone(),
            start_offsets: BTreeMap::new(),
            topic: self.topic.clone(),
            key: (key_field != FieldRef::Key).then_some(key_field),
            time,
            filter,
            out_of_orderness,
            idle_timeout: self.idle_timeout,
            rules: WindowRules {
                spec,
                lateness,
                emit: self.emit,
                aggregates,
                having,
                max_open_windows: self.max_open_windows,
            },
            output_topic: self.output_topic.clone(),
            late_topic: self.late_topic.clone(),
            fingerprint,
            definition: self.definition(&configured),
        })
    }

    /// The query in words, for `DescribeQuery`: an `EXPLAIN` of what runs — what is
    /// computed (and named), per what, of which events, in which windows on which time,
    /// with which disorder and lateness, emitted when, kept if, and where else it goes.
    fn definition(&self, configured: &[AggregateConfig]) -> String {
        let aggregates: Vec<String> = configured
            .iter()
            .map(|a| {
                let f = serde_json::to_value(a.function)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default();
                let call = match &a.of {
                    Some(of) => format!("{f}({of})"),
                    None if matches!(a.function, Function::Count) => f,
                    None => format!("{f}({})", self.value.as_deref().unwrap_or("?")),
                };
                match &a.name {
                    Some(name) => format!("{call} as {name}"),
                    None => call,
                }
            })
            .collect();
        let window = match self.window {
            WindowConfig::Tumbling { size } => {
                format!("tumbling {}", humantime::format_duration(size))
            }
            WindowConfig::Sliding { size, slide } => format!(
                "sliding {} every {}",
                humantime::format_duration(size),
                humantime::format_duration(slide)
            ),
            WindowConfig::Session { gap } => {
                format!("session gap {}", humantime::format_duration(gap))
            }
        };
        let mut conditions: Vec<String> = self
            .event_type
            .iter()
            .map(|t| format!("type = {t:?}"))
            .collect();
        conditions.extend(self.filter.iter().map(Predicate::in_words));
        let filter = if conditions.is_empty() {
            String::new()
        } else {
            format!(" of events where {}", conditions.join(" and "))
        };
        let time = match self.time.as_str() {
            "event_time" => String::new(),
            field => format!(" (time from {field})"),
        };
        let mut text = format!(
            "{} per {} of topic {}{filter} in {window} event-time windows{time}, {} out-of-orderness, {} allowed lateness, emitted {}",
            aggregates.join(", "),
            self.key,
            self.topic,
            humantime::format_duration(self.out_of_orderness),
            humantime::format_duration(self.allowed_lateness),
            match self.emit {
                EmitMode::OnClose => "on close",
                EmitMode::OnUpdate => "on every update",
            }
        );
        if !self.having.is_empty() {
            let having: Vec<String> = self.having.iter().map(Predicate::in_words).collect();
            text.push_str(&format!(", only where {}", having.join(" and ")));
        }
        if let Some(topic) = &self.output_topic {
            text.push_str(&format!("; also published to topic {topic}"));
        }
        if let Some(topic) = &self.late_topic {
            text.push_str(&format!("; late events to topic {topic}"));
        }
        text
    }
}

impl AnalyzerConfig {
    /// Every query, checked.
    pub(crate) fn plans(&self) -> Result<Vec<Plan>, ConfigError> {
        self.queries
            .iter()
            .enumerate()
            .map(|(i, q)| q.compile(i))
            .collect()
    }
}
