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
    /// Large enough to read at 32×32 (about half to four fifths of the image across), near the
    /// centre (within a twelfth of the image) and always entirely inside it. Large, centred
    /// shapes are what a small model learns the shape words from within the quickstart's few
    /// minutes; shapes anywhere at any size left it drawing coloured blobs
    /// (`shared/bench/quickstart-recipe.md`).
    fn random(rng: &mut StdRng, size: f32, shape: &'static str) -> Self {
        let r = (size * rng.random_range(0.26..0.40)).max(1.0);
        let shift = size / 12.0;
        let centre = |rng: &mut StdRng| {
            let c = size / 2.0 + rng.random_range(-shift..=shift);
            if size - r > r {
                c.clamp(r, size - r)
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
            // The circle's bounding box: the two differ by their corners, which a small model
            // learned to draw only when the corners reached as far out as the circle does.
            "square" => dx.abs() <= self.r && dy.abs() <= self.r,
            // Apex up, base at the bottom of the bounding box.
            _ => {
                let depth = (dy + self.r) / (2.0 * self.r);
                (0.0..=1.0).contains(&depth) && dx.abs() <= self.r * depth
            }
        }
    }
}

/// What [`recognise`] reads off an image: the nearest colour and the best-fitting shape of
/// its bright pixels, or `None` where nothing stands out from the background.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Recognised {
    pub colour: Option<usize>,
    pub shape: Option<usize>,
}

/// A pixel belongs to the shape when its brightest channel is above this: halfway between the
/// brightest background (≤ [`BACKGROUND_MAX`]) and the dimmest main channel of a colour.
const SHAPE_THRESHOLD: u8 = 140;

/// Reads the colour and shape of an RGB image (`size × size × 3`, channels last) as the
/// synthetic set draws them, so that generated samples can be scored against their captions:
/// the pixels brighter than the background form a mask; its mean colour picks the nearest of
/// [`COLOURS`], and the shape is the one whose outline, fitted to the mask (position and
/// size), overlaps it best (intersection over union). Noise and stray pixels count against a
/// sample, as an eye would count them.
pub fn recognise(pixels: &[u8], size: usize) -> Recognised {
    assert_eq!(
        pixels.len(),
        size * size * 3,
        "an RGB image of {size}×{size}"
    );
    let mask: Vec<bool> = pixels
        .chunks_exact(3)
        .map(|p| p.iter().max().is_some_and(|&v| v > SHAPE_THRESHOLD))
        .collect();
    let count = mask.iter().filter(|&&m| m).count();
    if count < 4 {
        return Recognised {
            colour: None,
            shape: None,
        };
    }
    let mut sum = [0u64; 3];
    let (mut x0, mut x1, mut y0, mut y1) = (size, 0, size, 0);
    for (i, _) in mask.iter().enumerate().filter(|(_, &m)| m) {
        let (x, y) = (i % size, i / size);
        (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
        for (s, &v) in sum.iter_mut().zip(&pixels[3 * i..3 * i + 3]) {
            *s += v as u64;
        }
    }
    let mean = sum.map(|s| s as f32 / count as f32);
    let colour = (0..COLOURS.len()).min_by(|&a, &b| {
        let distance = |c: usize| {
            COLOURS[c]
                .1
                .iter()
                .zip(mean)
                .map(|(&v, m)| (v as f32 - m).powi(2))
                .sum::<f32>()
        };
        distance(a).total_cmp(&distance(b))
    });
    let (width, height) = ((x1 - x0 + 1) as f32, (y1 - y0 + 1) as f32);
    let (cx, cy) = (x0 as f32 + width / 2.0, y0 as f32 + height / 2.0);
    let size_f = size as f32;
    // Each outline is fitted to the mask by a small search over its centre (around the mask's
    // bounding box's) and size: a few stray pixels then move neither, as they would the box.
    let step = if size >= 24 { 1.0 } else { 0.5 };
    let reach = (size_f / 8.0 / step).round() as i32;
    let best_overlap = |shape: &'static str| {
        let mut best = 0.0f32;
        for dy in -reach..=reach {
            for dx in -reach..=reach {
                let mut r = size_f * 0.15;
                while r <= size_f * 0.5 {
                    let geometry = Geometry {
                        shape,
                        cx: cx + dx as f32 * step,
                        cy: cy + dy as f32 * step,
                        r,
                    };
                    best = best.max(overlap(&geometry, &mask, size));
                    r += 0.5;
                }
            }
        }
        best
    };
    let overlaps = SHAPES.map(best_overlap);
    let shape = (0..SHAPES.len()).max_by(|&a, &b| overlaps[a].total_cmp(&overlaps[b]));
    Recognised { colour, shape }
}

/// Intersection over union of `geometry`'s pixels and `mask`.
fn overlap(geometry: &Geometry, mask: &[bool], size: usize) -> f32 {
    let (mut both, mut either) = (0usize, 0usize);
    for (i, &m) in mask.iter().enumerate() {
        let inside = geometry.contains((i % size) as f32 + 0.5, (i / size) as f32 + 0.5);
        both += (inside && m) as usize;
        either += (inside || m) as usize;
    }
    both as f32 / either.max(1) as f32
}
