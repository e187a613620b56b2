//! A minimal OTLP/gRPC trace receiver that keeps every span it is sent, for asserting on
//! traces that cross process boundaries.

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
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

#[tonic::async_trait]
impl TraceService for Sink {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut received = Vec::new();
        for resource_spans in request.into_inner().resource_spans {
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
