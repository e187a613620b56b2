//! Requests a web page makes through a user's browser: which origins may change things or
//! open a WebSocket, and what a mutating request's body must be declared as.
//!
//! A browser attaches the user's credentials (a client certificate, a cookie, access to
//! `127.0.0.1`) to requests any page makes, so without these checks a page the user opens
//! could register a webhook on a gateway it can reach and receive every result. A browser
//! marks such requests with `Origin`; a page cannot forge it. So:
//!
//! - a mutating request (`POST`, `PUT`, `PATCH`, `DELETE`) or a WebSocket upgrade that
//!   carries an `Origin` other than the gateway's own (the dashboard's) or one configured in
//!   `gateway.allowed_origins` is refused with 403;
//! - a mutating request with a body must declare `Content-Type: application/json`, else 415
//!   — a page can send a cross-site `text/plain` POST without asking the server first, but
//!   not a JSON one.
//!
//! Requests without `Origin` (curl, servers, other services) are not made by a page and
//! pass the origin check; reads without an upgrade are left to the same-origin policy.

use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::sync::Arc;

/// Which origins a browser request may come from.
#[derive(Debug, Clone, Default)]
pub(crate) struct Origins {
    /// Besides the gateway's own: exact `scheme://host[:port]` strings.
    allowed: Vec<String>,
    /// `*` was configured: any origin.
    any: bool,
}

impl Origins {
    /// From `gateway.allowed_origins` (validated by the config).
    pub(crate) fn new(configured: &[String]) -> Origins {
        Origins {
            allowed: configured
                .iter()
                .filter(|o| *o != "*")
                .map(|o| o.trim_end_matches('/').to_ascii_lowercase())
                .collect(),
            any: configured.iter().any(|o| o == "*"),
        }
    }

    /// Whether a request with these headers may come from `origin`: the gateway's own
    /// origin (same host and port as the request was sent to), or an allowed one.
    fn admits(&self, origin: &str, headers: &HeaderMap) -> bool {
        if self.any {
            return true;
        }
        let origin = origin.trim_end_matches('/').to_ascii_lowercase();
        if self.allowed.contains(&origin) {
            return true;
        }
        let authority = origin
            .strip_prefix("http://")
            .or_else(|| origin.strip_prefix("https://"));
        let host = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_ascii_lowercase);
        matches!((authority, host), (Some(a), Some(h)) if a == h)
    }
}

/// Checks whether `value` is an origin `gateway.allowed_origins` may hold; the reason if
/// not.
pub(crate) fn check_origin(value: &str) -> Result<(), String> {
    if value == "*" {
        return Ok(());
    }
    let Some(authority) = value
        .strip_prefix("http://")
        .or_else(|| value.strip_prefix("https://"))
    else {
        return Err(format!(
            "{value:?} is not an origin: scheme://host[:port], e.g. \"https://ops.example.com\", or \"*\""
        ));
    };
    let authority = authority.trim_end_matches('/');
    if authority.is_empty() || authority.contains(['/', '?', '#', '@', ' ']) {
        return Err(format!(
            "{value:?} is not an origin: scheme://host[:port] with no path, e.g. \"https://ops.example.com\""
        ));
    }
    Ok(())
}

fn refuse(status: StatusCode, message: String) -> Response {
    (status, axum::Json(serde_json::json!({ "error": message }))).into_response()
}

fn mutating(method: &Method) -> bool {
    [Method::POST, Method::PUT, Method::PATCH, Method::DELETE].contains(method)
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|essence| essence.trim().eq_ignore_ascii_case("application/json"))
}

/// The middleware: refuses what a foreign page could make a browser send.
pub(crate) async fn guard(
    State(origins): State<Arc<Origins>>,
    request: Request,
    next: Next,
) -> Response {
    let headers = request.headers();
    let upgrade = headers.contains_key(header::UPGRADE);
    let method = request.method();
    if (mutating(method) || upgrade)
        && let Some(origin) = headers.get(header::ORIGIN)
    {
        let origin = origin.to_str().unwrap_or("");
        if !origins.admits(origin, headers) {
            metrics::counter!("runnel_gateway_cross_origin_refused_total").increment(1);
            return refuse(
                StatusCode::FORBIDDEN,
                format!(
                    "requests from origin {origin:?} are not allowed here; add it to gateway.allowed_origins to allow it"
                ),
            );
        }
    }
    let has_body = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .is_none_or(|length| length != "0");
    if (*method == Method::POST || *method == Method::PUT || *method == Method::PATCH)
        && has_body
        && !is_json(headers)
    {
        return refuse(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "the body must be JSON, sent with Content-Type: application/json".into(),
        );
    }
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, value.parse().unwrap());
        headers
    }

    #[test]
    fn the_gateways_own_origin_and_allowed_ones_are_admitted() {
        let none = Origins::new(&[]);
        let at = host("127.0.0.1:8080");
        assert!(none.admits("http://127.0.0.1:8080", &at));
        assert!(none.admits("https://127.0.0.1:8080", &at));
        assert!(!none.admits("http://127.0.0.1:8081", &at));
        assert!(!none.admits("http://evil.example", &at));
        assert!(!none.admits("null", &at));
        assert!(!none.admits("http://evil.example", &HeaderMap::new()));
        let some = Origins::new(&["https://Ops.example.com/".into()]);
        assert!(some.admits("https://ops.example.com", &at));
        assert!(!some.admits("http://ops.example.com", &at));
        assert!(Origins::new(&["*".into()]).admits("http://anything.example", &at));
    }

    #[test]
    fn configured_origins_must_be_origins() {
        assert!(check_origin("https://ops.example.com").is_ok());
        assert!(check_origin("http://127.0.0.1:3000").is_ok());
        assert!(check_origin("*").is_ok());
        for bad in [
            "ops.example.com",
            "https://",
            "https://ops.example.com/path",
            "ftp://x",
        ] {
            assert!(check_origin(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn only_json_bodies_are_json() {
        let mut headers = HeaderMap::new();
        assert!(!is_json(&headers));
        headers.insert(header::CONTENT_TYPE, "text/plain".parse().unwrap());
        assert!(!is_json(&headers));
        headers.insert(
            header::CONTENT_TYPE,
            "Application/JSON; charset=utf-8".parse().unwrap(),
        );
        assert!(is_json(&headers));
    }
}
