//! 8-bit PNG encoding of interleaved u8 images (TensorBoard images, sample grids on disk).

use crate::error::{Error, Result};

/// Encodes a `height`×`width` image of `channels` (1 gray, 2 gray+alpha, 3 RGB, 4 RGBA)
/// interleaved u8 samples per pixel, row-major.
pub fn encode_png(pixels: &[u8], height: usize, width: usize, channels: usize) -> Result<Vec<u8>> {
    encode_png_for(
        &format!("PNG image {height}×{width}×{channels}"),
        pixels,
        height,
        width,
        channels,
    )
}

/// [`encode_png`] whose errors name `what` (e.g. the TensorBoard tag).
pub(crate) fn encode_png_for(
    what: &str,
    pixels: &[u8],
    height: usize,
    width: usize,
    channels: usize,
) -> Result<Vec<u8>> {
    let bad = |reason: String| Error::TensorBoard {
        what: what.to_string(),
        reason,
    };
    let color = match channels {
        1 => png::ColorType::Grayscale,
        2 => png::ColorType::GrayscaleAlpha,
        3 => png::ColorType::Rgb,
        4 => png::ColorType::Rgba,
        other => return Err(bad(format!("{other} channels, expected 1, 2, 3 or 4"))),
    };
    if height == 0 || width == 0 || u32::try_from(height.max(width)).is_err() {
        return Err(bad(format!(
            "size {height}×{width}, expected both sides in 1..=2^32-1"
        )));
    }
    let expected = height * width * channels;
    if pixels.len() != expected {
        return Err(bad(format!(
            "{} bytes of pixels, expected {height}×{width}×{channels} = {expected}",
            pixels.len()
        )));
    }
    let mut encoded = Vec::new();
    let mut encoder = png::Encoder::new(&mut encoded, width as u32, height as u32);
    encoder.set_color(color);
    encoder.set_depth(png::BitDepth::Eight);
    let png_error = |e: png::EncodingError| bad(format!("PNG encoding failed: {e}"));
    let mut writer = encoder.write_header().map_err(png_error)?;
    writer.write_image_data(pixels).map_err(png_error)?;
    writer.finish().map_err(png_error)?;
    Ok(encoded)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn png_round_trips_through_the_decoder() {
        for channels in 1..=4 {
            let pixels: Vec<u8> = (0..2 * 3 * channels).map(|i| (i * 13) as u8).collect();
            let encoded = encode_png(&pixels, 2, 3, channels).unwrap();
            let mut reader = png::Decoder::new(std::io::Cursor::new(encoded))
                .read_info()
                .unwrap();
            let mut decoded = vec![0; reader.output_buffer_size().unwrap()];
            let info = reader.next_frame(&mut decoded).unwrap();
            assert_eq!((info.height, info.width), (2, 3));
            assert_eq!(info.color_type.samples(), channels);
            assert_eq!(&decoded[..info.buffer_size()], &pixels[..]);
        }
    }

    #[test]
    fn wrong_sizes_are_named() {
        let message = encode_png(&[0; 11], 2, 2, 3).unwrap_err().to_string();
        assert!(
            message.contains("2×2×3") && message.contains("11 bytes"),
            "{message}"
        );
        let message = encode_png(&[], 0, 2, 3).unwrap_err().to_string();
        assert!(message.contains("size 0×2"), "{message}");
    }
}
