//! Scaffolding that every Runnel service shares, so that the five services start, report
//! and stop the same way:
//!
//! - [`config`]: layered configuration (defaults → file → `RUNNEL_<SERVICE>__…` env),
//!   validated before any port is bound, with one-line errors that name the key;
//! - [`Listeners`]: the service's sockets, bound up front so tests can pass port 0;
//! - [`serve`]: a tonic server with gRPC health, reflection (v1 and v1alpha), trace-context
//!   extraction, TLS, authentication and limits ([`runnel_security`]), plus the admin HTTP
//!   port (`/metrics`, `/ready`, `/live`); [`serve_grpc!`] builds a service's generated
//!   server with the configured message limits and serves it so; [`serve_http`] the same
//!   for an HTTP API;
//! - [`Shutdown`]: SIGTERM/SIGINT → stop accepting → drain, every step after that within
//!   what is left of one bounded grace period ([`Shutdown::remaining`]);
//! - [`main`]: the whole life of a service binary, so each `main.rs` is one line;
//! - [`healthcheck`]: the binary's `healthcheck` subcommand, for containers without a shell.
//!
//! Channels to peer services come from [`runnel_security::connect_lazy`] (TLS, tokens,
//! trace context, keepalive).

pub mod admin;
pub mod config;
pub mod healthcheck;
mod http;
mod run;
mod shutdown;

pub use config::{ConfigError, ListenAddrs, ServerConfig, ServiceConfig};
pub use run::{Listeners, ServeError, grpc_name, main, serve, serve_http, serve_when_ready};
pub use shutdown::{Shutdown, ShutdownTrigger, signal as shutdown_signal};
pub use tonic::service::Routes as GrpcRoutes;

/// Every Runnel binary links this crate, so the allocator is chosen once, here. The gRPC
/// path allocates per call (frames, headers, buffers); glibc's arenas contend between the
/// runtime's threads on it, and mimalloc gave +45 % single-message produces in the broker
/// benchmark (`docs/benchmarks.md`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
