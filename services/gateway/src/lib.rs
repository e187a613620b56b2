//! The data access tier: the client-facing read API for query results.
//!
//! The same reads — the latest result for a key (`Get`), a key's history by window
//! (`Range`), a query's top keys in its most recent window (`TopK`) and live results
//! filtered by query, keys or key prefix and values (`Watch`) — are served over gRPC
//! (`runnel.v1.Gateway`) and over HTTP: JSON, server-sent events, WebSockets and long
//! polling, described by an OpenAPI document at `/openapi.json`. Webhooks push matching
//! results to registered URLs, signed and retried until accepted; their registrations and
//! delivery cursors live in the broker, so the gateway keeps no state of its own and any
//! number of replicas share the work. A dashboard at
//! `/dashboard/` shows the pipeline's live results and health.
//!
//! Live results come from one stream from the store that every live client of this
//! gateway shares ([`live`]); the same stream keeps a cache of each read series' latest
//! result current ([`cache`]), which answers `Get` without asking the store, and other
//! reads go to the store ([`results`]). So any number of gateways can serve one store, a client resumes after the last sequence it saw without a gap, and a slow client
//! is bounded and told (or cut off) instead of slowing the pipeline or anyone else.
//!
//! [`run`] is the whole service, runnable in-process (tests, the all-in-one CLI) as well as
//! from the `runnel-gateway` binary.

mod cache;
pub mod config;
mod dashboard;
mod error;
mod grpc;
mod http;
mod live;
mod origin;
mod results;
mod webhooks;

pub use config::{CacheConfig, GatewayConfig, SlowClientPolicy, WebhookConfig};
pub use error::GatewayError;

use runnel_server::{Listeners, ServeError, ServiceConfig, Shutdown};
use std::collections::BTreeMap;
use std::sync::Arc;

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
    let store = results::connect(
        &config.store,
        &config.server.connect,
        config.server.max_message_bytes,
    )?;
    let hub = live::Hub::new(
        store.clone(),
        config.live_buffer,
        config.resume_buffer,
        config.max_watchers,
        config.slow_clients,
        (config.cache.max_bytes > 0).then(|| cache::Latest::new(config.cache.max_bytes)),
        shutdown.clone(),
    );
    let follower = tokio::spawn(Arc::clone(&hub).follow());
    if let Some(dir) = &config.data_dir {
        tracing::warn!(
            data_dir = %dir.display(),
            "gateway.data_dir is deprecated and ignored: webhooks live in the broker now (gateway.broker) and the gateway keeps nothing on disk; remove it, and register again any webhook kept in its webhooks.redb"
        );
    }
    // Webhooks live in the broker, shared by every replica; without one there are none.
    let webhooks = if config.broker.is_empty() {
        tracing::info!("no gateway.broker: webhooks are off");
        None
    } else {
        let broker = runnel_security::connect_lazy(&config.broker, &config.server.connect)
            .map_err(|source| GatewayError::BrokerUrl {
                url: config.broker.clone(),
                source,
            })?;
        Some(webhooks::Webhooks::start(
            broker,
            config.server.max_message_bytes,
            config.server.request_timeout,
            Arc::clone(&hub),
            config.webhooks.clone(),
            shutdown.clone(),
        )?)
    };
    let mut pipeline = BTreeMap::new();
    for (name, url) in std::iter::once(("store", &config.store))
        .chain(config.pipeline.iter().map(|(n, u)| (n.as_str(), u)))
    {
        let channel =
            runnel_security::connect_lazy(url, &config.server.connect).map_err(|source| {
                GatewayError::StoreUrl {
                    url: url.clone(),
                    source,
                }
            })?;
        pipeline.insert(name.to_owned(), channel);
    }
    // The analyzer owns the queries: with it, a read of a query that does not exist is
    // told from one of a query that has no results yet.
    let analyzer = pipeline.get("analyzer").map(|channel| {
        results::Analyzer::new(channel.clone())
            .max_decoding_message_size(config.server.max_message_bytes)
    });
    let results = results::Results::new(
        store,
        analyzer,
        config.server.request_timeout,
        Arc::clone(&hub),
        config.cache.wait,
    );

    let app = http::router(http::Api {
        results: results.clone(),
        hub: Arc::clone(&hub),
        webhooks: webhooks.clone(),
        max_poll_wait: config.max_poll_wait,
        pipeline: Arc::new(pipeline),
        origins: Arc::new(origin::Origins::new(&config.allowed_origins)),
    });
    // TLS, authentication and limits as on the gRPC port; small JSON answers and live
    // events do not wait for a delayed ACK (the listener turns Nagle off).
    let http_server = tokio::spawn(runnel_server::serve_http(
        runnel_proto::service_name::GATEWAY,
        http_listener,
        app,
        &config.server,
        shutdown.clone(),
    )?);

    let grace = shutdown.clone();
    let served = runnel_server::serve_grpc!(
        grpc::GatewayRoutes::new(grpc::GatewayService::new(results, hub)),
        listeners,
        &config.server,
        shutdown
    )
    .await;
    // Live HTTP streams end on shutdown, so the HTTP drain takes what is left of the grace.
    let drained =
        tokio::time::timeout(grace.remaining(config.server.drain_timeout), http_server).await;
    follower.abort();
    if let Some(webhooks) = webhooks {
        webhooks.stop().await;
    }
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
