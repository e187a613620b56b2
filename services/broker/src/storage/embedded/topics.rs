//! Every topic of this broker, and its on-disk layout:
//!
//! ```text
//! <data_dir>/topics/<topic>/topic.meta                name, partition count, retention
//! <data_dir>/topics/<topic>/<partition>/…             the partition's segments (see `partition`)
//! <data_dir>/staging/<topic>/…                               a topic being created
//! ```
//!
//! A topic is built complete in `staging/` — partition files, then `topic.meta`, each
//! fsync'd with its directory — and then renamed into `topics/` in one step, and `topics/`
//! is fsync'd before `CreateTopic` answers. So after a crash a topic either exists whole or
//! not at all; whatever is left in `staging/` was never acknowledged and is removed at
//! start. Inside `topics/`, a directory without a readable `topic.meta` or a missing
//! partition is damage the broker will not guess about: it refuses to start. Damage inside
//! a partition's files stops only that partition.

use super::partition::{LogSettings, Partition, PartitionLog, sync_dir};
use crate::error::{BrokerError, Result};
use crate::storage::Retention;
use crate::topic::{self, RetentionOverride, Topic, TopicMeta};
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

/// The magic of `topic.meta` files; the trailing digit is the format version.
const META_MAGIC: [u8; 8] = *b"RNLTOPC1";
/// A topic's metadata file, inside its directory.
const META_FILE: &str = "topic.meta";

/// The topics of one data directory.
#[derive(Debug)]
pub(crate) struct Topics {
    /// `<data_dir>/topics`.
    root: PathBuf,
    /// `<data_dir>/staging`.
    staging: PathBuf,
    settings: LogSettings,
    /// Retention for topics that do not set their own.
    defaults: Retention,
    /// Sorted by name, so listing needs no sort. Held only briefly and never across an
    /// `.await`.
    topics: RwLock<BTreeMap<String, Arc<Topic>>>,
    /// Serialises topic creation, which is rare: two creators of one name must not both
    /// build it, and the loser must see `AlreadyExists`.
    creating: tokio::sync::Mutex<()>,
    /// The data directory's lock, held while the topics are open (see [`lock_data_dir`]).
    _lock: fs::File,
}

/// Blocking: takes `<data_dir>/lock`, an exclusive advisory lock that two brokers — or a
/// broker and `runnel broker repair` — would otherwise both write the files under. The OS
/// lets go of it when the process ends, however it ends.
pub(crate) fn lock_data_dir(data_dir: &Path) -> Result<fs::File> {
    fs::create_dir_all(data_dir).map_err(BrokerError::io(data_dir))?;
    let path = data_dir.join("lock");
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(BrokerError::io(&path))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(fs::TryLockError::WouldBlock) => Err(BrokerError::DataDirInUse(data_dir.to_owned())),
        Err(fs::TryLockError::Error(error)) => Err(BrokerError::Io {
            path,
            source: error,
        }),
    }
}

impl Topics {
    /// Blocking: opens `data_dir` (creating it if needed), clears unfinished creations and
    /// recovers every topic.
    pub(crate) fn open(
        data_dir: &Path,
        settings: LogSettings,
        defaults: Retention,
    ) -> Result<Topics> {
        let lock = lock_data_dir(data_dir)?;
        let root = data_dir.join("topics");
        let staging = data_dir.join("staging");
        for dir in [&root, &staging] {
            fs::create_dir_all(dir).map_err(BrokerError::io(dir))?;
        }
        sync_dir(data_dir)?;
        if let Some(parent) = data_dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            sync_dir(parent)?;
        }

        for entry in read_dir(&staging)? {
            let path = entry.map_err(BrokerError::io(&staging))?.path();
            tracing::warn!(
                path = %path.display(),
                "removing a topic whose creation did not finish"
            );
            let removed = if path.is_dir() {
                fs::remove_dir_all(&path)
            } else {
                fs::remove_file(&path)
            };
            removed.map_err(BrokerError::io(&path))?;
        }
        sync_dir(&staging)?;

        let mut topics = BTreeMap::new();
        let mut records = 0u64;
        let mut partitions = 0usize;
        for entry in read_dir(&root)? {
            let entry = entry.map_err(BrokerError::io(&root))?;
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if !path.is_dir() || topic::validate_name(&name).is_err() {
                tracing::warn!(path = %path.display(), "ignoring something that is not a topic");
                continue;
            }
            let topic = open_topic(&path, &name, &settings)?;
            records += topic
                .partitions()
                .iter()
                .map(|p| p.end_offset())
                .sum::<u64>();
            partitions += topic.partitions().len();
            topics.insert(name, Arc::new(topic));
        }
        tracing::info!(
            data_dir = %data_dir.display(),
            topics = topics.len(),
            partitions,
            records,
            "topics recovered"
        );
        Ok(Topics {
            root,
            staging,
            settings,
            defaults,
            topics: RwLock::new(topics),
            creating: tokio::sync::Mutex::new(()),
            _lock: lock,
        })
    }

    /// The topic called `name`, if it exists.
    pub(crate) fn get(&self, name: &str) -> Option<Arc<Topic>> {
        self.read().get(name).cloned()
    }

    /// Retention for topics that do not set their own.
    pub(crate) fn default_retention(&self) -> Retention {
        self.defaults
    }

    /// Every topic, sorted by name.
    pub(crate) fn list(&self) -> Vec<Arc<Topic>> {
        self.read().values().cloned().collect()
    }

    /// Creates topic `name` with `partitions` partitions, durably, or fails with
    /// `AlreadyExists`. The name and count must have been validated.
    ///
    /// The creation runs as its own task, so a caller that gives up half-way (a cancelled
    /// call) cannot leave a topic on disk that the registry does not know about.
    pub(crate) async fn create(
        self: &Arc<Self>,
        name: &str,
        partitions: u32,
        retention: RetentionOverride,
    ) -> Result<Arc<Topic>> {
        let this = Arc::clone(self);
        let name = name.to_owned();
        tokio::spawn(async move {
            let _creating = this.creating.lock().await;
            if this.get(&name).is_some() {
                return Err(BrokerError::TopicExists(name));
            }
            let builder = Arc::clone(&this);
            let (topic_name, count) = (name.clone(), partitions);
            let topic = tokio::task::spawn_blocking(move || {
                builder.create_on_disk(&topic_name, count, retention)
            })
            .await??;
            let topic = Arc::new(topic);
            this.write().insert(name.clone(), Arc::clone(&topic));
            tracing::info!(topic = %name, partitions, "topic created");
            Ok(topic)
        })
        .await?
    }

    /// Blocking: syncs every partition whose interval has elapsed. Failures are logged
    /// and the rest still synced; the first is returned.
    pub(crate) fn sync_due(&self) -> Result<()> {
        self.each_partition(|p| p.sync_if_due())
    }

    /// Blocking: applies each topic's retention to its partitions, logging failures and
    /// going on with the rest. Returns how many segments were deleted.
    pub(crate) fn enforce_retention(&self, now: runnel_proto::Millis) -> usize {
        let mut deleted = 0;
        for topic in self.list() {
            let retention = topic.retention(self.defaults);
            for partition in topic.partitions().iter().filter(|p| !p.is_damaged()) {
                match partition.enforce_retention(retention, now) {
                    Ok(n) => deleted += n,
                    Err(error) => tracing::error!(
                        topic = topic.name(),
                        partition = partition.id(),
                        %error,
                        "retention failed"
                    ),
                }
            }
        }
        deleted
    }

    /// Blocking: reads back every sealed segment of every partition and checks every
    /// frame (the broker opens them from their indexes without reading them): a partition
    /// with damage stops. Logs a summary; what start-up runs in the background, until
    /// `stopping` says to stop.
    pub(crate) fn verify_sealed(&self, stopping: &dyn Fn() -> bool) {
        let started = std::time::Instant::now();
        let (mut segments, mut bytes, mut damaged) = (0u64, 0u64, 0usize);
        for topic in self.list() {
            for partition in topic.partitions().iter().filter(|p| !p.is_damaged()) {
                if stopping() {
                    return;
                }
                let (s, b) = partition.verify_sealed();
                segments += s;
                bytes += b;
                damaged += usize::from(partition.is_damaged());
            }
        }
        tracing::info!(
            segments,
            bytes,
            damaged_partitions = damaged,
            seconds = started.elapsed().as_secs_f64(),
            "sealed segments verified"
        );
    }

    /// Blocking: syncs every partition now and saves its recovery point (at shutdown).
    pub(crate) fn sync_all(&self) -> Result<()> {
        self.each_partition(|p| p.sync().and_then(|()| p.save_recovery_point()))
    }

    /// Blocking: saves each partition's recovery point where more is known fsync'd.
    pub(crate) fn save_recovery_points(&self) -> Result<()> {
        self.each_partition(|p| p.save_recovery_point())
    }

    fn each_partition(&self, sync: impl Fn(&Partition) -> Result<()>) -> Result<()> {
        let mut first_error = None;
        for topic in self.list() {
            for partition in topic.partitions().iter().filter(|p| !p.is_damaged()) {
                if let Err(error) = sync(partition) {
                    tracing::error!(
                        topic = topic.name(),
                        partition = partition.id(),
                        %error,
                        "fsync or recovery point failed"
                    );
                    first_error.get_or_insert(error);
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Blocking: builds the topic in `staging/`, then renames it into `topics/`.
    fn create_on_disk(
        &self,
        name: &str,
        partitions: u32,
        retention: RetentionOverride,
    ) -> Result<Topic> {
        let building = self.staging.join(name);
        if building.exists() {
            fs::remove_dir_all(&building).map_err(BrokerError::io(&building))?;
        }
        fs::create_dir(&building).map_err(BrokerError::io(&building))?;
        for partition in 0..partitions {
            let dir = building.join(partition.to_string());
            fs::create_dir(&dir).map_err(BrokerError::io(&dir))?;
            // Opening creates the file with its header; the sync makes that durable.
            // Opening creates the first segment with its header, synced.
            let log = PartitionLog::open(&dir, name, partition, self.settings.clone())?;
            drop(log);
            sync_dir(&dir)?;
        }
        let meta = TopicMeta {
            name: name.to_owned(),
            partitions,
            retention,
        };
        let meta_path = building.join(META_FILE);
        let json = serde_json::to_vec(&meta).map_err(|error| BrokerError::Io {
            path: meta_path.clone(),
            source: std::io::Error::other(error),
        })?;
        runnel_log::write_atomic(&meta_path, META_MAGIC, &json)
            .map_err(BrokerError::log(&meta_path))?;
        sync_dir(&building)?;

        let target = self.root.join(name);
        if target.exists() {
            // Not in the registry but on disk: only possible if someone put it there.
            return Err(BrokerError::TopicExists(name.to_owned()));
        }
        fs::rename(&building, &target).map_err(BrokerError::io(&target))?;
        sync_dir(&self.root)?;
        sync_dir(&self.staging)?;
        open_topic(&target, name, &self.settings)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Arc<Topic>>> {
        // The map is only ever replaced whole-entry, so a panic elsewhere cannot leave it
        // half-updated: a poisoned lock is still safe to use.
        self.topics
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, Arc<Topic>>> {
        self.topics
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Blocking: reads `dir/topic.meta` and recovers every partition.
fn open_topic(dir: &Path, name: &str, settings: &LogSettings) -> Result<Topic> {
    let meta_path = dir.join(META_FILE);
    let corrupt = |reason: String| BrokerError::Corrupt {
        path: meta_path.clone(),
        position: 0,
        reason,
    };
    let payload = runnel_log::read_atomic(&meta_path, META_MAGIC)
        .map_err(BrokerError::log(&meta_path))?
        .ok_or_else(|| corrupt("the topic has no metadata file".into()))?;
    let meta: TopicMeta = serde_json::from_slice(&payload)
        .map_err(|error| corrupt(format!("the metadata does not parse: {error}")))?;
    if meta.name != name {
        return Err(corrupt(format!(
            "the metadata names topic {:?}, but its directory is {name:?}",
            meta.name
        )));
    }
    topic::validate_partitions(meta.partitions).map_err(|error| corrupt(error.to_string()))?;
    let mut partitions = Vec::with_capacity(meta.partitions as usize);
    for partition in 0..meta.partitions {
        let partition_dir = dir.join(partition.to_string());
        if !partition_dir.is_dir() {
            return Err(corrupt(format!("partition {partition} is missing")));
        }
        let opened = match PartitionLog::open(&partition_dir, name, partition, settings.clone()) {
            Ok(log) => Partition::new(log),
            // Damage stops that partition, not the broker: the others serve on.
            Err(error) if error.is_damage() => {
                Partition::damaged(name, partition, &partition_dir, error.to_string())
            }
            Err(error) => return Err(error),
        };
        partitions.push(opened);
    }
    Ok(Topic::new(meta.name, partitions, meta.retention))
}

fn read_dir(dir: &Path) -> Result<fs::ReadDir> {
    fs::read_dir(dir).map_err(BrokerError::io(dir))
}
