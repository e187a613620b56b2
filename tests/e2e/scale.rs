//! Scaling out, over real processes: three analyzers, two store replicas and two gateways,
//! each its own process with its own data directory, sharing nothing but the broker.
//!
//! Under a steady load one of each is SIGKILLed (the store replica's data directory deleted
//! before it comes back) and one analyzer is SIGSTOPped until the broker has evicted it, then
//! resumed. Afterwards every window in both store replicas equals, bit for bit, the
//! one-instance run without faults (`analyzer::reference`), and a `Watch` client that follows
//! the results through the gateways — moving to the other gateway with its last sequence when
//! one dies — has seen every window's final result, exactly once.
//!
//! A second test scales the analyzers 1 → 3 → 1 under load, with the same exact results.

use crate::analyzer::{
    QUERIES_TOML, Version, Window, counts, diff, keys, produce, reference, settled, snapshot,
    version, workload,
};
use runnel_client::{Producer, ProducerOptions};
use runnel_e2e::{PARTITIONS, ServiceProcess};
use runnel_proto::v1::broker_client::BrokerClient;
use runnel_proto::v1::gateway_client::GatewayClient;
use runnel_proto::v1::{Acks, DescribeTopicRequest, Event, WatchRequest};
use runnel_testkit::{Deferred, eventually, holds_within};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

/// The analyzers' session timeout (from `QUERIES_TOML`), which a paused one must outlast.
const SESSION_TIMEOUT: Duration = Duration::from_secs(2);

/// A broker and the config file every other process of the test reads.
struct Scaled {
    dir: tempfile::TempDir,
    config: PathBuf,
    broker: ServiceProcess,
}

impl Scaled {
    async fn start() -> Scaled {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path().display();
        let server =
            r#"server = { grpc = "127.0.0.1:0", admin = "127.0.0.1:0", drain_timeout = "5s" }"#;
        let config = dir.path().join("runnel.toml");
        std::fs::write(
            &config,
            format!(
                "[broker]\n{server}\ndata_dir = \"{d}/broker\"\ndefault_partitions = {PARTITIONS}\nfsync = \"never\"\n\
                 [store]\n{server}\nfsync = \"never\"\n\
                 [gateway]\n{server}\nhttp = \"127.0.0.1:0\"\n\
                 [analyzer]\n{server}\n{QUERIES_TOML}"
            ),
        )
        .expect("config");
        let broker = ServiceProcess::start(
            "runnel-broker",
            &config,
            &BTreeMap::new(),
            &log_dir(dir.path(), "broker"),
        )
        .await
        .expect("broker starts");
        Scaled {
            dir,
            config,
            broker,
        }
    }

    async fn process(
        &self,
        binary: &'static str,
        name: &str,
        env: &[(&str, String)],
    ) -> ServiceProcess {
        let env: BTreeMap<String, String> = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect();
        ServiceProcess::start(binary, &self.config, &env, &log_dir(self.dir.path(), name))
            .await
            .unwrap_or_else(|e| panic!("{name} starts: {e:#}\n{}", self.logs()))
    }

    fn data_dir(&self, name: &str) -> PathBuf {
        self.dir.path().join(name).join("data")
    }

    /// A store replica materialising the broker's results log into its own directory.
    async fn store(&self, name: &str) -> ServiceProcess {
        let data = self.data_dir(name).display().to_string();
        self.process(
            "runnel-store",
            name,
            &[
                ("RUNNEL_STORE__BROKER", self.broker.url()),
                ("RUNNEL_STORE__DATA_DIR", data),
            ],
        )
        .await
    }

    /// An analyzer instance of the one group, writing its results through `store`.
    async fn analyzer(&self, name: &str, store: &ServiceProcess) -> ServiceProcess {
        self.process(
            "runnel-analyzer",
            name,
            &[
                ("RUNNEL_ANALYZER__BROKER", self.broker.url()),
                ("RUNNEL_ANALYZER__STORE", store.url()),
                ("RUNNEL_ANALYZER__MEMBER_ID", name.to_owned()),
            ],
        )
        .await
    }

    /// A gateway reading from `store`.
    async fn gateway(&self, name: &str, store: &ServiceProcess) -> ServiceProcess {
        self.process(
            "runnel-gateway",
            name,
            &[
                ("RUNNEL_GATEWAY__STORE", store.url()),
                ("RUNNEL_GATEWAY__BROKER", self.broker.url()),
            ],
        )
        .await
    }

    async fn producers(&self) -> HashMap<&'static str, Producer> {
        let channel =
            runnel_client::connect_lazy(&self.broker.url(), &Default::default()).expect("url");
        let mut producers = HashMap::new();
        for topic in ["events", "meetup"] {
            let options = ProducerOptions {
                acks: Acks::Leader,
                create_partitions: Some(PARTITIONS),
                ..ProducerOptions::default()
            };
            let producer = Producer::new(BrokerClient::new(channel.clone()), topic, options)
                .await
                .expect("producer");
            producers.insert(topic, producer);
        }
        producers
    }

    /// Whether `member` is still in the `counts` query's group, as the broker sees it.
    async fn in_group(&self, member: &str) -> bool {
        let Ok(mut broker) = BrokerClient::connect(self.broker.url()).await else {
            return true;
        };
        let Ok(described) = broker
            .describe_topic(DescribeTopicRequest {
                name: "events".into(),
            })
            .await
        else {
            return true;
        };
        described
            .into_inner()
            .groups
            .iter()
            .filter(|g| g.group == "runnel-analyzer.counts")
            .any(|g| g.members.iter().any(|m| m.member_id == member))
    }

    /// Every process's log, for failure messages.
    fn logs(&self) -> String {
        let mut out = String::new();
        let mut dirs: Vec<PathBuf> = std::fs::read_dir(self.dir.path())
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_dir())
            .collect();
        dirs.sort();
        for dir in dirs {
            for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                let path = entry.path();
                if path.extension().is_some_and(|e| e == "log") {
                    let text = std::fs::read_to_string(&path).unwrap_or_default();
                    // The tail says what went wrong; whole logs of seven processes drown it.
                    let tail: Vec<&str> = text.lines().rev().take(60).collect();
                    out.push_str(&format!("===== {} =====\n", path.display()));
                    for line in tail.into_iter().rev() {
                        out.push_str(line);
                        out.push('\n');
                    }
                }
            }
        }
        out
    }
}

/// Each process logs into a directory of its own (processes of one binary would share a
/// file otherwise).
fn log_dir(root: &Path, name: &str) -> PathBuf {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).expect("log dir");
    dir
}

/// What a `Watch` client saw: every version of every window, in order, and its cursor.
#[derive(Default)]
struct Seen {
    versions: BTreeMap<Window, Vec<(Window, Version)>>,
    last_sequence: u64,
    /// Times the client had to move to another gateway.
    failovers: usize,
    /// A sequence that did not increase: a duplicate or a reordering.
    out_of_order: Vec<(u64, u64)>,
}

/// Follows every result through `gateways` from the beginning, moving to the next gateway
/// with its last sequence whenever a stream breaks, until `stop`.
async fn follow(gateways: Vec<String>, seen: Arc<Mutex<Seen>>, mut stop: watch::Receiver<bool>) {
    let mut turn = 0;
    loop {
        let url = &gateways[turn % gateways.len()];
        turn += 1;
        let after = seen.lock().expect("lock").last_sequence;
        let stream = async {
            let mut client = GatewayClient::connect(url.clone()).await.ok()?;
            let request = WatchRequest {
                after_sequence: Some(after),
                ..WatchRequest::default()
            };
            client.watch(request).await.ok().map(|r| r.into_inner())
        };
        let opened = tokio::select! {
            stream = stream => stream,
            _ = stop.changed() => return,
        };
        let Some(mut stream) = opened else {
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(100)) => continue,
                _ = stop.changed() => return,
            }
        };
        loop {
            let message = tokio::select! {
                message = stream.message() => message,
                _ = stop.changed() => return,
            };
            let Ok(Some(result)) = message else {
                seen.lock().expect("lock").failovers += 1;
                break;
            };
            let mut seen = seen.lock().expect("lock");
            if result.sequence <= seen.last_sequence {
                let last = seen.last_sequence;
                seen.out_of_order.push((last, result.sequence));
            }
            seen.last_sequence = seen.last_sequence.max(result.sequence);
            let (window, values) = version(&result);
            seen.versions
                .entry(window.clone())
                .or_default()
                .push((window, values));
        }
    }
}

/// Waits until the analyzers have read everything and both stores hold exactly the
/// reference results.
async fn check_stores(
    scaled: &Scaled,
    analyzers: &[&ServiceProcess],
    stores: &[&ServiceProcess],
    events: &[(&'static str, Event)],
) {
    let expected = reference().await;
    let keys = keys(events);
    let counts = counts(events);
    let matched = holds_within(Duration::from_secs(180), || async {
        if !settled(analyzers, &counts).await {
            return false;
        }
        for store in stores {
            if snapshot(&store.url(), &keys).await != *expected {
                return false;
            }
        }
        true
    })
    .await;
    if matched.is_none() {
        let mut report = String::new();
        for store in stores {
            let found = snapshot(&store.url(), &keys).await;
            report.push_str(&format!(
                "store at {}:\n{}\n",
                store.url(),
                diff(&found, expected)
            ));
        }
        panic!(
            "results differ from the one-instance run without faults:\n{report}\n{}",
            scaled.logs()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_analyzers_two_stores_two_gateways_lose_nothing_to_kills_and_a_pause() {
    let events = workload();
    let scaled = Scaled::start().await;
    let s1 = scaled.store("store-1").await;
    let mut s2 = scaled.store("store-2").await;
    let a1 = scaled.analyzer("analyzer-1", &s1).await;
    let mut a2 = scaled.analyzer("analyzer-2", &s2).await;
    let a3 = scaled.analyzer("analyzer-3", &s1).await;
    let mut g1 = scaled.gateway("gateway-1", &s1).await;
    let g2 = scaled.gateway("gateway-2", &s2).await;

    let seen = Arc::new(Mutex::new(Seen::default()));
    let (stop, stopped) = watch::channel(false);
    let watcher = tokio::spawn(follow(vec![g1.url(), g2.url()], Arc::clone(&seen), stopped));

    let mut producers = scaled.producers().await;
    let chunks: Vec<&[(&str, Event)]> = events.chunks(events.len() / 6 + 1).collect();
    produce(&mut producers, chunks[0]).await;

    // An analyzer dies mid-stream; its partitions move to the others and it comes back.
    a2.kill().await.expect("SIGKILL analyzer-2");
    produce(&mut producers, chunks[1]).await;
    a2 = a2.restart().await.expect("analyzer-2 restarts");

    // A store replica dies and loses its disk; it rebuilds from the results log.
    s2.kill().await.expect("SIGKILL store-2");
    std::fs::remove_dir_all(scaled.data_dir("store-2")).expect("delete store-2's data");
    produce(&mut producers, chunks[2]).await;
    s2 = s2.restart().await.expect("store-2 restarts empty");

    // A gateway dies: the watcher moves to the other one with its last sequence.
    g1.kill().await.expect("SIGKILL gateway-1");
    produce(&mut producers, chunks[3]).await;
    g1 = g1.restart().await.expect("gateway-1 restarts");

    // An analyzer stalls past its session timeout: the broker evicts it, the others take
    // its partitions, and when it wakes its writes are refused until it rejoins.
    a3.pause().expect("SIGSTOP analyzer-3");
    eventually(
        SESSION_TIMEOUT * 10,
        Deferred(|| format!("analyzer-3 to be evicted\n{}", scaled.logs())),
        || async { !scaled.in_group("analyzer-3").await },
    )
    .await;
    produce(&mut producers, chunks[4]).await;
    a3.resume().expect("SIGCONT analyzer-3");
    for chunk in &chunks[5..] {
        produce(&mut producers, chunk).await;
    }

    check_stores(&scaled, &[&a1, &a2, &a3], &[&s1, &s2], &events).await;

    // The watcher has caught up with everything the stores hold.
    let expected = reference().await;
    eventually(
        Duration::from_secs(60),
        Deferred(|| format!("the watcher to see every window\n{}", scaled.logs())),
        || async {
            let seen = seen.lock().expect("lock");
            expected.iter().all(|(window, final_version)| {
                seen.versions
                    .get(window)
                    .and_then(|versions| versions.last())
                    .is_some_and(|(_, last)| last == final_version)
            })
        },
    )
    .await;
    stop.send_replace(true);
    watcher.await.expect("watcher");
    let seen = seen.lock().expect("lock");
    assert!(
        seen.out_of_order.is_empty(),
        "sequences went back (a duplicate or a gap-filling reorder): {:?}",
        &seen.out_of_order[..seen.out_of_order.len().min(10)]
    );
    assert!(
        seen.failovers >= 1,
        "the watcher moved to the other gateway when its own died"
    );
    let repeated: Vec<_> = expected
        .iter()
        .filter(|(window, final_version)| {
            let versions = &seen.versions[*window];
            versions.iter().filter(|(_, v)| v == *final_version).count() != 1
        })
        .map(|(window, _)| window.clone())
        .take(10)
        .collect();
    assert!(
        repeated.is_empty(),
        "windows whose final result reached the watcher more than once: {repeated:?}"
    );
    drop((g1, g2, s1, s2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn analyzers_scaled_one_to_three_to_one_under_load_give_the_exact_results() {
    let events = workload();
    let scaled = Scaled::start().await;
    let store = scaled.store("store").await;
    let first = scaled.analyzer("analyzer-1", &store).await;
    let mut producers = scaled.producers().await;
    let thirds: Vec<&[(&str, Event)]> = events.chunks(events.len() / 3 + 1).collect();
    produce(&mut producers, thirds[0]).await;
    let second = scaled.analyzer("analyzer-2", &store).await;
    let third = scaled.analyzer("analyzer-3", &store).await;
    produce(&mut producers, thirds[1]).await;
    // Scaling down is a graceful stop: each leaves after its last checkpoint.
    for leaving in [second, third] {
        let status = leaving.terminate().await.expect("SIGTERM");
        assert!(status.success(), "a clean exit: {status:?}");
    }
    for chunk in &thirds[2..] {
        produce(&mut producers, chunk).await;
    }
    check_stores(&scaled, &[&first], &[&store], &events).await;
}
