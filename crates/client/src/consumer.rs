//! A consumer-group member.
//!
//! It subscribes with the group and its member id, follows the assignments the broker
//! sends, heartbeats in the background with the latest generation it has seen, and commits
//! offsets under that generation. Records come in chunks tagged with the generation they
//! were sent under; [`GroupConsumer::next`] hands on only those of the current one.
//!
//! The member is generic over how it decodes the `Subscribe` stream ([`SubscribeMessage`]):
//! as the generated `SubscribeResponse`, events decoded, or as a reader's own
//! wire-compatible message that leaves each event the bytes it arrived as (the analyzer's,
//! which reads only the fields a query needs). The protocol is the same either way.

use crate::ClientError;
use runnel_proto::records::RecordsError;
use runnel_proto::v1::broker_client::BrokerClient;
use runnel_proto::v1::subscribe_response::Message;
use runnel_proto::v1::{
    CommitOffsetsRequest, Delivery, GroupFence, PartitionOffset, Record, RecordChunk, StartFrom,
    SubscribeRequest, SubscribeResponse,
};
use runnel_security::Peer;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::task::JoinHandle;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::{Status, Streaming};

/// The largest records body of one batch, uncompressed, that a member reads (a broker
/// accepts none larger than a request may be).
const MAX_BATCH_BYTES: usize = 256 << 20;

/// How a [`GroupConsumer`] takes part in its group.
#[derive(Debug, Clone)]
pub struct ConsumerOptions {
    /// This member's id; a random one if `None`.
    pub member_id: Option<String>,
    /// At least once (commit after processing) or at most once (the broker commits).
    pub delivery: Delivery,
    /// Where a partition without a committed offset starts.
    pub start_from: StartFrom,
    /// How long the member may go without a heartbeat; heartbeats go every third of it.
    pub session_timeout: Duration,
}

impl Default for ConsumerOptions {
    fn default() -> Self {
        ConsumerOptions {
            member_id: None,
            delivery: Delivery::AtLeastOnce,
            start_from: StartFrom::Earliest,
            session_timeout: Duration::from_secs(10),
        }
    }
}

/// A message of the broker's `Subscribe` stream, in the form a reader decodes it to.
pub trait SubscribeMessage: prost::Message + Default + Send + 'static {
    /// One chunk of records of one partition, as this form holds it.
    type Records: Send;

    /// What the message says: a new assignment or a chunk of records (`None`: neither,
    /// e.g. a message kind this reader does not know). Chunks arrive as stored batches
    /// (the member asks for them: `SubscribeRequest.stored`), which each form reads its own
    /// way; a batch that does not read is an error.
    fn into_part(self) -> Result<Option<StreamPart<Self::Records>>, RecordsError>;
}

/// One message of the `Subscribe` stream, taken apart.
#[derive(Debug)]
pub enum StreamPart<R> {
    /// The member's new assignment.
    Assignment {
        /// Its generation.
        generation: u64,
        /// The partitions the member owns from now on.
        partitions: Vec<u32>,
        /// Where each partition whose delivery (re)starts starts, with the metadata
        /// committed with that offset.
        starts: Vec<PartitionOffset>,
    },
    /// Records of one partition, sent under the assignment of `generation`.
    Records {
        /// The generation they were sent under.
        generation: u64,
        /// The partition.
        partition: u32,
        /// The records.
        records: R,
    },
}

impl SubscribeMessage for SubscribeResponse {
    type Records = Vec<Record>;

    fn into_part(self) -> Result<Option<StreamPart<Vec<Record>>>, RecordsError> {
        let Some(message) = self.message else {
            return Ok(None);
        };
        Ok(match message {
            Message::Assignment(assignment) => Some(StreamPart::Assignment {
                generation: assignment.generation,
                partitions: assignment.partitions,
                starts: assignment.starts,
            }),
            Message::Records(RecordChunk {
                partition,
                mut records,
                generation,
                stored_batches,
                first_offset,
            }) => {
                if !stored_batches.is_empty() {
                    records = runnel_proto::stored::decode_records(
                        &stored_batches,
                        partition,
                        first_offset,
                        MAX_BATCH_BYTES,
                    )?;
                }
                Some(StreamPart::Records {
                    generation,
                    partition,
                    records,
                })
            }
        })
    }
}

/// What the stream brought.
#[derive(Debug, Clone, PartialEq)]
pub enum GroupEvent<R = Vec<Record>> {
    /// From now on the member owns these partitions.
    Assigned {
        /// The assignment's generation; commits carry it.
        generation: u64,
        /// The partitions owned.
        partitions: Vec<u32>,
        /// The partitions whose records start over with this assignment: the offset of
        /// the first record each will deliver and the metadata committed with it (empty if
        /// none). An owned partition not listed here continues where it was, under the same
        /// member: whatever the member holds for it is still current.
        starts: Vec<PartitionOffset>,
    },
    /// Records of one owned partition, in offset order.
    Records {
        /// The partition.
        partition: u32,
        /// The records.
        records: R,
    },
}

/// A member of a consumer group, decoding the stream as `M`.
#[derive(Debug)]
pub struct GroupConsumer<M = SubscribeResponse> {
    broker: BrokerClient<Peer>,
    group: String,
    topic: String,
    member_id: String,
    stream: Streaming<M>,
    generation: Arc<AtomicU64>,
    assigned: Vec<u32>,
    heartbeats: JoinHandle<()>,
}

impl<M> Drop for GroupConsumer<M> {
    fn drop(&mut self) {
        self.heartbeats.abort();
    }
}

impl GroupConsumer {
    /// Joins `group` on `topic`, with events decoded.
    pub async fn join(
        mut broker: BrokerClient<Peer>,
        group: &str,
        topic: &str,
        options: ConsumerOptions,
    ) -> Result<GroupConsumer, ClientError> {
        let (member_id, request) = subscription(group, topic, &options);
        let stream = broker
            .subscribe(request)
            .await
            .map_err(ClientError::Broker)?
            .into_inner();
        Ok(GroupConsumer::start(
            broker, stream, group, topic, member_id, &options,
        ))
    }
}

impl<M: SubscribeMessage> GroupConsumer<M> {
    /// Joins `group` on `topic` over `channel`, decoding the stream as `M`, with messages
    /// of up to `max_message_bytes`.
    pub async fn join_decoding(
        channel: Peer,
        max_message_bytes: usize,
        group: &str,
        topic: &str,
        options: ConsumerOptions,
    ) -> Result<GroupConsumer<M>, ClientError> {
        let (member_id, request) = subscription(group, topic, &options);
        let mut grpc =
            tonic::client::Grpc::new(channel.clone()).max_decoding_message_size(max_message_bytes);
        grpc.ready().await.map_err(|e| {
            ClientError::Broker(Status::unavailable(format!("broker not ready: {e}")))
        })?;
        let codec = runnel_proto::codec::PresizedCodec::<SubscribeRequest, M>::default();
        let path = PathAndQuery::from_static("/runnel.v1.Broker/Subscribe");
        let stream = grpc
            .server_streaming(tonic::Request::new(request), path, codec)
            .await
            .map_err(ClientError::Broker)?
            .into_inner();
        let broker = BrokerClient::new(channel);
        Ok(GroupConsumer::start(
            broker, stream, group, topic, member_id, &options,
        ))
    }

    /// A member reading `stream`, heartbeating in the background from now on.
    fn start(
        broker: BrokerClient<Peer>,
        stream: Streaming<M>,
        group: &str,
        topic: &str,
        member_id: String,
        options: &ConsumerOptions,
    ) -> GroupConsumer<M> {
        let generation = Arc::new(AtomicU64::new(0));
        let heartbeats = tokio::spawn(heartbeat(
            broker.clone(),
            CommitOffsetsRequest {
                group: group.to_owned(),
                topic: topic.to_owned(),
                member_id: member_id.clone(),
                ..CommitOffsetsRequest::default()
            },
            Arc::clone(&generation),
            options.session_timeout / 3,
        ));
        GroupConsumer {
            broker,
            group: group.to_owned(),
            topic: topic.to_owned(),
            member_id,
            stream,
            generation,
            assigned: Vec::new(),
            heartbeats,
        }
    }

    /// This member's id.
    pub fn member_id(&self) -> &str {
        &self.member_id
    }

    /// The generation of the current assignment (0 before the first).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The partitions this member owns.
    pub fn assigned(&self) -> &[u32] {
        &self.assigned
    }

    /// The next assignment or records; `None` when the broker ended the stream. An error
    /// is the broker's reason for ending it (ABORTED: the member was removed from the
    /// group; UNAVAILABLE: the broker is stopping).
    pub async fn next(&mut self) -> Result<Option<GroupEvent<M::Records>>, ClientError> {
        loop {
            let Some(message) = self.stream.message().await.map_err(ClientError::Broker)? else {
                return Ok(None);
            };
            let part = message.into_part().map_err(|error| {
                ClientError::Broker(Status::data_loss(format!(
                    "the broker sent records that do not read: {error}"
                )))
            })?;
            match part {
                Some(StreamPart::Assignment {
                    generation,
                    partitions,
                    starts,
                }) => {
                    self.generation.store(generation, Ordering::Release);
                    self.assigned = partitions.clone();
                    return Ok(Some(GroupEvent::Assigned {
                        generation,
                        partitions,
                        starts,
                    }));
                }
                Some(StreamPart::Records {
                    generation,
                    partition,
                    records,
                }) => {
                    // Sent under an assignment this member has already moved past.
                    if generation != self.generation() || !self.assigned.contains(&partition) {
                        continue;
                    }
                    return Ok(Some(GroupEvent::Records { partition, records }));
                }
                None => continue,
            }
        }
    }

    /// Commits `offsets` (partition → the next offset to read) under the current
    /// generation, and returns the group's committed offsets after it.
    pub async fn commit(
        &mut self,
        offsets: &[(u32, u64)],
    ) -> Result<BTreeMap<u32, u64>, ClientError> {
        let offsets = offsets
            .iter()
            .map(|&(partition, offset)| PartitionOffset {
                partition,
                offset,
                ..PartitionOffset::default()
            })
            .collect();
        let committed = self.commit_with_metadata(offsets).await?;
        Ok(committed
            .into_iter()
            .map(|o| (o.partition, o.offset))
            .collect())
    }

    /// Commits each partition's next offset together with its metadata (at most 64 KiB:
    /// say, a handle to the state the member checkpointed at that offset), atomically,
    /// under the current generation; returns the group's commits after it. A member that
    /// no longer owns a partition it names gets `FAILED_PRECONDITION`: it has been fenced.
    pub async fn commit_with_metadata(
        &mut self,
        offsets: Vec<PartitionOffset>,
    ) -> Result<Vec<PartitionOffset>, ClientError> {
        let request = CommitOffsetsRequest {
            group: self.group.clone(),
            topic: self.topic.clone(),
            member_id: self.member_id.clone(),
            generation: self.generation(),
            offsets,
        };
        Ok(self
            .broker
            .commit_offsets(request)
            .await
            .map_err(ClientError::Broker)?
            .into_inner()
            .committed)
    }

    /// The fence for writes made on behalf of `partitions` under the current generation
    /// (`Producer::set_fence`, the store's `Put`): refused once the member no longer owns
    /// them.
    pub fn fence(&self, partitions: Vec<u32>) -> GroupFence {
        GroupFence {
            group: self.group.clone(),
            topic: self.topic.clone(),
            member_id: self.member_id.clone(),
            generation: self.generation(),
            partitions,
        }
    }
}

/// This member's id (`options`' or a random one) and its `Subscribe` request.
fn subscription(group: &str, topic: &str, options: &ConsumerOptions) -> (String, SubscribeRequest) {
    let member_id = options
        .member_id
        .clone()
        .unwrap_or_else(|| format!("member-{:016x}", rand::random::<u64>()));
    let request = SubscribeRequest {
        topic: topic.to_owned(),
        group: group.to_owned(),
        member_id: member_id.clone(),
        delivery: options.delivery as i32,
        start_from: options.start_from as i32,
        session_timeout: Some(prost_duration(options.session_timeout)),
        stored: true,
        ..SubscribeRequest::default()
    };
    (member_id, request)
}

/// Heartbeats every `every` with the latest generation, until the consumer is dropped.
async fn heartbeat(
    mut broker: BrokerClient<Peer>,
    mut request: CommitOffsetsRequest,
    generation: Arc<AtomicU64>,
    every: Duration,
) {
    let mut ticker = tokio::time::interval(every.max(Duration::from_millis(10)));
    ticker.tick().await;
    loop {
        ticker.tick().await;
        request.generation = generation.load(Ordering::Acquire);
        if let Err(status) = broker.commit_offsets(request.clone()).await {
            // A rebalance the member has not read yet, or a broker restart: the next beat
            // tries again; the stream tells the member if it was removed.
            tracing::debug!(code = ?status.code(), error = status.message(), "heartbeat refused");
        }
    }
}

fn prost_duration(duration: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: duration.as_secs() as i64,
        nanos: duration.subsec_nanos() as i32,
    }
}
