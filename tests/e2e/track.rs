//! `Track` (request/acknowledge) through the whole pipeline: the score a token's
//! acknowledgements carry is the analyzer's default `purchase_propensity` query, computed
//! from the token's own events as they flow collector → broker → analyzer → store and read
//! back by the collector — and it rises with the token's carts and purchases.

use runnel_e2e::Pipeline;
use runnel_proto::v1::collector_client::CollectorClient;
use runnel_proto::v1::gateway_client::GatewayClient;
use runnel_proto::v1::{TrackRequest, WatchRequest};
use std::collections::BTreeMap;
use std::time::Duration;

/// The default query's weights (`services/analyzer/src/config.rs`): the score of a session
/// is `1 - e^(-Σ weight)`.
const CLICK: f64 = 0.05;
const PURCHASE: f64 = 2.0;

fn score(weights: &[f64]) -> f64 {
    1.0 - (-weights.iter().sum::<f64>()).exp()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tokens_score_comes_from_the_analyzer_and_rises_with_its_purchases() {
    // The collector caches scores; a short time to live lets each answer see the store.
    let env = BTreeMap::from([(
        "RUNNEL_COLLECTOR__TRACK__CACHE_TTL".to_owned(),
        "1ms".to_owned(),
    )]);
    // No queries in the file: the analyzer runs its default ones, `purchase_propensity`
    // among them.
    let pipeline = Pipeline::start("", env).await.expect("pipeline starts");
    let mut collector = CollectorClient::connect(pipeline.collector.url())
        .await
        .expect("collector");
    let mut gateway = GatewayClient::connect(pipeline.gateway.url())
        .await
        .expect("gateway");
    // Results are live-only on a watch: subscribe before anything can be scored.
    let mut results = gateway
        .watch(WatchRequest {
            query: "purchase_propensity".into(),
            key_prefix: "tk-".into(),
            ..Default::default()
        })
        .await
        .expect("watch")
        .into_inner();
    let mut scored = async |token: &str, at_least: f64| -> f64 {
        loop {
            let result = tokio::time::timeout(Duration::from_secs(60), results.message())
                .await
                .unwrap_or_else(|_| panic!("no score for {token}\n{}", pipeline.logs()))
                .expect("watch stream")
                .expect("a result");
            let value = result.values.get("score").copied().expect("a score");
            if result.key == token && value >= at_least - 1e-9 {
                return value;
            }
        }
    };

    let first = collector
        .track(TrackRequest {
            r#type: "click".into(),
            ..Default::default()
        })
        .await
        .expect("track")
        .into_inner();
    let token = first.token.clone();
    assert!(!token.is_empty(), "the first answer issues a token");
    assert_eq!(first.score, None, "nothing is known of a new token");

    let after_click = scored(&token, score(&[CLICK])).await;
    assert!(
        (after_click - score(&[CLICK])).abs() < 1e-9,
        "{after_click}"
    );

    let track = |kind: &str| TrackRequest {
        token: token.clone(),
        r#type: kind.into(),
        ..Default::default()
    };
    // The answer carries what the store knows now: the first click's score (or, if the
    // analyzer was quicker than the lookup, this purchase's).
    let answer = collector
        .track(track("purchase"))
        .await
        .expect("track")
        .into_inner();
    assert_eq!(answer.token, token);
    let seen = answer
        .score
        .expect("a scored token's answer carries its score");
    assert!(
        [score(&[CLICK]), score(&[CLICK, PURCHASE])]
            .iter()
            .any(|s| (seen - s).abs() < 1e-9),
        "{seen}"
    );

    let after_purchase = scored(&token, score(&[CLICK, PURCHASE])).await;
    assert!(after_purchase > after_click + 0.5, "{after_purchase}");
    let answer = collector
        .track(track("click"))
        .await
        .expect("track")
        .into_inner();
    let seen = answer.score.expect("score");
    assert!(
        seen >= score(&[CLICK, PURCHASE]) - 1e-9,
        "the next acknowledgement carries the risen score: {seen}"
    );
}
