//! Outgoing links: the one way every Runnel service and client builds the `Channel` it
//! calls another service on.
//!
//! `http://` URLs are plaintext; `https://` URLs are TLS verified against `connect.ca`
//! (never the system's public roots), presenting `connect.cert` for mutual TLS when it is
//! configured. Every call carries the W3C trace context of the calling span and, when a
//! token is configured, `authorization: Bearer <token>`. Certificates and the token file
//! are reloaded when they change; new connections use the new ones.
//!
//! Channels connect lazily — the peer may start later, or restart — and keep HTTP/2
//! keepalive, so that a connection whose peer vanished without a word (a network cut, a
//! lost node, an address that changed while the connection was idle or only receiving)
//! fails within [`KEEPALIVE_INTERVAL`] + [`KEEPALIVE_TIMEOUT`] instead of holding a stream
//! open forever. Without it, an analyzer cut off the network and put back under a new
//! address waited on its subscriptions indefinitely (the compose end-to-end test shows the
//! difference). Servers use the same two settings (`runnel_server::serve`).

use crate::SecurityError;
use crate::config::ConnectConfig;
use crate::reload::Reloading;
use crate::tls::ClientTls;
use futures::future::BoxFuture;
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::net::TcpStream;
use tonic::codegen::InterceptedService;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Channel, Endpoint, Uri};

/// How long establishing a connection (TCP and TLS) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How often an HTTP/2 PING checks that the peer is still there (also while no call is in
/// flight).
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// How long a PING may go unanswered before the connection counts as dead.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest HTTP/2 frame a Runnel peer accepts (`SETTINGS_MAX_FRAME_SIZE`), servers and
/// clients alike. HTTP/2's default, 16 KiB, cuts a 16 MiB `Fetch` answer or `Produce` batch
/// into a thousand frames, each framed, flow-controlled, read and handed over on its own;
/// with 256 KiB the broker bench produced and consumed 15–20 % faster (docs/benchmarks.md),
/// and bigger frames gained little more. A frame holds up the connection's other streams
/// while it is sent, so it stays small next to a network's round trip (2 ms at 1 Gbit/s).
pub const MAX_FRAME_BYTES: u32 = 256 * 1024;

/// A channel to a Runnel service, with the caller's credentials and trace context on
/// every call: what `BrokerClient::new`, `StoreClient::new`, … take.
pub type Peer = InterceptedService<Channel, Credentials>;

#[derive(Clone)]
enum Token {
    None,
    Fixed(MetadataValue<Ascii>),
    File(Arc<Reloading<MetadataValue<Ascii>>>),
}

/// Adds the trace context and the bearer token to every call.
#[derive(Clone)]
pub struct Credentials {
    token: Token,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let token = match self.token {
            Token::None => "none",
            Token::Fixed(_) => "fixed",
            Token::File(_) => "file",
        };
        f.debug_struct("Credentials")
            .field("token", &token)
            .finish()
    }
}

fn bearer(token: &[u8]) -> Result<MetadataValue<Ascii>, SecurityError> {
    let token = std::str::from_utf8(token)
        .map_err(|_| SecurityError::Invalid("the token is not text".into()))?
        .trim();
    if token.is_empty() {
        return Err(SecurityError::Invalid("the token is empty".into()));
    }
    let mut value = MetadataValue::try_from(format!("Bearer {token}")).map_err(|_| {
        SecurityError::Invalid("the token has characters a header cannot hold".into())
    })?;
    value.set_sensitive(true);
    Ok(value)
}

impl tonic::service::Interceptor for Credentials {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        runnel_telemetry::propagation::inject_into_metadata(
            &tracing::Span::current(),
            request.metadata_mut(),
        );
        let value = match &self.token {
            Token::None => None,
            Token::Fixed(value) => Some(value.clone()),
            Token::File(file) => Some(file.current().as_ref().clone()),
        };
        if let Some(value) = value {
            request.metadata_mut().insert("authorization", value);
        }
        Ok(request)
    }
}

/// Dials TCP, then TLS, with the connector of the moment.
#[derive(Clone)]
struct TlsDialer {
    tls: ClientTls,
    server_name: Option<ServerName<'static>>,
}

impl tower::Service<Uri> for TlsDialer {
    type Response = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = std::io::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connector = self.tls.connector();
        let configured = self.server_name.clone();
        Box::pin(async move {
            let invalid = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidInput, m);
            let host = uri
                .host()
                .ok_or_else(|| invalid("the URL has no host"))?
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned();
            let port = uri.port_u16().unwrap_or(443);
            let name = match configured {
                Some(name) => name,
                None => ServerName::try_from(host.clone())
                    .map_err(|_| invalid("the URL's host is not a valid server name"))?,
            };
            let tcp = TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            let tls = connector.connect(name, tcp).await?;
            Ok(TokioIo::new(tls))
        })
    }
}

/// How to reach one URL.
struct Plan {
    endpoint: Endpoint,
    dialer: Option<TlsDialer>,
    credentials: Credentials,
}

fn plan(url: &str, config: &ConnectConfig, token: Option<&str>) -> Result<Plan, SecurityError> {
    let endpoint = Endpoint::from_shared(url.to_owned())
        .map_err(|e| SecurityError::Invalid(format!("{url:?} is not a usable URL: {e}")))?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true)
        .max_frame_size(MAX_FRAME_BYTES);
    let dialer = match endpoint.uri().scheme_str() {
        Some("https") => Some(TlsDialer {
            tls: ClientTls::load(config)?,
            server_name: config
                .server_name
                .as_ref()
                .map(|name| {
                    ServerName::try_from(name.clone()).map_err(|_| {
                        SecurityError::Invalid(format!(
                            "connect.server_name {name:?} is not a server name"
                        ))
                    })
                })
                .transpose()?,
        }),
        Some("http") => None,
        _ => {
            return Err(SecurityError::Invalid(format!(
                "{url:?} is not an http:// or https:// URL"
            )));
        }
    };
    let token = match (token, &config.token_file) {
        (Some(token), _) => Token::Fixed(bearer(token.as_bytes())?),
        (None, Some(path)) => Token::File(Reloading::watch(
            "token",
            vec![path.clone()],
            config.reload_every(),
            Box::new(|files| bearer(&files[0])),
        )?),
        (None, None) => Token::None,
    };
    Ok(Plan {
        endpoint,
        dialer,
        credentials: Credentials { token },
    })
}

/// A channel to `url` that connects on first use and reconnects on its own (the service
/// may start later, or restart). Fails only on a bad URL or unusable TLS or token files.
/// Must be called within a Tokio runtime (the files are watched from it).
pub fn connect_lazy(url: &str, config: &ConnectConfig) -> Result<Peer, SecurityError> {
    connect_lazy_with_token(url, config, None)
}

/// [`connect_lazy`] with a token given directly, which takes the place of
/// `connect.token_file` (for command-line clients).
pub fn connect_lazy_with_token(
    url: &str,
    config: &ConnectConfig,
    token: Option<&str>,
) -> Result<Peer, SecurityError> {
    let plan = plan(url, config, token)?;
    let channel = match plan.dialer {
        Some(dialer) => plan.endpoint.connect_with_connector_lazy(dialer),
        None => plan.endpoint.connect_lazy(),
    };
    Ok(InterceptedService::new(channel, plan.credentials))
}

/// A channel to `url`, connected now: an unreachable service or a failed handshake is an
/// error here rather than on the first call.
pub async fn connect(
    url: &str,
    config: &ConnectConfig,
    token: Option<&str>,
) -> Result<Peer, SecurityError> {
    let plan = plan(url, config, token)?;
    let connected = match plan.dialer {
        Some(dialer) => plan.endpoint.connect_with_connector(dialer).await,
        None => plan.endpoint.connect().await,
    };
    let channel = connected.map_err(|e| SecurityError::Connect {
        url: url.to_owned(),
        message: error_chain(&e),
    })?;
    Ok(InterceptedService::new(channel, plan.credentials))
}

/// An error and its causes on one line (a refused handshake hides under two layers).
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}
