//! Shutdown: one trigger, any number of listeners.
//!
//! A service receives a [`Shutdown`] when it starts. The binary triggers it on SIGTERM or
//! SIGINT; the all-in-one CLI triggers it for all five services at once; tests trigger it
//! directly. Long-lived work (streams, consumers, background flushers) selects on
//! [`Shutdown::wait`] so that it ends instead of holding the drain open.

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

/// Resolves on the first SIGTERM or SIGINT.
pub(crate) async fn signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (mut term, mut int) = match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
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

    #[tokio::test]
    async fn dropping_the_trigger_releases_waiters() {
        let (trigger, listener) = Shutdown::new();
        drop(trigger);
        listener.wait().await;
    }
}
