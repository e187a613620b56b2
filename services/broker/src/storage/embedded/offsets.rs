//! Consumer groups' committed offsets, durable in `<data_dir>/offsets.log`.
//!
//! Every commit appends one frame — `{"group", "topic", "offsets": [[partition, offset]…],
//! "metadata": [[partition, base64]…]}` as JSON (`metadata` only when some partition has
//! any) — and is fsync'd before it is acknowledged; the map in memory is what replaying the
//! file gives. A partition's offset and metadata are one frame's, so they are replaced
//! together or not at all. When the file has grown to several times what it describes, it is
//! compacted: the live map written to a new file, fsync'd and renamed over the old one, so
//! a crash at any point leaves either file whole.

use crate::error::{BrokerError, Result};
use crate::storage::Committed;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use runnel_log::{FsyncPolicy, LogFile};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The magic of offset logs; the trailing digit is the content's version.
const MAGIC: [u8; 8] = *b"RNLOFFS1";
/// The file's name in the data directory.
const FILE: &str = "offsets.log";
/// Compaction happens once the file is this many times the size of a compacted one …
const COMPACT_RATIO: u64 = 4;
/// … and at least this big.
const COMPACT_MIN_BYTES: u64 = 1 << 20;

/// One commit as stored.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Commit {
    group: String,
    topic: String,
    offsets: Vec<(u32, u64)>,
    /// The partitions of `offsets` that carry metadata, base64.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    metadata: Vec<(u32, String)>,
}

impl Commit {
    /// The commit's partitions, each with its offset and metadata.
    fn into_offsets(self) -> std::result::Result<BTreeMap<u32, Committed>, String> {
        let mut offsets: BTreeMap<u32, Committed> = self
            .offsets
            .into_iter()
            .map(|(p, o)| (p, Committed::offset(o)))
            .collect();
        for (partition, encoded) in self.metadata {
            let metadata = BASE64
                .decode(encoded)
                .map_err(|e| format!("metadata of partition {partition}: {e}"))?;
            offsets
                .get_mut(&partition)
                .ok_or_else(|| format!("metadata for partition {partition}, which has no offset"))?
                .metadata = Bytes::from(metadata);
        }
        Ok(offsets)
    }
}

/// Per (group, topic): partition → the next offset the group reads, with its metadata.
type Groups = HashMap<(String, String), BTreeMap<u32, Committed>>;

#[derive(Debug)]
struct State {
    file: LogFile,
    committed: Groups,
}

/// The committed offsets of every group.
#[derive(Debug)]
pub(crate) struct OffsetStore {
    path: PathBuf,
    policy: FsyncPolicy,
    state: Mutex<State>,
}

fn encode(group: &str, topic: &str, offsets: &BTreeMap<u32, Committed>) -> Vec<u8> {
    let commit = Commit {
        group: group.to_owned(),
        topic: topic.to_owned(),
        offsets: offsets.iter().map(|(p, c)| (*p, c.offset)).collect(),
        metadata: offsets
            .iter()
            .filter(|(_, c)| !c.metadata.is_empty())
            .map(|(p, c)| (*p, BASE64.encode(&c.metadata)))
            .collect(),
    };
    // Plain data: serialising cannot fail.
    serde_json::to_vec(&commit).unwrap_or_default()
}

impl OffsetStore {
    /// Blocking: opens (creating if needed) the offsets of `data_dir` and replays them.
    /// `policy` is [`FsyncPolicy::Always`] outside tests: a commit is acknowledged durable.
    pub(crate) fn open(data_dir: &Path, policy: FsyncPolicy) -> Result<OffsetStore> {
        let path = data_dir.join(FILE);
        let mut committed = Groups::new();
        let mut bad = None;
        let (file, _) = LogFile::open(&path, MAGIC, policy, |position, payload| {
            let parsed = serde_json::from_slice::<Commit>(payload)
                .map_err(|e| e.to_string())
                .and_then(|commit| {
                    let key = (commit.group.clone(), commit.topic.clone());
                    Ok((key, commit.into_offsets()?))
                });
            match parsed {
                Ok((key, offsets)) => committed.entry(key).or_default().extend(offsets),
                Err(error) => {
                    bad.get_or_insert((position, error));
                }
            }
        })
        .map_err(BrokerError::log(&path))?;
        if let Some((position, reason)) = bad {
            return Err(BrokerError::Corrupt {
                path,
                position,
                reason: format!("a commit does not parse: {reason}"),
            });
        }
        Ok(OffsetStore {
            path,
            policy,
            state: Mutex::new(State { file, committed }),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // Only whole commits ever change the map: a poisoned lock still holds a valid one.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Blocking: durably records `offsets` for `group` on `topic`, and returns the group's
    /// offsets on the topic after it.
    pub(crate) fn commit(
        &self,
        group: &str,
        topic: &str,
        offsets: &BTreeMap<u32, Committed>,
    ) -> Result<BTreeMap<u32, Committed>> {
        let mut state = self.state();
        state
            .file
            .append(&[&encode(group, topic, offsets)])
            .map_err(BrokerError::log(&self.path))?;
        let key = (group.to_owned(), topic.to_owned());
        let merged = state.committed.entry(key).or_default();
        merged.extend(offsets.iter().map(|(p, c)| (*p, c.clone())));
        let merged = merged.clone();
        self.compact_if_large(&mut state)?;
        Ok(merged)
    }

    /// The offsets `group` has committed on `topic`.
    pub(crate) fn committed(&self, group: &str, topic: &str) -> BTreeMap<u32, Committed> {
        self.state()
            .committed
            .get(&(group.to_owned(), topic.to_owned()))
            .cloned()
            .unwrap_or_default()
    }

    /// Every group with committed offsets on `topic`, by name.
    pub(crate) fn groups_of(&self, topic: &str) -> BTreeMap<String, BTreeMap<u32, u64>> {
        self.state()
            .committed
            .iter()
            .filter(|((_, t), _)| t == topic)
            .map(|((group, _), offsets)| {
                let offsets = offsets.iter().map(|(p, c)| (*p, c.offset)).collect();
                (group.clone(), offsets)
            })
            .collect()
    }

    fn compact_if_large(&self, state: &mut State) -> Result<()> {
        let live: u64 = state
            .committed
            .iter()
            .map(|((g, t), o)| 16 + encode(g, t, o).len() as u64)
            .sum();
        if state.file.len() < COMPACT_MIN_BYTES.max(live * COMPACT_RATIO) {
            return Ok(());
        }
        let temporary = self.path.with_extension("log.compacting");
        if temporary.exists() {
            std::fs::remove_file(&temporary).map_err(BrokerError::io(&temporary))?;
        }
        let (mut fresh, _) = LogFile::open(&temporary, MAGIC, FsyncPolicy::Never, |_, _| {})
            .map_err(BrokerError::log(&temporary))?;
        let frames: Vec<Vec<u8>> = state
            .committed
            .iter()
            .map(|((g, t), o)| encode(g, t, o))
            .collect();
        let slices: Vec<&[u8]> = frames.iter().map(Vec::as_slice).collect();
        if !slices.is_empty() {
            fresh
                .append(&slices)
                .map_err(BrokerError::log(&temporary))?;
        }
        fresh.sync().map_err(BrokerError::log(&temporary))?;
        drop(fresh);
        std::fs::rename(&temporary, &self.path).map_err(BrokerError::io(&self.path))?;
        if let Some(dir) = self.path.parent() {
            super::partition::sync_dir(dir)?;
        }
        let (file, _) = LogFile::open(&self.path, MAGIC, self.policy, |_, _| {})
            .map_err(BrokerError::log(&self.path))?;
        tracing::info!(path = %self.path.display(), bytes = file.len(), "offsets compacted");
        state.file = file;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offsets(pairs: &[(u32, u64)]) -> BTreeMap<u32, Committed> {
        pairs
            .iter()
            .map(|&(p, o)| (p, Committed::offset(o)))
            .collect()
    }

    #[test]
    fn commits_merge_per_partition_and_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let store = OffsetStore::open(dir.path(), FsyncPolicy::Never).unwrap();
        assert!(store.committed("g", "t").is_empty());
        store
            .commit("g", "t", &offsets(&[(0, 10), (1, 5)]))
            .unwrap();
        let after = store.commit("g", "t", &offsets(&[(1, 7)])).unwrap();
        assert_eq!(after, offsets(&[(0, 10), (1, 7)]));
        store.commit("other", "t", &offsets(&[(0, 1)])).unwrap();
        store.commit("g", "u", &offsets(&[(0, 99)])).unwrap();
        drop(store);
        let store = OffsetStore::open(dir.path(), FsyncPolicy::Never).unwrap();
        assert_eq!(store.committed("g", "t"), offsets(&[(0, 10), (1, 7)]));
        assert_eq!(store.committed("g", "u"), offsets(&[(0, 99)]));
        let groups = store.groups_of("t");
        assert_eq!(groups.keys().collect::<Vec<_>>(), ["g", "other"]);
        assert_eq!(groups["g"], BTreeMap::from([(0, 10), (1, 7)]));
    }

    #[test]
    fn metadata_is_replaced_with_its_offset_and_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let store = OffsetStore::open(dir.path(), FsyncPolicy::Never).unwrap();
        let with = |offset: u64, metadata: &'static [u8]| Committed {
            offset,
            metadata: Bytes::from_static(metadata),
        };
        store
            .commit(
                "g",
                "t",
                &BTreeMap::from([(0, with(5, b"state@17")), (1, with(3, b"x"))]),
            )
            .unwrap();
        // A later commit of partition 1 without metadata clears partition 1's, and only it.
        let after = store.commit("g", "t", &offsets(&[(1, 4)])).unwrap();
        assert_eq!(after[&0], with(5, b"state@17"));
        assert_eq!(after[&1], Committed::offset(4));
        drop(store);
        let store = OffsetStore::open(dir.path(), FsyncPolicy::Never).unwrap();
        assert_eq!(store.committed("g", "t"), after);
    }

    #[test]
    fn a_commit_written_before_metadata_existed_still_reads() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut file, _) =
                LogFile::open(&dir.path().join(FILE), MAGIC, FsyncPolicy::Never, |_, _| {})
                    .unwrap();
            file.append(&[br#"{"group":"g","topic":"t","offsets":[[0,9]]}"#])
                .unwrap();
        }
        let store = OffsetStore::open(dir.path(), FsyncPolicy::Never).unwrap();
        assert_eq!(store.committed("g", "t"), offsets(&[(0, 9)]));
    }

    #[test]
    fn a_large_file_is_compacted_without_losing_anything() {
        let dir = tempfile::tempdir().unwrap();
        let store = OffsetStore::open(dir.path(), FsyncPolicy::Never).unwrap();
        for i in 0..30_000u64 {
            store
                .commit("g", "t", &offsets(&[((i % 4) as u32, i)]))
                .unwrap();
        }
        let size = std::fs::metadata(dir.path().join(FILE)).unwrap().len();
        assert!(size < 2 * COMPACT_MIN_BYTES, "compacted: {size} bytes");
        drop(store);
        let store = OffsetStore::open(dir.path(), FsyncPolicy::Never).unwrap();
        assert_eq!(
            store.committed("g", "t"),
            offsets(&[(0, 29_996), (1, 29_997), (2, 29_998), (3, 29_999)])
        );
    }
}
