//! The store's errors and their one mapping to gRPC status codes.

use std::path::{Path, PathBuf};
use tonic::Status;

/// What can go wrong in the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The client sent something unacceptable; the message names the field and says why.
    #[error("{0}")]
    InvalidArgument(String),
    /// A `Watch` asked to resume after a sequence the change feed no longer holds.
    #[error(
        "after_sequence {after} is older than the change feed, which starts at {oldest}; re-read with Range and watch again"
    )]
    CursorExpired {
        /// The cursor asked for.
        after: u64,
        /// The oldest sequence the feed still holds.
        oldest: u64,
    },
    /// A `Watch` asked to resume after a sequence this store has not written: its history
    /// was reset, or the cursor is from another store.
    #[error(
        "after_sequence {after} is ahead of this store, whose last write is {last}; its history was reset or the cursor is from another store: re-read with Range and watch again"
    )]
    CursorAhead {
        /// The cursor asked for.
        after: u64,
        /// The last sequence written.
        last: u64,
    },
    /// Long-term storage could not be opened, read or written.
    #[error("{}: {source}", path.display())]
    Db {
        /// The database file.
        path: PathBuf,
        /// What redb said.
        source: redb::Error,
    },
    /// The in-memory data store (Redis) failed.
    #[error("hot tier: {0}")]
    Hot(String),
    /// The data directory could not be created.
    #[error("{}: {source}", path.display())]
    Io {
        /// The directory involved.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// A stored record passed redb's checks but does not hold a result: a bug or outside
    /// interference. The store refuses to serve it rather than guess.
    #[error("{} is corrupt: {reason}", path.display())]
    Corrupt {
        /// The file involved.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The data directory holds results numbered differently from how this store is
    /// configured to number them (with or without the broker's results log).
    #[error("{} cannot be used: {reason}", path.display())]
    Incompatible {
        /// The database file.
        path: PathBuf,
        /// Why, and what to do.
        reason: String,
    },
    /// The broker refused a write because the caller's group fence is stale: the writer
    /// is no longer the owner of the partitions it wrote for.
    #[error("{0}")]
    Fenced(String),
    /// The results log in the broker could not be read or written.
    #[error("results log: {0}")]
    Log(String),
    /// A record of the results log is not a result this store can apply.
    #[error("results log offset {offset}: {reason}")]
    BadRecord {
        /// Its offset in `_store.results`.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// This replica has not caught up with the results log yet, so it would answer with
    /// old results; another replica can answer.
    #[error(
        "this store replica is catching up with the results log (applied through {applied} of {target}); ask another replica or retry"
    )]
    CatchingUp {
        /// The last sequence applied.
        applied: u64,
        /// The log's end when the replica started.
        target: u64,
    },
    /// A `DeleteQuery` through the results log was applied, but this replica no longer
    /// knows how many results it deleted (so many deletions were applied since).
    #[error(
        "the deletion at sequence {0} is applied, but so many deletions were applied since that its count is gone"
    )]
    DeletionCountGone(u64),
    /// The store stopped following the results log (it is shutting down or failed).
    #[error("the store stopped following the results log; retry on another replica")]
    NotFollowing,
    /// A lock was poisoned by a panicking thread; the store must be restarted.
    #[error("the store stopped taking requests after an internal panic; restart it")]
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

impl StoreError {
    /// A redb failure on the database at `path`.
    pub(crate) fn db(path: &Path, source: impl Into<redb::Error>) -> StoreError {
        StoreError::Db {
            path: path.to_owned(),
            source: source.into(),
        }
    }
}

impl From<runnel_proto::filter::FilterError> for StoreError {
    fn from(error: runnel_proto::filter::FilterError) -> Self {
        StoreError::InvalidArgument(error.0)
    }
}

/// The crate's result type.
pub(crate) type Result<T, E = StoreError> = std::result::Result<T, E>;

impl From<StoreError> for Status {
    fn from(error: StoreError) -> Status {
        match error {
            StoreError::InvalidArgument(message) => Status::invalid_argument(message),
            StoreError::CursorExpired { .. } | StoreError::CursorAhead { .. } => {
                Status::out_of_range(error.to_string())
            }
            StoreError::Fenced(message) => Status::failed_precondition(message),
            StoreError::CatchingUp { .. } | StoreError::NotFollowing => {
                Status::unavailable(error.to_string())
            }
            StoreError::DeletionCountGone(_) => Status::unknown(error.to_string()),
            StoreError::Log(_) => {
                tracing::error!(%error, "results log failure");
                Status::unavailable("the store cannot reach the results log in the broker")
            }
            StoreError::Hot(_) => {
                tracing::error!(%error, "hot tier failure");
                Status::unavailable("the store's in-memory data store is unavailable")
            }
            StoreError::Db { .. }
            | StoreError::Io { .. }
            | StoreError::Corrupt { .. }
            | StoreError::Incompatible { .. }
            | StoreError::BadRecord { .. }
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
        let expired = Status::from(StoreError::CursorExpired {
            after: 3,
            oldest: 10,
        });
        assert_eq!(expired.code(), Code::OutOfRange);
        assert!(expired.message().contains("Range"));
        let hot = Status::from(StoreError::Hot("connection refused".into()));
        assert_eq!(hot.code(), Code::Unavailable);
    }
}
