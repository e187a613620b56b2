//! Runnel's security, in one place for all five services and their clients:
//!
//! - [`tls`]: TLS (rustls, ring) on every listener, mutual TLS with a client CA, and the
//!   certificates reloaded from their files when they change;
//! - [`incoming`]: the accept loop every listener shares — connection limit, handshakes off
//!   the loop with a deadline, the peer's address and certificate name;
//! - [`connect`]: the one way a service or client builds its outgoing channel (TLS or
//!   plaintext, client certificate, bearer token, trace context);
//! - [`auth`]: who is calling — static tokens stored hashed, JWT (HS256/RS256, key file or
//!   JWKS), client certificates;
//! - [`policy`]: what they may do — per-topic and per-query grants, checked where a request
//!   names a topic or query;
//! - [`guard`]: authentication, in-flight and rate limits and the call timeout, as a tower
//!   layer for gRPC and an axum middleware for HTTP, each refusal with its status and
//!   counter;
//! - [`certs`]: a development CA and service certificates (`runnel certs`);
//! - [`config`]: the settings, validated before any port is bound.
//!
//! The threat model and how to turn each part on are in `docs/security.md`.

pub mod auth;
pub mod certs;
pub mod config;
pub mod connect;
pub mod guard;
pub mod incoming;
pub mod policy;
mod reload;
pub mod tls;

pub use auth::{AuthError, Authenticator};
pub use config::{
    AuthConfig, ClientAuth, ConnectConfig, GrantConfig, Invalid, JwtAlgorithm, JwtConfig,
    LimitsConfig, TlsConfig, TokenConfig,
};
pub use connect::{
    KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT, MAX_FRAME_BYTES, Peer, connect, connect_lazy,
    connect_lazy_with_token,
};
pub use guard::{Guard, GuardLayer};
pub use incoming::{AcceptOptions, Incoming, PeerInfo, SecureStream, accept};
pub use policy::{
    AccessDenied, Action, Caller, Policy, PrincipalKind, RESERVED_GROUP_PREFIX,
    RESERVED_TOPIC_PREFIX, Resource, authorize, caller,
};
pub use tls::{Protocol, ServerTls};

use std::path::PathBuf;

/// What can go wrong setting security up.
#[derive(Debug, thiserror::Error)]
pub enum SecurityError {
    /// A certificate, key, token or JWKS file could not be read or written.
    #[error("{}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// Material that does not parse or does not fit; the message names the setting.
    #[error("{0}")]
    Invalid(String),
    /// A service could not be reached, or the TLS handshake with it failed.
    #[error("cannot connect to {url}: {message}")]
    Connect {
        /// The URL.
        url: String,
        /// Why, with its causes.
        message: String,
    },
}
