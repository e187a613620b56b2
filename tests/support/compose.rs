//! Docker Compose projects for end-to-end tests: bring one up under a name of its own,
//! with some services scaled to several replicas (`--scale`), learn each replica's
//! published ports, kill, start, replace and cut off its containers, wait on their health
//! checks, follow their output — and take it all down again, volumes included, however the
//! test ends (`Drop`).
//!
//! A container is named by its service and its replica number (1-based, Compose's
//! `com.docker.compose.container-number` and `port --index`); an unscaled service has one
//! replica, number 1.
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
    /// `--scale` of every `up`: replicas per service, for the services not at one.
    scale: Vec<(String, usize)>,
    health: HealthEvents,
    /// Containers the test started on the project's network itself, removed before `down`.
    extra: Mutex<Vec<String>>,
}

impl ComposeProject {
    /// Runs `up -d` for `files` with `env` added to the (cleaned) environment the Compose
    /// files are interpolated from and `scale` replicas of the services it names, and
    /// starts following the containers' health.
    pub async fn up(
        command: Vec<String>,
        files: Vec<PathBuf>,
        env: BTreeMap<String, String>,
        scale: &[(&str, usize)],
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
            scale: scale
                .iter()
                .map(|(service, replicas)| ((*service).to_owned(), *replicas))
                .collect(),
            health,
            extra: Mutex::default(),
        };
        project.up_scaled(&[]).await?;
        Ok(project)
    }

    /// `up -d --no-build` at the project's scale, with `more` options.
    async fn up_scaled(&self, more: &[&str]) -> Result<()> {
        let scale: Vec<String> = self
            .scale
            .iter()
            .map(|(service, replicas)| format!("{service}={replicas}"))
            .collect();
        let mut args = vec!["up", "-d", "--no-build"];
        args.extend_from_slice(more);
        for each in &scale {
            args.extend(["--scale", each]);
        }
        self.compose(&args).await?;
        Ok(())
    }

    /// How many replicas of `service` the project runs.
    pub fn replicas(&self, service: &str) -> usize {
        self.scale
            .iter()
            .find(|(s, _)| s == service)
            .map_or(1, |(_, replicas)| *replicas)
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

    /// The container id of replica `replica` of `service`, running or not.
    pub async fn container(&self, service: &str, replica: usize) -> Result<String> {
        let ids = docker(&[
            "ps",
            "--all",
            "--quiet",
            "--no-trunc",
            "--filter",
            &format!("label=com.docker.compose.project={}", self.name),
            "--filter",
            &format!("label=com.docker.compose.service={service}"),
            "--filter",
            &format!("label=com.docker.compose.container-number={replica}"),
        ])
        .await?;
        match ids.split_whitespace().collect::<Vec<_>>()[..] {
            [id] => Ok(id.to_owned()),
            ref other => bail!("{service} #{replica} has containers {other:?}, not one"),
        }
    }

    /// The ids of `service`'s running containers.
    async fn running(&self, service: &str) -> Result<Vec<String>> {
        let ids = docker(&[
            "ps",
            "--quiet",
            "--no-trunc",
            "--filter",
            &format!("label=com.docker.compose.project={}", self.name),
            "--filter",
            &format!("label=com.docker.compose.service={service}"),
        ])
        .await?;
        Ok(ids.split_whitespace().map(str::to_owned).collect())
    }

    /// Where replica `replica` of `service` has its container `port` published on this
    /// host (`port --index`, as a user finds a scaled gateway's ports).
    pub async fn published(&self, service: &str, replica: usize, port: u16) -> Result<SocketAddr> {
        let out = self
            .compose(&[
                "port",
                "--index",
                &replica.to_string(),
                service,
                &port.to_string(),
            ])
            .await?;
        let addr = out.trim();
        addr.parse()
            .with_context(|| format!("{service} #{replica}:{port} is published at {addr:?}"))
    }

    /// The network Compose made for the project (its only one).
    pub async fn network(&self, service: &str, replica: usize) -> Result<String> {
        let id = self.container(service, replica).await?;
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

    /// `docker inspect --format <format>` of replica `replica` of `service`.
    pub async fn inspect(&self, service: &str, replica: usize, format: &str) -> Result<String> {
        let id = self.container(service, replica).await?;
        Ok(docker(&["inspect", "--format", format, &id])
            .await?
            .trim()
            .to_owned())
    }

    /// Kills replica `replica` of `service` with SIGKILL.
    pub async fn kill(&self, service: &str, replica: usize) -> Result<()> {
        let id = self.container(service, replica).await?;
        docker(&["kill", "--signal", "KILL", &id]).await?;
        Ok(())
    }

    /// Freezes every process of replica `replica` of `service` (`docker pause`: the
    /// cgroup freezer, as SIGSTOP does to one process): its connections stay open and
    /// silent.
    pub async fn pause(&self, service: &str, replica: usize) -> Result<()> {
        let id = self.container(service, replica).await?;
        docker(&["pause", &id]).await?;
        Ok(())
    }

    /// Lets a paused replica run on where it stopped.
    pub async fn unpause(&self, service: &str, replica: usize) -> Result<()> {
        let id = self.container(service, replica).await?;
        docker(&["unpause", &id]).await?;
        Ok(())
    }

    /// Starts replica `replica` of `service` again after a kill (same volumes, same
    /// network alias).
    pub async fn start(&self, service: &str, replica: usize) -> Result<()> {
        let id = self.container(service, replica).await?;
        docker(&["start", &id]).await?;
        Ok(())
    }

    /// Removes replica `replica` of `service` with its anonymous volumes — its data gone
    /// as with a lost machine — and has Compose make a new one in its place, empty.
    pub async fn replace(&self, service: &str, replica: usize) -> Result<()> {
        let id = self.container(service, replica).await?;
        docker(&["rm", "--force", "--volumes", &id]).await?;
        self.up_scaled(&["--no-recreate"]).await
    }

    /// Cuts replica `replica` of `service` off the project's network: every connection to or from
    /// it stops carrying packets, and its name no longer resolves.
    pub async fn disconnect(&self, service: &str, replica: usize) -> Result<()> {
        let network = self.network(service, replica).await?;
        let id = self.container(service, replica).await?;
        docker(&["network", "disconnect", &network, &id]).await?;
        Ok(())
    }

    /// Puts replica `replica` of `service` back on `network` under its service name.
    pub async fn reconnect(&self, service: &str, replica: usize, network: &str) -> Result<()> {
        let id = self.container(service, replica).await?;
        docker(&["network", "connect", "--alias", service, network, &id]).await?;
        Ok(())
    }

    /// The address of replica `replica` of `service` on the project's network.
    pub async fn address(&self, service: &str, replica: usize) -> Result<String> {
        self.inspect(
            service,
            replica,
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

    /// How many times each container's health check has turned healthy so far, by
    /// container id: what [`ComposeProject::wait_healthy`] compares with.
    pub fn health_so_far(&self) -> HashMap<String, usize> {
        self.health.counts.lock().expect("health lock").clone()
    }

    /// Waits until every running container of each of `services` — every replica — has
    /// turned healthy more times than `after[container]` (0 if absent, as for a container
    /// made since), i.e. is healthy again since `after` was taken.
    pub async fn wait_healthy(
        &self,
        services: &[&str],
        after: &HashMap<String, usize>,
        within: Duration,
    ) -> Result<()> {
        let mut containers = Vec::new();
        for service in services {
            let running = self.running(service).await?;
            if running.len() != self.replicas(service) {
                bail!(
                    "{service} runs {} containers, not {}",
                    running.len(),
                    self.replicas(service)
                );
            }
            containers.extend(running.into_iter().map(|id| (*service, id)));
        }
        let mut changes = self.health.changes.clone();
        let done = |counts: &HashMap<String, usize>| {
            containers.iter().all(|(_, id)| {
                counts.get(id).copied().unwrap_or(0) > after.get(id).copied().unwrap_or(0)
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
            Err(_) => {
                let counts = self.health.counts.lock().expect("health lock");
                let late: Vec<String> = containers
                    .iter()
                    .filter(|(_, id)| {
                        counts.get(id).copied().unwrap_or(0) <= after.get(id).copied().unwrap_or(0)
                    })
                    .map(|(service, id)| format!("{service} {}", &id[..12.min(id.len())]))
                    .collect();
                bail!("not healthy within {within:?}: {late:?}")
            }
        }
    }

    /// Follows the stdout of `service`'s (first) container, line by line, from its start; `on_line` sees each line.
    pub async fn follow_stdout(
        &self,
        service: &str,
        mut on_line: impl FnMut(&str) + Send + 'static,
    ) -> Result<Child> {
        let id = self.container(service, 1).await?;
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

/// The project's containers' health transitions, from `docker events`: per container id,
/// how many times it turned healthy.
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
                let Some(id) = event["Actor"]["ID"].as_str() else {
                    continue;
                };
                *sink
                    .lock()
                    .expect("health lock")
                    .entry(id.to_owned())
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
}
