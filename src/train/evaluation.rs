//! The evaluation component (`eval:` in the job): every `every_steps` and at the run's end, FID
//! (one per guidance scale in `eval.cfg`) and the CLIP score of the EMA weights, on every rank
//! (each draws its share of the samples), logged by rank 0 to the console and TensorBoard
//! (`eval/fid`, `eval/fid_cfg_<w>`, `eval/clip_score`, `eval/secs`, and with
//! `per_caption_fid` `eval/fid_caption/<caption>` of the first scale) and handed to the
//! checkpointer, which records them in the checkpoint's `state.json`.
//!
//! Invariant: every rank runs every evaluation (they hold collectives); the time they take is
//! outside the steps' timings, so an evaluation never makes a rank look slow.

use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;

use super::component::{due, AfterStep, Component};
use crate::config::{EvalSpec, JobSpec};
use crate::dist::Collective;
use crate::error::Result;
use crate::eval::{clip_scorer, EvalPlan, EvalReport, EvalSetup, Evaluator};

pub struct Evaluation<B: Backend> {
    spec: EvalSpec,
    evaluator: Evaluator<B>,
}

impl<B: Backend> Evaluation<B> {
    /// The job's evaluator when `eval` is on: loads the networks and the dataset's statistics
    /// (computing them, over every rank, the first time).
    pub fn open(
        job: &JobSpec,
        collective: &dyn Collective,
        device: &B::Device,
    ) -> Result<Option<Self>> {
        let spec = &job.eval;
        if spec.is_off() {
            return Ok(None);
        }
        let setup = EvalSetup {
            shards: &job.data.shards,
            inception_weights: &spec.inception_weights,
            reference_samples: spec.reference_samples,
            batch_size: spec.batch_size,
            per_caption_fid: spec.per_caption_fid,
        };
        let evaluator = Evaluator::open(
            &setup,
            clip_scorer::<B>(job.eval_clip_weights(), device)?,
            collective,
            device,
        )?;
        Ok(Some(Self {
            spec: spec.clone(),
            evaluator,
        }))
    }

    fn plans(&self) -> impl Iterator<Item = EvalPlan> + '_ {
        self.spec.cfg.iter().map(|&cfg| EvalPlan {
            samples: self.spec.samples,
            cfg,
            steps: self.spec.steps,
            seed: self.spec.seed,
        })
    }
}

impl<AB: AutodiffBackend> Component<AB> for Evaluation<AB::InnerBackend> {
    fn after_step(&mut self, at: &mut AfterStep<'_, '_, AB>) -> Result<()> {
        let step = at.stats.step;
        // A run stopped by a signal has a grace period to save in: no evaluation then.
        if !due(step, self.spec.every_steps, self.spec.at_end, at.end_of_run)
            || at.stop_signal.is_some()
        {
            return Ok(());
        }
        let collective = at.trainer.collective;
        let primary = at.trainer.world.is_primary();
        let mut reports = Vec::new();
        let plans: Vec<EvalPlan> = self.plans().collect();
        for plan in &plans {
            let (ema, cache) = at.trainer.ema_and_cache();
            if let Some(report) = self.evaluator.evaluate(ema, cache, plan, collective)? {
                reports.push(report);
            }
        }
        if !primary {
            return Ok(());
        }
        for (i, report) in reports.iter().enumerate() {
            tracing::info!(
                step,
                cfg = report.cfg,
                samples = report.samples,
                fid = report.fid,
                clip_score = report.clip_score,
                secs = report.secs,
                "evaluated"
            );
            if let Some(writer) = at.events.as_deref_mut() {
                if i == 0 {
                    writer.scalar("eval/fid", step, report.fid)?;
                    if let Some(score) = report.clip_score {
                        writer.scalar("eval/clip_score", step, score)?;
                    }
                    for (caption, fid) in &report.fid_per_caption {
                        writer.scalar(&format!("eval/fid_caption/{caption}"), step, *fid)?;
                    }
                }
                if reports.len() > 1 {
                    let tag = format!("eval/fid_cfg_{}", report.cfg);
                    writer.scalar(&tag, step, report.fid)?;
                }
                writer.scalar("eval/secs", step, report.secs)?;
            }
        }
        at.evaluated = Some(reports);
        Ok(())
    }
}

/// Reports as a checkpoint's `state.json` records them.
pub fn reports_json(reports: &[EvalReport]) -> serde_json::Value {
    serde_json::to_value(reports).expect("numbers and strings serialise")
}
