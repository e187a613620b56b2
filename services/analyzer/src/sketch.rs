//! The two stream summaries written here rather than taken from a crate, each with its
//! error bound proved by a property test against exact answers:
//!
//! - [`SpaceSaving`] (Metwally, Agrawal & El Abbadi, 2005): the heavy hitters of a stream in
//!   `capacity` counters. Every item whose true count exceeds `n / capacity` (n = items
//!   seen) is among the counters, and every counter over-estimates its item's count by at
//!   most its recorded `error`, itself at most `n / capacity`. The crates that offer top-k
//!   either lack serialisable state or depend on nightly SIMD; this is sixty lines.
//! - [`BottomK`]: a uniform random sample of k events without replacement — the k with the
//!   smallest hash of their position in the input. Unlike reservoir sampling with a random
//!   generator it needs no randomness in the state, does not depend on the order events
//!   arrive in (so a run after a crash samples exactly what a run without one does), and
//!   two samples merge by keeping the k smallest.

use serde::{Deserialize, Serialize};

/// One Space-Saving counter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Counter {
    pub(crate) item: String,
    /// An upper bound of the item's count.
    pub(crate) count: u64,
    /// How much of `count` may not be the item's (inherited from the counter it replaced).
    pub(crate) error: u64,
}

/// The Space-Saving heavy-hitters summary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct SpaceSaving {
    capacity: usize,
    counters: Vec<Counter>,
    /// Items seen.
    total: u64,
}

impl SpaceSaving {
    /// A summary with room for `capacity` counters (at least 1).
    pub(crate) fn new(capacity: usize) -> SpaceSaving {
        SpaceSaving {
            capacity: capacity.max(1),
            counters: Vec::new(),
            total: 0,
        }
    }

    /// Counts one occurrence of `item`.
    pub(crate) fn add(&mut self, item: &str) {
        self.total += 1;
        if let Some(counter) = self.counters.iter_mut().find(|c| c.item == item) {
            counter.count += 1;
            return;
        }
        if self.counters.len() < self.capacity {
            self.counters.push(Counter {
                item: item.to_owned(),
                count: 1,
                error: 0,
            });
            return;
        }
        // Replace the smallest counter (ties: the greatest item, so that the choice does
        // not depend on where counters happen to sit).
        if let Some(min) = self
            .counters
            .iter_mut()
            .min_by(|a, b| a.count.cmp(&b.count).then_with(|| b.item.cmp(&a.item)))
        {
            min.error = min.count;
            min.count += 1;
            min.item.clear();
            min.item.push_str(item);
        }
    }

    /// Folds `other` in (Agarwal et al., "Mergeable summaries", 2012): counts of common
    /// items add up; an item missing from one side may have had up to that side's smallest
    /// count there, which goes into its error; then the largest `capacity` stay.
    pub(crate) fn merge(&mut self, other: &SpaceSaving) {
        let floor = |s: &SpaceSaving| {
            if s.counters.len() < s.capacity {
                0
            } else {
                s.counters.iter().map(|c| c.count).min().unwrap_or(0)
            }
        };
        let (mine, theirs) = (floor(self), floor(other));
        let mut merged: Vec<Counter> = Vec::new();
        for c in &self.counters {
            match other.counters.iter().find(|o| o.item == c.item) {
                Some(o) => merged.push(Counter {
                    item: c.item.clone(),
                    count: c.count + o.count,
                    error: c.error + o.error,
                }),
                None => merged.push(Counter {
                    item: c.item.clone(),
                    count: c.count + theirs,
                    error: c.error + theirs,
                }),
            }
        }
        for o in &other.counters {
            if !self.counters.iter().any(|c| c.item == o.item) {
                merged.push(Counter {
                    item: o.item.clone(),
                    count: o.count + mine,
                    error: o.error + mine,
                });
            }
        }
        merged.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.item.cmp(&b.item)));
        merged.truncate(self.capacity);
        self.counters = merged;
        self.total += other.total;
    }

    /// The `k` largest counters, largest first (ties by item).
    pub(crate) fn top(&self, k: usize) -> Vec<Counter> {
        let mut top = self.counters.clone();
        top.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.item.cmp(&b.item)));
        top.truncate(k);
        top
    }
}

/// A bottom-k sample: the `k` entries with the smallest ranks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct BottomK {
    k: usize,
    /// `(rank, item)`, ascending.
    entries: Vec<(u64, String)>,
}

impl BottomK {
    /// An empty sample of at most `k` entries.
    pub(crate) fn new(k: usize) -> BottomK {
        BottomK {
            k: k.max(1),
            entries: Vec::new(),
        }
    }

    /// Offers `item` with `rank` (a hash of the event's identity).
    pub(crate) fn offer(&mut self, rank: u64, item: &str) {
        if self.entries.len() == self.k && self.entries.last().is_some_and(|(r, _)| rank >= *r) {
            return;
        }
        let at = self.entries.partition_point(|(r, _)| *r < rank);
        if self.entries.get(at).is_some_and(|(r, _)| *r == rank) {
            return; // the same event again
        }
        self.entries.insert(at, (rank, item.to_owned()));
        self.entries.truncate(self.k);
    }

    /// Folds `other` in.
    pub(crate) fn merge(&mut self, other: &BottomK) {
        for (rank, item) in &other.entries {
            self.offer(*rank, item);
        }
    }

    /// The sampled items, by rank.
    pub(crate) fn items(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|(_, item)| item.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    /// Skewed streams over a small alphabet: a few items dominate.
    fn skewed() -> impl Strategy<Value = Vec<String>> {
        proptest::collection::vec((0u32..40).prop_map(|i| format!("i{}", i * i / 100)), 0..600)
    }

    fn exact(stream: &[String]) -> HashMap<&str, u64> {
        let mut counts = HashMap::new();
        for item in stream {
            *counts.entry(item.as_str()).or_default() += 1;
        }
        counts
    }

    fn check_bounds(
        summary: &SpaceSaving,
        stream: &[String],
        capacity: usize,
    ) -> Result<(), TestCaseError> {
        let counts = exact(stream);
        let n = stream.len() as u64;
        let bound = n / capacity as u64;
        for counter in &summary.counters {
            let truth = counts.get(counter.item.as_str()).copied().unwrap_or(0);
            prop_assert!(
                counter.count >= truth,
                "{} over-estimates, never under",
                counter.item
            );
            prop_assert!(counter.count - truth <= counter.error);
            prop_assert!(
                counter.error <= bound,
                "error {} > n/m {}",
                counter.error,
                bound
            );
        }
        for (item, count) in counts {
            if count > bound {
                prop_assert!(
                    summary.counters.iter().any(|c| c.item == item),
                    "heavy {item} ({count}) missing"
                );
            }
        }
        Ok(())
    }

    proptest! {
        #[test]
        fn space_saving_keeps_its_bounds(stream in skewed(), capacity in 1usize..12) {
            let mut summary = SpaceSaving::new(capacity);
            for item in &stream {
                summary.add(item);
            }
            prop_assert_eq!(summary.total, stream.len() as u64);
            check_bounds(&summary, &stream, capacity)?;
        }

        #[test]
        fn merged_summaries_keep_the_bounds_of_the_whole(a in skewed(), b in skewed(), capacity in 1usize..12) {
            let (mut left, mut right) = (SpaceSaving::new(capacity), SpaceSaving::new(capacity));
            a.iter().for_each(|i| left.add(i));
            b.iter().for_each(|i| right.add(i));
            left.merge(&right);
            let whole: Vec<String> = a.iter().chain(&b).cloned().collect();
            let counts = exact(&whole);
            for counter in &left.counters {
                let truth = counts.get(counter.item.as_str()).copied().unwrap_or(0);
                prop_assert!(counter.count >= truth && counter.count - truth <= counter.error);
            }
            let bound = whole.len() as u64 / capacity as u64;
            for (item, count) in counts {
                if count > 2 * bound {
                    prop_assert!(left.counters.iter().any(|c| c.item == item), "heavy {item} lost in the merge");
                }
            }
        }

        /// The sample is the k smallest ranks, whatever the order the events came in.
        #[test]
        fn bottom_k_is_the_k_smallest_in_any_order(ranks in proptest::collection::hash_set(any::<u64>(), 0..100), k in 1usize..10, seed in any::<u64>()) {
            let mut ranks: Vec<u64> = ranks.into_iter().collect();
            let mut sample = BottomK::new(k);
            for r in &ranks {
                sample.offer(*r, &r.to_string());
            }
            // Any other order, and split in two then merged.
            ranks.sort_by_key(|r| r.wrapping_mul(seed | 1));
            let (mut a, mut b) = (BottomK::new(k), BottomK::new(k));
            for (i, r) in ranks.iter().enumerate() {
                if i % 2 == 0 { a.offer(*r, &r.to_string()) } else { b.offer(*r, &r.to_string()) }
            }
            a.merge(&b);
            prop_assert_eq!(&a, &sample);
            ranks.sort_unstable();
            let expected: Vec<String> = ranks.iter().take(k).map(u64::to_string).collect();
            prop_assert_eq!(sample.items().map(str::to_owned).collect::<Vec<_>>(), expected);
        }
    }

    #[test]
    fn a_hash_ranked_sample_is_uniform() {
        // 10 000 events, samples of 100, 200 trials over shifted identities: each tenth of
        // the stream should hold about a tenth of the sampled events.
        let mut per_decile = [0u64; 10];
        for trial in 0..200u64 {
            let mut sample = BottomK::new(100);
            for i in 0..10_000u64 {
                let rank = xxhash_rust::xxh3::xxh3_64_with_seed(&i.to_le_bytes(), trial);
                sample.offer(rank, &i.to_string());
            }
            for item in sample.items() {
                per_decile[(item.parse::<u64>().unwrap() / 1000) as usize] += 1;
            }
        }
        // 20 000 draws, 2 000 expected per decile; ±10 % is over 7 standard deviations.
        for count in per_decile {
            assert!((1800..=2200).contains(&count), "{per_decile:?}");
        }
    }
}
