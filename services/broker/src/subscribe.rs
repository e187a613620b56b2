//! `Subscribe`: long-lived streams of records, for one partition or for a group member.
//!
//! A storage engine *follows* a partition ([`Storage::follow`]): records from an offset,
//! then new ones as they come, in chunks through a bounded channel — so a consumer that
//! stops reading stops the follower (HTTP/2 flow control does the rest) and memory stays
//! bounded however slow the client. The embedded engine's follower is in
//! [`crate::storage::embedded`].
//!
//! A group member's stream is a [`MemberStream`]: it follows the member's assignment,
//! sending each new assignment before any record of it, following each owned partition
//! (from the group's committed offset, or the start or end of the partition if none — the
//! assignment's `starts` say which offset each newly followed partition starts at, with the
//! metadata committed with it, so a member restores exactly the state that offset needs),
//! dropping the followers of partitions taken away, and — for at-most-once delivery —
//! committing each chunk's offsets before sending it.

use crate::error::Result;
use crate::groups::{self, Coordinator, MemberView, Membership};
use crate::storage::{Committed, Follow, Followed, Storage};
use runnel_proto::v1::subscribe_response::Message;
use runnel_proto::v1::{Assignment, Delivery, PartitionOffset, StartFrom, SubscribeResponse};
use runnel_server::Shutdown;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tonic::Status;

/// Chunks buffered between followers and a member's stream.
const CHUNK_BUFFER: usize = 16;

/// What a stream sends.
pub(crate) type Outgoing = mpsc::Sender<std::result::Result<SubscribeResponse, Status>>;

/// Tells a client its stream ends because the broker stops (so it reconnects rather than
/// assume the partition ended), without waiting on a full buffer.
fn stopping(output: &Outgoing) {
    let _ = output.try_send(Err(Status::unavailable(
        "the broker is shutting down; subscribe again",
    )));
}

/// Streams one followed partition straight to a client.
pub(crate) async fn stream_partition(
    topic: String,
    partition: u32,
    stored: bool,
    mut follow: Follow,
    output: Outgoing,
    shutdown: Shutdown,
) {
    let delivered = metrics::counter!("runnel_broker_fetch_records_total", "topic" => topic, "rpc" => "subscribe");
    loop {
        let next = tokio::select! {
            next = follow.recv() => next,
            () = output.closed() => return,
            () = shutdown.wait() => {
                stopping(&output);
                return;
            }
        };
        let message = match next {
            Some(Ok(followed)) => {
                delivered.increment(followed.next_offset() - followed.from);
                followed
                    .into_chunk(partition, 0, stored)
                    .map(|chunk| SubscribeResponse {
                        message: Some(Message::Records(chunk)),
                    })
            }
            Some(Err(status)) => Err(status),
            None if shutdown.is_triggered() => {
                stopping(&output);
                return;
            }
            None => Err(Status::unavailable(
                "the partition's follower stopped; subscribe again",
            )),
        };
        let failed = message.is_err();
        if output.send(message).await.is_err() || failed {
            return;
        }
    }
}

/// Records of one partition for a member's stream, from follower `reader`.
struct Chunk {
    reader: u64,
    partition: u32,
    followed: std::result::Result<Followed, Status>,
}

/// A group member's stream.
pub(crate) struct MemberStream {
    pub(crate) membership: Membership,
    pub(crate) storage: Arc<dyn Storage>,
    pub(crate) coordinator: Arc<Coordinator>,
    pub(crate) group: String,
    pub(crate) topic: String,
    pub(crate) member_id: String,
    pub(crate) delivery: Delivery,
    pub(crate) start_from: StartFrom,
    pub(crate) max_bytes: usize,
    /// Deliver stored batches as they are (`SubscribeRequest.stored`).
    pub(crate) stored: bool,
    pub(crate) shutdown: Shutdown,
}

/// A followed, owned partition.
struct Owned {
    reader: u64,
    task: JoinHandle<()>,
}

impl MemberStream {
    /// Where a newly owned partition starts: the committed offset (kept within what the
    /// partition holds), else its start or end.
    async fn start_offset(
        &self,
        partition: u32,
        committed: &BTreeMap<u32, Committed>,
    ) -> Result<u64> {
        let (start, end) = self.storage.bounds(&self.topic, partition).await?;
        Ok(match committed.get(&partition) {
            Some(commit) => commit.offset.clamp(start, end),
            None if self.start_from == StartFrom::Latest => end,
            None => start,
        })
    }

    /// Starts following `partition` for this member; answers where it starts, with the
    /// metadata committed with that offset.
    async fn own(
        &self,
        partition: u32,
        reader: u64,
        committed: &BTreeMap<u32, Committed>,
        chunks: &mpsc::Sender<Chunk>,
    ) -> Result<(Owned, PartitionOffset)> {
        let from = self.start_offset(partition, committed).await?;
        let start = PartitionOffset {
            partition,
            offset: from,
            metadata: committed
                .get(&partition)
                .map(|c| c.metadata.to_vec())
                .unwrap_or_default(),
        };
        let mut follow = self
            .storage
            .follow(
                &self.topic,
                partition,
                from,
                self.max_bytes,
                self.shutdown.clone(),
            )
            .await?;
        let chunks = chunks.clone();
        let task = tokio::spawn(async move {
            while let Some(followed) = follow.recv().await {
                let failed = followed.is_err();
                if chunks
                    .send(Chunk {
                        reader,
                        partition,
                        followed,
                    })
                    .await
                    .is_err()
                    || failed
                {
                    return;
                }
            }
        });
        Ok((Owned { reader, task }, start))
    }

    /// Runs the member's stream until the client leaves, the member is removed, or the
    /// broker stops.
    pub(crate) async fn run(mut self, output: Outgoing) {
        let (chunks, mut incoming) = mpsc::channel::<Chunk>(CHUNK_BUFFER);
        let mut owned: HashMap<u32, Owned> = HashMap::new();
        let mut generation = 0;
        let mut next_reader = 0u64;
        let reason = loop {
            tokio::select! {
                changed = self.membership.view.changed() => {
                    if changed.is_err() {
                        break "membership ended".to_owned();
                    }
                    let view = self.membership.view.borrow_and_update().clone();
                    let (current, partitions) = match view {
                        MemberView::Removed(why) => {
                            let _ = output.send(Err(Status::aborted(why.clone()))).await;
                            break why;
                        }
                        MemberView::Assigned { generation, partitions } => (generation, partitions),
                    };
                    generation = current;
                    owned.retain(|p, followed| {
                        let keep = partitions.contains(p);
                        if !keep {
                            followed.task.abort();
                        }
                        keep
                    });
                    let committed = match self.storage.committed(&self.group, &self.topic).await {
                        Ok(committed) => committed,
                        Err(error) => {
                            let _ = output.send(Err(error.into())).await;
                            break "offsets unreadable".to_owned();
                        }
                    };
                    let mut failure = None;
                    let mut starts = Vec::new();
                    for &p in &partitions {
                        if owned.contains_key(&p) {
                            continue;
                        }
                        next_reader += 1;
                        match self.own(p, next_reader, &committed, &chunks).await {
                            Ok((followed, start)) => {
                                owned.insert(p, followed);
                                starts.push(start);
                            }
                            Err(error) => {
                                failure = Some(error);
                                break;
                            }
                        }
                    }
                    if let Some(error) = failure {
                        let _ = output.send(Err(error.into())).await;
                        break "follow failed".to_owned();
                    }
                    // Sent before any record of the new readers: their chunks come through
                    // this loop.
                    let message = SubscribeResponse {
                        message: Some(Message::Assignment(Assignment { generation, partitions, starts })),
                    };
                    if output.send(Ok(message)).await.is_err() {
                        break "client gone".to_owned();
                    }
                }
                Some(chunk) = incoming.recv() => {
                    // Chunks from a follower that was dropped (its partition taken away)
                    // are dropped too: the partition's new owner starts from the committed
                    // offset.
                    if owned.get(&chunk.partition).is_none_or(|o| o.reader != chunk.reader) {
                        continue;
                    }
                    let followed = match chunk.followed {
                        Ok(followed) => followed,
                        Err(status) => {
                            let _ = output.send(Err(status)).await;
                            break "follower failed".to_owned();
                        }
                    };
                    if self.delivery == Delivery::AtMostOnce && !self.commit_before_delivery(chunk.partition, followed.next_offset(), generation).await {
                        continue;
                    }
                    let message = match followed.into_chunk(chunk.partition, generation, self.stored) {
                        Ok(records) => SubscribeResponse { message: Some(Message::Records(records)) },
                        Err(status) => {
                            let _ = output.send(Err(status)).await;
                            break "follower failed".to_owned();
                        }
                    };
                    if output.send(Ok(message)).await.is_err() {
                        break "client gone".to_owned();
                    }
                }
                () = output.closed() => break "client gone".to_owned(),
                () = self.shutdown.wait() => {
                    stopping(&output);
                    break "shutdown".to_owned();
                }
            }
        };
        for followed in owned.values() {
            followed.task.abort();
        }
        tracing::debug!(group = %self.group, topic = %self.topic, member = %self.member_id, reason, "member stream ended");
    }

    /// At most once: the group's offset moves past the records before the member sees them.
    async fn commit_before_delivery(&self, partition: u32, next: u64, generation: u64) -> bool {
        if let Err(error) = self
            .coordinator
            .heartbeat(
                &self.group,
                &self.topic,
                &self.member_id,
                generation,
                &[partition],
                groups::now_ms(),
            )
            .await
        {
            tracing::debug!(%error, "not delivering: the partition moved");
            return false;
        }
        let next = BTreeMap::from([(partition, Committed::offset(next))]);
        match self.storage.commit(&self.group, &self.topic, next).await {
            Ok(_) => true,
            Err(error) => {
                tracing::error!(%error, "at-most-once commit failed; not delivering");
                false
            }
        }
    }
}
