//! Which partition an event goes to: a keyed event to the partition its key hashes to
//! ([`runnel_proto::partition_for_key`], pinned by the contract), an event without a key
//! round-robin, since it carries no ordering promise.

use runnel_proto::partition_for_key;
use std::sync::atomic::{AtomicU64, Ordering};

/// Chooses partitions for one topic's events.
#[derive(Debug, Default)]
pub(crate) struct Partitioner {
    /// The next round-robin turn for events without a key.
    next: AtomicU64,
}

impl Partitioner {
    /// The partition for an event with `key` in a topic of `partitions` partitions.
    pub(crate) fn choose(&self, key: &str, partitions: u32) -> u32 {
        if key.is_empty() {
            let turn = self.next.fetch_add(1, Ordering::Relaxed);
            (turn % u64::from(partitions.max(1))) as u32
        } else {
            partition_for_key(key, partitions)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_key_always_gets_one_partition() {
        let partitioner = Partitioner::default();
        for key in ["a", "sensor-1", "user/42", "ünïcode"] {
            let first = partitioner.choose(key, 16);
            for _ in 0..10 {
                assert_eq!(partitioner.choose(key, 16), first);
            }
            assert_eq!(first, partition_for_key(key, 16));
        }
    }

    #[test]
    fn keyless_events_go_round_robin() {
        let partitioner = Partitioner::default();
        let chosen: Vec<u32> = (0..8).map(|_| partitioner.choose("", 4)).collect();
        assert_eq!(chosen, [0, 1, 2, 3, 0, 1, 2, 3]);
    }

    #[test]
    fn one_partition_takes_everything() {
        assert_eq!(Partitioner::default().choose("", 1), 0);
        assert_eq!(Partitioner::default().choose("key", 1), 0);
    }
}
