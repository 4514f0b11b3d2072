//! The checkpoint component (`checkpoint:` in the job): saves every `every_steps`, at the
//! run's end and when a stop was asked for, through the checkpoint store's background uploads;
//! with `keep_best`, also every evaluated step, keeping the best apart from the last N.
//!
//! Invariants: rank 0 alone saves; a save's state names the world it came from; `finish`
//! returns only once every save is committed (or failed), so the run's last checkpoint is
//! never left half-written as the latest; the best is chosen among this run's history only
//! (a run resumed from before the recorded best chooses anew).

use burn::tensor::backend::AutodiffBackend;

use super::component::{due, AfterStep, Component, RunSummary};
use crate::checkpoint::{BestCheckpoint, BestMetric, CheckpointOptions, CheckpointStore};
use crate::config::JobSpec;
use crate::dist::World;
use crate::error::Result;
use crate::eval::EvalReport;
use crate::storage::Location;
use crate::training_state::{
    text_encoder_identity, JobRecord, TrainingState, LOSS_GUARD_KEY, TEXT_ENCODER_KEY,
};

pub struct Checkpointer {
    store: CheckpointStore,
    every_steps: u64,
    world_size: usize,
    job: JobRecord,
    text_encoder: String,
    last: Option<String>,
    keep_best: Option<BestMetric>,
}

impl Checkpointer {
    /// The job's checkpointer on rank 0 when `checkpoint.url` is set, else `None`.
    pub fn open(job: &JobSpec, world: &World) -> Result<Option<Self>> {
        if job.checkpoint.url.is_empty() || !world.is_primary() {
            return Ok(None);
        }
        let options = CheckpointOptions {
            keep_last: job.checkpoint.keep_last,
            ..CheckpointOptions::default()
        };
        let store = CheckpointStore::at(Location::parse(&job.checkpoint.url)?, options);
        Ok(Some(Self {
            store,
            every_steps: job.checkpoint.every_steps,
            world_size: world.world_size,
            job: JobRecord::of(job),
            text_encoder: text_encoder_identity(job)?,
            last: None,
            keep_best: job.checkpoint.keep_best,
        }))
    }

    /// Takes up the best checkpoint `best.json` records, unless this run starts before it
    /// (its steps from there on are written again, so that record goes).
    pub fn continue_from(&self, start_step: u64) -> Result<()> {
        if self.keep_best.is_none() {
            return Ok(());
        }
        match self.store.best()? {
            Some(best) if best.step > start_step => {
                tracing::warn!(
                    "this run starts at step {start_step}, before the recorded best checkpoint \
                     (step {}, {} {}): it chooses its best anew",
                    best.step,
                    best.metric.name(),
                    best.value
                );
                self.store.forget_best()?;
            }
            recorded => self.store.set_best(recorded),
        }
        Ok(())
    }

    /// The kept metric's value in this step's first evaluation, if there was one.
    fn evaluated_value(&self, reports: Option<&Vec<EvalReport>>) -> Option<(f64, f64)> {
        let report = reports?.first()?;
        let value = match self.keep_best? {
            BestMetric::Fid => Some(report.fid),
            BestMetric::ClipScore => report.clip_score,
        };
        value.map(|v| (v, report.cfg))
    }

    /// Where a resumed run looks for its checkpoint.
    pub fn store(&self) -> &CheckpointStore {
        &self.store
    }
}

impl<AB: AutodiffBackend> Component<AB> for Checkpointer {
    fn after_step(&mut self, at: &mut AfterStep<'_, '_, AB>) -> Result<()> {
        let step = at.stats.step;
        let evaluated = self.evaluated_value(at.evaluated.as_ref());
        if !(due(step, self.every_steps, true, at.end_of_run) || at.stopping || evaluated.is_some())
        {
            return Ok(());
        }
        if let (Some(metric), Some((value, cfg))) = (self.keep_best, evaluated) {
            if BestCheckpoint::replaced_by(self.store.kept_best().as_ref(), metric, value) {
                self.store.set_best(Some(BestCheckpoint {
                    step,
                    metric,
                    value,
                    cfg,
                    checkpoint: self.store.step_url(step),
                }));
            }
        }
        let trainer = &*at.trainer;
        let (mut state, files) = TrainingState::pack(
            trainer.model(),
            trainer.ema(),
            &trainer.optimizer,
            step,
            trainer.position,
            &self.job,
        )?;
        state.world_size = self.world_size;
        if let Some(extra) = state.extra.as_object_mut() {
            extra.insert(
                TEXT_ENCODER_KEY.to_string(),
                self.text_encoder.clone().into(),
            );
            extra.insert(
                LOSS_GUARD_KEY.to_string(),
                serde_json::to_value(trainer.loss_guard_record())
                    .expect("finite numbers and counts serialise"),
            );
            if let Some(reports) = &at.evaluated {
                extra.insert("eval".to_string(), super::evaluation::reports_json(reports));
            }
        }
        // The store runs one save at a time: this waits for the previous one and returns its
        // error, if any; `finish` reports the last.
        self.store.save_async(state, files)?;
        self.last = Some(self.store.step_url(step));
        Ok(())
    }

    fn finish(&mut self, summary: &mut RunSummary) -> Result<()> {
        self.store.wait_all()?;
        summary.last_checkpoint = self.last.clone();
        Ok(())
    }
}
