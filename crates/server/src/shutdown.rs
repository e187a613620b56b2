//! Shutdown: one trigger, any number of listeners.
//!
//! A service receives a [`Shutdown`] when it starts. The binary triggers it on SIGTERM or
//! SIGINT; the all-in-one CLI triggers it for all five services at once; tests trigger it
//! directly. Long-lived work (streams, consumers, background flushers) selects on
//! [`Shutdown::wait`] so that it ends instead of holding the drain open.
//!
//! The grace period is one budget: it starts when shutdown fires, and every step of the
//! stop — draining calls, then whatever a service does after `serve` returns (flushing its
//! message log, letting its queries checkpoint, draining its HTTP API) — gets only what
//! [`Shutdown::remaining`] says is left, so the whole stop fits in one `drain_timeout`.

use std::future::Future;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

/// Fires the shutdown of everything holding a matching [`Shutdown`].
#[derive(Debug, Clone)]
pub struct ShutdownTrigger(watch::Sender<Option<Instant>>);

/// Resolves when shutdown has been triggered; knows when that was, for the grace period.
#[derive(Debug, Clone)]
pub struct Shutdown(watch::Receiver<Option<Instant>>);

impl Shutdown {
    /// A trigger and its first listener.
    pub fn new() -> (ShutdownTrigger, Shutdown) {
        let (tx, rx) = watch::channel(None);
        (ShutdownTrigger(tx), Shutdown(rx))
    }

    /// Waits until shutdown is triggered (or every trigger is gone).
    pub async fn wait(&self) {
        let mut rx = self.0.clone();
        // An error means the trigger was dropped, which we treat as a shutdown too.
        let _ = rx.wait_for(Option::is_some).await;
    }

    /// Whether shutdown has been triggered.
    pub fn is_triggered(&self) -> bool {
        self.0.borrow().is_some()
    }

    /// What is left of a grace period `grace` long that began when shutdown fired: all of
    /// it before then, nothing once it has run out. Each step after `serve` bounds itself
    /// by this, rather than by `grace` again, so the steps share one budget.
    pub fn remaining(&self, grace: Duration) -> Duration {
        match *self.0.borrow() {
            None => grace,
            Some(fired) => grace.saturating_sub(fired.elapsed()),
        }
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
    /// Starts the shutdown, and with it the grace period; triggering again changes
    /// neither.
    pub fn trigger(&self) {
        self.0.send_if_modified(|fired| {
            let first = fired.is_none();
            if first {
                *fired = Some(Instant::now());
            }
            first
        });
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

    #[tokio::test(start_paused = true)]
    async fn a_second_step_of_the_stop_gets_only_what_the_first_left() {
        let grace = Duration::from_secs(10);
        let (trigger, shutdown) = Shutdown::new();
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert_eq!(
            shutdown.remaining(grace),
            grace,
            "nothing is spent before shutdown"
        );
        trigger.trigger();
        let fired = Instant::now();
        // The first step (say, draining calls) takes 6 s of the 10.
        let first = tokio::time::timeout(
            shutdown.remaining(grace),
            tokio::time::sleep(Duration::from_secs(6)),
        )
        .await;
        assert!(first.is_ok());
        // Triggering again does not restart the clock.
        trigger.trigger();
        assert_eq!(shutdown.remaining(grace), Duration::from_secs(4));
        // The second (say, flushing a log) would take 10 s: it is cut off at the deadline.
        let second = tokio::time::timeout(
            shutdown.remaining(grace),
            tokio::time::sleep(Duration::from_secs(10)),
        )
        .await;
        assert!(second.is_err());
        assert_eq!(fired.elapsed(), grace);
        assert_eq!(shutdown.remaining(grace), Duration::ZERO);
    }

    #[tokio::test]
    async fn dropping_the_trigger_releases_waiters() {
        let (trigger, listener) = Shutdown::new();
        drop(trigger);
        listener.wait().await;
    }
}
