//! Images from prompts: encode the prompts once, draw seeded noise, integrate the guided
//! velocity field ([`super::sample_recording`]), and map [-1, 1] back to 8-bit pixels.
//!
//! Invariants: the noise depends only on the seed and the images' count and shape, so images
//! from different checkpoints compare; the captions come in through [`CaptionContexts`], never
//! by naming the caption cache (`text` sits above `flow`: `config` names
//! [`Sampler`](super::Sampler), and the cache is built from a job).

use burn::prelude::*;
use rand::rngs::StdRng;
use rand::SeedableRng;

use super::sampler::{sample_recording, CrossAttentionAtStep, Guidance, Sampler};
use crate::model::TextConditionalDiT;

/// How to sample: guidance, integration, and how many images per prompt from which seed.
#[derive(Clone, Debug)]
pub struct SampleOptions {
    pub cfg: f64,
    pub steps: usize,
    pub sampler: Sampler,
    pub per_prompt: usize,
    pub seed: u64,
}

/// One generated image: `pixels` are `height × width × channels`, channels last.
#[derive(Clone, Debug)]
pub struct GeneratedImage {
    pub prompt: String,
    pub index: usize,
    pub pixels: Vec<u8>,
}

/// The pixels, as `viz`'s drawing functions take images.
impl AsRef<[u8]> for GeneratedImage {
    fn as_ref(&self) -> &[u8] {
        &self.pixels
    }
}

/// Where the sampler's text conditioning comes from: for each caption, its encoded tokens.
/// A trait because the caption cache that implements it lives above `flow` (see `sample`).
pub trait CaptionContexts {
    /// Context `[B, M, D]` and key mask `[B, M]` (true = real token) of `captions`.
    fn contexts<B: Backend>(
        &mut self,
        captions: &[&str],
        device: &B::Device,
    ) -> (Tensor<B, 3>, Tensor<B, 2, Bool>);
}

/// `per_prompt` images for each prompt, in prompt order. The same seed gives the same noise,
/// so grids made at different training steps are comparable.
pub fn generate<B: Backend, C: CaptionContexts>(
    model: &TextConditionalDiT<B>,
    cache: &mut C,
    prompts: &[String],
    options: &SampleOptions,
) -> Vec<GeneratedImage> {
    generate_recording(model, cache, prompts, options, &[]).0
}

/// [`generate`], also returning the cross-attention weights of the steps in `record_steps`
/// (see [`super::sample_recording`]), batch rows in the order of the returned images.
pub fn generate_recording<B: Backend, C: CaptionContexts>(
    model: &TextConditionalDiT<B>,
    cache: &mut C,
    prompts: &[String],
    options: &SampleOptions,
    record_steps: &[usize],
) -> (Vec<GeneratedImage>, Vec<CrossAttentionAtStep<B>>) {
    let device = model.final_norm.weight.device();
    let captions: Vec<&str> = prompts
        .iter()
        .flat_map(|p| std::iter::repeat_n(p.as_str(), options.per_prompt))
        .collect();
    if captions.is_empty() {
        return (Vec::new(), Vec::new());
    }
    let guidance = guidance_for(cache, &captions, options.cfg, &device);
    let (c, s) = (model.channels, model.image_size);
    let mut rng = StdRng::seed_from_u64(options.seed);
    let noise: Vec<f32> = (0..captions.len() * c * s * s)
        .map(|_| rand::Rng::sample::<f32, _>(&mut rng, rand_distr::StandardNormal))
        .collect();
    let x_init = Tensor::from_data(TensorData::new(noise, [captions.len(), c, s, s]), &device);
    let (images, recorded) = sample_recording(
        model,
        x_init,
        &guidance,
        options.steps,
        options.sampler,
        record_steps,
    );
    let values: Vec<f32> = images
        .into_data()
        .convert::<f32>()
        .into_vec()
        .expect("f32 images");
    let per_image = c * s * s;
    let images = captions
        .iter()
        .enumerate()
        .map(|(i, prompt)| GeneratedImage {
            prompt: prompt.to_string(),
            index: i % options.per_prompt,
            pixels: to_pixels(&values[i * per_image..(i + 1) * per_image], c, s),
        })
        .collect();
    (images, recorded)
}

/// Images in [0, 1] (`[N, C, H, W]`, rounded to 8-bit levels, as saved images are) for
/// `captions[i]` from noise drawn with `seeds[i]` alone: an image does not depend on which
/// other images share its batch, so ranks can split a set of samples any way.
pub fn generate_per_seed<B: Backend, C: CaptionContexts>(
    model: &TextConditionalDiT<B>,
    cache: &mut C,
    captions: &[&str],
    seeds: &[u64],
    options: &SampleOptions,
) -> Tensor<B, 4> {
    assert_eq!(captions.len(), seeds.len(), "one seed per caption");
    let device = model.final_norm.weight.device();
    let (c, s) = (model.channels, model.image_size);
    let noise: Vec<f32> = seeds
        .iter()
        .flat_map(|&seed| {
            let mut rng = StdRng::seed_from_u64(seed);
            (0..c * s * s)
                .map(move |_| rand::Rng::sample::<f32, _>(&mut rng, rand_distr::StandardNormal))
        })
        .collect();
    let guidance = guidance_for(cache, captions, options.cfg, &device);
    let x_init = Tensor::from_data(TensorData::new(noise, [captions.len(), c, s, s]), &device);
    let (images, _) = sample_recording(
        model,
        x_init,
        &guidance,
        options.steps,
        options.sampler,
        &[],
    );
    ((images.clamp(-1.0, 1.0) + 1.0) * 127.5).round() / 255.0
}

/// `captions`' contexts and the empty caption's, guided with `scale`.
fn guidance_for<B: Backend, C: CaptionContexts>(
    cache: &mut C,
    captions: &[&str],
    scale: f64,
    device: &B::Device,
) -> Guidance<B> {
    let (context, mask) = cache.contexts::<B>(captions, device);
    let (null_context, null_mask) = cache.contexts::<B>(&[""], device);
    Guidance {
        context,
        mask,
        null_context,
        null_mask,
        scale,
    }
}

/// One image per (prompt, scale) with the same seed, so every column starts from the same
/// noise and differs only in its guidance: `result[scale][prompt]`.
pub fn cfg_sweep<B: Backend, C: CaptionContexts>(
    model: &TextConditionalDiT<B>,
    cache: &mut C,
    prompts: &[String],
    scales: &[f64],
    options: &SampleOptions,
) -> Vec<Vec<GeneratedImage>> {
    scales
        .iter()
        .map(|&cfg| {
            generate(
                model,
                cache,
                prompts,
                &SampleOptions {
                    cfg,
                    per_prompt: 1,
                    ..options.clone()
                },
            )
        })
        .collect()
}

/// `[C, H, W]` in [-1, 1] → `H × W × C` bytes.
fn to_pixels(chw: &[f32], channels: usize, size: usize) -> Vec<u8> {
    let mut out = vec![0u8; chw.len()];
    for c in 0..channels {
        for p in 0..size * size {
            let v = (chw[c * size * size + p] + 1.0) * 127.5;
            out[p * channels + c] = v.round().clamp(0.0, 255.0) as u8;
        }
    }
    out
}
