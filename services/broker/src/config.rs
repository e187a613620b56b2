//! The broker's settings, under `[broker]` / `RUNNEL_BROKER__…`.

use crate::storage::Retention;
use crate::storage::embedded::partition::LogSettings;
use crate::storage::embedded::recent::Window;
use runnel_log::FsyncPolicy;
use runnel_server::{ConfigError, ServerConfig, ServiceConfig};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::Duration;

/// The most partitions a topic may have. Each one is a directory, an open file and a
/// subscriber channel, so the bound keeps one mistyped number from exhausting descriptors.
pub const MAX_PARTITIONS: u32 = 1024;

/// Where the broker keeps its topics, how hard it tries to keep them, and what it accepts.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BrokerConfig {
    /// Listen addresses and call limits. `max_message_bytes` also bounds the size of one
    /// stored batch (so that every batch can be fetched) and of one `Fetch` answer.
    pub server: ServerConfig,
    /// The directory holding every topic (`<data_dir>/topics/<topic>/…`) and the consumer
    /// groups' offsets (`<data_dir>/offsets.log`).
    pub data_dir: PathBuf,
    /// When appended records reach the disk, for producers that leave the acks to the
    /// broker: `"always"` (DURABLE acks: `Produce` answers after a group-commit fsync), an
    /// interval such as `"100ms"` (LEADER acks; a background fsync that often, so a machine
    /// crash loses at most that much) or `"never"` (LEADER acks; left to the OS). A request
    /// may ask for either ack itself.
    pub fsync: FsyncPolicy,
    /// With LEADER acks, a partition that has taken this many bytes since its last fsync
    /// is fsync'd in the background (the ack does not wait). This keeps the dirty page
    /// cache — what a power cut would lose, and what the kernel would otherwise flush in
    /// one go, stalling every writer — bounded. `0` leaves writeback to the kernel.
    pub writeback_bytes: u64,
    /// Whether start-up reads every sealed segment back in the background and checks every
    /// frame's checksum, stopping a partition with damage (sealed segments open from their
    /// indexes without being read). Turn off to spare the read of a large data directory.
    pub verify_sealed: bool,
    /// Whether `Produce` to an unknown topic creates it (with `default_partitions`)
    /// instead of failing with `NotFound`.
    pub auto_create_topics: bool,
    /// Partitions of an auto-created topic.
    pub default_partitions: u32,
    /// Events accepted in one `Produce` call.
    pub max_batch_events: usize,
    /// A segment is sealed and the next one started once it holds this many bytes …
    pub segment_bytes: u64,
    /// … or once its first batch is this old (so that retention can delete it).
    #[serde(with = "humantime_serde")]
    pub segment_age: Duration,
    /// Bytes of log between two entries of a segment's sparse index.
    pub index_interval_bytes: u64,
    /// Default retention by age, for topics that do not set their own; `0s` keeps records
    /// forever.
    #[serde(with = "humantime_serde")]
    pub retention_max_age: Duration,
    /// Default retention by size, per partition; `0` means no limit.
    pub retention_max_bytes: u64,
    /// How often retention runs.
    #[serde(with = "humantime_serde")]
    pub retention_check_interval: Duration,
    /// An idempotent producer silent this long is forgotten.
    #[serde(with = "humantime_serde")]
    pub producer_expiry: Duration,
    /// A group member's session timeout when it does not ask for one.
    #[serde(with = "humantime_serde")]
    pub group_session_timeout: Duration,
    /// How long a partition of the embedded engine remembers the identities
    /// (`(source, id)`) of events stored by producers that ask for deduplication (the
    /// collector always does): a retry within this window is recognised and not stored
    /// again. JetStream's equivalent is `jetstream.duplicate_window`.
    #[serde(with = "humantime_serde")]
    pub dedup_window: Duration,
    /// The last this many events of each partition are always among those remembered
    /// (up to twice as many are, at most 50 bytes of memory each): at high rates this, not
    /// `dedup_window`, bounds how late a retry can come. `0` turns recognition off.
    pub dedup_max_events: usize,
    /// Where topics live: `"embedded"` (this broker's own log under `data_dir`) or
    /// `"jetstream"` (a NATS JetStream cluster, see `jetstream`).
    pub storage: StorageEngine,
    /// The JetStream cluster, when `storage = "jetstream"`.
    pub jetstream: JetStreamConfig,
}

/// Which storage engine holds the topics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StorageEngine {
    /// The broker's own segmented log on local disk.
    #[default]
    Embedded,
    /// NATS JetStream: replicated streams, any number of brokers in front.
    Jetstream,
}

/// Where JetStream keeps a topic's messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JetStreamStorage {
    /// On disk.
    #[default]
    File,
    /// In memory (lost when a server restarts).
    Memory,
}

/// How to reach and use a JetStream cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JetStreamConfig {
    /// NATS server URLs; any reachable one will do, the client learns the rest.
    pub servers: Vec<String>,
    /// Replicas of each partition's stream (1, 3 or 5 in practice).
    pub replicas: usize,
    /// File or memory storage.
    pub storage: JetStreamStorage,
    /// How long JetStream remembers message ids to drop retries: an idempotent
    /// producer's batches, and events of producers that ask for deduplication (by
    /// `(source, id)`). Set when a topic is created. JetStream keeps every id of the window
    /// in memory, unbounded by count.
    #[serde(with = "humantime_serde")]
    pub duplicate_window: Duration,
    /// How long to wait to connect.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// How long one JetStream request may take.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// TLS to the NATS servers (and a client certificate, for servers that verify them).
    pub tls: NatsTlsConfig,
}

/// TLS on the broker's connections to NATS.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsTlsConfig {
    /// Require TLS. Also on when a server URL is `tls://…` or any file below is set.
    pub enabled: bool,
    /// PEM file of the CA certificates the servers' certificates must chain to (without
    /// it, the system's roots).
    pub ca: Option<PathBuf>,
    /// PEM client certificate, with `key`, for servers that verify clients (mTLS).
    pub cert: Option<PathBuf>,
    /// PEM private key of `cert`.
    pub key: Option<PathBuf>,
}

impl NatsTlsConfig {
    /// Whether the connections to `servers` use TLS.
    pub(crate) fn required(&self, servers: &[String]) -> bool {
        self.enabled
            || self.ca.is_some()
            || self.cert.is_some()
            || servers.iter().any(|s| s.starts_with("tls://"))
    }
}

impl Default for JetStreamConfig {
    fn default() -> Self {
        JetStreamConfig {
            servers: vec!["nats://127.0.0.1:4222".into()],
            replicas: 1,
            storage: JetStreamStorage::File,
            duplicate_window: DEDUP_WINDOW,
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(10),
            tls: NatsTlsConfig::default(),
        }
    }
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            server: ServerConfig::loopback(7102, 9102),
            data_dir: PathBuf::from("runnel-data/broker"),
            fsync: FsyncPolicy::Always,
            writeback_bytes: 8 * 1024 * 1024,
            verify_sealed: true,
            auto_create_topics: true,
            default_partitions: 4,
            max_batch_events: 10_000,
            segment_bytes: 128 * 1024 * 1024,
            segment_age: Duration::from_secs(3600),
            index_interval_bytes: 4096,
            retention_max_age: Duration::from_secs(7 * 24 * 3600),
            retention_max_bytes: 0,
            retention_check_interval: Duration::from_secs(30),
            producer_expiry: Duration::from_secs(7 * 24 * 3600),
            group_session_timeout: Duration::from_secs(10),
            dedup_window: DEDUP_WINDOW,
            dedup_max_events: 500_000,
            storage: StorageEngine::Embedded,
            jetstream: JetStreamConfig::default(),
        }
    }
}

/// How long retries are recognised by default: longer than a client's sensible retry
/// horizon.
const DEDUP_WINDOW: Duration = Duration::from_secs(15 * 60);

/// The longest session a group member may ask for.
pub const MAX_SESSION_TIMEOUT: Duration = Duration::from_secs(300);

impl BrokerConfig {
    /// How partitions lay out and keep their logs.
    pub(crate) fn log_settings(&self) -> LogSettings {
        LogSettings {
            policy: self.fsync,
            segment_bytes: self.segment_bytes,
            segment_age: self.segment_age,
            index_interval: self.index_interval_bytes,
            producer_expiry: self.producer_expiry,
            dedup: Window {
                age: self.dedup_window,
                max_events: self.dedup_max_events,
            },
        }
    }

    /// Retention for topics that do not set their own.
    pub(crate) fn default_retention(&self) -> Retention {
        Retention {
            max_age: (!self.retention_max_age.is_zero()).then_some(self.retention_max_age),
            max_bytes: (self.retention_max_bytes > 0).then_some(self.retention_max_bytes),
        }
    }
}

impl ServiceConfig for BrokerConfig {
    const SECTION: &'static str = "broker";
    const LIST_KEYS: &'static [&'static str] = &["jetstream.servers"];

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
        if !(64 * 1024..=1 << 30).contains(&self.segment_bytes) {
            return Err(ConfigError::invalid(
                section,
                "segment_bytes",
                "must be between 65536 and 1073741824",
            ));
        }
        if self.segment_age < Duration::from_secs(1) {
            return Err(ConfigError::invalid(
                section,
                "segment_age",
                "must be at least 1s",
            ));
        }
        if !(64..=1 << 20).contains(&self.index_interval_bytes) {
            return Err(ConfigError::invalid(
                section,
                "index_interval_bytes",
                "must be between 64 and 1048576",
            ));
        }
        if self.retention_check_interval < Duration::from_millis(10) {
            return Err(ConfigError::invalid(
                section,
                "retention_check_interval",
                "must be at least 10ms",
            ));
        }
        if self.producer_expiry < Duration::from_secs(60) {
            return Err(ConfigError::invalid(
                section,
                "producer_expiry",
                "must be at least 1m",
            ));
        }
        let tls = &self.jetstream.tls;
        if tls.cert.is_some() != tls.key.is_some() {
            return Err(ConfigError::invalid(
                section,
                "jetstream.tls",
                "cert and key go together: set both, or neither",
            ));
        }
        for (key, file) in [
            ("jetstream.tls.ca", &tls.ca),
            ("jetstream.tls.cert", &tls.cert),
            ("jetstream.tls.key", &tls.key),
        ] {
            if let Some(path) = file
                && !path.is_file()
            {
                return Err(ConfigError::invalid(
                    section,
                    key,
                    format!("{} is not a readable file", path.display()),
                ));
            }
        }
        // JetStream refuses to create a stream with a shorter window, and would be asked
        // again and again.
        if !(Duration::from_millis(100)..=Duration::from_secs(7 * 24 * 3600))
            .contains(&self.jetstream.duplicate_window)
        {
            return Err(ConfigError::invalid(
                section,
                "jetstream.duplicate_window",
                "must be between 100ms (JetStream's least) and 7d",
            ));
        }
        if self.dedup_window > Duration::from_secs(7 * 24 * 3600) {
            return Err(ConfigError::invalid(
                section,
                "dedup_window",
                "must be at most 7d",
            ));
        }
        if self.dedup_max_events > 100_000_000 {
            return Err(ConfigError::invalid(
                section,
                "dedup_max_events",
                "must be at most 100000000",
            ));
        }
        if !(Duration::from_millis(100)..=MAX_SESSION_TIMEOUT).contains(&self.group_session_timeout)
        {
            return Err(ConfigError::invalid(
                section,
                "group_session_timeout",
                "must be between 100ms and 5m",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let cases: [Case; 15] = [
            (
                |c| c.jetstream.duplicate_window = Duration::from_millis(10),
                "broker.jetstream.duplicate_window",
            ),
            (
                |c| c.jetstream.tls.cert = Some(PathBuf::from("Cargo.toml")),
                "broker.jetstream.tls",
            ),
            (
                |c| c.jetstream.tls.ca = Some(PathBuf::from("/nonexistent/ca.pem")),
                "broker.jetstream.tls.ca",
            ),
            (
                |c| c.dedup_window = Duration::from_secs(30 * 24 * 3600),
                "broker.dedup_window",
            ),
            (
                |c| c.dedup_max_events = 1_000_000_000,
                "broker.dedup_max_events",
            ),
            (|c| c.segment_bytes = 10, "broker.segment_bytes"),
            (|c| c.segment_age = Duration::ZERO, "broker.segment_age"),
            (
                |c| c.index_interval_bytes = 0,
                "broker.index_interval_bytes",
            ),
            (
                |c| c.group_session_timeout = Duration::from_secs(3600),
                "broker.group_session_timeout",
            ),
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
