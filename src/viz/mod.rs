//! Pictures of what the model learned, drawn by ditrun itself (no Python): an RGB canvas with
//! legible text, colour-mapped heat maps, the caption-similarity matrix and CFG sweeps.

pub mod canvas;
pub mod similarity;
pub mod sweep;

pub use canvas::Canvas;
pub use sweep::{render_sweep, sweep_canvas_size, upscale_factor};
pub use similarity::{caption_similarity, render_similarity, similarity_canvas_size, similarity_for_job, SimilarityReport};
