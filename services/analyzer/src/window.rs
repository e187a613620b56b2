//! Event-time windows per key: tumbling, sliding (hopping) and session windows, when they
//! fire, when their state is dropped, and what is late.
//!
//! - **Tumbling** `size`: `[start, start + size)` with `start` a multiple of `size` since
//!   the Unix epoch; each event is in exactly one.
//! - **Sliding** `size`, `slide`: windows of length `size` starting at every multiple of
//!   `slide`; each event is in `size / slide` of them.
//! - **Session** `gap`: per key, events closer than `gap` to each other form one window
//!   `[first, last + gap)`; an event that bridges two sessions merges them.
//!
//! The partition's watermark drives a window (see [`crate::task`] for where it comes from):
//!
//! - it **fires** — it closes, and its result is emitted — once the watermark reaches its
//!   end. With `emit = "on_update"` it is also emitted after every change before that,
//!   marked partial;
//! - its state is **dropped** once the watermark passes its end plus the allowed lateness.
//!   Until then a late event still updates it, and the window is emitted again. An event is
//!   **late** — counted, sent to the side output, not applied — when every window it
//!   belongs to is past that point (for sessions: when the event is more than the allowed
//!   lateness behind the watermark).
//!
//! The watermark is a function of what the partition delivered — and of the moments it was
//! found idle, which checkpoints record before anything they close is written — so which
//! events are late, and what every window finally holds, do not depend on timing: a
//! restart from a checkpoint ends with the same results as a run without one.

use crate::aggregate::{AggState, Aggregate};
use crate::path::Scalar;
use runnel_proto::v1::RankedItems;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};

/// How events are grouped into windows, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WindowSpec {
    Tumbling { size: i64 },
    Sliding { size: i64, slide: i64 },
    Session { gap: i64 },
}

impl WindowSpec {
    /// Whether an event at `t` is late under watermark `w` with `lateness` allowed.
    pub(crate) fn is_late(&self, t: i64, lateness: i64, w: Option<i64>) -> bool {
        let Some(w) = w else { return false };
        match *self {
            WindowSpec::Tumbling { size } => last_end(t, size, size).saturating_add(lateness) <= w,
            WindowSpec::Sliding { size, slide } => {
                last_end(t, size, slide).saturating_add(lateness) <= w
            }
            WindowSpec::Session { .. } => t.saturating_add(lateness) < w,
        }
    }

    /// The starts of the fixed windows containing `t`, oldest first (none for sessions).
    fn starts(&self, t: i64) -> impl Iterator<Item = (i64, i64)> {
        let (size, slide) = match *self {
            WindowSpec::Tumbling { size } => (size, size),
            WindowSpec::Sliding { size, slide } => (size, slide),
            WindowSpec::Session { .. } => (1, 0),
        };
        let last = if slide > 0 {
            t.div_euclid(slide).saturating_mul(slide)
        } else {
            0
        };
        let count = if slide > 0 {
            (size + slide - 1) / slide
        } else {
            0
        };
        (0..count).rev().filter_map(move |i| {
            let start = last.checked_sub(i * slide)?;
            let end = start.saturating_add(size);
            (end > t).then_some((start, end))
        })
    }
}

/// The end of the newest window of length `size`, starting at multiples of `slide`, that
/// contains `t`.
fn last_end(t: i64, size: i64, slide: i64) -> i64 {
    t.div_euclid(slide)
        .saturating_mul(slide)
        .saturating_add(size)
}

/// When a window's result is emitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EmitMode {
    /// When the watermark passes the window's end (and again for each late update).
    OnClose,
    /// After every batch of events that changed the window, marked partial until the
    /// watermark passes the window's end, and then once more, final.
    OnUpdate,
}

/// One key's window.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Window {
    pub(crate) start: i64,
    pub(crate) end: i64,
    aggs: Vec<AggState>,
    /// Its result has been emitted at least once since it fired.
    fired: bool,
    /// Changed since it was last emitted.
    dirty: bool,
    /// The `traceparent` of its first event: the result continues that trace.
    trace: Option<Box<str>>,
    /// Sessions only: the starts it was written under before it grew backwards or merged.
    /// The store has no deletes, so those results are written again with the session's
    /// current values: a reader of any of them sees the whole session.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    written: Vec<i64>,
}

/// At most this many earlier starts are kept per session.
const MAX_ALIASES: usize = 16;

/// A result ready to be written.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Emission {
    pub(crate) key: String,
    pub(crate) start: i64,
    pub(crate) end: i64,
    pub(crate) values: HashMap<String, f64>,
    pub(crate) items: HashMap<String, RankedItems>,
    pub(crate) trace: Option<String>,
    /// How far the task had read its input partition when it emitted this version
    /// (`QueryResult.input_offset`); set by the task.
    pub(crate) input_offset: u64,
    /// Emitted before the window closed (`QueryResult.partial`): an early version of
    /// `emit = "on_update"`, or a window `max_open_windows` forced out.
    pub(crate) partial: bool,
}

/// What an event contributes: its time, the aggregates' inputs (by aggregate index), a
/// hash of its position (for samples) and its trace.
pub(crate) struct Contribution<'c, 'a> {
    pub(crate) time: i64,
    pub(crate) inputs: &'c [(usize, Scalar<'a>)],
    pub(crate) rank: u64,
    pub(crate) trace: Option<&'a str>,
    /// The partition's own watermark: windows it has passed by the allowed lateness are
    /// closed for good — dropped already or about to be, depending only on when the runner
    /// last flushed — and take nothing more.
    pub(crate) watermark: Option<i64>,
}

/// Everything a query's windows need, fixed for the query.
#[derive(Debug, Clone)]
pub(crate) struct WindowRules {
    pub(crate) spec: WindowSpec,
    pub(crate) lateness: i64,
    pub(crate) emit: EmitMode,
    pub(crate) aggregates: Vec<Aggregate>,
    pub(crate) having: crate::filter::ResultFilter,
    pub(crate) max_open_windows: usize,
}

/// The windows of every key one partition holds.
#[derive(Debug, Default)]
pub(crate) struct KeyedWindows {
    keys: foldhash::HashMap<Box<str>, Vec<Window>>,
    /// Window end → keys with a window ending there (entries go stale when sessions grow
    /// or merge; a stale entry finds nothing to do).
    fire_at: BTreeMap<i64, Vec<Box<str>>>,
    /// Window end + lateness → keys, likewise.
    drop_at: BTreeMap<i64, Vec<Box<str>>>,
    /// Windows changed since the last flush, as (key, start).
    dirty: Vec<(Box<str>, i64)>,
    open: usize,
    /// Windows dropped before their time because `max_open_windows` was reached.
    pub(crate) forced: u64,
}

/// The checkpointed form of [`KeyedWindows`].
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct WindowsState {
    keys: Vec<(String, Vec<Window>)>,
    forced: u64,
}

impl KeyedWindows {
    /// Open windows.
    pub(crate) fn open(&self) -> usize {
        self.open
    }

    /// The earliest end of a window that has not fired yet (or a little earlier: entries
    /// of sessions that grew stay behind).
    pub(crate) fn next_close(&self) -> Option<i64> {
        self.fire_at.keys().next().copied()
    }

    fn schedule(&mut self, key: &str, end: i64, lateness: i64) {
        self.fire_at.entry(end).or_default().push(key.into());
        self.drop_at
            .entry(end.saturating_add(lateness))
            .or_default()
            .push(key.into());
    }

    /// Adds an event of `key` to its windows.
    pub(crate) fn apply(&mut self, rules: &WindowRules, key: &str, event: &Contribution<'_, '_>) {
        let new_window = |start: i64, end: i64| Window {
            start,
            end,
            aggs: rules.aggregates.iter().map(Aggregate::state).collect(),
            fired: false,
            dirty: false,
            trace: event.trace.map(Into::into),
            written: Vec::new(),
        };
        // Windows whose end is new or moved: they need a place in the schedules.
        let mut scheduled: Vec<i64> = Vec::new();
        let windows = match self.keys.get_mut(key) {
            Some(windows) => windows,
            None => self.keys.entry(key.into()).or_default(),
        };
        match rules.spec {
            WindowSpec::Tumbling { .. } | WindowSpec::Sliding { .. } => {
                for (start, end) in rules.spec.starts(event.time) {
                    if event
                        .watermark
                        .is_some_and(|w| end.saturating_add(rules.lateness) <= w)
                    {
                        continue; // a sliding window the event is too late for
                    }
                    let at = match windows.binary_search_by_key(&start, |w| w.start) {
                        Ok(at) => at,
                        Err(at) => {
                            windows.insert(at, new_window(start, end));
                            self.open += 1;
                            scheduled.push(end);
                            at
                        }
                    };
                    add(&mut windows[at], rules, event);
                    mark_dirty(&mut self.dirty, rules, key, &mut windows[at]);
                }
            }
            WindowSpec::Session { gap } => {
                let (lo, hi) = (event.time, event.time.saturating_add(gap));
                // Sessions are sorted and disjoint: those overlapping [lo, hi) are a run.
                let first = windows.partition_point(|w| w.end <= lo);
                let last = first + windows[first..].partition_point(|w| w.start < hi);
                let overlapping = last - first;
                let mut merged = windows.drain(first..last);
                let mut session = match merged.next() {
                    Some(mut earliest) => {
                        for other in merged {
                            for (a, b) in earliest.aggs.iter_mut().zip(&other.aggs) {
                                a.merge(b);
                            }
                            earliest.end = earliest.end.max(other.end);
                            earliest.fired |= other.fired;
                            earliest.written.extend(other.written);
                        }
                        earliest
                    }
                    None => {
                        drop(merged);
                        new_window(lo, hi)
                    }
                };
                let before = (session.start, session.end);
                session.start = session.start.min(lo);
                session.end = session.end.max(hi);
                add(&mut session, rules, event);
                if overlapping != 1 || before != (session.start, session.end) {
                    scheduled.push(session.end);
                }
                // Marked again under its (possibly new) start.
                session.dirty = false;
                mark_dirty(&mut self.dirty, rules, key, &mut session);
                windows.insert(first, session);
                self.open = self.open + 1 - overlapping;
            }
        }
        for end in scheduled {
            self.schedule(key, end, rules.lateness);
        }
    }

    /// Emits what is due and drops what may go: windows whose end the partition's
    /// `watermark` has reached, windows changed since the last flush (with `on_update`, or
    /// after they fired), and windows the watermark has passed by the allowed lateness —
    /// plus, beyond `max_open_windows`, the oldest.
    pub(crate) fn flush(
        &mut self,
        rules: &WindowRules,
        watermark: Option<i64>,
        out: &mut Vec<Emission>,
    ) {
        let sessions = matches!(rules.spec, WindowSpec::Session { .. });
        let emit = |key: &str, w: &mut Window, out: &mut Vec<Emission>| {
            w.dirty = false;
            if let Some(e) = report(rules, key, w) {
                if sessions {
                    if !w.written.contains(&w.start) {
                        w.written.push(w.start);
                        if w.written.len() > MAX_ALIASES {
                            w.written.remove(0);
                        }
                    }
                    for &start in w.written.iter().filter(|s| **s != w.start) {
                        out.push(Emission { start, ..e.clone() });
                    }
                }
                out.push(e);
            }
        };
        if let Some(fire) = watermark {
            while let Some(entry) = self.fire_at.first_entry() {
                if *entry.key() > fire {
                    break;
                }
                for key in entry.remove() {
                    let Some(windows) = self.keys.get_mut(&key) else {
                        continue;
                    };
                    for w in windows.iter_mut().filter(|w| w.end <= fire && !w.fired) {
                        // Emitted in either mode: with `on_update` this is the version
                        // that says the window is final.
                        w.fired = true;
                        emit(&key, w, out);
                    }
                }
            }
        }
        for (key, start) in std::mem::take(&mut self.dirty) {
            let Some(windows) = self.keys.get_mut(&key) else {
                continue;
            };
            if let Ok(at) = windows.binary_search_by_key(&start, |w| w.start) {
                let w = &mut windows[at];
                if w.dirty && (rules.emit == EmitMode::OnUpdate || w.fired) {
                    emit(&key, w, out);
                } else if rules.emit == EmitMode::OnClose {
                    // Not fired yet: it stays dirty and is emitted when it fires.
                }
            }
        }
        let mut drop_until = watermark;
        while let Some(entry) = self.drop_at.first_entry() {
            let due = drop_until.is_some_and(|w| *entry.key() <= w);
            let forced = !due && self.open > rules.max_open_windows;
            if !due && !forced {
                break;
            }
            let at = *entry.key();
            let keys = entry.remove();
            for key in keys {
                let Some(windows) = self.keys.get_mut(&key) else {
                    continue;
                };
                let before = windows.len();
                let mut kept = Vec::with_capacity(windows.len());
                for mut w in windows.drain(..) {
                    if w.end.saturating_add(rules.lateness) <= at {
                        if !w.fired || w.dirty {
                            emit(&key, &mut w, out);
                        }
                    } else {
                        kept.push(w);
                    }
                }
                let dropped = before - kept.len();
                self.open -= dropped;
                if forced {
                    self.forced += dropped as u64;
                }
                if kept.is_empty() {
                    self.keys.remove(&key);
                } else {
                    *windows = kept;
                }
            }
            if forced {
                // Forced drops go one end at a time, oldest first.
                drop_until = drop_until.max(Some(at));
            }
        }
    }

    /// The state to checkpoint.
    pub(crate) fn state(&self) -> WindowsState {
        WindowsState {
            keys: self
                .keys
                .iter()
                .map(|(k, w)| (k.to_string(), w.clone()))
                .collect(),
            forced: self.forced,
        }
    }

    /// Windows as a checkpoint left them.
    pub(crate) fn restore(
        state: WindowsState,
        rules: &WindowRules,
    ) -> Result<KeyedWindows, String> {
        let mut windows = KeyedWindows {
            forced: state.forced,
            ..KeyedWindows::default()
        };
        for (key, list) in state.keys {
            if list
                .iter()
                .any(|w| w.aggs.len() != rules.aggregates.len() || w.end <= w.start)
            {
                return Err(format!("it holds a malformed window for key {key:?}"));
            }
            for w in &list {
                windows.schedule(&key, w.end, rules.lateness);
                if w.dirty {
                    windows.dirty.push((key.as_str().into(), w.start));
                }
            }
            windows.open += list.len();
            windows.keys.insert(key.into(), list);
        }
        Ok(windows)
    }
}

/// Notes that `w` changed, if that matters before it fires: with `on_update` always, with
/// `on_close` once it has fired (a late update to emit again). Unfired `on_close` windows
/// are emitted when they fire anyway, so the hot path keeps no list of them.
fn mark_dirty(dirty: &mut Vec<(Box<str>, i64)>, rules: &WindowRules, key: &str, w: &mut Window) {
    if (rules.emit == EmitMode::OnUpdate || w.fired) && !std::mem::replace(&mut w.dirty, true) {
        dirty.push((key.into(), w.start));
    }
}

fn add(w: &mut Window, rules: &WindowRules, event: &Contribution<'_, '_>) {
    for (i, agg) in rules.aggregates.iter().enumerate() {
        if agg.input.is_none() {
            w.aggs[i].add_event();
        }
    }
    for (i, value) in event.inputs {
        w.aggs[*i].add(&rules.aggregates[*i], value, event.rank);
    }
}

/// The window's result, unless `having` holds it back.
fn report(rules: &WindowRules, key: &str, w: &mut Window) -> Option<Emission> {
    let (mut values, mut items) = (HashMap::new(), HashMap::new());
    for (state, spec) in w.aggs.iter_mut().zip(&rules.aggregates) {
        state.report(spec, &mut values, &mut items);
    }
    if !rules.having.iter().all(|c| c.holds_for(&values)) {
        return None;
    }
    Some(Emission {
        key: key.to_owned(),
        start: w.start,
        end: w.end,
        values,
        items,
        trace: w.trace.as_deref().map(str::to_owned),
        input_offset: 0,
        partial: !w.fired,
    })
}
