//! The sample-grid component (`sample:` in the job): every `every_steps` and at the run's end,
//! a grid of the prompts drawn from the EMA weights (rows = prompts), and optionally a CFG
//! sweep, to TensorBoard and, when `sample.dir` is set, as PNG files there.

use burn::tensor::backend::AutodiffBackend;

use super::component::{due, AfterStep, Component, RunSummary};
use crate::config::{JobSpec, SampleSpec};
use crate::error::Result;
use crate::flow::{cfg_sweep, generate, SampleOptions};
use crate::metrics::{image_grid, EventWriter};
use crate::storage::Location;
use crate::viz::Canvas;

pub struct SampleGrids {
    spec: SampleSpec,
    image_size: usize,
    channels: usize,
    last_grid: Option<String>,
}

impl SampleGrids {
    /// The job's sampler when `sample` is enabled (rank 0 only: the caller decides).
    pub fn new(job: &JobSpec) -> Option<Self> {
        job.sample.enabled().then(|| Self {
            spec: job.sample.clone(),
            image_size: job.model.image_size,
            channels: job.model.channels,
            last_grid: None,
        })
    }

    fn options(&self) -> SampleOptions {
        SampleOptions {
            cfg: self.spec.cfg,
            steps: self.spec.steps,
            sampler: self.spec.sampler,
            per_prompt: self.spec.per_prompt,
            seed: self.spec.seed,
        }
    }
}

/// A grid of RGB or grey pixels with its size.
struct Grid {
    pixels: Vec<u8>,
    height: usize,
    width: usize,
}

impl<AB: AutodiffBackend> Component<AB> for SampleGrids {
    fn after_step(&mut self, at: &mut AfterStep<'_, '_, AB>) -> Result<()> {
        let step = at.stats.step;
        // A run stopped by a signal has a grace period to save in: no grids then.
        if !due(step, self.spec.every_steps, self.spec.at_end, at.end_of_run)
            || at.stop_signal.is_some()
        {
            return Ok(());
        }
        let options = self.options();
        let (ema, cache) = at.trainer.ema_and_cache();
        let images = generate(ema, cache, &self.spec.prompts, &options);
        let pixels: Vec<Vec<u8>> = images.into_iter().map(|i| i.pixels).collect();
        let (size, channels) = (self.image_size, self.channels);
        let (pixels, height, width) = image_grid(&pixels, size, size, channels, options.per_prompt);
        let grid = Grid {
            pixels,
            height,
            width,
        };
        let sweep = self.spec.cfg_sweep.as_ref().map(|scales| {
            let columns = cfg_sweep(ema, cache, &self.spec.prompts, scales, &options);
            crate::viz::render_sweep(&self.spec.prompts, scales, &columns, size, channels)
        });
        if let Some(writer) = at.events.as_deref_mut() {
            self.to_tensorboard(writer, step, &grid, sweep.as_ref())?;
        }
        if let Some(url) = self.to_files(step, &grid, sweep.as_ref())? {
            self.last_grid = Some(url);
        }
        Ok(())
    }

    fn finish(&mut self, summary: &mut RunSummary) -> Result<()> {
        summary.sample_grid = self.last_grid.clone();
        Ok(())
    }
}

impl SampleGrids {
    fn to_tensorboard(
        &self,
        writer: &mut EventWriter,
        step: u64,
        grid: &Grid,
        sweep: Option<&Canvas>,
    ) -> Result<()> {
        let spec = &self.spec;
        let description = format!(
            "rows: {}; cfg {}, {} {:?} steps, EMA weights",
            spec.prompts.join(" | "),
            spec.cfg,
            spec.steps,
            spec.sampler
        );
        writer.image_with_description(
            "samples",
            step,
            grid.height,
            grid.width,
            self.channels,
            &grid.pixels,
            &description,
        )?;
        if let (Some(canvas), Some(scales)) = (sweep, &spec.cfg_sweep) {
            let scales: Vec<String> = scales.iter().map(|s| s.to_string()).collect();
            let description = format!(
                "rows: {}; columns: cfg {}; {} {:?} steps, seed {}, EMA weights",
                spec.prompts.join(" | "),
                scales.join(", "),
                spec.steps,
                spec.sampler,
                spec.seed
            );
            writer.image_with_description(
                "samples/cfg_sweep",
                step,
                canvas.height,
                canvas.width,
                3,
                &canvas.pixels,
                &description,
            )?;
        }
        writer.flush()
    }

    /// `step-000123.png` (and the sweep beside it) under `sample.dir`; the grid's URL.
    fn to_files(&self, step: u64, grid: &Grid, sweep: Option<&Canvas>) -> Result<Option<String>> {
        let Some(dir) = &self.spec.dir else {
            return Ok(None);
        };
        let dir = Location::parse(dir)?;
        let grid_file = dir.join(&format!("step-{step:09}.png"))?;
        grid_file.put(crate::metrics::encode_png(
            &grid.pixels,
            grid.height,
            grid.width,
            self.channels,
        )?)?;
        tracing::info!(url = grid_file.url(), prompts = %self.spec.prompts.join(" | "), "sample grid written");
        if let Some(canvas) = sweep {
            let sweep_file = dir.join(&format!("cfg-sweep-step-{step:09}.png"))?;
            sweep_file.put(canvas.to_png()?)?;
            tracing::info!(url = sweep_file.url(), "CFG sweep written");
        }
        Ok(Some(grid_file.url().to_string()))
    }
}
