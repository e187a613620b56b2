//! Entry points for the fuzz targets in `fuzz/` (the `fuzzing` feature only): reading a
//! query's number out of an event's payload, which is whatever its producer sent.

use crate::extract::ValuePath;
use runnel_proto::v1::Event;

/// Parses `path` as a value path and extracts it from an event whose payload (and one
/// attribute) is `payload`: never a panic, and never a number that is not finite.
pub fn extract(path: &str, payload: &[u8]) {
    let Ok(path) = ValuePath::parse(path) else {
        return;
    };
    let event = Event {
        payload: payload.to_vec().into(),
        attributes: [(
            "a".to_owned(),
            String::from_utf8_lossy(payload).into_owned(),
        )]
        .into(),
        ..Event::default()
    };
    if let Some(value) = path.extract(&event) {
        assert!(value.is_finite());
    }
}
