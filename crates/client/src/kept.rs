//! Kept logs: topics that are a service's registry — the gateway's webhooks, the
//! analyzer's created queries — created with no retention limit (trimming them would
//! forget what they hold) and read by every replica from their first record, each
//! partition followed for as long as the replica runs.

use crate::ClientError;
use runnel_proto::v1::broker_client::BrokerClient;
use runnel_proto::v1::subscribe_response::Message;
use runnel_proto::v1::{
    CreateTopicRequest, DescribeTopicRequest, Record, RetentionPolicy, SubscribeRequest,
};
use runnel_security::Peer;
use std::future::Future;
use std::time::Duration;
use tonic::Code;

/// The first delay after the broker could not be followed; doubled up to [`RETRY_MAX`].
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// Creates `topic` with `partitions` partitions and no retention limit unless it exists,
/// and answers where each partition starts and ends, in partition order. A topic of
/// another partition count (made by hand) is refused.
pub async fn open_kept(
    broker: &BrokerClient<Peer>,
    topic: &str,
    partitions: u32,
) -> Result<Vec<(u64, u64)>, ClientError> {
    let mut broker = broker.clone();
    let create = CreateTopicRequest {
        name: topic.into(),
        partitions,
        retention: Some(RetentionPolicy {
            max_age: Some(prost_types::Duration::default()),
            max_bytes: Some(0),
        }),
    };
    match broker.create_topic(create).await {
        Ok(_) => {}
        Err(status) if status.code() == Code::AlreadyExists => {}
        Err(status) => return Err(ClientError::Broker(status)),
    }
    let found = bounds(&broker, topic).await?;
    if found.len() != partitions as usize {
        return Err(ClientError::Topic(format!(
            "topic {topic} has {} partitions; {partitions} are needed (delete it if it was made by hand)",
            found.len()
        )));
    }
    Ok(found)
}

/// Where each partition of `topic` starts and ends, in partition order.
async fn bounds(broker: &BrokerClient<Peer>, topic: &str) -> Result<Vec<(u64, u64)>, ClientError> {
    let described = broker
        .clone()
        .describe_topic(DescribeTopicRequest { name: topic.into() })
        .await
        .map_err(ClientError::Broker)?
        .into_inner();
    let mut found = described.topic.map(|t| t.partitions).unwrap_or_default();
    found.sort_by_key(|p| p.partition);
    Ok(found
        .into_iter()
        .map(|p| (p.start_offset, p.end_offset))
        .collect())
}

/// Follows `partition` of the kept log `topic` until `stopped` resolves: from `next()`,
/// handing `apply` every record at or after it in offset order (`apply` moves `next` on),
/// and subscribing again — after 100 ms, doubling up to 5 s while it fails — when the
/// stream breaks. If the position was trimmed away (someone gave the topic a retention
/// limit), `trimmed` learns where the partition now starts and is expected to move `next`
/// there: what was in between is gone.
pub async fn follow_partition<S>(
    broker: &BrokerClient<Peer>,
    topic: &str,
    partition: u32,
    mut next: impl FnMut() -> u64,
    mut apply: impl FnMut(Record),
    mut trimmed: impl FnMut(u64),
    stopped: impl Fn() -> S,
) where
    S: Future<Output = ()>,
{
    let mut delay = RETRY_MIN;
    loop {
        let request = SubscribeRequest {
            topic: topic.into(),
            partition,
            offset: next(),
            ..SubscribeRequest::default()
        };
        let mut client = broker.clone();
        let subscribed = tokio::select! {
            subscribed = client.subscribe(request) => subscribed,
            () = stopped() => return,
        };
        match subscribed {
            Ok(stream) => {
                let mut stream = stream.into_inner();
                loop {
                    let message = tokio::select! {
                        message = stream.message() => message,
                        () = stopped() => return,
                    };
                    let chunk = match message {
                        Ok(Some(response)) => match response.message {
                            Some(Message::Records(chunk)) => chunk,
                            _ => continue,
                        },
                        Ok(None) => break,
                        Err(status) => {
                            tracing::debug!(topic, partition, code = ?status.code(), message = status.message(), "kept log stream ended; resuming");
                            break;
                        }
                    };
                    delay = RETRY_MIN;
                    for record in chunk.records {
                        if record.offset >= next() {
                            apply(record);
                        }
                    }
                }
            }
            Err(status) if status.code() == Code::OutOfRange => {
                tracing::error!(
                    topic,
                    partition,
                    offset = next(),
                    message = status.message(),
                    "the kept log was trimmed past this replica's position; what was there is gone"
                );
                if let Ok(bounds) = bounds(broker, topic).await
                    && let Some((start, _)) = bounds.get(partition as usize)
                {
                    trimmed(*start);
                }
            }
            Err(status) => {
                tracing::debug!(topic, partition, code = ?status.code(), message = status.message(), "cannot follow the kept log");
            }
        }
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = stopped() => return,
        }
        delay = (delay * 2).min(RETRY_MAX);
    }
}
