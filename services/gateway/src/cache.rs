//! The gateway's own copy of each series' latest result (the answer to a `Get`), kept
//! current by the live stream the gateway already follows, so that a `Get` it has seen
//! before is answered without a call to the store.
//!
//! An entry exists only for a series a client has read ([`Latest::lookup`] adds it on a
//! miss). The store is then asked with a minimum sequence read *after* the entry was added
//! ([`Latest::fill`]): the store's answer reflects every write up to there, and every later
//! write reaches the entry through the stream ([`Latest::observe`]), so the entry is the
//! store's latest as of the stream's position. Answers merge by the store's own rule —
//! the newest window wins, and of one window's versions the later write (higher
//! sequence) — so a fill and the stream may land in either order. A fill completes only
//! the entry it was issued for (an entry evicted and added again in between has missed
//! writes and waits for its own fill).
//!
//! Whenever the stream may have missed something the cache forgets everything
//! ([`Latest::clear`]: a new generation; entries of older ones are dead): the stream broke
//! or came back (a store restart, a replica switch), the store's feed no longer reached
//! the gateway's cursor, sequences skipped a number (a query's deletion takes a sequence
//! that no result has, and watchers are not told of it), or this gateway dropped a query.
//! While the stream is down, reads go to the store (see [`crate::results`]).
//!
//! Memory is bounded by [`crate::config::CacheConfig::max_bytes`]: moka evicts the least
//! valuable series (TinyLFU admission, LRU eviction) past it.

use crate::live::Published;
use moka::ops::compute::{CompResult, Op};
use moka::sync::Cache;
use runnel_proto::Millis;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// One cached series.
#[derive(Debug, Clone)]
struct Series {
    /// Drawn when the entry was added: a fill completes only the entry it was issued for.
    id: u64,
    /// The [`Latest`] generation the entry belongs to; an entry of an older one is dead.
    generation: u64,
    /// The newest result known; `None` until a write or the fill brings one.
    latest: Option<Arc<Published>>,
    /// Whether the store's answer has been merged in: only then is `latest` the store's.
    filled: bool,
}

/// What a [`Latest::lookup`] found.
#[derive(Debug)]
pub(crate) enum Lookup {
    /// The series' latest result, as the store holds it at the stream's position.
    Hit(Arc<Published>),
    /// Not known: ask the store (with a minimum sequence read after this lookup) and hand
    /// its answer to [`Latest::fill`].
    Miss(Fill),
}

/// A miss's claim on the entry it added (or found waiting for a fill).
#[derive(Debug)]
pub(crate) struct Fill {
    series: String,
    id: u64,
    generation: u64,
}

/// The cache of each read series' latest result.
pub(crate) struct Latest {
    series: Cache<String, Series>,
    generation: AtomicU64,
    next_id: AtomicU64,
}

impl std::fmt::Debug for Latest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Latest")
            .field("generation", &self.generation.load(Ordering::Relaxed))
            .field("series", &self.series.entry_count())
            .finish_non_exhaustive()
    }
}

/// The cache key of a series: the query's length first, so that no two (query, key) pairs
/// meet (a key may hold any character).
fn series_key(query: &str, key: &str) -> String {
    let mut series = String::with_capacity(query.len() + key.len() + 6);
    series.push_str(&query.len().to_string());
    series.push(':');
    series.push_str(query);
    series.push_str(key);
    series
}

/// Roughly what an entry holds in memory: the key, the result (its JSON is a fair
/// measure of its decoded size) and the JSON itself.
fn weight(series: &str, entry: &Series) -> u32 {
    let result = entry.latest.as_ref().map_or(0, |p| 2 * p.json.len());
    u32::try_from(series.len() + result + 128).unwrap_or(u32::MAX)
}

/// The newer of two versions by the store's rule for a series' latest: the newest window,
/// then the later write.
fn newer(a: Option<Arc<Published>>, b: Option<Arc<Published>>) -> Option<Arc<Published>> {
    let rank = |p: &Published| {
        (
            p.window_start.map_or(i64::MIN, |t| Millis::from(t).0),
            p.sequence,
        )
    };
    match (a, b) {
        (Some(a), Some(b)) => Some(if rank(&b) > rank(&a) { b } else { a }),
        (a, b) => a.or(b),
    }
}

impl Latest {
    /// A cache holding about `max_bytes` of results.
    pub(crate) fn new(max_bytes: u64) -> Latest {
        Latest {
            series: Cache::builder()
                .max_capacity(max_bytes)
                .weigher(|series: &String, entry: &Series| weight(series, entry))
                .build(),
            generation: AtomicU64::new(0),
            next_id: AtomicU64::new(0),
        }
    }

    /// The latest result of `query`/`key` if it is known, or a claim to fill it.
    pub(crate) fn lookup(&self, query: &str, key: &str) -> Lookup {
        let series = series_key(query, key);
        let generation = self.generation.load(Ordering::SeqCst);
        if let Some(entry) = self.series.get(&series)
            && entry.generation == generation
            && entry.filled
            && let Some(latest) = entry.latest
        {
            metrics::counter!("runnel_gateway_cache_hits_total").increment(1);
            return Lookup::Hit(latest);
        }
        metrics::counter!("runnel_gateway_cache_misses_total").increment(1);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let added = self
            .series
            .entry_by_ref(&series)
            .and_compute_with(|entry| match entry {
                // Another miss's fill is under way, or the store had nothing: claim it too.
                Some(entry) if entry.value().generation == generation => Op::Nop,
                _ => Op::Put(Series {
                    id,
                    generation,
                    latest: None,
                    filled: false,
                }),
            });
        let id = match added {
            CompResult::Inserted(entry)
            | CompResult::ReplacedWith(entry)
            | CompResult::Unchanged(entry) => entry.value().id,
            CompResult::StillNone(_) | CompResult::Removed(_) => id,
        };
        Lookup::Miss(Fill {
            series,
            id,
            generation,
        })
    }

    /// Merges the store's answer to a miss — asked with a minimum sequence read after the
    /// [`Latest::lookup`] that gave `fill` — into its entry; returns the answer to give,
    /// which is never older than the store's.
    pub(crate) fn fill(
        &self,
        fill: Fill,
        answer: Option<Arc<Published>>,
    ) -> Option<Arc<Published>> {
        let generation = self.generation.load(Ordering::SeqCst);
        let mut merged = answer.clone();
        self.series
            .entry_by_ref(&fill.series)
            .and_compute_with(|entry| match entry {
                Some(entry)
                    if entry.value().id == fill.id
                        && entry.value().generation == fill.generation
                        && fill.generation == generation =>
                {
                    let mut series = entry.into_value();
                    series.latest = newer(series.latest, answer);
                    series.filled = true;
                    merged.clone_from(&series.latest);
                    Op::Put(series)
                }
                _ => Op::Nop,
            });
        merged
    }

    /// A write the stream delivered: brought into its series' entry, if it has one.
    pub(crate) fn observe(&self, result: &Arc<Published>) {
        let generation = self.generation.load(Ordering::SeqCst);
        let series = series_key(&result.query, &result.key);
        // Most writes are of series nobody reads here: one lookup, no lock.
        if !self.series.contains_key(&series) {
            return;
        }
        self.series
            .entry_by_ref(&series)
            .and_compute_with(|entry| match entry {
                Some(entry) if entry.value().generation == generation => {
                    let mut series = entry.into_value();
                    series.latest = newer(series.latest, Some(Arc::clone(result)));
                    Op::Put(series)
                }
                _ => Op::Nop,
            });
    }

    /// Forgets everything: the stream may have missed a write.
    pub(crate) fn clear(&self, why: &'static str) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.series.invalidate_all();
        metrics::counter!("runnel_gateway_cache_clears_total", "why" => why).increment(1);
        tracing::debug!(why, "gateway cache cleared");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use runnel_proto::v1::QueryResult;
    use std::collections::BTreeMap;

    fn version(key: &str, window: i64, sequence: u64, count: f64) -> Arc<Published> {
        Arc::new(Published::new(QueryResult {
            query: "q".into(),
            key: key.into(),
            window_start: Some(Millis(window).into()),
            values: [("count".to_owned(), count)].into(),
            sequence,
            ..Default::default()
        }))
    }

    fn hit(cache: &Latest, key: &str) -> Option<(u64, f64)> {
        match cache.lookup("q", key) {
            Lookup::Hit(p) => Some((p.sequence, p.values["count"])),
            Lookup::Miss(_) => None,
        }
    }

    fn claim(cache: &Latest, key: &str) -> Fill {
        match cache.lookup("q", key) {
            Lookup::Miss(fill) => fill,
            Lookup::Hit(p) => panic!("{key} unexpectedly cached: {p:?}"),
        }
    }

    #[test]
    fn a_series_is_served_after_its_fill_and_follows_the_stream() {
        let cache = Latest::new(1 << 20);
        let fill = claim(&cache, "a");
        assert_eq!(hit(&cache, "a"), None, "claimed but not filled yet");
        cache.fill(fill, Some(version("a", 0, 1, 1.0)));
        assert_eq!(hit(&cache, "a"), Some((1, 1.0)));
        cache.observe(&version("a", 10, 2, 2.0));
        assert_eq!(hit(&cache, "a"), Some((2, 2.0)));
        // A rewrite of an older window is a later write but not the latest window.
        cache.observe(&version("a", 0, 3, 9.0));
        assert_eq!(hit(&cache, "a"), Some((2, 2.0)));
        // Series nobody read are not kept.
        cache.observe(&version("b", 0, 4, 1.0));
        assert_eq!(hit(&cache, "b"), None);
    }

    #[test]
    fn a_write_the_stream_delivers_during_a_fill_is_not_undone_by_it() {
        let cache = Latest::new(1 << 20);
        let fill = claim(&cache, "a");
        cache.observe(&version("a", 0, 5, 5.0));
        // The store answered before it had applied sequence 5.
        let answer = cache.fill(fill, Some(version("a", 0, 4, 4.0)));
        assert_eq!(answer.map(|p| p.sequence), Some(5));
        assert_eq!(hit(&cache, "a"), Some((5, 5.0)));
    }

    #[test]
    fn a_clear_forgets_everything_and_a_fill_from_before_it_completes_nothing() {
        let cache = Latest::new(1 << 20);
        let fill = claim(&cache, "a");
        cache.fill(fill, Some(version("a", 0, 1, 1.0)));
        let late = claim(&cache, "b");
        cache.clear("test");
        assert_eq!(hit(&cache, "a"), None);
        // The fill of "b" began before the clear: the store's answer may be from before a
        // write the stream missed.
        let answer = cache.fill(late, Some(version("b", 0, 2, 2.0)));
        assert_eq!(
            answer.map(|p| p.sequence),
            Some(2),
            "the store's answer is given"
        );
        assert_eq!(hit(&cache, "b"), None);
        // After the clear, writes reach only entries added since.
        cache.observe(&version("a", 10, 3, 3.0));
        assert_eq!(hit(&cache, "a"), None);
    }

    #[test]
    fn a_fill_completes_only_the_entry_it_was_issued_for() {
        let cache = Latest::new(1 << 20);
        let old = claim(&cache, "a");
        // The entry goes (evicted, say) and another miss adds it again: the writes in
        // between reached no entry, and the old fill's answer may predate them.
        cache.series.invalidate(&series_key("q", "a"));
        let new = claim(&cache, "a");
        cache.fill(old, Some(version("a", 0, 1, 1.0)));
        assert_eq!(hit(&cache, "a"), None);
        cache.fill(new, Some(version("a", 0, 2, 2.0)));
        assert_eq!(hit(&cache, "a"), Some((2, 2.0)));
    }

    #[test]
    fn memory_stays_within_its_bound() {
        let max = 64 * 1024;
        let cache = Latest::new(max);
        for i in 0..5_000 {
            let key = format!("key-{i}");
            let fill = claim(&cache, &key);
            cache.fill(fill, Some(version(&key, 0, i + 1, 1.0)));
        }
        cache.series.run_pending_tasks();
        assert!(
            cache.series.weighted_size() <= max,
            "{}",
            cache.series.weighted_size()
        );
        assert!(cache.series.entry_count() < 5_000);
        assert!(cache.series.entry_count() > 0);
    }

    /// One step of a store, a stream and readers interleaved.
    #[derive(Debug, Clone)]
    enum Step {
        /// The store applies a write of key `k`, window `w`.
        Write {
            k: u8,
            w: u8,
        },
        /// The stream delivers the next write the store applied.
        Deliver,
        /// A reader of key `k` looks it up, then (if it missed) the store answers with
        /// everything it has applied (at least up to the stream's position).
        Read {
            k: u8,
        },
        /// A reader's lookup misses; its fill is answered later, with the store as it
        /// was when the lookup happened.
        SlowRead {
            k: u8,
        },
        /// The oldest slow read's answer arrives.
        Answer,
        Evict {
            k: u8,
        },
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            (0..3u8, 0..4u8).prop_map(|(k, w)| Step::Write { k, w }),
            Just(Step::Deliver),
            (0..3u8).prop_map(|k| Step::Read { k }),
            (0..3u8).prop_map(|k| Step::SlowRead { k }),
            Just(Step::Answer),
            (0..3u8).prop_map(|k| Step::Evict { k }),
        ]
    }

    /// The store's latest of `key` after applying `writes`.
    fn store_latest(writes: &[Arc<Published>], key: &str) -> Option<Arc<Published>> {
        writes
            .iter()
            .filter(|w| w.key == key)
            .fold(None, |a, w| newer(a, Some(Arc::clone(w))))
    }

    proptest! {
        /// Whatever the interleaving, an answer is the store's latest as of at least the
        /// stream's position when the read began, and a reader that names the last
        /// sequence it saw never sees a key go back (other readers' fills may be answered
        /// by a store replica behind what it saw).
        #[test]
        fn answers_are_never_older_than_the_stream_position_and_never_go_back(
            steps in proptest::collection::vec(step(), 1..80)
        ) {
            let cache = Latest::new(1 << 20);
            let mut applied: Vec<Arc<Published>> = Vec::new();
            let mut delivered = 0usize;
            let mut slow: std::collections::VecDeque<(Fill, usize, String)> = Default::default();
            let seen: std::cell::RefCell<BTreeMap<String, (i64, u64)>> = Default::default();
            let rank = |p: &Published| (p.window_start.map_or(i64::MIN, |t| Millis::from(t).0), p.sequence);
            // `seen` is one client's, reading synchronously; slow reads are other clients.
            let answered = |key: &str, answer: Option<Arc<Published>>, position: usize, applied: &[Arc<Published>], client: bool| {
                let floor = store_latest(&applied[..position], key);
                let answer_rank = answer.as_deref().map(rank);
                prop_assert!(answer_rank >= floor.as_deref().map(rank), "older than the store at the stream's position");
                if client && let Some(r) = answer_rank {
                    let mut seen = seen.borrow_mut();
                    let before = seen.entry(key.to_owned()).or_insert(r);
                    prop_assert!(r >= *before, "went back");
                    *before = r;
                }
                Ok(())
            };
            for step in steps {
                match step {
                    Step::Write { k, w } => {
                        let sequence = applied.len() as u64 + 1;
                        applied.push(version(&format!("k{k}"), i64::from(w), sequence, sequence as f64));
                    }
                    Step::Deliver => {
                        if delivered < applied.len() {
                            cache.observe(&applied[delivered]);
                            delivered += 1;
                        }
                    }
                    Step::Read { k } => {
                        let key = format!("k{k}");
                        let position = delivered;
                        // The client names the last sequence it saw: until the stream has
                        // delivered it, the read goes to the store (as `Results::get` does
                        // once its wait is over), which answers with at least that.
                        let named = seen.borrow().get(&key).map_or(0, |&(_, sequence)| sequence);
                        let answer = if (delivered as u64) < named {
                            store_latest(&applied, &key)
                        } else {
                            match cache.lookup("q", &key) {
                            Lookup::Hit(p) => Some(p),
                            Lookup::Miss(fill) => {
                                let store = store_latest(&applied, &key);
                                cache.fill(fill, store)
                            }
                            }
                        };
                        answered(&key, answer, position, &applied, true)?;
                    }
                    Step::SlowRead { k } => {
                        let key = format!("k{k}");
                        match cache.lookup("q", &key) {
                            Lookup::Hit(p) => answered(&key, Some(p), delivered, &applied, false)?,
                            // The store answers as of the stream's position after the lookup.
                            Lookup::Miss(fill) => slow.push_back((fill, delivered, key)),
                        }
                    }
                    Step::Answer => {
                        if let Some((fill, position, key)) = slow.pop_front() {
                            let store = store_latest(&applied[..position], &key);
                            let answer = cache.fill(fill, store);
                            answered(&key, answer, position, &applied, false)?;
                        }
                    }
                    Step::Evict { k } => cache.series.invalidate(&series_key("q", &format!("k{k}"))),
                }
            }
        }
    }
}
