//! Service binaries as processes of their own: spawn one with a config file, learn its
//! ports from the `listening` line it prints, wait until its health check says SERVING,
//! kill, pause, restart. The end-to-end tests run the pipeline this way, and the gateway
//! bench its store and gateway (so that each side's sockets fit its own open-file limit).

use anyhow::{Context, Result, bail};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tonic::transport::Endpoint;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// How long a service may take to print its addresses and then report SERVING.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// The directory holding the workspace's built binaries: the one this executable is in
/// (`target/<profile>/runnel`), or its parent for a test (`target/<profile>/deps/<test>`).
pub fn binary_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    let dir = exe.parent().unwrap_or(Path::new("."));
    match dir.file_name() {
        Some(name) if name == "deps" => dir.parent().unwrap_or(dir).to_path_buf(),
        _ => dir.to_path_buf(),
    }
}

/// A running service binary.
pub struct ServiceProcess {
    /// The binary's name, e.g. `runnel-broker`.
    pub name: &'static str,
    /// Where its gRPC API listens.
    pub grpc: SocketAddr,
    /// Where its admin HTTP port listens.
    pub admin: SocketAddr,
    /// Where its public HTTP API listens, if it has one.
    pub http: Option<SocketAddr>,
    child: Child,
    log: PathBuf,
    config: PathBuf,
    env: BTreeMap<String, String>,
}

impl ServiceProcess {
    /// Starts `name` with `--config config` and `env`, reads its `listening` line, and
    /// waits until its health check reports SERVING.
    pub async fn start(
        name: &'static str,
        config: &Path,
        env: &BTreeMap<String, String>,
        log_dir: &Path,
    ) -> Result<ServiceProcess> {
        let binary = binary_dir().join(name);
        if !binary.exists() {
            bail!(
                "{} is missing: build the service binaries first (`cargo build --workspace --bins`, which `cargo xtask test` does)",
                binary.display()
            );
        }
        let log = log_dir.join(format!("{name}.log"));
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .with_context(|| format!("open {}", log.display()))?;
        let mut command = Command::new(&binary);
        command
            .arg("--config")
            .arg(config)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .kill_on_drop(true);
        // Nothing from the developer's environment may change what the test runs.
        for (key, _) in std::env::vars() {
            if key.starts_with("RUNNEL_") || key.starts_with("OTEL_") {
                command.env_remove(key);
            }
        }
        command.envs(env);
        let mut child = command.spawn().with_context(|| format!("spawn {name}"))?;
        let stdout = child.stdout.take().context("piped stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let line = tokio::time::timeout(START_TIMEOUT, lines.next_line())
            .await
            .with_context(|| format!("{name} printed no address within {START_TIMEOUT:?}"))??
            .with_context(|| format!("{name} exited before listening; see {}", log.display()))?;
        let addrs = parse_listening(&line).with_context(|| format!("{name} printed {line:?}"))?;
        let process = ServiceProcess {
            name,
            grpc: addrs["grpc"],
            admin: addrs["admin"],
            http: addrs.get("http").copied(),
            child,
            log,
            config: config.to_owned(),
            env: env.clone(),
        };
        process.wait_serving().await?;
        Ok(process)
    }

    /// The gRPC URL, e.g. `http://127.0.0.1:41234`.
    pub fn url(&self) -> String {
        format!("http://{}", self.grpc)
    }

    /// The service's stderr log so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Follows the gRPC health check (`Watch`) until it says SERVING. The service binds
    /// its listeners before it prints its addresses, so the kernel accepts the connection at
    /// once; the server answers after recovery, and a service that must catch up first (a
    /// store replica reading the results log) reports NOT_SERVING until it has: no polling.
    async fn wait_serving(&self) -> Result<()> {
        let check = async {
            let channel = Endpoint::from_shared(self.url())?.connect().await?;
            let mut statuses = HealthClient::new(channel)
                .watch(HealthCheckRequest {
                    service: String::new(),
                })
                .await?
                .into_inner();
            let mut last = ServingStatus::Unknown;
            while let Some(status) = statuses.message().await? {
                last = status.status();
                if last == ServingStatus::Serving {
                    break;
                }
            }
            anyhow::Ok(last)
        };
        match tokio::time::timeout(START_TIMEOUT, check).await {
            Ok(Ok(ServingStatus::Serving)) => Ok(()),
            Ok(Ok(status)) => bail!("{} reports {status:?}:\n{}", self.name, self.log()),
            Ok(Err(error)) => bail!(
                "{} health check failed: {error:#}\n{}",
                self.name,
                self.log()
            ),
            Err(_) => bail!(
                "{} not serving within {START_TIMEOUT:?}:\n{}",
                self.name,
                self.log()
            ),
        }
    }

    /// Starts the same binary again (after a kill) with the same configuration, data and
    /// ports, so that the services calling it find it where it was.
    pub async fn restart(&self) -> Result<ServiceProcess> {
        let section = self.name.trim_start_matches("runnel-").to_ascii_uppercase();
        let mut env = self.env.clone();
        env.insert(
            format!("RUNNEL_{section}__SERVER__GRPC"),
            self.grpc.to_string(),
        );
        env.insert(
            format!("RUNNEL_{section}__SERVER__ADMIN"),
            self.admin.to_string(),
        );
        if let Some(http) = self.http {
            env.insert(format!("RUNNEL_{section}__HTTP"), http.to_string());
        }
        let log_dir = self.log.parent().context("log directory")?;
        ServiceProcess::start(self.name, &self.config, &env, log_dir).await
    }

    /// Kills the process with SIGKILL: no chance to flush or clean up.
    pub async fn kill(&mut self) -> Result<()> {
        self.child.kill().await.context("SIGKILL")?;
        Ok(())
    }

    /// Stops the process with SIGSTOP: it holds its connections and memory but does
    /// nothing — a stalled machine, a long GC pause — until [`ServiceProcess::resume`].
    pub fn pause(&self) -> Result<()> {
        self.signal(nix::sys::signal::Signal::SIGSTOP)
    }

    /// Lets a paused process go on (SIGCONT), unaware of the time that passed.
    pub fn resume(&self) -> Result<()> {
        self.signal(nix::sys::signal::Signal::SIGCONT)
    }

    fn signal(&self, signal: nix::sys::signal::Signal) -> Result<()> {
        let pid = self.child.id().context("the process has exited")?;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(i32::try_from(pid)?), signal)
            .with_context(|| format!("{signal} to {}", self.name))?;
        Ok(())
    }

    /// Sends SIGTERM and waits for a clean exit.
    pub async fn terminate(mut self) -> Result<std::process::ExitStatus> {
        if let Some(pid) = self.child.id() {
            let pid = nix::unistd::Pid::from_raw(i32::try_from(pid)?);
            nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)?;
        }
        let status = tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .with_context(|| format!("{} did not stop within 30s of SIGTERM", self.name))??;
        Ok(status)
    }
}

fn parse_listening(line: &str) -> Result<BTreeMap<String, SocketAddr>> {
    let mut parts = line.split_whitespace();
    let _binary = parts.next();
    if parts.next() != Some("listening") {
        bail!("not a listening line");
    }
    parts
        .map(|part| {
            let (key, addr) = part.split_once('=').context("key=addr")?;
            Ok((key.to_owned(), addr.parse()?))
        })
        .collect()
}
