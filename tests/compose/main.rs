//! The compose end-to-end test: `docker-compose.yml` as a user runs it, scaled as
//! `up --scale analyzer=3 --scale store=2 --scale gateway=2`, on images built offline
//! (`cargo xtask images`), with faults.
//!
//! Under ingest load through the collector's published port, the broker's container is
//! killed (SIGKILL) and started again, one analyzer replica is cut off the network and put
//! back, another is frozen (`docker pause`) past its session timeout and let go, another
//! is killed and started again, and a store replica is killed and replaced by a new one
//! with an empty volume. Every batch the collector acknowledged must then be reflected in
//! the results read through every gateway replica (each at its own published port) — the
//! same everywhere, and exactly once: each batch has a key of its own, so its window counts
//! exactly its events, never twice as many. A `Watch` through one gateway sees every
//! window's result exactly once though that gateway is killed while it follows (the client
//! resumes on the other with its last sequence). One event's trace must cross all five
//! services, received by our own OTLP sink running next to them.
//!
//! It runs when `RUNNEL_COMPOSE_E2E=1` (`cargo xtask compose-test` builds the images and
//! sets it; `.ci/run` does that when a Docker engine is present), and otherwise says why it
//! did not. The project has a unique name and is taken down with its volumes at the end,
//! whether the test passes or not.

use runnel_e2e::PARTITIONS;
use runnel_e2e::compose::{ComposeProject, compose_command, repository_root};
use runnel_e2e::otlp::{ReceivedSpan, check_trace_hops, trace_is_complete};
use runnel_proto::Millis;
use runnel_proto::v1::collector_client::CollectorClient;
use runnel_proto::v1::gateway_client::GatewayClient;
use runnel_proto::v1::{Event, IngestRequest, QueryResult, WatchRequest};
use runnel_testkit::holds_within;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tonic::transport::Channel;

/// The analyzer's query (`analyzer.toml`): one-minute tumbling windows, no idleness.
const QUERY: &str = "avg_value_per_key";
/// A minute's start: every load event falls in [T0, T0 + 1 min), so its window stays open
/// until the closing events at the end move every partition's clock past it.
const T0: i64 = 1_699_999_980_000;
/// Events per ingested batch; a batch is one key, so one window, of this count.
const BATCH: usize = 50;
/// Concurrent ingest clients, each sending a batch every `PACE`: enough load that faults
/// strike mid-call, few enough windows that the results fit one `Watch`'s buffer.
const PRODUCERS: usize = 3;
const PACE: Duration = Duration::from_millis(100);
/// Acknowledged batches to wait for between faults.
const PROGRESS: u64 = 15;
/// Generous bound for anything to happen on a loaded two-core machine.
const WAIT: Duration = Duration::from_secs(180);
const SERVICES: [&str; 5] = ["broker", "store", "collector", "analyzer", "gateway"];
/// The fault test's replicas: every service that scales by replicas runs several.
const SCALE: [(&str, usize); 3] = [("analyzer", 3), ("store", 2), ("gateway", 2)];

fn event(id: String, key: &str, at_ms: i64, value: Option<f64>) -> Event {
    let payload = match value {
        Some(value) => serde_json::json!({ "value": value }),
        None => serde_json::json!({ "other": 1 }),
    };
    Event {
        id,
        source: "compose-e2e".into(),
        r#type: "reading".into(),
        key: key.into(),
        event_time: Some(Millis(at_ms).into()),
        payload: serde_json::to_vec(&payload).expect("json").into(),
        ..Default::default()
    }
}

/// Batch `key`'s events: values 0..BATCH, so its window's sum is fixed too.
fn batch(key: &str) -> Vec<Event> {
    (0..BATCH)
        .map(|i| {
            let at = T0 + 1000 + (i as i64 % 50) * 1000;
            event(format!("{key}-{i}"), key, at, Some(i as f64))
        })
        .collect()
}

fn batch_sum() -> f64 {
    (0..BATCH).map(|i| i as f64).sum()
}

/// What the ingest load saw: the keys of acknowledged batches, and of batches whose
/// `Ingest` failed (which may or may not be stored — whole, as one broker batch).
#[derive(Default)]
struct Outcomes {
    acked: Vec<String>,
    failed: Vec<String>,
}

/// Ingests batches until `stop`, each with a key of its own, counting acknowledgements on
/// `progress`. A failed call is not retried: its events are not acknowledged.
async fn produce(
    producer: usize,
    collector: CollectorClient<Channel>,
    outcomes: Arc<Mutex<Outcomes>>,
    progress: Arc<watch::Sender<u64>>,
    stop: watch::Receiver<bool>,
) {
    let mut collector = collector;
    let mut pace = tokio::time::interval(PACE);
    pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for seq in 0.. {
        pace.tick().await;
        if *stop.borrow() {
            return;
        }
        let key = format!("b{producer}-{seq:05}");
        let mut request = tonic::Request::new(IngestRequest {
            events: batch(&key),
            ..Default::default()
        });
        request.set_timeout(Duration::from_secs(10));
        match collector.ingest(request).await {
            Ok(response) => {
                assert_eq!(
                    response.into_inner().receipts.len(),
                    BATCH,
                    "one receipt per event"
                );
                outcomes.lock().expect("outcomes").acked.push(key);
                progress.send_modify(|n| *n += 1);
            }
            Err(status) => {
                outcomes.lock().expect("outcomes").failed.push(key);
                eprintln!("ingest {producer}/{seq} failed: {}", status.message());
            }
        }
    }
}

/// One event without a value on every partition, far past the load's window: it closes
/// every window before it (the analyzer's watermark is the slowest partition's clock), and
/// comes after everything else sent to its partition.
fn closing_events() -> Vec<Event> {
    (0..PARTITIONS)
        .map(|partition| {
            let key = (0..)
                .map(|i| format!("clock-{i}"))
                .find(|key| runnel_proto::partition_for_key(key, PARTITIONS) == partition)
                .expect("some key lands on every partition");
            event(format!("close-{key}"), &key, T0 + 600_000, None)
        })
        .collect()
}

/// The compose project's environment: every published port on loopback, on a port the
/// engine picks, and `extra`.
fn project_env(extra: &[(&str, &str)]) -> BTreeMap<String, String> {
    [
        ("RUNNEL_COLLECTOR_PUBLISH", "127.0.0.1:"),
        ("RUNNEL_COLLECTOR_UDP_PUBLISH", "127.0.0.1:"),
        ("RUNNEL_GATEWAY_PUBLISH", "127.0.0.1:"),
        ("RUNNEL_GATEWAY_HTTP_PUBLISH", "127.0.0.1:"),
    ]
    .iter()
    .chain(extra)
    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
    .collect()
}

/// The value, or a panic with every container's log.
async fn or_fail<T>(project: &ComposeProject, result: anyhow::Result<T>) -> T {
    match result {
        Ok(value) => value,
        Err(error) => panic!("{error:#}\n{}", project.logs().await),
    }
}

async fn wait_progress(progress: &mut watch::Receiver<u64>, at_least: u64, what: &str) {
    tokio::time::timeout(WAIT, progress.wait_for(|n| *n >= at_least))
        .await
        .unwrap_or_else(|_| panic!("{what}: fewer than {at_least} batches acknowledged"))
        .expect("progress");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compose_pipeline_keeps_every_acknowledged_event_once_through_faults_and_traces_every_hop()
{
    if std::env::var("RUNNEL_COMPOSE_E2E").as_deref() != Ok("1") {
        runnel_testkit::skip(
            "RUNNEL_COMPOSE_E2E=1 and a Docker engine",
            "`cargo xtask compose-test` builds the images and runs it",
        );
        return;
    }
    let command = compose_command().expect(
        "RUNNEL_COMPOSE_E2E=1 but no Docker engine answers `docker info`, or neither \
         `docker compose` nor `docker-compose` works",
    );
    let root = repository_root();
    let env = project_env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://otlp-sink:4317")]);
    let project = ComposeProject::up(
        command,
        vec![
            root.join("docker-compose.yml"),
            root.join("tests/compose/otlp-sink.yml"),
        ],
        env,
        &SCALE,
    )
    .await
    .expect("compose up");
    let healthy = project.wait_healthy(&SERVICES, &HashMap::new(), WAIT).await;
    or_fail(&project, healthy).await;

    // Hardened as the compose file says: read-only root, unprivileged user; and no two
    // replicas share a volume (their state is in the broker, not on a shared disk).
    let mut volumes: HashMap<String, String> = HashMap::new();
    for service in SERVICES {
        for replica in 1..=project.replicas(service) {
            let hardening = project
                .inspect(
                    service,
                    replica,
                    "{{.HostConfig.ReadonlyRootfs}} {{.Config.User}}",
                )
                .await
                .expect("inspect");
            assert_eq!(hardening, "true 65532:65532", "{service} #{replica}");
            let mounted = project
                .inspect(
                    service,
                    replica,
                    "{{range .Mounts}}{{if eq .Type \"volume\"}}{{.Name}} {{end}}{{end}}",
                )
                .await
                .expect("inspect");
            for volume in mounted.split_whitespace() {
                let here = format!("{service} #{replica}");
                if let Some(other) = volumes.insert(volume.to_owned(), here.clone()) {
                    panic!("{here} and {other} share the volume {volume}");
                }
            }
        }
    }

    // Spans, as the sink prints them.
    let spans: Arc<Mutex<Vec<ReceivedSpan>>> = Arc::default();
    let (span_arrived, mut spans_changed) = watch::channel(0u64);
    let _sink_output = {
        let spans = Arc::clone(&spans);
        project
            .follow_stdout("otlp-sink", move |line| {
                if let Some(span) = ReceivedSpan::from_json(line) {
                    spans.lock().expect("spans").push(span);
                    span_arrived.send_modify(|n| *n += 1);
                }
            })
            .await
            .expect("follow the sink")
    };

    let collector_addr = project.published("collector", 1, 7101).await.expect("port");
    // Every gateway replica at its own published ports: (gRPC, HTTP).
    let mut gateways = Vec::new();
    for replica in 1..=project.replicas("gateway") {
        gateways.push((
            project
                .published("gateway", replica, 7105)
                .await
                .expect("port"),
            project
                .published("gateway", replica, 8080)
                .await
                .expect("port"),
        ));
    }
    let gateway_addr = gateways[0].0;
    let collector = CollectorClient::new(
        tonic::transport::Endpoint::from_shared(format!("http://{collector_addr}"))
            .expect("url")
            .connect_lazy(),
    );

    // Load.
    let outcomes: Arc<Mutex<Outcomes>> = Arc::default();
    let (progress, mut progressed) = watch::channel(0u64);
    let progress = Arc::new(progress);
    let (stop, stopped) = watch::channel(false);
    let producers: Vec<_> = (0..PRODUCERS)
        .map(|p| {
            tokio::spawn(produce(
                p,
                collector.clone(),
                Arc::clone(&outcomes),
                Arc::clone(&progress),
                stopped.clone(),
            ))
        })
        .collect();
    wait_progress(&mut progressed, PROGRESS, "before the faults").await;

    // Fault 1: the broker killed under load, then started again with the same volume.
    let broker_healthy = project.health_so_far();
    project.kill("broker", 1).await.expect("kill the broker");
    eprintln!("broker killed");
    project.start("broker", 1).await.expect("start the broker");
    let healthy = project
        .wait_healthy(&["broker"], &broker_healthy, WAIT)
        .await;
    or_fail(&project, healthy).await;
    eprintln!("broker healthy again");
    let now = *progressed.borrow();
    wait_progress(&mut progressed, now + PROGRESS, "after the broker restart").await;

    // Fault 2: an analyzer replica cut off the network while events keep coming, then put
    // back — under a new address (another container takes its old one meanwhile), so that
    // its connections to the broker and the store are dead without either side being
    // told. Its group evicts it meanwhile and gives its partitions to the others; when it
    // is back, whatever it still writes for them under its old generation is fenced.
    let network = project.network("analyzer", 1).await.expect("network");
    let address = project.address("analyzer", 1).await.expect("address");
    project.disconnect("analyzer", 1).await.expect("disconnect");
    let taken = project
        .take_free_address(&network, "runnel-otlp-sink:latest")
        .await
        .expect("a container on the network");
    assert_eq!(taken, address, "the analyzer's old address is taken");
    eprintln!("analyzer disconnected");
    let now = *progressed.borrow();
    wait_progress(
        &mut progressed,
        now + PROGRESS,
        "while the analyzer is away",
    )
    .await;
    project
        .reconnect("analyzer", 1, &network)
        .await
        .expect("reconnect");
    let new_address = project.address("analyzer", 1).await.expect("address");
    assert_ne!(new_address, address);
    eprintln!("analyzer reconnected: {address} -> {new_address}");
    let now = *progressed.borrow();
    wait_progress(
        &mut progressed,
        now + PROGRESS,
        "after the analyzer is back",
    )
    .await;

    // Fault 2b: an analyzer replica frozen past its session timeout (10 s) while events
    // keep coming, then let go: the group evicts it and deals its partitions to the
    // others; woken, it finds its generation stale — whatever it still writes is fenced —
    // and rejoins.
    let evictions = |logs: &str| logs.matches("member evicted: session timed out").count();
    let evicted_before = evictions(
        &project
            .compose(&["logs", "--no-color", "broker"])
            .await
            .expect("broker logs"),
    );
    project
        .pause("analyzer", 3)
        .await
        .expect("pause an analyzer");
    eprintln!("analyzer #3 paused");
    let evicted = holds_within(WAIT, || async {
        let logs = project
            .compose(&["logs", "--no-color", "broker"])
            .await
            .ok()?;
        (evictions(&logs) > evicted_before).then_some(())
    })
    .await;
    if evicted.is_none() {
        panic!(
            "the paused analyzer was never evicted\n{}",
            project.logs().await
        );
    }
    let now = *progressed.borrow();
    wait_progress(
        &mut progressed,
        now + PROGRESS,
        "while an analyzer is paused",
    )
    .await;
    project
        .unpause("analyzer", 3)
        .await
        .expect("unpause the analyzer");
    eprintln!("analyzer #3 evicted and let go");
    let now = *progressed.borrow();
    wait_progress(&mut progressed, now + PROGRESS, "after the analyzer woke").await;

    // Fault 3: kill -9 of an analyzer replica and of a store replica under load. The
    // analyzer's partitions move to the others, which restore their checkpoints from the
    // broker; the store replica comes back as a new container with an empty volume and
    // rebuilds its results from the broker's `_store.results`.
    // Healthy again: the restarted analyzer (once more than before), and the new store
    // container (at all); the replicas left alone were healthy all along.
    let analyzer_2 = project.container("analyzer", 2).await.expect("analyzer #2");
    let before = HashMap::from([(
        analyzer_2.clone(),
        project
            .health_so_far()
            .get(&analyzer_2)
            .copied()
            .unwrap_or(0),
    )]);
    project.kill("analyzer", 2).await.expect("kill an analyzer");
    project.kill("store", 2).await.expect("kill a store");
    eprintln!("analyzer #2 and store #2 killed");
    let now = *progressed.borrow();
    wait_progress(
        &mut progressed,
        now + PROGRESS,
        "with an analyzer and a store replica down",
    )
    .await;
    project
        .start("analyzer", 2)
        .await
        .expect("start the analyzer");
    project
        .replace("store", 2)
        .await
        .expect("a new store replica");
    let healthy = project
        .wait_healthy(&["analyzer", "store"], &before, WAIT)
        .await;
    or_fail(&project, healthy).await;
    eprintln!("analyzer #2 back, store #2 replaced with an empty volume");
    let now = *progressed.borrow();
    wait_progress(
        &mut progressed,
        now + PROGRESS,
        "after the analyzer and store replicas are back",
    )
    .await;

    stop.send_replace(true);
    for producer in producers {
        producer.await.expect("producer");
    }
    let (acked, failed) = {
        let outcomes = outcomes.lock().expect("outcomes");
        (outcomes.acked.clone(), outcomes.failed.clone())
    };
    eprintln!(
        "{} batches acknowledged, {} failed",
        acked.len(),
        failed.len()
    );

    // Watch every result from here on, then send the traced event and close the window.
    let mut gateway = GatewayClient::new(
        tonic::transport::Endpoint::from_shared(format!("http://{gateway_addr}"))
            .expect("url")
            .connect_lazy(),
    );
    let mut watch = tonic::Request::new(WatchRequest {
        query: QUERY.into(),
        ..Default::default()
    });
    // Bounds the whole stream: far more than the test waits for results below.
    watch.set_timeout(WAIT * 2);
    let mut live = tokio::time::timeout(WAIT, gateway.watch(watch))
        .await
        .expect("the watch starts")
        .expect("watch")
        .into_inner();
    let mut collector = collector;
    for (what, events) in [
        (
            "the traced event",
            vec![event("traced-1".into(), "traced", T0 + 1000, Some(42.0))],
        ),
        ("the closing events", closing_events()),
    ] {
        let mut request = tonic::Request::new(IngestRequest {
            events,
            ..Default::default()
        });
        request.set_timeout(Duration::from_secs(30));
        collector
            .ingest(request)
            .await
            .unwrap_or_else(|status| panic!("ingest {what}: {status}"));
    }

    let acked_keys: HashSet<&str> = acked.iter().map(String::as_str).collect();
    let failed_keys: HashSet<&str> = failed.iter().map(String::as_str).collect();
    let mut results: HashMap<String, QueryResult> = HashMap::new();
    // Fault 4: the gateway the watch follows is killed once the first result is in; the
    // client resumes on the other gateway after the last sequence it saw, and must see
    // every window's result once — none missed in the switch, none twice.
    let mut failed_over = false;
    let complete = tokio::time::timeout(WAIT, async {
        while !(acked_keys.iter().all(|k| results.contains_key(*k))
            && results.contains_key("traced"))
        {
            match live.message().await {
                Ok(Some(result)) => {
                    let key = result.key.clone();
                    if let Some(earlier) = results.insert(key.clone(), result) {
                        return Err(format!(
                            "{key}'s result came twice: sequences {} and {}",
                            earlier.sequence, results[&key].sequence
                        ));
                    }
                }
                other => return Err(format!("the watch ended: {other:?}")),
            }
            if !failed_over {
                failed_over = true;
                let last = results.values().map(|r| r.sequence).max().unwrap_or(0);
                project
                    .kill("gateway", 1)
                    .await
                    .map_err(|e| e.to_string())?;
                eprintln!("gateway #1 killed mid-watch; resuming on #2 after sequence {last}");
                let mut other = GatewayClient::new(
                    tonic::transport::Endpoint::from_shared(format!("http://{}", gateways[1].0))
                        .expect("url")
                        .connect_lazy(),
                );
                let mut resume = tonic::Request::new(WatchRequest {
                    query: QUERY.into(),
                    after_sequence: Some(last),
                    ..Default::default()
                });
                resume.set_timeout(WAIT * 2);
                live = other
                    .watch(resume)
                    .await
                    .map_err(|status| format!("resume on gateway #2: {status}"))?
                    .into_inner();
            }
        }
        Ok(())
    })
    .await;
    match complete {
        Ok(Ok(())) => {}
        Ok(Err(why)) => panic!("{why}\n{}", project.logs().await),
        Err(_) => {
            let missing: Vec<_> = acked_keys
                .iter()
                .filter(|k| !results.contains_key(**k))
                .collect();
            panic!(
                "{} acknowledged batches have no result: {missing:?}\n{}",
                missing.len(),
                project.logs().await
            );
        }
    }

    // Exactly once: every batch that has a result counts its events once. An acknowledged
    // batch must have one; a failed one may (stored before the broker died) — but whole.
    for (key, result) in &results {
        if key == "traced" || key.starts_with("clock-") {
            continue;
        }
        assert!(
            acked_keys.contains(key.as_str()) || failed_keys.contains(key.as_str()),
            "a result for {key}, which nobody sent"
        );
        assert_eq!(
            (result.values["count"], result.values["sum"]),
            (BATCH as f64, batch_sum()),
            "batch {key}: every event once"
        );
    }
    // The killed gateway comes back (with new host ports, perhaps).
    let gateway_1 = project.container("gateway", 1).await.expect("gateway #1");
    let before = HashMap::from([(
        gateway_1.clone(),
        project
            .health_so_far()
            .get(&gateway_1)
            .copied()
            .unwrap_or(0),
    )]);
    project
        .start("gateway", 1)
        .await
        .expect("start the gateway");
    let healthy = project.wait_healthy(&["gateway"], &before, WAIT).await;
    or_fail(&project, healthy).await;
    gateways[0] = (
        project.published("gateway", 1, 7105).await.expect("port"),
        project.published("gateway", 1, 8080).await.expect("port"),
    );
    let http_addr = gateways[0].1;

    // The same through every gateway replica's HTTP API and gRPC `Get`, from the stores'
    // durable state: each replica answers every key with the result the watch saw. The
    // store replicas materialise the broker's results log each at its own pace, so a
    // replica may answer a moment later than another — never differently.
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("http client");
    for (replica, (grpc_addr, http_addr)) in gateways.iter().enumerate() {
        let replica = replica + 1;
        let gateway = GatewayClient::new(
            tonic::transport::Endpoint::from_shared(format!("http://{grpc_addr}"))
                .expect("url")
                .connect_lazy(),
        );
        for key in &acked {
            let expected = (BATCH as f64, batch_sum());
            let url = format!("http://{http_addr}/v1/results/{QUERY}/{key}");
            // Both APIs have it: HTTP with the batch's count and sum, gRPC `Get` with a
            // result (compared in full below).
            let answered = holds_within(WAIT, || {
                let (http, url, mut gateway) = (&http, &url, gateway.clone());
                async move {
                    let body: serde_json::Value = http
                        .get(url)
                        .send()
                        .await
                        .ok()?
                        .error_for_status()
                        .ok()?
                        .json()
                        .await
                        .ok()?;
                    let values = &body["values"];
                    if values["count"].as_f64() != Some(expected.0)
                        || values["sum"].as_f64() != Some(expected.1)
                    {
                        return None;
                    }
                    gateway
                        .get(runnel_proto::v1::GetRequest {
                            query: QUERY.into(),
                            key: key.clone(),
                        })
                        .await
                        .ok()?
                        .into_inner()
                        .result
                }
            })
            .await;
            let Some(stored) = answered else {
                panic!(
                    "gateway #{replica}: {key} never answered {expected:?} over HTTP and gRPC\n{}",
                    project.logs().await
                );
            };
            assert_eq!(
                stored.values, results[key].values,
                "gateway #{replica}: {key} differs from what the watch saw"
            );
        }
    }
    // A query the analyzer does not run: 404 naming the ones it does (the gateway asks
    // the analyzer, as compose configures it).
    let url = format!("http://{http_addr}/v1/results/no_such_query/{}", acked[0]);
    let response = http.get(&url).send().await.expect("GET an unknown query");
    assert_eq!(response.status(), reqwest::StatusCode::NOT_FOUND, "{url}");
    let body = response.text().await.expect("body");
    assert!(
        body.contains("unknown query") && body.contains(QUERY),
        "{url}: {body}"
    );

    // The traced event's trace: spans from all five services, linked hop to hop.
    let traced = &results["traced"];
    assert_eq!(traced.values["count"], 1.0);
    let trace_id = traced
        .headers
        .get("traceparent")
        .and_then(|tp| tp.split('-').nth(1))
        .expect("the result carries its trace")
        .to_owned();
    let trace = |spans: &[ReceivedSpan]| -> Vec<ReceivedSpan> {
        spans
            .iter()
            .filter(|s| s.trace_id == trace_id)
            .cloned()
            .collect()
    };
    let complete = tokio::time::timeout(WAIT, async {
        loop {
            let current = trace(&spans.lock().expect("spans"));
            if trace_is_complete(&current) {
                return current;
            }
            spans_changed.changed().await.expect("sink output");
        }
    })
    .await;
    let Ok(spans) = complete else {
        // Not held across the await below: the sink's follower takes the same lock.
        let received = trace(&spans.lock().expect("spans"));
        panic!(
            "trace {trace_id} incomplete: {received:#?}\n{}",
            project.logs().await
        );
    };
    if let Err(problem) = check_trace_hops(&spans) {
        panic!("trace {trace_id}: {problem}");
    }
    eprintln!(
        "trace {trace_id}: {} spans across {:?}",
        spans.len(),
        spans
            .iter()
            .map(|s| s.service.as_str())
            .collect::<std::collections::BTreeSet<_>>()
    );
}

/// The secure variant (`docker-compose.secure.yml`, certificates from `runnel certs init
/// --mount /certs`, which `cargo xtask compose-test` makes and names in
/// `RUNNEL_COMPOSE_CERTS`): every service starts and reports healthy over mutual TLS, a
/// caller without a client certificate is refused at the collector and the gateway, and
/// the `client` certificate's events go through the whole pipeline — each service
/// authenticating the next by its certificate and allowed only its grants — to a result
/// read back over gRPC and HTTPS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secure_compose_pipeline_serves_only_callers_with_a_certificate() {
    if std::env::var("RUNNEL_COMPOSE_E2E").as_deref() != Ok("1") {
        runnel_testkit::skip(
            "RUNNEL_COMPOSE_E2E=1 and a Docker engine",
            "`cargo xtask compose-test` makes the images and certificates and runs it",
        );
        return;
    }
    let certs = std::path::PathBuf::from(std::env::var("RUNNEL_COMPOSE_CERTS").expect(
        "RUNNEL_COMPOSE_E2E=1 but RUNNEL_COMPOSE_CERTS does not name the certificates \
         (`cargo xtask compose-test` makes them)",
    ));
    let command = compose_command().expect("a compose tool");
    let root = repository_root();
    let certs_dir = certs.display().to_string();
    let env = project_env(&[("RUNNEL_CERTS", &certs_dir)]);
    let project = ComposeProject::up(
        command,
        vec![
            root.join("docker-compose.yml"),
            root.join("docker-compose.secure.yml"),
        ],
        env,
        &[],
    )
    .await
    .expect("compose up");
    // Each health check is the service's own `healthcheck`, over TLS with its certificate.
    let healthy = project.wait_healthy(&SERVICES, &HashMap::new(), WAIT).await;
    or_fail(&project, healthy).await;

    let collector_addr = project.published("collector", 1, 7101).await.expect("port");
    let gateway_addr = project.published("gateway", 1, 7105).await.expect("port");
    let http_addr = project.published("gateway", 1, 8080).await.expect("port");
    let as_client = runnel_security::ConnectConfig {
        ca: Some(certs.join("ca.pem")),
        cert: Some(certs.join("client.pem")),
        key: Some(certs.join("client.key")),
        server_name: Some("localhost".into()),
        ..Default::default()
    };
    let anonymous = runnel_security::ConnectConfig {
        cert: None,
        key: None,
        ..as_client.clone()
    };
    let peer = |addr: std::net::SocketAddr, config: &runnel_security::ConnectConfig| {
        runnel_security::connect::connect_lazy(&format!("https://{addr}"), config)
            .expect("a TLS channel")
    };

    // Refused: in plaintext, and over TLS without a client certificate.
    let mut plain = CollectorClient::new(
        tonic::transport::Endpoint::from_shared(format!("http://{collector_addr}"))
            .expect("url")
            .connect_lazy(),
    );
    let request = || IngestRequest {
        events: vec![event("refused".into(), "refused", T0, Some(1.0))],
        ..Default::default()
    };
    assert!(plain.ingest(request()).await.is_err(), "plaintext accepted");
    let refused = CollectorClient::new(peer(collector_addr, &anonymous))
        .ingest(request())
        .await;
    assert!(refused.is_err(), "no client certificate, yet accepted");
    let refused = GatewayClient::new(peer(gateway_addr, &anonymous))
        .get(runnel_proto::v1::GetRequest {
            query: QUERY.into(),
            key: "secure".into(),
        })
        .await;
    assert!(
        refused.is_err(),
        "the gateway served a caller without a certificate"
    );

    // Accepted as `client`: one batch, then a closing event on every partition.
    // Results arrive on a live stream, opened (as `client`) before anything is sent.
    let mut gateway = GatewayClient::new(peer(gateway_addr, &as_client));
    let mut watch = tonic::Request::new(WatchRequest {
        query: QUERY.into(),
        keys: vec!["secure".into()],
        ..Default::default()
    });
    watch.set_timeout(WAIT * 2);
    let mut live = tokio::time::timeout(WAIT, gateway.watch(watch))
        .await
        .expect("the watch starts")
        .unwrap_or_else(|status| panic!("watch as client: {status:?}"))
        .into_inner();

    let mut collector = CollectorClient::new(peer(collector_addr, &as_client));
    let ingest = |events: Vec<Event>| {
        let mut request = tonic::Request::new(IngestRequest {
            events,
            ..Default::default()
        });
        request.set_timeout(Duration::from_secs(30));
        request
    };
    let receipts = collector
        .ingest(ingest(batch("secure")))
        .await
        .unwrap_or_else(|status| panic!("ingest as client: {status:?}"))
        .into_inner()
        .receipts;
    assert_eq!(receipts.len(), BATCH);
    collector
        .ingest(ingest(closing_events()))
        .await
        .unwrap_or_else(|status| panic!("closing events: {status:?}"));

    let result = match tokio::time::timeout(WAIT, live.message()).await {
        Ok(Ok(Some(result))) => result,
        other => panic!(
            "no result for the client's batch: {other:?}\n{}",
            project.logs().await
        ),
    };
    assert_eq!(result.key, "secure");
    assert_eq!(
        (result.values["count"], result.values["sum"]),
        (BATCH as f64, batch_sum())
    );
    // The same, read back by key.
    let stored = gateway
        .get(runnel_proto::v1::GetRequest {
            query: QUERY.into(),
            key: "secure".into(),
        })
        .await
        .unwrap_or_else(|status| panic!("get as client: {status:?}"))
        .into_inner()
        .result
        .expect("the result, by key");
    assert_eq!(stored.values["count"], BATCH as f64);

    // HTTPS, with the client certificate and without.
    let path = format!("/v1/results/{QUERY}/secure");
    let response = https_get(http_addr, &certs, true, &path)
        .await
        .expect("GET with the client certificate");
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(
        response.contains(&format!("\"count\":{BATCH}")),
        "{response}"
    );
    // An unknown query: 404 naming the known ones, which the gateway learns from the
    // analyzer over mutual TLS with its own grant.
    let response = https_get(http_addr, &certs, true, "/v1/results/no_such_query/secure")
        .await
        .expect("GET an unknown query");
    assert!(response.starts_with("HTTP/1.1 404"), "{response}");
    assert!(
        response.contains("unknown query") && response.contains(QUERY),
        "{response}"
    );
    let anonymous = https_get(http_addr, &certs, false, &path).await;
    assert!(
        anonymous
            .as_ref()
            .map_or(true, |r| r.starts_with("HTTP/1.1 401")),
        "GET without a certificate: {anonymous:?}"
    );
}

/// `GET path` over HTTPS to `addr` as `localhost`, trusting `certs/ca.pem`, presenting
/// the `client` certificate if `as_client`: the whole response, or why there was none.
async fn https_get(
    addr: std::net::SocketAddr,
    certs: &std::path::Path,
    as_client: bool,
    path: &str,
) -> std::io::Result<String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(certs.join("ca.pem")).expect("ca.pem") {
        roots
            .add(cert.expect("a CA certificate"))
            .expect("trust it");
    }
    let builder = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("protocol versions")
    .with_root_certificates(roots);
    let config = if as_client {
        let chain = CertificateDer::pem_file_iter(certs.join("client.pem"))
            .expect("client.pem")
            .collect::<Result<Vec<_>, _>>()
            .expect("client certificate");
        let key = PrivateKeyDer::from_pem_file(certs.join("client.key")).expect("client.key");
        builder
            .with_client_auth_cert(chain, key)
            .expect("client identity")
    } else {
        builder.with_no_client_auth()
    };
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = ServerName::try_from("localhost").expect("a name");
    let mut tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(name, tcp)
        .await?;
    tls.write_all(
        format!("GET {path} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut response = String::new();
    tls.read_to_string(&mut response).await?;
    Ok(response)
}
