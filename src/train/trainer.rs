//! The trainer: everything a step needs, set up once from the job, the world and the
//! collective, and [`Trainer::step`], one optimiser step: accumulation passes (forward and
//! backward on each rank's micro-batches), the gradient all-reduce, the loss agreed by every
//! rank, clipping, AdamW and the EMA.
//!
//! Invariants:
//! - A step's outcome is a pure function of (job, starting state, step): the data order, the
//!   noise and the caption dropout do not depend on when a run was stopped and resumed, nor on
//!   how the global batch is split into ranks and passes.
//! - Every rank takes the same decision on a non-finite or spiking loss (`loss_guard.rs`
//!   judges the loss averaged over the ranks), so none is left waiting in a collective.
//! - The trainer writes nothing: checkpoints, logs and samples are the components' (`run`).

use std::sync::Arc;
use std::time::Instant;

use burn::module::AutodiffModule;
use burn::optim::{GradientsAccumulator, GradientsParams, Optimizer};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;

use super::loss_guard::{LossGuard, Verdict};
use super::params::{global_grad_norm, scale_grads, update_ema};
use super::randomness::{PassRandomness, RandomnessAhead, RandomnessPlan};
use super::schedule::learning_rate;
use super::setup::{checkpoint_to_resume, open_shards, starting_state, text_cache, Resume};
use crate::checkpoint::CheckpointStore;
use crate::config::JobSpec;
use crate::data::stream::{
    BatchStream, ObjectStoreShards, ShardSource, StreamOptions, StreamPosition,
};
use crate::dist::{average_gradients, ensure_same_on_all_ranks, Collective, World};
use crate::error::Result;
use crate::flow::{flow_matching_loss, FlowBatch};
use crate::kernels::autocast::with_precision;
use crate::metrics::StepStats;
use crate::model::TextConditionalDiT;
use crate::optim::{AdamWSettings, FusedAdamW};
use crate::text::TextEmbeddingCache;

pub struct Trainer<'a, AB: AutodiffBackend> {
    pub job: &'a JobSpec,
    pub world: &'a World,
    pub collective: &'a dyn Collective,
    /// Taken out only while the optimizer and the EMA update them (moved, not cloned: a
    /// tensor with a second owner cannot be updated in place).
    model: Option<TextConditionalDiT<AB>>,
    ema: Option<TextConditionalDiT<AB::InnerBackend>>,
    pub optimizer: FusedAdamW<TextConditionalDiT<AB>, AB>,
    cache: TextEmbeddingCache<AB::InnerBackend>,
    /// Where the data stream continues after the last step taken.
    pub position: StreamPosition,
    /// Steps done before this run (0 for a fresh run).
    pub start_step: u64,
    pub config_hash: String,
    pub micro_batch: usize,
    pub accumulation: usize,
    device: AB::Device,
    stream: BatchStream,
    randomness: RandomnessAhead,
    loss_guard: LossGuard,
    /// Steps (1-based) whose loss this rank makes NaN: [`INJECT_NONFINITE_ENV`].
    injected_nonfinite: Vec<u64>,
}

/// A fault for tests and fire drills: `RANK:STEP[,RANK:STEP...]` makes rank RANK's loss (and
/// so its gradients) NaN at step STEP (counted from 1), as a bad batch or an overflow would.
pub const INJECT_NONFINITE_ENV: &str = "DITRUN_INJECT_NONFINITE_LOSS";

/// What a step ended with.
pub enum Stepped {
    /// Applied, or skipped on every rank (`StepStats::skipped` says why).
    Done(StepStats),
    /// The loss guard ends the run (`train.on_nonfinite: stop`, or too many skips in a row):
    /// the update was not applied.
    Halted { step: u64, loss: f64, why: String },
}

impl<'a, AB: AutodiffBackend> Trainer<'a, AB> {
    /// Sets a run up: shards, text cache, model and optimizer (fresh, or resumed from
    /// `resume` through `checkpoints`, rank 0's store), all checked equal across ranks. The
    /// run will take its steps below `end_step`.
    pub fn new(
        job: &'a JobSpec,
        resume: &Resume,
        checkpoints: Option<&CheckpointStore>,
        end_step: u64,
        world: &'a World,
        collective: &'a dyn Collective,
        device: AB::Device,
    ) -> Result<Self> {
        let config_hash = job.hash();
        if world.is_primary() {
            tracing::info!(job = %job.name, %config_hash, "effective config:\n{}", job.to_yaml());
        }
        let (micro_batch, accumulation) = job.batch_plan(world.world_size)?;
        if world.is_distributed() {
            tracing::info!(
                rank = world.rank,
                world_size = world.world_size,
                local_rank = world.local_rank,
                transport = collective.transport(),
                micro_batch,
                accumulation,
                ?device,
                "rank ready"
            );
        }
        ensure_same_on_all_ranks(
            collective,
            "effective config (sha256 of the job after --set)",
            &config_hash,
        )?;
        let source = open_shards(job, world, collective)?;
        let cache = text_cache::<AB>(job, &source.index().captions, world, collective, &device)?;
        let loaded = checkpoint_to_resume(resume, checkpoints, world, &config_hash)?;
        let (state, optimizer) = starting_state(
            job,
            loaded,
            adamw(job).init::<AB, TextConditionalDiT<AB>>(),
            world,
            collective,
            &device,
        )?;
        let stream = data_stream(job, source, world, micro_batch, state.position)?;
        let loss_guard = LossGuard::new(
            job.train.on_nonfinite,
            job.train.skip_loss_spikes,
            job.train.max_skipped,
        )
        .restored(state.loss_guard);
        let randomness = RandomnessAhead::start(
            RandomnessPlan::for_job(job, micro_batch, accumulation, world),
            state.step..end_step,
        );
        Ok(Self {
            job,
            world,
            collective,
            model: Some(state.model),
            ema: Some(state.ema),
            optimizer,
            cache,
            position: state.position,
            start_step: state.step,
            config_hash,
            micro_batch,
            accumulation,
            device,
            stream,
            randomness,
            loss_guard,
            injected_nonfinite: injected_nonfinite(world.rank),
        })
    }

    /// The trained weights.
    pub fn model(&self) -> &TextConditionalDiT<AB> {
        self.model.as_ref().expect("present between steps")
    }

    /// The exponential moving average of the weights (what samples and evaluations use).
    pub fn ema(&self) -> &TextConditionalDiT<AB::InnerBackend> {
        self.ema.as_ref().expect("present between steps")
    }

    /// The EMA weights with the text cache, to draw samples (the cache embeds new prompts).
    pub fn ema_and_cache(
        &mut self,
    ) -> (
        &TextConditionalDiT<AB::InnerBackend>,
        &mut TextEmbeddingCache<AB::InnerBackend>,
    ) {
        (
            self.ema.as_ref().expect("present between steps"),
            &mut self.cache,
        )
    }

    /// Step `step` (0-based; `Done` reports it as `step + 1`, the steps done).
    pub fn step(&mut self, step: u64) -> Result<Stepped> {
        let started = Instant::now();
        let (mut grads, loss, data_wait) = self.gradients(step)?;
        let bucket_bytes = (self.job.dist.bucket_mb * 1e6) as usize;
        let allreduce = average_gradients(self.model(), &mut grads, self.collective, bucket_bytes)?;
        let loss = self.mean_over_ranks(loss)?;
        let train = &self.job.train;
        let lr = learning_rate(step, train.lr, train.warmup_steps, train.steps);
        let skipped = match self.loss_guard.judge(loss) {
            Verdict::Apply => None,
            Verdict::Skip { why, in_a_row } => Some(format!("{why} ({in_a_row} in a row)")),
            Verdict::Stop { why } => {
                return Ok(Stepped::Halted {
                    step: step + 1,
                    loss,
                    why,
                })
            }
        };
        let step_stats = |grad_norm: f64, skipped: Option<String>, guard: &LossGuard| {
            let step_secs = started.elapsed().as_secs_f64();
            StepStats {
                step: step + 1,
                loss,
                lr,
                grad_norm,
                images_per_sec: train.batch_size as f64 / step_secs,
                step_secs,
                data_wait_secs: data_wait,
                allreduce_secs: allreduce.as_secs_f64(),
                skipped,
                skipped_steps: guard.skipped_total(),
            }
        };
        if skipped.is_some() {
            // The gradients (already averaged: a NaN on one rank is on all) are dropped.
            return Ok(Stepped::Done(step_stats(
                f64::NAN,
                skipped,
                &self.loss_guard,
            )));
        }
        let grad_norm = global_grad_norm(self.model(), &grads);
        if train.grad_clip > 0.0 && grad_norm > train.grad_clip {
            scale_grads(self.model(), &mut grads, train.grad_clip / grad_norm);
        }
        let model = self
            .optimizer
            .step(lr, self.model.take().expect("between steps"), grads);
        let ema = update_ema(
            self.ema.take().expect("between steps"),
            &model.valid(),
            train.ema_decay,
        );
        (self.model, self.ema) = (Some(model), Some(ema));
        Ok(Stepped::Done(step_stats(grad_norm, None, &self.loss_guard)))
    }

    /// What a checkpoint keeps of the loss guard, so a resumed run decides as this one would.
    pub fn loss_guard_record(&self) -> crate::training_state::LossGuardRecord {
        self.loss_guard.record()
    }

    /// This rank's gradients of step `step`, averaged over its accumulation passes, with the
    /// passes' mean loss and the time spent waiting for data.
    fn gradients(&mut self, step: u64) -> Result<(GradientsParams, f64, f64)> {
        let mut data_wait = 0.0;
        let mut loss_sum = 0.0;
        let mut accumulator = GradientsAccumulator::<TextConditionalDiT<AB>>::new();
        let mut single_pass = None;
        for pass in 0..self.accumulation {
            let waited_before = self.stream.wait_time();
            let batch = self.stream.next_batch()?;
            data_wait += (self.stream.wait_time() - waited_before).as_secs_f64();
            self.position = batch.next;

            let shape = [
                batch.batch_size,
                batch.channels,
                batch.image_size,
                batch.image_size,
            ];
            let PassRandomness {
                dropped,
                times,
                noise,
            } = self.randomness.take(step, pass, batch.batch_size);
            let captions: Vec<&str> = batch
                .captions
                .iter()
                .zip(&dropped)
                .map(|(caption, &drop)| if drop { "" } else { caption.as_str() })
                .collect();
            let (context, mask) = self.cache.batch::<AB>(&captions, &self.device);
            let flow = FlowBatch {
                x0: Tensor::<AB, 4>::from_data(TensorData::new(batch.pixels, shape), &self.device),
                x1: Tensor::<AB, 4>::from_data(TensorData::new(noise, shape), &self.device),
                t: Tensor::<AB, 1>::from_data(
                    TensorData::new(times, [batch.batch_size]),
                    &self.device,
                ),
            };
            let model = self.model();
            let mut loss = with_precision(self.job.train.precision, || {
                flow_matching_loss(model, flow, context, Some(mask))
            });
            if pass == 0 && self.injected_nonfinite.contains(&(step + 1)) {
                loss = loss.mul_scalar(f32::NAN);
            }
            let loss_of_pass = loss.clone().detach();
            let grads = GradientsParams::from_grads(loss.backward(), model);
            // Read after the backward is queued: reading first would leave a GPU idle while
            // the host builds the backward.
            loss_sum += loss_of_pass.into_scalar().elem::<f64>();
            if self.accumulation == 1 {
                single_pass = Some(grads);
            } else {
                accumulator.accumulate(self.model(), grads);
            }
        }
        let grads = match single_pass {
            Some(grads) => grads,
            None => {
                let mut grads = accumulator.grads();
                scale_grads(self.model(), &mut grads, 1.0 / self.accumulation as f64);
                grads
            }
        };
        Ok((grads, loss_sum / self.accumulation as f64, data_wait))
    }

    fn mean_over_ranks(&self, loss: f64) -> Result<f64> {
        if !self.world.is_distributed() {
            return Ok(loss);
        }
        let mut mean = [loss as f32];
        self.collective
            .all_reduce_mean(&mut mean, "loss all-reduce")?;
        Ok(mean[0] as f64)
    }
}

/// The steps [`INJECT_NONFINITE_ENV`] names for `rank`.
fn injected_nonfinite(rank: usize) -> Vec<u64> {
    let Ok(spec) = std::env::var(INJECT_NONFINITE_ENV) else {
        return Vec::new();
    };
    let steps: Vec<u64> = spec
        .split(',')
        .filter_map(|pair| pair.trim().split_once(':'))
        .filter(|(r, _)| r.trim().parse() == Ok(rank))
        .filter_map(|(_, step)| step.trim().parse().ok())
        .collect();
    if !steps.is_empty() {
        tracing::warn!(
            rank,
            ?steps,
            "{INJECT_NONFINITE_ENV}: this rank's loss will be NaN at these steps"
        );
    }
    steps
}

/// This rank's slice of each global batch, from `position` on.
fn data_stream(
    job: &JobSpec,
    source: Arc<ObjectStoreShards>,
    world: &World,
    micro_batch: usize,
    position: StreamPosition,
) -> Result<BatchStream> {
    let options = StreamOptions {
        seed: job.train.seed,
        global_batch: micro_batch * world.world_size,
        rank: world.rank,
        world_size: world.world_size,
        shuffle_window: job.data.shuffle_window,
        prefetch_batches: job.data.prefetch,
        decode_threads: job.data.decode_threads,
    };
    BatchStream::new(source, options, position)
}

/// The job's AdamW settings (PyTorch's parameter names: betas, eps, weight decay).
fn adamw(job: &JobSpec) -> AdamWSettings {
    AdamWSettings {
        beta_1: job.train.betas[0] as f32,
        beta_2: job.train.betas[1] as f32,
        epsilon: job.train.eps as f32,
        weight_decay: job.train.weight_decay as f32,
    }
}
