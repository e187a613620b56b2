//! Live results: one stream from the store shared by every live client of this gateway
//! (the [`Hub`]), and each client's filtered, bounded view of it (a [`Subscription`]).
//!
//! The hub follows the store's `Watch` from the last sequence it has seen, reconnecting
//! after that sequence whenever the stream breaks (a store restart, say), so it never
//! misses a write. It keeps the last `resume_buffer` results for clients that reconnect
//! with a cursor, and fans every result out through a broadcast channel of `live_buffer`
//! results. A client reads that channel at its own pace: one that falls `live_buffer`
//! behind loses the oldest results it has not read, and the slow-client policy decides
//! what it is told (a gap marker, or the end of its stream with the cursor to resume
//! after). Either way the hub and every other client go on at full speed: nobody waits
//! for a slow client. A client that resumes from further back than the hub remembers gets
//! a stream of its own from the store's change feed.
//!
//! The hub also keeps the gateway's cache of latest results current ([`Latest`]): every
//! result reaches the cache before the hub counts it as observed, and whenever the stream
//! may have missed a write — it broke or came back, the store's feed no longer reached the
//! hub's cursor, or sequences skipped a number — the cache is cleared.

use crate::cache::Latest;
use crate::config::SlowClientPolicy;
use crate::error::GatewayError;
use crate::results::Store;
use bytes::Bytes;
use runnel_proto::filter::ResultFilter;
use runnel_proto::v1::{QueryResult, WatchRequest};
use runnel_server::Shutdown;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, broadcast};
use tonic::Status;

/// The first reconnection delay after the store's stream broke; doubled up to the max.
const RECONNECT_MIN: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_secs(5);

/// A result as the hub shares it: the result, its JSON and its protobuf encoding, each
/// made once for every client (serialising per client per result was most of the cost of
/// fanning out to thousands).
#[derive(Debug)]
pub(crate) struct Published {
    result: QueryResult,
    /// [`runnel_proto::json::result_json`] of the result, as text.
    pub(crate) json: String,
    /// The protobuf encoding, made by the first gRPC watcher that sends the result.
    encoded: OnceLock<Bytes>,
}

impl Published {
    pub(crate) fn new(result: QueryResult) -> Published {
        let json = runnel_proto::json::result_json(&result).to_string();
        Published {
            result,
            json,
            encoded: OnceLock::new(),
        }
    }

    /// The result's protobuf encoding, shared by every gRPC watcher that sends it.
    pub(crate) fn encoded(&self) -> &Bytes {
        self.encoded
            .get_or_init(|| Bytes::from(prost::Message::encode_to_vec(&self.result)))
    }
}

impl std::ops::Deref for Published {
    type Target = QueryResult;

    fn deref(&self) -> &QueryResult {
        &self.result
    }
}

/// What a live client receives.
#[derive(Debug, Clone)]
pub(crate) enum LiveItem {
    /// A result that passed the client's filter.
    Result(Arc<Published>),
    /// The client fell behind and `missed` results (of any query) were dropped after
    /// sequence `after`; re-read them, or resume after `after`.
    Gap {
        /// The last sequence the client saw before the gap.
        after: u64,
        /// How many results were dropped.
        missed: u64,
    },
}

/// The recent results and the broadcast, under one lock so that a subscriber's backlog
/// and its live stream meet without a gap or an overlap.
struct Recent {
    results: VecDeque<Arc<Published>>,
    capacity: usize,
    sender: broadcast::Sender<Arc<Published>>,
}

/// The shared live stream.
pub(crate) struct Hub {
    recent: Mutex<Recent>,
    live_buffer: usize,
    /// The last sequence received from the store.
    last: AtomicU64,
    /// The last sequence received and brought into the cache: a read that names a minimum
    /// sequence is answered from the cache once this has reached it.
    observed: AtomicU64,
    /// Wakes reads waiting for `observed` to reach their minimum sequence.
    progress: Notify,
    /// The cache of latest results (absent when `cache.max_bytes` is 0).
    latest: Option<Latest>,
    connected: AtomicBool,
    store: Store,
    watchers: Arc<Semaphore>,
    max_watchers: usize,
    policy: SlowClientPolicy,
    shutdown: Shutdown,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("last", &self.last.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// Where a subscription starts.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Start {
    /// Results written from now on.
    Now,
    /// Every result written after this sequence.
    After(u64),
}

impl Hub {
    /// A hub over `store`; [`Hub::follow`] must run for it to receive anything.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        store: Store,
        live_buffer: usize,
        resume_buffer: usize,
        max_watchers: usize,
        policy: SlowClientPolicy,
        latest: Option<Latest>,
        shutdown: Shutdown,
    ) -> Arc<Hub> {
        Arc::new(Hub {
            recent: Mutex::new(Recent {
                results: VecDeque::with_capacity(resume_buffer.min(65_536)),
                capacity: resume_buffer,
                sender: broadcast::Sender::new(live_buffer),
            }),
            live_buffer,
            last: AtomicU64::new(0),
            observed: AtomicU64::new(0),
            progress: Notify::new(),
            latest,
            connected: AtomicBool::new(false),
            store,
            watchers: Arc::new(Semaphore::new(max_watchers)),
            max_watchers,
            policy,
            shutdown,
        })
    }

    /// The last sequence the hub received (0 before the first).
    pub(crate) fn last_sequence(&self) -> u64 {
        self.last.load(Ordering::SeqCst)
    }

    /// Whether the hub's stream from the store is up.
    pub(crate) fn connected(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }

    /// The cache of latest results, while the stream that keeps it current is up.
    pub(crate) fn latest(&self) -> Option<&Latest> {
        self.latest.as_ref().filter(|_| self.connected())
    }

    /// Whether every result up to `sequence` has reached the cache, waiting at most `wait`
    /// for the stream to get there.
    pub(crate) async fn observed_through(&self, sequence: u64, wait: Duration) -> bool {
        let reached = async {
            loop {
                let progress = self.progress.notified();
                if self.observed.load(Ordering::SeqCst) >= sequence {
                    return;
                }
                progress.await;
            }
        };
        tokio::time::timeout(wait, reached).await.is_ok()
    }

    pub(crate) fn clear_cache(&self, why: &'static str) {
        if let Some(latest) = &self.latest {
            latest.clear(why);
        }
    }

    /// Live streams open.
    pub(crate) fn watchers(&self) -> usize {
        self.max_watchers - self.watchers.available_permits()
    }

    /// Follows the store until shutdown, reconnecting after the last sequence seen.
    pub(crate) async fn follow(self: Arc<Self>) {
        let shutdown = self.shutdown.clone();
        let mut delay = RECONNECT_MIN;
        loop {
            let last = self.last_sequence();
            let request = WatchRequest {
                after_sequence: (last > 0).then_some(last),
                ..Default::default()
            };
            let mut store = self.store.clone();
            let stream = tokio::select! {
                stream = store.watch(request) => stream,
                () = shutdown.wait() => return,
            };
            match stream {
                Ok(stream) => {
                    // What happened while the stream was down (a query's deletion, a
                    // switch to a replica behind the last one) is not in what it resumes
                    // with: the cache starts over.
                    self.clear_cache("reconnected");
                    self.connected.store(true, Ordering::Release);
                    delay = RECONNECT_MIN;
                    let mut stream = stream.into_inner();
                    loop {
                        let next = tokio::select! {
                            next = stream.message() => next,
                            () = shutdown.wait() => return,
                        };
                        match next {
                            Ok(Some(result)) => self.publish(result),
                            Ok(None) => break,
                            Err(status) => {
                                tracing::info!(code = ?status.code(), message = status.message(), "store watch ended; resuming");
                                break;
                            }
                        }
                    }
                }
                Err(status) if status.code() == tonic::Code::OutOfRange => {
                    // The store trimmed its feed past our cursor while we were away, or its
                    // history was reset: say so loudly and go on from now. Clients resuming
                    // across it are refused by the store the same way, so none is told a
                    // false "no gap".
                    metrics::counter!("runnel_gateway_hub_gaps_total").increment(1);
                    tracing::error!(
                        last,
                        message = status.message(),
                        "the store's change feed no longer reaches the hub's cursor; following from now"
                    );
                    // Sequences start again: every live client's cursor is meaningless now.
                    // A new broadcast ends their streams (the old sender goes), and they
                    // are refused the same way when they resume.
                    if let Ok(mut recent) = self.recent.lock() {
                        recent.results.clear();
                        recent.sender = broadcast::Sender::new(self.live_buffer);
                        self.last.store(0, Ordering::SeqCst);
                        self.observed.store(0, Ordering::SeqCst);
                    }
                    self.clear_cache("feed trimmed");
                }
                Err(status) => {
                    tracing::debug!(code = ?status.code(), message = status.message(), "cannot watch the store");
                }
            }
            self.connected.store(false, Ordering::Release);
            self.clear_cache("disconnected");
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = shutdown.wait() => return,
            }
            delay = (delay * 2).min(RECONNECT_MAX);
        }
    }

    fn publish(&self, result: QueryResult) {
        let sequence = result.sequence;
        let previous = self.last_sequence();
        if sequence <= previous {
            return;
        }
        if previous > 0 && sequence != previous + 1 {
            // A sequence no result of the stream had: a query's deletion (watchers are not
            // told of it), a write the store's feed skipped, or one this stream missed.
            self.clear_cache("sequence skipped");
        }
        // The result's trace ends here: handed to this gateway's clients.
        let span = tracing::info_span!("gateway.deliver", query = %result.query, key = %result.key, sequence);
        runnel_telemetry::propagation::continue_trace(&span, &result.headers);
        let _entered = span.enter();
        let result = Arc::new(Published::new(result));
        let Ok(mut recent) = self.recent.lock() else {
            return;
        };
        if recent.results.len() == recent.capacity {
            recent.results.pop_front();
        }
        recent.results.push_back(Arc::clone(&result));
        // Received before it reaches the cache: a miss that reads `last` after adding its
        // entry gets every later write through the cache (see `cache`).
        self.last.store(sequence, Ordering::SeqCst);
        // No subscribers is not an error.
        let _ = recent.sender.send(Arc::clone(&result));
        drop(recent);
        if let Some(latest) = &self.latest {
            latest.observe(&result);
        }
        self.observed.store(sequence, Ordering::SeqCst);
        self.progress.notify_waiters();
        metrics::gauge!("runnel_gateway_last_sequence").set(sequence as f64);
        metrics::counter!("runnel_gateway_results_received_total").increment(1);
    }

    /// A live view of results matching `filter`, from `start`; `protocol` labels its
    /// metrics. Counts against `max_watchers`.
    pub(crate) async fn subscribe(
        self: &Arc<Self>,
        request: &WatchRequest,
        start: Start,
        protocol: &'static str,
    ) -> Result<Subscription, GatewayError> {
        let filter = ResultFilter::new(request).map_err(|e| GatewayError::InvalidArgument(e.0))?;
        let permit = Arc::clone(&self.watchers)
            .try_acquire_owned()
            .map_err(|_| GatewayError::TooManyWatchers(self.max_watchers))?;
        let source = self.source(request, start).await?;
        metrics::gauge!("runnel_gateway_watchers", "protocol" => protocol).increment(1.0);
        Ok(Subscription {
            hub: Arc::clone(self),
            filter,
            source,
            protocol,
            policy: self.policy,
            _permit: permit,
        })
    }

    async fn source(&self, request: &WatchRequest, start: Start) -> Result<Source, GatewayError> {
        let poisoned =
            || GatewayError::InvalidArgument("the gateway is failing; try another".into());
        let after = match start {
            Start::Now => {
                // Under the lock, so that `last` and the subscription agree.
                let recent = self.recent.lock().map_err(|_| poisoned())?;
                return Ok(Source::Hub {
                    backlog: VecDeque::new(),
                    live: recent.sender.subscribe(),
                    last: self.last_sequence(),
                });
            }
            Start::After(after) => after,
        };
        {
            let recent = self.recent.lock().map_err(|_| poisoned())?;
            let covered = recent
                .results
                .front()
                .is_some_and(|first| after.saturating_add(1) >= first.sequence)
                && after <= self.last_sequence();
            if covered {
                let backlog = recent
                    .results
                    .iter()
                    .filter(|r| r.sequence > after)
                    .cloned()
                    .collect();
                return Ok(Source::Hub {
                    backlog,
                    live: recent.sender.subscribe(),
                    last: after,
                });
            }
        }
        // Further back than the hub remembers: the store's change feed, for this client.
        metrics::counter!("runnel_gateway_resumes_from_store_total").increment(1);
        let request = WatchRequest {
            after_sequence: Some(after),
            ..request.clone()
        };
        let stream = self
            .store
            .clone()
            .watch(request)
            .await
            .map_err(GatewayError::Store)?
            .into_inner();
        Ok(Source::Store {
            stream,
            last: after,
        })
    }
}

enum Source {
    Hub {
        backlog: VecDeque<Arc<Published>>,
        live: broadcast::Receiver<Arc<Published>>,
        /// The last sequence seen (delivered or filtered out).
        last: u64,
    },
    Store {
        stream: tonic::Streaming<QueryResult>,
        last: u64,
    },
}

/// One live client's stream.
pub(crate) struct Subscription {
    hub: Arc<Hub>,
    filter: ResultFilter,
    source: Source,
    protocol: &'static str,
    policy: SlowClientPolicy,
    _permit: OwnedSemaphorePermit,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        metrics::gauge!("runnel_gateway_watchers", "protocol" => self.protocol).decrement(1.0);
    }
}

impl Subscription {
    /// The last sequence this client has seen (delivered, or passed over by its filter).
    pub(crate) fn last_sequence(&self) -> u64 {
        match &self.source {
            Source::Hub { last, .. } | Source::Store { last, .. } => *last,
        }
    }

    /// Overrides the slow-client policy (gRPC cannot carry a gap marker; webhooks resume
    /// from their cursor instead).
    pub(crate) fn with_policy(mut self, policy: SlowClientPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// The next item, or the status the stream ends with (the gateway's shutdown ends
    /// every stream with `UNAVAILABLE`). Cancel-safe.
    pub(crate) async fn next(&mut self) -> Result<LiveItem, Status> {
        let shutdown = self.hub.shutdown.clone();
        tokio::select! {
            item = self.next_item() => item,
            () = shutdown.wait() => Err(Status::unavailable("the gateway is shutting down; watch again")),
        }
    }

    async fn next_item(&mut self) -> Result<LiveItem, Status> {
        loop {
            match &mut self.source {
                Source::Hub {
                    backlog,
                    live,
                    last,
                } => {
                    let result = match backlog.pop_front() {
                        Some(result) => result,
                        None => match live.recv().await {
                            Ok(result) => result,
                            Err(broadcast::error::RecvError::Lagged(missed)) => {
                                metrics::counter!("runnel_gateway_dropped_total", "protocol" => self.protocol)
                                    .increment(missed);
                                let after = *last;
                                return match self.policy {
                                    SlowClientPolicy::DropOldest => {
                                        Ok(LiveItem::Gap { after, missed })
                                    }
                                    SlowClientPolicy::Disconnect => {
                                        metrics::counter!("runnel_gateway_disconnected_total", "protocol" => self.protocol).increment(1);
                                        Err(Status::resource_exhausted(format!(
                                            "this client fell {missed} results behind; resume after sequence {after}"
                                        )))
                                    }
                                };
                            }
                            Err(broadcast::error::RecvError::Closed) => {
                                return Err(Status::unavailable(
                                    "the gateway's stream from the store started over; watch again",
                                ));
                            }
                        },
                    };
                    if result.sequence <= *last {
                        continue;
                    }
                    *last = result.sequence;
                    if self.filter.matches(&result) {
                        return Ok(LiveItem::Result(result));
                    }
                }
                Source::Store { stream, last } => match stream.message().await {
                    Ok(Some(result)) => {
                        *last = result.sequence.max(*last);
                        // The store filtered already; the check is cheap and keeps one
                        // meaning of a filter whatever the source.
                        if self.filter.matches(&result) {
                            return Ok(LiveItem::Result(Arc::new(Published::new(result))));
                        }
                    }
                    Ok(None) => {
                        return Err(Status::unavailable(
                            "the store ended the stream; watch again",
                        ));
                    }
                    Err(status) => return Err(Status::from(GatewayError::Store(status))),
                },
            }
        }
    }
}
