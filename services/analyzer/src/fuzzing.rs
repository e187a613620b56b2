//! Entry points for the fuzz targets in `fuzz/` (the `fuzzing` feature only): what the
//! analyzer reads out of bytes that producers and the broker sent — events read in place
//! from the `Subscribe` stream, field paths over their JSON payloads, and continuous
//! queries in SQL.

use crate::event::{EventView, RawMessage, RawSubscribeResponse};
use crate::path::FieldRef;
use prost::Message;
use runnel_proto::v1::Event;

/// Parses `path` as a field reference and reads it from an event whose payload (and one
/// attribute) is `payload`: never a panic, and never a number that is not finite.
pub fn extract(path: &str, payload: &[u8]) {
    let Ok(path) = FieldRef::parse(path) else {
        return;
    };
    let event = Event {
        key: "k".into(),
        payload: payload.to_vec().into(),
        attributes: [(
            "a".to_owned(),
            String::from_utf8_lossy(payload).into_owned(),
        )]
        .into(),
        ..Event::default()
    };
    let encoded = event.encode_to_vec();
    let view = EventView::parse(&encoded).expect("an encoded event reads back");
    let finite = |scalar: crate::path::Scalar<'_>| {
        if let Some(n) = scalar.number() {
            assert!(n.is_finite(), "{n}");
        }
    };
    if let Some(first) = path.first(&view) {
        finite(first);
    }
    path.each(&view, finite);
}

/// Decodes `bytes` as a `Subscribe` stream message the way the analyzer does (events left
/// encoded, then read in place). Where the generated decoder reads the same event, both
/// see the same fields.
pub fn subscribe_message(bytes: &[u8]) {
    let Ok(RawSubscribeResponse {
        message: Some(RawMessage::Records(chunk)),
    }) = RawSubscribeResponse::decode(bytes)
    else {
        return;
    };
    for record in &chunk.records {
        let (Ok(view), Ok(event)) = (
            EventView::parse(&record.event),
            Event::decode(record.event.clone()),
        ) else {
            continue;
        };
        assert_eq!(
            (view.id, view.source, view.kind, view.key, view.payload),
            (
                event.id.as_str(),
                event.source.as_str(),
                event.r#type.as_str(),
                event.key.as_str(),
                &event.payload[..]
            )
        );
        for (name, value) in &event.attributes {
            assert_eq!(view.attribute(name), Some(value.as_str()), "{name}");
        }
    }
}

/// Compiles `sql` as a continuous query, and what it compiles to into a plan: never a
/// panic, and a refusal always says what is wrong.
pub fn compile_sql(sql: &str) {
    match crate::sql::compile("q", sql) {
        Ok(query) => {
            let _ = query.compile(0);
        }
        Err(error) => assert!(!error.message.is_empty(), "an empty refusal for {sql:?}"),
    }
}
