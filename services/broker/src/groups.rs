//! Consumer groups: who is in a group, which partitions each member owns, and when a
//! member is gone.
//!
//! A group is a name and a topic. A client joins by subscribing with the group and its own
//! member id; it stays a member while its stream is open and it commits or heartbeats
//! (`CommitOffsets`, possibly with no offsets) within its session timeout. Every join,
//! leave or eviction is a *rebalance*: the generation goes up and the topic's partitions
//! are dealt round-robin over the members sorted by id — every partition owned by exactly
//! one member, the spread even. Each member's stream is told its new assignment before it
//! gets any record of it; a commit must carry the current generation and may only name
//! partitions its member owns, so a member that was evicted (a stalled process, say) cannot
//! move the group's offsets from under the new owner.
//!
//! Groups live in the memory of the broker that serves them (offsets are durable in the
//! [`OffsetStore`](crate::storage::embedded::offsets::OffsetStore)); after a broker restart members
//! resubscribe and the group forms again.

use crate::error::{BrokerError, Result};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// What a member's stream should do now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum MemberView {
    /// Deliver these partitions, tagged with this generation.
    Assigned {
        generation: u64,
        partitions: Vec<u32>,
    },
    /// Stop: the member is no longer in the group, for this reason.
    Removed(String),
}

#[derive(Debug)]
struct Member {
    /// Which subscription holds the membership: a rejoin with the same id replaces it.
    incarnation: u64,
    /// The generation this subscription joined at: anything it writes carries this one or
    /// a later one, so an earlier subscription with the same id cannot write as it.
    joined_at: u64,
    session_timeout: Duration,
    deadline: Instant,
    view: watch::Sender<MemberView>,
}

#[derive(Debug)]
struct Group {
    partitions: u32,
    generation: u64,
    members: BTreeMap<String, Member>,
    /// Per partition, the generation since which its current owner has held it without a
    /// break: a write fenced by any generation from then on is still the owner's.
    owned_since: Vec<u64>,
    /// Per partition, the owner it had after the last rebalance.
    owners: Vec<Option<String>>,
}

impl Group {
    /// Deals the partitions round-robin over the members, sorted by id, and tells each.
    fn rebalance(&mut self, key: &(String, String)) {
        self.generation += 1;
        let ids: Vec<&String> = self.members.keys().collect();
        let mut owned: HashMap<&String, Vec<u32>> = HashMap::new();
        self.owners.resize(self.partitions as usize, None);
        self.owned_since.resize(self.partitions as usize, 0);
        for partition in 0..self.partitions {
            let owner = (!ids.is_empty()).then(|| ids[partition as usize % ids.len()]);
            if let Some(owner) = owner {
                owned.entry(owner).or_default().push(partition);
            }
            let slot = partition as usize;
            if self.owners[slot].as_ref() != owner {
                self.owners[slot] = owner.cloned();
                self.owned_since[slot] = self.generation;
            }
        }
        for (id, member) in &self.members {
            member.view.send_replace(MemberView::Assigned {
                generation: self.generation,
                partitions: owned.get(id).cloned().unwrap_or_default(),
            });
        }
        metrics::counter!("runnel_broker_group_rebalances_total", "group" => key.0.clone(), "topic" => key.1.clone()).increment(1);
        metrics::gauge!("runnel_broker_group_members", "group" => key.0.clone(), "topic" => key.1.clone()).set(self.members.len() as f64);
        tracing::info!(group = %key.0, topic = %key.1, generation = self.generation, members = self.members.len(), "group rebalanced");
    }

    fn owner_of(&self, partition: u32) -> Option<&String> {
        let ids: Vec<&String> = self.members.keys().collect();
        (!ids.is_empty()).then(|| ids[partition as usize % ids.len()])
    }
}

/// A group as `DescribeTopic` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct GroupSnapshot {
    pub(crate) generation: u64,
    /// Member id → partitions.
    pub(crate) members: BTreeMap<String, Vec<u32>>,
}

/// Every group this broker serves.
#[derive(Debug, Default)]
pub(crate) struct Coordinator {
    groups: Mutex<HashMap<(String, String), Group>>,
    incarnations: AtomicU64,
}

/// A subscription's membership: its view of the assignment, and its leaving when dropped.
#[derive(Debug)]
pub(crate) struct Membership {
    coordinator: Arc<Coordinator>,
    key: (String, String),
    member_id: String,
    incarnation: u64,
    /// The member's current instructions.
    pub(crate) view: watch::Receiver<MemberView>,
}

impl Drop for Membership {
    fn drop(&mut self) {
        self.coordinator
            .leave(&self.key, &self.member_id, self.incarnation);
    }
}

impl Coordinator {
    fn groups(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), Group>> {
        // Every change leaves a group whole before the next one: poison carries no risk.
        self.groups
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Adds `member_id` to `group` on `topic` (of `partitions` partitions), replacing an
    /// earlier subscription with the same id, and rebalances.
    pub(crate) fn join(
        self: &Arc<Self>,
        group: &str,
        topic: &str,
        partitions: u32,
        member_id: &str,
        session_timeout: Duration,
        now: Instant,
    ) -> Membership {
        let key = (group.to_owned(), topic.to_owned());
        let incarnation = self.incarnations.fetch_add(1, Ordering::Relaxed) + 1;
        let (view, receiver) = watch::channel(MemberView::Assigned {
            generation: 0,
            partitions: Vec::new(),
        });
        let mut groups = self.groups();
        let entry = groups.entry(key.clone()).or_insert_with(|| Group {
            partitions,
            generation: 0,
            members: BTreeMap::new(),
            owned_since: Vec::new(),
            owners: Vec::new(),
        });
        let replaced = entry.members.insert(
            member_id.to_owned(),
            Member {
                incarnation,
                // The rebalance below makes it so.
                joined_at: entry.generation + 1,
                session_timeout,
                deadline: now + session_timeout,
                view,
            },
        );
        if let Some(old) = replaced {
            old.view.send_replace(MemberView::Removed(
                "a newer subscription with the same member id took over".into(),
            ));
        }
        entry.rebalance(&key);
        Membership {
            coordinator: Arc::clone(self),
            key,
            member_id: member_id.to_owned(),
            incarnation,
            view: receiver,
        }
    }

    fn leave(&self, key: &(String, String), member_id: &str, incarnation: u64) {
        let mut groups = self.groups();
        let Some(group) = groups.get_mut(key) else {
            return;
        };
        if group
            .members
            .get(member_id)
            .is_some_and(|m| m.incarnation == incarnation)
        {
            group.members.remove(member_id);
            tracing::info!(group = %key.0, topic = %key.1, member = member_id, "member left");
            group.rebalance(key);
        }
    }

    /// Checks that `member_id` is in `group` at `generation` and owns every partition in
    /// `partitions`, and counts it as a heartbeat.
    pub(crate) fn heartbeat(
        &self,
        group: &str,
        topic: &str,
        member_id: &str,
        generation: u64,
        partitions: impl IntoIterator<Item = u32>,
        now: Instant,
    ) -> Result<()> {
        let mut groups = self.groups();
        let not_member = || {
            BrokerError::NotAMember(format!(
                "{member_id:?} is not a member of group {group:?} on topic {topic:?}; subscribe again"
            ))
        };
        let group_state = groups
            .get_mut(&(group.to_owned(), topic.to_owned()))
            .ok_or_else(not_member)?;
        let Some(member) = group_state.members.get(member_id) else {
            return Err(not_member());
        };
        // Past its deadline a member is gone, whether or not the sweep has removed it yet:
        // a process that was paused that long must not keep writing as the owner.
        if member.deadline <= now {
            return Err(BrokerError::NotAMember(format!(
                "{member_id:?}'s session in group {group:?} timed out ({:?}); subscribe again",
                member.session_timeout
            )));
        }
        // A generation from before this subscription joined (an earlier subscription with
        // the same id, paused or cut off) or one the group never had is refused; a later
        // one stands as long as the partitions it names have not changed owner since — a
        // rebalance that moves other partitions does not fence this member's writes.
        if generation < member.joined_at || generation > group_state.generation {
            return Err(BrokerError::NotAMember(format!(
                "generation {generation} is stale: {member_id:?} joined group {group:?} again at generation {} (the group is at {}); use the latest assignment",
                member.joined_at, group_state.generation
            )));
        }
        for partition in partitions {
            if group_state.owner_of(partition).map(String::as_str) != Some(member_id) {
                return Err(BrokerError::NotAMember(format!(
                    "{member_id:?} does not own partition {partition} in generation {}",
                    group_state.generation
                )));
            }
            let since = group_state
                .owned_since
                .get(partition as usize)
                .copied()
                .unwrap_or(u64::MAX);
            if since > generation {
                return Err(BrokerError::NotAMember(format!(
                    "generation {generation} is stale for partition {partition}: it changed owner at generation {since}; use the latest assignment"
                )));
            }
        }
        if let Some(member) = group_state.members.get_mut(member_id) {
            member.deadline = now + member.session_timeout;
        }
        Ok(())
    }

    /// Evicts every member whose session ran out by `now`, rebalancing their groups.
    /// Returns how many were evicted.
    pub(crate) fn expire(&self, now: Instant) -> usize {
        let mut evicted = 0;
        let mut groups = self.groups();
        for (key, group) in groups.iter_mut() {
            let late: Vec<String> = group
                .members
                .iter()
                .filter(|(_, m)| m.deadline <= now)
                .map(|(id, _)| id.clone())
                .collect();
            if late.is_empty() {
                continue;
            }
            for id in &late {
                if let Some(member) = group.members.remove(id) {
                    member.view.send_replace(MemberView::Removed(format!(
                        "no commit or heartbeat within the session timeout of {:?}; evicted",
                        member.session_timeout
                    )));
                    tracing::warn!(group = %key.0, topic = %key.1, member = %id, "member evicted: session timed out");
                }
            }
            evicted += late.len();
            group.rebalance(key);
        }
        groups.retain(|_, g| !g.members.is_empty());
        evicted
    }

    /// The groups on `topic` with members, by name.
    pub(crate) fn describe(&self, topic: &str) -> BTreeMap<String, GroupSnapshot> {
        let groups = self.groups();
        groups
            .iter()
            .filter(|((_, t), _)| t == topic)
            .map(|((name, _), group)| {
                let mut members: BTreeMap<String, Vec<u32>> = group
                    .members
                    .keys()
                    .map(|id| (id.clone(), Vec::new()))
                    .collect();
                for partition in 0..group.partitions {
                    if let Some(owner) = group.owner_of(partition) {
                        members.entry(owner.clone()).or_default().push(partition);
                    }
                }
                (
                    name.clone(),
                    GroupSnapshot {
                        generation: group.generation,
                        members,
                    },
                )
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SESSION: Duration = Duration::from_secs(10);

    fn assigned(membership: &Membership) -> (u64, Vec<u32>) {
        match membership.view.borrow().clone() {
            MemberView::Assigned {
                generation,
                partitions,
            } => (generation, partitions),
            MemberView::Removed(why) => panic!("removed: {why}"),
        }
    }

    #[test]
    fn joins_and_leaves_rebalance_every_partition_to_exactly_one_member() {
        let coordinator = Arc::new(Coordinator::default());
        let now = Instant::now();
        let a = coordinator.join("g", "t", 5, "a", SESSION, now);
        assert_eq!(assigned(&a), (1, vec![0, 1, 2, 3, 4]));
        let b = coordinator.join("g", "t", 5, "b", SESSION, now);
        assert_eq!(assigned(&a), (2, vec![0, 2, 4]));
        assert_eq!(assigned(&b), (2, vec![1, 3]));
        // Another group on the same topic is independent.
        let other = coordinator.join("h", "t", 5, "a", SESSION, now);
        assert_eq!(assigned(&other), (1, vec![0, 1, 2, 3, 4]));
        drop(a);
        assert_eq!(assigned(&b), (3, vec![0, 1, 2, 3, 4]));
        let described = coordinator.describe("t");
        assert_eq!(
            described["g"].members,
            BTreeMap::from([("b".to_owned(), vec![0, 1, 2, 3, 4])])
        );
    }

    #[test]
    fn writes_are_fenced_by_ownership_since_their_generation_and_by_rejoins() {
        let coordinator = Arc::new(Coordinator::default());
        let now = Instant::now();
        let refused = |member: &str, generation: u64, partitions: &[u32], why: &str| {
            let error = coordinator
                .heartbeat(
                    "g",
                    "t",
                    member,
                    generation,
                    partitions.iter().copied(),
                    now,
                )
                .unwrap_err();
            assert!(error.to_string().contains(why), "{error}");
        };
        let _a = coordinator.join("g", "t", 3, "a", SESSION, now);
        let _b = coordinator.join("g", "t", 3, "b", SESSION, now);
        // Generation 2: a owns 0 and 2 (since 1), b owns 1 (since 2). A write of a's from
        // generation 1 is still a's: those partitions never left it.
        coordinator
            .heartbeat("g", "t", "a", 1, [0, 2], now)
            .unwrap();
        refused("a", 1, &[1], "does not own partition 1");
        refused("b", 1, &[1], "joined group \"g\" again at generation 2");
        refused("a", 3, &[0], "stale");
        let _c = coordinator.join("g", "t", 3, "c", SESSION, now);
        // Generation 3: partition 2 moved to c; a keeps 0 and may still write for it.
        refused("a", 2, &[2], "does not own partition 2");
        coordinator.heartbeat("g", "t", "a", 2, [0], now).unwrap();
        coordinator.heartbeat("g", "t", "c", 3, [2], now).unwrap();
        // A second subscription with a's id (the first one paused, say): the first one's
        // generations are void, even for partitions the id keeps.
        let _a_again = coordinator.join("g", "t", 3, "a", SESSION, now);
        refused("a", 3, &[0], "joined group \"g\" again at generation 4");
        coordinator.heartbeat("g", "t", "a", 4, [0], now).unwrap();
        // c leaves: partition 2 comes back to a, which held it before — but not since 4.
        drop(_c);
        refused("a", 4, &[2], "changed owner at generation 5");
        coordinator
            .heartbeat("g", "t", "a", 5, [0, 2], now)
            .unwrap();
        refused("z", 5, &[], "not a member");
    }

    #[test]
    fn members_that_stop_heartbeating_are_evicted_and_told() {
        let coordinator = Arc::new(Coordinator::default());
        let start = Instant::now();
        let a = coordinator.join("g", "t", 4, "a", Duration::from_secs(5), start);
        let b = coordinator.join("g", "t", 4, "b", Duration::from_secs(5), start);
        coordinator
            .heartbeat("g", "t", "b", 2, [], start + Duration::from_secs(4))
            .unwrap();
        assert_eq!(coordinator.expire(start + Duration::from_secs(6)), 1);
        assert!(matches!(&*a.view.borrow(), MemberView::Removed(why) if why.contains("evicted")));
        assert_eq!(assigned(&b), (3, vec![0, 1, 2, 3]));
        // The evicted member's subscription ending later changes nothing.
        drop(a);
        assert_eq!(assigned(&b), (3, vec![0, 1, 2, 3]));
        assert_eq!(coordinator.expire(start + Duration::from_secs(20)), 1);
        assert!(coordinator.describe("t").is_empty());
    }

    #[test]
    fn a_rejoin_with_the_same_id_replaces_the_old_subscription() {
        let coordinator = Arc::new(Coordinator::default());
        let now = Instant::now();
        let first = coordinator.join("g", "t", 2, "a", SESSION, now);
        let second = coordinator.join("g", "t", 2, "a", SESSION, now);
        assert!(matches!(&*first.view.borrow(), MemberView::Removed(_)));
        drop(first);
        assert_eq!(
            assigned(&second),
            (2, vec![0, 1]),
            "the old one leaving does not remove the new"
        );
    }

    proptest! {
        /// Whatever members come and go, every partition has exactly one owner among the
        /// members and the spread differs by at most one.
        #[test]
        fn assignments_cover_every_partition_once(
            partitions in 1u32..20,
            steps in proptest::collection::vec((0u8..6, any::<bool>()), 1..30),
        ) {
            let coordinator = Arc::new(Coordinator::default());
            let now = Instant::now();
            let mut members: BTreeMap<u8, Membership> = BTreeMap::new();
            for (id, join) in steps {
                if join {
                    members.insert(id, coordinator.join("g", "t", partitions, &format!("m{id}"), SESSION, now));
                } else {
                    members.remove(&id);
                }
                if members.is_empty() {
                    continue;
                }
                let mut owners = vec![0u32; partitions as usize];
                let mut sizes = Vec::new();
                let mut generations = Vec::new();
                for membership in members.values() {
                    let (generation, owned) = assigned(membership);
                    generations.push(generation);
                    sizes.push(owned.len());
                    for p in owned {
                        owners[p as usize] += 1;
                    }
                }
                prop_assert!(owners.iter().all(|&n| n == 1), "{owners:?}");
                prop_assert!(generations.windows(2).all(|w| w[0] == w[1]));
                let (min, max) = (sizes.iter().min().unwrap(), sizes.iter().max().unwrap());
                prop_assert!(max - min <= 1);
            }
        }
    }
}
