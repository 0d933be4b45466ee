//! cargo-fuzz target `tls_stream` (harness: `gateway_fuzz::targets::tls_stream`); built without
//! `--cfg fuzzing`, a corpus runner: `cargo run -p gateway-fuzz --bin tls_stream -- PATH...`.
#![cfg_attr(fuzzing, no_main)]
gateway_fuzz::target!(tls_stream);
