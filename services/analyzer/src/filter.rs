//! Predicates: which events a query takes (`filter`), and which results it emits
//! (`having`, over the result's values).
//!
//! A predicate names a `field` and one test, or combines predicates with `any` (one of
//! them holds) or `not`; a list of predicates holds when all of them do. A field with
//! several values (`payload.tags[]`) passes a test when any value does — except `ne`,
//! which holds when no value is equal. A missing field fails every test but `ne` and
//! `exists = false`.
//!
//! ```toml
//! filter = [
//!   { field = "type", in = ["click", "cart", "purchase"] },
//!   { field = "payload.amount", gt = 0 },
//!   { any = [{ field = "attributes.country", eq = "nl" }, { field = "attributes.vip", exists = true }] },
//! ]
//! ```

use crate::event::EventView;
use crate::path::{FieldRef, Scalar};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fmt;

/// A literal in a predicate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Literal {
    /// `true` or `false`.
    Bool(bool),
    /// A number; equal to text that parses as the same number.
    Number(f64),
    /// Text.
    Text(String),
}

/// One predicate as configured.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Predicate {
    /// The field tested (see the query docs for field names; in `having`, a result
    /// value's name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// Equal to this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eq: Option<Literal>,
    /// Not equal to this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ne: Option<Literal>,
    /// Equal to one of these.
    #[serde(default, rename = "in", skip_serializing_if = "Option::is_none")]
    pub one_of: Option<Vec<Literal>>,
    /// A number greater than this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gt: Option<f64>,
    /// A number at least this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ge: Option<f64>,
    /// A number less than this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lt: Option<f64>,
    /// A number at most this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub le: Option<f64>,
    /// Text starting with this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// The field is there (`true`) or not (`false`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exists: Option<bool>,
    /// At least one of these holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub any: Option<Vec<Predicate>>,
    /// This does not hold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not: Option<Box<Predicate>>,
}

impl fmt::Display for Literal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Literal::Bool(b) => write!(f, "{b}"),
            Literal::Number(n) => write!(f, "{n}"),
            Literal::Text(t) => write!(f, "{t:?}"),
        }
    }
}

impl Predicate {
    /// The condition in words, as `DescribeQuery` shows it: `type = "click"`,
    /// `(max > 120 or min < 40)`, `not (source starts with "test-")`.
    pub(crate) fn in_words(&self) -> String {
        let field = self.field.as_deref().unwrap_or("?");
        let list = |items: &[Literal]| {
            items
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut tests: Vec<String> = Vec::new();
        if let Some(v) = &self.eq {
            tests.push(format!("{field} = {v}"));
        }
        if let Some(v) = &self.ne {
            tests.push(format!("{field} <> {v}"));
        }
        if let Some(v) = &self.one_of {
            tests.push(format!("{field} in ({})", list(v)));
        }
        for (op, bound) in [
            (">", self.gt),
            (">=", self.ge),
            ("<", self.lt),
            ("<=", self.le),
        ] {
            if let Some(bound) = bound {
                tests.push(format!("{field} {op} {bound}"));
            }
        }
        if let Some(prefix) = &self.prefix {
            tests.push(format!("{field} starts with {prefix:?}"));
        }
        if let Some(exists) = self.exists {
            tests.push(format!(
                "{field} is {}",
                if exists { "present" } else { "absent" }
            ));
        }
        if let Some(any) = &self.any {
            let any: Vec<String> = any.iter().map(Predicate::in_words).collect();
            tests.push(format!("({})", any.join(" or ")));
        }
        if let Some(not) = &self.not {
            tests.push(format!("not ({})", not.in_words()));
        }
        tests.join(" and ")
    }
}

/// What a predicate compares.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Test {
    Eq(Literal),
    Ne(Literal),
    In(Vec<Literal>),
    Gt(f64),
    Ge(f64),
    Lt(f64),
    Le(f64),
    Prefix(String),
    Exists(bool),
}

/// A checked predicate over fields of type `F`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Condition<F> {
    Test(F, Test),
    Any(Vec<Condition<F>>),
    Not(Box<Condition<F>>),
}

/// A query's `filter`: conditions over event fields, all of which must hold.
pub(crate) type EventFilter = Vec<Condition<FieldRef>>;
/// A query's `having`: conditions over result values, all of which must hold.
pub(crate) type ResultFilter = Vec<Condition<String>>;

impl Predicate {
    /// Checks the predicate; `key` names it in errors (`queries[0].filter[1]`), `field`
    /// parses its field names.
    pub(crate) fn compile<F>(
        &self,
        key: &str,
        field: &impl Fn(&str) -> Result<F, String>,
    ) -> Result<Condition<F>, (String, String)> {
        let mut tests = Vec::new();
        let mut combinators = 0;
        if let Some(any) = &self.any {
            combinators += 1;
            if any.is_empty() {
                return Err((format!("{key}.any"), "needs at least one predicate".into()));
            }
            let list = any
                .iter()
                .enumerate()
                .map(|(i, p)| p.compile(&format!("{key}.any[{i}]"), field))
                .collect::<Result<_, _>>()?;
            tests.push(Condition::Any(list));
        }
        if let Some(not) = &self.not {
            combinators += 1;
            tests.push(Condition::Not(Box::new(
                not.compile(&format!("{key}.not"), field)?,
            )));
        }
        let mut operators: Vec<(&str, Test)> = Vec::new();
        let mut push = |name, test: Option<Test>| {
            if let Some(test) = test {
                operators.push((name, test));
            }
        };
        push("eq", self.eq.clone().map(Test::Eq));
        push("ne", self.ne.clone().map(Test::Ne));
        push("in", self.one_of.clone().map(Test::In));
        push("gt", self.gt.map(Test::Gt));
        push("ge", self.ge.map(Test::Ge));
        push("lt", self.lt.map(Test::Lt));
        push("le", self.le.map(Test::Le));
        push("prefix", self.prefix.clone().map(Test::Prefix));
        push("exists", self.exists.map(Test::Exists));
        match (&self.field, operators.len(), combinators) {
            (None, 0, 1) => Ok(tests.remove(0)),
            (Some(name), 1, 0) => {
                let (op, test) = operators.remove(0);
                if let Test::Gt(n) | Test::Ge(n) | Test::Lt(n) | Test::Le(n) = test
                    && !n.is_finite()
                {
                    return Err((format!("{key}.{op}"), "must be a finite number".into()));
                }
                if let Test::In(list) = &test
                    && list.is_empty()
                {
                    return Err((format!("{key}.in"), "needs at least one value".into()));
                }
                let parsed = field(name).map_err(|why| (format!("{key}.field"), why))?;
                Ok(Condition::Test(parsed, test))
            }
            (Some(_), 0, 0) => Err((
                key.to_owned(),
                "a field needs one test: eq, ne, in, gt, ge, lt, le, prefix or exists".into(),
            )),
            (None, 0, 0) => Err((
                key.to_owned(),
                "needs a field and a test, or any/not".into(),
            )),
            (None, _, 0) => Err((format!("{key}.field"), "the test needs a field".into())),
            _ => Err((
                key.to_owned(),
                "use exactly one of: a field with one test, any, not".into(),
            )),
        }
    }
}

fn literal_matches(literal: &Literal, value: &Scalar<'_>) -> bool {
    match (literal, value) {
        (Literal::Bool(a), Scalar::Bool(b)) => a == b,
        (Literal::Number(a), value) => value.number() == Some(*a),
        (Literal::Text(a), Scalar::Text(b)) => a == b.as_ref(),
        (Literal::Text(a), Scalar::Num(_)) => *a == value.text(),
        _ => false,
    }
}

impl Test {
    /// Whether the values of the field (none if it is missing) pass.
    fn passes<'a>(&self, mut values: impl Iterator<Item = Scalar<'a>>) -> bool {
        match self {
            Test::Eq(l) => values.any(|v| literal_matches(l, &v)),
            Test::Ne(l) => !values.any(|v| literal_matches(l, &v)),
            Test::In(list) => values.any(|v| list.iter().any(|l| literal_matches(l, &v))),
            Test::Gt(n) => values.any(|v| v.number().is_some_and(|x| x > *n)),
            Test::Ge(n) => values.any(|v| v.number().is_some_and(|x| x >= *n)),
            Test::Lt(n) => values.any(|v| v.number().is_some_and(|x| x < *n)),
            Test::Le(n) => values.any(|v| v.number().is_some_and(|x| x <= *n)),
            Test::Prefix(p) => {
                values.any(|v| matches!(&v, Scalar::Text(t) if t.starts_with(p.as_str())))
            }
            Test::Exists(wanted) => values.next().is_some() == *wanted,
        }
    }
}

impl Condition<FieldRef> {
    /// Whether `event` satisfies the condition.
    pub(crate) fn holds(&self, event: &EventView<'_>) -> bool {
        match self {
            Condition::Test(field, test) => {
                if field.is_multi() {
                    let mut values = Vec::new();
                    field.each(event, |v| values.push(v));
                    test.passes(values.into_iter())
                } else {
                    test.passes(field.first(event).into_iter())
                }
            }
            Condition::Any(list) => list.iter().any(|c| c.holds(event)),
            Condition::Not(inner) => !inner.holds(event),
        }
    }
}

impl Condition<String> {
    /// Whether a result with `values` satisfies the condition.
    pub(crate) fn holds_for(&self, values: &HashMap<String, f64>) -> bool {
        match self {
            Condition::Test(name, test) => {
                test.passes(values.get(name).map(|v| Scalar::Num(*v)).into_iter())
            }
            Condition::Any(list) => list.iter().any(|c| c.holds_for(values)),
            Condition::Not(inner) => !inner.holds_for(values),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;
    use runnel_proto::v1::Event;

    fn compile(toml_text: &str) -> Result<Condition<FieldRef>, (String, String)> {
        let p: Predicate = toml::from_str(toml_text).expect("toml");
        p.compile("filter[0]", &|name: &str| FieldRef::parse(name))
    }

    fn holds(condition: &Condition<FieldRef>, event: &Event) -> bool {
        let bytes = event.encode_to_vec();
        condition.holds(&EventView::parse(&bytes).unwrap())
    }

    fn event(kind: &str, payload: &str) -> Event {
        Event {
            r#type: kind.into(),
            payload: payload.as_bytes().to_vec().into(),
            attributes: [("n".to_owned(), "12".to_owned())].into(),
            ..Default::default()
        }
    }

    #[test]
    fn tests_compare_as_documented() {
        let cart = event("cart", r#"{"amount": 30, "tags": ["a", "b"], "ok": true}"#);
        let view = event("view", r#"{"amount": 5}"#);
        let cases = [
            (
                r#"field = "type"
in = ["click", "cart", "purchase"]"#,
                true,
                false,
            ),
            ("field = \"payload.amount\"\ngt = 10", true, false),
            ("field = \"payload.amount\"\nle = 5", false, true),
            ("field = \"attributes.n\"\neq = 12", true, true),
            ("field = \"payload.tags[]\"\neq = \"b\"", true, false),
            ("field = \"payload.tags[]\"\nne = \"b\"", false, true),
            ("field = \"payload.ok\"\neq = true", true, false),
            ("field = \"payload.tags\"\nexists = false", true, true),
            ("field = \"payload.tags[]\"\nexists = true", true, false),
            ("field = \"type\"\nprefix = \"ca\"", true, false),
            ("not = { field = \"type\", eq = \"cart\" }", false, true),
            (
                "any = [{ field = \"type\", eq = \"x\" }, { field = \"payload.amount\", lt = 6 }]",
                false,
                true,
            ),
        ];
        for (text, on_cart, on_view) in cases {
            let condition = compile(text).unwrap();
            assert_eq!(holds(&condition, &cart), on_cart, "{text} on cart");
            assert_eq!(holds(&condition, &view), on_view, "{text} on view");
        }
    }

    #[test]
    fn malformed_predicates_name_what_is_wrong() {
        let cases = [
            ("field = \"type\"", "filter[0]"),
            ("eq = 1", "filter[0].field"),
            ("field = \"type\"\neq = 1\nne = 2", "filter[0]"),
            ("field = \"body\"\neq = 1", "filter[0].field"),
            ("field = \"type\"\nin = []", "filter[0].in"),
            ("any = []", "filter[0].any"),
            (
                "any = [{ field = \"nope\", eq = 1 }]",
                "filter[0].any[0].field",
            ),
            ("field = \"payload.x\"\ngt = nan", "filter[0].gt"),
        ];
        for (text, key) in cases {
            let (found, why) = compile(text).unwrap_err();
            assert_eq!(found, key, "{text}: {why}");
        }
        assert!(toml::from_str::<Predicate>("field = \"a\"\nequals = 1").is_err());
    }

    #[test]
    fn having_tests_result_values() {
        let p: Predicate = toml::from_str("field = \"max\"\ngt = 120").unwrap();
        let c = p.compile("having[0]", &|n: &str| Ok(n.to_owned())).unwrap();
        assert!(c.holds_for(&[("max".to_owned(), 121.0)].into()));
        assert!(!c.holds_for(&[("max".to_owned(), 120.0)].into()));
        assert!(!c.holds_for(&HashMap::new()));
    }
}
