//! What a step does with a loss that is not finite or spikes: apply it, skip it, or stop.
//!
//! Invariants:
//! - The guard judges the loss averaged over all ranks (and all accumulation passes), which is
//!   bit-equal on every rank; the guard's state is a function of those losses alone. So every
//!   rank takes the same decision at the same step, and a NaN on one rank (which the gradient
//!   all-reduce has already spread to every rank's gradients) is skipped by all of them.
//! - A skipped step still counts as a step (its batch is consumed and the learning-rate
//!   schedule moves on) but changes neither the weights, the EMA nor the optimizer's moments.
//! - The window of recent losses that spikes are measured against is part of the checkpoint
//!   ([`LossGuard::record`]), so a resumed run takes the decisions the uninterrupted run would.

use std::collections::VecDeque;

pub use crate::config::OnNonFinite;
pub use crate::training_state::LossGuardRecord;

/// How many recent applied losses a spike is compared with, and how many it needs first.
pub const SPIKE_WINDOW: usize = 100;
pub const SPIKE_MIN_HISTORY: usize = 20;

#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    Apply,
    Skip { why: String, in_a_row: u32 },
    Stop { why: String },
}

/// The guard's settings (from `train:`) and its memory of recent losses.
#[derive(Clone, Debug)]
pub struct LossGuard {
    on_nonfinite: OnNonFinite,
    /// Skip a loss above this many times the median of the recent window; 0 = never.
    spike_factor: f64,
    max_skipped_in_a_row: u32,
    recent: VecDeque<f64>,
    skipped_in_a_row: u32,
    skipped_total: u64,
}

impl LossGuard {
    pub fn new(on_nonfinite: OnNonFinite, spike_factor: f64, max_skipped_in_a_row: u32) -> Self {
        Self {
            on_nonfinite,
            spike_factor,
            max_skipped_in_a_row,
            recent: VecDeque::with_capacity(SPIKE_WINDOW),
            skipped_in_a_row: 0,
            skipped_total: 0,
        }
    }

    pub fn restored(mut self, record: LossGuardRecord) -> Self {
        let keep = record.recent_losses.len().saturating_sub(SPIKE_WINDOW);
        self.recent = record.recent_losses.into_iter().skip(keep).collect();
        self.skipped_in_a_row = record.skipped_in_a_row;
        self.skipped_total = record.skipped_total;
        self
    }

    pub fn record(&self) -> LossGuardRecord {
        LossGuardRecord {
            recent_losses: self.recent.iter().copied().collect(),
            skipped_in_a_row: self.skipped_in_a_row,
            skipped_total: self.skipped_total,
        }
    }

    /// Steps skipped since the run (or its first checkpoint) began.
    pub fn skipped_total(&self) -> u64 {
        self.skipped_total
    }

    /// The decision for `loss`, the all-rank mean loss of a step.
    pub fn judge(&mut self, loss: f64) -> Verdict {
        let why = if !loss.is_finite() {
            if self.on_nonfinite == OnNonFinite::Stop {
                return Verdict::Stop {
                    why: format!("the loss became {loss} (train.on_nonfinite: stop)"),
                };
            }
            format!("the loss is {loss}")
        } else if let Some(median) = self.spike_median(loss) {
            format!(
                "the loss {loss:.4} is above {} × the median {median:.4} of the last {} steps \
                 (train.skip_loss_spikes)",
                self.spike_factor,
                self.recent.len()
            )
        } else {
            self.skipped_in_a_row = 0;
            if self.recent.len() == SPIKE_WINDOW {
                self.recent.pop_front();
            }
            self.recent.push_back(loss);
            return Verdict::Apply;
        };
        self.skipped_in_a_row += 1;
        self.skipped_total += 1;
        if self.skipped_in_a_row > self.max_skipped_in_a_row {
            return Verdict::Stop {
                why: format!(
                    "{why}, and {} steps in a row were skipped (train.max_skipped: {})",
                    self.skipped_in_a_row, self.max_skipped_in_a_row
                ),
            };
        }
        Verdict::Skip {
            why,
            in_a_row: self.skipped_in_a_row,
        }
    }

    /// The median `loss` spikes above, if spike skipping is on, the window is full enough and
    /// it does.
    fn spike_median(&self, loss: f64) -> Option<f64> {
        if self.spike_factor <= 0.0 || self.recent.len() < SPIKE_MIN_HISTORY {
            return None;
        }
        let mut sorted: Vec<f64> = self.recent.iter().copied().collect();
        sorted.sort_by(f64::total_cmp);
        let median = sorted[sorted.len() / 2];
        (loss > self.spike_factor * median).then_some(median)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_is_the_default_for_a_non_finite_loss() {
        let mut guard = LossGuard::new(OnNonFinite::default(), 0.0, 5);
        assert_eq!(guard.judge(0.5), Verdict::Apply);
        assert!(matches!(guard.judge(f64::NAN), Verdict::Stop { .. }));
    }

    #[test]
    fn skips_count_in_a_row_and_stop_past_the_limit() {
        let mut guard = LossGuard::new(OnNonFinite::Skip, 0.0, 2);
        assert!(matches!(
            guard.judge(f64::NAN),
            Verdict::Skip { in_a_row: 1, .. }
        ));
        assert_eq!(
            guard.judge(0.3),
            Verdict::Apply,
            "a good step resets the count"
        );
        assert!(matches!(
            guard.judge(f64::INFINITY),
            Verdict::Skip { in_a_row: 1, .. }
        ));
        assert!(matches!(
            guard.judge(f64::NAN),
            Verdict::Skip { in_a_row: 2, .. }
        ));
        let Verdict::Stop { why } = guard.judge(f64::NAN) else {
            panic!("the third skip in a row stops")
        };
        assert!(why.contains("train.max_skipped: 2"), "{why}");
        assert_eq!(guard.skipped_total(), 4);
    }

    #[test]
    fn a_spike_is_skipped_only_once_the_window_has_a_median() {
        let mut guard = LossGuard::new(OnNonFinite::Stop, 3.0, 10);
        assert_eq!(guard.judge(100.0), Verdict::Apply, "no history yet");
        for _ in 0..SPIKE_MIN_HISTORY {
            assert_eq!(guard.judge(1.0), Verdict::Apply);
        }
        assert_eq!(guard.judge(2.9), Verdict::Apply);
        assert!(matches!(guard.judge(3.5), Verdict::Skip { .. }));
        // Skipped losses stay out of the window: the median does not creep up.
        assert_eq!(guard.record().recent_losses.len(), SPIKE_MIN_HISTORY + 2);
    }

    #[test]
    fn a_restored_guard_decides_as_the_one_it_was_saved_from() {
        let mut original = LossGuard::new(OnNonFinite::Skip, 2.0, 3);
        for i in 0..(SPIKE_WINDOW + 30) {
            original.judge(1.0 + (i % 7) as f64 * 0.01);
        }
        original.judge(f64::NAN);
        let mut restored = LossGuard::new(OnNonFinite::Skip, 2.0, 3).restored(original.record());
        for loss in [1.02, 5.0, f64::NAN, 1.01, 2.5, 1.0] {
            assert_eq!(restored.judge(loss), original.judge(loss), "loss {loss}");
        }
        assert_eq!(restored.record(), original.record());
    }
}
