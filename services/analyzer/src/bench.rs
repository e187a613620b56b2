//! The operator benchmark behind `runnel bench analyzer`: one partition's task on one
//! thread, fed the bytes a `Subscribe` stream carries, so that the figure is events per
//! second per core of everything the analyzer does per event — decoding the stream's
//! chunks, reading each event's fields, filtering, windowing, aggregating, firing — and
//! optionally checkpointing (the task's state serialised, checksummed and cut into the
//! chunk events that go to the checkpoint topic), but not the broker or the store.
//!
//! Events are encoded before the clock starts, as `SubscribeResponse` messages of 1000
//! records (what the broker sends); the timed loop decodes each message, feeds its
//! records, and flushes once per message as the runner does.

use crate::checkpoint::{Checkpoints, Stage};
use crate::config::QueryConfig;
use crate::event::{RawMessage, RawSubscribeResponse};
use crate::plan::Plan;
use crate::task::{Outputs, Task};
use bytes::Bytes;
use prost::Message;
use runnel_proto::Millis;
use runnel_proto::records;
use runnel_proto::stored::{BatchHeader, StoredBatch};
use runnel_proto::v1::{Compression, Event, RecordChunk, SubscribeResponse, subscribe_response};
use std::time::{Duration, Instant};

/// The operators measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operator {
    /// Count per key in 1 s tumbling windows.
    TumblingCount,
    /// Average of a payload number per key in 10 s windows sliding every 1 s.
    SlidingAverage,
    /// The 10 heaviest payload items per key in 1 s tumbling windows (Space-Saving).
    TopK,
    /// Distinct payload items per key in 1 s tumbling windows (HyperLogLog++).
    DistinctCount,
}

impl Operator {
    /// Every operator, in the order the report lists them.
    pub const ALL: [Operator; 4] = [
        Operator::TumblingCount,
        Operator::SlidingAverage,
        Operator::TopK,
        Operator::DistinctCount,
    ];

    /// A short name for tables.
    pub fn name(self) -> &'static str {
        match self {
            Operator::TumblingCount => "keyed tumbling count",
            Operator::SlidingAverage => "sliding average (10 s / 1 s)",
            Operator::TopK => "top-k (k = 10)",
            Operator::DistinctCount => "distinct count (HLL p14)",
        }
    }

    /// The same query in SQL: it compiles to the same plan.
    fn sql(self) -> &'static str {
        match self {
            Operator::TumblingCount => {
                "SELECT key, count(*) FROM events GROUP BY key, TUMBLE(event_time, INTERVAL '1' SECOND)"
            }
            Operator::SlidingAverage => {
                "SELECT key, avg(payload.value) FROM events GROUP BY key, HOP(event_time, INTERVAL '1' SECOND, INTERVAL '10' SECOND)"
            }
            Operator::TopK => {
                "SELECT key, top_k(payload.item, 10) FROM events GROUP BY key, TUMBLE(event_time, INTERVAL '1' SECOND)"
            }
            Operator::DistinctCount => {
                "SELECT key, approx_count_distinct(payload.item) FROM events GROUP BY key, TUMBLE(event_time, INTERVAL '1' SECOND)"
            }
        }
    }

    fn query(self) -> &'static str {
        match self {
            Operator::TumblingCount => "window = \"1s\"\naggregates = [{ fn = \"count\" }]\n",
            Operator::SlidingAverage => {
                "window = { type = \"sliding\", size = \"10s\", slide = \"1s\" }\naggregates = [{ fn = \"avg\", of = \"payload.value\" }]\n"
            }
            Operator::TopK => {
                "window = \"1s\"\naggregates = [{ fn = \"top_k\", of = \"payload.item\", k = 10 }]\n"
            }
            Operator::DistinctCount => {
                "window = \"1s\"\naggregates = [{ fn = \"distinct\", of = \"payload.item\" }]\n"
            }
        }
    }
}

/// How the measured query is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    /// As a TOML table.
    Table,
    /// In SQL.
    Sql,
}

impl Form {
    /// A short name for tables.
    pub fn name(self) -> &'static str {
        match self {
            Form::Table => "table",
            Form::Sql => "SQL",
        }
    }
}

/// The plan `operator` runs as, written in `form`.
fn plan(operator: Operator, form: Form) -> Result<Plan, String> {
    let query: QueryConfig = match form {
        Form::Table => toml::from_str(&format!(
            "name = \"bench\"\nout_of_orderness = \"0s\"\n{}",
            operator.query()
        ))
        .map_err(|e| e.to_string())?,
        Form::Sql => crate::sql::compile(
            "bench",
            &format!("{} WITH (out_of_orderness = '0s')", operator.sql()),
        )
        .map_err(|e| e.to_string())?,
    };
    query.compile(0).map_err(|e| e.to_string())
}

/// What one run measured.
#[derive(Debug, Clone, Copy)]
pub struct OperatorFigures {
    /// Events fed.
    pub events: u64,
    /// Wall time of the timed loop.
    pub elapsed: Duration,
    /// Results the windows emitted.
    pub results: u64,
    /// Checkpoints written.
    pub checkpoints: u64,
    /// Time spent serialising checkpoints into their chunk events.
    pub checkpoint_time: Duration,
    /// The size of the last checkpoint, in bytes.
    pub checkpoint_bytes: usize,
}

impl OperatorFigures {
    /// Events per second.
    pub fn rate(&self) -> f64 {
        self.events as f64 / self.elapsed.as_secs_f64()
    }
}

/// Encodes `events` events over `keys` keys, 1 ms of event time apart, as the broker's
/// `Subscribe` messages as a group member gets them: each a stored batch of 1000 records.
pub fn encode_stream(events: u64, keys: u64) -> Vec<Bytes> {
    let t0 = 1_700_000_000_000i64;
    let mut messages = Vec::new();
    let mut batch = Vec::with_capacity(1000);
    let mut base_offset = 0;
    for i in 0..events {
        let payload = format!(
            "{{\"value\":{},\"item\":\"item-{}\"}}",
            (i % 97) as f64 / 4.0,
            (i * 7919) % 5000
        );
        batch.push(Event {
            id: format!("e{i}"),
            source: "bench".into(),
            r#type: "reading".into(),
            key: format!("key-{}", i % keys),
            event_time: Some(Millis(t0 + i as i64).into()),
            payload: payload.into_bytes().into(),
            ..Event::default()
        });
        if batch.len() == 1000 || i + 1 == events {
            let header = BatchHeader {
                compression: Compression::None,
                record_count: batch.len() as u32,
                base_offset,
                append_time: Millis(t0),
                producer_id: 0,
                base_sequence: 0,
                deduplicated: false,
            };
            base_offset += batch.len() as u64;
            let stored = StoredBatch::new(header, &records::encode(&std::mem::take(&mut batch)));
            let message = SubscribeResponse {
                message: Some(subscribe_response::Message::Records(RecordChunk {
                    partition: 0,
                    generation: 1,
                    first_offset: header.base_offset,
                    stored_batches: vec![stored.stored],
                    records: Vec::new(),
                })),
            };
            messages.push(Bytes::from(message.encode_to_vec()));
        }
    }
    messages
}

/// Runs `operator`, written in `form`, over `stream` (from [`encode_stream`]) on this
/// thread, preparing a checkpoint every `checkpoint_every` if given.
pub fn run_operator(
    operator: Operator,
    form: Form,
    stream: &[Bytes],
    checkpoint_every: Option<Duration>,
) -> Result<OperatorFigures, String> {
    let plan = plan(operator, form)?;
    let checkpoints = Checkpoints::new("bench", Stage::Source, &plan.fingerprint, 4 << 20);
    let mut task = Task::new(&plan, 0, None, Instant::now());
    let mut figures = OperatorFigures {
        events: 0,
        elapsed: Duration::ZERO,
        results: 0,
        checkpoints: 0,
        checkpoint_time: Duration::ZERO,
        checkpoint_bytes: 0,
    };
    let started = Instant::now();
    let mut last_checkpoint = started;
    let mut out = Outputs::default();
    for bytes in stream {
        let Ok(RawSubscribeResponse {
            message: Some(RawMessage::Records(mut chunk)),
        }) = RawSubscribeResponse::decode(bytes.clone())
        else {
            continue;
        };
        chunk.read_stored().map_err(|e| e.to_string())?;
        let now = Instant::now();
        let mut inputs = Vec::new();
        for record in &chunk.records {
            task.observe_source(&plan, record, &mut inputs, &mut out, now);
        }
        figures.events += chunk.records.len() as u64;
        task.flush(&plan, &mut out);
        figures.results += out.results.len() as u64;
        out.results.clear();
        if let Some(every) = checkpoint_every
            && last_checkpoint.elapsed() >= every
        {
            let at = Instant::now();
            let bytes = checkpoints
                .encode(0, task.state())
                .map_err(|e| e.to_string())?;
            let (chunks, _crc) = checkpoints.chunks(0, &bytes);
            std::hint::black_box(chunks);
            figures.checkpoint_bytes = bytes.len();
            figures.checkpoints += 1;
            figures.checkpoint_time += at.elapsed();
            last_checkpoint = Instant::now();
        }
    }
    figures.elapsed = started.elapsed();
    Ok(figures)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the SQL-versus-table comparison measures is one plan twice: the same
    /// definition, and the same results from the same stream.
    #[test]
    fn every_operator_in_sql_runs_as_its_table_form() {
        let stream = encode_stream(20_000, 10);
        for operator in Operator::ALL {
            let (table, sql) = (
                plan(operator, Form::Table).unwrap(),
                plan(operator, Form::Sql).unwrap(),
            );
            assert_eq!(table.definition, sql.definition, "{}", operator.name());
            let table = run_operator(operator, Form::Table, &stream, None).unwrap();
            let sql = run_operator(operator, Form::Sql, &stream, None).unwrap();
            assert!(table.results > 0, "{}", operator.name());
            assert_eq!(table.results, sql.results, "{}", operator.name());
        }
    }
}
