//! `serve` (through `serve_grpc!`, as every service calls it) over real sockets: health,
//! reflection, the admin port, message limits, HTTP/2 frame sizes, and the bounded drain.

use runnel_proto::v1::analyzer_server::{Analyzer, AnalyzerServer};
use runnel_proto::v1::{
    DescribeQueryRequest, ListQueriesRequest, ListQueriesResponse, QueryDescription,
};
use runnel_server::{ServerConfig, Shutdown};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// A service whose `ListQueries` never finishes (it says when it has started), to hold a
/// call in flight across shutdown.
struct Stuck(Arc<Notify>);

#[tonic::async_trait]
impl Analyzer for Stuck {
    async fn list_queries(
        &self,
        _: Request<ListQueriesRequest>,
    ) -> Result<Response<ListQueriesResponse>, Status> {
        self.0.notify_one();
        std::future::pending().await
    }

    async fn describe_query(
        &self,
        request: Request<DescribeQueryRequest>,
    ) -> Result<Response<QueryDescription>, Status> {
        // The length, not the name: a long name would not fit in the status header.
        let name = request.into_inner().name;
        Err(Status::not_found(format!(
            "no query of {} bytes",
            name.len()
        )))
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
    channel: Channel,
    grpc: std::net::SocketAddr,
    admin: std::net::SocketAddr,
    entered: Arc<Notify>,
    trigger: runnel_server::ShutdownTrigger,
    served: tokio::task::JoinHandle<Result<(), runnel_server::ServeError>>,
}

/// The servers' message limit in these tests.
const MAX_MESSAGE_BYTES: usize = 64 * 1024;

async fn start(drain_timeout: Duration) -> Running {
    let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (grpc_addr, admin_addr) = (grpc.local_addr().unwrap(), admin.local_addr().unwrap());
    let config = ServerConfig {
        drain_timeout,
        max_message_bytes: MAX_MESSAGE_BYTES,
        ..ServerConfig::default()
    };
    let entered = Arc::new(Notify::new());
    let server = AnalyzerServer::new(Stuck(entered.clone()));
    let listeners = runnel_server::Listeners {
        grpc,
        admin,
        http: None,
    };
    let (trigger, shutdown) = Shutdown::new();
    let served = tokio::spawn(async move {
        runnel_server::serve_grpc!(server, listeners, &config, shutdown).await
    });
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{grpc_addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    Running {
        channel,
        grpc: grpc_addr,
        admin: admin_addr,
        entered,
        trigger,
        served,
    }
}

#[tokio::test]
async fn health_reports_the_service_and_the_process() {
    let running = start(Duration::from_secs(5)).await;
    let mut health = HealthClient::new(running.channel.clone());
    for service in ["", runnel_proto::service_name::ANALYZER] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status();
        assert_eq!(status, ServingStatus::Serving, "{service:?}");
    }
    let unknown = health
        .check(HealthCheckRequest {
            service: "runnel.v1.Broker".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);
    running.trigger.trigger();
    running.served.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_request_over_the_configured_message_limit_is_refused() {
    use runnel_proto::v1::analyzer_client::AnalyzerClient;
    let running = start(Duration::from_secs(5)).await;
    let mut client = AnalyzerClient::new(running.channel.clone());
    let describe = |name: String| DescribeQueryRequest { name };
    let within = client
        .describe_query(describe("q".repeat(MAX_MESSAGE_BYTES / 2)))
        .await
        .unwrap_err();
    assert_eq!(within.code(), tonic::Code::NotFound, "{within:?}");
    let over = client
        .describe_query(describe("q".repeat(MAX_MESSAGE_BYTES + 1)))
        .await
        .unwrap_err();
    assert_eq!(over.code(), tonic::Code::ResourceExhausted, "{over:?}");
    running.trigger.trigger();
    running.served.await.unwrap().unwrap();
}

#[tokio::test]
async fn reflection_lists_only_this_servers_services_in_both_versions() {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient as V1;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest as V1Request;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse as V1Response;
    use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient as V1Alpha;
    use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest as AlphaRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse as AlphaResponse;

    let running = start(Duration::from_secs(5)).await;
    let expected = [
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
        "runnel.v1.Analyzer",
    ];

    let request = tonic_reflection::pb::v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(V1Request::ListServices(String::new())),
    };
    let mut answers = V1::new(running.channel.clone())
        .server_reflection_info(tokio_stream::once(request))
        .await
        .unwrap()
        .into_inner();
    let Some(V1Response::ListServicesResponse(list)) =
        answers.next().await.unwrap().unwrap().message_response
    else {
        panic!("not a service list");
    };
    let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    names.sort();
    assert_eq!(names, expected);

    let request = tonic_reflection::pb::v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(AlphaRequest::ListServices(String::new())),
    };
    let mut answers = V1Alpha::new(running.channel.clone())
        .server_reflection_info(tokio_stream::once(request))
        .await
        .unwrap()
        .into_inner();
    let Some(AlphaResponse::ListServicesResponse(list)) =
        answers.next().await.unwrap().unwrap().message_response
    else {
        panic!("not a service list");
    };
    let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    names.sort();
    assert_eq!(names, expected);

    // The whole contract is still describable: grpcurl can build requests.
    let request = tonic_reflection::pb::v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(V1Request::FileContainingSymbol("runnel.v1.Analyzer".into())),
    };
    let mut answers = V1::new(running.channel.clone())
        .server_reflection_info(tokio_stream::once(request))
        .await
        .unwrap()
        .into_inner();
    let answer = answers.next().await.unwrap().unwrap().message_response;
    assert!(
        matches!(answer, Some(V1Response::FileDescriptorResponse(_))),
        "{answer:?}"
    );
    running.trigger.trigger();
    running.served.await.unwrap().unwrap();
}

#[tokio::test]
async fn the_admin_port_serves_metrics_and_readiness() {
    let running = start(Duration::from_secs(5)).await;
    metrics::counter!("runnel_test_admin_total").increment(3);
    let metrics = reqwest::get(format!("http://{}/metrics", running.admin))
        .await
        .unwrap();
    assert_eq!(metrics.status(), 200);
    let text = metrics.text().await.unwrap();
    assert!(text.contains("runnel_test_admin_total 3"), "{text}");
    let ready = reqwest::get(format!("http://{}/ready", running.admin))
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    let live = reqwest::get(format!("http://{}/live", running.admin))
        .await
        .unwrap();
    assert_eq!(live.status(), 200);
    running.trigger.trigger();
    running.served.await.unwrap().unwrap();
}

#[tokio::test]
async fn shutdown_drains_in_flight_calls_for_at_most_the_drain_timeout() {
    let running = start(Duration::from_millis(300)).await;
    let mut client =
        runnel_proto::v1::analyzer_client::AnalyzerClient::new(running.channel.clone());
    let call = tokio::spawn(async move { client.list_queries(ListQueriesRequest {}).await });
    running.entered.notified().await;
    running.trigger.trigger();
    // The stuck call would hold a graceful shutdown open forever; the drain timeout ends it.
    tokio::time::timeout(Duration::from_secs(10), running.served)
        .await
        .expect("serve returns after the drain timeout")
        .unwrap()
        .unwrap();
    call.abort();
}

/// What a client sends first on an HTTP/2 connection (RFC 9113, section 3.4).
const HTTP2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// `SETTINGS_MAX_FRAME_SIZE`'s identifier.
const SETTINGS_MAX_FRAME_SIZE: u16 = 0x5;

/// The parameters of the first SETTINGS frame (not an acknowledgement) that the peer on
/// `stream` sends, read frame by frame off the raw connection.
async fn peer_settings(stream: &mut TcpStream) -> Vec<(u16, u32)> {
    loop {
        let mut head = [0u8; 9];
        stream.read_exact(&mut head).await.unwrap();
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let (kind, flags) = (head[3], head[4]);
        let mut payload = vec![0u8; len];
        stream.read_exact(&mut payload).await.unwrap();
        if kind == 0x4 && flags & 0x1 == 0 {
            return payload
                .chunks_exact(6)
                .map(|p| {
                    (
                        u16::from_be_bytes([p[0], p[1]]),
                        u32::from_be_bytes([p[2], p[3], p[4], p[5]]),
                    )
                })
                .collect();
        }
    }
}

#[tokio::test]
async fn the_server_takes_http2_frames_of_the_shared_maximum() {
    let running = start(Duration::from_secs(5)).await;
    let mut raw = TcpStream::connect(running.grpc).await.unwrap();
    raw.write_all(HTTP2_PREFACE).await.unwrap();
    // An empty SETTINGS frame: this side keeps every default.
    raw.write_all(&[0, 0, 0, 0x4, 0, 0, 0, 0, 0]).await.unwrap();
    let settings = peer_settings(&mut raw).await;
    assert!(
        settings.contains(&(SETTINGS_MAX_FRAME_SIZE, runnel_security::MAX_FRAME_BYTES)),
        "{settings:?}"
    );
    drop(raw);
    running.trigger.trigger();
    running.served.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_runnel_client_asks_for_http2_frames_of_the_shared_maximum() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let peer =
        runnel_security::connect_lazy(&url, &runnel_security::ConnectConfig::default()).unwrap();
    // The call never gets an answer: it only makes the client connect and say its settings.
    let call = tokio::spawn(async move {
        HealthClient::new(peer)
            .check(HealthCheckRequest::default())
            .await
    });
    let (mut raw, _) = listener.accept().await.unwrap();
    let mut preface = [0u8; HTTP2_PREFACE.len()];
    raw.read_exact(&mut preface).await.unwrap();
    assert_eq!(&preface[..], HTTP2_PREFACE);
    let settings = peer_settings(&mut raw).await;
    assert!(
        settings.contains(&(SETTINGS_MAX_FRAME_SIZE, runnel_security::MAX_FRAME_BYTES)),
        "{settings:?}"
    );
    call.abort();
}
