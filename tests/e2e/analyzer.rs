//! The analyzer's exactly-once promise, over real processes: the same events give the
//! same store contents — every window of every query, bit for bit — whether the analyzer
//! ran undisturbed, was SIGKILLed at random moments twenty times, ran as two instances
//! with nothing on disk in common one of which was killed or paused past its session
//! timeout (also with each instance talking to a different broker in front of one
//! JetStream), or found an older checkpoint put back after a newer one.
//!
//! The workload mixes what makes this hard: keys on every partition, events out of order
//! within the allowed disorder, events beyond it (late, counted, sent to a side output),
//! events inside the allowed lateness (updates of closed windows), sliding and session
//! windows, sketches (HyperLogLog, Space-Saving, DDSketch, bottom-k samples) and a
//! one-to-many query that goes through the re-keying stage.

use runnel_client::{Producer, ProducerOptions};
use runnel_e2e::{PARTITIONS, ServiceProcess};
use runnel_proto::Millis;
use runnel_proto::v1::analyzer_client::AnalyzerClient;
use runnel_proto::v1::broker_client::BrokerClient;
use runnel_proto::v1::store_client::StoreClient;
use runnel_proto::v1::{
    Acks, DescribeTopicRequest, Event, FetchRequest, ListQueriesRequest, ListTopicsRequest,
    RangeRequest,
};
use runnel_testkit::nats::NatsNode;
use runnel_testkit::{Deferred, Tool, eventually, holds_within};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;
use tokio::sync::OnceCell;

const T0: i64 = 1_700_000_000_000;
const S: i64 = 1000;
const ROUNDS: usize = 20;
pub(crate) const QUERIES: [&str; 4] = ["counts", "sliding", "sessions", "topics"];
const TAGS: [&str; 5] = ["rust", "go", "music", "hiking", "food"];

/// Four queries over two topics; time is event time only (no idleness), so that the
/// results are a function of the input alone.
pub(crate) const QUERIES_TOML: &str = r#"
checkpoint_interval = "50ms"
session_timeout = "2s"

[[analyzer.queries]]
name = "counts"
topic = "events"
event_type = "reading"
window = "10s"
out_of_orderness = "2s"
allowed_lateness = "3s"
idle_timeout = "1h"
late_topic = "late-readings"
aggregates = [{ fn = "count" }, { fn = "sum", of = "payload.value" }, { fn = "avg", of = "payload.value" }, { fn = "max", of = "payload.value" }]

[[analyzer.queries]]
name = "sliding"
topic = "events"
event_type = "reading"
value = "payload.value"
window = { type = "sliding", size = "10s", slide = "5s" }
out_of_orderness = "2s"
idle_timeout = "1h"
emit = "on_update"
aggregates = [{ fn = "avg" }, { fn = "min" }, { fn = "stddev" }]

[[analyzer.queries]]
name = "sessions"
topic = "events"
event_type = "reading"
window = { type = "session", gap = "3s" }
out_of_orderness = "2s"
idle_timeout = "1h"
aggregates = [{ fn = "count" }, { fn = "distinct", of = "payload.user", name = "users" }, { fn = "top_k", of = "payload.page", k = 2 }, { fn = "percentiles", of = "payload.value", quantiles = [0.5, 0.9] }, { fn = "new_items", of = "payload.page", name = "new_pages" }]

[[analyzer.queries]]
name = "topics"
topic = "meetup"
event_type = "rsvp"
key = "payload.tags[]"
window = "10s"
out_of_orderness = "2s"
idle_timeout = "1h"
aggregates = [{ fn = "count" }, { fn = "sample", of = "id", size = 3 }]
"#;

/// The workload, identical for every run: (topic, event).
pub(crate) fn workload() -> Vec<(&'static str, Event)> {
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut next = move |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    let mut events = Vec::new();
    for i in 0..1500i64 {
        let base = T0 + i * 60; // 90 s of event time
        let key = format!("k{}", next(12));
        let (kind, at) = match next(50) {
            0 => ("reading", base - 25 * S), // far beyond the disorder: late
            1 => ("reading", base - 4 * S),  // late, but within the allowed lateness
            _ => ("reading", base - next(1500) as i64),
        };
        let value = next(200) as f64 / 4.0; // exact in binary: sums do not depend on rounding
        let payload = serde_json::json!({
            "value": value,
            "user": format!("u{}", next(30)),
            "page": format!("/p{}", next(5) * next(3)),
        });
        events.push(("events", event(format!("e{i}"), &key, kind, at, payload)));
        if i % 3 == 0 {
            let tags: Vec<&str> = TAGS.iter().copied().filter(|_| next(2) == 0).collect();
            let payload = serde_json::json!({ "tags": tags, "group": next(4) });
            let at = base - next(1500) as i64;
            events.push((
                "meetup",
                event(
                    format!("m{i}"),
                    &format!("g{}", next(7)),
                    "rsvp",
                    at,
                    payload,
                ),
            ));
        }
    }
    // Move every partition's clock far ahead: every window closes and is dropped.
    for topic in ["events", "meetup"] {
        for partition in 0..PARTITIONS {
            let key = (0..)
                .map(|i| format!("clock-{i}"))
                .find(|k| runnel_proto::partition_for_key(k, PARTITIONS) == partition)
                .expect("a key for every partition");
            let payload = serde_json::json!({});
            events.push((
                topic,
                event(
                    format!("{topic}-end-{partition}"),
                    &key,
                    "clock",
                    T0 + 1000 * S,
                    payload,
                ),
            ));
        }
    }
    events
}

fn event(id: String, key: &str, kind: &str, at: i64, payload: serde_json::Value) -> Event {
    Event {
        id,
        source: "e2e".into(),
        r#type: kind.into(),
        key: key.into(),
        event_time: Some(Millis(at).into()),
        payload: serde_json::to_vec(&payload).expect("json").into(),
        ..Event::default()
    }
}

/// (query, key, window start) → (values as bits, items).
pub(crate) type Snapshot = BTreeMap<Window, Version>;

/// (query, key, window start).
pub(crate) type Window = (String, String, i64);

/// A result's values and items, as bits, and whether it is partial.
pub(crate) type Version = (Vec<(String, u64)>, Vec<(String, Vec<(String, u64)>)>, bool);

/// Broker, store and the analyzer config file, in one temporary directory — and, for a
/// broker on JetStream, the NATS server (stopped when the cluster is dropped).
struct Cluster {
    dir: tempfile::TempDir,
    config: std::path::PathBuf,
    broker: ServiceProcess,
    store: ServiceProcess,
    nats: Option<NatsNode>,
}

impl Cluster {
    /// With `fenced_store`, the store follows the broker and so enforces the analyzers'
    /// group fences on its `Put`s (a local-mode store cannot: a zombie instance's partial
    /// window could land over its successor's) — what tests of several instances need.
    async fn start(fenced_store: bool) -> Cluster {
        Cluster::start_on(fenced_store, false).await
    }

    /// With `jetstream`, the broker keeps its topics (and its groups) in a NATS server of
    /// the cluster's own, so that more brokers can stand in front of it.
    async fn start_on(fenced_store: bool, jetstream: bool) -> Cluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let nats = if jetstream {
            let nats_dir = dir.path().join("nats");
            std::fs::create_dir_all(&nats_dir).expect("nats directory");
            Some(NatsNode::start(&nats_dir, &[]).await)
        } else {
            None
        };
        let engine = match &nats {
            Some(nats) => format!(
                "storage = \"jetstream\"\njetstream = {{ servers = [\"{}\"], replicas = 1 }}\n",
                nats.url
            ),
            None => String::new(),
        };
        let d = dir.path().display();
        let server =
            r#"server = { grpc = "127.0.0.1:0", admin = "127.0.0.1:0", drain_timeout = "5s" }"#;
        let config = dir.path().join("runnel.toml");
        std::fs::write(
            &config,
            format!(
                "[broker]\n{server}\ndata_dir = \"{d}/broker\"\ndefault_partitions = {PARTITIONS}\nfsync = \"never\"\n{engine}[store]\n{server}\ndata_dir = \"{d}/store\"\nfsync = \"never\"\n[analyzer]\n{server}\ndata_dir = \"{d}/analyzer\"\n{QUERIES_TOML}"
            ),
        )
        .expect("config");
        let env = BTreeMap::new();
        let broker = ServiceProcess::start("runnel-broker", &config, &env, dir.path())
            .await
            .expect("broker starts");
        let mut store_env = BTreeMap::new();
        if fenced_store {
            store_env.insert("RUNNEL_STORE__BROKER".to_owned(), broker.url());
        }
        let store = ServiceProcess::start("runnel-store", &config, &store_env, dir.path())
            .await
            .expect("store starts");
        Cluster {
            dir,
            config,
            broker,
            store,
            nats,
        }
    }

    /// Another broker in front of the same NATS server, as another pod behind the
    /// brokers' Service would be.
    async fn another_broker(&self, name: &str) -> ServiceProcess {
        assert!(
            self.nats.is_some(),
            "only brokers on JetStream share topics"
        );
        let home = self.dir.path().join(name);
        std::fs::create_dir_all(&home).expect("broker directory");
        let env = BTreeMap::from([(
            "RUNNEL_BROKER__DATA_DIR".to_owned(),
            home.join("data").display().to_string(),
        )]);
        ServiceProcess::start("runnel-broker", &self.config, &env, &home)
            .await
            .unwrap_or_else(|e| panic!("broker {name} starts: {e:#}\n{}", self.logs()))
    }

    async fn analyzer(&self, member: &str) -> ServiceProcess {
        let env = BTreeMap::from([
            ("RUNNEL_ANALYZER__BROKER".to_owned(), self.broker.url()),
            ("RUNNEL_ANALYZER__STORE".to_owned(), self.store.url()),
            ("RUNNEL_ANALYZER__MEMBER_ID".to_owned(), member.to_owned()),
        ]);
        ServiceProcess::start("runnel-analyzer", &self.config, &env, self.dir.path())
            .await
            .unwrap_or_else(|e| panic!("analyzer {member} starts: {e:#}\n{}", self.logs()))
    }

    /// An analyzer as if on a machine of its own: its own data directory (which an
    /// analyzer that keeps its checkpoints on disk would use) and its own log.
    async fn analyzer_apart(&self, member: &str) -> ServiceProcess {
        self.analyzer_apart_on(member, &self.broker).await
    }

    /// An analyzer apart that talks to `broker`.
    async fn analyzer_apart_on(&self, member: &str, broker: &ServiceProcess) -> ServiceProcess {
        let home = self.dir.path().join(member);
        std::fs::create_dir_all(&home).expect("instance directory");
        let env = BTreeMap::from([
            ("RUNNEL_ANALYZER__BROKER".to_owned(), broker.url()),
            ("RUNNEL_ANALYZER__STORE".to_owned(), self.store.url()),
            ("RUNNEL_ANALYZER__MEMBER_ID".to_owned(), member.to_owned()),
            (
                "RUNNEL_ANALYZER__DATA_DIR".to_owned(),
                home.join("data").display().to_string(),
            ),
        ]);
        ServiceProcess::start("runnel-analyzer", &self.config, &env, &home)
            .await
            .unwrap_or_else(|e| panic!("analyzer {member} starts: {e:#}\n{}", self.logs()))
    }

    /// Whether every analyzer group has committed every record of every topic it reads:
    /// everything produced so far is in a checkpoint.
    async fn checkpointed(&self) -> bool {
        let Ok(mut broker) = BrokerClient::connect(self.broker.url()).await else {
            return false;
        };
        let Ok(listed) = broker.list_topics(ListTopicsRequest {}).await else {
            return false;
        };
        let mut groups = 0;
        for topic in listed.into_inner().topics {
            let input = topic.name == "events"
                || topic.name == "meetup"
                || (topic.name.starts_with("_analyzer.") && topic.name.ends_with(".keyed"));
            if !input {
                continue;
            }
            let Ok(described) = broker
                .describe_topic(DescribeTopicRequest {
                    name: topic.name.clone(),
                })
                .await
            else {
                return false;
            };
            for group in described.into_inner().groups {
                if !group.group.starts_with("runnel-analyzer.") {
                    continue;
                }
                groups += 1;
                if group.partitions.iter().any(|p| p.lag > 0) {
                    return false;
                }
            }
        }
        // counts, sliding, sessions and topics, and the keyed stage of topics.
        groups == QUERIES.len() + 1
    }

    async fn producer(&self, topic: &str) -> Producer {
        let channel =
            runnel_client::connect_lazy(&self.broker.url(), &Default::default()).expect("url");
        let options = ProducerOptions {
            acks: Acks::Leader,
            create_partitions: Some(PARTITIONS),
            ..ProducerOptions::default()
        };
        Producer::new(BrokerClient::new(channel), topic, options)
            .await
            .expect("producer")
    }

    fn logs(&self) -> String {
        let mut out = String::new();
        let top = std::fs::read_dir(self.dir.path())
            .into_iter()
            .flatten()
            .flatten();
        // Instances apart log into a directory of their own.
        let apart = top
            .filter(|e| e.path().is_dir())
            .flat_map(|e| std::fs::read_dir(e.path()).into_iter().flatten().flatten());
        let entries: Vec<_> = std::fs::read_dir(self.dir.path())
            .into_iter()
            .flatten()
            .flatten()
            .chain(apart)
            .collect();
        for entry in entries {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "log") {
                out.push_str(&format!(
                    "===== {} =====\n{}\n",
                    path.display(),
                    std::fs::read_to_string(&path).unwrap_or_default()
                ));
            }
        }
        out
    }

    /// Every result of the test's queries, through the store's `Range`.
    async fn snapshot(&self, keys: &BTreeMap<&str, BTreeSet<String>>) -> Snapshot {
        snapshot(&self.store.url(), keys).await
    }
}

/// Every result of the test's queries in the store at `store_url`, through its `Range`.
pub(crate) async fn snapshot(store_url: &str, keys: &BTreeMap<&str, BTreeSet<String>>) -> Snapshot {
    let mut store = StoreClient::connect(store_url.to_owned())
        .await
        .expect("store");
    let mut all = Snapshot::new();
    for (query, keys) in keys {
        for key in keys {
            let results = store
                .range(RangeRequest {
                    query: (*query).into(),
                    key: key.clone(),
                    limit: 10_000,
                    ..Default::default()
                })
                .await
                .expect("range")
                .into_inner()
                .results;
            for r in &results {
                let (window, version) = version(r);
                all.insert(window, version);
            }
        }
    }
    all
}

/// A result as the comparisons see it: its window, and its values and items as bits.
pub(crate) fn version(r: &runnel_proto::v1::QueryResult) -> (Window, Version) {
    let mut values: Vec<(String, u64)> = r
        .values
        .iter()
        .map(|(k, v)| (k.clone(), v.to_bits()))
        .collect();
    values.sort();
    let mut items: Vec<(String, Vec<(String, u64)>)> = r
        .items
        .iter()
        .map(|(k, list)| {
            (
                k.clone(),
                list.items
                    .iter()
                    .map(|i| (i.item.clone(), i.value.to_bits()))
                    .collect(),
            )
        })
        .collect();
    items.sort();
    let start = Millis::from(r.window_start.expect("start")).0;
    (
        (r.query.clone(), r.key.clone(), start),
        (values, items, r.partial),
    )
}

/// The keys each query can have results for.
pub(crate) fn keys(events: &[(&str, Event)]) -> BTreeMap<&'static str, BTreeSet<String>> {
    let readings: BTreeSet<String> = events
        .iter()
        .filter(|(t, _)| *t == "events")
        .map(|(_, e)| e.key.clone())
        .collect();
    let tags: BTreeSet<String> = TAGS.iter().map(|t| (*t).to_owned()).collect();
    BTreeMap::from([
        ("counts", readings.clone()),
        ("sliding", readings.clone()),
        ("sessions", readings),
        ("topics", tags),
    ])
}

pub(crate) async fn produce(
    producers: &mut HashMap<&'static str, Producer>,
    events: &[(&'static str, Event)],
) {
    for topic in ["events", "meetup"] {
        let batch: Vec<Event> = events
            .iter()
            .filter(|(t, _)| *t == topic)
            .map(|(_, e)| e.clone())
            .collect();
        if !batch.is_empty() {
            producers
                .get_mut(topic)
                .expect("producer")
                .send(batch)
                .await
                .expect("produced");
        }
    }
}

/// Every query of `analyzer` has read `expected` events and holds no window.
pub(crate) async fn settled(analyzers: &[&ServiceProcess], expected: &HashMap<&str, u64>) -> bool {
    let mut processed: HashMap<String, u64> = HashMap::new();
    let mut open = 0;
    for analyzer in analyzers {
        let Ok(mut client) = AnalyzerClient::connect(analyzer.url()).await else {
            return false;
        };
        let Ok(listed) = client.list_queries(ListQueriesRequest {}).await else {
            return false;
        };
        for q in listed.into_inner().queries {
            *processed
                .entry(q.source_topic.clone() + "/" + &q.name)
                .or_default() += q.events_processed;
            open += q.open_windows;
        }
    }
    open == 0
        && QUERIES.iter().all(|q| {
            let topic = if *q == "topics" { "meetup" } else { "events" };
            processed.get(&format!("{topic}/{q}")) == Some(&expected[topic])
        })
}

pub(crate) fn counts(events: &[(&str, Event)]) -> HashMap<&'static str, u64> {
    let mut counts = HashMap::new();
    for topic in ["events", "meetup"] {
        counts.insert(
            topic,
            events.iter().filter(|(t, _)| *t == topic).count() as u64,
        );
    }
    counts
}

/// The results of a run without failures, computed once for the tests that compare.
pub(crate) async fn reference() -> &'static Snapshot {
    static REFERENCE: OnceCell<Snapshot> = OnceCell::const_new();
    REFERENCE
        .get_or_init(|| async {
            let events = workload();
            let cluster = Cluster::start(false).await;
            let analyzer = cluster.analyzer("reference").await;
            let mut producers = HashMap::from([
                ("events", cluster.producer("events").await),
                ("meetup", cluster.producer("meetup").await),
            ]);
            for chunk in events.chunks(200) {
                produce(&mut producers, chunk).await;
            }
            let expected = counts(&events);
            let analyzers = [&analyzer];
            eventually(
                Duration::from_secs(180),
                Deferred(|| format!("the reference run to settle\n{}", cluster.logs())),
                || settled(&analyzers, &expected),
            )
            .await;
            let snapshot = cluster.snapshot(&keys(&events)).await;
            for query in QUERIES {
                assert!(
                    snapshot.keys().any(|(q, _, _)| q == query),
                    "no results for {query}\n{}",
                    cluster.logs()
                );
            }
            snapshot
        })
        .await
}

pub(crate) fn diff(found: &Snapshot, expected: &Snapshot) -> String {
    let mut lines = Vec::new();
    for (k, v) in expected {
        match found.get(k) {
            None => lines.push(format!("missing {k:?}")),
            Some(f) if f != v => lines.push(format!("differs {k:?}: {f:?} vs {v:?}")),
            _ => {}
        }
    }
    for k in found.keys().filter(|k| !expected.contains_key(*k)) {
        lines.push(format!("extra {k:?}"));
    }
    lines.truncate(20);
    lines.join("\n")
}

async fn check_against_reference(
    cluster: &Cluster,
    analyzers: &[&ServiceProcess],
    events: &[(&'static str, Event)],
) {
    let expected = reference().await;
    let keys = keys(events);
    let counts = counts(events);
    let matched = holds_within(Duration::from_secs(180), || async {
        settled(analyzers, &counts).await && cluster.snapshot(&keys).await == *expected
    })
    .await;
    if matched.is_none() {
        let found = cluster.snapshot(&keys).await;
        panic!(
            "results differ from the crash-free run:\n{}\n{}",
            diff(&found, expected),
            cluster.logs()
        );
    }
    assert!(
        expected.len() > 100,
        "a workload worth the name: {} windows",
        expected.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_twenty_times_the_analyzer_ends_with_the_crash_free_results() {
    let events = workload();
    let cluster = Cluster::start(true).await;
    let mut analyzer = cluster.analyzer("crashy").await;
    let mut producers = HashMap::from([
        ("events", cluster.producer("events").await),
        ("meetup", cluster.producer("meetup").await),
    ]);
    let chunks: Vec<&[(&str, Event)]> = events.chunks(events.len() / ROUNDS + 1).collect();
    for (round, chunk) in chunks.iter().enumerate() {
        produce(&mut producers, chunk).await;
        // Strike at a random moment: while reading, writing results or checkpointing.
        tokio::time::sleep(Duration::from_millis(rand::random::<u64>() % 400)).await;
        analyzer.kill().await.expect("SIGKILL");
        analyzer = analyzer
            .restart()
            .await
            .unwrap_or_else(|e| panic!("round {round}: restart: {e:#}\n{}", cluster.logs()));
    }
    assert!(chunks.len() >= ROUNDS, "{} rounds", chunks.len());
    check_against_reference(&cluster, &[&analyzer], &events).await;
    // The late events went to the side output.
    let late = count_records(&cluster, "late-readings").await;
    assert!(late > 0, "late events reach the side output");
}

/// The partitions of the first query each of `analyzers` owns.
async fn owned(analyzers: &[&ServiceProcess]) -> Option<Vec<Vec<u32>>> {
    let mut owned = Vec::new();
    for a in analyzers {
        let mut client = AnalyzerClient::connect(a.url()).await.ok()?;
        let q = client.list_queries(ListQueriesRequest {}).await.ok()?;
        owned.push(q.into_inner().queries[0].partitions.clone());
    }
    Some(owned)
}

/// Waits until both `analyzers` own some of the first query's partitions.
async fn shared(cluster: &Cluster, analyzers: [&ServiceProcess; 2]) {
    eventually(
        Duration::from_secs(60),
        Deferred(|| format!("the partitions to be shared out\n{}", cluster.logs())),
        || async {
            owned(&analyzers).await.is_some_and(|owned| {
                !owned[0].is_empty()
                    && !owned[1].is_empty()
                    && owned[0].len() + owned[1].len() == PARTITIONS as usize
            })
        },
    )
    .await;
}

/// Two instances under the workload: both come to own some partitions (and checkpoint
/// them), then `second` is killed with SIGKILL and the survivor must end with the
/// crash-free results, taking the dead one's partitions over from their checkpoints.
async fn share_then_lose_one(
    cluster: &Cluster,
    first: &ServiceProcess,
    mut second: ServiceProcess,
    events: &[(&'static str, Event)],
) {
    let mut producers = HashMap::from([
        ("events", cluster.producer("events").await),
        ("meetup", cluster.producer("meetup").await),
    ]);
    let (before, rest) = events.split_at(events.len() / 3);
    let (during, after) = rest.split_at(rest.len() / 2);
    produce(&mut producers, before).await;
    shared(cluster, [first, &second]).await;
    produce(&mut producers, during).await;
    eventually(
        Duration::from_secs(60),
        Deferred(|| format!("everything produced to be checkpointed\n{}", cluster.logs())),
        || cluster.checkpointed(),
    )
    .await;
    second.kill().await.expect("SIGKILL");
    produce(&mut producers, after).await;
    check_against_reference(cluster, &[first], events).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_the_partitions_and_survive_losing_one() {
    let events = workload();
    let cluster = Cluster::start(true).await;
    // Nothing on disk in common: the partitions' state can only move through the broker.
    let first = cluster.analyzer_apart("instance-a").await;
    let second = cluster.analyzer_apart("instance-b").await;
    share_then_lose_one(&cluster, &first, second, &events).await;
    // The checkpoints live in the broker, partition for partition, under a retention that keeps
    // the hourly refresh of an idle partition's checkpoint.
    let mut broker = BrokerClient::connect(cluster.broker.url())
        .await
        .expect("broker");
    let topics = broker
        .list_topics(ListTopicsRequest {})
        .await
        .expect("list")
        .into_inner()
        .topics;
    for query in ["counts", "sliding", "sessions", "topics"] {
        let name = format!("_analyzer.{query}.source.checkpoints");
        let topic = topics.iter().find(|t| t.name == name).expect(&name);
        assert_eq!(topic.partitions.len(), PARTITIONS as usize, "{name}");
        let retention = topic.retention.expect("retention");
        assert_eq!(retention.max_age.map(|a| a.seconds), Some(7 * 24 * 3600));
        assert_eq!(retention.max_bytes, Some(256 << 20));
    }
    assert!(
        topics
            .iter()
            .any(|t| t.name == "_analyzer.topics.keyed.checkpoints"),
        "the keyed stage checkpoints too"
    );
}

/// Two brokers in front of one JetStream, and an instance talking to each: the instances
/// are still one group (the membership is in JetStream, not in either broker), so they
/// share the partitions rather than each process all of them, the store (following the
/// first broker) checks the second instance's fences against that same group, and the
/// survivor of a kill takes over from the checkpoints — with the crash-free results.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_on_two_jetstream_brokers_are_one_group() {
    if !runnel_testkit::require(Tool::NatsServer) {
        return;
    }
    let events = workload();
    let cluster = Cluster::start_on(true, true).await;
    let other_broker = cluster.another_broker("broker-b").await;
    let first = cluster
        .analyzer_apart_on("instance-a", &cluster.broker)
        .await;
    let second = cluster.analyzer_apart_on("instance-b", &other_broker).await;
    share_then_lose_one(&cluster, &first, second, &events).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_paused_past_its_session_timeout_is_fenced_and_rejoins() {
    let events = workload();
    let cluster = Cluster::start(true).await;
    let steady = cluster.analyzer_apart("steady").await;
    let paused = cluster.analyzer_apart("paused").await;
    let mut producers = HashMap::from([
        ("events", cluster.producer("events").await),
        ("meetup", cluster.producer("meetup").await),
    ]);
    let (first, rest) = events.split_at(events.len() / 3);
    let (second, third) = rest.split_at(rest.len() / 2);
    produce(&mut producers, first).await;
    shared(&cluster, [&steady, &paused]).await;
    // Paused with records on their way to it: when it wakes up it has windows to write and
    // offsets to commit for partitions that are no longer its own.
    paused.pause().expect("SIGSTOP");
    produce(&mut producers, second).await;
    eventually(
        Duration::from_secs(60),
        Deferred(|| {
            format!(
                "the steady instance to take every partition\n{}",
                cluster.logs()
            )
        }),
        || async {
            owned(&[&steady])
                .await
                .is_some_and(|owned| owned[0].len() == PARTITIONS as usize)
        },
    )
    .await;
    paused.resume().expect("SIGCONT");
    produce(&mut producers, third).await;
    check_against_reference(&cluster, &[&steady, &paused], &events).await;
    let log = std::fs::read_to_string(cluster.dir.path().join("paused/runnel-analyzer.log"))
        .unwrap_or_default();
    assert!(
        log.contains("fenced") && log.contains("dropping every task and joining the group again"),
        "the paused instance noticed it was fenced and joined again\n{}",
        cluster.logs()
    );
}

/// A snapshot of every checkpoint the analyzer has taken: its data directory (where an
/// analyzer that keeps checkpoints on disk has them) and the records of its checkpoint
/// topics (where an analyzer that keeps them in the broker has them).
struct Checkpoints {
    files: tempfile::TempDir,
    records: Vec<(String, u32, Vec<Event>)>,
}

impl Checkpoints {
    async fn take(cluster: &Cluster) -> Checkpoints {
        let files = tempfile::tempdir().expect("tempdir");
        copy_tree(&cluster.dir.path().join("analyzer"), files.path());
        let mut broker = BrokerClient::connect(cluster.broker.url())
            .await
            .expect("broker");
        let topics = broker
            .list_topics(ListTopicsRequest {})
            .await
            .expect("list")
            .into_inner()
            .topics;
        let mut records = Vec::new();
        for topic in topics.iter().filter(|t| t.name.ends_with(".checkpoints")) {
            for partition in &topic.partitions {
                let mut events = Vec::new();
                let mut offset = partition.start_offset;
                while offset < partition.end_offset {
                    let fetched = broker
                        .fetch(FetchRequest {
                            topic: topic.name.clone(),
                            partition: partition.partition,
                            offset,
                            ..FetchRequest::default()
                        })
                        .await
                        .expect("fetch")
                        .into_inner();
                    assert!(!fetched.records.is_empty(), "records up to the end offset");
                    offset = fetched.next_offset;
                    events.extend(fetched.records.into_iter().filter_map(|r| r.event));
                }
                records.push((topic.name.clone(), partition.partition, events));
            }
        }
        Checkpoints { files, records }
    }

    /// Puts these (older) checkpoints back over the newer ones: the files renamed over
    /// the newer files, the records appended after the newer records — a stale writer's
    /// last act landing after the new owner's.
    async fn put_back(&self, cluster: &Cluster) {
        copy_tree(self.files.path(), &cluster.dir.path().join("analyzer"));
        for (topic, partition, events) in &self.records {
            if !events.is_empty() {
                cluster
                    .producer(topic)
                    .await
                    .send_to(*partition, events)
                    .await
                    .expect("put back");
            }
        }
    }
}

fn copy_tree(from: &std::path::Path, to: &std::path::Path) {
    for entry in std::fs::read_dir(from).into_iter().flatten().flatten() {
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            std::fs::create_dir_all(&target).expect("mkdir");
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy");
        }
    }
}

/// The stale-checkpoint case: an instance checkpoints, checkpoints again further on (and
/// the group commits that), dies, and its older checkpoint is put back after the newer one
/// — as when an evicted instance's late write lands after the new owner's. The next owner
/// must continue from the state that goes with the group's offset, and lose nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_checkpoint_put_back_after_a_newer_one_loses_no_record() {
    let events = workload();
    let cluster = Cluster::start(true).await;
    let mut first = cluster.analyzer("first").await;
    let mut producers = HashMap::from([
        ("events", cluster.producer("events").await),
        ("meetup", cluster.producer("meetup").await),
    ]);
    let (one, rest) = events.split_at(events.len() / 3);
    let (two, three) = rest.split_at(rest.len() / 2);
    let all_in_a_checkpoint = || {
        eventually(
            Duration::from_secs(60),
            Deferred(|| format!("everything produced to be checkpointed\n{}", cluster.logs())),
            || cluster.checkpointed(),
        )
    };
    produce(&mut producers, one).await;
    all_in_a_checkpoint().await;
    let older = Checkpoints::take(&cluster).await;
    produce(&mut producers, two).await;
    all_in_a_checkpoint().await;
    first.kill().await.expect("SIGKILL");
    older.put_back(&cluster).await;
    let second = cluster.analyzer("second").await;
    produce(&mut producers, three).await;
    check_against_reference(&cluster, &[&second], &events).await;
}

async fn count_records(cluster: &Cluster, topic: &str) -> u64 {
    let mut broker = BrokerClient::connect(cluster.broker.url())
        .await
        .expect("broker");
    let topics = broker
        .list_topics(runnel_proto::v1::ListTopicsRequest {})
        .await
        .expect("list")
        .into_inner()
        .topics;
    topics
        .iter()
        .find(|t| t.name == topic)
        .map(|t| t.partitions.iter().map(|p| p.end_offset).sum())
        .unwrap_or(0)
}

/// A query created at run time, as the test sends it.
const CREATED_SQL: &str = "SELECT key, count(*) AS n, sum(payload.value) AS total \
     FROM clicks WHERE type = 'click' \
     GROUP BY key, TUMBLE(event_time, INTERVAL '10' SECOND) \
     EMIT ON UPDATE WITH (out_of_orderness = '1h', idle_timeout = '1h')";

/// `count` clicks and views on 5 keys over 6 windows, numbered from `first`.
fn clicks(first: usize, count: usize) -> Vec<Event> {
    (first..first + count)
        .map(|i| Event {
            id: format!("click-{i}"),
            key: format!("user-{}", i % 5),
            r#type: if i % 3 == 0 { "view" } else { "click" }.into(),
            event_time: Some(Millis(T0 + (i as i64 % 60) * S).into()),
            payload: serde_json::to_vec(&serde_json::json!({ "value": i % 7 }))
                .expect("json")
                .into(),
            ..Event::default()
        })
        .collect()
}

/// (key, window start) → (n, total) over `events`, as `CREATED_SQL` computes them.
fn clicks_expected(events: &[Event]) -> BTreeMap<(String, i64), (f64, f64)> {
    let mut expected: BTreeMap<(String, i64), (f64, f64)> = BTreeMap::new();
    for e in events.iter().filter(|e| e.r#type == "click") {
        let at = Millis::from(e.event_time.expect("time")).0;
        let value: serde_json::Value = serde_json::from_slice(&e.payload).expect("json");
        let entry = expected
            .entry((e.key.clone(), at.div_euclid(10 * S) * 10 * S))
            .or_default();
        entry.0 += 1.0;
        entry.1 += value["value"].as_f64().expect("value");
    }
    expected
}

/// (key, window start) → (n, total) of query `query` in the store.
async fn clicks_found(store_url: &str, query: &str) -> BTreeMap<(String, i64), (f64, f64)> {
    let keys: BTreeSet<String> = (0..5).map(|k| format!("user-{k}")).collect();
    let found = snapshot(store_url, &BTreeMap::from([(query, keys)])).await;
    found
        .into_iter()
        .map(|((_, key, start), (values, _, _))| {
            let value = |name: &str| {
                values
                    .iter()
                    .find(|(n, _)| n == name)
                    .map_or(f64::NAN, |(_, bits)| f64::from_bits(*bits))
            };
            ((key, start), (value("n"), value("total")))
        })
        .collect()
}

/// Queries created through the API while events flow: each replica runs them, sharing
/// their partitions; one starts from the earliest record, the other only from what came
/// after it was created; one replica is SIGKILLed and restarted while they run; in the
/// end every window of both equals a straightforward count of the events each should
/// have seen. Every service is then killed and started again, and both go on exactly.
/// Dropped (with its results deleted), a query is gone from every replica and the store;
/// created again under the same name, it starts from nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_created_at_run_time_run_on_every_replica_and_survive_sigkill() {
    use runnel_proto::v1::{CreateQueryRequest, DropQueryRequest, StartFrom};
    let mut cluster = Cluster::start(true).await;
    let mut first = cluster.analyzer_apart("instance-a").await;
    let mut second = cluster.analyzer_apart("instance-b").await;
    let mut producer = cluster.producer("clicks").await;
    let before = clicks(0, 300);
    producer.send(before.clone()).await.expect("produced");

    let create = |url: String, name: &'static str, start_from: StartFrom| async move {
        let mut client = AnalyzerClient::connect(url).await.expect("analyzer");
        client
            .create_query(CreateQueryRequest {
                name: name.into(),
                sql: CREATED_SQL.into(),
                start_from: start_from as i32,
            })
            .await
            .unwrap_or_else(|s| panic!("create {name}: {s:?}"))
            .into_inner()
    };
    let since = create(first.url(), "clicks_since", StartFrom::Latest).await;
    assert!(since.created && since.sql == CREATED_SQL, "{since:?}");
    create(second.url(), "clicks_all", StartFrom::Earliest).await;
    let mut client = AnalyzerClient::connect(first.url())
        .await
        .expect("analyzer");
    let again = client
        .create_query(CreateQueryRequest {
            name: "clicks_all".into(),
            sql: CREATED_SQL.into(),
            start_from: 0,
        })
        .await
        .expect_err("a name in use");
    assert_eq!(again.code(), tonic::Code::AlreadyExists);
    let bad = client
        .create_query(CreateQueryRequest {
            name: "bad".into(),
            sql: "SELECT key, count(*) FROM clicks GROUP BY key".into(),
            start_from: 0,
        })
        .await
        .expect_err("no window");
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);

    // Both replicas run both, and share their partitions out.
    let partitions = |url: String| async move {
        let mut client = AnalyzerClient::connect(url).await.ok()?;
        let listed = client.list_queries(ListQueriesRequest {}).await.ok()?;
        let owned: BTreeMap<String, usize> = listed
            .into_inner()
            .queries
            .into_iter()
            .filter(|q| q.created)
            .map(|q| (q.name, q.partitions.len()))
            .collect();
        Some(owned)
    };
    eventually(
        Duration::from_secs(60),
        Deferred(|| {
            format!(
                "both replicas to share both created queries\n{}",
                cluster.logs()
            )
        }),
        || async {
            let (Some(a), Some(b)) = (
                partitions(first.url()).await,
                partitions(second.url()).await,
            ) else {
                return false;
            };
            ["clicks_since", "clicks_all"].iter().all(|q| {
                let (x, y) = (
                    a.get(*q).copied().unwrap_or(0),
                    b.get(*q).copied().unwrap_or(0),
                );
                x > 0 && y > 0 && x + y == PARTITIONS as usize
            })
        },
    )
    .await;

    let after: Vec<Event> = clicks(300, 900);
    for (round, chunk) in after.chunks(300).enumerate() {
        producer.send(chunk.to_vec()).await.expect("produced");
        if round == 1 {
            tokio::time::sleep(Duration::from_millis(rand::random::<u64>() % 300)).await;
            first.kill().await.expect("SIGKILL");
            first = first
                .restart()
                .await
                .unwrap_or_else(|e| panic!("restart: {e:#}\n{}", cluster.logs()));
        }
    }
    let everything: Vec<Event> = before.iter().chain(&after).cloned().collect();
    let store = cluster.store.url();
    for (query, events) in [("clicks_all", &everything), ("clicks_since", &after)] {
        let expected = clicks_expected(events);
        eventually(
            Duration::from_secs(60),
            Deferred(|| format!("{query}'s windows to be exact\n{}", cluster.logs())),
            || async { clicks_found(&store, query).await == expected },
        )
        .await;
    }

    // Every service killed and started again: the created queries are still there, on
    // both replicas, and go on from their checkpoints, exactly.
    cluster.broker.kill().await.expect("SIGKILL");
    cluster.broker = cluster.broker.restart().await.expect("broker restarts");
    cluster.store.kill().await.expect("SIGKILL");
    cluster.store = cluster.store.restart().await.expect("store restarts");
    for analyzer in [&mut first, &mut second] {
        analyzer.kill().await.expect("SIGKILL");
        *analyzer = analyzer
            .restart()
            .await
            .unwrap_or_else(|e| panic!("restart: {e:#}\n{}", cluster.logs()));
    }
    eventually(
        Duration::from_secs(60),
        Deferred(|| {
            format!(
                "both replicas to run both created queries again\n{}",
                cluster.logs()
            )
        }),
        || async {
            for url in [first.url(), second.url()] {
                match partitions(url).await {
                    Some(owned) if owned.len() == 2 => {}
                    _ => return false,
                }
            }
            true
        },
    )
    .await;
    let mut producer = cluster.producer("clicks").await;
    let more = clicks(2000, 300);
    producer.send(more.clone()).await.expect("produced");
    let everything: Vec<Event> = everything.into_iter().chain(more.iter().cloned()).collect();
    let since: Vec<Event> = after.iter().chain(&more).cloned().collect();
    for (query, events) in [("clicks_all", &everything), ("clicks_since", &since)] {
        let expected = clicks_expected(events);
        eventually(
            Duration::from_secs(60),
            Deferred(|| {
                format!(
                    "{query}'s windows to be exact after the restarts\n{}",
                    cluster.logs()
                )
            }),
            || async { clicks_found(&store, query).await == expected },
        )
        .await;
    }

    // Dropped with its results: gone from both replicas and from the store.
    let mut client = AnalyzerClient::connect(second.url())
        .await
        .expect("analyzer");
    let dropped = client
        .drop_query(DropQueryRequest {
            name: "clicks_since".into(),
            delete_results: true,
        })
        .await
        .expect("drop")
        .into_inner();
    assert!(dropped.results_deleted > 0, "{dropped:?}");
    assert!(clicks_found(&store, "clicks_since").await.is_empty());
    eventually(
        Duration::from_secs(30),
        Deferred(|| {
            format!(
                "the dropped query to stop on both replicas\n{}",
                cluster.logs()
            )
        }),
        || async {
            for url in [first.url(), second.url()] {
                match partitions(url).await {
                    Some(owned) if !owned.contains_key("clicks_since") => {}
                    _ => return false,
                }
            }
            true
        },
    )
    .await;
    // Created again: a new incarnation, which counts only what comes after it.
    create(second.url(), "clicks_since", StartFrom::Latest).await;
    let last = clicks(1200, 60);
    producer.send(last.clone()).await.expect("produced");
    let expected = clicks_expected(&last);
    eventually(
        Duration::from_secs(60),
        Deferred(|| {
            format!(
                "the query created again to count only new events\n{}",
                cluster.logs()
            )
        }),
        || async { clicks_found(&store, "clicks_since").await == expected },
    )
    .await;
    // The configured queries cannot be dropped through the API.
    let configured = client
        .drop_query(DropQueryRequest {
            name: "counts".into(),
            delete_results: false,
        })
        .await
        .expect_err("configured");
    assert_eq!(configured.code(), tonic::Code::FailedPrecondition);
}
