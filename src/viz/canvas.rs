//! An RGB raster with rectangles, images and text in an 8×8 bitmap font drawn at an integer
//! scale (2 = 16-pixel glyphs, legible at 100 % zoom), and a perceptual colour map.

use font8x8::{UnicodeFonts, BASIC_FONTS};

pub const WHITE: [u8; 3] = [255, 255, 255];
pub const BLACK: [u8; 3] = [0, 0, 0];

pub struct Canvas {
    pub width: usize,
    pub height: usize,
    /// Row-major RGB.
    pub pixels: Vec<u8>,
}

impl Canvas {
    pub fn new(width: usize, height: usize, background: [u8; 3]) -> Self {
        let pixels = background
            .iter()
            .copied()
            .cycle()
            .take(width * height * 3)
            .collect();
        Self {
            width,
            height,
            pixels,
        }
    }

    pub fn fill(&mut self, x: usize, y: usize, w: usize, h: usize, colour: [u8; 3]) {
        for row in y..(y + h).min(self.height) {
            for column in x..(x + w).min(self.width) {
                let at = (row * self.width + column) * 3;
                self.pixels[at..at + 3].copy_from_slice(&colour);
            }
        }
    }

    /// Text with its top-left corner at (x, y); characters the font lacks are drawn as '?'.
    pub fn text(&mut self, x: usize, y: usize, text: &str, scale: usize, colour: [u8; 3]) {
        for (i, c) in text.chars().enumerate() {
            let glyph = BASIC_FONTS
                .get(c)
                .or_else(|| BASIC_FONTS.get('?'))
                .unwrap_or([0; 8]);
            for (row, bits) in glyph.iter().enumerate() {
                for column in 0..8 {
                    if bits >> column & 1 == 1 {
                        let (gx, gy) = (x + (i * 8 + column) * scale, y + row * scale);
                        self.fill(gx, gy, scale, scale, colour);
                    }
                }
            }
        }
    }

    /// Width in pixels of `text` at `scale`.
    pub fn text_width(text: &str, scale: usize) -> usize {
        text.chars().count() * 8 * scale
    }

    /// Text centred horizontally on `centre_x`.
    pub fn text_centred(
        &mut self,
        centre_x: usize,
        y: usize,
        text: &str,
        scale: usize,
        colour: [u8; 3],
    ) {
        let x = centre_x.saturating_sub(Self::text_width(text, scale) / 2);
        self.text(x, y, text, scale, colour);
    }

    /// Whether any two pixels differ: a blank picture is a bug.
    pub fn is_blank(&self) -> bool {
        self.pixels.chunks(3).all(|p| p == &self.pixels[..3])
    }

    pub fn to_png(&self) -> crate::Result<Vec<u8>> {
        crate::metrics::encode_png(&self.pixels, self.height, self.width, 3)
    }
}

/// Viridis (matplotlib's default) at `t` in [0, 1]: dark blue → green → yellow, readable in
/// grey scale and by colour-blind readers.
pub fn viridis(t: f64) -> [u8; 3] {
    const STOPS: [[f64; 3]; 6] = [
        [68.0, 1.0, 84.0],
        [65.0, 68.0, 135.0],
        [42.0, 120.0, 142.0],
        [34.0, 168.0, 132.0],
        [122.0, 209.0, 81.0],
        [253.0, 231.0, 37.0],
    ];
    let t = if t.is_finite() {
        t.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let scaled = t * (STOPS.len() - 1) as f64;
    let i = (scaled.floor() as usize).min(STOPS.len() - 2);
    let f = scaled - i as f64;
    let mut out = [0u8; 3];
    for (c, value) in out.iter_mut().enumerate() {
        *value = (STOPS[i][c] + (STOPS[i + 1][c] - STOPS[i][c]) * f).round() as u8;
    }
    out
}

/// `text` cut to `max_chars` characters, ending in "..." when cut.
pub fn shorten(text: &str, max_chars: usize) -> String {
    if text.chars().count() <= max_chars {
        text.to_string()
    } else {
        format!(
            "{}...",
            text.chars()
                .take(max_chars.saturating_sub(3))
                .collect::<String>()
        )
    }
}

/// Black or white, whichever reads better on `background`.
pub fn ink_for(background: [u8; 3]) -> [u8; 3] {
    let luminance =
        0.299 * background[0] as f64 + 0.587 * background[1] as f64 + 0.114 * background[2] as f64;
    if luminance > 140.0 {
        BLACK
    } else {
        WHITE
    }
}
