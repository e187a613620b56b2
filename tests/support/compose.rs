//! Docker Compose projects for end-to-end tests: bring one up under a name of its own,
//! learn its published ports, kill, start and cut off its containers, wait on their health
//! checks, follow their output — and take it all down again, volumes included, however the
//! test ends (`Drop`).
//!
//! Works with the Compose v2 plugin (`docker compose`) and the standalone v1 tool
//! (`docker-compose`); [`compose_command`] finds which one this machine has.

use anyhow::{Context, Result, bail};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::watch;

/// The command that runs Compose here: `["docker", "compose"]` or `["docker-compose"]`, or
/// `None` when there is no Docker engine to talk to or no Compose tool.
pub fn compose_command() -> Option<Vec<String>> {
    let works = |program: &str, args: &[&str]| {
        std::process::Command::new(program)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|status| status.success())
    };
    if !works("docker", &["info"]) {
        return None;
    }
    if works("docker", &["compose", "version"]) {
        Some(vec!["docker".into(), "compose".into()])
    } else if works("docker-compose", &["version"]) {
        Some(vec!["docker-compose".into()])
    } else {
        None
    }
}

/// The repository's root, where `docker-compose.yml` is.
pub fn repository_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is in the repository")
        .to_path_buf()
}

/// A Compose project this test owns: its name is unique, and dropping it runs
/// `down --volumes`.
pub struct ComposeProject {
    /// The project name (`-p`), also the prefix of its containers, network and volumes.
    pub name: String,
    command: Vec<String>,
    files: Vec<PathBuf>,
    env: BTreeMap<String, String>,
    health: HealthEvents,
    /// Containers the test started on the project's network itself, removed before `down`.
    extra: Mutex<Vec<String>>,
}

impl ComposeProject {
    /// Runs `up -d` for `files` with `env` added to the (cleaned) environment the Compose
    /// files are interpolated from, and starts following the containers' health.
    pub async fn up(
        command: Vec<String>,
        files: Vec<PathBuf>,
        env: BTreeMap<String, String>,
    ) -> Result<ComposeProject> {
        let name = format!(
            "runnel-e2e-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        );
        // Events from now on, replayed by the daemon: none is missed however late the
        // follower connects.
        let since = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .context("clock before 1970")?
            .as_secs();
        let health = HealthEvents::follow(&name, since)?;
        let project = ComposeProject {
            name,
            command,
            files,
            env,
            health,
            extra: Mutex::default(),
        };
        project.compose(&["up", "-d", "--no-build"]).await?;
        Ok(project)
    }

    fn compose_command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(&self.command[0]);
        command.args(&self.command[1..]);
        command.arg("--project-name").arg(&self.name);
        command.arg("--project-directory").arg(repository_root());
        for file in &self.files {
            command.arg("--file").arg(file);
        }
        command.args(args);
        // Nothing from the developer's environment may change what the files say.
        for (key, _) in std::env::vars() {
            if key.starts_with("RUNNEL_") || key.starts_with("OTEL_") || key == "RUST_LOG" {
                command.env_remove(key);
            }
        }
        command.envs(&self.env);
        command.stdin(Stdio::null());
        command
    }

    /// Runs a Compose subcommand; its stdout if it succeeds.
    pub async fn compose(&self, args: &[&str]) -> Result<String> {
        let output = self
            .compose_command(args)
            .output()
            .await
            .with_context(|| format!("run compose {args:?}"))?;
        if !output.status.success() {
            bail!(
                "compose {args:?} failed ({}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// The container id of `service`'s (only) container.
    pub async fn container(&self, service: &str) -> Result<String> {
        let ids = self.compose(&["ps", "-q", service]).await?;
        match ids.split_whitespace().collect::<Vec<_>>()[..] {
            [id] => Ok(id.to_owned()),
            ref other => bail!("{service} has containers {other:?}, not one"),
        }
    }

    /// Where `service`'s container `port` is published on this host.
    pub async fn published(&self, service: &str, port: u16) -> Result<SocketAddr> {
        let out = self.compose(&["port", service, &port.to_string()]).await?;
        let addr = out.trim();
        addr.parse()
            .with_context(|| format!("{service}:{port} is published at {addr:?}"))
    }

    /// The network Compose made for the project (its only one).
    pub async fn network(&self, service: &str) -> Result<String> {
        let id = self.container(service).await?;
        let names = docker(&[
            "inspect",
            "--format",
            "{{range $name, $_ := .NetworkSettings.Networks}}{{$name}} {{end}}",
            &id,
        ])
        .await?;
        match names.split_whitespace().collect::<Vec<_>>()[..] {
            [name] => Ok(name.to_owned()),
            ref other => bail!("{service} is on networks {other:?}, not one"),
        }
    }

    /// `docker inspect --format <format>` of `service`'s container.
    pub async fn inspect(&self, service: &str, format: &str) -> Result<String> {
        let id = self.container(service).await?;
        Ok(docker(&["inspect", "--format", format, &id])
            .await?
            .trim()
            .to_owned())
    }

    /// Kills `service`'s container with SIGKILL.
    pub async fn kill(&self, service: &str) -> Result<()> {
        let id = self.container(service).await?;
        docker(&["kill", "--signal", "KILL", &id]).await?;
        Ok(())
    }

    /// Starts `service`'s stopped container again (same volumes, same network alias).
    pub async fn start(&self, service: &str) -> Result<()> {
        let id = self.container(service).await?;
        docker(&["start", &id]).await?;
        Ok(())
    }

    /// Cuts `service`'s container off the project's network: every connection to or from
    /// it stops carrying packets, and its name no longer resolves.
    pub async fn disconnect(&self, service: &str) -> Result<()> {
        let (network, id) = (self.network(service).await?, self.container(service).await?);
        docker(&["network", "disconnect", &network, &id]).await?;
        Ok(())
    }

    /// Puts `service`'s container back on `network` under its service name.
    pub async fn reconnect(&self, service: &str, network: &str) -> Result<()> {
        let id = self.container(service).await?;
        docker(&["network", "connect", "--alias", service, network, &id]).await?;
        Ok(())
    }

    /// `service`'s address on the project's network.
    pub async fn address(&self, service: &str) -> Result<String> {
        self.inspect(
            service,
            "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
        )
        .await
    }

    /// Starts a container of `image` (one of ours: nothing is pulled) on `network`, doing
    /// nothing but take the next free address there — the one a disconnected container
    /// had, so that it comes back under a new one. It is removed with the project.
    pub async fn take_free_address(&self, network: &str, image: &str) -> Result<String> {
        let id = docker(&[
            "run",
            "--detach",
            "--network",
            network,
            "--read-only",
            "--user",
            "65532:65532",
            "--cap-drop",
            "ALL",
            image,
        ])
        .await?
        .trim()
        .to_owned();
        self.extra.lock().expect("extra lock").push(id.clone());
        let address = docker(&[
            "inspect",
            "--format",
            "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
            &id,
        ])
        .await?;
        Ok(address.trim().to_owned())
    }

    /// How many times `service`'s health check has turned healthy so far.
    pub fn times_healthy(&self, service: &str) -> usize {
        self.health.times_healthy(service)
    }

    /// Waits until every one of `services` has turned healthy more than `after[service]`
    /// times (0 if absent), i.e. is healthy again since the counts were taken.
    pub async fn wait_healthy(
        &self,
        services: &[&str],
        after: &HashMap<String, usize>,
        within: Duration,
    ) -> Result<()> {
        let mut changes = self.health.changes.clone();
        let done = |counts: &HashMap<String, usize>| {
            services.iter().all(|service| {
                counts.get(*service).copied().unwrap_or(0)
                    > after.get(*service).copied().unwrap_or(0)
            })
        };
        let waited = tokio::time::timeout(within, async {
            loop {
                if done(&self.health.counts.lock().expect("health lock")) {
                    return Ok(());
                }
                if changes.changed().await.is_err() {
                    bail!("docker events stopped");
                }
            }
        })
        .await;
        match waited {
            Ok(result) => result,
            Err(_) => bail!(
                "{services:?} not healthy within {within:?}: {:?}",
                self.health.counts.lock().expect("health lock")
            ),
        }
    }

    /// Follows `service`'s stdout, line by line, from its start; `on_line` sees each line.
    pub async fn follow_stdout(
        &self,
        service: &str,
        mut on_line: impl FnMut(&str) + Send + 'static,
    ) -> Result<Child> {
        let id = self.container(service).await?;
        let mut child = Command::new("docker")
            .args(["logs", "--follow", &id])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("docker logs")?;
        let stdout = child.stdout.take().context("piped stdout")?;
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                on_line(&line);
            }
        });
        Ok(child)
    }

    /// Every container's log so far, for failure messages.
    pub async fn logs(&self) -> String {
        match self.compose(&["logs", "--no-color"]).await {
            Ok(logs) => logs,
            Err(error) => format!("(no logs: {error:#})"),
        }
    }
}

impl Drop for ComposeProject {
    fn drop(&mut self) {
        // Synchronous on purpose: this runs while a failed test unwinds, too.
        let extra = std::mem::take(&mut *self.extra.lock().unwrap_or_else(|e| e.into_inner()));
        if !extra.is_empty() {
            let _ = std::process::Command::new("docker")
                .args(["rm", "--force"])
                .args(&extra)
                .stdout(Stdio::null())
                .status();
        }
        let mut command = std::process::Command::new(&self.command[0]);
        command.args(&self.command[1..]);
        command
            .arg("--project-name")
            .arg(&self.name)
            .arg("--project-directory")
            .arg(repository_root());
        for file in &self.files {
            command.arg("--file").arg(file);
        }
        command
            .args(["down", "--volumes", "--remove-orphans", "--timeout", "20"])
            .envs(&self.env)
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        match command.status() {
            Ok(status) if status.success() => {}
            outcome => eprintln!(
                "compose project {} was not taken down ({outcome:?}); remove it with `docker-compose -p {} down -v`",
                self.name, self.name
            ),
        }
    }
}

/// `docker <args>`; its stdout if it succeeds.
async fn docker(args: &[&str]) -> Result<String> {
    let output = Command::new("docker")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .with_context(|| format!("run docker {args:?}"))?;
    if !output.status.success() {
        bail!(
            "docker {args:?} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The project's containers' health transitions, from `docker events`: per service, how
/// many times it turned healthy.
struct HealthEvents {
    counts: Arc<Mutex<HashMap<String, usize>>>,
    changes: watch::Receiver<u64>,
    _events: Child,
}

impl HealthEvents {
    fn follow(project: &str, since: u64) -> Result<HealthEvents> {
        let mut events = Command::new("docker")
            .args([
                "events",
                "--since",
                &since.to_string(),
                "--filter",
                "type=container",
                "--filter",
                &format!("label=com.docker.compose.project={project}"),
                "--format",
                "{{json .}}",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("docker events")?;
        let stdout = events.stdout.take().context("piped stdout")?;
        let counts = Arc::new(Mutex::new(HashMap::new()));
        let (changed, changes) = watch::channel(0);
        let sink = Arc::clone(&counts);
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let Ok(event) = serde_json::from_str::<serde_json::Value>(&line) else {
                    continue;
                };
                if event["Action"].as_str() != Some("health_status: healthy") {
                    continue;
                }
                let Some(service) =
                    event["Actor"]["Attributes"]["com.docker.compose.service"].as_str()
                else {
                    continue;
                };
                *sink
                    .lock()
                    .expect("health lock")
                    .entry(service.to_owned())
                    .or_default() += 1;
                changed.send_modify(|n| *n += 1);
            }
        });
        Ok(HealthEvents {
            counts,
            changes,
            _events: events,
        })
    }

    fn times_healthy(&self, service: &str) -> usize {
        self.counts
            .lock()
            .expect("health lock")
            .get(service)
            .copied()
            .unwrap_or(0)
    }
}
