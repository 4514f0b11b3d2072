//! `ditrun sample` and `ditrun inspect shapes`: a checkpoint's EMA weights → images → PNG
//! files. The sampling is `crate::flow`'s; this layer reads the checkpoint, builds its model on
//! the backend the command picked, and writes the pictures.
//!
//! Invariant: nothing here picks a backend. The functions are generic over `B`; the command
//! reads the checkpoint once ([`TrainedCheckpoint::load`]) and picks `B` from its job with
//! `with_backend!`.

use std::path::{Path, PathBuf};

use burn::prelude::*;

use crate::backend::BackendKind;
use crate::checkpoint::LoadedCheckpoint;
use crate::config::JobSpec;
use crate::error::{Error, Result};
use crate::flow::{cfg_sweep, generate, GeneratedImage, SampleOptions};
use crate::model::TextConditionalDiT;
use crate::text::TextEmbeddingCache;

/// The caption cache conditions the sampler. Implemented in this layer because `flow` sits
/// below `text` and cannot name the cache; `text` may take it over.
/// A checkpoint read once, with the job it was trained with: the job names the backend, which
/// the command picks before the weights are built on it.
pub struct TrainedCheckpoint {
    pub checkpoint: LoadedCheckpoint,
    pub job: JobSpec,
}

impl TrainedCheckpoint {
    /// A checkpoint (`.../step-000001000`) or a checkpoint folder (its latest).
    pub fn load(url: &str) -> Result<Self> {
        let checkpoint = crate::checkpoint::load_url(url)?;
        let job = crate::training_state::job_of_checkpoint(&checkpoint)?;
        Ok(Self { checkpoint, job })
    }

    /// The backend the job trained on (`train.backend`, `auto` resolved on this machine).
    pub fn backend(&self) -> Result<BackendKind> {
        self.job.train.backend.resolve()
    }

    /// The EMA weights and the job's caption cache on `B` (with no pretrained text encoder
    /// configured, the same seeded initialisation as in training).
    pub fn ema_model<B: Backend>(&self) -> Result<(TextConditionalDiT<B>, TextEmbeddingCache<B>)> {
        self.ema_model_on::<B>(&Default::default())
    }

    /// [`ema_model`](Self::ema_model) on `device` (a rank's own GPU).
    pub fn ema_model_on<B: Backend>(
        &self,
        device: &B::Device,
    ) -> Result<(TextConditionalDiT<B>, TextEmbeddingCache<B>)> {
        crate::training_state::ensure_same_text_encoder(&self.checkpoint, &self.job)?;
        let device = device.clone();
        let model = crate::training_state::model_from_checkpoint::<B>(
            &self.checkpoint,
            &self.job.model,
            &device,
        )?;
        // Seeded by `train.seed`, as in training: the same random encoder when none is named.
        let encoder = &self.job.text_encoder;
        let cache = TextEmbeddingCache::<B>::load(
            encoder.weights.as_deref(),
            &encoder.config,
            self.job.train.seed,
            &device,
        )?;
        Ok((model, cache))
    }

    /// `per_prompt` images for each prompt from the EMA weights on `B`.
    fn generate<B: Backend>(
        &self,
        prompts: &[String],
        options: &SampleOptions,
    ) -> Result<Vec<GeneratedImage>> {
        let (model, mut cache) = self.ema_model::<B>()?;
        Ok(generate(&model, &mut cache, prompts, options))
    }
}

/// Generates `per_prompt` images for each prompt with the checkpoint's EMA weights and writes
/// either one grid PNG (`out`: rows are prompts) or one PNG per image (`out_dir`). Returns the
/// files.
pub fn sample_checkpoint<B: Backend>(
    checkpoint: &TrainedCheckpoint,
    prompts: &[String],
    options: &SampleOptions,
    out: Option<&Path>,
    out_dir: Option<&Path>,
) -> Result<Vec<PathBuf>> {
    let images = checkpoint.generate::<B>(prompts, options)?;
    let (size, channels) = (
        checkpoint.job.model.image_size,
        checkpoint.job.model.channels,
    );
    let mut written = Vec::new();
    if let Some(path) = out {
        write_grid(path, &images, size, channels, options.per_prompt)?;
        written.push(path.to_path_buf());
    }
    if let Some(dir) = out_dir {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        for image in &images {
            let path = dir.join(format!(
                "{}-{:03}.png",
                file_stem(&image.prompt),
                image.index
            ));
            write_png(&path, &image.pixels, size, size, channels)?;
            written.push(path);
        }
    }
    Ok(written)
}

/// The CFG sweep of a checkpoint's EMA weights as a labelled grid PNG at `out`: rows are the
/// prompts, columns the guidance scales.
pub fn sweep_checkpoint<B: Backend>(
    checkpoint: &TrainedCheckpoint,
    prompts: &[String],
    scales: &[f64],
    options: &SampleOptions,
    out: &Path,
) -> Result<PathBuf> {
    let (model, mut cache) = checkpoint.ema_model::<B>()?;
    let columns = cfg_sweep(&model, &mut cache, prompts, scales, options);
    let (size, channels) = (
        checkpoint.job.model.image_size,
        checkpoint.job.model.channels,
    );
    let canvas = crate::viz::render_sweep(prompts, scales, &columns, size, channels);
    std::fs::write(out, canvas.to_png()?).map_err(|e| Error::io(out, e))?;
    Ok(out.to_path_buf())
}

/// The images as one grid PNG, `per_row` to a row.
fn write_grid(
    path: &Path,
    images: &[GeneratedImage],
    size: usize,
    channels: usize,
    per_row: usize,
) -> Result<()> {
    let pixels: Vec<Vec<u8>> = images.iter().map(|i| i.pixels.clone()).collect();
    let (grid, height, width) = crate::metrics::image_grid(&pixels, size, size, channels, per_row);
    write_png(path, &grid, height, width, channels)
}

fn write_png(
    path: &Path,
    pixels: &[u8],
    height: usize,
    width: usize,
    channels: usize,
) -> Result<()> {
    let png = crate::metrics::encode_png(pixels, height, width, channels)?;
    std::fs::write(path, png).map_err(|e| Error::io(path, e))
}

/// "a photo of a red circle" → "a-photo-of-a-red-circle": safe on every file system.
fn file_stem(prompt: &str) -> String {
    let stem: String = prompt
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    let stem = stem
        .split('-')
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join("-");
    if stem.is_empty() {
        "empty-prompt".into()
    } else {
        stem.chars().take(80).collect()
    }
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
        let mut lines = vec![
            "| caption | samples | colour | shape | both |".to_string(),
            "|---|---|---|---|---|".to_string(),
        ];
        for c in &self.captions {
            lines.push(format!(
                "| {} | {} | {:.2} | {:.2} | {:.2} |",
                c.caption, c.samples, c.colour, c.shape, c.both
            ));
        }
        lines.push(format!(
            "| **all** | {} | {:.2} | {:.2} | {:.2} |",
            self.samples, self.colour, self.shape, self.both
        ));
        lines.join("\n")
    }
}

/// Samples every caption of the synthetic set (`options.per_prompt` times each) with the
/// checkpoint's EMA weights and reads colour and shape back from each image
/// ([`crate::data::synthetic::recognise`]). With `grid`, also writes the samples as one PNG,
/// a row per caption.
pub fn score_synthetic<B: Backend>(
    checkpoint: &TrainedCheckpoint,
    options: &SampleOptions,
    grid: Option<&Path>,
) -> Result<SyntheticScore> {
    use crate::data::synthetic::{colour_and_shape, recognise, synthetic_captions};
    let captions = synthetic_captions();
    let images = checkpoint.generate::<B>(&captions, options)?;
    let (size, channels) = (
        checkpoint.job.model.image_size,
        checkpoint.job.model.channels,
    );
    if channels != 3 {
        return Err(Error::Config(format!(
            "{}: the synthetic set's colours are read from RGB images, and this model makes {channels}-channel ones",
            checkpoint.checkpoint.url
        )));
    }
    if let Some(path) = grid {
        write_grid(path, &images, size, channels, options.per_prompt)?;
    }
    let mut per_caption = Vec::new();
    let (mut colour_total, mut shape_total, mut both_total) = (0usize, 0usize, 0usize);
    for (label, caption) in captions.iter().enumerate() {
        let (colour, shape) = colour_and_shape(label);
        let seen: Vec<_> = images
            .iter()
            .filter(|i| &i.prompt == caption)
            .map(|i| recognise(&i.pixels, size))
            .collect();
        let colour_right = seen.iter().filter(|r| r.colour == Some(colour)).count();
        let shape_right = seen.iter().filter(|r| r.shape == Some(shape)).count();
        let both_right = seen
            .iter()
            .filter(|r| r.colour == Some(colour) && r.shape == Some(shape))
            .count();
        let share = |n: usize| n as f64 / seen.len().max(1) as f64;
        per_caption.push(CaptionScore {
            caption: caption.clone(),
            samples: seen.len(),
            colour: share(colour_right),
            shape: share(shape_right),
            both: share(both_right),
        });
        (colour_total, shape_total, both_total) = (
            colour_total + colour_right,
            shape_total + shape_right,
            both_total + both_right,
        );
    }
    let samples = images.len();
    let share = |n: usize| n as f64 / samples.max(1) as f64;
    Ok(SyntheticScore {
        captions: per_caption,
        samples,
        colour: share(colour_total),
        shape: share(shape_total),
        both: share(both_total),
    })
}
