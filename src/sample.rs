//! Images from prompts: encode the prompts once, draw seeded noise, integrate the guided
//! velocity field, and map [-1, 1] back to 8-bit pixels.

use std::path::{Path, PathBuf};

use burn::prelude::*;
use rand::rngs::StdRng;
use rand::SeedableRng;

use crate::config::JobSpec;
use crate::error::{Error, Result};
use crate::flow::{sample_recording, CrossAttentionAtStep, Guidance, Sampler};
use crate::model::TextConditionalDiT;
use crate::text::TextEmbeddingCache;

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

/// `per_prompt` images for each prompt, in prompt order. The same seed gives the same noise,
/// so grids made at different training steps are comparable.
pub fn generate<B: Backend, E: Backend>(
    model: &TextConditionalDiT<B>,
    cache: &mut TextEmbeddingCache<E>,
    prompts: &[String],
    options: &SampleOptions,
) -> Vec<GeneratedImage> {
    generate_recording(model, cache, prompts, options, &[]).0
}

/// [`generate`], also returning the cross-attention weights of the steps in `record_steps`
/// (see [`crate::flow::sample_recording`]), batch rows in the order of the returned images.
pub fn generate_recording<B: Backend, E: Backend>(
    model: &TextConditionalDiT<B>,
    cache: &mut TextEmbeddingCache<E>,
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
    let (context, mask) = cache.batch::<B>(&captions, &device);
    let (null_context, null_mask) = cache.batch::<B>(&[""], &device);
    let guidance = Guidance { context, mask, null_context, null_mask, scale: options.cfg };
    let (c, s) = (model.channels, model.image_size);
    let mut rng = StdRng::seed_from_u64(options.seed);
    let noise: Vec<f32> = (0..captions.len() * c * s * s)
        .map(|_| rand::Rng::sample::<f32, _>(&mut rng, rand_distr::StandardNormal))
        .collect();
    let x_init = Tensor::from_data(TensorData::new(noise, [captions.len(), c, s, s]), &device);
    let (images, recorded) =
        sample_recording(model, x_init, &guidance, options.steps, options.sampler, record_steps);
    let values: Vec<f32> = images.into_data().convert::<f32>().into_vec().expect("f32 images");
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

/// One image per (prompt, scale) with the same seed, so every column starts from the same
/// noise and differs only in its guidance: `result[scale][prompt]`.
pub fn cfg_sweep<B: Backend, E: Backend>(
    model: &TextConditionalDiT<B>,
    cache: &mut TextEmbeddingCache<E>,
    prompts: &[String],
    scales: &[f64],
    options: &SampleOptions,
) -> Vec<Vec<GeneratedImage>> {
    scales
        .iter()
        .map(|&cfg| generate(model, cache, prompts, &SampleOptions { cfg, per_prompt: 1, ..options.clone() }))
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

/// `ditrun sample`: which checkpoint, which prompts, how.
#[derive(Clone, Debug)]
pub struct SampleRequest {
    pub checkpoint: String,
    pub prompts: Vec<String>,
    pub options: SampleOptions,
}

/// Work done with a checkpoint's EMA weights and its job's text encoder on the backend the
/// job names: a trait, because a closure cannot be generic over the backend.
pub trait CheckpointTask {
    type Output;
    fn run<B: Backend>(
        self,
        job: &JobSpec,
        model: &TextConditionalDiT<B>,
        cache: &mut TextEmbeddingCache<B>,
    ) -> Result<Self::Output>;
}

/// Loads the checkpoint at `url` (its job, EMA weights and text encoder: with no pretrained
/// weights configured, the same seeded initialisation as in training) and runs `task` on it.
pub fn with_checkpoint<T: CheckpointTask>(url: &str, task: T) -> Result<(JobSpec, T::Output)> {
    let checkpoint = crate::checkpoint::load_url(url)?;
    let job = crate::training_state::job_of_checkpoint(&checkpoint)?;
    let backend = job.train.backend.resolve()?;
    let output = crate::with_backend!(backend, B => {
        let device = burn::tensor::Device::<B>::default();
        let model = crate::training_state::model_from_checkpoint::<B>(&checkpoint, &job.dit_config(), &device)?;
        let mut cache = TextEmbeddingCache::<B>::for_job(&job, &device)?;
        task.run::<B>(&job, &model, &mut cache)
    })?;
    Ok((job, output))
}

struct Generate<'a>(&'a SampleRequest);

impl CheckpointTask for Generate<'_> {
    type Output = Vec<GeneratedImage>;
    fn run<B: Backend>(self, _: &JobSpec, model: &TextConditionalDiT<B>, cache: &mut TextEmbeddingCache<B>) -> Result<Self::Output> {
        Ok(generate(model, cache, &self.0.prompts, &self.0.options))
    }
}

struct Sweep<'a>(&'a SampleRequest, &'a [f64]);

impl CheckpointTask for Sweep<'_> {
    type Output = Vec<Vec<GeneratedImage>>;
    fn run<B: Backend>(self, _: &JobSpec, model: &TextConditionalDiT<B>, cache: &mut TextEmbeddingCache<B>) -> Result<Self::Output> {
        Ok(cfg_sweep(model, cache, &self.0.prompts, self.1, &self.0.options))
    }
}

/// Generates the request's images with the checkpoint's EMA weights and writes either one grid
/// PNG (`out`) or one PNG per image (`out_dir`). Returns the files.
pub fn sample_checkpoint(
    request: &SampleRequest,
    out: Option<&Path>,
    out_dir: Option<&Path>,
) -> Result<Vec<PathBuf>> {
    let (job, images) = with_checkpoint(&request.checkpoint, Generate(request))?;
    let (size, channels) = (job.model.image_size, job.model.channels);
    let mut written = Vec::new();
    if let Some(path) = out {
        let pixels: Vec<Vec<u8>> = images.iter().map(|i| i.pixels.clone()).collect();
        let (grid, height, width) =
            crate::metrics::image_grid(&pixels, size, size, channels, request.options.per_prompt);
        write_png(path, &grid, height, width, channels)?;
        written.push(path.to_path_buf());
    }
    if let Some(dir) = out_dir {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        for image in &images {
            let path = dir.join(format!("{}-{:03}.png", file_stem(&image.prompt), image.index));
            write_png(&path, &image.pixels, size, size, channels)?;
            written.push(path);
        }
    }
    Ok(written)
}

/// The CFG sweep of a checkpoint's EMA weights as a labelled grid PNG at `out`: rows are the
/// prompts, columns the guidance scales.
pub fn sweep_checkpoint(request: &SampleRequest, scales: &[f64], out: &Path) -> Result<PathBuf> {
    let (job, columns) = with_checkpoint(&request.checkpoint, Sweep(request, scales))?;
    let canvas = crate::viz::render_sweep(&request.prompts, scales, &columns, job.model.image_size, job.model.channels);
    std::fs::write(out, canvas.to_png()?).map_err(|e| Error::io(out, e))?;
    Ok(out.to_path_buf())
}

fn write_png(path: &Path, pixels: &[u8], height: usize, width: usize, channels: usize) -> Result<()> {
    let png = crate::metrics::encode_png(pixels, height, width, channels)?;
    std::fs::write(path, png).map_err(|e| Error::io(path, e))
}

/// "a photo of a red circle" → "a-photo-of-a-red-circle": safe on every file system.
fn file_stem(prompt: &str) -> String {
    let stem: String = prompt
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' })
        .collect();
    let stem = stem.split('-').filter(|s| !s.is_empty()).collect::<Vec<_>>().join("-");
    if stem.is_empty() { "empty-prompt".into() } else { stem.chars().take(80).collect() }
}

/// How often samples of one caption of the synthetic set show its colour and its shape.
#[derive(Clone, Debug, serde::Serialize)]
pub struct CaptionScore {
    pub caption: String,
    pub samples: usize,
    pub colour: f64,
    pub shape: f64,
    /// Colour and shape both right.
    pub both: f64,
}

/// [`score_synthetic`]'s report: per caption, then over all samples.
#[derive(Clone, Debug, serde::Serialize)]
pub struct SyntheticScore {
    pub captions: Vec<CaptionScore>,
    pub samples: usize,
    pub colour: f64,
    pub shape: f64,
    pub both: f64,
}

impl SyntheticScore {
    /// A Markdown table, one row per caption and a total.
    pub fn table(&self) -> String {
        let mut lines = vec!["| caption | samples | colour | shape | both |".to_string(), "|---|---|---|---|---|".to_string()];
        for c in &self.captions {
            lines.push(format!("| {} | {} | {:.2} | {:.2} | {:.2} |", c.caption, c.samples, c.colour, c.shape, c.both));
        }
        lines.push(format!("| **all** | {} | {:.2} | {:.2} | {:.2} |", self.samples, self.colour, self.shape, self.both));
        lines.join("\n")
    }
}

/// Samples every caption of the synthetic set (`options.per_prompt` times each) with the
/// checkpoint's EMA weights and reads colour and shape back from each image
/// ([`crate::data::synthetic::recognise`]). With `grid`, also writes the samples as one PNG,
/// a row per caption.
pub fn score_synthetic(checkpoint: &str, options: &SampleOptions, grid: Option<&Path>) -> Result<SyntheticScore> {
    use crate::data::synthetic::{colour_and_shape, recognise, synthetic_captions};
    let captions = synthetic_captions();
    let request = SampleRequest { checkpoint: checkpoint.to_string(), prompts: captions.clone(), options: options.clone() };
    let (job, images) = with_checkpoint(checkpoint, Generate(&request))?;
    let (size, channels) = (job.model.image_size, job.model.channels);
    if channels != 3 {
        return Err(Error::Config(format!(
            "{checkpoint}: the synthetic set's colours are read from RGB images, and this model makes {channels}-channel ones"
        )));
    }
    if let Some(path) = grid {
        let pixels: Vec<Vec<u8>> = images.iter().map(|i| i.pixels.clone()).collect();
        let (canvas, height, width) = crate::metrics::image_grid(&pixels, size, size, channels, options.per_prompt);
        write_png(path, &canvas, height, width, channels)?;
    }
    let mut per_caption = Vec::new();
    let (mut colour_total, mut shape_total, mut both_total) = (0usize, 0usize, 0usize);
    for (label, caption) in captions.iter().enumerate() {
        let (colour, shape) = colour_and_shape(label);
        let seen: Vec<_> = images.iter().filter(|i| &i.prompt == caption).map(|i| recognise(&i.pixels, size)).collect();
        let colour_right = seen.iter().filter(|r| r.colour == Some(colour)).count();
        let shape_right = seen.iter().filter(|r| r.shape == Some(shape)).count();
        let both_right = seen.iter().filter(|r| r.colour == Some(colour) && r.shape == Some(shape)).count();
        let share = |n: usize| n as f64 / seen.len().max(1) as f64;
        per_caption.push(CaptionScore {
            caption: caption.clone(),
            samples: seen.len(),
            colour: share(colour_right),
            shape: share(shape_right),
            both: share(both_right),
        });
        (colour_total, shape_total, both_total) = (colour_total + colour_right, shape_total + shape_right, both_total + both_right);
    }
    let samples = images.len();
    let share = |n: usize| n as f64 / samples.max(1) as f64;
    Ok(SyntheticScore { captions: per_caption, samples, colour: share(colour_total), shape: share(shape_total), both: share(both_total) })
}
