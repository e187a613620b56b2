//! `Ingest`: request/response collection through to the broker.

use crate::config::CollectorConfig;
use crate::error::CollectorError;
use crate::validate::{Limits, validate_batch};
use runnel_proto::v1::broker_client::BrokerClient;
use runnel_proto::v1::collector_server::Collector;
use runnel_proto::v1::{EventReceipt, IngestRequest, IngestResponse, ProduceRequest};
use runnel_security::{Action, Peer, Resource};
use runnel_telemetry::propagation::inject_into_headers;
use std::time::Instant;
use tonic::{Request, Response, Status};
use tracing::Instrument;

type Broker = BrokerClient<Peer>;

/// The collector's gRPC service.
pub(crate) struct IngestService {
    broker: Broker,
    topic: String,
    limits: Limits,
}

impl IngestService {
    pub(crate) fn new(config: &CollectorConfig) -> Result<Self, CollectorError> {
        // Lazy: the broker may start after us or restart; tonic reconnects on its own.
        let channel = runnel_security::connect_lazy(&config.broker, &config.server.connect)
            .map_err(|source| CollectorError::BrokerUrl {
                url: config.broker.clone(),
                source,
            })?;
        let broker = BrokerClient::new(channel)
            .max_decoding_message_size(config.server.max_message_bytes)
            .max_encoding_message_size(config.server.max_message_bytes);
        Ok(IngestService {
            broker,
            topic: config.topic.clone(),
            limits: Limits {
                max_batch_events: config.max_batch_events,
                max_payload_bytes: config.max_payload_bytes,
            },
        })
    }

    async fn ingest(&self, mut request: IngestRequest) -> Result<IngestResponse, CollectorError> {
        let started = Instant::now();
        if let Err(error) =
            validate_batch(&mut request.events, self.limits, runnel_proto::now_millis())
        {
            metrics::counter!("runnel_collector_batches_total", "outcome" => "invalid")
                .increment(1);
            return Err(error);
        }
        let count = request.events.len();
        // Every event carries the trace of the call that ingested it, so the analyzer, the
        // store and the gateway can continue that trace long after this call has returned.
        let span = tracing::Span::current();
        for event in &mut request.events {
            inject_into_headers(&span, &mut event.headers);
        }
        let ids: Vec<String> = request.events.iter().map(|e| e.id.clone()).collect();
        let produce = ProduceRequest {
            topic: self.topic.clone(),
            events: request.events,
            ..Default::default()
        };
        let positions = self
            .broker
            .clone()
            .produce(produce)
            .instrument(
                tracing::info_span!("collector.forward", topic = %self.topic, events = count),
            )
            .await
            .map_err(|status| {
                metrics::counter!("runnel_collector_batches_total", "outcome" => "broker_error")
                    .increment(1);
                CollectorError::Broker(status)
            })?
            .into_inner()
            .positions;
        if positions.len() != ids.len() {
            return Err(CollectorError::Broker(Status::internal(format!(
                "broker acknowledged {} of {} events",
                positions.len(),
                ids.len()
            ))));
        }
        metrics::counter!("runnel_collector_batches_total", "outcome" => "accepted").increment(1);
        metrics::counter!("runnel_collector_events_total").increment(count as u64);
        metrics::histogram!("runnel_collector_ingest_seconds")
            .record(started.elapsed().as_secs_f64());
        let receipts = ids
            .into_iter()
            .zip(positions)
            .map(|(id, position)| EventReceipt {
                id,
                position: Some(position),
            })
            .collect();
        Ok(IngestResponse { receipts })
    }
}

#[tonic::async_trait]
impl Collector for IngestService {
    async fn ingest(
        &self,
        request: Request<IngestRequest>,
    ) -> Result<Response<IngestResponse>, Status> {
        runnel_security::authorize(&request, Action::Produce, Resource::Topic(&self.topic))?;
        let request = request.into_inner();
        let span = tracing::info_span!("collector.ingest", events = request.events.len());
        let response = IngestService::ingest(self, request)
            .instrument(span)
            .await?;
        Ok(Response::new(response))
    }
}
