//! cargo-fuzz target `tls_session` (harness: `gateway_fuzz::targets::tls_session`); built without
//! `--cfg fuzzing`, a corpus runner: `cargo run -p gateway-fuzz --bin tls_session -- PATH...`.
#![cfg_attr(fuzzing, no_main)]
gateway_fuzz::target!(tls_session);
