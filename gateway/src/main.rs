//! The `gateway` binary: command line, start-up order, signals, and shutdown.

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use gateway::config::{Config, IoDriver, LoadedConfig, StderrFormat, XdpMode};
use gateway::control::Control;
use gateway::io::driver::DriverKind;
use gateway::telemetry::access_log::{LogWriter, Target};
use gateway::upstream::dns::Dns;
use gateway::{dataplane::shared::Shared, snapshot::Snapshot};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(
    name = "gateway",
    version,
    about = "Edge reverse proxy: io_uring data plane, XDP guard, Prometheus control plane"
)]
struct Cli {
    /// Config file (same as `gateway run --config PATH`).
    #[arg(long, global = true, value_name = "PATH")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run in the foreground.
    Run {
        /// Take the listeners over from the gateway running on `server.upgrade_socket`
        /// (a binary upgrade: it drains once this process is ready).
        #[arg(long)]
        upgrade: bool,
        /// Like --upgrade when a gateway listens on `server.upgrade_socket`, else a plain
        /// start (for a DaemonSet pod that may or may not replace one on its node).
        #[arg(long, conflicts_with = "upgrade")]
        upgrade_if_running: bool,
        /// After handing over to a new process and draining, keep running (idle) until
        /// SIGTERM instead of exiting: for a container, whose exit would be restarted.
        #[arg(long)]
        stay_after_handover: bool,
    },
    /// Validate a config file, like `nginx -t`: exit 0, or 1 with every error.
    Check,
}

fn main() -> ExitCode {
    gateway::protocol::tls::install_process_default();
    let cli = Cli::parse();
    let Some(config_path) = cli.config else {
        eprintln!("gateway: --config PATH is required (see gateway --help)");
        return ExitCode::from(2);
    };
    match cli.command.unwrap_or(Command::Run {
        upgrade: false,
        upgrade_if_running: false,
        stay_after_handover: false,
    }) {
        // The certificates are read by the snapshot build, as a start or a reload reads
        // them: `check` builds it too (generation 0, never served).
        Command::Check => match Config::load(&config_path).and_then(check_snapshot) {
            Ok(_) => {
                println!(
                    "gateway: the configuration file {} syntax is ok",
                    config_path.display()
                );
                ExitCode::SUCCESS
            }
            Err(errors) => {
                for e in &errors.0 {
                    eprintln!("gateway: {e}");
                }
                eprintln!(
                    "gateway: configuration file {} test failed ({} error(s))",
                    config_path.display(),
                    errors.0.len()
                );
                ExitCode::from(1)
            }
        },
        Command::Run {
            upgrade,
            upgrade_if_running,
            stay_after_handover,
        } => {
            let upgrade = match (upgrade, upgrade_if_running) {
                (true, _) => Upgrade::Required,
                (_, true) => Upgrade::IfRunning,
                _ => Upgrade::No,
            };
            let loaded = match Config::load(&config_path) {
                Ok(l) => l,
                Err(errors) => {
                    for e in &errors.0 {
                        eprintln!("gateway: {e}");
                    }
                    return ExitCode::from(1);
                }
            };
            init_tracing(&loaded.config);
            let code = match run(loaded, upgrade, stay_after_handover) {
                Ok(code) => code,
                Err(e) => {
                    tracing::error!("{e:#}");
                    ExitCode::from(1)
                }
            };
            flush_diagnostics();
            code
        }
    }
}

/// `gateway check`: resolves the upstream names (a required one that does not resolve is an
/// error, as at start) and builds the snapshot, as a start does.
fn check_snapshot(loaded: LoadedConfig) -> Result<Snapshot, gateway::config::ConfigErrors> {
    let runtime_error = |message: String| {
        gateway::config::ConfigErrors(vec![gateway::config::ConfigError {
            file: loaded.path.clone(),
            line: 0,
            key: "resolver".into(),
            message,
        }])
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| runtime_error(e.to_string()))?;
    let dns = Dns::new();
    runtime.block_on(dns.resolve_config(&loaded))?;
    Snapshot::build_resolved(loaded, 0, None, &|name| dns.resolved(name))
}

/// Lines the diagnostic log holds for a slow stderr reader before it drops them.
const LOG_QUEUE_LINES: usize = 4096;

/// The writer thread's guard: dropping it flushes what is queued, for at most about a
/// second (tracing-appender bounds the wait), so an exit never hangs on a stalled stderr.
static LOG_GUARD: std::sync::Mutex<Option<tracing_appender::non_blocking::WorkerGuard>> =
    std::sync::Mutex::new(None);

/// The diagnostic log goes through a lossy queue to a writer thread of its own: with stderr
/// a pipe whose reader stalled (journald, a container log shipper), a worker or the signal
/// and drain path that logs must not block in write(2). Lines that do not fit are dropped
/// and counted (`gateway_log_lines_dropped_total`).
fn init_tracing(config: &Config) {
    use tracing_subscriber::EnvFilter;
    // The resolver library logs a line per malformed DNS datagram: a hostile or broken
    // name server could fill the log. Its errors still show; `dns.rs` logs failures itself,
    // rate-limited. A level string that names hickory explicitly wins.
    let level = if config.log.level.contains("hickory") {
        config.log.level.clone()
    } else {
        format!(
            "{},hickory_proto=error,hickory_resolver=error",
            config.log.level
        )
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&level));
    use std::io::IsTerminal;
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(LOG_QUEUE_LINES)
        .thread_name("stderr-log")
        .finish(std::io::stderr());
    gateway::telemetry::register_log_drops(writer.error_counter());
    *LOG_GUARD.lock().unwrap_or_else(|e| e.into_inner()) = Some(guard);
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(writer);
    match config.log.stderr_format {
        StderrFormat::Json => builder.json().init(),
        StderrFormat::Text => builder.init(),
    }
}

/// Flushes the diagnostic log before exit, bounded (see [`LOG_GUARD`]).
fn flush_diagnostics() {
    drop(LOG_GUARD.lock().unwrap_or_else(|e| e.into_inner()).take());
}

/// Raises RLIMIT_NOFILE towards `want`, stopping at the hard limit with a warning (raising
/// the hard limit needs CAP_SYS_RESOURCE, which an edge node often does not grant).
fn raise_nofile(want: u64) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid rlimit struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return;
        }
        let target = want.min(limit.rlim_max);
        if target < want {
            tracing::warn!(
                wanted = want,
                hard_limit = limit.rlim_max,
                "server.nofile is above the hard limit; using the hard limit"
            );
        }
        if target > limit.rlim_cur {
            let before = limit.rlim_cur;
            limit.rlim_cur = target;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                tracing::warn!(error = %std::io::Error::last_os_error(), "cannot raise RLIMIT_NOFILE");
                limit.rlim_cur = before;
            }
        }
        // The data plane keeps descriptors in reserve below this limit, and an unset
        // `max_connections` is derived from it (crate::util::budget).
        gateway::util::budget::set_nofile(limit.rlim_cur);
    }
}

/// Whether this start takes over from a running gateway.
#[derive(Clone, Copy, PartialEq)]
enum Upgrade {
    No,
    Required,
    IfRunning,
}

/// The signals that drain and stop the gateway: SIGTERM and SIGINT (the contract), and
/// SIGQUIT, nginx's graceful stop (`nginx -s quit`), so that a supervisor set up the nginx
/// way (`KillSignal=SIGQUIT`) drains instead of waiting out its stop timeout and killing.
struct StopSignals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    quit: tokio::signal::unix::Signal,
}

impl StopSignals {
    /// Installs the handlers; call inside the runtime.
    fn listen() -> std::io::Result<StopSignals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(StopSignals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            quit: signal(SignalKind::quit())?,
        })
    }

    /// The next of them.
    async fn recv(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
            _ = self.quit.recv() => {}
        }
    }
}

/// SIGUSR2: starts `exe run --config CONFIG --upgrade`, as nginx's USR2 starts a new
/// master: the new binary (the file now at the path this process was started from) takes
/// over, and is a child of this process, so it runs in the same service (systemd cgroup)
/// and reports itself as its main process (`MAINPID=`, see `control::upgrade::notify`).
fn spawn_upgrade(exe: &std::path::Path, config: &std::path::Path) {
    let started = std::process::Command::new(exe)
        .arg("run")
        .arg("--config")
        .arg(config)
        .arg("--upgrade")
        .stdin(std::process::Stdio::null())
        .spawn();
    match started {
        Ok(mut child) => {
            tracing::info!(pid = child.id(), exe = %exe.display(), "SIGUSR2: started the binary to take over");
            // Reaps it; a new process that fails before the handover says why in its own
            // log lines (same stderr), and this one keeps serving.
            let _ = std::thread::Builder::new()
                .name("upgrade-child".into())
                .spawn(move || match child.wait() {
                    Ok(status) if !status.success() => tracing::error!(%status, "the new binary exited without taking over; this process keeps serving"),
                    _ => {}
                });
        }
        Err(e) => {
            tracing::error!(exe = %exe.display(), error = %e, "SIGUSR2: cannot start the new binary")
        }
    }
}

fn run(
    loaded: LoadedConfig,
    upgrade: Upgrade,
    stay_after_handover: bool,
) -> anyhow::Result<ExitCode> {
    // The path this binary was started from, read before an upgrade replaces the file.
    let exe = std::env::current_exe().context("reading /proc/self/exe")?;
    let config = loaded.config.clone();
    let config_path = loaded.path.clone();
    raise_nofile(config.server.nofile);
    // The control plane's own runtime: admin server, signals, reloads, and the resolver
    // of upstream names (first used right below, before any worker starts).
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .thread_name("control")
        .build()?;
    let dns = Dns::new();
    runtime
        .block_on(dns.resolve_config(&loaded))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    // Before anything is started: it reads the certificates, and a bad one stops here.
    // After `raise_nofile`: an unset max_connections derives from the limit.
    let snapshot = Snapshot::build_resolved(loaded, 1, None, &|name| dns.resolved(name))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let driver = match (config.server.io, gateway::io::driver::uring_available()) {
        (IoDriver::Epoll, _) => DriverKind::Epoll,
        (IoDriver::Uring, Ok(())) | (IoDriver::Auto, Ok(())) => DriverKind::Uring,
        (IoDriver::Uring, Err(e)) => {
            anyhow::bail!("server.io = \"uring\" but io_uring is unavailable: {e}")
        }
        (IoDriver::Auto, Err(e)) => {
            tracing::warn!(error = %e, "io_uring is unavailable (seccomp or kernel.io_uring_disabled?): using the epoll driver");
            DriverKind::Epoll
        }
    };

    // Binary upgrade, step 1: the running process's sockets. The config was loaded and
    // the snapshot built (certificates read) before the old process is contacted, so a
    // bad config fails here and the old process never notices.
    let path = &config.server.upgrade_socket;
    let mut handover = match upgrade {
        Upgrade::No => None,
        Upgrade::Required if path.as_os_str().is_empty() => {
            anyhow::bail!("upgrade: server.upgrade_socket is empty (upgrades are off)")
        }
        Upgrade::IfRunning if path.as_os_str().is_empty() => None,
        Upgrade::Required => Some(
            gateway::control::upgrade::take_over(path)
                .map_err(|e| anyhow::anyhow!("upgrade: {e}"))?,
        ),
        Upgrade::IfRunning => match gateway::control::upgrade::take_over_if_running(path)
            .map_err(|e| anyhow::anyhow!("upgrade: {e}"))?
        {
            Some(h) => Some(h),
            None => {
                tracing::info!(path = %path.display(), "upgrade: no gateway listens on the upgrade socket; starting afresh");
                None
            }
        },
    };
    let mut handover = if let Some(handover) = handover.take() {
        tracing::info!(
            from_generation = handover.old_generation,
            listeners = handover.listeners.len(),
            "upgrade: listening sockets received"
        );
        if std::env::var_os("GATEWAY_UPGRADE_TEST_ABORT").is_some() {
            // For the failure test: a process killed mid-handover. Harmless in production:
            // it only makes this new process exit, as a kill would.
            std::process::abort();
        }
        gateway::telemetry::metrics::PROCESS_GENERATION.store(
            handover.old_generation + 1,
            std::sync::atomic::Ordering::Relaxed,
        );
        Some(handover)
    } else {
        None
    };
    let generation =
        gateway::telemetry::metrics::PROCESS_GENERATION.load(std::sync::atomic::Ordering::Relaxed);

    let access = Target::from_config(&config.log.access);
    let log = LogWriter::start(access).context("opening the access log")?;
    // The XDP guard first: whether it attached decides what user space must enforce.
    // In an upgrade (step 4) it replaces the old program on the links handed over.
    let ports = gateway::xdp::listener_ports(&config);
    let handed_links = handover
        .as_mut()
        .map(|h| std::mem::take(&mut h.xdp))
        .unwrap_or_default();
    // A handed link this process does not take detaches when the old process exits.
    let drop_pins = || {
        for (_, pin) in &handed_links {
            let _ = std::fs::remove_file(pin);
        }
    };
    let xdp = match config.xdp.mode {
        XdpMode::Off => {
            drop_pins();
            None
        }
        mode => {
            let want = match mode {
                XdpMode::Native => gateway::xdp::XdpMode::Native,
                XdpMode::Generic => gateway::xdp::XdpMode::Generic,
                _ => gateway::xdp::XdpMode::Auto,
            };
            let interfaces = config.xdp.interfaces();
            let options =
                gateway::xdp::GuardOptions::for_tracked_sources(config.xdp.max_tracked_ips);
            match gateway::xdp::XdpGuard::start_taking_over(
                &interfaces,
                want,
                Some(&config.xdp.pin_path),
                &options,
                &config.limits,
                &ports,
                &handed_links,
            ) {
                Ok(guard) => {
                    tracing::info!(
                        ?interfaces,
                        program_id = guard.program_id(),
                        "XDP guard attached"
                    );
                    Some(guard)
                }
                Err(e) if mode == XdpMode::Auto => {
                    drop_pins();
                    tracing::warn!(error = %e.detail(), "XDP unavailable: per-IP limits are enforced in user space at accept");
                    None
                }
                Err(e) => anyhow::bail!("attaching the XDP program: {}", e.detail()),
            }
        }
    };
    let cap_sink: Option<Arc<dyn gateway::policy::limits::CapSink>> = xdp.as_ref().and_then(|g| match g.cap_marker() {
        Ok(marker) => Some(Arc::new(marker) as Arc<dyn gateway::policy::limits::CapSink>),
        Err(e) => {
            tracing::warn!(error = %e.detail(), "XDP connection-cap marks unavailable: the cap is enforced at accept only");
            None
        }
    });
    let conn_limiter = gateway::policy::limits::ConnLimiter::new(
        &config.limits,
        gateway::policy::limits::Enforcement {
            // Without the ledger user space charges every connection (never too few).
            xdp: xdp.as_ref().and_then(|g| match g.charge_ledger() {
                Ok(ledger) => Some(Arc::new(ledger) as Arc<dyn gateway::policy::limits::XdpLedger>),
                Err(e) => {
                    tracing::warn!(error = %e.detail(), "XDP charge ledger unavailable: conn_rate is also charged at accept");
                    None
                }
            }),
        },
        cap_sink,
    );

    let shared = Shared::new(snapshot, conn_limiter);
    // [limits.global]: sources over the fleet's rate lose their SYNs in the kernel too.
    match xdp.as_ref().map(|g| g.fleet_marker()) {
        Some(Ok(marker)) => shared.global_limit.set_sink(Arc::new(marker)),
        Some(Err(e)) => {
            tracing::warn!(error = %e.detail(), "XDP fleet-wide verdicts unavailable: [limits.global] is enforced per request only")
        }
        None => {}
    }

    let workers = config.effective_workers();
    let control = Control::new(shared.clone(), config_path.clone(), Some(log.clone()), dns);
    *control.xdp.lock().unwrap_or_else(|e| e.into_inner()) = xdp;

    // The admin server is up before the workers so probes see "starting" (503 on
    // /ready) rather than a refused connection.
    // An upgrade takes the old process's admin socket when the address did not change.
    let admin_addr = config.admin.listen.clone();
    let (inherited, inherited_admin) = match handover {
        Some(ref mut h) => (std::mem::take(&mut h.listeners), h.admin.take()),
        None => (Vec::new(), None),
    };
    let admin = match inherited_admin {
        Some((addr, fd)) if admin_addr.parse() == Ok(addr) => std::net::TcpListener::from(fd),
        _ => std::net::TcpListener::bind(&admin_addr)
            .with_context(|| format!("binding the admin listener {admin_addr}"))?,
    };
    admin.set_nonblocking(true)?;
    let admin_fd = std::os::fd::AsRawFd::as_raw_fd(&admin);
    let admin_task = {
        let _entered = runtime.enter();
        let admin = tokio::net::TcpListener::from_std(admin)?;
        runtime.spawn(control.clone().refresh_names());
        runtime.spawn(control.clone().sync_global_limits());
        runtime.spawn(gateway::control::admin::serve(admin, control.clone()))
    };

    // Signal handlers before the workers start: a SIGTERM during start-up then drains
    // (there is nothing yet) instead of killing the process with the default action.
    let (mut hup, mut stop) = {
        use tokio::signal::unix::{signal, SignalKind};
        let _entered = runtime.enter();
        (signal(SignalKind::hangup())?, StopSignals::listen()?)
    };
    let mut usr2 = {
        let _entered = runtime.enter();
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined2())?
    };

    let (drain_tx, drain_rx) = tokio::sync::watch::channel(false);
    let (done_tx, done_rx) = mpsc::channel();
    let _ = gateway::telemetry::metrics::IO_DRIVER.set(driver.as_str());
    // Step 3 of an upgrade: the workers take the inherited sockets (binding what the
    // config adds) but accept nothing until the old process drains.
    shared.set_accepting(false);
    let handles = gateway::dataplane::worker::start(
        driver,
        workers,
        shared.clone(),
        Some(log.clone()),
        drain_rx,
        done_tx,
        inherited,
    )?;
    let upgraded = handover.is_some();
    if let Some(handover) = handover {
        // Step 5. Until the old process says "draining", a failure exits here with
        // nothing accepted, and the old process goes on as before.
        if std::env::var_os("GATEWAY_UPGRADE_TEST_FAIL_DRAIN").is_some() {
            // For the failure test: "drain" does not get through after the workers
            // started on the inherited sockets, and this process exits 1. Harmless in
            // production: it only makes this new process give up, as a failed send would.
            anyhow::bail!("upgrade: telling the old process to drain: test failure");
        }
        handover
            .finish()
            .map_err(|e| anyhow::anyhow!("upgrade: {e}"))?;
    }
    // The upgrade socket before accepting (and `/ready` 200), so the next upgrade can
    // begin as soon as this process says it is ready. After a handover the old process
    // closed its listener before it answered "draining": the path is free.
    let (upgrade_tx, mut upgrade_rx) = tokio::sync::mpsc::unbounded_channel();
    let upgrade_path = config.server.upgrade_socket.clone();
    if !upgrade_path.as_os_str().is_empty() {
        match gateway::control::upgrade::listen(&upgrade_path) {
            Ok(listener) => {
                let control = control.clone();
                std::thread::Builder::new()
                    .name("upgrade".into())
                    .spawn(move || {
                        gateway::control::upgrade::serve(
                            listener, control, admin_fd, generation, upgrade_tx,
                        )
                    })?;
            }
            Err(e) => {
                tracing::error!(path = %upgrade_path.display(), error = %e, "cannot listen on the upgrade socket: binary upgrades are unavailable")
            }
        }
    }
    shared.set_accepting(true);
    if upgraded {
        tracing::info!(
            generation,
            "upgrade: the old process drains; this one serves"
        );
    }
    // systemd (Type=notify): ready, and after an upgrade this process is the service's
    // main process now.
    gateway::control::upgrade::notify(&format!("MAINPID={}\nREADY=1", std::process::id()));

    let code = runtime.block_on(async {
        tracing::info!(generation, workers, driver = driver.as_str(), listeners = ?config.listeners.iter().map(|l| l.get_ref().listen.clone()).collect::<Vec<_>>(), admin = %admin_addr, max_connections = shared.snapshot().server.max_connections, nofile = gateway::util::budget::nofile(), "gateway started");

        // Freed heap memory goes back to the kernel after a burst (see util::memory: a
        // flood of aborted requests otherwise left RSS at its peak for good).
        let mut trimmer = gateway::util::memory::Trimmer::new();
        let mut trim_tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = trim_tick.tick() => {
                    trimmer.tick();
                }
                _ = hup.recv() => {
                    // Not awaited: this loop must keep listening for SIGTERM, which drains
                    // even while a reload (stalled on a slow file, say) is still running.
                    let control = control.clone();
                    tokio::task::spawn_blocking(move || control.reload());
                }
                _ = usr2.recv() => spawn_upgrade(&exe, &config_path),
                _ = stop.recv() => break,
                Some(_) = upgrade_rx.recv() => {
                    // A new process serves the sockets now: no `shutdown_delay` (the node
                    // stays in service), and the admin socket is its too.
                    shared.handed_over.store(true, std::sync::atomic::Ordering::SeqCst);
                    admin_task.abort();
                    break;
                }
            }
        }
        let handed_over = shared.handed_over.load(std::sync::atomic::Ordering::SeqCst);

        // Drain: not ready at once; after `shutdown_delay` (time for load balancers to
        // notice) stop accepting and let in-flight work finish within `graceful_timeout`.
        shared.draining.store(true, std::sync::atomic::Ordering::SeqCst);
        let snap = shared.snapshot();
        let delay = if handed_over { Duration::ZERO } else { snap.config.server.shutdown_delay.0 };
        let graceful = snap.server.graceful_timeout;
        tracing::info!(?delay, ?graceful, "draining");
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.recv() => return Ok::<_, anyhow::Error>(ExitCode::from(1)),
        }
        let _ = drain_tx.send(true);
        let deadline = Instant::now() + graceful + Duration::from_secs(1);
        let mut finished = 0;
        // After a handover the first SIGTERM/SIGINT is the one that stops the process
        // (a DaemonSet deleting the old pod, systemd stopping a leftover): the drain
        // goes on; only a second one cuts it.
        let mut stop_asked = !handed_over;
        while finished < workers && Instant::now() < deadline {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(10)) => {
                    while done_rx.try_recv().is_ok() {
                        finished += 1;
                    }
                }
                _ = stop.recv() => if std::mem::replace(&mut stop_asked, true) { return Ok(ExitCode::from(1)) },
            }
        }
        if handed_over && stay_after_handover && !stop_asked {
            // A container's main process: exiting would make the kubelet restart it,
            // and the restarted gateway take the node back from its successor.
            tracing::info!(generation, "drained after the handover; waiting for SIGTERM");
            stop.recv().await;
        }
        tracing::info!(generation, "stopped");
        Ok(ExitCode::SUCCESS)
    })?;
    log.flush();
    drop(handles);
    // Worker threads may still hold sockets with operations in flight; the process is
    // done with them.
    flush_diagnostics();
    std::process::exit(if code == ExitCode::SUCCESS { 0 } else { 1 });
}
