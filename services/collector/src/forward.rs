//! The message log's downstream: batches go to the broker as idempotent record batches,
//! stamped with the log's producer id and sequences, one `Produce` per topic.
//!
//! Every call asks for DURABLE acks, whatever the broker's own `fsync` policy: the log
//! frees an entry once the broker acknowledged it, so the broker must have fsync'd it by
//! then, or a broker crash would lose what the collector had promised to keep.
//!
//! Every call also asks the broker to deduplicate: an event whose `(source, id)` the
//! partition already holds — a client's retry of an event the collector took in before,
//! perhaps through another collector replica — is not stored again, and answers with the
//! stored event's offset. The log's producer ids and sequences go along but are then not
//! what the broker goes by.

use runnel_msglog::{Batch, DeliveryError, Downstream, Placement};
use runnel_proto::v1::broker_client::BrokerClient;
use runnel_proto::v1::{Acks, Compression, ProduceRequest, RecordBatch};
use runnel_security::Peer;
use runnel_telemetry::propagation::continue_trace;
use tonic::Code;
use tracing::Instrument;

/// A broker client that carries the caller's trace context.
pub(crate) type Broker = BrokerClient<Peer>;

/// Delivers the log's batches to the broker.
#[derive(Debug, Clone)]
pub(crate) struct BrokerDownstream {
    pub(crate) broker: Broker,
}

impl Downstream for BrokerDownstream {
    async fn deliver(&self, batches: Vec<Batch>) -> Result<Vec<Placement>, DeliveryError> {
        // One request per topic, each holding its batches in log order.
        let mut topics: Vec<(std::sync::Arc<str>, Vec<usize>)> = Vec::new();
        for (index, batch) in batches.iter().enumerate() {
            match topics
                .iter_mut()
                .find(|(t, _)| *t == batch.destination.topic)
            {
                Some((_, indexes)) => indexes.push(index),
                None => topics.push((batch.destination.topic.clone(), vec![index])),
            }
        }
        let calls = topics.iter().map(|(topic, indexes)| {
            let request = ProduceRequest {
                topic: topic.to_string(),
                acks: Acks::Durable as i32,
                deduplicate: true,
                batches: indexes
                    .iter()
                    .map(|&i| {
                        let batch = &batches[i];
                        RecordBatch {
                            partition: batch.destination.partition,
                            record_count: batch.count,
                            compression: Compression::None as i32,
                            records: batch.body.clone(),
                            producer_id: batch.producer_id,
                            base_sequence: batch.base_sequence,
                            ..RecordBatch::default()
                        }
                    })
                    .collect(),
                ..ProduceRequest::default()
            };
            let events: u32 = indexes.iter().map(|&i| batches[i].count).sum();
            let span = tracing::info_span!("collector.forward", topic = %topic, events);
            // The call continues the trace of the first event it carries.
            if let Some(trace) = indexes.first().and_then(|&i| batches[i].trace.as_ref()) {
                continue_trace(&span, trace);
            }
            let mut broker = self.broker.clone();
            async move { broker.produce(request).await }.instrument(span)
        });
        let results = futures::future::join_all(calls).await;
        let mut offsets = vec![Placement::From(0); batches.len()];
        let mut failure = None;
        for ((_, indexes), result) in topics.iter().zip(results) {
            match result {
                Ok(response) => {
                    let response = response.into_inner();
                    let acks = response.batch_acks;
                    if acks.len() != indexes.len() {
                        failure.get_or_insert(DeliveryError::Failed {
                            reason: format!(
                                "the broker acknowledged {} of {} batches",
                                acks.len(),
                                indexes.len()
                            ),
                            transient: false,
                        });
                        continue;
                    }
                    for (&index, ack) in indexes.iter().zip(acks) {
                        offsets[index] = if ack.offsets.is_empty() {
                            Placement::From(ack.base_offset)
                        } else {
                            Placement::At(ack.offsets)
                        };
                    }
                    // Events clients sent again that the pipeline already had.
                    metrics::counter!("runnel_collector_retried_events_total")
                        .increment(response.duplicates);
                }
                // The broker had a batch already and no longer knows where: stored.
                Err(status) if status.code() == Code::AlreadyExists => {
                    failure = Some(DeliveryError::AlreadyStored);
                }
                Err(status) => {
                    metrics::counter!("runnel_collector_forward_errors_total", "code" => format!("{:?}", status.code()))
                        .increment(1);
                    if !matches!(failure, Some(DeliveryError::AlreadyStored)) {
                        failure = Some(DeliveryError::Failed {
                            reason: format!("broker: {}: {}", status.code(), status.message()),
                            transient: runnel_client::retriable(status.code()),
                        });
                    }
                }
            }
        }
        match failure {
            Some(failure) => Err(failure),
            None => {
                let events: u64 = batches.iter().map(|b| u64::from(b.count)).sum();
                metrics::counter!("runnel_collector_forwarded_events_total").increment(events);
                Ok(offsets)
            }
        }
    }
}
