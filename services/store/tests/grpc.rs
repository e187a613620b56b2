//! The store over real gRPC: `run()` in-process on ephemeral ports.

use runnel_proto::Millis;
use runnel_proto::v1::store_client::StoreClient;
use runnel_proto::v1::{GetRequest, PutRequest, QueryResult, RangeRequest, WatchRequest};
use runnel_server::{Listeners, Shutdown, ShutdownTrigger};
use runnel_store::{StoreConfig, StoreError};
use std::path::Path;
use std::time::Duration;
use tokio::task::JoinHandle;
use tonic::Code;
use tonic::transport::Channel;

struct Running {
    client: StoreClient<Channel>,
    trigger: ShutdownTrigger,
    handle: JoinHandle<Result<(), StoreError>>,
}

async fn spawn_store(dir: &Path, configure: impl FnOnce(&mut StoreConfig)) -> Running {
    let mut config = StoreConfig {
        data_dir: dir.to_path_buf(),
        ..StoreConfig::default()
    };
    configure(&mut config);
    let listeners = Listeners {
        grpc: tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        admin: tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        http: None,
    };
    let addr = listeners.grpc.local_addr().unwrap();
    let (trigger, shutdown) = Shutdown::new();
    let handle = tokio::spawn(runnel_store::run(config, listeners, shutdown));
    let client = StoreClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    Running {
        client,
        trigger,
        handle,
    }
}

impl Running {
    async fn stop(self) {
        self.trigger.trigger();
        tokio::time::timeout(Duration::from_secs(10), self.handle)
            .await
            .expect("the store stops within its drain timeout")
            .unwrap()
            .unwrap();
    }
}

fn result(query: &str, key: &str, start: i64, count: f64) -> QueryResult {
    QueryResult {
        query: query.into(),
        key: key.into(),
        window_start: Some(Millis(start).into()),
        window_end: Some(Millis(start + 1000).into()),
        values: [("count".to_owned(), count), ("avg".to_owned(), count / 2.0)].into(),
        emitted_at: Some(Millis(start + 2000).into()),
        items: Default::default(),
        headers: [(
            "traceparent".to_owned(),
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".to_owned(),
        )]
        .into(),
    }
}

async fn put(
    client: &mut StoreClient<Channel>,
    results: Vec<QueryResult>,
) -> Result<u32, tonic::Status> {
    client
        .put(PutRequest { results })
        .await
        .map(|r| r.into_inner().written)
}

async fn range(
    client: &mut StoreClient<Channel>,
    key: &str,
    from: Option<i64>,
    to: Option<i64>,
) -> Vec<QueryResult> {
    client
        .range(RangeRequest {
            query: "q".into(),
            key: key.into(),
            from: from.map(|m| Millis(m).into()),
            to: to.map(|m| Millis(m).into()),
            limit: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .results
}

#[tokio::test]
async fn put_get_range_and_a_restart_keep_every_result() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = spawn_store(dir.path(), |_| {}).await;
    let written = vec![
        result("q", "a", 0, 1.0),
        result("q", "a", 1000, 2.0),
        result("q", "b", 0, 3.0),
    ];
    assert_eq!(put(&mut store.client, written.clone()).await.unwrap(), 3);
    // A rewrite of a window replaces it.
    let rewritten = result("q", "a", 0, 10.0);
    put(&mut store.client, vec![rewritten.clone()])
        .await
        .unwrap();
    store.stop().await;

    let mut store = spawn_store(dir.path(), |_| {}).await;
    let latest = store
        .client
        .get(GetRequest {
            query: "q".into(),
            key: "a".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .result;
    assert_eq!(latest, Some(written[1].clone()));
    assert_eq!(
        range(&mut store.client, "a", None, None).await,
        [rewritten, written[1].clone()]
    );
    assert_eq!(
        range(&mut store.client, "a", Some(500), None).await,
        [written[1].clone()]
    );
    assert_eq!(
        range(&mut store.client, "a", None, Some(1000)).await.len(),
        1
    );
    assert!(
        range(&mut store.client, "nobody", None, None)
            .await
            .is_empty()
    );
    let missing = store
        .client
        .get(GetRequest {
            query: "q".into(),
            key: "nobody".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(missing.result, None);
    store.stop().await;
}

#[tokio::test]
async fn bad_puts_are_invalid_arguments_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = spawn_store(dir.path(), |c| c.max_batch_results = 2).await;
    let status = put(&mut store.client, vec![]).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let status = put(&mut store.client, vec![result("q", "a", 0, 1.0); 3])
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("limit is 2"), "{status:?}");
    let mut no_window = result("q", "a", 0, 1.0);
    no_window.window_start = None;
    let status = put(&mut store.client, vec![result("q", "a", 0, 1.0), no_window])
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().starts_with("results[1].window_start"),
        "{status:?}"
    );
    assert!(range(&mut store.client, "a", None, None).await.is_empty());
    store.stop().await;
}

#[tokio::test]
async fn watchers_see_matching_results_once_they_are_durable() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = spawn_store(dir.path(), |_| {}).await;
    let mut sensors = store
        .client
        .watch(WatchRequest {
            query: "q".into(),
            key_prefix: "sensor-".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut everything = store
        .client
        .watch(WatchRequest::default())
        .await
        .unwrap()
        .into_inner();
    let batch = vec![
        result("q", "sensor-1", 0, 1.0),
        result("q", "other", 0, 2.0),
        result("q2", "sensor-2", 0, 3.0),
        result("q", "sensor-3", 0, 4.0),
    ];
    put(&mut store.client, batch.clone()).await.unwrap();
    for expected in [&batch[0], &batch[3]] {
        assert_eq!(sensors.message().await.unwrap().as_ref(), Some(expected));
    }
    for expected in &batch {
        assert_eq!(everything.message().await.unwrap().as_ref(), Some(expected));
    }
    // Shutdown ends the stream with UNAVAILABLE rather than holding the drain open.
    store.trigger.trigger();
    let end = sensors.message().await;
    assert!(
        matches!(&end, Ok(None)) || matches!(&end, Err(s) if s.code() == Code::Unavailable),
        "{end:?}"
    );
    tokio::time::timeout(Duration::from_secs(10), store.handle)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn a_watcher_that_falls_behind_is_told_so() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = spawn_store(dir.path(), |c| {
        c.watch_buffer = 4;
        c.fsync = runnel_log::FsyncPolicy::Never;
    })
    .await;
    let mut slow = store
        .client
        .watch(WatchRequest::default())
        .await
        .unwrap()
        .into_inner();
    // Far more than the stream buffer plus the watch buffer, and nobody reading.
    for chunk in 0..40 {
        let batch = (0..10)
            .map(|i| result("q", "k", (chunk * 10 + i) * 1000, 1.0))
            .collect();
        put(&mut store.client, batch).await.unwrap();
    }
    let mut delivered = 0;
    let status = loop {
        match slow.message().await {
            Ok(Some(_)) => delivered += 1,
            Ok(None) => panic!("the stream ended without saying why after {delivered}"),
            Err(status) => break status,
        }
    };
    assert!(delivered < 400, "a lagging watcher got everything?");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("Range"), "{status:?}");
    store.stop().await;
}
