//! The broker with authentication on: per-topic grants decide who may produce, consume
//! and create, and a listing shows each caller only its own topics.

use crate::{Engine, Harness, event, stop};
use runnel_client::{Producer, ProducerOptions};
use runnel_proto::v1::broker_client::BrokerClient;
use runnel_proto::v1::{
    CreateTopicRequest, DescribeTopicRequest, FetchRequest, ListTopicsRequest, ProduceRequest,
};
use runnel_security::auth::token_sha256;
use runnel_security::{Action, AuthConfig, GrantConfig, TokenConfig};
use std::net::SocketAddr;
use tonic::Code;

async fn as_principal(addr: SocketAddr, token: &str) -> crate::Client {
    let url = format!("http://{addr}");
    let peer = runnel_security::connect(&url, &Default::default(), Some(token))
        .await
        .unwrap();
    BrokerClient::new(peer)
}

fn grant(principal: &str, allow: &[Action], topics: &[&str]) -> GrantConfig {
    GrantConfig {
        principal: principal.into(),
        allow: allow.to_vec(),
        topics: topics.iter().map(|t| t.to_string()).collect(),
        queries: vec![],
    }
}

both_engines!(grants_decide_per_topic_who_produces_consumes_and_creates);
async fn grants_decide_per_topic_who_produces_consumes_and_creates(engine: Engine) {
    let Some(harness) = Harness::new(engine).await else {
        return;
    };
    let (addr, broker) = harness
        .spawn_with(|config| {
            config.server.auth = AuthConfig {
                enabled: true,
                tokens: ["ops", "sensors", "reader"]
                    .into_iter()
                    .map(|p| TokenConfig {
                        principal: p.into(),
                        sha256: token_sha256(&format!("rnl_{p}")),
                    })
                    .collect(),
                grants: vec![
                    grant("ops", &[Action::Manage], &["*"]),
                    grant("sensors", &[Action::Produce], &["sensors.*"]),
                    grant("reader", &[Action::Consume], &["sensors.a"]),
                ],
                ..AuthConfig::default()
            };
        })
        .await;
    let mut ops = as_principal(addr, "rnl_ops").await;
    let mut sensors = as_principal(addr, "rnl_sensors").await;
    let mut reader = as_principal(addr, "rnl_reader").await;
    for name in ["sensors.a", "billing"] {
        ops.create_topic(CreateTopicRequest {
            name: name.into(),
            partitions: 2,
            retention: None,
        })
        .await
        .unwrap();
    }
    let denied = sensors
        .create_topic(CreateTopicRequest {
            name: "sensors.b".into(),
            partitions: 2,
            retention: None,
        })
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);

    // The idempotent producer describes the topic first: producing is enough for that.
    let mut producer = Producer::new(sensors.clone(), "sensors.a", ProducerOptions::default())
        .await
        .unwrap();
    producer.send(vec![event("e-1", "k", b"{}")]).await.unwrap();
    let denied = sensors
        .produce(ProduceRequest {
            topic: "billing".into(),
            events: vec![event("e-2", "k", b"{}")],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    assert!(denied.message().contains("\"billing\""), "{denied:?}");
    let denied = sensors
        .fetch(FetchRequest {
            topic: "sensors.a".into(),
            partition: 0,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);

    let mut fetched = 0;
    for partition in 0..2 {
        fetched += reader
            .fetch(FetchRequest {
                topic: "sensors.a".into(),
                partition,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .records
            .len();
    }
    assert_eq!(fetched, 1);
    let denied = reader
        .describe_topic(DescribeTopicRequest {
            name: "billing".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);

    let names = |client: &mut crate::Client| {
        let mut client = client.clone();
        async move {
            let mut names: Vec<String> = client
                .list_topics(ListTopicsRequest {})
                .await
                .unwrap()
                .into_inner()
                .topics
                .into_iter()
                .map(|t| t.name)
                .collect();
            names.sort();
            names
        }
    };
    assert_eq!(names(&mut ops).await, ["billing", "sensors.a"]);
    assert_eq!(names(&mut sensors).await, ["sensors.a"]);
    assert_eq!(names(&mut reader).await, ["sensors.a"]);

    let mut anonymous = crate::connect(addr).await;
    let status = anonymous
        .list_topics(ListTopicsRequest {})
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    stop(broker).await;
}
