//! Checks on what clients send, before anything is written; every message names the field.

use crate::error::{Result, StoreError};
use runnel_proto::Millis;
use runnel_proto::v1::QueryResult;

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
        if let Err(error) = runnel_proto::names::validate_query_name(&result.query) {
            return invalid(format!("{}: {error}", field("query")));
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
