//! The `runnel.v1.Gateway` gRPC service.

use crate::results::{Live, Results};
use runnel_proto::v1::gateway_server::Gateway;
use runnel_proto::v1::{GetRequest, GetResponse, RangeRequest, RangeResponse, WatchRequest};
use runnel_security::{Action, Resource, authorize};
use tonic::{Request, Response, Status};

/// The gateway's gRPC handlers: each one a thin wrapper over [`Results`].
#[derive(Debug)]
pub(crate) struct GatewayService {
    results: Results,
}

impl GatewayService {
    pub(crate) fn new(results: Results) -> Self {
        GatewayService { results }
    }
}

#[tonic::async_trait]
impl Gateway for GatewayService {
    async fn get(&self, request: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        authorize(
            &request,
            Action::ReadResults,
            Resource::Query(&request.get_ref().query),
        )?;
        let result = self.results.get(request.into_inner()).await?;
        Ok(Response::new(GetResponse { result }))
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
        let results = self.results.range(request.into_inner()).await?;
        Ok(Response::new(RangeResponse { results }))
    }

    type WatchStream = Live;

    async fn watch(&self, request: Request<WatchRequest>) -> Result<Response<Live>, Status> {
        let query = Resource::query_or_any(&request.get_ref().query);
        authorize(&request, Action::ReadResults, query)?;
        Ok(Response::new(
            self.results.watch(request.into_inner()).await?,
        ))
    }
}
