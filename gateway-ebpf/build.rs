//! Makes the kernel object depend on the `bpf-linker` binary that links it.
//!
//! Linking for `bpf*-unknown-none` runs `bpf-linker` from PATH, an undeclared dependency:
//! without this, installing a new bpf-linker (say, one built against another LLVM) would
//! not relink the object. Cargo reruns this script, and so relinks, when the binary's
//! mtime changes. aya-template does the same with the `which` crate.
//!
//! For host builds (this package is also a build-dependency of `gateway`, compiled for the
//! host, where only the empty library is built) bpf-linker is not needed and may be absent:
//! `AYA_BUILD_SKIP=1 cargo clippy` must work on a machine without the BPF toolchain.

use std::{env, path::PathBuf};

fn main() {
    if env::var("CARGO_CFG_TARGET_ARCH").as_deref() != Ok("bpf") {
        return;
    }
    println!("cargo:rerun-if-env-changed=PATH");
    match find_on_path("bpf-linker") {
        Some(linker) => println!("cargo:rerun-if-changed={}", linker.display()),
        None => {
            // Fail here with the fix rather than later with rustc's "linker not found".
            eprintln!(
                "error: bpf-linker not found on PATH; `cargo xtask` installs it (built against \
                 the nightly's LLVM) into ~/.cargo/bin, which must be on PATH"
            );
            std::process::exit(1);
        }
    }
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = env::var_os("PATH")?;
    env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}
