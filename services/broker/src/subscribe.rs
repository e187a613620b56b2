//! `Subscribe`: long-lived streams of records, for one partition or for a group member.
//!
//! A [`PartitionReader`] follows one partition from an offset: it reads whole batches on a
//! blocking thread, decodes the records and hands them on in chunks, then waits on the
//! partition's end offset for more. Every hand-off is a bounded channel, so a consumer
//! that stops reading stops the reader (HTTP/2 flow control does the rest): memory stays
//! bounded however slow the client.
//!
//! A group member's stream is a [`MemberStream`]: it follows the member's assignment,
//! sending each new assignment before any record of it, running one reader per owned
//! partition (from the group's committed offset, or the start or end of the partition if
//! none), stopping the readers of partitions taken away, and — for at-most-once delivery —
//! committing each chunk's offsets before sending it.

use crate::error::{BrokerError, Result};
use crate::groups::{MemberView, Membership};
use crate::offsets::OffsetStore;
use crate::partition::Partition;
use runnel_proto::v1::subscribe_response::Message;
use runnel_proto::v1::{Assignment, Delivery, Record, RecordChunk, StartFrom, SubscribeResponse};
use runnel_server::Shutdown;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tonic::Status;

/// Bytes of batches a reader takes from disk at a time.
const READ_BYTES: usize = 1 << 20;
/// Chunks buffered between readers and the stream: enough to keep a healthy stream busy,
/// small enough that a stalled client pins little memory.
const CHUNK_BUFFER: usize = 16;

/// What a stream sends.
pub(crate) type Outgoing = mpsc::Sender<std::result::Result<SubscribeResponse, Status>>;

/// Records of one partition for a stream, from reader `reader`.
struct Chunk {
    reader: u64,
    partition: u32,
    records: Vec<Record>,
}

/// Follows one partition from an offset.
pub(crate) struct PartitionReader {
    pub(crate) partition: Arc<Partition>,
    pub(crate) next: u64,
    pub(crate) max_bytes: usize,
    pub(crate) shutdown: Shutdown,
}

impl PartitionReader {
    /// Reads records and hands them to `sink` (each chunk made into a message by `wrap`)
    /// until the receiver goes away or the broker stops; a read that fails ends it with the
    /// error. Returns why it stopped.
    async fn run<T>(
        mut self,
        sink: &mpsc::Sender<T>,
        wrap: impl Fn(Vec<Record>) -> T,
    ) -> std::result::Result<&'static str, Status> {
        let mut end = self.partition.watch_end();
        loop {
            let available = *end.borrow_and_update();
            if self.next < available {
                let partition = Arc::clone(&self.partition);
                let (from, max_bytes) = (self.next, self.max_bytes.min(READ_BYTES));
                let read = tokio::task::spawn_blocking(move || -> Result<Vec<Record>> {
                    let read = partition.read(from, max_bytes)?;
                    let mut records = Vec::new();
                    for batch in read.batches {
                        records.extend(batch.records(partition.id(), from).map_err(|reason| {
                            BrokerError::Corrupt {
                                path: partition.topic().into(),
                                position: batch.header.base_offset,
                                reason,
                            }
                        })?);
                    }
                    Ok(records)
                })
                .await
                .map_err(BrokerError::from)
                .and_then(|read| read);
                let records = match read {
                    Ok(records) => records,
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
                    Err(error) => return Err(error.into()),
                };
                if let Some(last) = records.last() {
                    self.next = last.offset + 1;
                    tokio::select! {
                        sent = sink.send(wrap(records)) => {
                            if sent.is_err() {
                                return Ok("receiver gone");
                            }
                        }
                        () = self.shutdown.wait() => return Ok("shutdown"),
                    }
                }
                continue;
            }
            tokio::select! {
                changed = end.changed() => {
                    if changed.is_err() {
                        return Ok("partition closed");
                    }
                }
                () = self.shutdown.wait() => return Ok("shutdown"),
            }
        }
    }
}

/// Streams one partition straight to a client.
pub(crate) async fn stream_partition(reader: PartitionReader, output: Outgoing) {
    let partition = reader.partition.id();
    let delivered = metrics::counter!("runnel_broker_fetch_records_total", "topic" => reader.partition.topic().to_owned(), "rpc" => "subscribe");
    let wrap = |records: Vec<Record>| {
        delivered.increment(records.len() as u64);
        Ok(SubscribeResponse {
            message: Some(Message::Records(RecordChunk {
                partition,
                records,
                generation: 0,
            })),
        })
    };
    let ended = tokio::select! {
        ended = reader.run(&output, wrap) => ended,
        () = output.closed() => Ok("client gone"),
    };
    match ended {
        Err(status) => {
            let _ = output.send(Err(status)).await;
        }
        Ok("shutdown") => stopping(&output),
        Ok(_) => {}
    }
}

/// Tells a client its stream ends because the broker stops (so it reconnects rather than
/// assume the partition ended), without waiting on a full buffer.
fn stopping(output: &Outgoing) {
    let _ = output.try_send(Err(Status::unavailable(
        "the broker is shutting down; subscribe again",
    )));
}

/// A group member's stream.
pub(crate) struct MemberStream {
    pub(crate) membership: Membership,
    pub(crate) partitions: Vec<Arc<Partition>>,
    pub(crate) offsets: Arc<OffsetStore>,
    pub(crate) coordinator: Arc<crate::groups::Coordinator>,
    pub(crate) group: String,
    pub(crate) topic: String,
    pub(crate) member_id: String,
    pub(crate) delivery: Delivery,
    pub(crate) start_from: StartFrom,
    pub(crate) max_bytes: usize,
    pub(crate) shutdown: Shutdown,
}

/// A running reader of one owned partition.
struct Owned {
    reader: u64,
    task: JoinHandle<()>,
}

impl MemberStream {
    /// Where a newly owned partition starts: the committed offset (kept within what the
    /// partition holds), else its start or end.
    fn start_offset(&self, partition: &Partition, committed: &BTreeMap<u32, u64>) -> u64 {
        let (start, end) = (partition.start_offset(), partition.end_offset());
        match committed.get(&partition.id()) {
            Some(&offset) => offset.clamp(start, end),
            None if self.start_from == StartFrom::Latest => end,
            None => start,
        }
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
                    match view {
                        MemberView::Removed(why) => {
                            let _ = output.send(Err(Status::aborted(why.clone()))).await;
                            break why;
                        }
                        MemberView::Assigned { generation: current, partitions } => {
                            generation = current;
                            owned.retain(|p, reader| {
                                let keep = partitions.contains(p);
                                if !keep {
                                    reader.task.abort();
                                }
                                keep
                            });
                            let message = SubscribeResponse {
                                message: Some(Message::Assignment(Assignment { generation, partitions: partitions.clone() })),
                            };
                            if output.send(Ok(message)).await.is_err() {
                                break "client gone".to_owned();
                            }
                            let committed = self.offsets.committed(&self.group, &self.topic);
                            for p in partitions {
                                if owned.contains_key(&p) {
                                    continue;
                                }
                                let Some(partition) = self.partitions.get(p as usize).cloned() else {
                                    continue;
                                };
                                next_reader += 1;
                                let reader = PartitionReader {
                                    next: self.start_offset(&partition, &committed),
                                    partition,
                                    max_bytes: self.max_bytes,
                                    shutdown: self.shutdown.clone(),
                                };
                                let (chunks, id) = (chunks.clone(), next_reader);
                                let task = tokio::spawn(async move {
                                    let wrap = |records| Chunk { reader: id, partition: p, records };
                                    if let Err(status) = reader.run(&chunks, wrap).await {
                                        tracing::error!(partition = p, error = %status.message(), "group member's partition reader failed");
                                    }
                                });
                                owned.insert(p, Owned { reader: id, task });
                            }
                        }
                    }
                }
                Some(chunk) = incoming.recv() => {
                    // Chunks from a reader that was stopped (its partition taken away) are
                    // dropped: the partition's new owner starts from the committed offset.
                    if owned.get(&chunk.partition).is_none_or(|o| o.reader != chunk.reader) {
                        continue;
                    }
                    if self.delivery == Delivery::AtMostOnce && !self.commit_before_delivery(&chunk, generation).await {
                        continue;
                    }
                    let message = SubscribeResponse {
                        message: Some(Message::Records(RecordChunk { partition: chunk.partition, records: chunk.records, generation })),
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
        for reader in owned.values() {
            reader.task.abort();
        }
        tracing::debug!(group = %self.group, topic = %self.topic, member = %self.member_id, reason, "member stream ended");
    }

    /// At most once: the group's offset moves past the chunk before the member sees it.
    async fn commit_before_delivery(&self, chunk: &Chunk, generation: u64) -> bool {
        let Some(last) = chunk.records.last() else {
            return false;
        };
        if let Err(error) = self.coordinator.heartbeat(
            &self.group,
            &self.topic,
            &self.member_id,
            generation,
            [chunk.partition],
            Instant::now(),
        ) {
            tracing::debug!(%error, "not delivering: the partition moved");
            return false;
        }
        let offsets = Arc::clone(&self.offsets);
        let (group, topic) = (self.group.clone(), self.topic.clone());
        let next = BTreeMap::from([(chunk.partition, last.offset + 1)]);
        match tokio::task::spawn_blocking(move || offsets.commit(&group, &topic, &next)).await {
            Ok(Ok(_)) => true,
            Ok(Err(error)) => {
                tracing::error!(%error, "at-most-once commit failed; not delivering");
                false
            }
            Err(error) => {
                tracing::error!(%error, "at-most-once commit task failed; not delivering");
                false
            }
        }
    }
}
