//! One event's trace crosses all five services.

use crate::{ANALYZER_TOML, T0, clock_events, event};
use runnel_e2e::Pipeline;
use runnel_e2e::otlp::{OtlpReceiver, check_trace_hops, trace_is_complete};
use runnel_proto::v1::collector_client::CollectorClient;
use runnel_proto::v1::gateway_client::GatewayClient;
use runnel_proto::v1::{IngestRequest, WatchRequest};
use std::collections::BTreeMap;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_event_yields_spans_from_all_five_services_under_one_trace() {
    let receiver = OtlpReceiver::start().await.expect("otlp receiver");
    let env = BTreeMap::from([
        (
            "OTEL_EXPORTER_OTLP_ENDPOINT".to_owned(),
            format!("http://{}", receiver.addr),
        ),
        ("OTEL_BSP_SCHEDULE_DELAY".to_owned(), "100".to_owned()),
    ]);
    let pipeline = Pipeline::start(ANALYZER_TOML, env)
        .await
        .expect("pipeline starts");

    // Watch through the gateway first, so the result is delivered (and traced) live.
    let mut gateway = GatewayClient::connect(pipeline.gateway.url())
        .await
        .expect("gateway");
    let mut watch = gateway
        .watch(WatchRequest {
            query: "avg_value_per_key".into(),
            key_prefix: "traced".into(),
            ..Default::default()
        })
        .await
        .expect("watch")
        .into_inner();

    let mut collector = CollectorClient::connect(pipeline.collector.url())
        .await
        .expect("collector");
    collector
        .ingest(IngestRequest {
            events: vec![event("traced-1", "traced", T0 + 1000, Some(42.0))],
            ..Default::default()
        })
        .await
        .expect("ingest");
    // Later events on every partition close the window; they have a trace of their own.
    collector
        .ingest(IngestRequest {
            events: clock_events("traced-close", T0 + 100_000),
            ..Default::default()
        })
        .await
        .expect("ingest");

    let result = tokio::time::timeout(Duration::from_secs(60), watch.message())
        .await
        .unwrap_or_else(|_| panic!("no result delivered\n{}", pipeline.logs()))
        .expect("watch stream")
        .expect("a result");
    assert_eq!(result.values["count"], 1.0);
    let traceparent = result
        .headers
        .get("traceparent")
        .expect("result carries its trace");
    let trace_id = traceparent
        .split('-')
        .nth(1)
        .expect("w3c traceparent")
        .to_owned();

    // Spans arrive as each service's exporter flushes; re-check after every export.
    let complete = receiver
        .wait_for_trace(&trace_id, Duration::from_secs(30), |spans| {
            trace_is_complete(spans).then(|| spans.to_vec())
        })
        .await;
    let Some(spans) = complete else {
        panic!(
            "trace {trace_id} incomplete: {:#?}\n{}",
            receiver.trace(&trace_id),
            pipeline.logs()
        );
    };
    if let Err(problem) = check_trace_hops(&spans) {
        panic!("trace {trace_id}: {problem}");
    }
}
