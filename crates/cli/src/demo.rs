//! The built-in demo workload for `runnel up --demo`: five sensors reporting a reading
//! every 100 ms, and the results of a 10-second average printed as windows close.

use crate::client::ClientArgs;
use runnel_analyzer::{AnalyzerConfig, QueryConfig, WindowConfig};
use runnel_proto::json::result_json;
use runnel_proto::v1::collector_client::CollectorClient;
use runnel_proto::v1::gateway_client::GatewayClient;
use runnel_proto::v1::{Event, IngestRequest, WatchRequest};
use runnel_server::Shutdown;
use std::time::Duration;

/// The demo's query: the default query's shape, with windows short enough to watch.
pub(crate) const DEMO_QUERY: &str = "demo_avg_per_sensor";
const DEMO_TYPE: &str = "demo-reading";
const SENSORS: u64 = 5;

/// Adds the demo query to the analyzer.
pub(crate) fn add_query(analyzer: &mut AnalyzerConfig) {
    analyzer.queries.push(QueryConfig {
        name: DEMO_QUERY.into(),
        event_type: Some(DEMO_TYPE.into()),
        window: WindowConfig::Tumbling {
            size: Duration::from_secs(10),
        },
        out_of_orderness: Duration::from_secs(1),
        // Five sensors may not cover every partition; the others must not hold results back.
        idle_timeout: Duration::from_secs(2),
        ..QueryConfig::default()
    });
}

/// A deterministic, wavy reading for `sensor` at tick `tick`.
fn reading(sensor: u64, tick: u64) -> f64 {
    let phase = (tick as f64 / 50.0) + sensor as f64;
    20.0 + sensor as f64 + 3.0 * phase.sin()
}

/// Sends readings and prints results until shutdown; returns a one-line summary.
///
/// It calls as `client` says (`runnel up`'s `--ca`, `--cert`, `--key`, `--token`), so a
/// pipeline with TLS and authentication runs the demo too.
pub(crate) async fn run(
    collector_url: String,
    gateway_url: String,
    client: ClientArgs,
    shutdown: Shutdown,
) -> String {
    let channel = match client.connect_lazy(&collector_url) {
        Ok(channel) => channel,
        Err(error) => return format!("demo: not started: collector: {error}"),
    };
    let mut collector = CollectorClient::new(channel);
    let printer = tokio::spawn(print_results(gateway_url, client, shutdown.clone()));
    let mut sent = 0u64;
    let mut failures = 0u64;
    let mut ticker = tokio::time::interval(Duration::from_millis(100));
    eprintln!(
        "demo: {SENSORS} sensors send a reading every 100 ms; {DEMO_QUERY} averages them per 10 s window"
    );
    for tick in 0u64.. {
        tokio::select! {
            _ = ticker.tick() => {}
            () = shutdown.wait() => break,
        }
        let now = runnel_proto::now_millis();
        let events: Vec<Event> = (1..=SENSORS)
            .map(|sensor| Event {
                id: format!("demo-{}-{tick}-{sensor}", now.0),
                source: "runnel-demo".into(),
                r#type: DEMO_TYPE.into(),
                key: format!("sensor-{sensor}"),
                event_time: Some(now.into()),
                payload: serde_json::json!({ "value": reading(sensor, tick) })
                    .to_string()
                    .into_bytes()
                    .into(),
                ..Default::default()
            })
            .collect();
        match collector
            .ingest(IngestRequest {
                events,
                ..Default::default()
            })
            .await
        {
            Ok(_) => sent += SENSORS,
            Err(status) => {
                failures += 1;
                if failures == 1 || failures.is_multiple_of(50) {
                    eprintln!(
                        "demo: ingest failed ({failures} so far): {}",
                        status.message()
                    );
                }
            }
        }
    }
    let results = printer.await.unwrap_or(0);
    format!("demo: sent {sent} events, {failures} failed batches, printed {results} results")
}

async fn print_results(gateway_url: String, client: ClientArgs, shutdown: Shutdown) -> u64 {
    let mut printed = 0;
    let channel = match client.connect_lazy(&gateway_url) {
        Ok(channel) => channel,
        Err(error) => {
            eprintln!("demo: cannot watch results: {error:#}");
            return 0;
        }
    };
    let mut gateway = GatewayClient::new(channel);
    let request = WatchRequest {
        query: DEMO_QUERY.into(),
        key_prefix: String::new(),
        ..Default::default()
    };
    let mut stream = match gateway.watch(request).await {
        Ok(response) => response.into_inner(),
        Err(status) => {
            eprintln!("demo: cannot watch results: {}", status.message());
            return 0;
        }
    };
    loop {
        tokio::select! {
            message = stream.message() => match message {
                Ok(Some(result)) => {
                    println!("{}", result_json(&result));
                    printed += 1;
                }
                _ => break,
            },
            () = shutdown.wait() => break,
        }
    }
    printed
}
