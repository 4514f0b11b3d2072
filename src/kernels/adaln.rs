//! LayerNorm without affine parameters fused with the adaLN modulation:
//! `y = x̂ (1 + scale) + shift`, `x̂ = (x − μ) / √(σ² + ε)` over the last axis, with `x`
//! `[B, N, D]` and `scale`, `shift` `[B, 1, D]`. One pass over each row forward and backward,
//! keeping only (μ, 1/σ) per row for the backward where burn's composition keeps about six
//! `[B, N, D]` intermediates.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::Autodiff;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Shape, TensorMetadata};
use rayon::prelude::*;

use super::cpu::CpuF32;
use super::math::{dot, multiversion, sum};

/// Rows per parallel task.
const ROWS: usize = 16;

multiversion! {
    /// One row: writes `y` and `stats = [μ, 1/σ]`.
    pub fn forward_row(x: &[f32], scale: &[f32], shift: &[f32], eps: f32, y: &mut [f32], stats: &mut [f32]) {
        let d = x.len() as f32;
        let mean = sum(x) / d;
        for (y, &x) in y.iter_mut().zip(x) {
            *y = x - mean;
        }
        // Biased variance of the centred row, as PyTorch's LayerNorm.
        let inv_std = 1.0 / (dot(y, y) / d + eps).sqrt();
        for ((y, &s), &t) in y.iter_mut().zip(scale).zip(shift) {
            *y = *y * inv_std * (1.0 + s) + t;
        }
        stats[0] = mean;
        stats[1] = inv_std;
    }
}

/// Forward over all rows: `(y, [μ, 1/σ] per row)`.
pub fn forward(
    x: &[f32],
    scale: &[f32],
    shift: &[f32],
    n: usize,
    d: usize,
    eps: f32,
) -> (Vec<f32>, Vec<f32>) {
    let rows = x.len() / d;
    let mut y = vec![0.0f32; rows * d];
    let mut stats = vec![0.0f32; rows * 2];
    y.par_chunks_mut(d)
        .zip(stats.par_chunks_mut(2))
        .enumerate()
        .with_min_len(ROWS)
        .for_each(|(row, (y, stats))| {
            let b = row / n;
            let x = &x[row * d..(row + 1) * d];
            forward_row(
                x,
                &scale[b * d..(b + 1) * d],
                &shift[b * d..(b + 1) * d],
                eps,
                y,
                stats,
            );
        });
    (y, stats)
}

multiversion! {
    /// One row of `dx = (1/σ) (g − mean(g) − x̂ mean(g x̂))` with `g = dy (1 + scale)`.
    pub fn backward_row(x: &[f32], dy: &[f32], scale: &[f32], mean: f32, inv_std: f32, dx: &mut [f32]) {
        let d = x.len() as f32;
        let (mut g_sum, mut gx_sum) = (0.0f32, 0.0f32);
        let mut g_lanes = [0.0f32; 16];
        let mut gx_lanes = [0.0f32; 16];
        let chunks = x.len() / 16 * 16;
        for start in (0..chunks).step_by(16) {
            for i in 0..16 {
                let j = start + i;
                let g = dy[j] * (1.0 + scale[j]);
                g_lanes[i] += g;
                gx_lanes[i] += g * (x[j] - mean) * inv_std;
            }
        }
        for j in chunks..x.len() {
            let g = dy[j] * (1.0 + scale[j]);
            g_sum += g;
            gx_sum += g * (x[j] - mean) * inv_std;
        }
        let g_mean = (g_sum + g_lanes.iter().sum::<f32>()) / d;
        let gx_mean = (gx_sum + gx_lanes.iter().sum::<f32>()) / d;
        for j in 0..x.len() {
            let g = dy[j] * (1.0 + scale[j]);
            let x_hat = (x[j] - mean) * inv_std;
            dx[j] = inv_std * (g - g_mean - x_hat * gx_mean);
        }
    }
}

multiversion! {
    /// Adds one row's contributions to `dscale += dy x̂` and `dshift += dy`.
    pub fn accumulate_modulation_row(x: &[f32], dy: &[f32], mean: f32, inv_std: f32, dscale: &mut [f32], dshift: &mut [f32]) {
        for j in 0..x.len() {
            dscale[j] += dy[j] * (x[j] - mean) * inv_std;
            dshift[j] += dy[j];
        }
    }
}

/// `(dx [B,N,D], dscale [B,1,D], dshift [B,1,D])`.
pub fn backward(
    x: &[f32],
    scale: &[f32],
    stats: &[f32],
    dy: &[f32],
    n: usize,
    d: usize,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let rows = x.len() / d;
    let batch = rows / n;
    let mut dx = vec![0.0f32; rows * d];
    dx.par_chunks_mut(d)
        .enumerate()
        .with_min_len(ROWS)
        .for_each(|(row, dx)| {
            let b = row / n;
            let span = row * d..(row + 1) * d;
            backward_row(
                &x[span.clone()],
                &dy[span],
                &scale[b * d..(b + 1) * d],
                stats[2 * row],
                stats[2 * row + 1],
                dx,
            );
        });
    let mut dscale = vec![0.0f32; batch * d];
    let mut dshift = vec![0.0f32; batch * d];
    dscale
        .par_chunks_mut(d)
        .zip(dshift.par_chunks_mut(d))
        .enumerate()
        .for_each(|(b, (dscale, dshift))| {
            for row in b * n..(b + 1) * n {
                let span = row * d..(row + 1) * d;
                accumulate_modulation_row(
                    &x[span.clone()],
                    &dy[span],
                    stats[2 * row],
                    stats[2 * row + 1],
                    dscale,
                    dshift,
                );
            }
        });
    (dx, dscale, dshift)
}

#[derive(Debug)]
pub struct AdaLnBackward;

impl<B: CpuF32> Backward<B, 3> for AdaLnBackward {
    /// (x, scale, [μ, 1/σ] per row); x and scale are shared with the graph, not copied.
    type State = (FloatTensor<B>, FloatTensor<B>, Vec<f32>);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [x_node, scale_node, shift_node] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (x, scale, stats) = ops.state;
        let [b, n, d] = x.shape().dims::<3>();
        let (dx, dscale, dshift) = B::with_f32(&x, |x| {
            B::with_f32(&scale, |scale| {
                B::with_f32(&grad, |dy| backward(x, scale, &stats, dy, n, d))
            })
        })
        .flatten()
        .flatten()
        .expect("the forward pass ran on f32");
        if let Some(node) = x_node {
            grads.register::<B>(node.id, B::from_f32(dx, Shape::new([b, n, d])));
        }
        if let Some(node) = scale_node {
            grads.register::<B>(node.id, B::from_f32(dscale, Shape::new([b, 1, d])));
        }
        if let Some(node) = shift_node {
            grads.register::<B>(node.id, B::from_f32(dshift, Shape::new([b, 1, d])));
        }
    }
}

/// The modulated norm of a plain tensor with its row statistics; `None` unless every input is
/// f32 and the shapes are `[B, N, D]` and `[B, 1, D]`.
pub fn forward_tensors<B: CpuF32>(
    x: &FloatTensor<B>,
    scale: &FloatTensor<B>,
    shift: &FloatTensor<B>,
    eps: f32,
) -> Option<(FloatTensor<B>, Vec<f32>)> {
    let shape = x.shape();
    let [b, n, d] = shape.dims::<3>();
    let modulation = [b, 1, d];
    if scale.shape().dims::<3>() != modulation || shift.shape().dims::<3>() != modulation {
        return None;
    }
    let (y, stats) = B::with_f32(x, |x| {
        B::with_f32(scale, |scale| {
            B::with_f32(shift, |shift| forward(x, scale, shift, n, d, eps))
        })
    })
    .flatten()
    .flatten()?;
    Some((B::from_f32(y, shape), stats))
}

pub fn forward_autodiff<B: CpuF32, C: CheckpointStrategy>(
    x: FloatTensor<Autodiff<B, C>>,
    scale: FloatTensor<Autodiff<B, C>>,
    shift: FloatTensor<Autodiff<B, C>>,
    eps: f32,
) -> Option<FloatTensor<Autodiff<B, C>>> {
    let (y, stats) = forward_tensors::<B>(&x.primitive, &scale.primitive, &shift.primitive, eps)?;
    let nodes = [x.node.clone(), scale.node.clone(), shift.node.clone()];
    Some(
        match AdaLnBackward.prepare::<C>(nodes).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish((x.primitive, scale.primitive, stats), y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        },
    )
}
