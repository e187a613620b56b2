//! The `runnel.v1.Broker` gRPC service: request checks, partition choice, and the hand-off
//! of every disk operation to blocking threads.
//!
//! `Produce` is atomic per partition, not per request: a batch is split by partition and
//! each partition's share is appended with one write (and one fsync, per policy), all
//! partitions in parallel. If one partition fails, the others may already hold their
//! share; the call fails and a retry may store those events twice. Events carry ids so
//! that consumers can recognise such duplicates.

use crate::config::BrokerConfig;
use crate::error::{BrokerError, Result};
use crate::partition::{Partition, RECORD_OVERHEAD};
use crate::topic::{self, Topic};
use crate::topics::Topics;
use prost::Message;
use runnel_proto::now_millis;
use runnel_proto::v1::broker_server::Broker;
use runnel_proto::v1::{
    CreateTopicRequest, CreateTopicResponse, Event, FetchRequest, FetchResponse, ListTopicsRequest,
    ListTopicsResponse, ProduceRequest, ProduceResponse, Record, RecordPosition, SubscribeRequest,
};
use runnel_server::Shutdown;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::Instrument;

/// Records per `Fetch` when the request does not say.
const DEFAULT_FETCH_RECORDS: usize = 500;
/// The most records one `Fetch` returns.
const MAX_FETCH_RECORDS: usize = 10_000;
/// Room kept in a `Fetch` answer for everything but the records.
const FETCH_HEADROOM: usize = 64 * 1024;
/// Records a subscriber may have in flight before its reader waits: enough to keep a
/// healthy stream busy, small enough that a stalled client pins little memory.
const SUBSCRIBE_BUFFER: usize = 128;
/// Records a subscriber reads from disk at a time.
const SUBSCRIBE_BATCH: usize = 500;

/// The broker's gRPC handlers.
#[derive(Debug)]
pub(crate) struct BrokerService {
    topics: Arc<Topics>,
    auto_create_topics: bool,
    default_partitions: u32,
    max_batch_events: usize,
    /// The most encoded record bytes in one `Fetch` answer, and so also the most one record
    /// may take: whatever is stored can be read back.
    max_read_bytes: usize,
    /// Ends subscriptions when the broker stops, so they do not hold the drain open.
    shutdown: Shutdown,
}

impl BrokerService {
    /// Handlers over `topics`.
    pub(crate) fn new(topics: Arc<Topics>, config: &BrokerConfig, shutdown: Shutdown) -> Self {
        let max_message = config.server.max_message_bytes;
        BrokerService {
            topics,
            auto_create_topics: config.auto_create_topics,
            default_partitions: config.default_partitions,
            max_batch_events: config.max_batch_events,
            max_read_bytes: max_message - FETCH_HEADROOM.min(max_message / 2),
            shutdown,
        }
    }

    /// An existing topic, checking the name first.
    fn existing_topic(&self, name: &str) -> Result<Arc<Topic>> {
        topic::validate_name(name)?;
        self.topics
            .get(name)
            .ok_or_else(|| BrokerError::TopicNotFound(name.to_owned()))
    }

    #[tracing::instrument(
        name = "create_topic",
        skip_all,
        fields(topic = %request.name, partitions = request.partitions)
    )]
    async fn serve_create_topic(&self, request: CreateTopicRequest) -> Result<CreateTopicResponse> {
        topic::validate_name(&request.name)?;
        topic::validate_partitions(request.partitions)?;
        let topic = self
            .topics
            .create(&request.name, request.partitions)
            .await?;
        Ok(CreateTopicResponse {
            topic: Some(topic.info()),
        })
    }

    #[tracing::instrument(name = "list_topics", skip_all)]
    fn serve_list_topics(&self) -> ListTopicsResponse {
        ListTopicsResponse {
            topics: self.topics.list().iter().map(|t| t.info()).collect(),
        }
    }

    /// Checks a batch before anything is written.
    fn check_batch(&self, events: &[Event]) -> Result<()> {
        if events.is_empty() {
            return Err(BrokerError::InvalidArgument(
                "events is empty: send at least one event".into(),
            ));
        }
        if events.len() > self.max_batch_events {
            return Err(BrokerError::InvalidArgument(format!(
                "events has {} events; at most {} are accepted per call",
                events.len(),
                self.max_batch_events
            )));
        }
        for (i, event) in events.iter().enumerate() {
            if event.id.is_empty() {
                return Err(BrokerError::InvalidArgument(format!(
                    "events[{i}].id is empty"
                )));
            }
            let size = event.encoded_len() + RECORD_OVERHEAD;
            if size > self.max_read_bytes {
                return Err(BrokerError::InvalidArgument(format!(
                    "events[{i}] takes {size} bytes as a record; at most {} are accepted",
                    self.max_read_bytes
                )));
            }
        }
        Ok(())
    }

    #[tracing::instrument(
        name = "produce",
        skip_all,
        fields(topic = %request.topic, events = request.events.len())
    )]
    async fn serve_produce(&self, request: ProduceRequest) -> Result<ProduceResponse> {
        let started = Instant::now();
        let ProduceRequest {
            topic: name,
            events,
        } = request;
        topic::validate_name(&name)?;
        self.check_batch(&events)?;
        let topic = if self.auto_create_topics {
            self.topics
                .get_or_create(&name, self.default_partitions)
                .await?
        } else {
            self.existing_topic(&name)?
        };

        // Split by partition, remembering each event's partition to answer in request order.
        let mut chosen = Vec::with_capacity(events.len());
        let mut groups: Vec<Vec<Event>> = vec![Vec::new(); topic.partitions().len()];
        for event in events {
            let partition = topic.choose_partition(&event.key);
            chosen.push(partition);
            groups[partition as usize].push(event);
        }

        let append_time = now_millis();
        let appends = groups
            .into_iter()
            .enumerate()
            .filter(|(_, events)| !events.is_empty())
            .map(|(partition, events)| {
                let partition = Arc::clone(&topic.partitions()[partition]);
                async move {
                    let id = partition.id();
                    let appended =
                        tokio::task::spawn_blocking(move || partition.append(events, append_time))
                            .await
                            .map_err(BrokerError::from)
                            .and_then(|appended| appended);
                    (id, appended)
                }
            });
        let results = futures::future::join_all(appends).await;

        let mut next_offsets = vec![0u64; topic.partitions().len()];
        let mut first_error = None;
        let (mut records, mut bytes) = (0, 0);
        for (partition, result) in results {
            match result {
                Ok(appended) => {
                    next_offsets[partition as usize] = appended.base_offset;
                    records += appended.records;
                    bytes += appended.bytes;
                }
                Err(error) => {
                    first_error.get_or_insert(error);
                }
            }
        }
        metrics::counter!("runnel_broker_records_appended_total", "topic" => name.clone())
            .increment(records);
        metrics::counter!("runnel_broker_bytes_appended_total", "topic" => name.clone())
            .increment(bytes);
        metrics::histogram!("runnel_broker_produce_seconds")
            .record(started.elapsed().as_secs_f64());
        if let Some(error) = first_error {
            if records > 0 {
                tracing::warn!(records, %error, "produce failed after some partitions appended");
            }
            return Err(error);
        }

        let positions = chosen
            .into_iter()
            .map(|partition| {
                let next = &mut next_offsets[partition as usize];
                let offset = *next;
                *next += 1;
                RecordPosition {
                    topic: name.clone(),
                    partition,
                    offset,
                }
            })
            .collect();
        Ok(ProduceResponse { positions })
    }

    #[tracing::instrument(
        name = "fetch",
        skip_all,
        fields(
            topic = %request.topic,
            partition = request.partition,
            offset = request.offset,
            records
        )
    )]
    async fn serve_fetch(&self, request: FetchRequest) -> Result<FetchResponse> {
        let topic = self.existing_topic(&request.topic)?;
        let partition = Arc::clone(topic.partition(request.partition)?);
        let max_records = match request.max_records as usize {
            0 => DEFAULT_FETCH_RECORDS,
            n => n.min(MAX_FETCH_RECORDS),
        };
        let (offset, max_bytes) = (request.offset, self.max_read_bytes);
        let (records, end_offset) =
            tokio::task::spawn_blocking(move || partition.read(offset, max_records, max_bytes))
                .await??;
        tracing::Span::current().record("records", records.len());
        metrics::counter!(
            "runnel_broker_fetch_records_total",
            "topic" => request.topic,
            "rpc" => "fetch"
        )
        .increment(records.len() as u64);
        Ok(FetchResponse {
            next_offset: offset + records.len() as u64,
            records,
            end_offset,
        })
    }

    #[tracing::instrument(
        name = "subscribe",
        skip_all,
        fields(topic = %request.topic, partition = request.partition, offset = request.offset)
    )]
    fn serve_subscribe(
        &self,
        request: SubscribeRequest,
    ) -> Result<ReceiverStream<Result<Record, Status>>> {
        let topic = self.existing_topic(&request.topic)?;
        let partition = Arc::clone(topic.partition(request.partition)?);
        let end = partition.end_offset();
        if request.offset > end {
            return Err(BrokerError::OffsetOutOfRange {
                topic: request.topic,
                partition: request.partition,
                offset: request.offset,
                start: 0,
                end,
            });
        }
        let (sender, receiver) = mpsc::channel(SUBSCRIBE_BUFFER);
        let subscription = Subscription {
            topic: request.topic,
            partition,
            next: request.offset,
            max_bytes: self.max_read_bytes,
            sender,
            shutdown: self.shutdown.clone(),
        };
        tokio::spawn(subscription.run().in_current_span());
        Ok(ReceiverStream::new(receiver))
    }
}

/// One `Subscribe` stream's reader: sends the partition's records from `next` on, then
/// waits for more, until the client goes away or the broker stops.
struct Subscription {
    topic: String,
    partition: Arc<Partition>,
    /// The next offset to send.
    next: u64,
    max_bytes: usize,
    sender: mpsc::Sender<Result<Record, Status>>,
    shutdown: Shutdown,
}

impl Subscription {
    async fn run(mut self) {
        let gauge = metrics::gauge!("runnel_broker_subscribers", "topic" => self.topic.clone());
        gauge.increment(1.0);
        tracing::debug!("subscriber started");
        let reason = self.deliver().await;
        gauge.decrement(1.0);
        tracing::debug!(reason, next_offset = self.next, "subscriber ended");
    }

    /// Runs until the subscription ends, and says why.
    async fn deliver(&mut self) -> &'static str {
        let delivered = metrics::counter!(
            "runnel_broker_fetch_records_total",
            "topic" => self.topic.clone(),
            "rpc" => "subscribe"
        );
        let mut end = self.partition.watch_end();
        loop {
            // Mark the current end as seen before reading up to it, so an append that
            // lands while we read wakes the wait below.
            let available = *end.borrow_and_update();
            if self.next < available {
                let partition = Arc::clone(&self.partition);
                let (next, max_bytes) = (self.next, self.max_bytes);
                let read = tokio::task::spawn_blocking(move || {
                    partition.read(next, SUBSCRIBE_BATCH, max_bytes)
                })
                .await
                .map_err(BrokerError::from)
                .and_then(|read| read);
                let records = match read {
                    Ok((records, _)) => records,
                    Err(error) => {
                        let _ = self.sender.send(Err(error.into())).await;
                        return "read failed";
                    }
                };
                for record in records {
                    let offset = record.offset;
                    tokio::select! {
                        sent = self.sender.send(Ok(record)) => {
                            if sent.is_err() {
                                return "client gone";
                            }
                        }
                        () = self.shutdown.wait() => return self.stopping(),
                    }
                    self.next = offset + 1;
                    delivered.increment(1);
                }
                continue;
            }
            tokio::select! {
                changed = end.changed() => {
                    if changed.is_err() {
                        return "partition closed";
                    }
                }
                () = self.sender.closed() => return "client gone",
                () = self.shutdown.wait() => return self.stopping(),
            }
        }
    }

    /// Tells the client the stream ends because the broker stops (so it reconnects rather
    /// than assume the partition ended), without waiting on a full buffer.
    fn stopping(&self) -> &'static str {
        let _ = self.sender.try_send(Err(Status::unavailable(
            "the broker is shutting down; resubscribe",
        )));
        "shutdown"
    }
}

#[tonic::async_trait]
impl Broker for BrokerService {
    async fn create_topic(
        &self,
        request: Request<CreateTopicRequest>,
    ) -> std::result::Result<Response<CreateTopicResponse>, Status> {
        Ok(Response::new(
            self.serve_create_topic(request.into_inner()).await?,
        ))
    }

    async fn list_topics(
        &self,
        _request: Request<ListTopicsRequest>,
    ) -> std::result::Result<Response<ListTopicsResponse>, Status> {
        Ok(Response::new(self.serve_list_topics()))
    }

    async fn produce(
        &self,
        request: Request<ProduceRequest>,
    ) -> std::result::Result<Response<ProduceResponse>, Status> {
        Ok(Response::new(
            self.serve_produce(request.into_inner()).await?,
        ))
    }

    async fn fetch(
        &self,
        request: Request<FetchRequest>,
    ) -> std::result::Result<Response<FetchResponse>, Status> {
        Ok(Response::new(self.serve_fetch(request.into_inner()).await?))
    }

    type SubscribeStream = ReceiverStream<Result<Record, Status>>;

    async fn subscribe(
        &self,
        request: Request<SubscribeRequest>,
    ) -> std::result::Result<Response<Self::SubscribeStream>, Status> {
        Ok(Response::new(self.serve_subscribe(request.into_inner())?))
    }
}
