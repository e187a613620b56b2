//! A damaged partition as an operator meets it, over real processes: a bit flipped on disk
//! stops that partition (DATA_LOSS) while the broker serves the others; `runnel broker
//! repair` refuses to run beside the broker, says what it found, and with `--apply` cuts
//! the damage off; the restarted broker serves every record before it and takes new ones
//! after it.

use runnel_e2e::{ServiceProcess, binary_dir};
use runnel_proto::records;
use runnel_proto::v1::broker_client::BrokerClient;
use runnel_proto::v1::{Compression, Event, FetchRequest, ProduceRequest, RecordBatch};
use runnel_testkit::eventually;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use tonic::Code;

/// Twenty 1 KB events for `partition`, as one batch for it.
fn batch(partition: u32, round: usize) -> RecordBatch {
    let events: Vec<Event> = (0..20)
        .map(|i| Event {
            id: format!("p{partition}-{round}-{i}"),
            source: "e2e".into(),
            payload: vec![b'x'; 1000].into(),
            ..Event::default()
        })
        .collect();
    RecordBatch {
        partition,
        record_count: 20,
        compression: Compression::None as i32,
        records: records::encode(&events),
        ..RecordBatch::default()
    }
}

async fn produce(url: &str, partition: u32, round: usize) -> Result<(), tonic::Status> {
    let mut broker = BrokerClient::connect(url.to_owned()).await.expect("broker");
    broker
        .produce(ProduceRequest {
            topic: "t".into(),
            batches: vec![batch(partition, round)],
            ..Default::default()
        })
        .await
        .map(|_| ())
}

/// Every offset of `partition`, read from the start; the error that stopped the read, if any.
async fn offsets(url: &str, partition: u32) -> (Vec<u64>, Option<tonic::Status>) {
    let mut broker = BrokerClient::connect(url.to_owned()).await.expect("broker");
    let (mut read, mut offset) = (Vec::new(), 0);
    loop {
        let request = FetchRequest {
            topic: "t".into(),
            partition,
            offset,
            max_records: 1000,
            ..Default::default()
        };
        match broker.fetch(request).await {
            Ok(page) => {
                let page = page.into_inner();
                if page.records.is_empty() {
                    return (read, None);
                }
                read.extend(page.records.iter().map(|r| r.offset));
                offset = page.next_offset;
            }
            Err(status) => return (read, Some(status)),
        }
    }
}

fn segments(partition_dir: &Path) -> Vec<PathBuf> {
    let mut logs: Vec<PathBuf> = std::fs::read_dir(partition_dir)
        .expect("partition directory")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    logs.sort();
    logs
}

/// `runnel broker repair` on the test's data directory: its exit status and output.
fn repair(data_dir: &Path, apply: bool) -> (bool, String) {
    let mut command = Command::new(binary_dir().join("runnel"));
    command.args([
        "broker",
        "repair",
        "--topic",
        "t",
        "--partition",
        "0",
        "--data-dir",
    ]);
    command.arg(data_dir);
    if apply {
        command.arg("--apply");
    }
    let output = command.output().expect("runnel runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_partition_answers_data_loss_until_runnel_broker_repair_cuts_it_off() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data_dir = dir.path().join("broker");
    let config = dir.path().join("runnel.toml");
    std::fs::write(
        &config,
        format!(
            "[broker]\ndata_dir = \"{}\"\ndefault_partitions = 2\nsegment_bytes = 65536\n\
             [broker.server]\ngrpc = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n",
            data_dir.display()
        ),
    )
    .expect("config");
    let mut broker = ServiceProcess::start("runnel-broker", &config, &BTreeMap::new(), dir.path())
        .await
        .expect("broker starts");
    for round in 0..40 {
        for partition in 0..2 {
            produce(&broker.url(), partition, round)
                .await
                .expect("stored");
        }
    }
    broker.kill().await.expect("SIGKILL broker");
    let partition_dir = data_dir.join("topics/t/0");
    let sealed = segments(&partition_dir);
    assert!(sealed.len() > 3, "{sealed:?}");
    let mut bytes = std::fs::read(&sealed[1]).expect("segment");
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x04;
    std::fs::write(&sealed[1], bytes).expect("flip a bit");

    let broker = broker
        .restart()
        .await
        .expect("the broker starts despite the damage");
    eventually(
        Duration::from_secs(30),
        "partition 0 to answer DATA_LOSS",
        || async {
            matches!(offsets(&broker.url(), 0).await, (_, Some(s)) if s.code() == Code::DataLoss)
        },
    )
    .await;
    let status = produce(&broker.url(), 0, 99).await.unwrap_err();
    assert_eq!(status.code(), Code::DataLoss, "{status:?}");
    let (others, error) = offsets(&broker.url(), 1).await;
    assert_eq!(
        (others.len(), error.map(|s| s.code())),
        (800, None),
        "partition 1 serves on"
    );
    let (ran, text) = repair(&data_dir, true);
    assert!(
        !ran && text.contains("in use"),
        "not beside a running broker: {text}"
    );

    let mut broker = broker;
    broker.kill().await.expect("SIGKILL broker");
    let (ran, found) = repair(&data_dir, false);
    assert!(
        ran && found.contains("damage in") && found.contains("--apply"),
        "{found}"
    );
    let (ran, cut) = repair(&data_dir, true);
    assert!(ran && cut.contains("moved into"), "{cut}");

    let broker = broker.restart().await.expect("broker restarts");
    let (kept, error) = offsets(&broker.url(), 0).await;
    assert!(error.is_none(), "{error:?}\n{}", broker.log());
    let end = kept.len() as u64;
    assert!(
        end > 20 && end < 800,
        "what came before the damage: {end} records"
    );
    assert_eq!(
        kept,
        (0..end).collect::<Vec<_>>(),
        "every offset before the damage"
    );
    produce(&broker.url(), 0, 100)
        .await
        .expect("the partition takes records again");
    let (after, _) = offsets(&broker.url(), 0).await;
    assert_eq!(after.len() as u64, end + 20);
}
