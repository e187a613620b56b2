//! The idempotent producer.
//!
//! It partitions events itself (by key, with the contract's hash, or round-robin without
//! one), sends each partition's share as one batch stamped with the producer's id and the
//! partition's next sequence number, and — when the broker cannot be reached, or a call
//! fails in a way that may not have been final — sends the very same batches again until
//! they are acknowledged. The broker recognises a batch it already stored and answers with
//! its original offsets, so every event is stored exactly once, across broker crashes
//! included. One call is in flight per producer at a time, which keeps each partition's
//! sequence in order.
//!
//! Calls go over one long-lived `ProduceStream` (each call one request on it, answered by
//! its own ack) rather than one unary `Produce` each: no HTTP/2 stream to open per call.
//! A call that fails or times out drops the stream, and its retry opens a new one and sends
//! the same batches; a call cancelled while its answer was outstanding leaves the stream
//! to be dropped too, so no stale answer is ever taken for a later call. Against a broker
//! that does not know `ProduceStream` (UNIMPLEMENTED) the producer uses `Produce`.

use crate::{ClientError, retriable};
use runnel_proto::v1::broker_client::BrokerClient;
use runnel_proto::v1::{
    Acks, BatchAck, Compression, CreateTopicRequest, DescribeTopicRequest, Event, GroupFence,
    ProduceRequest, ProduceStreamRequest, ProduceStreamResponse, RecordBatch, RecordPosition,
};
use runnel_proto::{partition_for_key, records};
use runnel_security::Peer;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tonic::{Code, Status};

/// How a [`Producer`] sends.
#[derive(Debug, Clone)]
pub struct ProducerOptions {
    /// When the broker acknowledges.
    pub acks: Acks,
    /// How batches are compressed.
    pub compression: Compression,
    /// How long to keep resending a batch the broker has not acknowledged before giving up.
    pub retry_for: Duration,
    /// The longest one call may take.
    pub call_timeout: Duration,
    /// Create the topic with this many partitions if it does not exist.
    pub create_partitions: Option<u32>,
}

impl Default for ProducerOptions {
    fn default() -> Self {
        ProducerOptions {
            acks: Acks::Durable,
            compression: Compression::None,
            retry_for: Duration::from_secs(60),
            call_timeout: Duration::from_secs(10),
            create_partitions: None,
        }
    }
}

/// An idempotent producer for one topic.
#[derive(Debug)]
pub struct Producer {
    broker: BrokerClient<Peer>,
    topic: String,
    partitions: u32,
    producer_id: u64,
    /// Per partition, the sequence of the next record.
    next_sequence: Vec<u64>,
    /// The next round-robin partition for events without a key.
    round_robin: u32,
    options: ProducerOptions,
    /// The group membership every send is made under, if any.
    fence: Option<GroupFence>,
    /// A call whose outcome is unknown: its future was dropped (the caller was cancelled)
    /// or its retries ran out. The broker may hold its batches under their sequences, so
    /// they go again, unchanged, before anything new: a later batch must never reuse those
    /// sequences (the broker would take it for the retry and drop it).
    unfinished: Option<ProduceRequest>,
    /// The open `ProduceStream`, if any.
    link: Option<ProduceLink>,
    /// The broker answered `ProduceStream` with UNIMPLEMENTED: calls go as `Produce`.
    unary: bool,
}

/// One `ProduceStream`, one request on it at a time.
#[derive(Debug)]
struct ProduceLink {
    requests: mpsc::Sender<ProduceStreamRequest>,
    answers: tonic::Streaming<ProduceStreamResponse>,
    next_sequence: u64,
    /// A request went out and its answer was not read (its call was cancelled): the link
    /// is not used again, lest that answer be taken for a later call's.
    awaiting: bool,
}

impl ProduceLink {
    async fn open(broker: &mut BrokerClient<Peer>) -> Result<ProduceLink, Status> {
        // One request at a time goes through: nothing waits here but the one being sent.
        let (requests, outgoing) = mpsc::channel(1);
        let outgoing = futures::stream::unfold(outgoing, |mut outgoing| async move {
            outgoing.recv().await.map(|request| (request, outgoing))
        });
        let answers = broker.produce_stream(outgoing).await?.into_inner();
        Ok(ProduceLink {
            requests,
            answers,
            next_sequence: 0,
            awaiting: false,
        })
    }

    /// Sends `request` and waits for its answer's batch acks.
    async fn exchange(&mut self, request: &ProduceRequest) -> Result<Vec<BatchAck>, Status> {
        let sequence = self.next_sequence;
        self.next_sequence += 1;
        self.awaiting = true;
        self.requests
            .send(ProduceStreamRequest {
                sequence,
                request: Some(request.clone()),
            })
            .await
            .map_err(|_| Status::unavailable("the produce stream is closed"))?;
        let answer = self
            .answers
            .message()
            .await?
            .ok_or_else(|| Status::unavailable("the broker ended the produce stream"))?;
        self.awaiting = false;
        match answer.answers.as_slice() {
            [one] if one.sequence == sequence && answer.acknowledged == sequence => {
                Ok(one.response.clone().unwrap_or_default().batch_acks)
            }
            _ => Err(Status::internal(format!(
                "the broker acknowledged up to request {} for request {sequence}",
                answer.acknowledged
            ))),
        }
    }
}

impl Producer {
    /// A producer for `topic` with a fresh random id, after learning how many partitions
    /// the topic has (creating it if the options say so).
    pub async fn new(
        mut broker: BrokerClient<Peer>,
        topic: &str,
        options: ProducerOptions,
    ) -> Result<Producer, ClientError> {
        let describe = DescribeTopicRequest {
            name: topic.to_owned(),
        };
        let described = match broker.describe_topic(describe.clone()).await {
            Err(status)
                if status.code() == Code::NotFound && options.create_partitions.is_some() =>
            {
                let create = CreateTopicRequest {
                    name: topic.to_owned(),
                    partitions: options.create_partitions.unwrap_or(1),
                    retention: None,
                };
                match broker.create_topic(create).await {
                    Ok(_) => {}
                    Err(status) if status.code() == Code::AlreadyExists => {}
                    Err(status) => return Err(ClientError::Broker(status)),
                }
                broker.describe_topic(describe).await
            }
            other => other,
        }
        .map_err(ClientError::Broker)?
        .into_inner();
        let partitions = described
            .topic
            .map(|t| t.partitions.len() as u32)
            .filter(|n| *n > 0)
            .ok_or_else(|| ClientError::Topic(format!("topic {topic:?} has no partitions")))?;
        Ok(Producer {
            broker,
            topic: topic.to_owned(),
            partitions,
            // Never 0, which means "not idempotent".
            producer_id: rand::random::<u64>().max(1),
            next_sequence: vec![0; partitions as usize],
            round_robin: 0,
            options,
            fence: None,
            unfinished: None,
            link: None,
            unary: false,
        })
    }

    /// Makes every later send a write on behalf of a consumer group's member: the broker
    /// refuses it with `FAILED_PRECONDITION` (not retried) once the member no longer owns
    /// the partitions the fence names. `None` lifts the fence.
    pub fn set_fence(&mut self, fence: Option<GroupFence>) {
        self.fence = fence;
    }

    /// This producer's id.
    pub fn producer_id(&self) -> u64 {
        self.producer_id
    }

    /// Whether calls go over a `ProduceStream` now: a stream is open (the last call went
    /// over it) — false before the first call, after a failed one, and against a broker
    /// without `ProduceStream`.
    pub fn on_stream(&self) -> bool {
        self.link.is_some()
    }

    /// The topic's partition count.
    pub fn partitions(&self) -> u32 {
        self.partitions
    }

    /// The partition an event with `key` goes to.
    pub fn partition_of(&mut self, key: &str) -> u32 {
        if key.is_empty() {
            self.round_robin = (self.round_robin + 1) % self.partitions;
            self.round_robin
        } else {
            partition_for_key(key, self.partitions)
        }
    }

    /// Stores `events` — one batch per partition, in one call — and answers with where each
    /// one is, in order. Retries until every batch is acknowledged or `retry_for` runs out.
    pub async fn send(&mut self, events: Vec<Event>) -> Result<Vec<RecordPosition>, ClientError> {
        self.finish().await?;
        let mut shares: Vec<Vec<usize>> = vec![Vec::new(); self.partitions as usize];
        for (i, event) in events.iter().enumerate() {
            let partition = self.partition_of(&event.key);
            shares[partition as usize].push(i);
        }
        let mut batches = Vec::new();
        let mut indexes = Vec::new();
        for (partition, share) in shares.into_iter().enumerate() {
            if share.is_empty() {
                continue;
            }
            let chosen: Vec<Event> = share.iter().map(|&i| events[i].clone()).collect();
            batches.push(self.batch(partition as u32, &chosen));
            indexes.push(share);
        }
        let acks = self.send_batches(batches).await?;
        let mut positions = vec![RecordPosition::default(); events.len()];
        for (ack, share) in acks.iter().zip(indexes) {
            for (i, offset) in share.into_iter().zip(ack.base_offset..) {
                positions[i] = RecordPosition {
                    topic: self.topic.clone(),
                    partition: ack.partition,
                    offset,
                };
            }
        }
        Ok(positions)
    }

    /// Stores `events` as one batch in `partition`, whatever their keys.
    pub async fn send_to(
        &mut self,
        partition: u32,
        events: &[Event],
    ) -> Result<BatchAck, ClientError> {
        if partition >= self.partitions {
            return Err(ClientError::Topic(format!(
                "topic {:?} has no partition {partition}",
                self.topic
            )));
        }
        self.finish().await?;
        let batch = self.batch(partition, events);
        Ok(self.send_batches(vec![batch]).await?.remove(0))
    }

    fn batch(&self, partition: u32, events: &[Event]) -> RecordBatch {
        let plain = records::encode(events);
        let records = match self.options.compression {
            Compression::None => plain,
            other => records::compress(other, &plain),
        };
        RecordBatch {
            partition,
            record_count: events.len() as u32,
            compression: self.options.compression as i32,
            records,
            producer_id: self.producer_id,
            base_sequence: self.next_sequence[partition as usize],
            ..RecordBatch::default()
        }
    }

    /// Settles a call left unfinished: sends it again (acknowledged either way if the
    /// broker has it), or — refused outright — starts over under a new producer id, so no
    /// later batch can be mistaken for it.
    async fn finish(&mut self) -> Result<(), ClientError> {
        let Some(request) = self.unfinished.clone() else {
            return Ok(());
        };
        match self.call(&request).await {
            Ok(_) => {
                self.advance(&request);
                self.unfinished = None;
                Ok(())
            }
            Err(ClientError::Broker(status)) if !retriable(status.code()) => {
                tracing::debug!(code = ?status.code(), error = status.message(), "an unfinished produce was refused; continuing as a new producer");
                self.start_over();
                Ok(())
            }
            Err(error) => Err(error),
        }
    }

    /// A new identity: a fresh random producer id, every sequence from 0.
    fn start_over(&mut self) {
        self.producer_id = rand::random::<u64>().max(1);
        self.next_sequence.iter_mut().for_each(|s| *s = 0);
        self.unfinished = None;
    }

    fn advance(&mut self, request: &ProduceRequest) {
        for batch in &request.batches {
            self.next_sequence[batch.partition as usize] += u64::from(batch.record_count);
        }
    }

    /// Makes `request`, retrying what may succeed when made again until `retry_for` runs
    /// out.
    async fn call(&mut self, request: &ProduceRequest) -> Result<Vec<BatchAck>, ClientError> {
        let deadline = Instant::now() + self.options.retry_for;
        let mut delay = Duration::from_millis(20);
        let acks = loop {
            match self.attempt(request).await {
                Ok(acks) => break acks,
                Err(status) if retriable(status.code()) && Instant::now() < deadline => {
                    tracing::debug!(code = ?status.code(), error = status.message(), "produce failed; sending the same batches again");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(1));
                }
                Err(status) => return Err(ClientError::Broker(status)),
            }
        };
        if acks.len() != request.batches.len() {
            return Err(ClientError::Broker(Status::internal(format!(
                "the broker acknowledged {} of {} batches",
                acks.len(),
                request.batches.len()
            ))));
        }
        Ok(acks)
    }

    /// Makes `request` once: on the produce stream (opened first if need be), or as a unary
    /// `Produce` when the broker has no stream.
    async fn attempt(&mut self, request: &ProduceRequest) -> Result<Vec<BatchAck>, Status> {
        if !self.unary {
            let timeout = self.options.call_timeout;
            let outcome = tokio::time::timeout(timeout, self.attempt_on_stream(request))
                .await
                .unwrap_or_else(|_| {
                    Err(Status::deadline_exceeded(
                        "no answer on the produce stream within the call timeout",
                    ))
                });
            match outcome {
                Ok(acks) => return Ok(acks),
                Err(status) => {
                    // Whatever is left on this stream is not this call's to read.
                    self.link = None;
                    if status.code() != Code::Unimplemented {
                        return Err(status);
                    }
                    tracing::debug!("the broker has no ProduceStream; producing call by call");
                    self.unary = true;
                }
            }
        }
        let mut call = tonic::Request::new(request.clone());
        call.set_timeout(self.options.call_timeout);
        Ok(self.broker.produce(call).await?.into_inner().batch_acks)
    }

    async fn attempt_on_stream(
        &mut self,
        request: &ProduceRequest,
    ) -> Result<Vec<BatchAck>, Status> {
        if self.link.as_ref().is_some_and(|link| link.awaiting) {
            self.link = None;
        }
        let link = match &mut self.link {
            Some(link) => link,
            None => self.link.insert(ProduceLink::open(&mut self.broker).await?),
        };
        link.exchange(request).await
    }

    /// Sends `batches` until acknowledged; then moves each partition's sequence past them.
    /// Cancel-safe: dropped midway, the call is finished by the next send.
    async fn send_batches(
        &mut self,
        batches: Vec<RecordBatch>,
    ) -> Result<Vec<BatchAck>, ClientError> {
        let request = ProduceRequest {
            topic: self.topic.clone(),
            acks: self.options.acks as i32,
            batches,
            fence: self.fence.clone(),
            ..ProduceRequest::default()
        };
        self.unfinished = Some(request.clone());
        match self.call(&request).await {
            Ok(acks) => {
                self.advance(&request);
                self.unfinished = None;
                Ok(acks)
            }
            // Refused (fenced, invalid): whether an earlier attempt of this call was stored
            // is unknown, so its sequences are given up with the producer id.
            Err(ClientError::Broker(status)) if !retriable(status.code()) => {
                self.start_over();
                Err(ClientError::Broker(status))
            }
            // Still unknown: the next send finishes it first.
            Err(error) => Err(error),
        }
    }
}
