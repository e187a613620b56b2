//! The data access tier: the client-facing read API for query results.
//!
//! The same reads — the latest result for a key (`Get`), a key's history by window
//! (`Range`) and live results filtered by query and key prefix (`Watch`) — are served over
//! gRPC (`runnel.v1.Gateway`), over HTTP/JSON, and as server-sent events. The gateway keeps
//! no state of its own: it reads from the store, so any number of gateways can serve one
//! store. Live streams are bounded in number (`max_watchers`) and in buffer, so a slow
//! client is cut off with a clear error instead of slowing the pipeline.
//!
//! [`run`] is the whole service, runnable in-process (tests, the all-in-one CLI) as well as
//! from the `runnel-gateway` binary.

pub mod config;
mod error;
mod grpc;
mod http;
mod results;

pub use config::GatewayConfig;
pub use error::GatewayError;

use runnel_proto::v1::gateway_server::GatewayServer;
use runnel_server::{Listeners, ServeError, ServiceConfig, Shutdown};

/// Runs the gateway on `listeners` (its `http` listener serves the HTTP API) until
/// `shutdown` fires, then drains both APIs within the drain timeout.
pub async fn run(
    config: GatewayConfig,
    listeners: Listeners,
    shutdown: Shutdown,
) -> Result<(), GatewayError> {
    config.validate()?;
    let Some(http_listener) = listeners.http else {
        return Err(GatewayError::Serve(ServeError::Service(
            "the gateway needs an http listener".into(),
        )));
    };
    let results = results::Results::new(
        &config.store,
        &config.server.connect,
        config.server.max_message_bytes,
        config.server.request_timeout,
        config.max_watchers,
        shutdown.clone(),
    )?;

    // TLS, authentication and limits as on the gRPC port; small JSON answers and SSE
    // events do not wait for a delayed ACK (the listener turns Nagle off).
    let http_server = tokio::spawn(runnel_server::serve_http(
        runnel_proto::service_name::GATEWAY,
        http_listener,
        http::router(results.clone()),
        &config.server,
        shutdown.clone(),
    )?);

    let max_message = config.server.max_message_bytes;
    let grpc = GatewayServer::new(grpc::GatewayService::new(results))
        .max_decoding_message_size(max_message)
        .max_encoding_message_size(max_message);
    let served = runnel_server::serve(
        runnel_proto::service_name::GATEWAY,
        tonic::service::Routes::new(grpc),
        listeners.grpc,
        listeners.admin,
        &config.server,
        shutdown,
    )
    .await;
    // Live HTTP streams end on shutdown, so the HTTP drain is bounded like the gRPC one.
    let drained = tokio::time::timeout(config.server.drain_timeout, http_server).await;
    served?;
    match drained {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(error))) => return Err(GatewayError::Http(error)),
        Ok(Err(join)) => return Err(GatewayError::Http(std::io::Error::other(join))),
        Err(_) => tracing::warn!("http drain timed out; abandoning open requests"),
    }
    tracing::info!("gateway stopped");
    Ok(())
}
