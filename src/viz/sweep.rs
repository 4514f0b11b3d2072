//! A classifier-free-guidance sweep as a labelled grid: one row per prompt, one column per
//! guidance scale (written above it), every image upscaled so the labels do not dwarf it.

use super::canvas::{shorten, Canvas, BLACK, WHITE};

const TITLE: &str = "Classifier-free guidance sweep (same seed in every column)";
const SCALE: usize = 2;
const PAD: usize = 16;
const GAP: usize = 8;
const LABEL_CHARS: usize = 32;

/// Pixels per image side after upscaling (nearest neighbour): at least 128.
pub fn upscale_factor(image_size: usize) -> usize {
    128usize.div_ceil(image_size.max(1)).max(1)
}

/// `columns[scale][prompt]`, each image's pixels `image_size × image_size × channels`, as
/// the sampler's `cfg_sweep` returns them.
pub fn render_sweep<P: AsRef<[u8]>>(
    prompts: &[String],
    scales: &[f64],
    columns: &[Vec<P>],
    image_size: usize,
    channels: usize,
) -> Canvas {
    let (width, height, left, top) = sweep_layout(prompts, scales.len(), image_size);
    let cell = image_size * upscale_factor(image_size);
    let mut canvas = Canvas::new(width, height, WHITE);
    canvas.text(PAD, PAD, TITLE, SCALE, BLACK);
    for (j, scale) in scales.iter().enumerate() {
        let centre = left + j * (cell + GAP) + cell / 2;
        canvas.text_centred(
            centre,
            top - 8 * SCALE - GAP,
            &format!("cfg {scale}"),
            SCALE,
            BLACK,
        );
    }
    for (i, prompt) in prompts.iter().enumerate() {
        let y = top + i * (cell + GAP);
        canvas.text(
            PAD,
            y + (cell - 8 * SCALE) / 2,
            &shorten(prompt, LABEL_CHARS),
            SCALE,
            BLACK,
        );
        for (j, column) in columns.iter().enumerate() {
            if let Some(image) = column.get(i) {
                blit(
                    &mut canvas,
                    left + j * (cell + GAP),
                    y,
                    image.as_ref(),
                    image_size,
                    channels,
                    upscale_factor(image_size),
                );
            }
        }
    }
    canvas
}

/// (width, height) of [`render_sweep`]'s picture.
pub fn sweep_canvas_size(prompts: &[String], scales: usize, image_size: usize) -> (usize, usize) {
    let (width, height, _, _) = sweep_layout(prompts, scales, image_size);
    (width, height)
}

/// (width, height, left edge of the images, top edge of the images).
fn sweep_layout(
    prompts: &[String],
    scales: usize,
    image_size: usize,
) -> (usize, usize, usize, usize) {
    let cell = image_size * upscale_factor(image_size);
    let label_width = prompts
        .iter()
        .map(|p| Canvas::text_width(&shorten(p, LABEL_CHARS), SCALE))
        .max()
        .unwrap_or(0);
    let left = PAD + label_width + PAD;
    let top = PAD + 8 * SCALE + PAD + 8 * SCALE + GAP;
    let title_width = 2 * PAD + Canvas::text_width(TITLE, SCALE);
    let width = (left + scales * (cell + GAP) - GAP + PAD).max(title_width);
    let height = top + prompts.len() * (cell + GAP) - GAP + PAD;
    (width, height, left, top)
}

/// Copies an `size × size × channels` image (grayscale or RGB) at (x, y), each pixel as a
/// `factor × factor` block.
pub(crate) fn blit(
    canvas: &mut Canvas,
    x: usize,
    y: usize,
    pixels: &[u8],
    size: usize,
    channels: usize,
    factor: usize,
) {
    for row in 0..size {
        for column in 0..size {
            let at = (row * size + column) * channels;
            let colour = if channels >= 3 {
                [pixels[at], pixels[at + 1], pixels[at + 2]]
            } else {
                [pixels[at]; 3]
            };
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
