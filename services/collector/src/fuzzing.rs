//! Entry points for the fuzz targets in `fuzz/` (the `fuzzing` feature only): decoding
//! and validating an `Ingest` request as it arrives from a client, and a UDP datagram.

use crate::validate::{Limits, validate_batch};
use prost::Message;
use runnel_proto::Millis;
use runnel_proto::v1::IngestRequest;
use std::collections::HashSet;

/// Decodes `bytes` as an `IngestRequest` and validates its batch; a batch that passes
/// has what the broker and the analyzer rely on.
pub fn ingest_request(bytes: &[u8]) {
    let Ok(mut request) = IngestRequest::decode(bytes) else {
        return;
    };
    let limits = Limits {
        max_batch_events: 10_000,
        max_payload_bytes: 64 * 1024,
    };
    if validate_batch(&mut request.events, limits, Millis(1_714_564_800_000)).is_err() {
        return;
    }
    let mut ids = HashSet::new();
    for event in &request.events {
        assert!(!event.id.is_empty());
        assert!(ids.insert(event.id.as_str()), "ids are unique");
        assert!(event.payload.len() <= limits.max_payload_bytes);
        let time = event
            .event_time
            .expect("validation fills in the event time");
        // Years 1 to 9999, what a protobuf Timestamp can hold.
        assert!(
            (-62_135_596_800..=253_402_300_799).contains(&time.seconds),
            "{time:?}"
        );
    }
}

/// Parses `bytes` as a UDP datagram. A datagram is one event or nothing: when it parses,
/// the event's protobuf encoding parses back to the same event (JSON and protobuf
/// datagrams mean the same), and validation either takes it whole or refuses it.
pub fn datagram(bytes: &[u8]) {
    let Ok(event) = crate::oneway::parse_datagram(bytes) else {
        return;
    };
    let encoded = event.encode_to_vec();
    // The one ambiguity (see `parse_datagram`): an encoding that is also a JSON event
    // object is read as JSON.
    let also_json = serde_json::from_slice::<serde_json::Value>(&encoded).is_ok();
    if !encoded.is_empty() && !also_json {
        assert_eq!(
            crate::oneway::parse_datagram(&encoded).as_ref(),
            Ok(&event),
            "the protobuf form of a datagram's event means the same"
        );
    }
    let limits = Limits {
        max_batch_events: 1,
        max_payload_bytes: 64 * 1024,
    };
    let mut events = [event];
    if validate_batch(&mut events, limits, Millis(1_714_564_800_000)).is_ok() {
        assert!(
            !events[0].id.is_empty(),
            "validation gives every event an id"
        );
    }
}
