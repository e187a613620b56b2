//! Delivery: one task per shard sends its entries downstream, in id order, one call at a
//! time, and releases them once acknowledged.
//!
//! A call takes every entry ready (up to `max_call_bytes`) and merges consecutive entries
//! of one destination into one batch (up to the batch limits), so batches grow with the
//! load while the one call in flight keeps each destination's sequence in order. A call
//! that fails is sent again unchanged until it succeeds — the downstream recognises the
//! batches it already stored — so a slow or absent downstream holds entries back (and,
//! through the budget, submissions) but never drops them.
//!
//! Entries replayed after a crash are sent one per batch: each was inside one batch the
//! last time, if it was sent at all, so the downstream either has it whole, or not at
//! all. When it answers that a batch of a call is older than what it has
//! ([`DeliveryError::AlreadyStored`]), the call is split into single batches, and a single
//! batch so answered is released as stored.

use crate::shard::{LogRequest, Shared};
use crate::{Budget, Destination, Entry, Error, LoggedSender, Mode, PartWaiter, TraceHeaders};
use bytes::{Bytes, BytesMut};
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

/// Messages of one destination, sent as one unit.
#[derive(Debug, Clone)]
pub struct Batch {
    /// Where they go.
    pub destination: Destination,
    /// The producer id of the entries.
    pub producer_id: u64,
    /// The sequence of the first message.
    pub base_sequence: u64,
    /// Messages in `body`.
    pub count: u32,
    /// The messages, back to back.
    pub body: Bytes,
    /// The trace of the call that submitted the first of them, if known.
    pub trace: Option<TraceHeaders>,
}

/// Where the downstream stored a delivered batch's messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    /// At consecutive offsets from this one.
    From(u64),
    /// At these offsets, one per message in order: a downstream that recognises retried
    /// messages answers them with their originals' offsets.
    At(Vec<u64>),
}

impl Placement {
    /// The offset of the `count` messages from the `first`th on, if they are consecutive.
    pub fn run(&self, first: u64, count: u32) -> Option<u64> {
        match self {
            Placement::From(base) => Some(base + first),
            Placement::At(offsets) => {
                let start = usize::try_from(first).ok()?;
                let run = offsets.get(start..start.checked_add(count as usize)?)?;
                let head = *run.first()?;
                run.iter()
                    .zip(head..)
                    .all(|(&offset, expected)| offset == expected)
                    .then_some(head)
            }
        }
    }
}

/// Why a call downstream did not succeed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DeliveryError {
    /// A batch of the call is older than what the downstream already stored for its
    /// producer: it was stored before, where is no longer known.
    #[error("already stored")]
    AlreadyStored,
    /// Anything else; the call is made again after a pause.
    #[error("{reason}")]
    Failed {
        /// What went wrong.
        reason: String,
        /// Whether it is expected to pass (unreachable, overloaded) rather than a refusal
        /// that needs an operator: only decides how loudly it is logged.
        transient: bool,
    },
}

/// Where entries go once logged: the broker, in the collector.
pub trait Downstream: Send + Sync + 'static {
    /// Stores the batches, in order per destination, and answers with where each one's
    /// messages are. A batch with a producer id and sequence the downstream already stored
    /// must be answered with its original offsets, not stored again.
    fn deliver(
        &self,
        batches: Vec<Batch>,
    ) -> impl Future<Output = Result<Vec<Placement>, DeliveryError>> + Send;
}

/// An entry on its way downstream.
#[derive(Debug)]
pub(crate) struct Outbound {
    pub(crate) entry: Entry,
    /// Written to the log (SBML writes it just before sending).
    pub(crate) logged: bool,
    /// From before the log was last opened: sent alone, never merged.
    pub(crate) replayed: bool,
    pub(crate) waiters: Vec<PartWaiter>,
    pub(crate) trace: Option<TraceHeaders>,
    /// Budget bytes it holds.
    pub(crate) reserved: u64,
}

/// What the writer and syncer tell the delivery task.
#[derive(Debug)]
pub(crate) enum ToForwarder {
    /// New entries, in id order.
    Entries(Vec<Outbound>),
    /// Answer these once every entry up to the id is delivered.
    WhenDelivered(u64, Vec<LoggedSender>),
    /// SBML: answer these once every entry up to the id is logged.
    WhenLogged(u64, Vec<LoggedSender>),
    /// Every submission made before the close has been handed over.
    Drained,
}

/// A shard's delivery task.
pub(crate) struct Forwarder<D> {
    pub(crate) shard: usize,
    pub(crate) mode: Mode,
    pub(crate) pending: VecDeque<Outbound>,
    pub(crate) from_writer: mpsc::UnboundedReceiver<ToForwarder>,
    pub(crate) shared: Arc<Shared>,
    pub(crate) budget: Arc<Budget>,
    pub(crate) downstream: Arc<D>,
    pub(crate) deadline: watch::Receiver<Option<Instant>>,
    pub(crate) max_batch_bytes: usize,
    pub(crate) max_batch_messages: u32,
    pub(crate) max_call_bytes: usize,
    pub(crate) call_timeout: Duration,
    pub(crate) joiner: Joiner,
}

/// Where the batches made of several chunks are joined: the broker takes a batch's
/// messages as one contiguous `records` field. One allocation serves a whole call, and is
/// reclaimed by the next call once the batches of this one are dropped (delivered), so the
/// hot path neither grows a buffer by doubling nor touches fresh pages, which the kernel
/// zeroes on their first touch.
#[derive(Debug, Default)]
pub(crate) struct Joiner {
    buffer: BytesMut,
    /// The largest allocation made so far: a new one is never smaller, so that calls of
    /// varying sizes reuse it. At most one call's bytes: bounded by `max_call_bytes` and one
    /// entry.
    capacity: usize,
}

impl Joiner {
    /// Makes room for `bytes` more: in what is left of the buffer, in the whole buffer
    /// reclaimed if no batch holds any of it any more, or else in a new one.
    fn reserve(&mut self, bytes: usize) {
        if !self.buffer.try_reclaim(bytes) {
            self.capacity = self.capacity.max(bytes);
            self.buffer = BytesMut::with_capacity(self.capacity);
        }
    }

    /// The chunks joined, in room made by [`Joiner::reserve`].
    fn join(&mut self, chunks: &[Bytes]) -> Bytes {
        for chunk in chunks {
            self.buffer.extend_from_slice(chunk);
        }
        self.buffer.split().freeze()
    }
}

/// Waiters keyed by the entry id they wait for.
type Waiting = VecDeque<(u64, Vec<LoggedSender>)>;

struct State {
    when_delivered: Waiting,
    when_logged: Waiting,
    delivered_through: u64,
    logged_through: u64,
    drained: bool,
}

fn answer(waiting: &mut Waiting, through: u64) {
    while waiting.front().is_some_and(|(id, _)| *id <= through) {
        if let Some((_, waiters)) = waiting.pop_front() {
            for waiter in waiters {
                let _ = waiter.send(Ok(()));
            }
        }
    }
}

/// A planned call: the batches, and for each the pending entries it holds with the number
/// of messages before each in the batch.
struct Plan {
    batches: Vec<Batch>,
    members: Vec<Vec<(usize, u64)>>,
}

pub(crate) async fn run<D: Downstream>(mut forwarder: Forwarder<D>) {
    let mut state = State {
        when_delivered: VecDeque::new(),
        when_logged: VecDeque::new(),
        delivered_through: 0,
        logged_through: 0,
        drained: false,
    };
    loop {
        if forwarder.pending.is_empty() && !state.drained {
            match forwarder.from_writer.recv().await {
                Some(message) => forwarder.take(message, &mut state),
                None => state.drained = true,
            }
        }
        while let Ok(message) = forwarder.from_writer.try_recv() {
            forwarder.take(message, &mut state);
        }
        if forwarder.pending.is_empty() {
            if state.drained {
                break;
            }
            continue;
        }
        if forwarder.past_deadline() {
            break;
        }
        let count = forwarder.call_len();
        if forwarder.mode == Mode::Sbml && !forwarder.log_unlogged(count, &mut state).await {
            break;
        }
        let Some(offsets) = forwarder.deliver(count).await else {
            break;
        };
        forwarder.complete(count, &offsets, &mut state);
    }
    forwarder.stop(&mut state).await;
}

impl<D: Downstream> Forwarder<D> {
    fn take(&mut self, message: ToForwarder, state: &mut State) {
        match message {
            ToForwarder::Entries(entries) => self.pending.extend(entries),
            ToForwarder::WhenDelivered(through, waiters) => {
                state.when_delivered.push_back((through, waiters));
                answer(&mut state.when_delivered, state.delivered_through);
            }
            ToForwarder::WhenLogged(through, waiters) => {
                state.when_logged.push_back((through, waiters));
                answer(&mut state.when_logged, state.logged_through);
            }
            ToForwarder::Drained => state.drained = true,
        }
    }

    fn past_deadline(&self) -> bool {
        self.deadline
            .borrow()
            .is_some_and(|deadline| Instant::now() >= deadline)
    }

    /// How many pending entries the next call takes: at least one, then as many as fit.
    fn call_len(&self) -> usize {
        let mut bytes = 0usize;
        let mut count = 0usize;
        for outbound in &self.pending {
            bytes += outbound.entry.body.len();
            if count > 0 && bytes > self.max_call_bytes {
                break;
            }
            count += 1;
        }
        count
    }

    /// SBML: logs the entries of the next call that are not yet, before they are sent.
    /// False if the log is closing under us (not reached while the writer runs).
    async fn log_unlogged(&mut self, count: usize, state: &mut State) -> bool {
        let entries: Vec<Entry> = self
            .pending
            .iter()
            .take(count)
            .filter(|o| !o.logged)
            .map(|o| o.entry.clone())
            .collect();
        let Some(through) = entries.last().map(|e| e.id) else {
            return true;
        };
        let (done, result) = oneshot::channel();
        self.shared.request_log(LogRequest { entries, done });
        match result.await {
            Ok(Ok(())) => {
                state.logged_through = through;
                answer(&mut state.when_logged, through);
            }
            Ok(Err(error)) => {
                // Not logged: their `Logged` waiters are answered once delivered instead.
                tracing::warn!(shard = self.shard, %error, "sbml: sending entries the log could not take");
                while state
                    .when_logged
                    .front()
                    .is_some_and(|(id, _)| *id <= through)
                {
                    if let Some(waiting) = state.when_logged.pop_front() {
                        state.when_delivered.push_back(waiting);
                    }
                }
            }
            Err(_) => return false,
        }
        for outbound in self.pending.iter_mut().take(count) {
            outbound.logged = true;
        }
        true
    }

    /// Groups the first `count` pending entries into batches.
    fn plan(&mut self, count: usize) -> Plan {
        let mut batches: Vec<Batch> = Vec::new();
        let mut members: Vec<Vec<(usize, u64)>> = Vec::new();
        let mut chunks: Vec<Vec<Bytes>> = Vec::new();
        let mut sizes: Vec<usize> = Vec::new();
        let mut open: HashMap<&Destination, usize> = HashMap::new();
        for (index, outbound) in self.pending.iter().take(count).enumerate() {
            let entry = &outbound.entry;
            let joins = (!outbound.replayed)
                .then(|| open.get(&entry.destination).copied())
                .flatten()
                .filter(|&b| {
                    let batch = &batches[b];
                    batch.producer_id == entry.producer_id
                        && batch.base_sequence + u64::from(batch.count) == entry.base_sequence
                        && batch.count + entry.count <= self.max_batch_messages
                        && sizes[b] + entry.body.len() <= self.max_batch_bytes
                });
            match joins {
                Some(b) => {
                    members[b].push((index, u64::from(batches[b].count)));
                    batches[b].count += entry.count;
                    sizes[b] += entry.body.len();
                    chunks[b].extend_from_slice(entry.body.chunks());
                }
                None => {
                    if !outbound.replayed {
                        open.insert(&entry.destination, batches.len());
                    }
                    batches.push(Batch {
                        destination: entry.destination.clone(),
                        producer_id: entry.producer_id,
                        base_sequence: entry.base_sequence,
                        count: entry.count,
                        body: Bytes::new(),
                        trace: outbound.trace.clone(),
                    });
                    members.push(vec![(index, 0)]);
                    sizes.push(entry.body.len());
                    chunks.push(entry.body.chunks().to_vec());
                }
            }
        }
        // A batch of one chunk goes as it is; the others are joined, all into one
        // allocation made (or reclaimed) for the whole call.
        let joined = chunks
            .iter()
            .zip(&sizes)
            .filter(|(parts, _)| parts.len() > 1)
            .map(|(_, size)| size)
            .sum();
        self.joiner.reserve(joined);
        for (batch, mut parts) in batches.iter_mut().zip(chunks) {
            batch.body = if parts.len() == 1 {
                parts.pop().unwrap_or_default()
            } else {
                self.joiner.join(&parts)
            };
        }
        Plan { batches, members }
    }

    /// Delivers the first `count` pending entries; the offset of each entry's first
    /// message (`None` where the downstream had it already and could not say where).
    /// `None` if the close deadline passed first.
    async fn deliver(&mut self, count: usize) -> Option<Vec<Option<u64>>> {
        let plan = self.plan(count);
        let mut offsets = vec![None; count];
        match self.call(plan.batches.clone()).await? {
            Ok(placements) => {
                for (members, placement) in plan.members.iter().zip(placements) {
                    for &(index, before) in members {
                        offsets[index] = placement.run(before, self.pending[index].entry.count);
                    }
                }
            }
            Err(()) => {
                // Some batch was stored before: find out batch by batch.
                for (batch, members) in plan.batches.into_iter().zip(&plan.members) {
                    if let Ok(placements) = self.call(vec![batch]).await? {
                        for &(index, before) in members {
                            offsets[index] = placements
                                .first()
                                .and_then(|p| p.run(before, self.pending[index].entry.count));
                        }
                    }
                }
            }
        }
        Some(offsets)
    }

    /// Makes one call until it succeeds (`Ok(offsets)`) or is answered `AlreadyStored`
    /// (`Err(())`); `None` if the close deadline passed first.
    async fn call(&self, batches: Vec<Batch>) -> Option<Result<Vec<Placement>, ()>> {
        let mut delay = Duration::from_millis(20);
        let expected = batches.len();
        loop {
            let started = std::time::Instant::now();
            let attempt =
                tokio::time::timeout(self.call_timeout, self.downstream.deliver(batches.clone()))
                    .await;
            let reason = match attempt {
                Ok(Ok(bases)) if bases.len() == expected => {
                    metrics::histogram!("runnel_msglog_delivery_seconds")
                        .record(started.elapsed().as_secs_f64());
                    return Some(Ok(bases));
                }
                Ok(Ok(bases)) => format!(
                    "the downstream answered {} offsets for {expected} batches",
                    bases.len()
                ),
                Ok(Err(DeliveryError::AlreadyStored)) => return Some(Err(())),
                Ok(Err(DeliveryError::Failed { reason, transient })) => {
                    if transient {
                        tracing::warn!(shard = self.shard, error = %reason, "delivery failed; retrying");
                    } else {
                        tracing::error!(shard = self.shard, error = %reason, "delivery refused; keeping the entries and retrying");
                    }
                    reason
                }
                Err(_) => format!("no answer within {:?}", self.call_timeout),
            };
            metrics::counter!("runnel_msglog_delivery_errors_total").increment(1);
            tracing::debug!(shard = self.shard, %reason, ?delay, "retrying delivery");
            let deadline = *self.deadline.borrow();
            let wake = Instant::now() + delay;
            match deadline {
                Some(deadline) if deadline <= wake => {
                    tokio::time::sleep_until(deadline).await;
                    return None;
                }
                _ => tokio::time::sleep_until(wake).await,
            }
            delay = (delay * 2).min(Duration::from_secs(2));
        }
    }

    /// Releases the first `count` pending entries, answering their waiters.
    fn complete(&mut self, count: usize, offsets: &[Option<u64>], state: &mut State) {
        let mut messages = 0u64;
        for offset in offsets.iter().take(count) {
            let Some(outbound) = self.pending.pop_front() else {
                break;
            };
            for waiter in &outbound.waiters {
                waiter.ticket.part_done(
                    waiter.part,
                    offset.map(|base| base + u64::from(waiter.offset)),
                );
            }
            messages += u64::from(outbound.entry.count);
            self.budget.release(outbound.reserved);
            state.delivered_through = outbound.entry.id;
        }
        metrics::counter!("runnel_msglog_delivered_messages_total").increment(messages);
        answer(&mut state.when_delivered, state.delivered_through);
        self.shared.released(state.delivered_through);
    }

    /// Leaves what is undelivered in the log (SBML logs it now), answers the waiters that
    /// can be answered, and lets the writer stop.
    async fn stop(&mut self, state: &mut State) {
        while let Ok(message) = self.from_writer.try_recv() {
            self.take(message, state);
        }
        if !self.pending.is_empty() {
            let count = self.pending.len();
            let messages: u64 = self.pending.iter().map(|o| u64::from(o.entry.count)).sum();
            match self.mode {
                Mode::None => tracing::error!(
                    shard = self.shard,
                    messages,
                    "stopping with messages not delivered; mode none keeps no log, so they are lost"
                ),
                Mode::Sbml => {
                    self.log_unlogged(count, state).await;
                    tracing::warn!(
                        shard = self.shard,
                        messages,
                        "stopping with messages not delivered; they stay in the log"
                    );
                }
                Mode::Rbml | Mode::Hml => tracing::warn!(
                    shard = self.shard,
                    messages,
                    "stopping with messages not delivered; they stay in the log"
                ),
            }
        }
        let closed = || Err(Error::Closed);
        for (_, waiters) in state
            .when_delivered
            .drain(..)
            .chain(state.when_logged.drain(..))
        {
            for waiter in waiters {
                let _ = waiter.send(closed());
            }
        }
        self.shared.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunks(parts: &[&'static [u8]]) -> Vec<Bytes> {
        parts.iter().map(|p| Bytes::from_static(p)).collect()
    }

    #[test]
    fn the_joiner_reuses_its_buffer_once_the_batches_are_gone_and_never_while_held() {
        let mut joiner = Joiner::default();
        joiner.reserve(10);
        let first = joiner.join(&chunks(&[b"abc", b"", b"de"]));
        let second = joiner.join(&chunks(&[b"fgh", b"ij"]));
        assert_eq!((&first[..], &second[..]), (&b"abcde"[..], &b"fghij"[..]));
        // Both batches of the call share one allocation, back to back.
        assert_eq!(second.as_ptr(), first.as_ptr().wrapping_add(5));
        let address = first.as_ptr();

        // While a batch of the last call is held, the next call gets other memory.
        drop(second);
        joiner.reserve(4);
        let held = joiner.join(&chunks(&[b"kl", b"mn"]));
        assert_eq!(&first[..], b"abcde", "a held batch is never overwritten");
        assert_eq!(&held[..], b"klmn");
        assert_ne!(held.as_ptr(), address);
        let address = held.as_ptr();

        // Once they are all gone, the next call's batches reuse that allocation, which is as
        // large as the largest call so far.
        drop((first, held));
        joiner.reserve(10);
        let again = joiner.join(&chunks(&[b"0123", b"456789"]));
        assert_eq!(&again[..], b"0123456789");
        assert_eq!(again.as_ptr(), address, "the allocation was reclaimed");
    }
}
