//! Reading the number a query aggregates out of an event.
//!
//! A value path is `payload.<field>[.<field>…]` — a path into the event's JSON payload,
//! where a field that is a whole number also indexes arrays — `payload` alone (the payload
//! is a bare JSON number), or `attributes.<name>` (an attribute's text parsed as a number).
//! Anything that is not there, not a number, or not finite yields no value: the event is
//! skipped, never guessed at.

use runnel_proto::v1::Event;

/// Where a query's number is in an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ValuePath {
    /// A path into the JSON payload; empty for the payload itself.
    Payload(Vec<String>),
    /// An attribute, parsed as a number.
    Attribute(String),
}

impl ValuePath {
    /// Parses `payload[.a.b]` or `attributes.<name>`.
    pub(crate) fn parse(text: &str) -> Result<ValuePath, String> {
        let invalid = || {
            format!(
                "{text:?} is not a value path: use \"payload.<field>[.<field>…]\" or \"attributes.<name>\""
            )
        };
        if text == "payload" {
            return Ok(ValuePath::Payload(Vec::new()));
        }
        if let Some(path) = text.strip_prefix("payload.") {
            let fields: Vec<String> = path.split('.').map(str::to_owned).collect();
            if fields.iter().any(String::is_empty) {
                return Err(invalid());
            }
            return Ok(ValuePath::Payload(fields));
        }
        match text.strip_prefix("attributes.") {
            Some(name) if !name.is_empty() => Ok(ValuePath::Attribute(name.to_owned())),
            _ => Err(invalid()),
        }
    }

    /// The number at this path in `event`, if there is a finite one.
    pub(crate) fn extract(&self, event: &Event) -> Option<f64> {
        let value = match self {
            ValuePath::Attribute(name) => event.attributes.get(name)?.trim().parse::<f64>().ok()?,
            ValuePath::Payload(fields) => {
                let json: serde_json::Value = serde_json::from_slice(&event.payload).ok()?;
                let mut at = &json;
                for field in fields {
                    at = match at {
                        serde_json::Value::Object(map) => map.get(field)?,
                        serde_json::Value::Array(items) => {
                            items.get(field.parse::<usize>().ok()?)?
                        }
                        _ => return None,
                    };
                }
                at.as_f64()?
            }
        };
        value.is_finite().then_some(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn event(payload: &str) -> Event {
        Event {
            payload: payload.as_bytes().to_vec().into(),
            attributes: [
                ("bpm".to_owned(), " 72.5 ".to_owned()),
                ("site".to_owned(), "a".to_owned()),
            ]
            .into(),
            ..Default::default()
        }
    }

    #[test]
    fn paths_parse() {
        assert_eq!(ValuePath::parse("payload"), Ok(ValuePath::Payload(vec![])));
        assert_eq!(
            ValuePath::parse("payload.a.b"),
            Ok(ValuePath::Payload(vec!["a".into(), "b".into()]))
        );
        assert_eq!(
            ValuePath::parse("attributes.bpm"),
            Ok(ValuePath::Attribute("bpm".into()))
        );
        for bad in [
            "",
            "value",
            "payload.",
            "payload..a",
            "attributes.",
            "payloads.x",
        ] {
            assert!(ValuePath::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn values_are_found_where_the_path_says() {
        let path = |p: &str| ValuePath::parse(p).unwrap();
        let e = event(r#"{"value": 21.5, "nested": {"list": [1, {"x": -3}]}, "text": "7"}"#);
        assert_eq!(path("payload.value").extract(&e), Some(21.5));
        assert_eq!(path("payload.nested.list.0").extract(&e), Some(1.0));
        assert_eq!(path("payload.nested.list.1.x").extract(&e), Some(-3.0));
        assert_eq!(path("attributes.bpm").extract(&e), Some(72.5));
        assert_eq!(
            path("payload.text").extract(&e),
            None,
            "strings are not numbers"
        );
        assert_eq!(path("payload.missing").extract(&e), None);
        assert_eq!(path("payload.nested.list.9").extract(&e), None);
        assert_eq!(path("payload.value.deeper").extract(&e), None);
        assert_eq!(path("attributes.site").extract(&e), None);
        assert_eq!(path("attributes.none").extract(&e), None);
        assert_eq!(path("payload").extract(&event("42")), Some(42.0));
        assert_eq!(path("payload.value").extract(&event("not json")), None);
        assert_eq!(path("payload.value").extract(&event("")), None);
    }

    #[test]
    fn infinities_and_nans_are_not_values() {
        let e = Event {
            attributes: [
                ("a".to_owned(), "inf".to_owned()),
                ("b".to_owned(), "NaN".to_owned()),
            ]
            .into(),
            ..Default::default()
        };
        assert_eq!(ValuePath::Attribute("a".into()).extract(&e), None);
        assert_eq!(ValuePath::Attribute("b".into()).extract(&e), None);
    }

    proptest! {
        #[test]
        fn arbitrary_payloads_never_panic(payload in proptest::collection::vec(any::<u8>(), 0..256), path in "payload(\\.[a-z0-9]{1,3}){0,3}") {
            let e = Event { payload: payload.into(), ..Default::default() };
            let _ = ValuePath::parse(&path).unwrap().extract(&e);
        }
    }
}
