//! The live dashboard: three static files compiled into the binary (no build toolchain),
//! served under `/dashboard/`. The page reads the HTTP API like any other client:
//! `/v1/queries` for the queries it offers, `TopK` for the top-keys table and a query's
//! keys, `Range` for a key's time series, `/v1/pipeline` for health, and one
//! server-sent-events stream (`/v1/watch`) to update all of them live.
//!
//! Select boxes pick the queries and the key, and the URL's query parameters keep the
//! choice: `topk`, `k` (10), `series`, `key` and `value` (default `avg`, else `count`). A
//! query the URL does not name is one that has results — for the table `meetup_topics` if
//! it has, else (and for the chart) the one whose most recent window is the newest — or, if
//! none has any yet, the query of the first result that arrives; a key, the query's first.

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
