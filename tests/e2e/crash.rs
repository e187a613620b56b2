//! The broker killed with SIGKILL under produce load, again and again: every record it
//! acknowledged as DURABLE is there afterwards, once, in order, and no offset is reused.

use runnel_client::{Producer, ProducerOptions};
use runnel_e2e::ServiceProcess;
use runnel_proto::v1::broker_client::BrokerClient;
use runnel_proto::v1::{Acks, CreateTopicRequest, Event, FetchRequest};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

const ROUNDS: usize = 20;
const PRODUCERS: usize = 3;
const PARTITIONS: u32 = 4;

/// Every record of `topic`, partition by partition, checking offsets are dense.
async fn read_back(url: &str, topic: &str) -> BTreeMap<u32, Vec<String>> {
    let mut broker = BrokerClient::connect(url.to_owned()).await.expect("broker");
    let mut all = BTreeMap::new();
    for partition in 0..PARTITIONS {
        let mut ids = Vec::new();
        let mut offset = 0;
        loop {
            let page = broker
                .fetch(FetchRequest {
                    topic: topic.into(),
                    partition,
                    offset,
                    max_records: 5000,
                    ..Default::default()
                })
                .await
                .expect("fetch")
                .into_inner();
            if page.records.is_empty() {
                break;
            }
            for record in page.records {
                assert_eq!(
                    record.offset, offset,
                    "offsets are dense: none lost, none reused"
                );
                offset += 1;
                ids.push(record.event.expect("event").id);
            }
        }
        all.insert(partition, ids);
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_acks_survive_twenty_sigkills_exactly_once_in_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("runnel.toml");
    std::fs::write(
        &config,
        format!(
            "[broker]\ndata_dir = \"{}/broker\"\nsegment_bytes = 262144\n[broker.server]\ngrpc = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n",
            dir.path().display()
        ),
    )
    .expect("config");
    let mut broker = ServiceProcess::start("runnel-broker", &config, &BTreeMap::new(), dir.path())
        .await
        .expect("broker starts");
    let url = broker.url();
    let channel = runnel_client::connect_lazy(&url, &Default::default()).expect("url");
    let client = BrokerClient::new(channel);
    client
        .clone()
        .create_topic(CreateTopicRequest {
            name: "crash".into(),
            partitions: PARTITIONS,
            retention: None,
        })
        .await
        .expect("create");

    // Producers send until told to stop, recording what was acknowledged; the count of
    // acknowledged batches tells the test when to strike next.
    let acked: Arc<Mutex<Vec<String>>> = Arc::default();
    let (progress, mut progressed) = watch::channel(0u64);
    let progress = Arc::new(progress);
    let (stop, stopped) = watch::channel(false);
    let mut producers = Vec::new();
    for p in 0..PRODUCERS {
        let options = ProducerOptions {
            acks: Acks::Durable,
            retry_for: Duration::from_secs(120),
            call_timeout: Duration::from_secs(5),
            ..ProducerOptions::default()
        };
        let mut producer = Producer::new(client.clone(), "crash", options)
            .await
            .expect("producer");
        let (acked, progress, stopped) =
            (Arc::clone(&acked), Arc::clone(&progress), stopped.clone());
        producers.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !*stopped.borrow() {
                let events: Vec<Event> = (0..25)
                    .map(|i| Event {
                        id: format!("p{p}-{:08}", n + i),
                        key: format!("k{}", (n + i) % 17),
                        payload: vec![b'x'; 100].into(),
                        ..Event::default()
                    })
                    .collect();
                let ids: Vec<String> = events.iter().map(|e| e.id.clone()).collect();
                producer
                    .send(events)
                    .await
                    .expect("every batch is acknowledged in the end");
                n += 25;
                acked.lock().expect("lock").extend(ids);
                progress.send_modify(|count| *count += 1);
            }
        }));
    }

    for round in 0..ROUNDS {
        // Strike after a random amount of acknowledged work, mid-stream.
        let wait_for = *progressed.borrow_and_update() + 1 + rand::random::<u64>() % 12;
        tokio::time::timeout(
            Duration::from_secs(60),
            progressed.wait_for(|count| *count >= wait_for),
        )
        .await
        .unwrap_or_else(|_| panic!("round {round}: no progress\n{}", broker.log()))
        .expect("progress");
        broker.kill().await.expect("SIGKILL");
        broker = broker
            .restart()
            .await
            .unwrap_or_else(|e| panic!("round {round}: restart: {e:#}"));
    }
    stop.send_replace(true);
    for producer in producers {
        producer.await.expect("producer finished");
    }

    let stored = read_back(&url, "crash").await;
    let acked = acked.lock().expect("lock").clone();
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for ids in stored.values() {
        for id in ids {
            *seen.entry(id.as_str()).or_default() += 1;
        }
        // In order: per producer, ids grow along the partition.
        let mut last: HashMap<&str, &str> = HashMap::new();
        for id in ids {
            let producer = &id[..id.find('-').expect("p<n>-<seq>")];
            if let Some(previous) = last.insert(producer, id) {
                assert!(previous < id.as_str(), "{previous} before {id}");
            }
        }
    }
    assert!(seen.values().all(|&n| n == 1), "a record stored twice");
    for id in &acked {
        assert_eq!(
            seen.get(id.as_str()),
            Some(&1),
            "acknowledged {id} is missing\n{}",
            broker.log()
        );
    }
    assert_eq!(
        seen.len(),
        acked.len(),
        "every stored record was acknowledged (none left in flight)"
    );
    assert!(
        acked.len() >= ROUNDS * 25,
        "the producers kept working: {} records",
        acked.len()
    );
    broker.terminate().await.expect("terminate");
}
