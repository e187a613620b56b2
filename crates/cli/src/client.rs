//! How the client commands (`send`, `get`, `watch`) reach a secured pipeline: the CA that
//! signed its certificates, a client certificate for mutual TLS, a bearer token.

use anyhow::{Context, Result};
use runnel_security::{ConnectConfig, Peer};
use std::path::PathBuf;

/// TLS and credentials for the client commands.
#[derive(Debug, Clone, Default, clap::Args)]
pub(crate) struct ClientArgs {
    /// The CA certificate (PEM) that the services' certificates chain to; needed for
    /// https:// URLs.
    #[arg(long, env = "RUNNEL_CA")]
    ca: Option<PathBuf>,
    /// A client certificate (PEM) for mutual TLS.
    #[arg(long, env = "RUNNEL_CERT", requires = "cert_key")]
    cert: Option<PathBuf>,
    /// The client certificate's private key (PEM). (Not `--key`: `runnel get` takes a
    /// key, the one of a result.)
    #[arg(long, env = "RUNNEL_CERT_KEY", requires = "cert")]
    cert_key: Option<PathBuf>,
    /// A bearer token (static or JWT) sent with every call.
    #[arg(
        long,
        env = "RUNNEL_TOKEN",
        hide_env_values = true,
        conflicts_with = "token_file"
    )]
    token: Option<String>,
    /// A file holding the bearer token.
    #[arg(long, env = "RUNNEL_TOKEN_FILE")]
    token_file: Option<PathBuf>,
}

impl ClientArgs {
    /// The connect settings these arguments make.
    pub(crate) fn connect_config(&self) -> ConnectConfig {
        ConnectConfig {
            ca: self.ca.clone(),
            cert: self.cert.clone(),
            key: self.cert_key.clone(),
            token_file: self.token_file.clone(),
            ..ConnectConfig::default()
        }
    }

    /// The token given on the command line, if any.
    pub(crate) fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    /// A channel to `url` that connects on first use.
    pub(crate) fn connect_lazy(&self, url: &str) -> Result<Peer> {
        Ok(runnel_security::connect_lazy_with_token(
            url,
            &self.connect_config(),
            self.token(),
        )?)
    }

    /// A channel to `url`, connected now; `what` names the service for the error.
    pub(crate) async fn connect(&self, url: &str, what: &str) -> Result<Peer> {
        let config = self.connect_config();
        config
            .validate()
            .map_err(|invalid| anyhow::anyhow!("{invalid}"))?;
        runnel_security::connect(url, &config, self.token.as_deref())
            .await
            .with_context(|| format!("cannot reach the {what} at {url} (is `runnel up` running?)"))
    }
}
