//! Service processes: spawn, learn their ports, wait until healthy, kill, restart.

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

/// Partitions of the topics the broker creates on first use. Tests that need an event on
/// every partition pick keys with `runnel_proto::partition_for_key`.
pub const PARTITIONS: u32 = 4;

/// How long a service may take to print its addresses and then report SERVING.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// The directory holding the workspace's built binaries.
pub fn binary_dir() -> PathBuf {
    // target/<profile>/deps/<test binary> → target/<profile>
    let exe = std::env::current_exe().expect("test executable path");
    exe.parent()
        .and_then(Path::parent)
        .expect("test executable lives in target/<profile>/deps")
        .to_path_buf()
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

/// The five services, each its own process, wired together on ephemeral ports.
pub struct Pipeline {
    /// The working directory: config, data directories and logs.
    pub dir: tempfile::TempDir,
    /// The message queue tier.
    pub broker: ServiceProcess,
    /// The storage tier.
    pub store: ServiceProcess,
    /// The collection tier.
    pub collector: ServiceProcess,
    /// The analysis tier.
    pub analyzer: ServiceProcess,
    /// The data access tier.
    pub gateway: ServiceProcess,
}

impl Pipeline {
    /// Starts broker and store, then the services that call them, with `analyzer_toml` as
    /// the `[analyzer]` part of the shared config file.
    pub async fn start(analyzer_toml: &str, env: BTreeMap<String, String>) -> Result<Pipeline> {
        let dir = tempfile::tempdir()?;
        let data = dir.path();
        let base = Self::base_config(data);
        std::fs::write(
            data.join("runnel.toml"),
            format!("{base}\n{analyzer_toml}\n"),
        )?;
        let config = data.join("runnel.toml");
        let broker = ServiceProcess::start("runnel-broker", &config, &env, data).await?;
        let store = ServiceProcess::start("runnel-store", &config, &env, data).await?;
        let wired = |extra: &[(&str, String)]| {
            let mut env = env.clone();
            for (key, value) in extra {
                env.insert((*key).to_owned(), value.clone());
            }
            env
        };
        let collector = ServiceProcess::start(
            "runnel-collector",
            &config,
            &wired(&[
                ("RUNNEL_COLLECTOR__BROKER", broker.url()),
                ("RUNNEL_COLLECTOR__STORE", store.url()),
            ]),
            data,
        )
        .await?;
        let analyzer = ServiceProcess::start(
            "runnel-analyzer",
            &config,
            &wired(&[
                ("RUNNEL_ANALYZER__BROKER", broker.url()),
                ("RUNNEL_ANALYZER__STORE", store.url()),
            ]),
            data,
        )
        .await?;
        let gateway = ServiceProcess::start(
            "runnel-gateway",
            &config,
            // The analyzer says which queries exist.
            &wired(&[
                ("RUNNEL_GATEWAY__STORE", store.url()),
                ("RUNNEL_GATEWAY__PIPELINE__ANALYZER", analyzer.url()),
            ]),
            data,
        )
        .await?;
        Ok(Pipeline {
            dir,
            broker,
            store,
            collector,
            analyzer,
            gateway,
        })
    }

    fn base_config(data: &Path) -> String {
        let d = data.display();
        let server = "[{s}.server]\ngrpc = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\ndrain_timeout = \"5s\"\n";
        let mut out = format!(
            "[collector]\ndata_dir = \"{d}/collector\"\nudp = \"127.0.0.1:0\"\n[broker]\ndata_dir = \"{d}/broker\"\ndefault_partitions = {PARTITIONS}\n[store]\ndata_dir = \"{d}/store\"\n[analyzer]\ndata_dir = \"{d}/analyzer\"\n[gateway]\nhttp = \"127.0.0.1:0\"\ndata_dir = \"{d}/gateway\"\n"
        );
        for s in ["collector", "broker", "analyzer", "store", "gateway"] {
            out.push_str(&server.replace("{s}", s));
        }
        out
    }

    /// Every service's log, for failure messages.
    pub fn logs(&self) -> String {
        [
            &self.broker,
            &self.store,
            &self.collector,
            &self.analyzer,
            &self.gateway,
        ]
        .iter()
        .map(|p| format!("===== {} =====\n{}", p.name, p.log()))
        .collect::<Vec<_>>()
        .join("\n")
    }
}
