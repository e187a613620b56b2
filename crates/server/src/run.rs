//! Binding, serving and stopping a service.

use crate::admin::{self, Readiness};
use crate::config::{self, ConfigError, ListenAddrs, ServerConfig, ServiceConfig};
use crate::shutdown::{self, Shutdown};
use clap::Parser;
use runnel_security::{AcceptOptions, Guard, GuardLayer, Protocol, SecurityError, ServerTls};
use runnel_telemetry::LogFormat;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use tokio::net::TcpListener;

/// Why a server stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A socket could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// Why the OS refused.
        source: std::io::Error,
    },
    /// The gRPC server failed.
    #[error("grpc server: {0}")]
    Grpc(#[from] tonic::transport::Error),
    /// The admin or HTTP server failed.
    #[error("http server: {0}")]
    Http(std::io::Error),
    /// TLS or authentication could not be set up (certificates, keys, JWT keys).
    #[error("security: {0}")]
    Security(#[from] SecurityError),
    /// The service could not start or failed while running.
    #[error("{0}")]
    Service(String),
}

/// A service's sockets, bound before the service starts so that callers (tests, the
/// all-in-one CLI) can use port 0 and read back the real ports.
#[derive(Debug)]
pub struct Listeners {
    /// The gRPC API.
    pub grpc: TcpListener,
    /// The admin HTTP port.
    pub admin: TcpListener,
    /// The public HTTP API, for services that have one.
    pub http: Option<TcpListener>,
}

impl Listeners {
    /// Binds every address.
    pub async fn bind(addrs: ListenAddrs) -> Result<Listeners, ServeError> {
        let bind = |addr: SocketAddr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| ServeError::Bind { addr, source })
        };
        let http = match addrs.http {
            Some(addr) => Some(bind(addr).await?),
            None => None,
        };
        Ok(Listeners {
            grpc: bind(addrs.grpc).await?,
            admin: bind(addrs.admin).await?,
            http,
        })
    }

    /// The addresses actually bound.
    pub fn local_addrs(&self) -> std::io::Result<ListenAddrs> {
        Ok(ListenAddrs {
            grpc: self.grpc.local_addr()?,
            admin: self.admin.local_addr()?,
            http: self.http.as_ref().map(|l| l.local_addr()).transpose()?,
        })
    }
}

/// Serves `routes` (the service's gRPC API) on `listeners.grpc`, with health, reflection,
/// trace-context extraction, TLS, authentication and limits, and the admin port on
/// `listeners.admin`, until `shutdown` fires; then stops accepting and drains in-flight
/// calls for at most what is left of `config.drain_timeout` (see [`Shutdown::remaining`]).
///
/// `service_name` is the fully qualified gRPC name reported as SERVING by health checks.
pub async fn serve(
    service_name: &'static str,
    routes: tonic::service::Routes,
    grpc: TcpListener,
    admin: TcpListener,
    config: &ServerConfig,
    shutdown: Shutdown,
) -> Result<(), ServeError> {
    serve_when_ready(
        service_name,
        routes,
        grpc,
        admin,
        config,
        shutdown,
        std::future::ready(()),
    )
    .await
}

/// [`serve`], reporting NOT_SERVING (gRPC health) and not ready (`/ready`) until `ready`
/// completes — for a service that answers calls before it should take traffic, such as a
/// store replica still catching up with its results log.
pub async fn serve_when_ready(
    service_name: &'static str,
    routes: tonic::service::Routes,
    grpc: TcpListener,
    admin: TcpListener,
    config: &ServerConfig,
    shutdown: Shutdown,
    ready: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let tls = listener_tls(config)?;
    warn_if_exposed(service_name, "grpc", &grpc, config);
    let guard = Guard::new(
        service_name,
        &config.auth,
        &config.limits,
        config.request_timeout,
    )?;
    let (health, health_service) = tonic_health::server::health_reporter();
    let mut ready = std::pin::pin!(ready);
    let ready_now = futures::FutureExt::now_or_never(ready.as_mut()).is_some();
    let initially = if ready_now {
        tonic_health::ServingStatus::Serving
    } else {
        tonic_health::ServingStatus::NotServing
    };
    health.set_service_status("", initially).await;
    health.set_service_status(service_name, initially).await;

    let reflection_v1 = reflection_builder(service_name)
        .build_v1()
        .map_err(|e| ServeError::Service(format!("reflection: {e}")))?;
    let reflection_v1alpha = reflection_builder(service_name)
        .build_v1alpha()
        .map_err(|e| ServeError::Service(format!("reflection: {e}")))?;

    let readiness = Readiness::default();
    let admin_app = admin::router(readiness.clone());
    let admin_incoming = accept(admin, Protocol::Admin, tls.clone(), config)?;
    // With the same header-read timeout as the HTTP API: a client that sends a request's
    // head slowly must not hold an admin connection open for as long as it likes.
    let admin_task = tokio::spawn(crate::http::serve(
        admin_incoming,
        admin_app,
        config.limits.header_read_timeout,
        shutdown.clone(),
    ));

    let grpc_incoming = accept(grpc, Protocol::Grpc, tls, config)?;
    let grpc_shutdown = shutdown.clone();
    let health_on_stop = health.clone();
    let grpc_server = tonic::transport::Server::builder()
        .trace_fn(runnel_telemetry::propagation::server_span)
        .max_concurrent_streams(Some(config.limits.max_concurrent_streams))
        // Callers that vanished (a network cut, a client gone without a FIN) are noticed and
        // their streams ended, rather than kept, with whatever they hold, until TCP gives up
        // many minutes later.
        .http2_keepalive_interval(Some(runnel_security::KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(runnel_security::KEEPALIVE_TIMEOUT))
        // Large `Produce` batches arrive in fewer frames (clients choose the size of the
        // frames they receive: `runnel_security::connect` asks for the same).
        .max_frame_size(Some(runnel_security::MAX_FRAME_BYTES))
        .layer(GuardLayer::new(guard))
        .add_routes(routes)
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .serve_with_incoming_shutdown(grpc_incoming, async move {
            grpc_shutdown.wait().await;
            health_on_stop
                .set_service_status(service_name, tonic_health::ServingStatus::NotServing)
                .await;
        });
    if ready_now {
        readiness.set(true);
    }
    tracing::info!(
        service = service_name,
        tls = config.tls.is_some(),
        auth = config.auth.enabled,
        "serving"
    );

    let drain_timeout = config.drain_timeout;
    let mut grpc_server = std::pin::pin!(grpc_server);
    let mut becoming_ready = !ready_now;
    let result = loop {
        tokio::select! {
            () = ready.as_mut(), if becoming_ready => {
                becoming_ready = false;
                if !shutdown.is_triggered() {
                    health.set_service_status("", tonic_health::ServingStatus::Serving).await;
                    health
                        .set_service_status(service_name, tonic_health::ServingStatus::Serving)
                        .await;
                    readiness.set(true);
                    tracing::info!(service = service_name, "ready");
                }
                continue;
            }
            result = &mut grpc_server => break result.map_err(ServeError::from),
            () = shutdown.wait() => {
                readiness.set(false);
                break match tokio::time::timeout(shutdown.remaining(drain_timeout), &mut grpc_server).await {
                    Ok(result) => result.map_err(ServeError::from),
                    Err(_) => {
                        tracing::warn!(?drain_timeout, "drain timed out; abandoning in-flight calls");
                        Ok(())
                    }
                };
            }
        }
    };
    readiness.set(false);
    admin_task.abort();
    result
}

/// Builds a service's gRPC server and serves it with [`serve`](crate::serve): takes the
/// generated `…Server::new(service)`, limits its messages to the configuration's
/// `max_message_bytes` both ways, and reports it to health checks under its own gRPC name.
///
/// `serve_grpc!(server, listeners, &config.server, shutdown)` is the future of the server
/// (await it, or pin it to select on it), on `listeners.grpc` and `listeners.admin`.
///
/// `serve_grpc!(server, listeners, &config.server, shutdown, ready = future)` reports the
/// service NOT_SERVING until `future` completes (see [`serve_when_ready`](crate::serve_when_ready)).
#[macro_export]
macro_rules! serve_grpc {
    ($server:expr, $listeners:expr, $config:expr, $shutdown:expr $(,)?) => {
        $crate::serve_grpc!(
            $server,
            $listeners,
            $config,
            $shutdown,
            ready = ::std::future::ready(())
        )
    };
    ($server:expr, $listeners:expr, $config:expr, $shutdown:expr, ready = $ready:expr $(,)?) => {{
        let config: &$crate::ServerConfig = $config;
        let limit = config.max_message_bytes;
        let server = $server
            .max_decoding_message_size(limit)
            .max_encoding_message_size(limit);
        $crate::serve_when_ready(
            $crate::grpc_name(&server),
            $crate::GrpcRoutes::new(server),
            $listeners.grpc,
            $listeners.admin,
            config,
            $shutdown,
            $ready,
        )
    }};
}

/// The fully qualified gRPC name of a generated server, e.g. `runnel.v1.Broker`.
pub fn grpc_name<S: tonic::server::NamedService>(_server: &S) -> &'static str {
    S::NAME
}

/// Serves a public HTTP API (`router`) on `listener` with the same TLS, authentication
/// and rate limit as the service's gRPC API, until `shutdown` fires. Handlers find the
/// authenticated caller as `Extension<runnel_security::Caller>`. The returned future is
/// the server; run or spawn it.
pub fn serve_http(
    service_name: &'static str,
    listener: TcpListener,
    router: axum::Router,
    config: &ServerConfig,
    shutdown: Shutdown,
) -> Result<impl Future<Output = std::io::Result<()>> + Send + 'static, ServeError> {
    let tls = listener_tls(config)?;
    warn_if_exposed(service_name, "http", &listener, config);
    let guard = Guard::new(
        service_name,
        &config.auth,
        &config.limits,
        config.request_timeout,
    )?;
    let incoming = accept(listener, Protocol::Http, tls, config)?;
    let app = router.layer(axum::middleware::from_fn_with_state(
        guard,
        runnel_security::guard::http,
    ));
    let header_read_timeout = config.limits.header_read_timeout;
    Ok(crate::http::serve(
        incoming,
        app,
        header_read_timeout,
        shutdown,
    ))
}

/// The listeners' TLS, loaded (and watched) once per server.
fn listener_tls(config: &ServerConfig) -> Result<Option<ServerTls>, ServeError> {
    Ok(config.tls.as_ref().map(ServerTls::load).transpose()?)
}

/// Accepts on `listener` with Nagle's algorithm off (with it on, a small response
/// written after a delayed ACK waits ~40 ms, which showed as a 44 ms median in `runnel
/// bench` whatever the fsync policy), the connection limits, and TLS if configured.
fn accept(
    listener: TcpListener,
    protocol: Protocol,
    tls: Option<ServerTls>,
    config: &ServerConfig,
) -> Result<runnel_security::Incoming, ServeError> {
    let addr = listener.local_addr().map_err(ServeError::Http)?;
    runnel_security::accept(
        listener,
        AcceptOptions {
            protocol,
            tls,
            limits: config.limits.clone(),
        },
    )
    .map_err(|source| ServeError::Bind { addr, source })
}

/// Credentials sent in the clear can be read off the wire: say so when an authenticated
/// API listens beyond loopback without TLS.
fn warn_if_exposed(service: &str, what: &str, listener: &TcpListener, config: &ServerConfig) {
    let Ok(addr) = listener.local_addr() else {
        return;
    };
    if !addr.ip().is_loopback() && config.tls.is_none() {
        tracing::warn!(
            service,
            listener = what,
            %addr,
            auth = config.auth.enabled,
            "listening beyond loopback without TLS: calls and credentials travel in the clear"
        );
    }
}

/// Reflection over `runnel.v1` and `grpc.health.v1`, so `grpcurl list` and `describe`
/// work. Only this server's own services are listed: the descriptor set holds all five
/// Runnel services, and listing the others would send callers to the wrong port.
fn reflection_builder(service_name: &'static str) -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(runnel_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .with_service_name(service_name)
        .with_service_name("grpc.health.v1.Health")
        .with_service_name("grpc.reflection.v1.ServerReflection")
        .with_service_name("grpc.reflection.v1alpha.ServerReflection")
}

/// Arguments every service binary takes.
#[derive(Debug, Parser)]
struct ServiceArgs {
    /// A TOML file with a table for this service (default: ./runnel.toml if present).
    #[arg(long, env = "RUNNEL_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Log as JSON lines instead of human-readable text.
    #[arg(long)]
    log_json: bool,
    /// Without a command, the binary runs the service.
    #[command(subcommand)]
    command: Option<ServiceCommand>,
}

/// What a service binary can do besides running the service.
#[derive(Debug, clap::Subcommand)]
enum ServiceCommand {
    /// Ask the service running with this configuration whether it is serving (gRPC health
    /// check on its configured address): exit 0 if it is, 1 if not. For container health
    /// checks and exec probes, where there is no shell.
    Healthcheck {
        /// The gRPC service to ask about; the default, "", is the server as a whole.
        #[arg(long, default_value = "")]
        service: String,
        /// How long to wait for the answer, connecting included.
        #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
    },
}

/// The whole life of a service binary: arguments → config (fail fast, exit 2) →
/// telemetry → bind → print the bound addresses on stdout → run until SIGTERM/SIGINT →
/// drain → flush telemetry → exit.
///
/// The one stdout line, `<binary> listening grpc=<addr> admin=<addr> [http=<addr>]`, is
/// how supervisors and tests learn the ports when the config asks for port 0.
///
/// `<binary> healthcheck` instead loads the same configuration and checks, once, that the
/// service running with it is serving (see [`crate::healthcheck`]).
pub fn main<C, F, Fut, E>(binary: &'static str, run: F) -> ExitCode
where
    C: ServiceConfig,
    F: FnOnce(C, Listeners, Shutdown) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let args = ServiceArgs::parse();
    let config: C = match config::load(args.config.as_deref()) {
        Ok(config) => config,
        Err(error @ (ConfigError::Invalid { .. } | ConfigError::Load(_))) => {
            eprintln!("{binary}: {error}");
            // A health check that cannot read the configuration has not found the
            // service serving: 1, the one failure code probes know.
            return match args.command {
                Some(ServiceCommand::Healthcheck { .. }) => ExitCode::FAILURE,
                None => ExitCode::from(2),
            };
        }
    };
    if let Some(ServiceCommand::Healthcheck { service, timeout }) = args.command {
        let server = config.server();
        let tls = server.tls.is_some().then_some(&server.connect);
        return healthcheck(binary, server.grpc, &service, timeout, tls);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("{binary}: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let format = if args.log_json {
            LogFormat::Json
        } else {
            LogFormat::Human
        };
        let telemetry = match runnel_telemetry::init(binary, format) {
            Ok(guard) => guard,
            Err(error) => {
                eprintln!("{binary}: {error}");
                return ExitCode::FAILURE;
            }
        };
        let code = match run_bound(binary, config, run).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(message) => {
                tracing::error!(error = %message, "{binary} failed");
                eprintln!("{binary}: {message}");
                ExitCode::FAILURE
            }
        };
        tracing::info!("stopped");
        telemetry.shutdown();
        code
    })
}

/// `<binary> healthcheck`: one check on a small runtime of its own, no telemetry (the
/// check must not export spans, nor log anything but its one line).
fn healthcheck(
    binary: &str,
    grpc: SocketAddr,
    service: &str,
    timeout: std::time::Duration,
    tls: Option<&runnel_security::ConnectConfig>,
) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("{binary}: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(crate::healthcheck::check(grpc, service, timeout, tls)) {
        Ok(()) => {
            println!(
                "{binary}: serving on {}",
                crate::healthcheck::probe_addr(grpc)
            );
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("{binary}: not healthy: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn run_bound<C, F, Fut, E>(binary: &'static str, config: C, run: F) -> Result<(), String>
where
    C: ServiceConfig,
    F: FnOnce(C, Listeners, Shutdown) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let listeners = Listeners::bind(config.listen())
        .await
        .map_err(|e| e.to_string())?;
    let addrs = listeners.local_addrs().map_err(|e| e.to_string())?;
    let signalled = shutdown::signal();
    let (trigger, shutdown) = Shutdown::new();
    tokio::spawn(async move {
        signalled.await;
        trigger.trigger();
    });
    announce(binary, &addrs);
    run(config, listeners, shutdown)
        .await
        .map_err(|e| e.to_string())
}

fn announce(binary: &str, addrs: &ListenAddrs) {
    use std::io::Write;
    let mut line = format!(
        "{binary} listening grpc={} admin={}",
        addrs.grpc, addrs.admin
    );
    if let Some(http) = addrs.http {
        line.push_str(&format!(" http={http}"));
    }
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "{line}");
    let _ = stdout.flush();
    tracing::info!(grpc = %addrs.grpc, admin = %addrs.admin, http = ?addrs.http, "listening");
}
