//! Project tasks, run the same way by developers and by CI (`.ci/run`):
//!
//! - `cargo xtask test`  — build the service binaries, then run every test (unit, property,
//!   integration and the end-to-end tests that start the real binaries);
//! - `cargo xtask lint`  — `cargo fmt --check` and `cargo clippy -D warnings`;
//! - `cargo xtask fmt`   — format everything;
//! - `cargo xtask bench <ingest|stream|broker|analyzer|gateway|e2e> [args]` — `runnel bench` in
//!   release mode;
//! - `cargo xtask images [--tag <tag>]` — the service images, built offline: statically
//!   linked release binaries copied into images `FROM scratch` (nothing is pulled);
//! - `cargo xtask compose-test` — `images`, then the compose end-to-end test
//!   (`tests/compose`) against them;
//! - `cargo xtask fuzz [seconds] [target…]` — every fuzz target (or the ones named) for a
//!   bounded time each, with cargo-fuzz (`docs/security.md`);
//! - `cargo xtask ci`    — lint, then test: what `.ci/run` calls.

use std::path::{Path, PathBuf};
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
        "images" => images(rest),
        "compose-test" => images(&[]).and_then(|()| compose_test(rest)),
        "fuzz" => fuzz(rest),
        "ci" => lint().and_then(|()| test(rest)),
        _ => {
            eprintln!(
                "usage: cargo xtask <test|lint|fmt|bench|images|compose-test|fuzz|ci> [extra args]"
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
    cargo_with(args, &[])
}

fn cargo_with(args: &[&str], env: &[(&str, &str)]) -> Result<(), String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let shown: String = env.iter().map(|(k, v)| format!("{k}='{v}' ")).collect();
    eprintln!("$ {shown}cargo {}", args.join(" "));
    let status = Command::new(&cargo)
        .args(args)
        .envs(env.iter().copied())
        .status()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("`cargo {}` failed ({status})", args.join(" ")))
    }
}

/// The variable naming the file each skipped test appends its reason to
/// (`runnel_testkit::skip::SKIP_REPORT`; xtask stays free of the workspace's crates).
const SKIP_REPORT: &str = "RUNNEL_SKIP_REPORT";

fn test(extra: &[String]) -> Result<(), String> {
    // The end-to-end tests start the service binaries as processes, so they must be built
    // (and current) before the tests run.
    cargo(&["build", "--workspace", "--bins"])?;
    let report = target_dir().join("skipped-tests.txt");
    match std::fs::remove_file(&report) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("cannot remove {}: {e}", report.display())),
    }
    let mut args = vec!["test", "--workspace"];
    args.extend(extra.iter().map(String::as_str));
    let report_arg = report.display().to_string();
    let result = cargo_with(&args, &[(SKIP_REPORT, &report_arg)]);
    // After cargo's own closing lines, whether the tests passed or not: a green run says
    // what it did not run.
    let skipped = std::fs::read_to_string(&report).unwrap_or_default();
    eprintln!("\n{}", skip_summary(&skipped));
    result
}

/// The summary of a skip report (one `<test>: needs <what> (<how>)` line per skip).
fn skip_summary(report: &str) -> String {
    let mut lines: Vec<&str> = report.lines().filter(|l| !l.trim().is_empty()).collect();
    lines.sort_unstable();
    match lines.len() {
        0 => "no test skipped".to_owned(),
        n => {
            let noun = if n == 1 { "test" } else { "tests" };
            let mut summary = format!("{n} {noun} skipped:");
            for line in lines {
                summary.push_str("\n  ");
                summary.push_str(line);
            }
            summary
        }
    }
}

/// Where cargo builds: `CARGO_TARGET_DIR` if set (`.ci/run` sets it), else `target/`.
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
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

/// The images `cargo xtask images` builds: the `deploy/scratch.Dockerfile` target, and the
/// binary it holds. The image is `runnel-<target>`.
const IMAGES: [(&str, &str); 6] = [
    ("collector", "runnel-collector"),
    ("broker", "runnel-broker"),
    ("analyzer", "runnel-analyzer"),
    ("store", "runnel-store"),
    ("gateway", "runnel-gateway"),
    // Test support: the OTLP receiver the compose test points the services at.
    ("otlp-sink", "runnel-otlp-sink"),
];

/// The packages that hold those binaries.
const IMAGE_PACKAGES: [&str; 6] = [
    "runnel-collector",
    "runnel-broker",
    "runnel-analyzer",
    "runnel-store",
    "runnel-gateway",
    "runnel-e2e",
];

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// The target triple rustc builds for by default (the host's).
fn host_triple() -> Result<String, String> {
    let output = Command::new("rustc")
        .arg("-vV")
        .output()
        .map_err(|e| format!("cannot run rustc: {e}"))?;
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .find_map(|line| line.strip_prefix("host: "))
        .map(str::to_owned)
        .ok_or_else(|| "rustc -vV printed no host triple".into())
}

/// `cargo xtask images [--tag <tag>]`: one static release build of every service binary
/// (in its own target directory, so the flags do not invalidate the normal build), then one
/// `docker build` per image from a context holding only those binaries. Each image is tagged
/// `<tag>` (default `latest`) and the workspace version.
fn images(args: &[String]) -> Result<(), String> {
    let tag = match args {
        [] => "latest".to_owned(),
        [flag, tag] if flag == "--tag" => tag.clone(),
        _ => return Err("usage: cargo xtask images [--tag <tag>]".into()),
    };
    let root = workspace_root();
    let triple = host_triple()?;
    let target_dir = self::target_dir().join("static");
    let target_dir_arg = target_dir.display().to_string();
    let mut build = vec![
        "build",
        "--release",
        "--target",
        &triple,
        "--target-dir",
        &target_dir_arg,
        "--bins",
    ];
    for package in IMAGE_PACKAGES {
        build.extend(["-p", package]);
    }
    // glibc, linked statically: the binaries need nothing from the image they run in.
    let mut rustflags = std::env::var("RUSTFLAGS").unwrap_or_default();
    rustflags.push_str(" -C target-feature=+crt-static");
    cargo_with(&build, &[("RUSTFLAGS", rustflags.trim())])?;

    let binaries = target_dir.join(&triple).join("release");
    let context = target_dir.join("images");
    if context.exists() {
        std::fs::remove_dir_all(&context)
            .map_err(|e| format!("remove {}: {e}", context.display()))?;
    }
    std::fs::create_dir_all(context.join("data"))
        .map_err(|e| format!("create {}: {e}", context.display()))?;
    std::fs::copy(
        root.join("deploy/scratch.Dockerfile"),
        context.join("Dockerfile"),
    )
    .map_err(|e| format!("copy the Dockerfile: {e}"))?;
    for (_, binary) in IMAGES {
        std::fs::copy(binaries.join(binary), context.join(binary))
            .map_err(|e| format!("copy {binary}: {e}"))?;
    }

    let version = env!("CARGO_PKG_VERSION");
    let context_arg = context.display().to_string();
    let dockerfile = context.join("Dockerfile").display().to_string();
    for (target, binary) in IMAGES {
        let tagged = format!("{binary}:{tag}");
        let versioned = format!("{binary}:{version}");
        run(
            "docker",
            &[
                "build",
                "--quiet",
                "--file",
                &dockerfile,
                "--target",
                target,
                "--tag",
                &tagged,
                "--tag",
                &versioned,
                &context_arg,
            ],
        )?;
        eprintln!("built {tagged} ({versioned})");
    }
    Ok(())
}

/// The compose end-to-end test against the images `images` just built.
fn compose_test(extra: &[String]) -> Result<(), String> {
    let certs = compose_certs()?;
    let certs = certs.display().to_string();
    let mut args = vec!["test", "--package", "runnel-e2e", "--test", "compose"];
    args.extend(extra.iter().map(String::as_str));
    // One compose project at a time: the fault test's timing has the machine to itself.
    args.extend(["--", "--nocapture", "--test-threads=1"]);
    cargo_with(
        &args,
        &[
            ("RUNNEL_COMPOSE_E2E", "1"),
            ("RUNNEL_COMPOSE_CERTS", &certs),
        ],
    )
}

/// The secure compose variant's certificates, made as docker-compose.secure.yml says: by
/// `runnel certs init --mount /certs`, the service keys then given to the user the
/// services run as. Returns their directory (compose-certs in the target directory).
fn compose_certs() -> Result<PathBuf, String> {
    use std::os::unix::fs::PermissionsExt;
    cargo(&["build", "--package", "runnel-cli", "--bin", "runnel"])?;
    let dir = target_dir().join("compose-certs");
    let runnel = target_dir().join("debug/runnel").display().to_string();
    let dir_arg = dir.display().to_string();
    run(
        &runnel,
        &[
            "certs", "init", "--dir", &dir_arg, "--mount", "/certs", "--force",
        ],
    )?;
    for service in IMAGES.iter().map(|(service, _)| *service) {
        let key = dir.join(format!("{service}.key"));
        if !key.exists() {
            continue; // the OTLP sink has none
        }
        // As root (CI), the key belongs to the services' user as documented; otherwise
        // (these are throw-away test certificates) it is made readable to it instead.
        if std::os::unix::fs::chown(&key, Some(65532), Some(65532)).is_err() {
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644))
                .map_err(|e| format!("chmod {}: {e}", key.display()))?;
        }
    }
    Ok(dir)
}

fn run(program: &str, args: &[&str]) -> Result<(), String> {
    eprintln!("$ {program} {}", args.join(" "));
    let status = Command::new(program)
        .args(args)
        .status()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("`{program} {}` failed ({status})", args.join(" ")))
    }
}

/// The fuzz targets in `fuzz/fuzz_targets/`, all run by `cargo xtask fuzz`.
const FUZZ_TARGETS: &[&str] = &[
    "records",
    "broker_batch",
    "log_frames",
    "ingest_validation",
    "json_extract",
    "grpc_requests",
    "msglog_records",
    "udp_datagrams",
    "subscribe_events",
    "sql_queries",
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

#[cfg(test)]
mod tests {
    use super::skip_summary;

    #[test]
    fn a_run_without_skips_says_so() {
        assert_eq!(skip_summary(""), "no test skipped");
    }

    #[test]
    fn the_summary_counts_the_skips_and_lists_each_with_its_reason() {
        let report = "runnel-store b: needs redis-server (apt install redis-server)\n\
                      runnel-broker a: needs nats-server (apt install nats-server)\n";
        assert_eq!(
            skip_summary(report),
            "2 tests skipped:\n  \
             runnel-broker a: needs nats-server (apt install nats-server)\n  \
             runnel-store b: needs redis-server (apt install redis-server)"
        );
        assert!(skip_summary("x: needs y (z)\n").starts_with("1 test skipped:"));
    }
}
