//! The store with authentication on: deleting a query's results is a write, which a
//! caller allowed only to read results may not make.

use super::result;
use runnel_proto::v1::store_client::StoreClient;
use runnel_proto::v1::{DeleteQueryRequest, GetRequest, PutRequest};
use runnel_security::auth::token_sha256;
use runnel_security::{Action, AuthConfig, ConnectConfig, GrantConfig, TokenConfig};
use runnel_store::StoreConfig;
use runnel_testkit::Services;
use std::time::Duration;
use tonic::Code;

/// A static token for `principal` and a grant of `allow` on every query to it.
fn caller(principal: &str, allow: Action) -> (TokenConfig, GrantConfig) {
    let token = TokenConfig {
        principal: principal.into(),
        sha256: token_sha256(&format!("rnl_{principal}")),
    };
    let grant = GrantConfig {
        principal: format!("token:{principal}"),
        allow: vec![allow],
        topics: vec![],
        queries: vec!["*".into()],
        groups: vec![],
    };
    (token, grant)
}

#[tokio::test]
async fn only_a_caller_that_may_write_results_deletes_them() {
    let dir = tempfile::tempdir().unwrap();
    let (writer_token, writer_grant) = caller("analyzer", Action::WriteResults);
    let (reader_token, reader_grant) = caller("gateway", Action::ReadResults);
    let mut config = StoreConfig {
        data_dir: dir.path().to_path_buf(),
        ..StoreConfig::default()
    };
    config.server.auth = AuthConfig {
        enabled: true,
        tokens: vec![writer_token, reader_token],
        grants: vec![writer_grant, reader_grant],
        ..AuthConfig::default()
    };
    let mut services = Services::new();
    let addrs = services
        .start_on_loopback("store", runnel_store::run, config)
        .await;
    let url = format!("http://{}", addrs.grpc);
    let connect = async |token: &str| {
        StoreClient::new(
            runnel_security::connect(&url, &ConnectConfig::default(), Some(token))
                .await
                .unwrap(),
        )
    };
    let mut writer = connect("rnl_analyzer").await;
    let mut reader = connect("rnl_gateway").await;
    writer
        .put(PutRequest {
            results: vec![result("q", "k", 0, 1.0)],
            fence: None,
        })
        .await
        .unwrap();
    let delete = DeleteQueryRequest { query: "q".into() };

    let status = reader.delete_query(delete.clone()).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    let mut anonymous = StoreClient::connect(url.clone()).await.unwrap();
    let status = anonymous.delete_query(delete.clone()).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    let held = reader
        .get(GetRequest {
            query: "q".into(),
            key: "k".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(held.result.is_some(), "a refused deletion deletes nothing");

    let deleted = writer.delete_query(delete).await.unwrap().into_inner();
    assert_eq!(deleted.deleted, 1);
    services
        .stop(Duration::from_secs(10))
        .await
        .expect("the store stops");
}
