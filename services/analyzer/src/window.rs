//! Tumbling event-time windows per key, the watermark that closes them, and the state a
//! checkpoint saves.
//!
//! A window is `[start, start + size)` with `start` a multiple of `size` since the Unix
//! epoch. Each partition has a clock: the greatest event time it has delivered. The
//! watermark is the smallest clock among the *active* partitions minus the allowed
//! out-of-orderness, and it never goes back. A partition is active until it has been quiet
//! for the idle timeout (processing time, counted from its last record or, for one that has
//! not delivered yet, from when reading started); an active partition that has delivered
//! nothing holds the watermark where it is, since its first event may be the oldest. A
//! window closes (and its result is emitted) once the watermark reaches its end; an event
//! for a window that has already closed is *late*: counted, not applied. If every
//! partition is idle, the most advanced one sets the watermark.
//!
//! [`Windows`] is plain synchronous state: the runner feeds it records in partition order
//! and takes closed windows out. Everything a restart needs is in [`WindowState`].

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

/// What became of one observed event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Added to its window.
    Counted,
    /// Its window had closed already; it was counted as late and not applied.
    Late,
    /// It carries nothing to aggregate (filtered out or without a value); only its event
    /// time moved the partition's clock.
    Skipped,
}

/// The aggregates of one open window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct OpenWindow {
    pub(crate) start: i64,
    pub(crate) key: String,
    pub(crate) count: u64,
    pub(crate) sum: f64,
    pub(crate) min: f64,
    pub(crate) max: f64,
    /// The W3C `traceparent` of the first event in the window: the result continues it.
    pub(crate) traceparent: Option<String>,
}

/// A window whose watermark has passed: its final aggregates.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ClosedWindow {
    pub(crate) start: i64,
    pub(crate) end: i64,
    pub(crate) key: String,
    /// `count`, `sum`, `avg`, `min`, `max`.
    pub(crate) values: HashMap<String, f64>,
    pub(crate) traceparent: Option<String>,
}

/// One partition's progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct PartitionState {
    /// The next offset to read.
    pub(crate) next_offset: u64,
    /// The greatest event time delivered so far.
    pub(crate) max_event_time: Option<i64>,
}

/// Running totals, kept in checkpoints so that they stay consistent with what a restart
/// reads again.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Counters {
    /// Records read.
    pub(crate) processed: u64,
    /// Events applied to a window.
    pub(crate) counted: u64,
    /// Events whose window had closed.
    pub(crate) late: u64,
    /// Records without anything to aggregate.
    pub(crate) skipped: u64,
    /// Windows closed and emitted.
    pub(crate) emitted: u64,
}

/// Everything a query's windows need to resume exactly where a checkpoint left them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct WindowState {
    /// The window length the state was built with.
    pub(crate) window_ms: i64,
    /// Per partition, in partition order.
    pub(crate) partitions: Vec<PartitionState>,
    pub(crate) watermark: Option<i64>,
    /// Open windows, oldest first.
    pub(crate) open: Vec<OpenWindow>,
    pub(crate) counters: Counters,
}

/// The windowing of one query over one topic.
#[derive(Debug)]
pub(crate) struct Windows {
    size: i64,
    out_of_orderness: i64,
    idle_timeout: Duration,
    /// Keyed by `(start, key)`, so the oldest windows close first.
    open: BTreeMap<(i64, String), OpenWindow>,
    partitions: Vec<PartitionState>,
    /// When each partition last delivered a record, or reading started (processing time,
    /// not checkpointed).
    last_seen: Vec<Instant>,
    watermark: Option<i64>,
    counters: Counters,
}

/// Whole milliseconds of `duration`, saturating.
pub(crate) fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

impl Windows {
    /// Empty windows for a topic of `partitions` partitions, reading from offset 0 as of
    /// `now`.
    pub(crate) fn new(
        window: Duration,
        out_of_orderness: Duration,
        idle_timeout: Duration,
        partitions: u32,
        now: Instant,
    ) -> Windows {
        Windows {
            size: millis(window).max(1),
            out_of_orderness: millis(out_of_orderness),
            idle_timeout,
            open: BTreeMap::new(),
            partitions: vec![
                PartitionState {
                    next_offset: 0,
                    max_event_time: None,
                };
                partitions as usize
            ],
            last_seen: vec![now; partitions as usize],
            watermark: None,
            counters: Counters::default(),
        }
    }

    /// Windows resumed from a checkpoint; the error says why the checkpoint does not fit.
    pub(crate) fn restore(
        state: WindowState,
        window: Duration,
        out_of_orderness: Duration,
        idle_timeout: Duration,
        partitions: u32,
        now: Instant,
    ) -> Result<Windows, String> {
        let mut windows = Windows::new(window, out_of_orderness, idle_timeout, partitions, now);
        if state.window_ms != windows.size {
            return Err(format!(
                "it was taken with {}ms windows, the query now has {}ms",
                state.window_ms, windows.size
            ));
        }
        if state.partitions.len() != partitions as usize {
            return Err(format!(
                "it covers {} partitions, the topic has {partitions}",
                state.partitions.len()
            ));
        }
        if let Some(window) = state
            .open
            .iter()
            .find(|w| w.start.rem_euclid(windows.size) != 0 || w.count == 0)
        {
            return Err(format!(
                "it holds a malformed window starting at {}",
                window.start
            ));
        }
        windows.partitions = state.partitions;
        windows.watermark = state.watermark;
        windows.counters = state.counters;
        windows.open = state
            .open
            .into_iter()
            .map(|w| ((w.start, w.key.clone()), w))
            .collect();
        Ok(windows)
    }

    /// The state to checkpoint.
    pub(crate) fn state(&self) -> WindowState {
        WindowState {
            window_ms: self.size,
            partitions: self.partitions.clone(),
            watermark: self.watermark,
            open: self.open.values().cloned().collect(),
            counters: self.counters,
        }
    }

    /// Where each partition is to be read from next.
    pub(crate) fn next_offsets(&self) -> Vec<u64> {
        self.partitions.iter().map(|p| p.next_offset).collect()
    }

    /// The watermark: windows ending at or before it are closed.
    pub(crate) fn watermark(&self) -> Option<i64> {
        self.watermark
    }

    /// Windows still open.
    pub(crate) fn open_windows(&self) -> usize {
        self.open.len()
    }

    /// Running totals.
    pub(crate) fn counters(&self) -> Counters {
        self.counters
    }

    /// Applies the record at `offset` of `partition`, whose event happened at `event_time`;
    /// `entry` is what it contributes — its key, value and trace — if anything. Records of
    /// one partition must come in offset order.
    pub(crate) fn observe(
        &mut self,
        partition: u32,
        offset: u64,
        event_time: i64,
        entry: Option<(&str, f64, Option<&str>)>,
        now: Instant,
    ) -> Outcome {
        let index = partition as usize;
        let Some(clock) = self.partitions.get_mut(index) else {
            // The runner only subscribes to partitions it sized the windows for.
            return Outcome::Skipped;
        };
        clock.next_offset = offset + 1;
        clock.max_event_time = Some(
            clock
                .max_event_time
                .map_or(event_time, |t| t.max(event_time)),
        );
        self.last_seen[index] = now;
        self.counters.processed += 1;

        let Some((key, value, traceparent)) = entry else {
            self.counters.skipped += 1;
            return Outcome::Skipped;
        };
        let start = event_time.div_euclid(self.size).saturating_mul(self.size);
        let end = start.saturating_add(self.size);
        if self.watermark.is_some_and(|watermark| end <= watermark) {
            self.counters.late += 1;
            return Outcome::Late;
        }
        self.counters.counted += 1;
        match self.open.get_mut(&(start, key.to_owned())) {
            Some(window) => {
                window.count += 1;
                window.sum += value;
                window.min = window.min.min(value);
                window.max = window.max.max(value);
            }
            None => {
                self.open.insert(
                    (start, key.to_owned()),
                    OpenWindow {
                        start,
                        key: key.to_owned(),
                        count: 1,
                        sum: value,
                        min: value,
                        max: value,
                        traceparent: traceparent.map(str::to_owned),
                    },
                );
            }
        }
        Outcome::Counted
    }

    /// Moves the watermark as far as the partitions' clocks allow and closes every window
    /// it has passed, oldest first.
    pub(crate) fn advance(&mut self, now: Instant) -> Vec<ClosedWindow> {
        let clocks = self.partitions.iter().zip(&self.last_seen);
        let mut active = clocks
            .clone()
            .filter(|(_, seen)| now.saturating_duration_since(**seen) < self.idle_timeout)
            .map(|(p, _)| p.max_event_time);
        let candidate = match active.try_fold(None, |slowest: Option<i64>, clock| {
            // An active partition without a clock yet blocks: `None` ends the fold.
            clock.map(|t| Some(slowest.map_or(t, |s| s.min(t))))
        }) {
            // One is active but has delivered nothing: the watermark stays.
            None => None,
            Some(Some(slowest)) => Some(slowest),
            // Nobody active: the most advanced partition decides.
            Some(None) => clocks.filter_map(|(p, _)| p.max_event_time).max(),
        }
        .map(|t| t.saturating_sub(self.out_of_orderness));
        if candidate > self.watermark {
            self.watermark = candidate;
        }
        let Some(watermark) = self.watermark else {
            return Vec::new();
        };
        let mut closed = Vec::new();
        while let Some(entry) = self.open.first_entry() {
            let end = entry.key().0.saturating_add(self.size);
            if end > watermark {
                break;
            }
            let window = entry.remove();
            closed.push(ClosedWindow {
                start: window.start,
                end,
                values: HashMap::from([
                    ("count".to_owned(), window.count as f64),
                    ("sum".to_owned(), window.sum),
                    ("avg".to_owned(), window.sum / window.count as f64),
                    ("min".to_owned(), window.min),
                    ("max".to_owned(), window.max),
                ]),
                key: window.key,
                traceparent: window.traceparent,
            });
        }
        self.counters.emitted += closed.len() as u64;
        closed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const S: i64 = 1000;

    fn windows(partitions: u32) -> Windows {
        Windows::new(
            Duration::from_secs(10),
            Duration::from_secs(2),
            Duration::from_secs(3600),
            partitions,
            Instant::now(),
        )
    }

    /// (key, start) → (count, avg) of `closed`.
    fn summary(closed: &[ClosedWindow]) -> Vec<(String, i64, f64, f64)> {
        closed
            .iter()
            .map(|w| (w.key.clone(), w.start, w.values["count"], w.values["avg"]))
            .collect()
    }

    struct Feed {
        windows: Windows,
        offsets: Vec<u64>,
        closed: Vec<ClosedWindow>,
        now: Instant,
    }

    impl Feed {
        fn new(windows: Windows) -> Feed {
            let offsets = windows.next_offsets();
            Feed {
                windows,
                offsets,
                closed: Vec::new(),
                now: Instant::now(),
            }
        }

        fn event(&mut self, partition: u32, at: i64, key: &str, value: Option<f64>) -> Outcome {
            let offset = self.offsets[partition as usize];
            self.offsets[partition as usize] += 1;
            let outcome = self.windows.observe(
                partition,
                offset,
                at,
                value.map(|v| (key, v, None)),
                self.now,
            );
            self.closed.extend(self.windows.advance(self.now));
            outcome
        }
    }

    #[test]
    fn windows_close_when_the_watermark_passes_their_end() {
        let mut feed = Feed::new(windows(1));
        assert_eq!(feed.event(0, 5 * S, "a", Some(10.0)), Outcome::Counted);
        assert_eq!(feed.event(0, S, "a", Some(20.0)), Outcome::Counted);
        assert_eq!(feed.event(0, 9 * S, "b", Some(1.0)), Outcome::Counted);
        // The watermark is 11 - 2 = 9 s: [0, 10 s) stays open.
        assert_eq!(feed.event(0, 11 * S, "a", Some(5.0)), Outcome::Counted);
        assert!(feed.closed.is_empty());
        assert_eq!(feed.windows.watermark(), Some(9 * S));
        // Within the allowed disorder: still counts.
        assert_eq!(feed.event(0, 3 * S, "a", Some(30.0)), Outcome::Counted);
        // 12 - 2 = 10 s closes [0, 10 s) for both keys.
        assert_eq!(feed.event(0, 12 * S, "c", None), Outcome::Skipped);
        assert_eq!(
            summary(&feed.closed),
            [("a".into(), 0, 3.0, 20.0), ("b".into(), 0, 1.0, 1.0)]
        );
        let a = &feed.closed[0].values;
        assert_eq!((a["sum"], a["min"], a["max"]), (60.0, 10.0, 30.0));
        assert_eq!(feed.closed[0].end, 10 * S);
        // Now [0, 10 s) is closed: an event for it is late and changes nothing.
        assert_eq!(feed.event(0, 9 * S, "a", Some(1000.0)), Outcome::Late);
        let counters = feed.windows.counters();
        assert_eq!(
            (
                counters.processed,
                counters.counted,
                counters.late,
                counters.skipped,
                counters.emitted
            ),
            (7, 5, 1, 1, 2)
        );
        assert_eq!(feed.windows.open_windows(), 1);
    }

    #[test]
    fn the_slowest_active_partition_holds_the_watermark() {
        let mut feed = Feed::new(windows(3));
        feed.event(0, 100 * S, "a", Some(1.0));
        feed.event(1, 20 * S, "b", Some(1.0));
        // Partition 2 has delivered nothing yet: its first event may be the oldest.
        assert_eq!(feed.windows.watermark(), None);
        feed.event(2, 50 * S, "c", Some(1.0));
        assert_eq!(feed.windows.watermark(), Some(18 * S));
        feed.event(1, 40 * S, "b", Some(1.0));
        assert_eq!(feed.windows.watermark(), Some(38 * S));
        assert_eq!(feed.event(2, 21 * S, "c", Some(1.0)), Outcome::Late);
        feed.event(1, 300 * S, "b", Some(1.0));
        assert_eq!(
            feed.windows.watermark(),
            Some(48 * S),
            "partition 2 is at 50 s"
        );
        assert_eq!(
            summary(&feed.closed),
            [("b".into(), 20 * S, 1.0, 1.0)],
            "only [20 s, 30 s) has ended"
        );
    }

    #[test]
    fn an_idle_partition_stops_holding_the_watermark() {
        let start = Instant::now();
        let later = |secs| start + Duration::from_secs(secs);
        let mut windows = Windows::new(
            Duration::from_secs(10),
            Duration::ZERO,
            Duration::from_secs(5),
            3,
            start,
        );
        windows.observe(0, 0, 50 * S, Some(("a", 1.0, None)), start);
        windows.observe(1, 0, 10 * S, Some(("b", 1.0, None)), start);
        // Partition 2 has delivered nothing, but only for 4 s: it still holds.
        assert!(windows.advance(later(4)).is_empty());
        assert_eq!(windows.watermark(), None);
        windows.observe(0, 1, 60 * S, Some(("a", 1.0, None)), later(4));
        // At 6 s partitions 1 and 2 are idle: partition 0 alone sets the watermark.
        let closed = windows.advance(later(6));
        assert_eq!(windows.watermark(), Some(60 * S));
        assert_eq!(
            closed.iter().map(|w| w.start).collect::<Vec<_>>(),
            [10 * S, 50 * S]
        );
        // A record makes a partition active again; it cannot pull the watermark back.
        windows.observe(1, 1, 70 * S, Some(("b", 1.0, None)), later(7));
        windows.advance(later(7));
        assert_eq!(windows.watermark(), Some(60 * S));
        // Everyone idle: the most advanced partition decides.
        windows.advance(later(60));
        assert_eq!(windows.watermark(), Some(70 * S));
    }

    #[test]
    fn negative_event_times_fall_in_their_own_windows() {
        let mut feed = Feed::new(windows(1));
        feed.event(0, -1, "a", Some(1.0));
        feed.event(0, 100 * S, "a", Some(1.0));
        assert_eq!(feed.closed[0].start, -10 * S);
        assert_eq!(feed.closed[0].end, 0);
    }

    #[test]
    fn a_checkpoint_that_does_not_fit_is_refused() {
        let now = Instant::now();
        let state = windows(2).state();
        let restore = |state: WindowState, window: u64, partitions| {
            Windows::restore(
                state,
                Duration::from_secs(window),
                Duration::ZERO,
                Duration::from_secs(1),
                partitions,
                now,
            )
        };
        assert!(restore(state.clone(), 10, 2).is_ok());
        assert!(
            restore(state.clone(), 60, 2)
                .unwrap_err()
                .contains("10000ms windows")
        );
        assert!(
            restore(state.clone(), 10, 3)
                .unwrap_err()
                .contains("2 partitions")
        );
        let mut bad = state;
        bad.open.push(OpenWindow {
            start: 5,
            key: "k".into(),
            count: 1,
            sum: 1.0,
            min: 1.0,
            max: 1.0,
            traceparent: None,
        });
        assert!(restore(bad, 10, 2).unwrap_err().contains("malformed"));
    }

    /// Events as `(partition, seconds, key, value)`, in arrival order.
    type Events = Vec<(u32, i64, String, f64)>;

    /// Keys stay on one partition (as the broker guarantees), each partition's events are
    /// out of order by less than the allowed 2 s, and both partitions deliver before the
    /// watermark moves (a partition that has never delivered does not hold it back):
    /// nothing may be late.
    fn disordered_events() -> impl Strategy<Value = Events> {
        let raw = (0u8..4, 0i64..60, -100i32..100, 0i64..2000);
        proptest::collection::vec(raw, 1..80).prop_map(|raw| {
            let mut clocks = [0i64; 2];
            let mut events = vec![(0, 0, "k0".to_owned(), 1.0), (1, 0, "k1".to_owned(), 1.0)];
            for (key, step, value, jitter) in raw {
                let partition = u32::from(key % 2);
                let clock = &mut clocks[partition as usize];
                *clock += step * 100;
                let at = *clock - jitter.min(*clock);
                events.push((partition, at, format!("k{key}"), f64::from(value)));
            }
            events
        })
    }

    fn exact(events: &Events) -> Vec<(String, i64, f64, f64)> {
        let mut groups: BTreeMap<(i64, String), (f64, f64)> = BTreeMap::new();
        for (_, ms, key, value) in events {
            let start = ms.div_euclid(10 * S) * 10 * S;
            let entry = groups.entry((start, key.clone())).or_default();
            entry.0 += 1.0;
            entry.1 += value;
        }
        groups
            .into_iter()
            .map(|((start, key), (count, sum))| (key, start, count, sum / count))
            .collect()
    }

    fn run(feed: &mut Feed, events: &[(u32, i64, String, f64)]) {
        for (partition, ms, key, value) in events {
            let outcome = feed.event(*partition, *ms, key, Some(*value));
            assert_ne!(outcome, Outcome::Late, "{ms} on partition {partition}");
        }
    }

    fn flush(feed: &mut Feed) {
        for partition in 0..2 {
            feed.event(partition, i64::MAX / 2, "flush", None);
        }
    }

    fn sorted(mut closed: Vec<(String, i64, f64, f64)>) -> Vec<(String, i64, f64, f64)> {
        closed.sort_by(|a, b| (a.1, &a.0).cmp(&(b.1, &b.0)));
        closed
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        /// With disorder within the allowed bound, every window's count and average are
        /// exactly those of a batch group-by.
        #[test]
        fn results_equal_a_batch_group_by(events in disordered_events()) {
            let mut feed = Feed::new(windows(2));
            run(&mut feed, &events);
            flush(&mut feed);
            let found = sorted(summary(&feed.closed));
            let expected = exact(&events);
            prop_assert_eq!(found.len(), expected.len());
            for (f, e) in found.iter().zip(&expected) {
                prop_assert_eq!((&f.0, f.1, f.2), (&e.0, e.1, e.2));
                prop_assert!((f.3 - e.3).abs() < 1e-9);
            }
        }

        /// Stopping at any record, saving the state through JSON and resuming gives the
        /// same results, bit for bit, as never stopping.
        #[test]
        fn a_checkpoint_at_any_point_changes_nothing(events in disordered_events(), cut in any::<prop::sample::Index>()) {
            let mut whole = Feed::new(windows(2));
            run(&mut whole, &events);
            flush(&mut whole);

            let cut = cut.index(events.len() + 1);
            let mut first = Feed::new(windows(2));
            run(&mut first, &events[..cut]);
            let json = serde_json::to_vec(&first.windows.state()).unwrap();
            let state: WindowState = serde_json::from_slice(&json).unwrap();
            let restored = Windows::restore(state, Duration::from_secs(10), Duration::from_secs(2), Duration::from_secs(3600), 2, first.now).unwrap();
            prop_assert_eq!(restored.next_offsets(), first.offsets.clone());
            let mut second = Feed::new(restored);
            run(&mut second, &events[cut..]);
            flush(&mut second);
            let mut resumed = first.closed.clone();
            resumed.extend(second.closed.clone());
            prop_assert_eq!(resumed, whole.closed);
            prop_assert_eq!(second.windows.counters(), whole.windows.counters());
        }
    }
}
