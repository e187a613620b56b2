//! When appended records are forced to disk.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// When appended records are forced to disk with `fdatasync`.
///
/// Written in configuration as `"always"`, `"never"`, or an interval such as `"10ms"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FsyncPolicy {
    /// Before every append returns: nothing acknowledged is lost in a crash.
    #[default]
    Always,
    /// At most this long after an append, by whoever calls [`LogFile::sync_if_due`]
    /// (a background task): a crash loses up to one interval of acknowledged records.
    ///
    /// [`LogFile::sync_if_due`]: crate::LogFile::sync_if_due
    Interval(Duration),
    /// Left to the operating system (tests and benchmarks).
    Never,
}

impl fmt::Display for FsyncPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FsyncPolicy::Always => f.write_str("always"),
            FsyncPolicy::Never => f.write_str("never"),
            FsyncPolicy::Interval(every) => write!(f, "{}", humantime::format_duration(*every)),
        }
    }
}

/// Why a policy does not parse.
#[derive(Debug, thiserror::Error)]
#[error("{0:?} is not an fsync policy: use \"always\", \"never\" or an interval such as \"10ms\"")]
pub struct ParsePolicyError(String);

impl FromStr for FsyncPolicy {
    type Err = ParsePolicyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "always" => Ok(FsyncPolicy::Always),
            "never" => Ok(FsyncPolicy::Never),
            other => humantime::parse_duration(other)
                .map(FsyncPolicy::Interval)
                .map_err(|_| ParsePolicyError(s.to_owned())),
        }
    }
}

impl Serialize for FsyncPolicy {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for FsyncPolicy {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_parse_and_print_back() {
        for (text, policy) in [
            ("always", FsyncPolicy::Always),
            ("never", FsyncPolicy::Never),
            ("10ms", FsyncPolicy::Interval(Duration::from_millis(10))),
            ("2s", FsyncPolicy::Interval(Duration::from_secs(2))),
        ] {
            assert_eq!(text.parse::<FsyncPolicy>().unwrap(), policy);
            assert_eq!(policy.to_string(), text);
        }
    }

    #[test]
    fn nonsense_says_what_is_accepted() {
        let error = "sometimes".parse::<FsyncPolicy>().unwrap_err().to_string();
        assert!(error.contains("\"always\""), "{error}");
    }
}
