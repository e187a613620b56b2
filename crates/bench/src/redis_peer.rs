//! Redis as the peer of the gateway's `Get`: a `redis-server` this harness starts on a free
//! loopback port and stops afterwards, and `redis-benchmark -t get` against it at the same
//! concurrency, in the same run as Runnel's own figures.
//!
//! Both programs come from the system (Debian: `redis-server`, `redis-tools`); without them
//! the harness says so and measures Runnel alone.

use anyhow::{Context, Result, bail};
use runnel_testkit::redis::spawn_redis_server;
use std::process::Stdio;
use tokio::process::{Child, Command};

/// Tries at a free port: another process may take the one found before Redis binds it.
const START_ATTEMPTS: usize = 3;

/// One `redis-benchmark` run's figures.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct RedisFigures {
    /// Requests per second.
    pub(crate) rate: f64,
    /// The 99th percentile latency in ms, when this `redis-benchmark` reports it (6.2+).
    pub(crate) p99_ms: Option<f64>,
}

/// A running `redis-server`, killed when stopped or dropped.
pub(crate) struct RedisPeer {
    port: u16,
    child: Child,
}

fn installed(program: &str) -> bool {
    std::process::Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

/// A loopback port nobody listens on now (bound, then released).
fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("bind 127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

impl RedisPeer {
    /// Starts `redis-server` without persistence on a free loopback port; `None` (said on
    /// stderr) when `redis-server` or `redis-benchmark` is not installed.
    pub(crate) async fn start() -> Result<Option<RedisPeer>> {
        if !installed("redis-server") || !installed("redis-benchmark") {
            eprintln!(
                "bench: redis-server or redis-benchmark is not installed (Debian: apt-get install redis-server redis-tools); measuring without the Redis peer"
            );
            return Ok(None);
        }
        let mut last_error = None;
        for _ in 0..START_ATTEMPTS {
            match RedisPeer::start_on(free_port()?).await {
                Ok(peer) => return Ok(Some(peer)),
                Err(error) => last_error = Some(error),
            }
        }
        Err(last_error.unwrap_or_else(|| anyhow::anyhow!("redis-server did not start")))
    }

    async fn start_on(port: u16) -> Result<RedisPeer> {
        let child = spawn_redis_server(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .await
            .with_context(|| format!("redis-server on port {port} (taken?)"))?;
        eprintln!("bench: redis-server on 127.0.0.1:{port}");
        Ok(RedisPeer { port, child })
    }

    /// `redis-benchmark -t get` with `clients` connections and `requests` requests.
    pub(crate) async fn get(&self, clients: u64, requests: u64) -> Result<RedisFigures> {
        let output = Command::new("redis-benchmark")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-t", "get", "-c", &clients.to_string()])
            .args(["-n", &requests.to_string(), "--csv"])
            .stdin(Stdio::null())
            .output()
            .await
            .context("run redis-benchmark")?;
        if !output.status.success() {
            bail!(
                "redis-benchmark failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        parse_csv(&String::from_utf8_lossy(&output.stdout))
    }

    /// Stops the server and waits for it to go.
    pub(crate) async fn stop(mut self) -> Result<()> {
        self.child.kill().await.context("stop redis-server")
    }
}

/// The GET row of `redis-benchmark --csv`: either with a header naming its columns (6.2+:
/// `"test","rps",…,"p99_latency_ms",…`) or the older two columns (`"GET","145000.00"`).
fn parse_csv(text: &str) -> Result<RedisFigures> {
    let fields = |line: &str| -> Vec<String> {
        line.split(',')
            .map(|field| field.trim().trim_matches('"').to_owned())
            .collect()
    };
    let mut header: Option<Vec<String>> = None;
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let row = fields(line);
        if row.first().is_some_and(|f| f == "test") {
            header = Some(row);
            continue;
        }
        if !row.first().is_some_and(|f| f.eq_ignore_ascii_case("GET")) {
            continue;
        }
        let column = |name: &str, default: Option<usize>| {
            header
                .as_ref()
                .and_then(|h| h.iter().position(|c| c == name))
                .or(default)
                .and_then(|i| row.get(i))
                .and_then(|v| v.parse::<f64>().ok())
        };
        let rate = column("rps", Some(1)).context("no requests per second in its GET row")?;
        return Ok(RedisFigures {
            rate,
            p99_ms: column("p99_latency_ms", None),
        });
    }
    bail!("redis-benchmark printed no GET row: {text:?}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_csv_forms_of_redis_benchmark_are_read() {
        let new = "\"test\",\"rps\",\"avg_latency_ms\",\"min_latency_ms\",\"p50_latency_ms\",\"p95_latency_ms\",\"p99_latency_ms\",\"max_latency_ms\"\n\"GET\",\"145137.88\",\"0.226\",\"0.064\",\"0.215\",\"0.303\",\"0.407\",\"1.967\"\n";
        assert_eq!(
            parse_csv(new).unwrap(),
            RedisFigures {
                rate: 145_137.88,
                p99_ms: Some(0.407)
            }
        );
        let old = "\"GET\",\"276701.72\"\n";
        assert_eq!(
            parse_csv(old).unwrap(),
            RedisFigures {
                rate: 276_701.72,
                p99_ms: None
            }
        );
        assert!(parse_csv("\"SET\",\"1.0\"\n").is_err());
        assert!(parse_csv("").is_err());
    }
}
