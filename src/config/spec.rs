//! The typed job spec: every section, its defaults (the seed's numbers) and the checks that
//! reject impossible values before any work starts.
//!
//! The networks' sections are the networks' own configs (`model` is a [`TextDiTConfig`],
//! `text_encoder` holds a [`ClipTextConfig`]): their keys, defaults and rules are written once,
//! there. This module adds only the rules that span sections, reporting a network's field
//! under its section (`model.heads`).

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use super::text_encoder::TextEncoderSpec;
use crate::backend::BackendKind;
use crate::checkpoint::BestMetric;
pub use crate::data::{DatasetKind, Split};
use crate::flow::Sampler;
use crate::kernels::autocast::Precision;
use crate::model::dit::InvalidField;
use crate::model::{ClipTextConfig, TextDiTConfig};

/// A whole training job. Every key is optional in a file: what a job and its recipes leave
/// out keeps the default documented on the field.
///
/// Locations (`data.shards`, `checkpoint.url`, `logging.dir`, `sample.dir`,
/// `text_encoder.weights`) are URLs (`file://`, `s3://`, `gs://`, `az://`, `memory://`, and
/// `hf://` for weights) or plain paths; a relative path such as `runs/quickstart/checkpoints`
/// is relative to the current working directory of the process, not to the job file
/// ([`location_url`] makes it absolute).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JobSpec {
    /// A label for logs and TensorBoard.
    pub name: String,
    /// The DiT's sizes; defaults are the seed's model (18,145,072 parameters).
    pub model: TextDiTConfig,
    pub text_encoder: TextEncoderSpec,
    pub data: DataSpec,
    pub train: TrainSpec,
    pub checkpoint: CheckpointSpec,
    pub logging: LoggingSpec,
    pub sample: SampleSpec,
    pub dist: DistSpec,
    /// FID and CLIP score during training; left out of the effective YAML (and its hash)
    /// while untouched, so jobs without it hash as before.
    #[serde(skip_serializing_if = "EvalSpec::is_default")]
    pub eval: EvalSpec,
}

/// FID against the dataset's statistics and the CLIP score, on EMA samples drawn with the
/// dataset's captions (balanced), every `every_steps` steps and/or at the end.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalSpec {
    /// Evaluate every N steps; 0 turns periodic evaluation off.
    pub every_steps: u64,
    /// Also evaluate once after the last step.
    pub at_end: bool,
    /// Generated images per evaluation, over all ranks (10,000 in papers; fewer for a trend).
    pub samples: usize,
    /// Guidance scales: one FID (`eval/fid_cfg_<w>`) per scale; the first is `eval/fid`.
    pub cfg: Vec<f64>,
    /// Integration steps of the sampler.
    pub steps: usize,
    /// Seeds the noise, so that evaluations at different steps compare.
    pub seed: u64,
    /// Images per forward pass of the networks.
    pub batch_size: usize,
    /// The FID Inception's weights (pytorch-fid's pt_inception-2015-12-05 as safetensors), any
    /// weights location. Required when evaluating.
    pub inception_weights: String,
    /// The CLIP file with the vision tower and projections for the CLIP score; unset =
    /// text_encoder.weights; no score when neither is set.
    pub clip_weights: Option<String>,
    /// Real images the dataset's statistics use (stored beside its shards); 0 = all.
    pub reference_samples: usize,
    /// Also FID per caption (`eval/fid_caption/<caption>`): which prompts the model has not
    /// learned. Needs each caption's statistics too, and at least two samples per caption.
    pub per_caption_fid: bool,
}

impl Default for EvalSpec {
    fn default() -> Self {
        Self {
            every_steps: 0,
            at_end: false,
            samples: 1000,
            cfg: vec![4.0],
            steps: 50,
            seed: 0,
            batch_size: 50,
            inception_weights: String::new(),
            clip_weights: None,
            reference_samples: 0,
            per_caption_fid: false,
        }
    }
}

impl EvalSpec {
    fn is_default(&self) -> bool {
        *self == Self::default()
    }

    pub fn is_off(&self) -> bool {
        self.every_steps == 0 && !self.at_end
    }

    fn problem(&self) -> Option<(&'static str, String)> {
        if self.is_off() {
            return None;
        }
        let checks: [(bool, &'static str, String); 5] = [
            (
                self.inception_weights.is_empty(),
                "eval.inception_weights",
                "must name the FID Inception's weights when eval.every_steps or eval.at_end is set"
                    .into(),
            ),
            (
                self.samples < 2,
                "eval.samples",
                "must be ≥ 2 (a covariance needs two)".into(),
            ),
            (
                self.cfg.is_empty(),
                "eval.cfg",
                "must list at least one guidance scale".into(),
            ),
            (self.steps == 0, "eval.steps", "must be > 0".into()),
            (
                self.batch_size == 0,
                "eval.batch_size",
                "must be > 0".into(),
            ),
        ];
        first_failed(checks).or_else(|| {
            crate::storage::weights_scheme_problem(&self.inception_weights)
                .map(|reason| ("eval.inception_weights", reason))
        })
    }
}

/// Where the caption shards live, and how they are streamed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataSpec {
    /// URL or path of the shard prefix (the folder holding `index.json`). Required.
    pub shards: String,
    /// When set and `<shards>/index.json` is missing, the trainer prepares the shards there
    /// first (what `ditrun prepare` would do).
    pub prepare: Option<PrepareSpec>,
    /// Shards whose samples are shuffled together (≥ 1).
    pub shuffle_window: usize,
    /// Batches decoded ahead of the training step on background threads (≥ 1).
    pub prefetch: usize,
    /// Threads decoding PNGs per rank (≥ 1).
    pub decode_threads: usize,
}

/// What `ditrun prepare` writes when the shards are missing.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PrepareSpec {
    pub dataset: DatasetKind,
    /// Local path or URL of the raw dataset (CIFAR-10 archive, Fashion-MNIST IDX folder);
    /// unset = CIFAR-10's official download, Fashion-MNIST's Debian folder. Not for synthetic.
    pub source: Option<String>,
    pub split: Split,
    /// How many samples to write; unset = the whole split (synthetic: the generator's default).
    pub samples: Option<usize>,
    pub samples_per_shard: usize,
}

/// Optimisation: AdamW with linear warm-up then cosine decay to zero, gradient clipping,
/// EMA of the weights (the EMA weights make the samples), caption dropout.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainSpec {
    /// Optimiser steps in the whole run (a resumed run continues up to this).
    pub steps: u64,
    /// Global batch: images per optimiser step over all ranks
    /// (= micro_batch_size × ranks × accumulation steps).
    pub batch_size: usize,
    /// Images per rank per forward pass; unset = batch_size / ranks (no accumulation). When
    /// smaller, gradients accumulate over batch_size / (micro_batch_size × ranks) passes, so
    /// the same job runs on fewer ranks with the same global batch and sample order.
    pub micro_batch_size: Option<usize>,
    /// Peak learning rate (after warm-up).
    pub lr: f64,
    pub weight_decay: f64,
    pub betas: [f64; 2],
    pub eps: f64,
    /// Steps of linear warm-up from 0 to `lr`.
    pub warmup_steps: u64,
    /// Maximum global gradient norm; 0 turns clipping off.
    pub grad_clip: f64,
    /// EMA decay per step in [0, 1); 0 makes the EMA a copy of the weights.
    pub ema_decay: f64,
    /// Seeds the model initialisation, data order, noise and caption dropout.
    pub seed: u64,
    /// Probability of replacing a caption by "" (classifier-free guidance training).
    pub text_drop_prob: f64,
    pub backend: BackendChoice,
    /// The dtype of the step's matrix products: `f32`, or `bf16` with f32 master weights,
    /// statistics, loss, optimizer and all-reduce (`kernels::autocast`). Needs a backend with
    /// bf16 tensors (cuda, flex).
    pub precision: Precision,
    /// CPU threads; unset = all cores.
    pub threads: Option<usize>,
    /// After SIGTERM/SIGINT/SIGHUP the run finishes its step and writes a final checkpoint;
    /// past this many seconds it exits anyway (below Kubernetes' default 30 s grace period).
    pub stop_grace_secs: f64,
    /// What a NaN or infinite loss (the mean over all ranks) does: `stop` or `skip` the step.
    pub on_nonfinite: OnNonFinite,
    /// Skips in a row after which the run stops anyway.
    pub max_skipped: u32,
    /// Skip a step whose loss is above this many times the median of the last 100 applied
    /// steps' losses (after 20 of them); 0 = never.
    pub skip_loss_spikes: f64,
}

/// `train.on_nonfinite`: what a NaN or infinite loss does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnNonFinite {
    /// End the run with an error; the last committed checkpoint stays the latest.
    #[default]
    Stop,
    /// Skip the step on every rank (weights, EMA and optimizer untouched); stop after
    /// `train.max_skipped` skips in a row.
    Skip,
}

/// How ranks work together (used when the job runs on several ranks).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DistSpec {
    /// Size of the gradient buckets averaged in one collective, in MB (PyTorch DDP: 25).
    pub bucket_mb: f64,
    /// A collective that does not complete within this many seconds ends the job, naming the
    /// rank(s) that did not arrive. It must cover the longest pause of one rank alone
    /// (rank 0 writing sample grids, preparing shards on first use).
    pub timeout_secs: f64,
}

/// `auto` takes the GPU when the binary has one, else the fastest CPU backend compiled in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendChoice {
    Auto,
    Flex,
    Ndarray,
    Candle,
    Cuda,
    #[serde(rename = "cuda-nofusion")]
    CudaNoFusion,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointSpec {
    /// URL or path of the checkpoint folder; empty = no checkpoints.
    pub url: String,
    /// Save every N steps; 0 turns the periodic saves off.
    pub every_steps: u64,
    /// Committed checkpoints kept (older ones are deleted); ≥ 1 when checkpointing.
    pub keep_last: usize,
    /// Also keep the best checkpoint by this evaluation metric (`fid` or `clip_score`, of the
    /// first `eval.cfg` scale) apart from the last N, named by `<url>/best.json`; every
    /// evaluated step is then saved. Unset: no best is kept.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keep_best: Option<BestMetric>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoggingSpec {
    /// TensorBoard log dir (path or URL); empty = no event files, console only.
    pub dir: String,
    /// Log loss, learning rate, gradient norm and throughput every N steps; 0 turns the
    /// periodic logs off.
    pub every_steps: u64,
}

/// Sample grids of fixed prompts, made with the EMA weights and written to TensorBoard (and to
/// `dir` as PNG when set). The same settings are the defaults of `ditrun sample`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SampleSpec {
    /// Sample every N steps; 0 turns periodic sampling off.
    pub every_steps: u64,
    /// Also sample once after the last step.
    pub at_end: bool,
    pub prompts: Vec<String>,
    /// Classifier-free guidance scale (≥ 0; 1 = plain conditional, 0 = unconditional).
    pub cfg: f64,
    /// Integration steps from noise to image.
    pub steps: usize,
    pub sampler: Sampler,
    /// Images per prompt.
    pub per_prompt: usize,
    /// Seeds the initial noise, so successive grids are comparable.
    pub seed: u64,
    /// Folder (path or URL) for the grids as PNG; unset = TensorBoard only.
    pub dir: Option<String>,
    /// Guidance scales for a CFG sweep logged beside each grid (`samples/cfg_sweep`: one
    /// image per prompt and scale, the same seed in every column); unset = no sweep.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cfg_sweep: Option<Vec<f64>>,
}

impl Default for JobSpec {
    fn default() -> Self {
        Self {
            name: "ditrun".into(),
            model: TextDiTConfig::default(),
            text_encoder: TextEncoderSpec::default(),
            data: DataSpec::default(),
            train: TrainSpec::default(),
            checkpoint: CheckpointSpec::default(),
            logging: LoggingSpec::default(),
            sample: SampleSpec::default(),
            dist: DistSpec::default(),
            eval: EvalSpec::default(),
        }
    }
}

impl Default for DataSpec {
    fn default() -> Self {
        Self {
            shards: String::new(),
            prepare: None,
            shuffle_window: 4,
            prefetch: 4,
            decode_threads: 1,
        }
    }
}

impl Default for DistSpec {
    fn default() -> Self {
        Self {
            bucket_mb: 25.0,
            timeout_secs: 600.0,
        }
    }
}

impl Default for PrepareSpec {
    fn default() -> Self {
        Self {
            dataset: DatasetKind::Synthetic,
            source: None,
            split: Split::Train,
            samples: None,
            samples_per_shard: crate::data::prepare::DEFAULT_SAMPLES_PER_SHARD,
        }
    }
}

impl Default for TrainSpec {
    fn default() -> Self {
        Self {
            steps: 10_000,
            batch_size: 64,
            micro_batch_size: None,
            lr: 1e-4,
            weight_decay: 0.01,
            betas: [0.9, 0.999],
            eps: 1e-8,
            warmup_steps: 0,
            grad_clip: 1.0,
            ema_decay: 0.9999,
            seed: 0,
            text_drop_prob: 0.1,
            backend: BackendChoice::Auto,
            precision: Precision::F32,
            threads: None,
            stop_grace_secs: 25.0,
            on_nonfinite: OnNonFinite::Stop,
            max_skipped: 10,
            skip_loss_spikes: 0.0,
        }
    }
}

impl Default for CheckpointSpec {
    fn default() -> Self {
        Self {
            url: String::new(),
            every_steps: 1000,
            keep_last: 3,
            keep_best: None,
        }
    }
}

impl Default for LoggingSpec {
    fn default() -> Self {
        Self {
            dir: String::new(),
            every_steps: 50,
        }
    }
}

impl Default for SampleSpec {
    fn default() -> Self {
        Self {
            every_steps: 0,
            at_end: false,
            prompts: Vec::new(),
            cfg: 7.5,
            steps: 50,
            sampler: Sampler::Euler,
            per_prompt: 4,
            seed: 0,
            dir: None,
            cfg_sweep: None,
        }
    }
}

impl JobSpec {
    /// The DiT to build (a copy of `model`).
    pub fn dit_config(&self) -> TextDiTConfig {
        self.model.clone()
    }

    /// The text tower to build (a copy of `text_encoder.config`).
    pub fn clip_config(&self) -> ClipTextConfig {
        self.text_encoder.config.clone()
    }

    /// The CLIP file the evaluation's CLIP score uses: `eval.clip_weights`, else the text
    /// encoder's (openai/clip-vit-base-patch32's file holds both towers); `None`: no score.
    pub fn eval_clip_weights(&self) -> Option<&str> {
        self.eval
            .clip_weights
            .as_deref()
            .or(self.text_encoder.weights.as_deref())
    }

    /// The effective spec as YAML (every key, defaults included): what the trainer logs and
    /// writes to TensorBoard, and what loads back into an equal spec.
    pub fn to_yaml(&self) -> String {
        serde_norway::to_string(self).expect("a JobSpec always serialises to YAML")
    }

    /// sha256 (hex) of the spec's canonical JSON form (fields in declaration order, every key
    /// present): equal specs hash equally however they were written, any changed value changes it.
    pub fn hash(&self) -> String {
        let canonical = serde_json::to_vec(self).expect("a JobSpec always serialises to JSON");
        hex::encode(Sha256::digest(&canonical))
    }

    /// The first impossible value, as (key path, what is wrong).
    pub(crate) fn first_problem(&self) -> Option<(String, String)> {
        let job_problem = || {
            self.data_problem()
                .or_else(|| self.train_problem())
                .or_else(|| self.output_problem())
                .or_else(|| self.sample_problem())
                .or_else(|| self.dist_problem())
                .or_else(|| self.eval.problem())
        };
        self.network_problem()
            .or_else(|| job_problem().map(|(key, reason)| (key.to_string(), reason)))
    }

    /// The networks' own rules (their `validate`, whose field goes under its section), then
    /// what ties them together and where the encoder's weights come from.
    fn network_problem(&self) -> Option<(String, String)> {
        let in_section =
            |section: &str, e: InvalidField| (format!("{section}.{}", e.field), e.reason);
        if let Err(e) = self.model.validate() {
            return Some(in_section("model", e));
        }
        let encoder = &self.text_encoder;
        if self.model.context_dim != encoder.config.hidden_size {
            let reason = format!(
                "{} must equal text_encoder.hidden_size {} (the DiT cross-attends to the encoder's tokens)",
                self.model.context_dim, encoder.config.hidden_size
            );
            return Some(("model.context_dim".into(), reason));
        }
        let weights_problem = encoder
            .weights
            .as_deref()
            .and_then(crate::storage::weights_scheme_problem);
        if let Some(reason) = weights_problem {
            return Some(("text_encoder.weights".into(), reason));
        }
        encoder
            .config
            .validate()
            .err()
            .map(|e| in_section("text_encoder", e))
    }

    fn dist_problem(&self) -> Option<(&'static str, String)> {
        let d = &self.dist;
        let checks: [(bool, &'static str, String); 2] = [
            (
                !(d.bucket_mb.is_finite() && d.bucket_mb > 0.0),
                "dist.bucket_mb",
                format!("must be > 0, got {}", d.bucket_mb),
            ),
            (
                !(d.timeout_secs.is_finite() && d.timeout_secs > 0.0),
                "dist.timeout_secs",
                format!("must be > 0, got {}", d.timeout_secs),
            ),
        ];
        first_failed(checks)
    }

    /// How `world_size` ranks make up one global batch: (micro-batch per rank, accumulation
    /// passes). The global batch and its sample order do not depend on the number of ranks.
    pub fn batch_plan(&self, world_size: usize) -> crate::Result<(usize, usize)> {
        let t = &self.train;
        let micro = t
            .micro_batch_size
            .unwrap_or(t.batch_size / world_size.max(1));
        let per_pass = micro * world_size;
        if micro == 0 || !t.batch_size.is_multiple_of(per_pass) {
            return Err(crate::Error::Config(format!(
                "train.batch_size {} cannot be split over {world_size} rank(s) with train.micro_batch_size {}: \
                 it must be a multiple of micro_batch_size × ranks",
                t.batch_size,
                t.micro_batch_size.map(|m| m.to_string()).unwrap_or_else(|| format!("unset (= {micro})")),
            )));
        }
        Ok((micro, t.batch_size / per_pass))
    }

    fn data_problem(&self) -> Option<(&'static str, String)> {
        let d = &self.data;
        if d.shards.trim().is_empty() {
            return Some((
                "data.shards",
                "must name the shard prefix (a path or URL)".into(),
            ));
        }
        if let Some(reason) = crate::storage::scheme_problem(&d.shards) {
            return Some(("data.shards", reason));
        }
        if d.shuffle_window == 0 {
            return Some(("data.shuffle_window", "must be ≥ 1 shard".into()));
        }
        if d.prefetch == 0 {
            return Some(("data.prefetch", "must be ≥ 1 batch".into()));
        }
        if d.decode_threads == 0 {
            return Some(("data.decode_threads", "must be ≥ 1".into()));
        }
        d.prepare.as_ref().and_then(|p| self.prepare_problem(p))
    }

    fn prepare_problem(&self, p: &PrepareSpec) -> Option<(&'static str, String)> {
        if p.samples == Some(0) {
            return Some((
                "data.prepare.samples",
                "must be > 0 (or unset for the whole split)".into(),
            ));
        }
        if p.samples_per_shard == 0 {
            return Some(("data.prepare.samples_per_shard", "must be > 0".into()));
        }
        // The sizes `data::prepare` writes for the real datasets.
        let (image_size, channels) = match p.dataset {
            DatasetKind::Synthetic => {
                if p.source.is_some() {
                    return Some((
                        "data.prepare.source",
                        "synthetic data is generated, it has no source".into(),
                    ));
                }
                if !(1..=4).contains(&self.model.channels) {
                    let reason = format!(
                        "{} is not 1 to 4, which synthetic data needs",
                        self.model.channels
                    );
                    return Some(("model.channels", reason));
                }
                return None;
            }
            DatasetKind::Cifar10 => (32, 3),
            // 28×28 grayscale, padded to 32×32.
            DatasetKind::FashionMnist => (32, 1),
        };
        let name = p.dataset.name();
        if self.model.channels != channels {
            return Some((
                "model.channels",
                format!(
                    "{} does not match data.prepare.dataset {name} ({channels} {})",
                    self.model.channels,
                    if channels == 1 { "channel" } else { "channels" }
                ),
            ));
        }
        if self.model.image_size != image_size {
            return Some((
                "model.image_size",
                format!(
                    "{} does not match data.prepare.dataset {name} ({image_size}×{image_size})",
                    self.model.image_size
                ),
            ));
        }
        None
    }

    fn train_problem(&self) -> Option<(&'static str, String)> {
        let t = &self.train;
        let unit = |x: f64| (0.0..1.0).contains(&x);
        let checks: [(bool, &'static str, String); 14] = [
            (t.steps == 0, "train.steps", "must be > 0".into()),
            (t.batch_size == 0, "train.batch_size", "must be > 0".into()),
            (
                t.micro_batch_size == Some(0),
                "train.micro_batch_size",
                "must be > 0 (or unset for batch_size / ranks)".into(),
            ),
            (
                t.micro_batch_size
                    .is_some_and(|m| m > 0 && !t.batch_size.is_multiple_of(m)),
                "train.micro_batch_size",
                format!(
                    "{} does not divide train.batch_size {}",
                    t.micro_batch_size.unwrap_or(0),
                    t.batch_size
                ),
            ),
            (
                !(t.lr.is_finite() && t.lr > 0.0),
                "train.lr",
                format!("must be > 0, got {}", t.lr),
            ),
            (
                !(t.weight_decay.is_finite() && t.weight_decay >= 0.0),
                "train.weight_decay",
                format!("must be ≥ 0, got {}", t.weight_decay),
            ),
            (
                !(unit(t.betas[0]) && unit(t.betas[1])),
                "train.betas",
                format!("both must be in [0, 1), got {:?}", t.betas),
            ),
            (
                !(t.eps.is_finite() && t.eps > 0.0),
                "train.eps",
                format!("must be > 0, got {}", t.eps),
            ),
            (
                !(t.grad_clip.is_finite() && t.grad_clip >= 0.0),
                "train.grad_clip",
                format!("must be ≥ 0 (0 = off), got {}", t.grad_clip),
            ),
            (
                !unit(t.ema_decay),
                "train.ema_decay",
                format!("must be in [0, 1), got {}", t.ema_decay),
            ),
            (
                !(0.0..=1.0).contains(&t.text_drop_prob),
                "train.text_drop_prob",
                format!("must be in [0, 1], got {}", t.text_drop_prob),
            ),
            (
                t.threads == Some(0),
                "train.threads",
                "must be > 0 (or unset for all cores)".into(),
            ),
            (
                !(t.stop_grace_secs.is_finite() && t.stop_grace_secs > 0.0),
                "train.stop_grace_secs",
                format!("must be > 0, got {}", t.stop_grace_secs),
            ),
            (
                !(t.skip_loss_spikes == 0.0
                    || (t.skip_loss_spikes.is_finite() && t.skip_loss_spikes > 1.0)),
                "train.skip_loss_spikes",
                format!(
                    "must be 0 (off) or a factor above 1, got {}",
                    t.skip_loss_spikes
                ),
            ),
        ];
        first_failed(checks)
    }

    fn output_problem(&self) -> Option<(&'static str, String)> {
        let c = &self.checkpoint;
        if c.enabled() {
            if let Some(reason) = crate::storage::scheme_problem(&c.url) {
                return Some(("checkpoint.url", reason));
            }
            if c.keep_last == 0 {
                return Some((
                    "checkpoint.keep_last",
                    "must be ≥ 1 when checkpointing (checkpoint.url is set)".into(),
                ));
            }
        }
        if let Some(metric) = c.keep_best {
            let problem = if !c.enabled() {
                Some("needs checkpoint.url: there is no checkpoint to keep".to_string())
            } else if self.eval.is_off() {
                Some(format!(
                    "`{}` needs evaluations: set eval.every_steps (or eval.at_end)",
                    metric.name()
                ))
            } else if metric == BestMetric::ClipScore && self.eval_clip_weights().is_none() {
                Some(
                    "`clip_score` needs a CLIP: set eval.clip_weights or text_encoder.weights"
                        .into(),
                )
            } else {
                None
            };
            if let Some(reason) = problem {
                return Some(("checkpoint.keep_best", reason));
            }
        }
        if !self.logging.dir.trim().is_empty() {
            if let Some(reason) = crate::storage::scheme_problem(&self.logging.dir) {
                return Some(("logging.dir", reason));
            }
        }
        None
    }

    fn sample_problem(&self) -> Option<(&'static str, String)> {
        let s = &self.sample;
        let sampling = s.every_steps > 0 || s.at_end;
        let checks: [(bool, &'static str, String); 4] = [
            (!(s.cfg.is_finite() && s.cfg >= 0.0), "sample.cfg", format!("must be ≥ 0, got {}", s.cfg)),
            (s.steps == 0, "sample.steps", "must be > 0".into()),
            (s.per_prompt == 0, "sample.per_prompt", "must be > 0".into()),
            (
                sampling && s.prompts.is_empty(),
                "sample.prompts",
                "must list at least one prompt when sampling is on (sample.every_steps > 0 or sample.at_end)".into(),
            ),
        ];
        let sweep_problem = s.cfg_sweep.as_ref().and_then(|scales| {
            if scales.is_empty() {
                return Some((
                    "sample.cfg_sweep",
                    "must list at least one scale, or be unset".to_string(),
                ));
            }
            let bad = scales.iter().find(|v| !(v.is_finite() && **v >= 0.0))?;
            Some((
                "sample.cfg_sweep",
                format!("every scale must be ≥ 0, got {bad}"),
            ))
        });
        first_failed(checks).or(sweep_problem).or_else(|| {
            let dir = s.dir.as_deref()?;
            let reason = if dir.trim().is_empty() {
                "must be a path or URL (or unset)".to_string()
            } else {
                crate::storage::scheme_problem(dir)?
            };
            Some(("sample.dir", reason))
        })
    }
}

impl CheckpointSpec {
    /// Whether checkpoints are written at all (a URL is set).
    pub fn enabled(&self) -> bool {
        !self.url.trim().is_empty()
    }
}

impl LoggingSpec {
    /// Whether TensorBoard event files are written (a log dir is set).
    pub fn tensorboard(&self) -> bool {
        !self.dir.trim().is_empty()
    }
}

impl SampleSpec {
    pub fn enabled(&self) -> bool {
        self.every_steps > 0 || self.at_end
    }
}

impl BackendChoice {
    /// The backend to run; `auto` resolves to [`BackendKind::preferred`]. A backend this
    /// binary was built without is an error naming `train.backend` and the cargo feature.
    pub fn resolve(self) -> crate::Result<BackendKind> {
        let kind = match self {
            BackendChoice::Auto => return Ok(BackendKind::preferred()),
            BackendChoice::Flex => BackendKind::Flex,
            BackendChoice::Ndarray => BackendKind::Ndarray,
            BackendChoice::Candle => BackendKind::Candle,
            BackendChoice::Cuda => BackendKind::Cuda,
            BackendChoice::CudaNoFusion => BackendKind::CudaNoFusion,
        };
        if kind.is_gpu() && kind.compiled_in() && !crate::backend::cuda_driver_present() {
            return Err(crate::Error::Config(format!(
                "train.backend: `{}`, but this machine has no NVIDIA driver (libcuda.so.1 not found); \
                 use `auto` to fall back to the CPU",
                kind.name()
            )));
        }
        if kind.compiled_in() {
            Ok(kind)
        } else {
            Err(crate::Error::Config(format!(
                "train.backend: `{}` is not compiled into this binary (build with --features {})",
                kind.name(),
                kind.cargo_feature()
            )))
        }
    }
}

fn first_failed<const N: usize>(
    checks: [(bool, &'static str, String); N],
) -> Option<(&'static str, String)> {
    InvalidField::first(checks)
        .err()
        .map(|e| (e.field, e.reason))
}
