//! A minimal OTLP/gRPC trace receiver that keeps every span it is sent, for asserting on
//! traces that cross process boundaries.

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use std::collections::{BTreeSet, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio::sync::watch;
use tokio_stream::wrappers::TcpListenerStream;

/// One received span, flattened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedSpan {
    /// The `service.name` of the resource that sent it.
    pub service: String,
    /// The span's name.
    pub name: String,
    /// 16-byte trace id, hex.
    pub trace_id: String,
    /// 8-byte span id, hex.
    pub span_id: String,
    /// The parent's span id, hex; empty for a root span.
    pub parent_span_id: String,
}

/// Receives spans on an ephemeral port until dropped.
pub struct OtlpReceiver {
    /// Where to point `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub addr: SocketAddr,
    spans: Arc<Mutex<Vec<ReceivedSpan>>>,
    /// Bumped after every export, so waiters wake on new spans instead of polling.
    exports: watch::Receiver<u64>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Clone)]
struct Sink {
    spans: Arc<Mutex<Vec<ReceivedSpan>>>,
    exports: Arc<watch::Sender<u64>>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl ReceivedSpan {
    /// The span as one line of JSON, as `runnel-otlp-sink` prints it.
    pub fn to_json(&self) -> String {
        serde_json::json!({
            "service": self.service,
            "name": self.name,
            "trace_id": self.trace_id,
            "span_id": self.span_id,
            "parent_span_id": self.parent_span_id,
        })
        .to_string()
    }

    /// Reads a line [`ReceivedSpan::to_json`] wrote; `None` for anything else.
    pub fn from_json(line: &str) -> Option<ReceivedSpan> {
        let value: serde_json::Value = serde_json::from_str(line).ok()?;
        let field = |name: &str| Some(value.get(name)?.as_str()?.to_owned());
        Some(ReceivedSpan {
            service: field("service")?,
            name: field("name")?,
            trace_id: field("trace_id")?,
            span_id: field("span_id")?,
            parent_span_id: field("parent_span_id")?,
        })
    }
}

/// Every span of an OTLP export, flattened.
pub fn received_spans(request: ExportTraceServiceRequest) -> Vec<ReceivedSpan> {
    let mut received = Vec::new();
    for resource_spans in request.resource_spans {
        let service = resource_spans
            .resource
            .iter()
            .flat_map(|r| r.attributes.iter())
            .find(|kv| kv.key == "service.name")
            .and_then(|kv| kv.value.as_ref()?.value.as_ref())
            .map(|v| match v {
                Value::StringValue(s) => s.clone(),
                other => format!("{other:?}"),
            })
            .unwrap_or_default();
        for scope in resource_spans.scope_spans {
            for span in scope.spans {
                received.push(ReceivedSpan {
                    service: service.clone(),
                    name: span.name,
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent_span_id: hex(&span.parent_span_id),
                });
            }
        }
    }
    received
}

#[tonic::async_trait]
impl TraceService for Sink {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let received = received_spans(request.into_inner());
        self.spans.lock().expect("span sink lock").extend(received);
        self.exports.send_modify(|n| *n += 1);
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

impl OtlpReceiver {
    /// Starts the receiver on 127.0.0.1:0.
    pub async fn start() -> std::io::Result<OtlpReceiver> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let spans = Arc::new(Mutex::new(Vec::new()));
        let (exports_tx, exports) = watch::channel(0);
        let service = TraceServiceServer::new(Sink {
            spans: spans.clone(),
            exports: Arc::new(exports_tx),
        });
        let task = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(TcpListenerStream::new(listener))
                .await;
        });
        Ok(OtlpReceiver {
            addr,
            spans,
            exports,
            task,
        })
    }

    /// Waits until `done` holds for the spans of `trace_id`, re-checking after every export;
    /// `None` if it still does not after `within`.
    pub async fn wait_for_trace<T>(
        &self,
        trace_id: &str,
        within: std::time::Duration,
        mut done: impl FnMut(&[ReceivedSpan]) -> Option<T>,
    ) -> Option<T> {
        let mut exports = self.exports.clone();
        let wait = async {
            loop {
                exports.borrow_and_update();
                if let Some(found) = done(&self.trace(trace_id)) {
                    return found;
                }
                if exports.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        };
        tokio::time::timeout(within, wait).await.ok()
    }

    /// Every span received so far with this trace id.
    pub fn trace(&self, trace_id: &str) -> Vec<ReceivedSpan> {
        self.spans
            .lock()
            .expect("span sink lock")
            .iter()
            .filter(|s| s.trace_id == trace_id)
            .cloned()
            .collect()
    }
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The services one event's trace crosses, as their spans name them (`service.name`).
pub const PIPELINE_SERVICES: [&str; 5] = [
    "runnel-collector",
    "runnel-broker",
    "runnel-analyzer",
    "runnel-store",
    "runnel-gateway",
];

/// The hops whose spans must link up: (caller, callee), where a span of the callee has a
/// span of the caller as its parent. The analyzer continues the trace that the collector
/// put into the event (through the broker), and the gateway the one the analyzer put into
/// the result (through the store).
pub const PIPELINE_HOPS: [(&str, &str); 4] = [
    ("runnel-collector", "runnel-broker"),
    ("runnel-collector", "runnel-analyzer"),
    ("runnel-analyzer", "runnel-store"),
    ("runnel-analyzer", "runnel-gateway"),
];

/// Whether one trace's `spans` have all arrived: a span from every pipeline service, and
/// none whose parent is still missing. (Each service exports on its own schedule.)
pub fn trace_is_complete(spans: &[ReceivedSpan]) -> bool {
    let services: BTreeSet<&str> = spans.iter().map(|s| s.service.as_str()).collect();
    let ids: HashSet<&str> = spans.iter().map(|s| s.span_id.as_str()).collect();
    let orphans = spans
        .iter()
        .filter(|s| !s.parent_span_id.is_empty() && !ids.contains(s.parent_span_id.as_str()))
        .count();
    PIPELINE_SERVICES.iter().all(|s| services.contains(s)) && orphans == 0
}

/// Checks a complete trace's shape: exactly one root span, and a parent/child link across
/// every one of [`PIPELINE_HOPS`]. The error says what is missing.
pub fn check_trace_hops(spans: &[ReceivedSpan]) -> Result<(), String> {
    let roots = spans.iter().filter(|s| s.parent_span_id.is_empty()).count();
    if roots != 1 {
        return Err(format!("{roots} root spans, not one: {spans:#?}"));
    }
    let service_of = |id: &str| {
        spans
            .iter()
            .find(|s| s.span_id == id)
            .map(|s| s.service.as_str())
    };
    let crossings: BTreeSet<(&str, &str)> = spans
        .iter()
        .filter_map(|s| Some((service_of(&s.parent_span_id)?, s.service.as_str())))
        .filter(|(from, to)| from != to)
        .collect();
    match PIPELINE_HOPS.iter().find(|hop| !crossings.contains(hop)) {
        Some(hop) => Err(format!("missing hop {hop:?} in {crossings:?}")),
        None => Ok(()),
    }
}
