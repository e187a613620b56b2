//! The partition count of every topic the collector writes to: it partitions events itself
//! (the log keeps each partition's order, and sequences per partition make replays
//! idempotent), so it must know the count before it takes an event in.
//!
//! Counts are learned from the broker (`DescribeTopic`, creating the topic when allowed)
//! and kept in `<data_dir>/topics` (replaced atomically), so that a collector restarted
//! while the broker is away can still take events for the topics it knew.

use crate::error::CollectorError;
use crate::forward::Broker;
use runnel_proto::v1::{CreateTopicRequest, DescribeTopicRequest};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::RwLock;
use tonic::Code;

const MAGIC: [u8; 8] = *b"RNLCTOP1";

/// Known topics and their partition counts.
#[derive(Debug)]
pub(crate) struct Topics {
    broker: Broker,
    known: RwLock<BTreeMap<String, u32>>,
    path: PathBuf,
    create_partitions: u32,
}

impl Topics {
    /// Loads the table kept in `dir`.
    pub(crate) fn open(
        dir: &Path,
        broker: Broker,
        create_partitions: u32,
    ) -> Result<Topics, CollectorError> {
        std::fs::create_dir_all(dir).map_err(|source| CollectorError::Io {
            what: format!("create {}", dir.display()),
            source,
        })?;
        let path = dir.join("topics");
        let io = |source: runnel_log::Error| CollectorError::Io {
            what: format!("read {}", path.display()),
            source: std::io::Error::other(source),
        };
        let known = match runnel_log::read_atomic(&path, MAGIC).map_err(io)? {
            Some(bytes) => serde_json::from_slice(&bytes).map_err(|e| CollectorError::Io {
                what: format!("parse {}", path.display()),
                source: std::io::Error::other(e),
            })?,
            None => BTreeMap::new(),
        };
        Ok(Topics {
            broker,
            known: RwLock::new(known),
            path,
            create_partitions,
        })
    }

    /// A known topic's partition count, without asking the broker.
    pub(crate) fn known(&self, topic: &str) -> Option<u32> {
        self.known
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(topic)
            .copied()
    }

    /// The partition count of `topic`: known, or asked of the broker — which creates the
    /// topic first if `create` and it does not exist.
    pub(crate) async fn partitions(
        &self,
        topic: &str,
        create: bool,
    ) -> Result<u32, CollectorError> {
        if let Some(count) = self.known(topic) {
            return Ok(count);
        }
        let mut broker = self.broker.clone();
        let describe = DescribeTopicRequest {
            name: topic.to_owned(),
        };
        let described = match broker.describe_topic(describe.clone()).await {
            Err(status) if status.code() == Code::NotFound && create => {
                let request = CreateTopicRequest {
                    name: topic.to_owned(),
                    partitions: self.create_partitions,
                    retention: None,
                };
                match broker.create_topic(request).await {
                    Ok(_) => {}
                    Err(status) if status.code() == Code::AlreadyExists => {}
                    Err(status) => return Err(CollectorError::Broker(status)),
                }
                broker.describe_topic(describe).await
            }
            Err(status) if status.code() == Code::NotFound => {
                return Err(CollectorError::TopicNotFound(format!(
                    "topic {topic:?} does not exist, and this collector does not create topics (collector.auto_create_topics)"
                )));
            }
            other => other,
        };
        let count = described
            .map_err(CollectorError::Broker)?
            .into_inner()
            .topic
            .map(|t| t.partitions.len() as u32)
            .filter(|&n| n > 0)
            .ok_or_else(|| {
                CollectorError::TopicNotFound(format!("topic {topic:?} has no partitions"))
            })?;
        self.remember(topic, count)?;
        Ok(count)
    }

    fn remember(&self, topic: &str, count: u32) -> Result<(), CollectorError> {
        let mut known = self.known.write().unwrap_or_else(|e| e.into_inner());
        if known.insert(topic.to_owned(), count) == Some(count) {
            return Ok(());
        }
        let json = serde_json::to_vec(&*known).map_err(|e| CollectorError::Io {
            what: "encode the topic table".into(),
            source: std::io::Error::other(e),
        })?;
        runnel_log::write_atomic(&self.path, MAGIC, &json).map_err(|e| CollectorError::Io {
            what: format!("write {}", self.path.display()),
            source: std::io::Error::other(e),
        })
    }
}
