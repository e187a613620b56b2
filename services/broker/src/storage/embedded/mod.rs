//! The embedded engine: this broker's own segmented log on local disk, the default.
//!
//! Each topic is a directory of partitions ([`topics`]); each partition a log of segments
//! ([`partition`], [`segment`], [`index`]) with its idempotent producers ([`producers`])
//! and the identities of its recent events, to recognise retried events ([`recent`]);
//! DURABLE acks share fsyncs through the group commit ([`durability`]); consumer groups'
//! committed offsets are a log of their own ([`offsets`]); and [`follower`] follows a
//! partition live for `Subscribe`.

pub(crate) mod durability;
mod follower;
mod index;
pub(crate) mod offsets;
pub(crate) mod partition;
mod producers;
pub(crate) mod recent;
pub(crate) mod repair;
pub(crate) mod segment;
pub(crate) mod topics;

use super::{Appended, Committed, FOLLOW_BUFFER, Follow, Incoming, Read, Retention, Storage};
use crate::error::{BrokerError, Result};
use crate::topic::{self, RetentionOverride, Topic};
use durability::GroupCommit;
use follower::PartitionReader;
use offsets::OffsetStore;
use partition::Partition;
use runnel_proto::Millis;
use runnel_proto::v1::TopicInfo;
use runnel_server::Shutdown;
use std::collections::BTreeMap;
use std::sync::Arc;
use tokio::sync::mpsc;
use topics::Topics;

/// The embedded engine: topics in segmented logs under the data directory.
#[derive(Debug)]
pub(crate) struct Embedded {
    topics: Arc<Topics>,
    offsets: Arc<OffsetStore>,
    group_commit: Arc<GroupCommit>,
    writeback_bytes: u64,
    /// With `fsync = "always"`: readers (`Fetch`, `Subscribe`) and group commits see only
    /// what is fsync'd, so that an OS crash can never take back a record a consumer saw and
    /// hand its offset to another; a reader waiting past the durable offset asks the group
    /// commit for an fsync.
    durable_reads: bool,
}

impl Embedded {
    pub(crate) fn new(
        topics: Arc<Topics>,
        offsets: Arc<OffsetStore>,
        group_commit: Arc<GroupCommit>,
        writeback_bytes: u64,
        durable_reads: bool,
    ) -> Embedded {
        Embedded {
            topics,
            offsets,
            group_commit,
            writeback_bytes,
            durable_reads,
        }
    }

    /// The offset below which a reader from `from` may see records: with durable reads,
    /// the durable offset — and when the reader has read everything durable but not all that
    /// was appended, once that is fsync'd (asked for here) — else the end offset.
    async fn visible_end(&self, partition: &Arc<Partition>, from: u64) -> Result<u64> {
        if !self.durable_reads {
            return Ok(partition.end_offset());
        }
        let end = partition.end_offset();
        let durable = partition.durable_offset();
        if from >= durable && durable < end {
            self.group_commit.request(partition);
            partition.wait_durable(end).await?;
        }
        Ok(partition.durable_offset())
    }

    fn topic(&self, name: &str) -> Result<Arc<Topic>> {
        topic::validate_name(name)?;
        self.topics
            .get(name)
            .ok_or_else(|| BrokerError::TopicNotFound(name.to_owned()))
    }

    /// The partition, unless damage stopped it.
    fn partition(&self, topic: &str, partition: u32) -> Result<Arc<Partition>> {
        let partition = Arc::clone(self.topic(topic)?.partition(partition)?);
        partition.usable()?;
        Ok(partition)
    }

    fn defaults(&self) -> Retention {
        self.topics.default_retention()
    }
}

#[tonic::async_trait]
impl Storage for Embedded {
    async fn create_topic(
        &self,
        name: &str,
        partitions: u32,
        retention: RetentionOverride,
    ) -> Result<TopicInfo> {
        let topic = self.topics.create(name, partitions, retention).await?;
        Ok(topic.info(self.defaults()))
    }

    async fn partitions(&self, topic: &str) -> Result<Option<u32>> {
        Ok(self.topics.get(topic).map(|t| t.partition_count()))
    }

    async fn list_topics(&self) -> Result<Vec<TopicInfo>> {
        Ok(self
            .topics
            .list()
            .iter()
            .map(|t| t.info(self.defaults()))
            .collect())
    }

    async fn topic_info(&self, topic: &str) -> Result<TopicInfo> {
        Ok(self.topic(topic)?.info(self.defaults()))
    }

    async fn append(
        &self,
        topic: &str,
        partition: u32,
        batch: Incoming,
        durable: bool,
    ) -> Result<Appended> {
        let partition = self.partition(topic, partition)?;
        let count = u64::from(batch.record_count);
        let bytes = batch.records.len() as u64;
        let writer = Arc::clone(&partition);
        let now = runnel_proto::now_millis();
        let appended = match partition.try_append_inline(batch, now) {
            Ok(appended) => appended?,
            Err(batch) => tokio::task::spawn_blocking(move || writer.append(batch, now)).await??,
        };
        if durable {
            let upto = match &appended {
                Appended::Stored { next_offset, .. } => *next_offset,
                Appended::Duplicate { base_offset } => base_offset + count,
            };
            self.group_commit.request(&partition);
            partition.wait_durable(upto).await?;
        } else if self.writeback_bytes > 0 && partition.writeback_due(bytes, self.writeback_bytes) {
            // Not waited for: it keeps the dirty pages (and what a power cut loses) bounded.
            self.group_commit.request(&partition);
        }
        Ok(appended)
    }

    async fn read(&self, topic: &str, partition: u32, from: u64, max_bytes: usize) -> Result<Read> {
        let partition = self.partition(topic, partition)?;
        let visible = self.visible_end(&partition, from).await?;
        tokio::task::spawn_blocking(move || partition.read_below(from, max_bytes, visible)).await?
    }

    async fn offset_for_time(&self, topic: &str, partition: u32, time: Millis) -> Result<u64> {
        let partition = self.partition(topic, partition)?;
        tokio::task::spawn_blocking(move || partition.offset_for_time(time.0)).await?
    }

    async fn bounds(&self, topic: &str, partition: u32) -> Result<(u64, u64)> {
        let partition = self.partition(topic, partition)?;
        let end = if self.durable_reads {
            partition.durable_offset()
        } else {
            partition.end_offset()
        };
        Ok((partition.start_offset(), end))
    }

    async fn follow(
        &self,
        topic: &str,
        partition: u32,
        from: u64,
        max_bytes: usize,
        shutdown: Shutdown,
    ) -> Result<Follow> {
        let reader = PartitionReader {
            partition: self.partition(topic, partition)?,
            next: from,
            max_bytes,
            shutdown,
            durable_reads: self.durable_reads.then(|| Arc::clone(&self.group_commit)),
        };
        let (sender, receiver) = mpsc::channel(FOLLOW_BUFFER);
        tokio::spawn(reader.run(sender));
        Ok(receiver)
    }

    async fn commit(
        &self,
        group: &str,
        topic: &str,
        offsets: BTreeMap<u32, Committed>,
    ) -> Result<BTreeMap<u32, Committed>> {
        let store = Arc::clone(&self.offsets);
        let (group, topic) = (group.to_owned(), topic.to_owned());
        tokio::task::spawn_blocking(move || store.commit(&group, &topic, &offsets)).await?
    }

    async fn committed(&self, group: &str, topic: &str) -> Result<BTreeMap<u32, Committed>> {
        Ok(self.offsets.committed(group, topic))
    }

    async fn groups_of(&self, topic: &str) -> Result<BTreeMap<String, BTreeMap<u32, u64>>> {
        Ok(self.offsets.groups_of(topic))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use partition::LogSettings;
    use runnel_log::FsyncPolicy;
    use runnel_proto::v1::{Compression, Event};
    use std::time::Duration;

    fn batch(i: u64) -> Incoming {
        let events = [Event {
            id: format!("e-{i}"),
            payload: vec![7; 1000].into(),
            ..Event::default()
        }];
        Incoming {
            compression: Compression::None,
            record_count: 1,
            records: runnel_proto::records::encode(&events),
            producer_id: 0,
            base_sequence: 0,
            identities: None,
        }
    }

    #[tokio::test]
    async fn leader_appends_are_fsynced_in_the_background_every_writeback_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let settings = LogSettings {
            // No interval fsyncs: only writeback can move the durable offset.
            policy: FsyncPolicy::Never,
            segment_bytes: 1 << 30,
            segment_age: Duration::from_secs(3600),
            index_interval: 4096,
            producer_expiry: Duration::from_secs(3600),
            dedup: recent::Window {
                age: Duration::from_secs(900),
                max_events: 1000,
            },
        };
        let topics = Arc::new(Topics::open(dir.path(), settings, Retention::default()).unwrap());
        let offsets = Arc::new(OffsetStore::open(dir.path(), FsyncPolicy::Always).unwrap());
        let group_commit = Arc::new(GroupCommit::default());
        let (stop, stopped) = runnel_server::Shutdown::new();
        let committer = tokio::spawn(Arc::clone(&group_commit).run(stopped));
        let size = batch(0).records.len() as u64;
        let storage = Embedded::new(Arc::clone(&topics), offsets, group_commit, 3 * size, false);
        storage
            .create_topic("t", 1, RetentionOverride::default())
            .await
            .unwrap();
        let partition = storage.partition("t", 0).unwrap();

        for i in 0..2 {
            storage.append("t", 0, batch(i), false).await.unwrap();
        }
        assert_eq!(
            partition.durable_offset(),
            0,
            "two batches are below writeback_bytes: nothing asks for an fsync"
        );
        storage.append("t", 0, batch(2), false).await.unwrap();
        tokio::time::timeout(Duration::from_secs(30), partition.wait_durable(3))
            .await
            .expect("the third batch reaches writeback_bytes and is fsync'd without a DURABLE ack")
            .unwrap();

        stop.trigger();
        committer.await.unwrap();
    }

    #[test]
    fn writeback_is_due_once_per_writeback_bytes_however_appenders_race() {
        let dir = tempfile::tempdir().unwrap();
        let settings = LogSettings {
            policy: FsyncPolicy::Never,
            segment_bytes: 1 << 30,
            segment_age: Duration::from_secs(3600),
            index_interval: 4096,
            producer_expiry: Duration::from_secs(3600),
            dedup: recent::Window {
                age: Duration::from_secs(900),
                max_events: 1000,
            },
        };
        let log = partition::PartitionLog::open(dir.path(), "t", 0, settings).unwrap();
        let partition = Partition::new(log);
        let due = std::sync::atomic::AtomicU64::new(0);
        std::thread::scope(|scope| {
            for _ in 0..4 {
                scope.spawn(|| {
                    for _ in 0..10_000 {
                        if partition.writeback_due(1, 100) {
                            due.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        assert_eq!(due.into_inner(), 40_000 / 100);
    }
}
