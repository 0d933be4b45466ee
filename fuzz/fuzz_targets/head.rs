//! cargo-fuzz target `head` (harness: `gateway_fuzz::targets::head`); built without
//! `--cfg fuzzing`, a corpus runner: `cargo run -p gateway-fuzz --bin head -- PATH...`.
#![cfg_attr(fuzzing, no_main)]
gateway_fuzz::target!(head);
