//! The text-conditional Diffusion Transformer (the seed's architecture; every number is in
//! `shared/reference/README.md`). Parameter names match the seed's PyTorch module so that its
//! safetensors files load as they are.

use burn::module::Param;
use burn::nn::Linear;
use burn::prelude::*;
use burn::tensor::Distribution;

use super::layers::{
    attention_weights, key_padding_bias, merge_heads, sincos_features, split_heads, xavier_linear,
    zero_linear, LayerNorm,
};
use crate::error::{Error, Result};
use crate::kernels::linear_layer;

const NORM_EPS: f64 = 1e-5;

/// The DiT's sizes, as a job's `model:` section spells them. Every key is optional there: one a
/// job leaves out keeps the seed's value (the default: 18,145,072 parameters).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TextDiTConfig {
    pub image_size: usize,
    /// Must divide `image_size`.
    pub patch_size: usize,
    pub channels: usize,
    /// A multiple of 4 (the 2D sin/cos positions) and of `heads`.
    pub dim: usize,
    pub depth: usize,
    pub heads: usize,
    pub mlp_ratio: f64,
    /// Width of the text encoder's token embeddings (512 for CLIP ViT-B/32).
    pub context_dim: usize,
}

impl Default for TextDiTConfig {
    fn default() -> Self {
        Self {
            image_size: 32,
            patch_size: 4,
            channels: 3,
            dim: 256,
            depth: 6,
            heads: 8,
            mlp_ratio: 4.0,
            context_dim: 512,
        }
    }
}

/// `with_<field>(value)` setters, so a config reads as the seed's model plus what differs.
macro_rules! setters {
    ($($setter:ident => $field:ident: $ty:ty),* $(,)?) => {
        $(
            pub fn $setter(mut self, $field: $ty) -> Self {
                self.$field = $field;
                self
            }
        )*
    };
}

/// A value a network cannot be built with: the field, named as a job's key spells it, and why.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct InvalidField {
    pub field: &'static str,
    pub reason: String,
}

impl InvalidField {
    /// The first of `checks` (failed, field, reason) that failed, in order.
    pub(crate) fn first<const N: usize>(
        checks: [(bool, &'static str, String); N],
    ) -> std::result::Result<(), Self> {
        match checks.into_iter().find(|(failed, _, _)| *failed) {
            Some((_, field, reason)) => Err(Self { field, reason }),
            None => Ok(()),
        }
    }
}

impl TextDiTConfig {
    /// The seed's model.
    pub fn new() -> Self {
        Self::default()
    }

    setters! {
        with_image_size => image_size: usize,
        with_patch_size => patch_size: usize,
        with_channels => channels: usize,
        with_dim => dim: usize,
        with_depth => depth: usize,
        with_heads => heads: usize,
        with_mlp_ratio => mlp_ratio: f64,
        with_context_dim => context_dim: usize,
    }

    /// Every rule the sizes must meet to build a DiT (the one place they are written: job
    /// loading reports the field as `model.<field>`); the first one broken, naming its field.
    pub fn validate(&self) -> std::result::Result<(), InvalidField> {
        InvalidField::first([
            (self.image_size == 0, "image_size", "must be > 0".into()),
            (self.patch_size == 0, "patch_size", "must be > 0".into()),
            (
                !self.image_size.is_multiple_of(self.patch_size),
                "patch_size",
                format!(
                    "{} does not divide image_size {}",
                    self.patch_size, self.image_size
                ),
            ),
            (self.channels == 0, "channels", "must be > 0".into()),
            (self.depth == 0, "depth", "must be > 0".into()),
            (
                // The fixed 2D positions split dim into four sin/cos quarters.
                self.dim < 8 || !self.dim.is_multiple_of(4),
                "dim",
                format!(
                    "{} must be a multiple of 4 and at least 8 (2D sin/cos positions)",
                    self.dim
                ),
            ),
            (
                self.heads == 0 || !self.dim.is_multiple_of(self.heads),
                "heads",
                format!("{} does not divide dim {}", self.heads, self.dim),
            ),
            (
                !(self.mlp_ratio.is_finite() && self.mlp_ratio > 0.0),
                "mlp_ratio",
                format!("must be > 0, got {}", self.mlp_ratio),
            ),
            (self.context_dim == 0, "context_dim", "must be > 0".into()),
        ])
    }

    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }

    pub fn init<B: Backend>(&self, device: &B::Device) -> Result<TextConditionalDiT<B>> {
        self.validate()
            .map_err(|e| Error::Config(format!("model.{e}")))?;
        let dim = self.dim;
        let cond = 4 * dim;
        let hidden = (dim as f64 * self.mlp_ratio) as usize;
        let blocks = (0..self.depth)
            .map(|_| DiTBlock {
                norm1: AdaLN::new(cond, dim, device),
                attn: SelfAttention::new(dim, self.heads, device),
                norm2: AdaLN::new(cond, dim, device),
                cross: CrossAttention::new(dim, self.context_dim, self.heads, device),
                norm3: AdaLN::new(cond, dim, device),
                fc1: xavier_linear(dim, hidden, device),
                fc2: xavier_linear(hidden, dim, device),
            })
            .collect();
        Ok(TextConditionalDiT {
            patch_embed: PatchEmbed::new(self.channels, dim, self.patch_size, device),
            positions: fixed_positions(dim, self.grid(), device),
            time1: xavier_linear(dim, cond, device),
            time2: xavier_linear(cond, cond, device),
            text_proj: xavier_linear(self.context_dim, self.context_dim, device),
            blocks,
            final_norm: LayerNorm::new(dim, NORM_EPS, device),
            final_proj: zero_linear(
                dim,
                self.patch_size * self.patch_size * self.channels,
                device,
            ),
            image_size: self.image_size,
            patch_size: self.patch_size,
            channels: self.channels,
            dim,
        })
    }
}

#[derive(Module, Debug)]
pub struct TextConditionalDiT<B: Backend> {
    pub patch_embed: PatchEmbed<B>,
    /// Fixed 2D sin/cos positions `[N, dim]`: a constant, neither trained nor saved.
    pub positions: Tensor<B, 2>,
    pub time1: Linear<B>,
    pub time2: Linear<B>,
    pub text_proj: Linear<B>,
    pub blocks: Vec<DiTBlock<B>>,
    pub final_norm: LayerNorm<B>,
    pub final_proj: Linear<B>,
    pub image_size: usize,
    pub patch_size: usize,
    pub channels: usize,
    pub dim: usize,
}

impl<B: Backend> TextConditionalDiT<B> {
    /// Velocity `v(x_t, t | text)`.
    /// - `x`: `[B, C, H, W]`, `t`: `[B]` in [0, 1];
    /// - `context`: text token embeddings `[B, M, context_dim]`;
    /// - `mask`: `[B, M]`, true for real tokens; `None` attends to every token.
    pub fn forward(
        &self,
        x: Tensor<B, 4>,
        t: Tensor<B, 1>,
        context: Tensor<B, 3>,
        mask: Option<Tensor<B, 2, Bool>>,
    ) -> Tensor<B, 4> {
        self.run(x, t, context, mask, false).0
    }

    /// [`Self::forward`] and, per block, its cross-attention weights averaged over heads,
    /// `[B, N, M]`: for each patch (row-major) a distribution over the M text tokens, exactly
    /// 0 on masked ones.
    pub fn forward_with_cross_attention(
        &self,
        x: Tensor<B, 4>,
        t: Tensor<B, 1>,
        context: Tensor<B, 3>,
        mask: Option<Tensor<B, 2, Bool>>,
    ) -> (Tensor<B, 4>, Vec<Tensor<B, 3>>) {
        self.run(x, t, context, mask, true)
    }

    fn run(
        &self,
        x: Tensor<B, 4>,
        t: Tensor<B, 1>,
        context: Tensor<B, 3>,
        mask: Option<Tensor<B, 2, Bool>>,
        record_cross_attention: bool,
    ) -> (Tensor<B, 4>, Vec<Tensor<B, 3>>) {
        let batch = x.dims()[0];
        let h = self.patch_embed.forward(x) + self.positions.clone().unsqueeze::<3>();
        let cond = linear_layer(
            &self.time2,
            crate::kernels::silu(linear_layer(&self.time1, self.time_features(t))),
        );
        let context = linear_layer(&self.text_proj, context);
        let bias = mask.map(key_padding_bias);
        let mut h = h;
        let mut cross_attention = Vec::new();
        for block in &self.blocks {
            let (next, weights) = block.forward(
                h,
                cond.clone(),
                context.clone(),
                bias.clone(),
                record_cross_attention,
            );
            h = next;
            cross_attention.extend(weights);
        }
        let h = linear_layer(&self.final_proj, self.final_norm.forward(h));
        (self.unpatchify(h, batch), cross_attention)
    }

    /// `[sin(t f), cos(t f)]` with `dim/2` frequencies, in f32 on the device as the seed does.
    fn time_features(&self, t: Tensor<B, 1>) -> Tensor<B, 2> {
        let half = self.dim / 2;
        let device = t.device();
        let freqs: Vec<f32> = (0..half)
            .map(|i| (-(i as f32) * (10000f32.ln() / (half - 1) as f32)).exp())
            .collect();
        let freqs = Tensor::<B, 1>::from_floats(freqs.as_slice(), &device).unsqueeze::<2>();
        let arg = t.unsqueeze_dim::<2>(1) * freqs;
        Tensor::cat(vec![arg.clone().sin(), arg.cos()], 1)
    }

    /// `[B, N, p*p*C]` → `[B, C, H, W]`, each patch vector read as `(p, p, C)`.
    fn unpatchify(&self, h: Tensor<B, 3>, batch: usize) -> Tensor<B, 4> {
        let (p, c) = (self.patch_size, self.channels);
        let g = self.image_size / p;
        h.reshape([batch, g, g, p, p, c])
            .permute([0, 5, 1, 3, 2, 4])
            .reshape([batch, c, g * p, g * p])
    }

    pub fn config(&self) -> TextDiTConfig {
        let first = &self.blocks[0];
        TextDiTConfig {
            image_size: self.image_size,
            patch_size: self.patch_size,
            channels: self.channels,
            dim: self.dim,
            depth: self.blocks.len(),
            heads: first.attn.heads,
            mlp_ratio: first.fc1.weight.dims()[1] as f64 / self.dim as f64,
            context_dim: self.text_proj.weight.dims()[0],
        }
    }
}

/// Fixed 2D sin/cos positions: the patch at (row, col) gets `concat(row part, col part)`,
/// each part `dim/2` wide with `dim/4` frequencies; patches numbered row-major.
fn fixed_positions<B: Backend>(dim: usize, grid: usize, device: &B::Device) -> Tensor<B, 2> {
    let axis: Vec<Vec<f64>> = (0..grid)
        .map(|r| sincos_features(r as f64, dim / 4))
        .collect();
    let mut table = Vec::with_capacity(grid * grid * dim);
    for row in 0..grid {
        for col in 0..grid {
            table.extend(axis[row].iter().chain(&axis[col]).map(|&v| v as f32));
        }
    }
    Tensor::from_data(TensorData::new(table, [grid * grid, dim]), device)
}

/// Conv2d with kernel = stride = patch, computed as one matmul over flattened patches.
#[derive(Module, Debug)]
pub struct PatchEmbed<B: Backend> {
    /// PyTorch Conv2d layout `[dim, C, p, p]`.
    pub weight: Param<Tensor<B, 4>>,
    pub bias: Param<Tensor<B, 1>>,
}

impl<B: Backend> PatchEmbed<B> {
    fn new(channels: usize, dim: usize, patch: usize, device: &B::Device) -> Self {
        // PyTorch's Conv2d default: kaiming-uniform(a = sqrt 5), i.e. U(±1/sqrt(fan_in)).
        let bound = 1.0 / ((channels * patch * patch) as f64).sqrt();
        let uniform = Distribution::Uniform(-bound, bound);
        Self {
            weight: Param::from_tensor(Tensor::random(
                [dim, channels, patch, patch],
                uniform,
                device,
            )),
            bias: Param::from_tensor(Tensor::random([dim], uniform, device)),
        }
    }

    /// `[B, C, H, W]` → `[B, N, dim]`.
    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 3> {
        let [b, c, h, w] = x.dims();
        let [dim, _, p, _] = self.weight.dims();
        let (gh, gw) = (h / p, w / p);
        let patches = x
            .reshape([b, c, gh, p, gw, p])
            .permute([0, 2, 4, 1, 3, 5])
            .reshape([b, gh * gw, c * p * p]);
        let weight = self.weight.val().reshape([dim, c * p * p]).transpose();
        crate::kernels::linear(patches, weight, Some(self.bias.val()))
    }
}

/// `LayerNorm(x, no affine) * (1 + scale) + shift`, scale and shift from the time embedding.
#[derive(Module, Debug)]
pub struct AdaLN<B: Backend> {
    pub proj: Linear<B>,
}

impl<B: Backend> AdaLN<B> {
    fn new(cond_dim: usize, dim: usize, device: &B::Device) -> Self {
        Self {
            proj: xavier_linear(cond_dim, 2 * dim, device),
        }
    }

    fn forward(&self, x: Tensor<B, 3>, cond: Tensor<B, 2>) -> Tensor<B, 3> {
        let modulation = linear_layer(&self.proj, cond).unsqueeze_dim::<3>(1);
        let [scale, shift]: [Tensor<B, 3>; 2] = modulation
            .chunk(2, 2)
            .try_into()
            .expect("adaLN projection has an even width");
        crate::kernels::adaln_modulate(x, scale, shift, NORM_EPS)
    }
}

#[derive(Module, Debug)]
pub struct SelfAttention<B: Backend> {
    pub qkv: Linear<B>,
    pub out: Linear<B>,
    pub heads: usize,
}

impl<B: Backend> SelfAttention<B> {
    fn new(dim: usize, heads: usize, device: &B::Device) -> Self {
        Self {
            qkv: xavier_linear(dim, 3 * dim, device),
            out: xavier_linear(dim, dim, device),
            heads,
        }
    }

    fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        // q, k, v are the qkv projection's thirds, heads inside each, as the seed splits them.
        linear_layer(
            &self.out,
            crate::kernels::packed_self_attention(linear_layer(&self.qkv, x), self.heads),
        )
    }
}

#[derive(Module, Debug)]
pub struct CrossAttention<B: Backend> {
    pub q: Linear<B>,
    pub k: Linear<B>,
    pub v: Linear<B>,
    pub out: Linear<B>,
    pub heads: usize,
}

impl<B: Backend> CrossAttention<B> {
    fn new(dim: usize, context_dim: usize, heads: usize, device: &B::Device) -> Self {
        Self {
            q: xavier_linear(dim, dim, device),
            k: xavier_linear(context_dim, dim, device),
            v: xavier_linear(context_dim, dim, device),
            out: xavier_linear(dim, dim, device),
            heads,
        }
    }

    /// The output and, when `record`, the weights averaged over heads `[B, N, M]`.
    fn forward(
        &self,
        x: Tensor<B, 3>,
        context: Tensor<B, 3>,
        score_bias: Option<Tensor<B, 4>>,
        record: bool,
    ) -> (Tensor<B, 3>, Option<Tensor<B, 3>>) {
        let (q, k, v) = (
            linear_layer(&self.q, x),
            linear_layer(&self.k, context.clone()),
            linear_layer(&self.v, context),
        );
        if !record {
            let attended = crate::kernels::multi_head_attention(q, k, v, self.heads, score_bias);
            return (linear_layer(&self.out, attended), None);
        }
        let (q, k, v) = (
            split_heads(q, self.heads),
            split_heads(k, self.heads),
            split_heads(v, self.heads),
        );
        let weights = attention_weights(q, k, score_bias);
        let mean_over_heads = weights.clone().mean_dim(1).squeeze_dim::<3>(1);
        (
            linear_layer(&self.out, merge_heads(weights.matmul(v))),
            Some(mean_over_heads),
        )
    }
}

#[derive(Module, Debug)]
pub struct DiTBlock<B: Backend> {
    pub norm1: AdaLN<B>,
    pub attn: SelfAttention<B>,
    pub norm2: AdaLN<B>,
    pub cross: CrossAttention<B>,
    pub norm3: AdaLN<B>,
    pub fc1: Linear<B>,
    pub fc2: Linear<B>,
}

impl<B: Backend> DiTBlock<B> {
    fn forward(
        &self,
        x: Tensor<B, 3>,
        cond: Tensor<B, 2>,
        context: Tensor<B, 3>,
        score_bias: Option<Tensor<B, 4>>,
        record_cross_attention: bool,
    ) -> (Tensor<B, 3>, Option<Tensor<B, 3>>) {
        let x = x.clone() + self.attn.forward(self.norm1.forward(x, cond.clone()));
        let (crossed, weights) = self.cross.forward(
            self.norm2.forward(x.clone(), cond.clone()),
            context,
            score_bias,
            record_cross_attention,
        );
        let x = x + crossed;
        let hidden =
            crate::kernels::gelu(linear_layer(&self.fc1, self.norm3.forward(x.clone(), cond)));
        (x + linear_layer(&self.fc2, hidden), weights)
    }
}
