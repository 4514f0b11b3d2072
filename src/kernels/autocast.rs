//! Mixed precision as `torch.autocast(dtype=bfloat16)` does it: inside [`with_precision`]'s
//! scope the matrix products (linear layers, attention's two products) run in bf16, and
//! everything else stays f32.
//!
//! Invariants:
//! - Parameters, their gradients, optimizer state, all-reduce and checkpoints stay f32: a
//!   product casts its f32 inputs down and its result back up, and the cast's backward brings
//!   each gradient back to its input's dtype (burn's `float_cast` backward).
//! - LayerNorm statistics, the softmax, activations, the loss and the residual stream are f32.
//! - The setting belongs to the thread that builds the forward graph, as autocast's does; the
//!   backward replays the dtypes recorded then, so it needs no setting of its own.
//! - Outside a scope (sampling, evaluation, f32 training) nothing is cast.

use std::cell::Cell;

use burn::prelude::*;
use burn::tensor::FloatDType;
use serde::{Deserialize, Serialize};

/// The dtype of the training step's matrix products (`train.precision`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    F32,
    /// bf16 products with f32 master weights, statistics and reductions.
    Bf16,
}

impl Precision {
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        }
    }

    pub fn dtype(self) -> FloatDType {
        match self {
            Precision::F32 => FloatDType::F32,
            Precision::Bf16 => FloatDType::BF16,
        }
    }
}

thread_local! {
    static PRODUCTS: Cell<Precision> = const { Cell::new(Precision::F32) };
}

/// Runs `build` (a forward pass) with its matrix products in `precision`.
pub fn with_precision<T>(precision: Precision, build: impl FnOnce() -> T) -> T {
    struct Restore(Precision);
    impl Drop for Restore {
        fn drop(&mut self) {
            PRODUCTS.with(|cell| cell.set(self.0));
        }
    }
    let _restore = Restore(PRODUCTS.with(|cell| cell.replace(precision)));
    build()
}

/// The dtype the matrix products run in here and now.
pub fn product_dtype() -> FloatDType {
    PRODUCTS.with(Cell::get).dtype()
}

/// Whether products are cast down (the fused f32 CPU kernels step aside then).
pub fn casting() -> bool {
    PRODUCTS.with(Cell::get) != Precision::F32
}

/// `x · weight + bias` with the product in [`product_dtype`], the result in `x`'s dtype.
pub fn linear<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    weight: Tensor<B, 2>,
    bias: Option<Tensor<B, 1>>,
) -> Tensor<B, D> {
    let dtype = product_dtype();
    let out_dtype = x.dtype();
    let y = burn::tensor::module::linear(
        x.cast(dtype),
        weight.cast(dtype),
        bias.map(|b| b.cast(dtype)),
    );
    y.cast(FloatDType::from(out_dtype))
}

/// Scaled dot-product attention (`q` `[B, H, N, d]`, `k` `[B, H, M, d]`, `v` `[B, H, M, dv]`,
/// an optional constant `score_bias` broadcast over the scores) with both products in
/// [`product_dtype`] and the softmax in f32; the result in `q`'s dtype.
pub fn attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    score_bias: Option<Tensor<B, 4>>,
) -> Tensor<B, 4> {
    let dtype = product_dtype();
    let out_dtype = FloatDType::from(q.dtype());
    let scale = 1.0 / (q.dims()[3] as f64).sqrt();
    let scores = q
        .cast(dtype)
        .matmul(k.cast(dtype).swap_dims(2, 3))
        .cast(FloatDType::F32)
        * scale;
    let scores = match score_bias {
        Some(bias) => scores + bias.cast(FloatDType::F32),
        None => scores,
    };
    let weights = burn::tensor::activation::softmax(scores, 3);
    weights.cast(dtype).matmul(v.cast(dtype)).cast(out_dtype)
}
