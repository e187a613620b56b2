//! The store's settings, under `[store]` / `RUNNEL_STORE__…`.

use runnel_log::FsyncPolicy;
use runnel_server::{ConfigError, ServerConfig, ServiceConfig};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Where the store keeps results, how hard it tries to keep them, and what it accepts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// Listen addresses and call limits.
    pub server: ServerConfig,
    /// The directory holding the result log (`<data_dir>/results.log`).
    pub data_dir: PathBuf,
    /// When written results reach the disk: `"always"` (before `Put` answers), an interval
    /// such as `"100ms"`, or `"never"` (left to the OS).
    pub fsync: FsyncPolicy,
    /// Results accepted in one `Put` call.
    pub max_batch_results: usize,
    /// Results a `Watch` client may fall behind by before its stream is ended with
    /// `RESOURCE_EXHAUSTED` (it then re-reads with `Range` and watches again).
    pub watch_buffer: usize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            server: ServerConfig::loopback(7104, 9104),
            data_dir: PathBuf::from("runnel-data/store"),
            fsync: FsyncPolicy::Always,
            max_batch_results: 10_000,
            watch_buffer: 1024,
        }
    }
}

impl ServiceConfig for StoreConfig {
    const SECTION: &'static str = "store";

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
                "an interval must be more than 0ms; use \"always\" to sync every write",
            ));
        }
        if !(1..=100_000).contains(&self.max_batch_results) {
            return Err(ConfigError::invalid(
                section,
                "max_batch_results",
                "must be between 1 and 100000",
            ));
        }
        if !(1..=1_000_000).contains(&self.watch_buffer) {
            return Err(ConfigError::invalid(
                section,
                "watch_buffer",
                "must be between 1 and 1000000",
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
        let config = StoreConfig::default();
        config.validate().unwrap();
        assert!(config.server.grpc.ip().is_loopback());
        assert_eq!(config.fsync, FsyncPolicy::Always);
    }

    #[test]
    fn bad_values_name_their_key() {
        type Case = (fn(&mut StoreConfig), &'static str);
        let cases: [Case; 4] = [
            (|c| c.data_dir = PathBuf::new(), "store.data_dir"),
            (
                |c| c.fsync = FsyncPolicy::Interval(Duration::ZERO),
                "store.fsync",
            ),
            (|c| c.max_batch_results = 0, "store.max_batch_results"),
            (|c| c.watch_buffer = 0, "store.watch_buffer"),
        ];
        for (mutate, key) in cases {
            let mut config = StoreConfig::default();
            mutate(&mut config);
            let message = config.validate().unwrap_err().to_string();
            assert!(message.contains(key), "{message} should name {key}");
        }
    }
}
