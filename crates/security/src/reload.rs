//! Material built from files — certificates, keys, tokens, JWKS — and rebuilt when the
//! files change.
//!
//! The files are read again every `interval` and compared with what was last built from;
//! only when the bytes differ is the material rebuilt, and only a build that succeeds
//! replaces it: a half-written or broken file leaves the service on what it had (logged
//! and counted in `runnel_security_reloads_total{outcome="error"}`). Comparing contents
//! rather than modification times also catches Kubernetes' secret updates, which swap a
//! symlink and keep the old timestamps.
//!
//! The watcher task holds only a weak reference: it ends on its own once the last user of
//! the material is gone.

use crate::SecurityError;
use std::path::PathBuf;
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

/// Builds `T` from the contents of its files, in the order they were given.
pub(crate) type Build<T> = dyn Fn(&[Vec<u8>]) -> Result<T, SecurityError> + Send + Sync;

/// The current `T`, rebuilt from its files when they change.
pub(crate) struct Reloading<T> {
    what: &'static str,
    paths: Vec<PathBuf>,
    build: Box<Build<T>>,
    state: RwLock<State<T>>,
}

struct State<T> {
    current: Arc<T>,
    contents: Vec<Vec<u8>>,
}

impl<T> std::fmt::Debug for Reloading<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloading")
            .field("what", &self.what)
            .field("paths", &self.paths)
            .finish_non_exhaustive()
    }
}

fn read_all(paths: &[PathBuf]) -> Result<Vec<Vec<u8>>, SecurityError> {
    paths
        .iter()
        .map(|path| {
            std::fs::read(path).map_err(|source| SecurityError::Read {
                path: path.clone(),
                source,
            })
        })
        .collect()
}

impl<T: Send + Sync + 'static> Reloading<T> {
    /// Builds `T` from `paths` now (an error here stops the caller: a service must not
    /// start without its certificates), then watches them every `interval` if there is a
    /// runtime to watch on.
    pub(crate) fn watch(
        what: &'static str,
        paths: Vec<PathBuf>,
        interval: Duration,
        build: Box<Build<T>>,
    ) -> Result<Arc<Reloading<T>>, SecurityError> {
        let contents = read_all(&paths)?;
        let current = Arc::new(build(&contents)?);
        let reloading = Arc::new(Reloading {
            what,
            paths,
            build,
            state: RwLock::new(State { current, contents }),
        });
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(watcher(Arc::downgrade(&reloading), interval));
        }
        Ok(reloading)
    }

    /// What was last built successfully.
    pub(crate) fn current(&self) -> Arc<T> {
        match self.state.read() {
            Ok(state) => Arc::clone(&state.current),
            Err(poisoned) => Arc::clone(&poisoned.into_inner().current),
        }
    }

    /// Reads the files once and rebuilds if they changed; `Ok(true)` if it replaced the
    /// material.
    pub(crate) fn check(&self) -> Result<bool, SecurityError> {
        let contents = read_all(&self.paths)?;
        {
            let state = self.state.read().unwrap_or_else(|p| p.into_inner());
            if state.contents == contents {
                return Ok(false);
            }
        }
        let built = Arc::new((self.build)(&contents)?);
        let mut state = self.state.write().unwrap_or_else(|p| p.into_inner());
        *state = State {
            current: built,
            contents,
        };
        Ok(true)
    }
}

async fn watcher<T: Send + Sync + 'static>(reloading: Weak<Reloading<T>>, interval: Duration) {
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let Some(reloading) = reloading.upgrade() else {
            return;
        };
        // File reads are small (certificates, keys) but still blocking I/O.
        let checked = {
            let reloading = Arc::clone(&reloading);
            tokio::task::spawn_blocking(move || reloading.check()).await
        };
        match checked {
            Ok(Ok(true)) => {
                tracing::info!(what = reloading.what, paths = ?reloading.paths, "reloaded");
                metrics::counter!("runnel_security_reloads_total", "what" => reloading.what, "outcome" => "reloaded")
                    .increment(1);
            }
            Ok(Ok(false)) => {}
            Ok(Err(error)) => {
                tracing::error!(what = reloading.what, %error, "reload failed; keeping the previous version");
                metrics::counter!("runnel_security_reloads_total", "what" => reloading.what, "outcome" => "error")
                    .increment(1);
            }
            Err(error) => tracing::error!(%error, "reload task failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text_of(files: &[Vec<u8>]) -> Result<String, SecurityError> {
        let text = String::from_utf8(files[0].clone())
            .map_err(|_| SecurityError::Invalid("not utf-8".into()))?;
        if text.is_empty() {
            return Err(SecurityError::Invalid("empty".into()));
        }
        Ok(text)
    }

    #[test]
    fn a_change_is_picked_up_and_a_broken_file_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("material");
        std::fs::write(&path, "one").unwrap();
        let reloading = Reloading::watch(
            "test",
            vec![path.clone()],
            Duration::from_secs(3600),
            Box::new(text_of),
        )
        .unwrap();
        assert_eq!(*reloading.current(), "one");
        assert!(!reloading.check().unwrap());

        std::fs::write(&path, "two").unwrap();
        assert!(reloading.check().unwrap());
        assert_eq!(*reloading.current(), "two");

        std::fs::write(&path, "").unwrap();
        assert!(reloading.check().is_err());
        assert_eq!(
            *reloading.current(),
            "two",
            "a bad file keeps the old material"
        );

        std::fs::remove_file(&path).unwrap();
        assert!(reloading.check().is_err());
        assert_eq!(*reloading.current(), "two");
    }

    #[test]
    fn a_missing_file_at_start_is_an_error_naming_it() {
        let error = Reloading::watch(
            "test",
            vec![PathBuf::from("/nonexistent/cert.pem")],
            Duration::from_secs(1),
            Box::new(text_of),
        )
        .unwrap_err();
        assert!(
            error.to_string().contains("/nonexistent/cert.pem"),
            "{error}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_watcher_reloads_on_its_own_and_stops_when_unused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("material");
        std::fs::write(&path, "one").unwrap();
        let reloading = Reloading::watch(
            "test",
            vec![path.clone()],
            Duration::from_millis(50),
            Box::new(text_of),
        )
        .unwrap();
        std::fs::write(&path, "two").unwrap();
        // Paused time advances only while everything waits; the blocking read is real.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while *reloading.current() != "two" {
            assert!(std::time::Instant::now() < deadline, "never reloaded");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let weak = Arc::downgrade(&reloading);
        drop(reloading);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(weak.upgrade().is_none());
    }
}
