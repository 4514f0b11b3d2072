use burn::prelude::*;

use crate::model::TextConditionalDiT;

#[derive(
    Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Sampler {
    /// First order, one model call per step (the seed's).
    Euler,
    /// Second order (Heun's trapezoid), two model calls per step.
    Heun,
}

/// Conditional and null text contexts for classifier-free guidance:
/// `v = v_null + scale (v_cond - v_null)`.
pub struct Guidance<B: Backend> {
    /// `[B, M, D]` and `[B, M]`.
    pub context: Tensor<B, 3>,
    pub mask: Tensor<B, 2, Bool>,
    /// `[1, M0, D]` and `[1, M0]`: the encoded empty caption, shared by every sample.
    pub null_context: Tensor<B, 3>,
    pub null_mask: Tensor<B, 2, Bool>,
    pub scale: f64,
}

impl<B: Backend> Guidance<B> {
    /// The conditional and null branches as one batch of 2B, padded to a common token count
    /// (padded keys are masked, so the result equals two separate calls).
    fn doubled(&self) -> (Tensor<B, 3>, Tensor<B, 2, Bool>) {
        let [batch, m, width] = self.context.dims();
        let m0 = self.null_context.dims()[1];
        let len = m.max(m0);
        let (context, mask) = pad_tokens(self.context.clone(), self.mask.clone(), len);
        let null_context = self.null_context.clone().expand([batch, m0, width]);
        let null_mask = self.null_mask.clone().expand([batch, m0]);
        let (null_context, null_mask) = pad_tokens(null_context, null_mask, len);
        (
            Tensor::cat(vec![context, null_context], 0),
            Tensor::cat(vec![mask, null_mask], 0),
        )
    }
}

fn pad_tokens<B: Backend>(
    context: Tensor<B, 3>,
    mask: Tensor<B, 2, Bool>,
    len: usize,
) -> (Tensor<B, 3>, Tensor<B, 2, Bool>) {
    let [batch, m, width] = context.dims();
    if m == len {
        return (context, mask);
    }
    let device = context.device();
    let context = Tensor::cat(
        vec![context, Tensor::zeros([batch, len - m, width], &device)],
        1,
    );
    let mask = Tensor::cat(vec![mask, Tensor::zeros([batch, len - m], &device)], 1);
    (context, mask)
}

/// Integrates `dx/dt = v` from `x_init` at t = 1 down to t = 0 in `steps` equal steps.
pub fn sample<B: Backend>(
    model: &TextConditionalDiT<B>,
    x_init: Tensor<B, 4>,
    guidance: &Guidance<B>,
    steps: usize,
    sampler: Sampler,
) -> Tensor<B, 4> {
    sample_recording(model, x_init, guidance, steps, sampler, &[]).0
}

/// The cross-attention weights of the conditional branch at one integration step.
pub struct CrossAttentionAtStep<B: Backend> {
    pub step: usize,
    /// The time the model was called at: `1 - step / steps`.
    pub t: f64,
    /// Per block, `[B, N, M]` averaged over heads, M = the conditional context's tokens.
    pub per_block: Vec<Tensor<B, 3>>,
}

/// [`sample`], also returning the cross-attention weights of the first model call of each
/// step listed in `record_steps` (0-based; step i runs at t = 1 - i/steps).
pub fn sample_recording<B: Backend>(
    model: &TextConditionalDiT<B>,
    x_init: Tensor<B, 4>,
    guidance: &Guidance<B>,
    steps: usize,
    sampler: Sampler,
    record_steps: &[usize],
) -> (Tensor<B, 4>, Vec<CrossAttentionAtStep<B>>) {
    let batch = x_init.dims()[0];
    let tokens = guidance.context.dims()[1];
    let (context, mask) = guidance.doubled();
    let call = |x: Tensor<B, 4>,
                times: Tensor<B, 1>,
                context: Tensor<B, 3>,
                mask: Tensor<B, 2, Bool>,
                record: bool| {
        if record {
            model.forward_with_cross_attention(x, times, context, Some(mask))
        } else {
            (model.forward(x, times, context, Some(mask)), Vec::new())
        }
    };
    let velocity = |x: Tensor<B, 4>, t: f64, record: bool| {
        let device = x.device();
        if guidance.scale == 1.0 {
            // null + 1·(conditional − null) is the conditional velocity: skip the null half
            // (half the work, and exactly the plain conditional sampler).
            let times = Tensor::<B, 1>::full([batch], t, &device);
            return call(
                x,
                times,
                guidance.context.clone(),
                guidance.mask.clone(),
                record,
            );
        }
        let both = Tensor::cat(vec![x.clone(), x], 0);
        let times = Tensor::<B, 1>::full([2 * batch], t, &device);
        let (v, weights) = call(both, times, context.clone(), mask.clone(), record);
        // The conditional half, at its own tokens (the rest is padding to the null length).
        let weights = weights
            .into_iter()
            .map(|w| w.narrow(0, 0, batch).narrow(2, 0, tokens))
            .collect();
        let conditional = v.clone().narrow(0, 0, batch);
        let null = v.narrow(0, batch, batch);
        (
            null.clone() + (conditional - null).mul_scalar(guidance.scale),
            weights,
        )
    };
    let dt = 1.0 / steps as f64;
    let mut x = x_init;
    let mut recorded = Vec::new();
    for i in 0..steps {
        let t = 1.0 - i as f64 * dt;
        let record = record_steps.contains(&i);
        let (v, per_block) = velocity(x.clone(), t, record);
        if record {
            recorded.push(CrossAttentionAtStep {
                step: i,
                t,
                per_block,
            });
        }
        x = match sampler {
            Sampler::Euler => x - v.mul_scalar(dt),
            Sampler::Heun => {
                let predicted = x.clone() - v.clone().mul_scalar(dt);
                let (v_next, _) = velocity(predicted, t - dt, false);
                x - (v + v_next).mul_scalar(dt / 2.0)
            }
        };
    }
    (x, recorded)
}

/// The integration steps nearest to `times` (step i runs at t = 1 − i/steps, as in
/// [`sample_recording`]), in order of time from noise to image, each once.
pub fn steps_for_times(times: &[f64], steps: usize) -> Vec<usize> {
    let mut chosen: Vec<usize> = times
        .iter()
        .map(|&t| {
            (((1.0 - t.clamp(0.0, 1.0)) * steps as f64).round() as usize)
                .min(steps.saturating_sub(1))
        })
        .collect();
    chosen.sort_unstable();
    chosen.dedup();
    chosen
}
