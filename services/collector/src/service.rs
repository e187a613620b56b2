//! The `Collector` gRPC service: the five interaction patterns over one [`Intake`].
//!
//! - `Ingest` (request/response) and `Publish` (publish/subscribe, to a named topic): a
//!   batch in, receipts out once the batch reached its ack level;
//! - `Track` (request/acknowledge): see `track.rs`;
//! - `Send` (one-way, plus the UDP listener): see `oneway.rs`;
//! - `Stream` and `Tap`: see `stream.rs` and `tap.rs`.

use crate::error::CollectorError;
use crate::intake::{Intake, log_level};
use crate::tap::Taps;
use crate::track::Tracker;
use runnel_proto::v1::collector_server::Collector;
use runnel_proto::v1::{
    AckLevel, IngestRequest, IngestResponse, PublishRequest, PublishResponse, SendRequest,
    SendResponse, StreamRequest, StreamResponse, TapEvent, TapRequest, TrackRequest, TrackResponse,
};
use runnel_security::{Action, Resource, authorize};
use runnel_server::Shutdown;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

/// The collector's gRPC service.
pub(crate) struct CollectorService {
    pub(crate) intake: Arc<Intake>,
    pub(crate) tracker: Arc<Tracker>,
    pub(crate) taps: Arc<Taps>,
    pub(crate) stream_window: u32,
    pub(crate) shutdown: Shutdown,
}

/// A server stream of one message type.
type ServerStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

impl CollectorService {
    async fn ingest(&self, request: IngestRequest) -> Result<IngestResponse, CollectorError> {
        let started = Instant::now();
        let level = log_level(request.ack_level)?;
        let accepted = self
            .intake
            .submit(None, request.events, level, "ingest")
            .await?;
        let receipts = accepted.receipts().await?;
        metrics::histogram!("runnel_collector_ingest_seconds", "level" => level_name(request.ack_level))
            .record(started.elapsed().as_secs_f64());
        Ok(IngestResponse {
            receipts,
            ack_level: reached(request.ack_level),
        })
    }

    async fn publish(&self, request: PublishRequest) -> Result<PublishResponse, CollectorError> {
        let level = log_level(request.ack_level)?;
        let accepted = self
            .intake
            .submit(Some(&request.topic), request.events, level, "publish")
            .await?;
        Ok(PublishResponse {
            receipts: accepted.receipts().await?,
        })
    }
}

impl CollectorService {
    /// The one permission check of the patterns that take events in: the caller may
    /// produce to `topic` (`""`: the collector's default topic, where every pattern but
    /// `Publish` writes).
    fn may_produce<T>(&self, request: &Request<T>, topic: &str) -> Result<(), Status> {
        let topic = if topic.is_empty() {
            &*self.intake.default_topic
        } else {
            topic
        };
        authorize(request, Action::Produce, Resource::Topic(topic))
    }
}

/// The level an answer reports: the one asked for, with the default spelled out.
fn reached(level: i32) -> i32 {
    match AckLevel::try_from(level) {
        Ok(AckLevel::Default) | Err(_) => AckLevel::Stored as i32,
        Ok(level) => level as i32,
    }
}

fn level_name(level: i32) -> &'static str {
    match AckLevel::try_from(reached(level)) {
        Ok(AckLevel::Accepted) => "accepted",
        Ok(AckLevel::Logged) => "logged",
        _ => "stored",
    }
}

#[tonic::async_trait]
impl Collector for CollectorService {
    async fn ingest(
        &self,
        request: Request<IngestRequest>,
    ) -> Result<Response<IngestResponse>, Status> {
        self.may_produce(&request, "")?;
        let request = request.into_inner();
        let span = tracing::info_span!("collector.ingest", events = request.events.len());
        let response = CollectorService::ingest(self, request)
            .instrument(span)
            .await?;
        Ok(Response::new(response))
    }

    async fn track(
        &self,
        request: Request<TrackRequest>,
    ) -> Result<Response<TrackResponse>, Status> {
        // Track ingests the token's event into the default topic.
        self.may_produce(&request, "")?;
        let principal = runnel_security::caller(&request)?
            .principal()
            .map(str::to_owned);
        let span = tracing::info_span!("collector.track");
        let response = self
            .tracker
            .track(&self.intake, request.into_inner(), principal.as_deref())
            .instrument(span)
            .await?;
        Ok(Response::new(response))
    }

    async fn publish(
        &self,
        request: Request<PublishRequest>,
    ) -> Result<Response<PublishResponse>, Status> {
        self.may_produce(&request, &request.get_ref().topic)?;
        let request = request.into_inner();
        let span = tracing::info_span!("collector.publish", topic = %request.topic, events = request.events.len());
        let response = CollectorService::publish(self, request)
            .instrument(span)
            .await?;
        Ok(Response::new(response))
    }

    async fn send(
        &self,
        request: Request<Streaming<SendRequest>>,
    ) -> Result<Response<SendResponse>, Status> {
        self.may_produce(&request, "")?;
        let span = tracing::info_span!("collector.send");
        let response = crate::oneway::send(&self.intake, request.into_inner(), &self.shutdown)
            .instrument(span)
            .await?;
        Ok(Response::new(response))
    }

    type StreamStream = ServerStream<StreamResponse>;

    async fn stream(
        &self,
        request: Request<Streaming<StreamRequest>>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        self.may_produce(&request, "")?;
        let responses = crate::stream::serve(
            Arc::clone(&self.intake),
            request.into_inner(),
            self.stream_window,
            self.shutdown.clone(),
        );
        Ok(Response::new(responses))
    }

    type TapStream = ServerStream<TapEvent>;

    async fn tap(&self, request: Request<TapRequest>) -> Result<Response<Self::TapStream>, Status> {
        let topic = match request.get_ref().topic.as_str() {
            "" => &*self.intake.default_topic,
            topic => topic,
        };
        authorize(&request, Action::Consume, Resource::Topic(topic))?;
        let stream = self
            .taps
            .open(&self.intake, request.into_inner(), self.shutdown.clone())
            .await?;
        Ok(Response::new(stream))
    }
}
