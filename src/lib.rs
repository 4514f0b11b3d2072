//! ditrun: a data-parallel trainer for a text-conditional Diffusion Transformer trained with
//! flow matching. One folder per concern, from the bottom up:
//! - `error`, `storage` (one `Location` type for every path or store URL; weight downloads);
//! - `kernels` (fused CPU kernels, the CUDA attention op, bf16 autocast, and the unfused ops
//!   they replace), `backend` (which burn backend, thread pools), `model` (DiT, CLIP text
//!   encoder, tokenizer, weight files), `flow` (loss, samplers, images from prompts), `text`
//!   (the frozen encoder and its caption cache);
//! - `data` (datasets, caption shards, the streaming reader), `checkpoint` (save, commit,
//!   retention, verified loading — of any files), `metrics` (TensorBoard events, progress),
//!   `viz` (pictures drawn from pixels and numbers), `config` (job specs), `dist` (ranks,
//!   collectives, the launcher), `optim` (AdamW);
//! - `training_state` (what a checkpoint holds for training: model, EMA, optimizer, job);
//! - `sample`, `eval` (FID and CLIP score; `ditrun eval` reads checkpoints through `sample`),
//!   `train` (the trainer and the components around its steps, evaluation among them),
//!   `probe`, `inspect` and `bench` (the subcommands of those names).
//!
//! Modules depend on each other without cycles: each uses only modules of its own line or an
//! earlier one, and `viz` is a leaf that draws what its callers computed. Library code is
//! generic over the burn backend; `main` picks it once per command (`with_backend!`), and
//! `train::train_ranked` is the one library entry that picks it, from the job, for callers
//! that embed training (the tests).

pub mod backend;
pub mod bench;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod dist;
pub mod error;
pub mod eval;
pub mod flow;
pub mod inspect;
pub mod kernels;
pub mod metrics;
pub mod model;
pub mod optim;
pub mod probe;
pub mod sample;
pub mod storage;
pub mod text;
pub mod train;
pub mod training_state;
pub mod viz;

pub use error::{Error, Result};
