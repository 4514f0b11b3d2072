//! The CLIP score (torchmetrics' definition: `100 · max(cos(image_embeds, text_embeds), 0)`)
//! with Hugging Face `CLIPModel`'s architecture: the crate's CLIP text tower, CLIP's vision
//! transformer, and both projections into the shared embedding space. Inference only.
//!
//! Invariants:
//! - parameter paths are Hugging Face's names in a full `CLIPModel` file, so one file loads with
//!   no name table: `text_model.*`, `vision_model.*` (with HF's spelling `pre_layrnorm`),
//!   `visual_projection.weight` and `text_projection.weight` (Linear, no bias); `logit_scale`
//!   is not used (the score takes the plain cosine);
//! - the vision tower's blocks are the text tower's ([`ClipEncoderLayer`]) without a mask: every
//!   patch token attends to every other, the class token first;
//! - sizes come from the file's Hugging Face `config.json` ([`ClipScoreConfig::from_hf_json`])
//!   or, for `openai/clip-vit-base-patch32` whose weights ditrun fetches without a config,
//!   from the ViT-B/32 defaults;
//! - [`clip_pixel_values`] is CLIP's image processor in floating point: shortest side resized
//!   to `image_size` with Pillow's bicubic, centre crop, CLIP's mean and std.

use burn::module::Param;
use burn::nn::{Embedding, EmbeddingConfig, Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::Distribution;
use serde_json::Value;

use crate::error::Result;
use crate::model::clip::{ClipEncoder, ClipEncoderLayer, CLIP_INIT};
use crate::model::dit::InvalidField;
use crate::model::layers::LayerNorm;
use crate::model::weights::{load_module, SafetensorsFile};
use crate::model::{ClipTextConfig, ClipTextModel, ClipTokenizer};
use crate::storage::resolve_weights;

/// CLIP's image processor normalisation (OpenAI's training statistics), per RGB channel, as
/// published (f64 keeps every digit written).
pub const CLIP_IMAGE_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
pub const CLIP_IMAGE_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];

/// The vision tower's sizes (Hugging Face `CLIPVisionConfig` names); defaults are ViT-B/32's.
#[derive(Clone, Debug, PartialEq)]
pub struct ClipVisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Side of the square input; positions exist for exactly `(image_size / patch_size)²`
    /// patches plus the class token.
    pub image_size: usize,
    pub patch_size: usize,
    pub num_channels: usize,
    pub layer_norm_eps: f64,
}

impl Default for ClipVisionConfig {
    fn default() -> Self {
        Self {
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            image_size: 224,
            patch_size: 32,
            num_channels: 3,
            layer_norm_eps: 1e-5,
        }
    }
}

impl ClipVisionConfig {
    /// Reads a Hugging Face `CLIPVisionConfig`, or a `CLIPConfig`'s `vision_config` section;
    /// absent fields keep ViT-B/32's values.
    pub fn from_hf_json(json: &Value) -> Self {
        let vision = json.get("vision_config").unwrap_or(json);
        let base = Self::default();
        let int = |key: &str, default: usize| json_usize(vision, key).unwrap_or(default);
        Self {
            hidden_size: int("hidden_size", base.hidden_size),
            intermediate_size: int("intermediate_size", base.intermediate_size),
            num_hidden_layers: int("num_hidden_layers", base.num_hidden_layers),
            num_attention_heads: int("num_attention_heads", base.num_attention_heads),
            image_size: int("image_size", base.image_size),
            patch_size: int("patch_size", base.patch_size),
            num_channels: int("num_channels", base.num_channels),
            layer_norm_eps: vision
                .get("layer_norm_eps")
                .and_then(Value::as_f64)
                .unwrap_or(base.layer_norm_eps),
        }
    }

    /// The first rule the sizes break, naming the field by its Hugging Face key.
    pub fn validate(&self) -> Result<(), InvalidField> {
        let (width, heads) = (self.hidden_size, self.num_attention_heads);
        let (image, patch) = (self.image_size, self.patch_size);
        InvalidField::first([
            (width == 0, "hidden_size", "must be > 0".into()),
            (
                self.intermediate_size == 0,
                "intermediate_size",
                "must be > 0".into(),
            ),
            (
                self.num_hidden_layers == 0,
                "num_hidden_layers",
                "must be > 0".into(),
            ),
            (
                heads == 0 || !width.is_multiple_of(heads),
                "num_attention_heads",
                format!("{heads} does not divide hidden_size {width}"),
            ),
            (
                patch == 0 || image == 0 || !image.is_multiple_of(patch),
                "patch_size",
                format!("{patch} does not divide image_size {image}"),
            ),
            (self.num_channels == 0, "num_channels", "must be > 0".into()),
        ])
    }

    /// Patches per image side.
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }

    /// A tower with CLIP's random initialisation: the template weights are loaded into.
    pub fn init<B: Backend>(&self, device: &B::Device) -> ClipVisionTransformer<B> {
        let width = self.hidden_size;
        let patch = self.patch_size;
        let layers = (0..self.num_hidden_layers)
            .map(|_| {
                let (mlp, heads) = (self.intermediate_size, self.num_attention_heads);
                ClipEncoderLayer::new(width, mlp, heads, self.layer_norm_eps, device)
            })
            .collect();
        let positions = self.grid() * self.grid() + 1;
        let embeddings = ClipVisionEmbeddings {
            class_embedding: Param::from_tensor(Tensor::random(
                [width],
                Distribution::Normal(0.0, 0.02),
                device,
            )),
            patch_embedding: PatchEmbedding {
                weight: Param::from_tensor(Tensor::random(
                    [width, self.num_channels, patch, patch],
                    Distribution::Normal(0.0, 0.02),
                    device,
                )),
            },
            position_embedding: EmbeddingConfig::new(positions, width)
                .with_initializer(CLIP_INIT)
                .init(device),
        };
        ClipVisionTransformer {
            embeddings,
            pre_layrnorm: LayerNorm::new(width, self.layer_norm_eps, device),
            encoder: ClipEncoder { layers },
            post_layernorm: LayerNorm::new(width, self.layer_norm_eps, device),
        }
    }
}

fn json_usize(json: &Value, key: &str) -> Option<usize> {
    json.get(key).and_then(Value::as_u64).map(|v| v as usize)
}

/// Both towers and the shared embedding width; defaults are `openai/clip-vit-base-patch32`.
#[derive(Clone, Debug, PartialEq)]
pub struct ClipScoreConfig {
    pub text: ClipTextConfig,
    pub vision: ClipVisionConfig,
    /// Width of the shared space both projections map into.
    pub projection_dim: usize,
}

impl Default for ClipScoreConfig {
    fn default() -> Self {
        Self {
            text: ClipTextConfig::default(),
            vision: ClipVisionConfig::default(),
            projection_dim: 512,
        }
    }
}

impl ClipScoreConfig {
    /// Reads a Hugging Face `CLIPConfig`. The top-level `projection_dim` is the one
    /// `CLIPModel` builds its projections with (the towers' own entries are ignored there).
    pub fn from_hf_json(json: &Value) -> Self {
        Self {
            text: ClipTextConfig::from_hf_json(json),
            vision: ClipVisionConfig::from_hf_json(json),
            projection_dim: json_usize(json, "projection_dim").unwrap_or(512),
        }
    }

    /// The first broken rule, as `text.<field>`, `vision.<field>` or `projection_dim`.
    pub fn validate(&self) -> Result<(), String> {
        let named = |tower: &str, e: InvalidField| format!("{tower}.{}: {}", e.field, e.reason);
        self.text.validate().map_err(|e| named("text", e))?;
        self.vision.validate().map_err(|e| named("vision", e))?;
        match self.projection_dim {
            0 => Err("projection_dim: must be > 0".into()),
            _ => Ok(()),
        }
    }

    /// The whole model with random weights: the template a weights file is loaded into.
    pub fn init<B: Backend>(&self, device: &B::Device) -> ClipModel<B> {
        let projection = |d_in: usize| {
            LinearConfig::new(d_in, self.projection_dim)
                .with_bias(false)
                .with_initializer(CLIP_INIT)
                .init(device)
        };
        ClipModel {
            text_model: self.text.init(device),
            vision_model: self.vision.init(device),
            visual_projection: projection(self.vision.hidden_size),
            text_projection: projection(self.text.hidden_size),
        }
    }
}

/// Hugging Face `CLIPModel` without `logit_scale`; field paths are its tensor names.
#[derive(Module, Debug)]
pub struct ClipModel<B: Backend> {
    pub text_model: ClipTextModel<B>,
    pub vision_model: ClipVisionTransformer<B>,
    pub visual_projection: Linear<B>,
    pub text_projection: Linear<B>,
}

impl<B: Backend> ClipModel<B> {
    /// `[N, C, S, S]` pixel values (see [`clip_pixel_values`]) → projected, unnormalised
    /// `[N, projection_dim]`.
    pub fn image_embeds(&self, pixel_values: Tensor<B, 4>) -> Tensor<B, 2> {
        let pooled = self.vision_model.forward(pixel_values).pooler_output;
        self.visual_projection.forward(pooled)
    }

    /// The text tower's pooled output (hidden state at the first end-of-text token) for
    /// `[N, L]` token ids.
    pub fn text_pooled(&self, input_ids: Tensor<B, 2, Int>) -> Tensor<B, 2> {
        self.text_model.forward(input_ids).pooler_output
    }

    /// Pooled text `[N, text width]` → projected, unnormalised `[N, projection_dim]`.
    pub fn text_embeds(&self, pooled: Tensor<B, 2>) -> Tensor<B, 2> {
        self.text_projection.forward(pooled)
    }
}

/// What the vision tower gives per image batch.
pub struct ClipVisionOutput<B: Backend> {
    /// `[N, 1 + patches, width]`: the class token, then the patches row by row.
    pub last_hidden_state: Tensor<B, 3>,
    /// `[N, width]`: the class token after `post_layernorm`.
    pub pooler_output: Tensor<B, 2>,
}

/// Hugging Face `CLIPVisionTransformer`.
#[derive(Module, Debug)]
pub struct ClipVisionTransformer<B: Backend> {
    pub embeddings: ClipVisionEmbeddings<B>,
    /// Hugging Face's spelling, which is the tensor name.
    pub pre_layrnorm: LayerNorm<B>,
    pub encoder: ClipEncoder<B>,
    pub post_layernorm: LayerNorm<B>,
}

impl<B: Backend> ClipVisionTransformer<B> {
    /// `pixel_values`: `[N, C, S, S]` with S the configured image size (the position table
    /// fixes the patch count). Panics on any other size.
    pub fn forward(&self, pixel_values: Tensor<B, 4>) -> ClipVisionOutput<B> {
        let mut hidden = self
            .pre_layrnorm
            .forward(self.embeddings.forward(pixel_values));
        for layer in &self.encoder.layers {
            hidden = layer.forward(hidden, None);
        }
        let [batch, _, width] = hidden.dims();
        let class_token = hidden
            .clone()
            .slice([0..batch, 0..1])
            .reshape([batch, width]);
        ClipVisionOutput {
            pooler_output: self.post_layernorm.forward(class_token),
            last_hidden_state: hidden,
        }
    }
}

#[derive(Module, Debug)]
pub struct ClipVisionEmbeddings<B: Backend> {
    /// The learned class token, `[width]`.
    pub class_embedding: Param<Tensor<B, 1>>,
    pub patch_embedding: PatchEmbedding<B>,
    /// One row per token: the class token, then the patches row-major.
    pub position_embedding: Embedding<B>,
}

impl<B: Backend> ClipVisionEmbeddings<B> {
    fn forward(&self, pixel_values: Tensor<B, 4>) -> Tensor<B, 3> {
        let positions = self.position_embedding.weight.val();
        let [tokens, width] = positions.dims();
        let patches = self.patch_embedding.forward(pixel_values);
        let [batch, patch_count, _] = patches.dims();
        assert_eq!(
            patch_count + 1,
            tokens,
            "pixel_values give {patch_count} patches; the position table has {} (resize the \
             images to the configured image_size)",
            tokens - 1
        );
        let class_token = self
            .class_embedding
            .val()
            .reshape([1, 1, width])
            .repeat_dim(0, batch);
        Tensor::cat(vec![class_token, patches], 1) + positions.unsqueeze::<3>()
    }
}

/// Conv2d without bias, kernel = stride = patch, computed as one matmul over flattened
/// patches (as the DiT's patch embedding is).
#[derive(Module, Debug)]
pub struct PatchEmbedding<B: Backend> {
    /// PyTorch Conv2d layout `[width, C, p, p]`.
    pub weight: Param<Tensor<B, 4>>,
}

impl<B: Backend> PatchEmbedding<B> {
    /// `[N, C, H, W]` → `[N, (H/p)·(W/p), width]`, patches row-major.
    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 3> {
        let [batch, channels, height, width_px] = x.dims();
        let [width, expected_channels, p, _] = self.weight.dims();
        assert_eq!(channels, expected_channels, "pixel_values channels");
        let (rows, columns) = (height / p, width_px / p);
        assert!(
            rows * p == height && columns * p == width_px,
            "{height}×{width_px} pixels are not whole {p}×{p} patches"
        );
        let patches = x
            .reshape([batch, channels, rows, p, columns, p])
            .permute([0, 2, 4, 1, 3, 5])
            .reshape([batch, rows * columns, channels * p * p]);
        let weight = self
            .weight
            .val()
            .reshape([width, channels * p * p])
            .transpose();
        crate::kernels::linear(patches, weight, None)
    }
}

/// Cosine similarity of every image with every text, `[images, texts]`, from projected
/// embeddings (normalised here, as `CLIPModel` does before its logits).
pub fn cosine_matrix<B: Backend>(
    image_embeds: Tensor<B, 2>,
    text_embeds: Tensor<B, 2>,
) -> Tensor<B, 2> {
    unit_rows(image_embeds).matmul(unit_rows(text_embeds).transpose())
}

fn unit_rows<B: Backend>(x: Tensor<B, 2>) -> Tensor<B, 2> {
    let norm = x.clone().powi_scalar(2).sum_dim(1).sqrt();
    x / norm
}

/// torchmetrics' CLIP score of cosines: `100 · max(cos, 0)`.
pub fn clip_score_of_cosine<B: Backend, const D: usize>(cosine: Tensor<B, D>) -> Tensor<B, D> {
    cosine.clamp_min(0.0).mul_scalar(100.0)
}

/// A loaded CLIP model with its tokenizer: scores generated images against their prompts.
pub struct ClipScorer<B: Backend> {
    pub model: ClipModel<B>,
    pub tokenizer: ClipTokenizer,
    image_size: usize,
}

impl<B: Backend> ClipScorer<B> {
    /// `weights`: any location [`resolve_weights`] understands (`hf://openai/clip-vit-base-patch32`,
    /// a path, a store URL) holding a full `CLIPModel` safetensors file.
    pub fn load(weights: &str, config: &ClipScoreConfig, device: &B::Device) -> Result<Self> {
        let path = resolve_weights(weights)?;
        let file = SafetensorsFile::read(&path)?;
        let scorer = Self::from_file(&file, config, device)?;
        tracing::info!(weights, file = %path.display(), "loaded CLIP for the CLIP score");
        Ok(scorer)
    }

    /// Loads every tensor the score uses from `file`; all missing or mis-shaped tensors are
    /// reported together, each with the file and its name.
    pub fn from_file(
        file: &SafetensorsFile,
        config: &ClipScoreConfig,
        device: &B::Device,
    ) -> Result<Self> {
        config
            .validate()
            .map_err(|reason| crate::error::Error::Config(format!("CLIP score model: {reason}")))?;
        let model = crate::backend::unseeded(|| load_module(config.init::<B>(device), file, ""))?;
        Ok(Self {
            model,
            tokenizer: ClipTokenizer::new(config.text.max_position_embeddings),
            image_size: config.vision.image_size,
        })
    }

    /// Projected, unnormalised embeddings of `prompts`, `[prompts, projection_dim]`.
    pub fn prompt_embeds(&self, prompts: &[&str]) -> Tensor<B, 2> {
        let context = self.tokenizer.context_length();
        let ids: Vec<i64> = prompts
            .iter()
            .flat_map(|p| self.tokenizer.tokenize(p).ids.into_iter().map(i64::from))
            .collect();
        let device = self.model.text_projection.weight.device();
        let ids = TensorData::new(ids, [prompts.len(), context]);
        let pooled = self.model.text_pooled(Tensor::from_data(ids, &device));
        self.model.text_embeds(pooled)
    }

    /// Projected, unnormalised embeddings of `images` (`[N, C, H, W]` in [0, 1], C = 1 or 3),
    /// preprocessed as CLIP's image processor does.
    pub fn image_embeds(&self, images: Tensor<B, 4>) -> Tensor<B, 2> {
        self.model
            .image_embeds(clip_pixel_values(images, self.image_size))
    }

    /// The CLIP score of image `i` with prompt `i`, for each pair.
    pub fn clip_score(&self, images: Tensor<B, 4>, prompts: &[&str]) -> Vec<f32> {
        assert_eq!(images.dims()[0], prompts.len(), "one prompt per image");
        let images = unit_rows(self.image_embeds(images));
        let texts = unit_rows(self.prompt_embeds(prompts));
        let cosine = (images * texts).sum_dim(1);
        clip_score_of_cosine(cosine)
            .into_data()
            .convert::<f32>()
            .into_vec()
            .expect("f32 scores")
    }
}

/// CLIP's image processor on images in [0, 1] (`[N, C, H, W]`, C = 1 is repeated to RGB):
/// the shortest side resized to `image_size` (the longer one to `⌊image_size · long / short⌋`),
/// the centre `image_size²` cropped (top-left at `⌊(size − image_size) / 2⌋`, as Hugging Face
/// crops), then `(x − mean) / std` per channel with [`CLIP_IMAGE_MEAN`] and [`CLIP_IMAGE_STD`].
///
/// The resize is Pillow's `BICUBIC` (what `CLIPImageProcessor` calls, and what torchvision's
/// antialiased bicubic reproduces): Keys' cubic with a = −0.5 on pixel centres, widened by the
/// scale factor when shrinking, tap weights renormalised at the borders. It is separable, so
/// it runs as two matrix products `Ry · image · Rxᵀ` (see [`bicubic_resize_matrix`]) whose
/// rows outside the crop are dropped. The result is clamped to [0, 1] where Pillow clamps to
/// the 8-bit range; the 8-bit rounding itself is left out.
pub fn clip_pixel_values<B: Backend>(images: Tensor<B, 4>, image_size: usize) -> Tensor<B, 4> {
    let [batch, channels, height, width] = images.dims();
    assert!(
        channels == 1 || channels == 3,
        "CLIP reads RGB (or grayscale) images, not {channels} channels"
    );
    let images = if channels == 1 {
        images.repeat_dim(1, 3)
    } else {
        images
    };
    let device = images.device();
    let (out_height, out_width) = shortest_side_resized(height, width, image_size);
    let crop = |full: usize| (full - image_size) / 2..(full - image_size) / 2 + image_size;
    let rows = resize_tensor::<B>(height, out_height, crop(out_height), &device);
    let columns = resize_tensor::<B>(width, out_width, crop(out_width), &device);
    let resized = rows
        .unsqueeze::<4>()
        .matmul(images)
        .matmul(columns.transpose().unsqueeze::<4>())
        .clamp(0.0, 1.0);
    let per_channel = |values: [f64; 3]| {
        let values = values.map(|v| v as f32).to_vec();
        Tensor::<B, 1>::from_data(TensorData::new(values, [3]), &device).reshape([1, 3, 1, 1])
    };
    debug_assert_eq!(resized.dims(), [batch, 3, image_size, image_size]);
    (resized - per_channel(CLIP_IMAGE_MEAN)) / per_channel(CLIP_IMAGE_STD)
}

/// Hugging Face's `shortest_edge` size: `(height, width)` after the resize.
fn shortest_side_resized(height: usize, width: usize, size: usize) -> (usize, usize) {
    let longer = |long: usize, short: usize| size * long / short;
    if width <= height {
        (longer(height, width), size)
    } else {
        (size, longer(width, height))
    }
}

/// The rows `kept` of the `[output, input]` resize matrix, as an f32 tensor.
fn resize_tensor<B: Backend>(
    input: usize,
    output: usize,
    kept: std::ops::Range<usize>,
    device: &B::Device,
) -> Tensor<B, 2> {
    let matrix = bicubic_resize_matrix(input, output);
    let values: Vec<f32> = matrix[kept.start * input..kept.end * input]
        .iter()
        .map(|&v| v as f32)
        .collect();
    Tensor::from_data(TensorData::new(values, [kept.len(), input]), device)
}

/// Pillow's bicubic resize of one axis from `input` to `output` samples, as a row-major
/// `[output, input]` matrix: row `i` holds the weights output sample `i` gives each input
/// sample. Mirrors `precompute_coeffs` in Pillow's `Resample.c` (in f64, before Pillow's
/// fixed-point rounding for 8-bit images); each row sums to 1. Checked once against Pillow's
/// float-image (`F` mode) resize, which it matches to f32 rounding.
pub fn bicubic_resize_matrix(input: usize, output: usize) -> Vec<f64> {
    assert!(input > 0 && output > 0, "resize between non-empty axes");
    const SUPPORT: f64 = 2.0;
    let scale = input as f64 / output as f64;
    // Shrinking widens the kernel to average over every input sample (antialiasing).
    let filter_scale = scale.max(1.0);
    let support = SUPPORT * filter_scale;
    let mut matrix = vec![0.0; output * input];
    for (i, row) in matrix.chunks_exact_mut(input).enumerate() {
        let center = (i as f64 + 0.5) * scale;
        // Pillow truncates toward zero, then clips to the axis.
        let first = ((center - support + 0.5) as isize).max(0) as usize;
        let end = ((center + support + 0.5) as isize).clamp(0, input as isize) as usize;
        for (j, weight) in row.iter_mut().enumerate().take(end).skip(first) {
            *weight = keys_cubic((j as f64 - center + 0.5) / filter_scale);
        }
        let total: f64 = row.iter().sum();
        if total != 0.0 {
            row.iter_mut().for_each(|w| *w /= total);
        }
    }
    matrix
}

/// Keys' cubic convolution kernel with a = −0.5 (Pillow's choice; PyTorch's plain bicubic
/// uses −0.75).
fn keys_cubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}
