//! The shared hot tier: series and rankings in a Redis server, so that every store replica
//! (and so every gateway in front of any of them) serves the same hot data.
//!
//! Layout, under the configured prefix `P`:
//!
//! - `P:s:<len(query)>:<query><key>` — a hash per series: `v` its version, `d` the
//!   protobuf-encoded [`Series`] (absent on a stale marker), `e` when it expires (Unix ms,
//!   0: never), with a Redis TTL to match, and `g` the epoch it was stored in;
//! - `P:epoch` — a counter: a series stored in an older epoch is stale. A replica moves it
//!   on when it starts, and when a write reached neither Redis nor its marker, once Redis
//!   answers again ([`HotTier::invalidate_all`]); every lookup reads it with the series;
//! - `P:{<len>:<query>}:w` — a hash with the `start` and `end` of the query's most recent
//!   window, `v` the greatest sequence ranked in it, and `x` the sequence of the query's last
//!   deletion (older scores are refused); and `P:{<len>:<query>}:z` — a sorted set of that
//!   window's keys by value (one hash tag, so both live on one Redis Cluster slot).
//!
//! Every change is one Lua script, so replicas racing on one series or ranking never
//! interleave: a series is replaced only by a newer version, a ranking only moves forward.
//! The memory bound is Redis's own (`maxmemory` and an `allkeys-lru` policy); its
//! `evicted_keys` are exported as the same eviction metric as the in-process backend's.

use super::{Cached, HotTier, Lookup, Ranking, Scores, metric};
use crate::durable::Series;
use crate::error::{Result, StoreError};
use prost::Message;
use redis::aio::ConnectionManager;
use std::sync::Arc;
use std::time::Duration;

/// Replaces a series (or marks it stale) unless a newer version is held, stamped with the
/// current epoch.
/// KEYS: series, epoch. ARGV: version, blob, stale ("1"/"0"), ttl ms (0: none), expires at ms.
const STORE: &str = r"
local held = redis.call('HGET', KEYS[1], 'v')
if held and tonumber(held) > tonumber(ARGV[1]) then return 0 end
local epoch = redis.call('GET', KEYS[2]) or '0'
if ARGV[3] == '1' then
  redis.call('HDEL', KEYS[1], 'd')
  redis.call('HSET', KEYS[1], 'v', ARGV[1], 'e', ARGV[5], 'g', epoch)
else
  redis.call('HSET', KEYS[1], 'v', ARGV[1], 'd', ARGV[2], 'e', ARGV[5], 'g', epoch)
end
if tonumber(ARGV[4]) > 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
else
  redis.call('PERSIST', KEYS[1])
end
return 1
";

/// A series and the epoch it was stored in, with the current epoch ('' for what is absent).
/// KEYS: series, epoch.
const LOOKUP: &str = r"
local held = redis.call('HMGET', KEYS[1], 'd', 'e', 'g')
local epoch = redis.call('GET', KEYS[2]) or '0'
return {held[1] or '', held[2] or '', held[3] or '0', epoch}
";

/// Folds scores into a query's ranking, unless the query was deleted after them.
/// KEYS: window hash, sorted set. ARGV: start, end, keep, version, then value, key pairs.
const RANK: &str = r"
local dropped = redis.call('HGET', KEYS[1], 'x')
local version = tonumber(ARGV[4])
if dropped and tonumber(dropped) >= version then return 0 end
local held = redis.call('HGET', KEYS[1], 'start')
local start = tonumber(ARGV[1])
if held and tonumber(held) > start then return 0 end
if (not held) or tonumber(held) < start then
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'start', ARGV[1], 'end', ARGV[2])
  redis.call('HDEL', KEYS[1], 'v')
end
local ranked = redis.call('HGET', KEYS[1], 'v')
if (not ranked) or tonumber(ranked) < version then
  redis.call('HSET', KEYS[1], 'v', ARGV[4])
end
for i = 5, #ARGV, 2 do
  redis.call('ZADD', KEYS[2], ARGV[i], ARGV[i + 1])
end
local keep = tonumber(ARGV[3])
local n = redis.call('ZCARD', KEYS[2])
if n > keep then redis.call('ZREMRANGEBYRANK', KEYS[2], 0, n - keep - 1) end
return 1
";

/// Drops a ranking for a query's deletion, unless it holds writes after it, and refuses
/// older scores from now on.
/// KEYS: window hash, sorted set. ARGV: the deletion's sequence.
const DROP: &str = r"
local version = tonumber(ARGV[1])
local ranked = redis.call('HGET', KEYS[1], 'v')
if (not ranked) or tonumber(ranked) < version then
  redis.call('DEL', KEYS[2])
  redis.call('HDEL', KEYS[1], 'start', 'end', 'v')
end
local dropped = redis.call('HGET', KEYS[1], 'x')
if (not dropped) or tonumber(dropped) < version then
  redis.call('HSET', KEYS[1], 'x', ARGV[1])
end
return 1
";

/// A ranking's window and top members, read together.
/// KEYS: window hash, sorted set. ARGV: k.
const TOP: &str = r"
local window = redis.call('HMGET', KEYS[1], 'start', 'end')
if not window[1] then return {} end
local top = redis.call('ZREVRANGE', KEYS[2], 0, tonumber(ARGV[1]) - 1, 'WITHSCORES')
table.insert(top, 1, window[2])
table.insert(top, 1, window[1])
return top
";

/// The Redis backend.
#[derive(Clone)]
pub(crate) struct Redis {
    connection: ConnectionManager,
    prefix: String,
    store: Arc<redis::Script>,
    lookup: Arc<redis::Script>,
    rank: Arc<redis::Script>,
    drop: Arc<redis::Script>,
    top: Arc<redis::Script>,
}

impl std::fmt::Debug for Redis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redis")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

fn failed(error: redis::RedisError) -> StoreError {
    StoreError::Hot(error.to_string())
}

fn now_ms() -> i64 {
    runnel_proto::now_millis().0
}

impl Redis {
    /// Connects to `url` (reconnecting on its own after a failure).
    pub(crate) async fn connect(url: &str, prefix: &str) -> Result<Redis> {
        let client = redis::Client::open(url).map_err(failed)?;
        let connection = ConnectionManager::new(client).await.map_err(failed)?;
        Ok(Redis {
            connection,
            prefix: prefix.to_owned(),
            store: Arc::new(redis::Script::new(STORE)),
            lookup: Arc::new(redis::Script::new(LOOKUP)),
            rank: Arc::new(redis::Script::new(RANK)),
            drop: Arc::new(redis::Script::new(DROP)),
            top: Arc::new(redis::Script::new(TOP)),
        })
    }

    fn series_key(&self, query: &str, key: &str) -> String {
        format!("{}:s:{}:{query}{key}", self.prefix, query.len())
    }

    /// The counter every series is stamped with: a series stored under an older one is
    /// stale ([`HotTier::invalidate_all`] moves it on).
    fn epoch_key(&self) -> String {
        format!("{}:epoch", self.prefix)
    }

    fn ranking_keys(&self, query: &str) -> (String, String) {
        let tag = format!("{}:{{{}:{query}}}", self.prefix, query.len());
        (format!("{tag}:w"), format!("{tag}:z"))
    }

    async fn put(
        &self,
        query: &str,
        key: &str,
        version: u64,
        blob: Option<Vec<u8>>,
        ttl: Option<Duration>,
    ) -> Result<()> {
        let ttl_ms = ttl.map_or(0, |t| {
            u64::try_from(t.as_millis()).unwrap_or(u64::MAX).max(1)
        });
        let expires_at = ttl.map_or(0, |_| now_ms().saturating_add_unsigned(ttl_ms));
        let stale = blob.is_none();
        let _: i64 = self
            .store
            .key(self.series_key(query, key))
            .key(self.epoch_key())
            .arg(version)
            .arg(blob.unwrap_or_default())
            .arg(if stale { "1" } else { "0" })
            .arg(ttl_ms)
            .arg(expires_at)
            .invoke_async(&mut self.connection.clone())
            .await
            .map_err(failed)?;
        Ok(())
    }

    /// Exports Redis's memory use and evictions as the hot tier's metrics.
    pub(crate) async fn publish_stats(&self) -> Result<()> {
        let info: String = redis::cmd("INFO")
            .arg("memory")
            .arg("stats")
            .query_async(&mut self.connection.clone())
            .await
            .map_err(failed)?;
        let field = |name: &str| {
            info.lines()
                .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        if let Some(used) = field("used_memory") {
            metrics::gauge!(metric::BYTES).set(used as f64);
        }
        if let Some(evicted) = field("evicted_keys") {
            metrics::counter!(metric::EVICTIONS, "cause" => "size").absolute(evicted);
        }
        if let Some(expired) = field("expired_keys") {
            metrics::counter!(metric::EVICTIONS, "cause" => "expired").absolute(expired);
        }
        Ok(())
    }
}

impl HotTier for Redis {
    async fn series(&self, query: &str, key: &str) -> Result<Lookup> {
        let (blob, expires_at, stored_in, epoch): (Vec<u8>, String, String, String) = self
            .lookup
            .key(self.series_key(query, key))
            .key(self.epoch_key())
            .invoke_async(&mut self.connection.clone())
            .await
            .map_err(failed)?;
        let blob = Some(blob).filter(|b| !b.is_empty());
        let expires_at = expires_at.parse::<i64>().ok();
        let lookup = match (blob, expires_at) {
            // Stored before the hot tier was last invalidated: maybe older than a write
            // that never reached it.
            (Some(_), _) if stored_in != epoch => Lookup::Stale,
            (Some(blob), expires_at) => {
                let series = Series::decode(blob.as_slice()).map_err(|e| {
                    StoreError::Hot(format!("a series in Redis does not decode: {e}"))
                })?;
                let expires_in = expires_at
                    .filter(|&at| at > 0)
                    .map(|at| Duration::from_millis(u64::try_from(at - now_ms()).unwrap_or(0)));
                Lookup::Hit(Cached {
                    series: Arc::new(series),
                    expires_in,
                })
            }
            (None, Some(_)) => Lookup::Stale,
            (None, None) => Lookup::Miss,
        };
        let name = if matches!(lookup, Lookup::Hit(_)) {
            metric::HITS
        } else {
            metric::MISSES
        };
        metrics::counter!(name).increment(1);
        Ok(lookup)
    }

    async fn store(
        &self,
        query: &str,
        key: &str,
        series: Series,
        ttl: Option<Duration>,
    ) -> Result<()> {
        let blob = series.encode_to_vec();
        self.put(query, key, series.version, Some(blob), ttl).await
    }

    async fn forget(&self, query: &str, key: &str, version: u64, ttl: Duration) -> Result<()> {
        self.put(query, key, version, None, Some(ttl)).await
    }

    async fn invalidate_all(&self) -> Result<()> {
        let _: i64 = redis::cmd("INCR")
            .arg(self.epoch_key())
            .query_async(&mut self.connection.clone())
            .await
            .map_err(failed)?;
        Ok(())
    }

    async fn rank(&self, query: &str, scores: Scores, keep: usize) -> Result<()> {
        let (window, set) = self.ranking_keys(query);
        let mut invocation = self.rank.key(window);
        invocation
            .key(set)
            .arg(scores.window.0)
            .arg(scores.window.1)
            .arg(keep)
            .arg(scores.version);
        for (key, value) in &scores.keys {
            invocation.arg(*value).arg(key);
        }
        let _: i64 = invocation
            .invoke_async(&mut self.connection.clone())
            .await
            .map_err(failed)?;
        Ok(())
    }

    async fn drop_ranking(&self, query: &str, version: u64) -> Result<()> {
        let (window, set) = self.ranking_keys(query);
        let _: i64 = self
            .drop
            .key(window)
            .key(set)
            .arg(version)
            .invoke_async(&mut self.connection.clone())
            .await
            .map_err(failed)?;
        Ok(())
    }

    async fn top(&self, query: &str, k: usize) -> Result<Option<Ranking>> {
        let (window, set) = self.ranking_keys(query);
        let reply: Vec<String> = self
            .top
            .key(window)
            .key(set)
            .arg(k.max(1))
            .invoke_async(&mut self.connection.clone())
            .await
            .map_err(failed)?;
        let bad = || StoreError::Hot("a ranking in Redis does not parse".into());
        let [start, end, members @ ..] = reply.as_slice() else {
            return Ok(None);
        };
        let start = start.parse().map_err(|_| bad())?;
        let end = end.parse().map_err(|_| bad())?;
        let mut top = Vec::with_capacity(members.len() / 2);
        for pair in members.chunks(2) {
            let [key, value] = pair else {
                return Err(bad());
            };
            top.push((key.clone(), value.parse().map_err(|_| bad())?));
        }
        Ok(Some(Ranking {
            window: (start, end),
            top: super::top_k(top, k),
        }))
    }
}
