//! Recognising retried events: the identities (see [`runnel_proto::event_identity`]) of
//! the events a partition stored recently, each with the offset it was stored at.
//!
//! A producer that asks for deduplication has every event checked here: one whose
//! identity is remembered is a retry, answered with the stored offset and not written
//! again. What is remembered is bounded twice — by age (the window, by append time) and by
//! count — so memory stays bounded whatever the rate: at most twice `max_events` entries
//! of 24 bytes (50 bytes with the maps' spare room) per partition. An event is remembered at least while it is
//! within both bounds; a retry that comes later may be stored again, as the docs say.
//!
//! Nothing here is written to disk: on recovery the partition reads the window back from
//! its log (every stored batch that was deduplicated says so in its header), so what is
//! recognised survives restarts and crashes exactly as the log does.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::time::Duration;

/// An identity is already a uniform 128-bit hash: the map keys on its low half as it is.
#[derive(Default)]
struct IdentityHasher(u64);

impl Hasher for IdentityHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Keys are hashed through `write_u64`; fold anything else in.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, half: u64) {
        // The low half comes first; the high half is mixed in without spoiling it.
        self.0 = self.0.rotate_left(32) ^ half;
    }
}

/// How long and how many identities a partition remembers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Window {
    pub(crate) age: Duration,
    pub(crate) max_events: usize,
}

/// Identity (as two halves: 8-byte alignment keeps an entry at 24 bytes) → offset.
type Generation = HashMap<(u64, u64), u64, BuildHasherDefault<IdentityHasher>>;

fn halves(identity: u128) -> (u64, u64) {
    (identity as u64, (identity >> 64) as u64)
}

/// The identities of a partition's recent deduplicated events, in two generations: new
/// ones go into the current one, which becomes the previous one — and the previous one is
/// forgotten — once it holds `max_events` or has lasted `age`. An identity is therefore
/// remembered while it is among the last `max_events` and within `age` (and for at most
/// twice that), each lookup costs two probes, and forgetting costs nothing per event. The
/// two maps keep their memory across generations: once grown, nothing is allocated.
#[derive(Debug)]
pub(crate) struct RecentEvents {
    window: Window,
    current: Generation,
    /// When the current generation took its first identity (Unix ms) …
    current_since: i64,
    /// … and its last.
    current_until: i64,
    previous: Generation,
    /// When the previous generation took its last identity.
    previous_until: i64,
}

impl RecentEvents {
    pub(crate) fn new(window: Window) -> RecentEvents {
        RecentEvents {
            window,
            current: Generation::default(),
            current_since: i64::MIN,
            current_until: i64::MIN,
            previous: Generation::default(),
            previous_until: i64::MIN,
        }
    }

    fn age_ms(&self) -> i64 {
        i64::try_from(self.window.age.as_millis()).unwrap_or(i64::MAX)
    }

    /// The offset the event with `identity` was stored at, if it is remembered.
    pub(crate) fn get(&self, identity: u128) -> Option<u64> {
        let key = halves(identity);
        self.current
            .get(&key)
            .or_else(|| self.previous.get(&key))
            .copied()
    }

    /// Sorts a batch's records out: for each, the offset of its stored original — one
    /// remembered, or an earlier record of this batch with the same identity — or, for a
    /// new one, the offset it gets when the new ones are stored from `end` on; and the
    /// indexes of the new ones.
    pub(crate) fn classify(&self, identities: &[u128], end: u64) -> (Vec<u64>, Vec<usize>) {
        let mut offsets = Vec::with_capacity(identities.len());
        let mut new = Vec::with_capacity(identities.len());
        let mut in_batch = Generation::with_capacity_and_hasher(identities.len(), <_>::default());
        for (i, &identity) in identities.iter().enumerate() {
            let key = halves(identity);
            if let Some(stored) = self.get(identity).or_else(|| in_batch.get(&key).copied()) {
                offsets.push(stored);
                continue;
            }
            let offset = end + new.len() as u64;
            in_batch.insert(key, offset);
            new.push(i);
            offsets.push(offset);
        }
        (offsets, new)
    }

    /// Remembers an event stored at `offset` at append time `time` (never earlier than the
    /// last one's).
    pub(crate) fn insert(&mut self, identity: u128, offset: u64, time: i64) {
        if self.window.max_events == 0 {
            return;
        }
        self.expire(time);
        if self.current.len() >= self.window.max_events {
            self.rotate();
        }
        if self.current.is_empty() {
            self.current_since = time;
        }
        self.current_until = time;
        self.current.insert(halves(identity), offset);
    }

    /// Forgets the generations that lie wholly before `now - age`.
    pub(crate) fn expire(&mut self, now: i64) {
        let oldest_kept = now.saturating_sub(self.age_ms());
        if !self.current.is_empty() && self.current_since < oldest_kept {
            self.rotate();
        }
        if !self.previous.is_empty() && self.previous_until < oldest_kept {
            self.previous.clear();
        }
    }

    /// The current generation becomes the previous one.
    fn rotate(&mut self) {
        std::mem::swap(&mut self.current, &mut self.previous);
        self.current.clear();
        self.previous_until = self.current_until;
    }

    /// Identities remembered.
    pub(crate) fn len(&self) -> usize {
        self.current.len() + self.previous.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn window(age_ms: u64, max_events: usize) -> Window {
        Window {
            age: Duration::from_millis(age_ms),
            max_events,
        }
    }

    #[test]
    fn an_identity_is_remembered_for_its_window_and_forgotten_after_two() {
        let mut recent = RecentEvents::new(window(1_000, 10));
        recent.insert(7, 100, 0);
        assert_eq!(recent.get(7), Some(100));
        recent.expire(1_000);
        assert_eq!(recent.get(7), Some(100), "the window's edge is inside it");
        recent.expire(2_001);
        assert_eq!(recent.get(7), None);
        assert_eq!(recent.len(), 0);
    }

    #[test]
    fn the_last_max_events_are_remembered_and_memory_stays_within_twice_that() {
        let mut recent = RecentEvents::new(window(60_000, 3));
        for i in 0..100u64 {
            recent.insert(u128::from(i), i, 0);
            assert!(recent.len() <= 6);
            for back in i.saturating_sub(2)..=i {
                assert_eq!(recent.get(u128::from(back)), Some(back));
            }
        }
        assert_eq!(recent.get(0), None);
    }

    #[test]
    fn an_identity_stored_again_answers_with_its_newer_offset() {
        let mut recent = RecentEvents::new(window(1_000, 10));
        recent.insert(7, 1, 0);
        recent.expire(2_500);
        assert_eq!(recent.get(7), None);
        recent.insert(7, 9, 2_500);
        assert_eq!(recent.get(7), Some(9));
    }

    #[test]
    fn a_window_of_no_events_remembers_nothing() {
        let mut recent = RecentEvents::new(window(1_000, 0));
        recent.insert(7, 1, 0);
        assert_eq!(recent.get(7), None);
    }

    proptest! {
        /// Against a model that keeps every insert: an identity among the last `max`
        /// inserts and inserted within the window is found, with its newest offset; one
        /// not inserted within twice the window and twice `max` is not.
        #[test]
        fn what_is_remembered_is_the_newest_within_both_bounds(
            inserts in prop::collection::vec((0u128..40, 0i64..50), 1..300),
            age in 0u64..200,
            max in 1usize..50,
        ) {
            let mut recent = RecentEvents::new(window(age, max));
            let mut all: Vec<(u128, u64, i64)> = Vec::new();
            let mut now = 0i64;
            for (offset, (identity, step)) in inserts.into_iter().enumerate() {
                now += step;
                // As the partition does: expire, look up, and insert only what is new.
                recent.expire(now);
                if recent.get(identity).is_none() {
                    recent.insert(identity, offset as u64, now);
                    all.push((identity, offset as u64, now));
                }
                prop_assert!(recent.len() <= 2 * max);
            }
            let age = age as i64;
            recent.expire(now);
            for identity in 0u128..40 {
                let newest = all.iter().rposition(|&(id, _, _)| id == identity);
                let Some(at) = newest else {
                    prop_assert_eq!(recent.get(identity), None);
                    continue;
                };
                let (_, offset, time) = all[at];
                let later = all.len() - at - 1;
                if later < max && time >= now - age {
                    prop_assert_eq!(recent.get(identity), Some(offset), "identity {}", identity);
                }
                if let Some(found) = recent.get(identity) {
                    prop_assert_eq!(found, offset, "never an older copy");
                    prop_assert!(later < 2 * max && time >= now - 2 * age - 1);
                }
            }
        }
    }
}
