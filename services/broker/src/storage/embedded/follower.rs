//! The embedded engine's follower of one partition: reads what the partition holds from an
//! offset on, then waits on its end offset (with durable reads, its durable offset) for
//! more, handing records on in chunks through a bounded channel (see
//! [`Storage::follow`](crate::storage::Storage::follow)).

use super::durability::GroupCommit;
use super::partition::Partition;
use crate::error::{BrokerError, Result};
use crate::storage::Followed;
use runnel_server::Shutdown;
use std::sync::Arc;
use tokio::sync::mpsc;
use tonic::Status;

/// Bytes of batches a reader takes from disk at a time.
const READ_BYTES: usize = 1 << 20;

/// The embedded engine's follower of one partition.
pub(crate) struct PartitionReader {
    pub(crate) partition: Arc<Partition>,
    pub(crate) next: u64,
    pub(crate) max_bytes: usize,
    pub(crate) shutdown: Shutdown,
    /// With durable reads, the group commit to ask for an fsync of what this reader waits
    /// for: it reads only below the durable offset.
    pub(crate) durable_reads: Option<Arc<GroupCommit>>,
}

impl PartitionReader {
    /// Reads records into `sink` until the receiver goes away or the broker stops; a read
    /// that fails ends it with the error.
    pub(crate) async fn run(mut self, sink: mpsc::Sender<std::result::Result<Followed, Status>>) {
        let mut end = self.partition.watch_end();
        let mut durable = self.partition.watch_durable();
        loop {
            let written = *end.borrow_and_update();
            let available = match &self.durable_reads {
                None => written,
                Some(group_commit) => {
                    let synced = *durable.borrow_and_update();
                    if self.next >= synced.offset && synced.offset < written {
                        if synced.failed {
                            // What follows will never be durable: nothing more to show.
                            let failed = BrokerError::PartitionFailed {
                                topic: self.partition.topic().to_owned(),
                                partition: self.partition.id(),
                            };
                            let _ = sink.send(Err(failed.into())).await;
                            return;
                        }
                        group_commit.request(&self.partition);
                    }
                    synced.offset
                }
            };
            if self.next < available {
                let partition = Arc::clone(&self.partition);
                let (from, max_bytes) = (self.next, self.max_bytes.min(READ_BYTES));
                let read = tokio::task::spawn_blocking(move || -> Result<Followed> {
                    let read = partition.read_below(from, max_bytes, available)?;
                    Ok(Followed {
                        from,
                        batches: read.batches,
                    })
                })
                .await
                .map_err(BrokerError::from)
                .and_then(|read| read);
                let followed = match read {
                    Ok(followed) => followed,
                    Err(BrokerError::OffsetOutOfRange { start, .. }) if self.next < start => {
                        // Retention deleted what this reader had not read yet.
                        tracing::warn!(
                            topic = self.partition.topic(),
                            partition = self.partition.id(),
                            from = self.next,
                            to = start,
                            "skipping records deleted by retention"
                        );
                        metrics::counter!("runnel_broker_subscriber_retention_skips_total")
                            .increment(1);
                        self.next = start;
                        continue;
                    }
                    Err(error) => {
                        let _ = sink.send(Err(error.into())).await;
                        return;
                    }
                };
                if !followed.batches.is_empty() {
                    self.next = followed.next_offset();
                    tokio::select! {
                        sent = sink.send(Ok(followed)) => {
                            if sent.is_err() {
                                return;
                            }
                        }
                        () = self.shutdown.wait() => return,
                    }
                }
                continue;
            }
            tokio::select! {
                changed = end.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
                changed = durable.changed(), if self.durable_reads.is_some() => {
                    if changed.is_err() {
                        return;
                    }
                }
                () = sink.closed() => return,
                () = self.shutdown.wait() => return,
            }
        }
    }
}
