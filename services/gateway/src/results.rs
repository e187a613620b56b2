//! The read path that the gRPC and HTTP APIs share: checks, calls to the store, and live
//! streams with a bound on how many are open.
//!
//! Every delivered live result continues the trace it carries (the analyzer's span that
//! emitted it), so a result's trace ends at the gateway that handed it to a client.

use crate::error::GatewayError;
use runnel_proto::v1::store_client::StoreClient;
use runnel_proto::v1::{GetRequest, QueryResult, RangeRequest, WatchRequest};
use runnel_security::{ConnectConfig, Peer};
use runnel_server::Shutdown;
use runnel_telemetry::propagation::continue_trace;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;
use tracing::Instrument;

/// Longest query name, in bytes (as the store accepts).
const MAX_QUERY_BYTES: usize = 256;
/// Longest key or key prefix, in bytes (as the store accepts).
const MAX_KEY_BYTES: usize = 1024;
/// Results queued between a live stream's relay and its client.
const LIVE_BUFFER: usize = 64;

type Store = StoreClient<Peer>;

/// A live stream of results, as the gRPC `Watch` and the SSE endpoint serve it.
pub(crate) type Live = ReceiverStream<Result<QueryResult, Status>>;

/// Reads results from the store on behalf of clients.
#[derive(Debug, Clone)]
pub(crate) struct Results {
    store: Store,
    request_timeout: Duration,
    watchers: Arc<Semaphore>,
    max_watchers: usize,
    shutdown: Shutdown,
}

fn check_query(query: &str) -> Result<(), GatewayError> {
    if query.is_empty() || query.len() > MAX_QUERY_BYTES {
        return Err(GatewayError::InvalidArgument(format!(
            "query needs 1-{MAX_QUERY_BYTES} bytes, got {}",
            query.len()
        )));
    }
    Ok(())
}

fn check_key(name: &str, key: &str) -> Result<(), GatewayError> {
    if key.len() > MAX_KEY_BYTES {
        return Err(GatewayError::InvalidArgument(format!(
            "{name} may have at most {MAX_KEY_BYTES} bytes, got {}",
            key.len()
        )));
    }
    Ok(())
}

impl Results {
    /// Reads from the store at `url` (connecting lazily, so the store may start later or
    /// restart; tonic reconnects on its own).
    pub(crate) fn new(
        url: &str,
        connect: &ConnectConfig,
        max_message_bytes: usize,
        request_timeout: Duration,
        max_watchers: usize,
        shutdown: Shutdown,
    ) -> Result<Results, GatewayError> {
        let channel = runnel_security::connect_lazy(url, connect).map_err(|source| {
            GatewayError::StoreUrl {
                url: url.to_owned(),
                source,
            }
        })?;
        let store = StoreClient::new(channel)
            .max_decoding_message_size(max_message_bytes)
            .max_encoding_message_size(max_message_bytes);
        Ok(Results {
            store,
            request_timeout,
            watchers: Arc::new(Semaphore::new(max_watchers)),
            max_watchers,
            shutdown,
        })
    }

    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.set_timeout(self.request_timeout);
        request
    }

    /// The latest result for `query` and `key`, if there is one.
    pub(crate) async fn get(
        &self,
        request: GetRequest,
    ) -> Result<Option<QueryResult>, GatewayError> {
        check_query(&request.query)?;
        check_key("key", &request.key)?;
        let response = self
            .store
            .clone()
            .get(self.request(request))
            .await
            .map_err(GatewayError::Store)?;
        Ok(response.into_inner().result)
    }

    /// Results for one query and key by window start.
    pub(crate) async fn range(
        &self,
        request: RangeRequest,
    ) -> Result<Vec<QueryResult>, GatewayError> {
        check_query(&request.query)?;
        check_key("key", &request.key)?;
        let response = self
            .store
            .clone()
            .range(self.request(request))
            .await
            .map_err(GatewayError::Store)?;
        Ok(response.into_inner().results)
    }

    /// Live results matching `request`, until the client leaves, the store's stream ends
    /// (its reason is passed on) or the gateway stops.
    pub(crate) async fn watch(&self, request: WatchRequest) -> Result<Live, GatewayError> {
        if !request.query.is_empty() {
            check_query(&request.query)?;
        }
        check_key("key_prefix", &request.key_prefix)?;
        let permit = Arc::clone(&self.watchers)
            .try_acquire_owned()
            .map_err(|_| GatewayError::TooManyWatchers(self.max_watchers))?;
        let upstream = self
            .store
            .clone()
            .watch(request)
            .await
            .map_err(GatewayError::Store)?
            .into_inner();
        let (sender, receiver) = mpsc::channel(LIVE_BUFFER);
        tokio::spawn(relay(upstream, sender, permit, self.shutdown.clone()));
        Ok(ReceiverStream::new(receiver))
    }
}

/// Passes the store's results on to one client.
async fn relay(
    mut upstream: tonic::Streaming<QueryResult>,
    sender: mpsc::Sender<Result<QueryResult, Status>>,
    _permit: OwnedSemaphorePermit,
    shutdown: Shutdown,
) {
    let gauge = metrics::gauge!("runnel_gateway_watchers");
    gauge.increment(1.0);
    let delivered = metrics::counter!("runnel_gateway_results_delivered_total");
    loop {
        let next = tokio::select! {
            next = upstream.message() => next,
            () = sender.closed() => break,
            () = shutdown.wait() => {
                let _ = sender.try_send(Err(Status::unavailable("the gateway is shutting down; watch again")));
                break;
            }
        };
        let result = match next {
            Ok(Some(result)) => result,
            Ok(None) => break,
            Err(status) => {
                let _ = sender.try_send(Err(Status::from(GatewayError::Store(status))));
                break;
            }
        };
        let span = tracing::info_span!("gateway.deliver", query = %result.query, key = %result.key);
        continue_trace(&span, &result.headers);
        let sent = async {
            tokio::select! {
                sent = sender.send(Ok(result)) => sent.is_ok(),
                () = shutdown.wait() => false,
            }
        }
        .instrument(span)
        .await;
        if !sent {
            break;
        }
        delivered.increment(1);
    }
    gauge.decrement(1.0);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_name_the_field() {
        assert!(check_query("q").is_ok());
        let error = check_query("").unwrap_err().to_string();
        assert!(error.starts_with("query needs"), "{error}");
        let error = check_key("key_prefix", &"k".repeat(2000))
            .unwrap_err()
            .to_string();
        assert!(error.starts_with("key_prefix may have"), "{error}");
    }
}
