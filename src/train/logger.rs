//! The logging component (`logging:` in the job): every `every_steps`, a progress line (or
//! bar) and the step's scalars to TensorBoard; at the start, the effective config as text and
//! the run's hyper-parameters.

use std::collections::BTreeMap;

use burn::tensor::backend::AutodiffBackend;

use super::component::{AfterStep, Component, RunSummary};
use crate::config::JobSpec;
use crate::error::Result;
use crate::metrics::{EventWriter, EventWriterOptions, HParamValue, Progress};
use crate::storage::Location;

pub struct Logger {
    progress: Progress,
    distributed: bool,
}

impl Logger {
    pub fn new(job: &JobSpec, start_step: u64, world_size: usize) -> Self {
        Self {
            progress: Progress::new(job.train.steps, start_step, job.logging.every_steps),
            distributed: world_size > 1,
        }
    }
}

/// The run's TensorBoard writer when `logging.dir` is set, opened with the config and the
/// hyper-parameters at `start_step`.
pub fn open_events(
    job: &JobSpec,
    config_hash: &str,
    start_step: u64,
    world_size: usize,
) -> Result<Option<EventWriter>> {
    if job.logging.dir.is_empty() {
        return Ok(None);
    }
    let mut writer = EventWriter::create_in(
        &Location::parse(&job.logging.dir)?,
        &job.name,
        EventWriterOptions::default(),
    )?;
    writer.text(
        "config",
        start_step,
        &format!("```yaml\n{}\n```\nhash `{config_hash}`", job.to_yaml()),
    )?;
    writer.hparams(&hparams(job, world_size), &["loss", "grad_norm"])?;
    Ok(Some(writer))
}

impl<AB: AutodiffBackend> Component<AB> for Logger {
    fn after_step(&mut self, at: &mut AfterStep<'_, '_, AB>) -> Result<()> {
        let stats = at.stats;
        if let Some(why) = &stats.skipped {
            // Every skip, whatever the logging cadence: each one is a step the model missed.
            tracing::warn!(
                step = stats.step,
                skipped_steps = stats.skipped_steps,
                "step skipped on every rank: {why}"
            );
        }
        if !self.progress.update(stats) {
            return Ok(());
        }
        let Some(writer) = at.events.as_deref_mut() else {
            return Ok(());
        };
        let mut scalars = vec![
            ("train/loss", stats.loss),
            ("train/lr", stats.lr),
            ("train/grad_norm", stats.grad_norm),
            ("train/images_per_sec", stats.images_per_sec),
            ("train/step_secs", stats.step_secs),
            ("train/data_wait_secs", stats.data_wait_secs),
        ];
        if self.distributed {
            scalars.push(("train/allreduce_secs", stats.allreduce_secs));
        }
        if stats.skipped_steps > 0 {
            scalars.push(("train/skipped_steps", stats.skipped_steps as f64));
        }
        for (tag, value) in scalars {
            writer.scalar(tag, stats.step, value)?;
        }
        Ok(())
    }

    fn finish(&mut self, _: &mut RunSummary) -> Result<()> {
        self.progress.finish();
        Ok(())
    }
}

fn hparams(job: &JobSpec, world_size: usize) -> BTreeMap<String, HParamValue> {
    BTreeMap::from([
        ("dist.world_size".into(), world_size.into()),
        ("model.dim".into(), job.model.dim.into()),
        ("model.depth".into(), job.model.depth.into()),
        ("model.heads".into(), job.model.heads.into()),
        ("model.patch_size".into(), job.model.patch_size.into()),
        ("train.batch_size".into(), job.train.batch_size.into()),
        ("train.lr".into(), job.train.lr.into()),
        ("train.weight_decay".into(), job.train.weight_decay.into()),
        (
            "train.text_drop_prob".into(),
            job.train.text_drop_prob.into(),
        ),
        ("train.ema_decay".into(), job.train.ema_decay.into()),
        ("train.steps".into(), job.train.steps.into()),
        (
            "text_encoder.weights".into(),
            job.text_encoder
                .weights
                .clone()
                .unwrap_or_else(|| "random-init".into())
                .into(),
        ),
    ])
}
