//! `cargo xtask test`: every check CI runs, in order, stopping at the first failure:
//! install, `cargo fmt --check`, clippy (`-D warnings`), the module-cycle check
//! ([`crate::cycles`]), a debug build, then every test with
//! `GATEWAY_BIN` pointing at the built binary for the integration tests in `tests/`.
//! The workspace tests include the stable replay of the fuzz targets (`fuzz/tests/corpus.rs`:
//! every target over its seed corpus in `fuzz/corpus/`), so a seed that crashes a harness or
//! breaks an invariant fails this run; libFuzzer itself (`cargo +nightly fuzz run`) is not run.
//!
//! `gateway-ebpf` (the XDP program) is excluded from the host passes: it only builds for the
//! bpfel target, which `gateway/build.rs` drives through aya-build, so building the gateway
//! builds and checks it. `gateway-common` is linted twice, with and without its `user`
//! feature, because the kernel side compiles it without.
//!
//! `AYA_BUILD_SKIP` is removed from the environment: every run tests the real XDP program.
//!
//! Privileged tests run when the process is root; with `CI=true` not being root is an error,
//! so CI can never pass by skipping them.

use std::{env, process::Command};

use anyhow::{bail, Result};

use crate::{cargo, install, is_root, run_cmd, target_dir, workspace_root};

/// The crate that only builds for the BPF target.
const EBPF_CRATE: &str = "gateway-ebpf";

#[derive(clap::Args)]
pub struct Args {
    /// Skip `cargo fmt --check` and clippy (quicker local iterations; CI never skips them).
    #[arg(long)]
    pub no_lint: bool,
    /// Extra arguments for `cargo test`, after `--` (e.g. a test name filter, `-p tests`).
    #[arg(last = true)]
    pub cargo_test_args: Vec<String>,
}

pub fn run(args: &Args) -> Result<()> {
    let ci = env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    if ci && !is_root() {
        bail!(
            "CI=true but not running as root: the privileged tests (XDP, network namespaces) \
             must run in CI; run .ci/run as root"
        );
    }
    if ci && args.no_lint {
        bail!("--no-lint is not allowed with CI=true");
    }
    install::run(&install::Args::default())?;
    let root = workspace_root();
    let cargo_cmd = |args: &[&str]| {
        let mut cmd = Command::new(cargo());
        cmd.args(args)
            .current_dir(&root)
            .env_remove(crate::AYA_BUILD_SKIP);
        cmd
    };

    if !args.no_lint {
        run_cmd(&mut cargo_cmd(&["fmt", "--all", "--", "--check"]))?;
        run_cmd(&mut cargo_cmd(&[
            "clippy",
            "--workspace",
            "--exclude",
            EBPF_CRATE,
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]))?;
        // The workspace pass sees gateway-common only with `user` (feature unification).
        for features in [&["--no-default-features"][..], &["--features", "user"][..]] {
            let mut cmd = cargo_cmd(&["clippy", "--package", "gateway-common", "--all-targets"]);
            cmd.args(features).args(["--", "-D", "warnings"]);
            run_cmd(&mut cmd)?;
        }
    }

    // Before anything is built: a cycle is a layering mistake, found in a second.
    let cycles = crate::cycles::check_dir(&root.join("gateway/src"))?;
    if !cycles.is_empty() {
        bail!("{}", crate::cycles::report(&cycles));
    }

    run_cmd(&mut cargo_cmd(&[
        "build",
        "--workspace",
        "--exclude",
        EBPF_CRATE,
    ]))?;
    let gateway_bin = target_dir()?.join("debug").join("gateway");
    if !gateway_bin.is_file() {
        bail!("the build did not produce {}", gateway_bin.display());
    }
    eprintln!("xtask: GATEWAY_BIN={}", gateway_bin.display());

    let mut test = cargo_cmd(&[
        "test",
        "--workspace",
        "--exclude",
        EBPF_CRATE,
        "--no-fail-fast",
    ]);
    test.args(&args.cargo_test_args)
        .env("GATEWAY_BIN", &gateway_bin);
    run_cmd(&mut test)?;

    // The data plane has two drivers behind one interface; the HTTP behaviour suites run
    // again on the epoll one so neither rots.
    if args.cargo_test_args.is_empty() {
        eprintln!("xtask: the proxy suites again on the epoll driver (GATEWAY_TEST_IO=epoll)");
        let mut epoll = cargo_cmd(&["test", "--package", "gateway-tests", "--no-fail-fast"]);
        for suite in EPOLL_SUITES {
            epoll.args(["--test", suite]);
        }
        epoll
            .env("GATEWAY_BIN", &gateway_bin)
            .env("GATEWAY_TEST_IO", "epoll");
        run_cmd(&mut epoll)?;

        // HTTP/2 conformance (the h2spec cases), about a second.
        crate::h2spec::run_with(&gateway_bin)?;

        // The benchmark harness, once, quickly, so it never rots (figures not kept).
        eprintln!("xtask: benchmark harness smoke run (cargo xtask bench --quick)");
        crate::bench::run(&crate::bench::Args {
            duration: 1,
            rounds: 1,
            workers: 1,
            connections: 20,
            proxy_cpus: "0".into(),
            quick: true,
            gateway_bin: Some(gateway_bin.clone()),
            // The same binary as its own baseline: exercises the before/after path.
            baseline_bin: Some(gateway_bin.clone()),
            out: Some(target_dir()?.join("bench-quick")),
            only: Vec::new(),
            idle_connections: None,
            no_haproxy: false,
            // The fleet-wide limit's contender too, so its path does not rot either.
            global_limit: true,
            // The epoll driver's contender too.
            epoll: true,
            // Not in --quick (tests/tests/scale.rs runs its load).
            scale_clients: 10_000,
            scale_tunnels: 2_000,
            scale_processes: 2,
        })?;
    }
    Ok(())
}

/// Integration suites that exercise the data plane, run on both I/O drivers.
const EPOLL_SUITES: &[&str] = &[
    "framing",
    "keepalive",
    "balancing",
    "failures",
    "bad_input",
    "headers",
    "access_log",
    "io_driver",
    "control_plane",
    "memory",
    "adversarial",
    "framing_fuzz",
    "http2",
];
