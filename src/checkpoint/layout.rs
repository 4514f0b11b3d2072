//! Where a checkpoint's objects live: `<url>/step-000001000/{<files>, state.json, COMMIT}`, and
//! which user-given file names may go there. Locations themselves are parsed by
//! [`Location`](crate::storage::Location).

use std::collections::BTreeSet;

use crate::error::{Error, Result};
use crate::storage::Location;

/// The record of the step: written after every file, so it can list their checksums.
pub const STATE_FILE: &str = "state.json";
/// Written last; a step folder without it is an interrupted save and is never loaded.
pub const COMMIT_FILE: &str = "COMMIT";

const STEP_PREFIX: &str = "step-";
/// Zero padding keeps the folders in step order for people listing them (`ls`, consoles).
const STEP_DIGITS: usize = 9;

/// `step-000001000` for step 1000.
pub fn step_dir_name(step: u64) -> String {
    format!("{STEP_PREFIX}{step:0STEP_DIGITS$}")
}

/// The step of a folder named by [`step_dir_name`]; `None` for anything else, so foreign
/// folders beside the checkpoints are left alone.
pub fn parse_step_dir(name: &str) -> Option<u64> {
    let digits = name.strip_prefix(STEP_PREFIX)?;
    let well_formed = digits.len() >= STEP_DIGITS && digits.bytes().all(|b| b.is_ascii_digit());
    well_formed.then(|| digits.parse().ok()).flatten()
}

/// `<parent>/step-000000123` → the parent folder and the step; `None` when the location is not
/// a step folder (it then names the checkpoint folder itself).
pub fn split_step(location: &Location) -> Option<(Location, u64)> {
    let step = parse_step_dir(location.name()?)?;
    Some((location.parent()?, step))
}

/// Rejects file names that would escape the step folder, collide with the checkpoint's own
/// records, or repeat, before anything is uploaded.
pub fn validate_file_names<'a>(
    checkpoint: &str,
    names: impl IntoIterator<Item = &'a str>,
) -> Result<()> {
    let mut seen = BTreeSet::new();
    for name in names {
        let problem = if name == STATE_FILE || name == COMMIT_FILE {
            Some(format!(
                "is reserved for the checkpoint's own record (`{STATE_FILE}` and `{COMMIT_FILE}` are written by the checkpoint store)"
            ))
        } else if !is_plain_file_name(name) {
            Some(
                "is not a plain file name: expected letters, digits, `.`, `_` or `-`, not starting with `.`"
                    .to_string(),
            )
        } else if !seen.insert(name) {
            Some("is given twice".to_string())
        } else {
            None
        };
        if let Some(problem) = problem {
            return Err(Error::CheckpointFile {
                checkpoint: checkpoint.to_string(),
                file: name.to_string(),
                problem,
            });
        }
    }
    Ok(())
}

fn is_plain_file_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_folders_round_trip_and_foreign_names_are_ignored() {
        for step in [0, 7, 1000, 999_999_999, 12_345_678_901] {
            assert_eq!(parse_step_dir(&step_dir_name(step)), Some(step));
        }
        assert_eq!(step_dir_name(1000), "step-000001000");
        for foreign in [
            "step-12",
            "step-00000000x",
            "steps-000000001",
            "tensorboard",
            "step-",
        ] {
            assert_eq!(parse_step_dir(foreign), None, "{foreign}");
        }
    }

    #[test]
    fn step_urls_split_into_parent_and_step() {
        let split = |url: &str| {
            split_step(&Location::parse(url).unwrap())
                .map(|(parent, step)| (parent.url().to_string(), step))
        };
        assert_eq!(
            split("s3://b/run/ckpt/step-000000123/"),
            Some(("s3://b/run/ckpt".to_string(), 123))
        );
        assert_eq!(split("s3://b/run/ckpt"), None);
        assert_eq!(
            split("memory://step-000000004"),
            Some(("memory://".to_string(), 4))
        );
    }

    #[test]
    fn bad_file_names_are_named_in_the_error() {
        for bad in ["state.json", "COMMIT", "../x", "a/b", "", ".hidden"] {
            let err = validate_file_names("memory://c/step-000000001", [bad]).unwrap_err();
            let message = err.to_string();
            assert!(message.contains(&format!("`{bad}`")), "{message}");
            assert!(message.contains("memory://c/step-000000001"), "{message}");
        }
        let err = validate_file_names("c", ["a.bin", "a.bin"]).unwrap_err();
        assert!(err.to_string().contains("given twice"), "{err}");
    }
}
