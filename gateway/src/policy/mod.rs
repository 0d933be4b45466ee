//! Decisions over a request, free of I/O: which route it takes, whether a failed try may be
//! retried, and the per-IP limits.

pub mod global_limit;
pub mod limits;
pub mod retry;
pub mod route;
