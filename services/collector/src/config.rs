//! The collector's settings, under `[collector]` / `RUNNEL_COLLECTOR__…`.

use runnel_server::{ConfigError, ServerConfig, ServiceConfig};
use serde::{Deserialize, Serialize};

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
}

impl Default for CollectorConfig {
    fn default() -> Self {
        CollectorConfig {
            server: ServerConfig::loopback(7101, 9101),
            broker: "http://127.0.0.1:7102".into(),
            topic: "events".into(),
            max_batch_events: 10_000,
            max_payload_bytes: 1024 * 1024,
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
        if !(self.broker.starts_with("http://") || self.broker.starts_with("https://")) {
            return Err(ConfigError::invalid(
                section,
                "broker",
                format!("{:?} is not an http:// or https:// URL", self.broker),
            ));
        }
        if self.topic.is_empty()
            || self.topic.len() > 249
            || !self
                .topic
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        {
            return Err(ConfigError::invalid(
                section,
                "topic",
                "use 1-249 characters from [a-zA-Z0-9._-]",
            ));
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
    }

    #[test]
    fn bad_values_name_their_key() {
        type Case = (fn(&mut CollectorConfig), &'static str);
        let cases: [Case; 4] = [
            (|c| c.broker = "127.0.0.1:7102".into(), "collector.broker"),
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
