//! How alike the text encoder finds prompts: the cosine similarity of its pooled embeddings
//! (the end-of-text token's hidden state, CLIP's sentence embedding), as a matrix and as a
//! labelled heat map.

use burn::prelude::*;

use super::canvas::{shorten, ink_for, viridis, Canvas, BLACK, WHITE};
use crate::config::JobSpec;
use crate::error::Result;
use crate::text::TextEncoder;

#[derive(Clone, Debug, serde::Serialize)]
pub struct SimilarityReport {
    pub prompts: Vec<String>,
    /// `matrix[i][j]` = cos(prompt i, prompt j): symmetric, ones on the diagonal.
    pub matrix: Vec<Vec<f64>>,
    /// Where the encoder's weights came from (`text_encoder.weights`, or the seeded random
    /// initialisation).
    pub encoder: String,
}

/// The similarity matrix of `prompts` under `encoder`.
pub fn caption_similarity<B: Backend>(encoder: &TextEncoder<B>, prompts: &[String]) -> Vec<Vec<f64>> {
    if prompts.is_empty() {
        return Vec::new();
    }
    let tokens: Vec<_> = prompts.iter().map(|p| encoder.tokenizer.tokenize(p)).collect();
    let len = encoder.tokenizer.context_length();
    let ids: Vec<i64> = tokens.iter().flat_map(|t| t.ids.iter().map(|&id| id as i64)).collect();
    let device = encoder.model.final_layer_norm.weight.device();
    let input = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [prompts.len(), len]), &device);
    let pooled = encoder.model.forward(input).pooler_output;
    let width = pooled.dims()[1];
    let values = pooled.into_data().convert::<f32>().into_vec::<f32>().expect("f32 data");
    let unit: Vec<Vec<f64>> = values
        .chunks(width)
        .map(|row| {
            let norm = row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt().max(f64::MIN_POSITIVE);
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
                unit[i].iter().zip(&unit[j]).map(|(a, b)| a * b).sum::<f64>().clamp(-1.0, 1.0)
            };
            matrix[i][j] = cosine;
            matrix[j][i] = cosine;
        }
    }
    matrix
}

/// The report for `prompts` under `job`'s text encoder (pretrained weights, or the seeded
/// random initialisation the job trains with).
pub fn similarity_for_job(job: &JobSpec, prompts: &[String]) -> Result<SimilarityReport> {
    let backend = job.train.backend.resolve()?;
    let matrix = crate::with_backend!(backend, B => {
        let device = burn::tensor::Device::<B>::default();
        let encoder = TextEncoder::<B>::load(
            job.text_encoder.weights.as_deref(),
            &job.clip_config(),
            job.train.seed,
            &device,
        )?;
        Ok::<_, crate::Error>(caption_similarity(&encoder, prompts))
    })?;
    let encoder = job
        .text_encoder
        .weights
        .clone()
        .unwrap_or_else(|| format!("random initialisation, seed {}", job.train.seed));
    Ok(SimilarityReport { prompts: prompts.to_vec(), matrix, encoder })
}

/// Glyphs are 8 × `SCALE` pixels.
const SCALE: usize = 2;
const CELL: usize = 96;
const PAD: usize = 16;
const LABEL_CHARS: usize = 40;

/// A heat map: row i is labelled "i  <prompt>", column i "i", each cell shows its value;
/// colours run from the smallest similarity shown (dark) to 1 (yellow), stated under the map.
/// Size: width = PAD + label column + n·96 + PAD, height = title + column numbers + n·80 +
/// legend (see [`similarity_canvas_size`]).
pub fn render_similarity(report: &SimilarityReport) -> Canvas {
    let n = report.prompts.len();
    let labels: Vec<String> = report.prompts.iter().enumerate().map(|(i, p)| format!("{}  {}", i + 1, shorten(p, LABEL_CHARS))).collect();
    let (width, height, left, top) = layout(&labels, n);
    let mut canvas = Canvas::new(width, height, WHITE);
    canvas.text(PAD, PAD, "Cosine similarity of pooled text embeddings", SCALE, BLACK);
    let low = report
        .matrix
        .iter()
        .flatten()
        .copied()
        .fold(1.0_f64, f64::min)
        .min(0.999);
    for (i, label) in labels.iter().enumerate() {
        let y = top + i * CELL + (CELL - 8 * SCALE) / 2;
        canvas.text(PAD, y, label, SCALE, BLACK);
        canvas.text_centred(left + i * CELL + CELL / 2, top - 8 * SCALE - PAD / 2, &(i + 1).to_string(), SCALE, BLACK);
    }
    for (i, row) in report.matrix.iter().enumerate() {
        for (j, &value) in row.iter().enumerate() {
            let colour = viridis((value - low) / (1.0 - low));
            let (x, y) = (left + j * CELL, top + i * CELL);
            canvas.fill(x + 1, y + 1, CELL - 2, CELL - 2, colour);
            canvas.text_centred(x + CELL / 2, y + (CELL - 8 * SCALE) / 2, &format!("{value:.3}"), SCALE, ink_for(colour));
        }
    }
    let legend = format!("colour: {low:.3} (dark) to 1.000 (yellow); encoder: {}", shorten(&report.encoder, LABEL_CHARS));
    canvas.text(PAD, top + n * CELL + PAD, &legend, SCALE, BLACK);
    canvas
}

/// (width, height) of [`render_similarity`]'s picture for these prompts.
pub fn similarity_canvas_size(report: &SimilarityReport) -> (usize, usize) {
    let labels: Vec<String> = report.prompts.iter().enumerate().map(|(i, p)| format!("{}  {}", i + 1, shorten(p, LABEL_CHARS))).collect();
    let (width, height, _, _) = layout(&labels, report.prompts.len());
    (width, height)
}

/// (width, height, left edge of the cells, top edge of the cells).
fn layout(labels: &[String], n: usize) -> (usize, usize, usize, usize) {
    let glyph = 8 * SCALE;
    let label_width = labels.iter().map(|l| Canvas::text_width(l, SCALE)).max().unwrap_or(0);
    let left = PAD + label_width + PAD;
    let top = PAD + glyph + PAD + glyph + PAD;
    let title_width = PAD + Canvas::text_width("Cosine similarity of pooled text embeddings", SCALE) + PAD;
    let legend_width = PAD + Canvas::text_width(&"x".repeat(LABEL_CHARS + 45), SCALE) + PAD;
    let width = (left + n * CELL + PAD).max(title_width).max(legend_width);
    let height = top + n * CELL + PAD + glyph + PAD;
    (width, height, left, top)
}
