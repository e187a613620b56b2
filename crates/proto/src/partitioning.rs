//! Which partition a keyed event goes to: part of the contract, so that producers that
//! partition for themselves (idempotent producers, co-partitioned topics) and the broker
//! always agree.
//!
//! A keyed event goes to `xxh3_64(key) % partitions`, where `xxh3_64` is XXH3's 64-bit
//! hash with seed 0 of the key's UTF-8 bytes. It must give the same answer across
//! restarts, machines and versions, because "events with one key keep their order" only
//! holds while a key stays in one partition. Changing it is a breaking change (the unit
//! tests pin known values).
//!
//! An event's *identity* is its `(source, id)`: [`event_identity`] hashes it to 128 bits
//! (XXH3-128, seed 0, of the source's length as a little-endian u32, the source and the
//! id), which the broker uses to recognise a retried event. A keyless event that asks to
//! be recognised goes to `identity % partitions` ([`partition_for_event`]), so that a
//! retry lands where its original is.

/// The partition a keyed event goes to in a topic of `partitions` partitions.
///
/// `partitions` of 0 is treated as 1. Empty keys are not hashed by the broker (they go
/// round-robin), but this function still gives them a stable answer.
pub fn partition_for_key(key: &str, partitions: u32) -> u32 {
    let partitions = u64::from(partitions.max(1));
    // The remainder is below `partitions`, which fits in a u32.
    (xxhash_rust::xxh3::xxh3_64(key.as_bytes()) % partitions) as u32
}

/// The 128-bit hash of an event's `(source, id)`, its identity for recognising retries.
/// Pinned like the partitioning hash: the broker's deduplication depends on it.
pub fn event_identity(source: &str, id: &str) -> u128 {
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    hasher.update(&(source.len() as u32).to_le_bytes());
    hasher.update(source.as_bytes());
    hasher.update(id.as_bytes());
    hasher.digest128()
}

/// The partition an event goes to when retries of it must meet it: its key's partition,
/// or for a keyless event its identity's.
pub fn partition_for_event(key: &str, identity: u128, partitions: u32) -> u32 {
    if key.is_empty() {
        (identity % u128::from(partitions.max(1))) as u32
    } else {
        partition_for_key(key, partitions)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// If this changes, brokers stop recognising retries of events stored before.
    const PINNED_IDENTITY: u128 = 0x40ed_2b43_02e1_ce76_f9e1_b31d_3051_a43c;

    #[test]
    fn identities_are_pinned_and_tell_source_from_id() {
        assert_eq!(
            event_identity("app", "e-1"),
            event_identity("app", "e-1"),
            "stable"
        );
        // The source's length is hashed: ("ab", "c") is not ("a", "bc").
        assert_ne!(event_identity("ab", "c"), event_identity("a", "bc"));
        assert_ne!(event_identity("app", "e-1"), event_identity("app", "e-2"));
        let identity = event_identity("sensor", "1");
        assert_eq!(identity, PINNED_IDENTITY, "{identity:#x}");
        assert_eq!(partition_for_event("", identity, 7), (identity % 7) as u32);
        assert_eq!(
            partition_for_event("sensor-1", identity, 16),
            partition_for_key("sensor-1", 16)
        );
    }

    #[test]
    fn the_hash_is_pinned() {
        // If this fails, the partitioning of every existing topic changed: keys would move
        // partition and lose their order. Do not "fix" the expected values.
        // XXH3-64's published value for empty input, seed 0: the hash is the standard one.
        assert_eq!(xxhash_rust::xxh3::xxh3_64(b""), 0x2d06_8005_38d3_94c2);
        assert_eq!(
            xxhash_rust::xxh3::xxh3_64(b"sensor-1"),
            0xbb05_c9a0_8b99_653a
        );
        assert_eq!(partition_for_key("sensor-1", 4), 2);
        assert_eq!(partition_for_key("sensor-1", 16), 10);
        assert_eq!(partition_for_key("sensor-1", 1024), 314);
    }

    #[test]
    fn keys_spread_over_every_partition() {
        let partitions = 8;
        let mut counts = [0u32; 8];
        for i in 0..8_000 {
            counts[partition_for_key(&format!("key-{i}"), partitions) as usize] += 1;
        }
        // 1000 expected per partition; a decent hash stays well within ±20%.
        for (partition, count) in counts.iter().enumerate() {
            assert!(
                (800..=1200).contains(count),
                "partition {partition} got {count}: {counts:?}"
            );
        }
    }

    #[test]
    fn one_partition_takes_everything() {
        assert_eq!(partition_for_key("anything", 1), 0);
        assert_eq!(partition_for_key("anything", 0), 0);
    }
}
