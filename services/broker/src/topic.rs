//! A topic: a name, a fixed set of partitions, and the rules for both.

use crate::config::MAX_PARTITIONS;
use crate::error::{BrokerError, Result};
use crate::partition::Partition;
use crate::partitioner::Partitioner;
use runnel_proto::v1::{PartitionInfo, TopicInfo};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// The longest topic name: a directory name, with room to spare under the usual 255-byte
/// file name limit.
pub(crate) const MAX_NAME_LEN: usize = 249;

/// Checks a topic name: 1–249 characters from `[a-zA-Z0-9._-]`, not `.` or `..`. The name
/// is used as a directory name as is, so this is also what keeps paths inside the data dir.
pub(crate) fn validate_name(name: &str) -> Result<()> {
    let allowed = |b: u8| b.is_ascii_alphanumeric() || b"._-".contains(&b);
    if name.is_empty() || name.len() > MAX_NAME_LEN || !name.bytes().all(allowed) {
        return Err(BrokerError::InvalidArgument(format!(
            "topic name {name:?} is invalid: use 1-{MAX_NAME_LEN} characters from [a-zA-Z0-9._-]"
        )));
    }
    if name == "." || name == ".." {
        return Err(BrokerError::InvalidArgument(format!(
            "topic name {name:?} is invalid: \".\" and \"..\" are reserved"
        )));
    }
    Ok(())
}

/// Checks a partition count for a new topic.
pub(crate) fn validate_partitions(partitions: u32) -> Result<()> {
    if !(1..=MAX_PARTITIONS).contains(&partitions) {
        return Err(BrokerError::InvalidArgument(format!(
            "partitions must be between 1 and {MAX_PARTITIONS}, got {partitions}"
        )));
    }
    Ok(())
}

/// What `topic.meta` records about a topic: enough to reopen it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TopicMeta {
    /// The topic's name (also its directory's name).
    pub(crate) name: String,
    /// How many partitions it has; fixed at creation.
    pub(crate) partitions: u32,
}

/// An open topic.
#[derive(Debug)]
pub(crate) struct Topic {
    name: String,
    partitions: Vec<Arc<Partition>>,
    partitioner: Partitioner,
}

impl Topic {
    /// A topic over its opened partitions, in partition order.
    pub(crate) fn new(name: String, partitions: Vec<Partition>) -> Topic {
        Topic {
            name,
            partitions: partitions.into_iter().map(Arc::new).collect(),
            partitioner: Partitioner::default(),
        }
    }

    /// The topic's name.
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// How many partitions the topic has (at most [`MAX_PARTITIONS`]).
    pub(crate) fn partition_count(&self) -> u32 {
        self.partitions.len() as u32
    }

    /// Partition `id`, or `InvalidArgument` if the topic has no such partition.
    pub(crate) fn partition(&self, id: u32) -> Result<&Arc<Partition>> {
        self.partitions.get(id as usize).ok_or_else(|| {
            BrokerError::InvalidArgument(format!(
                "partition {id} does not exist: topic {:?} has partitions 0 to {}",
                self.name,
                self.partitions.len().saturating_sub(1)
            ))
        })
    }

    /// Every partition, in order.
    pub(crate) fn partitions(&self) -> &[Arc<Partition>] {
        &self.partitions
    }

    /// The partition an event with `key` goes to.
    pub(crate) fn choose_partition(&self, key: &str) -> u32 {
        self.partitioner.choose(key, self.partition_count())
    }

    /// The topic as `ListTopics` and `CreateTopic` report it.
    pub(crate) fn info(&self) -> TopicInfo {
        TopicInfo {
            name: self.name.clone(),
            partitions: self
                .partitions
                .iter()
                .map(|p| PartitionInfo {
                    partition: p.id(),
                    // Nothing is deleted yet: every partition still holds offset 0.
                    start_offset: 0,
                    end_offset: p.end_offset(),
                    size_bytes: p.size_bytes(),
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_names() {
        let long = "x".repeat(MAX_NAME_LEN);
        let too_long = "x".repeat(MAX_NAME_LEN + 1);
        let cases: &[(&str, bool)] = &[
            ("events", true),
            ("a", true),
            ("Sensor.Readings_v2-eu", true),
            ("...", true),
            (".hidden", true),
            (&long, true),
            ("", false),
            (".", false),
            ("..", false),
            (&too_long, false),
            ("a b", false),
            ("a/b", false),
            ("../etc", false),
            ("a\\b", false),
            ("tab\t", false),
            ("émoji", false),
            ("a\0b", false),
        ];
        for &(name, ok) in cases {
            let result = validate_name(name);
            assert_eq!(result.is_ok(), ok, "{name:?}: {result:?}");
            if let Err(error) = result {
                assert!(matches!(error, BrokerError::InvalidArgument(_)));
                assert!(error.to_string().starts_with("topic name "), "{error}");
            }
        }
    }

    #[test]
    fn the_name_error_says_what_is_allowed() {
        let error = validate_name("a b").unwrap_err().to_string();
        assert_eq!(
            error,
            "topic name \"a b\" is invalid: use 1-249 characters from [a-zA-Z0-9._-]"
        );
    }

    #[test]
    fn partition_counts() {
        for ok in [1, 4, MAX_PARTITIONS] {
            validate_partitions(ok).unwrap();
        }
        for bad in [0, MAX_PARTITIONS + 1, u32::MAX] {
            let error = validate_partitions(bad).unwrap_err().to_string();
            assert!(error.starts_with("partitions must be"), "{error}");
        }
    }
}
