//! Consumer groups' committed offsets, durable in `<data_dir>/offsets.log`.
//!
//! Every commit appends one frame — `{"group", "topic", "offsets": [[partition, offset]…]}`
//! as JSON — and is fsync'd before it is acknowledged; the map in memory is what replaying
//! the file gives. When the file has grown to several times what it describes, it is
//! compacted: the live map written to a new file, fsync'd and renamed over the old one, so
//! a crash at any point leaves either file whole.

use crate::error::{BrokerError, Result};
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
}

/// Per (group, topic): partition → the next offset the group reads.
type Committed = HashMap<(String, String), BTreeMap<u32, u64>>;

#[derive(Debug)]
struct State {
    file: LogFile,
    committed: Committed,
}

/// The committed offsets of every group.
#[derive(Debug)]
pub(crate) struct OffsetStore {
    path: PathBuf,
    policy: FsyncPolicy,
    state: Mutex<State>,
}

fn encode(group: &str, topic: &str, offsets: &BTreeMap<u32, u64>) -> Vec<u8> {
    let commit = Commit {
        group: group.to_owned(),
        topic: topic.to_owned(),
        offsets: offsets.iter().map(|(p, o)| (*p, *o)).collect(),
    };
    // Plain data: serialising cannot fail.
    serde_json::to_vec(&commit).unwrap_or_default()
}

impl OffsetStore {
    /// Blocking: opens (creating if needed) the offsets of `data_dir` and replays them.
    /// `policy` is [`FsyncPolicy::Always`] outside tests: a commit is acknowledged durable.
    pub(crate) fn open(data_dir: &Path, policy: FsyncPolicy) -> Result<OffsetStore> {
        let path = data_dir.join(FILE);
        let mut committed = Committed::new();
        let mut bad = None;
        let (file, _) =
            LogFile::open(
                &path,
                MAGIC,
                policy,
                |position, payload| match serde_json::from_slice::<Commit>(payload) {
                    Ok(commit) => {
                        committed
                            .entry((commit.group, commit.topic))
                            .or_default()
                            .extend(commit.offsets);
                    }
                    Err(error) => {
                        bad.get_or_insert((position, error.to_string()));
                    }
                },
            )
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
        offsets: &BTreeMap<u32, u64>,
    ) -> Result<BTreeMap<u32, u64>> {
        let mut state = self.state();
        state
            .file
            .append(&[&encode(group, topic, offsets)])
            .map_err(BrokerError::log(&self.path))?;
        let key = (group.to_owned(), topic.to_owned());
        let merged = state.committed.entry(key).or_default();
        merged.extend(offsets);
        let merged = merged.clone();
        self.compact_if_large(&mut state)?;
        Ok(merged)
    }

    /// The offsets `group` has committed on `topic`.
    pub(crate) fn committed(&self, group: &str, topic: &str) -> BTreeMap<u32, u64> {
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
            .map(|((group, _), offsets)| (group.clone(), offsets.clone()))
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

    fn offsets(pairs: &[(u32, u64)]) -> BTreeMap<u32, u64> {
        pairs.iter().copied().collect()
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
