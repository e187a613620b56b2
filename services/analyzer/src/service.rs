//! The `runnel.v1.Analyzer` gRPC service: what each query is and how far this instance
//! has got with the partitions it owns.

use crate::error::AnalyzerError;
use crate::runner::StageStatus;
use runnel_proto::Millis;
use runnel_proto::v1::analyzer_server::Analyzer;
use runnel_proto::v1::{
    DescribeQueryRequest, ListQueriesRequest, ListQueriesResponse, QueryDescription,
};
use runnel_security::{Action, Caller, Resource};
use tokio::sync::watch;
use tonic::{Request, Response, Status};

/// One query as the service sees it: its definition and its stages' latest status
/// (the source stage first; a re-keyed query also has its keyed stage).
#[derive(Debug)]
pub(crate) struct QueryView {
    pub(crate) name: String,
    pub(crate) topic: String,
    pub(crate) definition: String,
    pub(crate) source: watch::Receiver<StageStatus>,
    pub(crate) keyed: Option<watch::Receiver<StageStatus>>,
}

impl QueryView {
    fn describe(&self) -> QueryDescription {
        let source = self.source.borrow().clone();
        // Windows live in the keyed stage of a re-keyed query, in the source stage else.
        let windows = match &self.keyed {
            Some(keyed) => keyed.borrow().clone(),
            None => source.clone(),
        };
        QueryDescription {
            name: self.name.clone(),
            source_topic: self.topic.clone(),
            definition: self.definition.clone(),
            watermark: windows.watermark.map(|w| Millis(w).into()),
            events_processed: source.counters.processed,
            results_emitted: windows.emitted,
            late_events: source.counters.late
                + self.keyed.as_ref().map_or(0, |k| k.borrow().counters.late),
            open_windows: windows.open_windows as u64,
            partitions: source.partitions,
            events_filtered: source.counters.filtered,
            events_without_key: source.counters.no_key,
            events_malformed: source.counters.malformed,
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
                .filter(|v| visible(caller, &v.name))
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
            .find(|v| v.name == name)
            .ok_or(AnalyzerError::QueryNotFound(name))?;
        Ok(Response::new(view.describe()))
    }
}
