//! Layered service configuration with the `config` crate.
//!
//! Sources, later ones overriding earlier ones:
//! 1. the service's built-in defaults (`Default`);
//! 2. a TOML file — `--config <path>` (must exist) or `runnel.toml` in the working
//!    directory (optional) — whose `[<service>]` table holds the service's settings, so one
//!    file can configure the whole pipeline;
//! 3. environment variables `RUNNEL_<SERVICE>__<KEY>`, with `__` between nested keys, e.g.
//!    `RUNNEL_BROKER__SERVER__GRPC=0.0.0.0:7102`.
//!
//! Unknown keys are rejected, and [`ServiceConfig::validate`] runs before any port is bound.
//! Every error is one line that names the offending key.

use runnel_security::{AuthConfig, ConnectConfig, LimitsConfig, TlsConfig};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

/// The file read when no `--config` is given, if it exists.
pub const DEFAULT_FILE: &str = "runnel.toml";

/// A configuration problem, reported as one line naming the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A value is present but not acceptable.
    #[error("invalid configuration: {key}: {message}")]
    Invalid {
        /// The full dotted key, e.g. `broker.partitions`.
        key: String,
        /// What is wrong, and what would be right.
        message: String,
    },
    /// The sources could not be read or parsed into the service's settings.
    #[error("invalid configuration: {0}")]
    Load(String),
}

impl ConfigError {
    /// An invalid value at `section.key`.
    pub fn invalid(section: &str, key: &str, message: impl Into<String>) -> Self {
        ConfigError::Invalid {
            key: format!("{section}.{key}"),
            message: message.into(),
        }
    }
}

/// Settings every service's servers share, under `[<service>.server]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Where the gRPC API listens. Loopback by default; a non-loopback address needs
    /// `auth` (or `allow_unauthenticated`).
    pub grpc: SocketAddr,
    /// Where the admin HTTP port (`/metrics`, `/ready`, `/live`) listens. It serves no
    /// data and takes no credentials, so it may listen anywhere (probes and scrapers).
    pub admin: SocketAddr,
    /// The grace period of a stop, from the signal: how long a stopping service waits for
    /// in-flight calls and then its own last steps (flushes, checkpoints) before it gives
    /// up on them — one budget for all of them, not one each.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// The longest a unary call may take before it fails with `Cancelled`/`DeadlineExceeded`.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// The largest gRPC message accepted, in bytes; a larger one is refused with
    /// `RESOURCE_EXHAUSTED`.
    pub max_message_bytes: usize,
    /// TLS on every listener of the service (`[<service>.server.tls]`); plaintext when
    /// absent.
    pub tls: Option<TlsConfig>,
    /// How the service calls the other services: CA, client certificate, token.
    pub connect: ConnectConfig,
    /// Who may call the service's API, and what they may do. Off by default.
    pub auth: AuthConfig,
    /// Connection, stream, in-flight and rate limits.
    pub limits: LimitsConfig,
    /// Serve an API on a non-loopback address with authentication off. Refused unless
    /// set: anyone who can reach the port could then read and write everything.
    pub allow_unauthenticated: bool,
}

impl ServerConfig {
    /// Loopback defaults on the given ports.
    pub fn loopback(grpc_port: u16, admin_port: u16) -> Self {
        ServerConfig {
            grpc: SocketAddr::from(([127, 0, 0, 1], grpc_port)),
            admin: SocketAddr::from(([127, 0, 0, 1], admin_port)),
            drain_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            max_message_bytes: 4 * 1024 * 1024,
            tls: None,
            connect: ConnectConfig::default(),
            auth: AuthConfig::default(),
            limits: LimitsConfig::default(),
            allow_unauthenticated: false,
        }
    }

    /// Checks the shared settings; `section` is the service's table name.
    pub fn validate(&self, section: &str) -> Result<(), ConfigError> {
        let key = |k: &str| format!("server.{k}");
        if self.drain_timeout > Duration::from_secs(600) {
            return Err(ConfigError::invalid(
                section,
                &key("drain_timeout"),
                "must be at most 10m",
            ));
        }
        if self.request_timeout.is_zero() {
            return Err(ConfigError::invalid(
                section,
                &key("request_timeout"),
                "must be more than 0s",
            ));
        }
        if !(1024..=256 * 1024 * 1024).contains(&self.max_message_bytes) {
            return Err(ConfigError::invalid(
                section,
                &key("max_message_bytes"),
                "must be between 1024 and 268435456",
            ));
        }
        let security = |invalid: runnel_security::Invalid| {
            ConfigError::invalid(section, &key(&invalid.key), invalid.message)
        };
        if let Some(tls) = &self.tls {
            tls.validate().map_err(security)?;
        }
        self.connect.validate().map_err(security)?;
        self.auth.validate(self.tls.as_ref()).map_err(security)?;
        self.limits.validate().map_err(security)?;
        self.check_exposure(section, "server.grpc", self.grpc)
    }

    /// Refuses an API listener on a non-loopback address while nothing is authenticated,
    /// unless `allow_unauthenticated` says that is intended. `key` names the address's
    /// setting (`server.grpc`, or `http` for the gateway's HTTP API).
    pub fn check_exposure(
        &self,
        section: &str,
        key: &str,
        addr: SocketAddr,
    ) -> Result<(), ConfigError> {
        if addr.ip().is_loopback() || self.auth.enabled || self.allow_unauthenticated {
            return Ok(());
        }
        Err(ConfigError::invalid(
            section,
            key,
            format!(
                "{addr} is reachable from other machines and nothing is authenticated: \
                 configure server.auth (docs/security.md), or set \
                 server.allow_unauthenticated = true if that is intended"
            ),
        ))
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig::loopback(0, 0)
    }
}

/// The addresses a service listens on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenAddrs {
    /// The gRPC API.
    pub grpc: SocketAddr,
    /// The admin HTTP port.
    pub admin: SocketAddr,
    /// A public HTTP API, for services that have one (the gateway).
    pub http: Option<SocketAddr>,
}

/// What the scaffolding needs to know about a service's configuration.
pub trait ServiceConfig: DeserializeOwned + Serialize + Default + Send + 'static {
    /// The service's name: its table in the file and the `<SERVICE>` in its env variables.
    const SECTION: &'static str;

    /// Keys (below the service's table, dotted) whose environment variable is a
    /// comma-separated list, e.g. `jetstream.servers`.
    const LIST_KEYS: &'static [&'static str] = &[];

    /// The shared server settings.
    fn server(&self) -> &ServerConfig;

    /// The addresses to bind.
    fn listen(&self) -> ListenAddrs {
        ListenAddrs {
            grpc: self.server().grpc,
            admin: self.server().admin,
            http: None,
        }
    }

    /// Checks every setting; the error names the first bad key.
    fn validate(&self) -> Result<(), ConfigError>;
}

/// Loads `C` from its defaults, then `file` (or `runnel.toml` if present), then the
/// environment, and validates it.
pub fn load<C: ServiceConfig>(file: Option<&Path>) -> Result<C, ConfigError> {
    load_from(file, std::env::vars())
}

/// Like [`load`], with the environment given explicitly (for tests).
pub fn load_from<C: ServiceConfig>(
    file: Option<&Path>,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<C, ConfigError> {
    let section = C::SECTION;
    let defaults = config::Config::try_from(&Wrapper {
        inner: C::default(),
        section,
    })
    .map_err(|e| ConfigError::Load(e.to_string()))?;
    let mut builder = config::Config::builder().add_source(defaults);
    match file {
        Some(path) => {
            if !path.exists() {
                return Err(ConfigError::Load(format!(
                    "config file {} does not exist",
                    path.display()
                )));
            }
            builder = builder.add_source(config::File::from(path).format(config::FileFormat::Toml));
        }
        None => {
            builder = builder.add_source(
                config::File::with_name(DEFAULT_FILE)
                    .format(config::FileFormat::Toml)
                    .required(false),
            );
        }
    }
    let prefix = format!("RUNNEL_{}__", section.to_ascii_uppercase());
    let env: config::Map<String, String> = env
        .into_iter()
        .filter(|(k, _)| k.starts_with(&prefix))
        .collect();
    let mut environment = config::Environment::with_prefix("RUNNEL")
        .prefix_separator("_")
        .separator("__")
        .try_parsing(true)
        .source(Some(env));
    if !C::LIST_KEYS.is_empty() {
        environment = environment.list_separator(",");
        for key in C::LIST_KEYS {
            environment = environment.with_list_parse_key(&format!("{section}.{key}"));
        }
    }
    builder = builder.add_source(environment);
    let merged = builder
        .build()
        .map_err(|e| ConfigError::Load(e.to_string()))?;
    let table: config::Value = merged
        .get(section)
        .map_err(|e| ConfigError::Load(one_line(e.to_string())))?;
    // Deserialising through serde_path_to_error names the nested key that failed
    // (`broker.server.grpc`), where the config crate alone would name only the table.
    let parsed: C = serde_path_to_error::deserialize(table).map_err(|e| {
        let key = e.path().to_string();
        let message = one_line(e.into_inner().to_string());
        // The config crate appends its own (less precise) "for key …" to some messages.
        let message = match message.split_once(" for key `") {
            Some((message, _)) => message.to_owned(),
            None => message,
        };
        if key == "." {
            ConfigError::Load(format!("{section}: {message}"))
        } else {
            ConfigError::Invalid {
                key: format!("{section}.{key}"),
                message,
            }
        }
    })?;
    parsed.validate()?;
    Ok(parsed)
}

fn one_line(s: String) -> String {
    s.lines().collect::<Vec<_>>().join(" ")
}

/// Serialises the defaults under the service's table name.
struct Wrapper<C> {
    inner: C,
    section: &'static str,
}

impl<C: Serialize> Serialize for Wrapper<C> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = serializer.serialize_map(Some(1))?;
        map.serialize_entry(self.section, &self.inner)?;
        map.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, default)]
    struct Example {
        server: ServerConfig,
        partitions: u32,
        data_dir: String,
        peers: Vec<String>,
    }

    impl Default for Example {
        fn default() -> Self {
            Example {
                server: ServerConfig::loopback(7000, 9000),
                partitions: 4,
                data_dir: "data".into(),
                peers: vec!["a".into()],
            }
        }
    }

    impl ServiceConfig for Example {
        const SECTION: &'static str = "example";
        const LIST_KEYS: &'static [&'static str] = &["peers"];
        fn server(&self) -> &ServerConfig {
            &self.server
        }
        fn validate(&self) -> Result<(), ConfigError> {
            self.server.validate(Self::SECTION)?;
            if self.partitions == 0 {
                return Err(ConfigError::invalid(
                    Self::SECTION,
                    "partitions",
                    "must be at least 1",
                ));
            }
            Ok(())
        }
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn file(contents: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
        f.write_all(contents.as_bytes()).unwrap();
        f
    }

    #[test]
    fn defaults_apply_when_nothing_is_set() {
        let f = file("");
        let c: Example = load_from(Some(f.path()), env(&[])).unwrap();
        assert_eq!(c, Example::default());
    }

    #[test]
    fn file_overrides_defaults_and_env_overrides_file() {
        let f = file(
            "[example]\npartitions = 8\ndata_dir = \"from-file\"\n[example.server]\ngrpc = \"127.0.0.1:7777\"\n[other]\nignored = true\n",
        );
        let c: Example = load_from(
            Some(f.path()),
            env(&[
                ("RUNNEL_EXAMPLE__PARTITIONS", "16"),
                ("RUNNEL_EXAMPLE__SERVER__DRAIN_TIMEOUT", "3s"),
                ("RUNNEL_OTHER__X", "1"),
            ]),
        )
        .unwrap();
        assert_eq!(c.partitions, 16);
        assert_eq!(c.data_dir, "from-file");
        assert_eq!(c.server.grpc.port(), 7777);
        assert_eq!(c.server.admin.port(), 9000);
        assert_eq!(c.server.drain_timeout, Duration::from_secs(3));
    }

    #[test]
    fn list_keys_split_on_commas_and_other_strings_do_not() {
        let f = file("");
        let c: Example = load_from(
            Some(f.path()),
            env(&[
                ("RUNNEL_EXAMPLE__PEERS", "nats://a:1,nats://b:2"),
                ("RUNNEL_EXAMPLE__DATA_DIR", "x,y"),
            ]),
        )
        .unwrap();
        assert_eq!(c.peers, ["nats://a:1", "nats://b:2"]);
        assert_eq!(c.data_dir, "x,y");
    }

    #[test]
    fn validation_error_names_the_key() {
        let f = file("");
        let err = load_from::<Example>(Some(f.path()), env(&[("RUNNEL_EXAMPLE__PARTITIONS", "0")]))
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid configuration: example.partitions: must be at least 1"
        );
    }

    #[test]
    fn unknown_and_mistyped_keys_are_rejected_by_name() {
        let f = file("[example]\npartitons = 3\n");
        let err = load_from::<Example>(Some(f.path()), env(&[]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("partitons"), "{err}");
        assert!(!err.contains('\n'));

        let f = file("[example]\npartitions = \"many\"\n");
        let err = load_from::<Example>(Some(f.path()), env(&[]))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("invalid configuration: example.partitions: "),
            "{err}"
        );

        let f = file("");
        let err = load_from::<Example>(
            Some(f.path()),
            env(&[("RUNNEL_EXAMPLE__SERVER__GRPC", "not-an-address")]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with("invalid configuration: example.server.grpc: "),
            "{err}"
        );
    }

    #[test]
    fn a_public_api_needs_authentication_or_an_explicit_waiver() {
        let f = file("");
        let err = load_from::<Example>(
            Some(f.path()),
            env(&[("RUNNEL_EXAMPLE__SERVER__GRPC", "0.0.0.0:7000")]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with(
                "invalid configuration: example.server.grpc: 0.0.0.0:7000 is reachable"
            ),
            "{err}"
        );
        let c: Example = load_from(
            Some(f.path()),
            env(&[
                ("RUNNEL_EXAMPLE__SERVER__GRPC", "0.0.0.0:7000"),
                ("RUNNEL_EXAMPLE__SERVER__ALLOW_UNAUTHENTICATED", "true"),
            ]),
        )
        .unwrap();
        assert!(c.server.allow_unauthenticated);
        // The admin port serves no data: it may listen anywhere.
        let c: Example = load_from(
            Some(f.path()),
            env(&[("RUNNEL_EXAMPLE__SERVER__ADMIN", "0.0.0.0:9000")]),
        )
        .unwrap();
        assert!(!c.server.admin.ip().is_loopback());
    }

    #[test]
    fn security_tables_load_from_the_file_and_name_their_keys() {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("broker.pem");
        std::fs::write(&cert, "x").unwrap();
        let f = file(&format!(
            "[example.server]\ngrpc = \"0.0.0.0:7000\"\n[example.server.tls]\ncert = {cert:?}\nkey = {cert:?}\n\
             [example.server.auth]\nenabled = true\n[[example.server.auth.tokens]]\nprincipal = \"sensors\"\nsha256 = \"{}\"\n\
             [[example.server.auth.grants]]\nprincipal = \"token:sensors\"\nallow = [\"produce\"]\ntopics = [\"sensors.*\"]\n\
             [example.server.limits]\nrate_limit = 100\n",
            "0".repeat(64)
        ));
        let c: Example = load_from(Some(f.path()), env(&[])).unwrap();
        assert!(c.server.auth.enabled);
        assert_eq!(c.server.auth.grants[0].topics, ["sensors.*"]);
        assert_eq!(c.server.limits.rate_limit, 100);
        assert_eq!(c.server.tls.as_ref().unwrap().cert, cert);

        let err = load_from::<Example>(
            Some(f.path()),
            env(&[("RUNNEL_EXAMPLE__SERVER__TLS__KEY", "/nonexistent.key")]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with("invalid configuration: example.server.tls.key: "),
            "{err}"
        );
        let f = file(
            "[example.server.auth]\nenabled = true\ntokens = [{ principal = \"p\", sha256 = \"secret\" }]\n",
        );
        let err = load_from::<Example>(Some(f.path()), env(&[]))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("invalid configuration: example.server.auth.tokens[0].sha256: "),
            "{err}"
        );
        assert!(!err.contains("secret"), "{err}");

        // A grant written before principals were typed: one line that says how to write it.
        let f = file(
            "[example.server.auth]\nenabled = true\nmtls = false\n\
             tokens = [{ principal = \"sensors\", sha256 = \"0000000000000000000000000000000000000000000000000000000000000000\" }]\n\
             [[example.server.auth.grants]]\nprincipal = \"sensors\"\nallow = [\"produce\"]\ntopics = [\"sensors.*\"]\n",
        );
        let err = load_from::<Example>(Some(f.path()), env(&[]))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("invalid configuration: example.server.auth.grants[0].principal: ")
                && err.contains("\"token:sensors\"")
                && !err.contains('\n'),
            "{err}"
        );
    }

    #[test]
    fn a_missing_explicit_file_is_an_error() {
        let err = load_from::<Example>(Some(Path::new("/nonexistent/runnel.toml")), env(&[]))
            .unwrap_err();
        assert!(err.to_string().contains("does not exist"));
    }
}
