//! Checkpoints in any object store, independent of the model: the trainer hands over named
//! byte blobs (safetensors, optimiser state) and a [`CheckpointState`]; this folder uploads
//! them off the training thread, commits them, applies retention and loads them back verified.
//!
//! Layout: `<url>/step-000001000/` holds the given files, then `state.json` (this state with
//! every file's size and sha256), then, written last, `COMMIT` (the sha256 of `state.json`).
//! A step folder without `COMMIT` is an interrupted save and is never loaded or "latest".
//! `<url>/best.json` names the best step by an evaluation metric when a run keeps one apart.
//! The folder is a [`Location`](crate::storage::Location): every store operation goes through
//! it, so checkpoints accept exactly the paths and URLs the rest of the crate does.

mod best;
mod layout;
mod load;
mod remote;
mod retention;
mod retry;
mod save;
mod store;

use std::collections::BTreeMap;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

pub use best::{BestCheckpoint, BestMetric, BEST_FILE};
pub use layout::{parse_step_dir, step_dir_name, COMMIT_FILE, STATE_FILE};
pub use remote::StepFolder;
pub use retention::steps_to_delete;
pub use retry::RetryPolicy;
pub use save::SaveHandle;
pub use store::{load_location, load_url, CheckpointOptions, CheckpointStore};

/// Everything besides the files that a resumed run needs, stored as `state.json`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct CheckpointState {
    /// Optimizer steps done.
    pub step: u64,
    /// Data position of the next batch: epoch and sample position in that epoch's order.
    pub epoch: u64,
    pub position: u64,
    /// Opaque RNG state words, restored as they were.
    pub rng: Vec<u64>,
    /// Hash of the effective job config, to notice a resume under a different config.
    pub config_hash: String,
    pub world_size: usize,
    /// Filled in by the save: each file's sha256 and size.
    pub files: BTreeMap<String, FileRecord>,
    /// Seconds since the Unix epoch; set by the save when 0.
    pub created_unix: u64,
    /// Free-form fields for the trainer.
    pub extra: serde_json::Value,
}

/// One file of a checkpoint as recorded in `state.json`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct FileRecord {
    /// Lower-case hex.
    pub sha256: String,
    pub bytes: u64,
}

/// A checkpoint read back with every file verified.
#[derive(Clone, Debug)]
pub struct LoadedCheckpoint {
    /// The step folder's URL, for logs ("resumed from ...").
    pub url: String,
    pub state: CheckpointState,
    pub files: BTreeMap<String, Bytes>,
}
