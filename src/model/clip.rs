//! CLIP's text transformer with Hugging Face `CLIPTextModel`'s architecture and parameter
//! names: token + learned position embeddings, pre-LN causal blocks with quick-GELU, final
//! LayerNorm. Frozen in ditrun: it only ever runs forward, once per distinct caption.

use burn::module::Initializer;
use burn::nn::{Embedding, EmbeddingConfig, Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::activation;
use serde::{Deserialize, Serialize};

use super::dit::InvalidField;
use super::layers::{attention, merge_heads, split_heads, LayerNorm, MASKED_SCORE};
use super::tokenizer::{CONTEXT_LENGTH, END_OF_TEXT};

/// The text tower's sizes; defaults are OpenAI's ViT-B/32 text tower (63,165,952 parameters).
/// Serialised as a job's `text_encoder:` keys, which shorten three of Hugging Face's names
/// (`layers`, `heads`, `max_positions`); a key a job leaves out keeps ViT-B/32's value.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClipTextConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    #[serde(rename = "layers")]
    pub num_hidden_layers: usize,
    #[serde(rename = "heads")]
    pub num_attention_heads: usize,
    pub vocab_size: usize,
    #[serde(rename = "max_positions")]
    pub max_position_embeddings: usize,
    /// Not a job key (jobs always ran with ViT-B/32's); a Hugging Face config sets it.
    #[serde(skip)]
    pub layer_norm_eps: f64,
    /// Not a job key (jobs always ran with ViT-B/32's); a Hugging Face config sets it.
    #[serde(skip)]
    pub eos_token_id: u32,
}

impl Default for ClipTextConfig {
    fn default() -> Self {
        Self {
            hidden_size: 512,
            intermediate_size: 2048,
            num_hidden_layers: 12,
            num_attention_heads: 8,
            vocab_size: 49408,
            max_position_embeddings: 77,
            layer_norm_eps: 1e-5,
            eos_token_id: 49407,
        }
    }
}

impl ClipTextConfig {
    /// ViT-B/32's text tower.
    pub fn new() -> Self {
        Self::default()
    }

    /// Every rule the sizes must meet to encode the tokenizer's captions (the one place they
    /// are written: job loading reports the field as `text_encoder.<field>`); the first one
    /// broken, naming the field by its job key.
    pub fn validate(&self) -> Result<(), InvalidField> {
        let (width, heads) = (self.hidden_size, self.num_attention_heads);
        InvalidField::first([
            (width == 0, "hidden_size", "must be > 0".into()),
            (
                self.intermediate_size == 0,
                "intermediate_size",
                "must be > 0".into(),
            ),
            (self.num_hidden_layers == 0, "layers", "must be > 0".into()),
            (
                heads == 0 || !width.is_multiple_of(heads),
                "heads",
                format!("{heads} does not divide hidden_size {width}"),
            ),
            (
                self.vocab_size <= END_OF_TEXT as usize,
                "vocab_size",
                format!(
                    "{} is too small for the CLIP tokenizer's ids (up to {END_OF_TEXT})",
                    self.vocab_size
                ),
            ),
            (
                self.max_position_embeddings < CONTEXT_LENGTH,
                "max_positions",
                format!(
                    "{} is below the tokenizer's {CONTEXT_LENGTH} tokens",
                    self.max_position_embeddings
                ),
            ),
        ])
    }

    /// Reads the fields ditrun needs from a Hugging Face `config.json` (a `CLIPTextConfig`, or a
    /// `CLIPConfig` with a `text_config` section); absent fields keep ViT-B/32's values.
    pub fn from_hf_json(json: &serde_json::Value) -> Self {
        let text = json.get("text_config").unwrap_or(json);
        let base = Self::new();
        let int = |key: &str, default: usize| {
            text.get(key)
                .and_then(|v| v.as_u64())
                .map(|v| v as usize)
                .unwrap_or(default)
        };
        Self {
            vocab_size: int("vocab_size", base.vocab_size),
            hidden_size: int("hidden_size", base.hidden_size),
            intermediate_size: int("intermediate_size", base.intermediate_size),
            num_hidden_layers: int("num_hidden_layers", base.num_hidden_layers),
            num_attention_heads: int("num_attention_heads", base.num_attention_heads),
            max_position_embeddings: int("max_position_embeddings", base.max_position_embeddings),
            layer_norm_eps: text
                .get("layer_norm_eps")
                .and_then(|v| v.as_f64())
                .unwrap_or(base.layer_norm_eps),
            eos_token_id: int("eos_token_id", base.eos_token_id as usize) as u32,
        }
    }

    /// Seeded random weights with CLIP's initialisation scale (normal, std 0.02): what runs when
    /// no pretrained weights are configured.
    pub fn init<B: Backend>(&self, device: &B::Device) -> ClipTextModel<B> {
        let width = self.hidden_size;
        let layers = (0..self.num_hidden_layers)
            .map(|_| {
                ClipEncoderLayer::new(
                    width,
                    self.intermediate_size,
                    self.num_attention_heads,
                    self.layer_norm_eps,
                    device,
                )
            })
            .collect();
        let embedding = |n: usize| {
            EmbeddingConfig::new(n, width)
                .with_initializer(CLIP_INIT)
                .init(device)
        };
        ClipTextModel {
            embeddings: ClipEmbeddings {
                token_embedding: embedding(self.vocab_size),
                position_embedding: embedding(self.max_position_embeddings),
            },
            encoder: ClipEncoder { layers },
            final_layer_norm: LayerNorm::new(width, self.layer_norm_eps, device),
            eos_token_id: self.eos_token_id,
        }
    }
}

/// CLIP's initialisation scale for every weight matrix and embedding.
pub(crate) const CLIP_INIT: Initializer = Initializer::Normal {
    mean: 0.0,
    std: 0.02,
};

/// A Linear layer with CLIP's initialisation (and a bias, as every encoder Linear has).
fn clip_linear<B: Backend>(d_in: usize, d_out: usize, device: &B::Device) -> Linear<B> {
    LinearConfig::new(d_in, d_out)
        .with_initializer(CLIP_INIT)
        .init(device)
}

#[derive(Module, Debug)]
pub struct ClipTextModel<B: Backend> {
    pub embeddings: ClipEmbeddings<B>,
    pub encoder: ClipEncoder<B>,
    pub final_layer_norm: LayerNorm<B>,
    pub eos_token_id: u32,
}

/// What the encoder gives per caption batch.
pub struct ClipTextOutput<B: Backend> {
    /// `[B, L, width]`: the per-token hidden states the DiT cross-attends to.
    pub last_hidden_state: Tensor<B, 3>,
    /// `[B, width]`: the hidden state at the first end-of-text token.
    pub pooler_output: Tensor<B, 2>,
}

impl<B: Backend> ClipTextModel<B> {
    /// `input_ids`: `[B, L]` token ids, L ≤ max positions. Attention is causal, so positions
    /// after a caption's end-of-text (padding) never influence its real tokens.
    pub fn forward(&self, input_ids: Tensor<B, 2, Int>) -> ClipTextOutput<B> {
        let [batch, len] = input_ids.dims();
        let device = input_ids.device();
        let eos_positions = first_eos_positions(&input_ids, self.eos_token_id);
        let positions = Tensor::<B, 1, Int>::arange(0..len as i64, &device).unsqueeze::<2>();
        let mut h = self.embeddings.token_embedding.forward(input_ids)
            + self.embeddings.position_embedding.forward(positions);
        let causal = causal_bias::<B>(len, &device);
        for layer in &self.encoder.layers {
            h = layer.forward(h, Some(causal.clone()));
        }
        let h = self.final_layer_norm.forward(h);
        let width = h.dims()[2];
        let index =
            Tensor::<B, 1, Int>::from_data(TensorData::new(eos_positions, [batch]), &device);
        let pooled = h
            .clone()
            .gather(1, index.reshape([batch, 1, 1]).repeat_dim(2, width))
            .reshape([batch, width]);
        ClipTextOutput {
            last_hidden_state: h,
            pooler_output: pooled,
        }
    }

    pub fn width(&self) -> usize {
        self.final_layer_norm.weight.dims()[0]
    }
}

fn first_eos_positions<B: Backend>(input_ids: &Tensor<B, 2, Int>, eos: u32) -> Vec<i64> {
    let [batch, len] = input_ids.dims();
    let ids: Vec<i64> = input_ids
        .to_data()
        .convert::<i64>()
        .into_vec()
        .expect("int tensor data");
    (0..batch)
        .map(|b| {
            let row = &ids[b * len..(b + 1) * len];
            row.iter()
                .position(|&id| id == eos as i64)
                .unwrap_or(len - 1) as i64
        })
        .collect()
}

/// `[1, 1, L, L]`: 0 on and below the diagonal, a large negative above it.
fn causal_bias<B: Backend>(len: usize, device: &B::Device) -> Tensor<B, 4> {
    let values: Vec<f32> = (0..len)
        .flat_map(|i| (0..len).map(move |j| if j > i { MASKED_SCORE } else { 0.0 }))
        .collect();
    Tensor::from_data(TensorData::new(values, [1, 1, len, len]), device)
}

#[derive(Module, Debug)]
pub struct ClipEmbeddings<B: Backend> {
    pub token_embedding: Embedding<B>,
    pub position_embedding: Embedding<B>,
}

#[derive(Module, Debug)]
pub struct ClipEncoder<B: Backend> {
    pub layers: Vec<ClipEncoderLayer<B>>,
}

#[derive(Module, Debug)]
pub struct ClipEncoderLayer<B: Backend> {
    pub self_attn: ClipAttention<B>,
    pub layer_norm1: LayerNorm<B>,
    pub mlp: ClipMlp<B>,
    pub layer_norm2: LayerNorm<B>,
}

impl<B: Backend> ClipEncoderLayer<B> {
    /// One pre-LN block with CLIP's initialisation; shared by the text and vision towers.
    pub(crate) fn new(
        width: usize,
        intermediate: usize,
        heads: usize,
        layer_norm_eps: f64,
        device: &B::Device,
    ) -> Self {
        Self {
            self_attn: ClipAttention {
                q_proj: clip_linear(width, width, device),
                k_proj: clip_linear(width, width, device),
                v_proj: clip_linear(width, width, device),
                out_proj: clip_linear(width, width, device),
                heads,
            },
            layer_norm1: LayerNorm::new(width, layer_norm_eps, device),
            mlp: ClipMlp {
                fc1: clip_linear(width, intermediate, device),
                fc2: clip_linear(intermediate, width, device),
            },
            layer_norm2: LayerNorm::new(width, layer_norm_eps, device),
        }
    }

    /// `score_bias`: the text tower's causal mask; the vision tower has none (every patch sees
    /// every other).
    pub(crate) fn forward(
        &self,
        x: Tensor<B, 3>,
        score_bias: Option<Tensor<B, 4>>,
    ) -> Tensor<B, 3> {
        let x = x.clone()
            + self
                .self_attn
                .forward(self.layer_norm1.forward(x), score_bias);
        x.clone() + self.mlp.forward(self.layer_norm2.forward(x))
    }
}

#[derive(Module, Debug)]
pub struct ClipAttention<B: Backend> {
    pub q_proj: Linear<B>,
    pub k_proj: Linear<B>,
    pub v_proj: Linear<B>,
    pub out_proj: Linear<B>,
    pub heads: usize,
}

impl<B: Backend> ClipAttention<B> {
    fn forward(&self, x: Tensor<B, 3>, score_bias: Option<Tensor<B, 4>>) -> Tensor<B, 3> {
        let q = split_heads(self.q_proj.forward(x.clone()), self.heads);
        let k = split_heads(self.k_proj.forward(x.clone()), self.heads);
        let v = split_heads(self.v_proj.forward(x), self.heads);
        self.out_proj
            .forward(merge_heads(attention(q, k, v, score_bias)))
    }
}

#[derive(Module, Debug)]
pub struct ClipMlp<B: Backend> {
    pub fc1: Linear<B>,
    pub fc2: Linear<B>,
}

impl<B: Backend> ClipMlp<B> {
    fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let h = self.fc1.forward(x);
        // quick_gelu: x * sigmoid(1.702 x)
        let h = h.clone() * activation::sigmoid(h.mul_scalar(1.702));
        self.fc2.forward(h)
    }
}
