//! Where group states live: the [`GroupLedger`] every broker in front of one storage
//! engine reads and changes by compare-and-set, and watches for what the others change.
//!
//! With the embedded engine there is one broker and the ledger is [`InMemoryLedger`];
//! with JetStream it is a subject per group in the `RUNNEL_META` stream
//! ([`crate::storage::jetstream::JetStreamGroups`]), so members of one group may subscribe
//! through different brokers and still share its partitions as one group.

use super::state::GroupState;
use crate::error::Result;
use futures::stream::BoxStream;
use std::collections::HashMap;
use std::sync::Mutex;
use tokio::sync::mpsc;

/// A group on a topic: `(group, topic)`.
pub(crate) type GroupKey = (String, String);

/// A stored group state and the revision it was stored at.
pub(crate) type Revised = (GroupState, u64);

/// A change to a group as a watch reports it.
pub(crate) type Change = (GroupKey, GroupState, u64);

/// Group states by key, each with a revision that goes up with every write.
#[tonic::async_trait]
pub(crate) trait GroupLedger: Send + Sync + std::fmt::Debug + 'static {
    /// The state of a group and its revision, or `None` if the group never had a member.
    async fn load(&self, key: &GroupKey) -> Result<Option<Revised>>;
    /// Stores `state` if the group's revision is still `revision` (0: it has none yet);
    /// answers the new revision, or `None` when another write came first.
    async fn store_if(
        &self,
        key: &GroupKey,
        state: &GroupState,
        revision: u64,
    ) -> Result<Option<u64>>;
    /// Every group's latest state, then each state stored from then on, by any broker.
    async fn watch(&self) -> Result<BoxStream<'static, Result<Change>>>;
}

/// The ledger of a broker that is alone with its storage.
#[derive(Debug, Default)]
pub(crate) struct InMemoryLedger {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// The last revision handed out, over every key (as a stream sequence is).
    revision: u64,
    states: HashMap<GroupKey, Revised>,
    watchers: Vec<mpsc::UnboundedSender<Result<Change>>>,
}

impl InMemoryLedger {
    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Every write leaves the map whole: poison carries no risk.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[tonic::async_trait]
impl GroupLedger for InMemoryLedger {
    async fn load(&self, key: &GroupKey) -> Result<Option<Revised>> {
        Ok(self.inner().states.get(key).cloned())
    }

    async fn store_if(
        &self,
        key: &GroupKey,
        state: &GroupState,
        revision: u64,
    ) -> Result<Option<u64>> {
        let mut inner = self.inner();
        let current = inner.states.get(key).map_or(0, |(_, r)| *r);
        if current != revision {
            return Ok(None);
        }
        inner.revision += 1;
        let stored = inner.revision;
        inner.states.insert(key.clone(), (state.clone(), stored));
        inner
            .watchers
            .retain(|w| w.send(Ok((key.clone(), state.clone(), stored))).is_ok());
        Ok(Some(stored))
    }

    async fn watch(&self) -> Result<BoxStream<'static, Result<Change>>> {
        let (sender, receiver) = mpsc::unbounded_channel();
        let mut inner = self.inner();
        for (key, (state, revision)) in &inner.states {
            let _ = sender.send(Ok((key.clone(), state.clone(), *revision)));
        }
        inner.watchers.push(sender);
        Ok(Box::pin(
            tokio_stream::wrappers::UnboundedReceiverStream::new(receiver),
        ))
    }
}
