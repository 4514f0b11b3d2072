//! Naming a slow rank: every `logging.every_steps` steps the ranks gather how long each was
//! busy (its steps' time outside the gradient all-reduce, data waits included) and how long it
//! waited for data, and rank 0 logs the slowest rank against the median, to the console and
//! TensorBoard (`ranks/`). A rank that computes slowly shows a long busy time while the
//! others wait in the all-reduce, so it is named from rank 0's log alone.

use burn::tensor::backend::AutodiffBackend;

use super::component::{due, AfterStep, Component};
use crate::error::Result;

pub struct RankTimes {
    every_steps: u64,
    busy_secs: f64,
    data_wait_secs: f64,
}

impl RankTimes {
    /// `None` on one rank, or when logging is off.
    pub fn new(every_steps: u64, world_size: usize) -> Option<Self> {
        (world_size > 1 && every_steps > 0).then_some(Self {
            every_steps,
            busy_secs: 0.0,
            data_wait_secs: 0.0,
        })
    }
}

/// Each rank's (busy, data wait) seconds over the window, in rank order.
fn decode(all: &[Vec<u8>]) -> Vec<(f64, f64)> {
    all.iter()
        .map(|bytes| {
            let value =
                |at: usize| f64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
            (value(0), value(8))
        })
        .collect()
}

/// The lower median: with two ranks, the faster one's time, so the slower stands out.
fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[(values.len() - 1) / 2]
}

impl<AB: AutodiffBackend> Component<AB> for RankTimes {
    fn after_step(&mut self, at: &mut AfterStep<'_, '_, AB>) -> Result<()> {
        let stats = at.stats;
        self.busy_secs += stats.step_secs - stats.allreduce_secs;
        self.data_wait_secs += stats.data_wait_secs;
        if !due(stats.step, self.every_steps, true, at.end_of_run) {
            return Ok(());
        }
        let mine = [
            self.busy_secs.to_le_bytes(),
            self.data_wait_secs.to_le_bytes(),
        ]
        .concat();
        (self.busy_secs, self.data_wait_secs) = (0.0, 0.0);
        let all = decode(
            &at.trainer
                .collective
                .all_gather(&mine, "step times of every rank")?,
        );
        if !at.trainer.world.is_primary() {
            return Ok(());
        }
        let typical = median(all.iter().map(|(busy, _)| *busy).collect());
        let (slowest, (busy, data_wait)) = all
            .iter()
            .copied()
            .enumerate()
            .max_by(|a, b| a.1 .0.total_cmp(&b.1 .0))
            .expect("at least two ranks");
        let ratio = if typical > 0.0 { busy / typical } else { 1.0 };
        tracing::info!(
            "step {}: rank {slowest} is the slowest: busy {busy:.3} s over the last {} steps, {ratio:.2}× the \
             median {typical:.3} s (its data wait {data_wait:.3} s)",
            stats.step,
            self.every_steps
        );
        if let Some(writer) = at.events.as_deref_mut() {
            writer.scalar("ranks/slowest_rank", stats.step, slowest as f64)?;
            writer.scalar("ranks/slowest_busy_secs", stats.step, busy)?;
            writer.scalar("ranks/median_busy_secs", stats.step, typical)?;
            writer.scalar("ranks/slowest_over_median", stats.step, ratio)?;
        }
        Ok(())
    }
}
