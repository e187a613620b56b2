//! Store replicas: the results as a log in the broker, which every replica materialises.
//!
//! With `store.broker` set, a `Put` does not write long-term storage itself: it appends
//! the results to the broker's topic `_store.results` (one partition, so one total order)
//! with an idempotent producer, acknowledged once durable, and then waits until this
//! replica has applied them (a client reads its own writes on the replica it wrote
//! through). Every replica follows that partition from its own applied position and applies
//! each result through the one write path ([`crate::apply`]); the result's sequence is its
//! log offset + 1 — the same on every replica, so a `Watch` cursor from one replica is
//! valid on every other. The last sequence applied is committed in the same redb
//! transaction as the results, so a restart resumes exactly there, and a replica whose
//! data directory was deleted rebuilds from the start of the log.
//!
//! A replica reports NOT_SERVING and answers reads with UNAVAILABLE until it has applied
//! the log up to the end it saw on start-up; only then does it rank from disk and serve.
//!
//! The store creates the topic (ALREADY_EXISTS is fine) with a retention of the store's
//! own `retention` (none when that is `0s`): a record leaves the log only after the
//! result it holds has left every replica's long-term storage, so a rebuilt replica has
//! every result the others have.
//!
//! **Encoding** ([`encode`], [`encode_deletion`], [`decode`]): a record is one of two
//! kinds, told apart by the event's `type` (which is also the version: a store that meets a
//! type it does not know stops with an error rather than skip or misread a record):
//!
//! - a result, [`RESULT_TYPE`]: the `payload` is the `QueryResult` protobuf with `sequence`
//!   unset (the offset gives it); its `id` is `<query>/<key>/<window start ms>`;
//! - a query's deletion (a tombstone, `DeleteQuery`), [`DELETE_QUERY_TYPE`]: the `payload`
//!   is the `DeleteQueryRequest` protobuf; its `id` is `<query>/delete`. Every replica
//!   deletes every result of the query it holds when it applies the record, so all of them
//!   delete exactly the results written before it in the log, and keep those after it.
//!
//! Ids are for whoever reads the topic and are not read back. No event key: one partition.

use crate::apply::Applier;
use crate::error::{Result, StoreError};
use crate::hot::HotTier;
use crate::validate;
use prost::Message;
use runnel_client::{ClientError, Producer, ProducerOptions};
use runnel_proto::Millis;
use runnel_proto::v1::broker_client::BrokerClient;
use runnel_proto::v1::subscribe_response::Message as Part;
use runnel_proto::v1::{
    Acks, CreateTopicRequest, DeleteQueryRequest, DescribeTopicRequest, Event, GroupFence,
    QueryResult, Record, RetentionPolicy, SubscribeRequest,
};
use runnel_security::{ConnectConfig, Peer};
use runnel_server::Shutdown;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::{Mutex, mpsc, watch};
use tonic::Code;

/// The topic holding every result, in one partition.
pub(crate) const TOPIC: &str = "_store.results";
/// The event type of a result in the log, and its encoding's version.
pub(crate) const RESULT_TYPE: &str = "runnel.store.result.v1";
/// The event type of a query's deletion (a tombstone) in the log, and its encoding's
/// version.
pub(crate) const DELETE_QUERY_TYPE: &str = "runnel.store.delete_query.v1";
/// Results applied in one transaction at most, when the log has that many waiting: large,
/// as a transaction copies each B-tree page it touches once however often it touches it.
const MAX_APPLY_BATCH: usize = 200_000;
/// Decoded chunks between the reader of the log and the applier (a chunk is what one
/// broker read returns, bounded in bytes).
const CHUNKS_AHEAD: usize = 64;
/// Longest wait between attempts to reach the broker.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// One result as an event of the log.
pub(crate) fn encode(result: &QueryResult) -> Event {
    let mut payload = result.clone();
    payload.sequence = 0;
    let start = result.window_start.map(Millis::from).unwrap_or_default().0;
    Event {
        // The broker wants an id on every event; this one names the window, for people
        // reading the topic.
        id: format!("{}/{}/{start}", result.query, result.key),
        r#type: RESULT_TYPE.to_owned(),
        payload: payload.encode_to_vec().into(),
        ..Event::default()
    }
}

/// The deletion of every result of `query` as an event of the log.
pub(crate) fn encode_deletion(query: &str) -> Event {
    let payload = DeleteQueryRequest {
        query: query.to_owned(),
    };
    Event {
        id: format!("{query}/delete"),
        r#type: DELETE_QUERY_TYPE.to_owned(),
        payload: payload.encode_to_vec().into(),
        ..Event::default()
    }
}

/// One record of the log, decoded: what a replica applies at its sequence.
// Nearly every record is a result: boxing it would cost an allocation per result applied
// to shrink the rare deletion.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Entry {
    /// A result, its sequence set from the record's offset.
    Result(QueryResult),
    /// Every result of `query` written before it is deleted.
    DeleteQuery {
        /// The query.
        query: String,
        /// The record's offset + 1.
        sequence: u64,
    },
}

impl Entry {
    /// The record's offset + 1.
    pub(crate) fn sequence(&self) -> u64 {
        match self {
            Entry::Result(result) => result.sequence,
            Entry::DeleteQuery { sequence, .. } => *sequence,
        }
    }
}

/// What a record of the log holds, its sequence set from the record's offset.
pub(crate) fn decode(record: &Record) -> Result<Entry> {
    let bad = |reason: String| StoreError::BadRecord {
        offset: record.offset,
        reason,
    };
    let event = record
        .event
        .as_ref()
        .ok_or_else(|| bad("the record holds no event".into()))?;
    if event.r#type == DELETE_QUERY_TYPE {
        let deletion = DeleteQueryRequest::decode(event.payload.as_ref())
            .map_err(|error| bad(format!("the deletion does not decode: {error}")))?;
        runnel_proto::names::validate_query_name(&deletion.query)
            .map_err(|error| bad(format!("not a valid deletion: {error}")))?;
        return Ok(Entry::DeleteQuery {
            query: deletion.query,
            sequence: record.offset + 1,
        });
    }
    if event.r#type != RESULT_TYPE {
        return Err(bad(format!(
            "its type is {:?}, not {RESULT_TYPE:?} or {DELETE_QUERY_TYPE:?}: written by a newer store, or not by a store",
            event.r#type
        )));
    }
    let mut result = QueryResult::decode(event.payload.as_ref())
        .map_err(|error| bad(format!("the result does not decode: {error}")))?;
    validate::validate(std::slice::from_ref(&result), 1)
        .map_err(|error| bad(format!("not a valid result: {error}")))?;
    result.sequence = record.offset + 1;
    Ok(Entry::Result(result))
}

/// The results log: where `Put` writes, what every replica follows.
pub(crate) struct ResultsLog {
    broker: BrokerClient<Peer>,
    producer: Mutex<Producer>,
    /// Records read from the log by this process (also `runnel_store_log_records_read_total`).
    records_read: AtomicU64,
}

fn log_error(error: impl std::fmt::Display) -> StoreError {
    StoreError::Log(error.to_string())
}

/// Whether a failed call to the broker may succeed if made again.
fn retriable(error: &ClientError) -> bool {
    match error {
        ClientError::Broker(status) => runnel_client::retriable(status.code()),
        ClientError::Topic(_) => false,
    }
}

impl ResultsLog {
    /// Connects to the broker at `url`, creating the topic if it does not exist; waits
    /// (retrying) while the broker cannot be reached, until `shutdown`.
    pub(crate) async fn open(
        url: &str,
        connect: &ConnectConfig,
        retention: Duration,
        max_message_bytes: usize,
        shutdown: &Shutdown,
    ) -> Result<ResultsLog> {
        let channel = runnel_security::connect_lazy(url, connect)
            .map_err(|error| log_error(format!("store.broker {url:?}: {error}")))?;
        let broker = BrokerClient::new(channel)
            .max_decoding_message_size(max_message_bytes)
            .max_encoding_message_size(max_message_bytes);
        let mut delay = Duration::from_millis(50);
        loop {
            match Self::try_open(broker.clone(), retention).await {
                Ok(log) => return Ok(log),
                Err(error) if retriable(&error) && !shutdown.is_triggered() => {
                    tracing::warn!(%error, "cannot reach the broker for the results log; retrying");
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = shutdown.wait() => return Err(StoreError::NotFollowing),
                    }
                    delay = (delay * 2).min(MAX_BACKOFF);
                }
                Err(error) => return Err(log_error(error)),
            }
        }
    }

    async fn try_open(
        mut broker: BrokerClient<Peer>,
        retention: Duration,
    ) -> std::result::Result<ResultsLog, ClientError> {
        let max_age = (!retention.is_zero()).then(|| {
            prost_types::Duration::try_from(retention).unwrap_or(prost_types::Duration {
                seconds: i64::MAX,
                nanos: 0,
            })
        });
        let create = CreateTopicRequest {
            name: TOPIC.to_owned(),
            partitions: 1,
            retention: Some(RetentionPolicy {
                max_age,
                max_bytes: None,
            }),
        };
        match broker.create_topic(create).await {
            Ok(_) => tracing::info!(topic = TOPIC, ?retention, "results log created"),
            Err(status) if status.code() == Code::AlreadyExists => {}
            Err(status) => return Err(ClientError::Broker(status)),
        }
        let described = broker
            .describe_topic(DescribeTopicRequest {
                name: TOPIC.to_owned(),
            })
            .await
            .map_err(ClientError::Broker)?
            .into_inner();
        let topic = described.topic.unwrap_or_default();
        if topic.partitions.len() != 1 {
            return Err(ClientError::Topic(format!(
                "{TOPIC} has {} partitions; the results log needs exactly one (a total order)",
                topic.partitions.len()
            )));
        }
        let kept = topic
            .retention
            .and_then(|r| r.max_age)
            .and_then(|age| Duration::try_from(age).ok());
        if let Some(kept) = kept
            && (retention.is_zero() || kept < retention)
        {
            tracing::warn!(
                ?kept,
                ?retention,
                "{TOPIC} keeps records for less than the store keeps results: a replica rebuilt from it would miss results the others still have"
            );
        }
        let options = ProducerOptions {
            acks: Acks::Durable,
            ..ProducerOptions::default()
        };
        let producer = Producer::new(broker.clone(), TOPIC, options).await?;
        Ok(ResultsLog {
            broker,
            producer: Mutex::new(producer),
            records_read: AtomicU64::new(0),
        })
    }

    /// The log's first offset and end offset.
    pub(crate) async fn bounds(&self) -> Result<(u64, u64)> {
        let described = self
            .broker
            .clone()
            .describe_topic(DescribeTopicRequest {
                name: TOPIC.to_owned(),
            })
            .await
            .map_err(log_error)?
            .into_inner();
        let partition = described
            .topic
            .and_then(|topic| topic.partitions.into_iter().next())
            .ok_or_else(|| log_error(format!("{TOPIC} has no partition")))?;
        Ok((partition.start_offset, partition.end_offset))
    }

    /// Appends validated `results` (fenced by `fence`, if any); answers with the sequence
    /// of the last one once the broker holds them durably.
    pub(crate) async fn append(
        &self,
        results: &[QueryResult],
        fence: Option<GroupFence>,
    ) -> Result<u64> {
        self.send(results.iter().map(encode).collect(), fence).await
    }

    /// Appends the deletion of every result of `query` (a valid name); answers with its
    /// sequence once the broker holds it durably.
    pub(crate) async fn append_deletion(&self, query: &str) -> Result<u64> {
        self.send(vec![encode_deletion(query)], None).await
    }

    async fn send(&self, events: Vec<Event>, fence: Option<GroupFence>) -> Result<u64> {
        let mut producer = self.producer.lock().await;
        producer.set_fence(fence);
        let positions = producer.send(events).await.map_err(|error| match error {
            ClientError::Broker(status) if status.code() == Code::FailedPrecondition => {
                StoreError::Fenced(status.message().to_owned())
            }
            ClientError::Broker(status) if status.code() == Code::InvalidArgument => {
                StoreError::InvalidArgument(status.message().to_owned())
            }
            other => log_error(other),
        })?;
        drop(producer);
        positions
            .last()
            .map(|position| position.offset + 1)
            .ok_or_else(|| log_error("the broker acknowledged no record"))
    }

    /// Follows the log from where `applier` is and applies every record, until `shutdown`;
    /// sets `caught_up` once it has applied the log up to `target` (its end on start-up)
    /// and ranked from disk. Returns an error only for what retrying cannot fix: a record
    /// it cannot apply, a gap in the log, or a log that no longer holds what this
    /// replica has not applied yet.
    pub(crate) async fn follow<H: HotTier>(
        self: Arc<Self>,
        applier: Arc<Applier<H>>,
        target: u64,
        caught_up: watch::Sender<bool>,
        shutdown: Shutdown,
    ) -> Result<()> {
        let mut ready = false;
        let mut delay = Duration::from_millis(50);
        let started = std::time::Instant::now();
        let resumed_at = applier.applied();
        loop {
            if !ready && applier.applied() >= target {
                // What catch-up wrote without fsync (see `Durable::put`) is made durable
                // before the replica serves anything of it.
                let durable = Arc::clone(applier.tiers().durable());
                tokio::task::spawn_blocking(move || durable.sync()).await??;
                applier.tiers().rank_from_disk().await?;
                ready = true;
                caught_up.send_replace(true);
                let applied = applier.applied() - resumed_at;
                tracing::info!(
                    applied,
                    seconds = started.elapsed().as_secs_f64(),
                    "caught up with the results log; serving"
                );
            }
            let from = applier.applied();
            let (sender, mut chunks) = mpsc::channel(CHUNKS_AHEAD);
            let reader = tokio::spawn(Arc::clone(&self).read(from, sender));
            let ended = loop {
                let next = tokio::select! {
                    next = chunks.recv() => next,
                    () = shutdown.wait() => {
                        reader.abort();
                        return Ok(());
                    }
                };
                let mut batch = match next {
                    Some(Ok(batch)) => batch,
                    Some(Err(error)) => break error,
                    None => break log_error("the subscription ended"),
                };
                let mut failed = None;
                // Gathered first and moved into the batch once, at its final size: growing
                // it chunk by chunk moved every result several times, while the applier
                // waited.
                let mut waiting = Vec::new();
                let mut size = batch.len();
                while size < MAX_APPLY_BATCH {
                    match chunks.try_recv() {
                        Ok(Ok(more)) => {
                            size += more.len();
                            waiting.push(more);
                        }
                        Ok(Err(error)) => {
                            failed = Some(error);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                batch.reserve_exact(size - batch.len());
                for more in waiting {
                    batch.extend(more);
                }
                let expected = applier.applied() + 1;
                if let Some(first) = batch.first()
                    && first.sequence() > expected
                {
                    reader.abort();
                    return Err(StoreError::BadRecord {
                        offset: expected - 1,
                        reason: format!(
                            "the log continued at offset {} instead: records are missing",
                            first.sequence() - 1
                        ),
                    });
                }
                applier.apply(batch, ready).await?;
                delay = Duration::from_millis(50);
                if let Some(error) = failed {
                    break error;
                }
                if !ready && applier.applied() >= target {
                    // Rank and announce readiness before reading on.
                    break StoreError::NotFollowing;
                }
            };
            reader.abort();
            match ended {
                StoreError::NotFollowing => continue,
                error @ (StoreError::BadRecord { .. } | StoreError::Incompatible { .. }) => {
                    return Err(error);
                }
                error => {
                    tracing::warn!(%error, "following the results log failed; resubscribing");
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = shutdown.wait() => return Ok(()),
                    }
                    delay = (delay * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// Checks where this replica resumes against what the log holds: a fresh replica
    /// starts at the log's first record; one that applied records the log has since
    /// deleted unread, or more than the log holds, cannot resume.
    pub(crate) async fn resume_from(&self, applied: u64) -> Result<u64> {
        let (start, end) = self.bounds().await?;
        if applied > end {
            return Err(StoreError::Incompatible {
                path: TOPIC.into(),
                reason: format!(
                    "this replica applied {applied} results but the log ends at {end}: the log was recreated; move the data directory away to rebuild from it"
                ),
            });
        }
        if applied < start && applied > 0 {
            return Err(StoreError::Incompatible {
                path: TOPIC.into(),
                reason: format!(
                    "this replica applied through offset {applied} but the log now starts at {start}: it was away longer than the log's retention; move the data directory away to rebuild from the log"
                ),
            });
        }
        Ok(end)
    }
}

impl ResultsLog {
    /// Reads the log from `from` on and sends its records, decoded, in chunks, until the
    /// stream or the receiver ends. A fresh replica (`from` 0) starts at the first record
    /// kept.
    async fn read(self: Arc<Self>, from: u64, chunks: mpsc::Sender<Result<Vec<Entry>>>) {
        let subscribed = async {
            let offset = if from == 0 {
                self.bounds().await?.0
            } else {
                from
            };
            let request = SubscribeRequest {
                topic: TOPIC.to_owned(),
                partition: 0,
                offset,
                ..SubscribeRequest::default()
            };
            self.broker
                .clone()
                .subscribe(request)
                .await
                .map(tonic::Response::into_inner)
                .map_err(log_error)
        };
        let mut stream = match subscribed.await {
            Ok(stream) => stream,
            Err(error) => {
                let _ = chunks.send(Err(error)).await;
                return;
            }
        };
        let counter = metrics::counter!("runnel_store_log_records_read_total");
        loop {
            let decoded = match stream.message().await {
                Ok(Some(message)) => match message.message {
                    Some(Part::Records(chunk)) => {
                        let read = chunk.records.len() as u64;
                        self.records_read.fetch_add(read, Ordering::Relaxed);
                        counter.increment(read);
                        chunk.records.iter().map(decode).collect()
                    }
                    Some(Part::Assignment(_)) | None => continue,
                },
                Ok(None) => Err(log_error("the broker ended the subscription")),
                Err(status) => Err(log_error(status)),
            };
            let failed = decoded.is_err();
            if chunks.send(decoded).await.is_err() || failed {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HotConfig;
    use crate::durable::{Durable, Sequencing};
    use crate::hot::Memory;
    use crate::tiers::Tiers;
    use proptest::prelude::*;
    use runnel_log::FsyncPolicy;

    fn result(key: &str, start: i64) -> QueryResult {
        QueryResult {
            query: "q".into(),
            key: key.into(),
            window_start: Some(Millis(start).into()),
            window_end: Some(Millis(start + 10).into()),
            ..QueryResult::default()
        }
    }

    /// Follows the log at `url` into `dir` until `work` is done; answers with what `work`
    /// answered and how many records the follower read.
    async fn following<T>(
        url: &str,
        dir: &std::path::Path,
        work: impl AsyncFnOnce(&ResultsLog, &Applier<Memory>) -> T,
    ) -> (T, u64) {
        let durable =
            Arc::new(Durable::open(dir, FsyncPolicy::Never, 1000, Sequencing::Log).unwrap());
        let applied = durable.last_sequence().unwrap();
        let tiers = Tiers::new(durable, Memory::new(1 << 20), HotConfig::default());
        let applier = Arc::new(Applier::new(tiers, applied, 100));
        let (stop, shutdown) = Shutdown::new();
        let log = ResultsLog::open(
            url,
            &ConnectConfig::default(),
            Duration::ZERO,
            4 << 20,
            &shutdown,
        )
        .await
        .unwrap();
        let log = Arc::new(log);
        let target = log.resume_from(applied).await.unwrap();
        let (caught_up, mut ready) = watch::channel(false);
        let follower = tokio::spawn(Arc::clone(&log).follow(
            Arc::clone(&applier),
            target,
            caught_up,
            shutdown,
        ));
        ready.wait_for(|&ready| ready).await.unwrap();
        let answer = work(&log, &applier).await;
        stop.trigger();
        follower.await.unwrap().unwrap();
        (answer, log.records_read.load(Ordering::Relaxed))
    }

    #[tokio::test]
    async fn a_restart_reads_the_log_from_where_it_had_applied() {
        let broker_dir = tempfile::tempdir().unwrap();
        let mut broker = runnel_testkit::Services::new();
        let config = runnel_broker::BrokerConfig {
            data_dir: broker_dir.path().to_owned(),
            ..runnel_broker::BrokerConfig::default()
        };
        let addrs = broker
            .start_on_loopback("broker", runnel_broker::run, config)
            .await;
        let url = format!("http://{}", addrs.grpc);
        let dir = tempfile::tempdir().unwrap();
        let put = async |log: &ResultsLog, applier: &Applier<Memory>, keys: &[&str]| {
            let results: Vec<QueryResult> = keys.iter().map(|key| result(key, 0)).collect();
            let last = log.append(&results, None).await.unwrap();
            applier.applied_through(last).await.unwrap();
            last
        };
        let (last, read) = following(&url, dir.path(), async |log, applier| {
            put(log, applier, &["a", "b", "c"]).await
        })
        .await;
        assert_eq!((last, read), (3, 3));
        let (last, read) = following(&url, dir.path(), async |log, applier| {
            assert_eq!(
                applier.applied(),
                3,
                "the applied position survives a restart"
            );
            put(log, applier, &["d"]).await
        })
        .await;
        assert_eq!(last, 4);
        assert_eq!(read, 1, "a restart reads only what it had not applied");
        // A replica whose data directory is gone reads the whole log.
        let fresh = tempfile::tempdir().unwrap();
        let (applied, read) =
            following(&url, fresh.path(), async |_, applier| applier.applied()).await;
        assert_eq!((applied, read), (4, 4));
    }

    fn record(offset: u64, event: Event) -> Record {
        Record {
            partition: 0,
            offset,
            append_time: None,
            event: Some(event),
        }
    }

    proptest! {
        /// Whatever a result holds, it comes back from the log as it went in, with the
        /// sequence its offset gives it.
        #[test]
        fn a_result_round_trips_with_its_offset_as_sequence(
            query in "[a-z][a-z0-9_]{0,20}",
            key in ".{0,40}",
            start in 0i64..4_000_000_000_000,
            length in 1i64..86_400_000,
            values in proptest::collection::btree_map("[a-z]{1,8}", -1e12f64..1e12, 0..5),
            headers in proptest::collection::btree_map("[a-z]{1,8}", "[ -~]{0,16}", 0..3),
            old_sequence in any::<u64>(),
            offset in 0u64..u64::MAX - 1,
        ) {
            let result = QueryResult {
                query,
                key,
                window_start: Some(Millis(start).into()),
                window_end: Some(Millis(start + length).into()),
                values: values.into_iter().collect(),
                headers: headers.into_iter().collect(),
                sequence: old_sequence,
                ..QueryResult::default()
            };
            let Entry::Result(decoded) = decode(&record(offset, encode(&result))).unwrap() else {
                panic!("a result decodes as a result");
            };
            prop_assert_eq!(decoded.sequence, offset + 1);
            prop_assert_eq!(QueryResult { sequence: old_sequence, ..decoded }, result);
        }

        /// Whatever query a deletion names, it comes back from the log as a deletion of
        /// that query, with the sequence its offset gives it — never as a result.
        #[test]
        fn a_deletion_round_trips_with_its_offset_as_sequence(
            query in "[a-z][a-z0-9_.-]{0,60}",
            offset in 0u64..u64::MAX - 1,
        ) {
            prop_assume!(!query.contains(".."));
            let decoded = decode(&record(offset, encode_deletion(&query))).unwrap();
            prop_assert_eq!(decoded, Entry::DeleteQuery { query, sequence: offset + 1 });
        }
    }

    #[test]
    fn a_deletion_is_its_own_kind_of_record() {
        let event = encode_deletion("q");
        assert_eq!(event.r#type, "runnel.store.delete_query.v1");
        assert_eq!(event.id, "q/delete");
        assert_ne!(
            event.r#type, RESULT_TYPE,
            "an older store must not take it for a result"
        );
        assert_eq!(
            DeleteQueryRequest::decode(event.payload.as_ref()).unwrap(),
            DeleteQueryRequest { query: "q".into() }
        );
        assert_eq!(
            decode(&record(9, event)).unwrap(),
            Entry::DeleteQuery {
                query: "q".into(),
                sequence: 10
            }
        );
        // A deletion that names no valid query, or whose payload does not decode, is
        // refused by offset rather than applied.
        let nameless = encode_deletion("");
        let garbage = Event {
            payload: vec![0xff, 0xff, 0xff].into(),
            ..encode_deletion("q")
        };
        for (event, says) in [
            (nameless, "not a valid deletion"),
            (garbage, "does not decode"),
        ] {
            let error = decode(&record(41, event)).unwrap_err().to_string();
            assert!(error.contains("offset 41"), "{error}");
            assert!(error.contains(says), "{error} should say {says}");
        }
        // And a result's record, read as what an older store reads, is still a result.
        let result = QueryResult {
            query: "q".into(),
            key: "k".into(),
            window_start: Some(Millis(0).into()),
            window_end: Some(Millis(10).into()),
            ..QueryResult::default()
        };
        assert!(matches!(
            decode(&record(0, encode(&result))).unwrap(),
            Entry::Result(_)
        ));
    }

    #[test]
    fn records_that_are_not_results_are_refused_by_offset() {
        let result = QueryResult {
            query: "q".into(),
            key: "k".into(),
            window_start: Some(Millis(0).into()),
            window_end: Some(Millis(10).into()),
            ..QueryResult::default()
        };
        let newer = Event {
            r#type: "runnel.store.result.v2".into(),
            ..encode(&result)
        };
        let garbage = Event {
            payload: vec![0xff, 0xff, 0xff].into(),
            ..encode(&result)
        };
        let invalid = encode(&QueryResult {
            window_end: None,
            ..result.clone()
        });
        for (event, says) in [
            (newer, "v2"),
            (garbage, "does not decode"),
            (invalid, "window_end"),
        ] {
            let error = decode(&record(41, event)).unwrap_err().to_string();
            assert!(error.contains("offset 41"), "{error}");
            assert!(error.contains(says), "{error} should say {says}");
        }
        let empty = Record {
            event: None,
            ..record(7, Event::default())
        };
        assert!(decode(&empty).is_err());
        assert_eq!(decode(&record(0, encode(&result))).unwrap().sequence(), 1);
    }
}
