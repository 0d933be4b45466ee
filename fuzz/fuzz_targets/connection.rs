//! cargo-fuzz target `connection` (harness: `gateway_fuzz::targets::connection`); built without
//! `--cfg fuzzing`, a corpus runner: `cargo run -p gateway-fuzz --bin connection -- PATH...`.
#![cfg_attr(fuzzing, no_main)]
gateway_fuzz::target!(connection);
