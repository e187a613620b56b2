//! Real `nats-server` processes for the JetStream engine's tests: one node, or a cluster
//! of three on loopback.
//!
//! A test that needs one first asks [`require(Tool::NatsServer)`](crate::require), which
//! skips it visibly when `nats-server` is not installed (or fails it, with
//! `RUNNEL_REQUIRE_NATS=1`).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStderr, Command};

const START_TIMEOUT: Duration = Duration::from_secs(30);

/// The store limits the tests' nodes run with. JetStream reserves each stream's `max_bytes`
/// against `max_file_store` (`max_memory_store`) when it is created, and by default that
/// limit is 75 % of the disk (memory) free at start: the same test would pass on a machine
/// with a large free disk and be refused on one with little. The tests write little, so a
/// limit far above any disk makes them independent of the machine's free space.
pub const TEST_STORE_LIMIT: u64 = 1 << 40;

/// One running `nats-server` with JetStream.
pub struct NatsNode {
    /// The client URL, e.g. `nats://127.0.0.1:42447`.
    pub url: String,
    child: Child,
    log: Lines<BufReader<ChildStderr>>,
}

impl NatsNode {
    /// Starts a node storing under `dir` with `args` (cluster settings, say), and waits for
    /// "Server is ready" in its log. Its store limits are [`TEST_STORE_LIMIT`].
    pub async fn start(dir: &Path, args: &[String]) -> NatsNode {
        NatsNode::start_with_store_limit(dir, args, TEST_STORE_LIMIT).await
    }

    /// [`start`](NatsNode::start), with `max_file_store` and `max_memory_store` set to
    /// `limit` bytes (written to `nats.conf` in `dir`).
    pub async fn start_with_store_limit(dir: &Path, args: &[String], limit: u64) -> NatsNode {
        let config = dir.join("nats.conf");
        std::fs::write(
            &config,
            format!("jetstream {{\n  max_file_store: {limit}\n  max_memory_store: {limit}\n}}\n"),
        )
        .expect("write nats.conf");
        let mut child = Command::new("nats-server")
            .arg("-c")
            .arg(&config)
            .arg("-js")
            .arg("-sd")
            .arg(dir)
            .args(["-a", "127.0.0.1", "-p", "-1"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn nats-server");
        let mut log = BufReader::new(child.stderr.take().expect("stderr")).lines();
        let mut url = None;
        let ready = tokio::time::timeout(START_TIMEOUT, async {
            while let Some(line) = log.next_line().await.expect("nats-server log") {
                if let Some(addr) = line.split("Listening for client connections on ").nth(1) {
                    url = Some(format!("nats://{}", addr.trim()));
                }
                if line.contains("Server is ready") {
                    return;
                }
            }
            panic!("nats-server exited before it was ready");
        })
        .await;
        assert!(
            ready.is_ok(),
            "nats-server not ready within {START_TIMEOUT:?}"
        );
        NatsNode {
            url: url.expect("nats-server printed its client address"),
            child,
            log,
        }
    }

    /// Reads the node's log until a line contains `needle`.
    pub async fn wait_for_log(&mut self, needle: &str) {
        let found = tokio::time::timeout(START_TIMEOUT, async {
            while let Some(line) = self.log.next_line().await.expect("nats-server log") {
                if line.contains(needle) {
                    return;
                }
            }
            panic!("nats-server exited before logging {needle:?}");
        })
        .await;
        assert!(
            found.is_ok(),
            "nats-server did not log {needle:?} within {START_TIMEOUT:?}"
        );
    }

    /// Reads the node's log until a line contains `needle`; false if the log ends first.
    async fn logs(&mut self, needle: &str) -> bool {
        while let Ok(Some(line)) = self.log.next_line().await {
            if line.contains(needle) {
                return true;
            }
        }
        false
    }

    /// Kills the node with SIGKILL.
    pub async fn kill(&mut self) {
        self.child.kill().await.expect("kill nats-server");
    }
}

/// A free port on loopback, for a cluster route that every node must know in advance.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Three JetStream nodes clustered on loopback; returns them once a metadata leader is
/// elected.
pub async fn cluster(root: &Path) -> Vec<NatsNode> {
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let routes = ports
        .iter()
        .map(|p| format!("nats://127.0.0.1:{p}"))
        .collect::<Vec<_>>()
        .join(",");
    let mut nodes = Vec::new();
    for (i, port) in ports.iter().enumerate() {
        let dir: PathBuf = root.join(format!("n{i}"));
        std::fs::create_dir_all(&dir).expect("node dir");
        let args = vec![
            "--name".to_owned(),
            format!("n{i}"),
            "--cluster_name".to_owned(),
            "runnel".to_owned(),
            "--cluster".to_owned(),
            format!("nats://127.0.0.1:{port}"),
            "--routes".to_owned(),
            routes.clone(),
        ];
        nodes.push(NatsNode::start(&dir, &args).await);
    }
    // The nodes log the election of the JetStream metadata leader once the cluster formed;
    // whichever logs it first will do (the leader's own line differs from the others').
    let elected = {
        let first = futures::future::select_all(
            nodes
                .iter_mut()
                .map(|n| Box::pin(n.logs("metadata leader"))),
        );
        matches!(
            tokio::time::timeout(START_TIMEOUT, first).await,
            Ok((true, _, _))
        )
    };
    assert!(
        elected,
        "no node logged the election of a JetStream metadata leader within {START_TIMEOUT:?}"
    );
    nodes
}
