//! Checkpoints: a query's input offsets and window state, saved together in one file that
//! is replaced whole ([`runnel_log::write_atomic`]), so that a restart resumes from a
//! consistent cut — every record before the offsets is in the state, none after.
//!
//! A checkpoint is written only after the store has acknowledged every result the state
//! no longer holds, so a crash at any moment re-reads at most what followed the last
//! checkpoint and re-emits the same windows, which the store writes over (results are
//! identified by query, key and window start). The state is JSON: small, readable in an
//! incident, and exact for floating-point sums (serde_json's `float_roundtrip`).

use crate::error::AnalyzerError;
use crate::window::WindowState;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The magic of checkpoint files; the trailing digit is the content's version.
const MAGIC: [u8; 8] = *b"RNLCKPT1";

/// What a checkpoint file holds.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Checkpoint {
    query: String,
    topic: String,
    state: WindowState,
}

/// Where query `name`'s checkpoint lives.
pub(crate) fn path(data_dir: &Path, name: &str) -> PathBuf {
    data_dir.join(format!("{name}.checkpoint"))
}

/// Blocking: reads the checkpoint at `path`, if there is one, checking that it belongs to
/// `query` over `topic`.
pub(crate) fn load(
    path: &Path,
    query: &str,
    topic: &str,
) -> Result<Option<WindowState>, AnalyzerError> {
    let fail = |reason: String| AnalyzerError::Checkpoint {
        path: path.to_owned(),
        reason,
    };
    let Some(bytes) = runnel_log::read_atomic(path, MAGIC).map_err(|e| fail(e.to_string()))? else {
        return Ok(None);
    };
    let checkpoint: Checkpoint =
        serde_json::from_slice(&bytes).map_err(|e| fail(format!("it does not parse: {e}")))?;
    if checkpoint.query != query || checkpoint.topic != topic {
        return Err(fail(format!(
            "it belongs to query {:?} over topic {:?}, not {query:?} over {topic:?}",
            checkpoint.query, checkpoint.topic
        )));
    }
    Ok(Some(checkpoint.state))
}

/// Blocking: durably replaces the checkpoint at `path`.
pub(crate) fn save(
    path: &Path,
    query: &str,
    topic: &str,
    state: WindowState,
) -> Result<(), AnalyzerError> {
    let checkpoint = Checkpoint {
        query: query.to_owned(),
        topic: topic.to_owned(),
        state,
    };
    let json = serde_json::to_vec(&checkpoint).map_err(|e| AnalyzerError::Io {
        path: path.to_owned(),
        source: std::io::Error::other(e),
    })?;
    runnel_log::write_atomic(path, MAGIC, &json).map_err(|e| AnalyzerError::Io {
        path: path.to_owned(),
        source: match e {
            runnel_log::Error::Io(io) => io,
            other => std::io::Error::other(other),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::window::{Counters, OpenWindow, PartitionState};

    fn state() -> WindowState {
        WindowState {
            window_ms: 10_000,
            partitions: vec![PartitionState {
                next_offset: 7,
                max_event_time: Some(12_345),
            }],
            watermark: Some(10_000),
            open: vec![OpenWindow {
                start: 10_000,
                key: "k".into(),
                count: 3,
                // Not representable in few digits: must survive JSON bit for bit.
                sum: 0.1 + 0.2 + 1e-17,
                min: -0.0,
                max: f64::MAX,
                traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
            }],
            counters: Counters {
                processed: 9,
                counted: 3,
                late: 1,
                skipped: 5,
                emitted: 2,
            },
        }
    }

    #[test]
    fn round_trips_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let path = path(dir.path(), "q");
        assert_eq!(load(&path, "q", "t").unwrap(), None);
        save(&path, "q", "t", state()).unwrap();
        let loaded = load(&path, "q", "t").unwrap().unwrap();
        assert_eq!(loaded, state());
        assert_eq!(loaded.open[0].sum.to_bits(), state().open[0].sum.to_bits());
    }

    #[test]
    fn someone_elses_or_a_damaged_checkpoint_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = path(dir.path(), "q");
        save(&path, "q", "t", state()).unwrap();
        let error = load(&path, "q", "other").unwrap_err().to_string();
        assert!(
            error.contains("belongs to query \"q\" over topic \"t\""),
            "{error}"
        );
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 3;
        bytes[last] ^= 0x20;
        std::fs::write(&path, &bytes).unwrap();
        let error = load(&path, "q", "t").unwrap_err().to_string();
        assert!(error.contains("move it away"), "{error}");
    }
}
