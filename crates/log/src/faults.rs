//! Storage fault injection, for tests only (the `faults` feature; never in a release build
//! of a service).
//!
//! Every append and every fsync of a [`LogFile`](crate::LogFile) (and of its
//! [`SyncHandle`](crate::SyncHandle)) passes through [`before`], which a test arms for the
//! files under one directory — its own temporary directory, so tests running side by side
//! in one process do not see each other's faults:
//!
//! - [`fail_next`] makes the next write or fsync under the directory fail with `EIO` or
//!   `ENOSPC`, once; [`fail_every`] until [`heal`].
//! - [`power_cut`] simulates losing power: every file under the directory is cut back to
//!   what its last successful fsync covered (what a file never synced held is lost whole),
//!   and from then on every write and fsync there fails with `EIO`, as on a machine that
//!   is off, until [`heal`] (the machine is back: reopen what was open). What an fsync
//!   covered is known for the files under a directory given to [`watch`] before they were
//!   opened.
//!
//! The cut is the worst case a real power cut allows for an append-only file — nothing
//! unsynced survives — and a write or fsync in progress finishes before the cut starts, so
//! no write lands half before and half after it.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, RwLock, RwLockReadGuard};

/// The operation a fault hits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// An append (the frames' write).
    Write,
    /// An fsync (`fdatasync`).
    Sync,
}

/// The error an injected fault returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// `EIO`: the device failed.
    Eio,
    /// `ENOSPC`: no space left on the device.
    Enospc,
}

impl Fault {
    fn error(self) -> io::Error {
        let code = match self {
            Fault::Eio => 5,     // EIO
            Fault::Enospc => 28, // ENOSPC
        };
        io::Error::from_raw_os_error(code)
    }
}

/// One armed fault.
#[derive(Debug)]
struct Rule {
    under: PathBuf,
    op: Op,
    fault: Fault,
    /// Fires once, or every time until healed.
    once: bool,
}

/// What the layer knows.
#[derive(Debug, Default)]
struct State {
    rules: Vec<Rule>,
    /// Directories whose power is off.
    cut: Vec<PathBuf>,
    /// Directories whose files' fsyncs are followed, for [`power_cut`].
    watched: Vec<PathBuf>,
    /// Each file's length as its last successful fsync left it durable.
    durable: HashMap<PathBuf, u64>,
}

/// Whether any test armed anything: until then, [`before`] costs one atomic load.
static ARMED: AtomicBool = AtomicBool::new(false);
static STATE: Mutex<Option<State>> = Mutex::new(None);
/// Held (shared) across every write and fsync; a power cut takes it exclusively.
static IN_FLIGHT: RwLock<()> = RwLock::new(());

fn with_state<T>(f: impl FnOnce(&mut State) -> T) -> T {
    let mut state = STATE.lock().unwrap_or_else(|e| e.into_inner());
    f(state.get_or_insert_with(State::default))
}

/// Follows what the fsyncs of the files under `dir` cover from now on, so that a
/// [`power_cut`] there knows what to keep: call it before opening them.
pub fn watch(dir: &Path) {
    ARMED.store(true, Ordering::Release);
    with_state(|state| state.watched.push(dir.to_owned()));
}

/// Makes the next `op` on a file under `dir` fail with `fault`, once.
pub fn fail_next(dir: &Path, op: Op, fault: Fault) {
    arm(dir, op, fault, true);
}

/// Makes every `op` on a file under `dir` fail with `fault` until [`heal`].
pub fn fail_every(dir: &Path, op: Op, fault: Fault) {
    arm(dir, op, fault, false);
}

fn arm(dir: &Path, op: Op, fault: Fault, once: bool) {
    ARMED.store(true, Ordering::Release);
    with_state(|state| {
        state.rules.push(Rule {
            under: dir.to_owned(),
            op,
            fault,
            once,
        });
    });
}

/// Simulates a power cut under `dir` (which must be [`watch`]ed): waits for the writes and
/// fsyncs in progress, cuts every file opened there since back to its last fsync (a file
/// that was never synced is emptied), and fails
/// every later write and fsync there with `EIO` until [`heal`]. Returns how many bytes
/// were cut.
pub fn power_cut(dir: &Path) -> io::Result<u64> {
    ARMED.store(true, Ordering::Release);
    let _quiet = IN_FLIGHT.write().unwrap_or_else(|e| e.into_inner());
    let files: Vec<(PathBuf, u64)> = with_state(|state| {
        state.cut.push(dir.to_owned());
        state
            .durable
            .iter()
            .filter(|(path, _)| path.starts_with(dir))
            .map(|(path, &len)| (path.clone(), len))
            .collect()
    });
    let mut cut = 0;
    for (path, durable) in files {
        let file = match std::fs::OpenOptions::new().write(true).open(&path) {
            Ok(file) => file,
            Err(error) if error.kind() == io::ErrorKind::NotFound => continue,
            Err(error) => return Err(error),
        };
        let len = file.metadata()?.len();
        if len > durable {
            file.set_len(durable)?;
            cut += len - durable;
        }
    }
    Ok(cut)
}

/// Takes every fault under `dir` away (and the power is back); its files stay watched.
pub fn heal(dir: &Path) {
    with_state(|state| {
        state.rules.retain(|rule| !rule.under.starts_with(dir));
        state.cut.retain(|cut| !cut.starts_with(dir));
    });
}

/// A write or fsync that may go ahead: hold it until the operation is done, so that a
/// power cut waits for it.
#[derive(Debug)]
pub(crate) struct Permit {
    _held: Option<RwLockReadGuard<'static, ()>>,
}

/// Called before `op` on `path`: the fault armed for it, if any, as an error.
pub(crate) fn before(path: &Path, op: Op) -> io::Result<Permit> {
    if !ARMED.load(Ordering::Acquire) {
        return Ok(Permit { _held: None });
    }
    let permit = IN_FLIGHT.read().unwrap_or_else(|e| e.into_inner());
    with_state(|state| {
        if state.cut.iter().any(|dir| path.starts_with(dir)) {
            return Err(Fault::Eio.error());
        }
        // A watched file written before any fsync of it was seen: nothing of it is
        // known to be durable.
        if state.watched.iter().any(|dir| path.starts_with(dir)) {
            state.durable.entry(path.to_owned()).or_default();
        }
        let hit = state
            .rules
            .iter()
            .position(|rule| rule.op == op && path.starts_with(&rule.under));
        match hit {
            Some(i) => {
                let fault = state.rules[i].fault;
                if state.rules[i].once {
                    state.rules.remove(i);
                }
                Err(fault.error())
            }
            None => Ok(()),
        }
    })?;
    Ok(Permit {
        _held: Some(permit),
    })
}

/// How long `file` is now: what an fsync starting now covers.
pub(crate) fn written(file: &std::fs::File) -> u64 {
    if !ARMED.load(Ordering::Acquire) {
        return 0;
    }
    file.metadata().map_or(0, |m| m.len())
}

/// Called after a successful fsync of `path` that began when the file was `len` bytes long.
pub(crate) fn synced(path: &Path, len: u64) {
    if !ARMED.load(Ordering::Acquire) {
        return;
    }
    with_state(|state| {
        if state.watched.iter().any(|dir| path.starts_with(dir)) {
            let durable = state.durable.entry(path.to_owned()).or_default();
            *durable = (*durable).max(len);
        }
    });
}

/// Called when `path` is cut back to `len` bytes (a torn tail removed, a failed write
/// undone) and synced: what is durable cannot be longer than the file.
pub(crate) fn truncated(path: &Path, len: u64) {
    if !ARMED.load(Ordering::Acquire) {
        return;
    }
    with_state(|state| {
        if let Some(durable) = state.durable.get_mut(path) {
            *durable = (*durable).min(len);
        }
    });
}
