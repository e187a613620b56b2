//! Project tasks, run the same way by developers and by CI (`.ci/run`):
//!
//! - `cargo xtask test`  — build the service binaries, then run every test (unit, property,
//!   integration and the end-to-end tests that start the real binaries);
//! - `cargo xtask lint`  — `cargo fmt --check` and `cargo clippy -D warnings`;
//! - `cargo xtask fmt`   — format everything;
//! - `cargo xtask bench <ingest|stream|broker|analyzer|gateway> [args]` — `runnel bench` in
//!   release mode;
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
        "ci" => lint().and_then(|()| test(rest)),
        _ => {
            eprintln!(
                "usage: cargo xtask <test|lint|fmt|bench|ci> [extra args for the test runner]"
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
