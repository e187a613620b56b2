//! Services started in this process, as their binaries would run them.
//!
//! Each service exposes `run(config, listeners, shutdown)`. Binding the listeners first
//! (on `127.0.0.1:0` in tests, with [`loopback`]) tells the caller every address before
//! anything serves — so services can be wired to each other's real addresses, and a client
//! can connect at once, with no port to guess and no sleep. [`Services`] spawns them under
//! one shutdown and reports how each ended; `runnel up`, the benches and the tests start
//! services this way: [`Services::start`] on listeners bound from the configuration,
//! [`Services::start_on_loopback`] on port 0.

use runnel_server::{ListenAddrs, Listeners, ServiceConfig, Shutdown, ShutdownTrigger};
use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::task::{Id, JoinSet};

/// gRPC and admin listeners on `127.0.0.1:0`, and an HTTP one when `http`.
///
/// # Panics
/// When loopback cannot be bound (a test cannot run then).
async fn loopback(http: bool) -> Listeners {
    let bind = || async {
        TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0")
    };
    Listeners {
        grpc: bind().await,
        admin: bind().await,
        http: if http { Some(bind().await) } else { None },
    }
}

/// How one service ended.
#[derive(Debug)]
pub enum Ended {
    /// `run` returned `Ok`: it drained and stopped.
    Stopped(&'static str),
    /// `run` returned an error (shown with `Display`).
    Failed(&'static str, String),
    /// The service's task panicked or was cancelled.
    Panicked(&'static str, String),
}

impl Ended {
    /// The service's name, as given to [`Services::start`].
    pub fn name(&self) -> &'static str {
        match self {
            Ended::Stopped(name) | Ended::Failed(name, _) | Ended::Panicked(name, _) => name,
        }
    }

    /// `Ok` if the service stopped cleanly, else what went wrong.
    pub fn result(&self) -> Result<(), String> {
        match self {
            Ended::Stopped(_) => Ok(()),
            Ended::Failed(name, error) => Err(format!("{name} failed: {error}")),
            Ended::Panicked(name, error) => Err(format!("{name} panicked: {error}")),
        }
    }
}

/// Services running in this process under one shutdown.
///
/// Dropping it triggers the shutdown and leaves the services to drain on their own.
pub struct Services {
    trigger: ShutdownTrigger,
    shutdown: Shutdown,
    tasks: JoinSet<Ended>,
    names: HashMap<Id, &'static str>,
}

impl Default for Services {
    fn default() -> Self {
        Services::new()
    }
}

impl Services {
    /// No services yet, and a shutdown not yet triggered.
    pub fn new() -> Services {
        let (trigger, shutdown) = Shutdown::new();
        Services {
            trigger,
            shutdown,
            tasks: JoinSet::new(),
            names: HashMap::new(),
        }
    }

    /// The shutdown the services stop on, for other tasks that should stop with them.
    pub fn shutdown(&self) -> Shutdown {
        self.shutdown.clone()
    }

    /// Spawns `run(config, listeners, shutdown)` as the service `name` and returns the
    /// addresses it listens on (bound already, so callers may connect at once).
    ///
    /// # Errors
    /// When a listener's address cannot be read.
    pub fn start<C, E, Fut>(
        &mut self,
        name: &'static str,
        run: impl FnOnce(C, Listeners, Shutdown) -> Fut,
        config: C,
        listeners: Listeners,
    ) -> std::io::Result<ListenAddrs>
    where
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: std::fmt::Display,
    {
        let addrs = listeners.local_addrs()?;
        let service = run(config, listeners, self.shutdown.clone());
        let handle = self.tasks.spawn(async move {
            match service.await {
                Ok(()) => Ended::Stopped(name),
                Err(error) => Ended::Failed(name, error.to_string()),
            }
        });
        self.names.insert(handle.id(), name);
        Ok(addrs)
    }

    /// [`start`](Services::start) on listeners bound to `127.0.0.1:0` — with an HTTP one
    /// when the service has an HTTP API (its configuration listens on one) — for tests.
    ///
    /// # Panics
    /// When loopback cannot be bound (a test cannot run then).
    pub async fn start_on_loopback<C, E, Fut>(
        &mut self,
        name: &'static str,
        run: impl FnOnce(C, Listeners, Shutdown) -> Fut,
        config: C,
    ) -> ListenAddrs
    where
        C: ServiceConfig,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: std::fmt::Display,
    {
        let listeners = loopback(config.listen().http.is_some()).await;
        self.start(name, run, config, listeners)
            .expect("the addresses of listeners just bound")
    }

    /// Starts the shutdown: every service stops accepting and drains.
    pub fn trigger(&self) {
        self.trigger.trigger();
    }

    /// Waits until the next service ends; `None` when none is left.
    pub async fn next_ended(&mut self) -> Option<Ended> {
        let joined = self.tasks.join_next_with_id().await?;
        Some(match joined {
            Ok((_, ended)) => ended,
            Err(error) => {
                let name = self.names.get(&error.id()).copied().unwrap_or("a service");
                Ended::Panicked(name, error.to_string())
            }
        })
    }

    /// Runs `work` while the services serve: its output, or how a service went wrong if one
    /// ends first (a service is not meant to end before the work is done).
    ///
    /// # Errors
    /// The first service to end before `work` is done, named.
    pub async fn during<T>(&mut self, work: impl Future<Output = T>) -> Result<T, String> {
        tokio::select! {
            output = work => Ok(output),
            Some(ended) = self.next_ended() => Err(match ended.result() {
                Ok(()) => format!("{} stopped before it was asked to", ended.name()),
                Err(error) => error,
            }),
        }
    }

    /// Triggers the shutdown and waits until every service has ended, at most `within`.
    ///
    /// # Errors
    /// The first service that did not stop cleanly, or those still running at the deadline.
    pub async fn stop(mut self, within: Duration) -> Result<(), String> {
        self.trigger();
        let mut first_error = None;
        let all = async {
            while let Some(ended) = self.next_ended().await {
                if let (Err(error), None) = (ended.result(), &first_error) {
                    first_error = Some(error);
                }
            }
        };
        if tokio::time::timeout(within, all).await.is_err() {
            return Err(format!("services still running {within:?} after shutdown"));
        }
        first_error.map_or(Ok(()), Err)
    }
}

impl Drop for Services {
    fn drop(&mut self) {
        self.trigger.trigger();
        self.tasks.detach_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn until_shutdown(
        reply: &'static str,
        listeners: Listeners,
        shutdown: Shutdown,
    ) -> Result<(), String> {
        let _listeners = listeners;
        shutdown.wait().await;
        if reply.is_empty() {
            Ok(())
        } else {
            Err(reply.to_owned())
        }
    }

    async fn crashing((): (), _: Listeners, _: Shutdown) -> Result<(), String> {
        panic!("boom")
    }

    #[tokio::test]
    async fn a_started_service_listens_where_it_said_before_it_is_stopped() {
        let mut services = Services::new();
        let addrs = services
            .start("echo", until_shutdown, "", loopback(true).await)
            .unwrap();
        assert_ne!(addrs.grpc.port(), 0);
        assert!(addrs.http.is_some());
        tokio::net::TcpStream::connect(addrs.grpc).await.unwrap();
        services.stop(Duration::from_secs(5)).await.unwrap();
    }

    #[tokio::test]
    async fn stop_reports_a_service_that_failed_by_name() {
        let mut services = Services::new();
        services
            .start("fine", until_shutdown, "", loopback(false).await)
            .unwrap();
        services
            .start("broken", until_shutdown, "disk full", loopback(false).await)
            .unwrap();
        assert_eq!(
            services.stop(Duration::from_secs(5)).await,
            Err("broken failed: disk full".to_owned())
        );
    }

    #[tokio::test]
    async fn work_is_cut_short_by_a_service_that_fails_during_it() {
        let mut services = Services::new();
        assert_eq!(services.during(async { 7 }).await, Ok(7), "no service");
        services
            .start("broken", until_shutdown, "disk full", loopback(false).await)
            .unwrap();
        assert_eq!(services.during(async { 7 }).await, Ok(7), "still serving");
        services.trigger();
        let forever = std::future::pending::<()>();
        assert_eq!(
            services.during(forever).await,
            Err("broken failed: disk full".to_owned())
        );
    }

    #[tokio::test]
    async fn a_panicking_service_is_named() {
        let mut services = Services::new();
        services
            .start("crashing", crashing, (), loopback(false).await)
            .unwrap();
        let ended = services.next_ended().await.unwrap();
        assert_eq!(ended.name(), "crashing");
        assert!(matches!(ended, Ended::Panicked(..)), "{ended:?}");
    }
}
