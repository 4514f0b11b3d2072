//! The stop policy: after every step, the ranks agree whether any of them was asked to stop
//! (SIGTERM, SIGINT, SIGHUP: `dist::signals`), and if so every rank stops after that same
//! step, with a checkpoint of it (the checkpointer sees `stopping`).
//!
//! Invariants: the decision is the same on every rank (each rank's signal is gathered, the
//! first in rank order wins), so no rank is left waiting in a collective; it runs first among
//! the components, so the others act on it in the same step.

use burn::tensor::backend::AutodiffBackend;

use super::component::{AfterStep, Component};
use crate::dist::signals::{self, StopSignal};
use crate::error::Result;

pub struct Preemption;

impl<AB: AutodiffBackend> Component<AB> for Preemption {
    fn after_step(&mut self, at: &mut AfterStep<'_, '_, AB>) -> Result<()> {
        let mine = signals::received().map_or(0, |signal| signal.0);
        let collective = at.trainer.collective;
        let agreed = if collective.world_size() > 1 {
            let all =
                collective.all_gather(&[mine as u8], "stop requests (signals) of every rank")?;
            all.iter()
                .map(|bytes| bytes[0] as i32)
                .find(|&signal| signal != 0)
        } else {
            (mine != 0).then_some(mine)
        };
        if let Some(signal) = agreed.map(StopSignal) {
            if !at.stopping && at.trainer.world.is_primary() {
                tracing::warn!(
                    step = at.stats.step,
                    signal = signal.name(),
                    "stopping after this step on every rank"
                );
            }
            at.stopping = true;
            at.stop_signal = Some(signal);
        }
        Ok(())
    }
}
