//! Fields of an event that queries name: the event's own fields, its attributes, and paths
//! into its JSON payload — with `[]` to take every element of an array, which is how one
//! event yields many keys (every topic of a Meetup group:
//! `payload.group.group_topics[].topic_name`).
//!
//! | field | what it is |
//! |---|---|
//! | `key`, `id`, `type`, `source` | the event's own text fields |
//! | `event_time` | the event time, Unix milliseconds |
//! | `attributes.<name>` | an attribute's text (a number where a number is wanted) |
//! | `payload` | the payload, when it is a bare JSON scalar |
//! | `payload.<a>.<b>` | a path into a JSON payload; a segment that is a whole number also indexes arrays |
//! | `payload.<a>[].<b>` | every element of the array `a` |
//!
//! The payload is walked with a `serde` visitor that follows the path and skips everything
//! else unparsed: nothing is built for the parts of the document the path does not enter,
//! and strings without escapes are borrowed from the payload, not copied. A value that is
//! missing, `null`, an object or an array (without `[]`) is simply not there.

use crate::event::EventView;
use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::fmt;

/// One value read from an event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub(crate) enum Scalar<'a> {
    Bool(bool),
    Num(f64),
    Text(#[serde(borrow)] Cow<'a, str>),
}

impl Scalar<'_> {
    /// The value as a number: numbers as they are, text that parses as one.
    pub(crate) fn number(&self) -> Option<f64> {
        let n = match self {
            Scalar::Num(n) => *n,
            Scalar::Text(text) => text.trim().parse().ok()?,
            Scalar::Bool(_) => return None,
        };
        n.is_finite().then_some(n)
    }

    /// The value as text: whole numbers without a fraction, so that `42` and `"42"` are
    /// one key.
    pub(crate) fn text(&self) -> Cow<'_, str> {
        match self {
            Scalar::Text(text) => Cow::Borrowed(text),
            Scalar::Num(n) if n.fract() == 0.0 && n.abs() < 9.0e15 => {
                Cow::Owned(format!("{}", *n as i64))
            }
            Scalar::Num(n) => Cow::Owned(n.to_string()),
            Scalar::Bool(b) => Cow::Borrowed(if *b { "true" } else { "false" }),
        }
    }

    /// A copy that owns its text.
    #[cfg(test)]
    pub(crate) fn into_owned(self) -> Scalar<'static> {
        match self {
            Scalar::Bool(b) => Scalar::Bool(b),
            Scalar::Num(n) => Scalar::Num(n),
            Scalar::Text(text) => Scalar::Text(Cow::Owned(text.into_owned())),
        }
    }
}

/// One step of a payload path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Segment {
    /// An object's member (or, if it is a whole number, an array's element).
    Field(String),
    /// Every element of an array.
    Each,
}

/// A field of an event, parsed from its name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum FieldRef {
    Key,
    Id,
    Type,
    Source,
    EventTime,
    Attribute(String),
    Payload(Vec<Segment>),
}

impl FieldRef {
    /// Parses a field name (see the module docs).
    pub(crate) fn parse(text: &str) -> Result<FieldRef, String> {
        let invalid = |why: &str| {
            format!(
                "{text:?} is not a field: {why} (use key, id, type, source, event_time, attributes.<name>, payload or payload.<path>, with [] for every element of an array)"
            )
        };
        Ok(match text {
            "key" => FieldRef::Key,
            "id" => FieldRef::Id,
            "type" => FieldRef::Type,
            "source" => FieldRef::Source,
            "event_time" => FieldRef::EventTime,
            _ => {
                if let Some(name) = text.strip_prefix("attributes.") {
                    if name.is_empty() {
                        return Err(invalid("the attribute has no name"));
                    }
                    return Ok(FieldRef::Attribute(name.to_owned()));
                }
                let Some(path) = text.strip_prefix("payload") else {
                    return Err(invalid("unknown field"));
                };
                let mut segments = Vec::new();
                let mut rest = path;
                while !rest.is_empty() {
                    if let Some(after) = rest.strip_prefix("[]") {
                        segments.push(Segment::Each);
                        rest = after;
                        continue;
                    }
                    let Some(after) = rest.strip_prefix('.') else {
                        return Err(invalid("segments are separated by '.'"));
                    };
                    let end = after.find(['.', '[']).unwrap_or(after.len());
                    let name = &after[..end];
                    if name.is_empty() {
                        return Err(invalid("a segment is empty"));
                    }
                    segments.push(Segment::Field(name.to_owned()));
                    rest = &after[end..];
                    if rest.starts_with('[') && !rest.starts_with("[]") {
                        return Err(invalid("only [] (every element) may follow a segment"));
                    }
                }
                FieldRef::Payload(segments)
            }
        })
    }

    /// Whether the field can hold more than one value per event.
    pub(crate) fn is_multi(&self) -> bool {
        matches!(self, FieldRef::Payload(segments) if segments.contains(&Segment::Each))
    }

    /// Calls `each` with every value of this field in `event`.
    pub(crate) fn each<'a>(&self, event: &EventView<'a>, mut each: impl FnMut(Scalar<'a>)) {
        let text = |s: &'a str| Scalar::Text(Cow::Borrowed(s));
        match self {
            FieldRef::Key => each(text(event.key)),
            FieldRef::Id => each(text(event.id)),
            FieldRef::Type => each(text(event.kind)),
            FieldRef::Source => each(text(event.source)),
            FieldRef::EventTime => {
                if let Some(t) = event.event_time {
                    each(Scalar::Num(t as f64));
                }
            }
            FieldRef::Attribute(name) => {
                if let Some(value) = event.attribute(name) {
                    each(text(value));
                }
            }
            FieldRef::Payload(segments) => {
                let mut json = serde_json::Deserializer::from_slice(event.payload);
                // A payload that is not JSON has no fields.
                let _ = Walk {
                    path: segments,
                    out: &mut each,
                }
                .deserialize(&mut json);
            }
        }
    }

    /// The first value of this field in `event`.
    pub(crate) fn first<'a>(&self, event: &EventView<'a>) -> Option<Scalar<'a>> {
        let mut found = None;
        self.each(event, |value| {
            if found.is_none() {
                found = Some(value);
            }
        });
        found
    }
}

/// Follows `path` through a JSON value, handing every scalar at its end to `out`.
struct Walk<'p, 'o, 'de> {
    path: &'p [Segment],
    out: &'o mut dyn FnMut(Scalar<'de>),
}

impl<'de> DeserializeSeed<'de> for Walk<'_, '_, 'de> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

/// Whether an object key equals `name`, compared without allocating.
struct KeyIs<'n>(&'n str);

impl<'de> DeserializeSeed<'de> for KeyIs<'_> {
    type Value = bool;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<bool, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeyIs<'_> {
    type Value = bool;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object key")
    }

    fn visit_str<E: serde::de::Error>(self, key: &str) -> Result<bool, E> {
        Ok(key == self.0)
    }
}

impl<'de> Visitor<'de> for Walk<'_, '_, 'de> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<(), E> {
        if self.path.is_empty() {
            (self.out)(Scalar::Bool(v));
        }
        Ok(())
    }

    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<(), E> {
        self.visit_f64(v as f64)
    }

    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<(), E> {
        self.visit_f64(v as f64)
    }

    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<(), E> {
        if self.path.is_empty() {
            (self.out)(Scalar::Num(v));
        }
        Ok(())
    }

    fn visit_borrowed_str<E: serde::de::Error>(self, v: &'de str) -> Result<(), E> {
        if self.path.is_empty() {
            (self.out)(Scalar::Text(Cow::Borrowed(v)));
        }
        Ok(())
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<(), E> {
        // Only strings with escapes get here: they must be copied.
        if self.path.is_empty() {
            (self.out)(Scalar::Text(Cow::Owned(v.to_owned())));
        }
        Ok(())
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let wanted = match self.path.first() {
            Some(Segment::Field(name)) => Some(name.as_str()),
            _ => None,
        };
        let out = self.out;
        let mut done = false;
        while let Some(matches) = match wanted {
            Some(name) if !done => map.next_key_seed(KeyIs(name))?,
            _ => map.next_key::<IgnoredAny>()?.map(|_| false),
        } {
            if matches {
                done = true;
                map.next_value_seed(Walk {
                    path: &self.path[1..],
                    out: &mut *out,
                })?;
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let out = self.out;
        match self.path.first() {
            Some(Segment::Each) => {
                while seq
                    .next_element_seed(Walk {
                        path: &self.path[1..],
                        out: &mut *out,
                    })?
                    .is_some()
                {}
            }
            Some(Segment::Field(name)) if name.parse::<usize>().is_ok() => {
                let index: usize = name.parse().unwrap_or(usize::MAX);
                let mut i = 0;
                loop {
                    let more = if i == index {
                        seq.next_element_seed(Walk {
                            path: &self.path[1..],
                            out: &mut *out,
                        })?
                        .is_some()
                    } else {
                        seq.next_element::<IgnoredAny>()?.is_some()
                    };
                    if !more {
                        break;
                    }
                    i += 1;
                }
            }
            _ => while seq.next_element::<IgnoredAny>()?.is_some() {},
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use prost::Message;
    use runnel_proto::v1::Event;

    fn values(field: &str, event: &Event) -> Vec<Scalar<'static>> {
        let bytes = event.encode_to_vec();
        let view = EventView::parse(&bytes).unwrap();
        let mut found = Vec::new();
        FieldRef::parse(field)
            .unwrap()
            .each(&view, |v| found.push(v.into_owned()));
        found
    }

    fn payload(json: &str) -> Event {
        Event {
            id: "e-1".into(),
            key: "k".into(),
            r#type: "rsvp".into(),
            payload: json.as_bytes().to_vec().into(),
            attributes: [("bpm".to_owned(), " 72.5 ".to_owned())].into(),
            ..Default::default()
        }
    }

    fn text(s: &str) -> Scalar<'static> {
        Scalar::Text(Cow::Owned(s.to_owned()))
    }

    #[test]
    fn names_parse_or_say_why_not() {
        assert_eq!(FieldRef::parse("key"), Ok(FieldRef::Key));
        assert_eq!(
            FieldRef::parse("payload.a[].b"),
            Ok(FieldRef::Payload(vec![
                Segment::Field("a".into()),
                Segment::Each,
                Segment::Field("b".into())
            ]))
        );
        assert_eq!(FieldRef::parse("payload"), Ok(FieldRef::Payload(vec![])));
        assert_eq!(
            FieldRef::parse("payload[]"),
            Ok(FieldRef::Payload(vec![Segment::Each]))
        );
        assert!(FieldRef::parse("payload.a[]").unwrap().is_multi());
        assert!(!FieldRef::parse("payload.a.0").unwrap().is_multi());
        for bad in [
            "",
            "value",
            "payload.",
            "payload..a",
            "payload.a[0]",
            "payloads.x",
            "attributes.",
        ] {
            assert!(FieldRef::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn every_topic_of_the_meetup_fixture_is_found() {
        let fixture = include_str!("../../../tests/fixtures/meetup_rsvp_sample.json");
        let event = payload(fixture);
        let topics = values("payload.group.group_topics[].topic_name", &event);
        assert_eq!(topics.len(), 12);
        assert_eq!(topics[0], text("Social"));
        assert_eq!(topics[11], text("Cultural Activities"));
        assert_eq!(
            values("payload.member.member_id", &event),
            [Scalar::Num(192_487_425.0)]
        );
        assert_eq!(
            values("payload.group.group_topics.1.urlkey", &event),
            [text("adventure")]
        );
        assert_eq!(
            values("payload.venue.lat", &event),
            [Scalar::Num(52.342258)]
        );
    }

    #[test]
    fn missing_nested_and_non_json_values_are_absent() {
        let e = payload(r#"{"a": {"b": [1, null, "x\"y", true]}, "n": null, "o": {"p": 1}}"#);
        assert_eq!(
            values("payload.a.b[]", &e),
            [Scalar::Num(1.0), text("x\"y"), Scalar::Bool(true)]
        );
        assert!(values("payload.n", &e).is_empty());
        assert!(
            values("payload.o", &e).is_empty(),
            "objects are not scalars"
        );
        assert!(values("payload.a.b", &e).is_empty(), "arrays need []");
        assert!(values("payload.a.b.9", &e).is_empty());
        assert!(values("payload.missing[].x", &e).is_empty());
        assert!(values("payload.a", &payload("not json")).is_empty());
        assert_eq!(values("payload", &payload("42")), [Scalar::Num(42.0)]);
        assert_eq!(values("attributes.bpm", &e)[0].number(), Some(72.5));
        assert_eq!(values("type", &e), [text("rsvp")]);
    }

    #[test]
    fn numbers_and_text_convert_as_keys_expect() {
        assert_eq!(Scalar::Num(42.0).text(), "42");
        assert_eq!(Scalar::Num(1.5).text(), "1.5");
        assert_eq!(text(" 7 ").number(), Some(7.0));
        assert_eq!(text("inf").number(), None);
        assert_eq!(Scalar::Bool(true).number(), None);
    }

    proptest! {
        /// A path into an arbitrary document finds exactly what indexing the parsed
        /// document finds.
        #[test]
        fn a_walk_finds_what_indexing_finds(
            doc in proptest::collection::btree_map("[ab]", proptest::collection::vec(-1000i64..1000, 0..4), 0..3),
            key in "[ab]",
        ) {
            let json = serde_json::to_string(&doc).unwrap();
            let e = payload(&json);
            let expected: Vec<Scalar<'static>> = doc.get(&key).map(|v| v.iter().map(|n| Scalar::Num(*n as f64)).collect()).unwrap_or_default();
            prop_assert_eq!(values(&format!("payload.{key}[]"), &e), expected);
        }

        #[test]
        fn arbitrary_payloads_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256), path in "payload(\\.[a-z0-9]{1,3}(\\[\\])?){0,3}") {
            let e = Event { payload: bytes.into(), ..Default::default() };
            let _ = values(&path, &e);
        }
    }
}
