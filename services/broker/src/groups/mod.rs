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
//! A group's membership is a [`GroupState`](state::GroupState) in a
//! [`GroupLedger`](ledger::GroupLedger): in this broker's memory with the embedded engine,
//! in JetStream with the JetStream engine — so several brokers in front of one JetStream
//! cluster serve one group together, whichever broker each member subscribed through.
//! Every change is a compare-and-set on the ledger; every broker watches the ledger and
//! tells the members it serves what changed. A member whose broker dies stops
//! heartbeating and is evicted by any other broker when its session runs out. Fences and
//! commits are checked against the ledger itself, never a cached copy, so a member fenced
//! by one broker is fenced by all.

mod ledger;
mod state;

pub(crate) use ledger::{Change, GroupKey, GroupLedger, InMemoryLedger, Revised};
pub(crate) use state::GroupState;

use crate::error::{BrokerError, Result};
use futures::StreamExt;
use runnel_server::Shutdown;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio::sync::watch;

/// Compare-and-set attempts before a change gives up as contended.
const ATTEMPTS: usize = 64;

/// How long a broker waits before watching its ledger again after the watch failed.
const REWATCH: Duration = Duration::from_secs(1);

/// Now, in Unix milliseconds: the clock group deadlines are kept in.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

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

/// A subscription this broker serves.
#[derive(Debug)]
struct LocalMember {
    incarnation: u64,
    /// Whether a state holding this subscription has been seen: until then, a state
    /// without it is one from before its join, not a removal.
    seen: bool,
    view: watch::Sender<MemberView>,
}

/// What this broker knows of a group: its latest state and the members it serves.
#[derive(Debug)]
struct Known {
    state: GroupState,
    revision: u64,
    local: HashMap<String, LocalMember>,
}

impl Known {
    /// Tells every local member what the state says of it; forgets those removed.
    fn publish(&mut self) {
        let state = &self.state;
        self.local.retain(|id, member| {
            if state
                .members
                .get(id)
                .is_some_and(|m| m.incarnation == member.incarnation)
            {
                member.seen = true;
                let view = MemberView::Assigned {
                    generation: state.generation,
                    partitions: state.assignment(id),
                };
                member.view.send_if_modified(|current| {
                    let changed = *current != view;
                    *current = view;
                    changed
                });
                return true;
            }
            let reason = state.removal_reason(member.incarnation);
            if !member.seen && reason.is_none() {
                return true;
            }
            member.view.send_replace(MemberView::Removed(
                reason
                    .unwrap_or("no longer a member of the group; subscribe again")
                    .to_owned(),
            ));
            false
        });
    }
}

/// A group as `DescribeTopic` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct GroupSnapshot {
    pub(crate) generation: u64,
    /// Member id → partitions.
    pub(crate) members: BTreeMap<String, Vec<u32>>,
}

/// Every group this broker serves or has seen in its ledger.
#[derive(Debug)]
pub(crate) struct Coordinator {
    ledger: Arc<dyn GroupLedger>,
    known: Mutex<HashMap<GroupKey, Known>>,
}

/// A subscription's membership: its view of the assignment, and its leaving when dropped.
#[derive(Debug)]
pub(crate) struct Membership {
    coordinator: Arc<Coordinator>,
    key: GroupKey,
    member_id: String,
    incarnation: u64,
    /// The member's current instructions.
    pub(crate) view: watch::Receiver<MemberView>,
}

impl Drop for Membership {
    fn drop(&mut self) {
        self.coordinator
            .forget(&self.key, &self.member_id, self.incarnation);
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // No runtime to leave on: the session timeout evicts the member instead.
            return;
        };
        let coordinator = Arc::clone(&self.coordinator);
        let key = self.key.clone();
        let member_id = self.member_id.clone();
        let incarnation = self.incarnation;
        runtime.spawn(async move {
            let left = coordinator
                .update(&key, None, |state| state.leave(&member_id, incarnation))
                .await;
            match left {
                Ok(Some(_)) => {
                    tracing::info!(group = %key.0, topic = %key.1, member = %member_id, "member left");
                }
                Ok(None) => {}
                Err(error) => {
                    tracing::warn!(%error, group = %key.0, member = %member_id, "could not record a member's leaving; its session timeout will");
                }
            }
        });
    }
}

impl Coordinator {
    /// A coordinator over `ledger`.
    pub(crate) fn new(ledger: Arc<dyn GroupLedger>) -> Arc<Coordinator> {
        Arc::new(Coordinator {
            ledger,
            known: Mutex::default(),
        })
    }

    /// A coordinator for a broker alone with its storage.
    pub(crate) fn in_memory() -> Arc<Coordinator> {
        Coordinator::new(Arc::new(InMemoryLedger::default()))
    }

    fn known(&self) -> std::sync::MutexGuard<'_, HashMap<GroupKey, Known>> {
        // Every change leaves the map whole before the next one: poison carries no risk.
        self.known
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Takes in a state read or written at `revision`, unless a later one is known, and
    /// tells the local members.
    fn apply(&self, key: &GroupKey, state: GroupState, revision: u64) {
        let mut known = self.known();
        let entry = known.entry(key.clone()).or_insert_with(|| Known {
            state: GroupState::new(state.partitions),
            revision: 0,
            local: HashMap::new(),
        });
        if revision <= entry.revision {
            return;
        }
        entry.state = state;
        entry.revision = revision;
        entry.publish();
    }

    /// Stops telling a subscription anything (it is gone from this broker).
    fn forget(&self, key: &GroupKey, member_id: &str, incarnation: u64) {
        if let Some(entry) = self.known().get_mut(key)
            && entry
                .local
                .get(member_id)
                .is_some_and(|m| m.incarnation == incarnation)
        {
            entry.local.remove(member_id);
        }
    }

    /// Changes a group by compare-and-set: `change` edits the latest state (a new one of
    /// `create` partitions if the group has none and `create` is set) and answers whether
    /// it changed anything. Answers the state written, or `None` if nothing was.
    async fn update(
        &self,
        key: &GroupKey,
        create: Option<u32>,
        mut change: impl FnMut(&mut GroupState) -> bool,
    ) -> Result<Option<Revised>> {
        for _ in 0..ATTEMPTS {
            let (mut state, revision) = match self.ledger.load(key).await? {
                Some(found) => found,
                None => match create {
                    Some(partitions) => (GroupState::new(partitions), 0),
                    None => return Ok(None),
                },
            };
            let generation = state.generation;
            if !change(&mut state) {
                return Ok(None);
            }
            let Some(stored) = self.ledger.store_if(key, &state, revision).await? else {
                // Another broker (or task) changed the group first: change the newer state.
                tokio::task::yield_now().await;
                continue;
            };
            if state.generation != generation {
                let members = state.members.len();
                metrics::counter!("runnel_broker_group_rebalances_total", "group" => key.0.clone(), "topic" => key.1.clone()).increment(1);
                metrics::gauge!("runnel_broker_group_members", "group" => key.0.clone(), "topic" => key.1.clone()).set(members as f64);
                tracing::info!(group = %key.0, topic = %key.1, generation = state.generation, members, "group rebalanced");
            }
            self.apply(key, state.clone(), stored);
            return Ok(Some((state, stored)));
        }
        Err(BrokerError::Engine(format!(
            "group {:?} on topic {:?} changed under every one of {ATTEMPTS} attempts to update it",
            key.0, key.1
        )))
    }

    /// Adds `member_id` to `group` on `topic` (of `partitions` partitions), replacing an
    /// earlier subscription with the same id, and rebalances.
    pub(crate) async fn join(
        self: &Arc<Self>,
        group: &str,
        topic: &str,
        partitions: u32,
        member_id: &str,
        session_timeout: Duration,
        now_ms: u64,
    ) -> Result<Membership> {
        let key = (group.to_owned(), topic.to_owned());
        let incarnation = rand::random::<u64>();
        let (view, receiver) = watch::channel(MemberView::Assigned {
            generation: 0,
            partitions: Vec::new(),
        });
        {
            let mut known = self.known();
            let entry = known.entry(key.clone()).or_insert_with(|| Known {
                state: GroupState::new(partitions),
                revision: 0,
                local: HashMap::new(),
            });
            if let Some(replaced) = entry.local.insert(
                member_id.to_owned(),
                LocalMember {
                    incarnation,
                    seen: false,
                    view,
                },
            ) {
                replaced.view.send_replace(MemberView::Removed(
                    "a newer subscription with the same member id took over".into(),
                ));
            }
        }
        // Dropped (leaving the group) if the join fails.
        let membership = Membership {
            coordinator: Arc::clone(self),
            key: key.clone(),
            member_id: member_id.to_owned(),
            incarnation,
            view: receiver,
        };
        let session_ms = u64::try_from(session_timeout.as_millis()).unwrap_or(u64::MAX);
        self.update(&key, Some(partitions), |state| {
            state.join(member_id, incarnation, session_ms, now_ms);
            true
        })
        .await?;
        Ok(membership)
    }

    /// Checks, against the ledger, that `member_id` is in `group` at `generation` and owns
    /// every partition in `partitions`, and counts it as a heartbeat.
    pub(crate) async fn heartbeat(
        &self,
        group: &str,
        topic: &str,
        member_id: &str,
        generation: u64,
        partitions: &[u32],
        now_ms: u64,
    ) -> Result<()> {
        let key = (group.to_owned(), topic.to_owned());
        let mut verdict = None;
        self.update(&key, None, |state| {
            let checked = state.check(group, topic, member_id, generation, partitions, now_ms);
            let extend = checked.is_ok() && state.due_for_extension(member_id, now_ms);
            verdict = Some(checked);
            if extend {
                state.extend(member_id, now_ms);
            }
            extend
        })
        .await?;
        // No state at all: the group never had a member.
        verdict.unwrap_or_else(|| Err(state::not_a_member(group, topic, member_id)))
    }

    /// Evicts every member whose session ran out by `now_ms`, rebalancing their groups.
    /// Returns how many were evicted.
    pub(crate) async fn expire(&self, now_ms: u64) -> Result<usize> {
        let late: Vec<GroupKey> = self
            .known()
            .iter()
            .filter(|(_, known)| !known.state.late(now_ms).is_empty())
            .map(|(key, _)| key.clone())
            .collect();
        let mut evicted = 0;
        for key in late {
            let mut gone = Vec::new();
            self.update(&key, None, |state| {
                gone = state.expire(now_ms);
                !gone.is_empty()
            })
            .await?;
            for id in &gone {
                tracing::warn!(group = %key.0, topic = %key.1, member = %id, "member evicted: session timed out");
            }
            evicted += gone.len();
        }
        self.known()
            .retain(|_, known| !known.state.members.is_empty() || !known.local.is_empty());
        Ok(evicted)
    }

    /// Follows every change to the ledger, from any broker, until `shutdown`; watches again
    /// whenever the watch breaks.
    pub(crate) async fn follow_ledger(self: Arc<Self>, shutdown: Shutdown) {
        loop {
            match self.ledger.watch().await {
                Ok(mut changes) => loop {
                    let next = tokio::select! {
                        next = changes.next() => next,
                        () = shutdown.wait() => return,
                    };
                    match next {
                        Some(Ok((key, state, revision))) => self.apply(&key, state, revision),
                        Some(Err(error)) => {
                            tracing::warn!(%error, "watching consumer groups failed; watching again");
                            break;
                        }
                        None => break,
                    }
                },
                Err(error) => {
                    tracing::warn!(%error, "cannot watch consumer groups; trying again");
                }
            }
            tokio::select! {
                () = tokio::time::sleep(REWATCH) => {}
                () = shutdown.wait() => return,
            }
        }
    }

    /// The groups on `topic` with members, by name, as this broker last saw them.
    pub(crate) fn describe(&self, topic: &str) -> BTreeMap<String, GroupSnapshot> {
        self.known()
            .iter()
            .filter(|((_, t), known)| t == topic && !known.state.members.is_empty())
            .map(|((name, _), known)| {
                (
                    name.clone(),
                    GroupSnapshot {
                        generation: known.state.generation,
                        members: known.state.owned(),
                    },
                )
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SESSION: Duration = Duration::from_secs(10);
    const WAIT: Duration = Duration::from_secs(5);

    fn view(membership: &Membership) -> MemberView {
        membership.view.borrow().clone()
    }

    /// Waits until the membership's view is `expected`.
    async fn until(membership: &mut Membership, expected: MemberView) {
        let waited = tokio::time::timeout(WAIT, membership.view.wait_for(|v| *v == expected))
            .await
            .map(|seen| seen.is_ok());
        assert_eq!(
            waited,
            Ok(true),
            "{expected:?} in time; have {:?}",
            view(membership)
        );
    }

    fn assigned(generation: u64, partitions: &[u32]) -> MemberView {
        MemberView::Assigned {
            generation,
            partitions: partitions.to_vec(),
        }
    }

    /// Two brokers over one ledger, each following it.
    fn two_brokers() -> (
        Arc<Coordinator>,
        Arc<Coordinator>,
        runnel_server::ShutdownTrigger,
    ) {
        let ledger: Arc<dyn GroupLedger> = Arc::new(InMemoryLedger::default());
        let (stop, shutdown) = Shutdown::new();
        let first = Coordinator::new(Arc::clone(&ledger));
        let second = Coordinator::new(ledger);
        tokio::spawn(Arc::clone(&first).follow_ledger(shutdown.clone()));
        tokio::spawn(Arc::clone(&second).follow_ledger(shutdown));
        (first, second, stop)
    }

    #[tokio::test]
    async fn joins_and_leaves_rebalance_every_partition_to_exactly_one_member() {
        let coordinator = Coordinator::in_memory();
        let now = now_ms();
        let a = coordinator
            .join("g", "t", 5, "a", SESSION, now)
            .await
            .unwrap();
        assert_eq!(view(&a), assigned(1, &[0, 1, 2, 3, 4]));
        let mut b = coordinator
            .join("g", "t", 5, "b", SESSION, now)
            .await
            .unwrap();
        assert_eq!(view(&a), assigned(2, &[0, 2, 4]));
        assert_eq!(view(&b), assigned(2, &[1, 3]));
        // Another group on the same topic is independent.
        let other = coordinator
            .join("h", "t", 5, "a", SESSION, now)
            .await
            .unwrap();
        assert_eq!(view(&other), assigned(1, &[0, 1, 2, 3, 4]));
        drop(a);
        until(&mut b, assigned(3, &[0, 1, 2, 3, 4])).await;
        assert_eq!(
            coordinator.describe("t")["g"].members,
            BTreeMap::from([("b".to_owned(), vec![0, 1, 2, 3, 4])])
        );
    }

    #[tokio::test]
    async fn members_that_stop_heartbeating_are_evicted_and_told() {
        let coordinator = Coordinator::in_memory();
        let start = now_ms();
        let a = coordinator
            .join("g", "t", 4, "a", Duration::from_secs(5), start)
            .await
            .unwrap();
        let b = coordinator
            .join("g", "t", 4, "b", Duration::from_secs(5), start)
            .await
            .unwrap();
        coordinator
            .heartbeat("g", "t", "b", 2, &[], start + 4_000)
            .await
            .unwrap();
        assert_eq!(coordinator.expire(start + 6_000).await.unwrap(), 1);
        assert!(matches!(view(&a), MemberView::Removed(why) if why.contains("evicted")));
        assert_eq!(view(&b), assigned(3, &[0, 1, 2, 3]));
        // The evicted member's subscription ending later changes nothing.
        drop(a);
        tokio::task::yield_now().await;
        assert_eq!(view(&b), assigned(3, &[0, 1, 2, 3]));
        assert_eq!(coordinator.expire(start + 20_000).await.unwrap(), 1);
        assert!(coordinator.describe("t").is_empty());
        let error = coordinator
            .heartbeat("nobody", "t", "b", 1, &[], start)
            .await
            .unwrap_err();
        assert!(error.to_string().contains("not a member"), "{error}");
    }

    #[tokio::test]
    async fn a_rejoin_with_the_same_id_replaces_the_old_subscription() {
        let coordinator = Coordinator::in_memory();
        let now = now_ms();
        let first = coordinator
            .join("g", "t", 2, "a", SESSION, now)
            .await
            .unwrap();
        let second = coordinator
            .join("g", "t", 2, "a", SESSION, now)
            .await
            .unwrap();
        assert!(matches!(view(&first), MemberView::Removed(_)));
        drop(first);
        tokio::task::yield_now().await;
        assert_eq!(
            view(&second),
            assigned(2, &[0, 1]),
            "the old one leaving does not remove the new"
        );
    }

    #[tokio::test]
    async fn members_on_two_brokers_share_one_group() {
        let (one, two, _stop) = two_brokers();
        let now = now_ms();
        let mut a = one.join("g", "t", 4, "a", SESSION, now).await.unwrap();
        let b = two.join("g", "t", 4, "b", SESSION, now).await.unwrap();
        // b's broker wrote generation 2; a's broker learns it from the ledger.
        assert_eq!(view(&b), assigned(2, &[1, 3]));
        until(&mut a, assigned(2, &[0, 2])).await;
        // Fences are checked against the ledger, whichever broker checks them.
        one.heartbeat("g", "t", "b", 2, &[1, 3], now).await.unwrap();
        let error = two
            .heartbeat("g", "t", "a", 1, &[1], now)
            .await
            .unwrap_err();
        assert!(
            error.to_string().contains("does not own partition 1"),
            "{error}"
        );
        // The same member id subscribing again through the other broker replaces the
        // first subscription there too.
        let mut a_again = two.join("g", "t", 4, "a", SESSION, now).await.unwrap();
        tokio::time::timeout(
            WAIT,
            a.view.wait_for(|v| matches!(v, MemberView::Removed(_))),
        )
        .await
        .expect("the first subscription is told")
        .unwrap();
        assert_eq!(view(&a_again), assigned(3, &[0, 2]));
        // b leaves through its broker: a (on the other broker now too) takes everything.
        drop(b);
        until(&mut a_again, assigned(4, &[0, 1, 2, 3])).await;
        until_described(&one, 4).await;
    }

    /// Waits until `coordinator` describes group `g` at `generation`.
    async fn until_described(coordinator: &Coordinator, generation: u64) {
        runnel_testkit::eventually(
            WAIT,
            "the broker to see the group's latest generation",
            || async {
                coordinator.describe("t").get("g").map(|g| g.generation) == Some(generation)
            },
        )
        .await;
    }

    #[tokio::test]
    async fn a_member_whose_broker_died_is_evicted_by_another() {
        let (one, two, _stop) = two_brokers();
        let start = now_ms();
        let a = one
            .join("g", "t", 2, "a", Duration::from_secs(5), start)
            .await
            .unwrap();
        // a's broker dies without a word: nothing leaves the group for it.
        std::mem::forget(a);
        drop(one);
        let mut b = two
            .join("g", "t", 2, "b", Duration::from_secs(5), start + 1_000)
            .await
            .unwrap();
        assert_eq!(view(&b), assigned(2, &[1]));
        assert_eq!(two.expire(start + 5_500).await.unwrap(), 1);
        until(&mut b, assigned(3, &[0, 1])).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_joins_through_many_brokers_lose_none() {
        let ledger: Arc<dyn GroupLedger> = Arc::new(InMemoryLedger::default());
        let brokers: Vec<Arc<Coordinator>> = (0..4)
            .map(|_| Coordinator::new(Arc::clone(&ledger)))
            .collect();
        let now = now_ms();
        let joins = (0..16).map(|i| {
            let broker = Arc::clone(&brokers[i % brokers.len()]);
            tokio::spawn(async move {
                broker
                    .join("g", "t", 16, &format!("m{i:02}"), SESSION, now)
                    .await
                    .unwrap()
            })
        });
        let members: Vec<Membership> = futures::future::join_all(joins)
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
        let (state, _) = ledger
            .load(&("g".to_owned(), "t".to_owned()))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(state.members.len(), 16);
        assert_eq!(state.generation, 16);
        for member in &members {
            assert_eq!(state.assignment(&member.member_id).len(), 1);
        }
    }
}
