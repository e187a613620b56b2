//! A topic: a name, a fixed set of partitions, and the rules for both.

use crate::config::MAX_PARTITIONS;
use crate::error::{BrokerError, Result};
use crate::storage::Retention;
use crate::storage::embedded::partition::Partition;
use runnel_proto::v1::{PartitionInfo, RetentionPolicy, TopicInfo};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;

/// Checks a topic name by the contract's rule ([`runnel_proto::names`]); the name is used
/// as a directory name as is, so the rule is also what keeps paths inside the data dir.
pub(crate) fn validate_name(name: &str) -> Result<()> {
    runnel_proto::names::validate_topic_name(name)
        .map_err(|error| BrokerError::InvalidArgument(error.to_string()))
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
    /// What the topic asked for at creation; unset fields follow the broker's defaults.
    #[serde(default)]
    pub(crate) retention: RetentionOverride,
}

/// A topic's own retention settings; `None` means the broker's default, `Some(0)` no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RetentionOverride {
    pub(crate) max_age_ms: Option<u64>,
    pub(crate) max_bytes: Option<u64>,
}

impl RetentionOverride {
    /// From a `CreateTopic` request.
    pub(crate) fn from_proto(policy: Option<&RetentionPolicy>) -> Result<RetentionOverride> {
        let Some(policy) = policy else {
            return Ok(RetentionOverride::default());
        };
        let max_age_ms = match policy.max_age {
            None => None,
            Some(age) if age.seconds < 0 || age.nanos < 0 => {
                return Err(BrokerError::InvalidArgument(
                    "retention.max_age must not be negative".into(),
                ));
            }
            Some(age) => Some(
                (age.seconds as u64)
                    .saturating_mul(1000)
                    .saturating_add(age.nanos as u64 / 1_000_000),
            ),
        };
        Ok(RetentionOverride {
            max_age_ms,
            max_bytes: policy.max_bytes,
        })
    }

    /// The retention in force: the topic's own settings over the broker's defaults.
    pub(crate) fn resolve(&self, defaults: Retention) -> Retention {
        let limit = |value: u64| (value > 0).then_some(value);
        Retention {
            max_age: match self.max_age_ms {
                None => defaults.max_age,
                Some(ms) => limit(ms).map(Duration::from_millis),
            },
            max_bytes: match self.max_bytes {
                None => defaults.max_bytes,
                Some(bytes) => limit(bytes),
            },
        }
    }
}

/// Retention as the API reports it: zero for no limit.
pub(crate) fn retention_proto(retention: Retention) -> RetentionPolicy {
    RetentionPolicy {
        max_age: Some(prost_types::Duration {
            seconds: retention.max_age.map_or(0, |a| a.as_secs() as i64),
            nanos: retention.max_age.map_or(0, |a| a.subsec_nanos() as i32),
        }),
        max_bytes: Some(retention.max_bytes.unwrap_or(0)),
    }
}

/// An open topic.
#[derive(Debug)]
pub(crate) struct Topic {
    name: String,
    partitions: Vec<Arc<Partition>>,
    retention: RetentionOverride,
}

impl Topic {
    /// A topic over its opened partitions, in partition order.
    pub(crate) fn new(
        name: String,
        partitions: Vec<Partition>,
        retention: RetentionOverride,
    ) -> Topic {
        Topic {
            name,
            partitions: partitions.into_iter().map(Arc::new).collect(),
            retention,
        }
    }

    /// The retention in force, with the broker's `defaults` filled in.
    pub(crate) fn retention(&self, defaults: Retention) -> Retention {
        self.retention.resolve(defaults)
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

    /// The topic as `ListTopics` and `CreateTopic` report it.
    pub(crate) fn info(&self, defaults: Retention) -> TopicInfo {
        TopicInfo {
            name: self.name.clone(),
            partitions: self
                .partitions
                .iter()
                .map(|p| PartitionInfo {
                    partition: p.id(),
                    start_offset: p.start_offset(),
                    end_offset: p.end_offset(),
                    size_bytes: p.size_bytes(),
                    segments: p.segment_count() as u32,
                    durable_offset: p.durable_offset(),
                })
                .collect(),
            retention: Some(retention_proto(self.retention(defaults))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_topic_name_is_an_invalid_argument_that_says_what_is_allowed() {
        let error = validate_name("a b").unwrap_err();
        assert!(matches!(error, BrokerError::InvalidArgument(_)));
        assert_eq!(
            error.to_string(),
            "topic name \"a b\" is invalid: use 1-249 characters from [a-zA-Z0-9._-]"
        );
        validate_name("Sensor.Readings_v2-eu").unwrap();
    }

    #[test]
    fn topic_retention_overrides_the_defaults_and_zero_means_no_limit() {
        let defaults = Retention {
            max_age: Some(Duration::from_secs(3600)),
            max_bytes: Some(1 << 30),
        };
        assert_eq!(RetentionOverride::default().resolve(defaults), defaults);
        let own = RetentionOverride::from_proto(Some(&RetentionPolicy {
            max_age: Some(prost_types::Duration {
                seconds: 60,
                nanos: 500_000_000,
            }),
            max_bytes: Some(0),
        }))
        .unwrap();
        assert_eq!(
            own.resolve(defaults),
            Retention {
                max_age: Some(Duration::from_millis(60_500)),
                max_bytes: None,
            }
        );
        let negative = RetentionOverride::from_proto(Some(&RetentionPolicy {
            max_age: Some(prost_types::Duration {
                seconds: -1,
                nanos: 0,
            }),
            max_bytes: None,
        }));
        assert!(matches!(negative, Err(BrokerError::InvalidArgument(_))));
        let reported = retention_proto(own.resolve(defaults));
        assert_eq!(reported.max_bytes, Some(0));
        assert_eq!(reported.max_age.unwrap().seconds, 60);
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
