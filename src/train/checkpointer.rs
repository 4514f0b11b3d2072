//! The checkpoint component (`checkpoint:` in the job): saves every `every_steps`, at the
//! run's end and when a stop was asked for, through the checkpoint store's background uploads.
//!
//! Invariants: rank 0 alone saves; a save's state names the world it came from; `finish`
//! returns only once every save is committed (or failed), so the run's last checkpoint is
//! never left half-written as the latest.

use burn::tensor::backend::AutodiffBackend;

use super::component::{due, AfterStep, Component, RunSummary};
use crate::checkpoint::{CheckpointOptions, CheckpointStore};
use crate::config::JobSpec;
use crate::dist::World;
use crate::error::Result;
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
        }))
    }

    /// Where a resumed run looks for its checkpoint.
    pub fn store(&self) -> &CheckpointStore {
        &self.store
    }
}

impl<AB: AutodiffBackend> Component<AB> for Checkpointer {
    fn after_step(&mut self, at: &mut AfterStep<'_, '_, AB>) -> Result<()> {
        let step = at.stats.step;
        if !(due(step, self.every_steps, true, at.end_of_run) || at.stopping) {
            return Ok(());
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
