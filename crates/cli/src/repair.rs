//! `runnel broker repair`: finds the damage that stopped a partition of an embedded broker
//! and, with `--apply`, cuts it off, keeping what was cut (see
//! [`runnel_broker::repair`] and "A damaged partition" in docs/broker.md).

use std::path::PathBuf;
use std::process::ExitCode;

/// What `runnel broker` can do besides running one.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum BrokerCommand {
    /// Find the damage in a partition of a stopped broker and, with --apply, cut it off:
    /// every record before it is kept, everything from it on is moved into a
    /// `damaged-<time>` directory beside the segments, and new records take those offsets.
    Repair(RepairArgs),
}

#[derive(Debug, clap::Args)]
pub(crate) struct RepairArgs {
    /// The broker's data directory (`broker.data_dir`).
    #[arg(long, default_value = "runnel-data/broker")]
    data_dir: PathBuf,
    /// The topic of the damaged partition.
    #[arg(long)]
    topic: String,
    /// The damaged partition.
    #[arg(long)]
    partition: u32,
    /// Cut the damage off; without it, only say what was found and what would be cut.
    #[arg(long)]
    apply: bool,
}

pub(crate) fn run(command: BrokerCommand) -> anyhow::Result<ExitCode> {
    let BrokerCommand::Repair(args) = command;
    let (data_dir, topic, partition) = (args.data_dir, args.topic, args.partition);
    let repair = runnel_broker::repair(&data_dir, &topic, partition, args.apply)?;
    let dir = repair.partition_dir.display();
    let Some(damage) = repair.damage else {
        println!("no damage found in {dir}: every frame checks out");
        return Ok(ExitCode::SUCCESS);
    };
    println!(
        "damage in {} at byte {}: {}",
        damage.segment.display(),
        damage.position,
        damage.reason
    );
    println!(
        "records from offset {} on are beyond it: the rest of that segment and {} later file(s), {} bytes",
        damage.first_lost_offset,
        damage.later_files.len(),
        damage.bytes
    );
    match repair.moved_to {
        Some(aside) => {
            println!(
                "cut: moved into {}; the partition now ends at offset {}, and new records take \
                 the offsets from there — reset consumers that had read past it",
                aside.display(),
                damage.first_lost_offset
            );
        }
        None => println!("nothing changed; run again with --apply to cut it off"),
    }
    Ok(ExitCode::SUCCESS)
}
