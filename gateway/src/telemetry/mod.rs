//! What the data plane reports: per-worker counters (merged for `/metrics`) and the access
//! log.

pub mod access_log;
pub mod metrics;
