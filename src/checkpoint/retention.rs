//! `keep_last` retention, run after each successful commit: drop the oldest committed steps and
//! the leftovers of interrupted saves, never the checkpoint just written nor the one kept
//! apart as the best (`checkpoint.keep_best`), which does not count towards the last N.

use super::remote::{Remote, StepFolder};

/// The steps to delete after `just_written` was committed.
///
/// Keeps `just_written` and the `keep_last - 1` newest other committed steps (so a run resumed
/// from an older step never deletes the checkpoint it just wrote), and `kept_apart` besides
/// them; `keep_last == 0` keeps every committed step. Uncommitted folders older than the
/// newest commit are interrupted saves and go; newer ones may be a save still in progress
/// elsewhere and stay.
pub fn steps_to_delete(
    folders: &[StepFolder],
    just_written: u64,
    keep_last: usize,
    kept_apart: Option<u64>,
) -> Vec<u64> {
    let newest_commit = folders
        .iter()
        .filter(|f| f.committed)
        .map(|f| f.step)
        .chain(std::iter::once(just_written))
        .max()
        .unwrap_or(just_written);
    let mut older_commits: Vec<u64> = folders
        .iter()
        .filter(|f| f.committed && f.step != just_written)
        .map(|f| f.step)
        .collect();
    older_commits.sort_unstable_by(|a, b| b.cmp(a));
    // The best counts among the last N when it is one of them, and is kept besides them when
    // it is older.
    let expired_commits = if keep_last == 0 {
        Vec::new()
    } else {
        let mut expired = older_commits.split_off((keep_last - 1).min(older_commits.len()));
        expired.retain(|&step| Some(step) != kept_apart);
        expired
    };
    let stale_uncommitted = folders
        .iter()
        .filter(|f| !f.committed && f.step != just_written && f.step < newest_commit)
        .map(|f| f.step);
    let mut doomed: Vec<u64> = expired_commits
        .into_iter()
        .chain(stale_uncommitted)
        .collect();
    doomed.sort_unstable();
    doomed
}

/// Applies [`steps_to_delete`]. The new checkpoint is already safe, so a failure here is a
/// warning, not a failed save; the next commit tries again.
pub(crate) fn apply(remote: &Remote, just_written: u64, keep_last: usize, kept_apart: Option<u64>) {
    let folders = match remote.step_folders() {
        Ok(folders) => folders,
        Err(e) => {
            tracing::warn!("checkpoint retention skipped: {e}");
            return;
        }
    };
    for step in steps_to_delete(&folders, just_written, keep_last, kept_apart) {
        match remote.delete_step(step) {
            Ok(()) => tracing::info!("deleted old checkpoint {}", remote.step_url(step)),
            Err(e) => tracing::warn!("checkpoint retention: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn folders(committed: &[u64], uncommitted: &[u64]) -> Vec<StepFolder> {
        let mut all: Vec<StepFolder> = committed
            .iter()
            .map(|&step| StepFolder {
                step,
                committed: true,
            })
            .chain(uncommitted.iter().map(|&step| StepFolder {
                step,
                committed: false,
            }))
            .collect();
        all.sort_by_key(|f| f.step);
        all
    }

    #[test]
    fn keeps_the_newest_and_drops_the_rest() {
        let f = folders(&[10, 20, 30, 40], &[]);
        assert_eq!(steps_to_delete(&f, 40, 2, None), [10, 20]);
        assert_eq!(steps_to_delete(&f, 40, 1, None), [10, 20, 30]);
        assert!(steps_to_delete(&f, 40, 0, None).is_empty());
        assert!(steps_to_delete(&f, 40, 9, None).is_empty());
    }

    #[test]
    fn never_deletes_the_one_just_written_even_when_older() {
        let f = folders(&[10, 20, 30], &[]);
        assert_eq!(steps_to_delete(&f, 10, 2, None), [20]);
        assert_eq!(steps_to_delete(&f, 10, 1, None), [20, 30]);
    }

    #[test]
    fn the_best_is_kept_apart_from_the_last_n() {
        let f = folders(&[10, 20, 30, 40, 50], &[]);
        assert_eq!(steps_to_delete(&f, 50, 2, Some(20)), [10, 30]);
        assert_eq!(steps_to_delete(&f, 50, 1, Some(20)), [10, 30, 40]);
        // The best among the last N takes no extra place.
        assert_eq!(steps_to_delete(&f, 50, 2, Some(40)), [10, 20, 30]);
        assert_eq!(steps_to_delete(&f, 50, 1, Some(50)), [10, 20, 30, 40]);
    }

    #[test]
    fn stale_uncommitted_folders_go_newer_ones_stay() {
        let f = folders(&[10, 30], &[5, 20, 50]);
        assert_eq!(steps_to_delete(&f, 30, 0, None), [5, 20]);
        assert_eq!(steps_to_delete(&f, 30, 1, None), [5, 10, 20]);
    }
}
