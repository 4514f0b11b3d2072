//! Captions → the DiT's cross-attention context: the frozen CLIP encoder, loaded from a
//! weights location, and a cache that encodes each distinct caption once.

mod cache;
mod encoder;

pub use cache::{CachedCaption, TextEmbeddingCache};
pub use encoder::{load_clip_text, TextEncoder};
