//! The security settings every service shares, under `[<service>.server]`:
//!
//! | table | what it sets |
//! |---|---|
//! | `tls` | TLS on the service's listeners; `client_ca` turns on mutual TLS |
//! | `connect` | how the service calls the others: trusted CA, its client certificate, a bearer token |
//! | `auth` | who may call: static tokens (stored hashed), JWT, client certificates; and the grants |
//! | `limits` | connections, streams, in-flight calls, per-client rates, handshake time |
//!
//! Every struct denies unknown keys, and [`Invalid`] names the key (relative to
//! `server.`) that is wrong, so the service's loader can report `broker.server.tls.cert:
//! …` before it binds a port.

use crate::policy::{Action, PrincipalKind};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A setting that is not acceptable: `key` is below the service's `server` table.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {message}")]
pub struct Invalid {
    /// The dotted key, e.g. `tls.cert`.
    pub key: String,
    /// What is wrong and what would be right.
    pub message: String,
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> Invalid {
    Invalid {
        key: key.into(),
        message: message.into(),
    }
}

fn file_exists(key: &str, path: &Path) -> Result<(), Invalid> {
    if path.is_file() {
        Ok(())
    } else {
        Err(invalid(
            key,
            format!("{} is not a readable file", path.display()),
        ))
    }
}

/// Whether clients of a TLS listener must present a certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuth {
    /// Every client presents a certificate signed by `client_ca`, or the handshake fails.
    #[default]
    Required,
    /// A certificate is checked if presented; a client without one may still
    /// authenticate with a token.
    Optional,
}

/// TLS on a service's listeners (`[<service>.server.tls]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The certificate chain, PEM, leaf first.
    pub cert: PathBuf,
    /// Its private key, PEM (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// Mutual TLS: client certificates are verified against the CA certificates in this
    /// PEM file. Without it no client certificate is asked for.
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
    /// With `client_ca`: whether a client certificate is required or only checked when
    /// presented. The admin port never requires one (probes and scrapers have none).
    #[serde(default)]
    pub client_auth: ClientAuth,
    /// How often the files are checked for changes; changed certificates are used for
    /// new connections without a restart.
    #[serde(default = "default_reload", with = "humantime_serde")]
    pub reload_interval: Duration,
}

fn default_reload() -> Duration {
    Duration::from_secs(10)
}

fn check_reload(key: &str, interval: Duration) -> Result<(), Invalid> {
    if !(Duration::from_millis(10)..=Duration::from_secs(24 * 3600)).contains(&interval) {
        return Err(invalid(key, "must be between 10ms and 24h"));
    }
    Ok(())
}

impl TlsConfig {
    /// Checks the settings and that the files exist.
    pub fn validate(&self) -> Result<(), Invalid> {
        file_exists("tls.cert", &self.cert)?;
        file_exists("tls.key", &self.key)?;
        if let Some(ca) = &self.client_ca {
            file_exists("tls.client_ca", ca)?;
        }
        check_reload("tls.reload_interval", self.reload_interval)
    }
}

/// How a service (or a client) calls Runnel services (`[<service>.server.connect]`).
/// `https://` URLs are verified against `ca`; `http://` URLs are plaintext.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConnectConfig {
    /// The CA certificates (PEM) that servers' certificates must chain to. Required for
    /// `https://` URLs: Runnel does not trust the system's public CAs for its own links.
    pub ca: Option<PathBuf>,
    /// A client certificate chain (PEM) to present: mutual TLS.
    pub cert: Option<PathBuf>,
    /// Its private key (PEM).
    pub key: Option<PathBuf>,
    /// The name to verify the server's certificate for, when it is not the URL's host.
    pub server_name: Option<String>,
    /// A file holding a bearer token (or a JWT) sent with every call. Reloaded when it
    /// changes, so a token can be rotated under a running service.
    pub token_file: Option<PathBuf>,
    /// How often the files are checked for changes.
    #[serde(with = "humantime_serde")]
    pub reload_interval: Option<Duration>,
}

impl ConnectConfig {
    /// Checks the settings and that the files exist.
    pub fn validate(&self) -> Result<(), Invalid> {
        if self.cert.is_some() != self.key.is_some() {
            return Err(invalid(
                "connect.cert",
                "connect.cert and connect.key go together",
            ));
        }
        for (key, path) in [
            ("connect.ca", &self.ca),
            ("connect.cert", &self.cert),
            ("connect.key", &self.key),
            ("connect.token_file", &self.token_file),
        ] {
            if let Some(path) = path {
                file_exists(key, path)?;
            }
        }
        if let Some(name) = &self.server_name
            && rustls_pki_types::ServerName::try_from(name.as_str()).is_err()
        {
            return Err(invalid(
                "connect.server_name",
                format!("{name:?} is not a DNS name or IP address"),
            ));
        }
        if let Some(interval) = self.reload_interval {
            check_reload("connect.reload_interval", interval)?;
        }
        Ok(())
    }

    /// The reload interval, defaulted.
    pub fn reload_every(&self) -> Duration {
        self.reload_interval.unwrap_or_else(default_reload)
    }
}

/// A static bearer token: only its SHA-256 is configured, so the configuration does not
/// hold the secret (`runnel auth token` makes a token and its hash).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// Who presents it: a name (`sensors`), which authenticates as `token:sensors` — the
    /// principal its grants name. (`token:sensors` here means the same.)
    pub principal: String,
    /// Hex SHA-256 of the token.
    pub sha256: String,
}

/// A JWT signature algorithm Runnel accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum JwtAlgorithm {
    /// HMAC with SHA-256 and a shared secret.
    HS256,
    /// RSA PKCS#1 v1.5 with SHA-256 and a public key (PEM or JWKS).
    RS256,
}

/// JWT authentication (`[<service>.server.auth.jwt]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    /// The one algorithm accepted; a token signed otherwise is refused.
    pub algorithm: JwtAlgorithm,
    /// HS256: a file holding the shared secret (its bytes as they are, trailing newline
    /// trimmed).
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
    /// RS256: the signer's public key, PEM.
    #[serde(default)]
    pub public_key_file: Option<PathBuf>,
    /// RS256: a JWKS document; the token's `kid` picks the key.
    #[serde(default)]
    pub jwks_file: Option<PathBuf>,
    /// The required `iss`.
    pub issuer: String,
    /// The required `aud` (one of the token's audiences).
    pub audience: String,
    /// The claim naming the caller.
    #[serde(default = "default_principal_claim")]
    pub principal_claim: String,
    /// Clock skew allowed on `exp` and `nbf`.
    #[serde(default = "default_leeway", with = "humantime_serde")]
    pub leeway: Duration,
    /// How often the key files are checked for changes (key rotation).
    #[serde(default = "default_reload", with = "humantime_serde")]
    pub reload_interval: Duration,
}

fn default_principal_claim() -> String {
    "sub".into()
}

fn default_leeway() -> Duration {
    Duration::from_secs(30)
}

impl JwtConfig {
    fn validate(&self) -> Result<(), Invalid> {
        let keys = [
            self.secret_file.is_some(),
            self.public_key_file.is_some(),
            self.jwks_file.is_some(),
        ];
        match (self.algorithm, keys) {
            (JwtAlgorithm::HS256, [true, false, false]) => {}
            (JwtAlgorithm::HS256, _) => {
                return Err(invalid(
                    "auth.jwt.secret_file",
                    "HS256 takes a secret_file and no public key",
                ));
            }
            (JwtAlgorithm::RS256, [false, true, false] | [false, false, true]) => {}
            (JwtAlgorithm::RS256, _) => {
                return Err(invalid(
                    "auth.jwt.public_key_file",
                    "RS256 takes one of public_key_file or jwks_file, and no secret",
                ));
            }
        }
        for (key, path) in [
            ("auth.jwt.secret_file", &self.secret_file),
            ("auth.jwt.public_key_file", &self.public_key_file),
            ("auth.jwt.jwks_file", &self.jwks_file),
        ] {
            if let Some(path) = path {
                file_exists(key, path)?;
            }
        }
        if self.issuer.is_empty() {
            return Err(invalid("auth.jwt.issuer", "must not be empty"));
        }
        if self.audience.is_empty() {
            return Err(invalid("auth.jwt.audience", "must not be empty"));
        }
        if self.principal_claim.is_empty() {
            return Err(invalid("auth.jwt.principal_claim", "must not be empty"));
        }
        if self.leeway > Duration::from_secs(600) {
            return Err(invalid("auth.jwt.leeway", "must be at most 10m"));
        }
        check_reload("auth.jwt.reload_interval", self.reload_interval)
    }
}

/// What one principal may do (`[[<service>.server.auth.grants]]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantConfig {
    /// The caller, typed by what authenticated it: `token:<a token's principal>`,
    /// `jwt:<a JWT's principal claim>`, `cert:<a client certificate's common name>` — or
    /// `*` for every authenticated caller.
    pub principal: String,
    /// What it may do: `produce`, `consume`, `manage` (topics); `read_results`,
    /// `write_results`, `manage` (queries).
    pub allow: Vec<Action>,
    /// The topics it applies to: names, prefixes ending in `*`, or `*`.
    #[serde(default)]
    pub topics: Vec<String>,
    /// The queries it applies to, the same way.
    #[serde(default)]
    pub queries: Vec<String>,
    /// The consumer groups it applies to (`consume`: join, commit, describe), the same
    /// way. Wildcards never cover the reserved `runnel-…` groups, nor topic wildcards the
    /// reserved `_…` topics: those are granted by their own names or prefixes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
}

/// Longest principal, topic or query pattern in a grant.
const MAX_NAME: usize = 256;

fn check_pattern(key: &str, pattern: &str) -> Result<(), Invalid> {
    let body = pattern.strip_suffix('*').unwrap_or(pattern);
    if pattern.is_empty() || pattern.len() > MAX_NAME || body.contains('*') {
        return Err(invalid(
            key,
            format!("{pattern:?} is not a name, a prefix ending in *, or *"),
        ));
    }
    Ok(())
}

/// Who may call, and what they may do (`[<service>.server.auth]`).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Off by default: every call is allowed (safe only on loopback, which is why a
    /// non-loopback listener without authentication refuses to start).
    pub enabled: bool,
    /// A client certificate verified by the TLS listener's `client_ca` names the caller
    /// (its subject common name): how the pipeline's own services authenticate.
    pub mtls: bool,
    /// Static bearer tokens.
    pub tokens: Vec<TokenConfig>,
    /// JWT bearer tokens.
    pub jwt: Option<JwtConfig>,
    /// What each caller may do. Nothing is allowed that no grant allows.
    pub grants: Vec<GrantConfig>,
}

impl AuthConfig {
    /// Checks the settings; `tls` is the listener TLS it relies on for `mtls`.
    pub fn validate(&self, tls: Option<&TlsConfig>) -> Result<(), Invalid> {
        if !self.enabled {
            return Ok(());
        }
        if !self.mtls && self.tokens.is_empty() && self.jwt.is_none() {
            return Err(invalid(
                "auth.enabled",
                "nobody could authenticate: configure auth.tokens, auth.jwt or auth.mtls",
            ));
        }
        if self.mtls && tls.is_none_or(|tls| tls.client_ca.is_none()) {
            return Err(invalid(
                "auth.mtls",
                "needs tls.client_ca, the CA that vouches for client certificates",
            ));
        }
        for (i, token) in self.tokens.iter().enumerate() {
            if token.principal.is_empty() || token.principal.len() > MAX_NAME {
                return Err(invalid(
                    format!("auth.tokens[{i}].principal"),
                    format!("needs 1-{MAX_NAME} bytes"),
                ));
            }
            if let Some((kind, _)) = PrincipalKind::split(&token.principal)
                && kind != PrincipalKind::Token
            {
                return Err(invalid(
                    format!("auth.tokens[{i}].principal"),
                    format!(
                        "{:?} names another kind of caller: a token's principal is a name, and it authenticates as \"token:<name>\"",
                        token.principal
                    ),
                ));
            }
            let hex_ok = token.sha256.len() == 64 && hex::decode(&token.sha256).is_ok();
            if !hex_ok {
                return Err(invalid(
                    format!("auth.tokens[{i}].sha256"),
                    "must be 64 hex digits: the SHA-256 of the token (see `runnel auth token`)",
                ));
            }
        }
        if let Some(jwt) = &self.jwt {
            jwt.validate()?;
        }
        for (i, grant) in self.grants.iter().enumerate() {
            let key = |k: &str| format!("auth.grants[{i}].{k}");
            if grant.principal.is_empty() || grant.principal.len() > MAX_NAME {
                return Err(invalid(
                    key("principal"),
                    format!("needs 1-{MAX_NAME} bytes"),
                ));
            }
            PrincipalKind::check_grant_principal(&grant.principal)
                .map_err(|reason| invalid(key("principal"), reason))?;
            if grant.allow.is_empty() {
                return Err(invalid(key("allow"), "grants nothing"));
            }
            for pattern in &grant.topics {
                check_pattern(&key("topics"), pattern)?;
            }
            for pattern in &grant.queries {
                check_pattern(&key("queries"), pattern)?;
            }
            for pattern in &grant.groups {
                check_pattern(&key("groups"), pattern)?;
            }
            if !grant.groups.is_empty() && !grant.allow.contains(&Action::Consume) {
                return Err(invalid(
                    key("groups"),
                    "only consume applies to consumer groups",
                ));
            }
            for action in &grant.allow {
                let applies = match action {
                    Action::Produce => !grant.topics.is_empty(),
                    Action::Consume => !grant.topics.is_empty() || !grant.groups.is_empty(),
                    Action::ReadResults | Action::WriteResults => !grant.queries.is_empty(),
                    Action::Manage => !grant.topics.is_empty() || !grant.queries.is_empty(),
                };
                if !applies {
                    return Err(invalid(
                        key("allow"),
                        format!("{action} needs the topics, queries or groups it applies to"),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Limits on what one connection or client may hold or ask (`[<service>.server.limits]`).
/// Message sizes (`max_message_bytes`) and the call timeout (`request_timeout`) sit in
/// `server` itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Open connections per listener; the next waits in the kernel's backlog.
    pub max_connections: usize,
    /// HTTP/2 streams a client may open at once on one connection (advertised to the
    /// client, which then queues the rest).
    pub max_concurrent_streams: u32,
    /// Calls (streams included, for as long as they are open) in progress on one
    /// connection; more are refused with `RESOURCE_EXHAUSTED`.
    pub max_in_flight_per_connection: usize,
    /// Calls per second per client (its principal, or its IP address when nothing is
    /// authenticated); 0 turns rate limiting off. Over it: `RESOURCE_EXHAUSTED` / 429.
    pub rate_limit: u32,
    /// Calls a client may make in a burst above the rate; 0 means `rate_limit`.
    pub rate_burst: u32,
    /// How long a client may take to complete the TLS handshake.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// How long an HTTP/1 client may take to send a request's head (its request line and
    /// headers), from the connection's start or the previous response; then the
    /// connection is closed. Bounds what a slow client holds (slowloris).
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_connections: 10_000,
            max_concurrent_streams: 1024,
            max_in_flight_per_connection: 512,
            rate_limit: 0,
            rate_burst: 0,
            handshake_timeout: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(10),
        }
    }
}

impl LimitsConfig {
    /// Checks the settings.
    pub fn validate(&self) -> Result<(), Invalid> {
        if !(1..=1_000_000).contains(&self.max_connections) {
            return Err(invalid(
                "limits.max_connections",
                "must be between 1 and 1000000",
            ));
        }
        if !(1..=65_536).contains(&self.max_concurrent_streams) {
            return Err(invalid(
                "limits.max_concurrent_streams",
                "must be between 1 and 65536",
            ));
        }
        if !(1..=65_536).contains(&self.max_in_flight_per_connection) {
            return Err(invalid(
                "limits.max_in_flight_per_connection",
                "must be between 1 and 65536",
            ));
        }
        if self.rate_limit == 0 && self.rate_burst != 0 {
            return Err(invalid(
                "limits.rate_burst",
                "needs limits.rate_limit, the rate it bursts above",
            ));
        }
        if !(Duration::from_millis(100)..=Duration::from_secs(120))
            .contains(&self.handshake_timeout)
        {
            return Err(invalid(
                "limits.handshake_timeout",
                "must be between 100ms and 2m",
            ));
        }
        if !(Duration::from_millis(100)..=Duration::from_secs(120))
            .contains(&self.header_read_timeout)
        {
            return Err(invalid(
                "limits.header_read_timeout",
                "must be between 100ms and 2m",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(allow: Vec<Action>, topics: &[&str], queries: &[&str]) -> GrantConfig {
        GrantConfig {
            principal: "token:p".into(),
            allow,
            topics: topics.iter().map(|s| s.to_string()).collect(),
            queries: queries.iter().map(|s| s.to_string()).collect(),
            groups: Vec::new(),
        }
    }

    fn token_auth() -> AuthConfig {
        AuthConfig {
            enabled: true,
            tokens: vec![TokenConfig {
                principal: "p".into(),
                sha256: "ab".repeat(32),
            }],
            ..AuthConfig::default()
        }
    }

    #[test]
    fn disabled_auth_needs_nothing_and_enabled_auth_needs_a_way_in() {
        AuthConfig::default().validate(None).unwrap();
        let nobody = AuthConfig {
            enabled: true,
            ..AuthConfig::default()
        };
        assert_eq!(nobody.validate(None).unwrap_err().key, "auth.enabled");
        token_auth().validate(None).unwrap();
        let mtls = AuthConfig {
            enabled: true,
            mtls: true,
            ..AuthConfig::default()
        };
        assert_eq!(mtls.validate(None).unwrap_err().key, "auth.mtls");
    }

    #[test]
    fn bad_tokens_and_grants_name_their_key() {
        let mut auth = token_auth();
        auth.tokens[0].sha256 = "secret-in-the-clear".into();
        assert_eq!(
            auth.validate(None).unwrap_err().key,
            "auth.tokens[0].sha256"
        );

        let cases = [
            (grant(vec![], &["t"], &[]), "auth.grants[0].allow"),
            (
                grant(vec![Action::Produce], &[], &["q"]),
                "auth.grants[0].allow",
            ),
            (
                grant(vec![Action::ReadResults], &["t"], &[]),
                "auth.grants[0].allow",
            ),
            (
                grant(vec![Action::Produce], &["a*b"], &[]),
                "auth.grants[0].topics",
            ),
            (
                grant(vec![Action::ReadResults], &[], &[""]),
                "auth.grants[0].queries",
            ),
            (
                GrantConfig {
                    groups: vec!["g*".into()],
                    ..grant(vec![Action::Produce], &["t"], &[])
                },
                "auth.grants[0].groups",
            ),
            (
                GrantConfig {
                    groups: vec!["a*b".into()],
                    ..grant(vec![Action::Consume], &[], &[])
                },
                "auth.grants[0].groups",
            ),
            (
                GrantConfig {
                    principal: "p".into(),
                    ..grant(vec![Action::Produce], &["t"], &[])
                },
                "auth.grants[0].principal",
            ),
        ];
        for (bad, key) in cases {
            let mut auth = token_auth();
            auth.grants = vec![bad];
            assert_eq!(auth.validate(None).unwrap_err().key, key);
        }
        let mut auth = token_auth();
        auth.grants = vec![
            grant(vec![Action::Produce, Action::Manage], &["sensors.*"], &[]),
            grant(vec![Action::ReadResults], &[], &["*"]),
            GrantConfig {
                principal: "*".into(),
                groups: vec!["dashboards.*".into()],
                ..grant(vec![Action::Consume], &[], &[])
            },
        ];
        auth.validate(None).unwrap();

        // A grant written before principals were typed fails with how to write it now.
        let mut auth = token_auth();
        auth.grants = vec![GrantConfig {
            principal: "analyzer".into(),
            ..grant(vec![Action::Produce], &["t"], &[])
        }];
        let error = auth.validate(None).unwrap_err().to_string();
        assert!(
            error.contains("auth.grants[0].principal") && error.contains("\"cert:analyzer\""),
            "{error}"
        );
        // A token's principal is a name, or typed as a token.
        let mut auth = token_auth();
        auth.tokens[0].principal = "token:p".into();
        auth.validate(None).unwrap();
        auth.tokens[0].principal = "cert:p".into();
        assert_eq!(
            auth.validate(None).unwrap_err().key,
            "auth.tokens[0].principal"
        );
    }

    #[test]
    fn jwt_keys_must_fit_the_algorithm() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "s").unwrap();
        let mut jwt = JwtConfig {
            algorithm: JwtAlgorithm::HS256,
            secret_file: Some(secret.clone()),
            public_key_file: None,
            jwks_file: None,
            issuer: "https://issuer".into(),
            audience: "runnel".into(),
            principal_claim: "sub".into(),
            leeway: Duration::from_secs(30),
            reload_interval: Duration::from_secs(10),
        };
        jwt.validate().unwrap();
        jwt.algorithm = JwtAlgorithm::RS256;
        assert_eq!(jwt.validate().unwrap_err().key, "auth.jwt.public_key_file");
        jwt.secret_file = None;
        jwt.jwks_file = Some(dir.path().join("missing.json"));
        assert_eq!(jwt.validate().unwrap_err().key, "auth.jwt.jwks_file");
        jwt.jwks_file = Some(secret);
        jwt.audience = String::new();
        assert_eq!(jwt.validate().unwrap_err().key, "auth.jwt.audience");
    }

    #[test]
    fn limits_and_connect_settings_are_checked() {
        LimitsConfig::default().validate().unwrap();
        let limits = LimitsConfig {
            rate_burst: 5,
            ..LimitsConfig::default()
        };
        assert_eq!(limits.validate().unwrap_err().key, "limits.rate_burst");
        let limits = LimitsConfig {
            max_in_flight_per_connection: 0,
            ..LimitsConfig::default()
        };
        assert_eq!(
            limits.validate().unwrap_err().key,
            "limits.max_in_flight_per_connection"
        );

        ConnectConfig::default().validate().unwrap();
        let connect = ConnectConfig {
            cert: Some("/x.pem".into()),
            ..ConnectConfig::default()
        };
        assert_eq!(connect.validate().unwrap_err().key, "connect.cert");
        let connect = ConnectConfig {
            server_name: Some("not a name!".into()),
            ..ConnectConfig::default()
        };
        assert_eq!(connect.validate().unwrap_err().key, "connect.server_name");
    }
}
