//! One consumer group's membership as a value: who is in it, until when, and which
//! partitions each member owns at which generation.
//!
//! Every change is a pure function of the state and a wall-clock time in milliseconds, so
//! the same state can live in one broker's memory or in JetStream, where any broker
//! changes it by compare-and-set (see [`super::ledger`]). Times are wall-clock (Unix
//! milliseconds), not a process's monotonic clock, because the broker that set a deadline
//! need not be the one that checks it.

use crate::error::{BrokerError, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// How many recent removals a state remembers, to tell a member why it was removed.
const REMEMBERED_REMOVALS: usize = 16;

/// A member as the group records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Member {
    /// Which subscription holds the membership: a rejoin with the same id replaces it.
    /// Unique across brokers (random).
    pub(crate) incarnation: u64,
    /// The generation this subscription joined at: anything it writes carries this one or
    /// a later one, so an earlier subscription with the same id cannot write as it.
    pub(crate) joined_at: u64,
    pub(crate) session_timeout_ms: u64,
    /// Unix milliseconds after which the member is gone unless it heartbeats first.
    pub(crate) deadline_ms: u64,
}

/// Why a subscription was removed, for the broker that serves it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Removal {
    pub(crate) incarnation: u64,
    pub(crate) reason: String,
}

/// One group on one topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct GroupState {
    pub(crate) partitions: u32,
    /// Goes up with every rebalance and never comes back down, even when the group empties:
    /// a generation is never reused, so a write fenced by an old one stays refused.
    pub(crate) generation: u64,
    pub(crate) members: BTreeMap<String, Member>,
    /// Per partition, the generation since which its current owner has held it without a
    /// break: a write fenced by any generation from then on is still the owner's.
    pub(crate) owned_since: Vec<u64>,
    /// Per partition, the owner it had after the last rebalance.
    pub(crate) owners: Vec<Option<String>>,
    /// The latest removals, newest last.
    #[serde(default)]
    pub(crate) removed: Vec<Removal>,
}

/// The refusal of a member the group does not have (any more).
pub(crate) fn not_a_member(group: &str, topic: &str, member_id: &str) -> BrokerError {
    BrokerError::NotAMember(format!(
        "{member_id:?} is not a member of group {group:?} on topic {topic:?}; subscribe again"
    ))
}

impl GroupState {
    /// A group with no members yet.
    pub(crate) fn new(partitions: u32) -> GroupState {
        GroupState {
            partitions,
            generation: 0,
            members: BTreeMap::new(),
            owned_since: Vec::new(),
            owners: Vec::new(),
            removed: Vec::new(),
        }
    }

    /// Deals the partitions round-robin over the members, sorted by id.
    fn rebalance(&mut self) {
        self.generation += 1;
        let ids: Vec<&String> = self.members.keys().collect();
        self.owners.resize(self.partitions as usize, None);
        self.owned_since.resize(self.partitions as usize, 0);
        for partition in 0..self.partitions {
            let owner = (!ids.is_empty()).then(|| ids[partition as usize % ids.len()]);
            let slot = partition as usize;
            if self.owners[slot].as_ref() != owner {
                self.owners[slot] = owner.cloned();
                self.owned_since[slot] = self.generation;
            }
        }
    }

    fn remember(&mut self, incarnation: u64, reason: String) {
        self.removed.push(Removal {
            incarnation,
            reason,
        });
        let excess = self.removed.len().saturating_sub(REMEMBERED_REMOVALS);
        self.removed.drain(..excess);
    }

    /// The partitions `member_id` owns now.
    pub(crate) fn assignment(&self, member_id: &str) -> Vec<u32> {
        (0..self.partitions)
            .filter(|&p| self.owner_of(p).map(String::as_str) == Some(member_id))
            .collect()
    }

    fn owner_of(&self, partition: u32) -> Option<&String> {
        let ids: Vec<&String> = self.members.keys().collect();
        (!ids.is_empty()).then(|| ids[partition as usize % ids.len()])
    }

    /// Why subscription `incarnation` is no longer in the group, if the state remembers.
    pub(crate) fn removal_reason(&self, incarnation: u64) -> Option<&str> {
        self.removed
            .iter()
            .rev()
            .find(|r| r.incarnation == incarnation)
            .map(|r| r.reason.as_str())
    }

    /// Adds a subscription as `member_id`, replacing an earlier one with the same id, and
    /// rebalances.
    pub(crate) fn join(
        &mut self,
        member_id: &str,
        incarnation: u64,
        session_timeout_ms: u64,
        now_ms: u64,
    ) {
        let replaced = self.members.insert(
            member_id.to_owned(),
            Member {
                incarnation,
                // The rebalance below makes it so.
                joined_at: self.generation + 1,
                session_timeout_ms,
                deadline_ms: now_ms.saturating_add(session_timeout_ms),
            },
        );
        if let Some(old) = replaced {
            self.remember(
                old.incarnation,
                "a newer subscription with the same member id took over".into(),
            );
        }
        self.rebalance();
    }

    /// Removes subscription `incarnation` of `member_id` if it still holds the membership,
    /// and rebalances; `false` if there was nothing to remove.
    pub(crate) fn leave(&mut self, member_id: &str, incarnation: u64) -> bool {
        if self
            .members
            .get(member_id)
            .is_none_or(|m| m.incarnation != incarnation)
        {
            return false;
        }
        self.members.remove(member_id);
        self.remember(incarnation, "the member left".into());
        self.rebalance();
        true
    }

    /// Checks that `member_id` is in the group at `generation` and owns every partition in
    /// `partitions`.
    pub(crate) fn check(
        &self,
        group: &str,
        topic: &str,
        member_id: &str,
        generation: u64,
        partitions: &[u32],
        now_ms: u64,
    ) -> Result<()> {
        let Some(member) = self.members.get(member_id) else {
            return Err(not_a_member(group, topic, member_id));
        };
        // Past its deadline a member is gone, whether or not a sweep has removed it yet:
        // a process that was paused that long must not keep writing as the owner.
        if member.deadline_ms <= now_ms {
            return Err(BrokerError::NotAMember(format!(
                "{member_id:?}'s session in group {group:?} timed out ({} ms); subscribe again",
                member.session_timeout_ms
            )));
        }
        // A generation from before this subscription joined (an earlier subscription with
        // the same id, paused or cut off) or one the group never had is refused; a later
        // one stands as long as the partitions it names have not changed owner since — a
        // rebalance that moves other partitions does not fence this member's writes.
        if generation < member.joined_at || generation > self.generation {
            return Err(BrokerError::NotAMember(format!(
                "generation {generation} is stale: {member_id:?} joined group {group:?} again at generation {} (the group is at {}); use the latest assignment",
                member.joined_at, self.generation
            )));
        }
        for &partition in partitions {
            if self.owner_of(partition).map(String::as_str) != Some(member_id) {
                return Err(BrokerError::NotAMember(format!(
                    "{member_id:?} does not own partition {partition} in generation {}",
                    self.generation
                )));
            }
            let since = self
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
        Ok(())
    }

    /// Whether a heartbeat at `now_ms` should push `member_id`'s deadline out: when less
    /// than half its session is left. A member that heartbeats more often than its session
    /// timeout therefore never runs out, and a shared state is rewritten at most about
    /// twice per session per member rather than on every heartbeat.
    pub(crate) fn due_for_extension(&self, member_id: &str, now_ms: u64) -> bool {
        self.members.get(member_id).is_some_and(|m| {
            m.deadline_ms.saturating_sub(now_ms) < m.session_timeout_ms.div_ceil(2)
        })
    }

    /// Sets `member_id`'s deadline a session from `now_ms`.
    pub(crate) fn extend(&mut self, member_id: &str, now_ms: u64) {
        if let Some(member) = self.members.get_mut(member_id) {
            member.deadline_ms = now_ms.saturating_add(member.session_timeout_ms);
        }
    }

    /// The members whose session ran out by `now_ms`.
    pub(crate) fn late(&self, now_ms: u64) -> Vec<String> {
        self.members
            .iter()
            .filter(|(_, m)| m.deadline_ms <= now_ms)
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Evicts every member whose session ran out by `now_ms` and rebalances if any was;
    /// answers who was.
    pub(crate) fn expire(&mut self, now_ms: u64) -> Vec<String> {
        let late = self.late(now_ms);
        for id in &late {
            if let Some(member) = self.members.remove(id) {
                self.remember(
                    member.incarnation,
                    format!(
                        "no commit or heartbeat within the session timeout of {} ms; evicted",
                        member.session_timeout_ms
                    ),
                );
            }
        }
        if !late.is_empty() {
            self.rebalance();
        }
        late
    }

    /// Member id → partitions, as `DescribeTopic` shows them.
    pub(crate) fn owned(&self) -> BTreeMap<String, Vec<u32>> {
        let mut members: BTreeMap<String, Vec<u32>> = self
            .members
            .keys()
            .map(|id| (id.clone(), Vec::new()))
            .collect();
        for partition in 0..self.partitions {
            if let Some(owner) = self.owner_of(partition) {
                members.entry(owner.clone()).or_default().push(partition);
            }
        }
        members
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SESSION: u64 = 10_000;

    #[test]
    fn writes_are_fenced_by_ownership_since_their_generation_and_by_rejoins() {
        let mut state = GroupState::new(3);
        let now = 1_000;
        let refused = |state: &GroupState, member: &str, generation, partitions: &[u32], why| {
            let error = state
                .check("g", "t", member, generation, partitions, now)
                .unwrap_err();
            assert!(error.to_string().contains(why), "{error}");
        };
        state.join("a", 1, SESSION, now);
        state.join("b", 2, SESSION, now);
        // Generation 2: a owns 0 and 2 (since 1), b owns 1 (since 2). A write of a's from
        // generation 1 is still a's: those partitions never left it.
        state.check("g", "t", "a", 1, &[0, 2], now).unwrap();
        refused(&state, "a", 1, &[1], "does not own partition 1");
        refused(
            &state,
            "b",
            1,
            &[1],
            "joined group \"g\" again at generation 2",
        );
        refused(&state, "a", 3, &[0], "stale");
        state.join("c", 3, SESSION, now);
        // Generation 3: partition 2 moved to c; a keeps 0 and may still write for it.
        refused(&state, "a", 2, &[2], "does not own partition 2");
        state.check("g", "t", "a", 2, &[0], now).unwrap();
        state.check("g", "t", "c", 3, &[2], now).unwrap();
        // A second subscription with a's id (the first one paused, say): the first one's
        // generations are void, even for partitions the id keeps.
        state.join("a", 4, SESSION, now);
        assert_eq!(
            state.removal_reason(1),
            Some("a newer subscription with the same member id took over")
        );
        refused(
            &state,
            "a",
            3,
            &[0],
            "joined group \"g\" again at generation 4",
        );
        state.check("g", "t", "a", 4, &[0], now).unwrap();
        // c leaves: partition 2 comes back to a, which held it before — but not since 4.
        assert!(state.leave("c", 3));
        refused(&state, "a", 4, &[2], "changed owner at generation 5");
        state.check("g", "t", "a", 5, &[0, 2], now).unwrap();
        refused(&state, "z", 5, &[], "not a member");
        // The replaced subscription leaving changes nothing.
        assert!(!state.leave("a", 1));
        assert_eq!(state.generation, 5);
    }

    #[test]
    fn deadlines_expire_members_and_heartbeats_extend_them_at_half_a_session() {
        let mut state = GroupState::new(4);
        state.join("a", 1, 5_000, 0);
        state.join("b", 2, 5_000, 0);
        assert!(!state.due_for_extension("b", 2_000));
        assert!(state.due_for_extension("b", 2_600));
        state.extend("b", 4_000);
        // Past its deadline a member is refused even before it is evicted.
        let error = state.check("g", "t", "a", 2, &[], 5_000).unwrap_err();
        assert!(error.to_string().contains("timed out"), "{error}");
        assert_eq!(state.expire(6_000), ["a"]);
        assert_eq!(state.assignment("b"), [0, 1, 2, 3]);
        assert_eq!(state.generation, 3);
        assert!(state.removal_reason(1).unwrap().contains("evicted"));
        assert!(state.expire(8_000).is_empty());
        assert_eq!(state.expire(9_000), ["b"]);
        assert!(state.owned().is_empty());
        // The generation goes on from where it was when someone joins again.
        state.join("c", 3, 5_000, 10_000);
        assert_eq!(state.generation, 5);
    }

    #[test]
    fn removals_remembered_are_bounded() {
        let mut state = GroupState::new(1);
        for incarnation in 0..100 {
            state.join("a", incarnation, SESSION, 0);
        }
        assert_eq!(state.removed.len(), REMEMBERED_REMOVALS);
        assert!(state.removal_reason(98).is_some());
        assert!(state.removal_reason(3).is_none());
    }

    proptest! {
        /// Whatever members come and go, every partition has exactly one owner among the
        /// members, the spread differs by at most one, the generation only goes up, and a
        /// state survives its JSON form unchanged (it is what JetStream holds).
        #[test]
        fn assignments_cover_every_partition_once(
            partitions in 1u32..20,
            steps in proptest::collection::vec((0u8..6, any::<bool>()), 1..30),
        ) {
            let mut state = GroupState::new(partitions);
            let mut incarnations: BTreeMap<u8, u64> = BTreeMap::new();
            let mut last_generation = 0;
            for (n, (id, join)) in steps.into_iter().enumerate() {
                let name = format!("m{id}");
                if join {
                    state.join(&name, n as u64, SESSION, 0);
                    incarnations.insert(id, n as u64);
                } else if let Some(incarnation) = incarnations.remove(&id) {
                    prop_assert!(state.leave(&name, incarnation));
                }
                prop_assert!(state.generation >= last_generation);
                last_generation = state.generation;
                let mut owners = vec![0u32; partitions as usize];
                let mut sizes = Vec::new();
                for id in state.members.keys() {
                    let owned = state.assignment(id);
                    sizes.push(owned.len());
                    for p in owned {
                        owners[p as usize] += 1;
                    }
                }
                let round_trip: GroupState = serde_json::from_slice(&serde_json::to_vec(&state).unwrap()).unwrap();
                prop_assert_eq!(&round_trip, &state);
                if state.members.is_empty() {
                    continue;
                }
                prop_assert!(owners.iter().all(|&n| n == 1), "{owners:?}");
                let (min, max) = (sizes.iter().min().unwrap(), sizes.iter().max().unwrap());
                prop_assert!(max - min <= 1);
            }
        }
    }
}
