//! Membership of a consumer group, reading records without decoding their events.
//!
//! The same protocol as `runnel-client`'s `GroupConsumer` — subscribe with the group and a
//! member id, follow assignments, heartbeat with the latest generation, commit under it —
//! but the stream is decoded with [`RawSubscribeResponse`], so each event stays the bytes
//! it arrived as until [`crate::event::EventView`] reads it.

use crate::event::{RawMessage, RawRecordChunk, RawSubscribeResponse};
use runnel_proto::v1::{
    CommitOffsetsRequest, Delivery, PartitionOffset, StartFrom, SubscribeRequest,
};
use runnel_security::Peer;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::task::JoinHandle;
use tonic::Status;
use tonic::codec::Streaming;

/// What the group stream brought.
#[derive(Debug)]
pub(crate) enum GroupEvent {
    /// From now on the member owns these partitions.
    Assigned(Vec<u32>),
    /// Records of an owned partition, in offset order.
    Records(RawRecordChunk),
}

/// A member of one group on one topic.
#[derive(Debug)]
pub(crate) struct Member {
    broker: runnel_proto::v1::broker_client::BrokerClient<Peer>,
    group: String,
    topic: String,
    member_id: String,
    stream: Streaming<RawSubscribeResponse>,
    generation: Arc<AtomicU64>,
    assigned: Vec<u32>,
    heartbeats: JoinHandle<()>,
}

impl Drop for Member {
    fn drop(&mut self) {
        self.heartbeats.abort();
    }
}

impl Member {
    /// Joins `group` on `topic` as `member_id`.
    pub(crate) async fn join(
        channel: Peer,
        group: &str,
        topic: &str,
        member_id: &str,
        session_timeout: Duration,
        max_message: usize,
    ) -> Result<Member, Status> {
        let request = SubscribeRequest {
            topic: topic.to_owned(),
            group: group.to_owned(),
            member_id: member_id.to_owned(),
            delivery: Delivery::AtLeastOnce as i32,
            start_from: StartFrom::Earliest as i32,
            session_timeout: Some(prost_types::Duration {
                seconds: session_timeout.as_secs() as i64,
                nanos: session_timeout.subsec_nanos() as i32,
            }),
            ..SubscribeRequest::default()
        };
        let mut grpc =
            tonic::client::Grpc::new(channel.clone()).max_decoding_message_size(max_message);
        grpc.ready()
            .await
            .map_err(|e| Status::unavailable(format!("broker not ready: {e}")))?;
        let codec = tonic_prost::ProstCodec::<SubscribeRequest, RawSubscribeResponse>::default();
        let path = http::uri::PathAndQuery::from_static("/runnel.v1.Broker/Subscribe");
        let stream = grpc
            .server_streaming(tonic::Request::new(request), path, codec)
            .await?
            .into_inner();
        let broker = runnel_proto::v1::broker_client::BrokerClient::new(channel);
        let generation = Arc::new(AtomicU64::new(0));
        let heartbeats = tokio::spawn(heartbeat(
            broker.clone(),
            CommitOffsetsRequest {
                group: group.to_owned(),
                topic: topic.to_owned(),
                member_id: member_id.to_owned(),
                ..CommitOffsetsRequest::default()
            },
            Arc::clone(&generation),
            session_timeout / 3,
        ));
        Ok(Member {
            broker,
            group: group.to_owned(),
            topic: topic.to_owned(),
            member_id: member_id.to_owned(),
            stream,
            generation,
            assigned: Vec::new(),
            heartbeats,
        })
    }

    /// The next assignment or records; `None` when the broker ended the stream.
    pub(crate) async fn next(&mut self) -> Result<Option<GroupEvent>, Status> {
        loop {
            let Some(message) = self.stream.message().await? else {
                return Ok(None);
            };
            match message.message {
                Some(RawMessage::Assignment(assignment)) => {
                    self.generation
                        .store(assignment.generation, Ordering::Release);
                    self.assigned = assignment.partitions.clone();
                    return Ok(Some(GroupEvent::Assigned(assignment.partitions)));
                }
                Some(RawMessage::Records(chunk)) => {
                    // Sent under an assignment this member has already moved past.
                    if chunk.generation != self.generation.load(Ordering::Acquire)
                        || !self.assigned.contains(&chunk.partition)
                    {
                        continue;
                    }
                    return Ok(Some(GroupEvent::Records(chunk)));
                }
                None => continue,
            }
        }
    }

    /// Commits next offsets per partition under the current generation. A refusal
    /// (a rebalance this member has not read yet) is not an error: the checkpoint is what
    /// the analyzer resumes from; the group's offsets only shorten a new owner's replay.
    pub(crate) async fn commit(&mut self, offsets: &[(u32, u64)]) {
        if offsets.is_empty() {
            return;
        }
        let request = CommitOffsetsRequest {
            group: self.group.clone(),
            topic: self.topic.clone(),
            member_id: self.member_id.clone(),
            generation: self.generation.load(Ordering::Acquire),
            offsets: offsets
                .iter()
                .map(|&(partition, offset)| PartitionOffset { partition, offset })
                .collect(),
        };
        if let Err(status) = self.broker.commit_offsets(request).await {
            tracing::debug!(topic = %self.topic, code = ?status.code(), error = status.message(), "commit refused");
        }
    }
}

/// Heartbeats every `every` with the latest generation, until the member is dropped.
async fn heartbeat(
    mut broker: runnel_proto::v1::broker_client::BrokerClient<Peer>,
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
            tracing::debug!(code = ?status.code(), error = status.message(), "heartbeat refused");
        }
    }
}
