//! The queries this analyzer runs: those of its configuration, from start to shutdown, and
//! those created at run time ([`crate::registry`]), started and stopped as the registry
//! says — on every replica alike, since every replica follows the same log.
//!
//! A query runs as one [`StageRunner`] per stage. A created query's stages stop on their
//! own trigger when it is dropped (checkpointing what was written downstream, as at
//! shutdown, and leaving their groups); a stage that fails stops the whole analyzer, as
//! for a configured query.

use crate::checkpoint::Stage;
use crate::error::AnalyzerError;
use crate::plan::Plan;
use crate::registry::{Created, Snapshot};
use crate::runner::{Context, StageRunner, StageStatus};
use crate::service::QueryView;
use runnel_proto::v1::StartFrom;
use runnel_server::{Shutdown, ShutdownTrigger};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

/// A query at work.
struct Running {
    view: Arc<QueryView>,
    /// A created query's incarnation and its own stop; `None` for a configured query.
    created: Option<(u64, ShutdownTrigger)>,
}

/// Every query this analyzer runs.
pub(crate) struct Queries {
    context: Context,
    running: Mutex<BTreeMap<String, Running>>,
    /// Every stage task started, to wait for at shutdown.
    stages: Mutex<Vec<JoinHandle<()>>>,
    failures: mpsc::UnboundedSender<AnalyzerError>,
    /// Bumped whenever the set of running queries changes.
    changed: watch::Sender<u64>,
}

impl std::fmt::Debug for Queries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queries").finish_non_exhaustive()
    }
}

impl Queries {
    /// No queries yet; a stage that fails sends its error to `failures`.
    pub(crate) fn new(
        context: Context,
        failures: mpsc::UnboundedSender<AnalyzerError>,
    ) -> Arc<Queries> {
        Arc::new(Queries {
            context,
            running: Mutex::new(BTreeMap::new()),
            stages: Mutex::new(Vec::new()),
            failures,
            changed: watch::Sender::new(0),
        })
    }

    /// Starts a configured query (given in `sql`, if it was).
    pub(crate) fn start_configured(&self, plan: Plan, sql: Option<String>) {
        let view = self.spawn(Arc::new(plan), None, self.context.clone());
        let view = match sql {
            Some(sql) => Arc::new(QueryView {
                sql: Some(sql),
                ..Arc::unwrap_or_clone(view)
            }),
            None => view,
        };
        self.insert(
            view.name.clone(),
            Running {
                view,
                created: None,
            },
        );
    }

    fn insert(&self, name: String, running: Running) {
        if let Ok(mut queries) = self.running.lock() {
            queries.insert(name, running);
        }
        self.changed.send_modify(|n| *n += 1);
    }

    /// Starts a query's stages with `context`.
    fn spawn(
        &self,
        plan: Arc<Plan>,
        created: Option<&Created>,
        context: Context,
    ) -> Arc<QueryView> {
        let stage = |stage: Stage| {
            let (status, receiver) = watch::channel(StageStatus::default());
            let runner = StageRunner {
                plan: Arc::clone(&plan),
                stage,
                context: context.clone(),
                status,
            };
            let failures = self.failures.clone();
            let handle = tokio::spawn(async move {
                if let Err(error) = runner.run().await {
                    let _ = failures.send(error);
                }
            });
            if let Ok(mut stages) = self.stages.lock() {
                stages.retain(|h| !h.is_finished());
                stages.push(handle);
            }
            receiver
        };
        let source = stage(Stage::Source);
        let keyed = plan.key.is_some().then(|| stage(Stage::Keyed));
        Arc::new(QueryView {
            name: plan.name.clone(),
            topic: plan.topic.clone(),
            definition: plan.definition.clone(),
            sql: created.map(|c| c.sql.clone()),
            start_from: created.map(|c| c.start_from),
            source,
            keyed,
        })
    }

    /// Every query's view, by name.
    pub(crate) fn views(&self) -> Vec<Arc<QueryView>> {
        self.running
            .lock()
            .map(|q| q.values().map(|r| Arc::clone(&r.view)).collect())
            .unwrap_or_default()
    }

    /// One query's view.
    pub(crate) fn view(&self, name: &str) -> Option<Arc<QueryView>> {
        self.running
            .lock()
            .ok()?
            .get(name)
            .map(|r| Arc::clone(&r.view))
    }

    /// Whether `name` is a configured query (not one created at run time).
    pub(crate) fn is_configured(&self, name: &str) -> bool {
        self.running
            .lock()
            .is_ok_and(|q| q.get(name).is_some_and(|r| r.created.is_none()))
    }

    /// Waits until the query `name` runs here as incarnation `incarnation` (`None`: until
    /// it does not run), at most `patience`.
    pub(crate) async fn settled(
        &self,
        name: &str,
        incarnation: Option<u64>,
        patience: Duration,
    ) -> bool {
        let mut changed = self.changed.subscribe();
        let here = |queries: &Queries| {
            queries.running.lock().is_ok_and(|q| {
                q.get(name)
                    .and_then(|r| r.created.as_ref().map(|(i, _)| *i))
                    == incarnation
            })
        };
        let settled = async {
            loop {
                if here(self) {
                    return;
                }
                if changed.changed().await.is_err() {
                    return;
                }
            }
        };
        tokio::time::timeout(patience, settled).await.is_ok() && here(self)
    }

    /// Runs the created queries as the registry says, until shutdown: starts those it
    /// lists that do not run here, stops those that run here and it no longer lists (or
    /// lists as another incarnation).
    pub(crate) async fn follow(self: Arc<Self>, mut registry: watch::Receiver<Snapshot>) {
        loop {
            let snapshot = registry.borrow_and_update().clone();
            if snapshot.loaded {
                self.reconcile(&snapshot.queries);
            }
            tokio::select! {
                changed = registry.changed() => if changed.is_err() { return },
                () = self.context.shutdown.wait() => return,
            }
        }
    }

    fn reconcile(&self, listed: &BTreeMap<String, Created>) {
        let stale: Vec<String> = self
            .running
            .lock()
            .map(|q| {
                q.iter()
                    .filter_map(|(name, r)| {
                        let (incarnation, _) = r.created.as_ref()?;
                        let current = listed.get(name).map(|c| c.incarnation);
                        (current != Some(*incarnation)).then(|| name.clone())
                    })
                    .collect()
            })
            .unwrap_or_default();
        for name in stale {
            let removed = self.running.lock().ok().and_then(|mut q| q.remove(&name));
            if let Some(Running {
                created: Some((incarnation, stop)),
                ..
            }) = removed
            {
                tracing::info!(query = %name, incarnation, "query dropped; stopping it");
                stop.trigger();
                self.changed.send_modify(|n| *n += 1);
            }
        }
        for (name, created) in listed {
            let runs = self.running.lock().is_ok_and(|q| q.contains_key(name));
            if runs {
                // A configured query of that name wins (CreateQuery refuses it; a
                // configuration changed later shadows the created one).
                continue;
            }
            match created_plan(created) {
                Ok(plan) => {
                    let (stop, stopped) = Shutdown::new();
                    // The analyzer's shutdown stops it too; its own stop ends the watch.
                    let (parent, own, forward) =
                        (self.context.shutdown.clone(), stopped.clone(), stop.clone());
                    tokio::spawn(async move {
                        tokio::select! {
                            () = parent.wait() => forward.trigger(),
                            () = own.wait() => {}
                        }
                    });
                    let context = Context {
                        shutdown: stopped,
                        ..self.context.clone()
                    };
                    tracing::info!(query = %name, incarnation = created.incarnation, "running a created query");
                    let view = self.spawn(Arc::new(plan), Some(created), context);
                    self.insert(
                        name.clone(),
                        Running {
                            view,
                            created: Some((created.incarnation, stop)),
                        },
                    );
                }
                Err(error) => {
                    // Checked when it was created: only a newer analyzer writes otherwise.
                    tracing::error!(query = %name, %error, "a created query does not compile here; not running it");
                }
            }
        }
    }

    /// Waits for every stage to stop, at most `patience`; false if some did not.
    pub(crate) async fn drained(&self, patience: Duration) -> bool {
        let handles: Vec<JoinHandle<()>> = self
            .stages
            .lock()
            .map(|mut s| std::mem::take(&mut *s))
            .unwrap_or_default();
        tokio::time::timeout(patience, async {
            for handle in handles {
                let _ = handle.await;
            }
        })
        .await
        .is_ok()
    }
}

/// The plan of a created query: its SQL compiled, named after its incarnation, and
/// starting where it was created to start.
pub(crate) fn created_plan(created: &Created) -> Result<Plan, AnalyzerError> {
    let table = crate::sql::compile(&created.name, &created.sql)
        .map_err(|e| AnalyzerError::InvalidArgument(e.to_string()))?;
    // What the compiled query breaks, said of the query rather than of a configuration
    // entry (`window.size: must be …`).
    let mut plan = table.compile(0).map_err(|error| match error {
        runnel_server::ConfigError::Invalid { key, message } => {
            let field = key
                .split_once("queries[0].")
                .map_or(key.as_str(), |(_, f)| f);
            AnalyzerError::InvalidArgument(format!("{field}: {message}"))
        }
        other => AnalyzerError::InvalidArgument(other.to_string()),
    })?;
    plan.instance = created.instance();
    if created.start_from == StartFrom::Latest {
        plan.start_offsets = created.start_offsets.clone();
    }
    Ok(plan)
}
