//! Which results a live client wants: the checked form of a `WatchRequest`'s filters, shared
//! by the store (which filters its change feed) and the gateway (which filters its fan-out
//! for every protocol), so that a filter means the same thing everywhere.
//!
//! A result passes when its query matches (empty: any), its key is one of `keys` (empty:
//! any) and starts with `key_prefix`, and every value predicate holds. A predicate on a
//! value the result does not have fails: `count > 3` says nothing about a result without a
//! count.
//!
//! The text form of predicates, used by the HTTP API, is `<value><op><number>` with `op`
//! one of `<`, `<=`, `>`, `>=`, `=` (or `==`), `!=`, e.g. `count>=10`.

use crate::v1::{Comparison, QueryResult, ValuePredicate, WatchRequest};

/// Longest key or key prefix, in bytes (as the store accepts).
pub const MAX_KEY_BYTES: usize = 1024;
/// Most keys one filter may name.
pub const MAX_KEYS: usize = 1000;
/// Most value predicates in one filter.
pub const MAX_PREDICATES: usize = 16;
/// Longest value name in a predicate, in bytes.
const MAX_VALUE_NAME_BYTES: usize = 512;

/// Why a filter was refused; the message names the field.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct FilterError(pub String);

/// A checked filter.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ResultFilter {
    query: String,
    key_prefix: String,
    /// Sorted, for binary search.
    keys: Vec<String>,
    predicates: Vec<(String, Comparison, f64)>,
}

impl ResultFilter {
    /// Checks the filter part of `request` (its `after_sequence` is the caller's business).
    pub fn new(request: &WatchRequest) -> Result<ResultFilter, FilterError> {
        let bad = |message: String| Err(FilterError(message));
        if !request.query.is_empty() {
            crate::names::validate_query_name(&request.query)
                .map_err(|error| FilterError(error.to_string()))?;
        }
        if request.key_prefix.len() > MAX_KEY_BYTES {
            return bad(format!("key_prefix may have at most {MAX_KEY_BYTES} bytes"));
        }
        if request.keys.len() > MAX_KEYS {
            return bad(format!(
                "keys: at most {MAX_KEYS} keys, got {}",
                request.keys.len()
            ));
        }
        if let Some(i) = request.keys.iter().position(|k| k.len() > MAX_KEY_BYTES) {
            return bad(format!("keys[{i}] is longer than {MAX_KEY_BYTES} bytes"));
        }
        if request.predicates.len() > MAX_PREDICATES {
            return bad(format!(
                "predicates: at most {MAX_PREDICATES}, got {}",
                request.predicates.len()
            ));
        }
        let mut predicates = Vec::with_capacity(request.predicates.len());
        for (i, p) in request.predicates.iter().enumerate() {
            if p.value.is_empty() || p.value.len() > MAX_VALUE_NAME_BYTES {
                return bad(format!(
                    "predicates[{i}].value needs 1-{MAX_VALUE_NAME_BYTES} bytes"
                ));
            }
            let op = match Comparison::try_from(p.op) {
                Ok(Comparison::Unspecified) | Err(_) => {
                    return bad(format!(
                        "predicates[{i}].op must be one of LT, LE, GT, GE, EQ, NE"
                    ));
                }
                Ok(op) => op,
            };
            if p.operand.is_nan() {
                return bad(format!("predicates[{i}].operand is not a number"));
            }
            predicates.push((p.value.clone(), op, p.operand));
        }
        let mut keys = request.keys.clone();
        keys.sort_unstable();
        keys.dedup();
        Ok(ResultFilter {
            query: request.query.clone(),
            key_prefix: request.key_prefix.clone(),
            keys,
            predicates,
        })
    }

    /// Whether `result` passes.
    pub fn matches(&self, result: &QueryResult) -> bool {
        (self.query.is_empty() || self.query == result.query)
            && result.key.starts_with(&self.key_prefix)
            && (self.keys.is_empty() || self.keys.binary_search(&result.key).is_ok())
            && self.predicates.iter().all(|(name, op, operand)| {
                result
                    .values
                    .get(name)
                    .is_some_and(|&value| holds(value, *op, *operand))
            })
    }
}

fn holds(value: f64, op: Comparison, operand: f64) -> bool {
    match op {
        Comparison::Lt => value < operand,
        Comparison::Le => value <= operand,
        Comparison::Gt => value > operand,
        Comparison::Ge => value >= operand,
        Comparison::Eq => value == operand,
        Comparison::Ne => value != operand,
        Comparison::Unspecified => false,
    }
}

/// Parses the text form `count>=10` into a predicate.
pub fn parse_predicate(text: &str) -> Result<ValuePredicate, FilterError> {
    // Two-character operators first, so that `<=` is not read as `<` and `=…`.
    const OPS: [(&str, Comparison); 7] = [
        ("<=", Comparison::Le),
        (">=", Comparison::Ge),
        ("!=", Comparison::Ne),
        ("==", Comparison::Eq),
        ("<", Comparison::Lt),
        (">", Comparison::Gt),
        ("=", Comparison::Eq),
    ];
    let found = OPS
        .iter()
        .filter_map(|(symbol, op)| text.find(symbol).map(|at| (at, *symbol, *op)))
        .min_by_key(|(at, symbol, _)| (*at, std::cmp::Reverse(symbol.len())));
    let Some((at, symbol, op)) = found else {
        return Err(FilterError(format!(
            "where: {text:?} needs an operator: <, <=, >, >=, =, != (e.g. count>=10)"
        )));
    };
    let name = text[..at].trim();
    let number = text[at + symbol.len()..].trim();
    let operand: f64 = number
        .parse()
        .map_err(|_| FilterError(format!("where: {number:?} in {text:?} is not a number")))?;
    if name.is_empty() {
        return Err(FilterError(format!("where: {text:?} names no value")));
    }
    Ok(ValuePredicate {
        value: name.to_owned(),
        op: op as i32,
        operand,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn result(query: &str, key: &str, count: f64) -> QueryResult {
        QueryResult {
            query: query.into(),
            key: key.into(),
            values: [("count".to_owned(), count)].into(),
            ..Default::default()
        }
    }

    fn filter(query: &str, prefix: &str, keys: &[&str], predicates: &[&str]) -> ResultFilter {
        ResultFilter::new(&WatchRequest {
            query: query.into(),
            key_prefix: prefix.into(),
            keys: keys.iter().map(|k| (*k).to_owned()).collect(),
            predicates: predicates
                .iter()
                .map(|p| parse_predicate(p).unwrap())
                .collect(),
            after_sequence: None,
        })
        .unwrap()
    }

    #[test]
    fn every_part_of_a_filter_must_pass() {
        assert!(filter("", "", &[], &[]).matches(&result("q", "k", 1.0)));
        assert!(!filter("q", "", &[], &[]).matches(&result("q2", "k", 1.0)));
        assert!(filter("q", "sensor-", &[], &[]).matches(&result("q", "sensor-1", 1.0)));
        assert!(!filter("q", "sensor-", &[], &[]).matches(&result("q", "sensor", 1.0)));
        let keyed = filter("", "", &["b", "a"], &[]);
        assert!(keyed.matches(&result("q", "a", 1.0)));
        assert!(!keyed.matches(&result("q", "c", 1.0)));
        let both = filter("", "s", &["s1", "t1"], &[]);
        assert!(both.matches(&result("q", "s1", 1.0)));
        assert!(!both.matches(&result("q", "t1", 1.0)));
        let counted = filter("", "", &[], &["count>=3", "count!=5"]);
        assert!(counted.matches(&result("q", "k", 3.0)));
        assert!(!counted.matches(&result("q", "k", 2.0)));
        assert!(!counted.matches(&result("q", "k", 5.0)));
        let missing = filter("", "", &[], &["avg<1"]);
        assert!(!missing.matches(&result("q", "k", 0.0)), "no avg, no pass");
    }

    #[test]
    fn predicates_parse_from_text() {
        let p = parse_predicate("count>=10").unwrap();
        assert_eq!(
            (p.value.as_str(), p.op, p.operand),
            ("count", Comparison::Ge as i32, 10.0)
        );
        assert_eq!(
            parse_predicate("avg <= -1.5").unwrap().op,
            Comparison::Le as i32
        );
        assert_eq!(parse_predicate("x==2").unwrap().op, Comparison::Eq as i32);
        assert_eq!(parse_predicate("x=2").unwrap().op, Comparison::Eq as i32);
        assert_eq!(parse_predicate("x!=2").unwrap().op, Comparison::Ne as i32);
        assert_eq!(parse_predicate("x<2").unwrap().op, Comparison::Lt as i32);
        assert!(parse_predicate("count").unwrap_err().0.contains("operator"));
        assert!(
            parse_predicate("count>ten")
                .unwrap_err()
                .0
                .contains("not a number")
        );
        assert!(
            parse_predicate(">3")
                .unwrap_err()
                .0
                .contains("names no value")
        );
    }

    #[test]
    fn bad_filters_name_the_field() {
        let error = |request: WatchRequest| ResultFilter::new(&request).unwrap_err().0;
        assert!(
            error(WatchRequest {
                query: "q".repeat(crate::names::MAX_QUERY_LEN + 1),
                ..Default::default()
            })
            .starts_with("query")
        );
        assert!(
            error(WatchRequest {
                keys: vec!["k".repeat(MAX_KEY_BYTES + 1)],
                ..Default::default()
            })
            .starts_with("keys[0]")
        );
        assert!(
            error(WatchRequest {
                predicates: vec![ValuePredicate {
                    value: "count".into(),
                    op: 0,
                    operand: 1.0
                }],
                ..Default::default()
            })
            .starts_with("predicates[0].op")
        );
        assert!(
            error(WatchRequest {
                predicates: vec![ValuePredicate {
                    value: "count".into(),
                    op: Comparison::Gt as i32,
                    operand: f64::NAN
                }],
                ..Default::default()
            })
            .starts_with("predicates[0].operand")
        );
    }

    proptest! {
        /// A parsed predicate holds exactly when the comparison it spells out holds.
        #[test]
        fn parsed_predicates_agree_with_the_comparison(
            value in -1e6f64..1e6,
            operand in -1e6f64..1e6,
            which in 0usize..6,
        ) {
            let (symbol, expected) = [
                ("<", value < operand),
                ("<=", value <= operand),
                (">", value > operand),
                (">=", value >= operand),
                ("=", value == operand),
                ("!=", value != operand),
            ][which];
            let text = format!("count{symbol}{operand}");
            let f = ResultFilter::new(&WatchRequest {
                predicates: vec![parse_predicate(&text).unwrap()],
                ..Default::default()
            }).unwrap();
            prop_assert_eq!(f.matches(&result("q", "k", value)), expected);
        }
    }
}
