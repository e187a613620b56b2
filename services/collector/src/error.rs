//! The collector's errors and their one mapping to gRPC status codes.

use tonic::{Code, Status};

/// What can go wrong in the collector.
#[derive(Debug, thiserror::Error)]
pub enum CollectorError {
    /// The client sent something unacceptable; the message says what.
    #[error("{0}")]
    InvalidEvent(String),
    /// The broker could not be reached or refused the batch.
    #[error("broker: {0}")]
    Broker(Status),
    /// The broker's URL does not parse, or its TLS or token files are unusable.
    #[error("broker url {url:?}: {source}")]
    BrokerUrl {
        /// The configured URL.
        url: String,
        /// Why it is unusable.
        source: runnel_security::SecurityError,
    },
    /// The gRPC server failed.
    #[error(transparent)]
    Serve(#[from] runnel_server::ServeError),
}

impl From<CollectorError> for Status {
    fn from(error: CollectorError) -> Status {
        match error {
            CollectorError::InvalidEvent(message) => Status::invalid_argument(message),
            CollectorError::Broker(status) => match status.code() {
                // The client can retry these: nothing was acknowledged.
                Code::Unavailable
                | Code::DeadlineExceeded
                | Code::ResourceExhausted
                | Code::Cancelled => Status::new(
                    status.code(),
                    format!("broker unavailable: {}", status.message()),
                ),
                Code::InvalidArgument | Code::NotFound => Status::invalid_argument(format!(
                    "broker rejected the batch: {}",
                    status.message()
                )),
                _ => {
                    tracing::error!(code = ?status.code(), message = status.message(), "broker failed");
                    Status::internal("broker failed; see the collector's log")
                }
            },
            CollectorError::BrokerUrl { .. } | CollectorError::Serve(_) => {
                tracing::error!(%error, "collector failure");
                Status::internal("collector failure; see the collector's log")
            }
        }
    }
}
