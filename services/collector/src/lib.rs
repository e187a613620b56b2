//! The collection tier: the edge where clients hand events to Runnel.
//!
//! `Ingest` (request/response) validates a batch, stamps each event with the trace context
//! of the call that ingested it, forwards the batch to the broker, and answers with where
//! every event was durably written. The collector keeps nothing itself yet: an event is
//! acknowledged only once the broker has it, so an acknowledged event is never lost when
//! the collector dies. (Fault-tolerant message logging inside the collector comes next.)

pub mod config;
mod error;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
mod ingest;
mod validate;

pub use config::CollectorConfig;
pub use error::CollectorError;

use runnel_proto::v1::collector_server::CollectorServer;
use runnel_server::{Listeners, Shutdown};

/// Runs the collector on `listeners` until `shutdown` fires, then drains.
pub async fn run(
    config: CollectorConfig,
    listeners: Listeners,
    shutdown: Shutdown,
) -> Result<(), CollectorError> {
    let service = ingest::IngestService::new(&config)?;
    let max_message = config.server.max_message_bytes;
    let grpc = CollectorServer::new(service)
        .max_decoding_message_size(max_message)
        .max_encoding_message_size(max_message);
    runnel_server::serve(
        runnel_proto::service_name::COLLECTOR,
        tonic::service::Routes::new(grpc),
        listeners.grpc,
        listeners.admin,
        &config.server,
        shutdown,
    )
    .await?;
    Ok(())
}
