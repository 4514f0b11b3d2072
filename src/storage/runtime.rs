//! The single tokio runtime that drives `object_store` from the trainer's blocking code. Every
//! store call in the crate goes through [`block_on`] here, so there is one runtime per process
//! and one place that knows the I/O is async underneath.

use std::future::Future;
use std::sync::OnceLock;

/// Runs a future to completion from blocking code on one lazily created, process-wide
/// multi-thread runtime.
///
/// Sharing the runtime keeps the HTTP connection pools of the object stores alive between
/// calls. Do not call it from inside an async context (it would panic, as nested runtimes do).
pub fn block_on<F: Future>(future: F) -> F::Output {
    runtime().block_on(future)
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .thread_name("ditrun-io")
            .build()
            // Without a runtime no storage works at all, and the cause (out of threads or file
            // descriptors) is not something the caller can recover from.
            .expect("cannot start the tokio runtime for storage I/O")
    })
}
