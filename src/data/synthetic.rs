//! Generated captioned images whose caption can be checked by eye (and by a test): one
//! coloured shape on a noisy dark background, captioned "a photo of a <colour> <shape>".
//! Used by the tests and the quickstart, where a small model must learn to follow prompts fast.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::shards::{sample_key, Sample};

/// Colour name, RGB value, and the gray level that stands for it in 1- and 2-channel images
/// (spaced more than twice [`GRAY_JITTER`] apart, so grayscale images still tell colours apart).
pub const COLOURS: [(&str, [u8; 3], u8); 4] = [
    ("red", [220, 40, 40], 120),
    ("green", [40, 190, 60], 160),
    ("blue", [50, 80, 230], 200),
    ("yellow", [235, 215, 40], 240),
];
pub const SHAPES: [&str; 3] = ["circle", "square", "triangle"];
/// Number of distinct captions (and labels): every colour with every shape.
pub const CLASSES: usize = COLOURS.len() * SHAPES.len();

/// The brightest a background pixel gets; shapes are well above it in their main channel.
pub const BACKGROUND_MAX: u8 = 90;
/// How far a shape's channels stray from its colour's nominal value, at most.
pub const COLOUR_JITTER: u8 = 20;
/// The same for its gray level.
pub const GRAY_JITTER: u8 = 10;

/// The caption of `label` (`label = colour * SHAPES.len() + shape`).
pub fn synthetic_caption(label: usize) -> String {
    let (colour, shape) = colour_and_shape(label);
    format!("a photo of a {} {}", COLOURS[colour].0, SHAPES[shape])
}

/// Every caption, in label order.
pub fn synthetic_captions() -> Vec<String> {
    (0..CLASSES).map(synthetic_caption).collect()
}

/// (colour index, shape index) of `label`.
pub fn colour_and_shape(label: usize) -> (usize, usize) {
    ((label / SHAPES.len()) % COLOURS.len(), label % SHAPES.len())
}

/// `samples` images of `image_size²` pixels with `channels` (1 to 4) channels. Sample `i` has
/// label `i % CLASSES` (balanced classes) and depends only on `(seed, i)`.
///
/// # Panics
/// If `image_size` is 0 or `channels` is not 1 to 4.
pub fn synthetic(
    samples: usize,
    image_size: usize,
    channels: usize,
    seed: u64,
) -> impl Iterator<Item = Sample> {
    assert!(image_size > 0, "synthetic images need a size of at least 1");
    assert!(
        (1..=4).contains(&channels),
        "synthetic images have 1 to 4 channels, not {channels}"
    );
    (0..samples).map(move |index| synthetic_sample(index, image_size, channels, seed))
}

/// Sample number `index` of [`synthetic`].
pub fn synthetic_sample(index: usize, image_size: usize, channels: usize, seed: u64) -> Sample {
    let mut rng = StdRng::seed_from_u64(sample_seed(seed, index));
    let label = index % CLASSES;
    let (colour, shape) = colour_and_shape(label);
    let geometry = Geometry::random(&mut rng, image_size as f32, SHAPES[shape]);
    let shape_colour = jittered(&mut rng, COLOURS[colour]);
    let background_level = rng.random_range(10..=BACKGROUND_MAX - 20);
    let mut pixels = Vec::with_capacity(image_size * image_size * channels);
    for y in 0..image_size {
        for x in 0..image_size {
            let (rgb, gray) = if geometry.contains(x as f32 + 0.5, y as f32 + 0.5) {
                shape_colour
            } else {
                background_pixel(&mut rng, background_level)
            };
            push_pixel(&mut pixels, channels, rgb, gray);
        }
    }
    Sample {
        key: sample_key(index),
        pixels,
        caption: synthetic_caption(label),
        label: label as i64,
    }
}

/// Independent, well-mixed streams per sample (splitmix64), so any sample can be generated
/// alone and neighbouring seeds do not give correlated images.
fn sample_seed(seed: u64, index: usize) -> u64 {
    let mut z = seed ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn jittered(rng: &mut StdRng, (_, rgb, gray): (&str, [u8; 3], u8)) -> ([u8; 3], u8) {
    let mut jitter = |value: u8, by: u8| {
        let delta = rng.random_range(-(by as i16)..=by as i16);
        (value as i16 + delta).clamp(0, 255) as u8
    };
    let rgb = rgb.map(|channel| jitter(channel, COLOUR_JITTER));
    (rgb, jitter(gray, GRAY_JITTER))
}

fn background_pixel(rng: &mut StdRng, level: u8) -> ([u8; 3], u8) {
    let mut noise = || level + rng.random_range(0..=20);
    let rgb = [noise(), noise(), noise()];
    (rgb, noise())
}

fn push_pixel(pixels: &mut Vec<u8>, channels: usize, rgb: [u8; 3], gray: u8) {
    match channels {
        1 => pixels.push(gray),
        2 => pixels.extend([gray, 255]),
        3 => pixels.extend(rgb),
        _ => pixels.extend([rgb[0], rgb[1], rgb[2], 255]),
    }
}

/// A shape's centre and half-extent, in pixels.
struct Geometry {
    shape: &'static str,
    cx: f32,
    cy: f32,
    r: f32,
}

impl Geometry {
    /// Large enough to read at 32×32 (a quarter to four fifths of the image across) and
    /// always entirely inside the image.
    fn random(rng: &mut StdRng, size: f32, shape: &'static str) -> Self {
        let r = (size * rng.random_range(0.22..0.40)).max(1.0);
        let centre = |rng: &mut StdRng| {
            if size - r > r {
                rng.random_range(r..size - r)
            } else {
                size / 2.0
            }
        };
        let (cx, cy) = (centre(rng), centre(rng));
        Self { shape, cx, cy, r }
    }

    fn contains(&self, x: f32, y: f32) -> bool {
        let (dx, dy) = (x - self.cx, y - self.cy);
        match self.shape {
            "circle" => dx * dx + dy * dy <= self.r * self.r,
            // 0.85 gives the square about the circle's area, so size alone does not tell them apart.
            "square" => dx.abs() <= 0.85 * self.r && dy.abs() <= 0.85 * self.r,
            // Apex up, base at the bottom of the bounding box.
            _ => {
                let depth = (dy + self.r) / (2.0 * self.r);
                (0.0..=1.0).contains(&depth) && dx.abs() <= self.r * depth
            }
        }
    }
}
