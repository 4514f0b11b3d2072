//! Pictures of what the model learned, drawn by ditrun itself (no Python): an RGB canvas with
//! legible text, colour-mapped heat maps, the caption-similarity matrix, CFG sweeps and
//! cross-attention maps.
//!
//! A leaf: it takes pixels and numbers (images as bytes, matrices, reports filled by
//! `sample`, `probe` or `train`) and draws them, using only `metrics`' PNG encoder. It never
//! runs a model, loads a checkpoint or reads a job.

pub mod canvas;
pub mod cross_attention;
pub mod similarity;
pub mod sweep;

pub use canvas::Canvas;
pub use cross_attention::{
    cross_attention_canvas_size, render_cross_attention, BlockChoice, CrossAttentionReport,
    StepMaps,
};
pub use similarity::{render_similarity, similarity_canvas_size, SimilarityReport};
pub use sweep::{render_sweep, sweep_canvas_size, upscale_factor};
