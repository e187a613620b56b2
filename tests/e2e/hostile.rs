//! Hostile input against the running pipeline: while a well-behaved client ingests, other
//! clients throw malformed protobuf, invalid UTF-8, oversized batches and messages, bad
//! pre-encoded record batches and plain garbage at the collector, the broker, the
//! gateway's HTTP API and an admin port. Every bad call is refused with an error, no
//! service falls over, and every event the good client was told was accepted is in the
//! broker — and nothing the bad ones sent.
//!
//! (The collector's UDP listener is not on this branch; garbage datagrams are for the
//! test that comes with it.)

use crate::{ANALYZER_TOML, event};
use bytes::{Buf, BufMut};
use rand::{Rng, SeedableRng};
use runnel_e2e::Pipeline;
use runnel_proto::v1::broker_client::BrokerClient;
use runnel_proto::v1::collector_client::CollectorClient;
use runnel_proto::v1::{Compression, Event, IngestRequest, ProduceRequest, RecordBatch};
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::Channel;

/// A codec that sends bytes exactly as given: how a client sends what no encoder would.
#[derive(Debug, Clone, Copy, Default)]
struct Raw;

impl Codec for Raw {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = Raw;
    type Decoder = Raw;

    fn encoder(&mut self) -> Raw {
        Raw
    }

    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl Encoder for Raw {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        Ok(Some(src.copy_to_bytes(src.remaining()).to_vec()))
    }
}

/// Calls `path` with `body` as the request message, verbatim.
async fn raw_call(
    channel: Channel,
    path: &'static str,
    body: Vec<u8>,
) -> Result<(), tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    grpc.unary(
        tonic::Request::new(body),
        http::uri::PathAndQuery::from_static(path),
        Raw,
    )
    .await
    .map(|_| ())
}

/// Protobuf field `number` with wire type LEN holding `bytes`.
fn len_field(number: u32, bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    prost::encoding::encode_key(number, prost::encoding::WireType::LengthDelimited, &mut out);
    prost::encoding::encode_varint(bytes.len() as u64, &mut out);
    out.extend_from_slice(bytes);
    out
}

/// Opens a TCP connection to `addr`, writes `garbage`, and waits (bounded) for the server
/// to hang up; a server that keeps the connection is fine too, as long as it serves on.
async fn throw_garbage(addr: SocketAddr, garbage: &[u8]) {
    let Ok(mut stream) = tokio::net::TcpStream::connect(addr).await else {
        return;
    };
    let _ = stream.write_all(garbage).await;
    let mut sink = vec![0u8; 4096];
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
    })
    .await;
}

/// Everything bad, once; returns how many bad calls were answered with an error.
async fn attack(pipeline: &Pipeline, rng: &mut rand::rngs::StdRng) -> usize {
    let collector = tonic::transport::Endpoint::from_shared(pipeline.collector.url())
        .unwrap()
        .connect_lazy();
    let broker = tonic::transport::Endpoint::from_shared(pipeline.broker.url())
        .unwrap()
        .connect_lazy();
    let mut refused = 0;
    let mut expect_refused = |outcome: Result<(), tonic::Status>, what: &str| match outcome {
        Err(status) if status.code() != Code::Ok => refused += 1,
        other => panic!("{what} was accepted: {other:?}"),
    };

    // Random bytes as an IngestRequest and a ProduceRequest.
    for _ in 0..20 {
        let len = rng.random_range(1..2048);
        let body: Vec<u8> = (0..len).map(|_| rng.random()).collect();
        // Random bytes may happen to decode as an empty batch; that is refused too.
        expect_refused(
            raw_call(
                collector.clone(),
                "/runnel.v1.Collector/Ingest",
                body.clone(),
            )
            .await,
            "random bytes to Ingest",
        );
        expect_refused(
            raw_call(broker.clone(), "/runnel.v1.Broker/Produce", body).await,
            "random bytes to Produce",
        );
    }

    // An event whose id is not UTF-8: protobuf strings must be.
    let bad_event = len_field(1, &[0xff, 0xfe, b'x']);
    let bad_utf8 = len_field(1, &bad_event);
    expect_refused(
        raw_call(
            collector.clone(),
            "/runnel.v1.Collector/Ingest",
            bad_utf8.clone(),
        )
        .await,
        "invalid UTF-8 to Ingest",
    );
    let mut produce = len_field(1, b"events");
    produce.extend_from_slice(&len_field(2, &bad_event));
    expect_refused(
        raw_call(broker.clone(), "/runnel.v1.Broker/Produce", produce).await,
        "invalid UTF-8 to Produce",
    );

    // A length prefix that claims more than the message holds.
    expect_refused(
        raw_call(
            collector.clone(),
            "/runnel.v1.Collector/Ingest",
            vec![0x0a, 0xff, 0xff, 0xff, 0x0f, 1, 2, 3],
        )
        .await,
        "a truncated field",
    );

    // Too many events in one batch, and one message over the size limit.
    let mut client = CollectorClient::new(collector.clone());
    let too_many: Vec<Event> = (0..10_001)
        .map(|i| event(&format!("evil-many-{i}"), "evil", 1, Some(1.0)))
        .collect();
    let status = client
        .ingest(IngestRequest {
            events: too_many,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    refused += 1;
    let mut huge = event("evil-huge", "evil", 1, None);
    huge.payload = vec![b'x'; 5 * 1024 * 1024].into();
    let status = client
        .ingest(IngestRequest {
            events: vec![huge],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(
        matches!(
            status.code(),
            Code::ResourceExhausted | Code::InvalidArgument
        ),
        "{status:?}"
    );
    refused += 1;

    // Pre-encoded batches that lie: garbage records, a wrong count, unknown compression.
    let mut broker_client = BrokerClient::new(broker.clone());
    let garbage: Vec<u8> = (0..512).map(|_| rng.random()).collect();
    let good_records = runnel_proto::records::encode(&[event("evil-batch", "evil", 1, None)]);
    for batch in [
        RecordBatch {
            partition: 0,
            record_count: 3,
            records: garbage.into(),
            ..Default::default()
        },
        RecordBatch {
            partition: 0,
            record_count: 2,
            records: good_records.clone(),
            ..Default::default()
        },
        RecordBatch {
            partition: 0,
            record_count: 1,
            compression: Compression::Lz4 as i32,
            records: good_records.clone(),
            ..Default::default()
        },
        RecordBatch {
            partition: 0,
            record_count: 1,
            compression: 77,
            records: good_records,
            ..Default::default()
        },
    ] {
        let status = broker_client
            .produce(ProduceRequest {
                topic: "events".into(),
                batches: vec![batch],
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        refused += 1;
    }

    // Plain garbage to every kind of port, and an HTTP/2 preface followed by garbage.
    let http = pipeline.gateway.http.expect("gateway http");
    let mut preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    preface.extend((0..1024).map(|_| rng.random::<u8>()));
    let noise: Vec<u8> = (0..4096).map(|_| rng.random()).collect();
    for addr in [
        pipeline.collector.grpc,
        pipeline.broker.grpc,
        http,
        pipeline.store.admin,
    ] {
        throw_garbage(addr, &noise).await;
        throw_garbage(addr, &preface).await;
    }
    // HTTP requests that are not quite: invalid UTF-8 in the path, absurd headers.
    let requests: [&[u8]; 3] = [
        b"GET /v1/results/%ff%fe/k HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        b"GET /v1/results/q/k/range?from=%ff&limit=-1 HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        b"GET / HTTP/1.1\r\nhost: x\r\ncontent-length: 99999999999999999999\r\n\r\n",
    ];
    for request in requests {
        let mut stream = tokio::net::TcpStream::connect(http).await.unwrap();
        stream.write_all(request).await.unwrap();
        let mut answer = Vec::new();
        let _ =
            tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await;
        let head = String::from_utf8_lossy(&answer);
        assert!(
            head.starts_with("HTTP/1.1 4"),
            "{:?} got {head:?}",
            String::from_utf8_lossy(request)
        );
        refused += 1;
    }
    refused
}

#[tokio::test]
async fn hostile_clients_do_not_disturb_a_well_behaved_one() {
    let pipeline = Pipeline::start(ANALYZER_TOML, BTreeMap::new())
        .await
        .expect("pipeline");

    let url = pipeline.collector.url();
    let good = tokio::spawn(async move {
        let channel = runnel_client::connect_lazy(&url, &Default::default()).expect("url");
        let mut client = CollectorClient::new(channel);
        let mut accepted = BTreeSet::new();
        for batch in 0..60 {
            let events: Vec<Event> = (0..20)
                .map(|i| {
                    let id = format!("good-{batch}-{i}");
                    event(
                        &id,
                        &format!("sensor-{i}"),
                        crate::T0 + i64::from(batch),
                        Some(1.0),
                    )
                })
                .collect();
            let ids: Vec<String> = events.iter().map(|e| e.id.clone()).collect();
            let response = client
                .ingest(IngestRequest {
                    events,
                    ..Default::default()
                })
                .await
                .unwrap_or_else(|status| panic!("a good batch was refused: {status:?}"));
            assert_eq!(response.into_inner().receipts.len(), ids.len());
            accepted.extend(ids);
        }
        accepted
    });

    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
    let mut refused = 0;
    for _ in 0..3 {
        refused += attack(&pipeline, &mut rng).await;
    }
    let accepted = tokio::time::timeout(Duration::from_secs(120), good)
        .await
        .expect("the good client finishes")
        .expect("the good client's task");
    assert_eq!(accepted.len(), 60 * 20);
    assert!(refused > 100, "{refused}");

    // Everyone is still up and serving.
    for service in [
        &pipeline.collector,
        &pipeline.broker,
        &pipeline.analyzer,
        &pipeline.store,
        &pipeline.gateway,
    ] {
        let channel = runnel_client::connect(&service.url(), &Default::default(), None)
            .await
            .unwrap_or_else(|e| panic!("{} unreachable: {e}\n{}", service.name, pipeline.logs()));
        tonic_health::pb::health_client::HealthClient::new(channel)
            .check(tonic_health::pb::HealthCheckRequest::default())
            .await
            .unwrap_or_else(|e| panic!("{} unhealthy: {e}\n{}", service.name, pipeline.logs()));
    }

    // Nothing accepted is lost, and nothing refused got in.
    let stored: BTreeSet<String> = crate::pipeline::stored_ids(&pipeline)
        .await
        .into_iter()
        .collect();
    let missing: Vec<&String> = accepted.difference(&stored).collect();
    assert!(
        missing.is_empty(),
        "lost {} accepted events: {missing:?}",
        missing.len()
    );
    let intruders: Vec<&String> = stored.iter().filter(|id| id.starts_with("evil")).collect();
    assert!(
        intruders.is_empty(),
        "refused events were stored: {intruders:?}"
    );
}
