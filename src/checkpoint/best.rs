//! The best checkpoint by an evaluation metric (`checkpoint.keep_best`), kept apart from the
//! last N: `<url>/best.json` names its step, the metric and its value, like Lightning's
//! `best_model_path`. `ditrun sample|eval|inspect --checkpoint <url>/best` load that step.
//!
//! Invariants: `best.json` is written by the save thread only after its step's `COMMIT`, so it
//! never names a half-written checkpoint; retention never deletes the step it names while the
//! run that chose it is alive; a run resumed from before that step chooses its best anew.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::remote::Remote;
use crate::error::{Error, Result};

/// The record's name in the checkpoint folder.
pub const BEST_FILE: &str = "best.json";
/// The name that stands for the best step in a checkpoint URL (`<url>/best`).
pub const BEST_ALIAS: &str = "best";

/// Which number of an evaluation ranks checkpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BestMetric {
    /// Lower is better.
    Fid,
    /// Higher is better.
    ClipScore,
}

impl BestMetric {
    pub fn name(self) -> &'static str {
        match self {
            Self::Fid => "fid",
            Self::ClipScore => "clip_score",
        }
    }

    /// Whether `candidate` beats `incumbent`; a NaN never wins.
    pub fn improves(self, candidate: f64, incumbent: f64) -> bool {
        match self {
            Self::Fid => candidate < incumbent,
            Self::ClipScore => candidate > incumbent,
        }
    }
}

/// What `best.json` holds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BestCheckpoint {
    pub step: u64,
    pub metric: BestMetric,
    pub value: f64,
    /// The guidance scale of the evaluation that gave `value`.
    pub cfg: f64,
    /// The step folder's URL, for people reading the file.
    pub checkpoint: String,
}

impl BestCheckpoint {
    /// Whether a checkpoint evaluated at `value` should replace `current` (none yet: yes, when
    /// the value is a number).
    pub fn replaced_by(current: Option<&Self>, metric: BestMetric, value: f64) -> bool {
        !value.is_nan()
            && current
                .is_none_or(|best| best.metric != metric || metric.improves(value, best.value))
    }
}

/// `best.json` of the checkpoint folder, `None` when there is none.
pub(crate) fn read(remote: &Remote) -> Result<Option<BestCheckpoint>> {
    let Some(bytes) = remote.get_root(BEST_FILE)? else {
        return Ok(None);
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| Error::Checkpoint {
            checkpoint: format!("{}/{BEST_FILE}", remote.url()),
            reason: format!("not a best-checkpoint record: {e}"),
        })
}

pub(crate) fn write(remote: &Remote, best: &BestCheckpoint) -> Result<()> {
    let json = serde_json::to_vec_pretty(best).expect("numbers and strings serialise");
    remote.put_root(BEST_FILE, Bytes::from(json))
}

pub(crate) fn delete(remote: &Remote) -> Result<()> {
    remote.delete_root(BEST_FILE)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn best(metric: BestMetric, value: f64) -> BestCheckpoint {
        BestCheckpoint {
            step: 10,
            metric,
            value,
            cfg: 4.0,
            checkpoint: "memory:///c/step-000000010".into(),
        }
    }

    #[test]
    fn fid_falls_and_clip_score_rises() {
        let fid = best(BestMetric::Fid, 50.0);
        assert!(BestCheckpoint::replaced_by(
            Some(&fid),
            BestMetric::Fid,
            49.0
        ));
        assert!(!BestCheckpoint::replaced_by(
            Some(&fid),
            BestMetric::Fid,
            50.0
        ));
        assert!(!BestCheckpoint::replaced_by(
            Some(&fid),
            BestMetric::Fid,
            51.0
        ));
        let clip = best(BestMetric::ClipScore, 25.0);
        assert!(BestCheckpoint::replaced_by(
            Some(&clip),
            BestMetric::ClipScore,
            26.0
        ));
        assert!(!BestCheckpoint::replaced_by(
            Some(&clip),
            BestMetric::ClipScore,
            24.0
        ));
    }

    #[test]
    fn a_first_number_wins_and_nan_never_does() {
        assert!(BestCheckpoint::replaced_by(None, BestMetric::Fid, 1e9));
        assert!(!BestCheckpoint::replaced_by(
            None,
            BestMetric::Fid,
            f64::NAN
        ));
        let fid = best(BestMetric::Fid, 50.0);
        assert!(!BestCheckpoint::replaced_by(
            Some(&fid),
            BestMetric::Fid,
            f64::NAN
        ));
        // A record of another metric (the job changed keep_best) is replaced.
        assert!(BestCheckpoint::replaced_by(
            Some(&fid),
            BestMetric::ClipScore,
            1.0
        ));
    }
}
