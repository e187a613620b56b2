//! `runnel query`: continuous queries created, listed, described and dropped at run time
//! through the analyzer's API (`CreateQuery`, `ListQueries`, `DescribeQuery`, `DropQuery`).

use crate::client::ClientArgs;
use anyhow::Result;
use runnel_proto::v1::analyzer_client::AnalyzerClient;
use runnel_proto::v1::{
    CreateQueryRequest, DescribeQueryRequest, DropQueryRequest, ListQueriesRequest,
    QueryDescription, StartFrom,
};
use std::process::ExitCode;

const DEFAULT_ANALYZER: &str = "http://127.0.0.1:7103";

/// `runnel query …`.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum QueryCommand {
    /// Add a query in SQL while the pipeline runs (durable; every analyzer replica runs it).
    Create {
        /// Its name, which its results carry.
        name: String,
        /// One SELECT … GROUP BY <key>, TUMBLE | HOP | SESSION (…); see docs/queries.md.
        sql: String,
        /// Read the topic from its earliest record kept, or only what comes after now.
        #[arg(long, value_enum, default_value = "latest")]
        start: Start,
        #[command(flatten)]
        at: AnalyzerArgs,
    },
    /// List every query: name, topic, created or configured, and progress.
    List {
        #[command(flatten)]
        at: AnalyzerArgs,
    },
    /// Describe one query: its definition in words, its SQL, its progress (JSON).
    Describe {
        name: String,
        #[command(flatten)]
        at: AnalyzerArgs,
    },
    /// Stop and forget a created query.
    Drop {
        name: String,
        /// Delete its results from the store too (else they stay readable).
        #[arg(long)]
        delete_results: bool,
        #[command(flatten)]
        at: AnalyzerArgs,
    },
}

/// Where a created query starts reading.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub(crate) enum Start {
    /// From the earliest record the topic keeps.
    Earliest,
    /// From the records written after the query is created.
    Latest,
}

/// The analyzer to ask, and how.
#[derive(Debug, clap::Args)]
pub(crate) struct AnalyzerArgs {
    /// The analyzer's gRPC URL.
    #[arg(long, env = "RUNNEL_ANALYZER_URL", default_value = DEFAULT_ANALYZER)]
    analyzer: String,
    #[command(flatten)]
    client: ClientArgs,
}

impl AnalyzerArgs {
    async fn connect(&self) -> Result<AnalyzerClient<runnel_security::Peer>> {
        Ok(AnalyzerClient::new(
            self.client.connect(&self.analyzer, "analyzer").await?,
        ))
    }
}

fn status(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", s.code(), s.message())
}

/// A query as one JSON line.
fn json(q: &QueryDescription) -> serde_json::Value {
    serde_json::json!({
        "name": q.name,
        "topic": q.source_topic,
        "created": q.created,
        "sql": (!q.sql.is_empty()).then_some(&q.sql),
        "definition": q.definition,
        "events_processed": q.events_processed,
        "results_emitted": q.results_emitted,
        "late_events": q.late_events,
        "open_windows": q.open_windows,
        "partitions": q.partitions,
    })
}

pub(crate) async fn run(command: QueryCommand) -> Result<ExitCode> {
    match command {
        QueryCommand::Create {
            name,
            sql,
            start,
            at,
        } => {
            let start_from = match start {
                Start::Earliest => StartFrom::Earliest,
                Start::Latest => StartFrom::Latest,
            };
            let created = at
                .connect()
                .await?
                .create_query(CreateQueryRequest {
                    name,
                    sql,
                    start_from: start_from as i32,
                })
                .await
                .map_err(status)?
                .into_inner();
            println!("{}", json(&created));
        }
        QueryCommand::List { at } => {
            let listed = at
                .connect()
                .await?
                .list_queries(ListQueriesRequest {})
                .await
                .map_err(status)?
                .into_inner();
            for query in &listed.queries {
                println!("{}", json(query));
            }
        }
        QueryCommand::Describe { name, at } => {
            let described = at
                .connect()
                .await?
                .describe_query(DescribeQueryRequest { name })
                .await
                .map_err(status)?
                .into_inner();
            println!("{}", json(&described));
        }
        QueryCommand::Drop {
            name,
            delete_results,
            at,
        } => {
            let dropped = at
                .connect()
                .await?
                .drop_query(DropQueryRequest {
                    name: name.clone(),
                    delete_results,
                })
                .await
                .map_err(status)?
                .into_inner();
            eprintln!(
                "dropped query {name:?}; {}",
                if delete_results {
                    format!("{} results deleted", dropped.results_deleted)
                } else {
                    "its results stay readable".to_owned()
                }
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
