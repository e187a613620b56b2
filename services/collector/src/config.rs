//! The collector's settings, under `[collector]` / `RUNNEL_COLLECTOR__…`.

use runnel_log::FsyncPolicy;
use runnel_msglog::Mode;
use runnel_server::{ConfigError, ServerConfig, ServiceConfig};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// How the collector listens, where it forwards, and what it accepts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CollectorConfig {
    /// Listen addresses and call limits.
    pub server: ServerConfig,
    /// The broker's gRPC URL.
    pub broker: String,
    /// The topic `Ingest` writes to.
    pub topic: String,
    /// Events accepted in one `Ingest` call.
    pub max_batch_events: usize,
    /// The largest payload accepted for one event, in bytes.
    pub max_payload_bytes: usize,
    /// Where the message log and the topic table live.
    pub data_dir: PathBuf,
    /// The store's gRPC URL, where `Track` reads scores.
    pub store: String,
    /// The UDP listener for one-way events (one per datagram, protobuf or JSON), or
    /// `"off"`. Loopback by default: nothing is authenticated.
    #[serde(with = "udp_address")]
    pub udp: Option<SocketAddr>,
    /// `Publish` to a topic that does not exist creates it (else: `NOT_FOUND`).
    pub auto_create_topics: bool,
    /// Partitions of the topics the collector creates.
    pub topic_partitions: u32,
    /// Batches a `Stream` client may have unacknowledged.
    pub stream_window: u32,
    /// `Tap` streams open at once.
    pub max_taps: usize,
    /// The message log.
    pub msglog: MsglogConfig,
    /// `Track`'s scores.
    pub track: TrackConfig,
}

/// The fault-tolerant message log, under `[collector.msglog]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MsglogConfig {
    /// `none`, `rbml`, `sbml` or `hml` (see docs/collector.md).
    pub mode: Mode,
    /// `"always"` (fsync each group commit before LOGGED acks), an interval such as
    /// `"5ms"` (fsync at most that often; LOGGED acks wait for it) or `"never"`.
    pub fsync: FsyncPolicy,
    /// Writer shards; 0: one per core.
    pub shards: usize,
    /// The most bytes of events accepted but not yet stored by the broker.
    pub max_bytes: u64,
    /// A segment file is sealed at this size.
    pub segment_bytes: u64,
    /// The most bytes of events in one batch to the broker.
    pub batch_bytes: usize,
    /// The most events in one batch to the broker (keep it within the broker's
    /// `max_batch_events`).
    pub batch_events: u32,
}

impl Default for MsglogConfig {
    fn default() -> Self {
        MsglogConfig {
            mode: Mode::Hml,
            fsync: FsyncPolicy::Always,
            shards: 0,
            max_bytes: 256 * 1024 * 1024,
            segment_bytes: 16 * 1024 * 1024,
            batch_bytes: 1536 * 1024,
            batch_events: 10_000,
        }
    }
}

impl MsglogConfig {
    /// The shard count in force.
    pub fn shard_count(&self) -> usize {
        if self.shards == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            self.shards
        }
    }
}

/// `Track`'s reading of scores, under `[collector.track]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrackConfig {
    /// The analyzer query whose results score a token.
    pub query: String,
    /// The value of a result that is the score.
    pub value: String,
    /// How long a score read from the store is reused.
    #[serde(with = "humantime_serde")]
    pub cache_ttl: Duration,
    /// Tokens whose scores are cached.
    pub cache_entries: usize,
    /// How long a store lookup may take before the answer goes without a score.
    #[serde(with = "humantime_serde")]
    pub lookup_timeout: Duration,
}

impl Default for TrackConfig {
    fn default() -> Self {
        TrackConfig {
            query: "purchase_propensity".into(),
            value: "score".into(),
            cache_ttl: Duration::from_millis(500),
            cache_entries: 10_000,
            lookup_timeout: Duration::from_millis(500),
        }
    }
}

/// `udp = "127.0.0.1:7106"` or `udp = "off"`.
mod udp_address {
    use super::*;

    pub(super) fn serialize<S: Serializer>(
        value: &Option<SocketAddr>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match value {
            Some(addr) => serializer.collect_str(addr),
            None => serializer.serialize_str("off"),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<SocketAddr>, D::Error> {
        let text = String::deserialize(deserializer)?;
        if text == "off" {
            return Ok(None);
        }
        text.parse().map(Some).map_err(|_| {
            serde::de::Error::custom(format!("{text:?} is not a socket address or \"off\""))
        })
    }
}

impl Default for CollectorConfig {
    fn default() -> Self {
        CollectorConfig {
            server: ServerConfig::loopback(7101, 9101),
            broker: "http://127.0.0.1:7102".into(),
            topic: "events".into(),
            max_batch_events: 10_000,
            max_payload_bytes: 1024 * 1024,
            data_dir: PathBuf::from("runnel-data/collector"),
            store: "http://127.0.0.1:7104".into(),
            udp: Some(SocketAddr::from(([127, 0, 0, 1], 7106))),
            auto_create_topics: true,
            topic_partitions: 4,
            stream_window: 64,
            max_taps: 64,
            msglog: MsglogConfig::default(),
            track: TrackConfig::default(),
        }
    }
}

impl ServiceConfig for CollectorConfig {
    const SECTION: &'static str = "collector";

    fn server(&self) -> &ServerConfig {
        &self.server
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let section = Self::SECTION;
        self.server.validate(section)?;
        // Datagrams carry no credentials, whatever `server.auth` says: beyond loopback the
        // UDP listener takes events from anyone who can reach it, so that must be meant.
        if let Some(udp) = self.udp
            && !udp.ip().is_loopback()
            && !self.server.allow_unauthenticated
        {
            return Err(ConfigError::invalid(
                section,
                "udp",
                format!(
                    "{udp} is reachable from other machines and datagrams are never \
                     authenticated: bind it to loopback, turn it \"off\", or set \
                     server.allow_unauthenticated = true if that is intended"
                ),
            ));
        }
        for (key, url) in [("broker", &self.broker), ("store", &self.store)] {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(ConfigError::invalid(
                    section,
                    key,
                    format!("{url:?} is not an http:// or https:// URL"),
                ));
            }
        }
        if let Err(error) = runnel_proto::names::validate_topic_name(&self.topic) {
            return Err(ConfigError::invalid(section, "topic", error.to_string()));
        }
        if !(1..=100_000).contains(&self.max_batch_events) {
            return Err(ConfigError::invalid(
                section,
                "max_batch_events",
                "must be between 1 and 100000",
            ));
        }
        if !(1..=self.server.max_message_bytes).contains(&self.max_payload_bytes) {
            return Err(ConfigError::invalid(
                section,
                "max_payload_bytes",
                "must be between 1 and server.max_message_bytes",
            ));
        }
        if self.data_dir.as_os_str().is_empty() {
            return Err(ConfigError::invalid(
                section,
                "data_dir",
                "must not be empty",
            ));
        }
        if !(1..=1024).contains(&self.topic_partitions) {
            return Err(ConfigError::invalid(
                section,
                "topic_partitions",
                "must be between 1 and 1024",
            ));
        }
        if !(1..=10_000).contains(&self.stream_window) {
            return Err(ConfigError::invalid(
                section,
                "stream_window",
                "must be between 1 and 10000",
            ));
        }
        if !(1..=10_000).contains(&self.max_taps) {
            return Err(ConfigError::invalid(
                section,
                "max_taps",
                "must be between 1 and 10000",
            ));
        }
        self.validate_msglog(section)?;
        let track = &self.track;
        if track.query.is_empty() || track.value.is_empty() {
            return Err(ConfigError::invalid(
                section,
                if track.query.is_empty() {
                    "track.query"
                } else {
                    "track.value"
                },
                "must not be empty",
            ));
        }
        if !(1..=10_000_000).contains(&track.cache_entries) {
            return Err(ConfigError::invalid(
                section,
                "track.cache_entries",
                "must be between 1 and 10000000",
            ));
        }
        if track.lookup_timeout.is_zero() {
            return Err(ConfigError::invalid(
                section,
                "track.lookup_timeout",
                "must be more than 0s",
            ));
        }
        Ok(())
    }
}

impl CollectorConfig {
    fn validate_msglog(&self, section: &str) -> Result<(), ConfigError> {
        let log = &self.msglog;
        if log.shards > 256 {
            return Err(ConfigError::invalid(
                section,
                "msglog.shards",
                "must be at most 256",
            ));
        }
        if !(1 << 16..=1 << 40).contains(&log.max_bytes) {
            return Err(ConfigError::invalid(
                section,
                "msglog.max_bytes",
                "must be between 65536 and 1099511627776",
            ));
        }
        if !(4096..=1 << 30).contains(&log.segment_bytes) {
            return Err(ConfigError::invalid(
                section,
                "msglog.segment_bytes",
                "must be between 4096 and 1073741824",
            ));
        }
        // A batch must hold the largest event, and a call to the broker two batches.
        let largest = self.max_payload_bytes + 64 * 1024;
        if log.batch_bytes < largest || log.batch_bytes * 2 > self.server.max_message_bytes {
            return Err(ConfigError::invalid(
                section,
                "msglog.batch_bytes",
                format!(
                    "must be between max_payload_bytes + 64 KiB ({largest}) and half of server.max_message_bytes ({})",
                    self.server.max_message_bytes / 2
                ),
            ));
        }
        if !(1..=100_000).contains(&log.batch_events) {
            return Err(ConfigError::invalid(
                section,
                "msglog.batch_events",
                "must be between 1 and 100000",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_loopback() {
        let config = CollectorConfig::default();
        config.validate().unwrap();
        assert!(config.server.grpc.ip().is_loopback());
        assert!(config.server.admin.ip().is_loopback());
        assert!(config.udp.unwrap().ip().is_loopback());
        assert_eq!(config.msglog.mode, Mode::Hml);
    }

    #[test]
    fn udp_is_an_address_or_off() {
        let parse = |text: &str| {
            runnel_server::config::load_from::<CollectorConfig>(
                None,
                [("RUNNEL_COLLECTOR__UDP".to_owned(), text.to_owned())],
            )
        };
        assert_eq!(parse("off").unwrap().udp, None);
        assert_eq!(
            parse("127.0.0.1:9999").unwrap().udp,
            Some("127.0.0.1:9999".parse().unwrap())
        );
        let error = parse("loud").unwrap_err().to_string();
        assert!(error.contains("collector.udp"), "{error}");
    }

    #[test]
    fn a_public_udp_listener_must_be_meant() {
        let mut config = CollectorConfig {
            udp: Some("0.0.0.0:7106".parse().unwrap()),
            ..CollectorConfig::default()
        };
        let error = config.validate().unwrap_err().to_string();
        assert!(error.contains("collector.udp"), "{error}");
        assert!(error.contains("allow_unauthenticated"), "{error}");
        config.server.allow_unauthenticated = true;
        config.validate().unwrap();
    }

    #[test]
    fn bad_values_name_their_key() {
        type Case = (fn(&mut CollectorConfig), &'static str);
        let cases: [Case; 9] = [
            (|c| c.broker = "127.0.0.1:7102".into(), "collector.broker"),
            (|c| c.store = "nowhere".into(), "collector.store"),
            (|c| c.stream_window = 0, "collector.stream_window"),
            (|c| c.msglog.max_bytes = 10, "collector.msglog.max_bytes"),
            (
                |c| c.msglog.batch_bytes = 100,
                "collector.msglog.batch_bytes",
            ),
            (|c| c.track.query = String::new(), "collector.track.query"),
            (|c| c.topic = "no spaces".into(), "collector.topic"),
            (|c| c.max_batch_events = 0, "collector.max_batch_events"),
            (
                |c| c.max_payload_bytes = usize::MAX,
                "collector.max_payload_bytes",
            ),
        ];
        for (mutate, key) in cases {
            let mut config = CollectorConfig::default();
            mutate(&mut config);
            let message = config.validate().unwrap_err().to_string();
            assert!(message.contains(key), "{message} should name {key}");
        }
    }
}
