//! The training loop on one process: caption shards → cached text context → flow-matching loss
//! → AdamW (warm-up + cosine, global-norm clipping) → EMA, with periodic logs, TensorBoard
//! events, sample grids and checkpoints, and exact resume from the latest checkpoint.

mod params;
mod randomness;
mod schedule;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use burn::module::AutodiffModule;
use burn::optim::{GradientsAccumulator, GradientsParams, Optimizer};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use sha2::{Digest, Sha256};

use crate::kernels::autocast::{with_precision, Precision};
use crate::optim::AdamWSettings;
use randomness::{PassRandomness, RandomnessAhead, RandomnessPlan};

pub use params::{global_grad_norm, scale_grads, update_ema};
pub use schedule::learning_rate;
pub use crate::training_state::{
    restore_optimizer, snapshot_from_bytes, snapshot_to_bytes, with_path_ids, TrainingState, EMA_FILE, JOB_KEY,
    MODEL_FILE, OPTIMIZER_FILE,
};

use crate::checkpoint::{CheckpointStore, LoadedCheckpoint};
use crate::config::{location_url, JobSpec};
use crate::data::stream::{BatchStream, ObjectStoreShards, ShardSource, StreamOptions};
use crate::data::{prepare_with, DatasetKind, PrepareOptions};
use crate::dist::{average_gradients, ensure_same_on_all_ranks, parameter_digest, Collective, SingleProcess, World};
use crate::error::{Error, Result};
use crate::flow::{flow_matching_loss, FlowBatch};
use crate::metrics::{image_grid, EventWriter, HParamValue, Progress, StepStats};
use crate::model::TextConditionalDiT;
use crate::sample::{cfg_sweep, generate, SampleOptions};
use crate::text::TextEmbeddingCache;

/// Where a run starts from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resume {
    /// The newest committed checkpoint with matching checksums under `checkpoint.url`, if any.
    Auto,
    /// From scratch, even when checkpoints exist.
    Never,
    /// This checkpoint (`<url>/step-000000123`, or a checkpoint folder for its latest).
    From(String),
}

impl std::str::FromStr for Resume {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        Ok(match s {
            "auto" => Resume::Auto,
            "never" => Resume::Never,
            url => Resume::From(url.to_string()),
        })
    }
}

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
}

pub fn train(job: &JobSpec, resume: &Resume) -> Result<TrainOutcome> {
    train_until(job, resume, None)
}

/// Like [`train`], but stops after step `stop_after` as a preempted job would: with a
/// checkpoint of that step, from which `Resume::Auto` continues the same run.
pub fn train_until(job: &JobSpec, resume: &Resume, stop_after: Option<u64>) -> Result<TrainOutcome> {
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
        let device = rank_device::<B>(world, gpu)?;
        train_on::<burn::backend::Autodiff<B>>(job, resume, stop_after, world, collective, device)
    })
}

/// Local rank i takes the i-th visible GPU; CPU backends have one device.
fn rank_device<B: Backend>(world: &World, gpu: bool) -> Result<B::Device> {
    use burn::tensor::backend::{Device as _, DeviceId};
    let default = B::Device::default();
    if !gpu {
        return Ok(default);
    }
    let id = default.to_id();
    let ordinal = world.gpu_ordinal(B::device_count(id.type_id))?;
    Ok(B::Device::from_id(DeviceId { type_id: id.type_id, index_id: ordinal as u16 }))
}

fn train_on<AB: AutodiffBackend>(
    job: &JobSpec,
    resume: &Resume,
    stop_after: Option<u64>,
    world: &World,
    collective: &dyn Collective,
    device: AB::Device,
) -> Result<TrainOutcome> {
    let primary = world.is_primary();
    let config_hash = job.hash();
    if primary {
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
    ensure_same_on_all_ranks(collective, "effective config (sha256 of the job after --set)", &config_hash)?;

    let shards_url = location_url(&job.data.shards)?;
    // One rank writes missing shards; the others wait for it instead of racing it.
    if primary {
        prepare_if_missing(&shards_url, job)?;
    }
    collective.barrier("waiting for rank 0 to prepare the shards")?;
    let source = Arc::new(ObjectStoreShards::open(&shards_url)?);
    check_data_fits_model(&shards_url, source.index(), job)?;
    let index_digest = hex::encode(Sha256::digest(serde_json::to_vec(source.index()).unwrap_or_default()));
    ensure_same_on_all_ranks(collective, &format!("dataset ({shards_url}/index.json, sha256)"), &index_digest)?;

    // The first rank of each node fills the weights' download cache; the node's other ranks
    // then read it instead of downloading the same file into the same place at once.
    let build_cache = || -> Result<TextEmbeddingCache<AB::InnerBackend>> {
        let mut cache = TextEmbeddingCache::<AB::InnerBackend>::for_job(job, &device)?;
        cache.warm(source.index().captions.iter().map(String::as_str).chain([""]));
        Ok(cache)
    };
    let mut cache = if world.local_rank == 0 {
        let cache = build_cache()?;
        collective.barrier("waiting for the text encoder weights")?;
        cache
    } else {
        collective.barrier("waiting for the text encoder weights")?;
        build_cache()?
    };

    let fresh = crate::backend::seeded::<AB, _>(&device, job.train.seed, || {
        job.dit_config().init::<AB>(&device).map(with_path_ids)
    })?;
    let mut optimizer = AdamWSettings {
        beta_1: job.train.betas[0] as f32,
        beta_2: job.train.betas[1] as f32,
        epsilon: job.train.eps as f32,
        weight_decay: job.train.weight_decay as f32,
    }
    .init::<AB, TextConditionalDiT<AB>>();

    let checkpoints = if job.checkpoint.url.is_empty() || !primary {
        None
    } else {
        Some(CheckpointStore::open(&location_url(&job.checkpoint.url)?, job.checkpoint.keep_last)?)
    };
    let loaded = if primary {
        match (resume, &checkpoints) {
            (Resume::Never, _) => None,
            (Resume::Auto, Some(store)) => store.latest_valid()?,
            (Resume::Auto, None) => None,
            (Resume::From(url), _) => Some(crate::checkpoint::load_url(url)?),
        }
    } else {
        None
    };
    if let Some(checkpoint) = &loaded {
        warn_if_config_changed(checkpoint, &config_hash);
    }
    let TrainingState { mut model, mut ema, step: start_step, position } = if world.is_distributed() {
        // Rank 0's state (its checkpoint, or its fresh weights) is every rank's start, so the
        // ranks begin bit-identical whatever each one initialised or could read.
        let snapshot = if primary {
            let snapshot = match loaded {
                Some(checkpoint) => checkpoint,
                None => {
                    let start = TrainingState::<AB>::start(fresh.clone());
                    let (state, files) =
                        TrainingState::pack(&start.model, &start.ema, &optimizer, 0, start.position, job)?;
                    LoadedCheckpoint {
                        url: "rank 0's initial weights".into(),
                        state,
                        files: files.into_iter().collect(),
                    }
                }
            };
            snapshot_to_bytes(&snapshot)
        } else {
            Vec::new()
        };
        let snapshot = snapshot_from_bytes(&collective.broadcast(0, snapshot, "starting state from rank 0")?)?;
        optimizer = restore_optimizer(optimizer, &snapshot, &device)?;
        let state = TrainingState::restore(fresh, &snapshot)?;
        let digest = format!("{}{}", parameter_digest(&state.model), parameter_digest(&state.ema));
        let digest = hex::encode(Sha256::digest(digest.as_bytes()));
        ensure_same_on_all_ranks(collective, "starting parameters (sha256 of model and EMA)", &digest)?;
        state
    } else {
        match &loaded {
            Some(checkpoint) => {
                optimizer = restore_optimizer(optimizer, checkpoint, &device)?;
                TrainingState::restore(fresh, checkpoint)?
            }
            None => TrainingState::start(fresh),
        }
    };
    // Every checkpoint is of a step ≥ 1, so a non-zero start is a resume (on every rank, also
    // those that received rank 0's checkpoint instead of reading one).
    let resumed_from = (start_step > 0).then_some(start_step);
    if primary {
        if let Some(step) = resumed_from {
            tracing::info!(step, epoch = position.epoch, position = position.position, "resumed");
        }
    }

    let mut events = if job.logging.dir.is_empty() || !primary {
        None
    } else {
        let mut writer = EventWriter::create(&location_url(&job.logging.dir)?, &job.name)?;
        writer.text("config", start_step, &format!("```yaml\n{}\n```\nhash `{config_hash}`", job.to_yaml()))?;
        writer.hparams(&hparams(job, world.world_size), &["loss", "grad_norm"])?;
        Some(writer)
    };

    let mut stream = BatchStream::new(
        source.clone(),
        StreamOptions {
            seed: job.train.seed,
            global_batch: micro_batch * world.world_size,
            rank: world.rank,
            world_size: world.world_size,
            shuffle_window: job.data.shuffle_window,
            prefetch_batches: job.data.prefetch,
            decode_threads: job.data.decode_threads,
        },
        position,
    )?;

    let bucket_bytes = (job.dist.bucket_mb * 1e6) as usize;
    let total = job.train.steps;
    let mut progress = primary.then(|| Progress::new(total, start_step, job.logging.every_steps));
    let mut last_loss = f64::NAN;
    let mut last_checkpoint = None;
    let mut sample_grid = None;
    let mut steps_done = start_step;
    let sample_len = job.model.channels * job.model.image_size * job.model.image_size;
    let mut randomness = RandomnessAhead::start(
        RandomnessPlan {
            seed: job.train.seed,
            drop_prob: job.train.text_drop_prob,
            sample_len,
            micro_batch,
            accumulation,
            rank: world.rank,
            world_size: world.world_size,
        },
        start_step..stop_after.map_or(total, |stop| stop.min(total)),
    );
    for step in start_step..total {
        let started = Instant::now();
        let mut data_wait = 0.0;
        let mut loss_sum = 0.0;
        let mut accumulator = GradientsAccumulator::<TextConditionalDiT<AB>>::new();
        let mut single_pass_grads = None;
        let mut resume_at = position;
        for pass in 0..accumulation {
            let waited_before = stream.wait_time();
            let batch = stream.next_batch()?;
            data_wait += (stream.wait_time() - waited_before).as_secs_f64();
            resume_at = batch.next;

            let shape = [batch.batch_size, batch.channels, batch.image_size, batch.image_size];
            let PassRandomness { dropped, times, noise } = randomness.take(step, pass, batch.batch_size);
            let captions: Vec<&str> = batch
                .captions
                .iter()
                .zip(&dropped)
                .map(|(caption, &drop)| if drop { "" } else { caption.as_str() })
                .collect();
            let (context, mask) = cache.batch::<AB>(&captions, &device);
            let flow = FlowBatch {
                x0: Tensor::<AB, 4>::from_data(TensorData::new(batch.pixels, shape), &device),
                x1: Tensor::<AB, 4>::from_data(TensorData::new(noise, shape), &device),
                t: Tensor::<AB, 1>::from_data(TensorData::new(times, [batch.batch_size]), &device),
            };
            let loss = with_precision(job.train.precision, || flow_matching_loss(&model, flow, context, Some(mask)));
            let loss_value_of_pass = loss.clone().detach();
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            // Read after the backward is queued: reading first would leave a GPU idle while
            // the host builds the backward.
            loss_sum += loss_value_of_pass.into_scalar().elem::<f64>();
            if accumulation == 1 {
                single_pass_grads = Some(grads);
            } else {
                accumulator.accumulate(&model, grads);
            }
        }
        let mut grads = match single_pass_grads {
            Some(grads) => grads,
            None => {
                let mut grads = accumulator.grads();
                scale_grads(&model, &mut grads, 1.0 / accumulation as f64);
                grads
            }
        };
        let mut loss_value = loss_sum / accumulation as f64;
        let allreduce = average_gradients(&model, &mut grads, collective, bucket_bytes)?;
        if world.is_distributed() {
            // Every rank takes the same decision on a non-finite loss, so none is left waiting.
            let mut mean = [loss_value as f32];
            collective.all_reduce_mean(&mut mean, "loss all-reduce")?;
            loss_value = mean[0] as f64;
        }
        if !loss_value.is_finite() {
            if let Some(store) = &checkpoints {
                store.wait_all()?;
            }
            return Err(Error::Training(format!(
                "the loss became {loss_value} at step {}; stopping. The last good checkpoint \
                 ({}) stays the latest",
                step + 1,
                last_checkpoint.as_deref().unwrap_or("none written in this run"),
            )));
        }
        let grad_norm = global_grad_norm(&model, &grads);
        if job.train.grad_clip > 0.0 && grad_norm > job.train.grad_clip {
            scale_grads(&model, &mut grads, job.train.grad_clip / grad_norm);
        }
        let lr = learning_rate(step, job.train.lr, job.train.warmup_steps, total);
        model = optimizer.step(lr, model, grads);
        ema = update_ema(ema, &model.valid(), job.train.ema_decay);
        last_loss = loss_value;
        let done = step + 1;
        let stopping = stop_after == Some(done);

        let step_secs = started.elapsed().as_secs_f64();
        let stats = StepStats {
            step: done,
            loss: loss_value,
            lr,
            grad_norm,
            images_per_sec: job.train.batch_size as f64 / step_secs,
            step_secs,
            data_wait_secs: data_wait,
            allreduce_secs: allreduce.as_secs_f64(),
        };
        if progress.as_mut().is_some_and(|p| p.update(&stats)) {
            if let Some(writer) = events.as_mut() {
                let mut scalars = vec![
                    ("train/loss", stats.loss),
                    ("train/lr", stats.lr),
                    ("train/grad_norm", stats.grad_norm),
                    ("train/images_per_sec", stats.images_per_sec),
                    ("train/step_secs", stats.step_secs),
                    ("train/data_wait_secs", stats.data_wait_secs),
                ];
                if world.is_distributed() {
                    scalars.push(("train/allreduce_secs", stats.allreduce_secs));
                }
                for (tag, value) in scalars {
                    writer.scalar(tag, done, value)?;
                }
            }
        }

        let last = done == total;
        let sample_now = primary
            && job.sample.enabled()
            && ((job.sample.every_steps > 0 && done % job.sample.every_steps == 0)
                || (last && job.sample.at_end));
        if sample_now {
            sample_grid = write_samples(job, &ema, &mut cache, events.as_mut(), done)?.or(sample_grid);
        }
        if let Some(store) = &checkpoints {
            let periodic = job.checkpoint.every_steps > 0 && done % job.checkpoint.every_steps == 0;
            if periodic || last || stopping {
                let (mut state, files) = TrainingState::pack(&model, &ema, &optimizer, done, resume_at, job)?;
                state.world_size = world.world_size;
                // The store runs one save at a time: this waits for the previous one and
                // returns its error, if any; `wait_all` below reports the last.
                store.save_async(state, files)?;
                last_checkpoint = Some(store.step_url(done));
            }
        }
        steps_done = done;
        if stopping {
            if primary {
                tracing::info!(step = done, "stopping early as asked");
            }
            break;
        }
    }
    if let Some(progress) = &progress {
        progress.finish();
    }
    if let Some(store) = &checkpoints {
        store.wait_all()?;
    }
    if let Some(writer) = events {
        writer.close()?;
    }
    let params_sha256 = parameter_digest(&model.valid());
    ensure_same_on_all_ranks(collective, &format!("parameters after step {steps_done} (sha256)"), &params_sha256)?;
    Ok(TrainOutcome {
        steps_done,
        resumed_from,
        final_loss: last_loss,
        config_hash,
        last_checkpoint,
        sample_grid,
        rank: world.rank,
        world_size: world.world_size,
        micro_batch_size: micro_batch,
        accumulation_steps: accumulation,
        params_sha256,
    })
}

/// `data.prepare` makes a job self-contained (the quickstart): its shards are written on first
/// use, and an existing `index.json` (written last by the shard writer) means they are complete.
fn prepare_if_missing(shards_url: &str, job: &JobSpec) -> Result<()> {
    let Some(spec) = &job.data.prepare else { return Ok(()) };
    if crate::storage::exists(&format!("{}/index.json", shards_url.trim_end_matches('/')))? {
        return Ok(());
    }
    tracing::info!(dataset = ?spec.dataset, shards = shards_url, "no shards yet: preparing them");
    let mut options = PrepareOptions::new(spec.dataset, shards_url);
    options.source = spec.source.clone();
    options.split = spec.split;
    options.samples = spec.samples;
    options.samples_per_shard = spec.samples_per_shard;
    options.image_size = Some(job.model.image_size);
    // Real datasets fix their channels (and `check_data_fits_model` compares them with the
    // model's); only generated data is drawn with the model's.
    if spec.dataset == DatasetKind::Synthetic {
        options.channels = Some(job.model.channels);
    }
    options.seed = job.train.seed;
    prepare_with(&options)?;
    Ok(())
}

fn check_data_fits_model(shards_url: &str, index: &crate::data::ShardIndex, job: &JobSpec) -> Result<()> {
    if index.image_size != job.model.image_size || index.channels != job.model.channels {
        return Err(Error::Config(format!(
            "{shards_url}/index.json holds {}×{} images with {} channel(s), but model.image_size \
             is {} and model.channels {}",
            index.image_size, index.image_size, index.channels, job.model.image_size, job.model.channels
        )));
    }
    Ok(())
}

fn warn_if_config_changed(checkpoint: &LoadedCheckpoint, config_hash: &str) {
    if checkpoint.state.config_hash != config_hash {
        tracing::warn!(
            checkpoint = checkpoint.state.config_hash,
            now = config_hash,
            "resuming under a different effective config than the checkpoint was written with"
        );
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
        ("train.text_drop_prob".into(), job.train.text_drop_prob.into()),
        ("train.ema_decay".into(), job.train.ema_decay.into()),
        ("train.steps".into(), job.train.steps.into()),
        ("text_encoder.weights".into(), job.text_encoder.weights.clone().unwrap_or_else(|| "random-init".into()).into()),
    ])
}

/// A grid (rows = prompts, columns = images per prompt) from the EMA weights, to TensorBoard
/// and, when `sample.dir` is set, as `step-000123.png` there. Returns where the PNG went.
fn write_samples<E: Backend, TB: Backend>(
    job: &JobSpec,
    ema: &TextConditionalDiT<E>,
    cache: &mut TextEmbeddingCache<TB>,
    events: Option<&mut EventWriter>,
    step: u64,
) -> Result<Option<String>> {
    let options = SampleOptions {
        cfg: job.sample.cfg,
        steps: job.sample.steps,
        sampler: job.sample.sampler,
        per_prompt: job.sample.per_prompt,
        seed: job.sample.seed,
    };
    let images = generate(ema, cache, &job.sample.prompts, &options);
    let (size, channels) = (job.model.image_size, job.model.channels);
    let pixels: Vec<Vec<u8>> = images.into_iter().map(|i| i.pixels).collect();
    let (grid, height, width) = image_grid(&pixels, size, size, channels, options.per_prompt);
    let description = format!(
        "rows: {}; cfg {}, {} {:?} steps, EMA weights",
        job.sample.prompts.join(" | "),
        options.cfg,
        options.steps,
        options.sampler
    );
    let sweep = match &job.sample.cfg_sweep {
        Some(scales) => {
            let columns = cfg_sweep(ema, cache, &job.sample.prompts, scales, &options);
            Some(crate::viz::render_sweep(&job.sample.prompts, scales, &columns, size, channels))
        }
        None => None,
    };
    if let Some(writer) = events {
        writer.image_with_description("samples", step, height, width, channels, &grid, &description)?;
        if let (Some(canvas), Some(scales)) = (&sweep, &job.sample.cfg_sweep) {
            let scales: Vec<String> = scales.iter().map(|s| s.to_string()).collect();
            let description = format!(
                "rows: {}; columns: cfg {}; {} {:?} steps, seed {}, EMA weights",
                job.sample.prompts.join(" | "),
                scales.join(", "),
                options.steps,
                options.sampler,
                options.seed
            );
            writer.image_with_description("samples/cfg_sweep", step, canvas.height, canvas.width, 3, &canvas.pixels, &description)?;
        }
        writer.flush()?;
    }
    let Some(dir) = &job.sample.dir else { return Ok(None) };
    let dir = location_url(dir)?;
    let url = format!("{}/step-{step:09}.png", dir.trim_end_matches('/'));
    let png = crate::metrics::encode_png(&grid, height, width, channels)?;
    crate::storage::put_bytes(&url, png)?;
    tracing::info!(%url, prompts = %job.sample.prompts.join(" | "), "sample grid written");
    if let Some(canvas) = &sweep {
        let sweep_url = format!("{}/cfg-sweep-step-{step:09}.png", dir.trim_end_matches('/'));
        crate::storage::put_bytes(&sweep_url, canvas.to_png()?)?;
        tracing::info!(url = %sweep_url, "CFG sweep written");
    }
    Ok(Some(url))
}
