//! The networks: the text-conditional DiT that is trained, and the frozen CLIP text encoder
//! (with its tokenizer) that turns captions into the DiT's cross-attention context.

pub mod clip;
pub mod dit;
pub mod layers;
pub mod tokenizer;
pub mod weights;

pub use clip::{ClipTextConfig, ClipTextModel};
pub use dit::{TextConditionalDiT, TextDiTConfig};
pub use tokenizer::{ClipTokenizer, TokenizedCaption};
