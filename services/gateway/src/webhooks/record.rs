//! The encodings the broker holds for webhooks: registry records in `_gateway.webhooks`
//! and the delivery cursors committed with a partition's offset.
//!
//! **Registry records** (one event per change, key = the webhook id in decimal, so that
//! every change of one webhook lands in one partition, in order):
//!
//! - type `webhook.registered`, payload JSON `{"version": 1, "id", "url", "query", "keys",
//!   "key_prefix", "where", "secret", "created_at", "after_sequence"}`: the webhook exists
//!   from now on and is given every matching result written after `after_sequence`;
//! - type `webhook.deleted`, payload JSON `{"version": 1, "id"}`: it is gone.
//!
//! A record of another type or version (written by a newer gateway) is refused with an
//! error naming it, and the registry skips it loudly rather than guess.
//!
//! **Delivery cursors** (the commit metadata of one partition of the delivery group, at
//! most [`MAX_METADATA_BYTES`]): a version byte (1), a u32 count, then per webhook whose
//! registration is in the partition 55 bytes, little-endian: id u64, cursor u64 (the last
//! result sequence given to it), delivered u64, failures u64, retrying u32, last HTTP
//! status u16 (0: none), last outcome u8 (0: none, 1: accepted, 2: refused, 3: no answer),
//! last attempt and last success times as Unix ms i64 (0: never).

use crate::webhooks::Registration;
use runnel_proto::v1::Event;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The event type of a registration.
pub(crate) const REGISTERED: &str = "webhook.registered";
/// The event type of a deletion.
pub(crate) const DELETED: &str = "webhook.deleted";
/// The encoding version this gateway writes and reads.
const VERSION: u32 = 1;
/// The broker's limit on a commit's metadata.
pub(crate) const MAX_METADATA_BYTES: usize = 64 * 1024;
/// Bytes per webhook in the cursor metadata.
const CURSOR_BYTES: usize = 55;
/// Webhooks whose registrations share one partition: their cursors must fit one commit.
pub(crate) const MAX_HOOKS_PER_PARTITION: usize = 1024;
const _: () = assert!(5 + MAX_HOOKS_PER_PARTITION * CURSOR_BYTES <= MAX_METADATA_BYTES);

/// A webhook as the registry holds it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Webhook {
    pub(crate) id: u64,
    pub(crate) url: String,
    pub(crate) query: String,
    pub(crate) keys: Vec<String>,
    pub(crate) key_prefix: String,
    #[serde(rename = "where")]
    pub(crate) predicates: Vec<String>,
    /// The HMAC key.
    pub(crate) secret: String,
    pub(crate) created_at: String,
    /// Results after this sequence are delivered.
    pub(crate) after_sequence: u64,
}

impl Webhook {
    /// What it was registered with (the secret aside).
    pub(crate) fn registration(&self) -> Registration {
        Registration {
            url: self.url.clone(),
            query: self.query.clone(),
            keys: self.keys.clone(),
            key_prefix: self.key_prefix.clone(),
            predicates: self.predicates.clone(),
            secret: None,
        }
    }
}

/// One change of the registry.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Change {
    Registered(Webhook),
    Deleted(u64),
}

#[derive(Serialize, Deserialize)]
struct Versioned<T> {
    version: u32,
    #[serde(flatten)]
    body: T,
}

#[derive(Serialize, Deserialize)]
struct DeletedBody {
    id: u64,
}

impl Change {
    /// The webhook the change is about.
    pub(crate) fn id(&self) -> u64 {
        match self {
            Change::Registered(hook) => hook.id,
            Change::Deleted(id) => *id,
        }
    }

    /// The event that carries it.
    pub(crate) fn to_event(&self) -> Event {
        let (kind, payload) = match self {
            Change::Registered(hook) => (
                REGISTERED,
                serde_json::to_vec(&Versioned {
                    version: VERSION,
                    body: hook,
                }),
            ),
            Change::Deleted(id) => (
                DELETED,
                serde_json::to_vec(&Versioned {
                    version: VERSION,
                    body: DeletedBody { id: *id },
                }),
            ),
        };
        Event {
            id: format!("{kind}.{}", self.id()),
            source: "runnel-gateway".into(),
            r#type: kind.into(),
            key: self.id().to_string(),
            // Serialising plain strings and numbers cannot fail.
            payload: payload.unwrap_or_default().into(),
            ..Event::default()
        }
    }

    /// The change an event carries.
    pub(crate) fn from_event(event: &Event) -> Result<Change, String> {
        #[derive(Deserialize)]
        struct Version {
            version: u32,
        }
        let version: Version = serde_json::from_slice(&event.payload)
            .map_err(|e| format!("a {:?} record without a version: {e}", event.r#type))?;
        if version.version != VERSION {
            return Err(format!(
                "a {:?} record of version {} (this gateway reads version {VERSION}; upgrade it)",
                event.r#type, version.version
            ));
        }
        let change = match event.r#type.as_str() {
            REGISTERED => serde_json::from_slice::<Versioned<Webhook>>(&event.payload)
                .map(|v| Change::Registered(v.body)),
            DELETED => serde_json::from_slice::<Versioned<DeletedBody>>(&event.payload)
                .map(|v| Change::Deleted(v.body.id)),
            other => return Err(format!("a record of unknown type {other:?}")),
        }
        .map_err(|e| format!("a {:?} record does not parse: {e}", event.r#type))?;
        if change.id().to_string() != event.key {
            return Err(format!(
                "a {:?} record for webhook {} under key {:?}",
                event.r#type,
                change.id(),
                event.key
            ));
        }
        Ok(change)
    }
}

/// The outcome of a delivery attempt, as the cursor metadata keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Outcome {
    /// A 2xx answer.
    Accepted,
    /// Any other answer.
    Refused,
    /// No answer: the connection failed or timed out.
    NoAnswer,
}

/// One webhook's delivery, as committed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Cursor {
    /// The last sequence given to the webhook (delivered, or passed over by its filter).
    pub(crate) cursor: u64,
    pub(crate) delivered: u64,
    pub(crate) failures: u64,
    pub(crate) retrying: u32,
    pub(crate) last_status: Option<u16>,
    pub(crate) last_outcome: Option<Outcome>,
    /// Unix ms.
    pub(crate) last_attempt: Option<i64>,
    /// Unix ms.
    pub(crate) last_success: Option<i64>,
}

/// The metadata for `cursors` (at most [`MAX_HOOKS_PER_PARTITION`]).
pub(crate) fn encode_cursors(cursors: &BTreeMap<u64, Cursor>) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(5 + cursors.len() * CURSOR_BYTES);
    bytes.push(1);
    bytes.extend_from_slice(&(cursors.len() as u32).to_le_bytes());
    for (id, c) in cursors {
        bytes.extend_from_slice(&id.to_le_bytes());
        bytes.extend_from_slice(&c.cursor.to_le_bytes());
        bytes.extend_from_slice(&c.delivered.to_le_bytes());
        bytes.extend_from_slice(&c.failures.to_le_bytes());
        bytes.extend_from_slice(&c.retrying.to_le_bytes());
        bytes.extend_from_slice(&c.last_status.unwrap_or(0).to_le_bytes());
        bytes.push(match c.last_outcome {
            None => 0,
            Some(Outcome::Accepted) => 1,
            Some(Outcome::Refused) => 2,
            Some(Outcome::NoAnswer) => 3,
        });
        bytes.extend_from_slice(&c.last_attempt.unwrap_or(0).to_le_bytes());
        bytes.extend_from_slice(&c.last_success.unwrap_or(0).to_le_bytes());
    }
    bytes
}

/// The cursors in a partition's metadata; empty metadata (nothing committed) has none.
pub(crate) fn decode_cursors(bytes: &[u8]) -> Result<BTreeMap<u64, Cursor>, String> {
    let mut cursors = BTreeMap::new();
    if bytes.is_empty() {
        return Ok(cursors);
    }
    let bad = |why: &str| format!("webhook cursors: {why}");
    if bytes[0] != 1 {
        return Err(bad(&format!(
            "version {} (this gateway reads version 1; upgrade it)",
            bytes[0]
        )));
    }
    let count = bytes
        .get(1..5)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .ok_or_else(|| bad("truncated"))?;
    let body = &bytes[5..];
    if body.len() != count.saturating_mul(CURSOR_BYTES) {
        return Err(bad(&format!(
            "{count} cursors need {} bytes, not {}",
            count.saturating_mul(CURSOR_BYTES),
            body.len()
        )));
    }
    let u64_at = |b: &[u8], at: usize| {
        let mut le = [0u8; 8];
        le.copy_from_slice(&b[at..at + 8]);
        u64::from_le_bytes(le)
    };
    for entry in body.chunks_exact(CURSOR_BYTES) {
        let outcome = match entry[38] {
            0 => None,
            1 => Some(Outcome::Accepted),
            2 => Some(Outcome::Refused),
            3 => Some(Outcome::NoAnswer),
            other => return Err(bad(&format!("outcome {other} is unknown"))),
        };
        let time = |at| Some(u64_at(entry, at) as i64).filter(|t| *t != 0);
        cursors.insert(
            u64_at(entry, 0),
            Cursor {
                cursor: u64_at(entry, 8),
                delivered: u64_at(entry, 16),
                failures: u64_at(entry, 24),
                retrying: u32::from_le_bytes([entry[32], entry[33], entry[34], entry[35]]),
                last_status: Some(u16::from_le_bytes([entry[36], entry[37]])).filter(|s| *s != 0),
                last_outcome: outcome,
                last_attempt: time(39),
                last_success: time(47),
            },
        );
    }
    Ok(cursors)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hook() -> Webhook {
        Webhook {
            id: 42,
            url: "http://127.0.0.1:9/hook".into(),
            query: "q".into(),
            keys: vec!["a".into()],
            key_prefix: String::new(),
            predicates: vec!["count>1".into()],
            secret: "0123456789abcdef".into(),
            created_at: "2026-12-05T16:00:00Z".into(),
            after_sequence: 7,
        }
    }

    #[test]
    fn changes_round_trip_through_events() {
        for change in [Change::Registered(hook()), Change::Deleted(42)] {
            let event = change.to_event();
            assert_eq!(event.key, "42", "keyed by id: one webhook, one partition");
            assert_eq!(Change::from_event(&event).unwrap(), change);
        }
    }

    #[test]
    fn records_of_other_versions_or_types_are_refused() {
        let mut event = Change::Deleted(42).to_event();
        event.payload = br#"{"version":2,"id":42}"#.to_vec().into();
        let error = Change::from_event(&event).unwrap_err();
        assert!(error.contains("version 2"), "{error}");
        let mut event = Change::Deleted(42).to_event();
        event.r#type = "webhook.renamed".into();
        let error = Change::from_event(&event).unwrap_err();
        assert!(error.contains("unknown type"), "{error}");
        let mut event = Change::Deleted(42).to_event();
        event.key = "43".into();
        assert!(Change::from_event(&event).is_err(), "key and id must agree");
    }

    #[test]
    fn cursors_round_trip_and_the_most_fit_one_commit() {
        let mut cursors = BTreeMap::new();
        for id in 0..MAX_HOOKS_PER_PARTITION as u64 {
            cursors.insert(
                id * 7 + 1,
                Cursor {
                    cursor: id * 3,
                    delivered: id,
                    failures: 2,
                    retrying: 1,
                    last_status: Some(503),
                    last_outcome: Some(Outcome::Refused),
                    last_attempt: Some(1_764_950_400_000),
                    last_success: None,
                },
            );
        }
        let bytes = encode_cursors(&cursors);
        assert!(bytes.len() <= MAX_METADATA_BYTES);
        assert_eq!(decode_cursors(&bytes).unwrap(), cursors);
        assert!(decode_cursors(&[]).unwrap().is_empty());
        assert!(decode_cursors(&bytes[..bytes.len() - 1]).is_err());
        assert!(decode_cursors(&[2, 0, 0, 0, 0]).is_err());
    }
}
