//! How good the images are: FID (Fréchet Inception Distance against a dataset's statistics) and
//! the CLIP score (does an image show its prompt?).
//!
//! - `inception`: pytorch-fid's FID Inception v3 (pool3 features, 2048 per image), inference only.
//! - `clip_vision`: CLIP's vision tower and both projections, for the CLIP score.
//! - `fid`: feature statistics (mean, covariance) and the Fréchet distance between two of them.
//! - `evaluate`: one evaluation of a model over the ranks, and the dataset's stored statistics.
//! - `command`: `ditrun eval` on a checkpoint.

pub mod clip_vision;
pub mod command;
pub mod evaluate;
pub mod fid;
pub mod inception;

pub use command::{eval_checkpoint, EvalRequest};
pub use evaluate::{clip_scorer, images_from_bytes, EvalPlan, EvalReport, EvalSetup, Evaluator};
