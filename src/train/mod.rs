//! The training loop on one process: caption shards → cached text context → flow-matching loss
//! → AdamW (warm-up + cosine, global-norm clipping) → EMA, with periodic logs, TensorBoard
//! events, sample grids and checkpoints, and exact resume from the latest checkpoint.

mod params;
mod schedule;
mod state;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use burn::module::AutodiffModule;
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use rand::rngs::StdRng;
use rand::SeedableRng;

pub use params::{global_grad_norm, scale_grads, update_ema, with_path_ids};
pub use schedule::learning_rate;
pub use state::{
    job_of_checkpoint, model_from_checkpoint, restore_optimizer, TrainingState, EMA_FILE, JOB_KEY,
    MODEL_FILE, OPTIMIZER_FILE,
};

use crate::checkpoint::{CheckpointStore, LoadedCheckpoint};
use crate::config::{location_url, JobSpec};
use crate::data::stream::{BatchStream, ObjectStoreShards, ShardSource, StreamOptions};
use crate::data::{prepare_with, DatasetKind, PrepareOptions};
use crate::error::{Error, Result};
use crate::flow::{drop_captions, flow_matching_loss, FlowBatch};
use crate::metrics::{image_grid, EventWriter, HParamValue, Progress, StepStats};
use crate::model::TextConditionalDiT;
use crate::sample::{generate, SampleOptions};
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

/// What a finished run reports.
#[derive(Clone, Debug, serde::Serialize)]
pub struct TrainOutcome {
    pub steps_done: u64,
    pub resumed_from: Option<u64>,
    pub final_loss: f64,
    pub config_hash: String,
    pub last_checkpoint: Option<String>,
    pub sample_grid: Option<String>,
}

pub fn train(job: &JobSpec, resume: &Resume) -> Result<TrainOutcome> {
    train_until(job, resume, None)
}

/// Like [`train`], but stops after step `stop_after` as a preempted job would: with a
/// checkpoint of that step, from which `Resume::Auto` continues the same run.
pub fn train_until(job: &JobSpec, resume: &Resume, stop_after: Option<u64>) -> Result<TrainOutcome> {
    let backend = job.train.backend.resolve()?;
    crate::with_backend!(backend, B => train_on::<burn::backend::Autodiff<B>>(job, resume, stop_after))
}

/// One step's randomness (noise, times, caption dropout), a pure function of (seed, step):
/// a resumed run draws exactly what the uninterrupted run drew, with no RNG state to store.
fn step_rng(seed: u64, step: u64) -> StdRng {
    StdRng::seed_from_u64(seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(17))
}

fn train_on<AB: AutodiffBackend>(
    job: &JobSpec,
    resume: &Resume,
    stop_after: Option<u64>,
) -> Result<TrainOutcome> {
    let device = AB::Device::default();
    let config_hash = job.hash();
    tracing::info!(job = %job.name, %config_hash, "effective config:\n{}", job.to_yaml());

    let shards_url = location_url(&job.data.shards)?;
    prepare_if_missing(&shards_url, job)?;
    let source = Arc::new(ObjectStoreShards::open(&shards_url)?);
    check_data_fits_model(&shards_url, source.index(), job)?;

    let mut cache = TextEmbeddingCache::<AB::InnerBackend>::for_job(job, &device)?;
    cache.warm(source.index().captions.iter().map(String::as_str).chain([""]));

    let fresh = crate::backend::seeded::<AB, _>(&device, job.train.seed, || {
        job.dit_config().init::<AB>(&device).map(with_path_ids)
    })?;
    let mut optimizer = AdamWConfig::new()
        .with_beta_1(job.train.betas[0] as f32)
        .with_beta_2(job.train.betas[1] as f32)
        .with_epsilon(job.train.eps as f32)
        .with_weight_decay(job.train.weight_decay as f32)
        .init::<AB, TextConditionalDiT<AB>>();

    let checkpoints = if job.checkpoint.url.is_empty() {
        None
    } else {
        Some(CheckpointStore::open(&location_url(&job.checkpoint.url)?, job.checkpoint.keep_last)?)
    };
    let loaded = match (resume, &checkpoints) {
        (Resume::Never, _) => None,
        (Resume::Auto, Some(store)) => store.latest_valid()?,
        (Resume::Auto, None) => None,
        (Resume::From(url), _) => Some(crate::checkpoint::load_url(url)?),
    };
    let TrainingState { mut model, mut ema, step: start_step, position } = match &loaded {
        Some(checkpoint) => {
            warn_if_config_changed(checkpoint, &config_hash);
            optimizer = restore_optimizer(optimizer, checkpoint, &device)?;
            TrainingState::restore(fresh, checkpoint)?
        }
        None => TrainingState::start(fresh),
    };
    let resumed_from = loaded.as_ref().map(|c| c.state.step);
    if let Some(step) = resumed_from {
        tracing::info!(step, epoch = position.epoch, position = position.position, "resumed");
    }

    let mut events = if job.logging.dir.is_empty() {
        None
    } else {
        let mut writer = EventWriter::create(&location_url(&job.logging.dir)?, &job.name)?;
        writer.text("config", start_step, &format!("```yaml\n{}\n```\nhash `{config_hash}`", job.to_yaml()))?;
        writer.hparams(&hparams(job), &["loss", "grad_norm"])?;
        Some(writer)
    };

    let mut stream = BatchStream::new(
        source.clone(),
        StreamOptions {
            seed: job.train.seed,
            global_batch: job.train.batch_size,
            rank: 0,
            world_size: 1,
            shuffle_window: job.data.shuffle_window,
            prefetch_batches: job.data.prefetch,
            decode_threads: 1,
        },
        position,
    )?;

    let total = job.train.steps;
    let mut progress = Progress::new(total, start_step, job.logging.every_steps);
    let mut last_loss = f64::NAN;
    let mut last_checkpoint = None;
    let mut sample_grid = None;
    let mut steps_done = start_step;
    for step in start_step..total {
        let started = Instant::now();
        let waited_before = stream.wait_time();
        let batch = stream.next_batch()?;
        let data_wait = (stream.wait_time() - waited_before).as_secs_f64();
        let resume_at = batch.next;

        let mut rng = step_rng(job.train.seed, step);
        let captions: Vec<&str> = batch.captions.iter().map(String::as_str).collect();
        let captions = drop_captions(&captions, job.train.text_drop_prob, &mut rng);
        let (context, mask) = cache.batch::<AB>(&captions, &device);
        let shape = [batch.batch_size, batch.channels, batch.image_size, batch.image_size];
        let x0 = Tensor::<AB, 4>::from_data(TensorData::new(batch.pixels, shape), &device);
        let loss = flow_matching_loss(&model, FlowBatch::draw(x0, &mut rng), context, Some(mask));

        let loss_value: f64 = loss.clone().into_scalar().elem();
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
        let mut grads = GradientsParams::from_grads(loss.backward(), &model);
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
        };
        if progress.update(&stats) {
            if let Some(writer) = events.as_mut() {
                for (tag, value) in [
                    ("train/loss", stats.loss),
                    ("train/lr", stats.lr),
                    ("train/grad_norm", stats.grad_norm),
                    ("train/images_per_sec", stats.images_per_sec),
                    ("train/step_secs", stats.step_secs),
                    ("train/data_wait_secs", stats.data_wait_secs),
                ] {
                    writer.scalar(tag, done, value)?;
                }
            }
        }

        let last = done == total;
        let sample_now = job.sample.enabled()
            && ((job.sample.every_steps > 0 && done % job.sample.every_steps == 0)
                || (last && job.sample.at_end));
        if sample_now {
            sample_grid = write_samples(job, &ema, &mut cache, events.as_mut(), done)?.or(sample_grid);
        }
        if let Some(store) = &checkpoints {
            let periodic = job.checkpoint.every_steps > 0 && done % job.checkpoint.every_steps == 0;
            if periodic || last || stopping {
                let (state, files) = TrainingState::pack(&model, &ema, &optimizer, done, resume_at, job)?;
                // The store runs one save at a time: this waits for the previous one and
                // returns its error, if any; `wait_all` below reports the last.
                store.save_async(state, files)?;
                last_checkpoint = Some(store.step_url(done));
            }
        }
        steps_done = done;
        if stopping {
            tracing::info!(step = done, "stopping early as asked");
            break;
        }
    }
    progress.finish();
    if let Some(store) = &checkpoints {
        store.wait_all()?;
    }
    if let Some(writer) = events {
        writer.close()?;
    }
    Ok(TrainOutcome {
        steps_done,
        resumed_from,
        final_loss: last_loss,
        config_hash,
        last_checkpoint,
        sample_grid,
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

fn hparams(job: &JobSpec) -> BTreeMap<String, HParamValue> {
    BTreeMap::from([
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
    if let Some(writer) = events {
        writer.image_with_description("samples", step, height, width, channels, &grid, &description)?;
        writer.flush()?;
    }
    let Some(dir) = &job.sample.dir else { return Ok(None) };
    let url = format!("{}/step-{step:09}.png", location_url(dir)?.trim_end_matches('/'));
    let png = crate::metrics::encode_png(&grid, height, width, channels)?;
    crate::storage::put_bytes(&url, png)?;
    tracing::info!(%url, prompts = %job.sample.prompts.join(" | "), "sample grid written");
    Ok(Some(url))
}
