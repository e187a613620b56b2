//! The broker's settings, under `[broker]` / `RUNNEL_BROKER__…`.

use runnel_log::FsyncPolicy;
use runnel_server::{ConfigError, ServerConfig, ServiceConfig};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// The most partitions a topic may have. Each one is a directory, an open file and a
/// subscriber channel, so the bound keeps one mistyped number from exhausting descriptors.
pub const MAX_PARTITIONS: u32 = 1024;

/// Where the broker keeps its topics, how hard it tries to keep them, and what it accepts.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BrokerConfig {
    /// Listen addresses and call limits. `max_message_bytes` also bounds the size of one
    /// stored record (so that every record can be fetched) and of one `Fetch` answer.
    pub server: ServerConfig,
    /// The directory holding every topic (`<data_dir>/topics/<topic>/…`).
    pub data_dir: PathBuf,
    /// When appended records reach the disk: `"always"` (before `Produce` answers),
    /// an interval such as `"100ms"` (a background task syncs each partition that often;
    /// a crash may lose up to one interval of acknowledged records) or `"never"` (left to
    /// the OS; for tests and benchmarks).
    pub fsync: FsyncPolicy,
    /// Whether `Produce` to an unknown topic creates it (with `default_partitions`)
    /// instead of failing with `NotFound`.
    pub auto_create_topics: bool,
    /// Partitions of an auto-created topic.
    pub default_partitions: u32,
    /// Events accepted in one `Produce` call.
    pub max_batch_events: usize,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            server: ServerConfig::loopback(7102, 9102),
            data_dir: PathBuf::from("runnel-data/broker"),
            fsync: FsyncPolicy::Always,
            auto_create_topics: true,
            default_partitions: 4,
            max_batch_events: 10_000,
        }
    }
}

impl ServiceConfig for BrokerConfig {
    const SECTION: &'static str = "broker";

    fn server(&self) -> &ServerConfig {
        &self.server
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let section = Self::SECTION;
        self.server.validate(section)?;
        if self.data_dir.as_os_str().is_empty() {
            return Err(ConfigError::invalid(
                section,
                "data_dir",
                "must not be empty",
            ));
        }
        if let FsyncPolicy::Interval(every) = self.fsync
            && every.is_zero()
        {
            return Err(ConfigError::invalid(
                section,
                "fsync",
                "an interval must be more than 0ms; use \"always\" to sync every append",
            ));
        }
        if !(1..=MAX_PARTITIONS).contains(&self.default_partitions) {
            return Err(ConfigError::invalid(
                section,
                "default_partitions",
                format!("must be between 1 and {MAX_PARTITIONS}"),
            ));
        }
        if !(1..=100_000).contains(&self.max_batch_events) {
            return Err(ConfigError::invalid(
                section,
                "max_batch_events",
                "must be between 1 and 100000",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn defaults_are_valid_durable_and_loopback() {
        let config = BrokerConfig::default();
        config.validate().unwrap();
        assert!(config.server.grpc.ip().is_loopback());
        assert_eq!(config.server.grpc.port(), 7102);
        assert_eq!(config.server.admin.port(), 9102);
        assert!(matches!(config.fsync, FsyncPolicy::Always));
    }

    #[test]
    fn bad_values_name_their_key() {
        type Case = (fn(&mut BrokerConfig), &'static str);
        let cases: [Case; 6] = [
            (|c| c.data_dir = PathBuf::new(), "broker.data_dir"),
            (
                |c| c.fsync = FsyncPolicy::Interval(Duration::ZERO),
                "broker.fsync",
            ),
            (|c| c.default_partitions = 0, "broker.default_partitions"),
            (|c| c.default_partitions = 1025, "broker.default_partitions"),
            (|c| c.max_batch_events = 0, "broker.max_batch_events"),
            (
                |c| c.server.max_message_bytes = 0,
                "broker.server.max_message_bytes",
            ),
        ];
        for (mutate, key) in cases {
            let mut config = BrokerConfig::default();
            mutate(&mut config);
            let message = config.validate().unwrap_err().to_string();
            assert!(message.contains(key), "{message} should name {key}");
        }
    }

    #[test]
    fn loads_through_the_shared_layers() {
        let file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
        std::fs::write(file.path(), "[broker]\ndata_dir = \"/var/lib/runnel\"\n").unwrap();
        let env = [
            ("RUNNEL_BROKER__FSYNC", "100ms"),
            ("RUNNEL_BROKER__AUTO_CREATE_TOPICS", "false"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()));
        let config: BrokerConfig =
            runnel_server::config::load_from(Some(file.path()), env).unwrap();
        assert_eq!(config.data_dir, PathBuf::from("/var/lib/runnel"));
        assert!(
            matches!(config.fsync, FsyncPolicy::Interval(d) if d == Duration::from_millis(100))
        );
        assert!(!config.auto_create_topics);
        assert_eq!(config.default_partitions, 4);
    }
}
