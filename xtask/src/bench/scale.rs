//! `cargo xtask bench --only scale` (issue 13, "Scale"): 10,000 keep-alive clients and
//! 2,000 WebSocket tunnels at the same time, on 2 workers, against the gateway (and the
//! baseline build, when given) and nginx with the reference config, one after the other.
//!
//! Descriptors (the hard `RLIMIT_NOFILE` here is 20,000, per process):
//! - the clients run in `--scale-processes` processes of `scale-load clients` (2 by default:
//!   6,000 descriptors each);
//! - the origin (`scale-load origin`, its own process) holds one per tunnel plus the
//!   proxies' keep-alive pools;
//! - the gateway holds a client socket per connection and an upstream socket per tunnel:
//!   10,000 + 2,000 + 2,000 = 14,000, plus its pool and fixed descriptors. A spliced tunnel
//!   would add two pipes (4 descriptors): 8,000 more, 22,000 in all, which does not fit.
//!   So both loads run at once with `max_connections` set to the connections held, which
//!   leaves no pipe budget (`nofile − 128 − 2 × max_connections` < 0): every tunnel copies.
//!   Running them in two phases would splice, but would not be the "at the same time" the
//!   issue asks for; the splice path has its own figures (`tunnels`).
//! - nginx: 2 worker processes, each under the same 20,000 (`worker_rlimit_nofile` set to
//!   the hard limit, not the reference's 65535, which root could raise past it).
//!
//! Every keep-alive client sends `GET /api/small` once a second and every tunnel one
//! 32-byte frame a second (echoed by the origin); 2 probe connections per client process
//! send every 100 ms. Once every connection is up, latencies are recorded for the hold
//! (`--duration`, at least 10 s); 3 s into it the proxy's RSS, its open descriptors and the
//! kernel's socket memory are sampled (`ss -tm` skmem of its client sockets, and of its
//! upstream sockets, apart). Memory per connection = growth over the idle proxy / (clients
//! + tunnels). No CPU pinning: 2 workers and the load share the machine's 2 CPUs.

use super::{rss_kib, socket_memory_bytes, wait_port, Args};
use crate::workspace_root;
use anyhow::{bail, Context, Result};
use gateway_benches::scale::{percentiles_ms, LoadReport};
use gateway_test_support::{free_addr, stop_child};
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

/// Workers of every contender, as the issue asks.
const WORKERS: usize = 2;
/// Probe connections per client process.
const PROBES: usize = 2;

/// One contender's figures.
pub struct ScaleResult {
    pub name: String,
    pub report: LoadReport,
    pub ramp: Duration,
    pub rss_idle_kib: u64,
    pub rss_loaded_kib: u64,
    /// Kernel memory of the proxy's client sockets and of its upstream sockets, bytes.
    pub client_socket_bytes: u64,
    pub upstream_socket_bytes: u64,
    /// The proxy's open descriptors (all its processes) while loaded.
    pub fds: usize,
}

/// Runs the scale load against each contender in turn.
pub fn run(
    args: &Args,
    gateway_bin: &Path,
    nginx: &Path,
    scratch: &Path,
) -> Result<Vec<ScaleResult>> {
    let load_bin = super::bench_bin("scale-load")?;
    let dir = scratch.join("scale");
    std::fs::create_dir_all(dir.join("ng/body"))?;
    std::fs::create_dir_all(dir.join("ng/proxy"))?;
    let mut contenders: Vec<(&str, Option<PathBuf>)> = vec![("gateway", Some(gateway_bin.into()))];
    if let Some(b) = &args.baseline_bin {
        contenders.push(("baseline", Some(b.clone())));
    }
    contenders.push(("nginx", None));
    let mut results = Vec::new();
    for (name, bin) in contenders {
        eprintln!(
            "xtask bench: scale, {name}: {} keep-alive clients + {} tunnels, {WORKERS} workers",
            args.scale_clients, args.scale_tunnels
        );
        let r = run_one(args, name, bin.as_deref(), nginx, &load_bin, &dir)
            .with_context(|| format!("scale load against {name}"))?;
        let (p50, p99, max) = percentiles_ms(&r.report.keepalive_us);
        eprintln!(
            "  {name:8} up {}+{} in {:.1} s, errors {}, keep-alive p50 {p50:.2} p99 {p99:.2} max {max:.2} ms, \
             RSS +{} KiB, {} fds",
            r.report.keepalive_up,
            r.report.tunnels_up,
            r.ramp.as_secs_f64(),
            r.report.errors,
            r.rss_loaded_kib.saturating_sub(r.rss_idle_kib),
            r.fds
        );
        for e in &r.report.error_samples {
            eprintln!("    failure: {e}");
        }
        results.push(r);
    }
    Ok(results)
}

struct Loader {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Loader {
    /// The next stdout line (blocking: the load tool's ramp ends within its connect and
    /// upgrade timeouts, 10 s per connection), or an error naming what was awaited.
    fn line(&mut self, what: &str) -> Result<String> {
        let mut line = String::new();
        let n = self.stdout.read_line(&mut line)?;
        if n == 0 {
            bail!("scale-load exited before {what}");
        }
        Ok(line.trim_end().to_string())
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        stop_child(&mut self.child, Duration::from_secs(5));
    }
}

fn run_one(
    args: &Args,
    name: &str,
    gateway: Option<&Path>,
    nginx: &Path,
    load_bin: &Path,
    dir: &Path,
) -> Result<ScaleResult> {
    // The origin, its own process (its descriptors are its own).
    let mut origin = Command::new(load_bin)
        .arg("origin")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting scale-load origin")?;
    let mut origin_out = BufReader::new(origin.stdout.take().context("origin stdout")?);
    let mut line = String::new();
    origin_out.read_line(&mut line)?;
    let origin_addr: SocketAddr = line
        .trim()
        .strip_prefix("listening ")
        .context("origin did not say where it listens")?
        .parse()?;
    let _origin_guard = ChildGuard(origin);

    let connections = args.scale_clients + args.scale_tunnels + PROBES * args.scale_processes;
    let listen = free_addr();
    let mut proxy = match gateway {
        Some(bin) => start_gateway(bin, dir, name, listen, origin_addr, connections)?,
        None => start_nginx(nginx, dir, listen, origin_addr)?,
    };
    wait_port(listen)?;
    let pid = proxy.0.id();
    // Settle, then the idle figure.
    std::thread::sleep(Duration::from_millis(500));
    let rss_idle_kib = rss_kib(pid, "VmRSS:");
    let client_before = socket_memory_bytes(listen.port())?;
    let upstream_before = upstream_socket_memory_bytes(origin_addr.port())?;

    let started = Instant::now();
    let processes = args.scale_processes.max(1);
    let mut loaders = Vec::new();
    for i in 0..processes {
        let share = |n: usize| n / processes + usize::from(i < n % processes);
        let mut child = Command::new(load_bin)
            .arg("clients")
            .args(["--target", &listen.to_string()])
            .args(["--keepalive", &share(args.scale_clients).to_string()])
            .args(["--tunnels", &share(args.scale_tunnels).to_string()])
            .args(["--probes", &PROBES.to_string()])
            .args(["--interval-ms", "1000", "--probe-interval-ms", "100"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting scale-load clients")?;
        let stdin = child.stdin.take().context("clients stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("clients stdout")?);
        loaders.push(Loader {
            child,
            stdin,
            stdout,
        });
    }
    for l in &mut loaders {
        let said = l.line("ramping up")?;
        if said != "ramped" {
            bail!("scale-load said {said:?} instead of \"ramped\"");
        }
    }
    let ramp = started.elapsed();
    for l in &mut loaders {
        writeln!(l.stdin, "measure")?;
    }
    let hold = Duration::from_secs(args.duration.max(10));
    let sample_at = Duration::from_secs(3);
    std::thread::sleep(sample_at);
    let rss_loaded_kib = rss_kib(pid, "VmRSS:");
    let client_socket_bytes = socket_memory_bytes(listen.port())?.saturating_sub(client_before);
    let upstream_socket_bytes =
        upstream_socket_memory_bytes(origin_addr.port())?.saturating_sub(upstream_before);
    let fds = gateway_benches::process_tree(pid)
        .iter()
        .filter_map(|p| std::fs::read_dir(format!("/proc/{p}/fd")).ok())
        .map(|d| d.count())
        .sum();
    std::thread::sleep(hold.saturating_sub(sample_at));
    let mut report = LoadReport::default();
    for l in &mut loaders {
        writeln!(l.stdin, "stop")?;
    }
    for l in &mut loaders {
        let said = l.line("its report")?;
        report.merge(LoadReport::parse(&said).context("scale-load's report does not parse")?);
    }
    drop(loaders);
    stop_child(&mut proxy.0, Duration::from_secs(10));
    Ok(ScaleResult {
        name: name.to_string(),
        report,
        ramp,
        rss_idle_kib,
        rss_loaded_kib,
        client_socket_bytes,
        upstream_socket_bytes,
        fds,
    })
}

/// Stops a child when dropped.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        stop_child(&mut self.0, Duration::from_secs(5));
    }
}

/// Kernel memory of the established sockets connected to `port` (the proxy's upstream
/// side of the tunnels and of its keep-alive pool), bytes.
fn upstream_socket_memory_bytes(port: u16) -> Result<u64> {
    super::ss_skmem_bytes(&format!("( dport = :{port} )"))
}

fn start_gateway(
    bin: &Path,
    dir: &Path,
    name: &str,
    listen: SocketAddr,
    origin: SocketAddr,
    connections: usize,
) -> Result<ChildGuard> {
    let admin = free_addr();
    // max_connections: every connection held, with room for the ones the harness makes.
    let max_connections = connections + 64;
    let conf = format!(
        "[server]\nworkers = {WORKERS}\nmax_connections = {max_connections}\nupgrade_socket = \"\"\n\n\
         [log]\naccess = \"off\"\nlevel = \"warn\"\n\n[admin]\nlisten = \"{admin}\"\n\n\
         [[listener]]\nname = \"http\"\nlisten = \"{listen}\"\n\n\
         [[upstream]]\nname = \"app\"\nservers = [\"{origin}\"]\nkeepalive = 32\n\n\
         [[route]]\npath_prefix = \"/ws\"\nupstream = \"app\"\nwebsocket = true\n\
         send_timeout = \"3600s\"\nread_timeout = \"3600s\"\n\n\
         [[route]]\npath_prefix = \"/api/\"\nupstream = \"app\"\n"
    );
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, conf)?;
    let child = Command::new(bin)
        .args(["run", "--config"])
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    Ok(ChildGuard(child))
}

fn start_nginx(
    nginx: &Path,
    dir: &Path,
    listen: SocketAddr,
    origin: SocketAddr,
) -> Result<ChildGuard> {
    let template =
        std::fs::read_to_string(workspace_root().join("tests/fixtures/nginx-reference.conf"))?;
    let conf = template
        .replace(
            "worker_rlimit_nofile 65535;",
            &format!("worker_rlimit_nofile {};", super::nofile_hard_limit()),
        )
        .replace("@WORKERS@", &WORKERS.to_string())
        .replace("@PREFIX@", &format!("{}/ng", dir.display()))
        .replace("@LISTEN@", &listen.to_string())
        .replace("@API_UPSTREAM@", &origin.to_string())
        .replace("@WS_UPSTREAM@", &origin.to_string());
    std::fs::write(dir.join("ng/nginx.conf"), conf)?;
    let child = super::spawn_nginx(nginx, &dir.join("ng"), None)
        .context("starting nginx with the reference config")?;
    Ok(ChildGuard(child))
}

/// The markdown table of the results.
pub fn table(args: &Args, results: &[ScaleResult]) -> String {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "\nScale: {} keep-alive clients (a request a second each) and {} WebSocket tunnels (a \
         32-byte echo a second each) at once, {WORKERS} workers, held {} s after all were up \
         (latency in ms; memory is growth over the idle proxy per connection held):\n",
        args.scale_clients,
        args.scale_tunnels,
        args.duration.max(10)
    );
    let _ = writeln!(
        t,
        "| proxy | up | errors | ramp s | keep-alive p50 / p99 / max | tunnel echo p50 / p99 / max | probe p50 / p99 / max | RSS KiB/conn | kernel socket KiB/conn: client + upstream | fds |"
    );
    let _ = writeln!(t, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in results {
        let held = (r.report.keepalive_up + r.report.tunnels_up).max(1) as f64;
        let fmt = |v: &[u32]| {
            let (a, b, c) = percentiles_ms(v);
            format!("{a:.2} / {b:.2} / {c:.1}")
        };
        let _ = writeln!(
            t,
            "| {} | {}+{} | {} | {:.1} | {} | {} | {} | {:.1} | {:.2} + {:.2} | {} |",
            r.name,
            r.report.keepalive_up,
            r.report.tunnels_up,
            r.report.errors,
            r.ramp.as_secs_f64(),
            fmt(&r.report.keepalive_us),
            fmt(&r.report.tunnel_us),
            fmt(&r.report.probe_us),
            r.rss_loaded_kib.saturating_sub(r.rss_idle_kib) as f64 / held,
            r.client_socket_bytes as f64 / 1024.0 / held,
            r.upstream_socket_bytes as f64 / 1024.0 / held,
            r.fds
        );
    }
    t
}

/// The results as JSON.
pub fn json(results: &[ScaleResult]) -> serde_json::Value {
    results
        .iter()
        .map(|r| {
            let p = |v: &[u32]| {
                let (a, b, c) = percentiles_ms(v);
                serde_json::json!({"p50_ms": a, "p99_ms": b, "max_ms": c, "samples": v.len()})
            };
            (
                r.name.clone(),
                serde_json::json!({
                    "keepalive_up": r.report.keepalive_up,
                    "tunnels_up": r.report.tunnels_up,
                    "errors": r.report.errors,
                    "error_samples": r.report.error_samples,
                    "ramp_s": r.ramp.as_secs_f64(),
                    "keepalive": p(&r.report.keepalive_us),
                    "tunnel": p(&r.report.tunnel_us),
                    "probe": p(&r.report.probe_us),
                    "rss_idle_kib": r.rss_idle_kib,
                    "rss_loaded_kib": r.rss_loaded_kib,
                    "client_socket_bytes": r.client_socket_bytes,
                    "upstream_socket_bytes": r.upstream_socket_bytes,
                    "fds": r.fds,
                }),
            )
        })
        .collect::<serde_json::Map<_, _>>()
        .into()
}
