//! `Tap`: a live copy of a topic's raw events as the broker stores them, from the moment
//! of the call, optionally filtered. It follows every partition from its end offset at the
//! time of the call (broker `Subscribe` without a group, so it takes nothing from any
//! consumer group). A slow tap slows only its own broker subscriptions (flow control all
//! the way), and at most `max_taps` are open at once.

use crate::error::CollectorError;
use crate::forward::Broker;
use crate::intake::Intake;
use crate::validate::validate_topic;
use futures::StreamExt;
use runnel_proto::v1::subscribe_response::Message;
use runnel_proto::v1::{
    DescribeTopicRequest, Event, RecordPosition, SubscribeRequest, TapEvent, TapFilter, TapRequest,
};
use runnel_server::Shutdown;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status};

/// Opens taps, at most `max` at once.
#[derive(Debug)]
pub(crate) struct Taps {
    broker: Broker,
    open: Arc<AtomicUsize>,
    max: usize,
}

/// One open tap, counted until dropped.
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

type TapStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<TapEvent, Status>> + Send>>;

impl Taps {
    pub(crate) fn new(broker: Broker, max: usize) -> Taps {
        Taps {
            broker,
            open: Arc::new(AtomicUsize::new(0)),
            max,
        }
    }

    pub(crate) async fn open(
        &self,
        intake: &Intake,
        request: TapRequest,
        shutdown: Shutdown,
    ) -> Result<TapStream, CollectorError> {
        let topic = if request.topic.is_empty() {
            intake.default_topic.to_string()
        } else {
            validate_topic(&request.topic)?;
            request.topic
        };
        if self.open.fetch_add(1, Ordering::AcqRel) >= self.max {
            self.open.fetch_sub(1, Ordering::AcqRel);
            return Err(CollectorError::TooMany(format!(
                "{} taps are open, the most this collector allows (collector.max_taps)",
                self.max
            )));
        }
        let slot = Slot(Arc::clone(&self.open));
        let mut broker = self.broker.clone();
        let described = broker
            .describe_topic(DescribeTopicRequest {
                name: topic.clone(),
            })
            .await
            .map_err(|status| match status.code() {
                Code::NotFound => {
                    CollectorError::TopicNotFound(format!("topic {topic:?} does not exist"))
                }
                _ => CollectorError::Broker(status),
            })?
            .into_inner();
        let partitions = described.topic.map(|t| t.partitions).unwrap_or_default();
        let mut followers = Vec::with_capacity(partitions.len());
        for partition in partitions {
            let stream = broker
                .subscribe(SubscribeRequest {
                    topic: topic.clone(),
                    partition: partition.partition,
                    offset: partition.end_offset,
                    ..SubscribeRequest::default()
                })
                .await
                .map_err(CollectorError::Broker)?
                .into_inner();
            followers.push(stream);
        }
        let filter = request.filter.unwrap_or_default();
        let (sender, receiver) = mpsc::channel(256);
        metrics::gauge!("runnel_collector_taps").increment(1.0);
        tokio::spawn(async move {
            let _slot = slot;
            let mut merged = futures::stream::select_all(followers);
            loop {
                let next = tokio::select! {
                    next = merged.next() => next,
                    () = sender.closed() => break,
                    () = shutdown.wait() => {
                        let _ = sender.send(Err(Status::unavailable("the collector is stopping"))).await;
                        break;
                    }
                };
                let chunk = match next {
                    Some(Ok(response)) => match response.message {
                        Some(Message::Records(chunk)) => chunk,
                        _ => continue,
                    },
                    Some(Err(status)) => {
                        let _ = sender
                            .send(Err(Status::unavailable(format!(
                                "broker: {}",
                                status.message()
                            ))))
                            .await;
                        break;
                    }
                    None => break,
                };
                for record in chunk.records {
                    let Some(event) = record.event else { continue };
                    if !matches(&filter, &event) {
                        continue;
                    }
                    let tapped = TapEvent {
                        event: Some(event),
                        position: Some(RecordPosition {
                            topic: topic.clone(),
                            partition: record.partition,
                            offset: record.offset,
                        }),
                        append_time: record.append_time,
                    };
                    if sender.send(Ok(tapped)).await.is_err() {
                        break;
                    }
                }
            }
            metrics::gauge!("runnel_collector_taps").decrement(1.0);
        });
        Ok(Box::pin(ReceiverStream::new(receiver)))
    }
}

/// Whether `event` passes every field set in `filter`.
pub(crate) fn matches(filter: &TapFilter, event: &Event) -> bool {
    (filter.key.is_empty() || filter.key == event.key)
        && event.key.starts_with(&filter.key_prefix)
        && (filter.r#type.is_empty() || filter.r#type == event.r#type)
        && (filter.source.is_empty() || filter.source == event.source)
        && filter
            .attributes
            .iter()
            .all(|(name, value)| event.attributes.get(name) == Some(value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_set_field_must_match() {
        let mut event = Event {
            key: "sensor-1".into(),
            r#type: "reading".into(),
            source: "s".into(),
            ..Event::default()
        };
        event.attributes.insert("site".into(), "a".into());
        assert!(matches(&TapFilter::default(), &event));
        let mut filter = TapFilter {
            key_prefix: "sensor-".into(),
            r#type: "reading".into(),
            ..TapFilter::default()
        };
        assert!(matches(&filter, &event));
        filter.attributes.insert("site".into(), "b".into());
        assert!(!matches(&filter, &event));
        filter.attributes.insert("site".into(), "a".into());
        assert!(matches(&filter, &event));
        filter.key = "sensor-2".into();
        assert!(!matches(&filter, &event));
    }
}
