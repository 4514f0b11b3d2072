//! Exact (erf) GELU and SiLU: one pass forward, one pass backward, vectorised and split over
//! the thread pool. burn computes GELU in five passes with an f64 `erf` per element, and
//! burn-ndarray's GELU gradient is the derivative of the tanh approximation, not of the GELU
//! it computed: this one is exact.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::Autodiff;
use burn::tensor::ops::FloatTensor;
use burn::tensor::TensorMetadata;
use rayon::prelude::*;

use super::cpu::CpuF32;
use super::math::{erf, exp, multiversion};

/// Elements per parallel task: large enough to amortise scheduling, small enough to balance.
const CHUNK: usize = 32 * 1024;

const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// 1 / √(2π).
const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;

multiversion! {
    /// `y = x Φ(x) = x (1 + erf(x/√2)) / 2`.
    pub fn gelu_forward(x: &[f32], y: &mut [f32]) {
        for (y, &x) in y.iter_mut().zip(x) {
            *y = 0.5 * x * (1.0 + erf(x * FRAC_1_SQRT_2));
        }
    }
}

multiversion! {
    /// `dx = dy (Φ(x) + x φ(x))`.
    pub fn gelu_backward(x: &[f32], dy: &[f32], dx: &mut [f32]) {
        // Indexed over equal lengths: the three-way zip kept the loop from vectorising.
        let n = x.len();
        let (dy, dx) = (&dy[..n], &mut dx[..n]);
        for i in 0..n {
            let x = x[i];
            let cdf = 0.5 * (1.0 + erf(x * FRAC_1_SQRT_2));
            let pdf = FRAC_1_SQRT_2PI * exp(-0.5 * x * x);
            dx[i] = dy[i] * (cdf + x * pdf);
        }
    }
}

multiversion! {
    /// `y = x σ(x)`.
    pub fn silu_forward(x: &[f32], y: &mut [f32]) {
        for (y, &x) in y.iter_mut().zip(x) {
            *y = x / (1.0 + exp(-x));
        }
    }
}

multiversion! {
    /// `dx = dy σ(x) (1 + x (1 − σ(x)))`.
    pub fn silu_backward(x: &[f32], dy: &[f32], dx: &mut [f32]) {
        let n = x.len();
        let (dy, dx) = (&dy[..n], &mut dx[..n]);
        for i in 0..n {
            let x = x[i];
            let sigmoid = 1.0 / (1.0 + exp(-x));
            dx[i] = dy[i] * sigmoid * (1.0 + x * (1.0 - sigmoid));
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub struct Activation {
    pub forward: fn(&[f32], &mut [f32]),
    pub backward: fn(&[f32], &[f32], &mut [f32]),
}

pub const GELU: Activation = Activation {
    forward: gelu_forward,
    backward: gelu_backward,
};
pub const SILU: Activation = Activation {
    forward: silu_forward,
    backward: silu_backward,
};

pub fn map_parallel(x: &[f32], kernel: fn(&[f32], &mut [f32])) -> Vec<f32> {
    let mut y = vec![0.0f32; x.len()];
    y.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(y, x)| kernel(x, y));
    y
}

fn zip_parallel(x: &[f32], dy: &[f32], kernel: fn(&[f32], &[f32], &mut [f32])) -> Vec<f32> {
    assert_eq!(
        x.len(),
        dy.len(),
        "an activation's gradient has its input's shape"
    );
    let mut dx = vec![0.0f32; x.len()];
    dx.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK).zip(dy.par_chunks(CHUNK)))
        .for_each(|(dx, (x, dy))| kernel(x, dy, dx));
    dx
}

/// The activation on a plain (inference) tensor; `None` when it is not f32.
pub fn forward<B: CpuF32>(op: Activation, x: &FloatTensor<B>) -> Option<FloatTensor<B>> {
    let shape = x.shape();
    B::with_f32(x, |values| map_parallel(values, op.forward)).map(|y| B::from_f32(y, shape))
}

impl<B: CpuF32> Backward<B, 1> for Activation {
    /// The forward input (shared with the graph, not copied).
    type State = FloatTensor<B>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [parent] = ops.parents;
        // Consumed first, so that the gradient's memory is freed even when nothing needs it.
        let grad = grads.consume::<B>(&ops.node);
        let Some(parent) = parent else { return };
        let x = ops.state;
        let shape = x.shape();
        let dx = B::with_f32(&x, |x| {
            B::with_f32(&grad, |dy| zip_parallel(x, dy, self.backward))
        })
        .flatten()
        .expect("the forward pass ran on f32");
        grads.register::<B>(parent.id, B::from_f32(dx, shape));
    }
}

/// The activation as one tracked node; `None` when `x` is not f32.
pub fn forward_autodiff<B: CpuF32, C: CheckpointStrategy>(
    op: Activation,
    x: FloatTensor<Autodiff<B, C>>,
) -> Option<FloatTensor<Autodiff<B, C>>> {
    let y = forward::<B>(op, &x.primitive)?;
    Some(
        match op.prepare::<C>([x.node.clone()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish(x.primitive, y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        },
    )
}
