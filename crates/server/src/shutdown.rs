//! Shutdown: one trigger, any number of listeners.
//!
//! A service receives a [`Shutdown`] when it starts. The binary triggers it on SIGTERM or
//! SIGINT; the all-in-one CLI triggers it for all five services at once; tests trigger it
//! directly. Long-lived work (streams, consumers, background flushers) selects on
//! [`Shutdown::wait`] so that it ends instead of holding the drain open.

use std::future::Future;
use std::time::Duration;
use tokio::sync::watch;

/// Fires the shutdown of everything holding a matching [`Shutdown`].
#[derive(Debug, Clone)]
pub struct ShutdownTrigger(watch::Sender<bool>);

/// Resolves when shutdown has been triggered.
#[derive(Debug, Clone)]
pub struct Shutdown(watch::Receiver<bool>);

impl Shutdown {
    /// A trigger and its first listener.
    pub fn new() -> (ShutdownTrigger, Shutdown) {
        let (tx, rx) = watch::channel(false);
        (ShutdownTrigger(tx), Shutdown(rx))
    }

    /// Waits until shutdown is triggered (or every trigger is gone).
    pub async fn wait(&self) {
        let mut rx = self.0.clone();
        // An error means the trigger was dropped, which we treat as a shutdown too.
        let _ = rx.wait_for(|stop| *stop).await;
    }

    /// Whether shutdown has been triggered.
    pub fn is_triggered(&self) -> bool {
        *self.0.borrow()
    }

    /// Runs `tick` every `period` (the first time one period from now) until shutdown.
    /// A tick that overruns delays the next one rather than bunching them up.
    pub async fn run_every<F, Fut>(&self, period: Duration, mut tick: F)
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = ()>,
    {
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => tick().await,
                () = self.wait() => return,
            }
        }
    }
}

impl ShutdownTrigger {
    /// Starts the shutdown.
    pub fn trigger(&self) {
        let _ = self.0.send(true);
    }

    /// Another listener for this trigger.
    pub fn subscribe(&self) -> Shutdown {
        Shutdown(self.0.subscribe())
    }
}

/// A future that resolves on the first SIGTERM or SIGINT.
///
/// The handlers are installed when this is called, not when the future is first polled:
/// call it before telling anyone the process is up, so that a signal sent right after that
/// is caught rather than killing the process with the default action.
pub fn signal() -> impl Future<Output = ()> + Send {
    use tokio::signal::unix::{SignalKind, signal};
    let handlers = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    );
    async move {
        let (mut term, mut int) = match handlers {
            (Ok(term), Ok(int)) => (term, int),
            _ => {
                // Without signal handlers we can still stop on Ctrl-C through tokio's helper.
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("received SIGTERM"),
            _ = int.recv() => tracing::info!("received SIGINT"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_listener_sees_the_trigger() {
        let (trigger, first) = Shutdown::new();
        let second = trigger.subscribe();
        assert!(!first.is_triggered());
        let waiter = tokio::spawn(async move { second.wait().await });
        trigger.trigger();
        waiter.await.unwrap();
        assert!(first.is_triggered());
        first.wait().await;
    }

    #[tokio::test(start_paused = true)]
    async fn run_every_ticks_until_shutdown() {
        let (trigger, shutdown) = Shutdown::new();
        let ticks = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let counted = ticks.clone();
        let runner = tokio::spawn(async move {
            shutdown
                .run_every(Duration::from_secs(1), || {
                    counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    async {}
                })
                .await
        });
        tokio::time::sleep(Duration::from_millis(3500)).await;
        assert_eq!(ticks.load(std::sync::atomic::Ordering::SeqCst), 3);
        trigger.trigger();
        runner.await.unwrap();
    }

    #[tokio::test]
    async fn dropping_the_trigger_releases_waiters() {
        let (trigger, listener) = Shutdown::new();
        drop(trigger);
        listener.wait().await;
    }
}
