//! cargo-fuzz target `rewrite` (harness: `gateway_fuzz::targets::rewrite`); built without
//! `--cfg fuzzing`, a corpus runner: `cargo run -p gateway-fuzz --bin rewrite -- PATH...`.
#![cfg_attr(fuzzing, no_main)]
gateway_fuzz::target!(rewrite);
