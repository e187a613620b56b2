//! The collector's errors and their one mapping to gRPC status codes.

use tonic::{Code, Status};

/// What can go wrong in the collector.
#[derive(Debug, thiserror::Error)]
pub enum CollectorError {
    /// The client sent something unacceptable; the message says what.
    #[error("{0}")]
    InvalidEvent(String),
    /// A `Track` token that belongs to another caller.
    #[error("{0}")]
    NotYours(String),
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
    /// The message log refused a submission (full, not logging, closing) or could not be
    /// opened.
    #[error("message log: {0}")]
    Log(#[from] runnel_msglog::Error),
    /// `Publish` or `Tap` named a topic that does not exist (and may not be created).
    #[error("{0}")]
    TopicNotFound(String),
    /// The store's URL does not parse.
    #[error("store url {url:?}: {source}")]
    StoreUrl {
        /// The configured URL.
        url: String,
        /// Why it is unusable.
        source: runnel_security::SecurityError,
    },
    /// Too many streams of one kind are open.
    #[error("{0}")]
    TooMany(String),
    /// A file of the collector's own (its topic table, the UDP socket) failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why it failed.
        source: std::io::Error,
    },
    /// The gRPC server failed.
    #[error(transparent)]
    Serve(#[from] runnel_server::ServeError),
}

impl From<CollectorError> for Status {
    fn from(error: CollectorError) -> Status {
        match error {
            CollectorError::InvalidEvent(message) => Status::invalid_argument(message),
            CollectorError::NotYours(message) => Status::permission_denied(message),
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
            CollectorError::Log(error) => {
                use runnel_msglog::Error as LogError;
                match error {
                    LogError::Full { .. } | LogError::DiskFull(_) => {
                        metrics::counter!("runnel_collector_refused_total", "reason" => "log_full")
                            .increment(1);
                        Status::resource_exhausted(error.to_string())
                    }
                    LogError::NotLogging => Status::failed_precondition(error.to_string()),
                    LogError::Invalid(message) => Status::invalid_argument(message),
                    LogError::Closed => Status::unavailable("the collector is stopping; retry"),
                    LogError::SyncFailed(_) => {
                        metrics::counter!("runnel_collector_refused_total", "reason" => "log_failed")
                            .increment(1);
                        Status::unavailable(error.to_string())
                    }
                    LogError::Io { .. }
                    | LogError::Corrupt { .. }
                    | LogError::Damaged { .. }
                    | LogError::Gap { .. } => {
                        tracing::error!(%error, "message log failure");
                        Status::internal("message log failure; see the collector's log")
                    }
                }
            }
            CollectorError::TopicNotFound(message) => Status::not_found(message),
            CollectorError::TooMany(message) => Status::resource_exhausted(message),
            CollectorError::BrokerUrl { .. }
            | CollectorError::StoreUrl { .. }
            | CollectorError::Io { .. }
            | CollectorError::Serve(_) => {
                tracing::error!(%error, "collector failure");
                Status::internal("collector failure; see the collector's log")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn a_log_that_cannot_fsync_sends_clients_elsewhere() {
        let full = Status::from(CollectorError::Log(runnel_msglog::Error::DiskFull(
            "No space left on device".into(),
        )));
        assert_eq!(full.code(), Code::ResourceExhausted, "{full:?}");
        let unsynced = Status::from(CollectorError::Log(runnel_msglog::Error::SyncFailed(
            "fsync failed: Input/output error".into(),
        )));
        assert_eq!(unsynced.code(), Code::Unavailable, "{unsynced:?}");
        assert!(
            unsynced.message().contains("restart the collector"),
            "{unsynced:?}"
        );
    }
}
