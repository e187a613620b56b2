//! Runnel's public gRPC contract, package `runnel.v1`: the generated tonic/prost code for
//! everything under `proto/`, the descriptor set that servers publish through reflection,
//! the rules every service applies to what the contract carries (the names of topics,
//! groups and queries; the JSON form of events and results), and the small conversions
//! every service needs (event time in milliseconds, result filters).
//!
//! Generated code is not committed: `build.rs` regenerates it from the `.proto` files with a
//! vendored `protoc`, so the schemas are the single source of truth.

pub use prost;
pub use prost_types;
pub use tonic;

/// Generated code for `runnel.v1`.
#[allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("runnel.v1");
}

pub mod codec;
pub mod consistency;
pub mod filter;
pub mod json;
pub mod names;
mod partitioning;
pub mod records;
pub mod stored;
mod time;

pub use partitioning::{event_identity, partition_for_event, partition_for_key};
pub use time::{Millis, now_millis};

/// The encoded `FileDescriptorSet` of `runnel.v1`, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("runnel_v1_descriptor");

/// Fully qualified gRPC service names, as health checks and reflection report them.
pub mod service_name {
    /// `runnel.v1.Collector`.
    pub const COLLECTOR: &str = "runnel.v1.Collector";
    /// `runnel.v1.Broker`.
    pub const BROKER: &str = "runnel.v1.Broker";
    /// `runnel.v1.Analyzer`.
    pub const ANALYZER: &str = "runnel.v1.Analyzer";
    /// `runnel.v1.Store`.
    pub const STORE: &str = "runnel.v1.Store";
    /// `runnel.v1.Gateway`.
    pub const GATEWAY: &str = "runnel.v1.Gateway";
}

#[cfg(test)]
mod tests {
    use super::v1::{Event, QueryResult};
    use proptest::prelude::*;
    use prost::Message;
    use std::collections::HashMap;

    fn event() -> impl Strategy<Value = Event> {
        (
            ".{0,20}",
            ".{0,20}",
            ".{0,10}",
            ".{0,20}",
            any::<i64>(),
            proptest::collection::hash_map(".{0,8}", ".{0,8}", 0..4),
            proptest::collection::vec(any::<u8>(), 0..256),
        )
            .prop_map(|(id, source, kind, key, ms, attributes, payload)| Event {
                id,
                source,
                r#type: kind,
                key,
                event_time: Some(super::Millis(ms / 4).into()),
                attributes,
                payload: payload.into(),
                headers: HashMap::new(),
            })
    }

    proptest! {
        #[test]
        fn event_round_trips_through_protobuf(e in event()) {
            let bytes = e.encode_to_vec();
            prop_assert_eq!(Event::decode(bytes.as_slice()).unwrap(), e);
        }

        #[test]
        fn decoding_garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = Event::decode(bytes.as_slice());
            let _ = QueryResult::decode(bytes.as_slice());
        }
    }

    #[test]
    fn descriptor_set_names_every_service() {
        use prost_types::FileDescriptorSet;
        let set = FileDescriptorSet::decode(super::FILE_DESCRIPTOR_SET).unwrap();
        let services: Vec<String> = set
            .file
            .iter()
            .flat_map(|f| f.service.iter().map(|s| format!("runnel.v1.{}", s.name())))
            .collect();
        for name in [
            super::service_name::COLLECTOR,
            super::service_name::BROKER,
            super::service_name::ANALYZER,
            super::service_name::STORE,
            super::service_name::GATEWAY,
        ] {
            assert!(
                services.iter().any(|s| s == name),
                "{name} missing from {services:?}"
            );
        }
    }
}
