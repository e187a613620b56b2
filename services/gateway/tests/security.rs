//! The gateway and the store with authentication on: the gateway's HTTP and gRPC APIs
//! refuse callers without credentials (401 / `UNAUTHENTICATED`) and callers without a
//! grant for the query (403 / `PERMISSION_DENIED`), and the gateway reads from the store
//! with its own token.

use runnel_gateway::GatewayConfig;
use runnel_proto::Millis;
use runnel_proto::v1::gateway_client::GatewayClient;
use runnel_proto::v1::store_client::StoreClient;
use runnel_proto::v1::{GetRequest, PutRequest, QueryResult};
use runnel_security::auth::token_sha256;
use runnel_security::{Action, AuthConfig, ConnectConfig, GrantConfig, TokenConfig};
use runnel_store::StoreConfig;
use runnel_testkit::Services;
use std::time::Duration;
use tonic::Code;

fn token(principal: &str, secret: &str) -> TokenConfig {
    TokenConfig {
        principal: principal.into(),
        sha256: token_sha256(secret),
    }
}

/// A grant to the static token named `principal`.
fn grant(principal: &str, allow: Action, queries: &[&str]) -> GrantConfig {
    GrantConfig {
        principal: format!("token:{principal}"),
        allow: vec![allow],
        topics: vec![],
        queries: queries.iter().map(|q| q.to_string()).collect(),
        groups: vec![],
    }
}

#[tokio::test]
async fn reads_need_credentials_and_a_grant_for_the_query() {
    let dir = tempfile::tempdir().unwrap();
    let mut services = Services::new();

    let mut store_config = StoreConfig {
        data_dir: dir.path().join("store"),
        ..StoreConfig::default()
    };
    store_config.server.auth = AuthConfig {
        enabled: true,
        tokens: vec![
            token("analyzer", "rnl_analyzer"),
            token("gateway", "rnl_gateway"),
        ],
        grants: vec![
            grant("analyzer", Action::WriteResults, &["*"]),
            grant("gateway", Action::ReadResults, &["*"]),
        ],
        ..AuthConfig::default()
    };
    let store = services
        .start_on_loopback("store", runnel_store::run, store_config)
        .await;
    let store_url = format!("http://{}", store.grpc);

    let gateway_token = dir.path().join("gateway.token");
    std::fs::write(&gateway_token, "rnl_gateway\n").unwrap();
    let mut gateway_config = GatewayConfig {
        store: store_url.clone(),
        ..GatewayConfig::default()
    };
    gateway_config.server.connect = ConnectConfig {
        token_file: Some(gateway_token),
        ..ConnectConfig::default()
    };
    gateway_config.server.auth = AuthConfig {
        enabled: true,
        tokens: vec![
            token("dashboard", "rnl_dashboard"),
            token("operator", "rnl_operator"),
        ],
        grants: vec![
            grant("dashboard", Action::ReadResults, &["public.*"]),
            grant("operator", Action::ReadResults, &["*"]),
            grant("operator", Action::Manage, &["ops.*"]),
        ],
        ..AuthConfig::default()
    };
    let gateway = services
        .start_on_loopback("gateway", runnel_gateway::run, gateway_config)
        .await;
    let gateway_url = format!("http://{}", gateway.grpc);
    let http = gateway.http.unwrap();

    // The analyzer's token writes; the gateway's token may not.
    let plain = ConnectConfig::default();
    let writer = runnel_security::connect(&store_url, &plain, Some("rnl_analyzer"))
        .await
        .unwrap();
    let result = |query: &str| QueryResult {
        query: query.into(),
        key: "k".into(),
        window_start: Some(Millis(1_714_564_800_000).into()),
        window_end: Some(Millis(1_714_564_810_000).into()),
        values: [("count".to_owned(), 1.0)].into(),
        emitted_at: Some(Millis(1_714_564_812_000).into()),
        ..Default::default()
    };
    StoreClient::new(writer)
        .put(PutRequest {
            results: vec![result("public.counts"), result("private.counts")],
            fence: None,
        })
        .await
        .unwrap();
    let not_a_writer = runnel_security::connect(&store_url, &plain, Some("rnl_gateway"))
        .await
        .unwrap();
    let status = StoreClient::new(not_a_writer)
        .put(PutRequest {
            results: vec![result("public.counts")],
            fence: None,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");

    let http_get = |path: &str, token: Option<&str>| {
        let mut request = reqwest::Client::new().get(format!("http://{http}{path}"));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send()
    };
    let anonymous = http_get("/v1/results/public.counts/k", None).await.unwrap();
    assert_eq!(anonymous.status(), 401);
    assert_eq!(
        anonymous.headers().get("www-authenticate").unwrap(),
        "Bearer"
    );
    let wrong = http_get("/v1/results/public.counts/k", Some("rnl_nope"))
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    let body: serde_json::Value = wrong.json().await.unwrap();
    assert_eq!(body["error"], "invalid credentials");

    // The gateway reads from the store with its own token, for a caller with a grant.
    let allowed = http_get("/v1/results/public.counts/k", Some("rnl_dashboard"))
        .await
        .unwrap();
    assert_eq!(allowed.status(), 200);
    let body: serde_json::Value = allowed.json().await.unwrap();
    assert_eq!(body["values"]["count"], 1.0);
    let forbidden = http_get("/v1/results/private.counts/k", Some("rnl_dashboard"))
        .await
        .unwrap();
    assert_eq!(forbidden.status(), 403);
    let everything = http_get("/v1/watch", Some("rnl_dashboard")).await.unwrap();
    assert_eq!(
        everything.status(),
        403,
        "a watch of every query needs a grant for *"
    );
    // The pipeline's health, too: it speaks for every query.
    for (token, expected) in [
        (None, 401),
        (Some("rnl_dashboard"), 403),
        (Some("rnl_operator"), 200),
    ] {
        let pipeline = http_get("/v1/pipeline", token).await.unwrap();
        assert_eq!(pipeline.status(), expected, "{token:?}");
    }

    // Creating or dropping a query needs `manage` on it (this gateway knows no analyzer:
    // a call that gets past the check answers 501).
    let sql = "SELECT key, count(*) FROM events GROUP BY key, TUMBLE(event_time, '1m')";
    for (token, name, expected) in [
        ("rnl_dashboard", "public.clicks", 403),
        ("rnl_operator", "public.clicks", 403),
        ("rnl_operator", "ops.clicks", 501),
    ] {
        let created = reqwest::Client::new()
            .post(format!("http://{http}/v1/queries"))
            .bearer_auth(token)
            .header("content-type", "application/json")
            .body(serde_json::json!({ "name": name, "sql": sql }).to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(created.status(), expected, "{token} creates {name}");
        let dropped = reqwest::Client::new()
            .delete(format!("http://{http}/v1/queries/{name}"))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert_eq!(dropped.status(), expected, "{token} drops {name}");
    }

    let reader = runnel_security::connect(&gateway_url, &plain, Some("rnl_dashboard"))
        .await
        .unwrap();
    let mut gateway = GatewayClient::new(reader);
    let got = gateway
        .get(GetRequest {
            query: "public.counts".into(),
            key: "k".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(got.result.is_some());
    let status = gateway
        .get(GetRequest {
            query: "private.counts".into(),
            key: "k".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);

    services
        .stop(Duration::from_secs(15))
        .await
        .expect("the gateway and the store stop");
}
