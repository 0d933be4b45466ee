//! `cargo xtask install`: puts in place everything the build and the tests need on a fresh
//! Debian 12 machine, and does nothing (quickly) when it is all there.
//!
//! - Debian packages the tests and benchmarks use (checked by binary or `dpkg-query`;
//!   `apt-get update` + `apt-get install` only when something is missing, only as root).
//! - `clippy` and `rustfmt` for the active toolchain, `rust-src` for nightly (`-Z build-std`).
//! - `bpf-linker` built against the nightly's own libLLVM, as `shared/PLATFORM.md` verified:
//!   a bpf-linker linked to any other LLVM cannot read the bitcode nightly rustc emits.
//! - bpffs mounted at `/sys/fs/bpf` (root only), where the gateway pins its maps.
//! - A Python virtualenv at `target/autobahn-venv` with the `kosoku` Autobahn runner and
//!   `websockets` (the echo server), pinned, for `tests/tests/autobahn.rs`.
//! - `httpwg-cli` (the h2spec cases), pinned, in `target/tools` for `cargo xtask h2spec`.
//!
//! Every action prints one line; when nothing was needed it prints only "tools present".

use std::{
    fs,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{bail, Context, Result};

use crate::{cargo, find_program, is_root, run_cmd, target_dir};

/// The bpf-linker release verified with this nightly (LLVM 22) and stable (1.95); newer
/// releases may need a newer compiler than the image ships.
const BPF_LINKER_VERSION: &str = "0.13.0";

/// Debian packages the project uses, each with a binary that proves it is installed (checked
/// without starting a process); `None` means ask dpkg.
const DEBIAN_PACKAGES: &[(&str, Option<&str>)] = &[
    ("nginx", Some("nginx")),
    ("curl", Some("curl")),
    ("openssl", Some("openssl")),
    ("iproute2", Some("ip")),
    ("wrk", Some("wrk")),
    ("bpftool", Some("bpftool")),
    ("hping3", Some("hping3")),
    ("linux-perf", Some("perf")),
    ("nghttp2-client", Some("h2load")),
    // The bench's third contender (HAProxy 2.6 on Debian 12).
    ("haproxy", Some("haproxy")),
    ("python3-websockets", None),
    // The shared counter store of `[limits.global]` (tests/tests/global_limits.rs, the bench).
    ("redis-server", Some("redis-server")),
];

#[derive(clap::Args, Default)]
pub struct Args {
    /// Install bpf-linker into DIR/bin instead of cargo's default bin directory (checks
    /// DIR/bin/bpf-linker; for testing the build recipe without touching the real one).
    #[arg(long, value_name = "DIR")]
    pub bpf_linker_root: Option<PathBuf>,
    /// Rebuild bpf-linker even if one runs.
    #[arg(long)]
    pub force_bpf_linker: bool,
}

pub fn run(args: &Args) -> Result<()> {
    let mut did = false;
    did |= debian_packages()?;
    did |= rust_components()?;
    did |= bpf_linker(args)?;
    did |= bpffs()?;
    did |= autobahn_venv()?;
    did |= crate::h2spec::install()?;
    if !did {
        eprintln!("xtask: tools present");
    }
    Ok(())
}

fn debian_packages() -> Result<bool> {
    let mut missing: Vec<&str> = Vec::new();
    let mut ask_dpkg: Vec<&str> = Vec::new();
    for &(package, binary) in DEBIAN_PACKAGES {
        match binary {
            Some(bin) if find_program(bin).is_some() => {}
            Some(_) => missing.push(package),
            None => ask_dpkg.push(package),
        }
    }
    if !ask_dpkg.is_empty() {
        missing.extend(dpkg_missing(&ask_dpkg)?);
    }
    if missing.is_empty() {
        return Ok(false);
    }
    let list = missing.join(" ");
    if !is_root() {
        bail!(
            "missing Debian packages: {list}\n  install them as root: \
             apt-get update && apt-get install -y {list}"
        );
    }
    if find_program("apt-get").is_none() {
        bail!("missing packages ({list}) and no apt-get: install them with your package manager");
    }
    eprintln!("xtask: installing Debian packages: {list}");
    run_cmd(
        Command::new("apt-get")
            .args(["-q", "update"])
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    run_cmd(
        Command::new("apt-get")
            .args(["-q", "install", "-y", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    Ok(true)
}

/// The packages among `packages` that dpkg does not report as installed ("ii").
fn dpkg_missing<'a>(packages: &[&'a str]) -> Result<Vec<&'a str>> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Package}\t${db:Status-Abbrev}\n"])
        .args(packages)
        .stderr(Stdio::null())
        .output();
    let Ok(out) = out else {
        // No dpkg: not Debian. Report them all; the caller says what to install.
        return Ok(packages.to_vec());
    };
    // dpkg-query exits 1 when some package is unknown; its stdout still lists the known ones.
    let stdout = String::from_utf8_lossy(&out.stdout);
    Ok(packages
        .iter()
        .copied()
        .filter(|p| {
            !stdout.lines().any(|l| {
                let mut f = l.split('\t');
                let name = f.next().unwrap_or("");
                let name = name.split(':').next().unwrap_or(""); // strip `:arch`
                name == *p && f.next().is_some_and(|s| s.starts_with("ii"))
            })
        })
        .collect())
}

fn rust_components() -> Result<bool> {
    let mut did = false;
    // clippy and rustfmt for the toolchain `cargo` resolves to here (`cargo xtask test`).
    let active = installed_components(None)?;
    let wanted: Vec<&str> = ["clippy", "rustfmt"]
        .into_iter()
        .filter(|c| !has_component(&active, c))
        .collect();
    if !wanted.is_empty() {
        eprintln!("xtask: adding rust components: {}", wanted.join(" "));
        run_cmd(
            Command::new("rustup")
                .args(["component", "add"])
                .args(&wanted),
        )?;
        did = true;
    }
    // rust-src for nightly: the eBPF program is built with `-Z build-std=core`.
    let nightly = installed_components(Some("nightly")).context(
        "the nightly toolchain is needed to build the XDP program; \
         install it with `rustup toolchain install nightly`",
    )?;
    if !has_component(&nightly, "rust-src") {
        eprintln!("xtask: adding rust-src to the nightly toolchain");
        run_cmd(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
        did = true;
    }
    Ok(did)
}

fn installed_components(toolchain: Option<&str>) -> Result<String> {
    let mut cmd = Command::new("rustup");
    cmd.args(["component", "list", "--installed"]);
    if let Some(t) = toolchain {
        cmd.args(["--toolchain", t]);
    }
    let out = cmd
        .current_dir(crate::workspace_root())
        .output()
        .context("running rustup (is rustup installed and on PATH?)")?;
    if !out.status.success() {
        bail!(
            "`{}` failed: {}",
            crate::display_cmd(&cmd),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Component lines look like `rust-src` or `clippy-x86_64-unknown-linux-gnu`.
fn has_component(list: &str, name: &str) -> bool {
    list.lines().any(|l| {
        let l = l.trim();
        l == name
            || l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('-'))
    })
}

fn bpf_linker(args: &Args) -> Result<bool> {
    let binary = match &args.bpf_linker_root {
        Some(root) => root.join("bin").join("bpf-linker"),
        None => PathBuf::from("bpf-linker"),
    };
    // It runs only if it finds the libLLVM it was linked to: after a nightly update the old
    // library is gone, this fails, and we rebuild against the new one.
    let runs = Command::new(&binary)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if runs && !args.force_bpf_linker {
        return Ok(false);
    }

    let sysroot = nightly_sysroot()?;
    let (libllvm, major) = find_nightly_libllvm(&sysroot.join("lib"))?;
    let prefix = target_dir()?.join("llvm-prefix");
    let prefix_lib = prefix.join("lib");
    fs::create_dir_all(&prefix_lib)
        .with_context(|| format!("creating {}", prefix_lib.display()))?;
    let link = prefix_lib.join("libLLVM.so");
    if link.symlink_metadata().is_ok() {
        fs::remove_file(&link).with_context(|| format!("removing {}", link.display()))?;
    }
    symlink(&libllvm, &link)
        .with_context(|| format!("linking {} -> {}", link.display(), libllvm.display()))?;

    eprintln!(
        "xtask: building bpf-linker {BPF_LINKER_VERSION} against {} (LLVM {major}, ~2 min)",
        libllvm.display()
    );
    let mut cmd = Command::new(cargo());
    cmd.args([
        "install",
        "bpf-linker",
        "--locked",
        "--version",
        BPF_LINKER_VERSION,
        "--no-default-features",
        "--features",
    ])
    .arg(format!("llvm-{major}"))
    .env("LLVM_PREFIX", &prefix)
    // rpath to the nightly's lib dir, so bpf-linker finds libLLVM without LD_LIBRARY_PATH.
    .env(
        "RUSTFLAGS",
        format!("-C link-arg=-Wl,-rpath,{}", sysroot.join("lib").display()),
    )
    .env_remove("CARGO_ENCODED_RUSTFLAGS");
    if runs || binary.exists() {
        cmd.arg("--force");
    }
    if let Some(root) = &args.bpf_linker_root {
        cmd.arg("--root").arg(root);
    }
    run_cmd(&mut cmd)?;
    Ok(true)
}

fn nightly_sysroot() -> Result<PathBuf> {
    let out = Command::new("rustc")
        .args(["+nightly", "--print", "sysroot"])
        .output()
        .context("running `rustc +nightly --print sysroot`")?;
    if !out.status.success() {
        bail!(
            "no nightly toolchain (`rustc +nightly` failed: {}); \
             install it with `rustup toolchain install nightly`",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

/// Finds `libLLVM.so.<major>.<minor>-rust-<version>-nightly` in the nightly's `lib` dir and
/// returns it with its LLVM major version (which names bpf-linker's `llvm-<major>` feature).
fn find_nightly_libllvm(lib: &Path) -> Result<(PathBuf, u32)> {
    let mut candidates: Vec<(PathBuf, u32, bool)> = Vec::new();
    for entry in fs::read_dir(lib).with_context(|| format!("reading {}", lib.display()))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(major) = libllvm_major(&name) {
            candidates.push((entry.path(), major, name.ends_with("-nightly")));
        }
    }
    // Prefer the `-nightly` one, then the newest.
    candidates.sort_by_key(|&(_, major, nightly)| (nightly, major));
    match candidates.pop() {
        Some((path, major, _)) => Ok((path, major)),
        None => bail!(
            "no libLLVM.so.* in {}: the nightly toolchain ships without its LLVM library",
            lib.display()
        ),
    }
}

/// `libLLVM.so.22.1-rust-1.97.0-nightly` → 22.
fn libllvm_major(file_name: &str) -> Option<u32> {
    let rest = file_name.strip_prefix("libLLVM.so.")?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

fn bpffs() -> Result<bool> {
    const BPFFS: &str = gateway_test_support::bpffs::SYS_FS_BPF;
    let mounted = gateway_test_support::bpffs_mounted_at(Path::new(BPFFS));
    if mounted || !is_root() || !Path::new(BPFFS).is_dir() {
        // Non-root processes cannot pin maps anyway; the privileged tests need root.
        return Ok(false);
    }
    eprintln!("xtask: mounting bpffs at {BPFFS}");
    // A container build step is root without CAP_SYS_ADMIN: building must still work there,
    // so a refused mount is a warning (the XDP tests will say what they lack).
    if let Err(e) = run_cmd(Command::new("mount").args(["-t", "bpf", "bpf", BPFFS])) {
        eprintln!("xtask: warning: cannot mount bpffs at {BPFFS}: {e:#}");
    }
    Ok(true)
}

/// PyPI packages of the Autobahn conformance test, pinned: the runner drives Autobahn's own
/// case files, and the echo server the cases run against directly and through the gateway.
const AUTOBAHN_PACKAGES: &[&str] = &["kosoku==0.1.0", "websockets==17.4"];

/// The virtualenv the Autobahn test uses (`tests/tests/autobahn.rs` looks for it here).
pub fn autobahn_venv_dir() -> Result<PathBuf> {
    Ok(target_dir()?.join("autobahn-venv"))
}

fn autobahn_venv() -> Result<bool> {
    let venv = autobahn_venv_dir()?;
    let python = venv.join("bin/python");
    let present = python.is_file()
        && Command::new(&python)
            .args(["-c", "import kosoku, websockets"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
    if present {
        return Ok(false);
    }
    let Some(python3) = find_program("python3") else {
        bail!("python3 is needed for the Autobahn test (tests/tests/autobahn.rs)");
    };
    eprintln!("xtask: creating {} for the Autobahn test", venv.display());
    run_cmd(Command::new(python3).arg("-m").arg("venv").arg(&venv))?;
    run_cmd(
        Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .args(AUTOBAHN_PACKAGES),
    )?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libllvm_major_from_file_names() {
        assert_eq!(
            libllvm_major("libLLVM.so.22.1-rust-1.97.0-nightly"),
            Some(22)
        );
        assert_eq!(libllvm_major("libLLVM.so.19.1"), Some(19));
        assert_eq!(libllvm_major("libLLVM-22-rust-1.97.0-nightly.so"), None);
        assert_eq!(libllvm_major("librustc_driver-b5a965480ee51f9a.so"), None);
    }

    #[test]
    fn component_names() {
        let list = "cargo-x86_64-unknown-linux-gnu\nclippy-x86_64-unknown-linux-gnu\nrust-src\n";
        assert!(has_component(list, "clippy"));
        assert!(has_component(list, "rust-src"));
        assert!(!has_component(list, "rustfmt"));
        assert!(!has_component(list, "rust-std"));
    }
}
