//! Writing one checkpoint (files, then `state.json`, then `COMMIT`) on a background thread, and
//! the bookkeeping that makes sure its outcome reaches the caller.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use sha2::{Digest, Sha256};

use super::best::{self, BestCheckpoint};
use super::layout::{COMMIT_FILE, STATE_FILE};
use super::remote::Remote;
use super::{retention, CheckpointState, FileRecord};
use crate::error::{Error, Result};

/// What a save does once its step is committed.
#[derive(Clone, Debug, Default)]
pub(crate) struct AfterCommit {
    pub keep_last: usize,
    /// The best checkpoint so far: kept apart by retention, and recorded in `best.json` when
    /// it is the step just written.
    pub best: Option<BestCheckpoint>,
}

/// Writes the checkpoint of `state.step` and, once it is committed, records it as the best
/// when it is (`after.best`) and applies retention.
///
/// `state.files` is replaced by the sizes and sha256 of `files`; `created_unix` is set to now
/// when it is 0.
pub(crate) fn write_checkpoint(
    remote: &Remote,
    after: AfterCommit,
    mut state: CheckpointState,
    files: Vec<(String, Bytes)>,
) -> Result<()> {
    let step = state.step;
    let checkpoint = remote.step_url(step);
    record_files(&mut state, &files);
    let state_json = serde_json::to_vec_pretty(&state).map_err(|e| Error::Checkpoint {
        checkpoint: checkpoint.clone(),
        reason: format!("cannot serialise `{STATE_FILE}`: {e}"),
    })?;

    // Re-saving a step (a run resumed before it) must not leave the old COMMIT vouching for
    // files that are half replaced.
    remote.uncommit(step)?;
    for (name, bytes) in files {
        remote.put(step, &name, bytes)?;
    }
    let state_sha256 = sha256_hex(&state_json);
    remote.put(step, STATE_FILE, Bytes::from(state_json))?;
    remote.put(step, COMMIT_FILE, Bytes::from(format!("{state_sha256}\n")))?;
    tracing::info!("checkpoint {checkpoint} committed");

    if let Some(best) = after.best.as_ref().filter(|best| best.step == step) {
        best::write(remote, best)?;
        tracing::info!(
            "{checkpoint} is the best so far ({} {})",
            best.metric.name(),
            best.value
        );
    }
    retention::apply(
        remote,
        step,
        after.keep_last,
        after.best.map(|best| best.step),
    );
    Ok(())
}

fn record_files(state: &mut CheckpointState, files: &[(String, Bytes)]) {
    state.files = files
        .iter()
        .map(|(name, bytes)| {
            let record = FileRecord {
                sha256: sha256_hex(bytes),
                bytes: bytes.len() as u64,
            };
            (name.clone(), record)
        })
        .collect();
    if state.created_unix == 0 {
        state.created_unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
    }
}

pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// The result of one background save, shared by its thread, its [`SaveHandle`] and the store.
#[derive(Debug)]
struct Outcome {
    slot: Mutex<Slot>,
    finished: Condvar,
}

#[derive(Debug)]
enum Slot {
    Running,
    Finished(Result<()>),
    /// The result was handed to one caller already; a failure's message is kept so that the
    /// save's own handle still says it failed.
    Reported {
        failure: Option<String>,
    },
}

impl Outcome {
    fn new() -> Self {
        Self {
            slot: Mutex::new(Slot::Running),
            finished: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Slot> {
        // A panic elsewhere cannot leave the slot half updated (it is replaced whole).
        self.slot
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn finish(&self, result: Result<()>) {
        let mut slot = self.lock();
        if matches!(*slot, Slot::Running) {
            *slot = Slot::Finished(result);
            self.finished.notify_all();
        }
    }

    fn is_finished(&self) -> bool {
        !matches!(*self.lock(), Slot::Running)
    }

    /// Waits for the save to end and takes its result. The first taker gets the result itself;
    /// afterwards a failure is restated only when `restate_failure` (for the save's own
    /// handle), since the store's callers were told already.
    fn take(&self, checkpoint: &str, restate_failure: bool) -> Result<()> {
        let mut slot = self.lock();
        while matches!(*slot, Slot::Running) {
            slot = self
                .finished
                .wait(slot)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
        match std::mem::replace(&mut *slot, Slot::Reported { failure: None }) {
            Slot::Finished(result) => {
                if let Err(e) = &result {
                    *slot = Slot::Reported {
                        failure: Some(e.to_string()),
                    };
                }
                result
            }
            Slot::Reported {
                failure: Some(message),
            } => {
                let restated = restate_failure.then(|| Error::Checkpoint {
                    checkpoint: checkpoint.to_string(),
                    reason: format!("the background save failed (reported earlier): {message}"),
                });
                *slot = Slot::Reported {
                    failure: Some(message),
                };
                restated.map_or(Ok(()), Err)
            }
            Slot::Reported { failure: None } | Slot::Running => Ok(()),
        }
    }
}

/// Marks the save failed if its thread ends without a result (a panic), so nobody waits forever.
struct FinishOnDrop {
    outcome: Arc<Outcome>,
    checkpoint: String,
}

impl Drop for FinishOnDrop {
    fn drop(&mut self) {
        self.outcome.finish(Err(Error::Checkpoint {
            checkpoint: self.checkpoint.clone(),
            reason: "the background save thread panicked before committing".into(),
        }));
    }
}

/// A save running in the background; returned by
/// [`CheckpointStore::save_async`](super::CheckpointStore::save_async).
#[derive(Debug)]
pub struct SaveHandle {
    step: u64,
    checkpoint: String,
    outcome: Arc<Outcome>,
}

impl SaveHandle {
    pub fn step(&self) -> u64 {
        self.step
    }

    /// The step folder's URL.
    pub fn checkpoint_url(&self) -> &str {
        &self.checkpoint
    }

    /// Whether the save has ended (committed or failed).
    pub fn is_finished(&self) -> bool {
        self.outcome.is_finished()
    }

    /// Blocks until the checkpoint is committed (`Ok`) or the save has failed. A failure is
    /// returned here even when the store already reported it to another caller.
    pub fn wait(self) -> Result<()> {
        self.outcome.take(&self.checkpoint, true)
    }
}

/// The store's side of the save in flight.
#[derive(Debug)]
pub(crate) struct InFlight {
    checkpoint: String,
    outcome: Arc<Outcome>,
    thread: JoinHandle<()>,
}

impl InFlight {
    /// Waits for the save to end; its failure, unless the handle's `wait` took it already.
    pub fn finish(self) -> Result<()> {
        // The outcome is set before the thread ends, even on a panic, so joining cannot hang;
        // a panic's payload adds nothing the outcome does not say.
        let _ = self.thread.join();
        self.outcome.take(&self.checkpoint, false)
    }
}

/// Starts writing the checkpoint on a new thread and returns at once.
pub(crate) fn spawn(
    remote: Arc<Remote>,
    after: AfterCommit,
    state: CheckpointState,
    files: Vec<(String, Bytes)>,
) -> Result<(InFlight, SaveHandle)> {
    let step = state.step;
    let checkpoint = remote.step_url(step);
    let outcome = Arc::new(Outcome::new());
    let guard = FinishOnDrop {
        outcome: outcome.clone(),
        checkpoint: checkpoint.clone(),
    };
    let thread = std::thread::Builder::new()
        .name(format!("ditrun-checkpoint-{step}"))
        .spawn(move || {
            let result = write_checkpoint(&remote, after, state, files);
            if let Err(e) = &result {
                tracing::error!("checkpoint save failed: {e}");
            }
            guard.outcome.finish(result);
        })
        .map_err(|e| Error::Checkpoint {
            checkpoint: checkpoint.clone(),
            reason: format!("cannot start the background save thread: {e}"),
        })?;
    let in_flight = InFlight {
        checkpoint: checkpoint.clone(),
        outcome: outcome.clone(),
        thread,
    };
    let handle = SaveHandle {
        step,
        checkpoint,
        outcome,
    };
    Ok((in_flight, handle))
}
