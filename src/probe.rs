//! What `ditrun inspect similarity` and `ditrun inspect cross-attention` compute: they run
//! the text encoder or the sampler and collect the numbers that `viz` draws. Generic over the
//! backend, which the command picks once (`with_backend!`).

use burn::prelude::*;

use crate::error::{Error, Result};
use crate::flow::{generate_recording, steps_for_times, CrossAttentionAtStep, SampleOptions};
use crate::model::{ClipTextConfig, TextConditionalDiT};
use crate::text::{TextEmbeddingCache, TextEncoder};
use crate::viz::{BlockChoice, CrossAttentionReport, SimilarityReport, StepMaps};

/// The similarity report of `prompts` under a text encoder: pretrained `weights`, or without
/// them the random initialisation seeded by `seed` (what a job with no `text_encoder.weights`
/// trains with).
pub fn similarity_report<B: Backend>(
    weights: Option<&str>,
    config: &ClipTextConfig,
    seed: u64,
    prompts: &[String],
) -> Result<SimilarityReport> {
    let device = burn::tensor::Device::<B>::default();
    let encoder = TextEncoder::<B>::load(weights, config, seed, &device)?;
    let matrix = caption_similarity(&encoder, prompts);
    let encoder = weights
        .map(str::to_string)
        .unwrap_or_else(|| format!("random initialisation, seed {seed}"));
    Ok(SimilarityReport {
        prompts: prompts.to_vec(),
        matrix,
        encoder,
    })
}

/// The similarity matrix of `prompts` under `encoder`.
pub fn caption_similarity<B: Backend>(
    encoder: &TextEncoder<B>,
    prompts: &[String],
) -> Vec<Vec<f64>> {
    if prompts.is_empty() {
        return Vec::new();
    }
    let tokens: Vec<_> = prompts
        .iter()
        .map(|p| encoder.tokenizer.tokenize(p))
        .collect();
    let len = encoder.tokenizer.context_length();
    let ids: Vec<i64> = tokens
        .iter()
        .flat_map(|t| t.ids.iter().map(|&id| id as i64))
        .collect();
    let device = encoder.model.final_layer_norm.weight.device();
    let input = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [prompts.len(), len]), &device);
    let pooled = encoder.model.forward(input).pooler_output;
    let width = pooled.dims()[1];
    let values = pooled
        .into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .expect("f32 data");
    let unit: Vec<Vec<f64>> = values
        .chunks(width)
        .map(|row| {
            let norm = row
                .iter()
                .map(|&v| (v as f64).powi(2))
                .sum::<f64>()
                .sqrt()
                .max(f64::MIN_POSITIVE);
            row.iter().map(|&v| v as f64 / norm).collect()
        })
        .collect();
    // Each pair is computed once and mirrored, so the matrix is symmetric to the bit.
    let n = unit.len();
    let mut matrix = vec![vec![0.0; n]; n];
    for i in 0..n {
        for j in i..n {
            let cosine = if i == j {
                1.0
            } else {
                unit[i]
                    .iter()
                    .zip(&unit[j])
                    .map(|(a, b)| a * b)
                    .sum::<f64>()
                    .clamp(-1.0, 1.0)
            };
            matrix[i][j] = cosine;
            matrix[j][i] = cosine;
        }
    }
    matrix
}

/// Samples one image for `prompt` (seeded as `options` says) and collects its cross-attention
/// maps at the steps nearest to `times`.
pub fn cross_attention_maps<B: Backend, E: Backend>(
    model: &TextConditionalDiT<B>,
    cache: &mut TextEmbeddingCache<E>,
    prompt: &str,
    options: &SampleOptions,
    block: BlockChoice,
    times: &[f64],
) -> Result<CrossAttentionReport> {
    let blocks = model.blocks.len();
    check_block_and_times(block, blocks, times)?;
    let options = SampleOptions {
        per_prompt: 1,
        ..options.clone()
    };
    let record_steps = steps_for_times(times, options.steps);
    let prompts = [prompt.to_string()];
    let (mut images, recorded) =
        generate_recording(model, cache, &prompts, &options, &record_steps);
    let tokens = cache.encoder().tokenizer.token_labels(prompt);
    let grid = model.image_size / model.patch_size;
    let rows = recorded
        .into_iter()
        .map(|at_step| step_maps(at_step, block, tokens.len()))
        .collect();
    Ok(CrossAttentionReport {
        prompt: prompt.to_string(),
        tokens,
        grid,
        block,
        blocks,
        cfg: options.cfg,
        steps: options.steps,
        rows,
        image: images.remove(0).pixels,
        image_size: model.image_size,
        channels: model.channels,
    })
}

/// `--block` names one of the model's blocks, and `--times` lie in [0, 1].
fn check_block_and_times(block: BlockChoice, blocks: usize, times: &[f64]) -> Result<()> {
    if let BlockChoice::Block(i) = block {
        if i >= blocks {
            return Err(Error::Config(format!(
                "--block {i}: this model has {blocks} blocks, numbered 0 to {}",
                blocks - 1
            )));
        }
    }
    if times.is_empty() {
        return Err(Error::Config(
            "--times: give at least one time in [0, 1]".into(),
        ));
    }
    if let Some(t) = times.iter().find(|t| !(0.0..=1.0).contains(*t)) {
        return Err(Error::Config(format!(
            "--times: {t} is outside [0, 1] (1 = noise, 0 = image)"
        )));
    }
    Ok(())
}

/// One step's weights `[1, N, M]` per block → the chosen blocks' mean as one map per token.
fn step_maps<B: Backend>(
    at_step: CrossAttentionAtStep<B>,
    block: BlockChoice,
    tokens: usize,
) -> StepMaps {
    let chosen: Vec<Tensor<B, 3>> = match block {
        BlockChoice::All => at_step.per_block,
        BlockChoice::Block(i) => vec![at_step.per_block[i].clone()],
    };
    let count = chosen.len() as f64;
    let mean = chosen
        .into_iter()
        .reduce(|a, b| a + b)
        .expect("a model has blocks")
        .div_scalar(count);
    let [_, patches, m] = mean.dims();
    debug_assert_eq!(m, tokens, "one weight per real token");
    let weights: Vec<f32> = mean
        .into_data()
        .convert::<f32>()
        .into_vec()
        .expect("f32 weights");
    let maps = (0..m)
        .map(|j| (0..patches).map(|n| weights[n * m + j]).collect())
        .collect();
    StepMaps {
        step: at_step.step,
        t: at_step.t,
        maps,
    }
}
