//! `runnel up`: all five services in one process, on loopback, with local files.
//!
//! Each service runs exactly as its own binary would — same `run()` function, same
//! configuration layering (`runnel.toml` or `--config`, then `RUNNEL_<SERVICE>__…`) — only
//! the sockets are bound here and the services are wired to each other's real addresses,
//! so port 0 works too. One Ctrl-C (or SIGTERM) drains and stops all of them.

use crate::client::ClientArgs;
use crate::demo;
use anyhow::{Context, Result};
use runnel_analyzer::AnalyzerConfig;
use runnel_broker::BrokerConfig;
use runnel_collector::CollectorConfig;
use runnel_gateway::GatewayConfig;
use runnel_server::config::load;
use runnel_server::{Listeners, ServiceConfig};
use runnel_store::StoreConfig;
use runnel_telemetry::LogFormat;
use runnel_testkit::services::{Ended, Services};
use std::path::PathBuf;
use std::process::ExitCode;

/// Arguments of `runnel up`.
#[derive(Debug, clap::Args)]
pub(crate) struct UpArgs {
    /// Where the collector, broker, analyzer and store keep their files (one directory each).
    #[arg(long, default_value = "runnel-data")]
    data_dir: PathBuf,
    /// A TOML file with `[collector]`, `[broker]`, … tables (default: ./runnel.toml if present).
    #[arg(long, env = "RUNNEL_CONFIG")]
    config: Option<PathBuf>,
    /// Feed a built-in demo workload (five sensors) and print the results as they arrive.
    #[arg(long)]
    demo: bool,
    /// Log as JSON lines.
    #[arg(long)]
    log_json: bool,
    /// How the demo calls the pipeline, when it has TLS or authentication.
    #[command(flatten)]
    client: ClientArgs,
}

/// The five services' configurations, wired together.
struct Pipeline {
    collector: CollectorConfig,
    broker: BrokerConfig,
    analyzer: AnalyzerConfig,
    store: StoreConfig,
    gateway: GatewayConfig,
}

pub(crate) async fn run(args: UpArgs) -> Result<ExitCode> {
    let file = args.config.as_deref();
    let mut pipeline = Pipeline {
        collector: load(file)?,
        broker: load(file)?,
        analyzer: load(file)?,
        store: load(file)?,
        gateway: load(file)?,
    };
    pipeline.collector.data_dir = args.data_dir.join("collector");
    pipeline.broker.data_dir = args.data_dir.join("broker");
    pipeline.store.data_dir = args.data_dir.join("store");
    if args.demo {
        demo::add_query(&mut pipeline.analyzer);
    }

    let format = if args.log_json {
        LogFormat::Json
    } else {
        LogFormat::Human
    };
    let telemetry = runnel_telemetry::init("runnel", format)?;

    let bind = |addrs| async move { Listeners::bind(addrs).await.context("binding") };
    let collector_listeners = bind(pipeline.collector.listen()).await?;
    let broker_listeners = bind(pipeline.broker.listen()).await?;
    let analyzer_listeners = bind(pipeline.analyzer.listen()).await?;
    let store_listeners = bind(pipeline.store.listen()).await?;
    let gateway_listeners = bind(pipeline.gateway.listen()).await?;

    // https:// for a service whose listeners have TLS; its callers verify it with their
    // `server.connect` settings.
    let url = |l: &Listeners, tls: bool| -> Result<String> {
        let scheme = if tls { "https" } else { "http" };
        Ok(format!("{scheme}://{}", l.grpc.local_addr()?))
    };
    let broker_tls = pipeline.broker.server.tls.is_some();
    let store_tls = pipeline.store.server.tls.is_some();
    pipeline.collector.broker = url(&broker_listeners, broker_tls)?;
    pipeline.analyzer.broker = url(&broker_listeners, broker_tls)?;
    pipeline.analyzer.store = url(&store_listeners, store_tls)?;
    // The store keeps its results as a log in the broker, as every store replica does.
    pipeline.store.broker = url(&broker_listeners, broker_tls)?;
    pipeline.gateway.store = url(&store_listeners, store_tls)?;
    pipeline.gateway.broker = url(&broker_listeners, broker_tls)?;
    pipeline.collector.store = url(&store_listeners, store_tls)?;
    // The dashboard's health table shows every service of the pipeline.
    for (name, listeners, tls) in [
        (
            "collector",
            &collector_listeners,
            pipeline.collector.server.tls.is_some(),
        ),
        ("broker", &broker_listeners, broker_tls),
        (
            "analyzer",
            &analyzer_listeners,
            pipeline.analyzer.server.tls.is_some(),
        ),
    ] {
        pipeline
            .gateway
            .pipeline
            .insert(name.into(), url(listeners, tls)?);
    }

    let rows = [
        ("collector", &collector_listeners),
        ("broker", &broker_listeners),
        ("analyzer", &analyzer_listeners),
        ("store", &store_listeners),
        ("gateway", &gateway_listeners),
    ];
    eprintln!(
        "runnel is up: five services in one process, data in {}",
        args.data_dir.display()
    );
    for (name, listeners) in rows {
        let addrs = listeners.local_addrs()?;
        let http = addrs
            .http
            .map(|a| format!("   http http://{a}/v1/  dashboard http://{a}/dashboard/"))
            .unwrap_or_default();
        eprintln!(
            "  {name:<9}  grpc {:<15}  metrics http://{}/metrics{http}",
            addrs.grpc, addrs.admin
        );
    }
    let collector_url = url(
        &collector_listeners,
        pipeline.collector.server.tls.is_some(),
    )?;
    let gateway_url = url(&gateway_listeners, pipeline.gateway.server.tls.is_some())?;

    let mut services = Services::new();
    services.start(
        "collector",
        runnel_collector::run,
        pipeline.collector,
        collector_listeners,
    )?;
    services.start(
        "broker",
        runnel_broker::run,
        pipeline.broker,
        broker_listeners,
    )?;
    services.start(
        "analyzer",
        runnel_analyzer::run,
        pipeline.analyzer,
        analyzer_listeners,
    )?;
    services.start("store", runnel_store::run, pipeline.store, store_listeners)?;
    services.start(
        "gateway",
        runnel_gateway::run,
        pipeline.gateway,
        gateway_listeners,
    )?;

    let demo_task = args.demo.then(|| {
        tokio::spawn(demo::run(
            collector_url.clone(),
            gateway_url.clone(),
            args.client.clone(),
            services.shutdown(),
        ))
    });
    if !args.demo {
        eprintln!(
            "try:  echo '{{\"key\":\"sensor-1\",\"payload\":{{\"value\":21.5}}}}' | runnel send"
        );
        eprintln!("      runnel watch");
    }
    let stop = runnel_server::shutdown_signal();
    eprintln!("Ctrl-C stops.");

    let mut failed = false;
    tokio::select! {
        () = stop => {}
        Some(ended) = services.next_ended() => {
            failed = report(&ended);
        }
    }
    services.trigger();
    while let Some(ended) = services.next_ended().await {
        failed |= report(&ended);
    }
    if let Some(task) = demo_task
        && let Ok(summary) = task.await
    {
        eprintln!("{summary}");
    }
    telemetry.shutdown();
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// Reports how a service ended; true if it failed.
fn report(ended: &Ended) -> bool {
    match ended {
        Ended::Stopped(name) => {
            tracing::info!(service = name, "stopped");
            false
        }
        Ended::Failed(name, error) => {
            eprintln!("runnel: {name} failed: {error}");
            true
        }
        Ended::Panicked(_, error) => {
            eprintln!("runnel: a service panicked: {error}");
            true
        }
    }
}
