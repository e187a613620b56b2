//! Long-term storage: every result in one [redb](https://docs.rs/redb) database file,
//! `<data_dir>/results.redb`.
//!
//! redb is an embedded, copy-on-write B-tree store with ACID transactions: a commit with
//! `Durability::Immediate` is fsync'd before it returns and a crash at any point leaves the
//! file at the last durable commit (it checks and repairs itself on open), so an
//! acknowledged `Put` survives `kill -9`. Its B-trees keep keys in order, which is what a
//! store of windowed results needs: every read here is a range scan by key and time.
//!
//! Tables (keys in order):
//!
//! | table | key | value | serves |
//! |---|---|---|---|
//! | `results` | `(query, key, window_start)` | the protobuf `QueryResult` | `Get`, `Range`, a key's recent history |
//! | `windows` | `(query, window_start, key)` | sequence | a query's most recent window (`TopK` after a restart), retention |
//! | `feed` | sequence | `(query, key, window_start)` | the change feed: `Watch` resumes after a sequence |
//! | `series` | `(query, key)` | sequence of the series' last write | versions for the hot tier |
//! | `queries` | query | its greatest window start | the queries there are |
//! | `meta` | name | u64 | the next sequence |
//!
//! Every write gets the next sequence; writing `(query, key, window_start)` again replaces
//! the result and gives it a new sequence. Who numbers writes is fixed for a database's
//! life ([`Sequencing`]): the store itself (one replica, no broker), or the results log in
//! the broker (a result's sequence is its log offset + 1, the same on every replica; the
//! last sequence applied is then also where to read the log on from, committed in the same
//! transaction as the results it covers). The feed keeps the last `feed_entries` writes; an
//! entry whose result was rewritten since (or deleted by retention, or by its query's
//! deletion) is skipped when read, as the later write has its own entry.
//!
//! A query's deletion (`DeleteQuery`) removes its rows from `results`, `windows`, `series`
//! and `queries` in bounded transactions, and takes a sequence of its own (with a broker: its
//! tombstone's offset + 1), applied by the last of them; it has no feed entry.
//!
//! [`Durable`] is synchronous and does disk I/O: call it from blocking threads only.

use crate::error::{Result, StoreError};
use prost::Message;
use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition,
};
use runnel_log::FsyncPolicy;
use runnel_proto::Millis;
use runnel_proto::v1::QueryResult;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// The database's file name inside the data directory.
pub(crate) const DATABASE_FILE: &str = "results.redb";
/// The result log of the store's first version, which this one does not read.
const OLD_RESULT_LOG: &str = "results.log";

/// How often a replica's view of the results log is made durable under `fsync = "always"`
/// (its commits are not fsync'd one by one: the log is what is durable). It bounds how much
/// of the log a replica reads again after a crash.
const VIEW_SYNC_INTERVAL: Duration = Duration::from_secs(1);

const RESULTS: TableDefinition<(&str, &str, i64), &[u8]> = TableDefinition::new("results");
const WINDOWS: TableDefinition<(&str, i64, &str), u64> = TableDefinition::new("windows");
const FEED: TableDefinition<u64, (&str, &str, i64)> = TableDefinition::new("feed");
const SERIES: TableDefinition<(&str, &str), u64> = TableDefinition::new("series");
const QUERIES: TableDefinition<&str, i64> = TableDefinition::new("queries");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const NEXT_SEQUENCE: &str = "next_sequence";
/// Present (1) in a database whose sequences come from the results log.
const LOG_SEQUENCED: &str = "log_sequenced";

/// Who numbers the results of a database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Sequencing {
    /// The store: each write gets the next sequence (one replica, no broker).
    Local,
    /// The results log: results arrive with their sequences (log offset + 1).
    Log,
}

/// How a write's results get their sequences.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Sequences {
    /// Number them from the next sequence on ([`Sequencing::Local`]).
    Assign,
    /// They carry them, increasing ([`Sequencing::Log`]); any at or below the last
    /// sequence applied is already applied and skipped.
    Given,
}

/// Results deleted in one transaction, by retention or a query's deletion, so that a large
/// backlog or query does not make one huge commit (nor hold its keys in memory at once).
pub(crate) const RETENTION_BATCH: usize = 10_000;

/// The recent windows of one `(query, key)`, as the hot tier holds them.
#[derive(Clone, PartialEq, Message)]
pub(crate) struct Series {
    /// The sequence of the series' last write: a hot copy is replaced only by a newer one.
    #[prost(uint64, tag = "1")]
    pub(crate) version: u64,
    /// Every window of the series that starts at or after this is in `results`
    /// (`i64::MIN`: the whole series is).
    #[prost(int64, tag = "2")]
    pub(crate) complete_from: i64,
    /// The most recent windows, oldest first.
    #[prost(message, repeated, tag = "3")]
    pub(crate) results: Vec<QueryResult>,
}

impl Series {
    /// The result with the greatest window start.
    pub(crate) fn latest(&self) -> Option<&QueryResult> {
        self.results.last()
    }

    /// Results whose window starts in `[from, to)`, if the series holds all of them.
    pub(crate) fn range(&self, from: i64, to: i64, limit: usize) -> Option<Vec<QueryResult>> {
        (from >= self.complete_from).then(|| {
            self.results
                .iter()
                .filter(|r| (from..to).contains(&start_of(r)))
                .take(limit)
                .cloned()
                .collect()
        })
    }

    /// Bytes held, for the hot tier's memory bound.
    pub(crate) fn weight(&self) -> u32 {
        u32::try_from(self.encoded_len()).unwrap_or(u32::MAX)
    }
}

/// What one `Put` wrote.
#[derive(Debug)]
pub(crate) struct Written {
    /// The results as stored, sequences set, in write order. A result that changed
    /// nothing (see [`supersedes`]) is not among them.
    pub(crate) results: Vec<Arc<QueryResult>>,
    /// The last sequence applied: the last of `results`, or past it when results at the
    /// end changed nothing (a log position applied all the same).
    pub(crate) applied: u64,
    /// The new state of every series the write touched.
    pub(crate) series: Vec<Series>,
}

/// What a retention pass deleted.
#[derive(Debug, Default)]
pub(crate) struct Expired {
    /// Results deleted.
    pub(crate) results: u64,
    /// The series they belonged to, for the hot tier to forget.
    pub(crate) series: BTreeSet<(String, String)>,
}

/// What one transaction of a query's deletion ([`Durable::delete_query`]) did.
#[derive(Debug)]
pub(crate) struct DeletedBatch {
    /// The deletion's sequence: given by the results log, or the next one.
    pub(crate) sequence: u64,
    /// Results deleted by this transaction.
    pub(crate) results: u64,
    /// The keys whose series lost results, for the hot tier to forget.
    pub(crate) keys: BTreeSet<String>,
    /// Whether the deletion is complete: the query has no result left, the `queries` table
    /// no longer lists it, and its sequence is applied. Also true, with nothing deleted,
    /// for a deletion applied already.
    pub(crate) done: bool,
    /// Whether this call applied the deletion's sequence (false: applied already).
    pub(crate) applied: bool,
}

/// A page of the change feed.
#[derive(Debug)]
pub(crate) struct FeedPage {
    /// Results written after the cursor, in sequence order, still current.
    pub(crate) results: Vec<Arc<QueryResult>>,
    /// The last sequence this page covers (the cursor to read on from).
    pub(crate) through: u64,
}

/// The database.
#[derive(Debug)]
pub(crate) struct Durable {
    path: PathBuf,
    /// A read lock for every transaction; the write lock only for compaction, which needs
    /// the database to itself.
    db: RwLock<Database>,
    durability: Durability,
    /// How often [`Durable::sync`] must run to make the commits durable that
    /// `durability` does not; `None`: every commit is, or only the clean shutdown syncs.
    sync_every: Option<Duration>,
    feed_entries: u64,
}

/// Whether `incoming` is a newer version of the window whose version `held` is stored:
/// it differs, and — when both come from the analyzer — it is not older (a replay sends a
/// window's older versions again, with the smaller input offsets they had; at one offset, a
/// partial version is older than the final one).
pub(crate) fn supersedes(held: &QueryResult, incoming: &QueryResult) -> bool {
    let differs = held.values != incoming.values
        || held.items != incoming.items
        || held.partial != incoming.partial;
    let age = |r: &QueryResult| (r.input_offset, !r.partial);
    let older = incoming.input_offset != 0 && age(incoming) < age(held);
    differs && !older
}

pub(crate) fn start_of(result: &QueryResult) -> i64 {
    result.window_start.map(Millis::from).unwrap_or_default().0
}

/// Whether the `a`th and `b`th of `results` are of one series, `(query, key)`.
fn same_series(results: &[QueryResult], a: usize, b: usize) -> bool {
    (&results[a].query, &results[a].key) == (&results[b].query, &results[b].key)
}

/// A result as stored in the `results` table.
fn stored_result(bytes: &[u8]) -> std::result::Result<QueryResult, redb::Error> {
    QueryResult::decode(bytes)
        .map_err(|e| redb::Error::Corrupted(format!("a stored result does not decode: {e}")))
}

/// Whether the `a`th and `b`th of `results` (their starts in `starts`) are one window.
fn same_window(results: &[QueryResult], starts: &[i64], a: usize, b: usize) -> bool {
    window_of(results, starts, a) == window_of(results, starts, b)
}

/// The window the `i`th of `results` is a version of, its start given in `starts`: its key
/// in the `results` table.
fn window_of<'a>(results: &'a [QueryResult], starts: &[i64], i: usize) -> (&'a str, &'a str, i64) {
    let result = &results[i];
    (result.query.as_str(), result.key.as_str(), starts[i])
}

impl Durable {
    /// Opens (creating if needed) `dir/results.redb`, recovering it after a crash. A
    /// database numbered one way is refused when opened for the other: its sequences would
    /// not be the log's (or the other way round), and watchers' cursors would point at the
    /// wrong results.
    pub(crate) fn open(
        dir: &Path,
        policy: FsyncPolicy,
        feed_entries: u64,
        sequencing: Sequencing,
    ) -> Result<Durable> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::Io {
            path: dir.to_owned(),
            source,
        })?;
        let old_log = dir.join(OLD_RESULT_LOG);
        if old_log.exists() {
            // The walking skeleton's format; nothing here reads it any more.
            tracing::warn!(
                path = %old_log.display(),
                "this result log from an earlier version of the store is not read; results are in results.redb"
            );
        }
        let path = dir.join(DATABASE_FILE);
        let db = Database::create(&path).map_err(|e| StoreError::db(&path, e))?;
        // What each commit makes durable, and how often a background `sync` does the rest.
        let (durability, sync_every) = match (policy, sequencing) {
            (FsyncPolicy::Always, Sequencing::Local) => (Durability::Immediate, None),
            // A view of the results log commits without fsync: the log is what is durable (a
            // `Put` is acknowledged after the broker's DURABLE ack), and the applied position
            // is committed with the results, so after a crash the view reads the log on from
            // its last durable commit and applies the same results with the same sequences
            // again. Syncing it every `VIEW_SYNC_INTERVAL` only bounds how much of the log a
            // restart reads again.
            (FsyncPolicy::Always, Sequencing::Log) => (Durability::None, Some(VIEW_SYNC_INTERVAL)),
            // An interval policy commits without fsync and syncs at its interval; `never`
            // leaves it to the clean shutdown.
            (FsyncPolicy::Interval(every), _) => (Durability::None, Some(every)),
            (FsyncPolicy::Never, _) => (Durability::None, None),
        };
        let durable = Durable {
            path,
            db: RwLock::new(db),
            durability,
            sync_every,
            feed_entries,
        };
        // Create every table, so that readers never meet a missing one.
        durable.write(Durability::Immediate, |txn| {
            txn.open_table(RESULTS)?;
            txn.open_table(WINDOWS)?;
            txn.open_table(FEED)?;
            txn.open_table(SERIES)?;
            txn.open_table(QUERIES)?;
            txn.open_table(META)?;
            Ok(())
        })?;
        let (results, next, log_sequenced) = durable.read(|txn| {
            let results = txn.open_table(RESULTS)?.len()?;
            let meta = txn.open_table(META)?;
            let next = meta.get(NEXT_SEQUENCE)?.map(|v| v.value());
            let log_sequenced = meta.get(LOG_SEQUENCED)?.is_some();
            Ok((results, next.unwrap_or(1), log_sequenced))
        })?;
        match (sequencing, log_sequenced) {
            (Sequencing::Local, true) => {
                return Err(StoreError::Incompatible {
                    path: durable.path.clone(),
                    reason: "it holds results materialised from the broker's results log; set store.broker, or start from an empty data directory".into(),
                });
            }
            (Sequencing::Log, false) if next > 1 => {
                return Err(StoreError::Incompatible {
                    path: durable.path.clone(),
                    reason: "it holds results numbered by a store without a broker, whose sequences are not the results log's; move it away and let this replica rebuild from the log".into(),
                });
            }
            (Sequencing::Log, false) => durable.write(Durability::Immediate, |txn| {
                txn.open_table(META)?.insert(LOG_SEQUENCED, 1)?;
                Ok(())
            })?,
            _ => {}
        }
        tracing::info!(path = %durable.path.display(), results, next_sequence = next, "long-term storage open");
        Ok(durable)
    }

    fn database(&self) -> Result<std::sync::RwLockReadGuard<'_, Database>> {
        self.db.read().map_err(|_| StoreError::Failed)
    }

    fn read<T>(
        &self,
        f: impl FnOnce(&redb::ReadTransaction) -> std::result::Result<T, redb::Error>,
    ) -> Result<T> {
        let db = self.database()?;
        let txn = db.begin_read().map_err(|e| StoreError::db(&self.path, e))?;
        f(&txn).map_err(|e| StoreError::db(&self.path, e))
    }

    fn write<T>(
        &self,
        durability: Durability,
        f: impl FnOnce(&redb::WriteTransaction) -> std::result::Result<T, redb::Error>,
    ) -> Result<T> {
        let db = self.database()?;
        let mut txn = db
            .begin_write()
            .map_err(|e| StoreError::db(&self.path, e))?;
        txn.set_durability(durability)
            .map_err(|e| StoreError::db(&self.path, e))?;
        let value = f(&txn).map_err(|e| StoreError::db(&self.path, e))?;
        txn.commit().map_err(|e| StoreError::db(&self.path, e))?;
        Ok(value)
    }

    /// Writes `results` (validated) in one transaction, committed per the fsync policy
    /// (without `history`: not made durable, see below), and returns them with their
    /// sequences and — with `history` — the new state of each series they touched, with at
    /// most `history` windows each.
    ///
    /// A replica catching up with the results log writes without `history` (it serves
    /// nothing yet) and calls [`Durable::sync`] once caught up: a crash before that takes
    /// it back to its last durable commit, whose applied position it then reads the log
    /// from again, so deferring the fsyncs loses nothing.
    pub(crate) fn put(
        &self,
        mut results: Vec<QueryResult>,
        sequences: Sequences,
        history: Option<usize>,
    ) -> Result<Written> {
        let feed_entries = self.feed_entries;
        let durability = match history {
            Some(_) => self.durability,
            None => Durability::None,
        };
        self.write(durability, move |txn| {
            let mut meta = txn.open_table(META)?;
            let mut next = meta.get(NEXT_SEQUENCE)?.map_or(1, |v| v.value());
            if sequences == Sequences::Given {
                results.retain(|result| result.sequence >= next);
                if results.is_empty() {
                    return Ok(Written {
                        results: Vec::new(),
                        applied: next - 1,
                        series: Vec::new(),
                    });
                }
            }
            let mut stored = txn.open_table(RESULTS)?;
            let mut windows = txn.open_table(WINDOWS)?;
            let mut feed = txn.open_table(FEED)?;
            let mut series = txn.open_table(SERIES)?;
            let mut queries = txn.open_table(QUERIES)?;
            let starts: Vec<i64> = results.iter().map(start_of).collect();
            // The batch in window order — `(query, key, window_start)`, then write order — so
            // that every lookup and write below walks the B-trees in key order, touching each
            // page once rather than jumping about (what makes a replica's catch-up fast), and
            // a window's versions in the batch sit together.
            let mut order: Vec<usize> = (0..results.len()).collect();
            order.sort_unstable_by(|&a, &b| {
                window_of(&results, &starts, a)
                    .cmp(&window_of(&results, &starts, b))
                    .then(a.cmp(&b))
            });
            // Which results are new: each supersedes the stored version of its window, or
            // the last new one before it in this batch. Series by series, the stored versions
            // of the windows a series has in the batch are read in one ordered scan (a
            // catching-up replica writes many windows of each series per batch), unless the
            // series holds many more windows in that span than the batch: those are looked
            // up one by one.
            let mut news = vec![false; results.len()];
            for in_series in order.chunk_by(|&a, &b| same_series(&results, a, b)) {
                let (query, key, first) = window_of(&results, &starts, in_series[0]);
                let last = starts[in_series[in_series.len() - 1]];
                let mut scan = stored.range((query, key, first)..=(query, key, last))?;
                let mut pending = scan.next().transpose()?;
                let mut skips = in_series.len();
                for versions in in_series.chunk_by(|&a, &b| same_window(&results, &starts, a, b)) {
                    let start = starts[versions[0]];
                    let held = loop {
                        let Some((window, bytes)) = &pending else {
                            break None;
                        };
                        let held_start = window.value().2;
                        if held_start == start {
                            break Some(stored_result(bytes.value())?);
                        }
                        if held_start > start {
                            break None;
                        }
                        if skips == 0 {
                            break stored
                                .get((query, key, start))?
                                .map(|bytes| stored_result(bytes.value()))
                                .transpose()?;
                        }
                        skips -= 1;
                        pending = scan.next().transpose()?;
                    };
                    let mut latest: Option<&QueryResult> = held.as_ref();
                    for &i in versions {
                        if latest.is_none_or(|latest| supersedes(latest, &results[i])) {
                            news[i] = true;
                            latest = Some(&results[i]);
                        }
                    }
                }
            }
            // Then number them in write order, keeping only what is new.
            for (result, &news) in results.iter_mut().zip(&news) {
                let sequence = match sequences {
                    // Nothing new takes no sequence of its own.
                    Sequences::Assign if !news => continue,
                    Sequences::Assign => next,
                    Sequences::Given if result.sequence >= next => result.sequence,
                    Sequences::Given => {
                        return Err(redb::Error::Corrupted(format!(
                            "results to apply must have increasing sequences; {} follows {}",
                            result.sequence,
                            next - 1
                        )));
                    }
                };
                next = sequence + 1;
                if !news {
                    metrics::counter!("runnel_store_unchanged_results_total").increment(1);
                    continue;
                }
                result.sequence = sequence;
            }
            // Only the last new version of a window is stored (and indexed by window): an
            // earlier one in the batch would be replaced in this same transaction. Each still
            // has its entry in the feed, in sequence order, which skips it when read as it
            // would skip it written one by one.
            let mut encoded = Vec::new();
            let mut by_window: Vec<(&str, i64, &str, u64)> = Vec::with_capacity(results.len());
            // Each series' last write, and each query's newest window, in key order.
            let mut touched: Vec<(&str, &str, u64)> = Vec::new();
            let mut newest_windows: Vec<(&str, i64)> = Vec::new();
            for versions in order.chunk_by(|&a, &b| same_window(&results, &starts, a, b)) {
                let Some(&i) = versions.iter().rev().find(|&&i| news[i]) else {
                    continue;
                };
                let result = &results[i];
                let (query, key, start) = window_of(&results, &starts, i);
                encoded.clear();
                result.encode(&mut encoded).map_err(|error| {
                    redb::Error::Corrupted(format!("a result does not encode: {error}"))
                })?;
                stored.insert((query, key, start), encoded.as_slice())?;
                by_window.push((query, start, key, result.sequence));
                match touched.last_mut() {
                    Some((q, k, version)) if (*q, *k) == (query, key) => {
                        *version = (*version).max(result.sequence);
                    }
                    _ => touched.push((query, key, result.sequence)),
                }
                match newest_windows.last_mut() {
                    Some((q, newest)) if *q == query => *newest = (*newest).max(start),
                    _ => newest_windows.push((query, start)),
                }
            }
            by_window.sort_unstable();
            for &(query, start, key, sequence) in &by_window {
                windows.insert((query, start, key), sequence)?;
            }
            for (i, result) in results.iter().enumerate() {
                if news[i] {
                    feed.insert(result.sequence, window_of(&results, &starts, i))?;
                }
            }
            for &(query, key, version) in &touched {
                series.insert((query, key), version)?;
            }
            for (query, start) in newest_windows {
                let newest = queries.get(query)?.map(|v| v.value());
                if newest.is_none_or(|newest| start > newest) {
                    queries.insert(query, start)?;
                }
            }
            meta.insert(NEXT_SEQUENCE, next)?;
            // Trim the feed to its last `feed_entries` writes.
            let keep_from = next.saturating_sub(feed_entries);
            loop {
                let first = feed.first()?.map(|(sequence, _)| sequence.value());
                match first {
                    Some(first) if first < keep_from => drop(feed.pop_first()?),
                    _ => break,
                }
            }
            let series = match history {
                Some(history) => touched
                    .iter()
                    .map(|&(query, key, version)| series_of(&stored, query, key, version, history))
                    .collect::<std::result::Result<Vec<_>, redb::Error>>()?,
                None => Vec::new(),
            };
            drop((by_window, touched));
            Ok(Written {
                results: results
                    .into_iter()
                    .zip(news)
                    .filter_map(|(result, news)| news.then(|| Arc::new(result)))
                    .collect(),
                applied: next - 1,
                series,
            })
        })
    }

    /// How often [`Durable::sync`] must run in the background; `None`: never (every commit
    /// is durable, or `fsync = "never"` leaves it to the clean shutdown).
    pub(crate) fn sync_every(&self) -> Option<Duration> {
        self.sync_every
    }

    /// Forces every commit so far to disk (the background tick, and shutdown).
    pub(crate) fn sync(&self) -> Result<()> {
        // An empty durable commit makes every earlier non-durable one durable too.
        self.write(Durability::Immediate, |_| Ok(()))
    }

    /// The recent windows of `query` and `key` (at most `history`), for the hot tier.
    pub(crate) fn series(&self, query: &str, key: &str, history: usize) -> Result<Series> {
        self.read(|txn| {
            let version = txn
                .open_table(SERIES)?
                .get((query, key))?
                .map_or(0, |v| v.value());
            series_of(&txn.open_table(RESULTS)?, query, key, version, history)
        })
    }

    /// Results for `query` and `key` whose window starts in `[from, to)`, oldest first, at
    /// most `limit`.
    pub(crate) fn range(
        &self,
        query: &str,
        key: &str,
        from: i64,
        to: i64,
        limit: usize,
    ) -> Result<Vec<QueryResult>> {
        if from >= to {
            return Ok(Vec::new());
        }
        let encoded = self.read(|txn| {
            let results = txn.open_table(RESULTS)?;
            let mut out = Vec::new();
            for entry in results
                .range((query, key, from)..(query, key, to))?
                .take(limit)
            {
                out.push(entry?.1.value().to_vec());
            }
            Ok(out)
        })?;
        encoded.iter().map(|bytes| self.decode(bytes)).collect()
    }

    /// Every result of `query`'s most recent window, and that window's start.
    pub(crate) fn newest_window(&self, query: &str) -> Result<Option<(i64, Vec<QueryResult>)>> {
        let found = self.read(|txn| {
            let Some(start) = txn.open_table(QUERIES)?.get(query)?.map(|v| v.value()) else {
                return Ok(None);
            };
            let windows = txn.open_table(WINDOWS)?;
            let results = txn.open_table(RESULTS)?;
            let mut out = Vec::new();
            for entry in windows.range((query, start, "")..(query, start.saturating_add(1), ""))? {
                let (window, _) = entry?;
                let (_, _, key) = window.value();
                if let Some(bytes) = results.get((query, key, start))? {
                    out.push(bytes.value().to_vec());
                }
            }
            Ok(Some((start, out)))
        })?;
        found
            .map(|(start, encoded)| {
                let results = encoded
                    .iter()
                    .map(|bytes| self.decode(bytes))
                    .collect::<Result<Vec<_>>>()?;
                Ok((start, results))
            })
            .transpose()
    }

    /// The queries that have results.
    pub(crate) fn queries(&self) -> Result<Vec<String>> {
        self.read(|txn| {
            let mut out = Vec::new();
            for entry in txn.open_table(QUERIES)?.iter()? {
                out.push(entry?.0.value().to_owned());
            }
            Ok(out)
        })
    }

    /// The last sequence written (0 before the first write).
    pub(crate) fn last_sequence(&self) -> Result<u64> {
        self.read(|txn| {
            Ok(txn
                .open_table(META)?
                .get(NEXT_SEQUENCE)?
                .map_or(0, |v| v.value() - 1))
        })
    }

    /// Up to `limit` current results written after sequence `after`. A cursor older than
    /// the feed keeps, or newer than the last write, is an error rather than a silent gap.
    pub(crate) fn feed(&self, after: u64, limit: usize) -> Result<FeedPage> {
        let (encoded, through, oldest, last) = self.read(|txn| {
            let feed = txn.open_table(FEED)?;
            let results = txn.open_table(RESULTS)?;
            let oldest = feed.first()?.map(|(k, _)| k.value());
            let last = txn
                .open_table(META)?
                .get(NEXT_SEQUENCE)?
                .map_or(0, |v| v.value() - 1);
            let mut through = after;
            let mut out = Vec::new();
            for entry in feed.range(after.saturating_add(1)..)?.take(limit) {
                let (sequence, identity) = entry?;
                let sequence = sequence.value();
                through = sequence;
                let (query, key, start) = identity.value();
                if let Some(bytes) = results.get((query, key, start))? {
                    out.push((sequence, bytes.value().to_vec()));
                }
            }
            Ok((out, through, oldest, last))
        })?;
        if after > last {
            return Err(StoreError::CursorAhead { after, last });
        }
        if let Some(oldest) = oldest
            && after.saturating_add(1) < oldest
        {
            return Err(StoreError::CursorExpired { after, oldest });
        }
        let mut results = Vec::with_capacity(encoded.len());
        for (sequence, bytes) in encoded {
            let result = self.decode(&bytes)?;
            // Rewritten since: its later entry delivers it.
            if result.sequence == sequence {
                results.push(Arc::new(result));
            }
        }
        Ok(FeedPage { results, through })
    }

    /// Deletes every result whose window started before `cutoff`.
    pub(crate) fn expire(&self, cutoff: i64) -> Result<Expired> {
        let mut expired = Expired::default();
        for query in self.queries()? {
            loop {
                let deleted = self.write(self.durability, |txn| {
                    let mut windows = txn.open_table(WINDOWS)?;
                    let mut results = txn.open_table(RESULTS)?;
                    let mut doomed = Vec::new();
                    for entry in windows
                        .range((query.as_str(), i64::MIN, "")..(query.as_str(), cutoff, ""))?
                        .take(RETENTION_BATCH)
                    {
                        let (window, _) = entry?;
                        let (_, start, key) = window.value();
                        doomed.push((start, key.to_owned()));
                    }
                    for (start, key) in &doomed {
                        windows.remove((query.as_str(), *start, key.as_str()))?;
                        results.remove((query.as_str(), key.as_str(), *start))?;
                    }
                    Ok(doomed)
                })?;
                expired.results += deleted.len() as u64;
                let done = deleted.len() < RETENTION_BATCH;
                expired
                    .series
                    .extend(deleted.into_iter().map(|(_, key)| (query.clone(), key)));
                if done {
                    break;
                }
            }
        }
        Ok(expired)
    }

    /// Deletes up to `limit` results of `query` in one transaction; the transaction that
    /// finds no more than `limit` left also forgets the query (`queries`) and applies the
    /// deletion's sequence — `given` (from the results log), or the next one. Call it until
    /// it is done. It is idempotent: a deletion cut short (a crash between transactions)
    /// has not applied its sequence, so the log gives it again and it deletes what is left;
    /// one whose sequence is applied already deletes nothing — not what was written after
    /// it. The feed keeps its entries of the deleted results; reading skips them, as for
    /// results deleted by retention.
    ///
    /// With `durable` (a replica serving) each transaction is committed per the fsync
    /// policy; without it (a replica catching up with the log, see [`Durable::put`]) not
    /// made durable until the replica has caught up.
    pub(crate) fn delete_query(
        &self,
        query: &str,
        given: Option<u64>,
        limit: usize,
        durable: bool,
    ) -> Result<DeletedBatch> {
        let durability = if durable {
            self.durability
        } else {
            Durability::None
        };
        self.write(durability, |txn| {
            let mut meta = txn.open_table(META)?;
            let next = meta.get(NEXT_SEQUENCE)?.map_or(1, |v| v.value());
            let sequence = match given {
                Some(sequence) if sequence < next => {
                    return Ok(DeletedBatch {
                        sequence,
                        results: 0,
                        keys: BTreeSet::new(),
                        done: true,
                        applied: false,
                    });
                }
                Some(sequence) => sequence,
                None => next,
            };
            let mut results = txn.open_table(RESULTS)?;
            let mut windows = txn.open_table(WINDOWS)?;
            let mut series = txn.open_table(SERIES)?;
            let mut doomed: Vec<(String, i64)> = Vec::new();
            let mut more = false;
            for entry in results.range((query, "", i64::MIN)..)? {
                let (window, _) = entry?;
                let (held_query, key, start) = window.value();
                if held_query != query {
                    break;
                }
                if doomed.len() == limit {
                    more = true;
                    break;
                }
                doomed.push((key.to_owned(), start));
            }
            for (key, start) in &doomed {
                results.remove((query, key.as_str(), *start))?;
                windows.remove((query, *start, key.as_str()))?;
            }
            let count = doomed.len() as u64;
            let keys: BTreeSet<String> = doomed.into_iter().map(|(key, _)| key).collect();
            for key in &keys {
                series.remove((query, key.as_str()))?;
            }
            let deleted = DeletedBatch {
                sequence,
                results: count,
                keys,
                done: !more,
                applied: !more,
            };
            if !more {
                txn.open_table(QUERIES)?.remove(query)?;
                meta.insert(NEXT_SEQUENCE, sequence + 1)?;
            }
            Ok(deleted)
        })
    }

    /// Gives the space of deleted results back to the file system. Waits for running
    /// transactions and holds off new ones while it runs.
    pub(crate) fn compact(&self) -> Result<bool> {
        let mut db = self.db.write().map_err(|_| StoreError::Failed)?;
        db.compact().map_err(|e| StoreError::db(&self.path, e))
    }

    fn decode(&self, bytes: &[u8]) -> Result<QueryResult> {
        QueryResult::decode(bytes).map_err(|error| StoreError::Corrupt {
            path: self.path.clone(),
            reason: format!("a stored result does not decode: {error}"),
        })
    }
}

/// The last `history` windows of a series, from inside a transaction.
fn series_of(
    results: &impl ReadableTable<(&'static str, &'static str, i64), &'static [u8]>,
    query: &str,
    key: &str,
    version: u64,
    history: usize,
) -> std::result::Result<Series, redb::Error> {
    let mut newest_first = Vec::with_capacity(history);
    let mut more = false;
    let mut range = results.range((query, key, i64::MIN)..=(query, key, i64::MAX))?;
    while let Some(entry) = range.next_back() {
        if newest_first.len() == history {
            more = true;
            break;
        }
        newest_first.push(stored_result(entry?.1.value())?);
    }
    newest_first.reverse();
    let complete_from = match (more, newest_first.first()) {
        (true, Some(oldest)) => start_of(oldest),
        _ => i64::MIN,
    };
    Ok(Series {
        version,
        complete_from,
        results: newest_first,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn result(query: &str, key: &str, start: i64, count: f64) -> QueryResult {
        QueryResult {
            query: query.into(),
            key: key.into(),
            window_start: Some(Millis(start).into()),
            window_end: Some(Millis(start + 10).into()),
            values: [("count".to_owned(), count)].into(),
            ..Default::default()
        }
    }

    fn open(dir: &Path) -> Durable {
        Durable::open(dir, FsyncPolicy::Never, 1000, Sequencing::Local).unwrap()
    }

    #[test]
    fn only_a_view_of_the_results_log_and_an_interval_are_synced_in_the_background() {
        let cases = [
            (FsyncPolicy::Always, Sequencing::Local, None),
            (
                FsyncPolicy::Always,
                Sequencing::Log,
                Some(VIEW_SYNC_INTERVAL),
            ),
            (
                FsyncPolicy::Interval(Duration::from_millis(100)),
                Sequencing::Log,
                Some(Duration::from_millis(100)),
            ),
            (FsyncPolicy::Never, Sequencing::Log, None),
        ];
        for (policy, sequencing, expected) in cases {
            let dir = tempfile::tempdir().unwrap();
            let store = Durable::open(dir.path(), policy, 1000, sequencing).unwrap();
            assert_eq!(store.sync_every(), expected, "{policy:?} {sequencing:?}");
        }
    }

    fn starts(results: &[QueryResult]) -> Vec<i64> {
        results.iter().map(start_of).collect()
    }

    #[test]
    fn writes_get_sequences_and_rewrites_replace() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let written = store
            .put(
                vec![result("q", "a", 0, 1.0), result("q", "a", 10, 2.0)],
                Sequences::Assign,
                Some(8),
            )
            .unwrap();
        let sequences: Vec<u64> = written.results.iter().map(|r| r.sequence).collect();
        assert_eq!(sequences, [1, 2]);
        assert_eq!(written.series.len(), 1);
        assert_eq!(written.series[0].version, 2);
        assert_eq!(written.series[0].complete_from, i64::MIN);
        let rewritten = store
            .put(vec![result("q", "a", 0, 5.0)], Sequences::Assign, Some(8))
            .unwrap();
        assert_eq!(rewritten.results[0].sequence, 3);
        let all = store.range("q", "a", i64::MIN, i64::MAX, 10).unwrap();
        assert_eq!(starts(&all), [0, 10]);
        assert_eq!(all[0].values["count"], 5.0);
        assert_eq!(
            store.series("q", "a", 1).unwrap().latest().unwrap().values["count"],
            2.0
        );
        assert_eq!(store.series("q", "nobody", 1).unwrap().latest(), None);
        // The feed skips the write that was replaced.
        let page = store.feed(0, 10).unwrap();
        let fed: Vec<u64> = page.results.iter().map(|r| r.sequence).collect();
        assert_eq!(fed, [2, 3]);
        assert_eq!(page.through, 3);
        assert!(store.feed(3, 10).unwrap().results.is_empty());
    }

    #[test]
    fn replayed_and_unchanged_versions_take_no_sequence_and_reach_no_feed() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let at = |count: f64, input_offset: u64| QueryResult {
            input_offset,
            ..result("q", "a", 0, count)
        };
        let first = store
            .put(vec![at(2.0, 7)], Sequences::Assign, None)
            .unwrap();
        assert_eq!(first.applied, 1);
        // A replay sends the window's versions again: an older one (it reflects fewer
        // records) and the same one — computed later, with other trace headers. Neither
        // is news, and the first version's emitted_at stays.
        let recomputed = QueryResult {
            emitted_at: Some(Millis(99).into()),
            headers: [("traceparent".to_owned(), "00-replay".to_owned())].into(),
            ..at(2.0, 9)
        };
        let replay = store
            .put(
                vec![at(1.0, 4), at(2.0, 7), recomputed],
                Sequences::Assign,
                None,
            )
            .unwrap();
        assert!(replay.results.is_empty(), "{:?}", replay.results);
        assert_eq!(replay.applied, 1);
        assert_eq!(store.range("q", "a", 0, 1, 10).unwrap()[0].emitted_at, None);
        // A newer version is; so is a client's own write (no offset) that changes it.
        let newer = store
            .put(vec![at(3.0, 12), at(4.0, 0)], Sequences::Assign, None)
            .unwrap();
        let sequences: Vec<u64> = newer.results.iter().map(|r| r.sequence).collect();
        assert_eq!(sequences, [2, 3]);
        assert_eq!(
            store.range("q", "a", 0, 1, 10).unwrap()[0].values["count"],
            4.0
        );
        let fed: Vec<u64> = store
            .feed(0, 10)
            .unwrap()
            .results
            .iter()
            .map(|r| r.sequence)
            .collect();
        assert_eq!(fed, [3]);

        // Applying a log, an unchanged result still moves the applied position.
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let logged = |count: f64, input_offset: u64, sequence: u64| QueryResult {
            sequence,
            ..at(count, input_offset)
        };
        store
            .put(vec![logged(2.0, 7, 5)], Sequences::Given, None)
            .unwrap();
        let replayed = store
            .put(
                vec![logged(1.0, 4, 6), logged(2.0, 7, 7)],
                Sequences::Given,
                None,
            )
            .unwrap();
        assert!(replayed.results.is_empty());
        assert_eq!(replayed.applied, 7);
    }

    #[test]
    fn a_final_version_replaces_the_partial_one_it_equals_and_no_partial_one_comes_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let at = |count: f64, input_offset: u64, partial: bool| QueryResult {
            input_offset,
            partial,
            ..result("q", "a", 0, count)
        };
        let sequenced =
            |written: Written| -> Vec<u64> { written.results.iter().map(|r| r.sequence).collect() };
        let early = store
            .put(vec![at(2.0, 7, true)], Sequences::Assign, None)
            .unwrap();
        assert_eq!(sequenced(early), [1]);
        // The window closes with nothing new: the same values, now final — news to a client.
        let closed = store
            .put(vec![at(2.0, 7, false)], Sequences::Assign, None)
            .unwrap();
        assert_eq!(sequenced(closed), [2]);
        // A replay sends the partial version again: older, dropped.
        let replay = store
            .put(vec![at(2.0, 7, true)], Sequences::Assign, None)
            .unwrap();
        assert!(replay.results.is_empty(), "{:?}", replay.results);
        let held = &store.range("q", "a", 0, 1, 10).unwrap()[0];
        assert_eq!((held.values["count"], held.partial), (2.0, false));
    }

    #[test]
    fn series_keep_the_most_recent_windows_and_say_from_where() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let batch = (0..5).map(|i| result("q", "k", i * 10, 1.0)).collect();
        let written = store.put(batch, Sequences::Assign, Some(3)).unwrap();
        let series = &written.series[0];
        assert_eq!(starts(&series.results), [20, 30, 40]);
        assert_eq!(series.complete_from, 20);
        assert_eq!(
            series.range(20, i64::MAX, 10).map(|r| starts(&r)),
            Some(vec![20, 30, 40])
        );
        assert_eq!(
            series.range(0, i64::MAX, 10),
            None,
            "older windows are not held"
        );
        assert_eq!(store.series("q", "k", 3).unwrap(), *series);
    }

    #[test]
    fn newest_window_and_expiry() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        store
            .put(
                vec![
                    result("q", "a", 0, 1.0),
                    result("q", "b", 10, 2.0),
                    result("q", "c", 10, 3.0),
                    result("r", "a", 5, 1.0),
                ],
                Sequences::Assign,
                Some(4),
            )
            .unwrap();
        let (start, newest) = store.newest_window("q").unwrap().unwrap();
        assert_eq!(start, 10);
        let keys: Vec<&str> = newest.iter().map(|r| r.key.as_str()).collect();
        assert_eq!(keys, ["b", "c"]);
        assert_eq!(store.newest_window("nothing").unwrap(), None);
        let expired = store.expire(6).unwrap();
        assert_eq!(expired.results, 2);
        assert!(expired.series.contains(&("q".into(), "a".into())));
        assert!(expired.series.contains(&("r".into(), "a".into())));
        assert_eq!(store.series("q", "a", 1).unwrap().latest(), None);
        assert!(store.series("q", "b", 1).unwrap().latest().is_some());
        store.compact().unwrap();
        assert!(store.series("q", "c", 1).unwrap().latest().is_some());
    }

    #[test]
    fn a_cursor_older_than_the_feed_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        for chunk in 0..3 {
            let batch = (0..500)
                .map(|i| result("q", "k", (chunk * 500 + i) * 10, 1.0))
                .collect();
            store.put(batch, Sequences::Assign, Some(1)).unwrap();
        }
        assert_eq!(store.last_sequence().unwrap(), 1500);
        match store.feed(10, 10) {
            Err(StoreError::CursorExpired { after: 10, oldest }) => assert_eq!(oldest, 501),
            other => panic!("expected an expired cursor, got {other:?}"),
        }
        let page = store.feed(500, 10).unwrap();
        assert_eq!(page.results[0].sequence, 501);
        assert!(store.feed(1500, 10).unwrap().results.is_empty());
        match store.feed(1501, 10) {
            Err(StoreError::CursorAhead {
                after: 1501,
                last: 1500,
            }) => {}
            other => panic!("expected a cursor ahead of the store, got {other:?}"),
        }
    }

    #[test]
    fn log_numbered_results_keep_their_sequences_and_are_applied_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = Durable::open(dir.path(), FsyncPolicy::Never, 1000, Sequencing::Log).unwrap();
        let numbered = |key: &str, sequence| QueryResult {
            sequence,
            ..result("q", key, 0, sequence as f64)
        };
        // A fresh replica may start past the log's deleted start.
        store
            .put(
                vec![numbered("a", 41), numbered("b", 42)],
                Sequences::Given,
                None,
            )
            .unwrap();
        assert_eq!(store.last_sequence().unwrap(), 42);
        // Applied again (the same records read twice), they are skipped.
        let again = store
            .put(
                vec![numbered("a", 42), numbered("c", 43)],
                Sequences::Given,
                None,
            )
            .unwrap();
        let applied: Vec<u64> = again.results.iter().map(|r| r.sequence).collect();
        assert_eq!(applied, [43]);
        assert_eq!(
            store
                .series("q", "b", 1)
                .unwrap()
                .latest()
                .unwrap()
                .sequence,
            42
        );
        assert!(
            store
                .put(
                    vec![numbered("d", 50), numbered("e", 49)],
                    Sequences::Given,
                    None
                )
                .is_err(),
            "sequences must increase"
        );
        assert_eq!(
            store.last_sequence().unwrap(),
            43,
            "a refused batch writes nothing"
        );
        drop(store);
        // Numbered by the log, the database is refused to a store that numbers itself.
        let error = Durable::open(dir.path(), FsyncPolicy::Never, 1000, Sequencing::Local)
            .unwrap_err()
            .to_string();
        assert!(error.contains("store.broker"), "{error}");
        let local = tempfile::tempdir().unwrap();
        open(local.path())
            .put(vec![result("q", "a", 0, 1.0)], Sequences::Assign, None)
            .unwrap();
        let error = Durable::open(local.path(), FsyncPolicy::Never, 1000, Sequencing::Log)
            .unwrap_err()
            .to_string();
        assert!(error.contains("rebuild from the log"), "{error}");
    }

    /// Deletes `query` in transactions of `limit` results; answers what each deleted.
    fn delete(store: &Durable, query: &str, given: Option<u64>, limit: usize) -> Vec<u64> {
        let mut counts = Vec::new();
        loop {
            let batch = store.delete_query(query, given, limit, true).unwrap();
            counts.push(batch.results);
            if batch.done {
                return counts;
            }
        }
    }

    #[test]
    fn a_query_is_deleted_in_bounded_transactions_and_can_be_written_again() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let batch = (0..25)
            .map(|i| result("q", &format!("k{}", i % 5), (i / 5) * 10, 1.0))
            .chain([result("r", "k0", 0, 2.0)])
            .collect();
        store.put(batch, Sequences::Assign, Some(4)).unwrap();
        let first = store.delete_query("q", None, 10, true).unwrap();
        assert_eq!(
            (first.results, first.done, first.applied),
            (10, false, false)
        );
        assert_eq!(
            first.sequence, 27,
            "the next sequence, taken by the last transaction"
        );
        assert_eq!(store.last_sequence().unwrap(), 26);
        assert_eq!(delete(&store, "q", None, 10), [10, 5]);
        assert_eq!(store.last_sequence().unwrap(), 27);
        assert_eq!(store.queries().unwrap(), ["r"]);
        assert_eq!(store.newest_window("q").unwrap(), None);
        for key in ["k0", "k4"] {
            assert!(
                store
                    .range("q", key, i64::MIN, i64::MAX, 100)
                    .unwrap()
                    .is_empty()
            );
            assert_eq!(store.series("q", key, 4).unwrap().version, 0);
        }
        assert_eq!(
            store
                .series("r", "k0", 1)
                .unwrap()
                .latest()
                .unwrap()
                .sequence,
            26
        );
        // The feed skips every write of the deleted query.
        let fed: Vec<u64> = store
            .feed(0, 100)
            .unwrap()
            .results
            .iter()
            .map(|r| r.sequence)
            .collect();
        assert_eq!(fed, [26]);
        // Nothing left to delete: none deleted.
        assert_eq!(delete(&store, "q", None, 10), [0]);
        // The query comes back with its next write, which its older feed entries never show.
        store
            .put(vec![result("q", "k0", 0, 3.0)], Sequences::Assign, Some(4))
            .unwrap();
        let latest = store.series("q", "k0", 4).unwrap();
        assert_eq!(latest.latest().unwrap().values["count"], 3.0);
        assert_eq!(latest.version, 29);
        let fed: Vec<u64> = store
            .feed(0, 100)
            .unwrap()
            .results
            .iter()
            .map(|r| r.sequence)
            .collect();
        assert_eq!(fed, [26, 29]);
        assert_eq!(store.queries().unwrap(), ["q", "r"]);
    }

    #[test]
    fn a_logged_deletion_cut_short_is_finished_when_given_again_and_applied_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = Durable::open(dir.path(), FsyncPolicy::Never, 1000, Sequencing::Log).unwrap();
        let numbered = |query: &str, key: usize, start: i64, sequence| QueryResult {
            sequence,
            ..result(query, &format!("k{key}"), start, 1.0)
        };
        let results = (0..30)
            .map(|i| numbered("q", i % 3, (i as i64 / 3) * 10, i as u64 + 1))
            .chain([numbered("r", 0, 0, 31)])
            .collect();
        store.put(results, Sequences::Given, None).unwrap();
        // The tombstone at sequence 32: one transaction, then a crash.
        let first = store.delete_query("q", Some(32), 10, false).unwrap();
        assert_eq!((first.results, first.done), (10, false));
        store.sync().unwrap();
        drop(store);
        let store = Durable::open(dir.path(), FsyncPolicy::Never, 1000, Sequencing::Log).unwrap();
        assert_eq!(
            store.last_sequence().unwrap(),
            31,
            "the tombstone is not applied yet"
        );
        // The log gives it again: what is left goes.
        assert_eq!(delete(&store, "q", Some(32), 10), [10, 10]);
        assert_eq!(store.last_sequence().unwrap(), 32);
        store
            .put(vec![numbered("q", 0, 0, 33)], Sequences::Given, None)
            .unwrap();
        // Given again once applied, it deletes nothing — not what came after it.
        let again = store.delete_query("q", Some(32), 10, true).unwrap();
        assert_eq!((again.results, again.done, again.applied), (0, true, false));
        assert_eq!(
            store
                .series("q", "k0", 1)
                .unwrap()
                .latest()
                .unwrap()
                .sequence,
            33
        );
        assert_eq!(store.queries().unwrap(), ["q", "r"]);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        /// Whatever is written, in whatever order and with whatever rewrites, a reopen
        /// serves exactly the newest write of every window, and the feed delivers each
        /// window's newest write exactly once, in sequence order.
        #[test]
        fn the_newest_write_of_every_window_survives_a_reopen(
            writes in proptest::collection::vec((0u8..3, 0i64..6, -1e6f64..1e6), 1..40),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let store = open(dir.path());
            let mut expected: BTreeMap<(String, i64), f64> = BTreeMap::new();
            for chunk in writes.chunks(4) {
                let batch: Vec<QueryResult> = chunk
                    .iter()
                    .map(|&(key, window, count)| result("q", &format!("k{key}"), window * 10, count))
                    .collect();
                for &(key, window, count) in chunk {
                    expected.insert((format!("k{key}"), window * 10), count);
                }
                store.put(batch, Sequences::Assign, Some(4)).unwrap();
            }
            store.sync().unwrap();
            drop(store);
            let store = open(dir.path());
            for key in ["k0", "k1", "k2"] {
                let found: Vec<(i64, f64)> = store
                    .range("q", key, i64::MIN, i64::MAX, 100)
                    .unwrap()
                    .iter()
                    .map(|r| (start_of(r), r.values["count"]))
                    .collect();
                let wanted: Vec<(i64, f64)> = expected
                    .iter()
                    .filter(|((k, _), _)| k == key)
                    .map(|((_, start), count)| (*start, *count))
                    .collect();
                prop_assert_eq!(&found, &wanted);
                let latest = store.series("q", key, 1).unwrap().latest().map(|r| r.values["count"]);
                prop_assert_eq!(latest, wanted.last().map(|(_, c)| *c));
            }
            let fed = store.feed(0, 1000).unwrap().results;
            prop_assert_eq!(fed.len(), expected.len());
            prop_assert!(fed.windows(2).all(|w| w[0].sequence < w[1].sequence));
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        /// Applying a batch leaves the database exactly as applying its results one by one
        /// would — every table, the results announced and the position applied — whatever
        /// the batch repeats, rewrites, replays or leaves unchanged, numbered by the store
        /// or by the log.
        #[test]
        fn a_batch_writes_what_its_results_one_by_one_write(
            writes in proptest::collection::vec((0u8..3, 0i64..4, 0u8..3, 0u64..4), 1..60),
            chunk in 1usize..60,
            log in any::<bool>(),
            history in proptest::option::of(1usize..4),
        ) {
            let (sequencing, sequences) = if log {
                (Sequencing::Log, Sequences::Given)
            } else {
                (Sequencing::Local, Sequences::Assign)
            };
            let results: Vec<QueryResult> = writes
                .iter()
                .enumerate()
                .map(|(i, &(key, window, count, input_offset))| QueryResult {
                    input_offset,
                    // Numbered by the log: its offset + 1, from past a deleted start.
                    sequence: if log { i as u64 + 7 } else { 0 },
                    ..result(if key == 2 { "r" } else { "q" }, &format!("k{key}"), window * 10, f64::from(count))
                })
                .collect();
            let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
            let one_by_one = Durable::open(dirs.0.path(), FsyncPolicy::Never, 1000, sequencing).unwrap();
            let batched = Durable::open(dirs.1.path(), FsyncPolicy::Never, 1000, sequencing).unwrap();
            let mut announced = (Vec::new(), Vec::new());
            let mut applied = (0, 0);
            for result in &results {
                let written = one_by_one.put(vec![result.clone()], sequences, history).unwrap();
                announced.0.extend(written.results);
                applied.0 = written.applied;
            }
            let mut series = BTreeMap::new();
            for batch in results.chunks(chunk) {
                let written = batched.put(batch.to_vec(), sequences, history).unwrap();
                announced.1.extend(written.results);
                applied.1 = written.applied;
                for state in written.series {
                    let latest = state.latest().unwrap();
                    series.insert((latest.query.clone(), latest.key.clone()), state);
                }
            }
            prop_assert_eq!(&announced.0, &announced.1);
            prop_assert_eq!(applied.0, applied.1);
            prop_assert_eq!(contents(&one_by_one), contents(&batched));
            // Each series' last state, as a batch returns it, is the stored one.
            if let Some(history) = history {
                for ((query, key), state) in series {
                    prop_assert_eq!(one_by_one.series(&query, &key, history).unwrap(), state);
                }
            }
        }
    }

    /// Every table of `store`, in key order; results decoded, as a map's encoding has no
    /// fixed order.
    #[allow(clippy::type_complexity)]
    fn contents(
        store: &Durable,
    ) -> (
        Vec<((String, String, i64), QueryResult)>,
        Vec<((String, i64, String), u64)>,
        Vec<(u64, (String, String, i64))>,
        Vec<((String, String), u64)>,
        Vec<(String, i64)>,
        Vec<(String, u64)>,
    ) {
        store
            .read(|txn| {
                let mut results = Vec::new();
                for entry in txn.open_table(RESULTS)?.iter()? {
                    let (window, bytes) = entry?;
                    let (query, key, start) = window.value();
                    results.push((
                        (query.to_owned(), key.to_owned(), start),
                        stored_result(bytes.value())?,
                    ));
                }
                let mut windows = Vec::new();
                for entry in txn.open_table(WINDOWS)?.iter()? {
                    let (window, sequence) = entry?;
                    let (query, start, key) = window.value();
                    windows.push(((query.to_owned(), start, key.to_owned()), sequence.value()));
                }
                let mut feed = Vec::new();
                for entry in txn.open_table(FEED)?.iter()? {
                    let (sequence, window) = entry?;
                    let (query, key, start) = window.value();
                    feed.push((sequence.value(), (query.to_owned(), key.to_owned(), start)));
                }
                let mut series = Vec::new();
                for entry in txn.open_table(SERIES)?.iter()? {
                    let (id, version) = entry?;
                    let (query, key) = id.value();
                    series.push(((query.to_owned(), key.to_owned()), version.value()));
                }
                let mut queries = Vec::new();
                for entry in txn.open_table(QUERIES)?.iter()? {
                    let (query, start) = entry?;
                    queries.push((query.value().to_owned(), start.value()));
                }
                let mut meta = Vec::new();
                for entry in txn.open_table(META)?.iter()? {
                    let (name, value) = entry?;
                    meta.push((name.value().to_owned(), value.value()));
                }
                Ok((results, windows, feed, series, queries, meta))
            })
            .unwrap()
    }
}
