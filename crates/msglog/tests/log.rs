//! The message log against an in-memory downstream that behaves like the broker's
//! idempotent producer table: every mode delivers everything once and in order; a log
//! reopened after a stop replays what was not acknowledged without storing anything twice;
//! a full log refuses instead of dropping; a crash at any point recovers a prefix that holds
//! every acknowledged message.

use bytes::{BufMut, Bytes, BytesMut};
use proptest::prelude::*;
use runnel_log::FsyncPolicy;
use runnel_log::faults::{self, Fault, Op};
use runnel_msglog::{
    AckLevel, Batch, DeliveryError, Destination, Downstream, Error, LogConfig, MessageLog, Mode,
    Part, Placement, Submission,
};
use runnel_testkit::eventually;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const MODES: [Mode; 4] = [Mode::None, Mode::Rbml, Mode::Sbml, Mode::Hml];
const WAIT: Duration = Duration::from_secs(30);

/// What the fake broker remembers per producer and destination: its last sequence and
/// its last five batches (base sequence, count, base offset).
#[derive(Default)]
struct ProducerRuns {
    last: Option<u64>,
    recent: VecDeque<(u64, u32, u64)>,
}

#[derive(Default)]
struct Store {
    /// Per destination, every message stored, in offset order.
    messages: HashMap<Destination, Vec<Bytes>>,
    producers: HashMap<(u64, Destination), ProducerRuns>,
    calls: usize,
}

/// An in-memory broker: idempotent like the real one (a retry of one of the last five
/// batches is answered with its offset, an older one as `AlreadyStored`), and switchable
/// between up and down.
#[derive(Clone, Default)]
struct FakeBroker {
    store: Arc<Mutex<Store>>,
    down: Arc<AtomicBool>,
    delay_ms: Arc<AtomicUsize>,
}

impl FakeBroker {
    fn messages(&self, destination: &Destination) -> Vec<String> {
        let store = self.store.lock().unwrap();
        store
            .messages
            .get(destination)
            .map(|m| {
                m.iter()
                    .map(|b| String::from_utf8_lossy(b).into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    fn all(&self) -> BTreeMap<String, Vec<String>> {
        let store = self.store.lock().unwrap();
        store
            .messages
            .iter()
            .map(|(d, m)| {
                (
                    format!("{}/{}", d.topic, d.partition),
                    m.iter()
                        .map(|b| String::from_utf8_lossy(b).into_owned())
                        .collect(),
                )
            })
            .collect()
    }

    fn total(&self) -> usize {
        self.store
            .lock()
            .unwrap()
            .messages
            .values()
            .map(Vec::len)
            .sum()
    }
}

/// Messages are one length byte and that many bytes.
fn encode(messages: &[String]) -> Bytes {
    let mut body = BytesMut::new();
    for message in messages {
        body.put_u8(message.len() as u8);
        body.put_slice(message.as_bytes());
    }
    body.freeze()
}

fn split(body: &Bytes) -> Vec<Bytes> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < body.len() {
        let len = body[at] as usize;
        out.push(body.slice(at + 1..at + 1 + len));
        at += 1 + len;
    }
    out
}

impl Downstream for FakeBroker {
    async fn deliver(&self, batches: Vec<Batch>) -> Result<Vec<Placement>, DeliveryError> {
        let delay = self.delay_ms.load(Ordering::Relaxed);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay as u64)).await;
        }
        if self.down.load(Ordering::Relaxed) {
            return Err(DeliveryError::Failed {
                reason: "down".into(),
                transient: true,
            });
        }
        let mut store = self.store.lock().unwrap();
        store.calls += 1;
        let mut offsets = Vec::new();
        let mut too_old = false;
        let mut stopped: Vec<Destination> = Vec::new();
        for batch in &batches {
            if stopped.contains(&batch.destination) {
                offsets.push(0);
                continue;
            }
            let messages = split(&batch.body);
            assert_eq!(
                messages.len(),
                batch.count as usize,
                "count matches the body"
            );
            let key = (batch.producer_id, batch.destination.clone());
            let runs = store.producers.entry(key.clone()).or_default();
            if let Some(&(_, _, offset)) = runs
                .recent
                .iter()
                .find(|(s, c, _)| *s == batch.base_sequence && *c == batch.count)
            {
                offsets.push(offset);
                continue;
            }
            match runs.last {
                Some(last) if batch.base_sequence <= last => {
                    too_old = true;
                    stopped.push(batch.destination.clone());
                    offsets.push(0);
                    continue;
                }
                Some(last) if batch.base_sequence != last + 1 => {
                    panic!("a gap: {} after {last}", batch.base_sequence);
                }
                _ => {}
            }
            let stored = store.messages.entry(batch.destination.clone()).or_default();
            let offset = stored.len() as u64;
            stored.extend(messages);
            let runs = store.producers.get_mut(&key).unwrap();
            runs.last = Some(batch.base_sequence + u64::from(batch.count) - 1);
            if runs.recent.len() == 5 {
                runs.recent.pop_front();
            }
            runs.recent
                .push_back((batch.base_sequence, batch.count, offset));
            offsets.push(offset);
        }
        if too_old {
            return Err(DeliveryError::AlreadyStored);
        }
        Ok(offsets.into_iter().map(Placement::From).collect())
    }
}

fn config(mode: Mode) -> LogConfig {
    LogConfig {
        mode,
        fsync: FsyncPolicy::Always,
        shards: 2,
        max_bytes: 1 << 24,
        segment_bytes: 4096,
        max_batch_bytes: 64 * 1024,
        max_batch_messages: 1000,
        max_call_bytes: 256 * 1024,
        call_timeout: Duration::from_secs(5),
    }
}

fn destination(partition: u32) -> Destination {
    Destination {
        topic: Arc::from("events"),
        partition,
    }
}

fn submission(tag: &str, partitions: u32, per_part: usize, level: AckLevel) -> Submission {
    Submission {
        parts: (0..partitions)
            .map(|p| {
                let messages: Vec<String> =
                    (0..per_part).map(|i| format!("{tag}-p{p}-{i}")).collect();
                Part {
                    destination: destination(p),
                    body: encode(&messages),
                    count: per_part as u32,
                }
            })
            .collect(),
        level,
        trace: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_mode_delivers_everything_once_in_order_with_offsets() {
    for mode in MODES {
        let dir = tempfile::tempdir().unwrap();
        let broker = FakeBroker::default();
        let (log, _) = MessageLog::open(config(mode), dir.path(), broker.clone()).unwrap();
        let mut tickets = Vec::new();
        for i in 0..40 {
            let level = match (i % 3, mode) {
                (0, _) => AckLevel::Stored,
                (1, Mode::None) | (2, _) => AckLevel::Accepted,
                (1, _) => AckLevel::Logged,
                _ => unreachable!(),
            };
            tickets.push(
                log.submit(submission(&format!("s{i}"), 4, 3, level))
                    .unwrap(),
            );
        }
        let mut stored_offsets = Vec::new();
        for (i, ticket) in tickets.into_iter().enumerate() {
            let answer = tokio::time::timeout(WAIT, ticket.wait())
                .await
                .unwrap()
                .unwrap();
            if i % 3 == 0 {
                stored_offsets.push((i, answer.expect("offsets at Stored")));
            }
        }
        eventually(WAIT, "delivery", || async { broker.total() == 40 * 4 * 3 }).await;
        for p in 0..4 {
            let expected: Vec<String> = (0..40)
                .flat_map(|i| (0..3).map(move |j| format!("s{i}-p{p}-{j}")))
                .collect();
            assert_eq!(broker.messages(&destination(p)), expected, "{mode}");
        }
        for (i, offsets) in stored_offsets {
            for (p, offset) in offsets.iter().enumerate() {
                let offset = offset.expect("a fresh batch has an offset") as usize;
                assert_eq!(
                    broker.messages(&destination(p as u32))[offset],
                    format!("s{i}-p{p}-0"),
                    "{mode}"
                );
            }
        }
        log.close(Duration::from_secs(5)).await;
        assert_eq!(log.stats().pending_bytes, 0, "{mode}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logged_is_refused_without_a_log() {
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = MessageLog::open(config(Mode::None), dir.path(), FakeBroker::default()).unwrap();
    let error = log
        .submit(submission("x", 1, 1, AckLevel::Logged))
        .unwrap_err();
    assert!(matches!(error, Error::NotLogging), "{error}");
    log.close(Duration::from_secs(1)).await;
}

/// Everything was delivered, but the log "crashed" before recording any release (every
/// `Released` record is cut out of the segments): reopened, it replays every entry, and
/// the broker recognises all of them — also entries that were merged into one batch the
/// first time — so nothing is stored twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_of_delivered_entries_stores_nothing_twice() {
    for mode in [Mode::Rbml, Mode::Sbml, Mode::Hml] {
        let dir = tempfile::tempdir().unwrap();
        let broker = FakeBroker::default();
        // A slow broker: entries pile up behind each call and are merged into the next.
        broker.delay_ms.store(20, Ordering::Relaxed);
        // One segment per shard, never rolled, so that no released segment is deleted.
        let mut config = config(mode);
        config.segment_bytes = 1 << 20;
        let (log, _) = MessageLog::open(config.clone(), dir.path(), broker.clone()).unwrap();
        let mut tickets = Vec::new();
        for i in 0..30 {
            tickets.push(
                log.submit(submission(&format!("r{i}"), 3, 2, AckLevel::Stored))
                    .unwrap(),
            );
        }
        for ticket in tickets {
            tokio::time::timeout(WAIT, ticket.wait())
                .await
                .unwrap()
                .unwrap();
        }
        let calls = broker.store.lock().unwrap().calls;
        assert!(
            calls < 30,
            "{mode}: entries were merged into fewer calls ({calls})"
        );
        log.close(Duration::from_secs(5)).await;
        drop(log);
        forget_releases(dir.path());

        broker.delay_ms.store(0, Ordering::Relaxed);
        let (log, recovery) = MessageLog::open(config.clone(), dir.path(), broker.clone()).unwrap();
        assert_eq!(
            recovery.messages,
            30 * 3 * 2,
            "{mode}: everything is replayed"
        );
        eventually(WAIT, "the replay to finish", || async {
            log.stats().pending_bytes == 0
        })
        .await;
        for p in 0..3 {
            let expected: Vec<String> = (0..30)
                .flat_map(|i| (0..2).map(move |j| format!("r{i}-p{p}-{j}")))
                .collect();
            assert_eq!(
                broker.messages(&destination(p)),
                expected,
                "{mode}: once, in order"
            );
        }
        log.close(Duration::from_secs(5)).await;
        drop(log);
        // Released for good now: a third open has nothing left to replay.
        let (log, recovery) = MessageLog::open(config, dir.path(), broker.clone()).unwrap();
        assert_eq!(recovery.entries, 0, "{mode}");
        log.close(Duration::from_secs(1)).await;
    }
}

/// Rewrites every segment without its `Released` records (kind 3).
fn forget_releases(dir: &Path) {
    const MAGIC: [u8; 8] = *b"RNLMSGL1";
    // The segments are written anew: what a recovery point said of the old ones is void.
    forget_recovery_points(dir);
    for path in segment_files(dir) {
        if path.extension().is_none_or(|e| e != "log") {
            continue;
        }
        let mut kept = Vec::new();
        runnel_log::LogFile::open(&path, MAGIC, FsyncPolicy::Never, |_, payload| {
            if payload[0] != 3 {
                kept.push(payload.to_vec());
            }
        })
        .unwrap();
        std::fs::remove_file(&path).unwrap();
        let (mut file, _) =
            runnel_log::LogFile::open(&path, MAGIC, FsyncPolicy::Never, |_, _| {}).unwrap();
        let slices: Vec<&[u8]> = kept.iter().map(Vec::as_slice).collect();
        if !slices.is_empty() {
            file.append(&slices).unwrap();
        }
    }
}

/// With the downstream away the log fills to its bound and then refuses, whole; once the
/// downstream is back, everything accepted is delivered and submissions fit again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_log_refuses_and_loses_nothing() {
    for mode in MODES {
        let dir = tempfile::tempdir().unwrap();
        let broker = FakeBroker::default();
        broker.down.store(true, Ordering::Relaxed);
        let mut config = config(mode);
        config.max_bytes = 20_000;
        let (log, _) = MessageLog::open(config, dir.path(), broker.clone()).unwrap();
        let mut accepted = 0;
        let mut refused = false;
        for i in 0..1000 {
            match log.submit(submission(&format!("f{i}"), 2, 5, AckLevel::Accepted)) {
                Ok(_) => accepted += 1,
                Err(Error::Full { max_bytes }) => {
                    assert_eq!(max_bytes, 20_000);
                    refused = true;
                    break;
                }
                Err(other) => panic!("{other}"),
            }
        }
        assert!(refused && accepted > 10, "{mode}: filled after {accepted}");
        assert!(log.stats().pending_bytes <= 20_000);
        broker.down.store(false, Ordering::Relaxed);
        eventually(WAIT, "the backlog to drain", || async {
            broker.total() == accepted * 10
        })
        .await;
        eventually(WAIT, "the budget to free", || async {
            log.stats().pending_bytes == 0
        })
        .await;
        log.submit(submission("after", 2, 5, AckLevel::Accepted))
            .unwrap();
        eventually(WAIT, "a new submission", || async {
            broker.total() == accepted * 10 + 10
        })
        .await;
        log.close(Duration::from_secs(5)).await;
    }
}

/// Released segments are deleted; a log whose downstream keeps up stays small.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn released_segments_are_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let broker = FakeBroker::default();
    let (log, _) = MessageLog::open(config(Mode::Hml), dir.path(), broker.clone()).unwrap();
    for i in 0..200 {
        log.submit(submission(&format!("d{i}"), 2, 10, AckLevel::Stored))
            .unwrap()
            .wait()
            .await
            .unwrap();
    }
    let stats = log.stats();
    assert!(stats.segments <= 2 * 2, "{stats:?}");
    assert!(stats.disk_bytes <= 2 * 2 * 4096 + 4096, "{stats:?}");
    log.close(Duration::from_secs(1)).await;
}

/// Deletes every shard's recovery point: a crash before the first was saved (they are
/// saved about once a second, and at a clean close).
fn forget_recovery_points(dir: &Path) {
    for path in segment_files(dir) {
        if path.file_name().is_some_and(|n| n == "recovery-point") {
            std::fs::remove_file(&path).unwrap();
        }
    }
}

fn segment_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for shard in std::fs::read_dir(dir).unwrap() {
        let shard = shard.unwrap().path();
        if shard.is_dir() {
            for file in std::fs::read_dir(&shard).unwrap() {
                files.push(file.unwrap().path());
            }
        }
    }
    files.sort();
    files
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]

    /// Submissions acknowledged at `Logged`, then more that were not, then a crash that
    /// tears the active segment anywhere after the acknowledged ones (and maybe leaves
    /// garbage): the log recovers, and what it delivers is a prefix of what was submitted,
    /// in order, holding every acknowledged message exactly once.
    #[test]
    fn a_crash_at_any_point_recovers_a_prefix_with_every_acknowledged_message(
        acked in 1usize..12,
        unacked in 0usize..12,
        cut in any::<proptest::sample::Index>(),
        garbage in proptest::collection::vec(any::<u8>(), 0..40),
        mode in prop_oneof![Just(Mode::Rbml), Just(Mode::Hml)],
    ) {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        runtime.block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let mut one_shard = config(mode);
            one_shard.shards = 1;
            one_shard.segment_bytes = 1 << 20;
            let broker = FakeBroker::default();
            broker.down.store(true, Ordering::Relaxed);
            let (log, _) = MessageLog::open(one_shard.clone(), dir.path(), broker.clone()).unwrap();
            for i in 0..acked {
                log.submit(submission(&format!("a{i}"), 1, 2, AckLevel::Logged)).unwrap().wait().await.unwrap();
            }
            let files = segment_files(dir.path());
            let segment = files.iter().find(|f| f.extension().is_some_and(|e| e == "log")).unwrap().clone();
            let acked_len = std::fs::metadata(&segment).unwrap().len();
            for i in 0..unacked {
                log.submit(submission(&format!("u{i}"), 1, 2, AckLevel::Accepted)).unwrap();
            }
            log.close(Duration::ZERO).await;
            drop(log);
            let written = std::fs::read(&segment).unwrap();
            let keep = acked_len as usize + cut.index(written.len() - acked_len as usize + 1);
            let mut torn = written[..keep].to_vec();
            torn.extend_from_slice(&garbage);
            std::fs::write(&segment, &torn).unwrap();
            // The close saved a recovery point over everything; the crash came before one.
            forget_recovery_points(dir.path());

            broker.down.store(false, Ordering::Relaxed);
            let (log, _) = MessageLog::open(one_shard, dir.path(), broker.clone()).unwrap();
            eventually(WAIT, "the replay", || async { log.stats().pending_bytes == 0 }).await;
            let delivered = broker.messages(&destination(0));
            let submitted: Vec<String> = (0..acked).map(|i| format!("a{i}")).chain((0..unacked).map(|i| format!("u{i}")))
                .flat_map(|tag| (0..2).map(move |j| format!("{tag}-p0-{j}"))).collect();
            assert!(delivered.len() >= acked * 2, "every acknowledged message: {delivered:?}");
            assert_eq!(&submitted[..delivered.len()], &delivered[..], "a prefix, in order, once");
            log.close(Duration::from_secs(1)).await;
        });
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(100))]

    /// Simulated power cuts (runnel-log's fault layer: every file back to its last fsync,
    /// every later write and fsync failing) at a random moment among `Logged` submissions,
    /// with the broker up or down, group commits on every write or on an interval: once the
    /// power is back and the log reopened, every message whose submission was answered
    /// `Logged` (or stored) is delivered, and none twice.
    #[test]
    fn a_power_cut_loses_nothing_acknowledged_logged(
        submissions in 1usize..24,
        cut_after in any::<proptest::sample::Index>(),
        broker_up in any::<bool>(),
        interval in any::<bool>(),
        mode in prop_oneof![Just(Mode::Rbml), Just(Mode::Hml)],
    ) {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        runtime.block_on(async {
            let dir = tempfile::tempdir().unwrap();
            faults::watch(dir.path());
            let mut config = config(mode);
            config.segment_bytes = 2048;
            if interval {
                config.fsync = FsyncPolicy::Interval(Duration::from_millis(2));
            }
            let broker = FakeBroker::default();
            broker.down.store(!broker_up, Ordering::Relaxed);
            let (log, _) = MessageLog::open(config.clone(), dir.path(), broker.clone()).unwrap();
            let cut_at = cut_after.index(submissions + 1);
            let mut tickets = Vec::new();
            for i in 0..submissions {
                if i == cut_at {
                    faults::power_cut(dir.path()).unwrap();
                }
                match log.submit(submission(&format!("s{i}"), 2, 2, AckLevel::Logged)) {
                    Ok(ticket) => tickets.push((i, tokio::spawn(ticket.wait()))),
                    Err(_) => break,
                }
                tokio::task::yield_now().await;
            }
            if cut_at == submissions {
                faults::power_cut(dir.path()).unwrap();
            }
            // What is answered from now on had its fsync (or delivery) before the cut:
            // nothing written after it reaches the disk.
            log.close(Duration::from_millis(200)).await;
            drop(log);
            let mut acknowledged = Vec::new();
            for (i, ticket) in tickets {
                let answer = tokio::time::timeout(Duration::from_secs(5), ticket).await;
                if let Ok(Ok(Ok(_))) = answer {
                    acknowledged.push(i);
                }
            }
            faults::heal(dir.path());
            broker.down.store(false, Ordering::Relaxed);
            let (log, _) = MessageLog::open(config, dir.path(), broker.clone()).unwrap();
            eventually(WAIT, "the replay", || async { log.stats().pending_bytes == 0 }).await;
            log.close(Duration::from_secs(1)).await;
            let all = broker.all();
            for messages in all.values() {
                let mut seen = std::collections::HashSet::new();
                assert!(messages.iter().all(|m| seen.insert(m)), "a message twice: {messages:?}");
            }
            for i in acknowledged {
                for p in 0..2u32 {
                    let delivered = broker.messages(&destination(p));
                    for j in 0..2 {
                        let message = format!("s{i}-p{p}-{j}");
                        assert!(delivered.contains(&message), "{message} was logged and is lost: {delivered:?}");
                    }
                }
            }
        });
    }
}

/// A real full disk: a 256 KiB tmpfs. Writes fail, the log refuses submissions with
/// `DiskFull` instead of losing them, what it had accepted is still delivered, and once
/// the disk has room again (segments deleted as the backlog drains) it accepts again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_and_recovers() {
    let Some(mount) = Tmpfs::mount("256k") else {
        eprintln!("skipping: cannot mount a tmpfs here (needs root)");
        return;
    };
    let broker = FakeBroker::default();
    broker.down.store(true, Ordering::Relaxed);
    let mut config = config(Mode::Hml);
    config.segment_bytes = 32 * 1024;
    let (log, _) = MessageLog::open(config, &mount.path, broker.clone()).unwrap();
    let mut accepted = 0usize;
    let mut refusal = None;
    for i in 0..10_000 {
        match log.submit(submission(
            &format!("{i:05}-{}", "x".repeat(100)),
            2,
            4,
            AckLevel::Logged,
        )) {
            Ok(ticket) => {
                // Logged, or (the write having failed) answered once delivered: either way
                // never an error, and never lost.
                let answered =
                    tokio::time::timeout(Duration::from_millis(500), ticket.wait()).await;
                if let Ok(result) = answered {
                    result.unwrap();
                }
                accepted += 1;
            }
            Err(error) => {
                refusal = Some(error);
                break;
            }
        }
    }
    let refusal = refusal.expect("the disk fills up");
    assert!(matches!(refusal, Error::DiskFull(_)), "{refusal}");
    broker.down.store(false, Ordering::Relaxed);
    eventually(WAIT, "the backlog to drain", || async {
        broker.total() == accepted * 8
    })
    .await;
    eventually(WAIT, "submissions to be taken again", || async {
        log.submit(submission("again", 2, 1, AckLevel::Accepted))
            .is_ok()
    })
    .await;
    log.close(Duration::from_secs(5)).await;
    let all = broker.all();
    for messages in all.values() {
        let mut seen = std::collections::HashSet::new();
        assert!(messages.iter().all(|m| seen.insert(m)), "no duplicates");
    }
}

/// An fsync that failed may have left what it covered off the disk — the kernel can drop
/// the dirty pages and report success on the next fsync — so the log never says `Logged`
/// again until it is reopened: the submission whose fsync failed is answered only once
/// delivered, later ones are refused with `SyncFailed` even when writes and fsyncs work
/// again, and the reopened log accepts and logs again. Nothing accepted is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_failed_fsync_the_log_says_logged_no_more_until_reopened() {
    let dir = tempfile::tempdir().unwrap();
    let broker = FakeBroker::default();
    broker.down.store(true, Ordering::Relaxed);
    let config = || LogConfig {
        shards: 1,
        ..config(Mode::Rbml)
    };
    let (log, _) = MessageLog::open(config(), dir.path(), broker.clone()).unwrap();
    let logged = |tag: &str| submission(tag, 1, 1, AckLevel::Logged);
    log.submit(logged("before")).unwrap().wait().await.unwrap();

    faults::fail_next(dir.path(), Op::Sync, Fault::Eio);
    // What is accepted until the syncer has seen its fsync fail (at least the first).
    let mut accepted = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    let refusal = tokio::time::timeout(WAIT, async {
        loop {
            match log.submit(logged(&format!("during{}", accepted.len()))) {
                Ok(ticket) => accepted.push(tokio::spawn(ticket.wait())),
                Err(refusal) => break refusal,
            }
            tick.tick().await;
        }
    })
    .await
    .expect("the failed fsync refuses submissions");
    assert!(matches!(refusal, Error::SyncFailed(_)), "{refusal}");
    // The broker is down, so any answer now could only be a false LOGGED.
    assert!(
        accepted.iter().all(|ticket| !ticket.is_finished()),
        "LOGGED after a failed fsync"
    );

    // Delivery frees and releases what was accepted: the log writes (and fsyncs) again,
    // which before cleared the failure. It still refuses, through several of the writer's
    // one-second retry rounds.
    broker.down.store(false, Ordering::Relaxed);
    let during = accepted.len();
    for ticket in accepted {
        ticket.await.unwrap().expect("answered once delivered");
    }
    eventually(WAIT, "the backlog to drain", || async {
        log.stats().pending_bytes == 0
    })
    .await;
    let mut rounds = tokio::time::interval(Duration::from_millis(100));
    for _ in 0..25 {
        rounds.tick().await;
        let refusal = log.submit(logged("still refused")).unwrap_err();
        assert!(matches!(refusal, Error::SyncFailed(_)), "{refusal}");
    }
    log.close(Duration::from_secs(5)).await;
    drop(log);

    let (log, _) = MessageLog::open(config(), dir.path(), broker.clone()).unwrap();
    log.submit(logged("after"))
        .expect("a reopened log accepts")
        .wait()
        .await
        .expect("and logs");
    log.close(Duration::from_secs(5)).await;
    let expected: Vec<String> = std::iter::once("before".to_owned())
        .chain((0..during).map(|i| format!("during{i}")))
        .chain(std::iter::once("after".to_owned()))
        .map(|tag| format!("{tag}-p0-0"))
        .collect();
    assert_eq!(
        broker.messages(&destination(0)),
        expected,
        "everything accepted, once, in order"
    );
}

struct Tmpfs {
    path: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().ok()?;
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .stderr(std::process::Stdio::null())
            .status()
            .ok()?;
        status.success().then(|| Tmpfs {
            path: dir.path().join("log"),
            _dir: dir,
        })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        if let Some(mount) = self.path.parent() {
            let _ = std::process::Command::new("umount").arg(mount).status();
        }
    }
}

/// The syncer saves a recovery point once something is fsync'd, and the close saves the
/// last one: a flipped bit inside what it covers is refused as damage when the log is
/// reopened — nothing is cut off, so no LOGGED message after it silently goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_bit_in_what_was_fsynced_stops_the_log_from_opening_and_cuts_nothing() {
    let (dir, one_shard, broker, log) = ten_logged_messages().await;
    let saved = |dir: &Path| {
        segment_files(dir)
            .iter()
            .any(|f| f.file_name().is_some_and(|n| n == "recovery-point"))
    };
    eventually(WAIT, "a recovery point after the first fsync", || async {
        saved(dir.path())
    })
    .await;
    log.close(Duration::ZERO).await;
    drop(log);
    let segment = segment_files(dir.path())
        .into_iter()
        .find(|f| f.extension().is_some_and(|e| e == "log"))
        .unwrap();
    let mut bytes = std::fs::read(&segment).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x02;
    std::fs::write(&segment, &bytes).unwrap();
    let error = MessageLog::open(one_shard, dir.path(), broker).unwrap_err();
    assert!(matches!(error, Error::Damaged { .. }), "{error}");
    assert_eq!(
        std::fs::read(&segment).unwrap(),
        bytes,
        "nothing was cut off"
    );
}

/// Within the second after a durable save of the recovery point, every fsync rewrites it
/// in place: a copy of the shard as a crash would leave it (page cache and all) refuses a
/// flipped bit in what the last fsync covered, instead of taking it for a torn tail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damage_to_what_the_last_fsync_covered_is_refused_after_a_crash() {
    let (dir, one_shard, broker, log) = ten_logged_messages().await;
    let shard = dir.path().join("shard-00");
    let segment = segment_files(dir.path())
        .into_iter()
        .find(|f| f.extension().is_some_and(|e| e == "log"))
        .unwrap();
    // The recovery point's last eight bytes: how far the segment is known fsync'd.
    let covered = || {
        let point = std::fs::read(shard.join("recovery-point")).unwrap_or_default();
        point
            .last_chunk::<8>()
            .map_or(0, |len| u64::from_le_bytes(*len))
    };
    let written = std::fs::metadata(&segment).unwrap().len();
    eventually(
        WAIT,
        "the recovery point to cover every LOGGED message",
        || async { covered() == written },
    )
    .await;
    // What a crash now leaves behind.
    let crashed = tempfile::tempdir().unwrap();
    let copy = crashed.path().join("shard-00");
    std::fs::create_dir(&copy).unwrap();
    for file in std::fs::read_dir(&shard).unwrap() {
        let file = file.unwrap().path();
        std::fs::copy(&file, copy.join(file.file_name().unwrap())).unwrap();
    }
    std::fs::copy(dir.path().join("shards"), crashed.path().join("shards")).unwrap();
    log.close(Duration::ZERO).await;
    drop(log);
    let copied = copy.join(segment.file_name().unwrap());
    let mut bytes = std::fs::read(&copied).unwrap();
    let last = bytes.len() - 20;
    bytes[last] ^= 0x02;
    std::fs::write(&copied, &bytes).unwrap();
    let error = MessageLog::open(one_shard, crashed.path(), broker).unwrap_err();
    assert!(matches!(error, Error::Damaged { .. }), "{error}");
}

/// A one-shard RBML log, its broker down, holding ten submissions acknowledged LOGGED.
async fn ten_logged_messages() -> (tempfile::TempDir, LogConfig, FakeBroker, MessageLog) {
    let dir = tempfile::tempdir().unwrap();
    let mut one_shard = config(Mode::Rbml);
    one_shard.shards = 1;
    one_shard.segment_bytes = 1 << 20;
    let broker = FakeBroker::default();
    broker.down.store(true, Ordering::Relaxed);
    let (log, _) = MessageLog::open(one_shard.clone(), dir.path(), broker.clone()).unwrap();
    for i in 0..10 {
        let ticket = log.submit(submission(&format!("a{i}"), 1, 2, AckLevel::Logged));
        ticket.unwrap().wait().await.unwrap();
    }
    (dir, one_shard, broker, log)
}
