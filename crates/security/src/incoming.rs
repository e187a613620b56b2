//! Accepting connections: TCP options, the connection limit, the TLS handshake (off the
//! accept loop, with a deadline), and who is on the other end.
//!
//! [`Incoming`] is both the stream tonic's `serve_with_incoming_shutdown` takes and an
//! `axum::serve::Listener`, so gRPC, HTTP and admin ports are accepted the same way.
//! Handshakes run in their own tasks, so a client that opens a connection and says
//! nothing holds one connection slot until `handshake_timeout`, never the accept loop.
//! Dropping the `Incoming` (the server stopped accepting) ends the accept task and closes
//! the listening socket.

use crate::config::LimitsConfig;
use crate::tls::{Protocol, ServerTls, common_name};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_rustls::server::TlsStream;
use tokio_stream::StreamExt;

/// Who is on the other end of a connection. tonic puts it into every request's
/// extensions (`Connected::ConnectInfo`), axum as `ConnectInfo<PeerInfo>`.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    /// The client's address.
    pub remote: Option<SocketAddr>,
    /// The common name of the client certificate the TLS handshake verified (mutual TLS).
    pub certificate_name: Option<Arc<str>>,
    /// The calls in progress on this connection, bounded by
    /// `limits.max_in_flight_per_connection`.
    pub(crate) in_flight: Arc<Semaphore>,
}

impl PeerInfo {
    /// A peer that did not come through an [`Incoming`] (in-process tests).
    pub fn unknown(max_in_flight: usize) -> PeerInfo {
        PeerInfo {
            remote: None,
            certificate_name: None,
            in_flight: Arc::new(Semaphore::new(max_in_flight)),
        }
    }
}

enum Transport {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// An accepted connection: plaintext or TLS, holding its connection slot until dropped.
pub struct SecureStream {
    transport: Transport,
    peer: PeerInfo,
    _slot: ConnectionSlot,
}

impl std::fmt::Debug for SecureStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecureStream")
            .field("tls", &matches!(self.transport, Transport::Tls(_)))
            .field("peer", &self.peer)
            .finish()
    }
}

impl SecureStream {
    /// Who is on the other end.
    pub fn peer(&self) -> &PeerInfo {
        &self.peer
    }
}

/// A place among the listener's `max_connections`, with the open-connections gauge.
struct ConnectionSlot {
    _permit: OwnedSemaphorePermit,
    listener: &'static str,
}

impl ConnectionSlot {
    fn new(permit: OwnedSemaphorePermit, listener: &'static str) -> Self {
        metrics::gauge!("runnel_connections_open", "listener" => listener).increment(1.0);
        ConnectionSlot {
            _permit: permit,
            listener,
        }
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        metrics::gauge!("runnel_connections_open", "listener" => self.listener).decrement(1.0);
    }
}

impl AsyncRead for SecureStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match &mut self.get_mut().transport {
            Transport::Plain(tcp) => Pin::new(tcp).poll_read(cx, buf),
            Transport::Tls(tls) => Pin::new(tls.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for SecureStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().transport {
            Transport::Plain(tcp) => Pin::new(tcp).poll_write(cx, buf),
            Transport::Tls(tls) => Pin::new(tls.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().transport {
            Transport::Plain(tcp) => Pin::new(tcp).poll_write_vectored(cx, bufs),
            Transport::Tls(tls) => Pin::new(tls.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.transport {
            Transport::Plain(tcp) => tcp.is_write_vectored(),
            Transport::Tls(tls) => tls.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().transport {
            Transport::Plain(tcp) => Pin::new(tcp).poll_flush(cx),
            Transport::Tls(tls) => Pin::new(tls.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().transport {
            Transport::Plain(tcp) => Pin::new(tcp).poll_shutdown(cx),
            Transport::Tls(tls) => Pin::new(tls.as_mut()).poll_shutdown(cx),
        }
    }
}

impl tonic::transport::server::Connected for SecureStream {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.peer.clone()
    }
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, Incoming>>
    for PeerInfo
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, Incoming>) -> PeerInfo {
        stream.io().peer.clone()
    }
}

/// The connections accepted on one listener, handshakes done.
#[derive(Debug)]
pub struct Incoming {
    accepted: mpsc::Receiver<SecureStream>,
    local: SocketAddr,
}

/// How a listener accepts.
#[derive(Debug, Clone)]
pub struct AcceptOptions {
    /// The protocol spoken on it (ALPN, client certificates, metric labels).
    pub protocol: Protocol,
    /// TLS, or plaintext when `None`.
    pub tls: Option<ServerTls>,
    /// Connection and handshake limits.
    pub limits: LimitsConfig,
}

/// Starts accepting on `listener`. Must be called within a Tokio runtime.
pub fn accept(listener: TcpListener, options: AcceptOptions) -> io::Result<Incoming> {
    let local = listener.local_addr()?;
    // Handshakes in progress are bounded by the connection limit: each holds a slot.
    let (sender, accepted) = mpsc::channel(64);
    tokio::spawn(accept_loop(listener, options, sender));
    Ok(Incoming { accepted, local })
}

async fn accept_loop(
    listener: TcpListener,
    options: AcceptOptions,
    sender: mpsc::Sender<SecureStream>,
) {
    let label = options.protocol.label();
    let slots = Arc::new(Semaphore::new(options.limits.max_connections));
    // tonic's TcpIncoming sets the socket options; we add the limit and the handshake.
    let mut tcp = tonic::transport::server::TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(Duration::from_secs(60)));
    loop {
        // Take a slot before accepting: at the limit, clients wait in the backlog.
        let permit = tokio::select! {
            permit = Arc::clone(&slots).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return,
            },
            () = sender.closed() => return,
        };
        let stream = tokio::select! {
            next = tcp.next() => match next {
                Some(Ok(stream)) => stream,
                Some(Err(error)) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(listener = label, %error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                None => return,
            },
            () = sender.closed() => return,
        };
        let slot = ConnectionSlot::new(permit, label);
        let remote = stream.peer_addr().ok();
        let peer = PeerInfo {
            remote,
            certificate_name: None,
            in_flight: Arc::new(Semaphore::new(options.limits.max_in_flight_per_connection)),
        };
        match &options.tls {
            None => {
                let secure = SecureStream {
                    transport: Transport::Plain(stream),
                    peer,
                    _slot: slot,
                };
                if sender.send(secure).await.is_err() {
                    return;
                }
            }
            Some(tls) => {
                let acceptor = tls.acceptor(options.protocol);
                let sender = sender.clone();
                let timeout = options.limits.handshake_timeout;
                tokio::spawn(async move {
                    let handshake = tokio::time::timeout(timeout, acceptor.accept(stream)).await;
                    let tls = match handshake {
                        Ok(Ok(tls)) => tls,
                        Ok(Err(error)) => {
                            handshake_failed(label, "error");
                            tracing::debug!(listener = label, ?remote, %error, "tls handshake failed");
                            return;
                        }
                        Err(_) => {
                            handshake_failed(label, "timeout");
                            tracing::debug!(listener = label, ?remote, "tls handshake timed out");
                            return;
                        }
                    };
                    let certificate_name = tls
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|chain| chain.first())
                        .and_then(common_name)
                        .map(Arc::from);
                    let secure = SecureStream {
                        transport: Transport::Tls(Box::new(tls)),
                        peer: PeerInfo {
                            certificate_name,
                            ..peer
                        },
                        _slot: slot,
                    };
                    let _ = sender.send(secure).await;
                });
            }
        }
    }
}

fn handshake_failed(listener: &'static str, reason: &'static str) {
    metrics::counter!("runnel_tls_handshake_failures_total", "listener" => listener, "reason" => reason)
        .increment(1);
}

impl Incoming {
    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }
}

impl futures::Stream for Incoming {
    type Item = Result<SecureStream, io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.accepted.poll_recv(cx).map(|next| next.map(Ok))
    }
}

impl axum::serve::Listener for Incoming {
    type Io = SecureStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (SecureStream, SocketAddr) {
        match self.accepted.recv().await {
            Some(stream) => {
                let remote = stream.peer.remote.unwrap_or(self.local);
                (stream, remote)
            }
            // The accept task only ends when we are dropped or the socket failed for
            // good; axum has no way to be told, so accept nothing more.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local)
    }
}
