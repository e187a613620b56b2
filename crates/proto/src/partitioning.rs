//! Which partition a keyed event goes to: part of the contract, so that producers that
//! partition for themselves (idempotent producers, co-partitioned topics) and the broker
//! always agree.
//!
//! A keyed event goes to `xxh3_64(key) % partitions`, where `xxh3_64` is XXH3's 64-bit
//! hash with seed 0 of the key's UTF-8 bytes. It must give the same answer across
//! restarts, machines and versions, because "events with one key keep their order" only
//! holds while a key stays in one partition. Changing it is a breaking change (the unit
//! tests pin known values).

/// The partition a keyed event goes to in a topic of `partitions` partitions.
///
/// `partitions` of 0 is treated as 1. Empty keys are not hashed by the broker (they go
/// round-robin), but this function still gives them a stable answer.
pub fn partition_for_key(key: &str, partitions: u32) -> u32 {
    let partitions = u64::from(partitions.max(1));
    // The remainder is below `partitions`, which fits in a u32.
    (xxhash_rust::xxh3::xxh3_64(key.as_bytes()) % partitions) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

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
