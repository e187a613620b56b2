//! The store's errors and their one mapping to gRPC status codes.

use std::path::PathBuf;
use tonic::Status;

/// What can go wrong in the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The client sent something unacceptable; the message names the field and says why.
    #[error("{0}")]
    InvalidArgument(String),
    /// The result log could not be opened, read or written.
    #[error("{}: {source}", path.display())]
    Log {
        /// The file involved.
        path: PathBuf,
        /// What the log layer said.
        source: runnel_log::Error,
    },
    /// The data directory could not be created.
    #[error("{}: {source}", path.display())]
    Io {
        /// The directory involved.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// A frame passed its checksum but does not hold a result: a bug or outside
    /// interference. The store refuses to start rather than serve a partial history.
    #[error("{} is corrupt at position {position}: {reason}", path.display())]
    Corrupt {
        /// The file involved.
        path: PathBuf,
        /// Where in the file the problem is.
        position: u64,
        /// What is wrong.
        reason: String,
    },
    /// A write failed part-way; the store takes no more writes until a restart recovers
    /// the log from disk.
    #[error("the result log stopped taking writes after a failed write; restart the store")]
    Failed,
    /// A blocking disk task panicked or was cancelled.
    #[error("disk task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    /// The configuration given to [`run`](crate::run) is invalid.
    #[error(transparent)]
    Config(#[from] runnel_server::ConfigError),
    /// The gRPC or admin server failed.
    #[error(transparent)]
    Serve(#[from] runnel_server::ServeError),
}

/// The crate's result type.
pub(crate) type Result<T, E = StoreError> = std::result::Result<T, E>;

impl From<StoreError> for Status {
    fn from(error: StoreError) -> Status {
        match error {
            StoreError::InvalidArgument(message) => Status::invalid_argument(message),
            StoreError::Log { .. }
            | StoreError::Io { .. }
            | StoreError::Corrupt { .. }
            | StoreError::Failed
            | StoreError::Task(_)
            | StoreError::Config(_)
            | StoreError::Serve(_) => {
                // The details (paths, OS errors) are for operators, not callers.
                tracing::error!(%error, "store failure");
                Status::internal("store failure; see the store's log")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn each_kind_maps_to_its_code_without_leaking_paths() {
        let invalid = Status::from(StoreError::InvalidArgument(
            "results[0].query is empty".into(),
        ));
        assert_eq!(invalid.code(), Code::InvalidArgument);
        assert_eq!(invalid.message(), "results[0].query is empty");
        let internal = Status::from(StoreError::Io {
            path: "/secret/path".into(),
            source: std::io::Error::other("disk on fire"),
        });
        assert_eq!(internal.code(), Code::Internal);
        assert!(!internal.message().contains("/secret"));
    }
}
