//! ditrun: a data-parallel trainer for a text-conditional Diffusion Transformer trained with
//! flow matching. One folder per concern:
//! `model/` (DiT, CLIP text encoder, tokenizer, weight files), `flow/` (loss and samplers),
//! `text/` (the frozen encoder and its caption cache), `data/` (datasets, caption shards, the
//! streaming reader), `storage/` (URLs to object stores, weight downloads), `checkpoint/`
//! (save, commit, retention, resume), `metrics/` (TensorBoard events, console progress),
//! `config/` (job specs), `dist/` (ranks, collectives, the launcher), `train/` (the training loop), `viz/` (pictures: caption similarity); `sample`, `inspect` and `bench` back the
//! subcommands of the same names.

pub mod backend;
pub mod bench;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod dist;
pub mod error;
pub mod flow;
pub mod inspect;
pub mod kernels;
pub mod metrics;
pub mod model;
pub mod optim;
pub mod sample;
pub mod storage;
pub mod text;
pub mod train;
pub mod training_state;
pub mod viz;

pub use error::{Error, Result};
