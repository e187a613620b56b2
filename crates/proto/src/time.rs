//! Event time as Unix milliseconds, and its conversions to and from protobuf `Timestamp`.
//!
//! Windows, watermarks and storage keys all work on whole milliseconds: finer precision
//! buys nothing for soft real-time analysis and would make window arithmetic lossy.

use prost_types::Timestamp;
use std::time::{SystemTime, UNIX_EPOCH};

/// A point in time as milliseconds since the Unix epoch (negative before it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Millis(pub i64);

impl From<Timestamp> for Millis {
    fn from(ts: Timestamp) -> Self {
        // Normalise nanos in [0, 1e9) so that pre-epoch times round towards -infinity.
        let nanos = i64::from(ts.nanos.clamp(0, 999_999_999));
        Millis(
            ts.seconds
                .saturating_mul(1000)
                .saturating_add(nanos / 1_000_000),
        )
    }
}

impl From<Millis> for Timestamp {
    fn from(ms: Millis) -> Self {
        let seconds = ms.0.div_euclid(1000);
        let nanos = (ms.0.rem_euclid(1000) * 1_000_000) as i32;
        Timestamp { seconds, nanos }
    }
}

/// The current wall-clock time.
pub fn now_millis() -> Millis {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0);
    Millis(ms)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn millis_round_trip_through_timestamp(ms in -1_000_000_000_000_000i64..1_000_000_000_000_000) {
            let ts: Timestamp = Millis(ms).into();
            prop_assert!((0..1_000_000_000).contains(&ts.nanos));
            prop_assert_eq!(Millis::from(ts), Millis(ms));
        }
    }

    #[test]
    fn pre_epoch_millis_keep_their_sign() {
        let ts: Timestamp = Millis(-1).into();
        assert_eq!((ts.seconds, ts.nanos), (-1, 999_000_000));
    }
}
