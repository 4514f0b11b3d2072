//! Training on one rank: caption shards → cached text context → flow-matching loss → AdamW
//! (warm-up + cosine, global-norm clipping) → EMA, with components around the steps (logs and
//! TensorBoard events, sample grids, checkpoints) and exact resume from the latest checkpoint.
//!
//! Layout: `trainer.rs` sets a run up once (`setup.rs`: shards, text cache, starting state)
//! and takes one step at a time; `component.rs` is what runs around the steps, one file per
//! component (`logger.rs`, `sampler.rs`, `evaluation.rs`, `checkpointer.rs`), each owning its config section
//! and cadence; [`run`] below drives them. `randomness.rs` draws each step's noise ahead;
//! `params.rs` and `schedule.rs` are a step's arithmetic.

mod checkpointer;
mod component;
mod evaluation;
mod logger;
mod loss_guard;
mod params;
mod preemption;
mod randomness;
mod rank_times;
mod sampler;
mod schedule;
mod setup;
mod trainer;

use burn::module::AutodiffModule;
use burn::tensor::backend::AutodiffBackend;

pub use crate::training_state::{
    restore_optimizer, snapshot_from_bytes, snapshot_to_bytes, with_path_ids, TrainingState,
    EMA_FILE, JOB_KEY, MODEL_FILE, OPTIMIZER_FILE,
};
pub use component::{AfterStep, Component, RunSummary};
pub use params::{global_grad_norm, scale_grads, update_ema};
pub use schedule::learning_rate;
pub use setup::Resume;
pub use trainer::{Stepped, Trainer};

use crate::config::JobSpec;
use crate::dist::signals::StopSignal;
use crate::dist::{ensure_same_on_all_ranks, parameter_digest, Collective, SingleProcess, World};
use crate::error::{Error, Result};
use crate::kernels::autocast::Precision;
use checkpointer::Checkpointer;
use evaluation::Evaluation;
use logger::{open_events, Logger};
use preemption::Preemption;
use rank_times::RankTimes;
use sampler::SampleGrids;

/// What a finished run reports (each rank prints its own).
#[derive(Clone, Debug, serde::Serialize)]
pub struct TrainOutcome {
    pub steps_done: u64,
    pub resumed_from: Option<u64>,
    pub final_loss: f64,
    pub config_hash: String,
    pub last_checkpoint: Option<String>,
    pub sample_grid: Option<String>,
    pub rank: usize,
    pub world_size: usize,
    /// Images per rank per forward pass, and passes per optimiser step.
    pub micro_batch_size: usize,
    pub accumulation_steps: usize,
    /// sha256 of the final parameters' bits: equal on every rank of a run.
    pub params_sha256: String,
    /// The signal the run stopped for (SIGTERM, SIGINT, SIGHUP), after a final checkpoint.
    pub stopped_by: Option<String>,
    /// What the process should exit with: 0, or 128 + the signal's number.
    pub exit_code: i32,
    /// Steps skipped on every rank for a non-finite or spiking loss (`train.on_nonfinite`).
    pub skipped_steps: u64,
}

pub fn train(job: &JobSpec, resume: &Resume) -> Result<TrainOutcome> {
    train_until(job, resume, None)
}

/// Like [`train`], but stops after step `stop_after` as a preempted job would: with a
/// checkpoint of that step, from which `Resume::Auto` continues the same run.
pub fn train_until(
    job: &JobSpec,
    resume: &Resume,
    stop_after: Option<u64>,
) -> Result<TrainOutcome> {
    train_ranked(job, resume, stop_after, &World::single(), &SingleProcess)
}

/// One rank of a data-parallel run: every rank calls this with the same job; gradients are
/// averaged through `collective`, and rank 0 alone writes checkpoints, events and samples.
pub fn train_ranked(
    job: &JobSpec,
    resume: &Resume,
    stop_after: Option<u64>,
    world: &World,
    collective: &dyn Collective,
) -> Result<TrainOutcome> {
    let backend = job.train.backend.resolve()?;
    if job.train.precision == Precision::Bf16 && !backend.has_bf16() {
        return Err(Error::Config(format!(
            "train.precision: bf16 needs a backend with bf16 tensors (cuda, flex), but train.backend \
             resolves to `{}` here",
            backend.name()
        )));
    }
    let gpu = backend.is_gpu();
    crate::with_backend!(backend, B => {
        let device = crate::backend::rank_device::<B>(world, gpu)?;
        run::<burn::backend::Autodiff<B>>(job, resume, stop_after, world, collective, device)
    })
}

/// One rank's run: set up, step until the end (or `stop_after`), let every component act
/// after each step, finish them, and check that all ranks end with the same parameters.
fn run<AB: AutodiffBackend>(
    job: &JobSpec,
    resume: &Resume,
    stop_after: Option<u64>,
    world: &World,
    collective: &dyn Collective,
    device: AB::Device,
) -> Result<TrainOutcome> {
    let checkpointer = Checkpointer::open(job, world)?;
    let end = stop_after.map_or(job.train.steps, |stop| stop.min(job.train.steps));
    let store = checkpointer.as_ref().map(Checkpointer::store);
    let mut trainer = Trainer::<AB>::new(job, resume, store, end, world, collective, device)?;
    // Every checkpoint is of a step ≥ 1, so a non-zero start is a resume (on every rank, also
    // those that received rank 0's checkpoint instead of reading one).
    let resumed_from = (trainer.start_step > 0).then_some(trainer.start_step);
    if let Some(checkpointer) = &checkpointer {
        checkpointer.continue_from(trainer.start_step)?;
    }
    let mut events = None;
    let mut components: Vec<Box<dyn Component<AB>>> = vec![Box::new(Preemption)];
    let rank_times = RankTimes::new(job.logging.every_steps, world.world_size);
    components.extend(rank_times.map(|c| Box::new(c) as Box<dyn Component<AB>>));
    if world.is_primary() {
        if let Some(step) = resumed_from {
            tracing::info!(
                step,
                epoch = trainer.position.epoch,
                position = trainer.position.position,
                "resumed"
            );
        }
        events = open_events(
            job,
            &trainer.config_hash,
            trainer.start_step,
            world.world_size,
        )?;
        components.push(Box::new(Logger::new(
            job,
            trainer.start_step,
            world.world_size,
        )));
        components.extend(SampleGrids::new(job).map(|c| Box::new(c) as Box<dyn Component<AB>>));
    }
    let ema_device = trainer.ema().final_norm.weight.device();
    let evaluation = Evaluation::<AB::InnerBackend>::open(job, collective, &ema_device)?;
    components.extend(evaluation.map(|c| Box::new(c) as Box<dyn Component<AB>>));
    components.extend(checkpointer.map(|c| Box::new(c) as Box<dyn Component<AB>>));

    let stepped = drive(&mut trainer, &mut components, events.as_mut(), stop_after);
    let mut summary = RunSummary::default();
    for component in &mut components {
        component.finish(&mut summary)?;
    }
    let (steps_done, final_loss, stop_signal) = match stepped? {
        Ran::To { step, loss, signal } => (step, loss, signal),
        Ran::Halted { step, why } => {
            return Err(Error::Training(format!(
                "step {step}: {why}; stopping. The last good checkpoint ({}) stays the latest",
                summary
                    .last_checkpoint
                    .as_deref()
                    .unwrap_or("none written in this run"),
            )))
        }
    };
    if let Some(writer) = events {
        writer.close()?;
    }
    let params_sha256 = parameter_digest(&trainer.model().valid());
    ensure_same_on_all_ranks(
        collective,
        &format!("parameters after step {steps_done} (sha256)"),
        &params_sha256,
    )?;
    Ok(TrainOutcome {
        steps_done,
        resumed_from,
        final_loss,
        config_hash: trainer.config_hash.clone(),
        last_checkpoint: summary.last_checkpoint,
        sample_grid: summary.sample_grid,
        rank: world.rank,
        world_size: world.world_size,
        micro_batch_size: trainer.micro_batch,
        accumulation_steps: trainer.accumulation,
        params_sha256,
        stopped_by: stop_signal.map(|signal| signal.name().to_string()),
        exit_code: stop_signal.map_or(0, |signal| signal.exit_code()),
        skipped_steps: trainer.loss_guard_record().skipped_total,
    })
}

/// How the steps ended: at a step (the last, or the one a stop was asked after), or where
/// the loss guard halted the run.
enum Ran {
    To {
        step: u64,
        loss: f64,
        signal: Option<StopSignal>,
    },
    Halted {
        step: u64,
        why: String,
    },
}

/// The training loop.
fn drive<AB: AutodiffBackend>(
    trainer: &mut Trainer<'_, AB>,
    components: &mut [Box<dyn Component<AB>>],
    mut events: Option<&mut crate::metrics::EventWriter>,
    stop_after: Option<u64>,
) -> Result<Ran> {
    let total = trainer.job.train.steps;
    let mut ran = Ran::To {
        step: trainer.start_step,
        loss: f64::NAN,
        signal: None,
    };
    for step in trainer.start_step..total {
        let stats = match trainer.step(step)? {
            Stepped::Done(stats) => stats,
            Stepped::Halted { step, why, .. } => return Ok(Ran::Halted { step, why }),
        };
        let mut at = AfterStep {
            stats: &stats,
            end_of_run: stats.step == total,
            stopping: stop_after == Some(stats.step),
            stop_signal: None,
            trainer: &mut *trainer,
            events: events.as_deref_mut(),
            evaluated: None,
        };
        for component in components.iter_mut() {
            component.after_step(&mut at)?;
        }
        let (stopping, signal) = (at.stopping, at.stop_signal);
        ran = Ran::To {
            step: stats.step,
            loss: stats.loss,
            signal,
        };
        if stopping {
            if trainer.world.is_primary() {
                tracing::info!(step = stats.step, "stopping early as asked");
            }
            break;
        }
    }
    Ok(ran)
}
