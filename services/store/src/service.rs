//! The `runnel.v1.Store` gRPC service: checks, writes (into this store, or through the
//! results log in the broker when it is one replica of several), reads through the two
//! tiers, and the change feed that watchers follow.
//!
//! A result is announced to watchers only after it is durable, so a watcher never sees a
//! result that a crash could take back. Watchers follow live writes through a broadcast
//! channel; one that falls `watch_buffer` results behind, or that resumes after a sequence,
//! reads the change feed on disk until it has caught up, so a watcher sees every write after
//! its cursor, in order, whatever its speed. Each result continues the trace it carries in
//! its headers (the analyzer's span that emitted it).
//!
//! `DeleteQuery` deletes every result of a query the way `Put` writes: straight into this
//! store, or as a tombstone in the results log that every replica applies at its position,
//! answering once this replica has applied it. Watchers are not told of it: they receive
//! nothing for the deletion, and a resumed watch skips the deleted results.
//!
//! A `Get`, `Range` or `TopK` whose metadata names a minimum sequence
//! ([`runnel_proto::consistency`]) waits, like a `Watch` cursor from another replica, until
//! this replica has applied it: a client (or a gateway filling its cache) that has seen a
//! write on one replica reads it on every other.

use crate::apply::Applier;
use crate::durable::Durable;
use crate::error::{Result, StoreError};
use crate::hot::HotTier;
use crate::results_log::ResultsLog;
use crate::validate::{self, DEFAULT_RANGE_LIMIT, MAX_KEY_BYTES, MAX_RANGE_LIMIT};
use runnel_proto::Millis;
use runnel_proto::filter::ResultFilter;
use runnel_proto::v1::store_server::Store;
use runnel_proto::v1::{
    DeleteQueryRequest, DeleteQueryResponse, GetRequest, GetResponse, PutRequest, PutResponse,
    QueryResult, RangeRequest, RangeResponse, TopKRequest, TopKResponse, WatchRequest,
};
use runnel_security::{Action, Resource, authorize};
use runnel_server::Shutdown;
use std::collections::BTreeSet;
use std::sync::Arc;
use tokio::sync::{broadcast, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::Instrument;

/// Results queued between a watcher's task and its gRPC stream.
const WATCH_STREAM_BUFFER: usize = 64;
/// Feed entries read per catch-up step.
const FEED_PAGE: usize = 1000;
/// `TopK` answers this many keys when the request does not say.
const DEFAULT_TOP_K: usize = 10;
/// `TopK` never answers more than this many keys.
const MAX_TOP_K: usize = 1000;
/// How long a `Watch` with a cursor another replica gave waits for this one to apply it.
const CURSOR_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Where a `Put` goes.
pub(crate) enum Writes {
    /// Straight into this store (one replica, no broker).
    Local,
    /// Into the results log, which this replica (like every other) applies.
    Log {
        log: Arc<ResultsLog>,
        /// Whether this replica has caught up with the log and may answer reads.
        caught_up: watch::Receiver<bool>,
        /// The log's end when this replica started, for the error while catching up.
        target: u64,
    },
}

/// The store's gRPC handlers.
pub(crate) struct StoreService<H> {
    applier: Arc<Applier<H>>,
    writes: Writes,
    max_batch_results: usize,
    shutdown: Shutdown,
}

fn check_names(query: &str, key: &str) -> Result<()> {
    runnel_proto::names::validate_query_name(query)
        .map_err(|error| StoreError::InvalidArgument(error.to_string()))?;
    if key.len() > MAX_KEY_BYTES {
        return Err(StoreError::InvalidArgument(format!(
            "key may have at most {MAX_KEY_BYTES} bytes, got {}",
            key.len()
        )));
    }
    Ok(())
}

impl<H: HotTier> StoreService<H> {
    pub(crate) fn new(
        applier: Arc<Applier<H>>,
        writes: Writes,
        max_batch_results: usize,
        shutdown: Shutdown,
    ) -> Self {
        StoreService {
            applier,
            writes,
            max_batch_results,
            shutdown,
        }
    }

    /// Refuses reads while this replica is behind the results log: it would answer with
    /// results older than the other replicas'.
    fn check_caught_up(&self) -> Result<()> {
        match &self.writes {
            Writes::Log {
                caught_up, target, ..
            } if !*caught_up.borrow() => Err(StoreError::CatchingUp {
                applied: self.applier.applied(),
                target: *target,
            }),
            _ => Ok(()),
        }
    }

    /// A cursor from a replica that has applied more of the results log than this one (a
    /// client failing over) is valid: waits, for at most [`CURSOR_WAIT`], until this replica
    /// has applied it too. A cursor beyond the log's end is left for the feed to refuse.
    async fn reach_cursor(&self, after: u64) -> Result<()> {
        let Writes::Log { log, .. } = &self.writes else {
            return Ok(());
        };
        if after <= self.applier.applied() || after > log.bounds().await?.1 {
            return Ok(());
        }
        tokio::select! {
            reached = tokio::time::timeout(CURSOR_WAIT, self.applier.applied_through(after)) => {
                // Timed out: the feed check that follows says how far this replica is.
                reached.unwrap_or(Ok(()))
            }
            () = self.shutdown.wait() => Err(StoreError::NotFollowing),
        }
    }

    async fn serve_put(&self, request: PutRequest) -> Result<PutResponse> {
        validate::validate(&request.results, self.max_batch_results)?;
        let spans: Vec<tracing::Span> = request
            .results
            .iter()
            .map(|result| {
                let span = tracing::info_span!(
                    "store.put_result",
                    query = %result.query,
                    key = %result.key
                );
                runnel_telemetry::propagation::continue_trace(&span, &result.headers);
                span
            })
            .collect();
        let count = request.results.len();
        match &self.writes {
            Writes::Local => self.applier.put(request.results).await?,
            Writes::Log { log, .. } => {
                let last = log.append(&request.results, request.fence).await?;
                tokio::select! {
                    applied = self.applier.applied_through(last) => applied?,
                    () = self.shutdown.wait() => return Err(StoreError::NotFollowing),
                }
            }
        }
        drop(spans);
        Ok(PutResponse {
            written: count as u32,
        })
    }

    async fn serve_delete_query(&self, request: DeleteQueryRequest) -> Result<DeleteQueryResponse> {
        check_names(&request.query, "")?;
        let deleted = match &self.writes {
            Writes::Local => self.applier.delete_query(&request.query).await?,
            Writes::Log { log, .. } => {
                let sequence = log.append_deletion(&request.query).await?;
                tokio::select! {
                    applied = self.applier.applied_through(sequence) => applied?,
                    () = self.shutdown.wait() => return Err(StoreError::NotFollowing),
                }
                self.applier
                    .deleted_by(sequence)
                    .ok_or(StoreError::DeletionCountGone(sequence))?
            }
        };
        Ok(DeleteQueryResponse { deleted })
    }

    /// Waits until this replica has applied the minimum sequence `metadata` names.
    async fn reach_min_sequence(&self, metadata: &tonic::metadata::MetadataMap) -> Result<()> {
        match runnel_proto::consistency::min_sequence(metadata) {
            Ok(Some(sequence)) => self.reach_cursor(sequence).await,
            Ok(None) => Ok(()),
            Err(message) => Err(StoreError::InvalidArgument(message)),
        }
    }

    async fn serve_get(&self, request: GetRequest) -> Result<GetResponse> {
        check_names(&request.query, &request.key)?;
        self.check_caught_up()?;
        let result = self
            .applier
            .tiers()
            .latest(&request.query, &request.key)
            .await?;
        Ok(GetResponse { result })
    }

    async fn serve_range(&self, request: RangeRequest) -> Result<RangeResponse> {
        check_names(&request.query, &request.key)?;
        self.check_caught_up()?;
        let limit = match request.limit as usize {
            0 => DEFAULT_RANGE_LIMIT,
            n => n.min(MAX_RANGE_LIMIT),
        };
        let from = request.from.map_or(i64::MIN, |t| Millis::from(t).0);
        let to = request.to.map_or(i64::MAX, |t| Millis::from(t).0);
        let results = self
            .applier
            .tiers()
            .range(&request.query, &request.key, from, to, limit)
            .await?;
        Ok(RangeResponse { results })
    }

    async fn serve_top_k(&self, request: TopKRequest) -> Result<TopKResponse> {
        check_names(&request.query, "")?;
        self.check_caught_up()?;
        let k = match request.k as usize {
            0 => DEFAULT_TOP_K,
            k if k > MAX_TOP_K => {
                return Err(StoreError::InvalidArgument(format!(
                    "k may be at most {MAX_TOP_K}, got {k}"
                )));
            }
            k => k,
        };
        Ok(match self.applier.tiers().top_k(&request.query, k).await? {
            Some(top) => TopKResponse {
                window_start: Some(Millis(top.window.0).into()),
                window_end: Some(Millis(top.window.1).into()),
                ranked_by: top.ranked_by,
                results: top.results,
            },
            None => TopKResponse::default(),
        })
    }

    async fn serve_watch(
        &self,
        request: WatchRequest,
    ) -> Result<ReceiverStream<Result<QueryResult, Status>>> {
        let filter = ResultFilter::new(&request)?;
        // A live watch ("from now on") is taken while this replica still catches up: its
        // "now" is the log's end when the replica started, so everything written since —
        // which the replica applies and announces as it catches up — reaches the watcher,
        // and nothing older. (Refused, a gateway would connect late and its live clients
        // miss what was written in between.) A resume waits until the replica serves.
        let catching_up = match &self.writes {
            Writes::Log {
                caught_up, target, ..
            } if !*caught_up.borrow() => Some(*target),
            _ => None,
        };
        if request.after_sequence.is_some() {
            self.check_caught_up()?;
        }
        let (live, announced) = self.applier.subscribe();
        let durable = Arc::clone(self.applier.tiers().durable());
        let cursor = match request.after_sequence {
            None if let Some(target) = catching_up => Cursor::From(announced.max(target)),
            Some(after) => {
                self.reach_cursor(after).await?;
                // Refuse an expired cursor now, as the call's status, not mid-stream.
                let check = Arc::clone(&durable);
                tokio::task::spawn_blocking(move || check.feed(after, 0)).await??;
                Cursor::Resume(after)
            }
            None => Cursor::From(announced),
        };
        let (sender, receiver) = mpsc::channel(WATCH_STREAM_BUFFER);
        let watcher = Watcher {
            filter,
            live,
            durable,
            sender,
            shutdown: self.shutdown.clone(),
        };
        tokio::spawn(watcher.run(cursor).in_current_span());
        Ok(ReceiverStream::new(receiver))
    }
}

/// Where a watcher starts.
enum Cursor {
    /// Live writes after this sequence (those announced later).
    From(u64),
    /// Every retained write after this sequence, from the feed, then live ones.
    Resume(u64),
}

/// One `Watch` stream: relays matching results until the client leaves or the store stops.
struct Watcher {
    filter: ResultFilter,
    live: broadcast::Receiver<Arc<QueryResult>>,
    durable: Arc<Durable>,
    sender: mpsc::Sender<Result<QueryResult, Status>>,
    shutdown: Shutdown,
}

/// Why a watcher ended.
type Ended = &'static str;

impl Watcher {
    async fn run(mut self, cursor: Cursor) {
        let gauge = metrics::gauge!("runnel_store_watchers");
        gauge.increment(1.0);
        let reason = match self.relay(cursor).await {
            Ok(reason) | Err(reason) => reason,
        };
        gauge.decrement(1.0);
        tracing::debug!(reason, "watcher ended");
    }

    async fn relay(&mut self, cursor: Cursor) -> Result<Ended, Ended> {
        let mut last = match cursor {
            Cursor::From(sequence) => sequence,
            Cursor::Resume(after) => self.catch_up(after).await?,
        };
        loop {
            let next = tokio::select! {
                next = self.live.recv() => next,
                () = self.sender.closed() => return Ok("client gone"),
                () = self.shutdown.wait() => return Err(self.stopping()),
            };
            match next {
                Ok(result) => {
                    if result.sequence <= last {
                        continue;
                    }
                    last = result.sequence;
                    self.deliver(&result).await?;
                }
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    metrics::counter!("runnel_store_watch_catch_ups_total").increment(1);
                    tracing::debug!(missed, "watcher fell behind; catching up from the feed");
                    last = self.catch_up(last).await?;
                }
                Err(broadcast::error::RecvError::Closed) => return Ok("store closed"),
            }
        }
    }

    /// Reads the feed from `after` until it has delivered everything committed; returns the
    /// last sequence read.
    async fn catch_up(&mut self, mut after: u64) -> Result<u64, Ended> {
        loop {
            let durable = Arc::clone(&self.durable);
            let page = tokio::task::spawn_blocking(move || durable.feed(after, FEED_PAGE)).await;
            let page = match page {
                Ok(Ok(page)) => page,
                Ok(Err(error)) => {
                    let _ = self.sender.send(Err(Status::from(error))).await;
                    return Err("feed read failed");
                }
                Err(_) => return Err("feed read task failed"),
            };
            if page.through == after {
                return Ok(after);
            }
            after = page.through;
            for result in &page.results {
                self.deliver(result).await?;
            }
        }
    }

    async fn deliver(&mut self, result: &QueryResult) -> Result<(), Ended> {
        if !self.filter.matches(result) {
            return Ok(());
        }
        tokio::select! {
            sent = self.sender.send(Ok(result.clone())) => sent.map_err(|_| "client gone"),
            () = self.shutdown.wait() => Err(self.stopping()),
        }
    }

    fn stopping(&self) -> Ended {
        let _ = self.sender.try_send(Err(Status::unavailable(
            "the store is shutting down; watch again",
        )));
        "shutdown"
    }
}

#[tonic::async_trait]
impl<H: HotTier> Store for StoreService<H> {
    async fn put(
        &self,
        request: Request<PutRequest>,
    ) -> std::result::Result<Response<PutResponse>, Status> {
        let queries: BTreeSet<&str> = request
            .get_ref()
            .results
            .iter()
            .map(|r| r.query.as_str())
            .collect();
        for query in queries {
            authorize(&request, Action::WriteResults, Resource::Query(query))?;
        }
        Ok(Response::new(self.serve_put(request.into_inner()).await?))
    }

    async fn delete_query(
        &self,
        request: Request<DeleteQueryRequest>,
    ) -> std::result::Result<Response<DeleteQueryResponse>, Status> {
        authorize(
            &request,
            Action::WriteResults,
            Resource::Query(&request.get_ref().query),
        )?;
        Ok(Response::new(
            self.serve_delete_query(request.into_inner()).await?,
        ))
    }

    async fn get(
        &self,
        request: Request<GetRequest>,
    ) -> std::result::Result<Response<GetResponse>, Status> {
        authorize(
            &request,
            Action::ReadResults,
            Resource::Query(&request.get_ref().query),
        )?;
        self.reach_min_sequence(request.metadata()).await?;
        Ok(Response::new(self.serve_get(request.into_inner()).await?))
    }

    async fn range(
        &self,
        request: Request<RangeRequest>,
    ) -> std::result::Result<Response<RangeResponse>, Status> {
        authorize(
            &request,
            Action::ReadResults,
            Resource::Query(&request.get_ref().query),
        )?;
        self.reach_min_sequence(request.metadata()).await?;
        Ok(Response::new(self.serve_range(request.into_inner()).await?))
    }

    type WatchStream = ReceiverStream<Result<QueryResult, Status>>;

    async fn watch(
        &self,
        request: Request<WatchRequest>,
    ) -> std::result::Result<Response<Self::WatchStream>, Status> {
        let query = Resource::query_or_any(&request.get_ref().query);
        authorize(&request, Action::ReadResults, query)?;
        Ok(Response::new(self.serve_watch(request.into_inner()).await?))
    }

    async fn top_k(
        &self,
        request: Request<TopKRequest>,
    ) -> std::result::Result<Response<TopKResponse>, Status> {
        authorize(
            &request,
            Action::ReadResults,
            Resource::Query(&request.get_ref().query),
        )?;
        self.reach_min_sequence(request.metadata()).await?;
        Ok(Response::new(self.serve_top_k(request.into_inner()).await?))
    }
}
