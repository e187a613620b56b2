//! The guard in front of every API: authentication, per-connection in-flight limit,
//! per-client rate limit and the call timeout — as a tower layer for gRPC and an axum
//! middleware for HTTP, sharing one [`Guard`].
//!
//! Each refusal has its status and its counter:
//!
//! | refused because | gRPC | HTTP | counted in |
//! |---|---|---|---|
//! | no / bad / expired credentials | `UNAUTHENTICATED` | 401 | `runnel_auth_failures_total{service, reason}` |
//! | too many calls open on the connection | `RESOURCE_EXHAUSTED` | — | `runnel_limit_rejections_total{service, limit="in_flight"}` |
//! | the client's rate is used up | `RESOURCE_EXHAUSTED` | 429 | `…{limit="rate"}` |
//! | the call outlived `request_timeout` | `DEADLINE_EXCEEDED` | — | `…{limit="timeout"}` |
//! | a message over `max_message_bytes` | `RESOURCE_EXHAUSTED` | — | `…{limit="message_size"}` |
//!
//! Health checks and reflection pass without credentials (probes carry none; the schema
//! is public) and are not rate limited, so that a saturated service can still be probed.
//! A permission check ([`crate::policy`]) happens later, in the service, where the topic
//! or query is known.

use crate::SecurityError;
use crate::auth::{AuthError, Authenticator};
use crate::config::{AuthConfig, LimitsConfig};
use crate::incoming::PeerInfo;
use crate::policy::{Caller, Policy};
use axum::extract::connect_info::ConnectInfo;
use futures::future::BoxFuture;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::OwnedSemaphorePermit;
use tonic::{Code, Status};

/// Calls between two sweeps of idle clients out of the rate limiter's table.
const SWEEP_EVERY: u64 = 4096;

/// What every call to one service passes through.
pub struct Guard {
    service: &'static str,
    auth: Authenticator,
    rate: Option<Rate>,
    timeout: Duration,
    max_in_flight: usize,
    open_policy: Arc<Policy>,
}

impl std::fmt::Debug for Guard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guard")
            .field("service", &self.service)
            .field("auth", &self.auth)
            .field("rate", &self.rate.as_ref().map(|r| r.per_second))
            .field("timeout", &self.timeout)
            .finish()
    }
}

struct Rate {
    limiter: DefaultKeyedRateLimiter<String>,
    per_second: u32,
    calls: AtomicU64,
}

/// A refusal, before the service saw the call.
#[derive(Debug)]
enum Refusal {
    Auth(AuthError),
    InFlight(usize),
    Rate(u32),
}

impl Refusal {
    fn status(&self) -> Status {
        match self {
            Refusal::Auth(error) => Status::from(*error),
            Refusal::InFlight(limit) => Status::resource_exhausted(format!(
                "too many calls in progress on this connection (at most {limit}); retry, or open another connection"
            )),
            Refusal::Rate(per_second) => Status::resource_exhausted(format!(
                "rate limit exceeded: at most {per_second} calls per second; retry later"
            )),
        }
    }
}

fn count_limit(service: &'static str, limit: &'static str) {
    metrics::counter!("runnel_limit_rejections_total", "service" => service, "limit" => limit)
        .increment(1);
}

impl Guard {
    /// The guard for `service` (its gRPC name, for metric labels).
    pub fn new(
        service: &'static str,
        auth: &AuthConfig,
        limits: &LimitsConfig,
        timeout: Duration,
    ) -> Result<Arc<Guard>, SecurityError> {
        let rate = NonZeroU32::new(limits.rate_limit).map(|per_second| {
            let burst = NonZeroU32::new(limits.rate_burst).unwrap_or(per_second);
            Rate {
                limiter: RateLimiter::keyed(Quota::per_second(per_second).allow_burst(burst)),
                per_second: per_second.get(),
                calls: AtomicU64::new(0),
            }
        });
        Ok(Arc::new(Guard {
            service,
            auth: Authenticator::new(auth)?,
            rate,
            timeout,
            max_in_flight: limits.max_in_flight_per_connection,
            open_policy: Arc::new(Policy::open()),
        }))
    }

    /// Authenticates and rate-limits one call.
    fn admit(
        &self,
        headers: &http::HeaderMap,
        peer: Option<&PeerInfo>,
        exempt: bool,
    ) -> Result<Caller, Refusal> {
        if exempt {
            return Ok(Caller::new(None, Arc::clone(&self.open_policy)));
        }
        let caller = self.auth.authenticate(headers, peer).map_err(|error| {
            metrics::counter!("runnel_auth_failures_total", "service" => self.service, "reason" => error.reason())
                .increment(1);
            Refusal::Auth(error)
        })?;
        if let Some(rate) = &self.rate {
            // Authenticated callers are limited by name, everyone else by address.
            let key = match (caller.principal(), peer.and_then(|p| p.remote)) {
                (Some(principal), _) => format!("principal:{principal}"),
                (None, Some(remote)) => format!("ip:{}", remote.ip()),
                (None, None) => "unknown".to_owned(),
            };
            if rate.calls.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY == SWEEP_EVERY - 1 {
                rate.limiter.retain_recent();
                rate.limiter.shrink_to_fit();
            }
            if rate.limiter.check_key(&key).is_err() {
                count_limit(self.service, "rate");
                return Err(Refusal::Rate(rate.per_second));
            }
        }
        Ok(caller)
    }
}

/// The gRPC methods let through without credentials: exact paths, so that no path that
/// merely starts like one gets the same pass.
const EXEMPT: [&str; 4] = [
    "/grpc.health.v1.Health/Check",
    "/grpc.health.v1.Health/Watch",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
];

/// Whether a gRPC path is let through without credentials.
fn exempt(path: &str) -> bool {
    EXEMPT.contains(&path)
}

/// The tower layer for a tonic server (`Server::builder().layer(GuardLayer::new(guard))`).
#[derive(Debug, Clone)]
pub struct GuardLayer {
    guard: Arc<Guard>,
}

impl GuardLayer {
    /// The layer over `guard`.
    pub fn new(guard: Arc<Guard>) -> GuardLayer {
        GuardLayer { guard }
    }
}

impl<S> tower::Layer<S> for GuardLayer {
    type Service = GuardService<S>;

    fn layer(&self, inner: S) -> GuardService<S> {
        GuardService {
            inner,
            guard: Arc::clone(&self.guard),
        }
    }
}

/// [`GuardLayer`]'s service.
#[derive(Debug, Clone)]
pub struct GuardService<S> {
    inner: S,
    guard: Arc<Guard>,
}

type GrpcRequest = http::Request<tonic::body::Body>;
type GrpcResponse = http::Response<tonic::body::Body>;

impl<S> tower::Service<GrpcRequest> for GuardService<S>
where
    S: tower::Service<GrpcRequest, Response = GrpcResponse> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = GrpcResponse;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<GrpcResponse, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: GrpcRequest) -> Self::Future {
        // The clone that was made ready is the one to call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let guard = Arc::clone(&self.guard);
        Box::pin(async move {
            let service = guard.service;
            let peer = request.extensions().get::<PeerInfo>().cloned();
            let permit = match &peer {
                Some(peer) => match Arc::clone(&peer.in_flight).try_acquire_owned() {
                    Ok(permit) => Some(permit),
                    Err(_) => {
                        count_limit(service, "in_flight");
                        return Ok(Refusal::InFlight(guard.max_in_flight).status().into_http());
                    }
                },
                None => None,
            };
            let exempt = exempt(request.uri().path());
            let caller = match guard.admit(request.headers(), peer.as_ref(), exempt) {
                Ok(caller) => caller,
                Err(refusal) => return Ok(refusal.status().into_http()),
            };
            request.extensions_mut().insert(caller);
            let response = match tokio::time::timeout(guard.timeout, inner.call(request)).await {
                Ok(response) => response?,
                Err(_) => {
                    count_limit(service, "timeout");
                    return Ok(Status::deadline_exceeded(format!(
                        "the call took longer than the server allows ({})",
                        humantime_duration(guard.timeout)
                    ))
                    .into_http());
                }
            };
            Ok(finish(service, response, permit))
        })
    }
}

fn humantime_duration(duration: Duration) -> String {
    if duration.subsec_nanos() == 0 {
        format!("{}s", duration.as_secs())
    } else {
        format!("{}ms", duration.as_millis())
    }
}

/// Gives the response its proper status where tonic's is not, and keeps the in-flight
/// slot until the response body — a whole stream, for streaming calls — is done.
fn finish(
    service: &'static str,
    mut response: GrpcResponse,
    permit: Option<OwnedSemaphorePermit>,
) -> GrpcResponse {
    // tonic refuses an oversized message with OUT_OF_RANGE; gRPC says RESOURCE_EXHAUSTED.
    if let Some(status) = Status::from_header_map(response.headers())
        && status.code() == Code::OutOfRange
        && status.message().contains("message length too large")
    {
        count_limit(service, "message_size");
        let replaced = Status::resource_exhausted(status.message().to_owned());
        let _ = replaced.add_header(response.headers_mut());
    }
    match permit {
        None => response,
        Some(permit) => response.map(|body| {
            tonic::body::Body::new(Held {
                body,
                _permit: permit,
            })
        }),
    }
}

/// A response body holding its connection's in-flight slot.
struct Held {
    body: tonic::body::Body,
    _permit: OwnedSemaphorePermit,
}

impl http_body::Body for Held {
    type Data = bytes::Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, Status>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// The axum middleware for an HTTP API:
/// `router.layer(axum::middleware::from_fn_with_state(guard, guard::http))`. The caller
/// lands in the request's extensions (`Extension<Caller>`).
pub async fn http(
    axum::extract::State(guard): axum::extract::State<Arc<Guard>>,
    mut request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let peer = request
        .extensions()
        .get::<ConnectInfo<PeerInfo>>()
        .map(|ConnectInfo(peer)| peer.clone());
    match guard.admit(request.headers(), peer.as_ref(), false) {
        Ok(caller) => {
            request.extensions_mut().insert(caller);
            next.run(request).await
        }
        Err(refusal) => {
            let status = refusal.status();
            let code = match refusal {
                Refusal::Auth(_) => http::StatusCode::UNAUTHORIZED,
                Refusal::InFlight(_) | Refusal::Rate(_) => http::StatusCode::TOO_MANY_REQUESTS,
            };
            let body = axum::Json(serde_json::json!({ "error": status.message() }));
            let mut response = (code, body).into_response();
            match refusal {
                Refusal::Auth(_) => {
                    response.headers_mut().insert(
                        http::header::WWW_AUTHENTICATE,
                        http::HeaderValue::from_static("Bearer"),
                    );
                }
                Refusal::Rate(_) => {
                    response.headers_mut().insert(
                        http::header::RETRY_AFTER,
                        http::HeaderValue::from_static("1"),
                    );
                }
                Refusal::InFlight(_) => {}
            }
            response
        }
    }
}

/// The caller of an HTTP request, as [`http`] recorded it; a request that did not pass
/// through the middleware is refused.
pub fn http_caller(request_extensions: &http::Extensions) -> Result<&Caller, Status> {
    request_extensions.get::<Caller>().ok_or_else(|| {
        tracing::error!("an http request reached a handler without passing the guard");
        Status::permission_denied("the caller is not known")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_exact_probe_and_reflection_methods_are_exempt() {
        assert!(exempt("/grpc.health.v1.Health/Check"));
        assert!(exempt(
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
        ));
        assert!(!exempt(
            "/grpc.health.v1.Health/../runnel.v1.Broker/Produce"
        ));
        assert!(!exempt("/grpc.health.v1.Health/Check/"));
        assert!(!exempt("/runnel.v1.Broker/Produce"));
    }

    #[test]
    fn a_guard_admits_by_credentials_and_limits_by_rate() {
        let auth = AuthConfig {
            enabled: true,
            tokens: vec![crate::TokenConfig {
                principal: "p".into(),
                sha256: crate::auth::token_sha256("rnl_t"),
            }],
            ..AuthConfig::default()
        };
        let limits = LimitsConfig {
            rate_limit: 1,
            rate_burst: 2,
            ..LimitsConfig::default()
        };
        let guard = Guard::new("test", &auth, &limits, Duration::from_secs(1)).unwrap();
        let mut headers = http::HeaderMap::new();
        assert!(matches!(
            guard.admit(&headers, None, false),
            Err(Refusal::Auth(AuthError::Missing))
        ));
        // Exempt calls need nothing and use no rate.
        for _ in 0..10 {
            guard.admit(&headers, None, true).unwrap();
        }
        headers.insert(http::header::AUTHORIZATION, "Bearer rnl_t".parse().unwrap());
        assert_eq!(
            guard.admit(&headers, None, false).unwrap().principal(),
            Some("token:p")
        );
        guard.admit(&headers, None, false).unwrap();
        assert!(matches!(
            guard.admit(&headers, None, false),
            Err(Refusal::Rate(1))
        ));
        assert_eq!(Refusal::Rate(1).status().code(), Code::ResourceExhausted);
    }
}
