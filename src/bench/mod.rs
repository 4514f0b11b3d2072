//! `ditrun bench`: images/s of full training steps (flow-matching loss, backward, AdamW) of the
//! seed model with cached text embeddings, the figure compared against
//! `shared/bench/torch_baseline.py` on the same machine and threads.

use std::time::Instant;

use burn::optim::{GradientsParams, Optimizer};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::backend::BackendKind;
use crate::dist::{average_gradients, reduce_bucket, Collective};
use crate::error::Result;
use crate::flow::{drop_captions, flow_matching_loss, FlowBatch};
use crate::kernels::autocast::{with_precision, Precision};
use crate::model::{ClipTextConfig, TextDiTConfig};
use crate::text::{TextEmbeddingCache, TextEncoder};

mod profile;
pub use profile::{OpProfile, StepProfile};

/// [`profile::profile`] on `B`, against a measured step of `step_s` seconds with
/// `context_tokens` text tokens.
pub fn profile_step<B: Backend>(
    options: &BenchOptions,
    context_tokens: usize,
    step_s: f64,
) -> StepProfile {
    profile::profile::<burn::backend::Autodiff<B>>(
        &options.model,
        options.batch,
        context_tokens,
        step_s * 1e3,
    )
}

/// The seed's captions: CIFAR-10's classes as "a photo of a/an <class>".
const CAPTIONS: [&str; 10] = [
    "a photo of an airplane",
    "a photo of an automobile",
    "a photo of a bird",
    "a photo of a cat",
    "a photo of a deer",
    "a photo of a dog",
    "a photo of a frog",
    "a photo of a horse",
    "a photo of a ship",
    "a photo of a truck",
];

#[derive(Clone, Debug)]
pub struct BenchOptions {
    pub backend: BackendKind,
    pub batch: usize,
    pub steps: usize,
    pub warmup: usize,
    pub threads: usize,
    /// Run the CLIP encoder on every batch as the seed does, instead of the cache.
    pub clip_per_batch: bool,
    /// The matrix products' dtype (`train.precision`).
    pub precision: Precision,
    pub model: TextDiTConfig,
    pub text: ClipTextConfig,
}

#[derive(Debug, Serialize)]
pub struct BenchReport {
    /// Data-parallel ranks: `images_per_s` counts all of them, `batch` is per rank.
    pub ranks: usize,
    #[serde(rename = "impl")]
    pub implementation: &'static str,
    pub backend: BackendKind,
    pub precision: Precision,
    pub clip_per_batch: bool,
    /// ditrun's fused CPU kernels (false under `--unfused`: burn's own ops).
    pub fused_kernels: bool,
    /// The library the linear layers' products ran on (CPU backends; `DITRUN_BLAS`).
    pub blas: &'static str,
    /// Which AdamW ran: "host" (flat, CPU), "device" (flat, tensor ops) or "burn" (per tensor).
    pub optimizer: &'static str,
    pub threads: usize,
    pub batch: usize,
    pub steps: usize,
    pub params: usize,
    /// Text tokens the DiT attended to (the batch's longest caption).
    pub context_tokens: usize,
    /// Median of the timed steps.
    pub step_s: f64,
    /// Median time of a step's gradient all-reduce (0 on one rank), and its share of the step.
    pub allreduce_s: f64,
    pub allreduce_share: f64,
    pub images_per_s: f64,
}

/// Runs on every rank of `collective` (`mpirun -np N ditrun bench`): each rank steps on its
/// own batch and the gradients are averaged as in training. `B` is `options.backend`'s type.
pub fn run<B: Backend>(options: &BenchOptions, collective: &dyn Collective) -> Result<BenchReport> {
    run_on::<burn::backend::Autodiff<B>>(options, collective)
}

fn run_on<AB: AutodiffBackend>(
    options: &BenchOptions,
    collective: &dyn Collective,
) -> Result<BenchReport> {
    let device = AB::Device::default();
    AB::seed(&device, 0);
    let mut rng = StdRng::seed_from_u64(0);
    let mut model = options.model.init::<AB>(&device)?;
    let params = model.num_params();
    let mut optimizer =
        crate::optim::AdamWSettings::bench().init::<AB, crate::model::TextConditionalDiT<AB>>();
    let encoder = TextEncoder::<AB::InnerBackend>::load(None, &options.text, 0, &device)?;
    let mut cache = TextEmbeddingCache::new(encoder);
    cache.warm(CAPTIONS.iter().copied().chain([""]));
    let shape = [
        options.batch,
        options.model.channels,
        options.model.image_size,
        options.model.image_size,
    ];

    let mut times = Vec::with_capacity(options.steps);
    let mut allreduce_times = Vec::with_capacity(options.steps);
    let mut context_tokens = 0;
    for step in 0..options.warmup + options.steps {
        let started = Instant::now();
        let captions: Vec<&str> = (0..options.batch)
            .map(|_| CAPTIONS[rng.random_range(0..CAPTIONS.len())])
            .collect();
        let captions = drop_captions(&captions, 0.1, &mut rng);
        let (context, mask) = if options.clip_per_batch {
            encode_full_context::<AB>(cache.encoder(), &captions, &device)
        } else {
            cache.batch::<AB>(&captions, &device)
        };
        context_tokens = context.dims()[1];
        let x0 =
            Tensor::<AB, 4>::random(shape, burn::tensor::Distribution::Normal(0.0, 1.0), &device);
        let batch = FlowBatch::draw_on_device(x0);
        let loss = with_precision(options.precision, || {
            flow_matching_loss(&model, batch, context, Some(mask))
        });
        let mut grads = GradientsParams::from_grads(loss.backward(), &model);
        let allreduce = average_gradients(&model, &mut grads, collective, DDP_BUCKET_BYTES)?;
        model = optimizer.step(1e-4, model, grads);
        AB::sync(&device).ok();
        if step >= options.warmup {
            times.push(started.elapsed().as_secs_f64());
            allreduce_times.push(allreduce.as_secs_f64());
        }
    }
    times.sort_by(f64::total_cmp);
    allreduce_times.sort_by(f64::total_cmp);
    let step_s = times[times.len() / 2];
    let allreduce_s = allreduce_times[allreduce_times.len() / 2];
    let ranks = collective.world_size();
    Ok(BenchReport {
        implementation: "ditrun",
        backend: options.backend,
        precision: options.precision,
        clip_per_batch: options.clip_per_batch,
        fused_kernels: crate::kernels::fused(),
        blas: crate::kernels::blas::backend_name(),
        optimizer: optimizer.kind(),
        threads: options.threads,
        batch: options.batch,
        steps: options.steps,
        params,
        context_tokens,
        step_s: (step_s * 1e4).round() / 1e4,
        allreduce_s: (allreduce_s * 1e4).round() / 1e4,
        allreduce_share: (allreduce_s / step_s * 1e4).round() / 1e4,
        images_per_s: ((ranks as f64 * options.batch as f64 / step_s) * 100.0).round() / 100.0,
        ranks,
    })
}

/// Parameters (and so gradient values) of the seed model; `tests/model.rs` checks the count.
pub const SEED_MODEL_PARAMS: usize = 18_145_072;

/// PyTorch DDP's default bucket size, as in training.
const DDP_BUCKET_BYTES: usize = 25_000_000;

#[derive(Debug, Serialize)]
pub struct AllReduceReport {
    pub transport: &'static str,
    pub backend: BackendKind,
    pub ranks: usize,
    pub bytes: usize,
    /// Median time to average the buffer over the ranks (one collective per 25 MB bucket,
    /// on the backend's device: through host memory on CPUs, in place with NCCL on GPUs).
    pub allreduce_s: f64,
    /// `bytes / allreduce_s` (PyTorch's "algorithm bandwidth").
    pub allreduce_gb_per_s: f64,
    /// Median time of a plain copy of the same buffer in host memory.
    pub memcpy_s: f64,
    pub memcpy_gb_per_s: f64,
    /// Every rank averaged the same values, so the mean must equal them: a smoke test of the
    /// transport.
    pub mean_is_exact: bool,
}

/// Times the gradient all-reduce alone: `values` f32 (the seed model's gradients: 18,145,072
/// = 72.6 MB) in 25 MB buckets on the device of `backend` (whose type `B` is), against a
/// memcpy of the same buffer.
pub fn allreduce<B: Backend>(
    backend: BackendKind,
    collective: &dyn Collective,
    values: usize,
    repeats: usize,
) -> Result<AllReduceReport> {
    let device = B::Device::default();
    let source: Vec<f32> = (0..values).map(|i| (i % 1000) as f32 * 1e-3).collect();
    let bucket_len = DDP_BUCKET_BYTES / std::mem::size_of::<f32>();
    // Fresh tensors each round, as the gradients of a step are: reading a tensor that shares
    // its storage would measure a copy, not the all-reduce.
    let buckets = || -> Vec<Tensor<B, 1>> {
        source
            .chunks(bucket_len)
            .map(|piece| Tensor::from_data(TensorData::new(piece.to_vec(), [piece.len()]), &device))
            .collect()
    };
    let median = |mut times: Vec<f64>| {
        times.sort_by(f64::total_cmp);
        times[times.len() / 2]
    };
    let mut copy = source.clone();
    let mut reduce_times = Vec::with_capacity(repeats);
    let mut copy_times = Vec::with_capacity(repeats);
    let mut reduced = Vec::new();
    for _ in 0..repeats.max(1) + 1 {
        let round = buckets();
        B::sync(&device).ok();
        collective.barrier("all-reduce benchmark")?;
        let started = Instant::now();
        reduced = Vec::with_capacity(round.len());
        for bucket in round {
            reduced.extend(reduce_bucket(
                vec![bucket],
                collective,
                "all-reduce benchmark",
            )?);
        }
        B::sync(&device).ok();
        reduce_times.push(started.elapsed().as_secs_f64());
        let started = Instant::now();
        copy.copy_from_slice(std::hint::black_box(&source));
        copy_times.push(started.elapsed().as_secs_f64());
        std::hint::black_box(&copy);
    }
    let mean_is_exact = reduced
        .into_iter()
        .flat_map(|t| {
            t.into_data()
                .convert::<f32>()
                .into_vec::<f32>()
                .unwrap_or_default()
        })
        .eq(source.iter().copied());
    // The first round pays for page faults and connection set-up.
    let (allreduce_s, memcpy_s) = (
        median(reduce_times[1..].to_vec()),
        median(copy_times[1..].to_vec()),
    );
    let bytes = values * std::mem::size_of::<f32>();
    let rate = |secs: f64| ((bytes as f64 / secs / 1e9) * 100.0).round() / 100.0;
    Ok(AllReduceReport {
        transport: collective.transport(),
        backend,
        ranks: collective.world_size(),
        bytes,
        allreduce_s: (allreduce_s * 1e5).round() / 1e5,
        allreduce_gb_per_s: rate(allreduce_s),
        memcpy_s: (memcpy_s * 1e5).round() / 1e5,
        memcpy_gb_per_s: rate(memcpy_s),
        mean_is_exact,
    })
}
/// The seed's loop: all 77 positions of every caption through the encoder, every batch.
fn encode_full_context<AB: AutodiffBackend>(
    encoder: &TextEncoder<AB::InnerBackend>,
    captions: &[&str],
    device: &AB::Device,
) -> (Tensor<AB, 3>, Tensor<AB, 2, Bool>) {
    let tokens: Vec<_> = captions
        .iter()
        .map(|c| encoder.tokenizer.tokenize(c))
        .collect();
    let len = encoder.tokenizer.context_length();
    let ids: Vec<i64> = tokens
        .iter()
        .flat_map(|t| t.ids.iter().map(|&i| i as i64))
        .collect();
    let mask: Vec<bool> = tokens.iter().flat_map(|t| t.mask()).collect();
    let input = Tensor::from_data(TensorData::new(ids, [captions.len(), len]), device);
    let hidden = encoder.model.forward(input).last_hidden_state;
    (
        Tensor::from_inner(hidden),
        Tensor::from_data(TensorData::new(mask, [captions.len(), len]), device),
    )
}
