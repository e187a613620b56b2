//! Waiting for something that happens asynchronously — a result reaching the store, a
//! server refusing connections — by asking again until it holds or a deadline passes.
//!
//! What a pipeline does in the background has no event a test could await, so the test
//! polls: [`eventually`] asks the condition at once, then again after [`FIRST_POLL`],
//! doubling the pause up to [`LAST_POLL`] (quick for what happens soon, light on the
//! machine for what takes minutes), once more at the deadline, and then fails the test
//! with what it waited for. The clock is tokio's, so `tokio::time::pause` makes it
//! instant. A bare `sleep` would either wait too long or not long enough.

use std::future::Future;
use std::time::Duration;

/// The first pause between two asks.
pub const FIRST_POLL: Duration = Duration::from_millis(10);

/// The longest pause between two asks.
pub const LAST_POLL: Duration = Duration::from_millis(200);

/// What a condition answers: `true`/`false`, or `Some(value)`/`None`.
pub trait Outcome {
    /// What [`eventually`] returns once the condition holds.
    type Value;

    /// `Some` when the condition holds.
    fn holds(self) -> Option<Self::Value>;
}

impl Outcome for bool {
    type Value = ();

    fn holds(self) -> Option<()> {
        self.then_some(())
    }
}

impl<T> Outcome for Option<T> {
    type Value = T;

    fn holds(self) -> Option<T> {
        self
    }
}

/// A failure message made only when it is shown: `Deferred(|| format!("…{}", logs()))`.
pub struct Deferred<F>(pub F);

impl<F: Fn() -> String> std::fmt::Display for Deferred<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&(self.0)())
    }
}

/// Asks `condition` until it holds and returns what it answered then; panics, naming
/// `what` was awaited, when it still does not hold `within` after the first ask.
///
/// `what` is formatted only on failure: a [`Deferred`] can add what is known by then (the
/// services' logs, say).
pub async fn eventually<O, F, Fut>(
    within: Duration,
    what: impl std::fmt::Display,
    condition: F,
) -> O::Value
where
    O: Outcome,
    F: FnMut() -> Fut,
    Fut: Future<Output = O>,
{
    match holds_within(within, condition).await {
        Some(value) => value,
        None => panic!("timed out after {within:?} waiting for {what}"),
    }
}

/// Asks `condition` until it holds and returns what it answered then, or `None` when it
/// still does not hold `within` after the first ask — for a test that has more to say about
/// the failure than [`eventually`] can. The condition is always asked once more at the
/// deadline, so a slow ask cannot time out a condition that holds.
pub async fn holds_within<O, F, Fut>(within: Duration, mut condition: F) -> Option<O::Value>
where
    O: Outcome,
    F: FnMut() -> Fut,
    Fut: Future<Output = O>,
{
    let deadline = tokio::time::Instant::now() + within;
    let mut pause = FIRST_POLL;
    loop {
        let expired = tokio::time::Instant::now() >= deadline;
        if let Some(value) = condition().await.holds() {
            return Some(value);
        }
        if expired {
            return None;
        }
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        tokio::time::sleep(pause.min(left)).await;
        pause = (pause * 2).min(LAST_POLL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test(start_paused = true)]
    async fn returns_once_the_condition_holds() {
        let asked = AtomicU32::new(0);
        let value = eventually(Duration::from_secs(5), "the third ask", || async {
            let n = asked.fetch_add(1, Ordering::SeqCst) + 1;
            (n == 3).then_some(n * 10)
        })
        .await;
        assert_eq!(value, 30);
        assert_eq!(asked.load(Ordering::SeqCst), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_true_condition_returns_at_once() {
        let start = tokio::time::Instant::now();
        eventually(Duration::from_secs(5), "nothing", || async { true }).await;
        assert_eq!(start.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    #[should_panic(expected = "timed out after 1s waiting for the result in the store")]
    async fn fails_naming_what_it_awaited_at_the_deadline() {
        eventually(
            Duration::from_secs(1),
            "the result in the store",
            || async { false },
        )
        .await;
    }

    #[tokio::test(start_paused = true)]
    async fn asks_until_the_deadline_and_not_much_longer() {
        let start = tokio::time::Instant::now();
        let asked = AtomicU32::new(0);
        let outcome = holds_within(Duration::from_secs(1), || async {
            asked.fetch_add(1, Ordering::SeqCst);
            false
        })
        .await;
        assert_eq!(outcome, None, "it gives up");
        // The last ask is at the deadline, not a pause after it.
        assert_eq!(start.elapsed(), Duration::from_secs(1));
        // At 0, 10, 30, 70, 150, 310, 510, 710, 910 ms, and at the deadline.
        assert_eq!(asked.load(Ordering::SeqCst), 10);
    }

    #[tokio::test(start_paused = true)]
    async fn the_failure_says_what_it_knows_by_then() {
        let logs = std::sync::Mutex::new(String::from("nothing yet"));
        let outcome = tokio::spawn(async move {
            let what = Deferred(|| format!("a leader\n{}", logs.lock().unwrap()));
            eventually(Duration::from_secs(1), what, || async {
                *logs.lock().unwrap() = "no quorum".into();
                false
            })
            .await;
        })
        .await;
        let panic = outcome.unwrap_err().into_panic();
        let message = panic.downcast_ref::<String>().unwrap();
        assert_eq!(
            message,
            "timed out after 1s waiting for a leader\nno quorum"
        );
    }
}
