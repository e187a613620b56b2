//! A task: one input partition of one query stage, with all the state its records built —
//! the partition's clock, the windows of every key it holds, the Bloom filters of
//! `new_items` aggregates — and the offset of the next record to read. A task is the unit
//! that moves between instances and the unit a checkpoint saves: its state always reflects
//! exactly the records before `next_offset` (an aligned snapshot of the task's operators).
//!
//! Two kinds of input, two kinds of clock:
//!
//! - a partition of the query's **source topic**: the clock is the greatest event time the
//!   partition delivered, and its watermark trails that by the allowed out-of-orderness;
//! - a partition of a re-keyed query's **internal topic** ([`crate::rekey`]), which mixes
//!   records from every source partition: the watermark is the smallest of the watermarks
//!   the source partitions announced in it, and records are de-duplicated by their source
//!   position, so that a source task replayed after a crash adds nothing twice.

use crate::config::Plan;
use crate::event::{EventView, RawRecord};
use crate::path::{FieldRef, Scalar};
use crate::rekey::{self, Keyed};
use crate::window::{Contribution, Emission, KeyedWindows, WindowsState};
use bloomfilter::Bloom;
use bytes::Bytes;
use runnel_proto::v1::Event;
use runnel_proto::Millis;
use runnel_telemetry::propagation::TRACEPARENT;
use serde::{Deserialize, Serialize};
use std::time::Instant;

/// The longest key a result may have (the store's limit).
const MAX_KEY_BYTES: usize = 1024;

/// Running totals of one task, kept in its checkpoints so that they stay consistent with
/// what a restart reads again.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Counters {
    /// Records read.
    pub(crate) processed: u64,
    /// Events (per key) added to windows or forwarded re-keyed.
    pub(crate) applied: u64,
    /// Events too late for every window they belong to.
    pub(crate) late: u64,
    /// Events the filter took out.
    pub(crate) filtered: u64,
    /// Events without a key (or only keys too long to store).
    pub(crate) no_key: u64,
    /// Records that did not decode.
    pub(crate) malformed: u64,
    /// Re-keyed records already applied (a source task's replay after a crash).
    pub(crate) duplicates: u64,
}

/// One source partition as a re-keyed task hears of it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct SourceClock {
    /// The watermark it announced.
    watermark: Option<i64>,
    /// The position of the last record applied from it: (offset, index among the keys).
    last: Option<(u64, u32)>,
    /// When it was last heard of (processing time).
    #[serde(skip)]
    seen: Option<Instant>,
}

/// How a task tells time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) enum Clock {
    /// A source partition: the greatest event time it delivered.
    Own(Option<i64>),
    /// A re-keyed partition: per source partition.
    Sources(Vec<SourceClock>),
}

/// What a batch of records produced, for the runner to write out.
#[derive(Debug, Default)]
pub(crate) struct Outputs {
    /// Results, for the store (and the output topic).
    pub(crate) results: Vec<Emission>,
    /// Late events, as they were, for the side output.
    pub(crate) late: Vec<Bytes>,
    /// Re-keyed events, for the internal topic.
    pub(crate) keyed: Vec<Event>,
}

impl Outputs {
    pub(crate) fn is_empty(&self) -> bool {
        self.results.is_empty() && self.late.is_empty() && self.keyed.is_empty()
    }
}

/// A task's checkpointed form.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct TaskState {
    pub(crate) next_offset: u64,
    clock: Clock,
    windows: WindowsState,
    /// Each `new_items` aggregate's Bloom filter (`bloomfilter`'s own encoding).
    blooms: Vec<Option<Vec<u8>>>,
    counters: Counters,
}

/// One input partition's state.
#[derive(Debug)]
pub(crate) struct Task {
    pub(crate) partition: u32,
    pub(crate) next_offset: u64,
    clock: Clock,
    pub(crate) windows: KeyedWindows,
    blooms: Vec<Option<Bloom<[u8]>>>,
    pub(crate) counters: Counters,
    /// When the partition last delivered a record (processing time).
    pub(crate) last_seen: Instant,
    /// The watermark last announced to the internal topic (re-keying tasks).
    announced: Option<i64>,
    /// A reused buffer for one event's aggregate inputs.
    scratch_key: Vec<u8>,
}

fn blooms(plan: &Plan) -> Vec<Option<Bloom<[u8]>>> {
    plan.rules
        .aggregates
        .iter()
        .map(|a| match a.params {
            crate::aggregate::Params::NewItems { capacity, fpp } => {
                // A fixed seed: the filter must answer the same after a restore.
                Bloom::new_for_fp_rate_with_seed(capacity, fpp, &[0x52; 32]).ok()
            }
            _ => None,
        })
        .collect()
}

impl Task {
    /// A task starting at offset 0; `sources` is the source topic's partition count for a
    /// re-keyed partition, `None` for a source partition.
    pub(crate) fn new(plan: &Plan, partition: u32, sources: Option<u32>, now: Instant) -> Task {
        Task {
            partition,
            next_offset: 0,
            clock: match sources {
                None => Clock::Own(None),
                Some(n) => Clock::Sources(vec![SourceClock::default(); n as usize]),
            },
            windows: KeyedWindows::default(),
            blooms: blooms(plan),
            counters: Counters::default(),
            last_seen: now,
            announced: None,
            scratch_key: Vec::new(),
        }
    }

    /// The state to checkpoint.
    pub(crate) fn state(&self) -> TaskState {
        TaskState {
            next_offset: self.next_offset,
            clock: self.clock.clone(),
            windows: self.windows.state(),
            blooms: self.blooms.iter().map(|b| b.as_ref().map(Bloom::to_bytes)).collect(),
            counters: self.counters,
        }
    }

    /// A task as a checkpoint left it; the error says why the checkpoint does not fit.
    pub(crate) fn restore(
        plan: &Plan,
        partition: u32,
        sources: Option<u32>,
        state: TaskState,
        now: Instant,
    ) -> Result<Task, String> {
        let mut task = Task::new(plan, partition, sources, now);
        match (&task.clock, &state.clock) {
            (Clock::Own(_), Clock::Own(_)) => {}
            (Clock::Sources(a), Clock::Sources(b)) if a.len() == b.len() => {}
            (Clock::Sources(a), Clock::Sources(b)) => {
                return Err(format!(
                    "it covers {} source partitions, the topic has {}",
                    b.len(),
                    a.len()
                ));
            }
            _ => return Err("it belongs to the other stage of the query".into()),
        }
        if state.blooms.len() != task.blooms.len() {
            return Err("it was taken with other aggregates".into());
        }
        for (slot, bytes) in task.blooms.iter_mut().zip(state.blooms) {
            if let (Some(slot), Some(bytes)) = (slot.as_mut(), bytes) {
                *slot = Bloom::from_bytes(bytes).map_err(|e| format!("a Bloom filter does not load: {e}"))?;
            }
        }
        task.windows = KeyedWindows::restore(state.windows, &plan.rules)?;
        task.next_offset = state.next_offset;
        task.clock = state.clock;
        task.counters = state.counters;
        Ok(task)
    }

    /// The partition's own watermark: it decides what is late and when state may go.
    pub(crate) fn own_watermark(&self, plan: &Plan) -> Option<i64> {
        match &self.clock {
            Clock::Own(clock) => clock.map(|t| t.saturating_sub(plan.out_of_orderness)),
            Clock::Sources(sources) => sources
                .iter()
                .map(|s| s.watermark)
                .try_fold(i64::MAX, |min, w| w.map(|w| min.min(w)))
                .filter(|_| !sources.is_empty()),
        }
    }

    /// For a re-keyed task, the watermark over the source partitions heard of within the
    /// idle timeout (all silent: the most advanced one) — what decides when its windows
    /// fire. A source task's firing watermark is the runner's business (it spans tasks).
    pub(crate) fn sources_firing_watermark(&self, plan: &Plan, now: Instant) -> Option<i64> {
        let Clock::Sources(sources) = &self.clock else {
            return None;
        };
        let active = |s: &&SourceClock| {
            s.seen
                .is_some_and(|seen| now.saturating_duration_since(seen) < plan.idle_timeout)
        };
        let mut live = sources.iter().filter(active).peekable();
        if live.peek().is_none() {
            return sources.iter().filter_map(|s| s.watermark).max();
        }
        live.map(|s| s.watermark)
            .try_fold(i64::MAX, |min, w| w.map(|w| min.min(w)))
    }

    /// Whether the partition has been quiet for the idle timeout.
    pub(crate) fn idle(&self, plan: &Plan, now: Instant) -> bool {
        now.saturating_duration_since(self.last_seen) >= plan.idle_timeout
    }

    /// Reads one record of the query's source topic. `direct`: keyed by the event key,
    /// windows here; otherwise the event goes on re-keyed, once per key.
    pub(crate) fn observe_source<'a>(
        &mut self,
        plan: &Plan,
        record: &'a RawRecord,
        inputs: &mut Vec<(usize, Scalar<'a>)>,
        out: &mut Outputs,
        now: Instant,
    ) {
        self.next_offset = record.offset + 1;
        self.last_seen = now;
        self.counters.processed += 1;
        let Ok(event) = EventView::parse(&record.event) else {
            self.counters.malformed += 1;
            return;
        };
        let time = event_time(plan.time.as_ref(), &event, record);
        if let Clock::Own(clock) = &mut self.clock {
            *clock = Some(clock.map_or(time, |c| c.max(time)));
        }
        if !plan.filter.iter().all(|c| c.holds(&event)) {
            self.counters.filtered += 1;
            return;
        }
        let watermark = self.own_watermark(plan);
        if plan.rules.spec.is_late(time, plan.rules.lateness, watermark) {
            self.counters.late += 1;
            out.late.push(record.event.clone());
            return;
        }
        inputs.clear();
        for (i, agg) in plan.rules.aggregates.iter().enumerate() {
            if let Some(field) = &agg.input {
                field.each(&event, |v| inputs.push((i, v)));
            }
        }
        let rank = position_rank(self.partition, record.offset, 0);
        let trace = event.header(TRACEPARENT);
        match &plan.key {
            None => {
                if event.key.len() > MAX_KEY_BYTES {
                    self.counters.no_key += 1;
                    return;
                }
                self.apply(plan, event.key, time, inputs, rank, trace);
            }
            Some(field) => {
                let mut index = 0u32;
                let mut keyed = false;
                field.each(&event, |key| {
                    let key = key.text();
                    if key.len() <= MAX_KEY_BYTES {
                        out.keyed.push(rekey::keyed_event(
                            self.partition,
                            record.offset,
                            index,
                            &key,
                            time,
                            inputs,
                            trace,
                        ));
                        keyed = true;
                    }
                    index += 1;
                });
                if keyed {
                    self.counters.applied += u64::from(index);
                } else {
                    self.counters.no_key += 1;
                }
            }
        }
    }

    /// Reads one record of a re-keyed query's internal topic.
    pub(crate) fn observe_keyed(&mut self, plan: &Plan, record: &RawRecord, now: Instant) {
        self.next_offset = record.offset + 1;
        self.last_seen = now;
        self.counters.processed += 1;
        let Ok(event) = EventView::parse(&record.event) else {
            self.counters.malformed += 1;
            return;
        };
        let Some(parsed) = rekey::parse(&event) else {
            self.counters.malformed += 1;
            return;
        };
        {
            let Clock::Sources(sources) = &mut self.clock else {
                return;
            };
            let Some(source) = sources.get_mut(parsed.source() as usize) else {
                self.counters.malformed += 1;
                return;
            };
            source.seen = Some(now);
            match &parsed {
                Keyed::Mark { watermark, .. } => {
                    source.watermark =
                        Some(source.watermark.map_or(*watermark, |w| w.max(*watermark)));
                    return;
                }
                Keyed::Event { offset, index, .. } => {
                    if source.last.is_some_and(|last| (*offset, *index) <= last) {
                        self.counters.duplicates += 1;
                        return;
                    }
                    source.last = Some((*offset, *index));
                }
            }
        }
        let Keyed::Event {
            source,
            offset,
            time,
            mut inputs,
            ..
        } = parsed
        else {
            return;
        };
        if plan
            .rules
            .spec
            .is_late(time, plan.rules.lateness, self.own_watermark(plan))
        {
            // Only when a source partition went idle and the others moved on.
            self.counters.late += 1;
            return;
        }
        let rank = position_rank(source, offset, 0);
        self.apply(plan, event.key, time, &mut inputs, rank, event.header(TRACEPARENT));
    }

    fn apply<'a>(
        &mut self,
        plan: &Plan,
        key: &str,
        time: i64,
        inputs: &mut [(usize, Scalar<'a>)],
        rank: u64,
        trace: Option<&'a str>,
    ) {
        // `new_items`: whether this key has seen the value before, once per event.
        for (i, value) in inputs.iter_mut() {
            if let Some(Some(bloom)) = self.blooms.get_mut(*i) {
                self.scratch_key.clear();
                self.scratch_key.extend_from_slice(key.as_bytes());
                self.scratch_key.push(0);
                self.scratch_key.extend_from_slice(value.text().as_bytes());
                let seen = bloom.check_and_set(&self.scratch_key[..]);
                *value = Scalar::Num(if seen { 0.0 } else { 1.0 });
            }
        }
        self.counters.applied += 1;
        self.windows.apply(
            &plan.rules,
            key,
            &Contribution {
                time,
                inputs,
                rank,
                trace,
            },
        );
    }

    /// Emits what is due: windows reach `fire` (at least the partition's own watermark),
    /// state goes at the own watermark plus the allowed lateness.
    pub(crate) fn flush(&mut self, plan: &Plan, fire: Option<i64>, out: &mut Outputs) {
        let own = self.own_watermark(plan);
        let fire = fire.max(own);
        self.windows.flush(&plan.rules, fire, own, &mut out.results);
    }

    /// A re-keying task's watermark, if it moved since it was last announced.
    pub(crate) fn announce(&mut self, plan: &Plan) -> Option<i64> {
        let watermark = self.own_watermark(plan)?;
        if self.announced.is_some_and(|a| a >= watermark) {
            return None;
        }
        self.announced = Some(watermark);
        Some(watermark)
    }
}

/// A hash of where an event is in the input: samples keep the smallest.
fn position_rank(partition: u32, offset: u64, index: u32) -> u64 {
    let mut bytes = [0u8; 16];
    bytes[..4].copy_from_slice(&partition.to_le_bytes());
    bytes[4..12].copy_from_slice(&offset.to_le_bytes());
    bytes[12..].copy_from_slice(&index.to_le_bytes());
    xxhash_rust::xxh3::xxh3_64(&bytes)
}

/// The event's time: the configured field (Unix milliseconds or RFC 3339 text), else the
/// event time, else the time the broker appended it.
fn event_time(field: Option<&FieldRef>, event: &EventView<'_>, record: &RawRecord) -> i64 {
    let appended = || {
        record
            .append_time
            .map(|t| Millis::from(t).0)
            .unwrap_or_else(|| runnel_proto::now_millis().0)
    };
    match field {
        None => event.event_time.unwrap_or_else(appended),
        Some(field) => match field.first(event) {
            Some(Scalar::Num(ms)) if ms.is_finite() => ms as i64,
            Some(Scalar::Text(text)) => runnel_proto::json::parse_time(&text)
                .map(|m| m.0)
                .unwrap_or_else(|_| event.event_time.unwrap_or_else(appended)),
            _ => event.event_time.unwrap_or_else(appended),
        },
    }
}
