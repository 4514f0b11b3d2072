use burn::prelude::*;
use rand::Rng;

use crate::model::TextConditionalDiT;

/// The random parts of one flow-matching step, drawn by the caller so runs are reproducible.
pub struct FlowBatch<B: Backend> {
    /// Data `[B, C, H, W]`.
    pub x0: Tensor<B, 4>,
    /// Noise, same shape.
    pub x1: Tensor<B, 4>,
    /// Times `[B]`, uniform in [0, 1].
    pub t: Tensor<B, 1>,
}

impl<B: Backend> FlowBatch<B> {
    /// Draws `x1 ~ N(0, I)` and `t ~ U[0, 1]` for the data `x0` with the backend's own
    /// generator, on `x0`'s device (as `torch.randn(device=...)` does): nothing crosses from
    /// the host. Not reproducible across backends; the trainer draws on the host, ahead of
    /// the step, for exact resume.
    pub fn draw_on_device(x0: Tensor<B, 4>) -> Self {
        let dims = x0.dims();
        let device = x0.device();
        Self {
            x1: Tensor::random(dims, burn::tensor::Distribution::Normal(0.0, 1.0), &device),
            t: Tensor::random(
                [dims[0]],
                burn::tensor::Distribution::Uniform(0.0, 1.0),
                &device,
            ),
            x0,
        }
    }
}

/// `x_t = (1 - t) x0 + t x1`; the model predicts the velocity `x1 - x0`; mean squared error.
pub fn flow_matching_loss<B: Backend>(
    model: &TextConditionalDiT<B>,
    batch: FlowBatch<B>,
    context: Tensor<B, 3>,
    mask: Option<Tensor<B, 2, Bool>>,
) -> Tensor<B, 1> {
    let FlowBatch { x0, x1, t } = batch;
    let t4 = t.clone().reshape([t.dims()[0], 1, 1, 1]);
    let xt = x0.clone() * (t4.clone().neg() + 1.0) + x1.clone() * t4;
    let target = x1 - x0;
    let velocity = model.forward(xt, t, context, mask);
    (velocity - target).square().mean()
}

/// Replaces each caption by the null caption "" with probability `p`, so that one model learns
/// both the conditional and the unconditional velocity (needed for classifier-free guidance).
pub fn drop_captions<'a>(captions: &[&'a str], p: f64, rng: &mut impl Rng) -> Vec<&'a str> {
    captions
        .iter()
        .map(|&caption| if rng.random::<f64>() < p { "" } else { caption })
        .collect()
}
