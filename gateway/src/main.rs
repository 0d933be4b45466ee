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
    Run,
    /// Validate a config file, like `nginx -t`: exit 0, or 1 with every error.
    Check,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let Some(config_path) = cli.config else {
        eprintln!("gateway: --config PATH is required (see gateway --help)");
        return ExitCode::from(2);
    };
    match cli.command.unwrap_or(Command::Run) {
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
        Command::Run => {
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
            let code = match run(loaded) {
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

fn run(loaded: LoadedConfig) -> anyhow::Result<ExitCode> {
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

    let access = Target::from_config(&config.log.access);
    let log = LogWriter::start(access).context("opening the access log")?;
    // The XDP guard first: whether it attached decides what user space must enforce.
    let ports = gateway::xdp::listener_ports(&config);
    let xdp = match config.xdp.mode {
        XdpMode::Off => None,
        mode => {
            let want = match mode {
                XdpMode::Native => gateway::xdp::XdpMode::Native,
                XdpMode::Generic => gateway::xdp::XdpMode::Generic,
                _ => gateway::xdp::XdpMode::Auto,
            };
            let interfaces = config.xdp.interfaces();
            let options =
                gateway::xdp::GuardOptions::for_tracked_sources(config.xdp.max_tracked_ips);
            match gateway::xdp::XdpGuard::start(
                &interfaces,
                want,
                Some(&config.xdp.pin_path),
                &options,
                &config.limits,
                &ports,
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
    let control = Control::new(shared.clone(), config_path, Some(log.clone()), dns);
    *control.xdp.lock().unwrap_or_else(|e| e.into_inner()) = xdp;

    // The admin server is up before the workers so probes see "starting" (503 on
    // /ready) rather than a refused connection.
    let admin_addr = config.admin.listen.clone();
    let admin = std::net::TcpListener::bind(&admin_addr)
        .with_context(|| format!("binding the admin listener {admin_addr}"))?;
    admin.set_nonblocking(true)?;
    {
        let _entered = runtime.enter();
        let admin = tokio::net::TcpListener::from_std(admin)?;
        runtime.spawn(gateway::control::admin::serve(admin, control.clone()));
        runtime.spawn(control.clone().refresh_names());
        runtime.spawn(control.clone().sync_global_limits());
    }

    // Signal handlers before the workers start: a SIGTERM during start-up then drains
    // (there is nothing yet) instead of killing the process with the default action.
    let (mut hup, mut term, mut int) = {
        use tokio::signal::unix::{signal, SignalKind};
        let _entered = runtime.enter();
        (
            signal(SignalKind::hangup())?,
            signal(SignalKind::terminate())?,
            signal(SignalKind::interrupt())?,
        )
    };

    let (drain_tx, drain_rx) = tokio::sync::watch::channel(false);
    let (done_tx, done_rx) = mpsc::channel();
    let _ = gateway::telemetry::metrics::IO_DRIVER.set(driver.as_str());
    let handles = gateway::dataplane::worker::start(
        driver,
        workers,
        shared.clone(),
        Some(log.clone()),
        drain_rx,
        done_tx,
    )?;

    let code = runtime.block_on(async {
        tracing::info!(workers, driver = driver.as_str(), listeners = ?config.listeners.iter().map(|l| l.get_ref().listen.clone()).collect::<Vec<_>>(), admin = %admin_addr, max_connections = shared.snapshot().server.max_connections, nofile = gateway::util::budget::nofile(), "gateway started");

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
                _ = term.recv() => break,
                _ = int.recv() => break,
            }
        }

        // Drain: not ready at once; after `shutdown_delay` (time for load balancers to
        // notice) stop accepting and let in-flight work finish within `graceful_timeout`.
        shared.draining.store(true, std::sync::atomic::Ordering::SeqCst);
        let snap = shared.snapshot();
        let delay = snap.config.server.shutdown_delay.0;
        let graceful = snap.server.graceful_timeout;
        tracing::info!(?delay, ?graceful, "draining");
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = term.recv() => return Ok::<_, anyhow::Error>(ExitCode::from(1)),
            _ = int.recv() => return Ok(ExitCode::from(1)),
        }
        let _ = drain_tx.send(true);
        let deadline = Instant::now() + graceful + Duration::from_secs(1);
        let mut finished = 0;
        while finished < workers && Instant::now() < deadline {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(10)) => {
                    while done_rx.try_recv().is_ok() {
                        finished += 1;
                    }
                }
                _ = term.recv() => return Ok(ExitCode::from(1)),
                _ = int.recv() => return Ok(ExitCode::from(1)),
            }
        }
        tracing::info!("stopped");
        Ok(ExitCode::SUCCESS)
    })?;
    log.flush();
    drop(handles);
    // Worker threads may still hold sockets with operations in flight; the process is
    // done with them.
    flush_diagnostics();
    std::process::exit(if code == ExitCode::SUCCESS { 0 } else { 1 });
}
