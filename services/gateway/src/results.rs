//! The unary reads that the gRPC and HTTP APIs share: checks, then answers from the
//! gateway's cache or calls to the store.
//!
//! Where each read is answered:
//!
//! - `Get`: from the gateway's cache of latest results ([`crate::cache`]) when the series
//!   is in it and the live stream that keeps it current is up; otherwise from the store,
//!   and the answer is cached. A `Get` naming a minimum sequence (gRPC metadata
//!   `runnel-min-sequence`, HTTP `min_sequence=`) is answered from the cache only once the
//!   stream has brought it every result up to that sequence — it waits up to
//!   `cache.wait` for that, then asks the store, passing the minimum on.
//! - `Range` and `TopK`: from the store, with the minimum sequence passed on. The stream
//!   carries writes, not a series' history or a query's every key, so neither can be
//!   answered exactly from what it delivers after the gateway started: a `Range` needs the
//!   windows written before, and a `TopK` the ranking of keys the gateway never saw.
//!
//! A read that finds nothing tells a query that exists but has no result (yet) for what
//! was asked from a query that does not exist at all, which is answered `NOT_FOUND`
//! naming the known queries. A query is known when the analyzer runs it (it owns the
//! queries: `Analyzer.ListQueries`) or when the store holds results of it (a query the
//! analyzer has stopped running). Only a gateway that knows the analyzer
//! (`pipeline.analyzer`) can tell; one that does not, or whose analyzer does not answer,
//! answers an empty read as it always has, rather than turn a quiet query into an error.

use crate::cache::Lookup;
use crate::error::GatewayError;
use crate::live::{Hub, Published};
use runnel_proto::filter::MAX_KEY_BYTES;
use runnel_proto::v1::analyzer_client::AnalyzerClient;
use runnel_proto::v1::store_client::StoreClient;
use runnel_proto::v1::{
    CreateQueryRequest, DropQueryRequest, GetRequest, ListQueriesRequest, QueryDescription,
    QueryResult, RangeRequest, TopKRequest, TopKResponse,
};
use runnel_security::{Action, Caller, ConnectConfig, Peer, Resource};
use std::sync::Arc;
use std::time::Duration;

/// The store's gRPC client, as every part of the gateway uses it.
pub(crate) type Store = StoreClient<Peer>;

/// The analyzer's gRPC client: asked which queries exist.
pub(crate) type Analyzer = AnalyzerClient<Peer>;

/// Most keys a `TopK` may ask for (as the store accepts).
const MAX_TOP_K: u32 = 1000;

/// Connects (lazily, so the store may start later or restart; tonic reconnects on its
/// own) to the store at `url`, with the gateway's TLS and credentials.
pub(crate) fn connect(
    url: &str,
    connect: &ConnectConfig,
    max_message_bytes: usize,
) -> Result<Store, GatewayError> {
    let channel =
        runnel_security::connect_lazy(url, connect).map_err(|source| GatewayError::StoreUrl {
            url: url.to_owned(),
            source,
        })?;
    Ok(StoreClient::new(channel)
        .max_decoding_message_size(max_message_bytes)
        .max_encoding_message_size(max_message_bytes))
}

/// Reads results from the store on behalf of clients.
#[derive(Debug, Clone)]
pub(crate) struct Results {
    store: Store,
    /// The analyzer, when the gateway knows it: without it, a query with no results cannot
    /// be told from one that does not exist.
    analyzer: Option<Analyzer>,
    request_timeout: Duration,
    /// The live stream, and the cache it keeps current.
    hub: Arc<Hub>,
    /// How long a `Get` naming a minimum sequence waits for the stream to reach it before
    /// it asks the store.
    cache_wait: Duration,
}

pub(crate) fn check_query(query: &str) -> Result<(), GatewayError> {
    runnel_proto::names::validate_query_name(query)
        .map_err(|error| GatewayError::InvalidArgument(error.to_string()))
}

fn check_key(key: &str) -> Result<(), GatewayError> {
    if key.len() > MAX_KEY_BYTES {
        return Err(GatewayError::InvalidArgument(format!(
            "key may have at most {MAX_KEY_BYTES} bytes, got {}",
            key.len()
        )));
    }
    Ok(())
}

impl Results {
    pub(crate) fn new(
        store: Store,
        analyzer: Option<Analyzer>,
        request_timeout: Duration,
        hub: Arc<Hub>,
        cache_wait: Duration,
    ) -> Results {
        Results {
            store,
            analyzer,
            request_timeout,
            hub,
            cache_wait,
        }
    }

    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.set_timeout(self.request_timeout);
        request
    }

    /// A request to the store that is answered only once the store has applied
    /// `min_sequence` (when there is one).
    fn request_after<T>(&self, message: T, min_sequence: Option<u64>) -> tonic::Request<T> {
        let mut request = self.request(message);
        if let Some(sequence) = min_sequence.filter(|&s| s > 0) {
            runnel_proto::consistency::set_min_sequence(request.metadata_mut(), sequence);
        }
        request
    }

    /// The store's answer to a read of `query`; when `empty` says it found nothing, a
    /// check that the query exists.
    async fn read<T>(
        &self,
        query: &str,
        caller: &Caller,
        answer: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
        empty: impl FnOnce(&T) -> bool,
    ) -> Result<T, GatewayError> {
        let answer = answer.await.map_err(GatewayError::Store)?.into_inner();
        if empty(&answer) {
            self.check_known(query, caller).await?;
        }
        Ok(answer)
    }

    /// The latest result for `query` and `key`, if there is one, reflecting at least every
    /// write up to `min_sequence`.
    pub(crate) async fn get(
        &self,
        request: GetRequest,
        min_sequence: Option<u64>,
        caller: &Caller,
    ) -> Result<Option<Arc<Published>>, GatewayError> {
        check_query(&request.query)?;
        check_key(&request.key)?;
        let cached = match (self.hub.latest(), min_sequence) {
            (None, _) => None,
            (Some(latest), None) => Some(latest),
            (Some(latest), Some(min)) => self
                .hub
                .observed_through(min, self.cache_wait)
                .await
                .then_some(latest),
        };
        let Some(latest) = cached else {
            metrics::counter!("runnel_gateway_cache_bypassed_total").increment(1);
            return self.get_from_store(request, min_sequence, caller).await;
        };
        let fill = match latest.lookup(&request.query, &request.key) {
            Lookup::Hit(found) => return Ok(Some(found)),
            Lookup::Miss(fill) => fill,
        };
        // Read after the entry was added: every later write reaches it through the stream,
        // and the store's answer reflects every earlier one.
        let position = self.hub.last_sequence().max(min_sequence.unwrap_or(0));
        let found = self.get_from_store(request, Some(position), caller).await?;
        Ok(latest.fill(fill, found))
    }

    async fn get_from_store(
        &self,
        request: GetRequest,
        min_sequence: Option<u64>,
        caller: &Caller,
    ) -> Result<Option<Arc<Published>>, GatewayError> {
        let (query, mut store) = (request.query.clone(), self.store.clone());
        let answer = store.get(self.request_after(request, min_sequence));
        let found = self.read(&query, caller, answer, |r| r.result.is_none());
        Ok(found.await?.result.map(|r| Arc::new(Published::new(r))))
    }

    /// Results for one query and key by window start.
    pub(crate) async fn range(
        &self,
        request: RangeRequest,
        min_sequence: Option<u64>,
        caller: &Caller,
    ) -> Result<Vec<QueryResult>, GatewayError> {
        check_query(&request.query)?;
        check_key(&request.key)?;
        let (query, mut store) = (request.query.clone(), self.store.clone());
        let answer = store.range(self.request_after(request, min_sequence));
        let found = self.read(&query, caller, answer, |r| r.results.is_empty());
        Ok(found.await?.results)
    }

    /// The top keys of a query in its most recent window.
    pub(crate) async fn top_k(
        &self,
        request: TopKRequest,
        min_sequence: Option<u64>,
        caller: &Caller,
    ) -> Result<TopKResponse, GatewayError> {
        check_query(&request.query)?;
        if request.k > MAX_TOP_K {
            return Err(GatewayError::InvalidArgument(format!(
                "k may be at most {MAX_TOP_K}, got {}",
                request.k
            )));
        }
        let (query, mut store) = (request.query.clone(), self.store.clone());
        let answer = store.top_k(self.request_after(request, min_sequence));
        // No ranked window: the store holds no result of the query.
        self.read(&query, caller, answer, |r| r.window_start.is_none())
            .await
    }

    /// Whether the store holds any result of `query`: it ranks every query's most recent
    /// window, so a one-key `TopK` answers without reading a series.
    async fn store_holds(&self, query: &str) -> Result<bool, GatewayError> {
        let request = TopKRequest {
            query: query.to_owned(),
            k: 1,
        };
        let response = self
            .store
            .clone()
            .top_k(self.request(request))
            .await
            .map_err(GatewayError::Store)?;
        Ok(response.into_inner().window_start.is_some())
    }

    /// The queries the analyzer runs that `caller` may read.
    pub(crate) async fn queries(
        &self,
        caller: &Caller,
    ) -> Result<Vec<QueryDescription>, GatewayError> {
        let mut analyzer = self.analyzer.clone().ok_or(GatewayError::NoAnalyzer)?;
        let response = analyzer
            .list_queries(self.request(ListQueriesRequest {}))
            .await
            .map_err(GatewayError::Analyzer)?;
        let mut queries = response.into_inner().queries;
        queries.retain(|q| caller.may(Action::ReadResults, Resource::Query(&q.name)));
        Ok(queries)
    }

    /// Creates a query in SQL through the analyzer (the caller's `manage` grant is checked
    /// by the HTTP API before).
    pub(crate) async fn create_query(
        &self,
        request: CreateQueryRequest,
    ) -> Result<QueryDescription, GatewayError> {
        let mut analyzer = self.analyzer.clone().ok_or(GatewayError::NoAnalyzer)?;
        Ok(analyzer
            .create_query(self.request(request))
            .await
            .map_err(GatewayError::Analyzer)?
            .into_inner())
    }

    /// Drops a created query through the analyzer; the results deleted. This gateway's
    /// cache forgets them at once (others when their streams next skip a sequence).
    pub(crate) async fn drop_query(&self, request: DropQueryRequest) -> Result<u64, GatewayError> {
        let mut analyzer = self.analyzer.clone().ok_or(GatewayError::NoAnalyzer)?;
        let dropped = analyzer.drop_query(self.request(request)).await;
        // Even a failed call may have deleted results before it failed.
        self.hub.clear_cache("query dropped");
        Ok(dropped
            .map_err(GatewayError::Analyzer)?
            .into_inner()
            .results_deleted)
    }

    /// Fails with [`GatewayError::UnknownQuery`] when the analyzer does not run `query` and
    /// the store holds no result of it. When that cannot be told (no analyzer, or none
    /// that answers), the read's empty answer stands.
    async fn check_known(&self, query: &str, caller: &Caller) -> Result<(), GatewayError> {
        let queries = match self.queries(caller).await {
            Ok(queries) => queries,
            Err(error) => {
                tracing::debug!(%error, query, "cannot tell whether the query exists");
                return Ok(());
            }
        };
        if queries.iter().any(|q| q.name == query) || self.store_holds(query).await? {
            return Ok(());
        }
        Err(GatewayError::UnknownQuery {
            query: query.to_owned(),
            known: queries.into_iter().map(|q| q.name).collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_name_the_field() {
        assert!(check_query("q").is_ok());
        let error = check_query("").unwrap_err().to_string();
        assert!(error.starts_with("query name \"\" is invalid"), "{error}");
        let error = check_key(&"k".repeat(2000)).unwrap_err().to_string();
        assert!(error.starts_with("key may have"), "{error}");
    }
}
