//! What a run does around its steps, one component per concern: logging, sample grids,
//! checkpoints — and room for more (an evaluator, a preemption policy) without touching the
//! loop. Each component owns its config section and decides its own cadence; the loop calls
//! every component after every step, in order, then `finish` once when the run ends.
//!
//! Invariants: components run on every rank in the same order; a component that writes
//! (events, grids, checkpoints) is created on rank 0 only. An error from a component ends the
//! run after every component has finished (so a checkpoint in flight is still committed).

use burn::tensor::backend::AutodiffBackend;

use super::trainer::Trainer;
use crate::dist::signals::StopSignal;
use crate::error::Result;
use crate::metrics::{EventWriter, StepStats};

/// What a component sees after a step.
pub struct AfterStep<'t, 'a, AB: AutodiffBackend> {
    pub stats: &'t StepStats,
    /// The job's last step (`train.steps`) was just taken.
    pub end_of_run: bool,
    /// The run stops after this step, to be resumed later: a stop asked for (`train_until`,
    /// `--stop-after`), or a signal every rank agreed on (a component may set it).
    pub stopping: bool,
    /// The signal the run stops for, when it does.
    pub stop_signal: Option<StopSignal>,
    pub trainer: &'t mut Trainer<'a, AB>,
    /// The run's TensorBoard writer (rank 0, when `logging.dir` is set).
    pub events: Option<&'t mut EventWriter>,
    /// This step's evaluation reports (rank 0, when one ran), for the checkpoint's state.
    pub evaluated: Option<Vec<crate::eval::EvalReport>>,
}

/// Where a run's outputs went, filled in by the components' `finish`.
#[derive(Debug, Default)]
pub struct RunSummary {
    pub last_checkpoint: Option<String>,
    pub sample_grid: Option<String>,
}

pub trait Component<AB: AutodiffBackend> {
    fn after_step(&mut self, at: &mut AfterStep<'_, '_, AB>) -> Result<()>;

    /// The run ended, completed or not: wait for what is in flight and record what was
    /// written.
    fn finish(&mut self, _summary: &mut RunSummary) -> Result<()> {
        Ok(())
    }
}

/// A periodic cadence: every `every` steps (0 = never), plus the run's end when `at_end`.
pub fn due(step: u64, every: u64, at_end: bool, end_of_run: bool) -> bool {
    (every > 0 && step.is_multiple_of(every)) || (at_end && end_of_run)
}
