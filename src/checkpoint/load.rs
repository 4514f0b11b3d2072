//! Reading checkpoints back: one step with every file checked against `state.json`, and the
//! newest committed step that passes those checks.

use std::collections::BTreeMap;

use bytes::Bytes;

use super::layout::{validate_file_names, COMMIT_FILE, STATE_FILE};
use super::remote::Remote;
use super::save::sha256_hex;
use super::{CheckpointState, LoadedCheckpoint};
use crate::error::{Error, Result};

/// Loads `step`, verifying `COMMIT`, `state.json` and the size and sha256 of every file.
pub(crate) fn load_step(remote: &Remote, step: u64) -> Result<LoadedCheckpoint> {
    let checkpoint = remote.step_url(step);
    let damaged = |reason: String| Error::Checkpoint {
        checkpoint: checkpoint.clone(),
        reason,
    };

    let commit = remote.get(step, COMMIT_FILE)?.ok_or_else(|| {
        damaged(format!(
            "not committed: no `{COMMIT_FILE}` marker (the save was interrupted or is still running)"
        ))
    })?;
    let state_json = remote
        .get(step, STATE_FILE)?
        .ok_or_else(|| damaged(format!("`{STATE_FILE}` is missing")))?;
    check_state_against_commit(&checkpoint, &commit, &state_json)?;
    let state: CheckpointState = serde_json::from_slice(&state_json).map_err(|e| {
        damaged(format!(
            "`{STATE_FILE}` is not a valid checkpoint record: {e}"
        ))
    })?;
    if state.step != step {
        return Err(damaged(format!(
            "`{STATE_FILE}` records step {}, expected {step} from the folder name",
            state.step
        )));
    }
    // A record naming `../x` is damage, not a path to follow.
    validate_file_names(&checkpoint, state.files.keys().map(String::as_str))?;

    let mut files = BTreeMap::new();
    for (name, record) in &state.files {
        let problem = |problem: String| Error::CheckpointFile {
            checkpoint: checkpoint.clone(),
            file: name.clone(),
            problem,
        };
        let bytes = remote.get(step, name)?.ok_or_else(|| {
            problem(format!(
                "is missing (`{STATE_FILE}` lists it with {} bytes, sha256 {})",
                record.bytes, record.sha256
            ))
        })?;
        if bytes.len() as u64 != record.bytes {
            return Err(problem(format!(
                "has {} bytes, expected {} from `{STATE_FILE}`",
                bytes.len(),
                record.bytes
            )));
        }
        let found = sha256_hex(&bytes);
        if found != record.sha256 {
            return Err(problem(format!(
                "has sha256 {found}, expected {} from `{STATE_FILE}`",
                record.sha256
            )));
        }
        files.insert(name.clone(), bytes);
    }
    Ok(LoadedCheckpoint {
        url: checkpoint,
        state,
        files,
    })
}

/// `COMMIT` holds the sha256 of `state.json`, so a record damaged after the commit is caught
/// before its checksums are trusted. An empty marker (written by another tool) vouches for
/// nothing and is accepted.
fn check_state_against_commit(checkpoint: &str, commit: &Bytes, state_json: &Bytes) -> Result<()> {
    let expected = String::from_utf8_lossy(commit).trim().to_string();
    if expected.is_empty() {
        return Ok(());
    }
    let found = sha256_hex(state_json);
    if found == expected {
        return Ok(());
    }
    Err(Error::CheckpointFile {
        checkpoint: checkpoint.to_string(),
        file: STATE_FILE.to_string(),
        problem: format!("has sha256 {found}, expected {expected} from `{COMMIT_FILE}`"),
    })
}

/// The newest committed step that loads cleanly, falling back past damaged ones with a
/// warning. `Ok(None)` when nothing is committed; an error when the store cannot be read
/// (a store that is down must not look like a fresh start) or when every committed step is
/// damaged.
pub(crate) fn latest_valid(remote: &Remote) -> Result<Option<LoadedCheckpoint>> {
    let mut committed: Vec<u64> = remote
        .step_folders()?
        .into_iter()
        .filter(|folder| folder.committed)
        .map(|folder| folder.step)
        .collect();
    committed.sort_unstable_by(|a, b| b.cmp(a));

    let mut newest_damage = None;
    for step in &committed {
        match load_step(remote, *step) {
            Ok(loaded) => return Ok(Some(loaded)),
            Err(e) if is_damage(&e) => {
                tracing::warn!(
                    "checkpoint {} is damaged, falling back to the one before: {e}",
                    remote.step_url(*step)
                );
                newest_damage.get_or_insert(e);
            }
            Err(store_failure) => return Err(store_failure),
        }
    }
    match newest_damage {
        None => Ok(None),
        Some(e) => Err(Error::Checkpoint {
            checkpoint: remote.url().to_string(),
            reason: format!(
                "none of the {} committed checkpoints is intact; the newest: {e}",
                committed.len()
            ),
        }),
    }
}

/// Whether a load failed because of what is stored (fall back to an older step) rather than
/// because the store could not be read (stop).
fn is_damage(error: &Error) -> bool {
    matches!(
        error,
        Error::Checkpoint { .. } | Error::CheckpointFile { .. }
    )
}
