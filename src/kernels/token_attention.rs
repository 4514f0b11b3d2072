//! Multi-head attention read and written in the linear layers' token-major layout: q, k and v
//! are column blocks of `[B, tokens, width]` rows (the packed `qkv` of self-attention, or the
//! separate projections of cross-attention), head h at columns `offset + h·d`, and the output
//! is `[B, N, H·dv]` with the heads already merged. Nothing is split into `[B, H, N, d]`
//! copies and merged back, forward or backward: every small product reads its operands and
//! writes its result through row strides. The maths per (batch, head) is
//! [`super::attention`]'s (same products, same softmax rows).
//!
//! Work is split by batch element: one thread takes all heads of one image, so each thread
//! writes only its own rows of the outputs.

use std::sync::Arc;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::Autodiff;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Shape, TensorMetadata};
use rayon::prelude::*;

use super::attention::{softmax_backward_row, softmax_row, ScoreBias};
use super::cpu::CpuF32;
use super::linear::{matmul_raw, Matrix};

/// Where one operand's rows are: row `i` of batch element `b` starts at
/// `(b · rows + i) · stride + offset`, and head `h` at `h · width` further.
#[derive(Clone, Copy, Debug)]
pub struct Rows {
    pub rows: usize,
    pub stride: usize,
    pub offset: usize,
    pub width: usize,
}

impl Rows {
    fn start(&self, batch: usize, head: usize) -> usize {
        batch * self.rows * self.stride + self.offset + head * self.width
    }

    /// Head `head` of batch element `batch` as a `rows × width` matrix.
    fn head<'a>(&self, values: &'a [f32], batch: usize, head: usize) -> Matrix<'a> {
        let start = self.start(batch, head);
        let end = start + (self.rows - 1) * self.stride + self.width;
        Matrix {
            values: &values[start..end],
            rows: self.rows,
            columns: self.width,
            row_stride: self.stride,
            column_stride: 1,
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub struct Layout {
    pub batch: usize,
    pub heads: usize,
    pub q: Rows,
    pub k: Rows,
    pub v: Rows,
}

impl Layout {
    fn scale(&self) -> f32 {
        (self.q.width as f32).powf(-0.5)
    }
}

/// A raw output pointer handed to the threads: each writes only its own batch element's rows.
#[derive(Clone, Copy)]
struct Out(*mut f32);
// SAFETY: the threads write disjoint rows (one batch element each), see the callers.
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

/// `(out [B, N, H·dv], weights [B, H, N, M])`.
fn forward_values(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    layout: Layout,
    bias: Option<&ScoreBias>,
) -> (Vec<f32>, Vec<f32>) {
    let Layout { heads, batch, .. } = layout;
    let (n, m, dv) = (layout.q.rows, layout.k.rows, layout.v.width);
    let scale = layout.scale();
    let mut out = vec![0.0f32; batch * n * heads * dv];
    let mut weights = vec![0.0f32; batch * heads * n * m];
    out.par_chunks_mut(n * heads * dv)
        .zip(weights.par_chunks_mut(heads * n * m))
        .enumerate()
        .for_each(|(b, (out, p))| {
            let mut scores = vec![0.0f32; n * m];
            for h in 0..heads {
                let p = &mut p[h * n * m..(h + 1) * n * m];
                let (qh, kh) = (layout.q.head(q, b, h), layout.k.head(k, b, h));
                // SAFETY: `scores` is an `n × m` row-major buffer of its own.
                unsafe { matmul_raw(qh, kh.transposed(), scores.as_mut_ptr(), m, false) };
                for (i, (p, s)) in p.chunks_mut(m).zip(scores.chunks(m)).enumerate() {
                    let bias = bias.map_or(&[][..], |bias| bias.row(b, h, i, m));
                    softmax_row(s, bias, scale, p);
                }
                let pm = Matrix::row_major(p, n, m);
                // SAFETY: head h's columns of this batch element's `n` rows of `out`, inside it.
                unsafe {
                    matmul_raw(
                        pm,
                        layout.v.head(v, b, h),
                        out.as_mut_ptr().add(h * dv),
                        heads * dv,
                        false,
                    )
                };
            }
        });
    (out, weights)
}

/// Writes `dq`, `dk` and `dv` through `d_q`, `d_k`, `d_v`, laid out as the inputs are
/// (`layout`); they may be one buffer (packed qkv).
///
/// # Safety
/// Each pointer must address a buffer laid out as its operand in `layout`, valid for writes,
/// and the three must not overlap element-wise (they may share a buffer in disjoint columns).
unsafe fn backward_values(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    weights: &[f32],
    d_out: &[f32],
    layout: Layout,
    (d_q, d_k, d_v): (Out, Out, Out),
) {
    let Layout { heads, batch, .. } = layout;
    let (n, m, dv) = (layout.q.rows, layout.k.rows, layout.v.width);
    let scale = layout.scale();
    (0..batch).into_par_iter().for_each(|b| {
        let (mut dp, mut ds) = (vec![0.0f32; n * m], vec![0.0f32; n * m]);
        let (d_q, d_k, d_v) = (d_q, d_k, d_v);
        for h in 0..heads {
            let pg = Matrix::row_major(
                &weights[(b * heads + h) * n * m..(b * heads + h + 1) * n * m],
                n,
                m,
            );
            let og = Rows {
                rows: n,
                stride: heads * dv,
                offset: 0,
                width: dv,
            }
            .head(d_out, b, h);
            let (qh, kh, vh) = (
                layout.q.head(q, b, h),
                layout.k.head(k, b, h),
                layout.v.head(v, b, h),
            );
            // SAFETY (each write): batch element b's rows of head h's columns, which no other
            // thread writes (caller's contract for the buffers).
            unsafe {
                matmul_raw(
                    pg.transposed(),
                    og,
                    d_v.0.add(layout.v.start(b, h)),
                    layout.v.stride,
                    false,
                );
                matmul_raw(og, vh.transposed(), dp.as_mut_ptr(), m, false);
            }
            for ((ds, dp), p) in ds.chunks_mut(m).zip(dp.chunks(m)).zip(pg.values.chunks(m)) {
                softmax_backward_row(p, dp, scale, ds);
            }
            let dsm = Matrix::row_major(&ds, n, m);
            unsafe {
                matmul_raw(
                    dsm,
                    kh,
                    d_q.0.add(layout.q.start(b, h)),
                    layout.q.stride,
                    false,
                );
                matmul_raw(
                    dsm.transposed(),
                    qh,
                    d_k.0.add(layout.k.start(b, h)),
                    layout.k.stride,
                    false,
                );
            }
        }
    });
}

/// Self-attention of a packed `qkv` `[B, N, 3·H·d]` (q, k, v blocks in that order, heads
/// inside each): `[B, N, H·d]`.
fn packed_layout(shape: &Shape, heads: usize) -> Option<Layout> {
    let [batch, n, width] = shape.dims::<3>();
    if heads == 0 || width % (3 * heads) != 0 || n == 0 {
        return None;
    }
    let dim = width / 3;
    let rows = |offset| Rows {
        rows: n,
        stride: width,
        offset,
        width: dim / heads,
    };
    Some(Layout {
        batch,
        heads,
        q: rows(0),
        k: rows(dim),
        v: rows(2 * dim),
    })
}

/// Cross-attention of q `[B, N, H·d]` over k `[B, M, H·d]`, v `[B, M, H·dv]`.
fn separate_layout(q: &Shape, k: &Shape, v: &Shape, heads: usize) -> Option<Layout> {
    let ([batch, n, qw], [kb, m, kw], [vb, vm, vw]) = (q.dims::<3>(), k.dims::<3>(), v.dims::<3>());
    if heads == 0
        || qw != kw
        || kb != batch
        || vb != batch
        || vm != m
        || qw % heads != 0
        || vw % heads != 0
        || n == 0
        || m == 0
    {
        return None;
    }
    let rows = |rows, width: usize| Rows {
        rows,
        stride: width,
        offset: 0,
        width: width / heads,
    };
    Some(Layout {
        batch,
        heads,
        q: rows(n, qw),
        k: rows(m, kw),
        v: rows(m, vw),
    })
}

fn output_shape(layout: &Layout) -> Shape {
    Shape::new([layout.batch, layout.q.rows, layout.heads * layout.v.width])
}

/// Packed self-attention of a plain (inference) tensor.
pub fn packed_forward<B: CpuF32>(qkv: &FloatTensor<B>, heads: usize) -> Option<FloatTensor<B>> {
    let layout = packed_layout(&qkv.shape(), heads)?;
    let out = B::with_f32(qkv, |x| forward_values(x, x, x, layout, None).0)?;
    Some(B::from_f32(out, output_shape(&layout)))
}

/// Cross-attention of plain (inference) tensors.
pub fn separate_forward<B: CpuF32>(
    q: &FloatTensor<B>,
    k: &FloatTensor<B>,
    v: &FloatTensor<B>,
    heads: usize,
    bias: Option<&ScoreBias>,
) -> Option<FloatTensor<B>> {
    let layout = separate_layout(&q.shape(), &k.shape(), &v.shape(), heads)?;
    let out = B::with_f32(q, |q| {
        B::with_f32(k, |k| {
            B::with_f32(v, |v| forward_values(q, k, v, layout, bias).0)
        })
    })???;
    Some(B::from_f32(out, output_shape(&layout)))
}

#[derive(Debug)]
pub struct PackedState<B: CpuF32> {
    qkv: FloatTensor<B>,
    weights: Arc<Vec<f32>>,
    layout: Layout,
}

impl<B: CpuF32> Clone for PackedState<B> {
    fn clone(&self) -> Self {
        Self {
            qkv: self.qkv.clone(),
            weights: self.weights.clone(),
            layout: self.layout,
        }
    }
}

#[derive(Debug)]
pub struct PackedBackward;

impl<B: CpuF32> Backward<B, 1> for PackedBackward {
    type State = PackedState<B>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [parent] = ops.parents;
        let d_out = grads.consume::<B>(&ops.node);
        let Some(parent) = parent else { return };
        let PackedState {
            qkv,
            weights,
            layout,
        } = ops.state;
        let shape = qkv.shape();
        let mut d_qkv = vec![0.0f32; shape.num_elements()];
        let ptr = Out(d_qkv.as_mut_ptr());
        B::with_f32(&qkv, |x| {
            B::with_f32(&d_out, |d_out| {
                // SAFETY: `d_qkv` is laid out as `qkv`; q, k and v are disjoint column blocks.
                unsafe { backward_values(x, x, x, &weights, d_out, layout, (ptr, ptr, ptr)) }
            })
        })
        .flatten()
        .expect("the forward pass ran on f32");
        grads.register::<B>(parent.id, B::from_f32(d_qkv, shape));
    }
}

pub fn packed_autodiff<B: CpuF32, C: CheckpointStrategy>(
    qkv: FloatTensor<Autodiff<B, C>>,
    heads: usize,
) -> Option<FloatTensor<Autodiff<B, C>>> {
    let layout = packed_layout(&qkv.primitive.shape(), heads)?;
    let (out, weights) = B::with_f32(&qkv.primitive, |x| forward_values(x, x, x, layout, None))?;
    let out = B::from_f32(out, output_shape(&layout));
    Some(
        match PackedBackward
            .prepare::<C>([qkv.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish(
                PackedState {
                    qkv: qkv.primitive,
                    weights: Arc::new(weights),
                    layout,
                },
                out,
            ),
            OpsKind::UnTracked(prep) => prep.finish(out),
        },
    )
}

#[derive(Debug)]
pub struct SeparateState<B: CpuF32> {
    inputs: [FloatTensor<B>; 3],
    weights: Arc<Vec<f32>>,
    layout: Layout,
}

impl<B: CpuF32> Clone for SeparateState<B> {
    fn clone(&self) -> Self {
        Self {
            inputs: self.inputs.clone(),
            weights: self.weights.clone(),
            layout: self.layout,
        }
    }
}

#[derive(Debug)]
pub struct SeparateBackward;

impl<B: CpuF32> Backward<B, 3> for SeparateBackward {
    type State = SeparateState<B>;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let d_out = grads.consume::<B>(&ops.node);
        let SeparateState {
            inputs: [q, k, v],
            weights,
            layout,
        } = ops.state;
        let shapes = [q.shape(), k.shape(), v.shape()];
        let mut outputs: Vec<Vec<f32>> = shapes
            .iter()
            .map(|s| vec![0.0f32; s.num_elements()])
            .collect();
        let pointers = (
            Out(outputs[0].as_mut_ptr()),
            Out(outputs[1].as_mut_ptr()),
            Out(outputs[2].as_mut_ptr()),
        );
        B::with_f32(&q, |q| {
            B::with_f32(&k, |k| {
                B::with_f32(&v, |v| {
                    B::with_f32(&d_out, |d_out| {
                        // SAFETY: three buffers of their own, each laid out as its input.
                        unsafe { backward_values(q, k, v, &weights, d_out, layout, pointers) }
                    })
                })
            })
        })
        .flatten()
        .flatten()
        .flatten()
        .expect("the forward pass ran on f32");
        for ((node, values), shape) in ops.parents.into_iter().zip(outputs).zip(shapes) {
            if let Some(node) = node {
                grads.register::<B>(node.id, B::from_f32(values, shape));
            }
        }
    }
}

pub fn separate_autodiff<B: CpuF32, C: CheckpointStrategy>(
    q: FloatTensor<Autodiff<B, C>>,
    k: FloatTensor<Autodiff<B, C>>,
    v: FloatTensor<Autodiff<B, C>>,
    heads: usize,
    bias: Option<&ScoreBias>,
) -> Option<FloatTensor<Autodiff<B, C>>> {
    let layout = separate_layout(
        &q.primitive.shape(),
        &k.primitive.shape(),
        &v.primitive.shape(),
        heads,
    )?;
    let (out, weights) = B::with_f32(&q.primitive, |qv| {
        B::with_f32(&k.primitive, |kv| {
            B::with_f32(&v.primitive, |vv| forward_values(qv, kv, vv, layout, bias))
        })
    })???;
    let out = B::from_f32(out, output_shape(&layout));
    let nodes = [q.node.clone(), k.node.clone(), v.node.clone()];
    Some(
        match SeparateBackward
            .prepare::<C>(nodes)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let state = SeparateState {
                    inputs: [q.primitive, k.primitive, v.primitive],
                    weights: Arc::new(weights),
                    layout,
                };
                prep.finish(state, out)
            }
            OpsKind::UnTracked(prep) => prep.finish(out),
        },
    )
}
