use std::collections::HashMap;

use burn::prelude::*;

use super::TextEncoder;
use crate::flow::CaptionContexts;
use crate::model::ClipTextConfig;

/// How many captions go through the encoder at once when filling the cache.
const ENCODE_BATCH: usize = 64;

/// One caption's encoder output at its real tokens.
#[derive(Clone, Debug)]
pub struct CachedCaption {
    pub tokens: usize,
    /// `[tokens, width]`, row-major.
    pub hidden: Vec<f32>,
}

/// Encodes each distinct caption once and assembles batches from host memory. A dataset of
/// captioned images has few distinct captions (CIFAR-10: 10, plus "" for dropout), so after the
/// first batches the encoder never runs again.
pub struct TextEmbeddingCache<B: Backend> {
    encoder: TextEncoder<B>,
    entries: HashMap<String, CachedCaption>,
    width: usize,
}

impl<B: Backend> TextEmbeddingCache<B> {
    /// The cache over the encoder [`TextEncoder::load`] makes of `weights` and `config`;
    /// without weights, `seed` draws it (the same seed gives the same encoder).
    pub fn load(
        weights: Option<&str>,
        config: &ClipTextConfig,
        seed: u64,
        device: &B::Device,
    ) -> crate::Result<Self> {
        Ok(Self::new(TextEncoder::load(weights, config, seed, device)?))
    }

    pub fn new(encoder: TextEncoder<B>) -> Self {
        let width = encoder.model.width();
        Self {
            encoder,
            entries: HashMap::new(),
            width,
        }
    }

    pub fn width(&self) -> usize {
        self.width
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn encoder(&self) -> &TextEncoder<B> {
        &self.encoder
    }

    /// Encodes the captions not cached yet, in batches.
    pub fn warm<'a>(&mut self, captions: impl IntoIterator<Item = &'a str>) {
        let mut missing: Vec<&str> = captions
            .into_iter()
            .filter(|c| !self.entries.contains_key(*c))
            .collect();
        missing.sort_unstable();
        missing.dedup();
        for chunk in missing.chunks(ENCODE_BATCH) {
            for (caption, (tokens, hidden)) in chunk.iter().zip(self.encoder.encode(chunk)) {
                self.entries
                    .insert(caption.to_string(), CachedCaption { tokens, hidden });
            }
        }
    }

    pub fn get(&mut self, caption: &str) -> &CachedCaption {
        self.warm([caption]);
        &self.entries[caption]
    }

    /// Context `[B, M, width]` and mask `[B, M]` for `captions`, with M the longest caption in
    /// this batch: exact, because the DiT masks padded keys out.
    pub fn batch<B2: Backend>(
        &mut self,
        captions: &[&str],
        device: &B2::Device,
    ) -> (Tensor<B2, 3>, Tensor<B2, 2, Bool>) {
        self.warm(captions.iter().copied());
        let entries: Vec<&CachedCaption> = captions.iter().map(|c| &self.entries[*c]).collect();
        let longest = entries.iter().map(|e| e.tokens).max().unwrap_or(1);
        let width = self.width;
        let mut context = vec![0f32; captions.len() * longest * width];
        let mut mask = vec![0i64; captions.len() * longest];
        for (i, entry) in entries.iter().enumerate() {
            let start = i * longest * width;
            context[start..start + entry.hidden.len()].copy_from_slice(&entry.hidden);
            mask[i * longest..i * longest + entry.tokens].fill(1);
        }
        (
            Tensor::from_data(
                TensorData::new(context, [captions.len(), longest, width]),
                device,
            ),
            // Built from integers: not every backend (candle) creates bool tensors from data.
            Tensor::<B2, 2, Int>::from_data(
                TensorData::new(mask, [captions.len(), longest]),
                device,
            )
            .equal_elem(1),
        )
    }
}

/// The flow sampler asks for caption contexts through this, so `flow` needs no text encoder.
impl<E: Backend> CaptionContexts for TextEmbeddingCache<E> {
    fn contexts<B: Backend>(
        &mut self,
        captions: &[&str],
        device: &B::Device,
    ) -> (Tensor<B, 3>, Tensor<B, 2, Bool>) {
        self.batch::<B>(captions, device)
    }
}
