//! Inference convolutions on the CPU as matrix products (im2col): each image is unrolled into
//! a `[C·kh·kw, H'·W']` matrix and multiplied by the `[O, C·kh·kw]` weights on the
//! multi-threaded product (OpenBLAS when loaded) straight into its `[O, H'·W']` output, then
//! the bias and ReLU are added in place. burn-ndarray 0.21's direct convolution runs on one
//! thread at about 10 GFLOP/s here; the FID Inception is made of nothing else, so evaluation
//! time follows this file.
//!
//! Invariants: the result equals `conv2d` (cross-correlation, zero padding, no dilation, one
//! group) up to f32 summation order; one image at a time, so an image's result does not depend
//! on the others in its batch (ranks split evaluation samples freely, and one rank's FID is two
//! ranks' FID); there is no backward, callers hold no autodiff graph. Grouping images into one
//! wider product was measured no faster here (0.15–0.19 s against 0.14–0.18 s per Inception
//! image) and made results depend on the batch.

use rayon::prelude::*;

use super::linear::{matmul, Matrix};

/// The shape of one convolution: `[N, C, H, W]` input, `[O, C, kh, kw]` weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvShape {
    pub batch: usize,
    pub in_channels: usize,
    pub height: usize,
    pub width: usize,
    pub out_channels: usize,
    pub kernel: [usize; 2],
    pub stride: [usize; 2],
    pub padding: [usize; 2],
}

impl ConvShape {
    /// `[H', W']`, as PyTorch computes it (floor division, no dilation).
    pub fn output_size(&self) -> [usize; 2] {
        window_output_size(
            [self.height, self.width],
            self.kernel,
            self.stride,
            self.padding,
        )
    }

    fn patch_len(&self) -> usize {
        self.in_channels * self.kernel[0] * self.kernel[1]
    }
}

/// `[H', W']` of a window of `kernel` slid over `[H, W]` (zero-padded by `padding` on each
/// side) by `stride`: PyTorch's floor division, no dilation. Convolutions and pools alike.
pub(super) fn window_output_size(
    size: [usize; 2],
    kernel: [usize; 2],
    stride: [usize; 2],
    padding: [usize; 2],
) -> [usize; 2] {
    [0, 1].map(|axis| (size[axis] + 2 * padding[axis] - kernel[axis]) / stride[axis] + 1)
}

/// `max(conv2d(x, weight) + bias, 0)` when `relu`, else without the clamp; `[N, O, H', W']`
/// row-major.
pub fn forward(
    x: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    shape: ConvShape,
    relu: bool,
) -> Vec<f32> {
    let ConvShape {
        batch,
        in_channels,
        height,
        width,
        out_channels,
        ..
    } = shape;
    let [out_h, out_w] = shape.output_size();
    let pixels = out_h * out_w;
    let patch = shape.patch_len();
    assert_eq!(x.len(), batch * in_channels * height * width, "input size");
    assert_eq!(weight.len(), out_channels * patch, "weight size");
    if let Some(bias) = bias {
        assert_eq!(bias.len(), out_channels, "bias size");
    }
    let weights = Matrix::row_major(weight, out_channels, patch);
    let image_len = in_channels * height * width;
    let mut out = vec![0f32; batch * out_channels * pixels];
    // A 1×1, stride-1, unpadded convolution multiplies the image itself: nothing to unroll.
    let pointwise = shape.kernel == [1, 1] && shape.stride == [1, 1] && shape.padding == [0, 0];
    let mut columns = vec![0f32; if pointwise { 0 } else { patch * pixels }];
    for (image, output) in x
        .chunks_exact(image_len)
        .zip(out.chunks_exact_mut(out_channels * pixels))
    {
        let columns = if pointwise {
            image
        } else {
            unroll(image, shape, out_h, out_w, &mut columns);
            &columns
        };
        matmul(
            weights,
            Matrix::row_major(columns, patch, pixels),
            output,
            false,
        );
        output
            .par_chunks_mut(pixels)
            .enumerate()
            .for_each(|(channel, plane)| {
                let shift = bias.map_or(0.0, |b| b[channel]);
                for v in plane {
                    *v = if relu {
                        (*v + shift).max(0.0)
                    } else {
                        *v + shift
                    };
                }
            });
    }
    out
}

/// Fills `columns`, `[C·kh·kw, H'·W']`, so that column (y, x) is the patch of `image` under
/// output pixel (y, x), zero where the padding is.
fn unroll(image: &[f32], shape: ConvShape, out_h: usize, out_w: usize, columns: &mut [f32]) {
    let [kh, kw] = shape.kernel;
    let [sh, sw] = shape.stride;
    let [ph, pw] = shape.padding;
    let (height, width) = (shape.height, shape.width);
    let plane = height * width;
    let pixels = out_h * out_w;
    columns
        .par_chunks_mut(pixels)
        .enumerate()
        .for_each(|(row, dest)| {
            let (channel, ky, kx) = (row / (kh * kw), row / kw % kh, row % kw);
            let source = &image[channel * plane..][..plane];
            for oy in 0..out_h {
                let y = (oy * sh + ky) as isize - ph as isize;
                let dest = &mut dest[oy * out_w..][..out_w];
                if y < 0 || y >= height as isize {
                    dest.fill(0.0);
                    continue;
                }
                let source = &source[y as usize * width..][..width];
                if sw == 1 {
                    // Output columns whose input column x = ox + kx − pw lies in the image.
                    let first = pw.saturating_sub(kx).min(out_w);
                    let end = (width + pw).saturating_sub(kx).clamp(first, out_w);
                    dest[..first].fill(0.0);
                    if end > first {
                        let start = first + kx - pw;
                        dest[first..end].copy_from_slice(&source[start..start + end - first]);
                    }
                    dest[end..].fill(0.0);
                    continue;
                }
                for (ox, d) in dest.iter_mut().enumerate() {
                    let x = (ox * sw + kx) as isize - pw as isize;
                    *d = if (0..width as isize).contains(&x) {
                        source[x as usize]
                    } else {
                        0.0
                    };
                }
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The definition, one output value at a time.
    fn direct(x: &[f32], weight: &[f32], bias: &[f32], s: ConvShape) -> Vec<f32> {
        let [oh, ow] = s.output_size();
        let [kh, kw] = s.kernel;
        let mut out = Vec::new();
        for n in 0..s.batch {
            for o in 0..s.out_channels {
                for oy in 0..oh {
                    for ox in 0..ow {
                        let mut sum = bias[o] as f64;
                        for c in 0..s.in_channels {
                            for ky in 0..kh {
                                for kx in 0..kw {
                                    let y =
                                        (oy * s.stride[0] + ky) as isize - s.padding[0] as isize;
                                    let xx =
                                        (ox * s.stride[1] + kx) as isize - s.padding[1] as isize;
                                    if y < 0
                                        || xx < 0
                                        || y >= s.height as isize
                                        || xx >= s.width as isize
                                    {
                                        continue;
                                    }
                                    let input = x[((n * s.in_channels + c) * s.height
                                        + y as usize)
                                        * s.width
                                        + xx as usize];
                                    let w = weight[((o * s.in_channels + c) * kh + ky) * kw + kx];
                                    sum += input as f64 * w as f64;
                                }
                            }
                        }
                        out.push(sum as f32);
                    }
                }
            }
        }
        out
    }

    fn values(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| {
                ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) % 2001) as f32 / 1000.0
                    - 1.0
            })
            .collect()
    }

    #[test]
    fn matches_the_definition_for_the_inception_geometries() {
        for (kernel, stride, padding) in [
            ([3, 3], [2, 2], [0, 0]),
            ([3, 3], [1, 1], [1, 1]),
            ([1, 1], [1, 1], [0, 0]),
            ([1, 7], [1, 1], [0, 3]),
            ([7, 1], [1, 1], [3, 0]),
            ([5, 5], [1, 1], [2, 2]),
            ([3, 3], [1, 1], [0, 0]),
        ] {
            let shape = ConvShape {
                batch: 3,
                in_channels: 4,
                height: 9,
                width: 8,
                out_channels: 5,
                kernel,
                stride,
                padding,
            };
            let x = values(3 * 4 * 9 * 8, 1);
            let weight = values(5 * 4 * kernel[0] * kernel[1], 7);
            let bias = values(5, 3);
            let expected = direct(&x, &weight, &bias, shape);
            let plain = forward(&x, &weight, Some(&bias), shape, false);
            assert_eq!(plain.len(), expected.len(), "{shape:?}");
            for (a, e) in plain.iter().zip(&expected) {
                assert!((a - e).abs() < 1e-4, "{shape:?}: {a} vs {e}");
            }
            let clamped = forward(&x, &weight, Some(&bias), shape, true);
            for (a, e) in clamped.iter().zip(&expected) {
                assert!((a - e.max(0.0)).abs() < 1e-4, "{shape:?} with ReLU");
            }
        }
    }

    #[test]
    fn an_image_gives_the_same_values_alone_or_in_a_batch() {
        let shape = ConvShape {
            batch: 3,
            in_channels: 16,
            height: 17,
            width: 17,
            out_channels: 8,
            kernel: [3, 3],
            stride: [1, 1],
            padding: [1, 1],
        };
        let x = values(3 * 16 * 17 * 17, 5);
        let weight = values(8 * 16 * 9, 9);
        let together = forward(&x, &weight, None, shape, true);
        let (image_len, output_len) = (16 * 17 * 17, 8 * 17 * 17);
        let one = ConvShape { batch: 1, ..shape };
        for n in 0..3 {
            let alone = forward(&x[n * image_len..][..image_len], &weight, None, one, true);
            assert_eq!(&together[n * output_len..][..output_len], alone.as_slice());
        }
    }
}
