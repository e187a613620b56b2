//! Headless Chromium driven over the DevTools protocol, for tests that load a page and read
//! what it shows, as a person would.
//!
//! A test that needs it first asks [`require(Tool::Chromium)`](crate::require), which
//! skips it visibly when `chromium` is not installed (or fails it, with
//! `RUNNEL_REQUIRE_CHROMIUM=1`).

use anyhow::{Context, Result, bail};
use base64::Engine;
use futures::{SinkExt, StreamExt};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

const START_TIMEOUT: Duration = Duration::from_secs(60);

/// One headless browser showing one page.
pub struct Browser {
    _child: Child,
    _profile: tempfile::TempDir,
    page: WebSocketStream<MaybeTlsStream<TcpStream>>,
    next_id: u64,
}

impl Browser {
    /// Starts Chromium on `url` and attaches to its page.
    pub async fn open(url: &str) -> Result<Browser> {
        let profile = tempfile::tempdir()?;
        let mut child = Command::new(crate::Tool::Chromium.program())
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
                "--window-size=1280,900",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg(url)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("spawn chromium")?;
        let stderr = child.stderr.take().context("piped stderr")?;
        let mut lines = BufReader::new(stderr).lines();
        let endpoint = tokio::time::timeout(START_TIMEOUT, async {
            while let Some(line) = lines.next_line().await? {
                if let Some(ws) = line.split("DevTools listening on ").nth(1) {
                    return anyhow::Ok(ws.trim().to_owned());
                }
            }
            bail!("chromium exited before it listened")
        })
        .await
        .context("chromium did not listen in time")??;
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        // ws://127.0.0.1:PORT/devtools/browser/… → the page target from /json/list.
        let host = endpoint
            .strip_prefix("ws://")
            .and_then(|rest| rest.split('/').next())
            .context("a ws:// DevTools address")?
            .to_owned();
        let page_url = tokio::time::timeout(START_TIMEOUT, async {
            loop {
                let targets: serde_json::Value = reqwest::get(format!("http://{host}/json/list"))
                    .await?
                    .json()
                    .await?;
                let page = targets.as_array().and_then(|targets| {
                    targets
                        .iter()
                        .find(|t| t["type"] == "page")
                        .and_then(|t| t["webSocketDebuggerUrl"].as_str().map(str::to_owned))
                });
                if let Some(page) = page {
                    return anyhow::Ok(page);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
        .context("no page target in time")??;
        let (page, _) = tokio_tungstenite::connect_async(page_url.as_str())
            .await
            .context("attach to the page")?;
        Ok(Browser {
            _child: child,
            _profile: profile,
            page,
            next_id: 1,
        })
    }

    /// Calls a DevTools method on the page and returns its result.
    pub async fn call(
        &mut self,
        method: &str,
        params: serde_json::Value,
    ) -> Result<serde_json::Value> {
        let id = self.next_id;
        self.next_id += 1;
        let request = serde_json::json!({ "id": id, "method": method, "params": params });
        self.page
            .send(Message::Text(request.to_string().into()))
            .await?;
        loop {
            let message = tokio::time::timeout(START_TIMEOUT, self.page.next())
                .await
                .with_context(|| format!("{method}: no answer"))?
                .context("the page's DevTools socket closed")??;
            let Message::Text(text) = message else {
                continue;
            };
            let answer: serde_json::Value = serde_json::from_str(&text)?;
            if answer["id"] == id {
                if let Some(error) = answer.get("error") {
                    bail!("{method}: {error}");
                }
                return Ok(answer["result"].clone());
            }
        }
    }

    /// Evaluates `expression` in the page and returns its value (JSON-serialisable).
    pub async fn eval(&mut self, expression: &str) -> Result<serde_json::Value> {
        let result = self
            .call(
                "Runtime.evaluate",
                serde_json::json!({ "expression": expression, "returnByValue": true }),
            )
            .await?;
        if let Some(exception) = result.get("exceptionDetails") {
            bail!("{expression}: {exception}");
        }
        Ok(result["result"]["value"].clone())
    }

    /// Evaluates `expression` until it yields `expected` or `timeout` passes; returns the
    /// last value either way.
    pub async fn wait_for(
        &mut self,
        expression: &str,
        expected: &serde_json::Value,
        timeout: Duration,
    ) -> Result<serde_json::Value> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let value = self.eval(expression).await?;
            if &value == expected || tokio::time::Instant::now() > deadline {
                return Ok(value);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Saves a PNG screenshot of the page to `path`.
    pub async fn screenshot(&mut self, path: &Path) -> Result<()> {
        let shot = self
            .call(
                "Page.captureScreenshot",
                serde_json::json!({ "format": "png" }),
            )
            .await?;
        let data = shot["data"].as_str().context("screenshot data")?;
        let png = base64::engine::general_purpose::STANDARD.decode(data)?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, png)?;
        Ok(())
    }
}
