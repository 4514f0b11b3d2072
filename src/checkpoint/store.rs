//! [`CheckpointStore`]: the trainer's handle on a checkpoint folder, and [`load_url`] for a
//! checkpoint named by URL (`--resume <URL>`, `ditrun sample --checkpoint`).

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use object_store::path::Path;
use object_store::ObjectStore;

use super::best::{self, BestCheckpoint, BEST_ALIAS, BEST_FILE};
use super::layout::{split_step, validate_file_names};
use super::load;
use super::remote::Remote;
use super::retry::RetryPolicy;
use super::save::{self, AfterCommit, InFlight, SaveHandle};
use super::{CheckpointState, LoadedCheckpoint};
use crate::error::{Error, Result};
use crate::storage::Location;

/// Retention and retry settings of a [`CheckpointStore`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CheckpointOptions {
    /// Committed checkpoints kept after each save (the one just written included); 0 keeps all.
    pub keep_last: usize,
    pub retry: RetryPolicy,
}

/// The checkpoints under one URL: saving in the background, retention, discovery and loading.
///
/// Only one save runs at a time: [`save_async`](Self::save_async) first waits for the previous
/// save to end, so the training loop blocks only when checkpoints are requested faster than
/// they upload. Dropping the store waits for the save in flight, so a finished program never
/// leaves a checkpoint half written by its own choice.
pub struct CheckpointStore {
    remote: Arc<Remote>,
    keep_last: usize,
    best: Mutex<Option<BestCheckpoint>>,
    in_flight: Mutex<Option<InFlight>>,
}

impl std::fmt::Debug for CheckpointStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckpointStore")
            .field("url", &self.remote.url())
            .field("keep_last", &self.keep_last)
            .finish_non_exhaustive()
    }
}

impl CheckpointStore {
    /// Opens the checkpoint folder at `url` (file://, s3://, gs://, az://, memory:// or a
    /// local path) with the default [`RetryPolicy`]. Nothing is read or written yet.
    pub fn open(url: &str, keep_last: usize) -> Result<Self> {
        Self::open_with(
            url,
            CheckpointOptions {
                keep_last,
                ..CheckpointOptions::default()
            },
        )
    }

    pub fn open_with(url: &str, options: CheckpointOptions) -> Result<Self> {
        Ok(Self::at(Location::parse(url)?, options))
    }

    /// A checkpoint folder at `root` inside an already built store (a store with custom client
    /// options, or a wrapper around one); `url` is only used to name it in messages.
    pub fn from_store(
        store: Arc<dyn ObjectStore>,
        root: Path,
        url: &str,
        options: CheckpointOptions,
    ) -> Self {
        Self::at(Location::new(store, root, url), options)
    }

    /// The checkpoint folder at `folder`. Nothing is read or written yet.
    pub fn at(folder: Location, options: CheckpointOptions) -> Self {
        Self {
            remote: Arc::new(Remote::new(folder, options.retry)),
            keep_last: options.keep_last,
            best: Mutex::new(None),
            in_flight: Mutex::new(None),
        }
    }

    /// The checkpoint folder's URL (no trailing `/`).
    pub fn url(&self) -> &str {
        self.remote.url()
    }

    /// The URL of the step folder of `step`, whether or not it exists.
    pub fn step_url(&self, step: u64) -> String {
        self.remote.step_url(step)
    }

    /// Store operations that failed transiently so far (each one retried or, on the last
    /// attempt, reported): a health figure for logs.
    pub fn transient_failures(&self) -> u64 {
        self.remote.transient_failures()
    }

    /// Saves `files` (name → bytes, e.g. `model.safetensors`) and `state` as the checkpoint of
    /// `state.step`, on a background thread; returns as soon as that thread is started.
    ///
    /// The thread hashes the files into `state.files` (replacing what was there; `created_unix`
    /// is set when 0), uploads them, then `state.json`, then `COMMIT`, retrying transient store
    /// errors, and finally applies `keep_last` retention.
    ///
    /// Waits first for the previous save to end. If that save failed and its error was not yet
    /// returned by its [`SaveHandle::wait`], the error is returned here and this save is not
    /// started (call again to save it). Bad file names (`/`, `..`, `state.json`, `COMMIT`,
    /// duplicates) are rejected before anything is written.
    pub fn save_async(
        &self,
        state: CheckpointState,
        files: Vec<(String, Bytes)>,
    ) -> Result<SaveHandle> {
        validate_file_names(
            &self.remote.step_url(state.step),
            files.iter().map(|(name, _)| name.as_str()),
        )?;
        let mut in_flight = self.lock_in_flight();
        if let Some(previous) = in_flight.take() {
            previous.finish()?;
        }
        let after = AfterCommit {
            keep_last: self.keep_last,
            best: self.lock_best().clone(),
        };
        let (started, handle) = save::spawn(self.remote.clone(), after, state, files)?;
        *in_flight = Some(started);
        Ok(handle)
    }

    /// Saves and waits for the commit: [`save_async`](Self::save_async) then
    /// [`SaveHandle::wait`].
    pub fn save(&self, state: CheckpointState, files: Vec<(String, Bytes)>) -> Result<()> {
        self.save_async(state, files)?.wait()
    }

    /// Waits for the save in flight, if any; returns its failure unless its handle's `wait`
    /// already returned it.
    pub fn wait_all(&self) -> Result<()> {
        let previous = self.lock_in_flight().take();
        previous.map_or(Ok(()), InFlight::finish)
    }

    /// The committed steps (those with `COMMIT`), oldest first. Their files are not checked.
    pub fn list_committed(&self) -> Result<Vec<u64>> {
        Ok(self
            .remote
            .step_folders()?
            .into_iter()
            .filter(|folder| folder.committed)
            .map(|folder| folder.step)
            .collect())
    }

    /// Loads a committed step, checking every file's presence, size and sha256 against its
    /// `state.json`; errors name the checkpoint URL and the file.
    pub fn load(&self, step: u64) -> Result<LoadedCheckpoint> {
        load::load_step(&self.remote, step)
    }

    /// The newest committed step whose files all check out (`--resume auto`). A damaged newer
    /// step is skipped with a warning naming it and the damage. `Ok(None)` when nothing is
    /// committed; an error when the store cannot be read or every committed step is damaged.
    pub fn latest_valid(&self) -> Result<Option<LoadedCheckpoint>> {
        load::latest_valid(&self.remote)
    }

    /// Makes `best` the checkpoint retention keeps apart from the last N, from the next save
    /// on; the save of `best.step` also writes it as `best.json` once committed.
    pub fn set_best(&self, best: Option<BestCheckpoint>) {
        *self.lock_best() = best;
    }

    /// The best checkpoint set here, or else the one `best.json` records.
    pub fn best(&self) -> Result<Option<BestCheckpoint>> {
        if let Some(best) = self.kept_best() {
            return Ok(Some(best));
        }
        best::read(&self.remote)
    }

    /// The best checkpoint set here (no store access).
    pub fn kept_best(&self) -> Option<BestCheckpoint> {
        self.lock_best().clone()
    }

    /// Deletes `best.json` and forgets the best: for a run resumed from before the recorded
    /// best, whose steps from there on will be written again.
    pub fn forget_best(&self) -> Result<()> {
        self.set_best(None);
        best::delete(&self.remote)
    }

    fn lock_best(&self) -> std::sync::MutexGuard<'_, Option<BestCheckpoint>> {
        self.best
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn lock_in_flight(&self) -> std::sync::MutexGuard<'_, Option<InFlight>> {
        // The slot holds no invariant a panic could break half way.
        self.in_flight
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Drop for CheckpointStore {
    fn drop(&mut self) {
        if let Err(e) = self.wait_all() {
            tracing::error!("checkpoint save failed and nobody waited for it: {e}");
        }
    }
}

/// Loads the checkpoint a URL names: a step folder (`<url>/step-000000123`) exactly, the best
/// one (`<url>/best`, the step `best.json` names), or a checkpoint folder (`<url>`) through
/// [`CheckpointStore::latest_valid`]. Local paths work too.
pub fn load_url(checkpoint_url: &str) -> Result<LoadedCheckpoint> {
    load_location(&Location::parse(checkpoint_url)?)
}

/// [`load_url`] for a location already parsed.
pub fn load_location(location: &Location) -> Result<LoadedCheckpoint> {
    let options = CheckpointOptions::default();
    if let Some((parent, step)) = split_step(location) {
        return CheckpointStore::at(parent, options).load(step);
    }
    // A folder that happens to be named `best` is still read as one when its parent keeps no
    // record of a best checkpoint.
    if let (Some(BEST_ALIAS | BEST_FILE), Some(parent)) = (location.name(), location.parent()) {
        let store = CheckpointStore::at(parent, options.clone());
        if let Some(best) = store.best()? {
            return store.load(best.step);
        }
    }
    CheckpointStore::at(location.clone(), options)
        .latest_valid()?
        .ok_or_else(|| Error::Checkpoint {
            checkpoint: location.url().to_string(),
            reason: format!("no committed checkpoint here: expected step-NNNNNNNNN folders with a COMMIT marker, the URL of one such folder, or `<folder>/{BEST_ALIAS}` for the best one a run kept (checkpoint.keep_best)"),
        })
}
