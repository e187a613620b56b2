//! Visible skips: a test that cannot run here says so, instead of passing silently.
//!
//! libtest captures what a passing test prints with `print!`/`eprint!`, so a skip printed
//! that way never shows. [`skip`] writes to the process's stderr directly (not captured),
//! as `skipped: <test>: needs <what> (<how>)`, and appends the same line, without the
//! `skipped: ` prefix, to the file named by [`SKIP_REPORT`] when it is set: `cargo xtask
//! test` sets it and ends its run with a summary of every skipped test.
//!
//! [`require`] decides for one [`Tool`]: it runs when installed; when missing, the test is
//! skipped — unless the tool's `RUNNEL_REQUIRE_*` variable is `1` (as `.ci/run` sets, after
//! installing everything), where a missing tool fails the test.

use std::io::Write;
use std::process::{Command, Stdio};

/// The environment variable naming the file each skip appends its line to.
pub const SKIP_REPORT: &str = "RUNNEL_SKIP_REPORT";

/// An external program some tests need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tool {
    /// `nats-server`: the broker's JetStream engine.
    NatsServer,
    /// `redis-server`: the store's shared hot tier.
    RedisServer,
    /// `chromium`: the dashboard's browser test.
    Chromium,
    /// `kubectl`: renders the Kubernetes overlays.
    Kubectl,
    /// `kubernetes-validate`: checks them against the Kubernetes API schemas.
    KubernetesValidate,
}

impl Tool {
    /// The program's name on `PATH`.
    pub fn program(self) -> &'static str {
        match self {
            Tool::NatsServer => "nats-server",
            Tool::RedisServer => "redis-server",
            Tool::Chromium => "chromium",
            Tool::Kubectl => "kubectl",
            Tool::KubernetesValidate => "kubernetes-validate",
        }
    }

    /// Arguments that make the program print its version and exit 0, without a server or
    /// a cluster.
    fn version_args(self) -> &'static [&'static str] {
        match self {
            Tool::Kubectl => &["version", "--client"],
            _ => &["--version"],
        }
    }

    /// The variable that, set to `1`, makes a missing tool fail the tests that need it.
    pub fn require_variable(self) -> &'static str {
        match self {
            Tool::NatsServer => "RUNNEL_REQUIRE_NATS",
            Tool::RedisServer => "RUNNEL_REQUIRE_REDIS",
            Tool::Chromium => "RUNNEL_REQUIRE_CHROMIUM",
            Tool::Kubectl | Tool::KubernetesValidate => "RUNNEL_REQUIRE_K8S_TOOLS",
        }
    }

    /// How to install it.
    pub fn install(self) -> &'static str {
        match self {
            Tool::NatsServer => "apt install nats-server; .ci/run does",
            Tool::RedisServer => "apt install redis-server; .ci/run does",
            Tool::Chromium => "apt install chromium; .ci/run does",
            Tool::Kubectl => "install kubectl, https://kubernetes.io/docs/tasks/tools/",
            Tool::KubernetesValidate => "pip install kubernetes-validate; .ci/run does",
        }
    }

    /// Whether the program runs here.
    fn installed(self) -> bool {
        Command::new(self.program())
            .args(self.version_args())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|status| status.success())
    }
}

/// Whether the calling test may run: `true` when `tool` is installed. When it is not, the
/// test is reported skipped ([`skip`]) and `false` returned, so that the test returns at
/// once — or, with the tool's `RUNNEL_REQUIRE_*=1`, the test fails here.
pub fn require(tool: Tool) -> bool {
    let required = std::env::var(tool.require_variable()).is_ok_and(|v| v == "1");
    let runs = runs(tool, tool.installed(), required);
    if !runs {
        skip(tool.program(), tool.install());
    }
    runs
}

/// [`require`]'s decision, given what it found: whether the test runs (a missing tool that
/// is required fails it).
fn runs(tool: Tool, installed: bool, required: bool) -> bool {
    if installed {
        return true;
    }
    if required {
        panic!(
            "{} is required ({}=1) but not installed: {}",
            tool.program(),
            tool.require_variable(),
            tool.install()
        );
    }
    false
}

/// Reports the calling test skipped because it `needs` something that is not here, and
/// `how` to get it. The test is the current thread's name (libtest names each test's thread
/// after the test); call this from the test's own thread, not a spawned task.
pub fn skip(needs: &str, how: &str) {
    let line = skip_line(&current_test(), needs, how);
    // Straight to the process's stderr: libtest does not capture it, so the skip shows in
    // `cargo test`'s output although the test passes.
    let _ = writeln!(std::io::stderr(), "skipped: {line}");
    if let Some(report) = std::env::var_os(SKIP_REPORT) {
        append(std::path::Path::new(&report), &line);
    }
}

/// One skip as the report holds it: `<test>: needs <what> (<how>)`.
fn skip_line(test: &str, needs: &str, how: &str) -> String {
    format!("{test}: needs {needs} ({how})")
}

/// The calling test's name, with its package when cargo ran it (`runnel-broker`, say), so
/// that tests of the same name in two crates stay apart in the summary.
fn current_test() -> String {
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("an unnamed test");
    match std::env::var("CARGO_PKG_NAME") {
        Ok(package) => format!("{package} {test}"),
        Err(_) => test.to_owned(),
    }
}

/// Appends `line` to the report. One `write` of a short line to a file opened for appending
/// stays whole while test threads (and test binaries) append at once.
fn append(report: &std::path::Path, line: &str) {
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(report)
        .and_then(|mut file| file.write_all(format!("{line}\n").as_bytes()));
    if let Err(error) = written {
        let _ = writeln!(
            std::io::stderr(),
            "cannot append to the skip report {}: {error}",
            report.display()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_skip_line_names_the_test_what_it_needs_and_how_to_get_it() {
        assert_eq!(
            skip_line(
                "runnel-store replicas_share",
                "redis-server",
                "apt install redis-server"
            ),
            "runnel-store replicas_share: needs redis-server (apt install redis-server)"
        );
    }

    #[test]
    fn the_current_test_is_named_after_its_thread() {
        let name = current_test();
        assert!(
            name.ends_with("skip::tests::the_current_test_is_named_after_its_thread"),
            "{name}"
        );
    }

    #[test]
    fn a_skip_appends_one_line_to_the_report() {
        let dir = tempfile::tempdir().unwrap();
        let report = dir.path().join("skipped");
        append(&report, "a: needs x (y)");
        append(&report, "b: needs z (w)");
        assert_eq!(
            std::fs::read_to_string(&report).unwrap(),
            "a: needs x (y)\nb: needs z (w)\n"
        );
    }

    #[test]
    fn an_installed_tool_runs_and_a_missing_one_skips() {
        assert!(runs(Tool::NatsServer, true, true));
        assert!(runs(Tool::NatsServer, true, false));
        assert!(!runs(Tool::NatsServer, false, false));
    }

    #[test]
    #[should_panic(
        expected = "kubectl is required (RUNNEL_REQUIRE_K8S_TOOLS=1) but not installed: install kubectl"
    )]
    fn a_required_tool_that_is_missing_fails_the_test() {
        runs(Tool::Kubectl, false, true);
    }
}
