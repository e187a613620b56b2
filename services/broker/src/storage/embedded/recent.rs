//! Recognising retried events: the identities (see [`runnel_proto::event_identity`]) of
//! the events a partition stored recently, each with the offset it was stored at.
//!
//! A producer that asks for deduplication has every event checked here: one whose
//! identity is remembered is a retry, answered with the stored offset and not written
//! again. What is remembered is bounded twice — by age (the window, by append time) and by
//! count, the oldest going first — so memory stays bounded whatever the rate: at most
//! `max_events` entries of about 64 bytes each per partition. A retry that comes after its
//! original left the window is stored again; the docs say so.
//!
//! Nothing here is written to disk: on recovery the partition reads the window back from
//! its log (every stored batch that was deduplicated says so in its header), so what is
//! recognised survives restarts and crashes exactly as the log does.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::time::Duration;

/// An identity is already a uniform 128-bit hash: the map keys on its low bits as they are.
#[derive(Default)]
struct IdentityHasher(u64);

impl Hasher for IdentityHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only u128 keys are hashed (`write_u128`); fold anything else in.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u128(&mut self, identity: u128) {
        self.0 = identity as u64;
    }
}

/// How long and how many identities a partition remembers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Window {
    pub(crate) age: Duration,
    pub(crate) max_events: usize,
}

/// The identities of a partition's recent deduplicated events.
#[derive(Debug)]
pub(crate) struct RecentEvents {
    window: Window,
    offsets: HashMap<u128, u64, BuildHasherDefault<IdentityHasher>>,
    /// Oldest first: identity, offset, append time (Unix ms).
    order: VecDeque<(u128, u64, i64)>,
}

impl RecentEvents {
    pub(crate) fn new(window: Window) -> RecentEvents {
        RecentEvents {
            window,
            offsets: HashMap::default(),
            order: VecDeque::new(),
        }
    }

    /// The offset the event with `identity` was stored at, if it is remembered.
    pub(crate) fn get(&self, identity: u128) -> Option<u64> {
        self.offsets.get(&identity).copied()
    }

    /// Remembers an event stored at `offset` at append time `time`, then forgets what the
    /// window no longer holds as of `time`.
    pub(crate) fn insert(&mut self, identity: u128, offset: u64, time: i64) {
        if self.window.max_events == 0 {
            return;
        }
        self.offsets.insert(identity, offset);
        self.order.push_back((identity, offset, time));
        self.expire(time);
    }

    /// Forgets identities stored before `now - age`, and the oldest beyond `max_events`.
    pub(crate) fn expire(&mut self, now: i64) {
        let age = i64::try_from(self.window.age.as_millis()).unwrap_or(i64::MAX);
        let oldest_kept = now.saturating_sub(age);
        while let Some(&(identity, offset, time)) = self.order.front() {
            if time >= oldest_kept && self.order.len() <= self.window.max_events {
                break;
            }
            self.order.pop_front();
            // A later copy of the same identity (stored again after leaving the window)
            // keeps its own entry.
            if self.offsets.get(&identity) == Some(&offset) {
                self.offsets.remove(&identity);
            }
        }
        if self.offsets.capacity() > 4 * self.offsets.len().max(1024) {
            self.offsets.shrink_to_fit();
            self.order.shrink_to_fit();
        }
    }

    /// Identities remembered.
    pub(crate) fn len(&self) -> usize {
        self.offsets.len()
    }

    /// The offset of the oldest identity remembered.
    #[cfg(test)]
    pub(crate) fn oldest(&self) -> Option<u64> {
        self.order.front().map(|&(_, offset, _)| offset)
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
    fn an_identity_is_remembered_for_its_window_and_no_longer() {
        let mut recent = RecentEvents::new(window(1_000, 10));
        recent.insert(7, 100, 0);
        assert_eq!(recent.get(7), Some(100));
        recent.expire(1_000);
        assert_eq!(recent.get(7), Some(100), "the window's edge is inside it");
        recent.expire(1_001);
        assert_eq!(recent.get(7), None);
        assert_eq!(recent.len(), 0);
    }

    #[test]
    fn the_oldest_go_first_beyond_the_count() {
        let mut recent = RecentEvents::new(window(60_000, 3));
        for i in 0..5u64 {
            recent.insert(u128::from(i), i, 0);
        }
        assert_eq!(recent.len(), 3);
        assert_eq!(recent.get(0), None);
        assert_eq!(recent.get(1), None);
        assert_eq!(recent.get(4), Some(4));
        assert_eq!(recent.oldest(), Some(2));
    }

    #[test]
    fn an_identity_stored_again_keeps_its_newer_offset_when_the_older_expires() {
        let mut recent = RecentEvents::new(window(1_000, 10));
        recent.insert(7, 1, 0);
        recent.insert(7, 9, 900);
        recent.expire(1_500);
        assert_eq!(recent.get(7), Some(9));
    }

    #[test]
    fn a_window_of_no_events_remembers_nothing() {
        let mut recent = RecentEvents::new(window(1_000, 0));
        recent.insert(7, 1, 0);
        assert_eq!(recent.get(7), None);
    }

    proptest! {
        /// Against a model that keeps every insert: an identity is found exactly when one of
        /// the last `max` inserts, made within the window, was it — with the newest offset.
        #[test]
        fn what_is_remembered_is_the_newest_inside_both_bounds(
            inserts in prop::collection::vec((0u128..20, 0i64..50), 1..200),
            age in 0u64..100,
            max in 1usize..50,
        ) {
            let mut recent = RecentEvents::new(window(age, max));
            let mut all: Vec<(u128, u64, i64)> = Vec::new();
            let mut now = 0i64;
            for (offset, (identity, step)) in inserts.into_iter().enumerate() {
                now += step;
                recent.insert(identity, offset as u64, now);
                all.push((identity, offset as u64, now));
            }
            let kept = &all[all.len().saturating_sub(max)..];
            for identity in 0u128..20 {
                let expected = kept
                    .iter()
                    .rev()
                    .find(|&&(id, _, time)| id == identity && time >= now - age as i64)
                    .map(|&(_, offset, _)| offset);
                // An older copy inside the bounds is shadowed by a newer one, never the
                // other way round.
                prop_assert_eq!(recent.get(identity), expected, "identity {}", identity);
            }
        }
    }
}
