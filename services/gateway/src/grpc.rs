//! The `runnel.v1.Gateway` gRPC service.
//!
//! `Watch` serves the shared live stream through a [`Subscription`]. A gRPC stream carries
//! only results, so it cannot mark a gap: a gRPC watcher that falls behind is always ended
//! with `RESOURCE_EXHAUSTED` naming the last sequence it got, and resumes from there with
//! `after_sequence` without losing anything.

use crate::config::SlowClientPolicy;
use crate::live::{Hub, LiveItem, Start, Subscription};
use crate::results::Results;
use futures::Stream;
use runnel_proto::v1::gateway_server::Gateway;
use runnel_proto::v1::{
    GetRequest, GetResponse, QueryResult, RangeRequest, RangeResponse, TopKRequest, TopKResponse,
    WatchRequest,
};
use runnel_security::{Action, Resource, authorize};
use std::pin::Pin;
use std::sync::Arc;
use tonic::{Request, Response, Status};

/// The minimum sequence a read's metadata names (`runnel-min-sequence`), if any.
fn min_sequence<T>(request: &Request<T>) -> Result<Option<u64>, Status> {
    runnel_proto::consistency::min_sequence(request.metadata()).map_err(Status::invalid_argument)
}

/// A live stream of results, as the gRPC `Watch` serves it.
pub(crate) type Live = Pin<Box<dyn Stream<Item = Result<QueryResult, Status>> + Send>>;

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
}

/// The results of `subscription` until it ends; its end becomes the stream's status.
fn results_of(subscription: Subscription) -> Live {
    Box::pin(futures::stream::unfold(
        Some(subscription),
        |state| async move {
            let mut subscription = state?;
            match subscription.next().await {
                Ok(LiveItem::Result(result)) => {
                    Some((Ok(QueryResult::clone(&result)), Some(subscription)))
                }
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

    async fn watch(&self, request: Request<WatchRequest>) -> Result<Response<Live>, Status> {
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
        Ok(Response::new(results_of(subscription)))
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
