//! Inference pooling on the CPU, one image plane per task on the thread pool. burn-ndarray
//! 0.21 pools on one thread through checked n-dimensional indexing; with the convolutions on
//! matrix products (`conv`) its pools were almost half of the FID Inception's time.
//!
//! Invariant: the result equals PyTorch's `max_pool2d` (padding never wins) and `avg_pool2d`
//! with `count_include_pad=False` (the mean of the window's cells inside the image), no
//! dilation, floor rounding of the output size.

use rayon::prelude::*;

/// Which reduction a window takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pool {
    Max,
    /// The mean over the cells inside the image.
    AverageValid,
}

/// The geometry of one pooling of `planes` planes of `height × width`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolShape {
    pub planes: usize,
    pub height: usize,
    pub width: usize,
    pub kernel: [usize; 2],
    pub stride: [usize; 2],
    pub padding: [usize; 2],
}

impl PoolShape {
    pub fn output_size(&self) -> [usize; 2] {
        super::conv::window_output_size(
            [self.height, self.width],
            self.kernel,
            self.stride,
            self.padding,
        )
    }
}

/// `[planes, H', W']` row-major from `[planes, H, W]`.
pub fn forward(x: &[f32], shape: PoolShape, pool: Pool) -> Vec<f32> {
    let PoolShape {
        planes,
        height,
        width,
        kernel: [kh, kw],
        stride: [sh, sw],
        padding: [ph, pw],
    } = shape;
    assert_eq!(x.len(), planes * height * width, "input size");
    let [out_h, out_w] = shape.output_size();
    let mut out = vec![0f32; planes * out_h * out_w];
    if out.is_empty() {
        return out;
    }
    // Window bounds clipped to the image: `[start, end)` along one axis.
    let window = |o: usize, stride: usize, pad: usize, k: usize, size: usize| {
        let start = (o * stride) as isize - pad as isize;
        let end = (start + k as isize).min(size as isize);
        (start.max(0) as usize, end.max(0) as usize)
    };
    out.par_chunks_mut(out_h * out_w)
        .zip(x.par_chunks(height * width))
        .for_each(|(dest, plane)| {
            for oy in 0..out_h {
                let (y0, y1) = window(oy, sh, ph, kh, height);
                for ox in 0..out_w {
                    let (x0, x1) = window(ox, sw, pw, kw, width);
                    let rows = (y0..y1).map(|y| &plane[y * width + x0..y * width + x1]);
                    dest[oy * out_w + ox] = match pool {
                        Pool::Max => rows
                            .flat_map(|row| row.iter().copied())
                            .fold(f32::NEG_INFINITY, f32::max),
                        Pool::AverageValid => {
                            let sum: f32 = rows.map(|row| row.iter().sum::<f32>()).sum();
                            sum / ((y1 - y0) * (x1 - x0)) as f32
                        }
                    };
                }
            }
        });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_and_valid_average_by_hand() {
        // One 3×3 plane 1..9; 3×3 windows, stride 1, padding 1.
        let x: Vec<f32> = (1..=9).map(|v| v as f32).collect();
        let shape = PoolShape {
            planes: 1,
            height: 3,
            width: 3,
            kernel: [3, 3],
            stride: [1, 1],
            padding: [1, 1],
        };
        assert_eq!(
            forward(&x, shape, Pool::Max),
            [5.0, 6.0, 6.0, 8.0, 9.0, 9.0, 8.0, 9.0, 9.0]
        );
        // Corner (0,0) averages {1,2,4,5}; edge (0,1) averages {1..6}; centre all nine.
        let average = forward(&x, shape, Pool::AverageValid);
        assert_eq!(average[0], 3.0);
        assert_eq!(average[1], 3.5);
        assert_eq!(average[4], 5.0);
    }

    #[test]
    fn strided_unpadded_max_takes_floor_of_the_output_size() {
        // Two 5×4 planes, 3×3 stride 2: output 2×1.
        let x: Vec<f32> = (0..40).map(|v| v as f32).collect();
        let shape = PoolShape {
            planes: 2,
            height: 5,
            width: 4,
            kernel: [3, 3],
            stride: [2, 2],
            padding: [0, 0],
        };
        assert_eq!(shape.output_size(), [2, 1]);
        assert_eq!(forward(&x, shape, Pool::Max), [10.0, 18.0, 30.0, 38.0]);
    }
}
