//! `cargo xtask`: the project's automation, so that a fresh Debian machine needs nothing done
//! by hand. `install` puts the toolchain pieces and Debian packages in place (and is run first
//! by `run`, `test` and `bench`), `run` starts the gateway with the example config and a demo
//! upstream, `test` runs every check CI runs, `cycles` checks
//! `gateway/src` for module import cycles, `h2spec` runs the HTTP/2 conformance cases,
//! `demo-upstream` runs only the demo upstream.
//!
//! The alias lives in `.cargo/config.toml`: `xtask = "run --quiet --package xtask --"`.

mod bench;
mod cycles;
mod demo_upstream;
mod h2spec;
mod install;
mod run;
mod test;

use std::{
    env,
    ffi::OsString,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    about = "Build, run, test and bench automation for the gateway"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what is missing: Debian packages, nightly rust-src, bpf-linker; mount bpffs.
    Install(install::Args),
    /// Build the gateway (release, kernel program included) and run it in the foreground.
    Run(run::Args),
    /// Run every check CI runs: fmt, clippy, build, and all tests.
    Test(test::Args),
    /// Benchmarks against nginx with the reference config, interleaved, same machine.
    Bench(bench::Args),
    /// Fail if gateway/src has a module import cycle, listing each with file and line.
    Cycles(cycles::Args),
    /// HTTP/2 conformance: the h2spec cases (httpwg-cli) against an h2c listener.
    H2spec(h2spec::Args),
    /// Run only the demo upstream: answers every request with 200 and a short JSON body.
    DemoUpstream(demo_upstream::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    ensure_cargo_bin_on_path();
    if env::var_os(AYA_BUILD_SKIP).is_some() && matches!(cli.command, Cmd::Run(_) | Cmd::Test(_)) {
        eprintln!("xtask: ignoring {AYA_BUILD_SKIP}: run and test always build the XDP program");
    }
    let result = match cli.command {
        Cmd::Install(args) => install::run(&args).map(|()| ExitCode::SUCCESS),
        Cmd::Run(args) => run::run(&args),
        Cmd::Test(args) => test::run(&args).map(|()| ExitCode::SUCCESS),
        Cmd::Bench(args) => bench::run(&args).map(|()| ExitCode::SUCCESS),
        Cmd::Cycles(args) => cycles::run(&args).map(|()| ExitCode::SUCCESS),
        Cmd::H2spec(args) => h2spec::run(&args).map(|()| ExitCode::SUCCESS),
        Cmd::DemoUpstream(args) => demo_upstream::run(&args).map(|()| ExitCode::SUCCESS),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("xtask: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Set, it makes `gateway/build.rs` leave the XDP program out; `run` and `test` unset it.
pub const AYA_BUILD_SKIP: &str = "AYA_BUILD_SKIP";

/// The workspace root: xtask lives in `<root>/xtask`.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask has a parent directory")
        .to_path_buf()
}

/// Cargo's target directory for this workspace (honours `CARGO_TARGET_DIR` and config).
pub fn target_dir() -> Result<PathBuf> {
    let out = Command::new(cargo())
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .current_dir(workspace_root())
        .output()
        .context("running `cargo metadata`")?;
    if !out.status.success() {
        bail!(
            "`cargo metadata` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let meta: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("parsing `cargo metadata` output")?;
    let dir = meta["target_directory"]
        .as_str()
        .context("`cargo metadata` has no target_directory")?;
    Ok(PathBuf::from(dir))
}

/// The cargo to run: the rustup proxy on PATH, so `+nightly` and components work.
pub fn cargo() -> OsString {
    OsString::from("cargo")
}

/// Runs `cmd` with inherited stdio after echoing it; fails on a non-zero exit.
pub fn run_cmd(cmd: &mut Command) -> Result<()> {
    eprintln!("xtask: $ {}", display_cmd(cmd));
    let status = cmd
        .status()
        .with_context(|| format!("starting `{}`", display_cmd(cmd)))?;
    if !status.success() {
        bail!("`{}` failed ({status})", display_cmd(cmd));
    }
    Ok(())
}

/// `program arg arg ...` for messages.
pub fn display_cmd(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        s.push(' ');
        s.push_str(&arg.to_string_lossy());
    }
    s
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Where `cargo install` puts binaries: `$CARGO_HOME/bin`, else `~/.cargo/bin`.
pub fn cargo_bin_dir() -> Option<PathBuf> {
    env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")))
        .map(|home| home.join("bin"))
}

/// A fresh shell may not have `~/.cargo/bin` on PATH; everything we start (bpf-linker found by
/// aya-build, cargo itself) needs it, so put it there for our children.
fn ensure_cargo_bin_on_path() {
    let Some(bin) = cargo_bin_dir() else { return };
    let path = env::var_os("PATH").unwrap_or_default();
    if env::split_paths(&path).any(|p| p == bin) || !bin.is_dir() {
        return;
    }
    let joined = env::join_paths(std::iter::once(bin).chain(env::split_paths(&path)))
        .expect("PATH entries are joinable");
    // Single-threaded here: nothing else reads the environment concurrently.
    env::set_var("PATH", joined);
}

/// Finds `name` on PATH, plus the sbin directories a non-root PATH often lacks.
pub fn find_program(name: &str) -> Option<PathBuf> {
    let path = env::var_os("PATH").unwrap_or_default();
    env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}
