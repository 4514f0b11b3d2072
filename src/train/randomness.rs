//! The step's randomness — caption dropout, flow times and noise — drawn on a thread of its
//! own one step ahead, so that the host's normal draws (0.8 M at batch 256 on 32×32×3) are
//! not in the step's critical path.
//!
//! Invariants:
//! - Every sample's draws are a pure function of (seed, step, the sample's index in the
//!   global batch): a resumed run draws exactly what the uninterrupted run drew, and a sample
//!   gets the same draws whichever rank and accumulation pass it lands in. Drawing ahead
//!   changes when they are computed, never what they are.
//! - Draws arrive in (step, pass) order; a consumer that asks out of order gets them drawn
//!   inline instead, with the same values.

use std::ops::Range;
use std::thread::JoinHandle;

use crossbeam_channel::{bounded, Receiver};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Caption-dropout flags, times and noise of one pass's samples (each `sample_len` values).
#[derive(Clone, Debug, PartialEq)]
pub struct PassRandomness {
    pub dropped: Vec<bool>,
    pub times: Vec<f32>,
    pub noise: Vec<f32>,
}

/// Where one rank's samples sit in each step's global batch.
#[derive(Clone, Copy, Debug)]
pub struct RandomnessPlan {
    pub seed: u64,
    pub drop_prob: f64,
    /// Values of one sample's noise (channels × height × width).
    pub sample_len: usize,
    pub micro_batch: usize,
    pub accumulation: usize,
    pub rank: usize,
    pub world_size: usize,
}

impl RandomnessPlan {
    /// The job's plan for `world`'s rank with this batch split.
    pub fn for_job(
        job: &crate::config::JobSpec,
        micro_batch: usize,
        accumulation: usize,
        world: &crate::dist::World,
    ) -> Self {
        Self {
            seed: job.train.seed,
            drop_prob: job.train.text_drop_prob,
            sample_len: job.model.channels * job.model.image_size * job.model.image_size,
            micro_batch,
            accumulation,
            rank: world.rank,
            world_size: world.world_size,
        }
    }

    /// Global index of this rank's first sample in accumulation pass `pass`.
    fn first_index(&self, pass: usize) -> usize {
        pass * self.micro_batch * self.world_size + self.rank * self.micro_batch
    }

    pub fn draw(&self, step: u64, pass: usize, count: usize) -> PassRandomness {
        draw_randomness(
            self.seed,
            step,
            self.first_index(pass),
            count,
            self.sample_len,
            self.drop_prob,
        )
    }
}

/// Draws `plan`'s randomness for the passes of `steps`, a bounded number ahead of the trainer.
pub struct RandomnessAhead {
    plan: RandomnessPlan,
    ready: Option<Receiver<(u64, usize, PassRandomness)>>,
    drawer: Option<JoinHandle<()>>,
}

impl RandomnessAhead {
    /// Passes drawn ahead of the one being trained: enough to hide a draw behind a step.
    const AHEAD: usize = 2;

    pub fn start(plan: RandomnessPlan, steps: Range<u64>) -> Self {
        let (sender, ready) = bounded(Self::AHEAD);
        let drawer = std::thread::Builder::new()
            .name("ditrun-noise".into())
            .spawn(move || {
                for step in steps {
                    for pass in 0..plan.accumulation {
                        let drawn = plan.draw(step, pass, plan.micro_batch);
                        // The trainer stopped early (an error, a planned stop): nothing waits.
                        if sender.send((step, pass, drawn)).is_err() {
                            return;
                        }
                    }
                }
            })
            .ok();
        let ready = drawer.is_some().then_some(ready);
        Self {
            plan,
            ready,
            drawer,
        }
    }

    /// The draws of `count` samples of (`step`, `pass`).
    pub fn take(&mut self, step: u64, pass: usize, count: usize) -> PassRandomness {
        if let Some(ready) = &self.ready {
            match ready.recv() {
                Ok((drawn_step, drawn_pass, drawn))
                    if drawn_step == step && drawn_pass == pass && drawn.times.len() == count =>
                {
                    return drawn;
                }
                // Out of step with the drawer: from here on draw inline.
                _ => self.stop(),
            }
        }
        self.plan.draw(step, pass, count)
    }

    fn stop(&mut self) {
        // Dropping the receiver ends the drawer at its next send.
        self.ready = None;
        if let Some(drawer) = self.drawer.take() {
            let _ = drawer.join();
        }
    }
}

impl Drop for RandomnessAhead {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The generator of one sample's draws: see the module's invariants.
fn sample_rng(seed: u64, step: u64, index: usize) -> StdRng {
    let step_key = seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(17);
    StdRng::seed_from_u64(step_key ^ (index as u64 + 1).wrapping_mul(0xD1B5_4A32_D192_ED03))
}

/// The caption-dropout flags, times and noise of `count` samples starting at global index
/// `first`, each `sample_len` values.
fn draw_randomness(
    seed: u64,
    step: u64,
    first: usize,
    count: usize,
    sample_len: usize,
    drop_prob: f64,
) -> PassRandomness {
    let mut dropped = Vec::with_capacity(count);
    let mut times = Vec::with_capacity(count);
    let mut noise = Vec::with_capacity(count * sample_len);
    for index in first..first + count {
        let mut rng = sample_rng(seed, step, index);
        dropped.push(rng.random::<f64>() < drop_prob);
        times.push(rng.random::<f32>());
        noise.extend((0..sample_len).map(|_| rng.sample::<f32, _>(rand_distr::StandardNormal)));
    }
    PassRandomness {
        dropped,
        times,
        noise,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> RandomnessPlan {
        RandomnessPlan {
            seed: 7,
            drop_prob: 0.3,
            sample_len: 12,
            micro_batch: 3,
            accumulation: 2,
            rank: 1,
            world_size: 2,
        }
    }

    #[test]
    fn drawn_ahead_equals_drawn_inline() {
        let plan = plan();
        let mut ahead = RandomnessAhead::start(plan, 5..9);
        for step in 5..9 {
            for pass in 0..2 {
                let drawn = ahead.take(step, pass, 3);
                assert_eq!(drawn, plan.draw(step, pass, 3), "step {step} pass {pass}");
                assert_eq!(drawn.noise.len(), 36);
            }
        }
    }

    #[test]
    fn a_sample_draws_the_same_on_any_rank_and_pass() {
        // Global index 9 is rank 1's first sample of pass 1 with 2 ranks × 3, and rank 0's
        // last sample of pass 0 with 1 rank × 10.
        let two_ranks = plan().draw(4, 1, 3);
        let one_rank = RandomnessPlan {
            micro_batch: 10,
            accumulation: 1,
            rank: 0,
            world_size: 1,
            ..plan()
        }
        .draw(4, 0, 10);
        assert_eq!(two_ranks.noise[..12], one_rank.noise[9 * 12..]);
        assert_eq!(two_ranks.times[0], one_rank.times[9]);
        assert_ne!(
            two_ranks.noise[..12],
            plan().draw(5, 1, 3).noise[..12],
            "another step draws anew"
        );
    }

    #[test]
    fn asking_out_of_order_falls_back_to_inline_draws() {
        let plan = plan();
        let mut ahead = RandomnessAhead::start(plan, 0..3);
        assert_eq!(ahead.take(2, 1, 3), plan.draw(2, 1, 3));
        assert_eq!(ahead.take(0, 0, 3), plan.draw(0, 0, 3));
    }
}
