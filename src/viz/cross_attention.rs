//! Cross-attention maps: while an image is generated, where on it each text token is looked
//! at. The weights are the sampler's own (conditional branch, averaged over heads, one block
//! or the mean of all), one map per real token at the patch grid's resolution, drawn over the
//! finished image. The report is filled by the caller (`probe` runs the sampler); this module
//! only holds and draws it.

use std::str::FromStr;

use super::canvas::{shorten, viridis, Canvas, BLACK, WHITE};
use super::sweep::{blit, upscale_factor};

const SCALE: usize = 2;
const PAD: usize = 16;
const GAP: usize = 8;
const LINE: usize = 8 * SCALE;
/// Characters of a token label that fit above a 128-pixel cell at 16-pixel glyphs.
const TOKEN_CHARS: usize = 8;
/// How much of the heat map's colour goes into a pixel; the rest is the image in grey.
const HEAT_OPACITY: f64 = 0.6;

/// Which blocks' weights a map shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BlockChoice {
    /// The mean over all blocks.
    All,
    /// One block, numbered from 0 as in the parameter names (`blocks.0.cross.q.weight`).
    Block(usize),
}

impl FromStr for BlockChoice {
    type Err = String;
    fn from_str(text: &str) -> std::result::Result<Self, String> {
        if text.eq_ignore_ascii_case("all") {
            return Ok(Self::All);
        }
        text.parse()
            .map(Self::Block)
            .map_err(|_| format!("expected `all` or a block number from 0, got `{text}`"))
    }
}

impl std::fmt::Display for BlockChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::All => write!(f, "all"),
            Self::Block(i) => write!(f, "{i}"),
        }
    }
}

/// The maps of one integration step.
#[derive(Clone, Debug, serde::Serialize)]
pub struct StepMaps {
    pub step: usize,
    /// The time the model was called at (t = 1 is pure noise).
    pub t: f64,
    /// Per real token, `grid × grid` weights (patches row-major): for each patch, the share of
    /// its attention that went to this token. Summed over the tokens, every patch gives 1.
    pub maps: Vec<Vec<f32>>,
}

impl StepMaps {
    /// Each token's mean weight over the patches: its share of all the attention (sums to 1).
    pub fn shares(&self) -> Vec<f64> {
        self.maps
            .iter()
            .map(|map| map.iter().map(|&w| w as f64).sum::<f64>() / map.len().max(1) as f64)
            .collect()
    }
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct CrossAttentionReport {
    pub prompt: String,
    /// The real tokens as they read (`<start>`, word pieces, `<end>`).
    pub tokens: Vec<String>,
    pub grid: usize,
    pub block: BlockChoice,
    pub blocks: usize,
    pub cfg: f64,
    pub steps: usize,
    pub rows: Vec<StepMaps>,
    /// The finished image, `image_size × image_size × channels`.
    #[serde(skip)]
    pub image: Vec<u8>,
    pub image_size: usize,
    pub channels: usize,
}

/// The report as a picture: a row per recorded step, the finished image first, then one heat
/// map per token over it, titled with the token and its share of the attention. Each map is
/// scaled to its own maximum (the shares say how much attention there is).
pub fn render_cross_attention(report: &CrossAttentionReport) -> Canvas {
    let layout = Layout::of(report);
    let mut canvas = Canvas::new(layout.width, layout.height, WHITE);
    canvas.text(PAD, PAD, &title(report), SCALE, BLACK);
    canvas.text(PAD, PAD + LINE + GAP, &layout.subtitle, SCALE, BLACK);
    let header_y = layout.top - LINE - GAP;
    canvas.text_centred(
        layout.column_x(0) + layout.cell / 2,
        header_y,
        "image",
        SCALE,
        BLACK,
    );
    for (j, token) in report.tokens.iter().enumerate() {
        let label = shorten(token, TOKEN_CHARS);
        canvas.text_centred(
            layout.column_x(j + 1) + layout.cell / 2,
            header_y,
            &label,
            SCALE,
            BLACK,
        );
    }
    let factor = upscale_factor(report.image_size);
    let grey = greyscale(&report.image, report.channels);
    for (i, row) in report.rows.iter().enumerate() {
        let y = layout.row_y(i);
        canvas.text(
            PAD,
            y + (layout.cell - LINE) / 2,
            &format!("t={:.2}", row.t),
            SCALE,
            BLACK,
        );
        blit(
            &mut canvas,
            layout.column_x(0),
            y,
            &report.image,
            report.image_size,
            report.channels,
            factor,
        );
        for (j, (map, share)) in row.maps.iter().zip(row.shares()).enumerate() {
            let x = layout.column_x(j + 1);
            draw_heat_map(
                &mut canvas,
                x,
                y,
                map,
                report.grid,
                &grey,
                report.image_size,
                factor,
            );
            canvas.text_centred(
                x + layout.cell / 2,
                y + layout.cell + GAP / 2,
                &format!("{:.1}%", share * 100.0),
                SCALE,
                BLACK,
            );
        }
    }
    draw_colour_bar(&mut canvas, PAD, layout.height - PAD - LINE);
    canvas
}

fn title(report: &CrossAttentionReport) -> String {
    format!("Cross-attention of \"{}\"", shorten(&report.prompt, 48))
}

/// (width, height) of [`render_cross_attention`]'s picture.
pub fn cross_attention_canvas_size(report: &CrossAttentionReport) -> (usize, usize) {
    let layout = Layout::of(report);
    (layout.width, layout.height)
}

struct Layout {
    width: usize,
    height: usize,
    left: usize,
    top: usize,
    cell: usize,
    /// A cell, its share line below and the gap to the next row.
    row_height: usize,
    subtitle: String,
}

impl Layout {
    fn of(report: &CrossAttentionReport) -> Self {
        let cell = report.image_size * upscale_factor(report.image_size);
        let block = match report.block {
            BlockChoice::All => format!("mean of {} blocks", report.blocks),
            BlockChoice::Block(i) => format!("block {i} of {}", report.blocks),
        };
        let subtitle = format!(
            "{block}, heads averaged; cfg {}, {} steps; each map scaled to its maximum, % = share",
            report.cfg, report.steps
        );
        let left = PAD + Canvas::text_width("t=0.00", SCALE) + PAD;
        let top = PAD + 2 * LINE + GAP + PAD + LINE + GAP;
        let row_height = cell + GAP / 2 + LINE + GAP;
        let columns = report.tokens.len() + 1;
        let grid_width = left + columns * (cell + GAP) - GAP + PAD;
        let width = grid_width
            .max(2 * PAD + Canvas::text_width(&subtitle, SCALE))
            .max(2 * PAD + Canvas::text_width(&title(report), SCALE));
        let height = top + report.rows.len() * row_height + PAD + LINE + PAD;
        Self {
            width,
            height,
            left,
            top,
            cell,
            row_height,
            subtitle,
        }
    }

    fn column_x(&self, column: usize) -> usize {
        self.left + column * (self.cell + GAP)
    }

    fn row_y(&self, row: usize) -> usize {
        self.top + row * self.row_height
    }
}

/// Luminance of an `size × size × channels` image, one byte per pixel.
fn greyscale(pixels: &[u8], channels: usize) -> Vec<u8> {
    pixels
        .chunks(channels)
        .map(|p| match p {
            [r, g, b, ..] => {
                (0.299 * *r as f64 + 0.587 * *g as f64 + 0.114 * *b as f64).round() as u8
            }
            [v, ..] => *v,
            [] => 0,
        })
        .collect()
}

/// A `grid × grid` map over the image, each patch a block of one colour (the map's true
/// resolution), blended with the image in grey so that shapes stay visible under it.
#[allow(clippy::too_many_arguments)]
fn draw_heat_map(
    canvas: &mut Canvas,
    x: usize,
    y: usize,
    map: &[f32],
    grid: usize,
    grey: &[u8],
    size: usize,
    factor: usize,
) {
    let max = map.iter().copied().fold(0.0f32, f32::max);
    let patch = size / grid.max(1);
    for row in 0..size {
        for column in 0..size {
            let weight = map[(row / patch) * grid + column / patch];
            let heat = viridis(if max > 0.0 {
                (weight / max) as f64
            } else {
                0.0
            });
            let base = grey[row * size + column] as f64;
            let colour =
                heat.map(|h| (HEAT_OPACITY * h as f64 + (1.0 - HEAT_OPACITY) * base).round() as u8);
            canvas.fill(
                x + column * factor,
                y + row * factor,
                factor,
                factor,
                colour,
            );
        }
    }
}

/// The colour scale, from 0 to each map's maximum.
fn draw_colour_bar(canvas: &mut Canvas, x: usize, y: usize) {
    canvas.text(x, y, "0", SCALE, BLACK);
    let bar_x = x + Canvas::text_width("0 ", SCALE);
    const BAR: usize = 256;
    for i in 0..BAR {
        canvas.fill(bar_x + i, y, 1, LINE, viridis(i as f64 / (BAR - 1) as f64));
    }
    canvas.text(
        bar_x + BAR + SCALE * 4,
        y,
        "the map's maximum",
        SCALE,
        BLACK,
    );
}
