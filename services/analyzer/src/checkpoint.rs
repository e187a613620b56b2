//! Checkpoints: one file per task — a query stage's input partition — holding the task's
//! whole state and the offset it reflects, replaced whole and fsync'd
//! ([`runnel_log::write_atomic_via`]), so that a task resumes from a consistent cut: every
//! record before the offset is in the state, none after.
//!
//! ```text
//! <data_dir>/<query>/source/<partition>.checkpoint    the query's topic
//! <data_dir>/<query>/keyed/<partition>.checkpoint     a re-keyed query's internal topic
//! ```
//!
//! A checkpoint is written only after everything the task produced from the records
//! before its offset — results, re-keyed events, late events — is acknowledged downstream,
//! so a crash at any moment re-reads at most what followed the last checkpoint and
//! produces the same again, which the store (and the keyed stage) takes as a replay.
//!
//! **Where they live, and why.** The directory is shared by every instance of a consumer
//! group: the instance a partition moves to must find its checkpoint. On one machine that
//! is a directory; across machines, a shared volume (NFS, a `ReadWriteMany` volume). We
//! chose this over storing state in the broker (Kafka Streams' changelog topics) because
//! the broker has no compaction — the latest checkpoint of an idle partition would age out
//! with retention, or the topic would grow forever — and over the store, whose API is for
//! results. Two instances that briefly both believe they own a partition (a rebalance
//! they have not both seen yet) write through different temporary files, and whichever
//! rename lands last wins whole; since a task's state is a function of its input offset,
//! either checkpoint is a correct one, the older merely re-reads more.
//!
//! The state is JSON: readable in an incident, and exact for floating-point sums
//! (serde_json's `float_roundtrip`).

use crate::error::AnalyzerError;
use crate::task::TaskState;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The magic of checkpoint files; the trailing digit is the content's version.
const MAGIC: [u8; 8] = *b"RNLCKPT2";

/// Which input a task reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Stage {
    /// The query's topic.
    Source,
    /// A re-keyed query's internal topic.
    Keyed,
}

impl Stage {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Stage::Source => "source",
            Stage::Keyed => "keyed",
        }
    }
}

/// What a checkpoint file holds.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Checkpoint {
    query: String,
    stage: Stage,
    partition: u32,
    /// The query definition the state was built with.
    fingerprint: String,
    state: TaskState,
}

/// Where a task's checkpoints live.
#[derive(Debug, Clone)]
pub(crate) struct Checkpoints {
    dir: PathBuf,
    query: String,
    stage: Stage,
    fingerprint: String,
    /// Distinguishes this process's temporary files from another instance's.
    writer: String,
}

impl Checkpoints {
    pub(crate) fn new(
        data_dir: &Path,
        query: &str,
        stage: Stage,
        fingerprint: &str,
        writer: &str,
    ) -> Checkpoints {
        Checkpoints {
            dir: data_dir.join(query).join(stage.name()),
            query: query.to_owned(),
            stage,
            fingerprint: fingerprint.to_owned(),
            writer: writer
                .bytes()
                .map(|b| {
                    if b.is_ascii_alphanumeric() {
                        b as char
                    } else {
                        '_'
                    }
                })
                .collect(),
        }
    }

    pub(crate) fn path(&self, partition: u32) -> PathBuf {
        self.dir.join(format!("{partition}.checkpoint"))
    }

    fn fail(&self, partition: u32, reason: String) -> AnalyzerError {
        AnalyzerError::Checkpoint {
            path: self.path(partition),
            reason,
        }
    }

    /// Blocking: the partition's last checkpoint, if there is one, checked to belong here.
    pub(crate) fn load(&self, partition: u32) -> Result<Option<TaskState>, AnalyzerError> {
        let path = self.path(partition);
        let Some(bytes) = runnel_log::read_atomic(&path, MAGIC)
            .map_err(|e| self.fail(partition, e.to_string()))?
        else {
            return Ok(None);
        };
        let checkpoint: Checkpoint = serde_json::from_slice(&bytes)
            .map_err(|e| self.fail(partition, format!("it does not parse: {e}")))?;
        if checkpoint.query != self.query
            || checkpoint.stage != self.stage
            || checkpoint.partition != partition
        {
            return Err(self.fail(
                partition,
                format!(
                    "it belongs to query {:?}, stage {}, partition {}",
                    checkpoint.query,
                    checkpoint.stage.name(),
                    checkpoint.partition
                ),
            ));
        }
        if checkpoint.fingerprint != self.fingerprint {
            return Err(self.fail(
                partition,
                "the query's definition (topic, key, time, filter, value, window or aggregates) changed since it was taken".into(),
            ));
        }
        Ok(Some(checkpoint.state))
    }

    /// Blocking: durably replaces the partition's checkpoint; answers its size.
    pub(crate) fn save(&self, partition: u32, state: TaskState) -> Result<usize, AnalyzerError> {
        let io = |source: std::io::Error| AnalyzerError::Io {
            path: self.path(partition),
            source,
        };
        std::fs::create_dir_all(&self.dir).map_err(io)?;
        let checkpoint = Checkpoint {
            query: self.query.clone(),
            stage: self.stage,
            partition,
            fingerprint: self.fingerprint.clone(),
            state,
        };
        let json = serde_json::to_vec(&checkpoint).map_err(|e| io(std::io::Error::other(e)))?;
        let temporary = self
            .dir
            .join(format!("{partition}.checkpoint.{}.tmp", self.writer));
        runnel_log::write_atomic_via(&self.path(partition), &temporary, MAGIC, &json).map_err(
            |e| {
                io(match e {
                    runnel_log::Error::Io(io) => io,
                    other => std::io::Error::other(other),
                })
            },
        )?;
        Ok(json.len())
    }
}
