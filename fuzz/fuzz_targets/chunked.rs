//! cargo-fuzz target `chunked` (harness: `gateway_fuzz::targets::chunked`); built without
//! `--cfg fuzzing`, a corpus runner: `cargo run -p gateway-fuzz --bin chunked -- PATH...`.
#![cfg_attr(fuzzing, no_main)]
gateway_fuzz::target!(chunked);
