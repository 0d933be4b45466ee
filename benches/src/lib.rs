//! The benchmark harness against nginx (driven by `cargo xtask bench`) and micro-benchmarks.
