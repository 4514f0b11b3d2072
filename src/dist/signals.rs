//! The signals that ask a job to stop — SIGTERM (Kubernetes eviction, preemption, `kill`),
//! SIGINT (Ctrl-C) and SIGHUP (a worker's sshd or terminal going away) — turned into a flag
//! the training loop reads after each step.
//!
//! Invariants:
//! - The first signal only sets the flag: the run stops at the next step boundary that every
//!   rank agrees on (`train::Preemption`), writes its final checkpoint and exits with 128 + the
//!   signal's number (143 for SIGTERM, 130 for SIGINT).
//! - A second signal, or the grace deadline after the first, ends the process at once with
//!   that code. A checkpoint being written then has no `COMMIT` file, so the previous one stays
//!   the latest.
//! - SIGUSR1 and SIGUSR2 stand for SIGTERM and SIGINT: mpirun forwards only those two to every
//!   rank, on every node, while its own SIGTERM kills the ranks a second later. `ditrun launch`
//!   (and a user of plain mpirun) sends them to mpirun to stop a job gracefully.
//! - The handler only stores to atomics and calls `_exit`, both async-signal-safe.

use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Once;
use std::time::{Duration, Instant};

/// Every signal that asks a rank to stop.
const STOP_SIGNALS: [libc::c_int; 5] = [
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGHUP,
    libc::SIGUSR1,
    libc::SIGUSR2,
];

/// The first stopping signal received (0: none yet).
static RECEIVED: AtomicI32 = AtomicI32::new(0);

/// A stopping signal, by name, with the exit code it leads to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StopSignal(pub i32);

impl StopSignal {
    pub fn name(self) -> &'static str {
        match self.0 {
            libc::SIGTERM => "SIGTERM",
            libc::SIGINT => "SIGINT",
            libc::SIGHUP => "SIGHUP",
            _ => "signal",
        }
    }

    /// 128 + the signal's number, as a shell reports a process killed by it.
    pub fn exit_code(self) -> i32 {
        128 + self.0
    }
}

/// The stopping signal received so far, if any.
pub fn received() -> Option<StopSignal> {
    match RECEIVED.load(Ordering::SeqCst) {
        0 => None,
        signal => Some(StopSignal(signal)),
    }
}

/// The stop a signal asks for: the forwarded SIGUSR1/SIGUSR2 count as SIGTERM/SIGINT.
pub fn stop_meant_by(signal: libc::c_int) -> libc::c_int {
    match signal {
        libc::SIGUSR1 => libc::SIGTERM,
        libc::SIGUSR2 => libc::SIGINT,
        other => other,
    }
}

/// The signal `ditrun launch` sends mpirun (which forwards it to every rank) for `stop`.
pub fn forwarded_as(stop: libc::c_int) -> libc::c_int {
    match stop {
        libc::SIGINT => libc::SIGUSR2,
        _ => libc::SIGUSR1,
    }
}

extern "C" fn on_signal(signal: libc::c_int) {
    let signal = stop_meant_by(signal);
    if RECEIVED
        .compare_exchange(0, signal, Ordering::SeqCst, Ordering::SeqCst)
        .is_err()
    {
        // The second signal: the user (or the kubelet) does not want to wait.
        // SAFETY: `_exit` is async-signal-safe.
        unsafe { libc::_exit(128 + RECEIVED.load(Ordering::SeqCst)) };
    }
}

/// Installs the handlers for SIGTERM, SIGINT, SIGHUP, SIGUSR1 and SIGUSR2 (once per process), and a watchdog
/// that ends the process `grace` after the first signal if the run has not ended by then.
pub fn install(grace: Duration) {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        for signal in STOP_SIGNALS {
            // SAFETY: the handler is async-signal-safe (atomics and `_exit` only).
            unsafe {
                libc::signal(signal, on_signal as *const () as libc::sighandler_t);
            }
        }
        let spawned = std::thread::Builder::new()
            .name("ditrun-stop-deadline".into())
            .spawn(move || watch_deadline(grace));
        if let Err(error) = spawned {
            tracing::warn!(%error, "no grace-deadline watchdog: a stuck stop waits for SIGKILL");
        }
    });
}

fn watch_deadline(grace: Duration) {
    let signal = loop {
        if let Some(signal) = received() {
            break signal;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    tracing::warn!(
        signal = signal.name(),
        grace_secs = grace.as_secs_f64(),
        "asked to stop: finishing the current step, then a final checkpoint"
    );
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let message = format!(
        "{} received {:.0} s ago and the run has not stopped yet (train.stop_grace_secs): \
         exiting now; the last committed checkpoint stays the latest",
        signal.name(),
        grace.as_secs_f64()
    );
    tracing::error!("{message}");
    crate::error::eprint_whole_line(&format!("error: {message}"));
    std::process::exit(signal.exit_code());
}

/// Stop requests a launcher has received and not yet passed on, and the first one's signal.
static LAUNCHER_REQUESTS: AtomicI32 = AtomicI32::new(0);
static LAUNCHER_FIRST: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_launcher_signal(signal: libc::c_int) {
    let _ = LAUNCHER_FIRST.compare_exchange(0, signal, Ordering::SeqCst, Ordering::SeqCst);
    LAUNCHER_REQUESTS.fetch_add(1, Ordering::SeqCst);
}

/// For `ditrun launch`: SIGTERM, SIGINT and SIGHUP only count requests (see
/// [`take_launcher_requests`]); the launcher passes each on to its ranks and never dies first,
/// so it can report how they ended.
pub fn install_for_launcher() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        for signal in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            // SAFETY: the handler only touches atomics.
            unsafe {
                libc::signal(
                    signal,
                    on_launcher_signal as *const () as libc::sighandler_t,
                );
            }
        }
    });
}

/// The first stop signal the launcher received, if any.
pub fn launcher_stop() -> Option<StopSignal> {
    match LAUNCHER_FIRST.load(Ordering::SeqCst) {
        0 => None,
        signal => Some(StopSignal(signal)),
    }
}

/// How many stop requests arrived since the last call, and the first signal ever received.
pub fn take_launcher_requests() -> (i32, Option<StopSignal>) {
    (LAUNCHER_REQUESTS.swap(0, Ordering::SeqCst), launcher_stop())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_signals_mean_the_stop_they_stand_for() {
        for stop in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            let meant = stop_meant_by(forwarded_as(stop));
            // mpirun forwards only two signals: a hang-up travels as a SIGTERM.
            let expected = if stop == libc::SIGHUP {
                libc::SIGTERM
            } else {
                stop
            };
            assert_eq!(meant, expected, "{}", StopSignal(stop).name());
        }
        assert_eq!(StopSignal(stop_meant_by(libc::SIGUSR1)).exit_code(), 143);
        assert_eq!(StopSignal(stop_meant_by(libc::SIGUSR2)).exit_code(), 130);
    }
}
