//! The `runnel.v1.Analyzer` gRPC service: what each query is and how far this instance
//! has got with the partitions it owns, and queries created and dropped at run time.

use crate::error::AnalyzerError;
use crate::queries::{Queries, created_plan};
use crate::registry::{Change, Created, Registry};
use crate::runner::StageStatus;
use runnel_proto::Millis;
use runnel_proto::v1::analyzer_server::Analyzer;
use runnel_proto::v1::store_client::StoreClient;
use runnel_proto::v1::{
    CreateQueryRequest, DeleteQueryRequest, DescribeQueryRequest, DropQueryRequest,
    DropQueryResponse, ListQueriesRequest, ListQueriesResponse, QueryDescription, StartFrom,
};
use runnel_security::{Action, Caller, Peer, Resource};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tonic::{Request, Response, Status};

/// One query as the service sees it: its definition and its stages' latest status
/// (the source stage first; a re-keyed query also has its keyed stage).
#[derive(Debug, Clone)]
pub(crate) struct QueryView {
    pub(crate) name: String,
    pub(crate) topic: String,
    pub(crate) definition: String,
    /// The SQL it was given in, if it was.
    pub(crate) sql: Option<String>,
    /// A created query's start; `None` for a configured one.
    pub(crate) start_from: Option<StartFrom>,
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
            sql: self.sql.clone().unwrap_or_default(),
            created: self.start_from.is_some(),
            start_from: self.start_from.unwrap_or(StartFrom::Earliest) as i32,
        }
    }
}

/// The analyzer's gRPC handlers.
#[derive(Debug)]
pub(crate) struct AnalyzerService {
    queries: Arc<Queries>,
    registry: Arc<Registry>,
    store: StoreClient<Peer>,
    /// How long a created or dropped query may take to start or stop here.
    patience: Duration,
}

impl AnalyzerService {
    pub(crate) fn new(
        queries: Arc<Queries>,
        registry: Arc<Registry>,
        store: StoreClient<Peer>,
        patience: Duration,
    ) -> Self {
        AnalyzerService {
            queries,
            registry,
            store,
            patience,
        }
    }

    async fn create(&self, request: CreateQueryRequest) -> Result<QueryDescription, AnalyzerError> {
        let name = request.name;
        runnel_proto::names::validate_query_name(&name)
            .map_err(|e| AnalyzerError::InvalidArgument(e.to_string()))?;
        if self.queries.is_configured(&name) {
            return Err(AnalyzerError::QueryExists(name));
        }
        let start_from = StartFrom::try_from(request.start_from).map_err(|_| {
            AnalyzerError::InvalidArgument(format!("start_from {} is unknown", request.start_from))
        })?;
        let table = crate::sql::compile(&name, &request.sql)
            .map_err(|e| AnalyzerError::InvalidArgument(e.to_string()))?;
        let mut created = Created {
            name: name.clone(),
            sql: request.sql,
            start_from,
            start_offsets: Default::default(),
            created_at: runnel_proto::json::rfc3339(runnel_proto::now_millis()),
            incarnation: 0,
        };
        created_plan(&created)?;
        if self.registry.queries().await?.contains_key(&name) {
            return Err(AnalyzerError::QueryExists(name));
        }
        if start_from == StartFrom::Latest {
            created.start_offsets = self.registry.ends_of(&table.topic).await?;
        }
        let (offset, snapshot) = self.registry.write(&Change::Created(created)).await?;
        if snapshot.queries.get(&name).map(|c| c.incarnation) != Some(offset) {
            // Created at the same moment through another replica, which came first.
            return Err(AnalyzerError::QueryExists(name));
        }
        if !self
            .queries
            .settled(&name, Some(offset), self.patience)
            .await
        {
            return Err(AnalyzerError::Unavailable(format!(
                "query {name:?} is created, but this analyzer has not started it within {:?}; describe it again shortly",
                self.patience
            )));
        }
        self.queries
            .view(&name)
            .map(|view| view.describe())
            .ok_or(AnalyzerError::QueryNotFound(name))
    }

    async fn drop_query(
        &self,
        request: DropQueryRequest,
    ) -> Result<DropQueryResponse, AnalyzerError> {
        let name = request.name;
        if self.queries.is_configured(&name) {
            return Err(AnalyzerError::Configured(name));
        }
        if !self.registry.queries().await?.contains_key(&name) {
            return Err(AnalyzerError::QueryNotFound(name));
        }
        self.registry.write(&Change::Dropped(name.clone())).await?;
        if !self.queries.settled(&name, None, self.patience).await {
            return Err(AnalyzerError::Unavailable(format!(
                "query {name:?} is dropped, but this analyzer has not stopped it within {:?}",
                self.patience
            )));
        }
        let mut results_deleted = 0;
        if request.delete_results {
            // After the stop: nothing of this query is written to the store any more.
            results_deleted = self
                .store
                .clone()
                .delete_query(DeleteQueryRequest { query: name })
                .await
                .map_err(AnalyzerError::Store)?
                .into_inner()
                .deleted;
        }
        Ok(DropQueryResponse { results_deleted })
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
                .views()
                .iter()
                .filter(|v| visible(caller, &v.name))
                .map(|v| v.describe())
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
            .view(&name)
            .ok_or(AnalyzerError::QueryNotFound(name))?;
        Ok(Response::new(view.describe()))
    }

    async fn create_query(
        &self,
        request: Request<CreateQueryRequest>,
    ) -> Result<Response<QueryDescription>, Status> {
        runnel_security::authorize(
            &request,
            Action::Manage,
            Resource::Query(&request.get_ref().name),
        )?;
        Ok(Response::new(self.create(request.into_inner()).await?))
    }

    async fn drop_query(
        &self,
        request: Request<DropQueryRequest>,
    ) -> Result<Response<DropQueryResponse>, Status> {
        runnel_security::authorize(
            &request,
            Action::Manage,
            Resource::Query(&request.get_ref().name),
        )?;
        Ok(Response::new(self.drop_query(request.into_inner()).await?))
    }
}
