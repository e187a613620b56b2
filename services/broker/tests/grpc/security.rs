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

/// A grant to the static token named `principal`.
fn grant(principal: &str, allow: &[Action], topics: &[&str]) -> GrantConfig {
    GrantConfig {
        principal: format!("token:{principal}"),
        allow: allow.to_vec(),
        topics: topics.iter().map(|t| t.to_string()).collect(),
        queries: vec![],
        groups: vec![],
    }
}

/// Static tokens `rnl_<name>` for each of `names`.
fn tokens(names: &[&str]) -> Vec<TokenConfig> {
    names
        .iter()
        .map(|p| TokenConfig {
            principal: (*p).into(),
            sha256: token_sha256(&format!("rnl_{p}")),
        })
        .collect()
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
                tokens: tokens(&["ops", "sensors", "reader"]),
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

both_engines!(consuming_a_topic_is_not_enough_to_join_commit_to_or_see_a_group);
/// Consumer groups have grants of their own: a caller that may consume `events` cannot join
/// the analyzer's group, commit its offsets, keep its member alive with fenced writes or see
/// it described; a wildcard group grant stays out of the reserved `runnel-…` groups; the
/// analyzer, granted its groups by name, does all of it.
async fn consuming_a_topic_is_not_enough_to_join_commit_to_or_see_a_group(engine: Engine) {
    use runnel_proto::v1::{CommitOffsetsRequest, GroupFence, PartitionOffset, SubscribeRequest};
    let Some(harness) = Harness::new(engine).await else {
        return;
    };
    let with_groups = |mut grant: GrantConfig, groups: &[&str]| {
        grant.groups = groups.iter().map(|g| g.to_string()).collect();
        grant
    };
    let (addr, broker) = harness
        .spawn_with(|config| {
            config.server.auth = AuthConfig {
                enabled: true,
                tokens: tokens(&["reader", "client", "analyzer"]),
                grants: vec![
                    grant(
                        "reader",
                        &[Action::Consume, Action::Produce, Action::Manage],
                        &["events"],
                    ),
                    with_groups(grant("client", &[Action::Consume], &["*"]), &["*"]),
                    with_groups(
                        grant("analyzer", &[Action::Consume, Action::Produce], &["events"]),
                        &["runnel-analyzer.*"],
                    ),
                ],
                ..AuthConfig::default()
            };
        })
        .await;
    let mut reader = as_principal(addr, "rnl_reader").await;
    let mut client = as_principal(addr, "rnl_client").await;
    let mut analyzer = as_principal(addr, "rnl_analyzer").await;
    reader
        .create_topic(CreateTopicRequest {
            name: "events".into(),
            partitions: 2,
            retention: None,
        })
        .await
        .unwrap();
    const GROUP: &str = "runnel-analyzer.avg_value_per_key";
    let join = |group: &str, member: &str| SubscribeRequest {
        topic: "events".into(),
        group: group.into(),
        member_id: member.into(),
        ..Default::default()
    };
    let commit = |member: &str, generation: u64| CommitOffsetsRequest {
        group: GROUP.into(),
        topic: "events".into(),
        member_id: member.into(),
        generation,
        offsets: vec![PartitionOffset {
            partition: 0,
            offset: 0,
            metadata: Vec::new(),
        }],
    };
    let denied = |status: tonic::Status| {
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
        assert!(status.message().contains(GROUP), "{status:?}");
    };

    // The analyzer joins its group and commits.
    let mut member = analyzer
        .subscribe(join(GROUP, "analyzer-1"))
        .await
        .unwrap()
        .into_inner();
    let generation = loop {
        match member.message().await.unwrap().unwrap().message {
            Some(runnel_proto::v1::subscribe_response::Message::Assignment(a)) => {
                break a.generation;
            }
            _ => continue,
        }
    };
    analyzer
        .commit_offsets(commit("analyzer-1", generation))
        .await
        .unwrap();

    // A reader of the topic can neither join, commit, heartbeat nor see the group.
    denied(reader.subscribe(join(GROUP, "intruder")).await.unwrap_err());
    denied(
        reader
            .commit_offsets(commit("analyzer-1", generation))
            .await
            .unwrap_err(),
    );
    denied(
        reader
            .produce(ProduceRequest {
                topic: "events".into(),
                events: vec![event("e-1", "k", b"{}")],
                fence: Some(GroupFence {
                    group: GROUP.into(),
                    topic: "events".into(),
                    member_id: "analyzer-1".into(),
                    generation,
                    partitions: vec![0],
                }),
                ..Default::default()
            })
            .await
            .unwrap_err(),
    );
    let described = |client: &mut crate::Client| {
        let mut client = client.clone();
        async move {
            client
                .describe_topic(DescribeTopicRequest {
                    name: "events".into(),
                })
                .await
                .unwrap()
                .into_inner()
                .groups
                .into_iter()
                .map(|g| g.group)
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(described(&mut analyzer).await, [GROUP]);
    assert!(described(&mut reader).await.is_empty());

    // `*` on groups covers the client's own groups, never the reserved ones.
    denied(client.subscribe(join(GROUP, "intruder")).await.unwrap_err());
    let mut own = client
        .subscribe(join("dashboards", "client-1"))
        .await
        .unwrap()
        .into_inner();
    assert!(own.message().await.unwrap().is_some());
    assert_eq!(described(&mut client).await, ["dashboards"]);
    drop((member, own));
    stop(broker).await;
}

both_engines!(every_request_on_a_produce_stream_is_authorized_for_its_own_topic_and_group);
/// A stream is not a pass: each request on it needs produce on its own topic (and, fenced,
/// the group's permission), and the first one refused ends the stream after the ones
/// before it are stored.
async fn every_request_on_a_produce_stream_is_authorized_for_its_own_topic_and_group(
    engine: Engine,
) {
    use runnel_proto::v1::{GroupFence, ProduceStreamRequest};
    let Some(harness) = Harness::new(engine).await else {
        return;
    };
    let (addr, broker) = harness
        .spawn_with(|config| {
            config.server.auth = AuthConfig {
                enabled: true,
                tokens: tokens(&["ops", "sensors", "reader"]),
                grants: vec![
                    grant("ops", &[Action::Manage], &["*"]),
                    grant("sensors", &[Action::Produce], &["sensors.*"]),
                    grant("reader", &[Action::Consume], &["*"]),
                ],
                ..AuthConfig::default()
            };
        })
        .await;
    let mut ops = as_principal(addr, "rnl_ops").await;
    let sensors = as_principal(addr, "rnl_sensors").await;
    let reader = as_principal(addr, "rnl_reader").await;
    for name in ["sensors.a", "billing"] {
        ops.create_topic(CreateTopicRequest {
            name: name.into(),
            partitions: 1,
            retention: None,
        })
        .await
        .unwrap();
    }
    let to = |sequence: u64, topic: &str, fence: Option<GroupFence>| ProduceStreamRequest {
        sequence,
        request: Some(ProduceRequest {
            topic: topic.into(),
            events: vec![event(&format!("e-{sequence}"), "k", b"{}")],
            fence,
            ..Default::default()
        }),
    };
    let stream_of = |requests: Vec<ProduceStreamRequest>| {
        let mut sensors = sensors.clone();
        async move {
            let mut answers = sensors
                .produce_stream(tokio_stream::iter(requests))
                .await
                .unwrap()
                .into_inner();
            let mut acknowledged = Vec::new();
            loop {
                match answers.message().await {
                    Ok(Some(answer)) => {
                        acknowledged.extend(answer.answers.iter().map(|a| a.sequence));
                    }
                    Ok(None) => panic!("the stream ended without a refusal"),
                    Err(status) => return (acknowledged, status),
                }
            }
        }
    };

    let (acknowledged, status) = stream_of(vec![
        to(1, "sensors.a", None),
        to(2, "billing", None),
        to(3, "sensors.a", None),
    ])
    .await;
    assert_eq!(acknowledged, [1]);
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(status.message().starts_with("request 2: "), "{status:?}");
    assert!(status.message().contains("\"billing\""), "{status:?}");

    let fence = GroupFence {
        group: "dashboards".into(),
        topic: "sensors.a".into(),
        member_id: "m-1".into(),
        generation: 1,
        partitions: vec![0],
    };
    let (acknowledged, status) = stream_of(vec![
        to(4, "sensors.a", None),
        to(5, "sensors.a", Some(fence)),
    ])
    .await;
    assert_eq!(acknowledged, [4]);
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("dashboards"), "{status:?}");

    let stored = |topic: &str| {
        let mut reader = reader.clone();
        let topic = topic.to_owned();
        async move {
            reader
                .fetch(FetchRequest {
                    topic,
                    partition: 0,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
                .records
                .into_iter()
                .map(|r| r.event.unwrap().id)
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(stored("sensors.a").await, ["e-1", "e-4"]);
    assert!(stored("billing").await.is_empty());
    stop(broker).await;
}

/// The broker's link to NATS over TLS with client certificates: against a real
/// `nats-server` that requires TLS and verifies clients, a broker with the CA and its
/// certificate creates topics and stores and reads records; one without a certificate gets
/// nowhere.
#[tokio::test]
async fn the_broker_talks_to_a_nats_server_that_requires_mutual_tls() {
    use runnel_security::certs::DevCa;
    if !runnel_testkit::require(runnel_testkit::Tool::NatsServer) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (ca, _) = DevCa::generate("test ca", 1).unwrap();
    let loopback = ["127.0.0.1".to_owned(), "localhost".to_owned()];
    let server = ca.issue("nats", &loopback, 1).unwrap();
    let client = ca.issue("broker", &[], 1).unwrap();
    let file = |name: &str, pem: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, pem).unwrap();
        path
    };
    let ca_file = file("ca.pem", &ca.cert_pem);
    let (server_cert, server_key) = (
        file("nats.pem", &server.cert_pem),
        file("nats.key", &server.key_pem),
    );
    let (client_cert, client_key) = (
        file("broker.pem", &client.cert_pem),
        file("broker.key", &client.key_pem),
    );
    let nats_dir = dir.path().join("nats");
    std::fs::create_dir_all(&nats_dir).unwrap();
    let path = |p: &std::path::Path| p.display().to_string();
    let args = [
        "--tlsverify".to_owned(),
        "--tlscert".to_owned(),
        path(&server_cert),
        "--tlskey".to_owned(),
        path(&server_key),
        "--tlscacert".to_owned(),
        path(&ca_file),
    ];
    let nats = runnel_testkit::nats::NatsNode::start(&nats_dir, &args).await;
    let server_url = nats.url.replacen("nats://", "tls://", 1);

    let with_tls = |cert: Option<(std::path::PathBuf, std::path::PathBuf)>| {
        let (server_url, ca_file, data) = (
            server_url.clone(),
            ca_file.clone(),
            dir.path().join("broker"),
        );
        move |c: &mut runnel_broker::BrokerConfig| {
            c.data_dir = data;
            c.storage = runnel_broker::StorageEngine::Jetstream;
            c.jetstream.servers = vec![server_url];
            c.jetstream.connect_timeout = std::time::Duration::from_secs(2);
            c.jetstream.request_timeout = std::time::Duration::from_secs(2);
            c.jetstream.tls = runnel_broker::NatsTlsConfig {
                enabled: true,
                ca: Some(ca_file),
                cert: cert.as_ref().map(|(cert, _)| cert.clone()),
                key: cert.map(|(_, key)| key),
            };
        }
    };
    let mut config = runnel_broker::BrokerConfig::default();
    with_tls(Some((client_cert.clone(), client_key.clone())))(&mut config);
    let mut broker = runnel_testkit::Services::new();
    let addrs = broker
        .start_on_loopback("broker", runnel_broker::run, config)
        .await;
    let mut client = crate::connect(addrs.grpc).await;
    crate::create(&mut client, "secured", 1).await.unwrap();
    client
        .produce(ProduceRequest {
            topic: "secured".into(),
            events: vec![event("e1", "k", b"over tls")],
            ..Default::default()
        })
        .await
        .unwrap();
    let records = crate::fetch_all(&mut client, "secured", 0).await;
    assert_eq!(records.len(), 1);
    stop(broker).await;

    // Without a client certificate the server refuses the broker: it never serves.
    let mut config = runnel_broker::BrokerConfig::default();
    with_tls(None)(&mut config);
    let mut refused = runnel_testkit::Services::new();
    refused
        .start_on_loopback("broker", runnel_broker::run, config)
        .await;
    let ended = tokio::time::timeout(std::time::Duration::from_secs(60), refused.next_ended())
        .await
        .expect("the broker gives up")
        .expect("it ended");
    assert!(ended.result().is_err(), "{ended:?}");
}
