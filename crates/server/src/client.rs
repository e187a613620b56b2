//! Channels from one service to the next (collector → broker, analyzer → broker and
//! store, gateway → store), set up one way.
//!
//! Connected lazily — the peer may start later, or restart — and with HTTP/2 keepalive, so
//! that a connection whose peer vanished without a word (a network cut, a lost node, an
//! address that changed while the connection was idle or only receiving) fails within
//! [`KEEPALIVE_INTERVAL`] + [`KEEPALIVE_TIMEOUT`] instead of holding a stream open forever.
//! Without it, an analyzer cut off the network and put back under a new address waited on
//! its subscriptions indefinitely: the compose end-to-end test shows the difference.

use std::time::Duration;
use tonic::transport::{Channel, Endpoint};

/// How often an HTTP/2 PING checks that the peer is still there (also while no call is in
/// flight).
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// How long a PING may go unanswered before the connection counts as dead.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long establishing a connection may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The endpoint for a peer service at `url`, with the settings above.
pub fn endpoint(url: &str) -> Result<Endpoint, tonic::transport::Error> {
    Ok(Endpoint::from_shared(url.to_owned())?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true))
}

/// A lazily connected channel to the peer service at `url`.
pub fn channel(url: &str) -> Result<Channel, tonic::transport::Error> {
    Ok(endpoint(url)?.connect_lazy())
}
