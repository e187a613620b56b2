//! Queries created at run time (`CreateQuery`, `DropQuery`): a log in the broker, the
//! topic [`TOPIC`] (one partition, kept for ever), that every analyzer replica follows from
//! its first record, so that every replica runs the same created queries and a restarted
//! one finds them again.
//!
//! A record is an event keyed by the query's name: `query.created` with the JSON payload
//! `{"version": 1, "name", "sql", "start_from": "earliest" | "latest", "start_offsets":
//! [[<partition>, <offset>], …], "created_at"}`, or `query.dropped` with `{"version": 1,
//! "name"}`. The log decides: replicas apply it in order, a creation of a name that is
//! already there is ignored (two replicas creating the same name at once: the later
//! record loses, and its writer answers `ALREADY_EXISTS`), and a drop of an absent name
//! too. A created query's **incarnation** is the offset of its record: its consumer groups
//! and internal topics are named after `<name>..<incarnation>`, so that a query dropped and
//! created again under the same name starts from nothing rather than from the old one's
//! state.
//!
//! `latest` is made exact: the creating replica records where each partition of the
//! topic ended (`start_offsets`), and the query reads from there on every replica,
//! however late its groups are joined.

use crate::error::AnalyzerError;
use runnel_client::{ClientError, Producer, ProducerOptions};
use runnel_proto::v1::broker_client::BrokerClient;
use runnel_proto::v1::{Acks, DescribeTopicRequest, Event, StartFrom};
use runnel_security::Peer;
use runnel_server::Shutdown;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tonic::Code;

/// The log of created and dropped queries.
pub(crate) const TOPIC: &str = "_analyzer.queries";
const CREATED: &str = "query.created";
const DROPPED: &str = "query.dropped";
/// Created queries at most: each runs its own consumer groups.
pub(crate) const MAX_CREATED: usize = 256;
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// A query created at run time, as its record says.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Created {
    pub(crate) name: String,
    pub(crate) sql: String,
    #[serde(with = "start_from")]
    pub(crate) start_from: StartFrom,
    /// `latest`: where each partition of the topic ended when the query was created.
    #[serde(default, with = "offsets")]
    pub(crate) start_offsets: BTreeMap<u32, u64>,
    pub(crate) created_at: String,
    /// The offset of its record: its incarnation (not in the payload).
    #[serde(skip)]
    pub(crate) incarnation: u64,
}

impl Created {
    /// The name its consumer groups and internal topics are made from.
    pub(crate) fn instance(&self) -> String {
        format!("{}..{}", self.name, self.incarnation)
    }
}

/// Offsets by partition as `[[partition, offset], …]` (JSON object keys are text, which a
/// flattened map would not read back as numbers).
mod offsets {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::collections::BTreeMap;

    pub(super) fn serialize<S: Serializer>(
        map: &BTreeMap<u32, u64>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.collect_seq(map.iter())
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<u32, u64>, D::Error> {
        Ok(Vec::<(u32, u64)>::deserialize(d)?.into_iter().collect())
    }
}

mod start_from {
    use runnel_proto::v1::StartFrom;
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(from: &StartFrom, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(match from {
            StartFrom::Earliest => "earliest",
            StartFrom::Latest => "latest",
        })
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<StartFrom, D::Error> {
        match String::deserialize(d)?.as_str() {
            "earliest" => Ok(StartFrom::Earliest),
            "latest" => Ok(StartFrom::Latest),
            other => Err(serde::de::Error::custom(format!(
                "start_from {other:?} is neither earliest nor latest"
            ))),
        }
    }
}

/// One record of the log.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Change {
    Created(Created),
    Dropped(String),
}

#[derive(Serialize, Deserialize)]
struct Payload<T> {
    version: u32,
    #[serde(flatten)]
    body: T,
}

#[derive(Serialize, Deserialize)]
struct DroppedBody {
    name: String,
}

impl Change {
    fn name(&self) -> &str {
        match self {
            Change::Created(created) => &created.name,
            Change::Dropped(name) => name,
        }
    }

    /// The event that carries the change.
    pub(crate) fn to_event(&self) -> Result<Event, AnalyzerError> {
        let (kind, payload) = match self {
            Change::Created(created) => (
                CREATED,
                serde_json::to_vec(&Payload {
                    version: 1,
                    body: created,
                }),
            ),
            Change::Dropped(name) => (
                DROPPED,
                serde_json::to_vec(&Payload {
                    version: 1,
                    body: DroppedBody { name: name.clone() },
                }),
            ),
        };
        let payload = payload.map_err(|e| AnalyzerError::Registry(e.to_string()))?;
        Ok(Event {
            id: format!("{kind}/{}/{:016x}", self.name(), rand::random::<u64>()),
            key: self.name().to_owned(),
            r#type: kind.to_owned(),
            source: "runnel-analyzer".into(),
            payload: payload.into(),
            ..Event::default()
        })
    }

    /// Reads the change an event carries, stored at `offset`.
    pub(crate) fn from_event(event: &Event, offset: u64) -> Result<Change, String> {
        let version = |v: u32| {
            if v == 1 {
                Ok(())
            } else {
                Err(format!(
                    "record version {v} is newer than this analyzer reads"
                ))
            }
        };
        match event.r#type.as_str() {
            CREATED => {
                let payload: Payload<Created> =
                    serde_json::from_slice(&event.payload).map_err(|e| e.to_string())?;
                version(payload.version)?;
                let mut created = payload.body;
                created.incarnation = offset;
                Ok(Change::Created(created))
            }
            DROPPED => {
                let payload: Payload<DroppedBody> =
                    serde_json::from_slice(&event.payload).map_err(|e| e.to_string())?;
                version(payload.version)?;
                Ok(Change::Dropped(payload.body.name))
            }
            other => Err(format!("unknown record type {other:?}")),
        }
    }
}

/// What the registry holds after applying the log up to `next`.
#[derive(Debug, Clone, Default)]
pub(crate) struct Snapshot {
    pub(crate) queries: Arc<BTreeMap<String, Created>>,
    /// The offset of the next record to apply.
    pub(crate) next: u64,
    /// Whether the log has been read up to where it ended when the analyzer started.
    pub(crate) loaded: bool,
}

/// Every created query, as the log says.
pub(crate) struct Registry {
    state: watch::Sender<Snapshot>,
    broker: BrokerClient<Peer>,
    producer: tokio::sync::Mutex<Option<Producer>>,
    request_timeout: Duration,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("state", &*self.state.borrow())
            .finish_non_exhaustive()
    }
}

fn broker_error(error: ClientError) -> AnalyzerError {
    match error {
        ClientError::Broker(status) => AnalyzerError::Broker(status),
        ClientError::Topic(message) => AnalyzerError::Registry(message),
    }
}

/// Applies the record at `offset` to `state`: the log decides (see the module's docs).
fn apply(state: &mut Snapshot, offset: u64, change: Result<Change, String>) {
    state.next = offset + 1;
    let change = match change {
        Ok(change) => change,
        Err(error) => {
            metrics::counter!("runnel_analyzer_registry_records_skipped_total").increment(1);
            tracing::error!(offset, %error, topic = TOPIC, "a created-query record this analyzer cannot read; skipped");
            return;
        }
    };
    let queries = Arc::make_mut(&mut state.queries);
    match change {
        Change::Created(created) => {
            if queries.contains_key(&created.name) {
                tracing::debug!(query = %created.name, offset, "a query created twice; the first creation stands");
            } else if queries.len() >= MAX_CREATED {
                tracing::warn!(query = %created.name, offset, "more created queries than {MAX_CREATED}; this one is ignored");
            } else {
                queries.insert(created.name.clone(), created);
            }
        }
        Change::Dropped(name) => {
            queries.remove(&name);
        }
    }
}

impl Registry {
    /// Starts following the log behind `broker`.
    pub(crate) fn start(
        broker: Peer,
        max_message_bytes: usize,
        request_timeout: Duration,
        shutdown: Shutdown,
    ) -> Arc<Registry> {
        let registry = Arc::new(Registry {
            state: watch::Sender::new(Snapshot::default()),
            broker: BrokerClient::new(broker).max_decoding_message_size(max_message_bytes),
            producer: tokio::sync::Mutex::new(None),
            request_timeout,
        });
        tokio::spawn(Arc::clone(&registry).follow(shutdown));
        registry
    }

    /// Changes to the registry, as they are applied.
    pub(crate) fn watch(&self) -> watch::Receiver<Snapshot> {
        self.state.subscribe()
    }

    /// Every created query, once the log has been read (UNAVAILABLE after the request
    /// timeout otherwise).
    pub(crate) async fn queries(&self) -> Result<Arc<BTreeMap<String, Created>>, AnalyzerError> {
        let mut state = self.state.subscribe();
        match tokio::time::timeout(self.request_timeout, state.wait_for(|s| s.loaded)).await {
            Ok(Ok(snapshot)) => Ok(Arc::clone(&snapshot.queries)),
            _ => Err(AnalyzerError::Unavailable(
                "the registry of created queries is still being read from the broker; try again shortly"
                    .into(),
            )),
        }
    }

    /// Where each partition of `topic` ends now (empty if the topic does not exist yet:
    /// everything written to it comes after).
    pub(crate) async fn ends_of(&self, topic: &str) -> Result<BTreeMap<u32, u64>, AnalyzerError> {
        let mut broker = self.broker.clone();
        match broker
            .describe_topic(DescribeTopicRequest { name: topic.into() })
            .await
        {
            Ok(described) => Ok(described
                .into_inner()
                .topic
                .map(|t| {
                    t.partitions
                        .into_iter()
                        .map(|p| (p.partition, p.end_offset))
                        .collect()
                })
                .unwrap_or_default()),
            Err(status) if status.code() == Code::NotFound => Ok(BTreeMap::new()),
            Err(status) => Err(AnalyzerError::Broker(status)),
        }
    }

    /// Writes `change` and waits until this replica has applied it; answers with the
    /// registry as it was right after.
    pub(crate) async fn write(&self, change: &Change) -> Result<(u64, Snapshot), AnalyzerError> {
        self.queries().await?;
        let event = change.to_event()?;
        let position = {
            let mut producer = self.producer.lock().await;
            if producer.is_none() {
                let options = ProducerOptions {
                    acks: Acks::Durable,
                    retry_for: self.request_timeout,
                    call_timeout: self.request_timeout,
                    ..ProducerOptions::default()
                };
                *producer = Some(
                    Producer::new(self.broker.clone(), TOPIC, options)
                        .await
                        .map_err(broker_error)?,
                );
            }
            let sent = match producer.as_mut() {
                Some(producer) => producer.send(vec![event]).await,
                None => return Err(AnalyzerError::Registry("no producer".into())),
            };
            match sent {
                Ok(mut positions) => positions.pop(),
                Err(error) => {
                    *producer = None;
                    return Err(broker_error(error));
                }
            }
        };
        let Some(position) = position else {
            return Err(AnalyzerError::Registry(
                "the broker acknowledged no record".into(),
            ));
        };
        let mut state = self.state.subscribe();
        let applied = state.wait_for(|s| s.next > position.offset);
        match tokio::time::timeout(self.request_timeout, applied).await {
            Ok(Ok(snapshot)) => Ok((position.offset, snapshot.clone())),
            _ => Err(AnalyzerError::Unavailable(format!(
                "query {:?} was written to the broker but this analyzer has not read it back within {:?}; list queries again shortly",
                change.name(),
                self.request_timeout
            ))),
        }
    }

    fn apply(&self, offset: u64, change: Result<Change, String>) {
        self.state.send_modify(|state| apply(state, offset, change));
    }

    /// Creates the topic if needed and follows it from its first record until shutdown.
    async fn follow(self: Arc<Self>, shutdown: Shutdown) {
        let mut delay = RETRY_MIN;
        let (start, end) = loop {
            match self.prepare().await {
                Ok(bounds) => break bounds,
                Err(error) => {
                    tracing::warn!(%error, topic = TOPIC, "cannot read the created queries from the broker; retrying");
                }
            }
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = shutdown.wait() => return,
            }
            delay = (delay * 2).min(RETRY_MAX);
        };
        if start > 0 {
            tracing::error!(
                start,
                topic = TOPIC,
                "the created-query log was trimmed; queries created in the trimmed part are gone"
            );
        }
        self.state.send_modify(|s| {
            s.next = start;
            s.loaded = start >= end;
        });
        let mark_loaded = |offset: u64| {
            if offset + 1 >= end {
                self.state.send_modify(|s| s.loaded = true);
            }
        };
        runnel_client::follow_partition(
            &self.broker,
            TOPIC,
            0,
            || self.state.borrow().next,
            |record| {
                match &record.event {
                    Some(event) => {
                        self.apply(record.offset, Change::from_event(event, record.offset));
                    }
                    None => self.state.send_modify(|s| s.next = record.offset + 1),
                }
                mark_loaded(record.offset);
            },
            |start| {
                self.state.send_modify(|s| s.next = start);
                mark_loaded(start.saturating_sub(1));
            },
            || shutdown.wait(),
        )
        .await;
    }

    /// The topic's (start, end) offsets, after creating it if needed.
    async fn prepare(&self) -> Result<(u64, u64), AnalyzerError> {
        let bounds = runnel_client::open_kept(&self.broker, TOPIC, 1)
            .await
            .map_err(broker_error)?;
        Ok(bounds.first().copied().unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn created(name: &str) -> Created {
        Created {
            name: name.into(),
            sql: "SELECT key, count(*) FROM t GROUP BY key, TUMBLE(event_time, '1m')".into(),
            start_from: StartFrom::Latest,
            start_offsets: BTreeMap::from([(0, 12), (3, 7)]),
            created_at: "2026-12-06T07:00:00Z".into(),
            incarnation: 0,
        }
    }

    #[test]
    fn records_read_back_as_written_with_their_offset_as_incarnation() {
        let change = Change::Created(created("q"));
        let event = change.to_event().unwrap();
        assert_eq!(event.key, "q");
        assert_eq!(event.r#type, "query.created");
        let Change::Created(read) = Change::from_event(&event, 41).unwrap() else {
            panic!("a creation");
        };
        assert_eq!(
            read,
            Created {
                incarnation: 41,
                ..created("q")
            }
        );
        assert_eq!(read.instance(), "q..41");
        let dropped = Change::Dropped("q".into()).to_event().unwrap();
        assert_eq!(
            Change::from_event(&dropped, 42).unwrap(),
            Change::Dropped("q".into())
        );
        let mut newer = dropped.clone();
        newer.payload = br#"{"version": 2, "name": "q"}"#.to_vec().into();
        assert!(Change::from_event(&newer, 1).unwrap_err().contains("newer"));
        let mut unknown = dropped;
        unknown.r#type = "query.renamed".into();
        assert!(Change::from_event(&unknown, 1).is_err());
    }

    proptest! {
        /// Whatever bytes a record holds, reading it answers a change or an error.
        #[test]
        fn any_record_reads_or_is_refused(kind in prop::sample::select(vec![CREATED, DROPPED, "x"]), payload in prop::collection::vec(any::<u8>(), 0..200)) {
            let event = Event { r#type: kind.into(), payload: payload.into(), ..Event::default() };
            let _ = Change::from_event(&event, 0);
        }

        /// Creations and drops applied in log order leave exactly the names created and
        /// not dropped since, each with its first creation's incarnation.
        #[test]
        fn the_log_decides(ops in prop::collection::vec((any::<bool>(), 0u8..4), 0..40)) {
            let mut state = Snapshot::default();
            let mut expected: BTreeMap<String, u64> = BTreeMap::new();
            for (offset, (create, n)) in ops.iter().enumerate() {
                let name = format!("q{n}");
                let offset = offset as u64;
                let change = if *create {
                    expected.entry(name.clone()).or_insert(offset);
                    Change::Created(Created { incarnation: offset, ..created(&name) })
                } else {
                    expected.remove(&name);
                    Change::Dropped(name)
                };
                apply(&mut state, offset, Ok(change));
            }
            let found: BTreeMap<String, u64> = state.queries.iter().map(|(n, c)| (n.clone(), c.incarnation)).collect();
            prop_assert_eq!(found, expected);
            prop_assert_eq!(state.next, ops.len() as u64);
        }
    }
}
