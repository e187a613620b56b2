//! Group commit: one fsync for every producer that is waiting on a partition.
//!
//! A producer that asked for DURABLE acks appends its batch (to the page cache, under the
//! partition's lock), asks the [`GroupCommit`] for a sync and waits for the partition's
//! durable offset to pass its batch. The group commit task fsyncs each partition that has
//! waiters — on a blocking thread, with a second file handle, so appends go on meanwhile —
//! and publishes how far it got. Whatever is appended while one fsync runs is covered by
//! the next: under load, many producers share each fsync, and an idle partition costs
//! nothing.

use super::partition::Partition;
use runnel_server::Shutdown;
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;

/// The partitions waiting for an fsync, and the task that does them.
#[derive(Debug, Default)]
pub(crate) struct GroupCommit {
    pending: Mutex<Vec<Arc<Partition>>>,
    wake: Notify,
}

impl GroupCommit {
    /// Asks for `partition` to be fsync'd up to its end offset as soon as possible.
    pub(crate) fn request(&self, partition: &Arc<Partition>) {
        {
            let mut pending = self
                .pending
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if !pending.iter().any(|p| Arc::ptr_eq(p, partition)) {
                pending.push(Arc::clone(partition));
            }
        }
        self.wake.notify_one();
    }

    /// Syncs what is asked for, round after round, until `stop` fires.
    pub(crate) async fn run(self: Arc<Self>, stop: Shutdown) {
        let fsyncs = metrics::counter!("runnel_broker_group_commits_total");
        loop {
            tokio::select! {
                () = self.wake.notified() => {}
                () = stop.wait() => return,
            }
            let round: Vec<Arc<Partition>> = std::mem::take(
                &mut *self
                    .pending
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner),
            );
            let syncs = round.into_iter().map(|partition| {
                tokio::task::spawn_blocking(move || {
                    if let Err(error) = partition.sync_to_end() {
                        // The partition marked itself failed; its waiters are told.
                        tracing::error!(%error, "group commit failed");
                    }
                })
            });
            let done = futures::future::join_all(syncs).await;
            fsyncs.increment(done.len() as u64);
        }
    }
}
