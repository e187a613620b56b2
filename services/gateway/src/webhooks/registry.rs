//! The registry: every webhook, read from every partition of the broker's
//! `_gateway.webhooks` log (a `Subscribe` without a group per partition, from its first
//! record), so that every gateway replica holds the same webhooks.
//!
//! The topic is created on first use with no retention limit: the log is the registry,
//! and trimming it would forget webhooks. Until every partition has been read up to where
//! it ended when the gateway started, webhook calls wait (up to the request timeout, then
//! UNAVAILABLE) rather than answer from a partial registry. A change is written with the idempotent producer (acknowledged once
//! fsync'd) and answered once this replica has read it back, so a client that registers
//! a webhook sees it in its next call.
//!
//! A partition holds at most [`MAX_HOOKS_PER_PARTITION`] webhooks (their cursors share one
//! commit). Replicas that register at once each check that bound against what they have
//! read, so together they could pass it; the log settles it: every replica applies the
//! log in the same order and ignores a registration that finds its partition full, and
//! the replica that wrote it reads that back and refuses the call.

use super::delivery::Deliveries;
use super::record::{Change, MAX_HOOKS_PER_PARTITION, Webhook};
use super::{PARTITIONS, TOPIC, partition_of};
use crate::error::GatewayError;
use runnel_client::{ClientError, Producer, ProducerOptions};
use runnel_proto::v1::Acks;
use runnel_proto::v1::broker_client::BrokerClient;
use runnel_security::Peer;
use runnel_server::Shutdown;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

/// The first delay after the broker could not be reached; doubled up to the max.
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);
/// Ids stay below 2^53 so that JSON clients read them exactly.
const MAX_ID: u64 = (1 << 53) - 1;

/// How far the registry has read.
#[derive(Debug, Clone, Default)]
struct Progress {
    /// Per partition, the offset of the next record to apply.
    next: Vec<u64>,
    /// Per partition, where the log ended when the gateway started (`None` until known).
    loaded_at: Option<Vec<u64>>,
}

impl Progress {
    fn loaded(&self) -> bool {
        self.loaded_at
            .as_ref()
            .is_some_and(|ends| ends.iter().zip(&self.next).all(|(end, next)| next >= end))
    }
}

/// Every webhook, as the log says.
#[derive(Debug)]
pub(crate) struct Registry {
    hooks: Mutex<BTreeMap<u64, Arc<Webhook>>>,
    progress: watch::Sender<Progress>,
    broker: BrokerClient<Peer>,
    /// Created on the first write; dropped after a failed one (its sequence numbers may
    /// no longer match the broker's), so the next write starts a fresh one.
    producer: tokio::sync::Mutex<Option<Producer>>,
    request_timeout: Duration,
    deliveries: Arc<Deliveries>,
}

fn broker_error(error: ClientError) -> GatewayError {
    match error {
        ClientError::Broker(status) => GatewayError::Broker(status),
        ClientError::Topic(message) => GatewayError::Webhooks(message),
    }
}

impl Registry {
    /// Starts following the log behind `broker`; changes go to `deliveries` too.
    pub(crate) fn start(
        broker: Peer,
        max_message_bytes: usize,
        request_timeout: Duration,
        deliveries: Arc<Deliveries>,
        shutdown: Shutdown,
    ) -> Arc<Registry> {
        let registry = Arc::new(Registry {
            hooks: Mutex::new(BTreeMap::new()),
            progress: watch::Sender::new(Progress {
                next: vec![0; PARTITIONS as usize],
                loaded_at: None,
            }),
            broker: BrokerClient::new(broker).max_decoding_message_size(max_message_bytes),
            producer: tokio::sync::Mutex::new(None),
            request_timeout,
            deliveries,
        });
        tokio::spawn(Arc::clone(&registry).follow(shutdown));
        registry
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, BTreeMap<u64, Arc<Webhook>>>, GatewayError> {
        self.hooks
            .lock()
            .map_err(|_| GatewayError::Internal("webhook registry lock poisoned"))
    }

    /// Waits (at most the request timeout) until the registry is loaded.
    async fn ready(&self) -> Result<(), GatewayError> {
        match tokio::time::timeout(self.request_timeout, self.loaded()).await {
            Ok(()) => Ok(()),
            Err(_) => Err(GatewayError::Unavailable(
                "the webhook registry is still being read from the broker; try again shortly"
                    .into(),
            )),
        }
    }

    /// Waits until every partition has been read up to where it ended at start.
    pub(crate) async fn loaded(&self) {
        let mut progress = self.progress.subscribe();
        // The sender lives as long as `self`.
        let _ = progress.wait_for(Progress::loaded).await;
    }

    /// Waits until `partition` has been applied up to (not including) `offset`.
    pub(crate) async fn reached(&self, partition: u32, offset: u64) {
        let mut progress = self.progress.subscribe();
        let _ = progress
            .wait_for(|p| {
                p.next
                    .get(partition as usize)
                    .is_some_and(|next| *next >= offset)
            })
            .await;
    }

    /// Every webhook, by id.
    pub(crate) async fn webhooks(&self) -> Result<Vec<Arc<Webhook>>, GatewayError> {
        self.ready().await?;
        Ok(self.lock()?.values().cloned().collect())
    }

    /// The webhooks registered in `partition`.
    pub(crate) fn in_partition(&self, partition: u32) -> Vec<Arc<Webhook>> {
        self.hooks.lock().map_or_else(
            |_| Vec::new(),
            |hooks| {
                hooks
                    .values()
                    .filter(|hook| partition_of(hook.id) == partition)
                    .cloned()
                    .collect()
            },
        )
    }

    /// One webhook.
    pub(crate) async fn webhook(&self, id: u64) -> Result<Option<Arc<Webhook>>, GatewayError> {
        self.ready().await?;
        Ok(self.lock()?.get(&id).cloned())
    }

    /// A fresh id for a new webhook, if there is room for one: at most `max_hooks` in all
    /// and [`MAX_HOOKS_PER_PARTITION`] in its partition (whose cursors share one commit).
    pub(crate) async fn new_id(&self, max_hooks: usize) -> Result<u64, GatewayError> {
        self.ready().await?;
        let hooks = self.lock()?;
        if hooks.len() >= max_hooks {
            return Err(GatewayError::InvalidArgument(format!(
                "at most {max_hooks} webhooks; delete one first"
            )));
        }
        let mut per_partition = [0usize; PARTITIONS as usize];
        for id in hooks.keys() {
            per_partition[partition_of(*id) as usize] += 1;
        }
        // Random, so that replicas registering at once do not pick the same id; a full
        // partition is passed over by drawing again.
        for _ in 0..64 {
            let id = rand::random::<u64>() & MAX_ID;
            if id != 0
                && !hooks.contains_key(&id)
                && per_partition[partition_of(id) as usize] < MAX_HOOKS_PER_PARTITION
            {
                return Ok(id);
            }
        }
        Err(GatewayError::InvalidArgument(format!(
            "no room for another webhook ({} registered); delete one first",
            hooks.len()
        )))
    }

    /// Writes `change` to the log and waits until this replica has applied it.
    pub(crate) async fn write(&self, change: Change) -> Result<(), GatewayError> {
        self.ready().await?;
        let position = {
            let mut producer = self.producer.lock().await;
            if producer.is_none() {
                let options = ProducerOptions {
                    acks: Acks::Durable,
                    retry_for: self.request_timeout,
                    call_timeout: self.request_timeout,
                    ..ProducerOptions::default()
                };
                *producer = Some(
                    Producer::new(self.broker.clone(), TOPIC, options)
                        .await
                        .map_err(broker_error)?,
                );
            }
            let sent = match producer.as_mut() {
                Some(producer) => producer.send(vec![change.to_event()]).await,
                None => return Err(GatewayError::Internal("no webhook producer")),
            };
            match sent {
                Ok(mut positions) => positions.pop(),
                Err(error) => {
                    *producer = None;
                    return Err(broker_error(error));
                }
            }
        };
        let Some(position) = position else {
            return Err(GatewayError::Internal("the broker acknowledged no record"));
        };
        let mut progress = self.progress.subscribe();
        let partition = position.partition as usize;
        let applied = progress.wait_for(|p| {
            p.next
                .get(partition)
                .is_some_and(|next| *next > position.offset)
        });
        match tokio::time::timeout(self.request_timeout, applied).await {
            Ok(Ok(_)) => match change {
                Change::Registered(hook) if !self.lock()?.contains_key(&hook.id) => {
                    Err(GatewayError::InvalidArgument(format!(
                        "no room for webhook {}: its partition filled up with registrations made at once through other gateway replicas; register again",
                        hook.id
                    )))
                }
                _ => Ok(()),
            },
            _ => Err(GatewayError::Unavailable(format!(
                "webhook {} was written to the broker but this gateway has not read it back within {:?}; \
                 list webhooks again shortly",
                change.id(),
                self.request_timeout
            ))),
        }
    }

    fn apply(&self, partition: u32, change: Change) {
        match change {
            Change::Registered(hook) => {
                let hook = Arc::new(hook);
                let admitted = self
                    .hooks
                    .lock()
                    .map(|mut hooks| admit(&mut hooks, Arc::clone(&hook)))
                    .unwrap_or(Admission::PartitionFull);
                match admitted {
                    Admission::Fresh => self.deliveries.offer(partition, &hook),
                    Admission::Replaced => tracing::warn!(
                        webhook = hook.id,
                        "a webhook registered twice; the later registration replaces it"
                    ),
                    Admission::PartitionFull => {
                        metrics::counter!("runnel_gateway_webhooks_refused_total").increment(1);
                        tracing::warn!(
                            webhook = hook.id,
                            partition,
                            "a registration found its partition full (registered at once through several replicas); ignored"
                        );
                    }
                }
            }
            Change::Deleted(id) => {
                if let Ok(mut hooks) = self.hooks.lock() {
                    hooks.remove(&id);
                }
                self.deliveries.forget(partition, id);
            }
        }
    }

    /// Creates the topic if needed, learns where each partition ends, and follows them all.
    async fn follow(self: Arc<Self>, shutdown: Shutdown) {
        let mut delay = RETRY_MIN;
        let bounds = loop {
            match self.prepare().await {
                Ok(bounds) => break bounds,
                Err(error) => {
                    tracing::warn!(%error, topic = TOPIC, "cannot read the webhook registry from the broker; retrying");
                }
            }
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = shutdown.wait() => return,
            }
            delay = (delay * 2).min(RETRY_MAX);
        };
        for (partition, (start, _)) in bounds.iter().enumerate() {
            if *start > 0 {
                // Only if someone gave the topic a retention limit: registrations are lost.
                tracing::error!(
                    partition,
                    start,
                    topic = TOPIC,
                    "the webhook registry log was trimmed; webhooks registered in the trimmed part are gone"
                );
            }
        }
        self.progress.send_modify(|progress| {
            progress.next = bounds.iter().map(|(start, _)| *start).collect();
            progress.loaded_at = Some(bounds.iter().map(|(_, end)| *end).collect());
        });
        for partition in 0..PARTITIONS {
            tokio::spawn(Arc::clone(&self).tail(partition, shutdown.clone()));
        }
    }

    /// The topic's (start, end) offsets per partition, after creating it if needed.
    async fn prepare(&self) -> Result<Vec<(u64, u64)>, GatewayError> {
        runnel_client::open_kept(&self.broker, TOPIC, PARTITIONS)
            .await
            .map_err(broker_error)
    }

    /// Follows one partition from the next unapplied record until shutdown.
    async fn tail(self: Arc<Self>, partition: u32, shutdown: Shutdown) {
        let index = partition as usize;
        runnel_client::follow_partition(
            &self.broker,
            TOPIC,
            partition,
            || self.progress.borrow().next[index],
            |record| {
                match record.event.as_ref().map(Change::from_event) {
                    Some(Ok(change)) => self.apply(partition, change),
                    Some(Err(error)) => {
                        metrics::counter!("runnel_gateway_webhook_records_skipped_total")
                            .increment(1);
                        tracing::error!(partition, offset = record.offset, %error, "a webhook registry record this gateway cannot read; skipped");
                    }
                    None => {}
                }
                self.progress
                    .send_modify(|p| p.next[index] = record.offset + 1);
            },
            |start| self.progress.send_modify(|p| p.next[index] = start),
            || shutdown.wait(),
        )
        .await;
    }
}

/// What applying a registration did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Admission {
    /// A new webhook.
    Fresh,
    /// An id registered before: the later registration replaces it.
    Replaced,
    /// Its partition already holds [`MAX_HOOKS_PER_PARTITION`] webhooks: ignored.
    PartitionFull,
}

/// Adds `hook` to `hooks` unless its partition is full — a decision that depends on the
/// log alone, so every replica makes the same one.
fn admit(hooks: &mut BTreeMap<u64, Arc<Webhook>>, hook: Arc<Webhook>) -> Admission {
    if let Some(existing) = hooks.get_mut(&hook.id) {
        *existing = hook;
        return Admission::Replaced;
    }
    let partition = partition_of(hook.id);
    let in_partition = hooks
        .keys()
        .filter(|id| partition_of(**id) == partition)
        .count();
    if in_partition >= MAX_HOOKS_PER_PARTITION {
        return Admission::PartitionFull;
    }
    hooks.insert(hook.id, hook);
    Admission::Fresh
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hook(id: u64) -> Arc<Webhook> {
        Arc::new(Webhook {
            id,
            url: "http://127.0.0.1:9/hook".into(),
            query: String::new(),
            keys: Vec::new(),
            key_prefix: String::new(),
            predicates: Vec::new(),
            secret: "0123456789abcdef".into(),
            created_at: String::new(),
            after_sequence: 0,
        })
    }

    #[test]
    fn a_full_partition_refuses_registrations_in_log_order_and_others_still_admit() {
        let mut hooks = BTreeMap::new();
        let full = partition_of(1);
        let mut ids = (1..).filter(|id| partition_of(*id) == full);
        for id in ids.by_ref().take(MAX_HOOKS_PER_PARTITION) {
            assert_eq!(admit(&mut hooks, hook(id)), Admission::Fresh);
        }
        // Two registrations that raced through two replicas: both find it full, on every
        // replica, because every replica applies them after the same ones.
        let late: Vec<u64> = ids.take(2).collect();
        for id in &late {
            assert_eq!(admit(&mut hooks, hook(*id)), Admission::PartitionFull);
            assert!(!hooks.contains_key(id));
        }
        assert_eq!(hooks.len(), MAX_HOOKS_PER_PARTITION);
        // Another partition has room; an id seen before replaces its registration.
        let elsewhere = (1..).find(|id| partition_of(*id) != full).unwrap();
        assert_eq!(admit(&mut hooks, hook(elsewhere)), Admission::Fresh);
        assert_eq!(admit(&mut hooks, hook(1)), Admission::Replaced);
        assert_eq!(hooks.len(), MAX_HOOKS_PER_PARTITION + 1);
    }
}
