//! TLS with rustls (ring provider): the server side of every listener and the client side
//! of every outgoing link, both built from PEM files and rebuilt when the files change.
//!
//! A listener's TLS is a [`ServerTls`]: the certificate chain and key, and for mutual TLS
//! the CA that client certificates must chain to. The gRPC port speaks `h2`, HTTP ports
//! `http/1.1`; the admin port never requires a client certificate, so that probes and
//! scrapers without one still reach `/metrics`, `/ready` and `/live`.

use crate::SecurityError;
use crate::config::{ClientAuth, ConnectConfig, TlsConfig};
use crate::reload::Reloading;
use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::sync::Arc;
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// The crypto provider every TLS config here uses.
pub(crate) fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The certificates in a PEM file (at least one).
pub(crate) fn parse_certs(
    what: &str,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, SecurityError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| SecurityError::Invalid(format!("{what}: {e}")))?;
    if certs.is_empty() {
        return Err(SecurityError::Invalid(format!(
            "{what}: no CERTIFICATE in the PEM file"
        )));
    }
    Ok(certs)
}

fn parse_key(what: &str, pem: &[u8]) -> Result<PrivateKeyDer<'static>, SecurityError> {
    PrivateKeyDer::from_pem_slice(pem)
        .map_err(|e| SecurityError::Invalid(format!("{what}: no usable private key: {e}")))
}

fn roots(what: &str, pem: &[u8]) -> Result<RootCertStore, SecurityError> {
    let mut roots = RootCertStore::empty();
    for cert in parse_certs(what, pem)? {
        roots
            .add(cert)
            .map_err(|e| SecurityError::Invalid(format!("{what}: {e}")))?;
    }
    Ok(roots)
}

fn tls_error(what: &str) -> impl FnOnce(rustls::Error) -> SecurityError + '_ {
    move |e| SecurityError::Invalid(format!("{what}: {e}"))
}

/// What a listener serves, which decides its ALPN protocol and client-certificate policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// gRPC over HTTP/2.
    Grpc,
    /// An HTTP/1.1 API (the gateway's).
    Http,
    /// The admin HTTP port: never requires a client certificate.
    Admin,
}

impl Protocol {
    pub(crate) fn label(self) -> &'static str {
        match self {
            Protocol::Grpc => "grpc",
            Protocol::Http => "http",
            Protocol::Admin => "admin",
        }
    }
}

/// The acceptors built from one version of the files.
struct Acceptors {
    grpc: TlsAcceptor,
    http: TlsAcceptor,
    admin: TlsAcceptor,
}

/// A listener's TLS, reloaded when its files change.
#[derive(Clone)]
pub struct ServerTls {
    material: Arc<Reloading<Acceptors>>,
    /// Whether client certificates are verified (mutual TLS).
    mutual: bool,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("material", &self.material)
            .field("mutual", &self.mutual)
            .finish()
    }
}

fn server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    clients: Option<(&RootCertStore, ClientAuth)>,
    alpn: &[u8],
) -> Result<rustls::ServerConfig, SecurityError> {
    let provider = provider();
    let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(tls_error("tls"))?;
    let builder = match clients {
        Some((roots, auth)) => {
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots.clone()), provider);
            let verifier = match auth {
                ClientAuth::Required => verifier,
                ClientAuth::Optional => verifier.allow_unauthenticated(),
            };
            let verifier = verifier
                .build()
                .map_err(|e| SecurityError::Invalid(format!("tls.client_ca: {e}")))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(tls_error("tls.key"))?;
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(config)
}

impl ServerTls {
    /// Loads the files now (failing if they are unusable) and watches them.
    pub fn load(config: &TlsConfig) -> Result<ServerTls, SecurityError> {
        let mut paths = vec![config.cert.clone(), config.key.clone()];
        paths.extend(config.client_ca.clone());
        let client_auth = config.client_auth;
        let material = Reloading::watch(
            "tls",
            paths,
            config.reload_interval,
            Box::new(move |files| {
                let chain = parse_certs("tls.cert", &files[0])?;
                let key = parse_key("tls.key", &files[1])?;
                let clients = files
                    .get(2)
                    .map(|pem| roots("tls.client_ca", pem))
                    .transpose()?;
                let clients = clients.as_ref().map(|roots| (roots, client_auth));
                let acceptor = |config: rustls::ServerConfig| TlsAcceptor::from(Arc::new(config));
                Ok(Acceptors {
                    grpc: acceptor(server_config(
                        chain.clone(),
                        key.clone_key(),
                        clients,
                        b"h2",
                    )?),
                    http: acceptor(server_config(
                        chain.clone(),
                        key.clone_key(),
                        clients,
                        b"http/1.1",
                    )?),
                    admin: acceptor(server_config(chain, key, None, b"http/1.1")?),
                })
            }),
        )?;
        Ok(ServerTls {
            material,
            mutual: config.client_ca.is_some(),
        })
    }

    /// The acceptor for new connections of `protocol`, from the latest good files.
    pub(crate) fn acceptor(&self, protocol: Protocol) -> TlsAcceptor {
        let current = self.material.current();
        match protocol {
            Protocol::Grpc => current.grpc.clone(),
            Protocol::Http => current.http.clone(),
            Protocol::Admin => current.admin.clone(),
        }
    }

    /// Whether client certificates are verified.
    pub fn is_mutual(&self) -> bool {
        self.mutual
    }
}

/// The subject common name of a DER certificate: the identity a verified client
/// certificate gives its holder.
pub(crate) fn common_name(der: &CertificateDer<'_>) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    let name = cert.subject().iter_common_name().next()?.as_str().ok()?;
    (!name.is_empty()).then(|| name.to_owned())
}

/// The client side of TLS links, reloaded when its files change.
#[derive(Clone)]
pub(crate) struct ClientTls {
    material: Arc<Reloading<TlsConnector>>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("material", &self.material)
            .finish()
    }
}

impl ClientTls {
    /// Loads `connect.ca` (and the client certificate, if any) and watches them.
    pub(crate) fn load(config: &ConnectConfig) -> Result<ClientTls, SecurityError> {
        let Some(ca) = &config.ca else {
            return Err(SecurityError::Invalid(
                "an https:// URL needs connect.ca, the CA that signed the server's certificate"
                    .into(),
            ));
        };
        let mut paths = vec![ca.clone()];
        if let (Some(cert), Some(key)) = (&config.cert, &config.key) {
            paths.push(cert.clone());
            paths.push(key.clone());
        }
        let material = Reloading::watch(
            "connect",
            paths,
            config.reload_every(),
            Box::new(|files| {
                let roots = roots("connect.ca", &files[0])?;
                let builder = rustls::ClientConfig::builder_with_provider(provider())
                    .with_safe_default_protocol_versions()
                    .map_err(tls_error("connect"))?
                    .with_root_certificates(roots);
                let mut config = match (files.get(1), files.get(2)) {
                    (Some(cert), Some(key)) => builder
                        .with_client_auth_cert(
                            parse_certs("connect.cert", cert)?,
                            parse_key("connect.key", key)?,
                        )
                        .map_err(tls_error("connect.key"))?,
                    _ => builder.with_no_client_auth(),
                };
                config.alpn_protocols = vec![b"h2".to_vec()];
                Ok(TlsConnector::from(Arc::new(config)))
            }),
        )?;
        Ok(ClientTls { material })
    }

    /// The connector for a new connection, from the latest good files.
    pub(crate) fn connector(&self) -> TlsConnector {
        self.material.current().as_ref().clone()
    }
}
