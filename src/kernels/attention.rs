//! Scaled dot-product attention `softmax(q kᵀ / √d + bias) v` whose scale, bias and softmax
//! (and their backward) are one pass over each score row; the two matrix products stay the
//! backend's. burn's composition is five tracked ops over `[B, H, N, M]`, each a full pass.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::Autodiff;
use burn::tensor::ops::FloatTensor;
use burn::tensor::TensorMetadata;
use rayon::prelude::*;

use super::cpu::CpuF32;
use super::math::{dot, exp, max, multiversion};

/// Score rows per parallel task.
const ROWS: usize = 32;

/// An additive score bias broadcast over `[B, H, N, M]`: `data` holds its own (smaller) shape
/// and `strides` give, for batch, head and query, how far one step moves in it (0 where the
/// bias is broadcast). Keys are contiguous.
#[derive(Clone, Debug)]
pub struct ScoreBias {
    pub data: Vec<f32>,
    pub strides: [usize; 3],
}

impl ScoreBias {
    /// From a `[Bb, Hb, Nb, M]` bias whose leading sizes are 1 (broadcast) or full.
    pub fn from_tensor<B: CpuF32>(bias: &FloatTensor<B>) -> Option<Self> {
        let [batch, heads, queries, keys] = bias.shape().dims::<4>();
        let data = B::with_f32(bias, |values| values.to_vec())?;
        let stride = |size: usize, step: usize| if size == 1 { 0 } else { step };
        Some(Self {
            data,
            strides: [stride(batch, heads * queries * keys), stride(heads, queries * keys), stride(queries, keys)],
        })
    }

    fn row(&self, batch: usize, head: usize, query: usize, keys: usize) -> &[f32] {
        let start = batch * self.strides[0] + head * self.strides[1] + query * self.strides[2];
        &self.data[start..start + keys]
    }
}

multiversion! {
    /// One row: `p = softmax(scores · scale + bias)`.
    pub fn softmax_row(scores: &[f32], bias: &[f32], scale: f32, p: &mut [f32]) {
        if bias.is_empty() {
            for (p, &s) in p.iter_mut().zip(scores) {
                *p = s * scale;
            }
        } else {
            for ((p, &s), &b) in p.iter_mut().zip(scores).zip(bias) {
                *p = s * scale + b;
            }
        }
        let top = max(p);
        let mut total = 0.0f32;
        for p in p.iter_mut() {
            *p = exp(*p - top);
            total += *p;
        }
        let inv = 1.0 / total;
        for p in p.iter_mut() {
            *p *= inv;
        }
    }
}

multiversion! {
    /// One row: `ds = scale · p ⊙ (dp − Σ dp ⊙ p)`.
    pub fn softmax_backward_row(p: &[f32], dp: &[f32], scale: f32, ds: &mut [f32]) {
        let inner = dot(p, dp);
        for ((ds, &p), &dp) in ds.iter_mut().zip(p).zip(dp) {
            *ds = scale * p * (dp - inner);
        }
    }
}

/// Softmax over the last axis of `scores` `[B, H, N, M]` after scaling and adding `bias`.
pub fn softmax(scores: &[f32], dims: [usize; 4], scale: f32, bias: Option<&ScoreBias>) -> Vec<f32> {
    let [_, heads, queries, keys] = dims;
    let mut p = vec![0.0f32; scores.len()];
    p.par_chunks_mut(keys).enumerate().with_min_len(ROWS).for_each(|(row, p)| {
        let (b, h, q) = (row / (heads * queries), (row / queries) % heads, row % queries);
        let bias = bias.map_or(&[][..], |bias| bias.row(b, h, q, keys));
        softmax_row(&scores[row * keys..(row + 1) * keys], bias, scale, p);
    });
    p
}

fn softmax_backward(p: &[f32], dp: &[f32], keys: usize, scale: f32) -> Vec<f32> {
    let mut ds = vec![0.0f32; p.len()];
    ds.par_chunks_mut(keys).enumerate().with_min_len(ROWS).for_each(|(row, ds)| {
        let span = row * keys..(row + 1) * keys;
        softmax_backward_row(&p[span.clone()], &dp[span], scale, ds);
    });
    ds
}

/// The attention weights `[B, H, N, M]` of plain tensors; `None` when not f32.
pub fn weights<B: CpuF32>(q: FloatTensor<B>, k: FloatTensor<B>, scale: f32, bias: Option<&ScoreBias>) -> Option<FloatTensor<B>> {
    let scores = B::float_matmul(q, B::float_transpose(k));
    let shape = scores.shape();
    let p = B::with_f32(&scores, |s| softmax(s, shape.dims::<4>(), scale, bias))?;
    Some(B::from_f32(p, shape))
}

/// Attention of plain (inference) tensors.
pub fn forward<B: CpuF32>(q: FloatTensor<B>, k: FloatTensor<B>, v: FloatTensor<B>, bias: Option<&ScoreBias>) -> Option<FloatTensor<B>> {
    let scale = (q.shape().dims::<4>()[3] as f32).powf(-0.5);
    Some(B::float_matmul(weights::<B>(q, k, scale, bias)?, v))
}

#[derive(Debug)]
pub struct AttentionBackward;

impl<B: CpuF32> Backward<B, 3> for AttentionBackward {
    /// (q, k, v, the weights P, the score scale).
    type State = (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>, FloatTensor<B>, f32);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [q_node, k_node, v_node] = ops.parents;
        let d_out = grads.consume::<B>(&ops.node);
        let (q, k, v, p, scale) = ops.state;
        if let Some(node) = v_node {
            grads.register::<B>(node.id, B::float_matmul(B::float_transpose(p.clone()), d_out.clone()));
        }
        if q_node.is_none() && k_node.is_none() {
            return;
        }
        let dp = B::float_matmul(d_out, B::float_transpose(v));
        let shape = p.shape();
        let keys = shape.dims::<4>()[3];
        let ds = B::with_f32(&p, |p| B::with_f32(&dp, |dp| softmax_backward(p, dp, keys, scale)))
            .flatten()
            .expect("the forward pass ran on f32");
        let ds = B::from_f32(ds, shape);
        if let Some(node) = q_node {
            grads.register::<B>(node.id, B::float_matmul(ds.clone(), k));
        }
        if let Some(node) = k_node {
            grads.register::<B>(node.id, B::float_matmul(B::float_transpose(ds), q));
        }
    }
}

/// Attention as one tracked node over q, k and v (the bias is a constant).
pub fn forward_autodiff<B: CpuF32, C: CheckpointStrategy>(
    q: FloatTensor<Autodiff<B, C>>,
    k: FloatTensor<Autodiff<B, C>>,
    v: FloatTensor<Autodiff<B, C>>,
    bias: Option<&ScoreBias>,
) -> Option<FloatTensor<Autodiff<B, C>>> {
    let scale = (q.shape().dims::<4>()[3] as f32).powf(-0.5);
    let p = weights::<B>(q.primitive.clone(), k.primitive.clone(), scale, bias)?;
    let out = B::float_matmul(p.clone(), v.primitive.clone());
    let nodes = [q.node.clone(), k.node.clone(), v.node.clone()];
    Some(match AttentionBackward.prepare::<C>(nodes).compute_bound().stateful() {
        OpsKind::Tracked(prep) => prep.finish((q.primitive, k.primitive, v.primitive, p, scale), out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    })
}
