//! The store's settings, under `[store]` / `RUNNEL_STORE__…`.

use runnel_log::FsyncPolicy;
use runnel_server::{ConfigError, ServerConfig, ServiceConfig};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

/// Where the store keeps results, how hard it tries to keep them, what it keeps hot, and
/// what it accepts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// Listen addresses and call limits.
    pub server: ServerConfig,
    /// The directory holding long-term storage (`<data_dir>/results.redb`).
    pub data_dir: PathBuf,
    /// When written results reach the disk: `"always"` (before `Put` answers), an interval
    /// such as `"100ms"`, or `"never"` (left to the OS). With `broker` set the results log is
    /// what `Put` makes durable, and `"always"` makes this replica's view of it durable every
    /// second.
    pub fsync: FsyncPolicy,
    /// Results accepted in one `Put` call.
    pub max_batch_results: usize,
    /// Results a `Watch` stream may fall behind the newest write before it stops following
    /// live writes and catches up from the change feed on disk instead (no result is
    /// skipped either way).
    pub watch_buffer: usize,
    /// Results are deleted once their window ended this long ago (`"0s"`: kept forever).
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
    /// How often retention runs (and, after it deleted something, compaction).
    #[serde(with = "humantime_serde")]
    pub retention_interval: Duration,
    /// Entries the change feed keeps: how far back a client may resume with
    /// `after_sequence`. Older entries are trimmed as new ones are written.
    pub feed_entries: u64,
    /// The in-memory data store in front of long-term storage.
    pub hot: HotConfig,
    /// The broker's gRPC URL, to run as one of several replicas: results are written to
    /// the broker's `_store.results` log and every replica materialises that log into its
    /// own long-term storage. Empty: one replica, with no broker.
    pub broker: String,
}

/// Which in-memory data store backs the hot tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HotBackend {
    /// In this process: bounded by `max_bytes`, least recently used series evicted first.
    Memory,
    /// A Redis server shared by every store replica (`redis_url`); Redis's own `maxmemory`
    /// policy bounds it.
    Redis,
}

/// How a query's results move between long-term storage and the hot tier, as in the
/// reference design's caching strategies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CacheStrategy {
    /// Every `Put` lands in both; a miss (after eviction or a restart) still loads from
    /// long-term storage.
    WriteThrough,
    /// `Put` writes long-term storage and drops the key from the hot tier; a `Get` that
    /// misses loads it, for `ttl`.
    ReadThrough,
    /// Read-through, and a key read in the last `refresh_ahead` part of its `ttl` is
    /// reloaded in the background, so hot keys never expire under their readers.
    RefreshAhead,
}

/// The hot tier's settings, under `[store.hot]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HotConfig {
    /// `"memory"` or `"redis"`.
    pub backend: HotBackend,
    /// The Redis server, for `backend = "redis"`: `redis://host:port/db` or
    /// `redis+unix:///path/to/socket`.
    pub redis_url: String,
    /// A prefix for every Redis key, so several pipelines can share one server.
    pub redis_prefix: String,
    /// The memory bound of the in-process backend, in bytes of results held.
    pub max_bytes: u64,
    /// Recent windows kept per `(query, key)`: `Range` calls within them are served from
    /// memory.
    pub history: usize,
    /// How long a key loaded by a read stays hot (read-through, refresh-ahead).
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// Refresh-ahead: the last fraction of `ttl` in which a read triggers a reload.
    pub refresh_ahead: f64,
    /// The caching strategy of queries not named in `queries`.
    pub strategy: CacheStrategy,
    /// Per-query strategies, e.g. `{ purchase_propensity = "refresh-ahead" }`.
    pub queries: BTreeMap<String, CacheStrategy>,
    /// The value `TopK` ranks a query's keys by, unless `rank_by_query` names another.
    pub rank_by: String,
    /// Per-query ranking values, e.g. `{ avg_value_per_key = "avg" }`.
    pub rank_by_query: BTreeMap<String, String>,
    /// Keys of a query's most recent window kept for `TopK`; beyond it the lowest-ranked
    /// are dropped.
    pub top_keys: usize,
}

impl Default for HotConfig {
    fn default() -> Self {
        HotConfig {
            backend: HotBackend::Memory,
            redis_url: "redis://127.0.0.1:6379".into(),
            redis_prefix: "runnel".into(),
            max_bytes: 256 * 1024 * 1024,
            history: 16,
            ttl: Duration::from_secs(300),
            refresh_ahead: 0.2,
            strategy: CacheStrategy::WriteThrough,
            queries: BTreeMap::new(),
            rank_by: "count".into(),
            rank_by_query: BTreeMap::new(),
            top_keys: 10_000,
        }
    }
}

impl HotConfig {
    /// The strategy for `query`.
    pub fn strategy(&self, query: &str) -> CacheStrategy {
        self.queries.get(query).copied().unwrap_or(self.strategy)
    }

    /// The value `query`'s keys are ranked by.
    pub fn rank_by(&self, query: &str) -> &str {
        self.rank_by_query
            .get(query)
            .map_or(self.rank_by.as_str(), String::as_str)
    }
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            server: ServerConfig::loopback(7104, 9104),
            data_dir: PathBuf::from("runnel-data/store"),
            fsync: FsyncPolicy::Always,
            max_batch_results: 10_000,
            watch_buffer: 4096,
            retention: Duration::from_secs(30 * 24 * 3600),
            retention_interval: Duration::from_secs(600),
            feed_entries: 1_000_000,
            hot: HotConfig::default(),
            broker: String::new(),
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
        let invalid = |key: &str, message: &str| Err(ConfigError::invalid(section, key, message));
        self.server.validate(section)?;
        if self.data_dir.as_os_str().is_empty() {
            return invalid("data_dir", "must not be empty");
        }
        if !(self.broker.is_empty()
            || self.broker.starts_with("http://")
            || self.broker.starts_with("https://"))
        {
            return invalid(
                "broker",
                "must be an http:// or https:// URL, or empty for one replica without a broker",
            );
        }
        if let FsyncPolicy::Interval(every) = self.fsync
            && every.is_zero()
        {
            return invalid(
                "fsync",
                "an interval must be more than 0ms; use \"always\" to sync every write",
            );
        }
        if !(1..=100_000).contains(&self.max_batch_results) {
            return invalid("max_batch_results", "must be between 1 and 100000");
        }
        if !(1..=1_000_000).contains(&self.watch_buffer) {
            return invalid("watch_buffer", "must be between 1 and 1000000");
        }
        if self.retention_interval < Duration::from_secs(1) {
            return invalid("retention_interval", "must be at least 1s");
        }
        if self.feed_entries < 1000 {
            return invalid("feed_entries", "must be at least 1000");
        }
        let hot = &self.hot;
        if hot.backend == HotBackend::Redis
            && !["redis://", "rediss://", "redis+unix://", "unix://"]
                .iter()
                .any(|scheme| hot.redis_url.starts_with(scheme))
        {
            return invalid(
                "hot.redis_url",
                "must be a redis://, rediss:// or redis+unix:// URL",
            );
        }
        if hot.max_bytes < 1024 * 1024 {
            return invalid("hot.max_bytes", "must be at least 1048576 (1 MiB)");
        }
        if !(1..=1000).contains(&hot.history) {
            return invalid("hot.history", "must be between 1 and 1000");
        }
        if hot.ttl < Duration::from_secs(1) {
            return invalid("hot.ttl", "must be at least 1s");
        }
        if !(hot.refresh_ahead > 0.0 && hot.refresh_ahead < 1.0) {
            return invalid("hot.refresh_ahead", "must be between 0 and 1 (exclusive)");
        }
        if hot.rank_by.is_empty() || hot.rank_by_query.values().any(String::is_empty) {
            return invalid("hot.rank_by", "value names must not be empty");
        }
        if !(1..=1_000_000).contains(&hot.top_keys) {
            return invalid("hot.top_keys", "must be between 1 and 1000000");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_durable_and_loopback() {
        let config = StoreConfig::default();
        config.validate().unwrap();
        assert!(config.server.grpc.ip().is_loopback());
        assert_eq!(config.fsync, FsyncPolicy::Always);
        assert_eq!(config.hot.backend, HotBackend::Memory);
        assert_eq!(config.hot.rank_by("meetup_topics"), "count");
    }

    #[test]
    fn strategies_and_ranking_are_per_query() {
        let mut hot = HotConfig::default();
        hot.queries
            .insert("propensity".into(), CacheStrategy::RefreshAhead);
        hot.rank_by_query.insert("avg".into(), "avg".into());
        assert_eq!(hot.strategy("propensity"), CacheStrategy::RefreshAhead);
        assert_eq!(hot.strategy("other"), CacheStrategy::WriteThrough);
        assert_eq!(hot.rank_by("avg"), "avg");
        assert_eq!(hot.rank_by("other"), "count");
    }

    #[test]
    fn bad_values_name_their_key() {
        type Case = (fn(&mut StoreConfig), &'static str);
        let cases: [Case; 10] = [
            (|c| c.data_dir = PathBuf::new(), "store.data_dir"),
            (|c| c.broker = "localhost:7102".into(), "store.broker"),
            (
                |c| c.fsync = FsyncPolicy::Interval(Duration::ZERO),
                "store.fsync",
            ),
            (|c| c.max_batch_results = 0, "store.max_batch_results"),
            (|c| c.watch_buffer = 0, "store.watch_buffer"),
            (|c| c.feed_entries = 10, "store.feed_entries"),
            (
                |c| {
                    c.hot.backend = HotBackend::Redis;
                    c.hot.redis_url = "127.0.0.1:6379".into();
                },
                "store.hot.redis_url",
            ),
            (|c| c.hot.history = 0, "store.hot.history"),
            (|c| c.hot.refresh_ahead = 1.0, "store.hot.refresh_ahead"),
            (|c| c.hot.max_bytes = 10, "store.hot.max_bytes"),
        ];
        for (mutate, key) in cases {
            let mut config = StoreConfig::default();
            mutate(&mut config);
            let message = config.validate().unwrap_err().to_string();
            assert!(message.contains(key), "{message} should name {key}");
        }
    }
}
