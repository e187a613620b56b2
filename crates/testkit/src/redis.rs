//! A real `redis-server` for the tests of the Redis hot tier, on a Unix socket in a
//! temporary directory (no TCP port at all, so nothing can collide).
//!
//! A test that needs one first asks [`require(Tool::RedisServer)`](crate::require), which
//! skips it visibly when `redis-server` is not installed (or fails it, with
//! `RUNNEL_REQUIRE_REDIS=1`).

use anyhow::{Context, Result, bail};
use std::ffi::OsStr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A running `redis-server`, stopped (SIGKILL) when dropped.
pub struct RedisServer {
    /// `redis+unix:///…/redis.sock`, for `store.hot.redis_url`.
    pub url: String,
    _dir: tempfile::TempDir,
    _child: Child,
}

impl RedisServer {
    /// Starts a server with no persistence and a 64 MiB LRU memory bound, and waits until
    /// it accepts connections.
    pub async fn start() -> Result<RedisServer> {
        let dir = tempfile::tempdir()?;
        let socket: PathBuf = dir.path().join("redis.sock");
        let args = [
            OsStr::new("--port"),
            OsStr::new("0"),
            OsStr::new("--unixsocket"),
            socket.as_os_str(),
            OsStr::new("--unixsocketperm"),
            OsStr::new("700"),
            OsStr::new("--maxmemory"),
            OsStr::new("64mb"),
            OsStr::new("--maxmemory-policy"),
            OsStr::new("allkeys-lru"),
            OsStr::new("--dir"),
            dir.path().as_os_str(),
        ];
        let child = spawn_redis_server(args).await?;
        Ok(RedisServer {
            url: format!("redis+unix://{}", socket.display()),
            _dir: dir,
            _child: child,
        })
    }
}

/// Spawns `redis-server` with `args`, without persistence (no RDB snapshots, no AOF), and
/// waits until it accepts connections; its output is drained from then on, so it never
/// blocks on a full pipe. The child is killed when dropped.
pub async fn spawn_redis_server(
    args: impl IntoIterator<Item = impl AsRef<OsStr>>,
) -> Result<Child> {
    let mut child = Command::new("redis-server")
        .args(args)
        .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("spawn redis-server")?;
    let stdout = child.stdout.take().context("piped stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let ready = tokio::time::timeout(START_TIMEOUT, async {
        while let Some(line) = lines.next_line().await? {
            if line
                .to_ascii_lowercase()
                .contains("ready to accept connections")
            {
                return anyhow::Ok(true);
            }
        }
        anyhow::Ok(false)
    })
    .await;
    match ready {
        Ok(Ok(true)) => {}
        Ok(Ok(false)) => bail!("redis-server exited before it was ready"),
        Ok(Err(error)) => bail!("reading redis-server's output: {error}"),
        Err(_) => bail!("redis-server not ready within {START_TIMEOUT:?}"),
    }
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok(child)
}
