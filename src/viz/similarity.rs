//! How alike the text encoder finds prompts, as a labelled heat map of the cosine similarity
//! of its pooled embeddings. The matrix is computed by the caller (`probe`); this draws it.

use super::canvas::{ink_for, shorten, viridis, Canvas, BLACK, WHITE};

#[derive(Clone, Debug, serde::Serialize)]
pub struct SimilarityReport {
    pub prompts: Vec<String>,
    /// `matrix[i][j]` = cos(prompt i, prompt j): symmetric, ones on the diagonal.
    pub matrix: Vec<Vec<f64>>,
    /// Where the encoder's weights came from (`text_encoder.weights`, or the seeded random
    /// initialisation).
    pub encoder: String,
}

const TITLE: &str = "Cosine similarity of pooled text embeddings";
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
    let labels = row_labels(report);
    let (width, height, left, top) = layout(&labels, n);
    let mut canvas = Canvas::new(width, height, WHITE);
    canvas.text(PAD, PAD, TITLE, SCALE, BLACK);
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
        canvas.text_centred(
            left + i * CELL + CELL / 2,
            top - 8 * SCALE - PAD / 2,
            &(i + 1).to_string(),
            SCALE,
            BLACK,
        );
    }
    for (i, row) in report.matrix.iter().enumerate() {
        for (j, &value) in row.iter().enumerate() {
            let colour = viridis((value - low) / (1.0 - low));
            let (x, y) = (left + j * CELL, top + i * CELL);
            canvas.fill(x + 1, y + 1, CELL - 2, CELL - 2, colour);
            canvas.text_centred(
                x + CELL / 2,
                y + (CELL - 8 * SCALE) / 2,
                &format!("{value:.3}"),
                SCALE,
                ink_for(colour),
            );
        }
    }
    let legend = format!(
        "colour: {low:.3} (dark) to 1.000 (yellow); encoder: {}",
        shorten(&report.encoder, LABEL_CHARS)
    );
    canvas.text(PAD, top + n * CELL + PAD, &legend, SCALE, BLACK);
    canvas
}

/// (width, height) of [`render_similarity`]'s picture for these prompts.
pub fn similarity_canvas_size(report: &SimilarityReport) -> (usize, usize) {
    let (width, height, _, _) = layout(&row_labels(report), report.prompts.len());
    (width, height)
}

/// "i  <prompt>", numbered from 1 as the columns are.
fn row_labels(report: &SimilarityReport) -> Vec<String> {
    report
        .prompts
        .iter()
        .enumerate()
        .map(|(i, p)| format!("{}  {}", i + 1, shorten(p, LABEL_CHARS)))
        .collect()
}

/// (width, height, left edge of the cells, top edge of the cells).
fn layout(labels: &[String], n: usize) -> (usize, usize, usize, usize) {
    let glyph = 8 * SCALE;
    let label_width = labels
        .iter()
        .map(|l| Canvas::text_width(l, SCALE))
        .max()
        .unwrap_or(0);
    let left = PAD + label_width + PAD;
    let top = PAD + glyph + PAD + glyph + PAD;
    let title_width = PAD + Canvas::text_width(TITLE, SCALE) + PAD;
    let legend_width = PAD + Canvas::text_width(&"x".repeat(LABEL_CHARS + 45), SCALE) + PAD;
    let width = (left + n * CELL + PAD).max(title_width).max(legend_width);
    let height = top + n * CELL + PAD + glyph + PAD;
    (width, height, left, top)
}
