//! Scaled dot-product attention `softmax(q kᵀ / √d + bias) v` as one op: each (batch, head)
//! group runs on one thread of the pool, its small products on the `gemm` crate and its
//! scale, bias and softmax (and their backward) in one pass over each score row. burn's
//! composition is five tracked ops over `[B, H, N, M]` and a serial loop of small products.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::Autodiff;
use burn::tensor::ops::FloatTensor;
use std::sync::Arc;

use burn::tensor::{Shape, TensorMetadata};
use rayon::prelude::*;

use super::cpu::CpuF32;
use super::linear::{matmul_serial, Matrix};
use super::math::{dot, exp, max, multiversion};

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
            strides: [
                stride(batch, heads * queries * keys),
                stride(heads, queries * keys),
                stride(queries, keys),
            ],
        })
    }

    pub(crate) fn row(&self, batch: usize, head: usize, query: usize, keys: usize) -> &[f32] {
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

/// The sizes of one attention call: `groups` = batch × heads, each with `queries × keys`
/// scores over `depth`-wide vectors.
#[derive(Clone, Copy, Debug)]
struct Sizes {
    heads: usize,
    groups: usize,
    queries: usize,
    keys: usize,
    depth: usize,
    value_depth: usize,
}

/// `(out [G, N, dv], weights [G, N, M])`, each (batch, head) group on one thread.
fn forward_values(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    sizes: Sizes,
    scale: f32,
    bias: Option<&ScoreBias>,
) -> (Vec<f32>, Vec<f32>) {
    let Sizes {
        heads,
        groups,
        queries: n,
        keys: m,
        depth: d,
        value_depth: dv,
    } = sizes;
    let mut out = vec![0.0f32; groups * n * dv];
    let mut weights = vec![0.0f32; groups * n * m];
    out.par_chunks_mut(n * dv)
        .zip(weights.par_chunks_mut(n * m))
        .enumerate()
        .for_each(|(g, (out, p))| {
            let (qg, kg, vg) = (
                &q[g * n * d..(g + 1) * n * d],
                &k[g * m * d..(g + 1) * m * d],
                &v[g * m * dv..(g + 1) * m * dv],
            );
            let mut scores = vec![0.0f32; n * m];
            matmul_serial(
                Matrix::row_major(qg, n, d),
                Matrix::row_major(kg, m, d).transposed(),
                &mut scores,
                false,
            );
            let (b, h) = (g / heads, g % heads);
            for (i, (p, s)) in p.chunks_mut(m).zip(scores.chunks(m)).enumerate() {
                let bias = bias.map_or(&[][..], |bias| bias.row(b, h, i, m));
                softmax_row(s, bias, scale, p);
            }
            matmul_serial(
                Matrix::row_major(p, n, m),
                Matrix::row_major(vg, m, dv),
                out,
                false,
            );
        });
    (out, weights)
}

/// `(dq, dk, dv)` from the output gradient, per group on one thread.
fn backward_values(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    p: &[f32],
    d_out: &[f32],
    sizes: Sizes,
    scale: f32,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let Sizes {
        groups,
        queries: n,
        keys: m,
        depth: d,
        value_depth: dv,
        ..
    } = sizes;
    let mut dq = vec![0.0f32; groups * n * d];
    let mut dk = vec![0.0f32; groups * m * d];
    let mut dvalues = vec![0.0f32; groups * m * dv];
    dq.par_chunks_mut(n * d)
        .zip(dk.par_chunks_mut(m * d))
        .zip(dvalues.par_chunks_mut(m * dv))
        .enumerate()
        .for_each(|(g, ((dq, dk), dvg))| {
            let qg = Matrix::row_major(&q[g * n * d..(g + 1) * n * d], n, d);
            let kg = Matrix::row_major(&k[g * m * d..(g + 1) * m * d], m, d);
            let vg = Matrix::row_major(&v[g * m * dv..(g + 1) * m * dv], m, dv);
            let pg = Matrix::row_major(&p[g * n * m..(g + 1) * n * m], n, m);
            let og = Matrix::row_major(&d_out[g * n * dv..(g + 1) * n * dv], n, dv);
            matmul_serial(pg.transposed(), og, dvg, false);
            let mut dp = vec![0.0f32; n * m];
            matmul_serial(og, vg.transposed(), &mut dp, false);
            let mut ds = vec![0.0f32; n * m];
            for ((ds, dp), p) in ds.chunks_mut(m).zip(dp.chunks(m)).zip(pg.values.chunks(m)) {
                softmax_backward_row(p, dp, scale, ds);
            }
            let ds = Matrix::row_major(&ds, n, m);
            matmul_serial(ds, kg, dq, false);
            matmul_serial(ds.transposed(), qg, dk, false);
        });
    (dq, dk, dvalues)
}

fn sizes_of<B: CpuF32>(
    q: &FloatTensor<B>,
    k: &FloatTensor<B>,
    v: &FloatTensor<B>,
) -> Option<Sizes> {
    let [b, h, n, d] = q.shape().dims::<4>();
    let [kb, kh, m, kd] = k.shape().dims::<4>();
    let [vb, vh, vm, dv] = v.shape().dims::<4>();
    ((kb, kh, kd) == (b, h, d) && (vb, vh, vm) == (b, h, m)).then_some(Sizes {
        heads: h,
        groups: b * h,
        queries: n,
        keys: m,
        depth: d,
        value_depth: dv,
    })
}

/// The three inputs as contiguous values (strided views, as split heads are, copied once).
fn contiguous<B: CpuF32>(t: &FloatTensor<B>) -> Option<Arc<Vec<f32>>> {
    B::with_f32(t, |values| Arc::new(values.to_vec()))
}

/// Attention of plain (inference) tensors.
pub fn forward<B: CpuF32>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    bias: Option<&ScoreBias>,
) -> Option<FloatTensor<B>> {
    let sizes = sizes_of::<B>(&q, &k, &v)?;
    let scale = (sizes.depth as f32).powf(-0.5);
    let (qv, kv, vv) = (
        contiguous::<B>(&q)?,
        contiguous::<B>(&k)?,
        contiguous::<B>(&v)?,
    );
    let (out, _) = forward_values(&qv, &kv, &vv, sizes, scale, bias);
    let [b, h, n, _] = q.shape().dims::<4>();
    Some(B::from_f32(out, Shape::new([b, h, n, sizes.value_depth])))
}

#[derive(Clone, Debug)]
pub struct AttentionState {
    q: Arc<Vec<f32>>,
    k: Arc<Vec<f32>>,
    v: Arc<Vec<f32>>,
    weights: Arc<Vec<f32>>,
    sizes: Sizes,
    scale: f32,
    shapes: [Shape; 3],
}

#[derive(Debug)]
pub struct AttentionBackward;

impl<B: CpuF32> Backward<B, 3> for AttentionBackward {
    type State = AttentionState;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [q_node, k_node, v_node] = ops.parents;
        let d_out = grads.consume::<B>(&ops.node);
        let state = ops.state;
        let (dq, dk, dv) = B::with_f32(&d_out, |d_out| {
            backward_values(
                &state.q,
                &state.k,
                &state.v,
                &state.weights,
                d_out,
                state.sizes,
                state.scale,
            )
        })
        .expect("the gradient is f32");
        let [q_shape, k_shape, v_shape] = state.shapes;
        for (node, values, shape) in [
            (q_node, dq, q_shape),
            (k_node, dk, k_shape),
            (v_node, dv, v_shape),
        ] {
            if let Some(node) = node {
                grads.register::<B>(node.id, B::from_f32(values, shape));
            }
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
    let sizes = sizes_of::<B>(&q.primitive, &k.primitive, &v.primitive)?;
    let scale = (sizes.depth as f32).powf(-0.5);
    let (qv, kv, vv) = (
        contiguous::<B>(&q.primitive)?,
        contiguous::<B>(&k.primitive)?,
        contiguous::<B>(&v.primitive)?,
    );
    let (out, weights) = forward_values(&qv, &kv, &vv, sizes, scale, bias);
    let [b, h, n, _] = q.primitive.shape().dims::<4>();
    let out = B::from_f32(out, Shape::new([b, h, n, sizes.value_depth]));
    let shapes = [
        q.primitive.shape(),
        k.primitive.shape(),
        v.primitive.shape(),
    ];
    let nodes = [q.node.clone(), k.node.clone(), v.node.clone()];
    Some(
        match AttentionBackward
            .prepare::<C>(nodes)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let state = AttentionState {
                    q: qv,
                    k: kv,
                    v: vv,
                    weights: Arc::new(weights),
                    sizes,
                    scale,
                    shapes,
                };
                prep.finish(state, out)
            }
            OpsKind::UnTracked(prep) => prep.finish(out),
        },
    )
}
