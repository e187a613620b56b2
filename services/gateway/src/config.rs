//! The gateway's settings, under `[gateway]` / `RUNNEL_GATEWAY__…`.

use runnel_server::{ConfigError, ListenAddrs, ServerConfig, ServiceConfig};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// What happens to a live client that falls too far behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SlowClientPolicy {
    /// Skip what it missed and tell it: a `gap` event names the last sequence it got, so
    /// it can re-read the rest (`Range`, or reconnect with `Last-Event-ID`).
    DropOldest,
    /// End its stream with an error naming the last sequence it got; it resumes from there
    /// without a gap.
    Disconnect,
}

/// Webhook delivery settings, under `[gateway.webhooks]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhookConfig {
    /// Registrations accepted at once (at most 8192: eight partitions of at most 1024,
    /// whose delivery cursors share one commit).
    pub max_hooks: usize,
    /// Results sent in one delivery (a JSON array).
    pub max_batch: usize,
    /// How long a receiver may take to answer a delivery.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// The first retry's delay; each further retry doubles it, up to `max_backoff`.
    #[serde(with = "humantime_serde")]
    pub initial_backoff: Duration,
    /// The longest delay between retries. Deliveries are retried until they succeed or the
    /// webhook is deleted: at least once.
    #[serde(with = "humantime_serde")]
    pub max_backoff: Duration,
    /// How long a replica may go unheard by the broker before its webhooks are handed to
    /// another replica (the delivery group's session timeout).
    #[serde(with = "humantime_serde")]
    pub session_timeout: Duration,
    /// Targets webhooks may reach although they are not public, or over plain `http://`.
    /// Each entry is an IP network in CIDR form (`"10.1.0.0/16"`, `"::1/128"`; a bare
    /// address is that one address) or an exact host name (`"receiver.internal"`, any
    /// case). Without an entry, a webhook URL must be `https://` and every address its
    /// host is or resolves to must be public: loopback, private, link-local, unique-local,
    /// shared (CGNAT), multicast, reserved, documentation and benchmarking addresses are
    /// refused, at registration and again, after resolving, before every delivery.
    /// A URL is allowlisted — and may be `http://` — when its host name is listed, or its
    /// host is an IP address inside a listed network; an address inside a listed network
    /// may be reached under any name (over `https://`); every address a listed name
    /// resolves to may be reached. Example: `allow = ["127.0.0.1/32"]` for receivers on the
    /// gateway's own host.
    pub allow: Vec<String>,
    /// A PEM file of CA certificates that `https://` receivers' certificates may chain to,
    /// besides the system's trusted roots (for receivers with a private CA).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca: Option<PathBuf>,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        WebhookConfig {
            max_hooks: 1000,
            max_batch: 100,
            timeout: Duration::from_secs(10),
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(60),
            session_timeout: Duration::from_secs(10),
            allow: Vec::new(),
            ca: None,
        }
    }
}

/// The gateway's cache of latest results, under `[gateway.cache]` (see `cache.rs` and
/// `docs/access.md`, "Reads served by the gateway").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// About how much memory the cached results may take; the least valuable series are
    /// evicted past it. 0 turns the cache off: every `Get` asks the store.
    pub max_bytes: u64,
    /// How long a `Get` naming a minimum sequence the live stream has not reached yet
    /// waits for it before asking the store instead.
    #[serde(with = "humantime_serde")]
    pub wait: Duration,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            max_bytes: 64 * 1024 * 1024,
            wait: Duration::from_millis(20),
        }
    }
}

/// Where the gateway listens, where it reads results, and how it serves live clients.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    /// gRPC and admin listen addresses and call limits.
    pub server: ServerConfig,
    /// The store's gRPC URL.
    pub store: String,
    /// Where the HTTP API (JSON, server-sent events, WebSockets, long polling, webhooks,
    /// the dashboard) listens. Loopback by default; a non-loopback address needs
    /// `server.auth` (or `server.allow_unauthenticated`).
    pub http: SocketAddr,
    /// The broker's gRPC URL, where webhook registrations and delivery cursors live, shared
    /// by every gateway replica. Empty: no webhooks (their endpoints answer 503); every
    /// other read works without it.
    pub broker: String,
    /// Deprecated and ignored: the gateway keeps nothing on disk (webhooks live in the
    /// broker). Accepted so that older configurations still load, with a warning.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    /// Live streams (gRPC `Watch`, server-sent events, WebSockets, long polls) served at
    /// once; more are refused with `RESOURCE_EXHAUSTED` / HTTP 503.
    pub max_watchers: usize,
    /// Results (of any query) a live client may fall behind the newest before
    /// `slow_clients` applies to it. Results are shared, not copied per client; this must
    /// be more than the largest burst (one `Put`'s results) a client should absorb.
    pub live_buffer: usize,
    /// What happens to a live client that falls `live_buffer` behind (gRPC `Watch`, which
    /// cannot carry a gap marker, is always disconnected).
    pub slow_clients: SlowClientPolicy,
    /// Recent results kept for clients that reconnect with a cursor; one that resumes from
    /// further back is served from the store's change feed.
    pub resume_buffer: usize,
    /// The longest a long poll may wait (`timeout=` is capped to it).
    #[serde(with = "humantime_serde")]
    pub max_poll_wait: Duration,
    /// Other services whose gRPC health the dashboard shows, by name, e.g.
    /// `{ collector = "http://127.0.0.1:7101" }` (the store is always shown). With an
    /// `analyzer`, the gateway also lists its queries (`/v1/queries`) and answers a read
    /// of a query it does not run, and the store holds no result of, with `NOT_FOUND`.
    pub pipeline: BTreeMap<String, String>,
    /// Webhook delivery.
    pub webhooks: WebhookConfig,
    /// Web pages, by origin (`scheme://host[:port]`), whose browsers may register or delete
    /// webhooks and open WebSockets here, besides the gateway's own (its dashboard); `"*"`
    /// allows any page. A request with another `Origin` is refused with 403. Requests
    /// without one (curl, servers) are not affected.
    pub allowed_origins: Vec<String>,
    /// The cache of latest results that answers `Get` without asking the store.
    pub cache: CacheConfig,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            server: ServerConfig::loopback(7105, 9105),
            store: "http://127.0.0.1:7104".into(),
            http: SocketAddr::from(([127, 0, 0, 1], 8080)),
            broker: String::new(),
            data_dir: None,
            max_watchers: 20_000,
            live_buffer: 65_536,
            slow_clients: SlowClientPolicy::DropOldest,
            resume_buffer: 65_536,
            max_poll_wait: Duration::from_secs(60),
            pipeline: BTreeMap::new(),
            webhooks: WebhookConfig::default(),
            allowed_origins: Vec::new(),
            cache: CacheConfig::default(),
        }
    }
}

fn is_url(url: &str) -> bool {
    url.starts_with("http://") || url.starts_with("https://")
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
        let invalid = |key: &str, message: String| Err(ConfigError::invalid(section, key, message));
        self.server.validate(section)?;
        self.server.check_exposure(section, "http", self.http)?;
        if !is_url(&self.store) {
            return invalid(
                "store",
                format!("{:?} is not an http:// or https:// URL", self.store),
            );
        }
        if !self.broker.is_empty() && !is_url(&self.broker) {
            return invalid(
                "broker",
                format!(
                    "{:?} is not an http:// or https:// URL (leave it empty for no webhooks)",
                    self.broker
                ),
            );
        }
        if !(1..=1_000_000).contains(&self.max_watchers) {
            return invalid("max_watchers", "must be between 1 and 1000000".into());
        }
        if !(16..=1_000_000).contains(&self.live_buffer) {
            return invalid("live_buffer", "must be between 16 and 1000000".into());
        }
        if !(16..=10_000_000).contains(&self.resume_buffer) {
            return invalid("resume_buffer", "must be between 16 and 10000000".into());
        }
        if self.max_poll_wait.is_zero() || self.max_poll_wait > Duration::from_secs(600) {
            return invalid("max_poll_wait", "must be between 1ms and 10m".into());
        }
        if let Some((name, url)) = self.pipeline.iter().find(|(_, url)| !is_url(url)) {
            return invalid(
                &format!("pipeline.{name}"),
                format!("{url:?} is not an http:// or https:// URL"),
            );
        }
        for (i, origin) in self.allowed_origins.iter().enumerate() {
            if let Err(reason) = crate::origin::check_origin(origin) {
                return invalid(&format!("allowed_origins[{i}]"), reason);
            }
        }
        if self.cache.max_bytes > 1 << 40 {
            return invalid("cache.max_bytes", "must be at most 1 TiB".into());
        }
        if self.cache.wait > Duration::from_secs(10) {
            return invalid("cache.wait", "must be at most 10s".into());
        }
        let hooks = &self.webhooks;
        if !(1..=8192).contains(&hooks.max_hooks) {
            return invalid("webhooks.max_hooks", "must be between 1 and 8192".into());
        }
        if hooks.session_timeout < Duration::from_millis(100) {
            return invalid("webhooks.session_timeout", "must be at least 100ms".into());
        }
        if !(1..=10_000).contains(&hooks.max_batch) {
            return invalid("webhooks.max_batch", "must be between 1 and 10000".into());
        }
        if hooks.timeout.is_zero() {
            return invalid("webhooks.timeout", "must be more than 0s".into());
        }
        if hooks.initial_backoff.is_zero() || hooks.initial_backoff > hooks.max_backoff {
            return invalid(
                "webhooks.initial_backoff",
                "must be more than 0s and at most webhooks.max_backoff".into(),
            );
        }
        for (i, entry) in hooks.allow.iter().enumerate() {
            if let Err(reason) = crate::webhooks::Allowed::parse(entry) {
                return invalid(&format!("webhooks.allow[{i}]"), reason);
            }
        }
        if let Some(ca) = &hooks.ca
            && !ca.is_file()
        {
            return invalid(
                "webhooks.ca",
                format!("{} is not a readable file", ca.display()),
            );
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
        assert_eq!(config.slow_clients, SlowClientPolicy::DropOldest);
    }

    #[test]
    fn bad_values_name_their_key() {
        type Case = (fn(&mut GatewayConfig), &'static str);
        let cases: [Case; 11] = [
            (
                |c| c.cache.wait = Duration::from_secs(60),
                "gateway.cache.wait",
            ),
            (|c| c.store = "127.0.0.1:7104".into(), "gateway.store"),
            (|c| c.broker = "localhost:7102".into(), "gateway.broker"),
            (|c| c.max_watchers = 0, "gateway.max_watchers"),
            (|c| c.live_buffer = 1, "gateway.live_buffer"),
            (
                |c| {
                    c.pipeline.insert("broker".into(), "localhost:7102".into());
                },
                "gateway.pipeline.broker",
            ),
            (|c| c.webhooks.max_batch = 0, "gateway.webhooks.max_batch"),
            (
                |c| c.webhooks.initial_backoff = Duration::from_secs(600),
                "gateway.webhooks.initial_backoff",
            ),
            (
                |c| c.webhooks.allow = vec!["127.0.0.1/8".into(), "*.internal".into()],
                "gateway.webhooks.allow[1]",
            ),
            (
                |c| c.webhooks.allow = vec!["10.0.0.0/33".into()],
                "gateway.webhooks.allow[0]",
            ),
            (
                |c| c.webhooks.ca = Some("/nonexistent/ca.pem".into()),
                "gateway.webhooks.ca",
            ),
        ];
        for (mutate, key) in cases {
            let mut config = GatewayConfig::default();
            mutate(&mut config);
            let message = config.validate().unwrap_err().to_string();
            assert!(message.contains(key), "{message} should name {key}");
        }
    }
}
