//! The synchronisation types of the code where threads meet (see [`crate::handoff`]): std's
//! normally, loom's under `--cfg loom`, so the same source is model-checked (design.md
//! section 5; the pattern of tokio's `src/loom/` and bytes' `src/loom.rs`).

#[cfg(not(loom))]
pub(crate) use std::sync::{Arc, Condvar, Mutex, MutexGuard};

#[cfg(loom)]
pub(crate) use loom::sync::{Arc, Condvar, Mutex, MutexGuard};
