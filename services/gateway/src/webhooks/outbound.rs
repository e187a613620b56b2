//! The HTTP client deliveries are POSTed with: HTTP/1.1 over TCP, or over TLS (rustls,
//! ring) for `https://`, through a connector that applies the target policy
//! ([`super::target`]) to every connection it opens.
//!
//! The connector parses each URL again and resolves its host itself, keeping only the
//! addresses the policy allows, so what a delivery connects to is decided when it
//! connects, not when the webhook was registered: a name that resolves to an internal
//! address later (DNS rebinding) is refused. No proxy is used, and redirects are never
//! followed: a 3xx answer is the receiver's refusal, not an address to post to, or a
//! receiver could point deliveries at anything the gateway reaches.
//!
//! A certificate must chain to the system's trusted roots or to `webhooks.ca`. A failed
//! attempt is reported as a [`Failed`]: a class for the webhook's status, which says what
//! kind of failure it was and never the network's own words (which would make the API a
//! port scanner), and the detail for the gateway's debug log.

use super::target::{ADDRESS_REFUSED, Host, Policy, Refusal, URL_REFUSED, Unreachable};
use crate::config::WebhookConfig;
use crate::error::GatewayError;
use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// How long an unused connection to a receiver is kept for the next delivery.
const IDLE: Duration = Duration::from_secs(30);

/// A delivery attempt that got no answer.
#[derive(Debug)]
pub(crate) struct Failed {
    /// What kind of failure it was: shown in the webhook's status.
    pub(crate) class: &'static str,
    /// What happened, for the log only.
    pub(crate) detail: String,
}

/// Posts deliveries.
#[derive(Debug, Clone)]
pub(crate) struct Outbound {
    client: Client<Connector, Full<Bytes>>,
    timeout: Duration,
}

impl Outbound {
    /// A client for `config`'s policy, timeout and trusted roots.
    pub(crate) fn new(
        config: &WebhookConfig,
        policy: Arc<Policy>,
    ) -> Result<Outbound, GatewayError> {
        let tls = tls_config(config.ca.as_deref())?;
        let connector = Connector {
            policy,
            tls: tokio_rustls::TlsConnector::from(Arc::new(tls)),
        };
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(IDLE)
            .build(connector);
        Ok(Outbound {
            client,
            timeout: config.timeout,
        })
    }

    /// POSTs `body` with `headers` to `url`; the receiver's status, if it answered within
    /// the timeout.
    pub(crate) async fn post(
        &self,
        url: &str,
        headers: &[(&'static str, String)],
        body: Bytes,
    ) -> Result<http::StatusCode, Failed> {
        let mut request = http::Request::post(url);
        for (name, value) in headers {
            request = request.header(*name, value);
        }
        let request = request.body(Full::new(body)).map_err(|e| Failed {
            class: URL_REFUSED,
            detail: e.to_string(),
        })?;
        match tokio::time::timeout(self.timeout, self.client.request(request)).await {
            // The body is not read: the status is the answer.
            Ok(Ok(response)) => Ok(response.status()),
            Ok(Err(error)) => Err(failed(&error)),
            Err(_) => Err(Failed {
                class: "no answer within the timeout",
                detail: format!("no answer within {:?}", self.timeout),
            }),
        }
    }
}

/// The class and detail of a failed request.
fn failed(error: &hyper_util::client::legacy::Error) -> Failed {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    let mut detail = error.to_string();
    while let Some(error) = source {
        if let Some(connect) = error.downcast_ref::<ConnectError>() {
            return Failed {
                class: connect.class(),
                detail: connect.to_string(),
            };
        }
        source = error.source();
        if let Some(inner) = source {
            detail = format!("{detail}: {inner}");
        }
    }
    Failed {
        class: if error.is_connect() {
            "could not connect"
        } else {
            "the exchange failed"
        },
        detail,
    }
}

/// The TLS settings for `https://` receivers: the system's roots and `ca`'s certificates.
fn tls_config(ca: Option<&Path>) -> Result<rustls::ClientConfig, GatewayError> {
    let mut roots = RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for error in &native.errors {
        tracing::warn!(%error, "some of the system's trusted certificates could not be read (https webhooks)");
    }
    roots.add_parsable_certificates(native.certs);
    if let Some(path) = ca {
        let bad = |e: &dyn std::fmt::Display| {
            GatewayError::Webhooks(format!("gateway.webhooks.ca {}: {e}", path.display()))
        };
        let certs = CertificateDer::pem_file_iter(path)
            .map_err(|e| bad(&e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad(&e))?;
        if certs.is_empty() {
            return Err(bad(&"no CERTIFICATE in the PEM file"));
        }
        for cert in certs {
            roots.add(cert).map_err(|e| bad(&e))?;
        }
    }
    if roots.is_empty() {
        tracing::warn!(
            "no trusted certificates (the system has none, and gateway.webhooks.ca is not set): https webhooks will fail"
        );
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| GatewayError::Webhooks(format!("tls: {e}")))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// Why a connection was not made.
#[derive(Debug, thiserror::Error)]
enum ConnectError {
    #[error("{0}")]
    Refused(Refusal),
    #[error("{0}")]
    Unreachable(Unreachable),
    #[error("connect: {0}")]
    Connect(std::io::Error),
    #[error("tls: {0}")]
    Tls(std::io::Error),
}

impl ConnectError {
    fn class(&self) -> &'static str {
        match self {
            ConnectError::Refused(refusal) => refusal.class(),
            ConnectError::Unreachable(Unreachable::Refused { .. }) => ADDRESS_REFUSED,
            ConnectError::Unreachable(Unreachable::Lookup(_)) | ConnectError::Connect(_) => {
                "could not connect"
            }
            ConnectError::Tls(_) => "the TLS handshake failed",
        }
    }
}

/// Opens the connections deliveries are sent on, to allowed addresses only.
#[derive(Clone)]
struct Connector {
    policy: Arc<Policy>,
    tls: tokio_rustls::TlsConnector,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connector")
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl Connector {
    async fn connect(self, uri: http::Uri) -> Result<Stream, ConnectError> {
        let target = self.policy.target_of(&uri).map_err(ConnectError::Refused)?;
        let addrs = self
            .policy
            .resolve(&target)
            .await
            .map_err(ConnectError::Unreachable)?;
        let mut error = None;
        for addr in addrs {
            match TcpStream::connect(addr).await {
                Ok(tcp) => return self.handshake(target.https, target.host, tcp).await,
                Err(e) => error = Some(e),
            }
        }
        Err(ConnectError::Connect(
            error.unwrap_or_else(|| std::io::ErrorKind::NotFound.into()),
        ))
    }

    /// TLS on `tcp` for `https`, with `host`'s name (or address) checked against the
    /// receiver's certificate.
    async fn handshake(
        &self,
        https: bool,
        host: Host,
        tcp: TcpStream,
    ) -> Result<Stream, ConnectError> {
        // Deliveries are small: send each at once.
        let _ = tcp.set_nodelay(true);
        if !https {
            return Ok(Stream::Plain(tcp));
        }
        let name = match host {
            Host::Ip(ip) => ServerName::IpAddress(ip.into()),
            Host::Name(name) => ServerName::try_from(name).map_err(|e| {
                ConnectError::Tls(std::io::Error::new(std::io::ErrorKind::InvalidInput, e))
            })?,
        };
        let tls = self
            .tls
            .connect(name, tcp)
            .await
            .map_err(ConnectError::Tls)?;
        Ok(Stream::Tls(Box::new(tls)))
    }
}

impl tower::Service<http::Uri> for Connector {
    type Response = TokioIo<Stream>;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<TokioIo<Stream>, ConnectError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ConnectError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let connector = self.clone();
        Box::pin(async move { connector.connect(uri).await.map(TokioIo::new) })
    }
}

/// A connection to a receiver.
enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl Connection for Stream {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
