//! Reads that are never older than what a client has already seen.
//!
//! A client that has seen a result with sequence `s` (from a `Get`, a `Watch`, an SSE
//! `id:`) may ask a `Get`, `Range` or `TopK` for an answer that reflects every write up to
//! `s`: the **minimum sequence**, carried beside the request so the request messages stay
//! as they are — gRPC metadata `runnel-min-sequence: <s>`, HTTP `min_sequence=<s>`. A store
//! replica waits until it has applied `s`; a gateway answering from its cache waits until
//! its live stream has reached `s`, or asks the store.

use tonic::metadata::{MetadataMap, MetadataValue};

/// The gRPC metadata key of the minimum sequence.
pub const MIN_SEQUENCE_METADATA: &str = "runnel-min-sequence";

/// A minimum sequence as text (decimal), or why it is not one.
pub fn parse_min_sequence(text: &str) -> Result<u64, String> {
    text.parse::<u64>().map_err(|_| {
        format!(
            "min_sequence must be a sequence (a whole number of at most 20 digits), got {text:?}"
        )
    })
}

/// The minimum sequence a request's metadata names, if any, or why it is malformed.
pub fn min_sequence(metadata: &MetadataMap) -> Result<Option<u64>, String> {
    let Some(value) = metadata.get(MIN_SEQUENCE_METADATA) else {
        return Ok(None);
    };
    let text = value
        .to_str()
        .map_err(|_| format!("{MIN_SEQUENCE_METADATA} must be ASCII digits"))?;
    parse_min_sequence(text).map(Some)
}

/// Names `sequence` as a request's minimum sequence.
pub fn set_min_sequence(metadata: &mut MetadataMap, sequence: u64) {
    metadata.insert(MIN_SEQUENCE_METADATA, MetadataValue::from(sequence));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_minimum_sequence_round_trips_through_metadata_and_garbage_is_named() {
        let mut metadata = MetadataMap::new();
        assert_eq!(min_sequence(&metadata), Ok(None));
        set_min_sequence(&mut metadata, u64::MAX);
        assert_eq!(min_sequence(&metadata), Ok(Some(u64::MAX)));
        metadata.insert(MIN_SEQUENCE_METADATA, MetadataValue::from_static("-1"));
        let error = min_sequence(&metadata).unwrap_err();
        assert!(error.starts_with("min_sequence must be"), "{error}");
        assert!(parse_min_sequence("18446744073709551616").is_err());
    }
}
