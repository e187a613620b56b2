//! The HTTP/JSON API and its server-sent-events stream:
//!
//! | route | answer |
//! |---|---|
//! | `GET /v1/results/{query}/{key}` | the latest result (404 if none) |
//! | `GET /v1/results/{query}/{key}/range?from=&to=&limit=` | `{"results": [...]}`, oldest first; `from`/`to` bound the window start (RFC 3339 or Unix ms; `from` inclusive, `to` exclusive) |
//! | `GET /v1/watch?query=&key_prefix=` | `text/event-stream`: one `result` event per result, JSON data; an `error` event before the stream ends abnormally |
//!
//! Results have the JSON shape of [`runnel_proto::json::result_json`]; errors are
//! `{"error": "<what is wrong>"}` with the HTTP status that matches the gRPC code.

use crate::error::{GatewayError, http_status};
use crate::results::Results;
use axum::Extension;
use axum::Router;
use axum::extract::{Path, Query, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use futures::Stream;
use runnel_proto::json::{parse_time, result_json};
use runnel_proto::v1::{GetRequest, RangeRequest, WatchRequest};
use runnel_security::{Action, Caller, Resource};
use runnel_telemetry::propagation::extract_from_http_headers;
use serde::Deserialize;
use std::convert::Infallible;
use tokio_stream::StreamExt;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The HTTP routes over `results`.
pub(crate) fn router(results: Results) -> Router {
    Router::new()
        .route("/v1/results/{query}/{key}", get(latest))
        .route("/v1/results/{query}/{key}/range", get(range))
        .route("/v1/watch", get(watch))
        .fallback(|| async {
            ApiError(
                StatusCode::NOT_FOUND,
                "no such route; see /v1/results and /v1/watch".into(),
            )
        })
        .layer(middleware::from_fn(traced))
        .with_state(results)
}

/// An error as the HTTP API answers it.
#[derive(Debug)]
struct ApiError(StatusCode, String);

impl From<GatewayError> for ApiError {
    fn from(error: GatewayError) -> Self {
        let status = tonic::Status::from(error);
        ApiError(http_status(status.code()), status.message().to_owned())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

/// Runs each request in a span that continues the caller's W3C trace, if it sent one.
async fn traced(request: Request, next: Next) -> Response {
    let span = tracing::info_span!(
        "gateway.http",
        otel.kind = "server",
        http.method = %request.method(),
        http.target = %request.uri().path(),
        http.status = tracing::field::Empty,
    );
    let _ = span.set_parent(extract_from_http_headers(request.headers()));
    let response = next.run(request).instrument(span.clone()).await;
    span.record("http.status", response.status().as_u16());
    response
}

async fn latest(
    State(results): State<Results>,
    Extension(caller): Extension<Caller>,
    Path((query, key)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    caller
        .authorize(Action::ReadResults, Resource::Query(&query))
        .map_err(GatewayError::from)?;
    match results
        .get(GetRequest {
            query: query.clone(),
            key: key.clone(),
        })
        .await?
    {
        Some(result) => Ok(Json(result_json(&result)).into_response()),
        None => Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("no result yet for query {query:?} and key {key:?}"),
        )),
    }
}

/// `?from=&to=&limit=`, all optional.
#[derive(Debug, Deserialize)]
struct RangeParams {
    from: Option<String>,
    to: Option<String>,
    limit: Option<String>,
}

async fn range(
    State(results): State<Results>,
    Extension(caller): Extension<Caller>,
    Path((query, key)): Path<(String, String)>,
    Query(params): Query<RangeParams>,
) -> Result<Response, ApiError> {
    caller
        .authorize(Action::ReadResults, Resource::Query(&query))
        .map_err(GatewayError::from)?;
    let bad = |message: String| ApiError(StatusCode::BAD_REQUEST, message);
    let time = |name: &str, value: Option<String>| {
        value
            .map(|text| parse_time(&text).map_err(|e| bad(format!("{name}: {e}"))))
            .transpose()
    };
    let from = time("from", params.from)?;
    let to = time("to", params.to)?;
    let limit = match params.limit {
        None => 0,
        Some(text) => text
            .parse::<u32>()
            .map_err(|_| bad(format!("limit: {text:?} is not a whole number")))?,
    };
    let found = results
        .range(RangeRequest {
            query,
            key,
            from: from.map(Into::into),
            to: to.map(Into::into),
            limit,
        })
        .await?;
    let json: Vec<serde_json::Value> = found.iter().map(result_json).collect();
    Ok(Json(serde_json::json!({ "results": json })).into_response())
}

/// `?query=&key_prefix=`, both optional.
#[derive(Debug, Deserialize)]
struct WatchParams {
    #[serde(default)]
    query: String,
    #[serde(default)]
    key_prefix: String,
}

async fn watch(
    State(results): State<Results>,
    Extension(caller): Extension<Caller>,
    Query(params): Query<WatchParams>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    caller
        .authorize(Action::ReadResults, Resource::query_or_any(&params.query))
        .map_err(GatewayError::from)?;
    let live = results
        .watch(WatchRequest {
            query: params.query,
            key_prefix: params.key_prefix,
        })
        .await?;
    let events = live.map(|item| {
        Ok(match item {
            Ok(result) => Event::default()
                .event("result")
                .data(result_json(&result).to_string()),
            Err(status) => Event::default().event("error").data(status.message()),
        })
    });
    Ok(Sse::new(events).keep_alive(KeepAlive::default()))
}
