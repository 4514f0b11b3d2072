//! ditrun: a data-parallel trainer for a text-conditional Diffusion Transformer trained with
//! flow matching. Folders follow the concerns: `model/` (DiT, CLIP text encoder, tokenizer,
//! weight loading), `flow/` (loss and samplers), `text/` (caption embedding cache),
//! `storage/` (URLs to object stores and weight downloads), `bench` (images/s of a training step).

pub mod error;
pub mod storage;

pub use error::{Error, Result};
pub mod backend;
pub mod bench;
pub mod flow;
pub mod model;
pub mod text;
