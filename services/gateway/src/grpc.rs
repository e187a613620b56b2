//! The `runnel.v1.Gateway` gRPC service.

use crate::results::{Live, Results};
use runnel_proto::v1::gateway_server::Gateway;
use runnel_proto::v1::{GetRequest, GetResponse, RangeRequest, RangeResponse, WatchRequest};
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
        let result = self.results.get(request.into_inner()).await?;
        Ok(Response::new(GetResponse { result }))
    }

    async fn range(
        &self,
        request: Request<RangeRequest>,
    ) -> Result<Response<RangeResponse>, Status> {
        let results = self.results.range(request.into_inner()).await?;
        Ok(Response::new(RangeResponse { results }))
    }

    type WatchStream = Live;

    async fn watch(&self, request: Request<WatchRequest>) -> Result<Response<Live>, Status> {
        Ok(Response::new(
            self.results.watch(request.into_inner()).await?,
        ))
    }
}
