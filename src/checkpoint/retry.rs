//! Retrying store operations that failed for reasons that may pass (a network error, a server
//! restarting), with exponential backoff, while failing at once on errors that will not.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::error::{Error, Result};

/// How often and how patiently a checkpoint store operation is retried.
///
/// Attempt `n` (from 1) that fails transiently is followed by a pause of
/// `base_delay · 2^(n-1)`, capped at `max_delay`, until `attempts` attempts have been made.
/// The cloud clients of `object_store` retry single HTTP requests on their own as well; this
/// policy sits above them, so a store that is down for a while (a restarting server) is
/// waited out rather than losing the checkpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Total attempts per operation, the first included (0 is treated as 1).
    pub attempts: u32,
    pub base_delay: Duration,
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    /// Six attempts over about 15 s: long enough for a storage server to restart.
    fn default() -> Self {
        Self {
            attempts: 6,
            base_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(30),
        }
    }
}

impl RetryPolicy {
    /// The pause after the `failed_attempt`-th attempt (counting from 1).
    pub fn delay_after(&self, failed_attempt: u32) -> Duration {
        let doublings = failed_attempt.saturating_sub(1).min(31);
        self.base_delay
            .saturating_mul(1u32 << doublings)
            .min(self.max_delay)
    }

    /// Runs `operation` until it succeeds, fails with a permanent error, or the attempts are
    /// spent; every transient failure is logged and counted in `transient_failures`.
    /// `checkpoint` and `action` name what was being done in the warnings and the final store
    /// error; errors that do not come from the store are returned as they are.
    pub(crate) fn run<T>(
        &self,
        transient_failures: &AtomicU64,
        checkpoint: &str,
        action: &str,
        mut operation: impl FnMut() -> Result<T>,
    ) -> Result<T> {
        let attempts = self.attempts.max(1);
        let mut attempt = 1;
        loop {
            let source = match operation() {
                Ok(value) => return Ok(value),
                Err(Error::ObjectStore { source, .. }) => source,
                Err(other) => return Err(other),
            };
            let transient = is_transient(&source);
            if transient {
                transient_failures.fetch_add(1, Ordering::Relaxed);
            }
            if !transient || attempt >= attempts {
                return Err(Error::CheckpointStorage {
                    checkpoint: checkpoint.to_string(),
                    action: action.to_string(),
                    attempts: attempt,
                    source,
                });
            }
            let delay = self.delay_after(attempt);
            tracing::warn!(
                "checkpoint {checkpoint}: {action} failed (attempt {attempt} of {attempts}), retrying in {delay:?}: {source}"
            );
            std::thread::sleep(delay);
            attempt += 1;
        }
    }
}

/// Errors a later attempt may not see: I/O and network failures, which `object_store`
/// reports as `Generic`. A missing object, a denied permission or a bad path will fail the
/// same way every time, so retrying them only delays the report.
fn is_transient(error: &object_store::Error) -> bool {
    matches!(
        error,
        object_store::Error::Generic { .. } | object_store::Error::JoinError { .. }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from_store(source: object_store::Error) -> Error {
        Error::ObjectStore {
            url: "memory://c/step-000000001/m".into(),
            source,
        }
    }

    fn transient() -> Error {
        from_store(object_store::Error::Generic {
            store: "test",
            source: "connection reset".into(),
        })
    }

    fn quick(attempts: u32) -> RetryPolicy {
        RetryPolicy {
            attempts,
            base_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(4),
        }
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let policy = RetryPolicy {
            attempts: 10,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_millis(500),
        };
        let delays: Vec<u128> = (1..=5).map(|n| policy.delay_after(n).as_millis()).collect();
        assert_eq!(delays, [100, 200, 400, 500, 500]);
        assert_eq!(policy.delay_after(200), Duration::from_millis(500));
    }

    #[test]
    fn transient_failures_are_retried_until_success() {
        let counter = AtomicU64::new(0);
        let mut calls = 0;
        let value = quick(5)
            .run(&counter, "memory://c/step-000000001", "writing `m`", || {
                calls += 1;
                if calls <= 3 {
                    Err(transient())
                } else {
                    Ok(calls)
                }
            })
            .unwrap();
        assert_eq!(value, 4);
        assert_eq!(counter.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn spent_attempts_name_checkpoint_action_and_count() {
        let counter = AtomicU64::new(0);
        let err = quick(3)
            .run::<()>(
                &counter,
                "s3://b/ckpt/step-000000002",
                "writing `model.safetensors`",
                || Err(transient()),
            )
            .unwrap_err();
        let message = err.to_string();
        assert!(message.contains("s3://b/ckpt/step-000000002"), "{message}");
        assert!(message.contains("writing `model.safetensors`"), "{message}");
        assert!(message.contains("3 attempt"), "{message}");
        assert_eq!(counter.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn permanent_errors_are_not_retried() {
        let counter = AtomicU64::new(0);
        let mut calls = 0;
        let err = quick(5)
            .run::<()>(&counter, "c", "reading `x`", || {
                calls += 1;
                Err(from_store(object_store::Error::PermissionDenied {
                    path: "x".into(),
                    source: "denied".into(),
                }))
            })
            .unwrap_err();
        assert_eq!(calls, 1);
        assert!(err.to_string().contains("1 attempt"), "{err}");
    }
}
