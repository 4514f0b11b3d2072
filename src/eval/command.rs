//! `ditrun eval --checkpoint C`: FID and CLIP score of a checkpoint's EMA weights, one
//! evaluation per guidance scale, on the backend the command picked; under mpirun every rank
//! draws its share of the samples on its own device (local rank i on GPU i, as in training)
//! and rank 0 reports.

use burn::prelude::*;

use super::evaluate::{clip_scorer, EvalPlan, EvalReport, EvalSetup, Evaluator};
use crate::dist::{Collective, World};
use crate::error::{Error, Result};
use crate::sample::TrainedCheckpoint;

/// What `ditrun eval` was asked; unset fields come from the checkpoint's job (`eval:`).
#[derive(Clone, Debug, Default)]
pub struct EvalRequest {
    pub samples: Option<usize>,
    pub cfg: Vec<f64>,
    pub steps: Option<usize>,
    pub seed: Option<u64>,
    pub batch_size: Option<usize>,
    pub inception_weights: Option<String>,
    pub clip_weights: Option<String>,
    /// The dataset whose statistics FID compares with; unset = the job's `data.shards`.
    pub shards: Option<String>,
    pub reference_samples: Option<usize>,
    /// Also FID per caption (else the job's `eval.per_caption_fid`).
    pub per_caption_fid: bool,
}

/// One report per guidance scale on rank 0; nothing on the other ranks.
pub fn eval_checkpoint<B: Backend>(
    trained: &TrainedCheckpoint,
    request: &EvalRequest,
    world: &World,
    collective: &dyn Collective,
) -> Result<Vec<EvalReport>> {
    let job = &trained.job;
    let spec = &job.eval;
    let inception = request
        .inception_weights
        .clone()
        .or_else(|| (!spec.inception_weights.is_empty()).then(|| spec.inception_weights.clone()))
        .ok_or_else(|| {
            Error::Config(
                "--inception-weights: FID needs the FID Inception's weights (pytorch-fid's \
                 pt_inception-2015-12-05 as safetensors; README, Evaluation), and the \
                 checkpoint's job sets no eval.inception_weights"
                    .into(),
            )
        })?;
    let device = crate::backend::rank_device::<B>(world, trained.backend()?.is_gpu())?;
    let clip_weights = request.clip_weights.as_deref().or(job.eval_clip_weights());
    let batch_size = request.batch_size.unwrap_or(spec.batch_size);
    let setup = EvalSetup {
        shards: request.shards.as_deref().unwrap_or(&job.data.shards),
        inception_weights: &inception,
        reference_samples: request.reference_samples.unwrap_or(spec.reference_samples),
        batch_size,
        per_caption_fid: request.per_caption_fid || spec.per_caption_fid,
    };
    let evaluator = Evaluator::<B>::open(
        &setup,
        clip_scorer::<B>(clip_weights, &device)?,
        collective,
        &device,
    )?;
    let (model, mut cache) = trained.ema_model_on::<B>(&device)?;
    let scales = if request.cfg.is_empty() {
        spec.cfg.clone()
    } else {
        request.cfg.clone()
    };
    let mut reports = Vec::new();
    for cfg in scales {
        let plan = EvalPlan {
            samples: request.samples.unwrap_or(spec.samples),
            cfg,
            steps: request.steps.unwrap_or(spec.steps),
            seed: request.seed.unwrap_or(spec.seed),
        };
        reports.extend(evaluator.evaluate(&model, &mut cache, &plan, collective)?);
    }
    Ok(reports)
}
