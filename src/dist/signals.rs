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
//! - The handler only stores to atomics and calls `_exit`, both async-signal-safe.

use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Once;
use std::time::{Duration, Instant};

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

extern "C" fn on_signal(signal: libc::c_int) {
    if RECEIVED
        .compare_exchange(0, signal, Ordering::SeqCst, Ordering::SeqCst)
        .is_err()
    {
        // The second signal: the user (or the kubelet) does not want to wait.
        // SAFETY: `_exit` is async-signal-safe.
        unsafe { libc::_exit(128 + RECEIVED.load(Ordering::SeqCst)) };
    }
}

/// Installs the handlers for SIGTERM, SIGINT and SIGHUP (once per process), and a watchdog
/// that ends the process `grace` after the first signal if the run has not ended by then.
pub fn install(grace: Duration) {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        for signal in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
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
    eprintln!("error: {message}");
    std::process::exit(signal.exit_code());
}
