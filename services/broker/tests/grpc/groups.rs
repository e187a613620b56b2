//! Consumer groups over gRPC: assignment, rebalance, eviction, fencing, delivery modes.

use super::{Engine, Harness, connect, create, event, stop};
use runnel_client::{ConsumerOptions, GroupConsumer, GroupEvent, Producer, ProducerOptions};
use runnel_proto::v1::{
    CommitOffsetsRequest, Delivery, DescribeTopicRequest, Event, PartitionOffset, Record,
    SubscribeRequest,
};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;
use tonic::Code;

const WAIT: Duration = Duration::from_secs(10);

/// One event per partition of a 4-partition topic, `per_partition` times, ids `e-<p>-<i>`.
fn spread(per_partition: usize) -> Vec<Event> {
    let mut events = Vec::new();
    for i in 0..per_partition {
        for partition in 0..4 {
            let key = (0..)
                .map(|k| format!("key-{k}"))
                .find(|k| runnel_proto::partition_for_key(k, 4) == partition)
                .unwrap();
            events.push(event(&format!("e-{partition}-{i}"), &key, b"x"));
        }
    }
    events
}

async fn next(consumer: &mut GroupConsumer) -> GroupEvent {
    tokio::time::timeout(WAIT, consumer.next())
        .await
        .expect("an event in time")
        .expect("the stream is fine")
        .expect("the stream is open")
}

async fn assignment(consumer: &mut GroupConsumer) -> (u64, Vec<u32>) {
    loop {
        if let GroupEvent::Assigned {
            generation,
            partitions,
            ..
        } = next(consumer).await
        {
            return (generation, partitions);
        }
    }
}

/// Reads records until `count` have come, returning them by partition.
async fn records(consumer: &mut GroupConsumer, count: usize) -> BTreeMap<u32, Vec<Record>> {
    let mut got: BTreeMap<u32, Vec<Record>> = BTreeMap::new();
    let mut seen = 0;
    while seen < count {
        if let GroupEvent::Records { partition, records } = next(consumer).await {
            seen += records.len();
            got.entry(partition).or_default().extend(records);
        }
    }
    got
}

fn options(member: &str) -> ConsumerOptions {
    ConsumerOptions {
        member_id: Some(member.into()),
        ..ConsumerOptions::default()
    }
}

both_engines!(members_split_the_partitions_and_a_leaver_hands_over_from_the_committed_offsets);
async fn members_split_the_partitions_and_a_leaver_hands_over_from_the_committed_offsets(
    engine: Engine,
) {
    let Some(harness) = Harness::new(engine).await else {
        return;
    };
    let (addr, broker) = harness.spawn().await;
    let client = connect(addr).await;
    create(&mut client.clone(), "work", 4).await.unwrap();
    let mut producer = Producer::new(client.clone(), "work", ProducerOptions::default())
        .await
        .unwrap();

    let mut a = GroupConsumer::join(client.clone(), "g", "work", options("a"))
        .await
        .unwrap();
    assert_eq!(assignment(&mut a).await, (1, vec![0, 1, 2, 3]));
    let mut b = GroupConsumer::join(client.clone(), "g", "work", options("b"))
        .await
        .unwrap();
    assert_eq!(assignment(&mut b).await, (2, vec![1, 3]));
    assert_eq!(assignment(&mut a).await, (2, vec![0, 2]));
    producer.send(spread(5)).await.unwrap();

    // Each member gets exactly its partitions' records, from the start (nothing committed).
    let from_b = records(&mut b, 10).await;
    assert_eq!(from_b.keys().copied().collect::<Vec<_>>(), [1, 3]);
    for (partition, got) in &from_b {
        let ids: Vec<String> = got
            .iter()
            .map(|r| r.event.as_ref().unwrap().id.clone())
            .collect();
        let expected: Vec<String> = (0..5).map(|i| format!("e-{partition}-{i}")).collect();
        assert_eq!(ids, expected);
    }
    // `b` processed three records of partition 1 and one of 3, and commits that.
    let committed = b.commit(&[(1, 3), (3, 1)]).await.unwrap();
    assert_eq!(committed, BTreeMap::from([(1, 3), (3, 1)]));
    drop(b);

    // `a` gets its own records, and — once `b` is gone — partitions 1 and 3 from the
    // offsets `b` committed: what `b` did not commit comes again, nothing before it.
    let mut from_a: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
    let mut reassigned = false;
    while !reassigned || from_a.values().map(Vec::len).sum::<usize>() < 16 {
        match next(&mut a).await {
            GroupEvent::Assigned {
                generation,
                partitions,
                starts,
            } => {
                assert_eq!((generation, partitions), (3, vec![0, 1, 2, 3]));
                // Only the partitions that moved start over, from `b`'s commits.
                let starts: Vec<(u32, u64)> =
                    starts.iter().map(|s| (s.partition, s.offset)).collect();
                assert_eq!(starts, [(1, 3), (3, 1)]);
                reassigned = true;
            }
            GroupEvent::Records { partition, records } => {
                assert!(
                    reassigned || [0, 2].contains(&partition),
                    "partition {partition} before it was assigned"
                );
                from_a
                    .entry(partition)
                    .or_default()
                    .extend(records.iter().map(|r| r.offset));
            }
        }
    }
    assert_eq!(from_a[&0], [0, 1, 2, 3, 4]);
    assert_eq!(from_a[&1], [3, 4]);
    assert_eq!(from_a[&2], [0, 1, 2, 3, 4]);
    assert_eq!(from_a[&3], [1, 2, 3, 4]);

    // New records flow to the owner live.
    producer.send(spread(1)).await.unwrap();
    let live = records(&mut a, 4).await;
    assert_eq!(live.values().map(Vec::len).sum::<usize>(), 4);
    stop(broker).await;
}

both_engines!(a_member_that_stops_heartbeating_is_evicted_and_its_partitions_move);
async fn a_member_that_stops_heartbeating_is_evicted_and_its_partitions_move(engine: Engine) {
    let Some(harness) = Harness::new(engine).await else {
        return;
    };
    let (addr, broker) = harness.spawn().await;
    let mut client = connect(addr).await;
    create(&mut client, "hb", 2).await.unwrap();
    let mut steady = GroupConsumer::join(client.clone(), "g", "hb", options("steady"))
        .await
        .unwrap();
    assert_eq!(assignment(&mut steady).await.1, [0, 1]);

    // A member that joins with a short session and never heartbeats: a raw subscription.
    let mut stalled = client
        .subscribe(SubscribeRequest {
            topic: "hb".into(),
            group: "g".into(),
            member_id: "stalled".into(),
            session_timeout: Some(prost_types::Duration {
                seconds: 0,
                nanos: 300_000_000,
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    // Members are dealt partitions in id order: "stalled" < "steady".
    assert_eq!(assignment(&mut steady).await.1, [1]);
    // Its stream is ended with ABORTED once the session runs out...
    let ended = tokio::time::timeout(WAIT, async {
        loop {
            match stalled.message().await {
                Ok(Some(_)) => continue,
                other => return other,
            }
        }
    })
    .await
    .expect("evicted in time");
    let status = ended.unwrap_err();
    assert_eq!(status.code(), Code::Aborted, "{status:?}");
    assert!(status.message().contains("evicted"), "{status:?}");
    // ...and its partition comes back to the member that heartbeats.
    assert_eq!(assignment(&mut steady).await.1, [0, 1]);
    stop(broker).await;
}

both_engines!(commits_are_fenced_by_generation_and_ownership);
async fn commits_are_fenced_by_generation_and_ownership(engine: Engine) {
    let Some(harness) = Harness::new(engine).await else {
        return;
    };
    let (addr, broker) = harness.spawn().await;
    let mut client = connect(addr).await;
    create(&mut client, "fence", 2).await.unwrap();
    Producer::new(client.clone(), "fence", ProducerOptions::default())
        .await
        .unwrap()
        .send(vec![event("x", "k", b"x")])
        .await
        .unwrap();
    let mut a = GroupConsumer::join(client.clone(), "g", "fence", options("a"))
        .await
        .unwrap();
    let (first_generation, _) = assignment(&mut a).await;
    let mut b = GroupConsumer::join(client.clone(), "g", "fence", options("b"))
        .await
        .unwrap();
    let (generation, mine) = assignment(&mut b).await;
    assert_eq!(mine, [1]);
    let commit =
        |member: &str, generation: u64, partition: u32, offset: u64| CommitOffsetsRequest {
            group: "g".into(),
            topic: "fence".into(),
            member_id: member.into(),
            generation,
            offsets: vec![PartitionOffset {
                partition,
                offset,
                ..PartitionOffset::default()
            }],
        };
    // A generation from before `b` joined is not `b`'s.
    let stale = client
        .commit_offsets(commit("b", first_generation, 1, 0))
        .await
        .unwrap_err();
    assert_eq!(stale.code(), Code::FailedPrecondition);
    assert!(stale.message().contains("stale"), "{stale:?}");
    let foreign = client
        .commit_offsets(commit("a", generation, 1, 0))
        .await
        .unwrap_err();
    assert!(
        foreign.message().contains("does not own partition 1"),
        "{foreign:?}"
    );
    let stranger = client
        .commit_offsets(commit("nobody", generation, 0, 0))
        .await
        .unwrap_err();
    assert_eq!(stranger.code(), Code::FailedPrecondition);
    let beyond = client
        .commit_offsets(commit("b", generation, 1, 99))
        .await
        .unwrap_err();
    assert_eq!(beyond.code(), Code::InvalidArgument, "{beyond:?}");
    client
        .commit_offsets(commit("b", generation, 1, 0))
        .await
        .unwrap();
    drop(a);
    stop(broker).await;
}

both_engines!(a_commits_metadata_reaches_the_next_owner_and_fences_refuse_a_former_owners_writes);
async fn a_commits_metadata_reaches_the_next_owner_and_fences_refuse_a_former_owners_writes(
    engine: Engine,
) {
    let Some(harness) = Harness::new(engine).await else {
        return;
    };
    let (addr, broker) = harness.spawn().await;
    let mut client = connect(addr).await;
    create(&mut client, "state", 2).await.unwrap();
    create(&mut client, "out", 1).await.unwrap();
    let mut producer = Producer::new(client.clone(), "state", ProducerOptions::default())
        .await
        .unwrap();
    producer.send(spread_over(2, 3)).await.unwrap();

    let mut a = GroupConsumer::join(client.clone(), "g", "state", options("a"))
        .await
        .unwrap();
    let GroupEvent::Assigned { starts, .. } = next(&mut a).await else {
        panic!("an assignment first");
    };
    // Nothing committed yet: both partitions start at 0, with no metadata.
    let fresh: Vec<(u32, u64, Vec<u8>)> = starts
        .into_iter()
        .map(|s| (s.partition, s.offset, s.metadata))
        .collect();
    assert_eq!(fresh, [(0, 0, vec![]), (1, 0, vec![])]);
    let checkpoint = |partition: u32, offset: u64, metadata: &[u8]| PartitionOffset {
        partition,
        offset,
        metadata: metadata.to_vec(),
    };
    let committed = a
        .commit_with_metadata(vec![
            checkpoint(0, 2, b"state-0@2"),
            checkpoint(1, 1, b"state-1@1"),
        ])
        .await
        .unwrap();
    assert_eq!(
        committed,
        [
            checkpoint(0, 2, b"state-0@2"),
            checkpoint(1, 1, b"state-1@1")
        ]
    );
    let too_big = a
        .commit_with_metadata(vec![checkpoint(0, 2, &vec![0; 64 * 1024 + 1])])
        .await
        .unwrap_err();
    assert!(
        matches!(too_big, runnel_client::ClientError::Broker(ref s) if s.code() == Code::InvalidArgument),
        "{too_big:?}"
    );
    let old_fence = a.fence(vec![0, 1]);

    // `b` joins: partition 1 moves to it with exactly what `a` committed for it; `a` keeps
    // partition 0 and is not told to start it over.
    let mut b = GroupConsumer::join(client.clone(), "g", "state", options("b"))
        .await
        .unwrap();
    let GroupEvent::Assigned {
        partitions, starts, ..
    } = next(&mut b).await
    else {
        panic!("an assignment first");
    };
    assert_eq!(partitions, [1]);
    assert_eq!(starts, [checkpoint(1, 1, b"state-1@1")]);
    let kept = loop {
        if let GroupEvent::Assigned {
            partitions, starts, ..
        } = next(&mut a).await
        {
            break (partitions, starts);
        }
    };
    assert_eq!(kept, (vec![0], vec![]));

    // Writes fenced by `a`'s old generation, or naming `b`'s partition, are refused; `b`'s
    // and `a`'s current ones go through.
    let mut out = Producer::new(client.clone(), "out", ProducerOptions::default())
        .await
        .unwrap();
    for (fence, allowed) in [
        (old_fence, false),
        (a.fence(vec![1]), false),
        (a.fence(vec![0]), true),
        (b.fence(vec![1]), true),
    ] {
        out.set_fence(Some(fence.clone()));
        let sent = out.send(vec![event("r", "k", b"x")]).await;
        match sent {
            Ok(_) => assert!(allowed, "{fence:?} was let through"),
            Err(runnel_client::ClientError::Broker(status)) => {
                assert!(!allowed, "{fence:?}: {status:?}");
                assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
            }
            Err(other) => panic!("{other:?}"),
        }
    }
    let end = client
        .describe_topic(DescribeTopicRequest { name: "out".into() })
        .await
        .unwrap()
        .into_inner()
        .topic
        .unwrap()
        .partitions[0]
        .end_offset;
    assert_eq!(end, 2, "only the two allowed writes were stored");
    drop((a, b));
    stop(broker).await;
}

/// `per_partition` events in each of `partitions` partitions.
fn spread_over(partitions: u32, per_partition: usize) -> Vec<Event> {
    let mut events = Vec::new();
    for i in 0..per_partition {
        for partition in 0..partitions {
            let key = (0..)
                .map(|k| format!("key-{k}"))
                .find(|k| runnel_proto::partition_for_key(k, partitions) == partition)
                .unwrap();
            events.push(event(&format!("e-{partition}-{i}"), &key, b"x"));
        }
    }
    events
}

both_engines!(at_most_once_members_find_their_offsets_committed_before_delivery);
async fn at_most_once_members_find_their_offsets_committed_before_delivery(engine: Engine) {
    let Some(harness) = Harness::new(engine).await else {
        return;
    };
    let (addr, broker) = harness.spawn().await;
    let mut client = connect(addr).await;
    create(&mut client, "amo", 1).await.unwrap();
    let mut producer = Producer::new(client.clone(), "amo", ProducerOptions::default())
        .await
        .unwrap();
    producer
        .send((0..6).map(|i| event(&format!("m{i}"), "k", b"x")).collect())
        .await
        .unwrap();
    let mut member = GroupConsumer::join(
        client.clone(),
        "g",
        "amo",
        ConsumerOptions {
            delivery: Delivery::AtMostOnce,
            ..options("m")
        },
    )
    .await
    .unwrap();
    assignment(&mut member).await;
    records(&mut member, 6).await;
    // Nobody called CommitOffsets: the broker did, before delivering.
    let described = client
        .describe_topic(DescribeTopicRequest { name: "amo".into() })
        .await
        .unwrap()
        .into_inner();
    let group = &described.groups[0];
    assert_eq!(group.group, "g");
    assert_eq!(group.partitions[0].committed_offset, Some(6));
    assert_eq!(group.partitions[0].lag, 0);
    // A second member of a new incarnation starts after them: nothing is delivered twice.
    drop(member);
    let mut again = GroupConsumer::join(client.clone(), "g", "amo", options("m2"))
        .await
        .unwrap();
    assignment(&mut again).await;
    producer.send(vec![event("m6", "k", b"x")]).await.unwrap();
    let got = records(&mut again, 1).await;
    assert_eq!(got[&0][0].event.as_ref().unwrap().id, "m6");
    stop(broker).await;
}

both_engines!(describe_topic_shows_members_committed_offsets_and_lag);
async fn describe_topic_shows_members_committed_offsets_and_lag(engine: Engine) {
    let Some(harness) = Harness::new(engine).await else {
        return;
    };
    let (addr, broker) = harness.spawn().await;
    let mut client = connect(addr).await;
    create(&mut client, "lag", 4).await.unwrap();
    Producer::new(client.clone(), "lag", ProducerOptions::default())
        .await
        .unwrap()
        .send(spread(3))
        .await
        .unwrap();
    let mut member = GroupConsumer::join(client.clone(), "readers", "lag", options("r1"))
        .await
        .unwrap();
    assignment(&mut member).await;
    member.commit(&[(0, 3), (2, 1)]).await.unwrap();
    let described = client
        .describe_topic(DescribeTopicRequest { name: "lag".into() })
        .await
        .unwrap()
        .into_inner();
    let group = described
        .groups
        .iter()
        .find(|g| g.group == "readers")
        .unwrap();
    assert_eq!(group.members.len(), 1);
    assert_eq!(group.members[0].member_id, "r1");
    assert_eq!(group.members[0].partitions, [0, 1, 2, 3]);
    let lags: Vec<(u32, Option<u64>, u64)> = group
        .partitions
        .iter()
        .map(|p| (p.partition, p.committed_offset, p.lag))
        .collect();
    assert_eq!(
        lags,
        [(0, Some(3), 0), (1, None, 3), (2, Some(1), 2), (3, None, 3)]
    );
    let unique: BTreeSet<_> = described
        .topic
        .unwrap()
        .partitions
        .iter()
        .map(|p| p.end_offset)
        .collect();
    assert_eq!(unique, BTreeSet::from([3]));
    stop(broker).await;
}

/// What `DescribeTopic` through `client` says group `g` is: generation and members.
async fn described(client: &mut super::Client, topic: &str) -> (u64, BTreeMap<String, Vec<u32>>) {
    let description = client
        .describe_topic(DescribeTopicRequest { name: topic.into() })
        .await
        .unwrap()
        .into_inner();
    let group = description
        .groups
        .into_iter()
        .find(|g| g.group == "g")
        .expect("group g is described");
    (
        group.generation,
        group
            .members
            .into_iter()
            .map(|m| (m.member_id, m.partitions))
            .collect(),
    )
}

/// Two brokers in front of one JetStream: members that subscribed through different
/// brokers are one group — disjoint partitions, one generation, fences and commits checked
/// by whichever broker a write reaches, and a member leaving through one broker hands its
/// partitions to a member on the other.
#[tokio::test]
async fn members_on_two_jetstream_brokers_share_one_group() {
    let Some(harness) = Harness::new(Engine::JetStream).await else {
        return;
    };
    let (first_addr, first) = harness
        .spawn_with(|c| c.data_dir = harness.dir.path().join("first"))
        .await;
    let (second_addr, second) = harness
        .spawn_with(|c| c.data_dir = harness.dir.path().join("second"))
        .await;
    let mut one = connect(first_addr).await;
    let mut two = connect(second_addr).await;
    create(&mut one, "work", 4).await.unwrap();
    let mut producer = Producer::new(one.clone(), "work", ProducerOptions::default())
        .await
        .unwrap();
    producer.send(spread(3)).await.unwrap();

    let mut a = GroupConsumer::join(one.clone(), "g", "work", options("a"))
        .await
        .unwrap();
    assert_eq!(assignment(&mut a).await, (1, vec![0, 1, 2, 3]));
    let mut b = GroupConsumer::join(two.clone(), "g", "work", options("b"))
        .await
        .unwrap();
    assert_eq!(assignment(&mut b).await, (2, vec![1, 3]));
    // `a`'s broker learns of `b` from JetStream, not from `b`'s broker.
    assert_eq!(assignment(&mut a).await, (2, vec![0, 2]));
    let from_b = records(&mut b, 6).await;
    assert_eq!(from_b.keys().copied().collect::<Vec<_>>(), [1, 3]);
    let expected = BTreeMap::from([("a".to_owned(), vec![0, 2]), ("b".to_owned(), vec![1, 3])]);
    for client in [&mut one, &mut two] {
        let (generation, members) =
            runnel_testkit::eventually(WAIT, "both brokers to describe generation 2", || {
                let mut client = client.clone();
                async move {
                    let seen = described(&mut client, "work").await;
                    (seen.0 == 2).then_some(seen)
                }
            })
            .await;
        assert_eq!((generation, members), (2, expected.clone()));
    }

    // A commit reaches whichever broker; `a` may not commit `b`'s partition on either.
    let committed = b.commit(&[(1, 2), (3, 1)]).await.unwrap();
    assert_eq!(committed, BTreeMap::from([(1, 2), (3, 1)]));
    let stolen = two
        .commit_offsets(CommitOffsetsRequest {
            group: "g".into(),
            topic: "work".into(),
            member_id: "a".into(),
            generation: 2,
            offsets: vec![PartitionOffset {
                partition: 1,
                offset: 3,
                metadata: Vec::new(),
            }],
        })
        .await
        .unwrap_err();
    assert_eq!(stolen.code(), Code::FailedPrecondition, "{stolen:?}");
    // A fenced write through `a`'s broker on behalf of `b` is checked against the group,
    // not against what that broker's own members are.
    create(&mut one, "out", 1).await.unwrap();
    let mut out = Producer::new(one.clone(), "out", ProducerOptions::default())
        .await
        .unwrap();
    out.set_fence(Some(b.fence(vec![1, 3])));
    out.send(vec![event("r", "k", b"x")]).await.unwrap();
    out.set_fence(Some(b.fence(vec![0])));
    let refused = out.send(vec![event("r2", "k", b"x")]).await.unwrap_err();
    assert!(
        matches!(refused, runnel_client::ClientError::Broker(ref s) if s.code() == Code::FailedPrecondition),
        "{refused:?}"
    );

    // `b` leaves through its broker: `a`, on the other, takes partitions 1 and 3 over from
    // `b`'s commits.
    drop(b);
    let (generation, partitions, starts) = loop {
        if let GroupEvent::Assigned {
            generation,
            partitions,
            starts,
        } = next(&mut a).await
        {
            break (generation, partitions, starts);
        }
    };
    assert_eq!((generation, partitions), (3, vec![0, 1, 2, 3]));
    let starts: Vec<(u32, u64)> = starts.iter().map(|s| (s.partition, s.offset)).collect();
    assert_eq!(starts, [(1, 2), (3, 1)]);
    drop(a);
    stop(second).await;
    stop(first).await;
}
