//! The gateway's settings, under `[gateway]` / `RUNNEL_GATEWAY__…`.

use runnel_server::{ConfigError, ListenAddrs, ServerConfig, ServiceConfig};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;

/// Where the gateway listens, where it reads results, and how many live clients it serves.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    /// gRPC and admin listen addresses and call limits.
    pub server: ServerConfig,
    /// The store's gRPC URL.
    pub store: String,
    /// Where the HTTP/JSON and server-sent-events API listens. Loopback by default; a
    /// non-loopback address needs `server.auth` (or `server.allow_unauthenticated`).
    pub http: SocketAddr,
    /// Live streams (gRPC `Watch` and server-sent events together) served at once; more
    /// are refused with `RESOURCE_EXHAUSTED` / HTTP 503 rather than slow everyone down.
    pub max_watchers: usize,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            server: ServerConfig::loopback(7105, 9105),
            store: "http://127.0.0.1:7104".into(),
            http: SocketAddr::from(([127, 0, 0, 1], 8080)),
            max_watchers: 1024,
        }
    }
}

impl ServiceConfig for GatewayConfig {
    const SECTION: &'static str = "gateway";

    fn server(&self) -> &ServerConfig {
        &self.server
    }

    fn listen(&self) -> ListenAddrs {
        ListenAddrs {
            grpc: self.server.grpc,
            admin: self.server.admin,
            http: Some(self.http),
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let section = Self::SECTION;
        self.server.validate(section)?;
        self.server.check_exposure(section, "http", self.http)?;
        if !(self.store.starts_with("http://") || self.store.starts_with("https://")) {
            return Err(ConfigError::invalid(
                section,
                "store",
                format!("{:?} is not an http:// or https:// URL", self.store),
            ));
        }
        if !(1..=100_000).contains(&self.max_watchers) {
            return Err(ConfigError::invalid(
                section,
                "max_watchers",
                "must be between 1 and 100000",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_loopback() {
        let config = GatewayConfig::default();
        config.validate().unwrap();
        assert!(config.http.ip().is_loopback());
        assert_eq!(config.listen().http, Some(config.http));
    }

    #[test]
    fn bad_values_name_their_key() {
        type Case = (fn(&mut GatewayConfig), &'static str);
        let cases: [Case; 2] = [
            (|c| c.store = "127.0.0.1:7104".into(), "gateway.store"),
            (|c| c.max_watchers = 0, "gateway.max_watchers"),
        ];
        for (mutate, key) in cases {
            let mut config = GatewayConfig::default();
            mutate(&mut config);
            let message = config.validate().unwrap_err().to_string();
            assert!(message.contains(key), "{message} should name {key}");
        }
    }
}
