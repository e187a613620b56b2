//! Support for Runnel's end-to-end tests: start the five real service binaries as separate
//! processes on ephemeral ports, wait for them on their health checks, kill and restart
//! them, receive their OpenTelemetry spans, run the external servers some tests need
//! (`redis-server`, headless Chromium) — and the same for the containers of a Docker
//! Compose project ([`compose`]).
//!
//! The binaries are the ones `cargo build --workspace --bins` put next to the test
//! executable; `cargo xtask test` builds them before running the tests.

pub mod browser;
pub mod compose;
pub mod otlp;
pub mod process;
pub mod redis;

pub use process::{PARTITIONS, Pipeline, ServiceProcess};
