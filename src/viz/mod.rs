//! Pictures of what the model learned, drawn by ditrun itself (no Python): an RGB canvas with
//! legible text, colour-mapped heat maps, the caption-similarity matrix, CFG sweeps and
//! cross-attention maps.

pub mod canvas;
pub mod cross_attention;
pub mod similarity;
pub mod sweep;

pub use canvas::Canvas;
pub use cross_attention::{
    cross_attention_canvas_size, cross_attention_maps, render_cross_attention, steps_for_times, BlockChoice,
    CrossAttentionReport, CrossAttentionTask, StepMaps,
};
pub use sweep::{render_sweep, sweep_canvas_size, upscale_factor};
pub use similarity::{caption_similarity, render_similarity, similarity_canvas_size, similarity_for_job, SimilarityReport};
