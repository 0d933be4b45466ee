//! Fuzz harnesses for the gateway: one module per target in [`targets`], each a thin
//! `run(&[u8])` over the public API, so the same code runs under libFuzzer (`cargo fuzz`,
//! nightly) and over the committed seed corpus on stable ([`replay`], `tests/corpus.rs`).
//!
//! A harness panics when an invariant fails. Invariants that the current code is known to
//! break (listed in `fuzz/pending.txt`, each with the issue that tracks it) are recorded by
//! [`check::invariant`] instead of panicking, so fuzzing goes on looking for other faults;
//! the corpus replay fails once such an invariant holds, so the list cannot go stale.

pub mod check;
pub mod replay;
pub mod script;
pub mod targets;

/// A harness: panics on a finding.
pub type Harness = fn(&[u8]);

/// Every target: its name (the bin, and the directory under `fuzz/corpus/`) and harness.
pub const TARGETS: &[(&str, Harness)] = &[
    ("head", targets::head::run),
    ("chunked", targets::chunked::run),
    ("proxy_protocol", targets::proxy_protocol::run),
    ("rewrite", targets::rewrite::run),
    ("tls_stream", targets::tls_stream::run),
    ("tls_session", targets::tls_session::run),
    ("connection", targets::connection::run),
];

/// libFuzzer's entry macro, for the target bins (only under `cargo fuzz`).
#[cfg(fuzzing)]
pub use libfuzzer_sys;

/// The body of a target bin (`fuzz_targets/<name>.rs`, after `#![cfg_attr(fuzzing, no_main)]`):
/// under `cargo fuzz` (`--cfg fuzzing`) the libFuzzer entry point for `targets::<name>::run`,
/// otherwise a `main` that replays files with it ([`replay::main`]).
#[macro_export]
macro_rules! target {
    ($name:ident) => {
        #[cfg(fuzzing)]
        $crate::libfuzzer_sys::fuzz_target!(|data: &[u8]| $crate::targets::$name::run(data));

        #[cfg(not(fuzzing))]
        fn main() -> std::process::ExitCode {
            $crate::replay::main(stringify!($name))
        }
    };
}
