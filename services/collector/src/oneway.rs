//! One-way collection: `Send` (a client stream) and the UDP listener. Nothing is
//! answered per event, and nothing waits: an event the collector cannot take at once (the
//! log is full) is shed and counted — `runnel_collector_dropped_events_total{pattern,
//! reason}` — rather than slowing the sender. Suits readings that the next reading makes
//! stale, such as a heart-rate sensor's five a second.

use crate::error::CollectorError;
use crate::intake::Intake;
use crate::validate::validate_batch;
use prost::Message;
use runnel_msglog::AckLevel;
use runnel_proto::v1::{Event, SendRequest, SendResponse};
use runnel_server::Shutdown;
use std::sync::Arc;
use tokio::net::UdpSocket;
use tonic::Streaming;

/// The most datagrams taken in as one batch.
const UDP_BATCH: usize = 512;

fn dropped(pattern: &'static str, reason: &'static str, events: usize) {
    metrics::counter!("runnel_collector_dropped_events_total", "pattern" => pattern, "reason" => reason)
        .increment(events as u64);
}

/// Why an event was not taken, for the metrics.
fn reason(error: &CollectorError) -> &'static str {
    match error {
        CollectorError::InvalidEvent(_) => "invalid",
        CollectorError::Log(runnel_msglog::Error::Full { .. })
        | CollectorError::Log(runnel_msglog::Error::DiskFull(_)) => "overload",
        _ => "unavailable",
    }
}

/// Serves one `Send` stream until the client ends it (or the collector stops).
pub(crate) async fn send(
    intake: &Intake,
    mut inbound: Streaming<SendRequest>,
    shutdown: &Shutdown,
) -> Result<SendResponse, CollectorError> {
    let mut response = SendResponse::default();
    loop {
        let message = tokio::select! {
            message = inbound.message() => message,
            () = shutdown.wait() => break,
        };
        let events = match message {
            Ok(Some(request)) => request.events,
            // The end of the stream, or a client that broke it: answer what was counted.
            Ok(None) | Err(_) => break,
        };
        let count = events.len();
        match intake
            .submit(None, events, AckLevel::Accepted, "send")
            .await
        {
            Ok(_) => response.accepted += count as u64,
            Err(error) => {
                let why = reason(&error);
                dropped("send", why, count);
                if why == "invalid" {
                    response.invalid += count as u64;
                    if response.first_invalid.is_empty() {
                        response.first_invalid = error.to_string();
                    }
                } else {
                    response.dropped += count as u64;
                }
            }
        }
    }
    Ok(response)
}

/// Decodes a datagram: a JSON event object, or a protobuf `Event`.
///
/// One starting with `{` is JSON (a protobuf encoding never starts with that byte: it
/// would be field 15 with the group wire type). One starting with whitespace and then `{`
/// is JSON if it parses as JSON, and otherwise protobuf: `\n` is also the tag of an
/// `Event`'s first field, and a length byte may be whitespace too, so a protobuf event
/// can begin that way (the fuzzer found one). Anything else is protobuf.
pub(crate) fn parse_datagram(bytes: &[u8]) -> Result<Event, String> {
    match bytes.iter().position(|b| !b.is_ascii_whitespace()) {
        Some(0) if bytes[0] == b'{' => parse_json(bytes),
        Some(start) if bytes[start] == b'{' => {
            parse_json(bytes).or_else(|json| Event::decode(bytes).map_err(|_| json))
        }
        _ => Event::decode(bytes).map_err(|e| format!("not a protobuf event: {e}")),
    }
}

/// A JSON datagram: the contract's JSON event form, the one `runnel send` reads.
fn parse_json(bytes: &[u8]) -> Result<Event, String> {
    runnel_proto::json::parse_event(bytes).map_err(|error| error.to_string())
}

/// Takes events in from `socket`, one per datagram, until shutdown.
pub(crate) async fn listen_udp(intake: Arc<Intake>, socket: UdpSocket, shutdown: Shutdown) {
    let mut buffer = vec![0u8; 65_536];
    let run = format!("{:08x}", rand::random::<u32>());
    let mut counter = 0u64;
    loop {
        let first = tokio::select! {
            received = socket.recv_from(&mut buffer) => received,
            () = shutdown.wait() => return,
        };
        let mut events = Vec::new();
        let mut invalid = 0usize;
        let mut take = |len: usize, buffer: &[u8]| match parse_datagram(&buffer[..len]) {
            Ok(mut event) => {
                if event.id.is_empty() {
                    counter += 1;
                    event.id = format!("udp-{run}-{counter}");
                }
                if event.source.is_empty() {
                    event.source = "udp".into();
                }
                // Checked alone, so that one bad datagram does not cost the others.
                let mut one = [event];
                match validate_batch(&mut one, intake.limits(), runnel_proto::now_millis()) {
                    Ok(()) => events.extend(one),
                    Err(error) => {
                        tracing::debug!(%error, "udp: invalid event");
                        invalid += 1;
                    }
                }
            }
            Err(error) => {
                tracing::debug!(%error, "udp: undecodable datagram");
                invalid += 1;
            }
        };
        match first {
            Ok((len, _)) => take(len, &buffer),
            Err(error) => {
                tracing::warn!(%error, "udp receive failed");
                continue;
            }
        }
        // Whatever else is waiting goes in the same batch.
        for _ in 1..UDP_BATCH {
            match socket.try_recv_from(&mut buffer) {
                Ok((len, _)) => take(len, &buffer),
                Err(_) => break,
            }
        }
        if invalid > 0 {
            dropped("udp", "invalid", invalid);
        }
        if events.is_empty() {
            continue;
        }
        let count = events.len();
        if let Err(error) = intake.submit(None, events, AckLevel::Accepted, "udp").await {
            dropped("udp", reason(&error), count);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use runnel_proto::Millis;

    #[test]
    fn json_and_protobuf_datagrams_decode_to_the_same_event() {
        let json = br#"{"id":"hr-1","key":"athlete-7","type":"heart_rate","time":1714564805000,"payload":{"bpm":142}}"#;
        let event = parse_datagram(json).unwrap();
        assert_eq!(event.key, "athlete-7");
        assert_eq!(
            Millis::from(event.event_time.unwrap()),
            Millis(1_714_564_805_000)
        );
        assert_eq!(event.payload.as_ref(), br#"{"bpm":142}"#);
        let again = parse_datagram(&event.encode_to_vec()).unwrap();
        assert_eq!(again, event);
        let rfc = parse_datagram(br#"{"key":"k","time":"2024-05-01T12:00:05Z"}"#).unwrap();
        assert_eq!(
            Millis::from(rfc.event_time.unwrap()),
            Millis(1_714_564_805_000)
        );
    }

    #[test]
    fn bad_datagrams_say_why() {
        assert!(
            parse_datagram(b"{not json")
                .unwrap_err()
                .contains("not an event object")
        );
        assert!(parse_datagram(br#"{"key":"k","colour":"red"}"#).is_err());
        assert!(
            parse_datagram(br#"{"key":"k","time":true}"#)
                .unwrap_err()
                .starts_with("time")
        );
        assert!(
            parse_datagram(&[0xff, 0xff, 0xff])
                .unwrap_err()
                .contains("protobuf")
        );
    }

    /// Found by the `udp_datagrams` fuzz target: a protobuf event whose bytes begin with
    /// whitespace and then `{` was taken for JSON and refused.
    #[test]
    fn a_protobuf_event_that_begins_like_json_is_still_read() {
        let event = Event {
            id: "\n\n\n\n{{\n{{\n".into(),
            ..Event::default()
        };
        let bytes = event.encode_to_vec();
        assert_eq!(
            &bytes[..2],
            b"\n\n",
            "the case: tag and length are whitespace"
        );
        assert_eq!(parse_datagram(&bytes), Ok(event));
        // JSON after whitespace is still JSON, and broken JSON still says so.
        assert_eq!(parse_datagram(b"\n {\"key\":\"k\"}").unwrap().key, "k");
        assert!(
            parse_datagram(b"\n {\"key\":")
                .unwrap_err()
                .contains("not an event object")
        );
    }

    proptest! {
        #[test]
        fn arbitrary_datagrams_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = parse_datagram(&bytes);
        }
    }
}
