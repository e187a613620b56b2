//! The JetStream engine on a three-node cluster: a topic with three replicas loses a node
//! and no acknowledged record.

use super::{connect, create, event, fetch_all};
use runnel_broker::{BrokerConfig, StorageEngine};
use runnel_client::{Producer, ProducerOptions};
use runnel_proto::v1::{Acks, Event};
use runnel_testkit::{Services, Tool, nats};
use std::collections::HashMap;
use std::time::Duration;

async fn send_rounds(
    producer: &mut Producer,
    first: usize,
    rounds: usize,
    acked: &mut Vec<String>,
) {
    for round in first..first + rounds {
        let events: Vec<Event> = (0..10)
            .map(|i| event(&format!("r{round:03}-{i}"), &format!("k{i}"), b"replicated"))
            .collect();
        let ids: Vec<String> = events.iter().map(|e| e.id.clone()).collect();
        producer
            .send(events)
            .await
            .expect("acknowledged in the end");
        acked.extend(ids);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_replica_topic_survives_losing_a_node_with_every_acknowledged_record() {
    if !runnel_testkit::require(Tool::NatsServer) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = nats::cluster(dir.path()).await;
    let mut config = BrokerConfig {
        data_dir: dir.path().join("broker"),
        storage: StorageEngine::Jetstream,
        ..BrokerConfig::default()
    };
    config.jetstream.servers = nodes.iter().map(|n| n.url.clone()).collect();
    config.jetstream.replicas = 3;
    let mut broker = Services::new();
    let addrs = broker
        .start_on_loopback("broker", runnel_broker::run, config)
        .await;
    let mut client = connect(addrs.grpc).await;
    create(&mut client, "replicated", 2).await.unwrap();
    let options = ProducerOptions {
        acks: Acks::Durable,
        retry_for: Duration::from_secs(120),
        ..ProducerOptions::default()
    };
    let mut producer = Producer::new(client.clone(), "replicated", options)
        .await
        .unwrap();
    let mut acked = Vec::new();
    send_rounds(&mut producer, 0, 20, &mut acked).await;

    // One of three nodes dies: every stream keeps a quorum of two.
    nodes[0].kill().await;
    send_rounds(&mut producer, 20, 20, &mut acked).await;

    let mut stored: HashMap<String, usize> = HashMap::new();
    for partition in 0..2 {
        for record in fetch_all(&mut client, "replicated", partition).await {
            *stored.entry(record.event.unwrap().id).or_default() += 1;
        }
    }
    for id in &acked {
        assert_eq!(
            stored.get(id),
            Some(&1),
            "acknowledged {id} stored exactly once"
        );
    }
    assert_eq!(stored.len(), acked.len());
    broker
        .stop(Duration::from_secs(30))
        .await
        .expect("the broker stops");
}
