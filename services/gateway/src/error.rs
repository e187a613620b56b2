//! The gateway's errors, mapped in one place to gRPC status codes and, from those, to HTTP
//! status codes.

use tonic::{Code, Status};

/// What can go wrong in the gateway.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The client sent something unacceptable; the message names the field and says why.
    #[error("{0}")]
    InvalidArgument(String),
    /// The caller may not read these results.
    #[error(transparent)]
    Denied(#[from] runnel_security::AccessDenied),
    /// Too many live streams are open.
    #[error("too many live streams ({0} open); try again later")]
    TooManyWatchers(usize),
    /// The query read does not exist: the analyzer does not run it and the store holds no
    /// result of it.
    #[error("unknown query {query:?}; known queries: {}", known_list(.known))]
    UnknownQuery {
        /// The query asked for.
        query: String,
        /// The queries the analyzer runs that the caller may read.
        known: Vec<String>,
    },
    /// Query names were asked for, but this gateway does not know the analyzer.
    #[error("this gateway does not know the analyzer: set gateway.pipeline.analyzer")]
    NoAnalyzer,
    /// The analyzer could not be reached or refused the call.
    #[error("analyzer: {}", .0.message())]
    Analyzer(Status),
    /// The store could not be reached or refused the call.
    #[error("store: {}", .0.message())]
    Store(Status),
    /// The store's URL does not parse.
    #[error("store url {url:?}: {source}")]
    StoreUrl {
        /// The configured URL.
        url: String,
        /// Why it is unusable.
        source: runnel_security::SecurityError,
    },
    /// The broker's URL does not parse.
    #[error("broker url {url:?}: {source}")]
    BrokerUrl {
        /// The configured URL.
        url: String,
        /// Why it is unusable.
        source: runnel_security::SecurityError,
    },
    /// The HTTP listener failed.
    #[error("http server: {0}")]
    Http(std::io::Error),
    /// A bug: a lock poisoned by a panic, say.
    #[error("internal error: {0}")]
    Internal(&'static str),
    /// Webhook registrations could not be read or written.
    #[error("webhooks: {0}")]
    Webhooks(String),
    /// Webhooks were asked for, but this gateway has no broker to keep them in.
    #[error("webhooks need gateway.broker: set it to the broker's URL (RUNNEL_GATEWAY__BROKER)")]
    WebhooksNeedBroker,
    /// The broker could not be reached or refused the call.
    #[error("broker: {}", .0.message())]
    Broker(Status),
    /// Not now; the message says why and when to try again.
    #[error("{0}")]
    Unavailable(String),
    /// The configuration given to [`run`](crate::run) is invalid.
    #[error(transparent)]
    Config(#[from] runnel_server::ConfigError),
    /// The gRPC or admin server failed.
    #[error(transparent)]
    Serve(#[from] runnel_server::ServeError),
}

impl From<GatewayError> for Status {
    fn from(error: GatewayError) -> Status {
        match error {
            GatewayError::InvalidArgument(message) => Status::invalid_argument(message),
            GatewayError::Denied(denied) => Status::from(denied),
            GatewayError::TooManyWatchers(_) => Status::resource_exhausted(error.to_string()),
            GatewayError::UnknownQuery { .. } => Status::not_found(error.to_string()),
            GatewayError::NoAnalyzer => Status::unimplemented(error.to_string()),
            GatewayError::WebhooksNeedBroker => Status::failed_precondition(error.to_string()),
            GatewayError::Unavailable(message) => Status::unavailable(message),
            GatewayError::Broker(status) => match status.code() {
                Code::InvalidArgument | Code::ResourceExhausted => {
                    Status::new(status.code(), format!("broker: {}", status.message()))
                }
                _ => Status::unavailable(format!("broker unavailable: {}", status.message())),
            },
            GatewayError::Analyzer(status) => match status.code() {
                // The analyzer's answer to what the client asked (CreateQuery, DropQuery).
                Code::InvalidArgument
                | Code::AlreadyExists
                | Code::NotFound
                | Code::FailedPrecondition
                | Code::PermissionDenied => Status::new(status.code(), status.message()),
                _ => Status::unavailable(format!("analyzer unavailable: {}", status.message())),
            },
            GatewayError::Store(status) => match status.code() {
                // Nothing is wrong with the call; the client may retry.
                Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown => {
                    Status::unavailable(format!("store unavailable: {}", status.message()))
                }
                Code::InvalidArgument
                | Code::ResourceExhausted
                | Code::NotFound
                | Code::OutOfRange => Status::new(status.code(), status.message()),
                _ => {
                    tracing::error!(code = ?status.code(), message = status.message(), "store failed");
                    Status::internal("store failed; see the gateway's log")
                }
            },
            GatewayError::StoreUrl { .. }
            | GatewayError::BrokerUrl { .. }
            | GatewayError::Http(_)
            | GatewayError::Webhooks(_)
            | GatewayError::Internal(_)
            | GatewayError::Config(_)
            | GatewayError::Serve(_) => {
                tracing::error!(%error, "gateway failure");
                Status::internal("gateway failure; see the gateway's log")
            }
        }
    }
}

/// `a, b, c`, or `none` for an empty list.
fn known_list(known: &[String]) -> String {
    if known.is_empty() {
        "none".to_owned()
    } else {
        known.join(", ")
    }
}

/// The HTTP status for a gRPC code, as the HTTP API answers it.
pub(crate) fn http_status(code: Code) -> http::StatusCode {
    use http::StatusCode;
    match code {
        Code::Ok => StatusCode::OK,
        Code::InvalidArgument | Code::OutOfRange | Code::FailedPrecondition => {
            StatusCode::BAD_REQUEST
        }
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::ResourceExhausted | Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::DeadlineExceeded | Code::Cancelled => StatusCode::GATEWAY_TIMEOUT,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Unknown | Code::Internal | Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_failures_map_to_what_the_client_can_do() {
        let status = Status::from(GatewayError::Store(Status::unavailable(
            "connection refused",
        )));
        assert_eq!(status.code(), Code::Unavailable);
        assert_eq!(
            http_status(status.code()),
            http::StatusCode::SERVICE_UNAVAILABLE
        );
        let status = Status::from(GatewayError::Store(Status::invalid_argument(
            "results[0].query",
        )));
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(http_status(status.code()), http::StatusCode::BAD_REQUEST);
        let status = Status::from(GatewayError::Store(Status::internal(
            "/data/results.log: EIO",
        )));
        assert_eq!(status.code(), Code::Internal);
        assert!(!status.message().contains("/data"));
        let status = Status::from(GatewayError::UnknownQuery {
            query: "x".into(),
            known: vec!["a".into(), "b".into()],
        });
        assert_eq!(status.code(), Code::NotFound);
        assert_eq!(
            status.message(),
            r#"unknown query "x"; known queries: a, b"#
        );
        assert_eq!(http_status(status.code()), http::StatusCode::NOT_FOUND);
        let status = Status::from(GatewayError::TooManyWatchers(3));
        assert_eq!(
            http_status(status.code()),
            http::StatusCode::SERVICE_UNAVAILABLE
        );
    }
}
