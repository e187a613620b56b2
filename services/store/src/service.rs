//! The `runnel.v1.Store` gRPC service: checks, the hand-off of disk work to blocking
//! threads, and the fan-out of written results to watchers.
//!
//! A result is announced to watchers only after it is durable, so a watcher never sees a
//! result that a crash could take back. Each result continues the trace it carries in its
//! headers (the analyzer's span that emitted it): the store's span for it is that span's
//! child, whichever `Put` call brought it.

use crate::config::StoreConfig;
use crate::error::{Result, StoreError};
use crate::results::{
    self, DEFAULT_RANGE_LIMIT, MAX_KEY_BYTES, MAX_QUERY_BYTES, MAX_RANGE_LIMIT, ResultLog,
};
use runnel_proto::Millis;
use runnel_proto::v1::store_server::Store;
use runnel_proto::v1::{
    GetRequest, GetResponse, PutRequest, PutResponse, QueryResult, RangeRequest, RangeResponse,
    WatchRequest,
};
use runnel_security::{Action, Resource, authorize};
use runnel_server::Shutdown;
use std::collections::BTreeSet;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::Instrument;

/// Results queued between a watcher's task and its gRPC stream.
const WATCH_STREAM_BUFFER: usize = 64;

/// Which results a watcher wants.
#[derive(Debug, Clone)]
pub(crate) struct WatchFilter {
    query: String,
    key_prefix: String,
}

impl WatchFilter {
    /// Checks a `WatchRequest`.
    pub(crate) fn new(request: WatchRequest) -> Result<WatchFilter> {
        if request.query.len() > MAX_QUERY_BYTES || request.key_prefix.len() > MAX_KEY_BYTES {
            return Err(StoreError::InvalidArgument(format!(
                "query may have at most {MAX_QUERY_BYTES} bytes and key_prefix {MAX_KEY_BYTES}"
            )));
        }
        Ok(WatchFilter {
            query: request.query,
            key_prefix: request.key_prefix,
        })
    }

    /// Whether `result` passes: an empty query or prefix lets everything through.
    pub(crate) fn matches(&self, result: &QueryResult) -> bool {
        (self.query.is_empty() || self.query == result.query)
            && result.key.starts_with(&self.key_prefix)
    }
}

/// The store's gRPC handlers.
#[derive(Debug)]
pub(crate) struct StoreService {
    log: Arc<RwLock<ResultLog>>,
    /// Every durable result, for watchers. Its capacity is how far a watcher may lag.
    written: broadcast::Sender<Arc<QueryResult>>,
    max_batch_results: usize,
    shutdown: Shutdown,
}

impl StoreService {
    pub(crate) fn new(
        log: Arc<RwLock<ResultLog>>,
        config: &StoreConfig,
        shutdown: Shutdown,
    ) -> Self {
        StoreService {
            log,
            written: broadcast::Sender::new(config.watch_buffer),
            max_batch_results: config.max_batch_results,
            shutdown,
        }
    }

    async fn serve_put(&self, request: PutRequest) -> Result<PutResponse> {
        results::validate(&request.results, self.max_batch_results)?;
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
        let written: Vec<Arc<QueryResult>> =
            request.results.iter().cloned().map(Arc::new).collect();
        let count = written.len();
        let log = Arc::clone(&self.log);
        let counts = tokio::task::spawn_blocking(move || {
            let mut log = write_log(&log)?;
            log.put(request.results)?;
            Ok::<_, StoreError>(log.counts())
        })
        .await??;
        metrics::counter!("runnel_store_results_written_total").increment(count as u64);
        metrics::gauge!("runnel_store_results").set(counts.0 as f64);
        metrics::gauge!("runnel_store_series").set(counts.1 as f64);
        for result in written {
            // No watchers is not an error.
            let _ = self.written.send(result);
        }
        drop(spans);
        Ok(PutResponse {
            written: count as u32,
        })
    }

    async fn serve_get(&self, request: GetRequest) -> Result<GetResponse> {
        // On a blocking thread like every other use of the log: a `Put` holds the lock
        // through its fsync, which must not stall a runtime worker.
        let log = Arc::clone(&self.log);
        let result = tokio::task::spawn_blocking(move || {
            Ok::<_, StoreError>(read_log(&log)?.latest(&request.query, &request.key))
        })
        .await??;
        Ok(GetResponse { result })
    }

    async fn serve_range(&self, request: RangeRequest) -> Result<RangeResponse> {
        let limit = match request.limit as usize {
            0 => DEFAULT_RANGE_LIMIT,
            n => n.min(MAX_RANGE_LIMIT),
        };
        let log = Arc::clone(&self.log);
        let results = tokio::task::spawn_blocking(move || {
            read_log(&log)?.range(
                &request.query,
                &request.key,
                request.from.map(Millis::from),
                request.to.map(Millis::from),
                limit,
            )
        })
        .await??;
        Ok(RangeResponse { results })
    }

    fn serve_watch(
        &self,
        request: WatchRequest,
    ) -> Result<ReceiverStream<Result<QueryResult, Status>>> {
        let filter = WatchFilter::new(request)?;
        let (sender, receiver) = mpsc::channel(WATCH_STREAM_BUFFER);
        let watcher = Watcher {
            filter,
            written: self.written.subscribe(),
            sender,
            shutdown: self.shutdown.clone(),
        };
        tokio::spawn(watcher.run().in_current_span());
        Ok(ReceiverStream::new(receiver))
    }
}

fn read_log(log: &RwLock<ResultLog>) -> Result<RwLockReadGuard<'_, ResultLog>> {
    log.read().map_err(|_| StoreError::Failed)
}

fn write_log(log: &RwLock<ResultLog>) -> Result<RwLockWriteGuard<'_, ResultLog>> {
    log.write().map_err(|_| StoreError::Failed)
}

/// One `Watch` stream: relays matching results until the client leaves, falls too far
/// behind, or the store stops.
struct Watcher {
    filter: WatchFilter,
    written: broadcast::Receiver<Arc<QueryResult>>,
    sender: mpsc::Sender<Result<QueryResult, Status>>,
    shutdown: Shutdown,
}

impl Watcher {
    async fn run(mut self) {
        let gauge = metrics::gauge!("runnel_store_watchers");
        gauge.increment(1.0);
        let reason = self.relay().await;
        gauge.decrement(1.0);
        tracing::debug!(reason, "watcher ended");
    }

    async fn relay(&mut self) -> &'static str {
        loop {
            let next = tokio::select! {
                next = self.written.recv() => next,
                () = self.sender.closed() => return "client gone",
                () = self.shutdown.wait() => return self.stopping(),
            };
            let result = match next {
                Ok(result) => result,
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    metrics::counter!("runnel_store_watchers_dropped_total").increment(1);
                    // A gap must not go unnoticed: end the stream and say how to recover.
                    let _ = self.sender.try_send(Err(Status::resource_exhausted(format!(
                        "this watcher fell {missed} results behind; read them with Range and watch again"
                    ))));
                    return "lagged";
                }
                Err(broadcast::error::RecvError::Closed) => return "store closed",
            };
            if !self.filter.matches(&result) {
                continue;
            }
            tokio::select! {
                sent = self.sender.send(Ok(QueryResult::clone(&result))) => {
                    if sent.is_err() {
                        return "client gone";
                    }
                }
                () = self.shutdown.wait() => return self.stopping(),
            }
        }
    }

    fn stopping(&self) -> &'static str {
        let _ = self.sender.try_send(Err(Status::unavailable(
            "the store is shutting down; watch again",
        )));
        "shutdown"
    }
}

#[tonic::async_trait]
impl Store for StoreService {
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

    async fn get(
        &self,
        request: Request<GetRequest>,
    ) -> std::result::Result<Response<GetResponse>, Status> {
        authorize(
            &request,
            Action::ReadResults,
            Resource::Query(&request.get_ref().query),
        )?;
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
        Ok(Response::new(self.serve_range(request.into_inner()).await?))
    }

    type WatchStream = ReceiverStream<Result<QueryResult, Status>>;

    async fn watch(
        &self,
        request: Request<WatchRequest>,
    ) -> std::result::Result<Response<Self::WatchStream>, Status> {
        let query = Resource::query_or_any(&request.get_ref().query);
        authorize(&request, Action::ReadResults, query)?;
        Ok(Response::new(self.serve_watch(request.into_inner())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(query: &str, key: &str) -> QueryResult {
        QueryResult {
            query: query.into(),
            key: key.into(),
            ..Default::default()
        }
    }

    #[test]
    fn filters_match_query_exactly_and_key_by_prefix() {
        let filter = |query: &str, key_prefix: &str| {
            WatchFilter::new(WatchRequest {
                query: query.into(),
                key_prefix: key_prefix.into(),
            })
            .unwrap()
        };
        assert!(filter("", "").matches(&result("q", "k")));
        assert!(filter("q", "").matches(&result("q", "k")));
        assert!(!filter("q", "").matches(&result("q2", "k")));
        assert!(filter("q", "sensor-").matches(&result("q", "sensor-1")));
        assert!(!filter("q", "sensor-").matches(&result("q", "sensor")));
        assert!(!filter("", "b").matches(&result("q", "a")));
        let long = WatchFilter::new(WatchRequest {
            query: "q".repeat(MAX_QUERY_BYTES + 1),
            key_prefix: String::new(),
        });
        assert!(matches!(long, Err(StoreError::InvalidArgument(_))));
    }
}
