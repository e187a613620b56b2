//! The result log: every result ever written, in one CRC32C-framed file, with an index in
//! memory.
//!
//! Each frame holds one protobuf-encoded [`QueryResult`]. A result is identified by
//! `(query, key, window_start)`; writing it again appends a new frame and points the index
//! at it, so the newest write wins — the analyzer relies on this to re-emit a window after a
//! crash without creating a duplicate. The index keeps, per `(query, key)`, the frame
//! position of every window (8 bytes and a tree node per result) and the latest result
//! itself, so `Get` is served from memory and `Range` reads only the frames it returns.
//!
//! Recovery replays the file into the index; a torn tail (a crash mid-write, never
//! acknowledged) is cut off by [`LogFile::open`]. A whole frame that does not decode is
//! corruption, and the store refuses to start rather than serve a partial history.
//!
//! [`ResultLog`] is synchronous and does disk I/O: call it from blocking threads only.

use crate::error::{Result, StoreError};
use prost::Message;
use runnel_log::{FsyncPolicy, LogFile};
use runnel_proto::Millis;
use runnel_proto::v1::QueryResult;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// The result log's file name inside the data directory.
pub(crate) const RESULTS_FILE: &str = "results.log";
/// The magic of result log files; the trailing digit is the content's version.
const MAGIC: [u8; 8] = *b"RNLRSLT1";

/// Longest query name, in bytes.
pub(crate) const MAX_QUERY_BYTES: usize = 256;
/// Longest key, in bytes.
pub(crate) const MAX_KEY_BYTES: usize = 1024;
/// Most named values on one result.
const MAX_VALUES: usize = 64;
/// Most headers on one result.
const MAX_HEADERS: usize = 16;
/// Longest value name, header name or header value, in bytes.
const MAX_NAME_BYTES: usize = 512;

/// `Range` answers at most this many results when the request does not say.
pub(crate) const DEFAULT_RANGE_LIMIT: usize = 1000;
/// `Range` never answers more than this many results.
pub(crate) const MAX_RANGE_LIMIT: usize = 10_000;

/// Checks a batch of results before anything is written; the error names the field.
pub(crate) fn validate(results: &[QueryResult], max_batch: usize) -> Result<()> {
    let invalid = |message: String| Err(StoreError::InvalidArgument(message));
    if results.is_empty() {
        return invalid("results: a batch needs at least one result".into());
    }
    if results.len() > max_batch {
        return invalid(format!(
            "results: {} results in one batch; the limit is {max_batch}",
            results.len()
        ));
    }
    for (i, result) in results.iter().enumerate() {
        let field = |name: &str| format!("results[{i}].{name}");
        if result.query.is_empty() || result.query.len() > MAX_QUERY_BYTES {
            return invalid(format!(
                "{} needs 1-{MAX_QUERY_BYTES} bytes",
                field("query")
            ));
        }
        if result.key.len() > MAX_KEY_BYTES {
            return invalid(format!(
                "{} is longer than {MAX_KEY_BYTES} bytes",
                field("key")
            ));
        }
        let (Some(start), Some(end)) = (result.window_start, result.window_end) else {
            return invalid(format!(
                "{} and {} are required",
                field("window_start"),
                field("window_end")
            ));
        };
        for (name, ts) in [("window_start", start), ("window_end", end)] {
            if !(0..1_000_000_000).contains(&ts.nanos) {
                return invalid(format!("{} has nanos outside [0, 1e9)", field(name)));
            }
        }
        if Millis::from(end) <= Millis::from(start) {
            return invalid(format!(
                "{} must be after {}",
                field("window_end"),
                field("window_start")
            ));
        }
        if result.values.len() > MAX_VALUES || result.headers.len() > MAX_HEADERS {
            return invalid(format!(
                "{} may have at most {MAX_VALUES} values and {MAX_HEADERS} headers",
                field("values")
            ));
        }
        let mut names = result.values.keys().chain(result.headers.keys());
        if let Some(name) = names.find(|name| name.is_empty() || name.len() > MAX_NAME_BYTES) {
            return invalid(format!(
                "{}: value and header names need 1-{MAX_NAME_BYTES} bytes, got {} bytes",
                field("values"),
                name.len()
            ));
        }
        if let Some(value) = result.headers.values().find(|v| v.len() > MAX_NAME_BYTES) {
            return invalid(format!(
                "{}: header values may have at most {MAX_NAME_BYTES} bytes, got {}",
                field("headers"),
                value.len()
            ));
        }
    }
    Ok(())
}

/// Where each window of one `(query, key)` is, and the newest one.
#[derive(Debug)]
struct Series {
    /// Window start → position of the newest frame written for that window.
    windows: BTreeMap<i64, u64>,
    /// The result with the greatest window start.
    latest: QueryResult,
}

/// The result log and its index.
#[derive(Debug)]
pub(crate) struct ResultLog {
    path: PathBuf,
    file: LogFile,
    /// Query → key → series. Nested so that lookups by `&str` need no allocation.
    series: HashMap<String, HashMap<String, Series>>,
    /// Distinct `(query, key, window_start)` results indexed.
    results: u64,
    /// Set when a write fails: the file may hold frames the index does not know about.
    failed: bool,
}

impl ResultLog {
    /// Opens (creating if needed) `dir/results.log` and rebuilds the index from it.
    pub(crate) fn open(dir: &Path, policy: FsyncPolicy) -> Result<ResultLog> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::Io {
            path: dir.to_owned(),
            source,
        })?;
        let path = dir.join(RESULTS_FILE);
        let mut decoded = Vec::new();
        let mut corruption = None;
        let (file, recovery) = LogFile::open(&path, MAGIC, policy, |position, payload| {
            if corruption.is_some() {
                return;
            }
            match QueryResult::decode(payload) {
                Ok(result) if result.window_start.is_some() => decoded.push((position, result)),
                Ok(_) => corruption = Some((position, "the result has no window start".into())),
                Err(error) => {
                    corruption = Some((position, format!("the result does not decode: {error}")))
                }
            }
        })
        .map_err(|source| StoreError::Log {
            path: path.clone(),
            source,
        })?;
        if let Some((position, reason)) = corruption {
            return Err(StoreError::Corrupt {
                path,
                position,
                reason,
            });
        }
        let mut log = ResultLog {
            path,
            file,
            series: HashMap::new(),
            results: 0,
            failed: false,
        };
        for (position, result) in decoded {
            log.index(position, result);
        }
        tracing::info!(
            path = %log.path.display(),
            results = log.results,
            frames = recovery.frames,
            cut_bytes = recovery.truncated_bytes,
            "result log recovered"
        );
        Ok(log)
    }

    fn index(&mut self, position: u64, result: QueryResult) {
        let start = result.window_start.map(Millis::from).unwrap_or_default().0;
        let by_key = self.series.entry(result.query.clone()).or_default();
        match by_key.get_mut(&result.key) {
            Some(series) => {
                if series.windows.insert(start, position).is_none() {
                    self.results += 1;
                }
                let latest = series
                    .latest
                    .window_start
                    .map(Millis::from)
                    .unwrap_or_default();
                if start >= latest.0 {
                    series.latest = result;
                }
            }
            None => {
                self.results += 1;
                by_key.insert(
                    result.key.clone(),
                    Series {
                        windows: BTreeMap::from([(start, position)]),
                        latest: result,
                    },
                );
            }
        }
    }

    /// Writes `results` with one append (and one fsync, per policy), then indexes them.
    /// They must have been validated.
    pub(crate) fn put(&mut self, results: Vec<QueryResult>) -> Result<()> {
        if self.failed {
            return Err(StoreError::Failed);
        }
        let frames: Vec<Vec<u8>> = results.iter().map(Message::encode_to_vec).collect();
        let slices: Vec<&[u8]> = frames.iter().map(Vec::as_slice).collect();
        let positions = match self.file.append(&slices) {
            Ok(positions) => positions,
            Err(source) => {
                self.failed = true;
                tracing::error!(
                    path = %self.path.display(),
                    error = %source,
                    "write failed; the store takes no more writes until a restart"
                );
                return Err(StoreError::Log {
                    path: self.path.clone(),
                    source,
                });
            }
        };
        for (position, result) in positions.into_iter().zip(results) {
            self.index(position, result);
        }
        Ok(())
    }

    /// The result with the greatest window start for `query` and `key`.
    pub(crate) fn latest(&self, query: &str, key: &str) -> Option<QueryResult> {
        Some(self.series.get(query)?.get(key)?.latest.clone())
    }

    /// Results for `query` and `key` whose window starts in `[from, to)`, oldest first, at
    /// most `limit`.
    pub(crate) fn range(
        &self,
        query: &str,
        key: &str,
        from: Option<Millis>,
        to: Option<Millis>,
        limit: usize,
    ) -> Result<Vec<QueryResult>> {
        let Some(series) = self.series.get(query).and_then(|keys| keys.get(key)) else {
            return Ok(Vec::new());
        };
        let from = from.map_or(i64::MIN, |m| m.0);
        let to = to.map_or(i64::MAX, |m| m.0);
        if from >= to {
            return Ok(Vec::new());
        }
        series
            .windows
            .range(from..to)
            .take(limit)
            .map(|(_, &position)| self.read(position))
            .collect()
    }

    fn read(&self, position: u64) -> Result<QueryResult> {
        let (payload, _) = self
            .file
            .read_at(position)
            .map_err(|source| StoreError::Log {
                path: self.path.clone(),
                source,
            })?;
        QueryResult::decode(payload.as_slice()).map_err(|error| StoreError::Corrupt {
            path: self.path.clone(),
            position,
            reason: format!("the result does not decode: {error}"),
        })
    }

    /// Distinct results and `(query, key)` series indexed.
    pub(crate) fn counts(&self) -> (u64, usize) {
        (self.results, self.series.values().map(HashMap::len).sum())
    }

    /// Forces everything written to disk.
    pub(crate) fn sync(&mut self) -> Result<()> {
        self.file.sync().map_err(|source| StoreError::Log {
            path: self.path.clone(),
            source,
        })
    }

    /// Syncs if the interval policy's time has come.
    pub(crate) fn sync_if_due(&mut self) -> Result<()> {
        self.file.sync_if_due().map_err(|source| StoreError::Log {
            path: self.path.clone(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::fs;

    fn result(query: &str, key: &str, start: i64, count: f64) -> QueryResult {
        QueryResult {
            query: query.into(),
            key: key.into(),
            window_start: Some(Millis(start).into()),
            window_end: Some(Millis(start + 10).into()),
            values: [("count".to_owned(), count)].into(),
            ..Default::default()
        }
    }

    fn open(dir: &Path) -> ResultLog {
        ResultLog::open(dir, FsyncPolicy::Never).unwrap()
    }

    fn starts(results: &[QueryResult]) -> Vec<i64> {
        results
            .iter()
            .map(|r| Millis::from(r.window_start.unwrap()).0)
            .collect()
    }

    #[test]
    fn latest_and_ranges_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = open(dir.path());
        log.put(vec![result("q", "a", 20, 1.0), result("q", "a", 0, 2.0)])
            .unwrap();
        log.put(vec![result("q", "a", 10, 3.0), result("q", "b", 0, 4.0)])
            .unwrap();
        log.put(vec![result("other", "a", 50, 5.0)]).unwrap();
        for log in [log, open(dir.path())] {
            assert_eq!(log.counts(), (5, 3));
            assert_eq!(log.latest("q", "a").unwrap(), result("q", "a", 20, 1.0));
            assert_eq!(log.latest("q", "b").unwrap(), result("q", "b", 0, 4.0));
            assert_eq!(log.latest("q", "c"), None);
            assert_eq!(log.latest("nope", "a"), None);
            let all = log.range("q", "a", None, None, 100).unwrap();
            assert_eq!(starts(&all), [0, 10, 20]);
            assert_eq!(all[1], result("q", "a", 10, 3.0));
            let bounded = log
                .range("q", "a", Some(Millis(5)), Some(Millis(20)), 100)
                .unwrap();
            assert_eq!(starts(&bounded), [10], "from is inclusive, to exclusive");
            assert_eq!(
                starts(&log.range("q", "a", None, None, 2).unwrap()),
                [0, 10]
            );
            assert!(
                log.range("q", "a", Some(Millis(20)), Some(Millis(0)), 9)
                    .unwrap()
                    .is_empty()
            );
        }
    }

    #[test]
    fn writing_a_window_again_replaces_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = open(dir.path());
        log.put(vec![result("q", "a", 0, 1.0), result("q", "a", 10, 1.0)])
            .unwrap();
        log.put(vec![result("q", "a", 0, 7.0)]).unwrap();
        log.put(vec![result("q", "a", 10, 8.0)]).unwrap();
        for log in [log, open(dir.path())] {
            assert_eq!(log.counts(), (2, 1));
            let all = log.range("q", "a", None, None, 100).unwrap();
            assert_eq!(all, [result("q", "a", 0, 7.0), result("q", "a", 10, 8.0)]);
            assert_eq!(log.latest("q", "a").unwrap(), result("q", "a", 10, 8.0));
        }
    }

    #[test]
    fn a_torn_last_write_loses_only_that_write() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = open(dir.path());
        log.put(vec![result("q", "a", 0, 1.0)]).unwrap();
        log.put(vec![result("q", "a", 10, 2.0)]).unwrap();
        drop(log);
        let path = dir.path().join(RESULTS_FILE);
        let bytes = fs::read(&path).unwrap();
        fs::write(&path, &bytes[..bytes.len() - 3]).unwrap();
        let mut log = open(dir.path());
        assert_eq!(starts(&log.range("q", "a", None, None, 9).unwrap()), [0]);
        log.put(vec![result("q", "a", 20, 3.0)]).unwrap();
        let log = open(dir.path());
        assert_eq!(
            starts(&log.range("q", "a", None, None, 9).unwrap()),
            [0, 20]
        );
    }

    #[test]
    fn a_whole_frame_that_is_not_a_result_stops_recovery() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(RESULTS_FILE);
        let (mut file, _) = LogFile::open(&path, MAGIC, FsyncPolicy::Never, |_, _| {}).unwrap();
        file.append(&[&result("q", "a", 0, 1.0).encode_to_vec(), &[0xff; 9]])
            .unwrap();
        drop(file);
        match ResultLog::open(dir.path(), FsyncPolicy::Never) {
            Err(StoreError::Corrupt { position, .. }) => assert!(position > 16),
            other => panic!("expected corruption, got {other:?}"),
        }
    }

    #[test]
    fn validation_names_the_field() {
        let error = |results: Vec<QueryResult>| match validate(&results, 3) {
            Err(StoreError::InvalidArgument(message)) => message,
            other => panic!("expected InvalidArgument, got {other:?}"),
        };
        validate(&[result("q", "k", 0, 1.0)], 3).unwrap();
        assert!(error(vec![]).starts_with("results:"));
        assert!(error(vec![result("q", "k", 0, 1.0); 4]).contains("limit is 3"));
        assert!(error(vec![result("", "k", 0, 1.0)]).starts_with("results[0].query"));
        let mut no_end = result("q", "k", 0, 1.0);
        no_end.window_end = None;
        assert!(
            error(vec![result("q", "k", 0, 1.0), no_end]).starts_with("results[1].window_start")
        );
        let mut backwards = result("q", "k", 0, 1.0);
        backwards.window_end = Some(Millis(0).into());
        assert!(error(vec![backwards]).starts_with("results[0].window_end must be after"));
        let mut unnamed = result("q", "k", 0, 1.0);
        unnamed.values.insert(String::new(), 1.0);
        assert!(error(vec![unnamed]).starts_with("results[0].values"));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        /// Whatever is written, in whatever order and with whatever rewrites, a reopen
        /// serves exactly the newest write of every window.
        #[test]
        fn the_newest_write_of_every_window_survives_a_reopen(
            writes in proptest::collection::vec((0u8..3, 0i64..6, -1e6f64..1e6), 1..40),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let mut log = open(dir.path());
            let mut expected: BTreeMap<(String, i64), f64> = BTreeMap::new();
            for chunk in writes.chunks(4) {
                let batch: Vec<QueryResult> = chunk
                    .iter()
                    .map(|&(key, window, count)| result("q", &format!("k{key}"), window * 10, count))
                    .collect();
                for &(key, window, count) in chunk {
                    expected.insert((format!("k{key}"), window * 10), count);
                }
                log.put(batch).unwrap();
            }
            drop(log);
            let log = open(dir.path());
            for key in ["k0", "k1", "k2"] {
                let found: Vec<(i64, f64)> = log
                    .range("q", key, None, None, 100)
                    .unwrap()
                    .iter()
                    .map(|r| (Millis::from(r.window_start.unwrap()).0, r.values["count"]))
                    .collect();
                let wanted: Vec<(i64, f64)> = expected
                    .iter()
                    .filter(|((k, _), _)| k == key)
                    .map(|((_, start), count)| (*start, *count))
                    .collect();
                prop_assert_eq!(&found, &wanted);
                let latest = log.latest("q", key).map(|r| r.values["count"]);
                prop_assert_eq!(latest, wanted.last().map(|(_, c)| *c));
            }
        }
    }
}
