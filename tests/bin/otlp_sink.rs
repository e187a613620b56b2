//! `runnel-otlp-sink`: an OTLP/gRPC trace receiver that prints every span it is sent as one
//! JSON line on stdout (`{"service", "name", "trace_id", "span_id", "parent_span_id"}`),
//! and nothing else.
//!
//! It is the trace endpoint of the compose end-to-end test: it runs as a container next to
//! the services (`tests/compose/otlp-sink.yml`), and the test follows its output with
//! `docker logs --follow`. It is also a way to look at Runnel's traces where no trace UI
//! can be pulled: `OTEL_EXPORTER_OTLP_ENDPOINT=http://<sink>:4317`.
//!
//! Usage: `runnel-otlp-sink [LISTEN_ADDR]` (default `0.0.0.0:4317`); stops on SIGTERM or
//! SIGINT. Logs go to stderr.

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use runnel_e2e::otlp::received_spans;
use std::io::Write;
use std::net::SocketAddr;
use std::process::ExitCode;
use tokio::signal::unix::{SignalKind, signal};

struct PrintSpans;

#[tonic::async_trait]
impl TraceService for PrintSpans {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let lines: String = received_spans(request.into_inner())
            .iter()
            .map(|span| span.to_json() + "\n")
            .collect();
        // One write per export, so that concurrent exports never interleave within a line.
        let mut stdout = std::io::stdout().lock();
        stdout
            .write_all(lines.as_bytes())
            .and_then(|()| stdout.flush())
            .map_err(|e| tonic::Status::internal(format!("stdout: {e}")))?;
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "0.0.0.0:4317".into());
    let addr: SocketAddr = match addr.parse() {
        Ok(addr) => addr,
        Err(error) => {
            eprintln!("runnel-otlp-sink: {addr:?} is not a socket address: {error}");
            return ExitCode::from(2);
        }
    };
    // As PID 1 of a container the process has no default signal dispositions: without
    // handlers, SIGTERM would be ignored until the runtime's SIGKILL.
    let (mut term, mut int) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(term), Ok(int)) => (term, int),
        (Err(error), _) | (_, Err(error)) => {
            eprintln!("runnel-otlp-sink: cannot install signal handlers: {error}");
            return ExitCode::FAILURE;
        }
    };
    eprintln!("runnel-otlp-sink listening otlp={addr}");
    let served = tonic::transport::Server::builder()
        .add_service(TraceServiceServer::new(PrintSpans))
        .serve_with_shutdown(addr, async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        })
        .await;
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("runnel-otlp-sink: {error}");
            ExitCode::FAILURE
        }
    }
}
