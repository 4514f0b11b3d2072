//! AdamW's element update as one vectorised pass over a slice of parameters, their gradients
//! and both moments, the moments updated in place. Op for op and in the same order as burn's
//! `AdamW` (each line below is one of its tensor ops, in f32), so both give the same bits.

use super::math::multiversion;

/// The scalars of one AdamW step for parameters that have taken `time − 1` steps before.
#[derive(Clone, Copy, Debug)]
pub struct AdamWStep {
    pub beta_1: f32,
    pub beta_2: f32,
    pub epsilon: f32,
    /// `1 − β₁ᵗ` and `1 − β₂ᵗ`, in f32 as burn computes them.
    pub correction_1: f32,
    pub correction_2: f32,
    /// `1 − lr · weight_decay` and `lr`, rounded to f32 as burn's `mul_scalar` does.
    pub decay: f32,
    pub lr: f32,
    /// The first step: the moments start from the gradient instead of decaying.
    pub first: bool,
}

impl AdamWStep {
    pub fn new(
        beta_1: f32,
        beta_2: f32,
        epsilon: f32,
        weight_decay: f32,
        lr: f64,
        time: usize,
    ) -> Self {
        let time = time as i32;
        Self {
            beta_1,
            beta_2,
            epsilon,
            correction_1: 1f32 - beta_1.powi(time),
            correction_2: 1f32 - beta_2.powi(time),
            decay: (1.0 - lr * weight_decay as f64) as f32,
            lr: lr as f32,
            first: time == 1,
        }
    }
}

multiversion! {
    /// `param` → `out`; `first_moment` and `second_moment` updated in place.
    pub fn adamw_update(
        step: &AdamWStep,
        param: &[f32],
        grad: &[f32],
        first_moment: &mut [f32],
        second_moment: &mut [f32],
        out: &mut [f32],
    ) {
        let s = *step;
        let (factor_1, factor_2) = (1.0 - s.beta_1, 1.0 - s.beta_2);
        let n = param.len();
        let (grad, first_moment, second_moment, out) =
            (&grad[..n], &mut first_moment[..n], &mut second_moment[..n], &mut out[..n]);
        for i in 0..n {
            let g = grad[i];
            let (m, v) = if s.first {
                (g * factor_1, (g * g) * factor_2)
            } else {
                (first_moment[i] * s.beta_1 + g * factor_1, second_moment[i] * s.beta_2 + (g * g) * factor_2)
            };
            first_moment[i] = m;
            second_moment[i] = v;
            let delta = (m / s.correction_1) / ((v / s.correction_2).sqrt() + s.epsilon);
            out[i] = param[i] * s.decay - delta * s.lr;
        }
    }
}
