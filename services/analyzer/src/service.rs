//! The `runnel.v1.Analyzer` gRPC service: what each query is and how far it has got.

use crate::config::QueryConfig;
use crate::error::AnalyzerError;
use crate::runner::{QueryStatus, definition};
use runnel_proto::Millis;
use runnel_proto::v1::analyzer_server::Analyzer;
use runnel_proto::v1::{
    DescribeQueryRequest, ListQueriesRequest, ListQueriesResponse, QueryDescription,
};
use runnel_security::{Action, Caller, Resource};
use tokio::sync::watch;
use tonic::{Request, Response, Status};

/// One query as the service sees it: its definition and its runner's latest status.
#[derive(Debug)]
pub(crate) struct QueryView {
    pub(crate) query: QueryConfig,
    pub(crate) status: watch::Receiver<QueryStatus>,
}

impl QueryView {
    fn describe(&self) -> QueryDescription {
        let status = self.status.borrow().clone();
        QueryDescription {
            name: self.query.name.clone(),
            source_topic: self.query.topic.clone(),
            definition: definition(&self.query),
            watermark: status.watermark.map(|w| Millis(w).into()),
            events_processed: status.counters.processed,
            results_emitted: status.counters.emitted,
            late_events: status.counters.late,
            open_windows: status.open_windows as u64,
        }
    }
}

/// The analyzer's gRPC handlers.
#[derive(Debug)]
pub(crate) struct AnalyzerService {
    queries: Vec<QueryView>,
}

impl AnalyzerService {
    pub(crate) fn new(queries: Vec<QueryView>) -> Self {
        AnalyzerService { queries }
    }
}

/// Whether `caller` may see the query `name`: read its results or manage it.
fn visible(caller: &Caller, name: &str) -> bool {
    caller.may(Action::ReadResults, Resource::Query(name))
        || caller.may(Action::Manage, Resource::Query(name))
}

#[tonic::async_trait]
impl Analyzer for AnalyzerService {
    async fn list_queries(
        &self,
        request: Request<ListQueriesRequest>,
    ) -> Result<Response<ListQueriesResponse>, Status> {
        // Each caller sees the queries it may read or manage.
        let caller = runnel_security::caller(&request)?;
        Ok(Response::new(ListQueriesResponse {
            queries: self
                .queries
                .iter()
                .filter(|v| visible(caller, &v.query.name))
                .map(QueryView::describe)
                .collect(),
        }))
    }

    async fn describe_query(
        &self,
        request: Request<DescribeQueryRequest>,
    ) -> Result<Response<QueryDescription>, Status> {
        if !visible(runnel_security::caller(&request)?, &request.get_ref().name) {
            runnel_security::authorize(
                &request,
                Action::ReadResults,
                Resource::Query(&request.get_ref().name),
            )?;
        }
        let name = request.into_inner().name;
        let view = self
            .queries
            .iter()
            .find(|v| v.query.name == name)
            .ok_or(AnalyzerError::QueryNotFound(name))?;
        Ok(Response::new(view.describe()))
    }
}
