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
//! `max_backoff`, with jitter, for as long as the webhook exists.
//!
//! Targets are limited by [`target`]: `https://` and public addresses only, unless
//! `webhooks.allow` lists them — checked at registration and, after resolving, before
//! every connection a delivery opens ([`outbound`]). Redirects are not followed.
//!
//! Nothing is kept on the gateway's disk: every replica reaches the same webhooks through
//! the broker (`gateway.broker`; without it webhooks are refused).
//!
//! - **Registrations** are a log, the topic [`TOPIC`] of [`PARTITIONS`] partitions keyed
//!   by webhook id ([`record`] says how records are encoded). Every replica follows every
//!   partition into its in-memory [`registry`], so every replica lists the same webhooks;
//!   a registration or deletion is answered once this replica has read it back.
//! - **Delivery** is shared out by the consumer group [`GROUP`] on that topic: the member
//!   that owns partition p delivers the webhooks registered in p ([`delivery`]), and
//!   commits their cursors with p's offset after every batch a receiver accepted. A
//!   replica that takes p over resumes each webhook after its committed cursor from the
//!   store's change feed: a result is never skipped, and is delivered twice only if the
//!   owner stopped between the receiver's answer and the commit.

mod delivery;
mod outbound;
mod record;
mod registry;
mod target;

pub(crate) use target::Allowed;

use crate::config::WebhookConfig;
use crate::error::GatewayError;
use crate::live::Hub;
use hmac::{Hmac, Mac};
use record::{Change, Webhook};
use registry::Registry;
use runnel_proto::filter::{ResultFilter, parse_predicate};
use runnel_proto::v1::WatchRequest;
use runnel_security::Peer;
use runnel_server::Shutdown;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// The registry log and the delivery group's topic.
pub(crate) const TOPIC: &str = "_gateway.webhooks";
/// Its partitions: how many replicas can share delivery. Fixed: a webhook's partition is
/// its id's hash modulo this, for as long as the topic exists.
pub(crate) const PARTITIONS: u32 = 8;
/// The consumer group every gateway replica joins to share delivery.
pub(crate) const GROUP: &str = "runnel-gateway.webhooks";
/// Longest webhook URL, in bytes.
const MAX_URL_BYTES: usize = 2048;

/// What a client asks for when it registers a webhook.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Registration {
    /// Where deliveries are POSTed: an `https://` URL (or `http://`, to a target in
    /// `webhooks.allow`).
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
    /// How the last attempt ended: `accepted`, `refused` or `no_answer`.
    pub(crate) last_outcome: Option<record::Outcome>,
    /// Why the last attempt failed, if it did (known to the replica that made it).
    pub(crate) last_error: Option<String>,
    /// When the last attempt was made (RFC 3339).
    pub(crate) last_attempt_at: Option<String>,
    /// When the receiver last accepted a batch (RFC 3339).
    pub(crate) last_success_at: Option<String>,
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

/// The partition of a webhook's registration.
pub(crate) fn partition_of(id: u64) -> u32 {
    runnel_proto::partition_for_key(&id.to_string(), PARTITIONS)
}

/// Every webhook, and the delivery of those whose partitions this replica owns.
#[derive(Debug)]
pub(crate) struct Webhooks {
    registry: Arc<Registry>,
    deliveries: Arc<delivery::Deliveries>,
    hub: Arc<Hub>,
    config: WebhookConfig,
    policy: Arc<target::Policy>,
}

impl Webhooks {
    /// Follows the registry in the broker behind `broker` and joins the delivery group.
    pub(crate) fn start(
        broker: Peer,
        max_message_bytes: usize,
        request_timeout: Duration,
        hub: Arc<Hub>,
        config: WebhookConfig,
        shutdown: Shutdown,
    ) -> Result<Arc<Webhooks>, GatewayError> {
        let policy = Arc::new(
            target::Policy::new(&config.allow)
                .map_err(|e| GatewayError::Webhooks(format!("gateway.webhooks.{e}")))?,
        );
        let outbound = outbound::Outbound::new(&config, Arc::clone(&policy))?;
        let deliveries =
            delivery::Deliveries::new(Arc::clone(&hub), config.clone(), outbound, shutdown.clone());
        let registry = Registry::start(
            broker.clone(),
            max_message_bytes,
            request_timeout,
            Arc::clone(&deliveries),
            shutdown.clone(),
        );
        delivery::Deliveries::join(
            &deliveries,
            broker,
            max_message_bytes,
            Arc::clone(&registry),
        );
        Ok(Arc::new(Webhooks {
            registry,
            deliveries,
            hub,
            config,
            policy,
        }))
    }

    /// Registers a webhook; answers it as [`Webhooks::get`] does, with its secret.
    pub(crate) async fn register(
        &self,
        mut registration: Registration,
    ) -> Result<serde_json::Value, GatewayError> {
        let bad = |m: String| Err(GatewayError::InvalidArgument(m));
        if registration.url.len() > MAX_URL_BYTES {
            return bad(format!("url must be at most {MAX_URL_BYTES} bytes"));
        }
        if let Err(refusal) = self.policy.check_registration(&registration.url).await {
            return bad(format!("url: {refusal}"));
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
        let id = self.registry.new_id(self.config.max_hooks).await?;
        let hook = Webhook {
            id,
            url: registration.url,
            query: registration.query,
            keys: registration.keys,
            key_prefix: registration.key_prefix,
            predicates: registration.predicates,
            secret: secret.clone(),
            created_at: now(),
            // From now on: everything written after registering.
            after_sequence: self.hub.last_sequence(),
        };
        self.registry
            .write(Change::Registered(hook.clone()))
            .await?;
        let mut answer = self.view(&hook, None);
        answer["secret"] = serde_json::Value::String(secret);
        Ok(answer)
    }

    /// Every webhook, without secrets.
    pub(crate) async fn list(&self) -> Result<Vec<serde_json::Value>, GatewayError> {
        let hooks = self.registry.webhooks().await?;
        let committed = if hooks.iter().any(|h| self.deliveries.status(h.id).is_none()) {
            self.deliveries.committed_statuses().await
        } else {
            None
        };
        Ok(hooks
            .iter()
            .map(|hook| self.view(hook, committed.as_ref()))
            .collect())
    }

    /// One webhook and its delivery status, without its secret.
    pub(crate) async fn get(&self, id: u64) -> Result<Option<serde_json::Value>, GatewayError> {
        let Some(hook) = self.registry.webhook(id).await? else {
            return Ok(None);
        };
        let committed = if self.deliveries.status(id).is_none() {
            self.deliveries.committed_statuses().await
        } else {
            None
        };
        Ok(Some(self.view(&hook, committed.as_ref())))
    }

    /// Forgets a webhook, which stops its delivery on whichever replica delivers it; false
    /// if there was none.
    pub(crate) async fn delete(&self, id: u64) -> Result<bool, GatewayError> {
        if self.registry.webhook(id).await?.is_none() {
            return Ok(false);
        }
        self.registry.write(Change::Deleted(id)).await?;
        Ok(true)
    }

    /// Stops every delivery task and waits until they are gone.
    pub(crate) async fn stop(&self) {
        self.deliveries.stop().await;
    }

    /// Webhooks this replica delivers that are failing right now, for the dashboard.
    pub(crate) fn failing(&self) -> usize {
        self.deliveries.failing()
    }

    /// A webhook as the API shows it (no secret), with its delivery status: live from the
    /// replica that delivers it, else as last committed to the group (`committed`), else
    /// none.
    fn view(
        &self,
        hook: &Webhook,
        committed: Option<&BTreeMap<u64, DeliveryStatus>>,
    ) -> serde_json::Value {
        let here = self.deliveries.status(hook.id);
        let delivered_here = here.is_some();
        let (status, status_from) = match here {
            Some(status) => (Some(status), Some("this replica")),
            None => match committed.and_then(|c| c.get(&hook.id)) {
                Some(status) => (Some(status.clone()), Some("last commit")),
                None => (None, None),
            },
        };
        serde_json::json!({
            "id": hook.id,
            "url": hook.url,
            "query": hook.query,
            "keys": hook.keys,
            "key_prefix": hook.key_prefix,
            "where": hook.predicates,
            "created_at": hook.created_at,
            "partition": partition_of(hook.id),
            "delivered_here": delivered_here,
            "status": status,
            "status_from": status_from,
        })
    }
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
