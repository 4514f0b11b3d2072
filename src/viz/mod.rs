//! Pictures of what the model learned, drawn by ditrun itself (no Python): an RGB canvas with
//! legible text, colour-mapped heat maps, and the caption-similarity matrix.

pub mod canvas;
pub mod similarity;

pub use canvas::Canvas;
pub use similarity::{caption_similarity, render_similarity, similarity_canvas_size, similarity_for_job, SimilarityReport};
