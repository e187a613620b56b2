//! The collector as real processes: killed with SIGKILL twenty times while a client
//! streams at ack level LOGGED, its broker stopped under load, its log filled to its bound.
//! Every event the collector acknowledged reaches the broker, exactly once; no event is
//! ever stored twice.

use runnel_e2e::ServiceProcess;
use runnel_proto::v1::broker_client::BrokerClient;
use runnel_proto::v1::collector_client::CollectorClient;
use runnel_proto::v1::store_client::StoreClient;
use runnel_proto::v1::{AckLevel, Event, FetchRequest, IngestRequest, RangeRequest, StreamRequest};
use runnel_testkit::{Deferred, eventually};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

const ROUNDS: usize = 20;
const PARTITIONS: u32 = 4;
const BATCH: usize = 20;

/// A broker and a collector, each its own process, with the collector's settings `extra`.
async fn start(dir: &Path, extra: &str) -> (ServiceProcess, ServiceProcess) {
    start_with(dir, "", extra, "").await
}

/// A broker with the settings `engine` and a collector with the settings `extra`; the
/// config file also holds `sections`, for other services.
async fn start_with(
    dir: &Path,
    engine: &str,
    extra: &str,
    sections: &str,
) -> (ServiceProcess, ServiceProcess) {
    let config = dir.join("runnel.toml");
    let d = dir.display();
    std::fs::write(
        &config,
        format!(
            "[broker]\ndata_dir = \"{d}/broker\"\ndefault_partitions = {PARTITIONS}\n{engine}\n\
             [broker.server]\ngrpc = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n\
             [collector]\ndata_dir = \"{d}/collector\"\nudp = \"off\"\ntopic_partitions = {PARTITIONS}\n{extra}\n\
             [collector.server]\ngrpc = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\ndrain_timeout = \"2s\"\n{sections}"
        ),
    )
    .expect("config");
    let broker = ServiceProcess::start("runnel-broker", &config, &BTreeMap::new(), dir)
        .await
        .expect("broker starts");
    let env = BTreeMap::from([("RUNNEL_COLLECTOR__BROKER".to_owned(), broker.url())]);
    let collector = ServiceProcess::start("runnel-collector", &config, &env, dir)
        .await
        .expect("collector starts");
    (broker, collector)
}

fn event(id: String) -> Event {
    let hash = id
        .bytes()
        .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)));
    Event {
        key: format!("key-{}", hash % 16),
        id,
        source: "e2e".into(),
        r#type: "reading".into(),
        payload: br#"{"value":1}"#.to_vec().into(),
        ..Default::default()
    }
}

/// Every event id in `topic`, with how many times each is stored.
async fn stored(url: &str, topic: &str) -> HashMap<String, usize> {
    let mut broker = BrokerClient::connect(url.to_owned()).await.expect("broker");
    let mut counts = HashMap::new();
    for partition in 0..PARTITIONS {
        let mut offset = 0;
        loop {
            let page = match broker
                .fetch(FetchRequest {
                    topic: topic.into(),
                    partition,
                    offset,
                    max_records: 5000,
                    ..Default::default()
                })
                .await
            {
                Ok(page) => page.into_inner(),
                Err(status) if status.code() == Code::NotFound => return counts,
                Err(status) => panic!("fetch: {status}"),
            };
            if page.records.is_empty() {
                break;
            }
            offset = page.next_offset;
            for record in page.records {
                *counts.entry(record.event.expect("event").id).or_insert(0) += 1;
            }
        }
    }
    counts
}

/// Waits until the broker holds every acknowledged id, then checks none is there twice.
async fn assert_exactly_once(url: &str, acknowledged: &[String], logs: impl Fn() -> String) {
    let missing = std::sync::Mutex::new(Vec::new());
    let what = Deferred(|| {
        let missing = missing.lock().unwrap();
        format!(
            "every acknowledged event in the broker: {} of {} never reached it, e.g. {:?}\n{}",
            missing.len(),
            acknowledged.len(),
            &missing[..missing.len().min(5)],
            logs()
        )
    });
    eventually(Duration::from_secs(120), what, || async {
        let counts = stored(url, "events").await;
        let twice: Vec<(&String, &usize)> = counts.iter().filter(|(_, n)| **n > 1).collect();
        assert!(twice.is_empty(), "stored twice: {twice:?}\n{}", logs());
        let mut missing = missing.lock().unwrap();
        *missing = acknowledged
            .iter()
            .filter(|id| !counts.contains_key(*id))
            .cloned()
            .collect();
        missing.is_empty()
    })
    .await;
}

/// Streams batches at LOGGED to whatever collector is at `url`, reconnecting whenever the
/// stream breaks, and records the ids of every batch acknowledged. A batch that was not
/// acknowledged is never sent again (its ids are never reused), so any id stored twice
/// can only come from the collector.
async fn stream_logged(
    url: String,
    acknowledged: Arc<Mutex<Vec<String>>>,
    mut stop: watch::Receiver<bool>,
) -> u64 {
    let mut next_id = 0u64;
    let mut streams = 0u64;
    while !*stop.borrow() {
        let Ok(mut client) = CollectorClient::connect(url.clone()).await else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let (requests, receiver) = mpsc::channel(64);
        let Ok(response) = client.stream(ReceiverStream::new(receiver)).await else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        streams += 1;
        let mut responses = response.into_inner();
        let Ok(Some(first)) = responses.message().await else {
            continue;
        };
        let window = u64::from(first.window).min(8);
        let mut in_flight: BTreeMap<u64, Vec<String>> = BTreeMap::new();
        let mut sequence = 0u64;
        let mut acked = 0u64;
        'stream: loop {
            while sequence < acked + window && !*stop.borrow() {
                sequence += 1;
                let ids: Vec<String> = (0..BATCH)
                    .map(|_| {
                        next_id += 1;
                        format!("c-{next_id}")
                    })
                    .collect();
                let request = StreamRequest {
                    sequence,
                    events: ids.iter().cloned().map(event).collect(),
                    ack_level: AckLevel::Logged as i32,
                };
                in_flight.insert(sequence, ids);
                if requests.send(request).await.is_err() {
                    break 'stream;
                }
            }
            if *stop.borrow() && in_flight.is_empty() {
                break;
            }
            let message = tokio::select! {
                message = responses.message() => message,
                _ = stop.changed() => continue,
            };
            match message {
                Ok(Some(ack)) => {
                    acked = ack.acknowledged;
                    let done: Vec<u64> = in_flight.range(..=acked).map(|(s, _)| *s).collect();
                    let mut record = acknowledged.lock().unwrap();
                    for s in done {
                        record.extend(in_flight.remove(&s).unwrap_or_default());
                    }
                }
                // The collector died (or is stopping): what was not acknowledged is given up.
                Ok(None) | Err(_) => break,
            }
        }
    }
    streams
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logged_events_survive_twenty_sigkills_of_the_collector_exactly_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (broker, mut collector) = start(dir.path(), "").await;
    let acknowledged = Arc::new(Mutex::new(Vec::new()));
    let (stop, stopped) = watch::channel(false);
    let client = tokio::spawn(stream_logged(
        collector.url(),
        Arc::clone(&acknowledged),
        stopped,
    ));
    let mut before = 0;
    let mut replayed = 0u64;
    for round in 0..ROUNDS {
        // Let some batches be acknowledged, then kill at a moment nobody chose.
        await_acknowledged(
            &acknowledged,
            before + BATCH * 5,
            round,
            &collector,
            &broker,
        )
        .await;
        tokio::time::sleep(Duration::from_millis(rand::random_range(0..150))).await;
        collector.kill().await.expect("SIGKILL");
        before = acknowledged.lock().unwrap().len();
        collector = collector.restart().await.expect("collector restarts");
        replayed += replayed_events(&collector).await;
    }
    // The kills did catch events logged but not yet stored: recovery had work to do.
    assert!(replayed > 0, "no restart replayed anything");
    stop.send(true).expect("stop");
    let streams = tokio::time::timeout(Duration::from_secs(60), client)
        .await
        .expect("client stops")
        .expect("client");
    assert!(
        streams > ROUNDS as u64,
        "the client reconnected after every kill"
    );
    let acknowledged = acknowledged.lock().unwrap().clone();
    assert!(acknowledged.len() >= ROUNDS * BATCH * 5);
    assert_exactly_once(&broker.url(), &acknowledged, || {
        format!("{}\n{}", collector.log(), broker.log())
    })
    .await;
}

/// Waits until at least `count` events are acknowledged; fails with both services' logs.
async fn await_acknowledged(
    acknowledged: &Mutex<Vec<String>>,
    count: usize,
    round: usize,
    collector: &ServiceProcess,
    broker: &ServiceProcess,
) {
    eventually(
        Duration::from_secs(60),
        Deferred(|| {
            format!(
                "round {round}: progress\n{}\n{}",
                collector.log(),
                broker.log()
            )
        }),
        || async { acknowledged.lock().unwrap().len() >= count },
    )
    .await;
}

/// What a (re)started collector replayed from its log, from its metrics.
async fn replayed_events(collector: &ServiceProcess) -> u64 {
    let text = reqwest::get(format!("http://{}/metrics", collector.admin))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text");
    text.lines()
        .find_map(|line| line.strip_prefix("runnel_collector_replayed_events_total "))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(0)
}

/// Ingests at LOGGED continuously; returns the ids acknowledged until `stop`.
async fn ingest_logged(
    url: String,
    acknowledged: Arc<Mutex<Vec<String>>>,
    refused: Arc<Mutex<Vec<Code>>>,
    stop: watch::Receiver<bool>,
    prefix: &'static str,
) {
    let mut client = CollectorClient::connect(url).await.expect("collector");
    let mut next = 0u64;
    while !*stop.borrow() {
        let ids: Vec<String> = (0..BATCH)
            .map(|_| {
                next += 1;
                format!("{prefix}-{next}")
            })
            .collect();
        let request = IngestRequest {
            events: ids.iter().cloned().map(event).collect(),
            ack_level: AckLevel::Logged as i32,
        };
        match client.ingest(request).await {
            Ok(_) => acknowledged.lock().unwrap().extend(ids),
            Err(status) => {
                refused.lock().unwrap().push(status.code());
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    }
}

/// The broker is killed under load and is away for a while: the collector keeps
/// acknowledging at LOGGED from its log, and everything reaches the broker once it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn everything_logged_during_a_broker_outage_is_delivered_once_it_returns() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut broker, collector) = start(dir.path(), "").await;
    let acknowledged = Arc::new(Mutex::new(Vec::new()));
    let refused = Arc::new(Mutex::new(Vec::new()));
    let (stop, stopped) = watch::channel(false);
    let client = tokio::spawn(ingest_logged(
        collector.url(),
        Arc::clone(&acknowledged),
        Arc::clone(&refused),
        stopped,
        "outage",
    ));
    let wait_for = |n: usize| {
        let acknowledged = Arc::clone(&acknowledged);
        async move {
            eventually(Duration::from_secs(60), "progress", || async {
                acknowledged.lock().unwrap().len() >= n
            })
            .await;
        }
    };
    wait_for(BATCH * 10).await;
    broker.kill().await.expect("SIGKILL broker");
    let at_kill = acknowledged.lock().unwrap().len();
    // Acknowledged while the broker is gone: the log holds them.
    wait_for(at_kill + BATCH * 20).await;
    broker = broker.restart().await.expect("broker restarts");
    let at_return = acknowledged.lock().unwrap().len();
    wait_for(at_return + BATCH * 5).await;
    stop.send(true).expect("stop");
    client.await.expect("client");
    assert!(
        refused.lock().unwrap().is_empty(),
        "{:?}",
        refused.lock().unwrap()
    );
    let acknowledged = acknowledged.lock().unwrap().clone();
    assert_exactly_once(&broker.url(), &acknowledged, || {
        format!("{}\n{}", collector.log(), broker.log())
    })
    .await;
}

/// The log bounded at 64 KiB and the broker gone: LOGGED ingests fill it, the collector
/// answers RESOURCE_EXHAUSTED, and every event it did acknowledge is delivered once the
/// broker is back — after which it accepts again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_log_answers_resource_exhausted_and_loses_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut broker, collector) =
        start(dir.path(), "[collector.msglog]\nmax_bytes = 65536\n").await;
    let mut client = CollectorClient::connect(collector.url())
        .await
        .expect("collector");
    let mut acknowledged = Vec::new();
    let request = |tag: &str, i: usize| {
        let ids: Vec<String> = (0..BATCH).map(|j| format!("{tag}-{i}-{j}")).collect();
        let events = ids
            .iter()
            .cloned()
            .map(|id| {
                let mut e = event(id);
                e.payload = vec![b'x'; 200].into();
                e
            })
            .collect();
        (
            ids,
            IngestRequest {
                events,
                ack_level: AckLevel::Logged as i32,
            },
        )
    };
    // The collector learns the topic while the broker is there.
    let (ids, first) = request("full", 0);
    client.ingest(first).await.expect("first ingest");
    acknowledged.extend(ids);
    broker.kill().await.expect("SIGKILL broker");
    let mut status = None;
    for i in 1..1000 {
        let (ids, next) = request("full", i);
        match client.ingest(next).await {
            Ok(_) => acknowledged.extend(ids),
            Err(refusal) => {
                status = Some(refusal);
                break;
            }
        }
    }
    let status = status.expect("the log fills up");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        acknowledged.len() > BATCH * 5,
        "{} acknowledged",
        acknowledged.len()
    );
    broker = broker.restart().await.expect("broker restarts");
    assert_exactly_once(&broker.url(), &acknowledged, || {
        format!("{}\n{}", collector.log(), broker.log())
    })
    .await;
    eventually(Duration::from_secs(60), "room in the log again", || async {
        let (_, again) = request("again", 0);
        match client.clone().ingest(again).await {
            Ok(_) => true,
            Err(status) if status.code() == Code::ResourceExhausted => false,
            Err(status) => panic!("{status}"),
        }
    })
    .await;
}

const RETRY_ROUNDS: usize = 30;

/// Where the retry clients' event time starts.
const T0: i64 = 1_700_000_000_000;

/// The query the retry test checks the analyzer with: events per payload key (so through
/// the re-keying stage, keyless events too) and second of event time. With an hour of
/// allowed disorder no event is late, so every window holds exactly the events sent for
/// it, however the kills interleave them.
const PER_SECOND: &str = r#"
[store]
data_dir = "STORE_DIR"
server = { grpc = "127.0.0.1:0", admin = "127.0.0.1:0", drain_timeout = "2s" }
[analyzer]
server = { grpc = "127.0.0.1:0", admin = "127.0.0.1:0", drain_timeout = "2s" }
checkpoint_interval = "50ms"
session_timeout = "2s"
[[analyzer.queries]]
name = "per_second"
topic = "events"
event_type = "reading"
key = "payload.k"
window = "1s"
out_of_orderness = "1h"
idle_timeout = "1h"
aggregates = [{ fn = "count" }]
"#;

/// The retry clients' event `prefix-n`: keyed by its id's hash, or (even `n`) keyless, with
/// that key in its payload too, `n` hundredths of a second after [`T0`].
fn retried_event(id: String) -> Event {
    let n: i64 = id
        .rsplit('-')
        .next()
        .and_then(|n| n.parse().ok())
        .expect("prefix-n");
    let mut event = event(id);
    event.payload = serde_json::to_vec(&serde_json::json!({ "value": 1, "k": event.key }))
        .expect("json")
        .into();
    if n % 2 == 0 {
        event.key.clear();
    }
    event.event_time = Some(runnel_proto::Millis(T0 + n * 10).into());
    event
}

/// Ingests batches at STORED to whatever collector is at `url`, half of the events keyless,
/// resending every call that was not acknowledged — the same events, the same ids — until
/// it is, as `docs/collector.md` tells clients to; returns how many calls were resent.
async fn ingest_resending(
    url: String,
    acknowledged: Arc<Mutex<Vec<String>>>,
    stop: watch::Receiver<bool>,
    prefix: &'static str,
) -> u64 {
    let channel = runnel_client::connect_lazy(&url, &Default::default()).expect("url");
    let mut client = CollectorClient::new(channel);
    let (mut next, mut resent) = (0u64, 0u64);
    while !*stop.borrow() {
        let ids: Vec<String> = (0..BATCH)
            .map(|_| {
                next += 1;
                format!("{prefix}-{next}")
            })
            .collect();
        let events: Vec<Event> = ids.iter().cloned().map(retried_event).collect();
        resent += ingest_until_acknowledged(&mut client, events).await;
        acknowledged.lock().unwrap().extend(ids);
    }
    resent
}

/// Sends `events` at STORED until a call is acknowledged; how many calls were resent.
async fn ingest_until_acknowledged(
    client: &mut CollectorClient<runnel_client::Peer>,
    events: Vec<Event>,
) -> u64 {
    let mut resent = 0;
    loop {
        let request = IngestRequest {
            events: events.clone(),
            ack_level: AckLevel::Stored as i32,
        };
        let call = tokio::time::timeout(Duration::from_secs(5), client.ingest(request));
        match call.await {
            Ok(Ok(_)) => return resent,
            Ok(Err(_)) | Err(_) => {
                resent += 1;
                // A client's backoff before it resends, as a real one would.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// Clients that resend every unacknowledged call with the same ids, while the collector and
/// the broker are each killed with SIGKILL thirty times (and the analyzer fifteen): every
/// event is stored exactly once, and every window of a query over them counts exactly the
/// events sent for it — what a run without a crash gives. The resends do carry events the
/// pipeline already had (the collector logged them, or the broker stored them, before the
/// kill cut the answer off); the broker recognises them by `(source, id)`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resent_calls_are_stored_and_counted_once_through_thirty_kills_of_the_collector_and_the_broker()
 {
    let dir = tempfile::tempdir().expect("tempdir");
    resent_calls_through_kills(dir.path(), "").await;
}

/// The same on JetStream: the broker in front of it is killed, JetStream recognises the
/// retried events by their message ids.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resent_calls_are_stored_and_counted_once_through_thirty_kills_on_jetstream() {
    if !runnel_testkit::require(runnel_testkit::Tool::NatsServer) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let nats_dir = dir.path().join("nats");
    std::fs::create_dir_all(&nats_dir).expect("nats directory");
    let nats = runnel_testkit::nats::NatsNode::start(&nats_dir, &[]).await;
    let engine = format!(
        "storage = \"jetstream\"\njetstream = {{ servers = [\"{}\"], replicas = 1 }}",
        nats.url
    );
    resent_calls_through_kills(dir.path(), &engine).await;
}

async fn resent_calls_through_kills(dir: &Path, engine: &str) {
    let sections = PER_SECOND.replace("STORE_DIR", &dir.join("store").display().to_string());
    let (mut broker, mut collector) = start_with(dir, engine, "", &sections).await;
    let config = dir.join("runnel.toml");
    let store = ServiceProcess::start("runnel-store", &config, &BTreeMap::new(), dir)
        .await
        .expect("store starts");
    let env = BTreeMap::from([
        ("RUNNEL_ANALYZER__BROKER".to_owned(), broker.url()),
        ("RUNNEL_ANALYZER__STORE".to_owned(), store.url()),
    ]);
    let mut analyzer = ServiceProcess::start("runnel-analyzer", &config, &env, dir)
        .await
        .expect("analyzer starts");
    let acknowledged = Arc::new(Mutex::new(Vec::new()));
    let (stop, stopped) = watch::channel(false);
    let clients: Vec<_> = ["a", "b"]
        .into_iter()
        .map(|prefix| {
            tokio::spawn(ingest_resending(
                collector.url(),
                Arc::clone(&acknowledged),
                stopped.clone(),
                prefix,
            ))
        })
        .collect();
    for round in 0..RETRY_ROUNDS * 2 {
        let before = acknowledged.lock().unwrap().len();
        await_acknowledged(
            &acknowledged,
            before + BATCH * 3,
            round,
            &collector,
            &broker,
        )
        .await;
        // Not a wait for readiness (progress was awaited above): a random moment to strike.
        tokio::time::sleep(Duration::from_millis(rand::random_range(0..100))).await;
        if round % 2 == 0 {
            collector.kill().await.expect("SIGKILL collector");
            collector = collector.restart().await.expect("collector restarts");
        } else {
            broker.kill().await.expect("SIGKILL broker");
            broker = broker.restart().await.expect("broker restarts");
        }
        if round % 4 == 1 {
            analyzer.kill().await.expect("SIGKILL analyzer");
            analyzer = analyzer.restart().await.expect("analyzer restarts");
        }
    }
    stop.send(true).expect("stop");
    let mut resent = 0;
    for client in clients {
        resent += tokio::time::timeout(Duration::from_secs(120), client)
            .await
            .expect("clients stop")
            .expect("client");
    }
    assert!(resent > 0, "no call was resent: the kills tested nothing");
    let acknowledged = acknowledged.lock().unwrap().clone();
    let logs = || {
        format!(
            "{}\n{}\n{}\n{}",
            collector.log(),
            broker.log(),
            analyzer.log(),
            store.log()
        )
    };
    assert_exactly_once(&broker.url(), &acknowledged, logs).await;
    // Every event sent was acknowledged in the end, so the broker holds nothing else.
    let stored = stored(&broker.url(), "events").await;
    assert_eq!(stored.len(), acknowledged.len(), "only what was sent, once");

    // An event far ahead in every partition closes every window.
    let channel = runnel_client::connect_lazy(&collector.url(), &Default::default()).expect("url");
    let closing: Vec<Event> = (0..PARTITIONS)
        .map(|partition| {
            let key = (0..)
                .map(|i| format!("clock-{i}"))
                .find(|k| runnel_proto::partition_for_key(k, PARTITIONS) == partition)
                .expect("a key for every partition");
            Event {
                id: format!("end-{partition}"),
                source: "e2e".into(),
                r#type: "clock".into(),
                key,
                event_time: Some(runnel_proto::Millis(T0 + 10 * 3_600_000).into()),
                ..Event::default()
            }
        })
        .collect();
    ingest_until_acknowledged(&mut CollectorClient::new(channel), closing).await;
    let mut expected: BTreeMap<(String, i64), f64> = BTreeMap::new();
    for id in acknowledged {
        let event = retried_event(id.clone());
        let start = runnel_proto::Millis::from(event.event_time.expect("time")).0 / 1000 * 1000;
        *expected.entry((self::event(id).key, start)).or_default() += 1.0;
    }
    let keys: BTreeSet<String> = expected.keys().map(|(key, _)| key.clone()).collect();
    let windows = Mutex::new(BTreeMap::new());
    let what = Deferred(|| {
        let windows = windows.lock().unwrap();
        let differ: Vec<_> = expected
            .iter()
            .filter(|(w, count)| windows.get(*w) != Some(*count))
            .take(5)
            .map(|(w, count)| (w, count, windows.get(w)))
            .collect();
        format!(
            "every window as a crash-free run has it: {} windows, {} in the store; differing \
             (window, expected, stored): {differ:?}\n{}",
            expected.len(),
            windows.len(),
            logs()
        )
    });
    eventually(Duration::from_secs(120), what, || async {
        let Ok(mut client) = StoreClient::connect(store.url()).await else {
            return false;
        };
        let mut seen = BTreeMap::new();
        for key in &keys {
            let Ok(page) = client
                .range(RangeRequest {
                    query: "per_second".into(),
                    key: key.clone(),
                    limit: 10_000,
                    ..Default::default()
                })
                .await
            else {
                return false;
            };
            for result in page.into_inner().results {
                let start = result
                    .window_start
                    .map(runnel_proto::Millis::from)
                    .unwrap_or_default()
                    .0;
                seen.insert((result.key, start), result.values["count"]);
            }
        }
        let done = seen == expected;
        *windows.lock().unwrap() = seen;
        done
    })
    .await;
}
