//! The analyzer's errors and their one mapping to gRPC status codes.

use std::path::PathBuf;
use tonic::Status;

/// What can go wrong in the analyzer.
#[derive(Debug, thiserror::Error)]
pub enum AnalyzerError {
    /// `DescribeQuery` named a query this analyzer does not run.
    #[error("query {0:?} does not exist")]
    QueryNotFound(String),
    /// A checkpoint exists but cannot be used. The analyzer refuses to start rather than
    /// silently start over (which would emit every window again from offset 0).
    #[error("checkpoint {}: {reason}; move it away to start the query over", path.display())]
    Checkpoint {
        /// The checkpoint file.
        path: PathBuf,
        /// Why it cannot be used.
        reason: String,
    },
    /// A file or directory operation failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The store refused results as invalid: a bug, which retrying would not fix.
    #[error("the store rejected results of query {query:?}: {message}")]
    StoreRejected {
        /// The query whose results were refused.
        query: String,
        /// What the store said.
        message: String,
    },
    /// A configured URL does not parse.
    #[error("{key} url {url:?}: {source}")]
    Url {
        /// `broker` or `store`.
        key: &'static str,
        /// The configured URL.
        url: String,
        /// Why it is unusable.
        source: runnel_security::SecurityError,
    },
    /// A query's task panicked.
    #[error("query task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    /// The configuration given to [`run`](crate::run) is invalid.
    #[error(transparent)]
    Config(#[from] runnel_server::ConfigError),
    /// The gRPC or admin server failed.
    #[error(transparent)]
    Serve(#[from] runnel_server::ServeError),
}

impl From<AnalyzerError> for Status {
    fn from(error: AnalyzerError) -> Status {
        match error {
            AnalyzerError::QueryNotFound(_) => Status::not_found(error.to_string()),
            AnalyzerError::Checkpoint { .. }
            | AnalyzerError::Io { .. }
            | AnalyzerError::StoreRejected { .. }
            | AnalyzerError::Url { .. }
            | AnalyzerError::Task(_)
            | AnalyzerError::Config(_)
            | AnalyzerError::Serve(_) => {
                tracing::error!(%error, "analyzer failure");
                Status::internal("analyzer failure; see the analyzer's log")
            }
        }
    }
}
