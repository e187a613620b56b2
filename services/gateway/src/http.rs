//! The HTTP API: the same reads as gRPC as JSON, live results as server-sent events,
//! WebSocket messages and long polls, webhook registration, pipeline health, the OpenAPI
//! document and the dashboard.
//!
//! | route | answer |
//! |---|---|
//! | `GET /v1/results/{query}/{key}` | the latest result (404 if none) |
//! | `GET /v1/results/{query}/{key}/range?from=&to=&limit=` | `{"results": [...]}`, oldest first |
//! | `GET /v1/topk/{query}?k=` | the query's top keys in its most recent window |
//! | `GET /v1/watch?<filter>` | `text/event-stream`: `result` events (`id:` the sequence), `gap` and `error` events; resumes after `Last-Event-ID` |
//! | `GET /v1/ws?<filter>` | a WebSocket of `{"type": "result" \| "gap" \| "error", …}` messages |
//! | `GET /v1/poll?<filter>&timeout=&limit=` | long poll: `{"results": [...], "next_after": n}` once something matches or the timeout passes |
//! | `POST /v1/webhooks`, `GET /v1/webhooks`, `GET`/`DELETE /v1/webhooks/{id}` | webhooks and their delivery status |
//! | `GET /v1/queries` | `{"queries": [{"name", "source_topic", "definition", "sql", "created"}]}`: the queries the analyzer runs that the caller may read (501 when the gateway does not know the analyzer) |
//! | `POST /v1/queries` | creates a query in SQL, `{"name", "sql", "start_from": "latest" \| "earliest"}` (needs `manage` on it): 201 with the query, 400 for SQL that does not compile (with the line and column), 409 for a name in use |
//! | `DELETE /v1/queries/{name}` | drops a created query (`?delete_results=true`: and its results): `{"results_deleted"}` |
//! | `GET /v1/pipeline` | the health of the store (and configured services) and of this gateway's live streams |
//! | `GET /openapi.json` | this API, described in OpenAPI 3.1 |
//! | `GET /dashboard/` | the live dashboard |
//!
//! A `<filter>` is `query=`, `key=` (repeatable) or `keys=a,b`, `key_prefix=`, `where=`
//! (repeatable, e.g. `where=count>=10`) and `after=<sequence>` (resume after it).
//! Results have the JSON shape of [`runnel_proto::json::result_json`]; errors are
//! `{"error": "<what is wrong>"}` with the HTTP status that matches the gRPC code.

use crate::dashboard;
use crate::error::{GatewayError, http_status};
use crate::live::{Hub, LiveItem, Start, Subscription};
use crate::results::Results;
use crate::webhooks::{Registration, Webhooks};
use axum::body::Bytes;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{DefaultBodyLimit, Path, RawQuery, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Json, Redirect, Response};
use axum::routing::get;
use axum::{Extension, Router};
use futures::{FutureExt, SinkExt, Stream, StreamExt};
use runnel_proto::filter::parse_predicate;
use runnel_proto::json::{parse_time, result_json};
use runnel_proto::v1::{GetRequest, RangeRequest, TopKRequest, WatchRequest};
use runnel_proto::{Millis, filter};
use runnel_security::{Action, Caller, Resource};
use runnel_telemetry::propagation::extract_from_http_headers;
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The OpenAPI document, served at `/openapi.json`.
pub(crate) const OPENAPI: &str = include_str!("openapi.json");
/// The largest request body accepted (webhook registrations).
const MAX_BODY_BYTES: usize = 64 * 1024;
/// A long poll waits this long when it does not say.
const DEFAULT_POLL_WAIT: Duration = Duration::from_secs(25);
/// A long poll answers at most this many results when it does not say.
const DEFAULT_POLL_LIMIT: usize = 100;
/// The most results a long poll answers.
const MAX_POLL_LIMIT: usize = 10_000;

/// What the HTTP handlers share.
#[derive(Debug, Clone)]
pub(crate) struct Api {
    pub(crate) results: Results,
    pub(crate) hub: Arc<Hub>,
    /// `None` without `gateway.broker`.
    pub(crate) webhooks: Option<Arc<Webhooks>>,
    pub(crate) max_poll_wait: Duration,
    /// Services whose health `/v1/pipeline` reports, by name.
    pub(crate) pipeline: Arc<BTreeMap<String, runnel_security::Peer>>,
    /// Which web pages' browsers may change things or open WebSockets.
    pub(crate) origins: Arc<crate::origin::Origins>,
}

/// The HTTP routes.
pub(crate) fn router(api: Api) -> Router {
    Router::new()
        .route("/v1/results/{query}/{key}", get(latest))
        .route("/v1/results/{query}/{key}/range", get(range))
        .route("/v1/topk/{query}", get(top_k))
        .route("/v1/watch", get(watch))
        .route("/v1/ws", get(websocket))
        .route("/v1/poll", get(poll))
        .route("/v1/webhooks", get(list_webhooks).post(register_webhook))
        .route("/v1/webhooks/{id}", get(webhook).delete(delete_webhook))
        .route("/v1/queries", get(queries).post(create_query))
        .route("/v1/queries/{name}", axum::routing::delete(drop_query))
        .route("/v1/pipeline", get(pipeline))
        .route(
            "/openapi.json",
            get(|| async { ([(header::CONTENT_TYPE, "application/json")], OPENAPI) }),
        )
        .route("/", get(|| async { Redirect::temporary("/dashboard/") }))
        .route(
            "/dashboard",
            get(|| async { Redirect::permanent("/dashboard/") }),
        )
        .route("/dashboard/", get(dashboard::index))
        .route("/dashboard/{file}", get(dashboard::asset))
        .fallback(|| async {
            ApiError(
                StatusCode::NOT_FOUND,
                "no such route; see /openapi.json".into(),
            )
        })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn_with_state(
            Arc::clone(&api.origins),
            crate::origin::guard,
        ))
        .layer(middleware::from_fn(traced))
        .with_state(api)
}

/// An error as the HTTP API answers it.
#[derive(Debug)]
pub(crate) struct ApiError(StatusCode, String);

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

fn bad(message: String) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, message)
}

/// The one permission check of every route: `caller` (recorded by the authentication
/// middleware of `runnel_server::serve_http`) may do `action` on `resource`.
fn allow(caller: &Caller, action: Action, resource: Resource<'_>) -> Result<(), ApiError> {
    caller
        .authorize(action, resource)
        .map_err(|denied| ApiError::from(GatewayError::from(denied)))
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

/// The query string as name/value pairs (names may repeat).
fn pairs(raw: Option<String>) -> Result<Vec<(String, String)>, ApiError> {
    serde_urlencoded::from_str(raw.as_deref().unwrap_or(""))
        .map_err(|e| bad(format!("the query string does not parse: {e}")))
}

fn number<T: std::str::FromStr>(name: &str, text: &str) -> Result<T, ApiError> {
    text.parse()
        .map_err(|_| bad(format!("{name}: {text:?} is not a whole number")))
}

/// A live filter and cursor from the query string, plus the endpoint's own parameters.
struct LiveParams {
    request: WatchRequest,
    extra: BTreeMap<&'static str, String>,
}

impl LiveParams {
    fn parse(raw: Option<String>, extra_names: &[&'static str]) -> Result<LiveParams, ApiError> {
        let mut request = WatchRequest::default();
        let mut extra = BTreeMap::new();
        for (name, value) in pairs(raw)? {
            match name.as_str() {
                "query" => request.query = value,
                "key" => request.keys.push(value),
                "keys" => request.keys.extend(
                    value
                        .split(',')
                        .filter(|k| !k.is_empty())
                        .map(str::to_owned),
                ),
                "key_prefix" => request.key_prefix = value,
                "where" => request
                    .predicates
                    .push(parse_predicate(&value).map_err(|e| bad(e.0))?),
                "after" => request.after_sequence = Some(number("after", &value)?),
                other => match extra_names.iter().find(|n| **n == other) {
                    Some(name) => {
                        extra.insert(*name, value);
                    }
                    None => {
                        return Err(bad(format!(
                            "unknown parameter {other:?}; filters are query, key, keys, key_prefix, where, after"
                        )));
                    }
                },
            }
        }
        if !request.query.is_empty() {
            crate::results::check_query(&request.query)?;
        }
        filter::ResultFilter::new(&request).map_err(|e| bad(e.0))?;
        Ok(LiveParams { request, extra })
    }

    fn start(&self) -> Start {
        self.request.after_sequence.map_or(Start::Now, Start::After)
    }
}

fn min_sequence(text: &str) -> Result<u64, ApiError> {
    runnel_proto::consistency::parse_min_sequence(text).map_err(bad)
}

async fn latest(
    State(api): State<Api>,
    Extension(caller): Extension<Caller>,
    Path((query, key)): Path<(String, String)>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    allow(&caller, Action::ReadResults, Resource::Query(&query))?;
    let mut at_least = None;
    for (name, value) in pairs(raw)? {
        match name.as_str() {
            "min_sequence" => at_least = Some(min_sequence(&value)?),
            other => {
                return Err(bad(format!(
                    "unknown parameter {other:?}; use min_sequence"
                )));
            }
        }
    }
    match api
        .results
        .get(
            GetRequest {
                query: query.clone(),
                key: key.clone(),
            },
            at_least,
            &caller,
        )
        .await?
    {
        // The result's JSON was made once, when it was cached or read.
        Some(found) => Ok((
            [(header::CONTENT_TYPE, "application/json")],
            found.json.clone(),
        )
            .into_response()),
        None => Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("no result yet for query {query:?} and key {key:?}"),
        )),
    }
}

async fn range(
    State(api): State<Api>,
    Extension(caller): Extension<Caller>,
    Path((query, key)): Path<(String, String)>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    allow(&caller, Action::ReadResults, Resource::Query(&query))?;
    let (mut from, mut to, mut limit, mut at_least) = (None, None, 0, None);
    for (name, value) in pairs(raw)? {
        let time = |text: &str| parse_time(text).map_err(|e| bad(format!("{name}: {e}")));
        match name.as_str() {
            "from" => from = Some(time(&value)?),
            "to" => to = Some(time(&value)?),
            "limit" => limit = number("limit", &value)?,
            "min_sequence" => at_least = Some(min_sequence(&value)?),
            other => {
                return Err(bad(format!(
                    "unknown parameter {other:?}; use from, to, limit, min_sequence"
                )));
            }
        }
    }
    let found = api
        .results
        .range(
            RangeRequest {
                query,
                key,
                from: from.map(Into::into),
                to: to.map(Into::into),
                limit,
            },
            at_least,
            &caller,
        )
        .await?;
    let json: Vec<serde_json::Value> = found.iter().map(result_json).collect();
    Ok(Json(serde_json::json!({ "results": json })).into_response())
}

async fn top_k(
    State(api): State<Api>,
    Extension(caller): Extension<Caller>,
    Path(query): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    allow(&caller, Action::ReadResults, Resource::Query(&query))?;
    let (mut k, mut at_least) = (0, None);
    for (name, value) in pairs(raw)? {
        match name.as_str() {
            "k" => k = number("k", &value)?,
            "min_sequence" => at_least = Some(min_sequence(&value)?),
            other => {
                return Err(bad(format!(
                    "unknown parameter {other:?}; use k, min_sequence"
                )));
            }
        }
    }
    let top = api
        .results
        .top_k(
            TopKRequest {
                query: query.clone(),
                k,
            },
            at_least,
            &caller,
        )
        .await?;
    let time = |ts: Option<prost_types::Timestamp>| {
        ts.map(|ts| runnel_proto::json::rfc3339(Millis::from(ts)))
    };
    let results: Vec<serde_json::Value> = top.results.iter().map(result_json).collect();
    Ok(Json(serde_json::json!({
        "query": query,
        "window_start": time(top.window_start),
        "window_start_ms": top.window_start.map(|t| Millis::from(t).0),
        "window_end": time(top.window_end),
        "ranked_by": top.ranked_by,
        "results": results,
    }))
    .into_response())
}

/// The JSON of a live item, and its SSE event name.
fn live_json(item: &LiveItem) -> (&'static str, serde_json::Value) {
    match item {
        LiveItem::Result(result) => ("result", result_json(result)),
        LiveItem::Gap { after, missed } => (
            "gap",
            serde_json::json!({
                "after_sequence": after,
                "missed": missed,
                "message": "this client fell behind and results were dropped; re-read them with range, or reconnect after after_sequence",
            }),
        ),
    }
}

/// Server-sent events; a reconnecting `EventSource` sends `Last-Event-ID` and resumes.
async fn watch(
    State(api): State<Api>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let mut params = LiveParams::parse(raw, &[])?;
    let query = Resource::query_or_any(&params.request.query);
    allow(&caller, Action::ReadResults, query)?;
    if let Some(id) = headers.get("last-event-id") {
        let text = id
            .to_str()
            .map_err(|_| bad("Last-Event-ID is not text".into()))?;
        params.request.after_sequence = Some(number("Last-Event-ID", text.trim())?);
    }
    let subscription = api
        .hub
        .subscribe(&params.request, params.start(), "sse")
        .await?;
    let events = futures::stream::unfold(Some(subscription), |state| async move {
        let mut subscription = state?;
        let event = match subscription.next().await {
            Ok(LiveItem::Result(result)) => Event::default()
                .event("result")
                .id(result.sequence.to_string())
                .data(&result.json),
            Ok(gap @ LiveItem::Gap { .. }) => {
                let (name, json) = live_json(&gap);
                Event::default().event(name).data(json.to_string())
            }
            Err(status) => {
                let data = serde_json::json!({
                    "error": status.message(),
                    "after_sequence": subscription.last_sequence(),
                });
                let event = Event::default().event("error").data(data.to_string());
                return Some((Ok(event), None));
            }
        };
        Some((Ok(event), Some(subscription)))
    });
    Ok(Sse::new(events).keep_alive(KeepAlive::default()))
}

async fn websocket(
    State(api): State<Api>,
    Extension(caller): Extension<Caller>,
    RawQuery(raw): RawQuery,
    upgrade: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    let params = LiveParams::parse(raw, &[])?;
    let query = Resource::query_or_any(&params.request.query);
    allow(&caller, Action::ReadResults, query)?;
    // Subscribe before the upgrade, so a refusal is an HTTP status the client can see.
    let subscription = api
        .hub
        .subscribe(&params.request, params.start(), "websocket")
        .await?;
    Ok(upgrade
        .max_message_size(MAX_BODY_BYTES)
        .on_upgrade(move |socket| relay_websocket(socket, subscription)))
}

/// Results already queued for a WebSocket client that go out in one socket write.
const WEBSOCKET_BATCH: usize = 64;

/// A live item as a WebSocket message, and whether it ends the stream.
fn websocket_message(
    item: Result<LiveItem, tonic::Status>,
    subscription: &Subscription,
) -> (String, bool) {
    match item {
        // The result's JSON is shared: splice it in rather than build it again.
        Ok(LiveItem::Result(result)) => (
            format!(
                r#"{{"type":"result","sequence":{},"result":{}}}"#,
                result.sequence, result.json
            ),
            false,
        ),
        Ok(gap @ LiveItem::Gap { .. }) => {
            let (kind, mut json) = live_json(&gap);
            json["type"] = kind.into();
            (json.to_string(), false)
        }
        Err(status) => (
            serde_json::json!({
                "type": "error",
                "error": status.message(),
                "after_sequence": subscription.last_sequence(),
            })
            .to_string(),
            true,
        ),
    }
}

/// Relays a subscription to a WebSocket client. Each result is its own message, but the
/// results already queued when one arrives (up to [`WEBSOCKET_BATCH`]) are written with it
/// and flushed once: one socket write for a burst instead of one per result.
async fn relay_websocket(socket: WebSocket, mut subscription: Subscription) {
    let (mut outgoing, mut incoming) = socket.split();
    'relay: loop {
        tokio::select! {
            item = subscription.next() => {
                let (message, mut last) = websocket_message(item, &subscription);
                if outgoing.feed(Message::Text(message.into())).await.is_err() {
                    break;
                }
                let mut batched = 1;
                while !last && batched < WEBSOCKET_BATCH {
                    // `next` is cancel-safe: a poll that finds nothing queued loses nothing.
                    let Some(item) = subscription.next().now_or_never() else {
                        break;
                    };
                    let (message, ends) = websocket_message(item, &subscription);
                    last = ends;
                    if outgoing.feed(Message::Text(message.into())).await.is_err() {
                        break 'relay;
                    }
                    batched += 1;
                }
                if outgoing.flush().await.is_err() || last {
                    break;
                }
            }
            incoming = incoming.next() => match incoming {
                // Pings are answered by the socket itself; text from the client is ignored.
                Some(Ok(Message::Close(_)) | Err(_)) | None => break,
                Some(Ok(_)) => {}
            },
        }
    }
    let _ = outgoing.close().await;
}

/// Long polling: waits for the first matching result after `after` (or from now), then
/// answers it with whatever else is already there.
async fn poll(
    State(api): State<Api>,
    Extension(caller): Extension<Caller>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let params = LiveParams::parse(raw, &["timeout", "limit"])?;
    let query = Resource::query_or_any(&params.request.query);
    allow(&caller, Action::ReadResults, query)?;
    let wait = match params.extra.get("timeout") {
        Some(text) => humantime::parse_duration(text)
            .map_err(|_| bad(format!("timeout: {text:?} is not a duration such as 30s")))?,
        None => DEFAULT_POLL_WAIT,
    }
    .min(api.max_poll_wait);
    let limit = match params.extra.get("limit") {
        Some(text) => number::<usize>("limit", text)?.clamp(1, MAX_POLL_LIMIT),
        None => DEFAULT_POLL_LIMIT,
    };
    let after = params.request.after_sequence;
    let mut subscription = api
        .hub
        .subscribe(&params.request, params.start(), "poll")
        .await?;
    let mut results = Vec::new();
    let mut gap = None;
    // Nothing within the wait is an empty answer, not an error.
    let mut next = tokio::time::timeout(wait, subscription.next()).await.ok();
    while let Some(item) = next.take() {
        match item {
            Ok(LiveItem::Result(result)) => results.push(result_json(&result)),
            Ok(LiveItem::Gap { after, missed }) => {
                gap = Some(serde_json::json!({ "after_sequence": after, "missed": missed }));
                break;
            }
            Err(status) => {
                if results.is_empty() {
                    return Err(ApiError(
                        http_status(status.code()),
                        status.message().to_owned(),
                    ));
                }
                break;
            }
        }
        if results.len() < limit {
            next = subscription.next().now_or_never();
        }
    }
    let next_after = subscription.last_sequence().max(after.unwrap_or_default());
    Ok(Json(serde_json::json!({
        "results": results,
        "next_after": next_after,
        "gap": gap,
    }))
    .into_response())
}

impl Api {
    /// The webhooks, or 503 saying they need a broker.
    fn webhooks(&self) -> Result<&Webhooks, ApiError> {
        self.webhooks.as_deref().ok_or_else(|| {
            ApiError(
                StatusCode::SERVICE_UNAVAILABLE,
                GatewayError::WebhooksNeedBroker.to_string(),
            )
        })
    }
}

/// Webhooks make the gateway call out to URLs: registering one for a query's results
/// takes `manage` on that query (every query, for a hook without one), and listing,
/// reading or deleting them `manage` on every query.
async fn register_webhook(
    State(api): State<Api>,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let registration: Registration = serde_json::from_slice(&body)
        .map_err(|e| bad(format!("the body is not a webhook registration: {e}")))?;
    let query = Resource::query_or_any(&registration.query);
    allow(&caller, Action::Manage, query)?;
    let created = api.webhooks()?.register(registration).await?;
    Ok((StatusCode::CREATED, Json(created)).into_response())
}

async fn list_webhooks(
    State(api): State<Api>,
    Extension(caller): Extension<Caller>,
) -> Result<Response, ApiError> {
    allow(&caller, Action::Manage, Resource::AnyQuery)?;
    Ok(Json(serde_json::json!({ "webhooks": api.webhooks()?.list().await? })).into_response())
}

async fn webhook(
    State(api): State<Api>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    allow(&caller, Action::Manage, Resource::AnyQuery)?;
    let id: u64 = number("id", &id)?;
    match api.webhooks()?.get(id).await? {
        Some(hook) => Ok(Json(hook).into_response()),
        None => Err(ApiError(StatusCode::NOT_FOUND, format!("no webhook {id}"))),
    }
}

async fn delete_webhook(
    State(api): State<Api>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    allow(&caller, Action::Manage, Resource::AnyQuery)?;
    let id: u64 = number("id", &id)?;
    if api.webhooks()?.delete(id).await? {
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        Err(ApiError(StatusCode::NOT_FOUND, format!("no webhook {id}")))
    }
}

/// The queries the analyzer runs that the caller may read, for clients (the dashboard)
/// that let a person pick one.
async fn queries(
    State(api): State<Api>,
    Extension(caller): Extension<Caller>,
) -> Result<Response, ApiError> {
    let queries: Vec<serde_json::Value> = api
        .results
        .queries(&caller)
        .await?
        .into_iter()
        .map(|query| query_json(&query))
        .collect();
    Ok(Json(serde_json::json!({ "queries": queries })).into_response())
}

/// A query as the HTTP API shows it.
fn query_json(query: &runnel_proto::v1::QueryDescription) -> serde_json::Value {
    serde_json::json!({
        "name": query.name,
        "source_topic": query.source_topic,
        "definition": query.definition,
        "sql": (!query.sql.is_empty()).then_some(&query.sql),
        "created": query.created,
    })
}

/// What `POST /v1/queries` takes.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct NewQuery {
    name: String,
    sql: String,
    /// `latest` (the default) or `earliest`.
    #[serde(default)]
    start_from: Option<String>,
}

/// Creates a continuous query in SQL (through the analyzer): needs `manage` on it.
async fn create_query(
    State(api): State<Api>,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let new: NewQuery =
        serde_json::from_slice(&body).map_err(|e| bad(format!("the body is not a query: {e}")))?;
    allow(&caller, Action::Manage, Resource::Query(&new.name))?;
    let start_from = match new.start_from.as_deref() {
        None | Some("latest") => runnel_proto::v1::StartFrom::Latest,
        Some("earliest") => runnel_proto::v1::StartFrom::Earliest,
        Some(other) => {
            return Err(bad(format!(
                "start_from {other:?} is neither \"earliest\" nor \"latest\""
            )));
        }
    };
    let created = api
        .results
        .create_query(runnel_proto::v1::CreateQueryRequest {
            name: new.name,
            sql: new.sql,
            start_from: start_from as i32,
        })
        .await?;
    Ok((StatusCode::CREATED, Json(query_json(&created))).into_response())
}

/// Drops a query created at run time (through the analyzer): needs `manage` on it.
/// `?delete_results=true` deletes its results too.
async fn drop_query(
    State(api): State<Api>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    allow(&caller, Action::Manage, Resource::Query(&name))?;
    let mut delete_results = false;
    for (param, value) in pairs(raw)? {
        match (param.as_str(), value.as_str()) {
            ("delete_results", "true") => delete_results = true,
            ("delete_results", "false") => delete_results = false,
            ("delete_results", other) => {
                return Err(bad(format!(
                    "delete_results: {other:?} is neither true nor false"
                )));
            }
            (other, _) => {
                return Err(bad(format!(
                    "unknown parameter {other:?}; use delete_results"
                )));
            }
        }
    }
    let results_deleted = api
        .results
        .drop_query(runnel_proto::v1::DropQueryRequest {
            name,
            delete_results,
        })
        .await?;
    Ok(Json(serde_json::json!({ "results_deleted": results_deleted })).into_response())
}

/// The health of every service the gateway knows, and of its own live streams.
async fn pipeline(
    State(api): State<Api>,
    Extension(caller): Extension<Caller>,
) -> Result<Response, ApiError> {
    // It speaks for the whole pipeline, every query's results included.
    allow(&caller, Action::ReadResults, Resource::AnyQuery)?;
    let checks = api.pipeline.iter().map(|(name, channel)| {
        let channel = channel.clone();
        async move {
            let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
            let asked = tokio::time::timeout(
                Duration::from_secs(2),
                client.check(tonic_health::pb::HealthCheckRequest {
                    service: String::new(),
                }),
            )
            .await;
            let status = match asked {
                Ok(Ok(answer)) => answer.into_inner().status().as_str_name().to_owned(),
                Ok(Err(status)) => format!("UNREACHABLE: {}", status.message()),
                Err(_) => "UNREACHABLE: no answer within 2s".to_owned(),
            };
            serde_json::json!({ "name": name, "status": status })
        }
    });
    let services = futures::future::join_all(checks).await;
    Ok(Json(serde_json::json!({
        "services": services,
        "gateway": {
            "store_stream": if api.hub.connected() { "connected" } else { "reconnecting" },
            "last_sequence": api.hub.last_sequence(),
            "watchers": api.hub.watchers(),
            "webhooks_failing": api.webhooks.as_ref().map_or(0, |w| w.failing()),
        },
    }))
    .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_parameters_build_a_filter() {
        let params = LiveParams::parse(
            Some(
                "query=q&key=a&keys=b,c&key_prefix=s&where=count%3E%3D3&after=7&timeout=1s".into(),
            ),
            &["timeout"],
        )
        .unwrap();
        assert_eq!(params.request.query, "q");
        assert_eq!(params.request.keys, ["a", "b", "c"]);
        assert_eq!(params.request.key_prefix, "s");
        assert_eq!(params.request.predicates.len(), 1);
        assert_eq!(params.request.after_sequence, Some(7));
        assert_eq!(params.extra["timeout"], "1s");
        let error = |raw: &str| match LiveParams::parse(Some(raw.into()), &[]) {
            Err(ApiError(StatusCode::BAD_REQUEST, message)) => message,
            other => panic!("expected a 400, got {:?}", other.map(|p| p.request)),
        };
        assert!(error("timeout=1s").contains("unknown parameter"));
        assert!(error("after=soon").starts_with("after:"));
        assert!(error("where=count").starts_with("where:"));
    }

    #[test]
    fn the_openapi_document_describes_every_route() {
        let doc: serde_json::Value = serde_json::from_str(OPENAPI).expect("valid JSON");
        assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
        let paths: Vec<&str> = doc["paths"]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        for route in [
            "/v1/results/{query}/{key}",
            "/v1/results/{query}/{key}/range",
            "/v1/topk/{query}",
            "/v1/watch",
            "/v1/ws",
            "/v1/poll",
            "/v1/webhooks",
            "/v1/webhooks/{id}",
            "/v1/queries",
            "/v1/pipeline",
        ] {
            assert!(paths.contains(&route), "{route} missing from {paths:?}");
        }
    }
}
