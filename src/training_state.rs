//! What a checkpoint holds for training, and the conversion both ways: the DiT and its EMA as
//! safetensors in PyTorch layout (readable by other tools), the AdamW moments as burn's binary
//! record, the step and data position as the checkpoint's state, and the effective job. Sits
//! between the model-agnostic `checkpoint` store and its users (`train` writes and resumes,
//! `sample`, `inspect` and `viz` read a checkpoint's job and EMA weights).
//!
//! Invariants: parameter ids are hashes of their paths ([`with_path_ids`]), so an optimizer
//! record saved by one process matches the model another process rebuilds; weights are stored
//! in f32 whatever precision trained them.

use burn::module::AutodiffModule;
use burn::optim::Optimizer;
use burn::prelude::*;
use burn::record::{BinBytesRecorder, FullPrecisionSettings, Recorder};
use burn::tensor::backend::AutodiffBackend;
use bytes::Bytes;

use crate::checkpoint::{CheckpointState, LoadedCheckpoint};
use crate::config::JobSpec;
use crate::data::stream::StreamPosition;
use crate::error::{Error, Result};
use crate::model::weights::{load_module, module_to_safetensors, SafetensorsFile};
use crate::model::{TextConditionalDiT, TextDiTConfig};
use burn::module::{ModuleMapper, Param, ParamId};
use sha2::{Digest, Sha256};

pub const MODEL_FILE: &str = "model.safetensors";
pub const EMA_FILE: &str = "ema.safetensors";
pub const OPTIMIZER_FILE: &str = "optimizer.bin";
/// Key of the effective job YAML in the checkpoint state's `extra`.
pub const JOB_KEY: &str = "job_yaml";
/// Key of the text encoder's identity ([`text_encoder_identity`]) in the state's `extra`.
pub const TEXT_ENCODER_KEY: &str = "text_encoder";

/// Which text encoder a job conditions on: `sha256:<hex>` of its weights file, or the seeded
/// random initialisation it starts from when `text_encoder.weights` is unset. A model sampled
/// with another encoder draws noise, so checkpoints record this and readers compare it.
pub fn text_encoder_identity(job: &JobSpec) -> Result<String> {
    match job.text_encoder.weights.as_deref() {
        Some(weights) => {
            let path = crate::storage::resolve_weights(weights)?;
            let digest = crate::storage::weights::digest_file::<Sha256>(&path)?;
            Ok(format!("sha256:{digest}"))
        }
        None => Ok(format!("random-init seed {}", job.train.seed)),
    }
}

/// Refuses a checkpoint whose text encoder is not the one `job` loads now (checkpoints of
/// earlier versions record none and pass).
pub fn ensure_same_text_encoder(checkpoint: &LoadedCheckpoint, job: &JobSpec) -> Result<()> {
    let Some(recorded) = checkpoint
        .state
        .extra
        .get(TEXT_ENCODER_KEY)
        .and_then(|v| v.as_str())
    else {
        return Ok(());
    };
    let now = text_encoder_identity(job)?;
    if recorded == now {
        return Ok(());
    }
    Err(Error::Checkpoint {
        checkpoint: checkpoint.url.clone(),
        reason: format!(
            "trained with the text encoder {recorded}, but text_encoder.weights ({}) now gives              {now}: its captions would condition the model on embeddings it never saw",
            job.text_encoder.weights.as_deref().unwrap_or("unset")
        ),
    })
}

/// Key of the loss guard's memory ([`LossGuardRecord`]) in the checkpoint state's `extra`.
pub const LOSS_GUARD_KEY: &str = "loss_guard";

/// What a checkpoint keeps of the trainer's loss guard (`train::loss_guard`): the recent
/// applied losses spikes are measured against, and the skip counts. Absent in checkpoints of
/// earlier versions: an empty guard.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LossGuardRecord {
    pub recent_losses: Vec<f64>,
    pub skipped_in_a_row: u32,
    pub skipped_total: u64,
}

/// Gives every parameter the id `hash(path)`: two processes, or one process before and after
/// a restart, then agree on ids without storing them.
pub fn with_path_ids<B: Backend, M: Module<B>>(module: M) -> M {
    struct Renamer(Vec<String>);
    impl<B: Backend> ModuleMapper<B> for Renamer {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.0.push(name.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.0.pop();
        }
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            let (_, tensor, mapper) = param.consume();
            let digest = Sha256::digest(self.0.join(".").as_bytes());
            let id = u64::from_le_bytes(digest[..8].try_into().expect("8 bytes"));
            Param::from_mapped_value(ParamId::from(id), tensor, mapper)
        }
    }
    module.map(&mut Renamer(Vec::new()))
}

type OptimizerRecorder = BinBytesRecorder<FullPrecisionSettings>;

/// The effective job as a checkpoint records it: its hash (to notice a resume under another
/// config) and its YAML (so that `sample` and `inspect` rebuild the model without the file).
#[derive(Clone, Debug)]
pub struct JobRecord {
    pub config_hash: String,
    pub yaml: String,
}

impl JobRecord {
    pub fn of(job: &JobSpec) -> Self {
        Self {
            config_hash: job.hash(),
            yaml: job.to_yaml(),
        }
    }
}

pub struct TrainingState<AB: AutodiffBackend> {
    pub model: TextConditionalDiT<AB>,
    pub ema: TextConditionalDiT<AB::InnerBackend>,
    /// Optimiser steps done.
    pub step: u64,
    /// Where the data stream continues.
    pub position: StreamPosition,
    pub loss_guard: LossGuardRecord,
}

impl<AB: AutodiffBackend> TrainingState<AB> {
    pub fn start(model: TextConditionalDiT<AB>) -> Self {
        let ema = model.valid();
        Self {
            model,
            ema,
            step: 0,
            position: StreamPosition {
                epoch: 0,
                position: 0,
            },
            loss_guard: LossGuardRecord::default(),
        }
    }

    /// Loads weights and EMA into `fresh` (a model of the job's sizes, with path ids).
    pub fn restore(fresh: TextConditionalDiT<AB>, checkpoint: &LoadedCheckpoint) -> Result<Self> {
        let ema_template = fresh.valid();
        let model = load_module(fresh, &checkpoint_file(checkpoint, MODEL_FILE)?, "")?;
        let ema = load_module(ema_template, &checkpoint_file(checkpoint, EMA_FILE)?, "")?;
        let state = &checkpoint.state;
        Ok(Self {
            model,
            ema,
            step: state.step,
            position: StreamPosition {
                epoch: state.epoch,
                position: state.position,
            },
            loss_guard: match state.extra.get(LOSS_GUARD_KEY) {
                Some(record) => {
                    serde_json::from_value(record.clone()).map_err(|e| Error::Checkpoint {
                        checkpoint: checkpoint.url.clone(),
                        reason: format!("state.json's `{LOSS_GUARD_KEY}`: {e}"),
                    })?
                }
                None => LossGuardRecord::default(),
            },
        })
    }

    /// The checkpoint's state and files after `step` steps; the next batch is at `position`.
    pub fn pack<O: Optimizer<TextConditionalDiT<AB>, AB>>(
        model: &TextConditionalDiT<AB>,
        ema: &TextConditionalDiT<AB::InnerBackend>,
        optimizer: &O,
        step: u64,
        position: StreamPosition,
        job: &JobRecord,
    ) -> Result<(CheckpointState, Vec<(String, Bytes)>)> {
        let optimizer_bytes = OptimizerRecorder::default()
            .record(optimizer.to_record(), ())
            .map_err(|e| Error::Training(format!("cannot serialise the optimiser state: {e}")))?;
        let files = vec![
            (
                MODEL_FILE.to_string(),
                Bytes::from(module_to_safetensors::<AB, _>(model)?),
            ),
            (
                EMA_FILE.to_string(),
                Bytes::from(module_to_safetensors::<AB::InnerBackend, _>(ema)?),
            ),
            (OPTIMIZER_FILE.to_string(), Bytes::from(optimizer_bytes)),
        ];
        let state = CheckpointState {
            step,
            epoch: position.epoch,
            position: position.position,
            config_hash: job.config_hash.clone(),
            world_size: 1,
            // The effective job travels with the weights, so `ditrun sample` and `inspect`
            // know the model's sizes and text encoder without the job file.
            extra: serde_json::json!({ JOB_KEY: job.yaml }),
            ..Default::default()
        };
        Ok((state, files))
    }
}

/// Restores AdamW's moments. Parameter ids come from paths ([`with_path_ids`]), so the saved
/// record's ids match the reloaded model's.
pub fn restore_optimizer<AB: AutodiffBackend, O: Optimizer<TextConditionalDiT<AB>, AB>>(
    optimizer: O,
    checkpoint: &LoadedCheckpoint,
    device: &AB::Device,
) -> Result<O> {
    let bytes = checkpoint
        .files
        .get(OPTIMIZER_FILE)
        .ok_or_else(|| missing(checkpoint, OPTIMIZER_FILE))?;
    let record = Recorder::<AB>::load(&OptimizerRecorder::default(), bytes.to_vec(), device)
        .map_err(|e| Error::CheckpointFile {
            checkpoint: checkpoint.url.clone(),
            file: OPTIMIZER_FILE.into(),
            problem: format!("is not an optimiser state of this model: {e}"),
        })?;
    Ok(optimizer.load_record(record))
}

fn missing(checkpoint: &LoadedCheckpoint, file: &str) -> Error {
    Error::CheckpointFile {
        checkpoint: checkpoint.url.clone(),
        file: file.into(),
        problem: "is missing".into(),
    }
}

fn checkpoint_file(checkpoint: &LoadedCheckpoint, file: &str) -> Result<SafetensorsFile> {
    let bytes = checkpoint
        .files
        .get(file)
        .ok_or_else(|| missing(checkpoint, file))?;
    SafetensorsFile::from_bytes(format!("{}/{file}", checkpoint.url), bytes.to_vec())
}

/// The EMA weights of a checkpoint as a model for sampling (`ditrun sample`).
pub fn model_from_checkpoint<B: Backend>(
    checkpoint: &LoadedCheckpoint,
    config: &TextDiTConfig,
    device: &B::Device,
) -> Result<TextConditionalDiT<B>> {
    let template = crate::backend::unseeded(|| config.init::<B>(device).map(with_path_ids))?;
    load_module(template, &checkpoint_file(checkpoint, EMA_FILE)?, "")
}

/// The job a checkpoint was trained with (stored by [`TrainingState::pack`]).
pub fn job_of_checkpoint(checkpoint: &LoadedCheckpoint) -> Result<JobSpec> {
    let yaml = checkpoint
        .state
        .extra
        .get(JOB_KEY)
        .and_then(|v| v.as_str())
        .ok_or_else(|| Error::CheckpointFile {
            checkpoint: checkpoint.url.clone(),
            file: crate::checkpoint::STATE_FILE.into(),
            problem: format!("has no `extra.{JOB_KEY}`: not written by `ditrun train`"),
        })?;
    JobSpec::from_yaml(
        yaml,
        &format!("{}/{}", checkpoint.url, crate::checkpoint::STATE_FILE),
    )
}

/// A checkpoint as one byte string (header length, JSON header, then the files back to
/// back): how rank 0 hands its starting state to the other ranks.
pub fn snapshot_to_bytes(checkpoint: &LoadedCheckpoint) -> Vec<u8> {
    let sizes: Vec<(&String, usize)> = checkpoint
        .files
        .iter()
        .map(|(name, bytes)| (name, bytes.len()))
        .collect();
    let header = serde_json::to_vec(&serde_json::json!({
        "url": checkpoint.url,
        "state": checkpoint.state,
        "files": sizes,
    }))
    .expect("a checkpoint header always serialises");
    let total: usize = 8 + header.len() + sizes.iter().map(|(_, n)| n).sum::<usize>();
    let mut out = Vec::with_capacity(total);
    out.extend_from_slice(&(header.len() as u64).to_le_bytes());
    out.extend_from_slice(&header);
    for bytes in checkpoint.files.values() {
        out.extend_from_slice(bytes);
    }
    out
}

/// The inverse of [`snapshot_to_bytes`].
pub fn snapshot_from_bytes(bytes: &[u8]) -> Result<LoadedCheckpoint> {
    #[derive(serde::Deserialize)]
    struct Header {
        url: String,
        state: crate::checkpoint::CheckpointState,
        files: Vec<(String, usize)>,
    }
    let bad = |why: &str| {
        Error::Training(format!(
            "the starting state received from rank 0 is damaged: {why}"
        ))
    };
    let header_len = bytes
        .get(..8)
        .ok_or_else(|| bad("shorter than its header"))?;
    let header_len = u64::from_le_bytes(header_len.try_into().expect("8 bytes")) as usize;
    let header_bytes = bytes
        .get(8..8 + header_len)
        .ok_or_else(|| bad("shorter than its header"))?;
    let header: Header = serde_json::from_slice(header_bytes).map_err(|e| bad(&e.to_string()))?;
    let mut offset = 8 + header_len;
    let mut files = std::collections::BTreeMap::new();
    for (name, len) in header.files {
        let data = bytes
            .get(offset..offset + len)
            .ok_or_else(|| bad(&format!("file {name} is cut short")))?;
        files.insert(name, Bytes::copy_from_slice(data));
        offset += len;
    }
    Ok(LoadedCheckpoint {
        url: header.url,
        state: header.state,
        files,
    })
}
