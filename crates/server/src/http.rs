//! Serving an HTTP/1.1 API (an axum router) on an accepted [`Incoming`]: hyper directly,
//! with a timer, so that a client that sends a request's head slowly is cut off after
//! `limits.header_read_timeout` — `axum::serve` installs no timer, which leaves hyper's
//! header-read timeout off and lets a slow client hold its connection for as long as it
//! likes. Otherwise it serves as `axum::serve` does: each request carries the caller's
//! [`PeerInfo`] as `ConnectInfo`, upgrades (WebSockets) work, and shutdown stops accepting,
//! lets every connection finish its response, and waits for them.

use axum::extract::connect_info::ConnectInfo;
use futures::StreamExt;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use runnel_security::{Incoming, PeerInfo};
use std::pin::pin;
use std::time::Duration;
use tokio::sync::watch;
use tower::ServiceExt;

use crate::Shutdown;

/// Serves `app` on every connection of `incoming` until `shutdown`, then waits for the
/// open connections to finish.
pub(crate) async fn serve(
    mut incoming: Incoming,
    app: axum::Router,
    header_read_timeout: Duration,
    shutdown: Shutdown,
) -> std::io::Result<()> {
    // Dropped at shutdown: every connection then closes once its response is done.
    let (closing, closed) = watch::channel(());
    // Every connection holds a receiver; `open.closed()` resolves when none is left.
    let (open, connection) = watch::channel(());
    loop {
        let stream = tokio::select! {
            next = incoming.next() => match next {
                Some(Ok(stream)) => stream,
                Some(Err(error)) => {
                    tracing::debug!(%error, "accepting an http connection failed");
                    continue;
                }
                None => break,
            },
            () = shutdown.wait() => break,
        };
        let peer: PeerInfo = stream.peer().clone();
        let service =
            app.clone()
                .map_request(move |mut request: http::Request<hyper::body::Incoming>| {
                    request.extensions_mut().insert(ConnectInfo(peer.clone()));
                    request.map(axum::body::Body::new)
                });
        let service = TowerToHyperService::new(service);
        let mut closed = closed.clone();
        let connection = connection.clone();
        tokio::spawn(async move {
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(header_read_timeout);
            let mut served = pin!(
                builder
                    .serve_connection(TokioIo::new(stream), service)
                    .with_upgrades()
            );
            let mut draining = false;
            loop {
                tokio::select! {
                    result = served.as_mut() => {
                        if let Err(error) = result {
                            tracing::debug!(%error, "http connection ended");
                        }
                        break;
                    }
                    _ = closed.changed(), if !draining => {
                        // The sender is gone: finish the response in progress, then close.
                        served.as_mut().graceful_shutdown();
                        draining = true;
                    }
                }
            }
            drop(connection);
        });
    }
    drop(incoming);
    drop(closing);
    drop(connection);
    open.closed().await;
    Ok(())
}
