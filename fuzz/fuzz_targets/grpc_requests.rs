//! Every request message a Runnel server decodes from the network, and the times the
//! HTTP API parses: decoding never panics, and what decodes survives a round trip.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use runnel_proto::v1::*;

fn round_trip<M: Message + Default + PartialEq + std::fmt::Debug>(data: &[u8]) {
    if let Ok(message) = M::decode(data) {
        let again = M::decode(message.encode_to_vec().as_slice()).expect("re-encoded decodes");
        assert_eq!(again, message);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    match which % 16 {
        0 => round_trip::<IngestRequest>(body),
        1 => round_trip::<ProduceRequest>(body),
        2 => round_trip::<FetchRequest>(body),
        3 => round_trip::<SubscribeRequest>(body),
        4 => round_trip::<CommitOffsetsRequest>(body),
        5 => round_trip::<CreateTopicRequest>(body),
        6 => round_trip::<DescribeTopicRequest>(body),
        7 => round_trip::<PutRequest>(body),
        8 => round_trip::<GetRequest>(body),
        9 => round_trip::<RangeRequest>(body),
        10 => round_trip::<WatchRequest>(body),
        11 => round_trip::<DescribeQueryRequest>(body),
        12 => round_trip::<RecordBatch>(body),
        _ => {
            if let Ok(text) = std::str::from_utf8(body) {
                let _ = runnel_proto::json::parse_time(text);
            }
        }
    }
});
