//! Support for Runnel's end-to-end tests: start the five real service binaries as separate
//! processes on ephemeral ports, wait for them on their health checks, kill and restart
//! them, receive their OpenTelemetry spans — and the same for the containers of a Docker
//! Compose project ([`compose`]). The external servers some tests need (`redis-server`,
//! headless Chromium) and in-process services are in `runnel-testkit`.
//!
//! The binaries are the ones `cargo build --workspace --bins` put next to the test
//! executable; `cargo xtask test` builds them before running the tests.

pub mod compose;
pub mod otlp;
pub mod process;

pub use process::{PARTITIONS, Pipeline};
pub use runnel_testkit::process::{ServiceProcess, binary_dir};
