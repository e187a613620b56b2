//! `runnel get` and `runnel watch`: reading results through the gateway.

use crate::client::ClientArgs;
use anyhow::Result;
use runnel_proto::json::result_json;
use runnel_proto::v1::gateway_client::GatewayClient;
use runnel_proto::v1::{GetRequest, WatchRequest};
use std::process::ExitCode;

const DEFAULT_GATEWAY: &str = "http://127.0.0.1:7105";

/// Arguments of `runnel get`.
#[derive(Debug, clap::Args)]
pub(crate) struct GetArgs {
    /// The continuous query, e.g. avg_value_per_key.
    query: String,
    /// The key, e.g. sensor-1.
    key: String,
    /// The gateway's gRPC URL.
    #[arg(long, env = "RUNNEL_GATEWAY_URL", default_value = DEFAULT_GATEWAY)]
    gateway: String,
    #[command(flatten)]
    client: ClientArgs,
}

/// Arguments of `runnel watch`.
#[derive(Debug, clap::Args)]
pub(crate) struct WatchArgs {
    /// Only results of this query.
    #[arg(long, default_value = "")]
    query: String,
    /// Only results whose key starts with this prefix.
    #[arg(long, default_value = "")]
    key_prefix: String,
    /// Stop after this many results.
    #[arg(long)]
    limit: Option<u64>,
    /// The gateway's gRPC URL.
    #[arg(long, env = "RUNNEL_GATEWAY_URL", default_value = DEFAULT_GATEWAY)]
    gateway: String,
    #[command(flatten)]
    client: ClientArgs,
}

async fn connect(url: &str, client: &ClientArgs) -> Result<GatewayClient<runnel_security::Peer>> {
    Ok(GatewayClient::new(client.connect(url, "gateway").await?))
}

pub(crate) async fn get(args: GetArgs) -> Result<ExitCode> {
    let mut gateway = connect(&args.gateway, &args.client).await?;
    let response = gateway
        .get(GetRequest {
            query: args.query.clone(),
            key: args.key.clone(),
        })
        .await
        .map_err(|s| anyhow::anyhow!("{}: {}", s.code(), s.message()))?
        .into_inner();
    match response.result {
        Some(result) => {
            println!("{}", result_json(&result));
            Ok(ExitCode::SUCCESS)
        }
        None => {
            eprintln!(
                "no result yet for query {:?} and key {:?}",
                args.query, args.key
            );
            Ok(ExitCode::from(3))
        }
    }
}

pub(crate) async fn watch(args: WatchArgs) -> Result<ExitCode> {
    let mut gateway = connect(&args.gateway, &args.client).await?;
    let mut stream = gateway
        .watch(WatchRequest {
            query: args.query,
            key_prefix: args.key_prefix,
            ..Default::default()
        })
        .await
        .map_err(|s| anyhow::anyhow!("{}: {}", s.code(), s.message()))?
        .into_inner();
    let mut stop = std::pin::pin!(runnel_server::shutdown_signal());
    let mut seen = 0u64;
    loop {
        tokio::select! {
            message = stream.message() => match message {
                Ok(Some(result)) => {
                    println!("{}", result_json(&result));
                    seen += 1;
                    if args.limit.is_some_and(|limit| seen >= limit) {
                        break;
                    }
                }
                Ok(None) => {
                    eprintln!("the gateway ended the stream after {seen} results");
                    break;
                }
                Err(status) => anyhow::bail!("watch failed after {seen} results: {}: {}", status.code(), status.message()),
            },
            () = &mut stop => {
                eprintln!("stopped after {seen} results");
                break;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
