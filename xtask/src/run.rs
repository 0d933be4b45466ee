//! `cargo xtask run`: builds the gateway (release, kernel program included), starts the demo
//! upstream when the example config is used, and runs `gateway run --config ...` in the
//! foreground until it exits.
//!
//! The gateway runs in its own process group so that a Ctrl-C at the terminal reaches it
//! exactly once, through us: the gateway treats a second SIGINT/SIGTERM as "stop at once",
//! so it must not get one from the terminal and another from a forwarder. A hangup of the
//! terminal (SIGHUP to us) is passed on as SIGTERM, and the gateway gets SIGTERM too if we
//! die (PR_SET_PDEATHSIG), so it never outlives the command that started it. To reload,
//! signal the gateway itself (`kill -HUP <its pid>`) or `POST /reload` on the admin port.

use std::{
    os::unix::process::{CommandExt, ExitStatusExt},
    path::PathBuf,
    process::{Command, ExitCode},
    sync::atomic::{AtomicI32, Ordering},
};

use anyhow::{Context, Result};

use crate::{cargo, demo_upstream, install, run_cmd, target_dir, workspace_root};

/// Where the example config expects its upstream.
const DEMO_UPSTREAM_ADDR: &str = "127.0.0.1:8081";
const EXAMPLE_CONFIG: &str = "docs/examples/gateway.toml";

#[derive(clap::Args)]
pub struct Args {
    /// Config file to run with (default: docs/examples/gateway.toml, with the demo upstream).
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Start the demo upstream on 127.0.0.1:8081 even with --config.
    #[arg(long)]
    pub demo_upstream: bool,
    /// Build and run a debug gateway instead of a release one.
    #[arg(long)]
    pub debug: bool,
}

/// The gateway's pid while it runs (0 before), for the signal forwarder.
static CHILD: AtomicI32 = AtomicI32::new(0);
/// A signal that arrived before the gateway was started.
static PENDING: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward_signal(sig: libc::c_int) {
    let sig = if sig == libc::SIGHUP {
        libc::SIGTERM
    } else {
        sig
    };
    let pid = CHILD.load(Ordering::SeqCst);
    if pid > 0 {
        // SAFETY: kill is async-signal-safe.
        unsafe { libc::kill(pid, sig) };
    } else {
        PENDING.store(sig, Ordering::SeqCst);
    }
}

pub fn run(args: &Args) -> Result<ExitCode> {
    install::run(&install::Args::default())?;
    let root = workspace_root();
    let (config, demo) = match &args.config {
        // Resolve against the directory the user ran us from; the gateway runs in the root.
        Some(path) => (
            std::path::absolute(path).with_context(|| format!("resolving {}", path.display()))?,
            args.demo_upstream,
        ),
        None => (root.join(EXAMPLE_CONFIG), true),
    };

    let profile = if args.debug { "debug" } else { "release" };
    let mut build = Command::new(cargo());
    build
        .args(["build", "--package", "gateway", "--bin", "gateway"])
        .current_dir(&root)
        .env_remove(crate::AYA_BUILD_SKIP);
    if !args.debug {
        build.arg("--release");
    }
    run_cmd(&mut build)?;
    let gateway = target_dir()?.join(profile).join("gateway");

    if demo {
        let listener = demo_upstream::bind(DEMO_UPSTREAM_ADDR)
            .context("the demo upstream needs 127.0.0.1:8081 (is another one running?)")?;
        eprintln!("xtask: demo upstream listening on {DEMO_UPSTREAM_ADDR}");
        // Lives until we exit, which is when the gateway has exited.
        demo_upstream::spawn(listener);
    }

    install_signal_forwarding();
    let mut cmd = Command::new(&gateway);
    cmd.arg("run")
        .arg("--config")
        .arg(&config)
        .current_dir(&root)
        .process_group(0);
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    eprintln!("xtask: $ {}", crate::display_cmd(&cmd));
    if args.config.is_none() {
        eprintln!(
            "xtask: try:  curl -i http://127.0.0.1:8080/api/hello\n\
             xtask:       curl http://127.0.0.1:9901/metrics\n\
             xtask: Ctrl-C drains and stops the gateway (twice: at once)"
        );
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {}", gateway.display()))?;
    let pid = i32::try_from(child.id()).context("pid out of range")?;
    CHILD.store(pid, Ordering::SeqCst);
    let pending = PENDING.swap(0, Ordering::SeqCst);
    if pending != 0 {
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(pid, pending) };
    }
    let status = child.wait().context("waiting for the gateway")?;
    CHILD.store(0, Ordering::SeqCst);

    if let Some(code) = status.code() {
        if code != 0 {
            eprintln!("xtask: gateway exited with status {code}");
        }
        return Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)));
    }
    let sig = status.signal().unwrap_or(0);
    eprintln!("xtask: gateway killed by signal {sig}");
    Ok(ExitCode::from(u8::try_from(128 + sig).unwrap_or(1)))
}

fn install_signal_forwarding() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only does atomic loads/stores and kill(2), all async-signal-safe;
        // SA_RESTART keeps our waitpid going.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = forward_signal as *const () as libc::sighandler_t;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(sig, &action, std::ptr::null_mut());
        }
    }
}
