//! Building blocks shared by the DiT and the CLIP encoder. The ops that have a fused kernel
//! keep their one unfused definition in `crate::kernels::reference` (the kernels fall back to
//! it and are tested against it) and are re-exported here, so the model sees one toolbox while
//! the dependency runs one way: model → kernels.

use burn::module::{Initializer, Param};
use burn::nn::{Linear, LinearConfig};
use burn::prelude::*;

pub use crate::kernels::reference::{
    attention_unfused, attention_weights, merge_heads, normalize_last, split_heads,
};

/// Added to attention scores of masked keys. Finite rather than -inf so that a row whose keys
/// are all masked yields a uniform (not NaN) distribution; for any row with one real key the
/// masked terms underflow to exactly 0 after `exp`, so the result equals the -inf convention.
pub const MASKED_SCORE: f32 = -1.0e9;

/// LayerNorm with Hugging Face's parameter names (`weight`, `bias`).
#[derive(Module, Debug)]
pub struct LayerNorm<B: Backend> {
    pub weight: Param<Tensor<B, 1>>,
    pub bias: Param<Tensor<B, 1>>,
    pub eps: f64,
}

impl<B: Backend> LayerNorm<B> {
    pub fn new(dim: usize, eps: f64, device: &B::Device) -> Self {
        Self {
            weight: Param::from_tensor(Tensor::ones([dim], device)),
            bias: Param::from_tensor(Tensor::zeros([dim], device)),
            eps,
        }
    }

    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let dims = x.dims();
        let dim = dims[D - 1];
        let weight = self.weight.val().reshape(broadcast_last::<D>(dim));
        let bias = self.bias.val().reshape(broadcast_last::<D>(dim));
        normalize_last(x, self.eps) * weight + bias
    }
}

fn broadcast_last<const D: usize>(dim: usize) -> [usize; D] {
    let mut shape = [1; D];
    shape[D - 1] = dim;
    shape
}

/// A Linear layer initialised as the seed does: Xavier-uniform weight, zero bias.
pub fn xavier_linear<B: Backend>(d_in: usize, d_out: usize, device: &B::Device) -> Linear<B> {
    let mut linear = LinearConfig::new(d_in, d_out)
        .with_initializer(Initializer::XavierUniform { gain: 1.0 })
        .init(device);
    linear.bias = Some(Param::from_tensor(Tensor::zeros([d_out], device)));
    linear
}

/// A Linear layer with all weights zero (the DiT's output head starts at zero velocity).
pub fn zero_linear<B: Backend>(d_in: usize, d_out: usize, device: &B::Device) -> Linear<B> {
    Linear {
        weight: Param::from_tensor(Tensor::zeros([d_in, d_out], device)),
        bias: Some(Param::from_tensor(Tensor::zeros([d_out], device))),
    }
}

/// Scaled dot-product attention. `score_bias` is added to the scores before the softmax and
/// broadcasts over heads and queries (`[B, 1, 1, M]` for a key padding mask, `[1, 1, N, N]`
/// for a causal mask).
/// On burn's CPU backends this is one fused kernel (`crate::kernels`).
pub fn attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    score_bias: Option<Tensor<B, 4>>,
) -> Tensor<B, 4> {
    crate::kernels::attention(q, k, v, score_bias)
}

/// `[B, M]` boolean key mask (true = real token) → additive score bias `[B, 1, 1, M]`.
pub fn key_padding_bias<B: Backend>(mask: Tensor<B, 2, Bool>) -> Tensor<B, 4> {
    let [b, m] = mask.dims();
    let zeros = Tensor::<B, 2>::zeros([b, m], &mask.device());
    zeros
        .mask_fill(mask.bool_not(), MASKED_SCORE)
        .reshape([b, 1, 1, m])
}

/// Sinusoidal features `[sin(x f_0..f_{h-1}), cos(x f_0..f_{h-1})]` with
/// `f_i = exp(-i ln(10000) / (h - 1))`, computed in f64 as the reference does.
pub fn sincos_features(x: f64, half: usize) -> Vec<f64> {
    let denom = (half.max(2) - 1) as f64;
    let freqs = (0..half).map(|i| (-(i as f64) * 10000f64.ln() / denom).exp());
    let (sin, cos): (Vec<f64>, Vec<f64>) = freqs.map(|f| ((x * f).sin(), (x * f).cos())).unzip();
    sin.into_iter().chain(cos).collect()
}
