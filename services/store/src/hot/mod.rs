//! The in-memory data store: the hot tier in front of long-term storage.
//!
//! It holds, per `(query, key)`, the most recent windows (a [`Series`]: the latest result
//! and a bounded history), and per query the ranking of its keys in the most recent window
//! (`TopK`). Two backends implement [`HotTier`]:
//!
//! - [`Memory`]: in this process, bounded by bytes, least-recently-used series evicted
//!   first ([moka](https://docs.rs/moka));
//! - [`Redis`]: a Redis server that every store replica shares, so each replica serves the
//!   hot data any of them wrote; Redis's `maxmemory` policy bounds it.
//!
//! Both replace a series only with a newer version (the sequence of the series' last
//! write), so a slow read-through fill never overwrites what a later write put there. Both
//! count hits, misses and evictions in the same metrics.

mod memory;
mod redis;

pub(crate) use self::memory::Memory;
pub(crate) use self::redis::Redis;

use crate::durable::Series;
use crate::error::Result;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

/// A series as found in the hot tier.
#[derive(Debug, Clone)]
pub(crate) struct Cached {
    /// The windows held.
    pub(crate) series: Arc<Series>,
    /// How long until the entry expires; `None` if it does not (write-through).
    pub(crate) expires_in: Option<Duration>,
}

/// What the hot tier knows about one `(query, key)`.
#[derive(Debug, Clone)]
pub(crate) enum Lookup {
    /// The series is hot.
    Hit(Cached),
    /// Nothing is held.
    Miss,
    /// The series was written since it was last loaded: read it from long-term storage.
    Stale,
}

/// A query's keys in its most recent window, highest value first.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Ranking {
    /// The window's start and end, Unix milliseconds.
    pub(crate) window: (i64, i64),
    /// `(key, value)`, highest first, ties by key.
    pub(crate) top: Vec<(String, f64)>,
}

/// Scores of some keys in one window of a query, to fold into its ranking.
#[derive(Debug, Clone)]
pub(crate) struct Scores {
    /// The window's start and end, Unix milliseconds.
    pub(crate) window: (i64, i64),
    /// `(key, value)`.
    pub(crate) keys: Vec<(String, f64)>,
    /// The greatest sequence among the writes scored: a ranking dropped by a query's
    /// deletion with a later sequence refuses them.
    pub(crate) version: u64,
}

/// An in-memory data store.
pub(crate) trait HotTier: Send + Sync + 'static {
    /// The series of `query` and `key`; counts a hit or a miss.
    fn series(&self, query: &str, key: &str) -> impl Future<Output = Result<Lookup>> + Send;

    /// Holds `series` for `ttl` (`None`: until evicted), unless a newer version is held.
    fn store(
        &self,
        query: &str,
        key: &str,
        series: Series,
        ttl: Option<Duration>,
    ) -> impl Future<Output = Result<()>> + Send;

    /// Drops the series of `query` and `key`, remembering (for `ttl`) that `version` was
    /// written, so that a fill with an older version is refused.
    fn forget(
        &self,
        query: &str,
        key: &str,
        version: u64,
        ttl: Duration,
    ) -> impl Future<Output = Result<()>> + Send;

    /// Makes every series held so far stale (rankings are left alone). What a write that
    /// reached neither the hot tier nor its marker needs — the older version may still be
    /// held, under a key no one else knows to drop — and what a replica does at start, in
    /// case it stopped owing one.
    fn invalidate_all(&self) -> impl Future<Output = Result<()>> + Send;
    /// Folds `scores` into `query`'s ranking: a newer window replaces the ranking, the
    /// current one is updated, an older one is ignored. At most `keep` keys are kept.
    fn rank(
        &self,
        query: &str,
        scores: Scores,
        keep: usize,
    ) -> impl Future<Output = Result<()>> + Send;

    /// Drops `query`'s ranking for the query's deletion at sequence `version`, unless it
    /// holds writes after the deletion (another replica sharing the hot tier applied it
    /// earlier, and newer results since); scores of writes before it are refused from now
    /// on (a replica sharing the hot tier that has not applied the deletion yet).
    fn drop_ranking(&self, query: &str, version: u64) -> impl Future<Output = Result<()>> + Send;

    /// The top `k` keys of `query`'s most recent window, if it has one.
    fn top(&self, query: &str, k: usize) -> impl Future<Output = Result<Option<Ranking>>> + Send;
}

/// Sorts `(key, value)` highest value first, ties by key, and keeps `k`.
pub(crate) fn top_k(mut scores: Vec<(String, f64)>, k: usize) -> Vec<(String, f64)> {
    scores.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    scores.truncate(k);
    scores
}

/// Hot-tier metrics, named alike for both backends.
pub(crate) mod metric {
    /// A lookup found the series.
    pub(crate) const HITS: &str = "runnel_store_hot_hits_total";
    /// A lookup found nothing (or a stale marker).
    pub(crate) const MISSES: &str = "runnel_store_hot_misses_total";
    /// Series evicted: by the memory bound (`cause="size"`) or on expiry (`"expired"`).
    pub(crate) const EVICTIONS: &str = "runnel_store_hot_evictions_total";
    /// Bytes held (memory backend) or used by Redis.
    pub(crate) const BYTES: &str = "runnel_store_hot_bytes";
}

#[cfg(test)]
mod tests {
    #[test]
    fn ranking_is_by_value_then_key() {
        let ranked = super::top_k(
            vec![
                ("b".into(), 2.0),
                ("a".into(), 2.0),
                ("c".into(), 5.0),
                ("d".into(), 1.0),
            ],
            3,
        );
        let keys: Vec<&str> = ranked.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["c", "a", "b"]);
    }
}
