//! Builds the XDP program (package `gateway-ebpf`) for the BPF target and leaves the object
//! at `$OUT_DIR/gateway-ebpf`, where `src/xdp/mod.rs` embeds it.
//!
//! aya-build runs `rustup run nightly cargo build --package gateway-ebpf --bins --release
//! --target bpfel-unknown-none -Z build-std=core` with its own target dir under `OUT_DIR`
//! and copies each binary to `$OUT_DIR/<bin name>`. That needs the nightly toolchain with
//! `rust-src` and `bpf-linker` on PATH (`cargo xtask` installs both).
//!
//! `AYA_BUILD_SKIP=1` (or `true`) skips the kernel build, so `cargo check`/`clippy` work
//! without the BPF toolchain. The `gateway_xdp_embedded` cfg tells `src/xdp/mod.rs` whether an
//! object exists; without it the loader compiles to a clear "built without the XDP
//! program" error instead of embedding nothing.
//!
//! Rebuild triggers: the `gateway-ebpf` build-dependency (its library, and so
//! `gateway-common`), plus aya-build's `rerun-if-changed` on the whole `gateway-ebpf`
//! directory, which covers the program's `main.rs`.

use std::{
    env, fs, io,
    path::{Path, PathBuf},
};

use anyhow::{anyhow, Context as _, Result};

const EBPF_PACKAGE: &str = "gateway-ebpf";
/// Mirrors aya-build's own switch, which it reads the same way.
const AYA_BUILD_SKIP: &str = "AYA_BUILD_SKIP";
/// Optional rustup toolchain for the kernel build (e.g. `nightly-2026-11-01`); default
/// `nightly`.
const TOOLCHAIN_ENV: &str = "GATEWAY_EBPF_TOOLCHAIN";
const EMBEDDED_CFG: &str = "gateway_xdp_embedded";

fn main() -> Result<()> {
    println!("cargo::rustc-check-cfg=cfg({EMBEDDED_CFG})");
    println!("cargo:rerun-if-changed=build.rs");
    // `[profile.release.package.gateway-ebpf]` lives in the workspace manifest.
    println!("cargo:rerun-if-changed=../Cargo.toml");
    println!("cargo:rerun-if-env-changed={AYA_BUILD_SKIP}");
    println!("cargo:rerun-if-env-changed={TOOLCHAIN_ENV}");

    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?);
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR")?);
    let ebpf_dir = manifest_dir.join("..").join(EBPF_PACKAGE);
    let ebpf_dir = ebpf_dir
        .canonicalize()
        .with_context(|| format!("eBPF package directory {}", ebpf_dir.display()))?;
    let root_dir = ebpf_dir
        .to_str()
        .ok_or_else(|| anyhow!("non-UTF-8 path {}", ebpf_dir.display()))?;
    let object = out_dir.join(EBPF_PACKAGE);

    if skip_requested() {
        // A previous build may have left an object here; embedding it would ship a stale
        // program that no longer matches this source tree.
        remove_if_exists(&object)?;
        // Prints aya-build's "skipping eBPF build" warning and returns.
        return aya_build::build_ebpf([package(root_dir)], aya_build::Toolchain::default());
    }

    let toolchain_name = env::var(TOOLCHAIN_ENV).ok();
    let toolchain = match toolchain_name.as_deref() {
        Some(name) if !name.is_empty() => aya_build::Toolchain::Custom(name),
        _ => aya_build::Toolchain::Nightly,
    };
    aya_build::build_ebpf([package(root_dir)], toolchain).context(
        "building the XDP program (gateway-ebpf) for the BPF target failed. It needs the \
         nightly toolchain with rust-src and bpf-linker on PATH (`cargo xtask` installs \
         both); set AYA_BUILD_SKIP=1 to build the gateway without XDP support",
    )?;
    if !object.is_file() {
        return Err(anyhow!(
            "aya-build succeeded but left no {}; was the [[bin]] of gateway-ebpf renamed?",
            object.display()
        ));
    }
    println!("cargo:rustc-cfg={EMBEDDED_CFG}");
    Ok(())
}

fn package(root_dir: &str) -> aya_build::Package<'_> {
    aya_build::Package {
        name: EBPF_PACKAGE,
        root_dir,
        ..Default::default()
    }
}

fn skip_requested() -> bool {
    env::var_os(AYA_BUILD_SKIP)
        .is_some_and(|value| value == "1" || value.eq_ignore_ascii_case("true"))
}

fn remove_if_exists(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(err) => Err(err).with_context(|| format!("removing stale {}", path.display())),
    }
}
