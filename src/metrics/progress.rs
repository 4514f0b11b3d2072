//! Console output of a training run: a live progress bar on a terminal, plain log lines every
//! N steps otherwise (CI logs and `kubectl logs` must not fill with bar redraws).

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// What one training step reports to the console.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StepStats {
    pub step: u64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub images_per_sec: f64,
    pub step_secs: f64,
    /// Time this step waited for its batch from the data loader.
    pub data_wait_secs: f64,
    /// Time this step spent averaging gradients over ranks (0 on one rank).
    pub allreduce_secs: f64,
    /// Why this step was skipped on every rank (`train.on_nonfinite`, `train.skip_loss_spikes`).
    pub skipped: Option<String>,
    /// Steps skipped so far in this run (and its checkpoints).
    pub skipped_steps: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProgressMode {
    /// An indicatif bar on stderr, with a log line every N steps printed above it.
    Bar,
    /// Only `tracing::info!` lines every N steps.
    Lines,
}

impl ProgressMode {
    /// A bar when stderr is a terminal, lines otherwise.
    pub fn detect() -> Self {
        if std::io::stderr().is_terminal() {
            ProgressMode::Bar
        } else {
            ProgressMode::Lines
        }
    }
}

pub struct Progress {
    bar: Option<ProgressBar>,
    total_steps: u64,
    log_every: u64,
    last_logged: Option<u64>,
}

impl Progress {
    /// Progress of a run of `total_steps` that starts after `start_step` (non-zero when
    /// resumed), logging every `log_every` steps (0: never, except the last step).
    pub fn new(total_steps: u64, start_step: u64, log_every: u64) -> Self {
        Self::with_mode(ProgressMode::detect(), total_steps, start_step, log_every)
    }

    pub fn with_mode(
        mode: ProgressMode,
        total_steps: u64,
        start_step: u64,
        log_every: u64,
    ) -> Self {
        let target = match mode {
            ProgressMode::Bar => Some(ProgressDrawTarget::stderr()),
            ProgressMode::Lines => None,
        };
        Self::build(target, total_steps, start_step, log_every)
    }

    fn build(
        target: Option<ProgressDrawTarget>,
        total_steps: u64,
        start_step: u64,
        log_every: u64,
    ) -> Self {
        let bar = target.map(|target| {
            let bar = ProgressBar::with_draw_target(Some(total_steps), target);
            // The template is a constant, so a parse failure is a bug caught by the tests.
            let style = ProgressStyle::with_template(
                "{elapsed_precise} [{wide_bar}] {pos}/{len} steps, ETA {eta} | {msg}",
            )
            .expect("progress template")
            .progress_chars("=> ");
            bar.set_style(style);
            bar.set_position(start_step);
            bar
        });
        Progress {
            bar,
            total_steps,
            log_every,
            last_logged: None,
        }
    }

    /// Reports a finished step; returns whether a log line was written for it.
    pub fn update(&mut self, stats: &StepStats) -> bool {
        if let Some(bar) = &self.bar {
            bar.set_position(stats.step);
            bar.set_message(format!(
                "loss {:.4}, {:.1} images/s",
                stats.loss, stats.images_per_sec
            ));
        }
        if !self.is_log_step(stats.step) {
            return false;
        }
        self.last_logged = Some(stats.step);
        let line = format_stats(stats, self.total_steps);
        match &self.bar {
            Some(bar) => bar.suspend(|| tracing::info!("{line}")),
            None => tracing::info!("{line}"),
        }
        true
    }

    /// A message that must not garble the bar (checkpoint saved, samples written, ...).
    pub fn message(&self, text: &str) {
        match &self.bar {
            Some(bar) => bar.suspend(|| tracing::info!("{text}")),
            None => tracing::info!("{text}"),
        }
    }

    /// Leaves the bar at its final state on the terminal.
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish();
        }
    }

    pub fn position(&self) -> Option<u64> {
        self.bar.as_ref().map(ProgressBar::position)
    }

    fn is_log_step(&self, step: u64) -> bool {
        if self.last_logged == Some(step) {
            return false;
        }
        let periodic = self.log_every > 0 && step.is_multiple_of(self.log_every);
        periodic || step == self.total_steps
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(bar) = &self.bar {
            if !bar.is_finished() {
                bar.abandon();
            }
        }
    }
}

/// One log line: every number a reader needs to judge a run's health from plain logs.
pub fn format_stats(stats: &StepStats, total_steps: u64) -> String {
    let allreduce = if stats.allreduce_secs > 0.0 {
        format!(", all-reduce {:.3} s", stats.allreduce_secs)
    } else {
        String::new()
    };
    format!(
        "step {}/{}: loss {:.5}, lr {:.3e}, grad norm {:.4}, {:.1} images/s, step {:.3} s, data wait {:.3} s{}",
        stats.step,
        total_steps,
        stats.loss,
        stats.lr,
        stats.grad_norm,
        stats.images_per_sec,
        stats.step_secs,
        stats.data_wait_secs,
        allreduce
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn capture_logs(run: impl FnOnce()) -> String {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        tracing::subscriber::with_default(subscriber, run);
        let bytes = captured.0.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    fn stats(step: u64) -> StepStats {
        StepStats {
            step,
            loss: 0.5 / step as f64,
            lr: 1e-4,
            grad_norm: 1.25,
            images_per_sec: 640.0,
            step_secs: 0.1,
            data_wait_secs: 0.002,
            allreduce_secs: 0.0,
            ..Default::default()
        }
    }

    #[test]
    fn lines_mode_logs_every_n_steps_and_the_last() {
        let mut logged = Vec::new();
        let output = capture_logs(|| {
            let mut progress = Progress::with_mode(ProgressMode::Lines, 10, 0, 4);
            for step in 1..=10 {
                if progress.update(&stats(step)) {
                    logged.push(step);
                }
            }
        });
        assert_eq!(logged, vec![4, 8, 10]);
        assert_eq!(output.lines().count(), 3, "{output}");
        assert!(
            output
                .contains("step 8/10: loss 0.06250, lr 1.000e-4, grad norm 1.2500, 640.0 images/s"),
            "{output}"
        );
        assert!(output.contains("data wait 0.002 s"), "{output}");
    }

    #[test]
    fn zero_interval_logs_only_the_last_step() {
        let mut progress = Progress::with_mode(ProgressMode::Lines, 3, 0, 0);
        let logged: Vec<bool> = (1..=3).map(|step| progress.update(&stats(step))).collect();
        assert_eq!(logged, vec![false, false, true]);
        assert_eq!(progress.position(), None);
    }

    #[test]
    fn bar_follows_steps_from_a_resumed_start() {
        let mut progress = Progress::build(Some(ProgressDrawTarget::hidden()), 100, 40, 50);
        assert_eq!(progress.position(), Some(40));
        assert!(!progress.update(&stats(41)));
        assert_eq!(progress.position(), Some(41));
        assert!(progress.update(&stats(50)));
        let bar = progress.bar.as_ref().unwrap();
        assert_eq!(bar.message(), "loss 0.0100, 640.0 images/s");
        progress.finish();
    }
}
