//! Delivery, shared out among gateway replicas by the consumer group
//! `runnel-gateway.webhooks` on the registry's topic: the member that owns partition p
//! delivers the webhooks registered in p.
//!
//! Each such webhook has a task that follows results after its cursor, batches them, and
//! POSTs each batch until the receiver accepts it; then the group member commits p's
//! offset with the cursors and delivery status of every webhook in p as its metadata
//! ([`super::record`]), and only then does the task go on. A new owner of p — after a
//! rebalance, or after the previous owner died — receives that metadata with the
//! assignment and resumes each webhook after its committed cursor, from the store's
//! change feed. So a result is never skipped, and is delivered twice only when the owner
//! stopped (or lost p) after the receiver accepted a batch and before its commit landed:
//! that one batch per webhook is delivered again by the next owner.
//!
//! A commit refused with FAILED_PRECONDITION means the group has moved on without this
//! replica (it was evicted, or p was reassigned): its deliveries for p stop at once.

use super::outbound::Outbound;
use super::record::{self, Cursor, Outcome, Webhook};
use super::registry::Registry;
use super::{DeliveryStatus, GROUP, PARTITIONS, TOPIC, now, partition_of, signature};
use crate::config::{SlowClientPolicy, WebhookConfig};
use crate::live::{Hub, LiveItem, Published, Start};
use futures::FutureExt;
use runnel_client::{ClientError, ConsumerOptions, GroupConsumer, GroupEvent};
use runnel_proto::json::result_json;
use runnel_proto::v1::{PartitionOffset, SubscribeResponse};
use runnel_security::Peer;
use runnel_server::Shutdown;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tonic::Code;

/// The first delay after the group could not be joined; doubled up to the max.
const REJOIN_MIN: Duration = Duration::from_millis(100);
const REJOIN_MAX: Duration = Duration::from_secs(5);

/// A webhook being delivered by this replica.
#[derive(Debug)]
struct Running {
    status: Arc<Mutex<DeliveryStatus>>,
    task: JoinHandle<()>,
}

/// A partition this replica owns.
#[derive(Debug, Default)]
struct Owned {
    /// The group's position in the partition: committed with the cursors.
    next_offset: u64,
    /// The cursors committed by the previous owner, for webhooks not started yet.
    restored: BTreeMap<u64, Cursor>,
    running: BTreeMap<u64, Running>,
    /// The last commit (or the assignment's start): where delivery resumes if this
    /// replica is fenced but keeps the partition.
    committed: PartitionOffset,
}

impl Owned {
    fn stop(self) {
        for running in self.running.into_values() {
            running.task.abort();
        }
    }
}

/// What this replica delivers.
#[derive(Debug, Default)]
struct State {
    owned: BTreeMap<u32, Owned>,
    /// Partitions whose deliveries stopped on a refused commit, with their last commit:
    /// if the next assignment keeps one here (a rebalance this replica had not read yet
    /// when it committed), delivery resumes from that commit, as a new owner's would.
    fenced: BTreeMap<u32, PartitionOffset>,
    stopped: bool,
}

/// How a commit asked for by a delivery task went.
#[derive(Debug)]
enum Committed {
    Yes,
    /// This replica no longer owns the partition: stop.
    Fenced,
    /// The broker could not be reached: try again.
    Failed(String),
}

/// What the group member is asked to do.
#[derive(Debug)]
enum MemberRequest {
    /// A delivery task's: commit its partition's cursors.
    Commit {
        partition: u32,
        reply: oneshot::Sender<Committed>,
    },
    /// The API's: read every partition's last committed cursors, whichever replica
    /// committed them.
    ReadCommitted {
        reply: oneshot::Sender<Result<Vec<PartitionOffset>, String>>,
    },
}

/// How long the API waits for the committed cursors before it answers without them.
const READ_COMMITTED_PATIENCE: Duration = Duration::from_secs(2);

/// The deliveries of this replica, and its membership of the delivery group.
#[derive(Debug)]
pub(crate) struct Deliveries {
    state: Mutex<State>,
    hub: Arc<Hub>,
    config: WebhookConfig,
    outbound: Outbound,
    commits: mpsc::Sender<MemberRequest>,
    requests: Mutex<Option<mpsc::Receiver<MemberRequest>>>,
    shutdown: Shutdown,
}

fn millis(at: &Option<String>) -> Option<i64> {
    at.as_deref()
        .and_then(|text| runnel_proto::json::parse_time(text).ok())
        .map(|m| m.0)
}

fn rfc3339(at: Option<i64>) -> Option<String> {
    at.map(|ms| runnel_proto::json::rfc3339(runnel_proto::Millis(ms)))
}

impl From<&DeliveryStatus> for Cursor {
    fn from(s: &DeliveryStatus) -> Cursor {
        Cursor {
            cursor: s.cursor,
            delivered: s.delivered,
            failures: s.failures,
            retrying: u32::try_from(s.retrying).unwrap_or(u32::MAX),
            last_status: s.last_status,
            last_outcome: s.last_outcome,
            last_attempt: millis(&s.last_attempt_at),
            last_success: millis(&s.last_success_at),
        }
    }
}

impl From<Cursor> for DeliveryStatus {
    fn from(c: Cursor) -> DeliveryStatus {
        DeliveryStatus {
            cursor: c.cursor,
            delivered: c.delivered,
            failures: c.failures,
            retrying: u64::from(c.retrying),
            last_status: c.last_status,
            last_outcome: c.last_outcome,
            last_error: None,
            last_attempt_at: rfc3339(c.last_attempt),
            last_success_at: rfc3339(c.last_success),
        }
    }
}

impl Deliveries {
    /// No deliveries yet: [`Deliveries::join`] takes part in the group.
    pub(crate) fn new(
        hub: Arc<Hub>,
        config: WebhookConfig,
        outbound: Outbound,
        shutdown: Shutdown,
    ) -> Arc<Deliveries> {
        let (commits, requests) = mpsc::channel(64);
        Arc::new(Deliveries {
            state: Mutex::new(State::default()),
            hub,
            config,
            outbound,
            commits,
            requests: Mutex::new(Some(requests)),
            shutdown,
        })
    }

    /// Joins the delivery group once the registry is loaded, and stays in it (rejoining
    /// after the broker drops the member) until shutdown.
    pub(crate) fn join(
        self: &Arc<Self>,
        broker: Peer,
        max_message_bytes: usize,
        registry: Arc<Registry>,
    ) {
        let requests = self.requests.lock().ok().and_then(|mut r| r.take());
        if let Some(requests) = requests {
            tokio::spawn(Arc::clone(self).member(broker, max_message_bytes, registry, requests));
        }
    }

    /// Starts delivering `hook` (registered in `partition`) if this replica owns the
    /// partition and does not deliver it already.
    pub(crate) fn offer(self: &Arc<Self>, partition: u32, hook: &Arc<Webhook>) {
        if let Ok(mut state) = self.state.lock() {
            self.start_in(&mut state, partition, hook);
        }
    }

    fn start_in(self: &Arc<Self>, state: &mut State, partition: u32, hook: &Arc<Webhook>) {
        if state.stopped {
            return;
        }
        let Some(owned) = state.owned.get_mut(&partition) else {
            return;
        };
        if owned.running.contains_key(&hook.id) {
            return;
        }
        let status = match owned.restored.remove(&hook.id) {
            Some(cursor) => DeliveryStatus::from(cursor),
            None => DeliveryStatus {
                cursor: hook.after_sequence,
                ..DeliveryStatus::default()
            },
        };
        let status = Arc::new(Mutex::new(status));
        let task = tokio::spawn(Arc::clone(self).deliver(
            partition,
            Arc::clone(hook),
            Arc::clone(&status),
        ));
        owned.running.insert(hook.id, Running { status, task });
    }

    /// Stops delivering webhook `id` (deleted).
    pub(crate) fn forget(&self, partition: u32, id: u64) {
        if let Ok(mut state) = self.state.lock()
            && let Some(owned) = state.owned.get_mut(&partition)
        {
            owned.restored.remove(&id);
            if let Some(running) = owned.running.remove(&id) {
                running.task.abort();
            }
        }
    }

    /// Webhook `id`'s delivery status, if this replica delivers it.
    pub(crate) fn status(&self, id: u64) -> Option<DeliveryStatus> {
        let state = self.state.lock().ok()?;
        let running = state.owned.get(&partition_of(id))?.running.get(&id)?;
        running.status.lock().ok().map(|s| s.clone())
    }

    /// Every webhook's delivery status as last committed to the group — by whichever
    /// replica delivers it — or `None` if this replica cannot tell now (not in the group,
    /// or the broker did not answer within a couple of seconds). It lacks `last_error`,
    /// which only the delivering replica knows, and is as of that replica's last commit.
    pub(crate) async fn committed_statuses(&self) -> Option<BTreeMap<u64, DeliveryStatus>> {
        let (reply, answer) = oneshot::channel();
        let asked = async {
            self.commits
                .send(MemberRequest::ReadCommitted { reply })
                .await
                .ok()?;
            answer.await.ok()
        };
        let offsets = match tokio::time::timeout(READ_COMMITTED_PATIENCE, asked).await {
            Ok(Some(Ok(offsets))) => offsets,
            Ok(Some(Err(error))) => {
                tracing::debug!(%error, "cannot read the committed webhook cursors");
                return None;
            }
            Ok(None) | Err(_) => return None,
        };
        let mut statuses = BTreeMap::new();
        for offset in offsets {
            match record::decode_cursors(&offset.metadata) {
                Ok(cursors) => statuses.extend(
                    cursors
                        .into_iter()
                        .map(|(id, cursor)| (id, DeliveryStatus::from(cursor))),
                ),
                Err(error) => {
                    tracing::debug!(partition = offset.partition, %error, "committed webhook cursors unreadable");
                }
            }
        }
        Some(statuses)
    }

    /// Webhooks this replica delivers whose last attempt failed.
    pub(crate) fn failing(&self) -> usize {
        self.state.lock().map_or(0, |state| {
            state
                .owned
                .values()
                .flat_map(|owned| owned.running.values())
                .filter(|r| r.status.lock().is_ok_and(|s| s.retrying > 0))
                .count()
        })
    }

    /// Stops every delivery and waits until the tasks are gone.
    pub(crate) async fn stop(&self) {
        let tasks: Vec<JoinHandle<()>> = match self.state.lock() {
            Ok(mut state) => {
                state.stopped = true;
                std::mem::take(&mut state.owned)
                    .into_values()
                    .flat_map(|owned| owned.running.into_values().map(|r| r.task))
                    .collect()
            }
            Err(_) => Vec::new(),
        };
        for task in tasks {
            task.abort();
            let _ = task.await;
        }
    }

    fn stop_partitions(&self, keep: impl Fn(u32) -> bool) {
        if let Ok(mut state) = self.state.lock() {
            let lost: Vec<u32> = state.owned.keys().copied().filter(|p| !keep(*p)).collect();
            for partition in lost {
                if let Some(owned) = state.owned.remove(&partition) {
                    owned.stop();
                }
            }
        }
    }

    /// This replica's membership of the delivery group.
    async fn member(
        self: Arc<Self>,
        broker: Peer,
        max_message_bytes: usize,
        registry: Arc<Registry>,
        mut requests: mpsc::Receiver<MemberRequest>,
    ) {
        // The topic exists once the registry has read it.
        tokio::select! {
            () = registry.loaded() => {}
            () = self.shutdown.wait() => return,
        }
        let mut delay = REJOIN_MIN;
        while !self.shutdown.is_triggered() {
            let options = ConsumerOptions {
                // Named so that the broker's group listing shows which members are gateways.
                member_id: Some(format!("gateway-{:016x}", rand::random::<u64>())),
                session_timeout: self.config.session_timeout,
                ..ConsumerOptions::default()
            };
            let joined = GroupConsumer::<SubscribeResponse>::join_decoding(
                broker.clone(),
                // Assignments carry up to 8 × 64 KiB of cursors.
                max_message_bytes.max(PARTITIONS as usize * (record::MAX_METADATA_BYTES + 64)),
                GROUP,
                TOPIC,
                options,
            )
            .await;
            match joined {
                Ok(mut consumer) => {
                    tracing::info!(
                        member = consumer.member_id(),
                        "joined the webhook delivery group"
                    );
                    delay = REJOIN_MIN;
                    self.take_part(&mut consumer, &registry, &mut requests)
                        .await;
                }
                Err(error) => {
                    tracing::warn!(%error, "cannot join the webhook delivery group; retrying");
                }
            }
            // Whatever ended the membership, this replica owns nothing now.
            self.stop_partitions(|_| false);
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = self.shutdown.wait() => return,
            }
            delay = (delay * 2).min(REJOIN_MAX);
        }
    }

    /// Follows assignments and commits cursors until the membership ends.
    async fn take_part(
        self: &Arc<Self>,
        consumer: &mut GroupConsumer<SubscribeResponse>,
        registry: &Registry,
        requests: &mut mpsc::Receiver<MemberRequest>,
    ) {
        loop {
            tokio::select! {
                event = consumer.next() => match event {
                    Ok(Some(GroupEvent::Assigned { partitions, starts, .. })) => {
                        self.assigned(&partitions, starts, registry).await;
                    }
                    Ok(Some(GroupEvent::Records { partition, records })) => {
                        // The registry applies the changes; the group's position is what
                        // the cursors are committed with.
                        if let (Some(last), Ok(mut state)) = (records.last(), self.state.lock())
                            && let Some(owned) = state.owned.get_mut(&partition)
                        {
                            owned.next_offset = last.offset + 1;
                        }
                    }
                    Ok(None) => {
                        tracing::info!("the broker ended the webhook delivery group's stream; rejoining");
                        return;
                    }
                    Err(error) => {
                        tracing::info!(%error, "left the webhook delivery group; rejoining");
                        return;
                    }
                },
                Some(request) = requests.recv() => match request {
                    MemberRequest::Commit { partition, reply } => {
                        let committed = self.commit(consumer, partition).await;
                        let _ = reply.send(committed);
                    }
                    MemberRequest::ReadCommitted { reply } => {
                        // No offsets: the broker answers with every partition's commit.
                        let read = consumer
                            .commit_with_metadata(Vec::new())
                            .await
                            .map_err(|e| e.to_string());
                        let _ = reply.send(read);
                    }
                },
                () = self.shutdown.wait() => return,
            }
        }
    }

    /// A new assignment: stop what moved away, start what (re)starts here.
    async fn assigned(
        self: &Arc<Self>,
        partitions: &[u32],
        starts: Vec<PartitionOffset>,
        registry: &Registry,
    ) {
        tracing::info!(?partitions, "webhook delivery partitions assigned");
        self.stop_partitions(|p| partitions.contains(&p));
        let mut starts = starts;
        if let Ok(mut state) = self.state.lock() {
            let fenced = std::mem::take(&mut state.fenced);
            for (partition, committed) in fenced {
                if partitions.contains(&partition)
                    && !starts.iter().any(|s| s.partition == partition)
                {
                    starts.push(committed);
                }
            }
            for partition in partitions {
                if !state.owned.contains_key(partition)
                    && !starts.iter().any(|s| s.partition == *partition)
                {
                    // The broker says "continue" for a partition this replica does not
                    // deliver: nothing to resume from, so nothing is delivered twice.
                    tracing::error!(
                        partition,
                        "assigned a webhook partition to continue that this gateway does not deliver"
                    );
                }
            }
        }
        for start in starts {
            // Every change the previous owner had seen is in the registry once it has read
            // this far: a cursor whose webhook is not there belongs to a deleted one.
            tokio::select! {
                () = registry.reached(start.partition, start.offset) => {}
                () = self.shutdown.wait() => return,
            }
            let mut restored = record::decode_cursors(&start.metadata).unwrap_or_else(|error| {
                // Only a newer gateway writes what this one cannot read.
                tracing::error!(partition = start.partition, %error, "webhook cursors unreadable; delivering from each registration");
                BTreeMap::new()
            });
            let Ok(mut state) = self.state.lock() else {
                return;
            };
            if let Some(previous) = state.owned.remove(&start.partition) {
                previous.stop();
            }
            // Read under the lock: a registration applied from now on finds the partition
            // owned (`offer`), one applied before is in this snapshot.
            let hooks = registry.in_partition(start.partition);
            restored.retain(|id, _| hooks.iter().any(|hook| hook.id == *id));
            let partition = start.partition;
            state.owned.insert(
                partition,
                Owned {
                    next_offset: start.offset,
                    restored,
                    running: BTreeMap::new(),
                    committed: start,
                },
            );
            for hook in hooks {
                self.start_in(&mut state, partition, &hook);
            }
        }
    }

    /// Commits `partition`'s offset with the cursors of every webhook delivered in it.
    async fn commit(
        &self,
        consumer: &mut GroupConsumer<SubscribeResponse>,
        partition: u32,
    ) -> Committed {
        let offset = {
            let Ok(state) = self.state.lock() else {
                return Committed::Fenced;
            };
            let Some(owned) = state.owned.get(&partition) else {
                return Committed::Fenced;
            };
            let mut cursors = owned.restored.clone();
            for (id, running) in &owned.running {
                if let Ok(status) = running.status.lock() {
                    cursors.insert(*id, Cursor::from(&*status));
                }
            }
            PartitionOffset {
                partition,
                offset: owned.next_offset,
                metadata: record::encode_cursors(&cursors),
            }
        };
        match consumer.commit_with_metadata(vec![offset.clone()]).await {
            Ok(_) => {
                if let Ok(mut state) = self.state.lock()
                    && let Some(owned) = state.owned.get_mut(&partition)
                {
                    owned.committed = offset;
                }
                Committed::Yes
            }
            Err(ClientError::Broker(status)) if status.code() == Code::FailedPrecondition => {
                tracing::warn!(
                    partition,
                    message = status.message(),
                    "fenced: the group moved on without this gateway's commit; stopping these webhooks"
                );
                metrics::counter!("runnel_gateway_webhook_fenced_total").increment(1);
                if let Ok(mut state) = self.state.lock()
                    && let Some(owned) = state.owned.remove(&partition)
                {
                    state.fenced.insert(partition, owned.committed.clone());
                    owned.stop();
                }
                Committed::Fenced
            }
            Err(error) => Committed::Failed(error.to_string()),
        }
    }

    /// One webhook's delivery loop: follow from the cursor, batch, deliver until accepted,
    /// commit, go on.
    async fn deliver(
        self: Arc<Self>,
        partition: u32,
        hook: Arc<Webhook>,
        status: Arc<Mutex<DeliveryStatus>>,
    ) {
        let id = hook.id;
        let request = match hook.registration().watch_request() {
            Ok(request) => request,
            Err(error) => {
                // Checked when it was registered; only a newer gateway writes otherwise.
                tracing::error!(webhook = id, %error, "a webhook's filter is invalid; not delivering it");
                return;
            }
        };
        let mut backoff = self.config.initial_backoff;
        while !self.shutdown.is_triggered() {
            let cursor = status.lock().map_or(0, |s| s.cursor);
            let subscription = self
                .hub
                .subscribe(&request, Start::After(cursor), "webhook")
                .await;
            let mut subscription = match subscription {
                Ok(s) => s.with_policy(SlowClientPolicy::DropOldest),
                Err(error) => {
                    tracing::warn!(webhook = id, %error, "cannot follow results for a webhook");
                    self.pause(&mut backoff).await;
                    continue;
                }
            };
            loop {
                let mut batch: Vec<Arc<Published>> = Vec::new();
                let mut resubscribe = false;
                match subscription.next().await {
                    Ok(LiveItem::Result(result)) => batch.push(result),
                    // A gap or a broken stream: start again from the cursor, losing nothing.
                    Ok(LiveItem::Gap { .. }) | Err(_) => break,
                }
                while batch.len() < self.config.max_batch {
                    match subscription.next().now_or_never() {
                        Some(Ok(LiveItem::Result(result))) => batch.push(result),
                        Some(Ok(LiveItem::Gap { .. }) | Err(_)) => {
                            resubscribe = true;
                            break;
                        }
                        None => break,
                    }
                }
                let through = batch.last().map_or(0, |r| r.sequence);
                if !self.deliver_batch(&hook, &status, &batch, through).await
                    || !self.commit_cursor(partition, id).await
                {
                    return; // shutting down, or fenced
                }
                backoff = self.config.initial_backoff;
                if resubscribe {
                    break;
                }
            }
        }
    }

    /// Asks the group member to commit this partition's cursors until it has; false if
    /// this replica no longer delivers the partition.
    async fn commit_cursor(&self, partition: u32, id: u64) -> bool {
        let mut backoff = self.config.initial_backoff;
        loop {
            let (reply, answer) = oneshot::channel();
            if self
                .commits
                .send(MemberRequest::Commit { partition, reply })
                .await
                .is_err()
            {
                return false;
            }
            match answer.await {
                Ok(Committed::Yes) => return true,
                Ok(Committed::Fenced) | Err(_) => return false,
                Ok(Committed::Failed(error)) => {
                    tracing::warn!(webhook = id, %error, "cannot commit a webhook's cursor; retrying");
                    if !self.pause(&mut backoff).await {
                        return false;
                    }
                }
            }
        }
    }

    /// Posts one batch until the receiver accepts it; false if the gateway stops first.
    async fn deliver_batch(
        &self,
        hook: &Webhook,
        status: &Mutex<DeliveryStatus>,
        batch: &[Arc<Published>],
        through: u64,
    ) -> bool {
        let id = hook.id;
        let results: Vec<serde_json::Value> = batch.iter().map(|r| result_json(r)).collect();
        let body = serde_json::to_vec(&serde_json::json!({ "webhook": id, "results": results }))
            .unwrap_or_default();
        let body = bytes::Bytes::from(body);
        let mut backoff = self.config.initial_backoff;
        loop {
            let timestamp = runnel_proto::now_millis().0.to_string();
            let Ok(signature) = signature(&hook.secret, &timestamp, &body) else {
                return false;
            };
            let headers = [
                ("content-type", "application/json".to_owned()),
                ("x-runnel-webhook", id.to_string()),
                ("x-runnel-timestamp", timestamp),
                ("x-runnel-signature", signature),
            ];
            let attempt = self.outbound.post(&hook.url, &headers, body.clone());
            let outcome = tokio::select! {
                outcome = attempt => outcome,
                () = self.shutdown.wait() => return false,
            };
            let (code, error, outcome) = match outcome {
                Ok(code) if code.is_success() => (Some(code), None, Outcome::Accepted),
                Ok(code) => (
                    Some(code),
                    Some(format!("the receiver answered {code}")),
                    Outcome::Refused,
                ),
                Err(failed) => {
                    // The status shows what kind of failure it was, never the network's own
                    // words (which would make the API a port scanner); the log has them.
                    tracing::debug!(webhook = id, error = %failed.detail, "webhook delivery attempt failed");
                    (None, Some(failed.class.to_owned()), Outcome::NoAnswer)
                }
            };
            match status.lock() {
                Ok(mut s) => {
                    s.last_status = code.map(|code| code.as_u16());
                    s.last_outcome = Some(outcome);
                    s.last_attempt_at = Some(now());
                    match &error {
                        None => {
                            s.cursor = through;
                            s.delivered += batch.len() as u64;
                            s.retrying = 0;
                            s.last_error = None;
                            s.last_success_at = s.last_attempt_at.clone();
                        }
                        Some(error) => {
                            s.failures += 1;
                            s.retrying += 1;
                            s.last_error = Some(error.clone());
                        }
                    }
                }
                Err(_) => return false,
            }
            match error {
                None => {
                    metrics::counter!("runnel_gateway_webhook_deliveries_total", "outcome" => "accepted").increment(1);
                    return true;
                }
                Some(error) => {
                    metrics::counter!("runnel_gateway_webhook_deliveries_total", "outcome" => "failed").increment(1);
                    tracing::debug!(webhook = id, %error, ?backoff, "webhook delivery failed; retrying");
                    if !self.pause(&mut backoff).await {
                        return false;
                    }
                }
            }
        }
    }

    /// Waits out `backoff` (with up to 20 % jitter, so retries of many webhooks spread
    /// out) and doubles it; false if the gateway stops meanwhile.
    async fn pause(&self, backoff: &mut Duration) -> bool {
        let jitter = backoff.mul_f64(rand::random::<f64>() * 0.2);
        let wait = *backoff + jitter;
        *backoff = (*backoff * 2).min(self.config.max_backoff);
        tokio::select! {
            () = tokio::time::sleep(wait) => true,
            () = self.shutdown.wait() => false,
        }
    }
}
