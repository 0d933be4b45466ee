//! `cargo xtask bench`: the gateway against nginx on the same machine, in the same run.
//!
//! One fast upstream (nginx, one worker, static answers) serves every contender: nginx with
//! the reference config (`tests/fixtures/nginx-reference.conf`, the contract's front), the
//! gateway with the equivalent config, and HAProxy (the proxy users would pick instead)
//! doing the same header work with `http-reuse always`; same worker count, access logs
//! off. Contenders run interleaved (nginx, gateway, [baseline,] haproxy, nginx, …) so drift
//! on a shared machine hits all of them. Per scenario and contender: requests per second,
//! p50/p99/p99.9 latency, the proxy's CPU seconds per request (user+system of all its
//! processes, from /proc), and peak RSS; then ratios to nginx with min/median/max over
//! rounds. `--only` runs a subset. Before any scenario: memory per idle keep-alive
//! connection, plaintext (`idle`) and TLS 1.3 (`tls_idle`, the client in `bench/tls_idle.rs`),
//! in fresh processes of every proxy.
//!
//! HTTP/1.1 scenarios are driven by wrk; the HTTP/2 ones (`h2_*`) by h2load over TLS with
//! ALPN `h2` only: the gateway's TLS listener (h2 offered by default) against nginx's
//! `listen ... ssl http2` on the same certificate, in the same table.
//!
//! Output: a table on stdout, `target/bench/results.json` and `results.md`, a bar chart
//! `target/bench/cpu_per_request.svg`, and (full runs only) the figures spliced into
//! `docs/benchmarks.md` between its markers.

mod scale;
mod tls_idle;

use crate::{find_program, install, run_cmd, target_dir, workspace_root};
use anyhow::{bail, Context, Result};
use gateway_test_support::{free_addr, stop_child};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(clap::Args)]
pub struct Args {
    /// Seconds per measurement.
    #[arg(long, default_value_t = 10)]
    pub duration: u64,
    /// Interleaved rounds per scenario (nginx, gateway, nginx, gateway, …).
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Worker threads/processes for both proxies.
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
    /// Concurrent client connections.
    #[arg(long, default_value_t = 50)]
    pub connections: usize,
    /// Pin the proxies to this CPU list and the load generator and upstream to the rest
    /// (taskset syntax, e.g. "0"); "none" to not pin.
    #[arg(long, default_value = "0")]
    pub proxy_cpus: String,
    /// A smoke run under a minute (1 s per measurement, 1 round, every scenario): what
    /// `cargo xtask test` runs so the harness never rots. Does not touch docs/.
    #[arg(long)]
    pub quick: bool,
    /// Use this gateway binary instead of building a release one.
    #[arg(long, value_name = "PATH")]
    pub gateway_bin: Option<PathBuf>,
    /// Also measure this gateway binary (a previous build, named "baseline" in the tables)
    /// in the same interleaved rounds: before/after ratios of a change from one run.
    #[arg(long, value_name = "PATH")]
    pub baseline_bin: Option<PathBuf>,
    /// Where results go (default target/bench).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Run only these measurements (comma-separated): scenario names from the table, and
    /// `idle` (memory per idle plaintext connection), `tls_idle` (per idle TLS 1.3
    /// connection), `handshakes` (full TLS handshakes), `tunnels` (WebSocket bulk), `scale`
    /// (10,000 keep-alive clients and 2,000 tunnels at once; not in `--quick`). Default:
    /// all of them.
    #[arg(long, value_name = "NAME[,NAME..]", value_delimiter = ',')]
    pub only: Vec<String>,
    /// Idle keep-alive connections held per contender for the memory figures, plaintext and
    /// TLS (default 10,000; 500 with --quick). The bench raises its RLIMIT_NOFILE to the hard limit: with
    /// the proxy holding one descriptor per connection too, 10,000 fits a 20,000 limit.
    #[arg(long, value_name = "N")]
    pub idle_connections: Option<usize>,
    /// Leave HAProxy out (it is a contender whenever `haproxy` is installed, which
    /// `cargo xtask install` does).
    #[arg(long)]
    pub no_haproxy: bool,
    /// Also measure the gateway with `[limits.global]` pointing at a local redis-server
    /// (named "global"; a rate no request reaches, so every request is counted and synced
    /// and none refused): the cost of the fleet-wide limit, in the same rounds (issue 16).
    #[arg(long)]
    pub global_limit: bool,
    /// Also measure the gateway with its epoll driver (`[server] io = "epoll"`, named
    /// "gateway-epoll"), in the same rounds: the readiness fallback against io_uring
    /// (issue 13).
    #[arg(long)]
    pub epoll: bool,
    /// Keep-alive clients of the `scale` measurement (issue 13), held at once with
    /// `--scale-tunnels` WebSocket tunnels on 2 workers.
    #[arg(long, value_name = "N", default_value_t = 10_000)]
    pub scale_clients: usize,
    /// WebSocket tunnels of the `scale` measurement.
    #[arg(long, value_name = "N", default_value_t = 2_000)]
    pub scale_tunnels: usize,
    /// Client processes the `scale` load is split over (descriptor limits are per process).
    #[arg(long, value_name = "N", default_value_t = 2)]
    pub scale_processes: usize,
}

/// Measurements `--only` accepts besides the scenario names.
const EXTRA_MEASUREMENTS: &[&str] = &["idle", "tls_idle", "handshakes", "tunnels", "scale"];

impl Args {
    /// Whether `--only` selects the measurement `name` (everything when `--only` is absent).
    fn selects(&self, name: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|o| o == name)
    }

    fn check_only(&self) -> Result<()> {
        for name in &self.only {
            if !SCENARIOS.iter().any(|s| s.name == name) && !EXTRA_MEASUREMENTS.contains(&&**name) {
                let known: Vec<&str> = SCENARIOS
                    .iter()
                    .map(|s| s.name)
                    .chain(EXTRA_MEASUREMENTS.iter().copied())
                    .collect();
                bail!(
                    "--only {name}: no such measurement (known: {})",
                    known.join(", ")
                );
            }
        }
        Ok(())
    }
}

/// One workload.
struct Scenario {
    name: &'static str,
    what: &'static str,
    path: &'static str,
    /// Extra wrk arguments (e.g. a Lua script for uploads).
    lua: Option<&'static str>,
    close: bool,
    /// Over TLS (ECDSA P-256 certificate) instead of plaintext.
    tls: bool,
    /// HTTP/2 over TLS with h2load instead of wrk: (connections, concurrent streams each).
    h2: Option<(usize, usize)>,
}

const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "keepalive_small",
        what: "keep-alive, 20-byte responses",
        path: "/api/small",
        lua: None,
        close: false,
        tls: false,
        h2: None,
    },
    Scenario {
        name: "new_connection",
        what: "a new connection per request",
        path: "/api/small",
        lua: None,
        close: true,
        tls: false,
        h2: None,
    },
    Scenario {
        name: "response_1mib",
        what: "keep-alive, 1 MiB responses",
        path: "/api/1m",
        lua: None,
        close: false,
        tls: false,
        h2: None,
    },
    Scenario {
        name: "upload_10mib",
        what: "keep-alive, 10 MiB uploads",
        path: "/api/upload",
        lua: Some(UPLOAD_LUA),
        close: false,
        tls: false,
        h2: None,
    },
    Scenario {
        name: "tls_keepalive",
        what: "TLS 1.3 (ECDSA P-256), keep-alive, 20-byte responses",
        path: "/api/small",
        lua: None,
        close: false,
        tls: true,
        h2: None,
    },
    Scenario {
        name: "tls_new_connection",
        what: "TLS (ECDSA P-256), a new connection per request; wrk resumes sessions",
        path: "/api/small",
        lua: None,
        close: true,
        tls: true,
        h2: None,
    },
    Scenario {
        name: "h2_many_streams",
        what:
            "HTTP/2 over TLS (ALPN h2), 4 connections x 100 concurrent streams, 20-byte responses",
        path: "/api/small",
        lua: None,
        close: false,
        tls: true,
        h2: Some((4, 100)),
    },
    Scenario {
        name: "h2_stream_per_connection",
        what: "HTTP/2 over TLS (ALPN h2), 50 connections x 1 stream (reused), 20-byte responses",
        path: "/api/small",
        lua: None,
        close: false,
        tls: true,
        h2: Some((50, 1)),
    },
];

/// Streams per h2 connection both proxies accept before GOAWAY in the benchmark (nginx
/// `keepalive_requests`, gateway `http2.max_requests_per_connection`; both default to 1000):
/// h2load does not reconnect after a GOAWAY in a timed run, so the default would stop each
/// client after 1000 requests. New-connection cost has scenarios of its own.
const H2_REQUESTS_PER_CONNECTION: u64 = 1_000_000_000;

/// Percentiles wrk cannot print itself (p99.9), as one parseable line.
const REPORT_LUA: &str = r#"
done = function(summary, latency, requests)
  io.write(string.format("BENCH requests=%d errors=%d duration_us=%d p50=%d p99=%d p999=%d\n",
    summary.requests, summary.errors.connect + summary.errors.read + summary.errors.write
      + summary.errors.status + summary.errors.timeout,
    summary.duration, latency:percentile(50), latency:percentile(99), latency:percentile(99.9)))
end
"#;

const UPLOAD_LUA: &str = r#"
wrk.method = "POST"
wrk.body = string.rep("x", 10 * 1024 * 1024)
wrk.headers["Content-Type"] = "application/octet-stream"
"#;

#[derive(Debug, Clone, Default)]
struct Sample {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    cpu_us_per_req: f64,
    peak_rss_kib: u64,
    errors: u64,
}

struct Proc {
    name: &'static str,
    child: Child,
    url: String,
    /// The TLS listener's base URL, for the TLS scenarios.
    tls_url: Option<String>,
    /// A TLS listener with an RSA 2048 certificate, for full-handshake figures.
    rsa_addr: Option<SocketAddr>,
    /// The base URL where ALPN offers `h2` (same ECDSA certificate), for the h2 scenarios.
    h2_url: Option<String>,
}

impl Proc {
    /// A front proxy with its plaintext, ECDSA TLS, RSA TLS and h2 listeners, once all of
    /// them accept connections.
    fn listening(
        name: &'static str,
        child: Child,
        addr: SocketAddr,
        tls_addr: SocketAddr,
        rsa_addr: SocketAddr,
        h2_addr: SocketAddr,
    ) -> Result<Proc> {
        let proc = Proc {
            name,
            child,
            url: format!("http://{addr}"),
            tls_url: Some(format!("https://{tls_addr}")),
            rsa_addr: Some(rsa_addr),
            h2_url: Some(format!("https://{h2_addr}")),
        };
        for a in [addr, tls_addr, rsa_addr, h2_addr] {
            wait_port(a)?;
        }
        Ok(proc)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        stop_child(&mut self.child, Duration::from_secs(5));
    }
}

pub fn run(args: &Args) -> Result<()> {
    args.check_only()?;
    install::run(&install::Args::default())?;
    let (duration, rounds) = if args.quick {
        (1, 1)
    } else {
        (args.duration, args.rounds.max(1))
    };
    let gateway_bin = match &args.gateway_bin {
        Some(p) => p.clone(),
        None => {
            let mut build = Command::new(crate::cargo());
            build
                .current_dir(workspace_root())
                .args(["build", "--release", "-p", "gateway", "--bin", "gateway"])
                .env_remove(crate::AYA_BUILD_SKIP);
            run_cmd(&mut build)?;
            target_dir()?.join("release").join("gateway")
        }
    };
    let nginx = find_program("nginx").context("nginx not found (cargo xtask install)")?;
    let wrk = find_program("wrk").context("wrk not found (cargo xtask install)")?;
    let h2load = find_program("h2load").context("h2load not found (cargo xtask install)")?;
    let haproxy = if args.no_haproxy {
        None
    } else {
        Some(find_program("haproxy").context("haproxy not found (cargo xtask install)")?)
    };
    // The idle-memory figures hold thousands of client sockets in this process.
    raise_nofile_limit();
    let out_dir = match &args.out {
        Some(d) => d.clone(),
        None => target_dir()?.join("bench"),
    };
    let scratch = out_dir.join("scratch");
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(scratch.join("up/html"))?;
    std::fs::write(scratch.join("up/html/1m"), vec![b'x'; 1 << 20])?;
    std::fs::write(scratch.join("report.lua"), REPORT_LUA)?;
    self_signed(
        &scratch,
        "ecdsa",
        &["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"],
    )?;
    self_signed(&scratch, "rsa", &["-newkey", "rsa:2048"])?;
    std::fs::write(
        scratch.join("upload.lua"),
        format!("{UPLOAD_LUA}\n{REPORT_LUA}"),
    )?;

    let pin = (args.proxy_cpus != "none").then(|| args.proxy_cpus.clone());
    let others = pin.as_ref().map(|p| other_cpus(p));
    let upstream_addr = free_addr();
    let up = start_upstream(&nginx, &scratch, upstream_addr, others.as_deref())?;
    let ng = start_reference_nginx(
        &nginx,
        &scratch,
        upstream_addr,
        args.workers,
        pin.as_deref(),
        &Instance::SHARED,
    )?;
    let gw = start_gateway(
        "gateway",
        &gateway_bin,
        &scratch,
        upstream_addr,
        args.workers,
        pin.as_deref(),
    )?;
    let baseline = match &args.baseline_bin {
        Some(bin) => Some(start_gateway(
            "baseline",
            bin,
            &scratch,
            upstream_addr,
            args.workers,
            pin.as_deref(),
        )?),
        None => None,
    };
    let hap = haproxy
        .as_ref()
        .map(|bin| {
            start_haproxy(
                bin,
                &scratch,
                upstream_addr,
                args.workers,
                pin.as_deref(),
                &Instance::SHARED,
            )
        })
        .transpose()?;
    // The gateway under test with config of its own, in the same rounds.
    let variant = |name, tuning: &Tuning| {
        start_gateway_with(
            name,
            &gateway_bin,
            &scratch,
            upstream_addr,
            args.workers,
            pin.as_deref(),
            tuning,
        )
    };
    let (redis, global) = if args.global_limit {
        let (redis, url) = start_redis(&scratch, others.as_deref())?;
        let global = variant(
            "global",
            &Tuning {
                extra: &format!(
                    "\n[limits.global]\nredis = \"{url}\"\nrequest_rate = \"1000000000/s\"\n"
                ),
                ..Tuning::default()
            },
        )?;
        (Some(redis), Some(global))
    } else {
        (None, None)
    };
    let epoll = args
        .epoll
        .then(|| {
            variant(
                "gateway-epoll",
                &Tuning {
                    server: "io = \"epoll\"\n",
                    ..Tuning::default()
                },
            )
        })
        .transpose()?;
    let mut contenders = vec![&ng, &gw];
    contenders.extend(epoll.as_ref());
    contenders.extend(baseline.as_ref());
    contenders.extend(hap.as_ref());
    contenders.extend(global.as_ref());
    // Memory per idle connection first, each figure in fresh processes of its own (below):
    // a process that served earlier connections has freed memory in its allocators that
    // new connections would reuse unseen.
    let idle_n = args
        .idle_connections
        .unwrap_or(if args.quick { 500 } else { 10_000 });
    let tls_client = args
        .selects("tls_idle")
        .then(tls_idle::TlsIdleClient::new)
        .transpose()?;
    let mut idle = Vec::new();
    let mut tls_idle = Vec::new();
    for c in &contenders {
        // The fleet-limit and epoll contenders are the same binary as `gateway`: not
        // measured twice.
        if c.name == "global" || c.name == "gateway-epoll" {
            continue;
        }
        // HAProxy holds no more than its maxconn (a little under half the descriptor
        // limit); a client beyond it would wait in the backlog and time out.
        let n = if c.name == "haproxy" {
            idle_n.min(haproxy_maxconn() as usize - 20)
        } else {
            idle_n
        };
        // Each figure holds its connections in a process of its own, next to the shared one:
        // - the TLS figure comes after the plaintext one, whose freed memory (nginx's
        //   touched connection slots, the allocators' free lists) it would reuse unseen;
        // - a gateway needs room for the connections (the derived `max_connections` saves
        //   an upstream descriptor per connection, and would refuse 10,000 under 20,000);
        // - they keep idle connections IDLE_HOLD_TIMEOUT_S instead of the reference's 5 s:
        //   10,000 full handshakes, or 10,000 connects on a loaded machine, take longer,
        //   and the first connections would be closed before the last is open. The timeout
        //   decides when an idle connection goes, not what it holds.
        let own = |tls: bool| -> Result<Proc> {
            let instance = Instance {
                suffix: if tls { "-tls-idle" } else { "-idle" },
                keepalive_timeout_s: Some(IDLE_HOLD_TIMEOUT_S),
            };
            Ok(match c.name {
                "gateway" | "baseline" => {
                    let bin = if c.name == "gateway" {
                        &gateway_bin
                    } else {
                        args.baseline_bin.as_ref().context("no baseline binary")?
                    };
                    let keepalive = instance
                        .keepalive_timeout_s
                        .map(|s| format!("keepalive_timeout = \"{s}s\"\n"))
                        .unwrap_or_default();
                    start_gateway_with(
                        "idle-gateway",
                        bin,
                        &scratch,
                        upstream_addr,
                        args.workers,
                        pin.as_deref(),
                        &Tuning {
                            max_connections: Some(n + 64),
                            server: &keepalive,
                            ..Tuning::default()
                        },
                    )?
                }
                "nginx" | "haproxy" => {
                    let (start, bin): (StartProxy, &Path) = if c.name == "nginx" {
                        (start_reference_nginx, &nginx)
                    } else {
                        let bin = haproxy.as_deref().context("no haproxy binary")?;
                        (start_haproxy, bin)
                    };
                    start(
                        bin,
                        &scratch,
                        upstream_addr,
                        args.workers,
                        pin.as_deref(),
                        &instance,
                    )?
                }
                other => bail!("no idle-memory process for contender {other}"),
            })
        };
        for (tls, label) in [(false, "idle"), (true, "tls_idle")] {
            if !args.selects(label) {
                continue;
            }
            let fresh = own(tls)?;
            let client = tls_client.as_ref().filter(|_| tls);
            let m = idle_memory_per_connection(&fresh, n, client)?;
            drop(fresh);
            eprintln!(
                "  {label:8} {:8} {:>6.1} KiB RSS + {:>6.1} KiB kernel socket memory per connection ({} held, opened in {:.1} s)",
                c.name, m.rss_kib, m.socket_kib, m.connections, m.open_s
            );
            if tls { &mut tls_idle } else { &mut idle }.push((c.name, m));
        }
    }
    let names: Vec<&'static str> = contenders.iter().map(|c| c.name).collect();

    let mut results: BTreeMap<&str, BTreeMap<&str, Vec<Sample>>> = BTreeMap::new();
    let mut direct: BTreeMap<&str, Sample> = BTreeMap::new();
    for scenario in SCENARIOS.iter().filter(|s| args.selects(s.name)) {
        eprintln!("xtask bench: {} ({})", scenario.name, scenario.what);
        // The upstream alone: the ceiling no proxy can pass (plaintext scenarios only; not
        // in the smoke run, which has a minute for four contenders).
        if !scenario.tls && !args.quick {
            let d = measure(
                &wrk,
                &scratch,
                scenario,
                &up,
                &format!("http://{upstream_addr}"),
                duration,
                args.connections,
                others.as_deref(),
            )?;
            direct.insert(scenario.name, d);
        }
        for _ in 0..rounds {
            for c in &contenders {
                let s = if let Some((conns, streams)) = scenario.h2 {
                    let base = c.h2_url.as_deref().context("no h2 listener")?;
                    measure_h2(
                        &h2load,
                        &scratch,
                        c,
                        &format!("{base}{}", scenario.path),
                        duration,
                        (conns, streams),
                        others.as_deref(),
                    )?
                } else {
                    let base = if scenario.tls {
                        c.tls_url.clone().context("no TLS listener")?
                    } else {
                        c.url.clone()
                    };
                    measure(
                        &wrk,
                        &scratch,
                        scenario,
                        c,
                        &base,
                        duration,
                        args.connections,
                        others.as_deref(),
                    )?
                };
                eprintln!(
                    "  {:8} {:>10.0} req/s  p99 {:>7.2} ms  {:>7.2} µs CPU/req  errors {}",
                    c.name, s.rps, s.p99_ms, s.cpu_us_per_req, s.errors
                );
                results
                    .entry(scenario.name)
                    .or_default()
                    .entry(c.name)
                    .or_default()
                    .push(s);
            }
        }
    }
    // Full TLS handshakes (no resumption: `openssl s_time -new`), one request each.
    let mut handshakes: Vec<HandshakeSeries> = Vec::new();
    let kinds = if args.selects("handshakes") {
        &[("ECDSA P-256", false), ("RSA 2048", true)][..]
    } else {
        &[]
    };
    // Two seconds at least (a handshake's CPU is coarse in /proc ticks), except in the
    // smoke run, which only checks the harness.
    let handshake_seconds = if args.quick { 1 } else { duration.max(2) };
    for &(kind, use_rsa) in kinds {
        for c in &contenders {
            handshakes.push((kind, c.name, Vec::new()));
        }
        for _ in 0..rounds {
            for c in &contenders {
                let addr: SocketAddr = if use_rsa {
                    c.rsa_addr.context("no RSA listener")?
                } else {
                    c.tls_url
                        .as_deref()
                        .context("no TLS listener")?
                        .trim_start_matches("https://")
                        .parse()?
                };
                let m = full_handshakes(addr, handshake_seconds, c.child.id(), others.as_deref())?;
                eprintln!(
                    "  {kind:11} {:8} {:>8.0} handshakes/s  {:>8.1} µs CPU/handshake",
                    c.name, m.0, m.1
                );
                if let Some(entry) = handshakes
                    .iter_mut()
                    .find(|(k, n, _)| *k == kind && *n == c.name)
                {
                    entry.2.push(m);
                }
            }
        }
    }
    drop(contenders);
    drop(hap);
    drop(global);
    drop(redis);
    drop(baseline);
    drop(gw);
    drop(ng);
    drop(up);

    let report = Report {
        args,
        duration,
        rounds,
        results,
        direct,
        idle,
        tls_idle,
        idle_n,
        names,
    };
    let mut table = report.table();
    if !args.quick && args.selects("tunnels") {
        // WebSocket bulk: the tunnel benchmark (splice, copy, nginx), its own binary.
        let output = Command::new(bench_bin("tunnel-bench")?)
            .arg("--gateway")
            .arg(&gateway_bin)
            .arg("--nginx")
            .arg(&nginx)
            .args(["--seconds", &duration.max(3).to_string()])
            .args(["--only", "gateway-splice,gateway-copy,nginx"])
            .stderr(Stdio::inherit())
            .output()
            .context("running tunnel-bench")?;
        let _ = writeln!(
            table,
            "\nWebSocket bulk through tunnels (upstream streams to the client; one proxy worker):\n\n{}",
            String::from_utf8_lossy(&output.stdout)
        );
    }
    let scale = if !args.quick && args.selects("scale") {
        let results = scale::run(args, &gateway_bin, &nginx, &scratch)?;
        table.push_str(&scale::table(args, &results));
        results
    } else {
        Vec::new()
    };
    if !handshakes.is_empty() {
        let _ = writeln!(table, "\nFull TLS handshakes (`openssl s_time -new`, one client, one request per connection; medians):\n");
        let _ = writeln!(
            table,
            "| certificate | proxy | handshakes/s | CPU µs per handshake | CPU / nginx |"
        );
        let _ = writeln!(table, "|---|---|---:|---:|---:|");
        let cpu_of = |kind: &str, who: &str| {
            handshakes
                .iter()
                .find(|(k, w, _)| *k == kind && *w == who)
                .map(|(_, _, samples)| median(samples.iter().map(|s| s.1).collect()))
        };
        for (kind, who, samples) in &handshakes {
            let rate = median(samples.iter().map(|s| s.0).collect());
            let cpu = median(samples.iter().map(|s| s.1).collect());
            let ratio = cpu_of(kind, "nginx").map_or(0.0, |n| cpu / n.max(1e-9));
            let _ = writeln!(
                table,
                "| {kind} | {who} | {rate:.0} | {cpu:.0} | {ratio:.2} |"
            );
        }
    }
    println!("{table}");
    std::fs::create_dir_all(&out_dir)?;
    let mut json = report.json();
    if !scale.is_empty() {
        json["scale"] = scale::json(&scale);
    }
    std::fs::write(
        out_dir.join("results.json"),
        serde_json::to_string_pretty(&json)?,
    )?;
    std::fs::write(out_dir.join("results.md"), &table)?;
    std::fs::write(out_dir.join("cpu_per_request.svg"), report.svg())?;
    if !args.quick && args.out.is_none() && args.only.is_empty() {
        splice_into_docs(&table)?;
    }
    eprintln!("xtask bench: results in {}", out_dir.display());
    let failed: u64 = report
        .results
        .values()
        .flat_map(|m| m.values())
        .flatten()
        .map(|s| s.errors)
        .sum();
    let failed = failed + scale.iter().map(|r| r.report.errors).sum::<u64>();
    if failed > 0 {
        bail!("{failed} requests failed during the benchmark");
    }
    Ok(())
}

/// Builds a release binary of `gateway-benches` and returns its path.
fn bench_bin(name: &str) -> Result<PathBuf> {
    let mut build = Command::new(crate::cargo());
    build.current_dir(workspace_root()).args([
        "build",
        "--release",
        "-p",
        "gateway-benches",
        "--bin",
        name,
    ]);
    run_cmd(&mut build)?;
    Ok(target_dir()?.join("release").join(name))
}

fn other_cpus(pinned: &str) -> String {
    let n = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let taken: Vec<usize> = pinned
        .split(',')
        .filter_map(|c| c.trim().parse().ok())
        .collect();
    let rest: Vec<String> = (0..n)
        .filter(|c| !taken.contains(c))
        .map(|c| c.to_string())
        .collect();
    if rest.is_empty() {
        pinned.to_string()
    } else {
        rest.join(",")
    }
}

fn pinned(cmd: &Path, cpus: Option<&str>) -> Command {
    match cpus {
        Some(cpus) => {
            let mut c = Command::new("taskset");
            c.arg("-c").arg(cpus).arg(cmd);
            c
        }
        None => Command::new(cmd),
    }
}

fn wait_port(addr: SocketAddr) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if TcpStream::connect(addr).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("nothing listens on {addr} after 10 s")
}

fn start_upstream(nginx: &Path, dir: &Path, addr: SocketAddr, cpus: Option<&str>) -> Result<Proc> {
    let conf = format!(
        "worker_processes 1;\nerror_log {d}/up/error.log warn;\npid {d}/up/nginx.pid;\nevents {{ worker_connections 16384; }}\n\
         http {{\n  access_log off;\n  keepalive_requests 1000000;\n  client_max_body_size 0;\n  client_body_temp_path {d}/up;\n\
         server {{\n    listen {addr} reuseport backlog=4096;\n    root {d}/up/html;\n\
         location /api/small {{ return 200 \"hello from upstream\\n\"; }}\n\
         location /api/1m {{ alias {d}/up/html/1m; }}\n\
         location /api/upload {{ client_body_buffer_size 1m; return 200 \"stored\\n\"; }}\n\
         location / {{ return 200 \"ok\\n\"; }}\n  }}\n}}\n",
        d = dir.display()
    );
    std::fs::write(dir.join("up/nginx.conf"), conf)?;
    let child = spawn_nginx(nginx, &dir.join("up"), cpus).context("starting the upstream nginx")?;
    let proc = Proc {
        name: "upstream",
        child,
        url: format!("http://{addr}"),
        tls_url: None,
        rsa_addr: None,
        h2_url: None,
    };
    wait_port(addr)?;
    Ok(proc)
}

/// A throwaway self-signed certificate for `bench.test` at `dir/NAME.crt` and `dir/NAME.key`.
fn self_signed(dir: &Path, name: &str, key_args: &[&str]) -> Result<()> {
    let mut cmd = Command::new("openssl");
    cmd.args(["req", "-x509", "-nodes", "-days", "2"])
        .args(key_args)
        .args([
            "-subj",
            "/CN=bench.test",
            "-addext",
            "subjectAltName=DNS:bench.test",
        ])
        .arg("-keyout")
        .arg(dir.join(format!("{name}.key")))
        .arg("-out")
        .arg(dir.join(format!("{name}.crt")))
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    run_cmd(&mut cmd)
        .with_context(|| format!("generating the benchmark's {name} certificate (openssl)"))
}

/// Starts nginx in the foreground with `prefix/nginx.conf` and `prefix/` as its prefix.
fn spawn_nginx(nginx: &Path, prefix: &Path, cpus: Option<&str>) -> std::io::Result<Child> {
    pinned(nginx, cpus)
        .arg("-p")
        .arg(format!("{}/", prefix.display()))
        .arg("-c")
        .arg(prefix.join("nginx.conf"))
        .args(["-g", "daemon off;"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
}

/// [`start_reference_nginx`] or [`start_haproxy`]: binary, scratch directory, upstream,
/// workers, CPUs, instance.
type StartProxy = fn(&Path, &Path, SocketAddr, usize, Option<&str>, &Instance) -> Result<Proc>;

/// One process of a contender: the bench's shared one, or one started for a single figure
/// next to it (`idle`, `tls_idle`).
struct Instance {
    /// Added to the scratch names of its prefix (nginx) or config and pid file (HAProxy),
    /// so two instances of one proxy run at once.
    suffix: &'static str,
    /// Idle keep-alive timeout in seconds; `None`: the reference's 5 s.
    keepalive_timeout_s: Option<u64>,
}

impl Instance {
    /// The process every scenario runs against.
    const SHARED: Instance = Instance {
        suffix: "",
        keepalive_timeout_s: None,
    };
}

fn start_reference_nginx(
    nginx: &Path,
    dir: &Path,
    upstream: SocketAddr,
    workers: usize,
    cpus: Option<&str>,
    instance: &Instance,
) -> Result<Proc> {
    let prefix = dir.join(format!("ng{}", instance.suffix));
    std::fs::create_dir_all(prefix.join("body"))?;
    std::fs::create_dir_all(prefix.join("proxy"))?;
    let mut template =
        std::fs::read_to_string(workspace_root().join("tests/fixtures/nginx-reference.conf"))?;
    if let Some(seconds) = instance.keepalive_timeout_s {
        let reference = "keepalive_timeout 5s;";
        if !template.contains(reference) {
            bail!("the reference config has no `{reference}` to lengthen");
        }
        template = template.replace(reference, &format!("keepalive_timeout {seconds}s;"));
    }
    let addr = free_addr();
    let tls_addr = free_addr();
    let h2_addr = free_addr();
    // The reference front with TLS added as the contract says the TLS benchmarks do.
    let template = template.replace(
        "listen @LISTEN@ reuseport;",
        &format!(
            "listen @LISTEN@ reuseport;\n        listen {tls_addr} ssl reuseport;\n        \
             ssl_certificate {d}/ecdsa.crt;\n        ssl_certificate_key {d}/ecdsa.key;\n        \
             ssl_protocols TLSv1.2 TLSv1.3;\n        ssl_session_cache shared:SSL:10m;",
            d = dir.display()
        ),
    );
    // A second server with the RSA certificate on its own port (nginx binds certificates to
    // servers, not to listen sockets), proxying /api/ the same way.
    let rsa_addr = free_addr();
    let last = template
        .rfind('}')
        .context("reference config has no closing brace")?;
    // And the front's `listen ... ssl http2` (same ECDSA certificate, the reference's own
    // `location /api/`) in a server of its own: `keepalive_requests` (nginx's cap on
    // streams per h2 connection, default 1000) is raised there only, as the gateway's
    // `max_requests_per_connection` is, because h2load does not reconnect after GOAWAY in
    // a timed run; the HTTP/1.1 scenarios keep the reference's defaults.
    let api_location = template
        .find("location /api/ {")
        .and_then(|a| Some(&template[a..a + template[a..].find('}')? + 1]))
        .context("reference config has no `location /api/`")?;
    let template = format!(
        "{}    server {{\n        listen {rsa_addr} ssl reuseport;\n        ssl_certificate {d}/rsa.crt;\n        \
         ssl_certificate_key {d}/rsa.key;\n        ssl_protocols TLSv1.2 TLSv1.3;\n        \
         location /api/ {{\n            proxy_pass http://api;\n            proxy_http_version 1.1;\n            \
         proxy_set_header Connection \"\";\n        }}\n    }}\n    \
         server {{\n        listen {h2_addr} ssl http2 reuseport;\n        ssl_certificate {d}/ecdsa.crt;\n        \
         ssl_certificate_key {d}/ecdsa.key;\n        ssl_protocols TLSv1.2 TLSv1.3;\n        \
         ssl_session_cache shared:SSL:10m;\n        keepalive_requests {H2_REQUESTS_PER_CONNECTION};\n        \
         {api_location}\n    }}\n}}\n",
        &template[..last],
        d = dir.display()
    );
    let conf = template
        .replace("@WORKERS@", &workers.to_string())
        .replace("@PREFIX@", &prefix.display().to_string())
        .replace("@LISTEN@", &addr.to_string())
        .replace("@API_UPSTREAM@", &upstream.to_string())
        .replace("@WS_UPSTREAM@", &upstream.to_string());
    std::fs::write(prefix.join("nginx.conf"), conf)?;
    let child =
        spawn_nginx(nginx, &prefix, cpus).context("starting nginx with the reference config")?;
    Proc::listening("nginx", child, addr, tls_addr, rsa_addr, h2_addr)
}

/// redis-server for `--global-limit`, on the load generator's CPUs, no persistence.
fn start_redis(dir: &Path, cpus: Option<&str>) -> Result<(Proc, String)> {
    let redis =
        find_program("redis-server").context("redis-server not found (cargo xtask install)")?;
    let addr = free_addr();
    let child = pinned(&redis, cpus)
        .args(["--bind", "127.0.0.1", "--port", &addr.port().to_string()])
        .args(["--save", "", "--appendonly", "no", "--dir"])
        .arg(dir)
        .stdout(Stdio::null())
        .spawn()
        .context("starting redis-server")?;
    let proc = Proc {
        name: "redis",
        child,
        url: String::new(),
        tls_url: None,
        rsa_addr: None,
        h2_url: None,
    };
    wait_port(addr)?;
    Ok((proc, format!("redis://{addr}/0")))
}

fn start_gateway(
    name: &'static str,
    bin: &Path,
    dir: &Path,
    upstream: SocketAddr,
    workers: usize,
    cpus: Option<&str>,
) -> Result<Proc> {
    start_gateway_with(name, bin, dir, upstream, workers, cpus, &Tuning::default())
}

/// What a bench gateway's config adds to the common one.
#[derive(Default)]
struct Tuning<'a> {
    /// `[server] max_connections`; `None`: the default derived from the descriptor limit.
    max_connections: Option<usize>,
    /// Lines added to `[server]` (e.g. `io = "epoll"`).
    server: &'a str,
    /// TOML appended at the end of the config.
    extra: &'a str,
}

/// [`start_gateway`] with `extra` TOML appended to its config.
fn start_gateway_with(
    name: &'static str,
    bin: &Path,
    dir: &Path,
    upstream: SocketAddr,
    workers: usize,
    cpus: Option<&str>,
    tuning: &Tuning,
) -> Result<Proc> {
    let (server, extra) = (tuning.server, tuning.extra);
    let addr = free_addr();
    let tls_addr = free_addr();
    let rsa_addr = free_addr();
    let admin = free_addr();
    let d = dir.display();
    // Unset: the default derived from the descriptor limit, which keeps the pipe budget
    // that spliced bodies and tunnels draw on (an explicit value above it leaves none at
    // this machine's 20,000, and every body would be copied). The idle-memory figure sets
    // it, in gateways of its own.
    let max_connections = tuning
        .max_connections
        .map(|n| format!("max_connections = {n}\n"))
        .unwrap_or_default();
    let conf = format!(
        "[server]\nworkers = {workers}\n{max_connections}{server}upgrade_socket = \"\"\n\n[log]\naccess = \"off\"\nlevel = \"warn\"\n\n[admin]\nlisten = \"{admin}\"\n\n\
         [http2]\nmax_requests_per_connection = {H2_REQUESTS_PER_CONNECTION}\n\n\
         [[listener]]\nname = \"http\"\nlisten = \"{addr}\"\n\n\
         [[listener]]\nname = \"https\"\nlisten = \"{tls_addr}\"\n\
         tls = {{ certificates = [{{ cert = \"{d}/ecdsa.crt\", key = \"{d}/ecdsa.key\" }}] }}\n\n\
         [[listener]]\nname = \"https-rsa\"\nlisten = \"{rsa_addr}\"\n\
         tls = {{ certificates = [{{ cert = \"{d}/rsa.crt\", key = \"{d}/rsa.key\" }}] }}\n\n\
         [[upstream]]\nname = \"api\"\nservers = [\"{upstream}\"]\nkeepalive = 32\n\n\
         [[route]]\npath_prefix = \"/api/\"\nupstream = \"api\"\nconnect_timeout = \"60s\"\nsend_timeout = \"300s\"\nread_timeout = \"300s\"\nmax_body_size = \"50MiB\"\n{extra}"
    );
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, conf)?;
    let child = spawn_with_config(bin, cpus, &["run", "--config"], &path)?;
    // TLS listeners offer ALPN h2 then http/1.1 by default: h2 on the same listener.
    Proc::listening(name, child, addr, tls_addr, rsa_addr, tls_addr)
}

/// Starts a proxy `bin` with `flags` then its config file, stderr shown (warnings, fatal
/// config errors), stdout dropped.
fn spawn_with_config(
    bin: &Path,
    cpus: Option<&str>,
    flags: &[&str],
    config: &Path,
) -> Result<Child> {
    pinned(bin, cpus)
        .args(flags)
        .arg(config)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))
}

/// The most connections HAProxy accepts under this machine's descriptor hard limit: it
/// refuses to start unless `2 × maxconn` plus one per listener and a few more descriptors
/// fit (a server side per client connection, whether used or not).
fn haproxy_maxconn() -> u64 {
    (nofile_hard_limit().saturating_sub(100) / 2).max(1000)
}

/// HAProxy as the third contender, configured as the reference front is: the same routes,
/// header work (`option forwardfor`, `X-Real-IP`, `X-Forwarded-Proto`), timeouts and body
/// limit, upstream connections reused (`http-reuse always`), one process with `nbthread`
/// = workers, in the foreground (`-db`) so its CPU is this child's. Certificate and key go
/// in one PEM per certificate, as HAProxy wants them.
fn start_haproxy(
    bin: &Path,
    dir: &Path,
    upstream: SocketAddr,
    workers: usize,
    cpus: Option<&str>,
    instance: &Instance,
) -> Result<Proc> {
    for name in ["ecdsa", "rsa"] {
        let mut pem = std::fs::read(dir.join(format!("{name}.crt")))?;
        pem.extend(std::fs::read(dir.join(format!("{name}.key")))?);
        std::fs::write(dir.join(format!("{name}.pem")), pem)?;
    }
    let addr = free_addr();
    let tls_addr = free_addr();
    let rsa_addr = free_addr();
    let h2_addr = free_addr();
    let d = dir.display();
    let maxconn = haproxy_maxconn();
    let file = format!("haproxy{}", instance.suffix);
    let keepalive = instance.keepalive_timeout_s.unwrap_or(5);
    // An idle keep-alive connection is under `timeout client` too.
    let client = keepalive.max(60);
    let conf = format!(
        "global\n    nbthread {workers}\n    maxconn {maxconn}\n    pidfile {d}/{file}.pid\n    \
         ssl-default-bind-options ssl-min-ver TLSv1.2\n    tune.ssl.cachesize 40000\n\n\
         defaults\n    mode http\n    option http-keep-alive\n    http-reuse always\n    \
         timeout connect 60s\n    timeout client {client}s\n    timeout http-request 60s\n    \
         timeout http-keep-alive {keepalive}s\n    timeout server 300s\n    timeout tunnel 3600s\n\n\
         frontend front\n    bind {addr}\n    bind {tls_addr} ssl crt {d}/ecdsa.pem\n    \
         bind {rsa_addr} ssl crt {d}/rsa.pem\n    bind {h2_addr} ssl crt {d}/ecdsa.pem alpn h2\n    \
         option forwardfor\n    http-request set-header X-Real-IP %[src]\n    \
         http-request set-header X-Forwarded-Proto https if {{ ssl_fc }}\n    \
         http-request set-header X-Forwarded-Proto http unless {{ ssl_fc }}\n    \
         # client_max_body_size 50m (declared lengths; HAProxy has no limit on chunked ones)\n    \
         http-request deny deny_status 413 if {{ req.hdr_val(content-length) gt 52428800 }}\n    \
         http-request deny deny_status 404 unless {{ path_beg /api/ /ws }} || {{ path /health }}\n    \
         use_backend ws if {{ path_beg /ws }}\n    default_backend api\n\n\
         backend api\n    server up {upstream}\n\n\
         backend ws\n    balance source\n    server up {upstream}\n"
    );
    let path = dir.join(format!("{file}.cfg"));
    std::fs::write(&path, conf)?;
    let child = spawn_with_config(bin, cpus, &["-db", "-f"], &path)?;
    Proc::listening("haproxy", child, addr, tls_addr, rsa_addr, h2_addr)
}

fn status_kib(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

fn rss_kib(root: u32, key: &str) -> u64 {
    gateway_benches::process_tree(root)
        .iter()
        .map(|&p| status_kib(p, key))
        .sum()
}

#[allow(clippy::too_many_arguments)]
fn measure(
    wrk: &Path,
    dir: &Path,
    scenario: &Scenario,
    target: &Proc,
    base: &str,
    seconds: u64,
    connections: usize,
    cpus: Option<&str>,
) -> Result<Sample> {
    let script = if scenario.lua.is_some() {
        dir.join("upload.lua")
    } else {
        dir.join("report.lua")
    };
    let connections = if scenario.lua.is_some() {
        connections.min(8)
    } else {
        connections
    };
    let mut cmd = pinned(wrk, cpus);
    cmd.args([
        "-t1",
        &format!("-c{connections}"),
        &format!("-d{seconds}s"),
        "--timeout",
        "10s",
        "-s",
    ])
    .arg(&script);
    if scenario.close {
        cmd.args(["-H", "Connection: close"]);
    }
    cmd.arg(format!("{base}{}", scenario.path));
    let pid = target.child.id();
    let cpu0 = gateway_benches::proc_cpu_seconds(pid);
    let output = cmd.output().context("running wrk")?;
    let cpu1 = gateway_benches::proc_cpu_seconds(pid);
    let text = String::from_utf8_lossy(&output.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with("BENCH "))
        .with_context(|| {
            format!(
                "wrk printed no result: {text}{}",
                String::from_utf8_lossy(&output.stderr)
            )
        })?;
    let field = |name: &str| -> f64 {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    };
    let requests = field("requests").max(1.0);
    let non_2xx: u64 = text
        .lines()
        .find(|l| l.contains("Non-2xx"))
        .and_then(|l| l.split_whitespace().last().and_then(|v| v.parse().ok()))
        .unwrap_or(0);
    Ok(Sample {
        rps: requests / (field("duration_us") / 1e6).max(1e-9),
        p50_ms: field("p50") / 1000.0,
        p99_ms: field("p99") / 1000.0,
        p999_ms: field("p999") / 1000.0,
        cpu_us_per_req: (cpu1 - cpu0) * 1e6 / requests,
        peak_rss_kib: rss_kib(pid, "VmHWM:"),
        errors: field("errors") as u64 + non_2xx,
    })
}

/// Runs `h2load` for `seconds` against `url` with `conns` connections of `streams`
/// concurrent streams each (ALPN h2 only: a contender that negotiates anything else fails
/// the run rather than measuring HTTP/1.1 under an h2 name). This h2load (nghttp2 1.52)
/// prints no latency percentiles, so they come from its per-request `--log-file`
/// (microseconds until the end of each response), like wrk's.
fn measure_h2(
    h2load: &Path,
    dir: &Path,
    target: &Proc,
    url: &str,
    seconds: u64,
    (conns, streams): (usize, usize),
    cpus: Option<&str>,
) -> Result<Sample> {
    let log = dir.join("h2load.log");
    let _ = std::fs::remove_file(&log);
    let mut cmd = pinned(h2load, cpus);
    cmd.args([
        "-t1",
        &format!("-c{conns}"),
        &format!("-m{streams}"),
        &format!("-D{seconds}"),
        "--npn-list=h2",
    ])
    .arg(format!("--log-file={}", log.display()))
    .arg(url);
    let pid = target.child.id();
    let cpu0 = gateway_benches::proc_cpu_seconds(pid);
    let output = cmd.output().context("running h2load")?;
    let cpu1 = gateway_benches::proc_cpu_seconds(pid);
    let text = String::from_utf8_lossy(&output.stdout);
    let fail = || {
        format!(
            "h2load against {} ({url}) printed no result: {text}{}",
            target.name,
            String::from_utf8_lossy(&output.stderr)
        )
    };
    if !text.contains("Application protocol: h2") {
        bail!("{}: did not negotiate h2", fail());
    }
    // "finished in 1.00s, 12345.67 req/s, 1.23MB/s"
    let rps: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("finished in "))
        .and_then(|r| r.split(", ").nth(1))
        .and_then(|r| r.strip_suffix(" req/s"))
        .and_then(|v| v.parse().ok())
        .with_context(fail)?;
    // "requests: 100 total, 100 started, 100 done, 98 succeeded, 2 failed, 1 errored, 0 timeout"
    // "status codes: 98 2xx, 0 3xx, 2 4xx, 0 5xx"
    let counts = |prefix: &str| -> BTreeMap<String, u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(prefix))
            .unwrap_or("")
            .split(',')
            .filter_map(|kv| {
                let (n, what) = kv.trim().split_once(' ')?;
                Some((what.to_string(), n.parse().ok()?))
            })
            .collect()
    };
    let requests = counts("requests: ");
    let status = counts("status codes: ");
    let done = *requests.get("done").with_context(fail)?;
    let ok_2xx = status.get("2xx").copied().unwrap_or(0);
    // `done` counts every finished stream, including reset ones (`errored`) and timeouts,
    // and `failed` is those plus non-2xx/3xx answers: an error is anything but a 2xx.
    let errors = done
        .saturating_sub(ok_2xx)
        .max(requests.get("failed").copied().unwrap_or(0));
    let mut latencies_us: Vec<f64> = std::fs::read_to_string(&log)
        .with_context(|| format!("reading {}", log.display()))?
        .lines()
        .filter_map(|l| l.split('\t').nth(2).and_then(|v| v.parse().ok()))
        .collect();
    latencies_us.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| -> f64 {
        if latencies_us.is_empty() {
            return 0.0;
        }
        // Nearest rank.
        let rank = ((p / 100.0) * latencies_us.len() as f64).ceil() as usize;
        latencies_us[rank.clamp(1, latencies_us.len()) - 1] / 1000.0
    };
    Ok(Sample {
        rps,
        p50_ms: pct(50.0),
        p99_ms: pct(99.0),
        p999_ms: pct(99.9),
        cpu_us_per_req: (cpu1 - cpu0) * 1e6 / (done as f64).max(1.0),
        peak_rss_kib: rss_kib(pid, "VmHWM:"),
        errors,
    })
}

/// (certificate kind, proxy, [(handshakes per second, CPU µs per handshake)] per round).
type HandshakeSeries = (&'static str, &'static str, Vec<(f64, f64)>);

/// Runs `openssl s_time -new` for `seconds` against `addr`: full handshakes, each followed
/// by one request. Returns (handshakes per second, proxy CPU µs per handshake).
fn full_handshakes(
    addr: SocketAddr,
    seconds: u64,
    proxy_pid: u32,
    cpus: Option<&str>,
) -> Result<(f64, f64)> {
    let mut cmd = pinned(Path::new("openssl"), cpus);
    cmd.args([
        "s_time",
        "-connect",
        &addr.to_string(),
        "-new",
        "-time",
        &seconds.to_string(),
    ])
    .args(["-www", "/api/small"]);
    let cpu0 = gateway_benches::proc_cpu_seconds(proxy_pid);
    let output = cmd.output().context("running openssl s_time")?;
    let cpu1 = gateway_benches::proc_cpu_seconds(proxy_pid);
    let text = String::from_utf8_lossy(&output.stdout);
    // "1234 connections in 6 real seconds, 0 bytes read per connection"
    let line = text
        .lines()
        .find(|l| l.contains("connections in") && l.contains("real seconds"))
        .with_context(|| format!("s_time printed no result: {text}"))?;
    let count: f64 = line
        .split_whitespace()
        .next()
        .and_then(|w| w.parse().ok())
        .context("s_time count")?;
    let secs: f64 = line
        .split("connections in ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|w| w.parse().ok())
        .context("s_time seconds")?;
    if count < 1.0 {
        bail!("no TLS handshake completed against {addr}");
    }
    Ok((count / secs.max(1e-9), (cpu1 - cpu0) * 1e6 / count))
}

/// Memory one idle keep-alive connection costs a proxy.
#[derive(Debug, Clone, Copy)]
struct IdleMemory {
    /// Connections held.
    connections: usize,
    /// Seconds it took to open them (connects, handshakes, first answers).
    open_s: f64,
    /// Growth of the proxy's resident memory (all its processes), KiB per connection.
    rss_kib: f64,
    /// The kernel's memory for the proxy's side of the connections (`ss -tm` skmem
    /// r + w + f + o + bl), KiB per connection: not in RSS, reported apart.
    socket_kib: f64,
}

/// The one request on every idle connection.
const IDLE_REQUEST: &[u8] = b"GET /api/small HTTP/1.1\r\nHost: bench\r\n\r\n";

/// Seconds the proxies started for the idle figures keep an idle keep-alive connection:
/// far beyond the time the bench takes to open and measure its connections.
const IDLE_HOLD_TIMEOUT_S: u64 = 600;

/// Checks that `head`, the first bytes of an answer, is a 200.
fn expect_ok(head: &[u8]) -> Result<()> {
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    if head.is_empty() {
        bail!("closed without an answer");
    }
    if !line.starts_with(b"HTTP/1.1 200 ") {
        bail!("answered {:?}", String::from_utf8_lossy(line).trim_end());
    }
    Ok(())
}

/// The resident memory of `pid`'s processes (KiB) once they stop changing: the same
/// processes and RSS in three readings 100 ms apart, or whatever it is after 10 s. A fresh
/// nginx accepts connections before its workers have started (the master binds, then
/// forks them): their start-up would otherwise count as growth under the connections.
fn settled_rss_kib(pid: u32) -> u64 {
    let reading = || {
        let tree = gateway_benches::process_tree(pid);
        let rss: u64 = tree.iter().map(|&p| status_kib(p, "VmRSS:")).sum();
        (tree, rss)
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = reading();
    let mut unchanged = 0;
    while unchanged < 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        let now = reading();
        unchanged = if now == last { unchanged + 1 } else { 0 };
        last = now;
    }
    last.1
}

/// One plaintext idle connection to `addr`, its one request answered.
fn open_plaintext(addr: SocketAddr) -> Result<TcpStream> {
    let mut s = TcpStream::connect(addr)?;
    close_with_reset(&s);
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(IDLE_REQUEST)?;
    let mut buf = [0u8; 1024];
    let got = s.read(&mut buf)?;
    expect_ok(&buf[..got])?;
    Ok(s)
}

/// Opens `n` keep-alive connections (plaintext, or TLS 1.3 to the ECDSA listener with
/// `tls`), one request each, holds them idle, and reports what each costs the proxy in
/// resident memory and in kernel socket memory. Fails if the proxy does not hold all of
/// them when it is measured: a figure over connections it already closed would be too low.
fn idle_memory_per_connection(
    target: &Proc,
    n: usize,
    tls: Option<&tls_idle::TlsIdleClient>,
) -> Result<IdleMemory> {
    let addr: SocketAddr = match tls {
        None => target.url.trim_start_matches("http://"),
        Some(_) => target
            .tls_url
            .as_deref()
            .context("no TLS listener")?
            .trim_start_matches("https://"),
    }
    .parse()?;
    let what = if tls.is_some() { "TLS" } else { "plaintext" };
    let pid = target.child.id();
    let before = settled_rss_kib(pid);
    let (sockets_before, socket_before) = established_sockets(addr.port())?;
    let mut conns = Vec::with_capacity(n);
    let opening = Instant::now();
    for i in 0..n {
        let s = match tls {
            None => open_plaintext(addr),
            Some(client) => client.open(addr),
        }
        .with_context(|| format!("idle {what} connection {i} of {n} to {}", target.name))?;
        conns.push(s);
    }
    let open_s = opening.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(300));
    let after = rss_kib(pid, "VmRSS:");
    let (sockets_after, socket_after) = established_sockets(addr.port())?;
    drop(conns);
    let held = sockets_after.saturating_sub(sockets_before);
    if held < n {
        bail!(
            "{} holds {held} of the {n} idle {what} connections the bench opened: it closed \
             the others before they were measured",
            target.name
        );
    }
    Ok(IdleMemory {
        connections: n,
        open_s,
        rss_kib: after.saturating_sub(before) as f64 / n as f64,
        socket_kib: socket_after.saturating_sub(socket_before) as f64 / 1024.0 / n as f64,
    })
}

/// SO_LINGER with a zero timeout: closing sends RST and leaves no TIME_WAIT behind, so
/// tens of thousands of idle-memory connections per run do not exhaust the ephemeral ports
/// the later scenarios need.
fn close_with_reset(s: &TcpStream) {
    use std::os::fd::AsRawFd;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket and a correctly sized option value.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

/// Kernel memory of the established TCP sockets whose local port is `port` (the proxy's
/// side of client connections), in bytes, from `ss -tm`'s skmem fields.
fn socket_memory_bytes(port: u16) -> Result<u64> {
    ss_skmem_bytes(&format!("( sport = :{port} )"))
}

/// The established TCP sockets whose local port is `port`: how many, and their kernel
/// memory in bytes (as [`socket_memory_bytes`]).
fn established_sockets(port: u16) -> Result<(usize, u64)> {
    ss_established(&format!("( sport = :{port} )"))
}

/// The skmem `r + w + f + o + bl` sum of the established TCP sockets `ss` selects with
/// `filter`, in bytes.
fn ss_skmem_bytes(filter: &str) -> Result<u64> {
    Ok(ss_established(filter)?.1)
}

/// The established TCP sockets `ss` selects with `filter`: how many, and the sum of their
/// skmem `r + w + f + o + bl` in bytes.
fn ss_established(filter: &str) -> Result<(usize, u64)> {
    let output = Command::new("ss")
        .args(["-tmnH", "state", "established"])
        .arg(filter)
        .output()
        .context("running ss (iproute2)")?;
    if !output.status.success() {
        bail!(
            "ss -tm {filter}: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(parse_skmem(&String::from_utf8_lossy(&output.stdout)))
}

/// The sockets in `ss -tm` output and the sum of their skmem `r + w + f + o + bl`, bytes.
fn parse_skmem(text: &str) -> (usize, u64) {
    // "skmem:(r0,rb131072,t0,tb2626560,f0,w0,o0,bl0,d0)": allocated receive (r) and
    // queued send (w) memory, forward allocation (f), option memory (o), backlog (bl).
    let sockets = text.matches("skmem:(").count();
    let bytes = text
        .split("skmem:(")
        .skip(1)
        .filter_map(|rest| rest.split(')').next())
        .flat_map(|fields| fields.split(','))
        .filter_map(|kv| {
            let value_at = kv.find(|c: char| c.is_ascii_digit())?;
            let (key, value) = kv.split_at(value_at);
            matches!(key, "r" | "w" | "f" | "o" | "bl")
                .then(|| value.parse::<u64>().ok())
                .flatten()
        })
        .sum();
    (sockets, bytes)
}

fn nofile_hard_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a valid pointer to an rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
        lim.rlim_max
    } else {
        1024
    }
}

/// Raises this process's RLIMIT_NOFILE soft limit to the hard limit (the idle-memory
/// figures hold one client socket per connection here).
fn raise_nofile_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid pointers to an rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

struct Report<'a> {
    args: &'a Args,
    duration: u64,
    rounds: usize,
    results: BTreeMap<&'static str, BTreeMap<&'static str, Vec<Sample>>>,
    direct: BTreeMap<&'static str, Sample>,
    idle: Vec<(&'static str, IdleMemory)>,
    /// The same over TLS 1.3 (`tls_idle`).
    tls_idle: Vec<(&'static str, IdleMemory)>,
    /// Idle connections held per contender for `idle` and `tls_idle`.
    idle_n: usize,
    /// The contenders in the order they ran, nginx first.
    names: Vec<&'static str>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        0.0
    } else {
        v[v.len() / 2]
    }
}

fn stat(samples: &[Sample], f: impl Fn(&Sample) -> f64) -> (f64, f64, f64) {
    let v: Vec<f64> = samples.iter().map(f).collect();
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (min, median(v), max)
}

impl Report<'_> {
    fn medians(&self, scenario: &str, who: &str) -> Option<Sample> {
        let s = self.results.get(scenario)?.get(who)?;
        Some(Sample {
            rps: stat(s, |x| x.rps).1,
            p50_ms: stat(s, |x| x.p50_ms).1,
            p99_ms: stat(s, |x| x.p99_ms).1,
            p999_ms: stat(s, |x| x.p999_ms).1,
            cpu_us_per_req: stat(s, |x| x.cpu_us_per_req).1,
            peak_rss_kib: s.iter().map(|x| x.peak_rss_kib).max().unwrap_or(0),
            errors: s.iter().map(|x| x.errors).sum(),
        })
    }

    fn table(&self) -> String {
        let mut t = String::new();
        let _ = writeln!(
            t,
            "{} workers each, {} connections, {} s x {} interleaved rounds, proxies pinned to CPU {} (medians; ratio = proxy / nginx)\n",
            self.args.workers, self.args.connections, self.duration, self.rounds, self.args.proxy_cpus
        );
        let _ = writeln!(t, "| scenario | proxy | req/s | p50 ms | p99 ms | p99.9 ms | CPU µs/req (min–max) | peak RSS MiB | errors (all rounds) |");
        let _ = writeln!(t, "|---|---|---:|---:|---:|---:|---:|---:|---:|");
        for scenario in SCENARIOS {
            if let Some(d) = self.direct.get(scenario.name) {
                let _ = writeln!(
                    t,
                    "| {} | upstream direct | {:.0} | {:.2} | {:.2} | {:.2} | – | – | {} |",
                    scenario.name, d.rps, d.p50_ms, d.p99_ms, d.p999_ms, d.errors
                );
            }
            for &who in &self.names {
                let (Some(m), Some(all)) = (
                    self.medians(scenario.name, who),
                    self.results.get(scenario.name).and_then(|r| r.get(who)),
                ) else {
                    continue;
                };
                let (lo, _, hi) = stat(all, |x| x.cpu_us_per_req);
                let _ = writeln!(
                    t,
                    "| {} | {who} | {:.0} | {:.2} | {:.2} | {:.2} | {:.1} ({:.1}–{:.1}) | {:.1} | {} |",
                    scenario.name,
                    m.rps,
                    m.p50_ms,
                    m.p99_ms,
                    m.p999_ms,
                    m.cpu_us_per_req,
                    lo,
                    hi,
                    m.peak_rss_kib as f64 / 1024.0,
                    m.errors
                );
            }
            for &who in self.names.iter().filter(|w| **w != "nginx") {
                let (Some(n), Some(g)) = (
                    self.medians(scenario.name, "nginx"),
                    self.medians(scenario.name, who),
                ) else {
                    continue;
                };
                let label = if self.names.len() > 2 {
                    format!("**{who} / nginx**")
                } else {
                    "**ratio**".to_string()
                };
                let _ = writeln!(
                    t,
                    "| {} | {label} | **{:.2}** | {:.2} | **{:.2}** | {:.2} | **{:.2}** | {:.2} | – |",
                    scenario.name,
                    g.rps / n.rps.max(1e-9),
                    g.p50_ms / n.p50_ms.max(1e-9),
                    g.p99_ms / n.p99_ms.max(1e-9),
                    g.p999_ms / n.p999_ms.max(1e-9),
                    g.cpu_us_per_req / n.cpu_us_per_req.max(1e-9),
                    g.peak_rss_kib as f64 / (n.peak_rss_kib as f64).max(1.0)
                );
            }
        }
        if !self.idle.is_empty() || !self.tls_idle.is_empty() {
            let _ = writeln!(
                t,
                "\nIdle keep-alive connections (up to {} held, {} workers; TLS: 1.3, ECDSA P-256, full handshakes), memory per connection (ratio = proxy / nginx):\n",
                self.idle_n, self.args.workers
            );
            let _ = writeln!(
                t,
                "| transport | proxy | connections | resident KiB | ratio | kernel socket KiB (`ss -tm`) | ratio |"
            );
            let _ = writeln!(t, "|---|---|---:|---:|---:|---:|---:|");
            for (transport, figures) in [("plaintext", &self.idle), ("TLS", &self.tls_idle)] {
                for (who, m) in figures {
                    let (rss, socket) = idle_ratio_to_nginx(figures, who, m);
                    let shown = |r: Option<f64>| r.map_or("–".to_string(), |r| format!("{r:.2}"));
                    let _ = writeln!(
                        t,
                        "| {transport} | {who} | {} | {:.1} | {} | {:.1} | {} |",
                        m.connections,
                        m.rss_kib,
                        shown(rss),
                        m.socket_kib,
                        shown(socket),
                    );
                }
            }
        }
        t
    }

    fn json(&self) -> serde_json::Value {
        let mut scenarios = serde_json::Map::new();
        for (name, by) in &self.results {
            let mut entry = serde_json::Map::new();
            for (who, samples) in by {
                entry.insert(
                    who.to_string(),
                    serde_json::json!(samples
                        .iter()
                        .map(|s| serde_json::json!({
                            "rps": s.rps, "p50_ms": s.p50_ms, "p99_ms": s.p99_ms, "p999_ms": s.p999_ms,
                            "cpu_us_per_req": s.cpu_us_per_req, "peak_rss_kib": s.peak_rss_kib, "errors": s.errors,
                        }))
                        .collect::<Vec<_>>()),
                );
            }
            if let Some(d) = self.direct.get(name) {
                entry.insert(
                    "upstream_direct".into(),
                    serde_json::json!({"rps": d.rps, "p99_ms": d.p99_ms}),
                );
            }
            // Medians of every other contender over nginx's, as in the table.
            let mut ratios = serde_json::Map::new();
            for &who in self.names.iter().filter(|w| **w != "nginx") {
                if let (Some(n), Some(m)) = (self.medians(name, "nginx"), self.medians(name, who)) {
                    ratios.insert(
                        who.to_string(),
                        serde_json::json!({
                            "rps": m.rps / n.rps.max(1e-9),
                            "p99_ms": m.p99_ms / n.p99_ms.max(1e-9),
                            "cpu_us_per_req": m.cpu_us_per_req / n.cpu_us_per_req.max(1e-9),
                        }),
                    );
                }
            }
            entry.insert("ratio_to_nginx".into(), serde_json::Value::Object(ratios));
            scenarios.insert(name.to_string(), serde_json::Value::Object(entry));
        }
        serde_json::json!({
            "workers": self.args.workers,
            "connections": self.args.connections,
            "duration_s": self.duration,
            "rounds": self.rounds,
            "proxy_cpus": self.args.proxy_cpus,
            "scenarios": scenarios,
            "idle_connections": self.idle_n,
            "idle_kib_per_connection": idle_json(&self.idle),
            "tls_idle_kib_per_connection": idle_json(&self.tls_idle),
        })
    }

    /// Bars of CPU µs per request, nginx and gateway side by side per scenario.
    fn svg(&self) -> String {
        let rows: Vec<(&str, f64, f64)> = SCENARIOS
            .iter()
            .filter_map(|s| {
                Some((
                    s.name,
                    self.medians(s.name, "nginx")?.cpu_us_per_req,
                    self.medians(s.name, "gateway")?.cpu_us_per_req,
                ))
            })
            .collect();
        let max = rows.iter().map(|r| r.1.max(r.2)).fold(1.0, f64::max);
        let mut svg = String::new();
        let height = 40 + rows.len() * 50;
        let _ = writeln!(
            svg,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="640" height="{height}" font-family="sans-serif" font-size="12">"#
        );
        let _ = writeln!(
            svg,
            r#"<text x="10" y="20">CPU µs per request (median), nginx (grey) vs gateway (blue)</text>"#
        );
        for (i, (name, n, g)) in rows.iter().enumerate() {
            let y = 40 + i * 50;
            let wn = n / max * 400.0;
            let wg = g / max * 400.0;
            let _ = writeln!(svg, r#"<text x="10" y="{}">{name}</text>"#, y + 14);
            let _ = writeln!(
                svg,
                r##"<rect x="150" y="{y}" width="{wn:.1}" height="18" fill="#999"/><text x="{:.1}" y="{}">{n:.1}</text>"##,
                155.0 + wn,
                y + 14
            );
            let _ = writeln!(
                svg,
                r##"<rect x="150" y="{}" width="{wg:.1}" height="18" fill="#36c"/><text x="{:.1}" y="{}">{g:.1}</text>"##,
                y + 20,
                155.0 + wg,
                y + 34
            );
        }
        svg.push_str("</svg>\n");
        svg
    }
}

/// `who`'s resident and kernel socket memory per idle connection over nginx's among
/// `figures`, each `None` for nginx itself, without an nginx figure, or when nginx's is 0
/// (idle sockets hold no queued data: kernel socket memory is often 0 for every proxy).
fn idle_ratio_to_nginx(
    figures: &[(&str, IdleMemory)],
    who: &str,
    m: &IdleMemory,
) -> (Option<f64>, Option<f64>) {
    let nginx = figures
        .iter()
        .find(|(w, _)| *w == "nginx" && who != "nginx")
        .map(|(_, n)| n);
    let ratio = |of: fn(&IdleMemory) -> f64| nginx.filter(|n| of(n) > 0.0).map(|n| of(m) / of(n));
    (ratio(|f| f.rss_kib), ratio(|f| f.socket_kib))
}

/// One idle figure per contender, KiB per connection, with ratios to nginx's.
fn idle_json(figures: &[(&str, IdleMemory)]) -> serde_json::Value {
    figures
        .iter()
        .map(|(who, m)| {
            let mut entry = serde_json::json!({
                "connections": m.connections,
                "open_s": m.open_s,
                "rss": m.rss_kib,
                "kernel_socket": m.socket_kib,
            });
            if *who != "nginx" {
                let (rss, socket) = idle_ratio_to_nginx(figures, who, m);
                entry["ratio_to_nginx"] = serde_json::json!({"rss": rss, "kernel_socket": socket});
            }
            (who.to_string(), entry)
        })
        .collect::<serde_json::Map<_, _>>()
        .into()
}

const BEGIN: &str = "<!-- bench:begin -->";
const END: &str = "<!-- bench:end -->";

/// Replaces the figures between the markers of docs/benchmarks.md.
fn splice_into_docs(table: &str) -> Result<()> {
    let path = workspace_root().join("docs/benchmarks.md");
    let doc = std::fs::read_to_string(&path).unwrap_or_default();
    let (Some(a), Some(b)) = (doc.find(BEGIN), doc.find(END)) else {
        eprintln!(
            "xtask bench: {} has no {BEGIN}/{END} markers; not updated",
            path.display()
        );
        return Ok(());
    };
    let machine = machine_line();
    let new = format!("{}{BEGIN}\n{machine}\n\n{table}\n{}", &doc[..a], &doc[b..]);
    std::fs::write(&path, new)?;
    eprintln!("xtask bench: updated {}", path.display());
    Ok(())
}

fn machine_line() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "Machine: {} × {cpu}, Linux {}. Measured {}.",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        kernel.trim(),
        Command::new("date")
            .arg("-u")
            .arg("+%Y-%m-%d %H:%M UTC")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skmem_counts_sockets_and_sums_the_allocated_fields_only() {
        let ss = "0 0 127.0.0.1:8443 127.0.0.1:50000\n\t skmem:(r10,rb131072,t0,tb2626560,f4096,w20,o30,bl40,d5)\n\
                  0 0 127.0.0.1:8443 127.0.0.1:50001\n\t skmem:(r0,rb131072,t0,tb2626560,f0,w0,o0,bl0,d0)\n";
        // rb/tb are limits and t, d counters, not memory held.
        assert_eq!(parse_skmem(ss), (2, 10 + 4096 + 20 + 30 + 40));
        assert_eq!(parse_skmem(""), (0, 0));
    }

    #[test]
    fn an_idle_connection_needs_a_200() {
        assert!(expect_ok(b"HTTP/1.1 200 OK\r\nContent-Length: 20\r\n").is_ok());
        assert!(expect_ok(b"").is_err());
        let refused = expect_ok(b"HTTP/1.1 503 Service Unavailable\r\n\r\n").unwrap_err();
        assert!(refused.to_string().contains("503"), "{refused}");
    }

    #[test]
    fn idle_ratios_are_over_nginx_and_absent_where_nginx_holds_nothing() {
        let memory = |rss_kib, socket_kib| IdleMemory {
            connections: 10,
            open_s: 1.0,
            rss_kib,
            socket_kib,
        };
        let figures = [("nginx", memory(20.0, 0.0)), ("gateway", memory(10.0, 1.0))];
        assert_eq!(
            idle_ratio_to_nginx(&figures, "gateway", &figures[1].1),
            (Some(0.5), None)
        );
        assert_eq!(
            idle_ratio_to_nginx(&figures, "nginx", &figures[0].1),
            (None, None)
        );
        assert_eq!(
            idle_ratio_to_nginx(&figures[1..], "gateway", &figures[1].1),
            (None, None)
        );
    }
}
