//! The maths of the fused kernels composed of plain burn ops: what the backends without a
//! fused kernel run, what the model calls where it needs the intermediate values (the
//! attention weights), and the reference the kernels are tested against.
//!
//! Invariant: these are the only definitions of these ops. The model's layers re-export them
//! rather than keep their own copies, so the fused and unfused paths cannot drift apart.

use burn::prelude::*;
use burn::tensor::activation;

/// `(x - mean) / sqrt(var + eps)` over the last axis, biased variance as in PyTorch.
pub fn normalize_last<B: Backend, const D: usize>(x: Tensor<B, D>, eps: f64) -> Tensor<B, D> {
    let (var, mean) = x.clone().var_mean_bias(D - 1);
    (x - mean) / (var + eps).sqrt()
}

/// `[B, N, H*d]` → `[B, H, N, d]`.
pub fn split_heads<B: Backend>(x: Tensor<B, 3>, heads: usize) -> Tensor<B, 4> {
    let [b, n, width] = x.dims();
    x.reshape([b, n, heads, width / heads]).swap_dims(1, 2)
}

/// `[B, H, N, d]` → `[B, N, H*d]`.
pub fn merge_heads<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 3> {
    let [b, h, n, d] = x.dims();
    x.swap_dims(1, 2).reshape([b, n, h * d])
}

/// Scaled dot-product attention (`score_bias` added to the scores before the softmax,
/// broadcast over heads and queries) composed of burn ops.
pub fn attention_unfused<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    score_bias: Option<Tensor<B, 4>>,
) -> Tensor<B, 4> {
    attention_weights(q, k, score_bias).matmul(v)
}

/// The softmax weights of [`attention_unfused`], `[B, H, N, M]`: each query's distribution
/// over keys.
pub fn attention_weights<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    score_bias: Option<Tensor<B, 4>>,
) -> Tensor<B, 4> {
    let head_dim = q.dims()[3];
    let scores = q
        .matmul(k.swap_dims(2, 3))
        .mul_scalar((head_dim as f64).powf(-0.5));
    let scores = match score_bias {
        Some(bias) => scores + bias,
        None => scores,
    };
    activation::softmax(scores, 3)
}
