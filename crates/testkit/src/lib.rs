//! Runnel's test kit: what the tests of every crate, `runnel up` and the benches share.
//!
//! - [`services`]: services started in this process — their `run(config, listeners,
//!   shutdown)` on listeners bound beforehand (port 0 in tests), under one shutdown, with
//!   their addresses known before they serve;
//! - [`eventually`]: wait for a condition on a real signal, polling it until a deadline,
//!   and fail naming what was awaited — never a bare `sleep`;
//! - [`nats`], [`redis`], [`browser`]: the external servers some tests need
//!   (`nats-server`, `redis-server`, headless Chromium), as child processes;
//! - [`skip`]: a test that cannot run because a tool is missing says so in the output and
//!   in the skip report `cargo xtask test` summarises — or fails, when the tool is required
//!   (`RUNNEL_REQUIRE_*=1`, as in CI).
//!
//! A library: it imports no service (they are generic parameters here), so any crate's
//! tests may use it.

pub mod browser;
pub mod eventually;
pub mod nats;
pub mod process;
pub mod redis;
pub mod services;
pub mod skip;

pub use eventually::{Deferred, eventually, holds_within};
pub use services::Services;
pub use skip::{Tool, require, skip};
