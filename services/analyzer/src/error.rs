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
    /// A request is malformed: bad SQL (with where and why), a bad name.
    #[error("{0}")]
    InvalidArgument(String),
    /// `CreateQuery` named a query that exists already.
    #[error("query {0:?} exists already")]
    QueryExists(String),
    /// `DropQuery` named a query from the configuration, which only a configuration
    /// change removes.
    #[error(
        "query {0:?} is configured in the analyzer's configuration, not created: remove it there"
    )]
    Configured(String),
    /// The broker could not be reached or refused a call the analyzer made for a client.
    #[error("broker: {}", .0.message())]
    Broker(Status),
    /// The store refused a call the analyzer made for a client.
    #[error("store: {}", .0.message())]
    Store(Status),
    /// The created-query log could not be read or written.
    #[error("created queries: {0}")]
    Registry(String),
    /// Not ready to answer yet; the client may retry.
    #[error("{0}")]
    Unavailable(String),
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
            AnalyzerError::InvalidArgument(_) => Status::invalid_argument(error.to_string()),
            AnalyzerError::QueryExists(_) => Status::already_exists(error.to_string()),
            AnalyzerError::Configured(_) => Status::failed_precondition(error.to_string()),
            AnalyzerError::Unavailable(_) => Status::unavailable(error.to_string()),
            AnalyzerError::Broker(status) | AnalyzerError::Store(status)
                if matches!(
                    status.code(),
                    tonic::Code::Unavailable
                        | tonic::Code::DeadlineExceeded
                        | tonic::Code::PermissionDenied
                        | tonic::Code::ResourceExhausted
                ) =>
            {
                Status::new(status.code(), status.message().to_owned())
            }
            AnalyzerError::Broker(_) | AnalyzerError::Store(_) | AnalyzerError::Registry(_) => {
                tracing::error!(%error, "analyzer failure");
                Status::internal(error.to_string())
            }
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
