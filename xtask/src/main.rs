//! Project tasks, run the same way by developers and by CI (`.ci/run`):
//!
//! - `cargo xtask test`  — build the service binaries, then run every test (unit, property,
//!   integration and the end-to-end tests that start the real binaries);
//! - `cargo xtask lint`  — `cargo fmt --check` and `cargo clippy -D warnings`;
//! - `cargo xtask fmt`   — format everything;
//! - `cargo xtask bench <ingest|broker> [args]` — `runnel bench` in release mode;
//! - `cargo xtask fuzz [seconds] [target…]` — every fuzz target (or the ones named) for a
//!   bounded time each, with cargo-fuzz (`docs/security.md`);
//! - `cargo xtask ci`    — lint, then test: what `.ci/run` calls.

use std::process::{Command, ExitCode};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let task = args.first().map(String::as_str).unwrap_or("help");
    let rest = &args[args.len().min(1)..];
    let result = match task {
        "test" => test(rest),
        "lint" => lint(),
        "fmt" => cargo(&["fmt", "--all"]),
        "bench" => bench(rest),
        "fuzz" => fuzz(rest),
        "ci" => lint().and_then(|()| test(rest)),
        _ => {
            eprintln!(
                "usage: cargo xtask <test|lint|fmt|bench|fuzz|ci> [extra args for the test runner]"
            );
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("xtask {task}: {message}");
            ExitCode::FAILURE
        }
    }
}

fn cargo(args: &[&str]) -> Result<(), String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    eprintln!("$ cargo {}", args.join(" "));
    let status = Command::new(&cargo)
        .args(args)
        .status()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("`cargo {}` failed ({status})", args.join(" ")))
    }
}

fn test(extra: &[String]) -> Result<(), String> {
    // The end-to-end tests start the service binaries as processes, so they must be built
    // (and current) before the tests run.
    cargo(&["build", "--workspace", "--bins"])?;
    let mut args = vec!["test", "--workspace"];
    args.extend(extra.iter().map(String::as_str));
    cargo(&args)
}

fn lint() -> Result<(), String> {
    cargo(&["fmt", "--all", "--", "--check"])?;
    cargo(&[
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ])
}

fn bench(extra: &[String]) -> Result<(), String> {
    let mut args = vec!["run", "--release", "--package", "runnel-cli", "--", "bench"];
    args.extend(extra.iter().map(String::as_str));
    cargo(&args)
}

/// The fuzz targets in `fuzz/fuzz_targets/`, all run by `cargo xtask fuzz`.
const FUZZ_TARGETS: &[&str] = &[
    "records",
    "broker_batch",
    "log_frames",
    "ingest_validation",
    "json_extract",
    "grpc_requests",
];

/// Runs each fuzz target for `seconds` (default 60). cargo-fuzz needs nightly compiler
/// flags, which the stable toolchain accepts with `RUSTC_BOOTSTRAP=1`; the code forbids
/// `unsafe`, so no sanitizer (`-s none`) — panics, overflows, huge allocations and broken
/// invariants are what the targets look for.
fn fuzz(args: &[String]) -> Result<(), String> {
    let (seconds, targets) = match args.first().map(|a| a.parse::<u64>()) {
        Some(Ok(seconds)) => (seconds, &args[1..]),
        _ => (60, args),
    };
    let targets: Vec<&str> = if targets.is_empty() {
        FUZZ_TARGETS.to_vec()
    } else {
        targets.iter().map(String::as_str).collect()
    };
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or("xtask has no parent directory")?
        .join("fuzz");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    for target in targets {
        eprintln!("$ cargo fuzz run {target} -s none -- -max_total_time={seconds}");
        let status = Command::new(&cargo)
            .current_dir(&root)
            .env("RUSTC_BOOTSTRAP", "1")
            .args(["fuzz", "run", target, "-s", "none", "--"])
            .arg(format!("-max_total_time={seconds}"))
            .args([
                "-rss_limit_mb=2048",
                "-max_len=65536",
                "-print_final_stats=1",
            ])
            .status()
            .map_err(|e| format!("cannot run cargo fuzz (cargo install cargo-fuzz): {e}"))?;
        if !status.success() {
            return Err(format!(
                "fuzz target {target} failed ({status}); the input is in fuzz/artifacts/{target}/"
            ));
        }
    }
    Ok(())
}
