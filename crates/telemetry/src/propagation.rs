//! W3C trace-context propagation through gRPC metadata and event headers.
//!
//! Outgoing calls inject the current span's context with [`TraceContextInterceptor`];
//! servers extract it with [`server_span`], which tonic's `trace_fn` calls for every request.
//! Events carry the context of the span that ingested them in their `headers` map
//! ([`inject_into_headers`], [`extract_from_headers`]) so that a consumer far downstream —
//! after the broker has stored the event for hours — still continues the same trace.

use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::{Context, global};
use std::collections::HashMap;
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The W3C header that carries the trace and parent span ids.
pub const TRACEPARENT: &str = "traceparent";

struct MetadataInjector<'a>(&'a mut MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(key), Ok(value)) = (
            MetadataKey::from_bytes(key.as_bytes()),
            MetadataValue::try_from(value.as_str()),
        ) {
            self.0.insert(key, value);
        }
    }
}

struct HttpHeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HttpHeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

struct MapCarrier<'a>(&'a HashMap<String, String>);

impl Extractor for MapCarrier<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}

/// Writes `span`'s trace context into gRPC request metadata.
pub fn inject_into_metadata(span: &Span, metadata: &mut MetadataMap) {
    let cx = span.context();
    global::get_text_map_propagator(|p| p.inject_context(&cx, &mut MetadataInjector(metadata)));
}

/// Reads a trace context from gRPC metadata (an empty context when there is none).
pub fn extract_from_metadata(metadata: &MetadataMap) -> Context {
    extract_from_http_headers(&metadata.clone().into_headers())
}

/// Reads a trace context from HTTP headers (an empty context when there is none).
pub fn extract_from_http_headers(headers: &http::HeaderMap) -> Context {
    global::get_text_map_propagator(|p| p.extract(&HttpHeaderExtractor(headers)))
}

/// Writes `span`'s trace context into an event's or result's headers (an empty
/// `tracestate` is left out: it carries nothing).
pub fn inject_into_headers(span: &Span, headers: &mut HashMap<String, String>) {
    let cx = span.context();
    let mut injected = HashMap::new();
    global::get_text_map_propagator(|p| p.inject_context(&cx, &mut injected));
    headers.extend(injected.into_iter().filter(|(_, value)| !value.is_empty()));
}

/// Reads the trace context an event or result carries (empty when it carries none).
pub fn extract_from_headers(headers: &HashMap<String, String>) -> Context {
    global::get_text_map_propagator(|p| p.extract(&MapCarrier(headers)))
}

/// Makes `span` a child of the context carried in `headers`, when there is one.
pub fn continue_trace(span: &Span, headers: &HashMap<String, String>) {
    if headers.contains_key(TRACEPARENT) {
        // Fails only when the span is disabled, in which case there is nothing to link.
        let _ = span.set_parent(extract_from_headers(headers));
    }
}

/// The span a gRPC server opens for each request, continuing the caller's trace.
///
/// Pass it to `tonic::transport::Server::builder().trace_fn(...)`.
pub fn server_span(request: &http::Request<()>) -> Span {
    let path = request.uri().path();
    let span = tracing::info_span!("grpc.server", otel.name = %path, otel.kind = "server", rpc.system = "grpc");
    let _ = span.set_parent(extract_from_http_headers(request.headers()));
    span
}

/// A tonic client interceptor that injects the calling span's context into every request.
#[derive(Debug, Clone, Copy, Default)]
pub struct TraceContextInterceptor;

impl tonic::service::Interceptor for TraceContextInterceptor {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        inject_into_metadata(&Span::current(), request.metadata_mut());
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
    use opentelemetry_sdk::propagation::TraceContextPropagator;
    use opentelemetry_sdk::trace::SdkTracerProvider;
    use tracing_subscriber::layer::SubscriberExt;

    fn with_tracing<T>(f: impl FnOnce() -> T) -> T {
        global::set_text_map_propagator(TraceContextPropagator::new());
        let provider = SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        tracing::subscriber::with_default(subscriber, f)
    }

    fn trace_id(span: &Span) -> opentelemetry::trace::TraceId {
        span.context().span().span_context().trace_id()
    }

    #[test]
    fn context_round_trips_through_grpc_metadata() {
        with_tracing(|| {
            let client = tracing::info_span!("client");
            let mut metadata = MetadataMap::new();
            inject_into_metadata(&client, &mut metadata);
            let header = metadata.get(TRACEPARENT).expect("traceparent injected");
            assert!(header.to_str().unwrap().starts_with("00-"));

            let mut request = http::Request::new(());
            *request.headers_mut() = metadata.into_headers();
            let server = server_span(&request);
            assert_eq!(trace_id(&server), trace_id(&client));
            assert_ne!(trace_id(&client), opentelemetry::trace::TraceId::INVALID);
        });
    }

    #[test]
    fn context_round_trips_through_event_headers() {
        with_tracing(|| {
            let producer = tracing::info_span!("ingest");
            let mut headers = HashMap::new();
            inject_into_headers(&producer, &mut headers);
            assert!(headers.contains_key(TRACEPARENT));
            assert!(headers.values().all(|v| !v.is_empty()), "{headers:?}");

            let consumer = tracing::info_span!("process");
            continue_trace(&consumer, &headers);
            assert_eq!(trace_id(&consumer), trace_id(&producer));
        });
    }

    #[test]
    fn interceptor_injects_the_current_span() {
        with_tracing(|| {
            let span = tracing::info_span!("call");
            let _entered = span.enter();
            let request = tonic::service::Interceptor::call(
                &mut TraceContextInterceptor,
                tonic::Request::new(()),
            )
            .unwrap();
            let cx = extract_from_metadata(request.metadata());
            assert_eq!(cx.span().span_context().trace_id(), trace_id(&span));
        });
    }

    #[test]
    fn missing_or_garbage_context_starts_no_trace() {
        with_tracing(|| {
            let mut headers = HashMap::new();
            headers.insert(TRACEPARENT.to_owned(), "not a traceparent".to_owned());
            let cx = extract_from_headers(&headers);
            assert!(!cx.span().span_context().is_valid());
            let cx = extract_from_headers(&HashMap::new());
            assert!(!cx.span().span_context().is_valid());
        });
    }
}
