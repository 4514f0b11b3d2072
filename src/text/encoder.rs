use burn::prelude::*;

use crate::error::Result;
use crate::model::weights::{load_module, materialize, module_to_safetensors, SafetensorsFile};
use crate::model::{ClipTextConfig, ClipTextModel, ClipTokenizer};
use crate::storage::resolve_weights;

/// Where a full `CLIPModel` file keeps its text tower.
const CLIP_MODEL_PREFIX: &str = "text_model.";

/// Loads the text tower from a safetensors file that is either a bare `CLIPTextModel` or a full
/// `CLIPModel` (names under `text_model.`, vision tensors ignored).
pub fn load_clip_text<B: Backend>(
    file: &SafetensorsFile,
    config: &ClipTextConfig,
    device: &B::Device,
) -> Result<ClipTextModel<B>> {
    let prefix = if file.contains(&format!(
        "{CLIP_MODEL_PREFIX}embeddings.token_embedding.weight"
    )) {
        CLIP_MODEL_PREFIX
    } else {
        ""
    };
    crate::backend::unseeded(|| load_module(config.init::<B>(device), file, prefix))
}

/// The seeded random encoder, the same numbers on every backend: drawn by NdArray's generator
/// on the CPU, then copied to `device`. Each backend's generator draws other numbers for the
/// same seed (CUDA's runs on the GPU), so an encoder drawn on the device would make a
/// checkpoint trained on a GPU meaningless when sampled on a CPU.
fn backend_independent_random_init<B: Backend>(
    config: &ClipTextConfig,
    seed: u64,
    device: &B::Device,
) -> Result<ClipTextModel<B>> {
    type Host = burn::backend::NdArray;
    let host_device = Default::default();
    let host = crate::backend::seeded::<Host, _>(&host_device, seed, || {
        materialize(config.init::<Host>(&host_device))
    });
    let file = SafetensorsFile::from_bytes(
        format!("random text encoder (seed {seed})"),
        module_to_safetensors(&host)?,
    )?;
    crate::backend::unseeded(|| load_module(config.init::<B>(device), &file, ""))
}

/// The frozen encoder and its tokenizer.
pub struct TextEncoder<B: Backend> {
    pub model: ClipTextModel<B>,
    pub tokenizer: ClipTokenizer,
}

impl<B: Backend> TextEncoder<B> {
    /// `weights`: any location `storage::resolve_weights` understands (hf://, file://, a path,
    /// an object-store URL). `None` starts from a seeded random initialisation, which trains
    /// but carries no language knowledge, so it is said loudly.
    pub fn load(
        weights: Option<&str>,
        config: &ClipTextConfig,
        seed: u64,
        device: &B::Device,
    ) -> Result<Self> {
        let model = match weights {
            Some(spec) => {
                let path = resolve_weights(spec)?;
                let file = SafetensorsFile::read(&path)?;
                tracing::info!(weights = spec, file = %path.display(), "loaded CLIP text encoder");
                load_clip_text(&file, config, device)?
            }
            None => {
                tracing::warn!(
                    seed,
                    "text_encoder.weights is not set: the CLIP text encoder starts from a seeded \
                     random initialisation (captions are still distinguishable, but carry no \
                     pretrained meaning); set it to hf://openai/clip-vit-base-patch32 for the real one"
                );
                backend_independent_random_init(config, seed, device)?
            }
        };
        Ok(Self {
            model,
            tokenizer: ClipTokenizer::new(config.max_position_embeddings),
        })
    }

    /// Per-token hidden states of the real tokens of each caption, `[len_i, width]` flattened.
    pub fn encode(&self, captions: &[&str]) -> Vec<(usize, Vec<f32>)> {
        if captions.is_empty() {
            return Vec::new();
        }
        let tokens: Vec<_> = captions
            .iter()
            .map(|c| self.tokenizer.tokenize(c))
            .collect();
        // Causal attention: trimming the batch to its longest caption changes no real token.
        let longest = tokens.iter().map(|t| t.len).max().unwrap_or(2);
        let ids: Vec<i64> = tokens
            .iter()
            .flat_map(|t| t.ids[..longest].iter().map(|&id| id as i64))
            .collect();
        let device = self.model.final_layer_norm.weight.device();
        let input =
            Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [tokens.len(), longest]), &device);
        let hidden = self.model.forward(input).last_hidden_state;
        let width = hidden.dims()[2];
        let values: Vec<f32> = hidden.into_data().convert::<f32>().into_vec().expect("f32");
        tokens
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let row = &values[i * longest * width..(i * longest + t.len) * width];
                (t.len, row.to_vec())
            })
            .collect()
    }
}
