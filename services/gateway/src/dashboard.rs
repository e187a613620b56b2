//! The live dashboard: three static files compiled into the binary (no build toolchain),
//! served under `/dashboard/`. The page reads the HTTP API like any other client: `TopK`
//! for the top-keys table, `Range` for a key's time series, `/v1/pipeline` for health, and
//! one server-sent-events stream (`/v1/watch`) to update all of them live.
//!
//! Query parameters choose what it shows: `topk` (default `meetup_topics`), `k` (10),
//! `series` (default `avg_value_per_key`), `key` (default: the first key that arrives) and
//! `value` (default `avg`).

use axum::extract::Path;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

const INDEX: &str = include_str!("dashboard/index.html");
const SCRIPT: &str = include_str!("dashboard/app.js");
const STYLE: &str = include_str!("dashboard/style.css");

/// `/dashboard/`.
pub(crate) async fn index() -> Response {
    page("text/html; charset=utf-8", INDEX)
}

/// `/dashboard/<file>`.
pub(crate) async fn asset(Path(file): Path<String>) -> Response {
    match file.as_str() {
        "app.js" => page("text/javascript; charset=utf-8", SCRIPT),
        "style.css" => page("text/css; charset=utf-8", STYLE),
        "index.html" => page("text/html; charset=utf-8", INDEX),
        _ => (StatusCode::NOT_FOUND, "no such file").into_response(),
    }
}

fn page(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            // The files change only with the binary.
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}
