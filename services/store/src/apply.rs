//! The one write path: results go into long-term storage (and the hot tier), then are
//! announced to watchers in sequence order.
//!
//! Both ways of running use it. One replica without a broker numbers a `Put`'s results
//! itself ([`Applier::put`]); a replica of several applies the results log in the broker,
//! whose offsets number them ([`Applier::apply`], from [`crate::results_log`]). Either way
//! a result is announced only once it is committed, so a watcher never sees a result that
//! a crash could take back, and the last sequence applied is published for a `Put` that
//! waits to read its own writes on this replica.

use crate::durable::{Sequences, Written};
use crate::error::{Result, StoreError};
use crate::hot::HotTier;
use crate::tiers::Tiers;
use runnel_proto::v1::QueryResult;
use std::sync::Arc;
use tokio::sync::{Mutex, broadcast, watch};

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
        }
    }

    pub(crate) fn tiers(&self) -> &Arc<Tiers<H>> {
        &self.tiers
    }

    /// One replica, no broker: writes validated results, numbering them.
    pub(crate) async fn put(&self, results: Vec<QueryResult>) -> Result<()> {
        self.write(results, Sequences::Assign, true).await
    }

    /// Applies results of the results log, which carry their sequences; those applied
    /// already are skipped. Without `hot` the hot tier is left alone (see [`Tiers::put`]).
    pub(crate) async fn apply(&self, results: Vec<QueryResult>, hot: bool) -> Result<()> {
        self.write(results, Sequences::Given, hot).await
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
        if applied > *self.applied.borrow() {
            self.applied.send_replace(applied);
            metrics::gauge!("runnel_store_last_sequence").set(applied as f64);
        }
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
