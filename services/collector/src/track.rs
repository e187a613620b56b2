//! `Track`: request/acknowledge. The first call issues the client a token; every call
//! collects one click, cart or purchase event keyed by the token (into the default topic,
//! as the purchase-propensity query expects), and answers with the token's latest score:
//! `Get(query, key = token)` on the store, `values[value]` of the result.
//!
//! Scores are cached per token for `track.cache_ttl` (a bounded LRU), so a client calling
//! in quick succession costs the store one read; the score still moves as the analyzer
//! updates it. A store that does not answer within `track.lookup_timeout` costs the answer
//! its score, never the event.

use crate::error::CollectorError;
use crate::intake::{Intake, log_level};
use lru::LruCache;
use runnel_proto::v1::store_client::StoreClient;
use runnel_proto::v1::{Event, GetRequest, QueryResult, TrackRequest, TrackResponse};
use runnel_security::Peer;
use std::num::NonZeroUsize;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The event types `Track` takes, as the purchase-propensity query reads them.
pub(crate) const TYPES: [&str; 3] = ["click", "cart", "purchase"];
/// The longest token accepted back from a client.
const MAX_TOKEN_BYTES: usize = 128;

/// The end of a token issued to an authenticated caller: `-` and 32 hex digits of the
/// SHA-256 of its principal. A token names its events and its score, so a caller that
/// learns another's token must not be able to read that score or add to that history:
/// with authentication on, a token is taken back only from the principal it names.
/// (Callers cannot choose their principal, so the tag needs no secret.)
fn principal_tag(principal: &str) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(principal.as_bytes());
    let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("-{hex}")
}

/// What a score lookup found, and when.
struct Cached {
    at: Instant,
    result: Option<QueryResult>,
}

/// Issues tokens and reads their scores.
pub(crate) struct Tracker {
    store: StoreClient<Peer>,
    query: String,
    value: String,
    ttl: Duration,
    lookup_timeout: Duration,
    cache: Mutex<LruCache<String, Cached>>,
}

impl std::fmt::Debug for Tracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracker")
            .field("query", &self.query)
            .field("value", &self.value)
            .finish_non_exhaustive()
    }
}

impl Tracker {
    pub(crate) fn new(store: StoreClient<Peer>, config: &crate::config::TrackConfig) -> Tracker {
        let entries = NonZeroUsize::new(config.cache_entries).unwrap_or(NonZeroUsize::MIN);
        Tracker {
            store,
            query: config.query.clone(),
            value: config.value.clone(),
            ttl: config.cache_ttl,
            lookup_timeout: config.lookup_timeout,
            cache: Mutex::new(LruCache::new(entries)),
        }
    }

    /// Takes one event for `request`'s token (issuing one if it has none), made by
    /// `principal` (`None` without authentication).
    pub(crate) async fn track(
        &self,
        intake: &Intake,
        request: TrackRequest,
        principal: Option<&str>,
    ) -> Result<TrackResponse, CollectorError> {
        let issued = request.token.is_empty();
        let tag = principal.map(principal_tag).unwrap_or_default();
        let token = if issued {
            metrics::counter!("runnel_collector_track_tokens_issued_total").increment(1);
            format!("tk-{:032x}{tag}", rand::random::<u128>())
        } else {
            check_token(&request.token)?;
            if !request.token.ends_with(&tag) {
                metrics::counter!("runnel_collector_track_tokens_refused_total").increment(1);
                return Err(CollectorError::NotYours(
                    "token: it was issued to another caller (or before tokens were bound to their callers); call Track without a token for one of your own".into(),
                ));
            }
            request.token
        };
        if !TYPES.contains(&request.r#type.as_str()) {
            return Err(CollectorError::InvalidEvent(format!(
                "type {:?}: use one of click, cart, purchase",
                request.r#type
            )));
        }
        let level = log_level(request.ack_level)?;
        let id = if request.id.is_empty() {
            format!("{token}-{:016x}", rand::random::<u64>())
        } else {
            request.id
        };
        let event = Event {
            id: id.clone(),
            source: if request.source.is_empty() {
                "track".into()
            } else {
                request.source
            },
            r#type: request.r#type,
            key: token.clone(),
            event_time: request.event_time,
            attributes: request.attributes,
            payload: request.payload.into(),
            headers: Default::default(),
        };
        intake
            .submit(None, vec![event], level, "track")
            .await?
            .done()
            .await?;
        // A token issued just now has no history to score.
        let result = if issued {
            None
        } else {
            self.lookup(&token).await
        };
        let score = result
            .as_ref()
            .and_then(|result| result.values.get(&self.value).copied());
        Ok(TrackResponse {
            token,
            id,
            score,
            result,
        })
    }

    /// The token's latest result: cached if fresh, else read from the store.
    async fn lookup(&self, token: &str) -> Option<QueryResult> {
        {
            let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(cached) = cache.get(token)
                && cached.at.elapsed() < self.ttl
            {
                metrics::counter!("runnel_collector_track_lookups_total", "outcome" => "cached")
                    .increment(1);
                return cached.result.clone();
            }
        }
        let request = GetRequest {
            query: self.query.clone(),
            key: token.to_owned(),
        };
        let mut store = self.store.clone();
        match tokio::time::timeout(self.lookup_timeout, store.get(request)).await {
            Ok(Ok(response)) => {
                let result = response.into_inner().result;
                metrics::counter!("runnel_collector_track_lookups_total", "outcome" => "read")
                    .increment(1);
                self.cache.lock().unwrap_or_else(|e| e.into_inner()).put(
                    token.to_owned(),
                    Cached {
                        at: Instant::now(),
                        result: result.clone(),
                    },
                );
                result
            }
            Ok(Err(status)) => {
                metrics::counter!("runnel_collector_track_lookups_total", "outcome" => "error")
                    .increment(1);
                tracing::warn!(code = ?status.code(), error = status.message(), "score lookup failed");
                None
            }
            Err(_) => {
                metrics::counter!("runnel_collector_track_lookups_total", "outcome" => "timeout")
                    .increment(1);
                tracing::warn!(timeout = ?self.lookup_timeout, "score lookup timed out");
                None
            }
        }
    }
}

/// A token sent back by a client: it becomes an event key, so it is held to the rules of
/// one (and to the alphabet tokens are issued in).
fn check_token(token: &str) -> Result<(), CollectorError> {
    let fine = token.len() <= MAX_TOKEN_BYTES && runnel_proto::names::is_name_alphabet(token);
    if fine {
        Ok(())
    } else {
        Err(CollectorError::InvalidEvent(format!(
            "token: use at most {MAX_TOKEN_BYTES} characters from [a-zA-Z0-9._-], as issued"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_name_the_principal_and_differ_between_principals() {
        let alice = principal_tag("alice");
        assert_eq!(alice.len(), 33);
        assert_eq!(alice, principal_tag("alice"));
        assert_ne!(alice, principal_tag("mallory"));
        check_token(&format!("tk-{:032x}{alice}", 7u128)).unwrap();
    }

    #[test]
    fn tokens_are_checked() {
        check_token("tk-0123456789abcdef0123456789abcdef").unwrap();
        assert!(check_token("has space").is_err());
        assert!(check_token(&"t".repeat(MAX_TOKEN_BYTES + 1)).is_err());
    }
}
