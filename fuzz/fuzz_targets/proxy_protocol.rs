//! cargo-fuzz target `proxy_protocol` (harness: `gateway_fuzz::targets::proxy_protocol`); built without
//! `--cfg fuzzing`, a corpus runner: `cargo run -p gateway-fuzz --bin proxy_protocol -- PATH...`.
#![cfg_attr(fuzzing, no_main)]
gateway_fuzz::target!(proxy_protocol);
