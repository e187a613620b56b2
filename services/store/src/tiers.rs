//! The two tiers together — the in-memory data store over long-term storage — and the
//! caching strategies of the reference design, chosen per query:
//!
//! - **write-through**: a `Put` lands in long-term storage and then in the hot tier (the
//!   series' new recent windows, with no expiry: only the memory bound evicts them);
//! - **read-through**: a `Put` lands in long-term storage and marks the hot copy stale; a
//!   read that misses loads the series from long-term storage and keeps it for `ttl`;
//! - **refresh-ahead**: read-through, and a read in the last `refresh_ahead` part of an
//!   entry's `ttl` reloads it in the background, so a key that is read often never
//!   expires under its readers and never pays a miss.
//!
//! Every strategy falls back to long-term storage on a miss, so an evicted or expired
//! series is slower to read, never wrong; and a failing hot tier (Redis down) degrades
//! reads to long-term storage rather than failing them. Rankings (`TopK`) are kept up to
//! date on every write whatever the strategy: they are an index over the most recent
//! window, not a copy of anything a read could load.

use crate::config::{CacheStrategy, HotConfig};
use crate::durable::{Durable, RETENTION_BATCH, Sequences, Series, Written, start_of};
use crate::error::Result;
use crate::hot::{Cached, HotTier, Lookup, Ranking, Scores};
use runnel_proto::Millis;
use runnel_proto::v1::QueryResult;
use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Long-term storage, the hot tier, and how each query uses them.
pub(crate) struct Tiers<H> {
    durable: Arc<Durable>,
    hot: H,
    config: HotConfig,
    /// Series with a refresh-ahead reload in flight, so that a hot key is reloaded once.
    refreshing: Mutex<HashSet<(String, String)>>,
    /// The hot tier owes an invalidation of everything it holds: a write reached neither
    /// it nor its marker (Redis unreachable), so it may hold an older version that no
    /// one knows to drop. Until it is done, this replica reads past the hot tier.
    owed: AtomicBool,
}

/// A query's top keys and their results.
#[derive(Debug)]
pub(crate) struct TopResults {
    /// The ranked window.
    pub(crate) window: (i64, i64),
    /// The value ranked by.
    pub(crate) ranked_by: String,
    /// The keys' results in that window, highest first.
    pub(crate) results: Vec<QueryResult>,
}

/// What a query's deletion did ([`Tiers::delete_query`]).
#[derive(Debug, Default)]
pub(crate) struct Deleted {
    /// The deletion's sequence.
    pub(crate) sequence: u64,
    /// Results deleted.
    pub(crate) results: u64,
    /// Whether this call applied the deletion (false: it was applied already).
    pub(crate) applied: bool,
}

/// How often a replica that owes the hot tier an invalidation tries to pay it.
pub(crate) const SETTLE_INTERVAL: Duration = Duration::from_millis(250);

fn hot_failed(error: &crate::error::StoreError) {
    metrics::counter!("runnel_store_hot_errors_total").increment(1);
    tracing::warn!(%error, "hot tier failed; serving from long-term storage");
}

impl<H: HotTier> Tiers<H> {
    pub(crate) fn new(durable: Arc<Durable>, hot: H, config: HotConfig) -> Arc<Self> {
        Arc::new(Tiers {
            durable,
            hot,
            config,
            refreshing: Mutex::new(HashSet::new()),
            owed: AtomicBool::new(false),
        })
    }

    pub(crate) fn durable(&self) -> &Arc<Durable> {
        &self.durable
    }

    /// Notes that the hot tier is owed an invalidation of everything it holds (see
    /// [`Tiers::settle`]): after a write that reached neither it nor its marker, and at
    /// start — a replica cannot know whether it stopped owing one.
    pub(crate) fn owe_invalidation(&self) {
        self.owed.store(true, Ordering::Release);
    }

    /// Pays the invalidation the hot tier is owed, if it is owed one and answers: true
    /// when nothing is owed (any more). The store calls it at start and then every
    /// [`SETTLE_INTERVAL`]; reads go past the hot tier meanwhile.
    pub(crate) async fn settle(&self) -> bool {
        if !self.owed.load(Ordering::Acquire) {
            return true;
        }
        match self.hot.invalidate_all().await {
            Ok(()) => {
                self.owed.store(false, Ordering::Release);
                tracing::info!(
                    "hot tier invalidated: what it held before is read from long-term storage again"
                );
                true
            }
            Err(error) => {
                hot_failed(&error);
                false
            }
        }
    }

    fn ttl(&self, query: &str) -> Option<Duration> {
        match self.config.strategy(query) {
            CacheStrategy::WriteThrough => None,
            CacheStrategy::ReadThrough | CacheStrategy::RefreshAhead => Some(self.config.ttl),
        }
    }

    /// Writes validated results to long-term storage, then — with `hot` — brings the hot
    /// tier and the rankings up to date. The caller serialises writes.
    ///
    /// A replica catching up with the results log writes without `hot`: it answers no reads
    /// until it has caught up, then ranks from disk ([`Tiers::rank_from_disk`]), and loads
    /// series on demand; so it never puts an old state of a series or a ranking into a hot
    /// tier that other replicas share.
    pub(crate) async fn put(
        &self,
        results: Vec<QueryResult>,
        sequences: Sequences,
        hot: bool,
    ) -> Result<Written> {
        let durable = Arc::clone(&self.durable);
        let history = hot.then_some(self.config.history);
        let written =
            tokio::task::spawn_blocking(move || durable.put(results, sequences, history)).await??;
        if hot {
            self.update_hot(&written).await;
        }
        Ok(written)
    }

    /// Brings the hot tier and the rankings up to date with a write.
    async fn update_hot(&self, written: &Written) {
        for series in &written.series {
            let Some(latest) = series.latest() else {
                continue;
            };
            let (query, key) = (latest.query.as_str(), latest.key.as_str());
            let updated = match self.config.strategy(query) {
                CacheStrategy::WriteThrough => {
                    match self.hot.store(query, key, series.clone(), None).await {
                        Ok(()) => Ok(()),
                        // The hot tier may still hold an older version of the series (Redis
                        // at `maxmemory` with `noeviction` refuses the write but takes the
                        // marker): drop it, remembering this version so that no older fill
                        // comes back, rather than let reads serve a result older than
                        // long-term storage.
                        Err(error) => {
                            hot_failed(&error);
                            self.hot
                                .forget(query, key, series.version, self.config.ttl)
                                .await
                        }
                    }
                }
                CacheStrategy::ReadThrough | CacheStrategy::RefreshAhead => {
                    self.hot
                        .forget(query, key, series.version, self.config.ttl)
                        .await
                }
            };
            if let Err(error) = updated {
                // Neither the write nor its marker arrived: the older version may still be
                // held. Everything held is invalidated once the hot tier answers again.
                hot_failed(&error);
                self.owe_invalidation();
            }
        }
        // Rankings, window by window in time order, so the newest window ends up ranked.
        let mut windows: BTreeMap<(&str, i64), Scores> = BTreeMap::new();
        for result in &written.results {
            let Some(&value) = result.values.get(self.config.rank_by(&result.query)) else {
                continue;
            };
            let start = start_of(result);
            let end = result.window_end.map(Millis::from).unwrap_or_default().0;
            let scores = windows
                .entry((result.query.as_str(), start))
                .or_insert_with(|| Scores {
                    window: (start, end),
                    keys: Vec::new(),
                    version: 0,
                });
            scores.keys.push((result.key.clone(), value));
            scores.version = scores.version.max(result.sequence);
        }
        for ((query, _), scores) in windows {
            if let Err(error) = self.hot.rank(query, scores, self.config.top_keys).await {
                hot_failed(&error);
            }
        }
    }

    /// The series of `query` and `key`: from the hot tier, or loaded from long-term storage
    /// (and kept hot, per the query's strategy).
    async fn series(self: &Arc<Self>, query: &str, key: &str) -> Result<Arc<Series>> {
        if self.owed.load(Ordering::Acquire) {
            return Ok(Arc::new(self.load(query, key).await?));
        }
        match self.hot.series(query, key).await {
            Ok(Lookup::Hit(cached)) => {
                self.refresh_if_due(query, key, &cached);
                return Ok(cached.series);
            }
            Ok(Lookup::Miss | Lookup::Stale) => {}
            Err(error) => {
                hot_failed(&error);
                return Ok(Arc::new(self.load(query, key).await?));
            }
        }
        let series = self.load(query, key).await?;
        if series.version > 0
            && let Err(error) = self
                .hot
                .store(query, key, series.clone(), self.ttl(query))
                .await
        {
            hot_failed(&error);
        }
        Ok(Arc::new(series))
    }

    async fn load(&self, query: &str, key: &str) -> Result<Series> {
        let durable = Arc::clone(&self.durable);
        let (query, key) = (query.to_owned(), key.to_owned());
        let history = self.config.history;
        tokio::task::spawn_blocking(move || durable.series(&query, &key, history)).await?
    }

    /// Refresh-ahead: reloads a series read close to its expiry, in the background.
    fn refresh_if_due(self: &Arc<Self>, query: &str, key: &str, cached: &Cached) {
        if self.config.strategy(query) != CacheStrategy::RefreshAhead {
            return;
        }
        let Some(left) = cached.expires_in else {
            return;
        };
        if left.as_secs_f64() > self.config.ttl.as_secs_f64() * self.config.refresh_ahead {
            return;
        }
        let id = (query.to_owned(), key.to_owned());
        let claimed = self
            .refreshing
            .lock()
            .is_ok_and(|mut refreshing| refreshing.insert(id.clone()));
        if !claimed {
            return;
        }
        let tiers = Arc::clone(self);
        tokio::spawn(async move {
            let (query, key) = (&id.0, &id.1);
            let refreshed = match tiers.load(query, key).await {
                Ok(series) => {
                    tiers
                        .hot
                        .store(query, key, series, Some(tiers.config.ttl))
                        .await
                }
                Err(error) => Err(error),
            };
            match refreshed {
                Ok(()) => metrics::counter!("runnel_store_hot_refreshes_total").increment(1),
                Err(error) => hot_failed(&error),
            }
            if let Ok(mut refreshing) = tiers.refreshing.lock() {
                refreshing.remove(&id);
            }
        });
    }

    /// The result with the greatest window start for `query` and `key`.
    pub(crate) async fn latest(
        self: &Arc<Self>,
        query: &str,
        key: &str,
    ) -> Result<Option<QueryResult>> {
        Ok(self.series(query, key).await?.latest().cloned())
    }

    /// Results for `query` and `key` whose window starts in `[from, to)`: from the hot
    /// tier when its recent windows cover the range, else from long-term storage.
    pub(crate) async fn range(
        self: &Arc<Self>,
        query: &str,
        key: &str,
        from: i64,
        to: i64,
        limit: usize,
    ) -> Result<Vec<QueryResult>> {
        if let Some(results) = self.series(query, key).await?.range(from, to, limit) {
            return Ok(results);
        }
        metrics::counter!("runnel_store_range_from_disk_total").increment(1);
        let durable = Arc::clone(&self.durable);
        let (query, key) = (query.to_owned(), key.to_owned());
        tokio::task::spawn_blocking(move || durable.range(&query, &key, from, to, limit)).await?
    }

    /// The top `k` keys of `query`'s most recent window and their results there.
    pub(crate) async fn top_k(
        self: &Arc<Self>,
        query: &str,
        k: usize,
    ) -> Result<Option<TopResults>> {
        let Some(Ranking { window, top }) = self.hot.top(query, k).await? else {
            return Ok(None);
        };
        let mut results = Vec::with_capacity(top.len());
        for (key, _) in top {
            let series = self.series(query, &key).await?;
            if let Some(result) = series
                .results
                .iter()
                .rev()
                .find(|r| start_of(r) == window.0)
            {
                results.push(result.clone());
            }
        }
        if results.is_empty() {
            // Ranked keys none of which has a result in the window any more (deleted since,
            // by retention or the query's deletion): no results.
            return Ok(None);
        }
        Ok(Some(TopResults {
            window,
            ranked_by: self.config.rank_by(query).to_owned(),
            results,
        }))
    }

    /// Ranks every query's most recent window from long-term storage: after a start, so
    /// that `TopK` answers before the next write (an in-process hot tier starts empty).
    pub(crate) async fn rank_from_disk(&self) -> Result<()> {
        let durable = Arc::clone(&self.durable);
        let newest = tokio::task::spawn_blocking(move || {
            durable
                .queries()?
                .into_iter()
                .filter_map(|query| {
                    durable
                        .newest_window(&query)
                        .transpose()
                        .map(|w| (query, w))
                })
                .map(|(query, window)| window.map(|w| (query, w)))
                .collect::<Result<Vec<_>>>()
        })
        .await??;
        for (query, (start, results)) in newest {
            let rank_by = self.config.rank_by(&query);
            let end = results
                .first()
                .and_then(|r| r.window_end)
                .map(Millis::from)
                .unwrap_or_default()
                .0;
            let keys = results
                .iter()
                .filter_map(|r| Some((r.key.clone(), *r.values.get(rank_by)?)))
                .collect();
            let version = results.iter().map(|r| r.sequence).max().unwrap_or_default();
            self.hot
                .rank(
                    &query,
                    Scores {
                        window: (start, end),
                        keys,
                        version,
                    },
                    self.config.top_keys,
                )
                .await?;
        }
        Ok(())
    }

    /// Deletes every result of `query` from long-term storage, in bounded transactions,
    /// and — with `hot` — from the hot tier: each series it had is forgotten with the
    /// deletion's sequence as its version (so no fill from before the deletion brings it
    /// back, and the query's next writes are taken), and its ranking is dropped. The
    /// caller serialises writes. Without `hot` (a replica catching up) the hot tier is left
    /// alone, as by [`Tiers::put`].
    pub(crate) async fn delete_query(
        &self,
        query: &str,
        given: Option<u64>,
        hot: bool,
    ) -> Result<Deleted> {
        let mut deleted = Deleted::default();
        loop {
            let durable = Arc::clone(&self.durable);
            let name = query.to_owned();
            let batch = tokio::task::spawn_blocking(move || {
                durable.delete_query(&name, given, RETENTION_BATCH, hot)
            })
            .await??;
            deleted.results += batch.results;
            deleted.sequence = batch.sequence;
            deleted.applied = batch.applied;
            if hot {
                for key in &batch.keys {
                    let forgotten = self
                        .hot
                        .forget(query, key, batch.sequence, self.config.ttl)
                        .await;
                    if let Err(error) = forgotten {
                        // The series may still be held: everything held is invalidated once
                        // the hot tier answers again.
                        hot_failed(&error);
                        self.owe_invalidation();
                    }
                }
            }
            if batch.done {
                break;
            }
        }
        if hot && let Err(error) = self.hot.drop_ranking(query, deleted.sequence).await {
            // A ranking left behind names keys without results: `TopK` answers none.
            hot_failed(&error);
        }
        Ok(deleted)
    }

    /// Forgets series whose windows retention deleted, so reads reload what is left.
    pub(crate) async fn forget_expired(&self, series: impl IntoIterator<Item = (String, String)>) {
        for (query, key) in series {
            // `u64::MAX`: no fill from before the deletion may bring the windows back; the
            // marker ends with the ttl, after which reads load from disk.
            if let Err(error) = self
                .hot
                .forget(&query, &key, u64::MAX, self.config.ttl)
                .await
            {
                hot_failed(&error);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hot::Memory;
    use runnel_log::FsyncPolicy;

    fn result(key: &str, start: i64, count: f64) -> QueryResult {
        QueryResult {
            query: "q".into(),
            key: key.into(),
            window_start: Some(Millis(start).into()),
            window_end: Some(Millis(start + 10).into()),
            values: [("count".to_owned(), count)].into(),
            ..Default::default()
        }
    }

    fn tiers(dir: &std::path::Path, configure: impl FnOnce(&mut HotConfig)) -> Arc<Tiers<Memory>> {
        tiers_over(dir, Memory::new(1 << 20), configure)
    }

    fn tiers_over<H: HotTier>(
        dir: &std::path::Path,
        hot: H,
        configure: impl FnOnce(&mut HotConfig),
    ) -> Arc<Tiers<H>> {
        let durable = Arc::new(
            Durable::open(
                dir,
                FsyncPolicy::Never,
                1000,
                crate::durable::Sequencing::Local,
            )
            .unwrap(),
        );
        let mut config = HotConfig::default();
        configure(&mut config);
        Tiers::new(durable, hot, config)
    }

    async fn lookup(tiers: &Tiers<Memory>, key: &str) -> Lookup {
        tiers.hot.series("q", key).await.unwrap()
    }

    #[tokio::test]
    async fn write_through_puts_land_in_the_hot_tier() {
        let dir = tempfile::tempdir().unwrap();
        let tiers = tiers(dir.path(), |_| {});
        tiers
            .put(vec![result("k", 0, 1.0)], Sequences::Assign, true)
            .await
            .unwrap();
        match lookup(&tiers, "k").await {
            Lookup::Hit(cached) => {
                assert_eq!(cached.series.latest().unwrap().values["count"], 1.0);
                assert_eq!(
                    cached.expires_in, None,
                    "write-through entries do not expire"
                );
            }
            other => panic!("expected a hit, got {other:?}"),
        }
    }

    /// A hot tier that refuses new series (as Redis at `maxmemory` with `noeviction` does)
    /// while it still serves what it holds and takes markers.
    struct RefusesWrites {
        inner: Memory,
        refuse: std::sync::atomic::AtomicBool,
    }

    impl HotTier for RefusesWrites {
        async fn series(&self, query: &str, key: &str) -> Result<Lookup> {
            self.inner.series(query, key).await
        }

        async fn store(
            &self,
            query: &str,
            key: &str,
            series: Series,
            ttl: Option<Duration>,
        ) -> Result<()> {
            if self.refuse.load(std::sync::atomic::Ordering::Relaxed) {
                return Err(crate::error::StoreError::Hot(
                    "OOM command not allowed when used memory > 'maxmemory'".into(),
                ));
            }
            self.inner.store(query, key, series, ttl).await
        }

        async fn forget(&self, query: &str, key: &str, version: u64, ttl: Duration) -> Result<()> {
            self.inner.forget(query, key, version, ttl).await
        }

        async fn invalidate_all(&self) -> Result<()> {
            self.inner.invalidate_all().await
        }

        async fn rank(&self, query: &str, scores: Scores, keep: usize) -> Result<()> {
            self.inner.rank(query, scores, keep).await
        }

        async fn drop_ranking(&self, query: &str, version: u64) -> Result<()> {
            self.inner.drop_ranking(query, version).await
        }

        async fn top(&self, query: &str, k: usize) -> Result<Option<Ranking>> {
            self.inner.top(query, k).await
        }
    }

    /// A write-through the hot tier refuses must not leave the older version it holds to
    /// be served: reads go to long-term storage until the hot tier takes writes again.
    #[tokio::test]
    async fn a_refused_write_through_never_leaves_an_older_result_to_serve() {
        let dir = tempfile::tempdir().unwrap();
        let hot = RefusesWrites {
            inner: Memory::new(1 << 20),
            refuse: std::sync::atomic::AtomicBool::new(false),
        };
        let tiers = tiers_over(dir.path(), hot, |_| {});
        let refuse = |on| {
            tiers
                .hot
                .refuse
                .store(on, std::sync::atomic::Ordering::Relaxed)
        };
        tiers
            .put(vec![result("k", 0, 1.0)], Sequences::Assign, true)
            .await
            .unwrap();
        refuse(true);
        tiers
            .put(vec![result("k", 0, 2.0)], Sequences::Assign, true)
            .await
            .expect("long-term storage took it");
        let latest = tiers.latest("q", "k").await.unwrap().unwrap();
        assert_eq!(latest.values["count"], 2.0, "not the older hot result");
        refuse(false);
        tiers
            .put(vec![result("k", 10, 3.0)], Sequences::Assign, true)
            .await
            .unwrap();
        let latest = tiers.latest("q", "k").await.unwrap().unwrap();
        assert_eq!(latest.values["count"], 3.0);
    }

    #[tokio::test]
    async fn read_through_loads_on_the_first_read_and_keeps_it_for_the_ttl() {
        let dir = tempfile::tempdir().unwrap();
        let tiers = tiers(dir.path(), |c| c.strategy = CacheStrategy::ReadThrough);
        tiers
            .put(vec![result("k", 0, 1.0)], Sequences::Assign, true)
            .await
            .unwrap();
        assert!(matches!(lookup(&tiers, "k").await, Lookup::Stale));
        let latest = tiers.latest("q", "k").await.unwrap().unwrap();
        assert_eq!(latest.values["count"], 1.0);
        match lookup(&tiers, "k").await {
            Lookup::Hit(cached) => assert!(cached.expires_in.unwrap() <= tiers.config.ttl),
            other => panic!("expected a hit after the read, got {other:?}"),
        }
        // A write makes the hot copy stale again; the next read sees the write.
        tiers
            .put(vec![result("k", 10, 2.0)], Sequences::Assign, true)
            .await
            .unwrap();
        assert!(matches!(lookup(&tiers, "k").await, Lookup::Stale));
        assert_eq!(
            tiers.latest("q", "k").await.unwrap().unwrap().values["count"],
            2.0
        );
    }

    #[tokio::test]
    async fn refresh_ahead_reloads_a_key_read_near_its_expiry() {
        let dir = tempfile::tempdir().unwrap();
        let tiers = tiers(dir.path(), |c| {
            c.strategy = CacheStrategy::RefreshAhead;
            c.ttl = Duration::from_secs(60);
            // Every read is "near expiry": the test needs no clock.
            c.refresh_ahead = 0.999_999;
        });
        tiers
            .put(vec![result("k", 0, 1.0)], Sequences::Assign, true)
            .await
            .unwrap();
        assert_eq!(
            tiers.latest("q", "k").await.unwrap().unwrap().values["count"],
            1.0
        );
        // A write the hot tier does not hear of (as from another replica's long-term
        // storage): only a reload can bring it in.
        tiers
            .durable
            .put(vec![result("k", 0, 2.0)], Sequences::Assign, Some(16))
            .unwrap();
        // The read is served from the hot tier (the old value) and reloads it behind.
        assert_eq!(
            tiers.latest("q", "k").await.unwrap().unwrap().values["count"],
            1.0
        );
        let refreshed = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if let Lookup::Hit(cached) = lookup(&tiers, "k").await
                    && cached.series.latest().unwrap().values["count"] == 2.0
                {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        assert!(refreshed.is_ok(), "the entry was never refreshed");
    }
}
