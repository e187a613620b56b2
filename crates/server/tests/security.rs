//! `serve` with security on, over real sockets: TLS and mutual TLS handshakes with good and
//! bad certificates, a certificate reload, tokens and grants through the guard, and every
//! limit with its status and its counter.

use runnel_proto::v1::analyzer_client::AnalyzerClient;
use runnel_proto::v1::analyzer_server::{Analyzer, AnalyzerServer};
use runnel_proto::v1::{
    DescribeQueryRequest, ListQueriesRequest, ListQueriesResponse, QueryDescription,
};
use runnel_security::certs::{DevCa, default_names, write_pair};
use runnel_security::{
    Action, AuthConfig, ConnectConfig, GrantConfig, Peer, Resource, TlsConfig, TokenConfig,
};
use runnel_server::{ServerConfig, Shutdown, ShutdownTrigger};
use runnel_testkit::eventually;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;
use tonic::{Code, Request, Response, Status};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

/// `ListQueries` never answers (a call held in flight); `DescribeQuery` checks the
/// caller's grant on the query and answers with the caller's name as the definition.
struct Probe;

#[tonic::async_trait]
impl Analyzer for Probe {
    async fn list_queries(
        &self,
        _: Request<ListQueriesRequest>,
    ) -> Result<Response<ListQueriesResponse>, Status> {
        std::future::pending().await
    }

    async fn describe_query(
        &self,
        request: Request<DescribeQueryRequest>,
    ) -> Result<Response<QueryDescription>, Status> {
        let name = request.get_ref().name.clone();
        runnel_security::authorize(&request, Action::ReadResults, Resource::Query(&name))?;
        let caller = runnel_security::caller(&request)?;
        Ok(Response::new(QueryDescription {
            name,
            definition: caller.principal().unwrap_or("anonymous").to_owned(),
            ..QueryDescription::default()
        }))
    }

    async fn create_query(
        &self,
        _: Request<runnel_proto::v1::CreateQueryRequest>,
    ) -> Result<Response<QueryDescription>, Status> {
        Err(Status::unimplemented("not part of this test"))
    }

    async fn drop_query(
        &self,
        _: Request<runnel_proto::v1::DropQueryRequest>,
    ) -> Result<Response<runnel_proto::v1::DropQueryResponse>, Status> {
        Err(Status::unimplemented("not part of this test"))
    }
}

struct Running {
    grpc: SocketAddr,
    admin: SocketAddr,
    trigger: ShutdownTrigger,
    served: tokio::task::JoinHandle<Result<(), runnel_server::ServeError>>,
}

impl Running {
    async fn stop(self) {
        self.trigger.trigger();
        tokio::time::timeout(Duration::from_secs(20), self.served)
            .await
            .expect("serve returns")
            .unwrap()
            .unwrap();
    }

    /// The value of the counter line that starts with `prefix` on the admin port, read
    /// over TLS trusting `tls`'s CA when given.
    async fn counter(&self, prefix: &str, tls: Option<&Certs>) -> f64 {
        let text = match tls {
            None => reqwest::get(format!("http://{}/metrics", self.admin))
                .await
                .unwrap()
                .text()
                .await
                .unwrap(),
            Some(certs) => metrics_over_tls(self.admin, &certs.ca).await,
        };
        text.lines()
            .find(|line| line.starts_with(prefix))
            .and_then(|line| line.rsplit(' ').next())
            .and_then(|value| value.parse().ok())
            .unwrap_or(0.0)
    }
}

/// `GET /metrics` over TLS by hand: HTTP/1.1, one request, read to the end.
async fn metrics_over_tls(admin: SocketAddr, ca: &Path) -> String {
    use rustls_pki_types::pem::PemObject;
    use tokio::io::AsyncWriteExt;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(admin).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(name, tcp)
        .await
        .expect("the admin port speaks TLS without a client certificate");
    tls.write_all(b"GET /metrics HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    tls.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    response
}

async fn start(config: ServerConfig) -> Running {
    let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (grpc_addr, admin_addr) = (grpc.local_addr().unwrap(), admin.local_addr().unwrap());
    let routes = tonic::service::Routes::new(
        AnalyzerServer::new(Probe).max_decoding_message_size(config.max_message_bytes),
    );
    let (trigger, shutdown) = Shutdown::new();
    let served = tokio::spawn(async move {
        runnel_server::serve(
            runnel_proto::service_name::ANALYZER,
            routes,
            grpc,
            admin,
            &config,
            shutdown,
        )
        .await
    });
    Running {
        grpc: grpc_addr,
        admin: admin_addr,
        trigger,
        served,
    }
}

fn base() -> ServerConfig {
    ServerConfig {
        drain_timeout: Duration::from_millis(500),
        ..ServerConfig::default()
    }
}

/// A CA and certificates signed by it, on disk.
struct Certs {
    _dir: tempfile::TempDir,
    ca: PathBuf,
    dir: PathBuf,
}

impl Certs {
    fn new(names: &[&str]) -> Certs {
        let dir = tempfile::tempdir().unwrap();
        let (ca, _) = DevCa::generate("test ca", 1).unwrap();
        let path = dir.path().to_owned();
        std::fs::write(path.join("ca.pem"), &ca.cert_pem).unwrap();
        for name in names {
            let issued = ca.issue(name, &default_names(name), 1).unwrap();
            write_pair(&path, name, &issued, false).unwrap();
        }
        Certs {
            ca: path.join("ca.pem"),
            dir: path,
            _dir: dir,
        }
    }

    fn cert(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.pem"))
    }

    fn key(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.key"))
    }

    fn server_tls(&self, name: &str, mutual: bool) -> TlsConfig {
        TlsConfig {
            cert: self.cert(name),
            key: self.key(name),
            client_ca: mutual.then(|| self.ca.clone()),
            client_auth: runnel_security::ClientAuth::Required,
            reload_interval: Duration::from_millis(50),
        }
    }

    /// Connect settings trusting this CA, presenting `client`'s certificate if given.
    fn connect(&self, client: Option<&str>) -> ConnectConfig {
        ConnectConfig {
            ca: Some(self.ca.clone()),
            cert: client.map(|c| self.cert(c)),
            key: client.map(|c| self.key(c)),
            ..ConnectConfig::default()
        }
    }
}

async fn connect(
    running: &Running,
    scheme: &str,
    config: &ConnectConfig,
    token: Option<&str>,
) -> Result<Peer, runnel_security::SecurityError> {
    let url = format!("{scheme}://{}", running.grpc);
    runnel_security::connect(&url, config, token).await
}

/// `DescribeQuery(name)` over `peer`: the caller's name, or the status.
async fn describe(peer: Peer, name: &str) -> Result<String, Status> {
    AnalyzerClient::new(peer)
        .describe_query(DescribeQueryRequest { name: name.into() })
        .await
        .map(|r| r.into_inner().definition)
}

async fn healthy(peer: Peer) -> Result<(), Status> {
    HealthClient::new(peer)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .map(|_| ())
}

/// Every query's results to the caller whose client certificate is named `name`.
fn open_grant(name: &str) -> GrantConfig {
    GrantConfig {
        principal: format!("cert:{name}"),
        allow: vec![Action::ReadResults],
        topics: vec![],
        queries: vec!["*".into()],
        groups: vec![],
    }
}

#[tokio::test]
async fn tls_serves_only_clients_that_trust_its_certificate() {
    let certs = Certs::new(&["analyzer"]);
    let running = start(ServerConfig {
        tls: Some(certs.server_tls("analyzer", false)),
        ..base()
    })
    .await;

    let peer = connect(&running, "https", &certs.connect(None), None)
        .await
        .expect("a client trusting the CA connects");
    assert_eq!(describe(peer, "q").await.unwrap(), "anonymous");

    let strangers = Certs::new(&[]);
    let refused = connect(&running, "https", &strangers.connect(None), None).await;
    assert!(refused.is_err(), "a client trusting another CA must not");

    let plaintext = match connect(&running, "http", &ConnectConfig::default(), None).await {
        Ok(peer) => healthy(peer).await.is_err(),
        Err(_) => true,
    };
    assert!(plaintext, "plaintext gRPC to a TLS port must fail");

    // The admin port speaks TLS too, without asking for a client certificate.
    let failures = running
        .counter("runnel_tls_handshake_failures_total", Some(&certs))
        .await;
    assert!(failures >= 1.0, "the refused handshakes are counted");
    running.stop().await;
}

#[tokio::test]
async fn mutual_tls_admits_certificates_from_the_client_ca_and_names_the_caller() {
    let certs = Certs::new(&["analyzer", "client", "intruder"]);
    let running = start(ServerConfig {
        tls: Some(certs.server_tls("analyzer", true)),
        auth: AuthConfig {
            enabled: true,
            mtls: true,
            grants: vec![open_grant("client")],
            ..AuthConfig::default()
        },
        ..base()
    })
    .await;

    let client = connect(&running, "https", &certs.connect(Some("client")), None)
        .await
        .unwrap();
    assert_eq!(describe(client, "q").await.unwrap(), "cert:client");

    // A valid certificate without a grant: authenticated, and still refused.
    let intruder = connect(&running, "https", &certs.connect(Some("intruder")), None)
        .await
        .unwrap();
    let status = describe(intruder, "q").await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");

    // No certificate, or one from another CA: the handshake fails (with TLS 1.3 the
    // client learns it on its first call).
    let others = Certs::new(&["client"]);
    let mut foreign = others.connect(Some("client"));
    foreign.ca = Some(certs.ca.clone());
    for config in [certs.connect(None), foreign] {
        let refused = match connect(&running, "https", &config, None).await {
            Ok(peer) => healthy(peer).await.is_err(),
            Err(_) => true,
        };
        assert!(refused, "{config:?} must be refused");
    }
    running.stop().await;
}

#[tokio::test]
async fn a_renewed_certificate_is_served_without_a_restart() {
    let first = Certs::new(&["analyzer"]);
    let running = start(ServerConfig {
        tls: Some(first.server_tls("analyzer", false)),
        ..base()
    })
    .await;
    let second = Certs::new(&["analyzer"]);
    assert!(
        connect(&running, "https", &second.connect(None), None)
            .await
            .is_err()
    );

    // The key first, then the certificate: in between the pair does not match, and the
    // server keeps the old one rather than fail.
    std::fs::copy(second.key("analyzer"), first.key("analyzer")).unwrap();
    std::fs::copy(second.cert("analyzer"), first.cert("analyzer")).unwrap();
    let peer = eventually(
        Duration::from_secs(30),
        "the new certificate to be served",
        || async {
            connect(&running, "https", &second.connect(None), None)
                .await
                .ok()
        },
    )
    .await;
    healthy(peer).await.unwrap();
    assert!(
        connect(&running, "https", &first.connect(None), None)
            .await
            .is_err(),
        "new connections no longer get the old certificate"
    );
    running.stop().await;
}

fn token_auth(grants: Vec<GrantConfig>) -> AuthConfig {
    AuthConfig {
        enabled: true,
        tokens: vec![TokenConfig {
            principal: "analyst".into(),
            sha256: runnel_security::auth::token_sha256("rnl_analyst-secret"),
        }],
        grants,
        ..AuthConfig::default()
    }
}

#[tokio::test]
async fn tokens_authenticate_and_grants_decide_per_query() {
    let running = start(ServerConfig {
        auth: token_auth(vec![GrantConfig {
            principal: "token:analyst".into(),
            allow: vec![Action::ReadResults],
            topics: vec![],
            queries: vec!["allowed".into(), "team.*".into()],
            groups: vec![],
        }]),
        ..base()
    })
    .await;
    let plain = ConnectConfig::default();
    let good = connect(&running, "http", &plain, Some("rnl_analyst-secret"))
        .await
        .unwrap();
    assert_eq!(
        describe(good.clone(), "allowed").await.unwrap(),
        "token:analyst"
    );
    assert_eq!(
        describe(good.clone(), "team.a").await.unwrap(),
        "token:analyst"
    );
    let denied = describe(good, "other").await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    assert!(denied.message().contains("\"other\""), "{denied:?}");

    let wrong = connect(&running, "http", &plain, Some("rnl_guess"))
        .await
        .unwrap();
    let status = describe(wrong, "allowed").await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert_eq!(status.message(), "invalid credentials");

    let none = connect(&running, "http", &plain, None).await.unwrap();
    let status = describe(none.clone(), "allowed").await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(status.message().starts_with("missing credentials"));
    // Probes carry no credentials and still get an answer.
    healthy(none).await.unwrap();

    let failures = running
        .counter(
            "runnel_auth_failures_total{service=\"runnel.v1.Analyzer\",reason=\"invalid\"}",
            None,
        )
        .await;
    assert!(failures >= 1.0);
    running.stop().await;
}

#[tokio::test]
async fn too_many_calls_on_one_connection_are_refused_and_others_are_not() {
    let mut config = base();
    config.limits.max_in_flight_per_connection = 1;
    let running = start(config).await;
    let plain = ConnectConfig::default();
    let peer = connect(&running, "http", &plain, None).await.unwrap();
    let mut stuck = AnalyzerClient::new(peer.clone());
    let held = tokio::spawn(async move { stuck.list_queries(ListQueriesRequest {}).await });

    // The held call takes the connection's one slot as soon as the server has it.
    let refused = eventually(Duration::from_secs(30), "a refusal", || async {
        match describe(peer.clone(), "q").await {
            Err(status) if status.code() == Code::ResourceExhausted => Some(status),
            Ok(_) => None,
            Err(status) => panic!("{status:?}"),
        }
    })
    .await;
    assert!(refused.message().contains("at most 1"), "{refused:?}");

    let other = connect(&running, "http", &plain, None).await.unwrap();
    assert_eq!(describe(other, "q").await.unwrap(), "anonymous");
    let counted = running
        .counter(
            "runnel_limit_rejections_total{service=\"runnel.v1.Analyzer\",limit=\"in_flight\"}",
            None,
        )
        .await;
    assert!(counted >= 1.0);
    held.abort();
    running.stop().await;
}

#[tokio::test]
async fn a_client_over_its_rate_is_refused() {
    let mut config = base();
    config.limits.rate_limit = 1;
    config.limits.rate_burst = 3;
    let running = start(config).await;
    let peer = connect(&running, "http", &ConnectConfig::default(), None)
        .await
        .unwrap();
    let mut outcomes = Vec::new();
    for _ in 0..10 {
        outcomes.push(describe(peer.clone(), "q").await.map_err(|s| s.code()));
    }
    // The burst passes; at one call a second, ten calls cannot all pass.
    assert!(outcomes[..3].iter().all(Result::is_ok), "{outcomes:?}");
    assert!(
        outcomes.contains(&Err(Code::ResourceExhausted)),
        "{outcomes:?}"
    );
    // Health checks are not rate limited.
    healthy(peer).await.unwrap();
    running.stop().await;
}

#[tokio::test]
async fn a_call_longer_than_the_request_timeout_is_ended() {
    let config = ServerConfig {
        request_timeout: Duration::from_millis(300),
        ..base()
    };
    let running = start(config).await;
    let peer = connect(&running, "http", &ConnectConfig::default(), None)
        .await
        .unwrap();
    let status = AnalyzerClient::new(peer)
        .list_queries(ListQueriesRequest {})
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    let counted = running
        .counter(
            "runnel_limit_rejections_total{service=\"runnel.v1.Analyzer\",limit=\"timeout\"}",
            None,
        )
        .await;
    assert!(counted >= 1.0);
    running.stop().await;
}

#[tokio::test]
async fn an_oversized_message_is_resource_exhausted() {
    let config = ServerConfig {
        max_message_bytes: 1024,
        ..base()
    };
    let running = start(config).await;
    let peer = connect(&running, "http", &ConnectConfig::default(), None)
        .await
        .unwrap();
    let status = describe(peer.clone(), &"x".repeat(4096)).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(describe(peer, "q").await.unwrap(), "anonymous");
    let counted = running
        .counter(
            "runnel_limit_rejections_total{service=\"runnel.v1.Analyzer\",limit=\"message_size\"}",
            None,
        )
        .await;
    assert!(counted >= 1.0);
    running.stop().await;
}

#[tokio::test]
async fn connections_beyond_the_limit_wait_until_one_closes() {
    let mut config = base();
    config.limits.max_connections = 1;
    let running = start(config).await;
    let plain = ConnectConfig::default();
    let first = connect(&running, "http", &plain, None).await.unwrap();
    healthy(first.clone()).await.unwrap();

    let url = format!("http://{}", running.grpc);
    let second = tokio::spawn(async move {
        let peer = runnel_security::connect_lazy(&url, &ConnectConfig::default()).unwrap();
        healthy(peer).await
    });
    // While the first connection is open the second is not served...
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!second.is_finished(), "a second connection was served");
    // ...and once it closes, it is.
    drop(first);
    tokio::time::timeout(Duration::from_secs(30), second)
        .await
        .expect("served after the first closed")
        .unwrap()
        .unwrap();
    running.stop().await;
}

#[tokio::test]
async fn a_client_that_never_completes_the_handshake_is_let_go() {
    let certs = Certs::new(&["analyzer"]);
    let mut config = ServerConfig {
        tls: Some(certs.server_tls("analyzer", false)),
        ..base()
    };
    config.limits.handshake_timeout = Duration::from_millis(200);
    let running = start(config).await;
    let mut silent = tokio::net::TcpStream::connect(running.grpc).await.unwrap();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(30), silent.read(&mut buf))
        .await
        .expect("the server closes the connection");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    // Everyone else is still served.
    let peer = connect(&running, "https", &certs.connect(None), None)
        .await
        .unwrap();
    healthy(peer).await.unwrap();
    running.stop().await;
}

/// An HTTP API served by `serve_http`: one route that answers with the caller's address
/// (`ConnectInfo`, as the guard reads it). Returns its address, its trigger, and the task
/// serving it, which ends when the server has shut down.
async fn start_http(
    config: ServerConfig,
) -> (
    SocketAddr,
    ShutdownTrigger,
    tokio::task::JoinHandle<std::io::Result<()>>,
) {
    use axum::extract::ConnectInfo;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = axum::Router::new().route(
        "/who",
        axum::routing::get(
            |ConnectInfo(peer): ConnectInfo<runnel_security::PeerInfo>| async move {
                format!("{:?}", peer.remote)
            },
        ),
    );
    let (trigger, shutdown) = Shutdown::new();
    let served = runnel_server::serve_http("test", listener, router, &config, shutdown).unwrap();
    (addr, trigger, tokio::spawn(served))
}

/// Writes `request` on a new connection to `addr` and reads until the server closes it:
/// what it answered (nothing, when it closed without a word or refused the connection).
async fn exchange(addr: SocketAddr, request: &[u8]) -> String {
    use tokio::io::AsyncWriteExt;
    let Ok(mut tcp) = tokio::net::TcpStream::connect(addr).await else {
        return String::new();
    };
    let mut response = Vec::new();
    if tcp.write_all(request).await.is_ok() {
        tokio::time::timeout(Duration::from_secs(30), tcp.read_to_end(&mut response))
            .await
            .expect("the server closes the connection")
            .ok();
    }
    String::from_utf8_lossy(&response).into_owned()
}

const GET_WHO: &[u8] = b"GET /who HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n";

#[tokio::test]
async fn an_http_client_that_sends_its_headers_too_slowly_is_let_go() {
    let mut config = base();
    config.limits.header_read_timeout = Duration::from_millis(200);
    let (addr, trigger, _served) = start_http(config).await;
    // Half a request head, then silence: the server must close the connection.
    let rest = exchange(addr, b"GET /who HTTP/1.1\r\nhost: local").await;
    assert!(
        rest.is_empty() || rest.starts_with("HTTP/1.1 408"),
        "{rest}"
    );
    // A client that sends its request at once is served, and the handler sees who it is.
    let response = exchange(addr, GET_WHO).await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.contains("127.0.0.1"), "{response}");
    trigger.trigger();
}

#[tokio::test]
async fn an_admin_client_that_sends_its_headers_too_slowly_is_let_go() {
    let mut config = base();
    config.limits.header_read_timeout = Duration::from_millis(200);
    let running = start(config).await;
    let rest = exchange(running.admin, b"GET /metrics HTTP/1.1\r\nhost: local").await;
    assert!(
        rest.is_empty() || rest.starts_with("HTTP/1.1 408"),
        "{rest}"
    );
    let live = exchange(
        running.admin,
        b"GET /live HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(live.starts_with("HTTP/1.1 200"), "{live}");
    running.stop().await;
}

#[tokio::test]
async fn http_shutdown_stops_accepting_and_ends_once_responses_are_done() {
    let (addr, trigger, served) = start_http(base()).await;
    assert!(exchange(addr, GET_WHO).await.starts_with("HTTP/1.1 200"));
    // An idle keep-alive connection does not hold shutdown up.
    let idle = tokio::net::TcpStream::connect(addr).await.unwrap();
    trigger.trigger();
    tokio::time::timeout(Duration::from_secs(30), served)
        .await
        .expect("shutdown ends although a connection is open")
        .unwrap()
        .unwrap();
    // Once it has, nobody is served.
    let after = exchange(addr, GET_WHO).await;
    assert!(
        !after.starts_with("HTTP/1.1 200"),
        "served after shutdown: {after}"
    );
    drop(idle);
}
