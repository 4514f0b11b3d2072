//! Scaled dot-product attention `softmax(q kᵀ / √d + bias) v` as one autodiff node whose
//! backward is written out from burn tensor ops of the inner backend, so that it runs on any
//! backend (the GPU in production). burn's own differentiation of the composed maths records
//! and saves each of matmul, scale, bias add, softmax's max/sub/exp/sum/div and matmul; this
//! node records one step and saves only what the backward reads.
//!
//! Invariants:
//! - `compute` is the dtype of the two forward products (and the backward's four): q, k, v,
//!   and the softmax weights before `p · v`, are cast to it. Scores go to the softmax dtype
//!   (f32, or f64 when computing in f64) before the scale, the bias and the max-subtracted
//!   softmax. When an input is already in `compute` no cast is issued at all.
//! - Saved for the backward: the softmax weights `p` in `compute`, and of q, k, v (in
//!   `compute`) only those a tracked parent's gradient reads: k for dq, q for dk, v for both.
//!   Never the pre-softmax scores.
//! - The output has q's input dtype; each gradient has its own input's dtype. Only tracked
//!   parents get a gradient. The bias is a constant (a padding mask): it gets none.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::Autodiff;
use burn::prelude::*;
use burn::tensor::activation::softmax;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{FloatDType, TensorMetadata, TensorPrimitive};

/// The softmax and its backward run at least in f32: bf16's 8-bit mantissa loses the small
/// differences of max-subtracted scores and the `dp − Σ dp ⊙ p` cancellation.
fn softmax_dtype(compute: FloatDType) -> FloatDType {
    match compute {
        FloatDType::F64 => FloatDType::F64,
        _ => FloatDType::F32,
    }
}

fn tensor<B: Backend>(p: FloatTensor<B>) -> Tensor<B, 4> {
    Tensor::from_primitive(TensorPrimitive::Float(p))
}

fn primitive<B: Backend>(t: Tensor<B, 4>) -> FloatTensor<B> {
    t.into_primitive().tensor()
}

/// `q` `[B, H, N, d]`, `k` `[B, H, M, d]`, `v` `[B, H, M, dv]`, with equal batch and head
/// sizes: the backward's products then need no reduction over broadcast axes.
fn shapes_fit<T: TensorMetadata>(q: &T, k: &T, v: &T) -> bool {
    let (q, k, v) = (q.shape(), k.shape(), v.shape());
    if q.num_dims() != 4 || k.num_dims() != 4 || v.num_dims() != 4 {
        return false;
    }
    let ([b, h, _, d], [kb, kh, m, kd], [vb, vh, vm, _]) =
        (q.dims::<4>(), k.dims::<4>(), v.dims::<4>());
    (kb, kh, kd) == (b, h, d) && (vb, vh, vm) == (b, h, m)
}

#[derive(Clone, Debug)]
pub struct AttentionState<I: Backend> {
    /// For dk.
    q: Option<FloatTensor<I>>,
    /// For dq.
    k: Option<FloatTensor<I>>,
    /// For dp, which dq and dk both need.
    v: Option<FloatTensor<I>>,
    weights: FloatTensor<I>,
    scale: f64,
    compute: FloatDType,
    /// q's, k's and v's own dtypes, which their gradients take.
    dtypes: [FloatDType; 3],
}

#[derive(Debug)]
pub struct AttentionBackward;

impl<I: Backend> Backward<I, 3> for AttentionBackward {
    type State = AttentionState<I>;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [q_node, k_node, v_node] = ops.parents;
        let d_out = grads.consume::<I>(&ops.node);
        let AttentionState {
            q,
            k,
            v,
            weights,
            scale,
            compute,
            dtypes: [q_dtype, k_dtype, v_dtype],
        } = ops.state;
        let d_out = tensor::<I>(d_out).cast(compute);
        let p = tensor::<I>(weights);
        if let Some(node) = v_node {
            let dv = p
                .clone()
                .swap_dims(2, 3)
                .matmul(d_out.clone())
                .cast(v_dtype);
            grads.register::<I>(node.id, primitive(dv));
        }
        if q_node.is_none() && k_node.is_none() {
            return;
        }
        let v = tensor::<I>(v.expect("v is saved when q or k is tracked"));
        let wide = softmax_dtype(compute);
        let dp = d_out.matmul(v.swap_dims(2, 3)).cast(wide);
        let p = p.cast(wide);
        let inner = (dp.clone() * p.clone()).sum_dim(3);
        // The 1/√d of the scores folded in here, once, rather than into both products.
        let ds = (p * (dp - inner)).mul_scalar(scale).cast(compute);
        if let Some(node) = q_node {
            let k = tensor::<I>(k.expect("k is saved when q is tracked"));
            let dq = ds.clone().matmul(k).cast(q_dtype);
            grads.register::<I>(node.id, primitive(dq));
        }
        if let Some(node) = k_node {
            let q = tensor::<I>(q.expect("q is saved when k is tracked"));
            let dk = ds.swap_dims(2, 3).matmul(q).cast(k_dtype);
            grads.register::<I>(node.id, primitive(dk));
        }
    }
}

/// Attention of `q` `[B, H, N, d]` over `k` `[B, H, M, d]` and `v` `[B, H, M, dv]` as one
/// tracked node, the products in `compute` (see the module's invariants). `score_bias` is
/// added to the scores (broadcast, e.g. a `[B, 1, 1, M]` key padding bias) and is a constant.
/// `None` when the shapes are not those (e.g. broadcast batch or heads): use the composed ops.
pub fn attention_autodiff<I: Backend, C: CheckpointStrategy>(
    q: FloatTensor<Autodiff<I, C>>,
    k: FloatTensor<Autodiff<I, C>>,
    v: FloatTensor<Autodiff<I, C>>,
    score_bias: Option<FloatTensor<I>>,
    compute: FloatDType,
) -> Option<FloatTensor<Autodiff<I, C>>> {
    if !shapes_fit(&q.primitive, &k.primitive, &v.primitive) {
        return None;
    }
    let dtypes: [FloatDType; 3] = [q.dtype().into(), k.dtype().into(), v.dtype().into()];
    let scale = (q.shape().dims::<4>()[3] as f64).powf(-0.5);
    let wide = softmax_dtype(compute);
    let (qc, kc, vc) = (
        tensor::<I>(q.primitive.clone()).cast(compute),
        tensor::<I>(k.primitive.clone()).cast(compute),
        tensor::<I>(v.primitive.clone()).cast(compute),
    );
    let scores = qc
        .clone()
        .matmul(kc.clone().swap_dims(2, 3))
        .cast(wide)
        .mul_scalar(scale);
    let scores = match score_bias {
        Some(bias) => scores + tensor::<I>(bias).cast(wide),
        None => scores,
    };
    let p = softmax(scores, 3).cast(compute);
    let out = primitive(p.clone().matmul(vc.clone()).cast(dtypes[0]));

    let (q_tracked, k_tracked) = (q.is_tracked(), k.is_tracked());
    let nodes = [q.node.clone(), k.node.clone(), v.node.clone()];
    Some(
        match AttentionBackward
            .prepare::<C>(nodes)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let state = AttentionState {
                    q: k_tracked.then(|| primitive(qc)),
                    k: q_tracked.then(|| primitive(kc)),
                    v: (q_tracked || k_tracked).then(|| primitive(vc)),
                    weights: primitive(p),
                    scale,
                    compute,
                    dtypes,
                };
                prep.finish(state, out)
            }
            OpsKind::UnTracked(prep) => prep.finish(out),
        },
    )
}
