//! The `runnel.v1.Gateway` gRPC service.
//!
//! `Watch` serves the shared live stream through a [`Subscription`]. A gRPC stream carries
//! only results, so it cannot mark a gap: a gRPC watcher that falls behind is always ended
//! with `RESOURCE_EXHAUSTED` naming the last sequence it got, and resumes from there with
//! `after_sequence` without losing anything.
//!
//! The generated server would encode every result once per watcher (and clone it first).
//! [`GatewayRoutes`] serves `Watch` itself instead, with a codec that writes the bytes the
//! hub's [`Published`] result encoded once for every watcher; the other methods go to the
//! generated server. tonic gathers the results a watcher has queued into one HTTP/2 DATA
//! write (up to its 32 KiB yield threshold), so a burst leaves in few writes.

use crate::config::SlowClientPolicy;
use crate::live::{Hub, LiveItem, Published, Start, Subscription};
use crate::results::Results;
use bytes::BufMut;
use futures::{Stream, StreamExt};
use runnel_proto::v1::gateway_server::{Gateway, GatewayServer};
use runnel_proto::v1::{
    GetRequest, GetResponse, QueryResult, RangeRequest, RangeResponse, TopKRequest, TopKResponse,
    WatchRequest,
};
use runnel_security::{Action, Resource, authorize};
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tonic::codec::{Codec, EncodeBuf, Encoder};
use tonic::codegen::BoxFuture;
use tonic::server::{NamedService, ServerStreamingService};
use tonic::{Request, Response, Status};

/// The path of `Gateway/Watch`, which [`GatewayRoutes`] serves itself.
const WATCH_PATH: &str = "/runnel.v1.Gateway/Watch";

/// The minimum sequence a read's metadata names (`runnel-min-sequence`), if any.
fn min_sequence<T>(request: &Request<T>) -> Result<Option<u64>, Status> {
    runnel_proto::consistency::min_sequence(request.metadata()).map_err(Status::invalid_argument)
}

/// A live stream of results, as the generated server's `Watch` would serve it.
pub(crate) type Live = Pin<Box<dyn Stream<Item = Result<QueryResult, Status>> + Send>>;

/// A live stream of shared results, as [`GatewayRoutes`] serves `Watch`.
type SharedLive = Pin<Box<dyn Stream<Item = Result<Arc<Published>, Status>> + Send>>;

/// The gateway's gRPC handlers: each one a thin wrapper over [`Results`] or the [`Hub`].
#[derive(Debug)]
pub(crate) struct GatewayService {
    results: Results,
    hub: Arc<Hub>,
}

impl GatewayService {
    pub(crate) fn new(results: Results, hub: Arc<Hub>) -> Self {
        GatewayService { results, hub }
    }

    /// A gRPC watcher's shared results.
    async fn subscribe(&self, request: Request<WatchRequest>) -> Result<SharedLive, Status> {
        let query = Resource::query_or_any(&request.get_ref().query);
        authorize(&request, Action::ReadResults, query)?;
        let request = request.into_inner();
        if !request.query.is_empty() {
            crate::results::check_query(&request.query)?;
        }
        let start = request.after_sequence.map_or(Start::Now, Start::After);
        let subscription = self
            .hub
            .subscribe(&request, start, "grpc")
            .await?
            .with_policy(SlowClientPolicy::Disconnect);
        Ok(results_of(subscription))
    }
}

/// The results of `subscription` until it ends; its end becomes the stream's status.
fn results_of(subscription: Subscription) -> SharedLive {
    Box::pin(futures::stream::unfold(
        Some(subscription),
        |state| async move {
            let mut subscription = state?;
            match subscription.next().await {
                Ok(LiveItem::Result(result)) => Some((Ok(result), Some(subscription))),
                Ok(LiveItem::Gap { after, missed }) => Some((
                    Err(Status::resource_exhausted(format!(
                        "this client fell {missed} results behind; resume after sequence {after}"
                    ))),
                    None,
                )),
                Err(status) => Some((Err(status), None)),
            }
        },
    ))
}

#[tonic::async_trait]
impl Gateway for GatewayService {
    async fn get(&self, request: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        authorize(
            &request,
            Action::ReadResults,
            Resource::Query(&request.get_ref().query),
        )?;
        let caller = runnel_security::caller(&request)?.clone();
        let min_sequence = min_sequence(&request)?;
        let found = self
            .results
            .get(request.into_inner(), min_sequence, &caller)
            .await?;
        Ok(Response::new(GetResponse {
            result: found.map(|found| QueryResult::clone(&found)),
        }))
    }

    async fn range(
        &self,
        request: Request<RangeRequest>,
    ) -> Result<Response<RangeResponse>, Status> {
        authorize(
            &request,
            Action::ReadResults,
            Resource::Query(&request.get_ref().query),
        )?;
        let caller = runnel_security::caller(&request)?.clone();
        let min_sequence = min_sequence(&request)?;
        let results = self
            .results
            .range(request.into_inner(), min_sequence, &caller)
            .await?;
        Ok(Response::new(RangeResponse { results }))
    }

    type WatchStream = Live;

    /// The generated server's `Watch`, which encodes each result per watcher; the gateway
    /// serves `Watch` through [`GatewayRoutes`] instead, and this only where the generated
    /// server is mounted on its own.
    async fn watch(&self, request: Request<WatchRequest>) -> Result<Response<Live>, Status> {
        let shared = self.subscribe(request).await?;
        Ok(Response::new(Box::pin(shared.map(|item| {
            item.map(|result| QueryResult::clone(&result))
        }))))
    }

    async fn top_k(&self, request: Request<TopKRequest>) -> Result<Response<TopKResponse>, Status> {
        authorize(
            &request,
            Action::ReadResults,
            Resource::Query(&request.get_ref().query),
        )?;
        let caller = runnel_security::caller(&request)?.clone();
        let min_sequence = min_sequence(&request)?;
        Ok(Response::new(
            self.results
                .top_k(request.into_inner(), min_sequence, &caller)
                .await?,
        ))
    }
}

/// Writes a shared result's encoding as it is: encoded once, copied into each watcher's
/// stream.
#[derive(Debug, Clone, Copy, Default)]
struct SharedResults;

/// The encoder of [`SharedResults`].
#[derive(Debug, Clone, Copy, Default)]
struct SharedEncoder;

impl Encoder for SharedEncoder {
    type Item = Arc<Published>;
    type Error = Status;

    fn encode(&mut self, item: Arc<Published>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(item.encoded());
        Ok(())
    }
}

impl Codec for SharedResults {
    type Encode = Arc<Published>;
    type Decode = WatchRequest;
    type Encoder = SharedEncoder;
    type Decoder = tonic_prost::ProstDecoder<WatchRequest>;

    fn encoder(&mut self) -> SharedEncoder {
        SharedEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        tonic_prost::ProstDecoder::default()
    }
}

/// `Watch` as a server-streaming method over [`SharedResults`].
struct SharedWatch(Arc<GatewayService>);

impl ServerStreamingService<WatchRequest> for SharedWatch {
    type Response = Arc<Published>;
    type ResponseStream = SharedLive;
    type Future = BoxFuture<Response<SharedLive>, Status>;

    fn call(&mut self, request: Request<WatchRequest>) -> Self::Future {
        let service = Arc::clone(&self.0);
        Box::pin(async move { service.subscribe(request).await.map(Response::new) })
    }
}

/// The gateway's gRPC service: the generated server for `Get`, `Range` and `TopK`, and
/// `Watch` with one encoding per result shared by every watcher.
#[derive(Debug, Clone)]
pub(crate) struct GatewayRoutes {
    generated: GatewayServer<GatewayService>,
    service: Arc<GatewayService>,
    max_decoding_message_size: Option<usize>,
    max_encoding_message_size: Option<usize>,
}

impl GatewayRoutes {
    pub(crate) fn new(service: GatewayService) -> GatewayRoutes {
        let service = Arc::new(service);
        GatewayRoutes {
            generated: GatewayServer::from_arc(Arc::clone(&service)),
            service,
            max_decoding_message_size: None,
            max_encoding_message_size: None,
        }
    }

    /// The largest request accepted, as on the generated server.
    #[must_use]
    pub(crate) fn max_decoding_message_size(mut self, limit: usize) -> Self {
        self.generated = self.generated.max_decoding_message_size(limit);
        self.max_decoding_message_size = Some(limit);
        self
    }

    /// The largest response sent, as on the generated server.
    #[must_use]
    pub(crate) fn max_encoding_message_size(mut self, limit: usize) -> Self {
        self.generated = self.generated.max_encoding_message_size(limit);
        self.max_encoding_message_size = Some(limit);
        self
    }
}

impl NamedService for GatewayRoutes {
    const NAME: &'static str = <GatewayServer<GatewayService> as NamedService>::NAME;
}

impl tower::Service<http::Request<tonic::body::Body>> for GatewayRoutes {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        if request.uri().path() != WATCH_PATH {
            return self.generated.call(request);
        }
        let method = SharedWatch(Arc::clone(&self.service));
        let mut grpc = tonic::server::Grpc::new(SharedResults).apply_max_message_size_config(
            self.max_decoding_message_size,
            self.max_encoding_message_size,
        );
        Box::pin(async move { Ok(grpc.server_streaming(method, request).await) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;
    use runnel_proto::Millis;

    #[test]
    fn every_watcher_sends_the_one_encoding_of_a_result() {
        let result = QueryResult {
            query: "q".into(),
            key: "k".into(),
            window_start: Some(Millis(1_000).into()),
            values: [("count".to_owned(), 3.0)].into(),
            sequence: 7,
            ..Default::default()
        };
        let shared = Arc::new(Published::new(result.clone()));
        let first = shared.encoded().clone();
        let second = shared.encoded().clone();
        assert_eq!(first.as_ptr(), second.as_ptr(), "encoded once, shared");
        assert_eq!(QueryResult::decode(first).unwrap(), result);
    }
}
