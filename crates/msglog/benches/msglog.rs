//! `cargo bench -p runnel-msglog`: messages through the log to a downstream that answers at
//! once, per mode and fsync policy. Each iteration submits bursts of 100 submissions of 10
//! messages of 100 bytes (at `Stored`, so the time covers logging and delivery) and waits
//! for every answer; the throughput is in messages.

use bytes::{BufMut, Bytes, BytesMut};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use runnel_log::FsyncPolicy;
use runnel_msglog::{
    AckLevel, Batch, DeliveryError, Destination, Downstream, LogConfig, MessageLog, Mode, Part,
    Placement, Submission,
};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

const SUBMISSIONS: usize = 100;
const MESSAGES: usize = 10;
const MESSAGE_BYTES: usize = 100;
const PARTITIONS: u32 = 4;

/// Answers every call at once with made-up offsets.
#[derive(Clone, Default)]
struct Sink(Arc<AtomicU64>);

impl Downstream for Sink {
    async fn deliver(&self, batches: Vec<Batch>) -> Result<Vec<Placement>, DeliveryError> {
        Ok(batches
            .iter()
            .map(|b| Placement::From(self.0.fetch_add(u64::from(b.count), Ordering::Relaxed)))
            .collect())
    }
}

fn body() -> Bytes {
    let mut body = BytesMut::new();
    for _ in 0..MESSAGES {
        body.put_u8(MESSAGE_BYTES as u8);
        body.put_slice(&[b'x'; MESSAGE_BYTES]);
    }
    body.freeze()
}

fn bench(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let body = body();
    let mut group = c.benchmark_group("msglog");
    group.throughput(Throughput::Elements((SUBMISSIONS * MESSAGES) as u64));
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(5));
    for mode in [Mode::None, Mode::Rbml, Mode::Sbml, Mode::Hml] {
        for fsync in [FsyncPolicy::Always, FsyncPolicy::Never] {
            if mode == Mode::None && fsync == FsyncPolicy::Always {
                continue;
            }
            let dir = tempfile::tempdir().expect("tempdir");
            let config = LogConfig {
                mode,
                fsync,
                ..LogConfig::default()
            };
            let log = runtime.block_on(async {
                MessageLog::open(config, dir.path(), Sink::default())
                    .expect("open")
                    .0
            });
            let log = Arc::new(log);
            let name = format!("{mode}/fsync-{fsync}");
            group.bench_function(&name, |b| {
                b.iter_custom(|iterations| {
                    runtime.block_on(async {
                        let started = Instant::now();
                        for i in 0..iterations {
                            let mut tickets = Vec::with_capacity(SUBMISSIONS);
                            for s in 0..SUBMISSIONS {
                                let partition = ((i as usize + s) % PARTITIONS as usize) as u32;
                                let submission = Submission {
                                    parts: vec![Part {
                                        destination: Destination {
                                            topic: Arc::from("bench"),
                                            partition,
                                        },
                                        body: body.clone(),
                                        count: MESSAGES as u32,
                                    }],
                                    level: AckLevel::Stored,
                                    trace: None,
                                };
                                tickets.push(log.submit(submission).expect("fits"));
                            }
                            for ticket in tickets {
                                ticket.wait().await.expect("stored");
                            }
                        }
                        started.elapsed()
                    })
                });
            });
            runtime.block_on(log.close(Duration::from_secs(5)));
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
