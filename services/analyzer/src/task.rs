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

use crate::event::{EventView, RawRecord};
use crate::path::{FieldRef, Scalar};
use crate::plan::Plan;
use crate::rekey::{self, Keyed};
use crate::window::{Contribution, Emission, KeyedWindows, WindowsState};
use bloomfilter::Bloom;
use bytes::Bytes;
use runnel_proto::Millis;
use runnel_proto::v1::Event;
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
    /// Events without any of the aggregates' inputs (when no aggregate counts events).
    #[serde(default)]
    pub(crate) no_value: u64,
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

    /// Outputs waiting, of every kind.
    pub(crate) fn len(&self) -> usize {
        self.results.len() + self.late.len() + self.keyed.len()
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
                Some(n) => Clock::Sources(vec![
                    SourceClock {
                        seen: Some(now),
                        ..SourceClock::default()
                    };
                    n as usize
                ]),
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
            blooms: self
                .blooms
                .iter()
                .map(|b| b.as_ref().map(Bloom::to_bytes))
                .collect(),
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
                *slot = Bloom::from_bytes(bytes)
                    .map_err(|e| format!("a Bloom filter does not load: {e}"))?;
            }
        }
        task.windows = KeyedWindows::restore(state.windows, &plan.rules)?;
        task.next_offset = state.next_offset;
        task.clock = state.clock;
        if let Clock::Sources(sources) = &mut task.clock {
            // Idle only if nothing is heard of it for the idle timeout from now on.
            for source in sources {
                source.seen = Some(now);
            }
        }
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

    /// Moves the watermark of what has gone idle up to the watermark of what has not, when
    /// that closes one of this task's windows — so that an idle partition's windows do not
    /// wait for it, and what it delivers for them afterwards is late: a window that reached
    /// clients is final. For a source partition, `target` is the watermark of the
    /// instance's partitions that are not idle, and the advance happens once the partition
    /// itself is. A re-keyed task moves each source partition it has not heard of for the
    /// idle timeout up to the sources it has heard of (all silent: to the most advanced);
    /// `target` is not used.
    ///
    /// Idleness is processing time, so a replay would not advance at the same record: the
    /// clock it had is returned, for the runner to checkpoint the advance before anything it
    /// closes is written, and to put the clock back if the checkpoint was not committed.
    pub(crate) fn advance_idle(
        &mut self,
        plan: &Plan,
        target: Option<i64>,
        now: Instant,
    ) -> Option<Clock> {
        let idle_since = |seen: Instant| now.saturating_duration_since(seen) >= plan.idle_timeout;
        let current = self.own_watermark(plan);
        let advanced = match &self.clock {
            Clock::Own(_) => {
                let target = target?;
                if !idle_since(self.last_seen) || current.is_some_and(|w| w >= target) {
                    return None;
                }
                Clock::Own(Some(target.saturating_add(plan.out_of_orderness)))
            }
            Clock::Sources(sources) => {
                let mut heard = sources
                    .iter()
                    .filter(|s| s.seen.is_some_and(|t| !idle_since(t)));
                let target = match heard.next() {
                    Some(first) => heard
                        .try_fold(first.watermark?, |min, s| s.watermark.map(|w| min.min(w)))?,
                    None => sources.iter().filter_map(|s| s.watermark).max()?,
                };
                let moved = sources
                    .iter()
                    .map(|s| {
                        let mut s = s.clone();
                        if s.seen.is_none_or(idle_since) {
                            s.watermark = Some(s.watermark.map_or(target, |w| w.max(target)));
                        }
                        s
                    })
                    .collect();
                Clock::Sources(moved)
            }
        };
        let before = std::mem::replace(&mut self.clock, advanced);
        let after = self.own_watermark(plan);
        let closes = self
            .windows
            .next_close()
            .is_some_and(|end| after.is_some_and(|w| end <= w));
        if after > current && closes {
            Some(before)
        } else {
            self.clock = before;
            None
        }
    }

    /// Puts back the clock [`Task::advance_idle`] replaced, whose advance was not recorded.
    pub(crate) fn put_back(&mut self, clock: Clock) {
        self.clock = clock;
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
        if plan
            .rules
            .spec
            .is_late(time, plan.rules.lateness, watermark)
        {
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
        if inputs.is_empty() && !plan.counts_events {
            self.counters.no_value += 1;
            return;
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
        self.apply(
            plan,
            event.key,
            time,
            &mut inputs,
            rank,
            event.header(TRACEPARENT),
        );
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
        let watermark = self.own_watermark(plan);
        self.windows.apply(
            &plan.rules,
            key,
            &Contribution {
                time,
                inputs,
                rank,
                trace,
                watermark,
            },
        );
    }

    /// Emits what is due: windows close at the partition's own watermark (which
    /// [`Task::advance_idle`] moves for an idle partition), state goes at that watermark
    /// plus the allowed lateness.
    pub(crate) fn flush(&mut self, plan: &Plan, out: &mut Outputs) {
        let own = self.own_watermark(plan);
        let before = out.results.len();
        self.windows.flush(&plan.rules, own, &mut out.results);
        // A version reflects every record before the task's offset: later versions of a
        // window carry greater offsets, and a replay's older ones are recognisable as such.
        for emission in &mut out.results[before..] {
            emission.input_offset = self.next_offset;
        }
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

#[cfg(test)]
mod tests {
    //! Windowing and watermark semantics against hand-computed expectations, through the
    //! whole per-partition path: encoded events in, results out.

    use super::*;
    use crate::config::QueryConfig;
    use proptest::prelude::*;
    use prost::Message;
    use std::collections::BTreeMap;

    const S: i64 = 1000;

    fn plan(toml_text: &str) -> Plan {
        let query: QueryConfig = toml::from_str(toml_text).expect("query toml");
        query.compile(0).expect("valid query")
    }

    /// A source partition fed one event at a time, flushed after each as the runner does.
    struct Feed {
        plan: Plan,
        task: Task,
        results: Vec<Emission>,
        late: Vec<Bytes>,
        keyed: Vec<Event>,
        offset: u64,
        /// Flush after every event (else only when told, as after a chunk of records).
        eager: bool,
    }

    impl Feed {
        fn new(toml_text: &str) -> Feed {
            Feed::of(plan(toml_text))
        }

        fn of(plan: Plan) -> Feed {
            let task = Task::new(&plan, 0, None, Instant::now());
            Feed {
                plan,
                task,
                results: Vec::new(),
                late: Vec::new(),
                keyed: Vec::new(),
                offset: 0,
                eager: true,
            }
        }

        fn send(&mut self, event: Event) {
            let record = RawRecord {
                partition: 0,
                offset: self.offset,
                append_time: None,
                event: event.encode_to_vec().into(),
            };
            self.offset += 1;
            let mut out = Outputs::default();
            let mut inputs = Vec::new();
            self.task
                .observe_source(&self.plan, &record, &mut inputs, &mut out, Instant::now());
            if self.eager {
                self.task.flush(&self.plan, &mut out);
            }
            self.results.extend(out.results);
            self.late.extend(out.late);
            self.keyed.extend(out.keyed);
        }

        fn flush(&mut self) {
            let mut out = Outputs::default();
            self.task.flush(&self.plan, &mut out);
            self.results.extend(out.results);
        }

        fn at(&mut self, key: &str, ms: i64, value: f64) {
            self.send(reading(key, ms, Some(value)));
        }

        /// (key, start s, end s, count) of every result so far, in emission order.
        fn emitted(&self) -> Vec<(String, i64, i64, f64)> {
            self.results
                .iter()
                .map(|r| (r.key.clone(), r.start / S, r.end / S, r.values["count"]))
                .collect()
        }

        fn take(&mut self) -> Vec<(String, i64, i64, f64)> {
            let e = self.emitted();
            self.results.clear();
            e
        }
    }

    fn reading(key: &str, ms: i64, value: Option<f64>) -> Event {
        let payload = match value {
            Some(v) => serde_json::json!({ "value": v }),
            None => serde_json::json!({}),
        };
        Event {
            id: format!("{key}-{ms}"),
            key: key.into(),
            r#type: "reading".into(),
            event_time: Some(Millis(ms).into()),
            payload: serde_json::to_vec(&payload).unwrap().into(),
            ..Event::default()
        }
    }

    fn row(key: &str, start: i64, end: i64, count: f64) -> (String, i64, i64, f64) {
        (key.to_owned(), start, end, count)
    }

    const TUMBLING: &str = "name = \"q\"\nwindow = \"10s\"\nout_of_orderness = \"2s\"\n";

    #[test]
    fn tumbling_windows_close_when_the_watermark_passes_and_later_events_are_late() {
        let mut feed = Feed::new(TUMBLING);
        feed.at("a", 5 * S, 10.0);
        feed.at("a", S, 20.0);
        feed.at("b", 9 * S, 1.0);
        // The watermark is 11 - 2 = 9 s: [0, 10 s) stays open.
        feed.at("a", 11 * S, 5.0);
        assert!(feed.emitted().is_empty());
        // 8 s behind the newest event, but within the watermark: still counts.
        feed.at("a", 3 * S, 30.0);
        // 12 - 2 = 10 s closes [0, 10 s) for both keys.
        feed.send(reading("c", 12 * S, None));
        assert_eq!(feed.take(), [row("a", 0, 10, 3.0), row("b", 0, 10, 1.0)]);
        // Now [0, 10 s) is closed: an event for it is late, goes to the side output and
        // changes nothing.
        feed.at("a", 9 * S, 1000.0);
        assert!(feed.emitted().is_empty());
        assert_eq!(feed.late.len(), 1);
        let c = feed.task.counters;
        assert_eq!((c.processed, c.applied, c.late, c.no_value), (7, 5, 1, 1));
        // c's value-less event moved the clock but opened no window; a's 11 s one is open.
        assert_eq!(feed.task.windows.open(), 1);
    }

    #[test]
    fn aggregates_of_a_closed_window_are_exact() {
        let mut feed = Feed::new(TUMBLING);
        for (ms, v) in [(S, 4.0), (2 * S, 1.0), (3 * S, 7.0), (4 * S, 4.0)] {
            feed.at("a", ms, v);
        }
        feed.send(reading("z", 30 * S, None));
        let a = &feed.results[0].values;
        assert_eq!(
            (a["count"], a["sum"], a["avg"], a["min"], a["max"]),
            (4.0, 16.0, 4.0, 1.0, 7.0)
        );
        assert_eq!(feed.results.len(), 1, "the value-less z has no window");
        // With a count of events, a value-less event has a window: its count, no average.
        let mut feed = Feed::new(&format!(
            "{TUMBLING}aggregates = [{{ fn = \"count\" }}, {{ fn = \"avg\" }}]\n"
        ));
        feed.send(reading("z", S, None));
        feed.send(reading("y", 60 * S, None));
        let z = &feed.results[0].values;
        assert_eq!((z["count"], z.get("avg")), (1.0, None));
    }

    #[test]
    fn allowed_lateness_updates_a_closed_window_until_the_watermark_passes_it() {
        let mut feed = Feed::new(&format!("{TUMBLING}allowed_lateness = \"5s\"\n"));
        feed.at("a", S, 1.0);
        feed.at("a", 12 * S, 1.0); // watermark 10 s: [0, 10) fires
        assert_eq!(feed.take(), [row("a", 0, 10, 1.0)]);
        // Late but allowed (10 + 5 > 10): the window is updated and emitted again.
        feed.at("a", 9 * S, 1.0);
        assert_eq!(feed.take(), [row("a", 0, 10, 2.0)]);
        feed.at("a", 17 * S, 1.0); // watermark 15 s: [0, 10) is dropped now
        assert!(feed.take().is_empty());
        feed.at("a", 2 * S, 1.0);
        assert!(feed.take().is_empty(), "past the allowed lateness");
        assert_eq!(feed.task.counters.late, 1);
    }

    #[test]
    fn sliding_windows_count_each_event_in_every_window_it_falls_in() {
        let mut feed = Feed::new(
            "name = \"q\"\nwindow = { type = \"sliding\", size = \"10s\", slide = \"5s\" }\nout_of_orderness = \"0s\"\n",
        );
        feed.at("a", 7 * S, 1.0); // in [0, 10) and [5, 15)
        feed.at("a", 12 * S, 1.0); // in [5, 15) and [10, 20); watermark 12 closes [0, 10)
        assert_eq!(feed.take(), [row("a", 0, 10, 1.0)]);
        feed.at("a", 3 * S, 1.0); // every window holding 3 s is closed: late
        assert_eq!(feed.task.counters.late, 1);
        // 9 s is too late for [0, 10) — closed, whether or not it was dropped yet — but
        // on time for [5, 15): it counts there only.
        feed.at("a", 9 * S, 1.0);
        assert_eq!(feed.task.counters.late, 1);
        feed.at("a", 25 * S, 1.0); // closes [5, 15) and [10, 20)
        assert_eq!(feed.take(), [row("a", 5, 15, 3.0), row("a", 10, 20, 1.0)]);
    }

    #[test]
    fn sessions_grow_and_merge_and_close_a_gap_after_their_last_event() {
        let mut feed = Feed::new(
            "name = \"q\"\nwindow = { type = \"session\", gap = \"5s\" }\nout_of_orderness = \"100s\"\n",
        );
        for ms in [S, 3 * S, 10 * S, 30 * S] {
            feed.at("k", ms, 1.0);
        }
        feed.at("other", 2 * S, 1.0);
        // 6 s bridges [1, 8) and [10, 15) into one session [1, 15).
        feed.at("k", 6 * S, 1.0);
        assert_eq!(feed.task.windows.open(), 3);
        feed.send(reading("flush", 1000 * S, None));
        let mut closed = feed.take();
        closed.sort_by_key(|r| r.1);
        assert_eq!(
            closed,
            [
                row("k", 1, 15, 4.0),
                row("other", 2, 7, 1.0),
                row("k", 30, 35, 1.0)
            ]
        );
        // An event more than the allowed lateness (0) behind the watermark is late.
        feed.at("k", 800 * S, 1.0);
        assert_eq!(feed.task.counters.late, 1);
    }

    /// The worked example of docs/queries.md, value by value.
    #[test]
    fn the_documented_examples_hold() {
        let docs = include_str!("../../../docs/queries.md");
        let start = docs
            .find("aggregates = [\n  { fn = \"count\" },")
            .expect("the example is in the docs");
        let end = start + docs[start..].find("\n]").expect("its end") + 2;
        let mut feed = Feed::new(&format!(
            "name = \"q\"\nwindow = \"1m\"\nout_of_orderness = \"0s\"\n{}\n",
            &docs[start..end]
        ));
        for (v, user, page) in [(4, "ann", "/a"), (1, "bob", "/a"), (7, "ann", "/b")] {
            feed.send(Event {
                key: "k".into(),
                r#type: "cart".into(),
                event_time: Some(Millis(S).into()),
                payload: serde_json::to_vec(
                    &serde_json::json!({ "v": v, "user": user, "page": page }),
                )
                .unwrap()
                .into(),
                ..Event::default()
            });
        }
        feed.send(reading("z", 120 * S, None));
        let r = &feed.results[0];
        let v = |name: &str| r.values[name];
        assert_eq!(
            (v("count"), v("sum"), v("avg"), v("min"), v("max")),
            (3.0, 12.0, 4.0, 1.0, 7.0)
        );
        assert!((v("stddev") - 6f64.sqrt()).abs() < 1e-12);
        assert!((v("zscore") - 3.0).abs() < 1e-12);
        assert_eq!((v("users"), v("new_pages")), (2.0, 2.0));
        assert!((v("p50") - 4.0).abs() <= 0.04);
        assert!((v("score") - (1.0 - (-1.5f64).exp())).abs() < 1e-12);
        let top = &r.items["top_k"].items;
        assert_eq!(
            (top.len(), top[0].item.as_str(), top[0].value),
            (1, "/a", 2.0)
        );
        assert_eq!(r.items["sample"].items.len(), 2);
    }

    #[test]
    fn a_session_that_grows_backwards_rewrites_its_earlier_result() {
        let mut feed = Feed::new(
            "name = \"q\"\nwindow = { type = \"session\", gap = \"5s\" }\nout_of_orderness = \"10s\"\nemit = \"on_update\"\naggregates = [{ fn = \"count\" }]\n",
        );
        feed.at("t", 10 * S, 1.0);
        assert_eq!(feed.take(), [row("t", 10, 15, 1.0)]);
        // Out of order: the session now starts at 8 s. The result under 10 s (which a
        // reader of the newest window would find) gets the whole session too.
        feed.at("t", 8 * S, 1.0);
        assert_eq!(feed.take(), [row("t", 10, 15, 2.0), row("t", 8, 15, 2.0)]);
    }

    #[test]
    fn emit_on_update_writes_each_change_and_having_holds_results_back() {
        let mut feed = Feed::new(
            "name = \"q\"\nwindow = \"1m\"\nemit = \"on_update\"\naggregates = [{ fn = \"max\" }, { fn = \"count\" }]\nhaving = [{ field = \"max\", gt = 120 }]\n",
        );
        feed.at("p1", S, 100.0);
        assert!(feed.take().is_empty(), "max 100 is no alert");
        feed.at("p1", 2 * S, 130.0);
        assert_eq!(feed.take(), [row("p1", 0, 60, 2.0)]);
        feed.at("p1", 3 * S, 90.0);
        assert_eq!(feed.take(), [row("p1", 0, 60, 3.0)], "still above: updated");
    }

    /// Long after the idle timeout of every test query.
    fn much_later() -> Instant {
        Instant::now() + std::time::Duration::from_secs(3600)
    }

    #[test]
    fn an_idle_partition_s_windows_close_at_the_others_watermark_and_stay_final() {
        let mut feed = Feed::new(TUMBLING);
        feed.at("a", 7 * S, 1.0);
        // Not idle yet, or nothing the advance would close: the clock stays.
        assert!(
            feed.task
                .advance_idle(&feed.plan, Some(100 * S), Instant::now())
                .is_none()
        );
        assert!(
            feed.task
                .advance_idle(&feed.plan, Some(9 * S), much_later())
                .is_none()
        );
        // Idle, and the instance's other partitions are at 100 s: [0, 10 s) closes.
        let before = feed
            .task
            .advance_idle(&feed.plan, Some(100 * S), much_later());
        assert_eq!(before, Some(Clock::Own(Some(7 * S))));
        // What a checkpoint taken now restores closes the window in the same way.
        let restored = Task::restore(&feed.plan, 0, None, feed.task.state(), Instant::now())
            .expect("restores");
        for mut task in [
            restored,
            std::mem::replace(
                &mut feed.task,
                Task::new(&feed.plan, 0, None, Instant::now()),
            ),
        ] {
            let mut out = Outputs::default();
            task.flush(&feed.plan, &mut out);
            assert_eq!(out.results.len(), 1);
            assert_eq!(
                (out.results[0].values["count"], out.results[0].partial),
                (1.0, false)
            );
            feed.task = task;
        }
        // What the partition delivers for it afterwards is late: the result stays final.
        feed.at("a", 8 * S, 1.0);
        assert!(
            feed.take().is_empty(),
            "the closed window is not emitted again"
        );
        assert_eq!(feed.task.counters.late, 1);
    }

    #[test]
    fn an_advance_that_was_not_recorded_is_put_back() {
        let mut feed = Feed::new(TUMBLING);
        feed.at("a", 7 * S, 1.0);
        let before = feed
            .task
            .advance_idle(&feed.plan, Some(100 * S), much_later())
            .expect("advances");
        feed.task.put_back(before);
        feed.flush();
        assert!(feed.take().is_empty(), "nothing closed");
        feed.at("a", 8 * S, 1.0);
        assert_eq!(feed.task.counters.late, 0, "on time by the clock put back");
    }

    #[test]
    fn a_keyed_task_moves_a_silent_source_up_to_the_sources_it_hears_of() {
        let plan = plan("name = \"q\"\nkey = \"payload.k\"\nwindow = \"10s\"\n");
        let long_ago = Instant::now()
            .checked_sub(std::time::Duration::from_secs(3600))
            .expect("an hour of uptime");
        let mut task = Task::new(&plan, 0, Some(2), long_ago);
        let record = |offset: u64, event: Event| RawRecord {
            partition: 0,
            offset,
            append_time: None,
            event: event.encode_to_vec().into(),
        };
        // The default aggregates, count and sum of `value`.
        let inputs = [(0, Scalar::Num(2.0)), (1, Scalar::Num(2.0))];
        let keyed = |source: u32, offset: u64, ms: i64| {
            rekey::keyed_event(source, offset, 0, "x", ms, &inputs, None)
        };
        let now = Instant::now();
        task.observe_keyed(&plan, &record(0, keyed(1, 0, 5 * S)), long_ago);
        task.observe_keyed(&plan, &record(1, rekey::mark(0, 9, 30 * S)), now);
        task.observe_keyed(&plan, &record(2, rekey::mark(1, 1, 6 * S)), long_ago);
        let mut out = Outputs::default();
        task.flush(&plan, &mut out);
        assert!(out.results.is_empty(), "source 1 holds [0, 10 s) open");
        // Source 1, silent for an hour, moves up to source 0's 30 s.
        let before = task.advance_idle(&plan, None, now).expect("advances");
        assert!(matches!(before, Clock::Sources(_)));
        task.flush(&plan, &mut out);
        assert_eq!(out.results.len(), 1);
        assert_eq!(out.results[0].values["count"], 1.0);
        // Source 1 speaks again, for the closed window: late, not applied.
        task.observe_keyed(&plan, &record(3, keyed(1, 2, 7 * S)), now);
        assert_eq!(task.counters.late, 1);
    }

    #[test]
    fn on_update_versions_are_partial_until_the_window_closes_then_final_once() {
        let mut feed = Feed::new(
            "name = \"q\"\nwindow = \"10s\"\nout_of_orderness = \"0s\"\nemit = \"on_update\"\n",
        );
        feed.at("a", S, 1.0);
        feed.at("a", 2 * S, 1.0);
        feed.at("b", 10 * S, 1.0);
        let versions: Vec<(String, f64, bool)> = feed
            .results
            .iter()
            .map(|r| (r.key.clone(), r.values["count"], r.partial))
            .collect();
        let v = |key: &str, count: f64, partial: bool| (key.to_owned(), count, partial);
        assert_eq!(
            versions,
            [
                v("a", 1.0, true),
                v("a", 2.0, true),
                v("a", 2.0, false),
                v("b", 1.0, true)
            ]
        );
    }

    #[test]
    fn one_to_many_keys_go_through_the_keyed_stage_once_each() {
        let fixture = include_str!("../../../tests/fixtures/meetup_rsvp_sample.json");
        let query = "name = \"topics\"\ntopic = \"meetup\"\nkey = \"payload.group.group_topics[].topic_name\"\nwindow = \"1m\"\nout_of_orderness = \"0s\"\naggregates = [{ fn = \"count\" }, { fn = \"distinct\", of = \"payload.member.member_id\", name = \"members\" }]\n";
        let mut source = Feed::new(query);
        let rsvp = |id: &str, ms: i64| Event {
            id: id.into(),
            key: "rsvp-key".into(),
            event_time: Some(Millis(ms).into()),
            payload: fixture.as_bytes().to_vec().into(),
            ..Event::default()
        };
        source.send(rsvp("r1", 5 * S));
        source.send(rsvp("r2", 7 * S));
        assert_eq!(source.keyed.len(), 24, "12 topics per RSVP");
        assert!(source.results.is_empty(), "no windows in the source stage");
        // The keyed stage, as if the source stage's run was replayed once (a crash).
        let plan = source.plan.clone();
        let mut keyed = Task::new(&plan, 0, Some(1), Instant::now());
        let mut records: Vec<Event> = source.keyed.clone();
        records.extend(source.keyed[..13].iter().cloned());
        records.push(rekey::mark(0, 2, 61 * S));
        for (offset, event) in records.into_iter().enumerate() {
            let record = RawRecord {
                partition: 0,
                offset: offset as u64,
                append_time: None,
                event: event.encode_to_vec().into(),
            };
            keyed.observe_keyed(&plan, &record, Instant::now());
        }
        assert_eq!(keyed.counters.duplicates, 13);
        let mut out = Outputs::default();
        keyed.flush(&plan, &mut out);
        let counts: BTreeMap<String, (f64, f64)> = out
            .results
            .iter()
            .map(|r| (r.key.clone(), (r.values["count"], r.values["members"])))
            .collect();
        assert_eq!(counts.len(), 12);
        assert_eq!(counts["Social"], (2.0, 1.0));
        assert_eq!(counts["Cultural Activities"], (2.0, 1.0));
    }

    /// Every shipped query, written in SQL as docs/queries.md gives it, produces what its
    /// table form produces from the same events: every result version and every re-keyed
    /// event, in order.
    #[test]
    fn every_shipped_query_in_sql_gives_the_results_of_its_table_form() {
        let events: Vec<Event> = (0..3000i64)
            .map(|i| {
                let payload = serde_json::json!({
                    "value": i % 13,
                    // Now and then an outlier, which the anomaly query reports.
                    "bpm": if i % 500 == 499 { 400 } else { 60 + (i * 37) % 100 },
                    "group": {
                        "group_id": i % 5,
                        "group_topics": [
                            { "topic_name": format!("t{}", i % 3) },
                            { "topic_name": format!("t{}", (i + 1) % 3) },
                        ],
                    },
                });
                Event {
                    id: format!("e{i}"),
                    key: format!("k{}", i % 4),
                    r#type: ["click", "cart", "purchase", "reading", "view"][i as usize % 5].into(),
                    // About an hour and a half of event time, slightly out of order.
                    event_time: Some(Millis(i * 1900 - (i % 3) * 700).into()),
                    payload: serde_json::to_vec(&payload).unwrap().into(),
                    ..Event::default()
                }
            })
            .collect();
        let documented = crate::sql::tests::documented();
        for table in crate::config::default_queries() {
            let (_, sql) = documented
                .iter()
                .find(|(name, _)| *name == table.name)
                .expect("documented");
            let in_sql = crate::config::QueryConfig {
                name: table.name.clone(),
                sql: Some(sql.clone()),
                ..crate::config::QueryConfig::default()
            };
            let mut feeds = [table.compile(0).unwrap(), in_sql.compile(0).unwrap()].map(Feed::of);
            for feed in &mut feeds {
                for event in &events {
                    feed.send(event.clone());
                }
                feed.send(Event {
                    id: "last".into(),
                    key: "k0".into(),
                    r#type: "click".into(),
                    event_time: Some(Millis(100_000_000).into()),
                    payload: br#"{"value": 1, "bpm": 1}"#.to_vec().into(),
                    ..Event::default()
                });
            }
            let [by_table, by_sql] = &feeds;
            let seen = |feed: &Feed| {
                let results: Vec<_> = feed
                    .results
                    .iter()
                    .map(|r| {
                        let mut values: Vec<(String, u64)> = r
                            .values
                            .iter()
                            .map(|(k, v)| (k.clone(), v.to_bits()))
                            .collect();
                        values.sort();
                        (r.key.clone(), r.start, r.end, r.partial, values)
                    })
                    .collect();
                let keyed: Vec<(String, Bytes)> = feed
                    .keyed
                    .iter()
                    .map(|e| (e.key.clone(), e.payload.clone()))
                    .collect();
                (results, keyed, feed.late.len())
            };
            let (table_seen, sql_seen) = (seen(by_table), seen(by_sql));
            assert!(
                !table_seen.0.is_empty() || !table_seen.1.is_empty(),
                "{} produced nothing",
                table.name
            );
            assert_eq!(table_seen, sql_seen, "{}", table.name);
        }
    }

    /// Events as `(key, ms, value)`: keys in one partition, each event at most 1.9 s behind
    /// the newest, so that none is late under 2 s of allowed disorder.
    fn disordered() -> impl Strategy<Value = Vec<(String, i64, i32)>> {
        proptest::collection::vec((0u8..4, 0i64..60, -100i32..100, 0i64..1900), 1..120).prop_map(
            |raw| {
                let mut clock = 0i64;
                raw.into_iter()
                    .map(|(key, step, value, jitter)| {
                        clock += step * 100;
                        (format!("k{key}"), (clock - jitter).max(0), value)
                    })
                    .collect()
            },
        )
    }

    fn last_per_window(results: &[Emission]) -> BTreeMap<(String, i64), Vec<(String, u64)>> {
        let mut last = BTreeMap::new();
        for r in results {
            let mut values: Vec<(String, u64)> = r
                .values
                .iter()
                .map(|(k, v)| (k.clone(), v.to_bits()))
                .collect();
            values.sort();
            last.insert((r.key.clone(), r.start), values);
        }
        last
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// With disorder within the allowed bound, every window's count and sum are
        /// exactly those of a batch group-by.
        #[test]
        fn results_equal_a_batch_group_by(events in disordered()) {
            let mut feed = Feed::new(TUMBLING);
            for (key, ms, v) in &events {
                feed.at(key, *ms, f64::from(*v));
            }
            feed.send(reading("flush", 1_000_000 * S, None));
            prop_assert_eq!(feed.task.counters.late, 0);
            let mut exact: BTreeMap<(String, i64), (f64, f64)> = BTreeMap::new();
            for (key, ms, v) in &events {
                let e = exact.entry((key.clone(), ms.div_euclid(10 * S) * 10 * S)).or_default();
                e.0 += 1.0;
                e.1 += f64::from(*v);
            }
            let found: BTreeMap<(String, i64), (f64, f64)> = feed.results.iter().filter(|r| r.key != "flush").map(|r| ((r.key.clone(), r.start), (r.values["count"], r.values["sum"]))).collect();
            prop_assert_eq!(found, exact);
        }

        /// When the runner flushes — after every record or after chunks of any size —
        /// changes when results are written, never what they finally are.
        #[test]
        fn chunking_changes_nothing(events in disordered(), chunks in proptest::collection::vec(1usize..20, 1..40), kind in 0usize..3) {
            let window = ["\"10s\"", "{ type = \"sliding\", size = \"10s\", slide = \"2s\" }", "{ type = \"session\", gap = \"3s\" }"][kind];
            let query = format!("name = \"q\"\nwindow = {window}\nout_of_orderness = \"500ms\"\nemit = \"on_update\"\naggregates = [{{ fn = \"count\" }}, {{ fn = \"sum\" }}]\n");
            let mut eager = Feed::new(&query);
            let mut chunked = Feed::new(&query);
            chunked.eager = false;
            let mut sizes = chunks.iter().cycle();
            let mut left = *sizes.next().unwrap_or(&1);
            for (key, ms, v) in &events {
                eager.at(key, *ms, f64::from(*v));
                chunked.at(key, *ms, f64::from(*v));
                left -= 1;
                if left == 0 {
                    chunked.flush();
                    left = *sizes.next().unwrap_or(&1);
                }
            }
            eager.send(reading("flush", 1_000_000 * S, None));
            chunked.send(reading("flush", 1_000_000 * S, None));
            chunked.flush();
            // Sessions may leave earlier starts behind, depending on what was written when:
            // compare the windows both wrote.
            let (a, b) = (last_per_window(&eager.results), last_per_window(&chunked.results));
            for (window, values) in &b {
                if kind != 2 || a.contains_key(window) {
                    prop_assert_eq!(a.get(window), Some(values), "{:?}", window);
                }
            }
            if kind != 2 {
                prop_assert_eq!(a.len(), b.len());
            }
            prop_assert_eq!(eager.task.counters, chunked.task.counters);
        }

        /// An oracle for the SQL front end: a query with a filter, several aggregates and
        /// `HAVING`, written in SQL, gives exactly what a straightforward computation over
        /// the same events gives, window by window.
        #[test]
        fn a_sql_query_equals_a_straightforward_computation(events in disordered()) {
            let query = "name = \"q\"\nsql = \"\"\"\n\
                SELECT key, count(*) AS n, sum(payload.value) AS total,\n\
                       min(payload.value) AS low, max(CAST(payload.value AS DOUBLE)) AS high\n\
                FROM events\n\
                WHERE payload.value >= -50 AND key <> 'k3'\n\
                GROUP BY key, TUMBLE(event_time, INTERVAL '10' SECOND)\n\
                HAVING n >= 2\n\
                WITH (out_of_orderness = '2s')\n\"\"\"\n";
            let mut feed = Feed::new(query);
            for (key, ms, v) in &events {
                feed.at(key, *ms, f64::from(*v));
            }
            feed.at("flush", 1_000_000 * S, 0.0);
            prop_assert_eq!(feed.task.counters.late, 0);
            let mut windows: BTreeMap<(String, i64), Vec<f64>> = BTreeMap::new();
            for (key, ms, v) in &events {
                if *v >= -50 && key != "k3" {
                    windows.entry((key.clone(), ms.div_euclid(10 * S) * 10 * S)).or_default().push(f64::from(*v));
                }
            }
            let exact: BTreeMap<(String, i64), [f64; 4]> = windows
                .into_iter()
                .filter(|(_, values)| values.len() >= 2)
                .map(|(window, values)| {
                    let low = values.iter().copied().fold(f64::INFINITY, f64::min);
                    let high = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    (window, [values.len() as f64, values.iter().sum(), low, high])
                })
                .collect();
            let found: BTreeMap<(String, i64), [f64; 4]> = feed
                .results
                .iter()
                .filter(|r| r.key != "flush")
                .map(|r| ((r.key.clone(), r.start), [r.values["n"], r.values["total"], r.values["low"], r.values["high"]]))
                .collect();
            prop_assert_eq!(found, exact);
        }

        /// The same query in SQL and as a table gives the same results, version by
        /// version, for every window kind.
        #[test]
        fn a_query_in_sql_and_as_a_table_gives_the_same_results(events in disordered(), kind in 0usize..3) {
            let (window, group) = [
                ("\"10s\"", "TUMBLE(event_time, INTERVAL '10' SECOND)"),
                ("{ type = \"sliding\", size = \"10s\", slide = \"2s\" }", "HOP(event_time, INTERVAL '2' SECOND, INTERVAL '10' SECOND)"),
                ("{ type = \"session\", gap = \"3s\" }", "SESSION(event_time, INTERVAL '3' SECOND)"),
            ][kind];
            let table = format!(
                "name = \"q\"\nvalue = \"payload.value\"\nwindow = {window}\nout_of_orderness = \"500ms\"\n\
                 emit = \"on_update\"\nfilter = [{{ field = \"key\", ne = \"k2\" }}]\n\
                 having = [{{ field = \"max\", gt = -90 }}]\n"
            );
            let sql = format!(
                "name = \"q\"\nsql = \"\"\"SELECT key, count(payload.value) AS count, sum(payload.value) AS sum, \
                 avg(payload.value) AS avg, min(payload.value) AS min, max(payload.value) AS max FROM events \
                 WHERE key != 'k2' GROUP BY key, {group} HAVING max > -90 \
                 EMIT ON UPDATE WITH (out_of_orderness = '500ms')\"\"\"\n"
            );
            let (mut by_table, mut by_sql) = (Feed::new(&table), Feed::new(&sql));
            for (key, ms, v) in &events {
                by_table.at(key, *ms, f64::from(*v));
                by_sql.at(key, *ms, f64::from(*v));
            }
            type Version = (String, i64, i64, bool, Vec<(String, u64)>);
            let versions = |feed: &Feed| -> Vec<Version> {
                feed.results
                    .iter()
                    .map(|r| {
                        let mut values: Vec<(String, u64)> = r.values.iter().map(|(k, v)| (k.clone(), v.to_bits())).collect();
                        values.sort();
                        (r.key.clone(), r.start, r.end, r.partial, values)
                    })
                    .collect()
            };
            prop_assert_eq!(versions(&by_table), versions(&by_sql));
            prop_assert_eq!(by_table.task.counters, by_sql.task.counters);
        }

        /// Stopping after any record, saving the task through its checkpoint form and
        /// resuming gives the same final results, bit for bit, as never stopping — for
        /// every window kind, with lateness and sketches in the state.
        #[test]
        fn a_checkpoint_at_any_point_changes_nothing(events in disordered(), cut in any::<prop::sample::Index>(), kind in 0usize..3) {
            let window = ["\"10s\"", "{ type = \"sliding\", size = \"10s\", slide = \"5s\" }", "{ type = \"session\", gap = \"3s\" }"][kind];
            let query = format!("name = \"q\"\nwindow = {window}\nout_of_orderness = \"1s\"\nallowed_lateness = \"1s\"\naggregates = [{{ fn = \"count\" }}, {{ fn = \"sum\" }}, {{ fn = \"distinct\", of = \"id\" }}, {{ fn = \"percentiles\" }}, {{ fn = \"new_items\", of = \"payload.value\" }}, {{ fn = \"sample\", of = \"id\", size = 3 }}]\n");
            let mut whole = Feed::new(&query);
            for (key, ms, v) in &events {
                whole.at(key, *ms, f64::from(*v));
            }
            whole.send(reading("flush", 1_000_000 * S, None));

            let cut = cut.index(events.len() + 1);
            let mut first = Feed::new(&query);
            for (key, ms, v) in &events[..cut] {
                first.at(key, *ms, f64::from(*v));
            }
            let json = serde_json::to_vec(&first.task.state()).unwrap();
            let state: TaskState = serde_json::from_slice(&json).unwrap();
            let mut second = Feed::new(&query);
            second.task = Task::restore(&second.plan, 0, None, state, Instant::now()).unwrap();
            second.offset = first.offset;
            for (key, ms, v) in &events[cut..] {
                second.at(key, *ms, f64::from(*v));
            }
            second.send(reading("flush", 1_000_000 * S, None));
            let mut resumed = first.results.clone();
            resumed.extend(second.results.clone());
            prop_assert_eq!(last_per_window(&resumed), last_per_window(&whole.results));
            prop_assert_eq!(second.task.counters, whole.task.counters);
        }
    }
}
