//! The analyzer's settings, under `[analyzer]` / `RUNNEL_ANALYZER__…`, and the continuous
//! queries it runs (`[[analyzer.queries]]`).

use crate::extract::ValuePath;
use runnel_server::{ConfigError, ServerConfig, ServiceConfig};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Duration;

/// Where the analyzer reads and writes, where it keeps checkpoints, and its queries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AnalyzerConfig {
    /// Listen addresses and call limits.
    pub server: ServerConfig,
    /// The broker's gRPC URL (events are read from it).
    pub broker: String,
    /// The store's gRPC URL (results are written to it).
    pub store: String,
    /// Where each query keeps its checkpoint (`<data_dir>/<query>.checkpoint`).
    pub data_dir: PathBuf,
    /// How often a query checkpoints its progress when no window has closed (a closed
    /// window is always checkpointed as soon as the store has its result). Bounds how much
    /// is read again after a crash.
    #[serde(with = "humantime_serde")]
    pub checkpoint_interval: Duration,
    /// The continuous queries.
    pub queries: Vec<QueryConfig>,
}

/// One continuous query: per key, the count, sum, average, minimum and maximum of a
/// numeric field in tumbling event-time windows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueryConfig {
    /// The query's name: `[a-zA-Z0-9_.-]`, unique. Results carry it.
    pub name: String,
    /// The topic the query reads.
    pub topic: String,
    /// Only events of this type, when set.
    pub event_type: Option<String>,
    /// The number to aggregate: `payload.<json path>` (dot-separated) or
    /// `attributes.<name>`. Events without it are skipped (and counted).
    pub value: String,
    /// The window length; windows are aligned to the Unix epoch.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// How far behind the newest event time seen an event may be and still count: the
    /// watermark trails the event time by this much.
    #[serde(with = "humantime_serde")]
    pub out_of_orderness: Duration,
    /// A partition with no new event for this long (processing time) stops holding the
    /// watermark back.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
}

impl Default for QueryConfig {
    fn default() -> Self {
        QueryConfig {
            name: "avg_value_per_key".into(),
            topic: "events".into(),
            event_type: None,
            value: "payload.value".into(),
            window: Duration::from_secs(60),
            out_of_orderness: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(10),
        }
    }
}

impl Default for AnalyzerConfig {
    fn default() -> Self {
        AnalyzerConfig {
            server: ServerConfig::loopback(7103, 9103),
            broker: "http://127.0.0.1:7102".into(),
            store: "http://127.0.0.1:7104".into(),
            data_dir: PathBuf::from("runnel-data/analyzer"),
            checkpoint_interval: Duration::from_secs(1),
            queries: vec![QueryConfig::default()],
        }
    }
}

/// The longest window: a week, so that window arithmetic stays far from overflow and a
/// typo (`"1y"`) does not hold results back for a year.
const MAX_WINDOW: Duration = Duration::from_secs(7 * 24 * 3600);

impl QueryConfig {
    /// Checks the query; `i` is its index in `queries`, for the error's key.
    fn validate(&self, i: usize) -> Result<(), ConfigError> {
        let section = AnalyzerConfig::SECTION;
        let key = |field: &str| format!("queries[{i}].{field}");
        let allowed = |b: u8| b.is_ascii_alphanumeric() || b"_.-".contains(&b);
        if self.name.is_empty()
            || self.name.len() > 128
            || !self.name.bytes().all(allowed)
            || self.name.starts_with('.')
        {
            return Err(ConfigError::invalid(
                section,
                &key("name"),
                format!(
                    "{:?}: use 1-128 characters from [a-zA-Z0-9_.-], not starting with '.'",
                    self.name
                ),
            ));
        }
        let topic_ok = !self.topic.is_empty()
            && self.topic.len() <= 249
            && self
                .topic
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if !topic_ok {
            return Err(ConfigError::invalid(
                section,
                &key("topic"),
                format!("{:?}: use 1-249 characters from [a-zA-Z0-9._-]", self.topic),
            ));
        }
        ValuePath::parse(&self.value)
            .map_err(|message| ConfigError::invalid(section, &key("value"), message))?;
        if self.window < Duration::from_millis(1) || self.window > MAX_WINDOW {
            return Err(ConfigError::invalid(
                section,
                &key("window"),
                "must be between 1ms and 7days",
            ));
        }
        if !self.window.subsec_nanos().is_multiple_of(1_000_000) {
            return Err(ConfigError::invalid(
                section,
                &key("window"),
                "must be a whole number of milliseconds",
            ));
        }
        if self.out_of_orderness > MAX_WINDOW {
            return Err(ConfigError::invalid(
                section,
                &key("out_of_orderness"),
                "must be at most 7days",
            ));
        }
        if self.idle_timeout < Duration::from_millis(100) {
            return Err(ConfigError::invalid(
                section,
                &key("idle_timeout"),
                "must be at least 100ms",
            ));
        }
        Ok(())
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
        if self.data_dir.as_os_str().is_empty() {
            return Err(ConfigError::invalid(
                section,
                "data_dir",
                "must not be empty",
            ));
        }
        if self.checkpoint_interval < Duration::from_millis(10) {
            return Err(ConfigError::invalid(
                section,
                "checkpoint_interval",
                "must be at least 10ms",
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
            query.validate(i)?;
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

    #[test]
    fn defaults_are_valid_and_run_the_average_query() {
        let config = AnalyzerConfig::default();
        config.validate().unwrap();
        assert_eq!(config.queries.len(), 1);
        assert_eq!(config.queries[0].name, "avg_value_per_key");
        assert!(config.server.grpc.ip().is_loopback());
    }

    #[test]
    fn bad_values_name_their_key() {
        type Case = (fn(&mut AnalyzerConfig), &'static str);
        let cases: [Case; 9] = [
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
                |c| c.queries[0].value = "body.value".into(),
                "analyzer.queries[0].value",
            ),
            (
                |c| c.queries[0].window = Duration::ZERO,
                "analyzer.queries[0].window",
            ),
            (
                |c| c.queries[0].window = Duration::from_micros(1500),
                "analyzer.queries[0].window",
            ),
            (
                |c| c.queries.push(QueryConfig::default()),
                "analyzer.queries[1].name",
            ),
        ];
        for (mutate, key) in cases {
            let mut config = AnalyzerConfig::default();
            mutate(&mut config);
            let message = config.validate().unwrap_err().to_string();
            assert!(message.contains(key), "{message} should name {key}");
        }
    }

    #[test]
    fn queries_in_a_file_replace_the_default_ones() {
        let file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
        std::fs::write(
            file.path(),
            "[[analyzer.queries]]\nname = \"hr\"\ntopic = \"vitals\"\nvalue = \"attributes.bpm\"\nwindow = \"10s\"\n",
        )
        .unwrap();
        let config: AnalyzerConfig =
            runnel_server::config::load_from(Some(file.path()), Vec::new()).unwrap();
        assert_eq!(config.queries.len(), 1, "{:?}", config.queries);
        let query = &config.queries[0];
        assert_eq!(query.name, "hr");
        assert_eq!(query.window, Duration::from_secs(10));
        // Unset fields take the query defaults.
        assert_eq!(query.out_of_orderness, Duration::from_secs(5));
    }
}
