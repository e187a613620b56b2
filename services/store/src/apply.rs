//! The one write path: results go into long-term storage (and the hot tier), then are
//! announced to watchers in sequence order.
//!
//! Both ways of running use it. One replica without a broker numbers a `Put`'s results
//! itself ([`Applier::put`]); a replica of several applies the results log in the broker,
//! whose offsets number them ([`Applier::apply`], from [`crate::results_log`]). Either way
//! a result is announced only once it is committed, so a watcher never sees a result that
//! a crash could take back, and the last sequence applied is published for a `Put` that
//! waits to read its own writes on this replica.
//!
//! A query's deletion goes the same way ([`Applier::delete_query`], or a tombstone in the
//! log): it takes a sequence, which is published, but announces nothing — watchers are not
//! told of deletions.

use crate::durable::{Sequences, Written};
use crate::error::{Result, StoreError};
use crate::hot::HotTier;
use crate::results_log::Entry;
use crate::tiers::{Deleted, Tiers};
use runnel_proto::v1::QueryResult;
use std::collections::VecDeque;
use std::sync::Arc;
use tokio::sync::{Mutex, broadcast, watch};

/// Deletions whose counts are kept for the `DeleteQuery` calls waiting for them: far more
/// than can be in flight at once.
const DELETIONS_KEPT: usize = 1024;

/// Writes results and announces them.
pub(crate) struct Applier<H> {
    tiers: Arc<Tiers<H>>,
    /// Held across a write and its announcement, so that sequences are announced in order.
    writer: Mutex<()>,
    /// Every durable result, for watchers. Its capacity is how far a watcher may lag
    /// before it catches up from disk.
    written: broadcast::Sender<Arc<QueryResult>>,
    /// The last sequence announced on `written`.
    applied: watch::Sender<u64>,
    /// The last deletions applied: `(sequence, results deleted)`, oldest first.
    deletions: std::sync::Mutex<VecDeque<(u64, u64)>>,
}

impl<H: HotTier> Applier<H> {
    /// An applier over `tiers`, whose last write was `last_sequence`; watchers may lag
    /// `watch_buffer` results behind.
    pub(crate) fn new(tiers: Arc<Tiers<H>>, last_sequence: u64, watch_buffer: usize) -> Self {
        metrics::gauge!("runnel_store_last_sequence").set(last_sequence as f64);
        Applier {
            tiers,
            writer: Mutex::new(()),
            written: broadcast::Sender::new(watch_buffer),
            applied: watch::Sender::new(last_sequence),
            deletions: std::sync::Mutex::new(VecDeque::new()),
        }
    }

    pub(crate) fn tiers(&self) -> &Arc<Tiers<H>> {
        &self.tiers
    }

    /// One replica, no broker: writes validated results, numbering them.
    pub(crate) async fn put(&self, results: Vec<QueryResult>) -> Result<()> {
        self.write(results, Sequences::Assign, true).await
    }

    /// One replica, no broker: deletes every result of `query` (a valid name); answers how
    /// many.
    pub(crate) async fn delete_query(&self, query: &str) -> Result<u64> {
        Ok(self.delete(query, None, true).await?.results)
    }

    /// Applies records of the results log, in order, which carry their sequences; those
    /// applied already are skipped. Without `hot` the hot tier is left alone (see
    /// [`Tiers::put`]).
    pub(crate) async fn apply(&self, entries: Vec<Entry>, hot: bool) -> Result<()> {
        // The results between two deletions (rare) are written in one transaction.
        let mut results = Vec::with_capacity(entries.len());
        for entry in entries {
            match entry {
                Entry::Result(result) => results.push(result),
                Entry::DeleteQuery { query, sequence } => {
                    if !results.is_empty() {
                        self.write(std::mem::take(&mut results), Sequences::Given, hot)
                            .await?;
                    }
                    self.delete(&query, Some(sequence), hot).await?;
                }
            }
        }
        if !results.is_empty() {
            self.write(results, Sequences::Given, hot).await?;
        }
        Ok(())
    }

    /// How many results the deletion at `sequence` deleted here, if it was applied lately.
    pub(crate) fn deleted_by(&self, sequence: u64) -> Option<u64> {
        let deletions = self.deletions.lock().ok()?;
        deletions
            .iter()
            .find(|&&(applied, _)| applied == sequence)
            .map(|&(_, deleted)| deleted)
    }

    async fn delete(&self, query: &str, given: Option<u64>, hot: bool) -> Result<Deleted> {
        let writer = self.writer.lock().await;
        let deleted = self.tiers.delete_query(query, given, hot).await?;
        if deleted.applied {
            if let Ok(mut deletions) = self.deletions.lock() {
                if deletions.len() == DELETIONS_KEPT {
                    deletions.pop_front();
                }
                deletions.push_back((deleted.sequence, deleted.results));
            }
            self.publish(deleted.sequence);
            tracing::info!(
                query,
                sequence = deleted.sequence,
                deleted = deleted.results,
                "deleted every result of a query"
            );
        }
        drop(writer);
        metrics::counter!("runnel_store_results_deleted_total").increment(deleted.results);
        Ok(deleted)
    }

    /// Publishes `applied` as the last sequence applied, if it is later.
    fn publish(&self, applied: u64) {
        if applied > *self.applied.borrow() {
            self.applied.send_replace(applied);
            metrics::gauge!("runnel_store_last_sequence").set(applied as f64);
        }
    }

    async fn write(
        &self,
        results: Vec<QueryResult>,
        sequences: Sequences,
        hot: bool,
    ) -> Result<()> {
        let writer = self.writer.lock().await;
        let Written {
            results, applied, ..
        } = self.tiers.put(results, sequences, hot).await?;
        let count = results.len() as u64;
        for result in results {
            // No watchers is not an error.
            let _ = self.written.send(result);
        }
        self.publish(applied);
        drop(writer);
        metrics::counter!("runnel_store_results_written_total").increment(count);
        Ok(())
    }

    /// Live results from now on, and the last sequence announced before them.
    pub(crate) fn subscribe(&self) -> (broadcast::Receiver<Arc<QueryResult>>, u64) {
        // Subscribe before reading the position, so nothing falls between the two.
        let live = self.written.subscribe();
        (live, *self.applied.borrow())
    }

    /// The last sequence applied.
    pub(crate) fn applied(&self) -> u64 {
        *self.applied.borrow()
    }

    /// Waits until `sequence` is applied here: `Put` reads its own writes on this replica.
    pub(crate) async fn applied_through(&self, sequence: u64) -> Result<()> {
        let mut applied = self.applied.subscribe();
        applied
            .wait_for(|&applied| applied >= sequence)
            .await
            .map(drop)
            .map_err(|_| StoreError::NotFollowing)
    }
}
