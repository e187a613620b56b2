//! The broker's errors and their one mapping to gRPC status codes.

use std::path::PathBuf;
use tonic::Status;

/// What can go wrong in the broker.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The client sent something unacceptable; the message names the field and says why.
    #[error("{0}")]
    InvalidArgument(String),
    /// The topic does not exist (and was not auto-created).
    #[error("topic {0:?} does not exist")]
    TopicNotFound(String),
    /// `CreateTopic` for a name that is taken.
    #[error("topic {0:?} already exists")]
    TopicExists(String),
    /// A read asked for an offset the partition does not hold.
    #[error(
        "offset {offset} is out of range for topic {topic:?} partition {partition}: \
         it holds offsets {start} to {end} (exclusive)"
    )]
    OffsetOutOfRange {
        /// The topic read.
        topic: String,
        /// The partition read.
        partition: u32,
        /// The offset asked for.
        offset: u64,
        /// The first offset the partition holds.
        start: u64,
        /// The offset the next record will get.
        end: u64,
    },
    /// A segment could not be read or written, or holds what it should not.
    #[error(transparent)]
    Segment(#[from] crate::storage::embedded::segment::SegmentError),
    /// An idempotent producer's batch does not follow its last one: an earlier batch was
    /// lost in flight. Storing it would leave a gap in the producer's sequence.
    #[error(
        "producer {producer_id} is out of sequence on partition {partition}: \
         expected sequence {expected}, got {found}"
    )]
    OutOfSequence {
        /// The producer.
        producer_id: u64,
        /// The partition.
        partition: u32,
        /// The sequence the partition expects next.
        expected: u64,
        /// The batch's first sequence.
        found: u64,
    },
    /// An idempotent producer resent a batch older than the ones the partition remembers:
    /// it was stored, but where is no longer known.
    #[error(
        "producer {producer_id} already stored sequence {found} on partition {partition} \
         (it is at {last}); the batch is too old to report its offsets again"
    )]
    SequenceTooOld {
        /// The producer.
        producer_id: u64,
        /// The partition.
        partition: u32,
        /// The last sequence stored.
        last: u64,
        /// The batch's first sequence.
        found: u64,
    },
    /// A commit or heartbeat from a member that is not (or no longer) in the group, or
    /// from an older generation of it.
    #[error("{0}")]
    NotAMember(String),
    /// The storage engine behind the broker (JetStream) failed or could not be reached;
    /// the call may succeed if made again.
    #[error("{0}")]
    Engine(String),
    /// The storage engine has no room for what was asked: JetStream reserves each stream's
    /// `max_bytes` against its `max_file_store` (or `max_memory_store`) when the stream is
    /// created, so a topic whose partitions together ask for more than is left is refused.
    /// Retrying does not help; the message says what would.
    #[error("{0}")]
    EngineFull(String),
    /// A file or directory operation failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// A record log or metadata file could not be opened, read or written.
    #[error("{}: {source}", path.display())]
    Log {
        /// The file involved.
        path: PathBuf,
        /// What the log layer said.
        source: runnel_log::Error,
    },
    /// A file passed its checksums but does not hold what the broker wrote there: a bug or
    /// outside interference. Found in a partition's files, it stops that partition
    /// ([`BrokerError::Damaged`]) rather than reissue offsets.
    #[error("{} is corrupt at position {position}: {reason}", path.display())]
    Corrupt {
        /// The file involved.
        path: PathBuf,
        /// Where in the file the problem is.
        position: u64,
        /// What is wrong.
        reason: String,
    },
    /// A batch could not be written (a full disk, say): nothing of it was stored, and the
    /// partition takes the next append as if it had not been tried.
    #[error(
        "topic {topic:?} partition {partition}: the batch was not stored: {reason}; retry later"
    )]
    NotWritten {
        /// The topic.
        topic: String,
        /// The partition.
        partition: u32,
        /// What went wrong, without paths.
        reason: String,
    },
    /// An append failed part-way, so the partition's file may hold records its index does
    /// not know about; it refuses further appends until a restart recovers it from disk.
    #[error(
        "topic {topic:?} partition {partition} stopped taking appends after a failed write; \
         restart the broker to recover it"
    )]
    PartitionFailed {
        /// The topic.
        topic: String,
        /// The partition.
        partition: u32,
    },
    /// A partition's files hold a frame that fails its checksum (or is not what the broker
    /// wrote there) where no crash can have torn it: the partition takes no reads and no
    /// writes, so nothing after the damage is dropped or handed out again, until an
    /// operator repairs it. The broker's other partitions go on.
    #[error(
        "topic {topic:?} partition {partition} is damaged and takes no reads or writes until an \
         operator repairs it (see \"A damaged partition\" in docs/broker.md): {detail}"
    )]
    Damaged {
        /// The topic.
        topic: String,
        /// The partition.
        partition: u32,
        /// What was found where, for the operator.
        detail: String,
    },
    /// Another process holds the data directory's lock: a broker already runs on it (or
    /// `runnel broker repair` does).
    #[error(
        "{} is in use by another broker (or by `runnel broker repair`): one process at a time",
        .0.display()
    )]
    DataDirInUse(PathBuf),
    /// A blocking disk task panicked or was cancelled.
    #[error("disk task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    /// The configuration given to [`run`](crate::run) is invalid.
    #[error(transparent)]
    Config(#[from] runnel_server::ConfigError),
    /// The gRPC or admin server failed.
    #[error(transparent)]
    Serve(#[from] runnel_server::ServeError),
}

/// The crate's result type.
pub(crate) type Result<T, E = BrokerError> = std::result::Result<T, E>;

impl BrokerError {
    /// Whether this is damage found in a partition's own files (a bad frame, a header
    /// that fails its checksum, offsets that do not run on) rather than the machine
    /// failing around them: damage stops that partition, not the broker.
    pub(crate) fn is_damage(&self) -> bool {
        use crate::storage::embedded::segment::SegmentError;
        let bad = |source: &runnel_log::Error| {
            matches!(
                source,
                runnel_log::Error::Damaged { .. }
                    | runnel_log::Error::DamagedHeader
                    | runnel_log::Error::BadFrame { .. }
                    | runnel_log::Error::BadMagic { .. }
            )
        };
        match self {
            BrokerError::Corrupt { .. } | BrokerError::Damaged { .. } => true,
            BrokerError::Segment(SegmentError::Corrupt { .. }) => true,
            BrokerError::Segment(SegmentError::Log { source, .. }) => bad(source),
            BrokerError::Log { source, .. } => bad(source),
            _ => false,
        }
    }

    /// An I/O error about `path`.
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> BrokerError {
        let path = path.into();
        move |source| BrokerError::Io { path, source }
    }

    /// A log-layer error about `path`.
    pub(crate) fn log(path: impl Into<PathBuf>) -> impl FnOnce(runnel_log::Error) -> BrokerError {
        let path = path.into();
        move |source| BrokerError::Log { path, source }
    }
}

impl From<BrokerError> for Status {
    fn from(error: BrokerError) -> Status {
        match error {
            BrokerError::InvalidArgument(message) => Status::invalid_argument(message),
            BrokerError::TopicNotFound(_) => Status::not_found(error.to_string()),
            BrokerError::TopicExists(_) => Status::already_exists(error.to_string()),
            BrokerError::OffsetOutOfRange { .. } => Status::out_of_range(error.to_string()),
            BrokerError::OutOfSequence { .. } | BrokerError::NotAMember(_) => {
                Status::failed_precondition(error.to_string())
            }
            BrokerError::SequenceTooOld { .. } => Status::already_exists(error.to_string()),
            BrokerError::EngineFull(message) => Status::resource_exhausted(message),
            BrokerError::NotWritten { .. } => Status::unavailable(error.to_string()),
            BrokerError::Damaged {
                topic, partition, ..
            } => Status::data_loss(format!(
                "topic {topic:?} partition {partition} is damaged: a stored frame fails its \
                 checksum. It takes no reads or writes until an operator repairs it; the \
                 broker's log names the file"
            )),
            BrokerError::Engine(message) => {
                tracing::warn!(%message, "storage engine unavailable");
                Status::unavailable("the storage engine is unavailable; retry")
            }
            BrokerError::Segment(_)
            | BrokerError::Io { .. }
            | BrokerError::Log { .. }
            | BrokerError::Corrupt { .. }
            | BrokerError::PartitionFailed { .. }
            | BrokerError::DataDirInUse(_)
            | BrokerError::Task(_)
            | BrokerError::Config(_)
            | BrokerError::Serve(_) => {
                // The details (paths, OS errors) are for operators, not callers.
                tracing::error!(%error, "broker failure");
                Status::internal("broker failure; see the broker's log")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn each_kind_maps_to_its_code() {
        let cases = [
            (
                BrokerError::InvalidArgument("events[0].id is empty".into()),
                Code::InvalidArgument,
            ),
            (BrokerError::TopicNotFound("t".into()), Code::NotFound),
            (BrokerError::TopicExists("t".into()), Code::AlreadyExists),
            (
                BrokerError::OffsetOutOfRange {
                    topic: "t".into(),
                    partition: 0,
                    offset: 9,
                    start: 0,
                    end: 3,
                },
                Code::OutOfRange,
            ),
            (
                BrokerError::EngineFull("no room for topic \"t\"".into()),
                Code::ResourceExhausted,
            ),
            (
                BrokerError::Damaged {
                    topic: "t".into(),
                    partition: 0,
                    detail: "/secret/path is corrupt at position 9".into(),
                },
                Code::DataLoss,
            ),
            (
                BrokerError::Io {
                    path: "/secret/path".into(),
                    source: std::io::Error::other("disk on fire"),
                },
                Code::Internal,
            ),
        ];
        for (error, code) in cases {
            let status = Status::from(error);
            assert_eq!(status.code(), code, "{status:?}");
            assert!(!status.message().contains("/secret/path"), "{status:?}");
        }
    }
}
