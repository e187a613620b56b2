//! The in-process hot tier: series in a [moka](https://docs.rs/moka) cache bounded by the
//! bytes they hold (least recently used evicted first, expired entries dropped), rankings
//! in a map per query.

use super::{Cached, HotTier, Lookup, Ranking, Scores, metric, top_k};
use crate::durable::Series;
use crate::error::{Result, StoreError};
use moka::Expiry;
use moka::notification::RemovalCause;
use moka::ops::compute::Op;
use moka::sync::Cache;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One cache entry: a series, or the marker of a write that made the held copy stale.
#[derive(Debug)]
struct Entry {
    series: Option<Arc<Series>>,
    version: u64,
    ttl: Option<Duration>,
    stored_at: Instant,
}

/// Each entry lives for its own `ttl`, from when it was stored.
struct PerEntryTtl;

impl Expiry<String, Arc<Entry>> for PerEntryTtl {
    fn expire_after_create(
        &self,
        _key: &String,
        entry: &Arc<Entry>,
        _created_at: Instant,
    ) -> Option<Duration> {
        entry.ttl
    }

    fn expire_after_update(
        &self,
        _key: &String,
        entry: &Arc<Entry>,
        _updated_at: Instant,
        _remaining: Option<Duration>,
    ) -> Option<Duration> {
        entry.ttl
    }
}

/// The most recent window of one query and its keys' values.
#[derive(Debug)]
struct Window {
    start: i64,
    end: i64,
    scores: HashMap<String, f64>,
    /// The greatest sequence scored.
    version: u64,
}

/// One query's ranking.
#[derive(Debug, Default)]
struct Ranked {
    window: Option<Window>,
    /// The sequence of the query's last deletion: older scores are refused.
    dropped: u64,
}

/// The in-process backend.
pub(crate) struct Memory {
    series: Cache<String, Arc<Entry>>,
    rankings: Mutex<HashMap<String, Ranked>>,
}

impl std::fmt::Debug for Memory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Memory")
            .field("bytes", &self.series.weighted_size())
            .finish_non_exhaustive()
    }
}

/// The cache key of a series: unambiguous whatever the names contain.
fn cache_key(query: &str, key: &str) -> String {
    format!("{}:{query}{key}", query.len())
}

impl Memory {
    /// A hot tier holding at most `max_bytes` of series.
    pub(crate) fn new(max_bytes: u64) -> Memory {
        let series = Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|key: &String, entry: &Arc<Entry>| {
                // The key, the entry and the series' encoded size: close enough to what the
                // allocator holds for a bound that is about orders of magnitude.
                let held = entry.series.as_ref().map_or(0, |s| s.weight());
                u32::try_from(key.len() + 64)
                    .unwrap_or(u32::MAX)
                    .saturating_add(held)
            })
            .expire_after(PerEntryTtl)
            .eviction_listener(|_key, _entry, cause| {
                let cause = match cause {
                    RemovalCause::Size => "size",
                    RemovalCause::Expired => "expired",
                    RemovalCause::Explicit | RemovalCause::Replaced => return,
                };
                metrics::counter!(metric::EVICTIONS, "cause" => cause).increment(1);
            })
            .build();
        Memory {
            series,
            rankings: Mutex::new(HashMap::new()),
        }
    }

    fn rankings(&self) -> Result<std::sync::MutexGuard<'_, HashMap<String, Ranked>>> {
        self.rankings.lock().map_err(|_| StoreError::Failed)
    }

    fn publish_size(&self) {
        metrics::gauge!(metric::BYTES).set(self.series.weighted_size() as f64);
    }

    /// Runs the cache's deferred bookkeeping now (evictions, expiry), for tests.
    #[cfg(test)]
    fn settle(&self) {
        self.series.run_pending_tasks();
    }
}

impl HotTier for Memory {
    async fn series(&self, query: &str, key: &str) -> Result<Lookup> {
        let lookup = match self.series.get(&cache_key(query, key)) {
            Some(entry) => match &entry.series {
                Some(series) => Lookup::Hit(Cached {
                    series: Arc::clone(series),
                    expires_in: entry
                        .ttl
                        .map(|ttl| ttl.saturating_sub(entry.stored_at.elapsed())),
                }),
                None => Lookup::Stale,
            },
            None => Lookup::Miss,
        };
        let name = if matches!(lookup, Lookup::Hit(_)) {
            metric::HITS
        } else {
            metric::MISSES
        };
        metrics::counter!(name).increment(1);
        Ok(lookup)
    }

    async fn store(
        &self,
        query: &str,
        key: &str,
        series: Series,
        ttl: Option<Duration>,
    ) -> Result<()> {
        let entry = Arc::new(Entry {
            version: series.version,
            series: Some(Arc::new(series)),
            ttl,
            stored_at: Instant::now(),
        });
        self.series
            .entry(cache_key(query, key))
            .and_compute_with(|held| match held {
                Some(held) if held.value().version > entry.version => Op::Nop,
                _ => Op::Put(entry),
            });
        self.publish_size();
        Ok(())
    }

    async fn invalidate_all(&self) -> Result<()> {
        self.series.invalidate_all();
        Ok(())
    }

    async fn forget(&self, query: &str, key: &str, version: u64, ttl: Duration) -> Result<()> {
        let marker = Arc::new(Entry {
            series: None,
            version,
            ttl: Some(ttl),
            stored_at: Instant::now(),
        });
        self.series
            .entry(cache_key(query, key))
            .and_compute_with(|held| match held {
                Some(held) if held.value().version > version => Op::Nop,
                _ => Op::Put(marker),
            });
        Ok(())
    }

    async fn rank(&self, query: &str, scores: Scores, keep: usize) -> Result<()> {
        let mut rankings = self.rankings()?;
        let (start, end) = scores.window;
        let ranked = rankings.entry(query.to_owned()).or_default();
        if scores.version <= ranked.dropped {
            return Ok(());
        }
        let window = ranked.window.get_or_insert_with(|| Window {
            start,
            end,
            scores: HashMap::new(),
            version: 0,
        });
        if start < window.start {
            return Ok(());
        }
        if start > window.start {
            *window = Window {
                start,
                end,
                scores: HashMap::new(),
                version: 0,
            };
        }
        window.version = window.version.max(scores.version);
        window.scores.extend(scores.keys);
        // Trim in bulk, not per write: twice the bound, down to the bound.
        if window.scores.len() > keep.saturating_mul(2) {
            let kept = top_k(window.scores.drain().collect(), keep);
            window.scores.extend(kept);
        }
        Ok(())
    }

    async fn drop_ranking(&self, query: &str, version: u64) -> Result<()> {
        let mut rankings = self.rankings()?;
        let ranked = rankings.entry(query.to_owned()).or_default();
        if ranked.window.as_ref().is_none_or(|w| w.version < version) {
            ranked.window = None;
        }
        ranked.dropped = ranked.dropped.max(version);
        Ok(())
    }

    async fn top(&self, query: &str, k: usize) -> Result<Option<Ranking>> {
        let rankings = self.rankings()?;
        let window = rankings
            .get(query)
            .and_then(|ranked| ranked.window.as_ref());
        Ok(window.map(|window| Ranking {
            window: (window.start, window.end),
            top: top_k(
                window
                    .scores
                    .iter()
                    .map(|(key, value)| (key.clone(), *value))
                    .collect(),
                k,
            ),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use runnel_proto::Millis;
    use runnel_proto::v1::QueryResult;

    fn series(version: u64, count: f64) -> Series {
        Series {
            version,
            complete_from: i64::MIN,
            results: vec![QueryResult {
                query: "q".into(),
                key: "k".into(),
                window_start: Some(Millis(0).into()),
                values: [("count".to_owned(), count)].into(),
                ..Default::default()
            }],
        }
    }

    fn count(lookup: Lookup) -> Option<f64> {
        match lookup {
            Lookup::Hit(cached) => Some(cached.series.latest()?.values["count"]),
            Lookup::Miss | Lookup::Stale => None,
        }
    }

    #[tokio::test]
    async fn older_versions_never_replace_newer_ones() {
        let hot = Memory::new(1 << 20);
        assert!(matches!(hot.series("q", "k").await.unwrap(), Lookup::Miss));
        hot.store("q", "k", series(5, 5.0), None).await.unwrap();
        hot.store("q", "k", series(3, 3.0), None).await.unwrap();
        assert_eq!(count(hot.series("q", "k").await.unwrap()), Some(5.0));
        // A write marks the series stale; a fill from before the write is refused.
        hot.forget("q", "k", 7, Duration::from_secs(60))
            .await
            .unwrap();
        assert!(matches!(hot.series("q", "k").await.unwrap(), Lookup::Stale));
        hot.store("q", "k", series(6, 6.0), None).await.unwrap();
        assert!(matches!(hot.series("q", "k").await.unwrap(), Lookup::Stale));
        hot.store("q", "k", series(7, 7.0), Some(Duration::from_secs(60)))
            .await
            .unwrap();
        match hot.series("q", "k").await.unwrap() {
            Lookup::Hit(cached) => {
                assert_eq!(cached.series.version, 7);
                assert!(cached.expires_in.unwrap() <= Duration::from_secs(60));
            }
            other => panic!("expected a hit, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn the_memory_bound_evicts() {
        let hot = Memory::new(64 * 1024);
        for i in 0..2000 {
            hot.store("q", &format!("key-{i}"), series(1, 1.0), None)
                .await
                .unwrap();
        }
        hot.settle();
        assert!(hot.series.weighted_size() <= 64 * 1024);
        assert!(hot.series.entry_count() < 2000);
    }

    #[tokio::test]
    async fn rankings_follow_the_most_recent_window() {
        let hot = Memory::new(1 << 20);
        let scores = |start, keys: &[(&str, f64)]| Scores {
            window: (start, start + 10),
            keys: keys.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect(),
            version: 1,
        };
        assert_eq!(hot.top("q", 3).await.unwrap(), None);
        hot.rank("q", scores(10, &[("a", 1.0), ("b", 3.0)]), 100)
            .await
            .unwrap();
        hot.rank("q", scores(10, &[("a", 4.0)]), 100).await.unwrap();
        hot.rank("q", scores(0, &[("z", 99.0)]), 100).await.unwrap();
        let ranking = hot.top("q", 3).await.unwrap().unwrap();
        assert_eq!(ranking.window, (10, 20));
        assert_eq!(ranking.top, [("a".to_owned(), 4.0), ("b".to_owned(), 3.0)]);
        hot.rank("q", scores(20, &[("c", 1.0)]), 100).await.unwrap();
        let ranking = hot.top("q", 3).await.unwrap().unwrap();
        assert_eq!(ranking.top, [("c".to_owned(), 1.0)]);
    }

    #[tokio::test]
    async fn a_dropped_ranking_refuses_older_scores_and_keeps_newer_ones() {
        let hot = Memory::new(1 << 20);
        let scores = |start, key: &str, version| Scores {
            window: (start, start + 10),
            keys: vec![(key.to_owned(), 1.0)],
            version,
        };
        hot.rank("q", scores(10, "a", 3), 100).await.unwrap();
        hot.drop_ranking("q", 5).await.unwrap();
        assert_eq!(hot.top("q", 3).await.unwrap(), None);
        // Scores of writes before the deletion (a replica behind it) are refused.
        hot.rank("q", scores(20, "old", 4), 100).await.unwrap();
        assert_eq!(hot.top("q", 3).await.unwrap(), None);
        // Those after it rank again, and a late drop of the same deletion keeps them.
        hot.rank("q", scores(0, "new", 6), 100).await.unwrap();
        hot.drop_ranking("q", 5).await.unwrap();
        let ranking = hot.top("q", 3).await.unwrap().unwrap();
        assert_eq!(ranking.top, [("new".to_owned(), 1.0)]);
    }
}
