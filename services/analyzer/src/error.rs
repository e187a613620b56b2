//! The analyzer's errors and their one mapping to gRPC status codes.

use tonic::Status;

/// What can go wrong in the analyzer.
#[derive(Debug, thiserror::Error)]
pub enum AnalyzerError {
    /// `DescribeQuery` named a query this analyzer does not run.
    #[error("query {0:?} does not exist")]
    QueryNotFound(String),
    /// The checkpoint the group committed for a partition cannot be used. The analyzer
    /// stops rather than silently start over (which would emit every window again, or
    /// lose the windows the checkpoint held).
    #[error(
        "the checkpoint of query {query:?}, stage {stage}, partition {partition}: {reason}; to start the query over, run it under a new consumer group (analyzer.group)"
    )]
    Checkpoint {
        /// The query.
        query: String,
        /// `source` or `keyed`.
        stage: &'static str,
        /// The input partition.
        partition: u32,
        /// Why it cannot be used.
        reason: String,
    },
    /// A partition delivered a record past the one its task expected: records in between
    /// are gone (retention deleted them before they were read). The task's windows would
    /// be wrong, so the analyzer stops instead of skipping them.
    #[error(
        "query {query:?}, stage {stage}, partition {partition}: expected offset {expected}, the broker delivered {found}: records {expected}..{found} are missing (deleted by retention before they were read?); the analyzer stops rather than emit windows without them"
    )]
    Gap {
        /// The query.
        query: String,
        /// `source` or `keyed`.
        stage: &'static str,
        /// The input partition.
        partition: u32,
        /// The offset the task's state continues at.
        expected: u64,
        /// The offset delivered.
        found: u64,
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
            | AnalyzerError::Gap { .. }
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
