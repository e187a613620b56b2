//! Tracing and OpenTelemetry for every Runnel service.
//!
//! [`init`] installs one `tracing` subscriber: human-readable or JSON logs on stderr, and an
//! OpenTelemetry layer whose spans are exported over OTLP/gRPC when the standard
//! `OTEL_EXPORTER_OTLP_ENDPOINT` variable is set (the other standard `OTEL_*` variables, such
//! as `OTEL_BSP_SCHEDULE_DELAY` and `OTEL_TRACES_SAMPLER`, apply as usual).
//!
//! The OpenTelemetry layer is installed even when nothing is exported, so trace context is
//! always carried from hop to hop: a service that exports still links up with its
//! neighbours. [`propagation`] moves W3C `traceparent` through gRPC metadata (client and
//! server side) and through the headers of every event, which is how one event's spans share
//! a trace id from the collector through the broker to the gateway.

pub mod propagation;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithTonicConfig as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// The standard variable that switches OTLP export on.
pub const OTLP_ENDPOINT_ENV: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";

/// How log lines are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines (the default).
    #[default]
    Human,
    /// One JSON object per line, for log shippers.
    Json,
}

/// Why telemetry could not start.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The OTLP exporter could not be built from its configuration.
    #[error("otlp exporter: {0}")]
    Exporter(String),
    /// A global subscriber was already installed.
    #[error("tracing subscriber already installed: {0}")]
    AlreadyInstalled(String),
}

/// Keeps telemetry running; [`TelemetryGuard::shutdown`] flushes spans still buffered.
#[must_use = "dropping the guard without shutdown may lose buffered spans"]
pub struct TelemetryGuard {
    provider: SdkTracerProvider,
    exporting: bool,
}

impl TelemetryGuard {
    /// Whether spans are exported over OTLP.
    pub fn exporting(&self) -> bool {
        self.exporting
    }

    /// Flushes buffered spans and stops the exporter. Call it last, after the drain.
    pub fn shutdown(self) {
        if self.exporting
            && let Err(error) = self.provider.force_flush()
        {
            eprintln!("telemetry flush failed: {error}");
        }
        if let Err(error) = self.provider.shutdown() {
            // Shutting down twice or with nothing to export is not worth a scary log line.
            tracing::debug!(%error, "telemetry shutdown");
        }
    }
}

/// Installs logging and tracing for `service` (used as the OpenTelemetry `service.name`).
///
/// Must be called inside a Tokio runtime: the exporter runs on it. `RUST_LOG` filters logs
/// (default `info`).
pub fn init(service: &str, format: LogFormat) -> Result<TelemetryGuard, TelemetryError> {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());

    let endpoint = std::env::var(OTLP_ENDPOINT_ENV)
        .ok()
        .filter(|v| !v.trim().is_empty());
    let resource = Resource::builder()
        .with_service_name(service.to_owned())
        .build();
    let mut builder = SdkTracerProvider::builder().with_resource(resource);
    if let Some(endpoint) = &endpoint {
        // The exporter reads the other standard OTEL_* variables (headers, compression,
        // timeout) itself; the channel is ours, for its keepalive.
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_channel(exporter_channel(endpoint)?)
            .build()
            .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
        // The async-runtime processor drives tonic on our Tokio runtime; the default
        // thread-based processor cannot poll tonic's I/O.
        let processor =
            BatchSpanProcessor::builder(exporter, opentelemetry_sdk::runtime::Tokio).build();
        builder = builder.with_span_processor(processor);
    }
    let provider = builder.build();
    let tracer = provider.tracer(service.to_owned());

    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Spans of the exporter's own transport must not feed back into the exporter.
    let otel_filter = EnvFilter::new("info,h2=off,hyper=off,tonic=off,tower=off,opentelemetry=off");
    let otel = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_filter(otel_filter);
    let registry = tracing_subscriber::registry().with(otel);
    let result = match format {
        LogFormat::Human => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_filter(filter),
            )
            .try_init(),
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(std::io::stderr)
                    .with_filter(filter),
            )
            .try_init(),
    };
    result.map_err(|e| TelemetryError::AlreadyInstalled(e.to_string()))?;
    if let Some(endpoint) = &endpoint {
        tracing::info!(service, endpoint, "exporting traces over otlp");
    }
    Ok(TelemetryGuard {
        provider,
        exporting: endpoint.is_some(),
    })
}

use tracing_subscriber::Layer as _;

/// The OTLP exporter's channel to `endpoint` (or the traces-specific endpoint, when set),
/// lazily connected, with HTTP/2 keepalive — like the channels between services. Without
/// it, a collector connection that died unseen (this container came back under a new
/// address, say) was never noticed: every export timed out on it, and the spans were lost
/// for good.
fn exporter_channel(endpoint: &str) -> Result<tonic::transport::Channel, TelemetryError> {
    let endpoint = std::env::var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        .ok()
        .filter(|v| !v.trim().is_empty())
        .unwrap_or_else(|| endpoint.to_owned());
    // The exporter's own timeout (the standard variables, in milliseconds; 10 s by
    // default), which the channel must share.
    let timeout = [
        "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT",
        "OTEL_EXPORTER_OTLP_TIMEOUT",
    ]
    .iter()
    .find_map(|var| std::env::var(var).ok()?.trim().parse::<u64>().ok())
    .map_or(
        std::time::Duration::from_secs(10),
        std::time::Duration::from_millis,
    );
    let channel = tonic::transport::Endpoint::from_shared(endpoint.clone())
        .map_err(|e| TelemetryError::Exporter(format!("{endpoint:?}: {e}")))?
        .timeout(timeout)
        .connect_timeout(std::time::Duration::from_secs(5))
        .http2_keep_alive_interval(std::time::Duration::from_secs(10))
        .keep_alive_timeout(std::time::Duration::from_secs(5))
        .keep_alive_while_idle(true)
        .connect_lazy();
    Ok(channel)
}
