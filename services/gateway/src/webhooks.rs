//! Webhooks: a client registers a URL and a filter; the gateway POSTs every matching
//! result to it, signed, retried with backoff until the receiver accepts it — at least
//! once, in sequence order — and shows how delivery is going.
//!
//! A delivery is a JSON object `{"webhook": <id>, "results": [<result>, …]}` (up to
//! `webhooks.max_batch` results) with the headers
//!
//! - `X-Runnel-Webhook: <id>`, `X-Runnel-Timestamp: <Unix ms>`,
//! - `X-Runnel-Signature: sha256=<hex>`: HMAC-SHA256, keyed with the webhook's secret, of
//!   `<timestamp>.<body>` — the receiver recomputes it to know the delivery is genuine and
//!   checks the timestamp to refuse replays.
//!
//! Any 2xx answer accepts the batch; anything else (or no answer within
//! `webhooks.timeout`) is a failure, retried after `initial_backoff`, doubling up to
//! `max_backoff`, with jitter, for as long as the webhook exists. Each webhook's cursor —
//! the last sequence it has been given — is written to `<data_dir>/webhooks.redb` after
//! every accepted batch, with the registration itself, so registrations survive restarts
//! and delivery resumes after the cursor from the store's change feed: a result is never
//! skipped, and is delivered again only if the gateway stopped between the receiver's
//! answer and the cursor's write.

use crate::config::{SlowClientPolicy, WebhookConfig};
use crate::error::GatewayError;
use crate::live::{Hub, LiveItem, Published, Start};
use futures::FutureExt;
use hmac::{Hmac, Mac};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use runnel_proto::filter::{ResultFilter, parse_predicate};
use runnel_proto::json::result_json;
use runnel_proto::v1::WatchRequest;
use runnel_server::Shutdown;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::task::JoinHandle;

const HOOKS: TableDefinition<u64, &[u8]> = TableDefinition::new("hooks");
/// The database's file name inside the data directory.
const DATABASE_FILE: &str = "webhooks.redb";
/// Longest webhook URL, in bytes.
const MAX_URL_BYTES: usize = 2048;

/// What a client asks for when it registers a webhook.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Registration {
    /// Where deliveries are POSTed: an `http://` URL.
    pub(crate) url: String,
    /// Only results of this query (empty: every query).
    #[serde(default)]
    pub(crate) query: String,
    /// Only results with one of these keys (empty: every key).
    #[serde(default)]
    pub(crate) keys: Vec<String>,
    /// Only results whose key starts with this.
    #[serde(default)]
    pub(crate) key_prefix: String,
    /// Value predicates, e.g. `["count>=10"]`.
    #[serde(default, rename = "where")]
    pub(crate) predicates: Vec<String>,
    /// The HMAC key; one is generated when absent.
    #[serde(default)]
    pub(crate) secret: Option<String>,
}

impl Registration {
    fn watch_request(&self) -> Result<WatchRequest, GatewayError> {
        let predicates = self
            .predicates
            .iter()
            .map(|p| parse_predicate(p))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| GatewayError::InvalidArgument(e.0))?;
        let request = WatchRequest {
            query: self.query.clone(),
            key_prefix: self.key_prefix.clone(),
            keys: self.keys.clone(),
            predicates,
            after_sequence: None,
        };
        ResultFilter::new(&request).map_err(|e| GatewayError::InvalidArgument(e.0))?;
        Ok(request)
    }
}

/// How delivery is going.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct DeliveryStatus {
    /// The last sequence delivered (or passed over by the filter).
    pub(crate) cursor: u64,
    /// Results the receiver accepted.
    pub(crate) delivered: u64,
    /// Failed attempts, in all.
    pub(crate) failures: u64,
    /// Failed attempts in a row on the current batch (0 when the last one succeeded).
    pub(crate) retrying: u64,
    /// The HTTP status of the last attempt, if it got one.
    pub(crate) last_status: Option<u16>,
    /// Why the last attempt failed, if it did.
    pub(crate) last_error: Option<String>,
    /// When the last attempt was made (RFC 3339).
    pub(crate) last_attempt_at: Option<String>,
    /// When the receiver last accepted a batch (RFC 3339).
    pub(crate) last_success_at: Option<String>,
}

/// A webhook as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Stored {
    id: u64,
    registration: Registration,
    secret: String,
    created_at: String,
    status: DeliveryStatus,
}

struct Hook {
    stored: Mutex<Stored>,
    task: Mutex<Option<JoinHandle<()>>>,
}

/// Every webhook and its delivery task.
pub(crate) struct Webhooks {
    path: PathBuf,
    db: Database,
    hooks: Mutex<BTreeMap<u64, Arc<Hook>>>,
    hub: Arc<Hub>,
    config: WebhookConfig,
    client: reqwest::Client,
    shutdown: Shutdown,
}

impl std::fmt::Debug for Webhooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhooks")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

fn db_error(path: &Path, error: impl Into<redb::Error>) -> GatewayError {
    GatewayError::Webhooks(format!("{}: {}", path.display(), error.into()))
}

fn now() -> String {
    runnel_proto::json::rfc3339(runnel_proto::now_millis())
}

/// `sha256=<hex>` of `<timestamp>.<body>` keyed with `secret`.
pub(crate) fn signature(
    secret: &str,
    timestamp: &str,
    body: &[u8],
) -> Result<String, GatewayError> {
    // HMAC takes keys of any length; the error exists only in the trait's signature.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret.as_bytes())
        .map_err(|e| GatewayError::Webhooks(format!("hmac key: {e}")))?;
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    Ok(format!(
        "sha256={}",
        hex::encode(mac.finalize().into_bytes())
    ))
}

impl Webhooks {
    /// Opens the registrations in `data_dir` and starts delivering to each.
    pub(crate) fn open(
        data_dir: &Path,
        hub: Arc<Hub>,
        config: WebhookConfig,
        shutdown: Shutdown,
    ) -> Result<Arc<Webhooks>, GatewayError> {
        std::fs::create_dir_all(data_dir)
            .map_err(|e| GatewayError::Webhooks(format!("{}: {e}", data_dir.display())))?;
        let path = data_dir.join(DATABASE_FILE);
        let db = Database::create(&path).map_err(|e| db_error(&path, e))?;
        let mut stored = Vec::new();
        {
            let txn = db.begin_write().map_err(|e| db_error(&path, e))?;
            txn.open_table(HOOKS).map_err(|e| db_error(&path, e))?;
            txn.commit().map_err(|e| db_error(&path, e))?;
            let txn = db.begin_read().map_err(|e| db_error(&path, e))?;
            let table = txn.open_table(HOOKS).map_err(|e| db_error(&path, e))?;
            for entry in table.iter().map_err(|e| db_error(&path, e))? {
                let (_, value) = entry.map_err(|e| db_error(&path, e))?;
                let hook: Stored = serde_json::from_slice(value.value()).map_err(|e| {
                    GatewayError::Webhooks(format!(
                        "{}: a registration does not parse: {e}",
                        path.display()
                    ))
                })?;
                stored.push(hook);
            }
        }
        let client = reqwest::Client::builder()
            .timeout(config.timeout)
            .build()
            .map_err(|e| GatewayError::Webhooks(format!("http client: {e}")))?;
        let webhooks = Arc::new(Webhooks {
            path,
            db,
            hooks: Mutex::new(BTreeMap::new()),
            hub,
            config,
            client,
            shutdown,
        });
        for stored in stored {
            webhooks.start(stored)?;
        }
        Ok(webhooks)
    }

    fn hooks(&self) -> Result<std::sync::MutexGuard<'_, BTreeMap<u64, Arc<Hook>>>, GatewayError> {
        self.hooks
            .lock()
            .map_err(|_| GatewayError::Webhooks("webhooks lock poisoned".into()))
    }

    fn start(self: &Arc<Self>, stored: Stored) -> Result<(), GatewayError> {
        let request = stored.registration.watch_request()?;
        let id = stored.id;
        let hook = Arc::new(Hook {
            stored: Mutex::new(stored),
            task: Mutex::new(None),
        });
        let task = tokio::spawn(Arc::clone(self).deliver(Arc::clone(&hook), request));
        if let Ok(mut slot) = hook.task.lock() {
            *slot = Some(task);
        }
        self.hooks()?.insert(id, hook);
        Ok(())
    }

    fn save(&self, stored: &Stored) -> Result<(), GatewayError> {
        let bytes = serde_json::to_vec(stored)
            .map_err(|e| GatewayError::Webhooks(format!("cannot encode a registration: {e}")))?;
        let txn = self.db.begin_write().map_err(|e| db_error(&self.path, e))?;
        {
            let mut table = txn.open_table(HOOKS).map_err(|e| db_error(&self.path, e))?;
            table
                .insert(stored.id, bytes.as_slice())
                .map_err(|e| db_error(&self.path, e))?;
        }
        txn.commit().map_err(|e| db_error(&self.path, e))
    }

    /// Registers a webhook; answers it as [`Webhooks::get`] does, with its secret.
    pub(crate) fn register(
        self: &Arc<Self>,
        mut registration: Registration,
    ) -> Result<serde_json::Value, GatewayError> {
        let bad = |m: String| Err(GatewayError::InvalidArgument(m));
        if !registration.url.starts_with("http://") || registration.url.len() > MAX_URL_BYTES {
            return bad(format!(
                "url must be an http:// URL of at most {MAX_URL_BYTES} bytes"
            ));
        }
        if registration.url.parse::<http::Uri>().is_err() {
            return bad(format!("url {:?} does not parse", registration.url));
        }
        if !registration.query.is_empty() {
            crate::results::check_query(&registration.query)?;
        }
        registration.watch_request()?;
        let secret = match registration.secret.take() {
            Some(secret) if secret.len() < 16 || secret.len() > 256 => {
                return bad("secret needs 16-256 bytes".into());
            }
            Some(secret) => secret,
            None => hex::encode(rand::random::<[u8; 32]>()),
        };
        let id = {
            let hooks = self.hooks()?;
            if hooks.len() >= self.config.max_hooks {
                return bad(format!(
                    "at most {} webhooks; delete one first",
                    self.config.max_hooks
                ));
            }
            hooks.keys().next_back().map_or(1, |last| last + 1)
        };
        let stored = Stored {
            id,
            registration,
            secret: secret.clone(),
            created_at: now(),
            status: DeliveryStatus {
                // From now on: everything written after registering.
                cursor: self.hub.last_sequence(),
                ..DeliveryStatus::default()
            },
        };
        self.save(&stored)?;
        let mut answer = view(&stored);
        answer["secret"] = serde_json::Value::String(secret);
        self.start(stored)?;
        Ok(answer)
    }

    /// Every webhook, without secrets.
    pub(crate) fn list(&self) -> Result<Vec<serde_json::Value>, GatewayError> {
        let hooks = self.hooks()?;
        Ok(hooks
            .values()
            .filter_map(|hook| hook.stored.lock().ok().map(|s| view(&s)))
            .collect())
    }

    /// One webhook and its delivery status, without its secret.
    pub(crate) fn get(&self, id: u64) -> Result<Option<serde_json::Value>, GatewayError> {
        let hooks = self.hooks()?;
        Ok(hooks
            .get(&id)
            .and_then(|hook| hook.stored.lock().ok().map(|s| view(&s))))
    }

    /// Stops and forgets a webhook; false if there was none.
    pub(crate) fn delete(&self, id: u64) -> Result<bool, GatewayError> {
        let Some(hook) = self.hooks()?.remove(&id) else {
            return Ok(false);
        };
        if let Ok(mut task) = hook.task.lock()
            && let Some(task) = task.take()
        {
            task.abort();
        }
        let txn = self.db.begin_write().map_err(|e| db_error(&self.path, e))?;
        {
            let mut table = txn.open_table(HOOKS).map_err(|e| db_error(&self.path, e))?;
            table.remove(id).map_err(|e| db_error(&self.path, e))?;
        }
        txn.commit().map_err(|e| db_error(&self.path, e))?;
        Ok(true)
    }

    /// Stops every delivery task and waits until they are gone, so that the database is
    /// closed once the last handle to `Webhooks` goes (a restart in the same process
    /// reopens it).
    pub(crate) async fn stop(&self) {
        let tasks: Vec<JoinHandle<()>> = match self.hooks() {
            Ok(hooks) => hooks
                .values()
                .filter_map(|hook| hook.task.lock().ok().and_then(|mut task| task.take()))
                .collect(),
            Err(_) => Vec::new(),
        };
        for task in tasks {
            task.abort();
            let _ = task.await;
        }
    }

    /// Webhooks failing right now, for the dashboard.
    pub(crate) fn failing(&self) -> usize {
        self.hooks().map_or(0, |hooks| {
            hooks
                .values()
                .filter(|h| h.stored.lock().is_ok_and(|s| s.status.retrying > 0))
                .count()
        })
    }

    /// One webhook's delivery loop: follow from the cursor, batch, deliver until accepted.
    async fn deliver(self: Arc<Self>, hook: Arc<Hook>, request: WatchRequest) {
        let id = hook.stored.lock().map_or(0, |s| s.id);
        let mut backoff = self.config.initial_backoff;
        while !self.shutdown.is_triggered() {
            let cursor = hook.stored.lock().map_or(0, |s| s.status.cursor);
            let subscription = self
                .hub
                .subscribe(&request, Start::After(cursor), "webhook")
                .await;
            let mut subscription = match subscription {
                Ok(s) => s.with_policy(SlowClientPolicy::DropOldest),
                Err(error) => {
                    tracing::warn!(webhook = id, %error, "cannot follow results for a webhook");
                    self.pause(&mut backoff).await;
                    continue;
                }
            };
            loop {
                let mut batch: Vec<Arc<Published>> = Vec::new();
                let mut resubscribe = false;
                match subscription.next().await {
                    Ok(LiveItem::Result(result)) => batch.push(result),
                    // A gap or a broken stream: start again from the cursor, losing nothing.
                    Ok(LiveItem::Gap { .. }) | Err(_) => break,
                }
                while batch.len() < self.config.max_batch {
                    match subscription.next().now_or_never() {
                        Some(Ok(LiveItem::Result(result))) => batch.push(result),
                        Some(Ok(LiveItem::Gap { .. }) | Err(_)) => {
                            resubscribe = true;
                            break;
                        }
                        None => break,
                    }
                }
                let through = batch.last().map_or(0, |r| r.sequence);
                if !self.deliver_batch(&hook, id, &batch, through).await {
                    return; // shutting down
                }
                backoff = self.config.initial_backoff;
                if resubscribe {
                    break;
                }
            }
        }
    }

    /// Posts one batch until the receiver accepts it; false if the gateway stops first.
    async fn deliver_batch(
        &self,
        hook: &Hook,
        id: u64,
        batch: &[Arc<Published>],
        through: u64,
    ) -> bool {
        let results: Vec<serde_json::Value> = batch.iter().map(|r| result_json(r)).collect();
        let body = serde_json::to_vec(&serde_json::json!({ "webhook": id, "results": results }))
            .unwrap_or_default();
        let (url, secret) = match hook.stored.lock() {
            Ok(s) => (s.registration.url.clone(), s.secret.clone()),
            Err(_) => return false,
        };
        let mut backoff = self.config.initial_backoff;
        loop {
            let timestamp = runnel_proto::now_millis().0.to_string();
            let Ok(signature) = signature(&secret, &timestamp, &body) else {
                return false;
            };
            let attempt = self
                .client
                .post(&url)
                .header("content-type", "application/json")
                .header("x-runnel-webhook", id.to_string())
                .header("x-runnel-timestamp", &timestamp)
                .header("x-runnel-signature", signature)
                .body(body.clone())
                .send();
            let outcome = tokio::select! {
                outcome = attempt => outcome,
                () = self.shutdown.wait() => return false,
            };
            let (status, error) = match outcome {
                Ok(response) if response.status().is_success() => (Some(response.status()), None),
                Ok(response) => (
                    Some(response.status()),
                    Some(format!("the receiver answered {}", response.status())),
                ),
                Err(error) => (error.status(), Some(error.to_string())),
            };
            let snapshot = match hook.stored.lock() {
                Ok(mut stored) => {
                    let s = &mut stored.status;
                    s.last_status = status.map(|code| code.as_u16());
                    s.last_attempt_at = Some(now());
                    match &error {
                        None => {
                            s.cursor = through;
                            s.delivered += batch.len() as u64;
                            s.retrying = 0;
                            s.last_error = None;
                            s.last_success_at = s.last_attempt_at.clone();
                        }
                        Some(error) => {
                            s.failures += 1;
                            s.retrying += 1;
                            s.last_error = Some(error.clone());
                        }
                    }
                    stored.clone()
                }
                Err(_) => return false,
            };
            if let Err(save) = self.save(&snapshot) {
                tracing::error!(webhook = id, error = %save, "cannot save a webhook's cursor");
            }
            match error {
                None => {
                    metrics::counter!("runnel_gateway_webhook_deliveries_total", "outcome" => "accepted").increment(1);
                    return true;
                }
                Some(error) => {
                    metrics::counter!("runnel_gateway_webhook_deliveries_total", "outcome" => "failed").increment(1);
                    tracing::debug!(webhook = id, %error, ?backoff, "webhook delivery failed; retrying");
                    if !self.pause(&mut backoff).await {
                        return false;
                    }
                }
            }
        }
    }

    /// Waits out `backoff` (with up to 20 % jitter, so retries of many webhooks spread
    /// out) and doubles it; false if the gateway stops meanwhile.
    async fn pause(&self, backoff: &mut Duration) -> bool {
        let jitter = backoff.mul_f64(rand::random::<f64>() * 0.2);
        let wait = *backoff + jitter;
        *backoff = (*backoff * 2).min(self.config.max_backoff);
        tokio::select! {
            () = tokio::time::sleep(wait) => true,
            () = self.shutdown.wait() => false,
        }
    }
}

/// A webhook as the API shows it (no secret).
fn view(stored: &Stored) -> serde_json::Value {
    let r = &stored.registration;
    serde_json::json!({
        "id": stored.id,
        "url": r.url,
        "query": r.query,
        "keys": r.keys,
        "key_prefix": r.key_prefix,
        "where": r.predicates,
        "created_at": stored.created_at,
        "status": stored.status,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_are_hmac_sha256_of_timestamp_and_body() {
        // Computed independently (Python's hmac module) for the same inputs.
        let sig = signature(
            "secret-key-0123456789",
            "1714564800000",
            br#"{"webhook":1}"#,
        )
        .unwrap();
        assert_eq!(
            sig,
            "sha256=7f030581d2b9e2e3745e948dbd9337e68be5ebf280a741b202ff9bf930fd130e"
        );
        let other = signature(
            "secret-key-0123456789",
            "1714564800001",
            br#"{"webhook":1}"#,
        )
        .unwrap();
        assert_ne!(sig, other, "the timestamp is signed too");
    }

    #[test]
    fn registrations_are_checked() {
        let registration = Registration {
            url: "http://127.0.0.1:9/hook".into(),
            predicates: vec!["count>>3".into()],
            ..Default::default()
        };
        let error = registration.watch_request().unwrap_err().to_string();
        assert!(error.starts_with("where:"), "{error}");
    }
}
