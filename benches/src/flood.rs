//! SYN-flood benchmark (issue #4): how well a legitimate client is served while another
//! network namespace floods the proxy with SYNs, for
//!
//! - `gateway-xdp`: the gateway with the XDP guard attached (native) on both host-side veths,
//!   `[limits] conn_rate = "50/s"`, `conn_burst = 100`, `max_conns_per_ip = 64`;
//! - `gateway-off`: the same gateway and limits with `[xdp] mode = "off"` (user space
//!   enforces at accept);
//! - `nginx`: `tests/fixtures/nginx-reference.conf` plus `limit_conn` 64 per IP and
//!   `limit_req` 50 r/s burst 100 nodelay on `/api/`.
//!
//! The legitimate client's address is in `allow` (gateway) and mapped to an empty limit key
//! (nginx, the `geo` + `map` idiom), so it is exempt in all three: it runs closed-loop,
//! `--clients` threads, one new connection per request (`Connection: close`), so every
//! request goes through the SYN path the guard protects.
//!
//! Floods (same for every proxy, `--seconds` each, after a one-second warm-up):
//!
//! - `none`: no flood, the baseline;
//! - `hping`: `hping3 -q -S --flood` from the attacker namespace's own address, source ports
//!   varying (hping3's default); `--hping-interval-us N` paces it with `-i uN` instead;
//! - `spoof`: this binary's raw-socket SYN generator in the attacker namespace, source
//!   addresses cycling through 203.0.113.1-254 (hping3's `--rand-source` draws from all of
//!   IPv4, whose SYN-ACKs would leave through the host's default route), paced at
//!   `--spoof-pps` (default 50,000/s, 0 = as fast as it can) so that every proxy faces the
//!   same flood: unpaced, the sender gets faster exactly when the receiver's per-SYN cost
//!   falls (veth runs the receive path on the sender's CPU). The host routes
//!   203.0.113.0/24 back into the attacker namespace, which drops the SYN-ACKs (no such
//!   local address), as a spoofer's victims' networks would.
//! - `spoof6`: random sources, a fresh /64 of 2001:db8:f000::/36 for every SYN (raw
//!   Ethernet frames through AF_PACKET, checksums right), paced like `spoof`, routed back
//!   into the attacker namespace the same way. Every SYN is a new source: the flood that
//!   exhausts the XDP guard's new-source backstop. Needs `--new-clients` (IPv6 target).
//!
//! `--new-clients`: the legitimate client is not exempt and every request comes from a new
//! source, a random /64 of 2001:db8:c1::/48 (an AnyIP `local` route in its namespace,
//! `IPV6_FREEBIND`), to the proxy's IPv6 address: the clients a random-source flood must
//! not lock out. Their connect timeout is 900 ms, below the kernel's 1 s SYN
//! retransmission, so a client whose first SYN was dropped counts as failed. The report's
//! `ok %` is then the share of new clients served on their first SYN.
//!
//! Topology: two namespaces, each behind a veth pair with a /30 of 198.51.100.0/24; the proxy
//! listens on `0.0.0.0:PORT` in the host namespace, the upstream (a std::net origin answering
//! `200 ok`) on 127.0.0.1. The proxy (one worker) is pinned to CPU 1; this process (clients,
//! origin, generator) and hping3 to CPU 0.
//!
//! Reported per run: the legitimate client's successful requests/s, failures and p99
//! latency (connect to EOF); SYNs the attacker sent (frames out of the attacker's veth end,
//! which counts frames XDP then drops, minus the RSTs the attacker's kernel answered
//! SYN-ACKs with); XDP drops/s (`gateway_xdp_packets_total{verdict=~"drop.*"}`
//! from the admin `/metrics`, gateway-xdp only); the proxy's user+system CPU seconds (all its
//! processes, `/proc/PID/stat`); softirq CPU seconds over all CPUs (`/proc/stat`).
//!
//! Every namespace, link, route and pinned map is removed on exit, also on panic and on
//! Ctrl-C (SIGINT stops the run, then the same cleanup runs). Needs root, hping3, nginx.
//!
//! ```text
//! cargo build --release -p gateway -p gateway-benches
//! sudo target/release/flood-bench --gateway target/release/gateway [--nginx /usr/sbin/nginx] \
//!     [--seconds 5] [--clients 4] [--floods none,hping,spoof] \
//!     [--only gateway-xdp,gateway-off,nginx] [--rounds 1] [--spoof-pps 50000] \
//!     [--hping-interval-us 0] [--new-clients] [--out FILE]
//! ```

use std::fs::File;
use std::io::{self, Read as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd as _;
use std::os::unix::process::CommandExt as _;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gateway_benches::{pin_to_cpu, proc_cpu_seconds, workspace_root};
use gateway_test_support::netns::{enter_netns, in_netns, ip, VethPair};
use gateway_test_support::{free_addr, free_port_on, stop_child_and_pid_file, PinDir};

const GENERATOR_CPU: usize = 0;
const PROXY_CPU: usize = 1;
const REQUEST: &[u8] = b"GET /api/flood HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n";
const CLIENT_TIMEOUT: Duration = Duration::from_secs(3);
const WARMUP: Duration = Duration::from_secs(1);
/// Connect timeout of a `--new-clients` request: below the 1 s SYN retransmission.
const NEW_CLIENT_CONNECT_TIMEOUT: Duration = Duration::from_millis(900);
/// Spoofed sources: 203.0.113.1 ..= 203.0.113.254.
const SPOOF_NET: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 0);
/// Random spoofed IPv6 sources: 2001:db8:f000::/36, a fresh /64 each.
const SPOOF6_NET: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xf000, 0, 0, 0, 0, 0);
const SPOOF6_LEN: u8 = 36;
/// New legitimate clients (`--new-clients`): 2001:db8:c1::/48, a fresh /64 per request.
const CLIENTS6_NET: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xc1, 0, 0, 0, 0, 0);

/// Set by SIGINT: every wait polls it, and `main` returns so that the `Drop`s clean up.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn stopped() -> bool {
    STOP.load(Ordering::SeqCst)
}

/// Sleeps `d`, in slices, returning early (false) on SIGINT.
fn sleep_unless_stopped(d: Duration) -> bool {
    let end = Instant::now() + d;
    while Instant::now() < end {
        if stopped() {
            return false;
        }
        std::thread::sleep((end - Instant::now()).min(Duration::from_millis(50)));
    }
    !stopped()
}

struct Options {
    gateway: Option<PathBuf>,
    nginx: Option<PathBuf>,
    seconds: u64,
    clients: usize,
    floods: Vec<Flood>,
    only: Option<Vec<String>>,
    rounds: usize,
    spoof_pps: u64,
    hping_interval_us: u64,
    new_clients: bool,
    out: Option<PathBuf>,
}

fn usage(msg: &str) -> ! {
    if !msg.is_empty() {
        eprintln!("flood-bench: {msg}");
    }
    eprintln!(
        "usage: flood-bench [--gateway PATH] [--nginx PATH] [--seconds N] [--clients N]\n\
         \x20                  [--floods none,hping,spoof,spoof6] [--only NAME,...] [--rounds N]\n\
         \x20                  [--spoof-pps N] [--hping-interval-us N] [--new-clients] [--out FILE]\n\
         proxies: gateway-xdp gateway-off nginx (needs root, hping3)"
    );
    std::process::exit(2)
}

fn parse_args() -> Options {
    let mut o = Options {
        gateway: None,
        nginx: None,
        seconds: 5,
        clients: 4,
        floods: vec![Flood::None, Flood::Hping, Flood::Spoof],
        only: None,
        rounds: 1,
        spoof_pps: 50_000,
        hping_interval_us: 0,
        new_clients: false,
        out: None,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || {
            it.next()
                .cloned()
                .unwrap_or_else(|| usage(&format!("{a} needs a value")))
        };
        match a.as_str() {
            "--gateway" => o.gateway = Some(value().into()),
            "--nginx" => o.nginx = Some(value().into()),
            "--seconds" => o.seconds = value().parse().unwrap_or_else(|_| usage("--seconds N")),
            "--clients" => {
                o.clients = value()
                    .parse()
                    .ok()
                    .filter(|&n| n > 0)
                    .unwrap_or_else(|| usage("--clients N (N > 0)"))
            }
            "--rounds" => {
                o.rounds = value()
                    .parse()
                    .ok()
                    .filter(|&n| n > 0)
                    .unwrap_or_else(|| usage("--rounds N (N > 0)"))
            }
            "--floods" => {
                o.floods = value()
                    .split(',')
                    .map(|f| match f {
                        "none" => Flood::None,
                        "hping" => Flood::Hping,
                        "spoof" => Flood::Spoof,
                        "spoof6" => Flood::Spoof6,
                        other => usage(&format!("unknown flood {other}")),
                    })
                    .collect()
            }
            "--only" => o.only = Some(value().split(',').map(str::to_string).collect()),
            "--out" => o.out = Some(value().into()),
            "--hping-interval-us" => {
                o.hping_interval_us = value()
                    .parse()
                    .unwrap_or_else(|_| usage("--hping-interval-us N (0: --flood)"))
            }
            "--spoof-pps" => {
                o.spoof_pps = value()
                    .parse()
                    .unwrap_or_else(|_| usage("--spoof-pps N (0: as fast as possible)"))
            }
            "--new-clients" => o.new_clients = true,
            "-h" | "--help" => usage(""),
            other => usage(&format!("unknown argument {other}")),
        }
    }
    if o.nginx.is_none() && std::path::Path::new("/usr/sbin/nginx").exists() {
        o.nginx = Some("/usr/sbin/nginx".into());
    }
    o
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Flood {
    None,
    Hping,
    Spoof,
    Spoof6,
}

impl Flood {
    fn name(self) -> &'static str {
        match self {
            Flood::None => "none",
            Flood::Hping => "hping3 -S (1 source)",
            Flood::Spoof => "spoofed 203.0.113.0/24",
            Flood::Spoof6 => "spoofed random /64s",
        }
    }
}

#[derive(Clone)]
enum Target {
    Gateway { bin: PathBuf, xdp: bool },
    Nginx { bin: PathBuf },
}

impl Target {
    fn name(&self) -> &'static str {
        match self {
            Target::Gateway { xdp: true, .. } => "gateway-xdp",
            Target::Gateway { xdp: false, .. } => "gateway-off",
            Target::Nginx { .. } => "nginx",
        }
    }
}

fn main() {
    let opts = parse_args();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        usage("needs root (network namespaces, veth, XDP, raw sockets)");
    }
    if Command::new("hping3").arg("--version").output().is_err()
        && opts.floods.contains(&Flood::Hping)
    {
        usage("hping3 is not installed (apt-get install hping3)");
    }
    // SAFETY: installing a handler that only stores to an atomic (async-signal-safe).
    unsafe {
        let handler: extern "C" fn(libc::c_int) = on_sigint;
        libc::signal(libc::SIGINT, handler as libc::sighandler_t);
    }
    let mut targets = Vec::new();
    if let Some(g) = &opts.gateway {
        targets.push(Target::Gateway {
            bin: g.clone(),
            xdp: true,
        });
        targets.push(Target::Gateway {
            bin: g.clone(),
            xdp: false,
        });
    }
    if let Some(n) = &opts.nginx {
        targets.push(Target::Nginx { bin: n.clone() });
    }
    if let Some(only) = &opts.only {
        targets.retain(|t| only.iter().any(|o| o == t.name()));
    }
    if targets.is_empty() {
        usage("nothing to measure: pass --gateway and/or --nginx");
    }
    if let Err(e) = pin_to_cpu(GENERATOR_CPU) {
        eprintln!("warning: cannot pin to CPU {GENERATOR_CPU}: {e}");
    }

    let rig = Rig::new();
    let origin = start_origin().expect("start the origin");
    eprintln!(
        "attacker {} ({}) -> {}, client {} ({}) -> {}, origin {origin}",
        rig.attacker.peer4,
        rig.attacker.netns,
        rig.attacker.host4,
        rig.client.peer4,
        rig.client.netns,
        rig.client.host4
    );
    let mut rows = Vec::new();
    'outer: for round in 0..opts.rounds {
        // Interleaved: every proxy under one flood before the next flood.
        for &flood in &opts.floods {
            for target in &targets {
                if stopped() {
                    break 'outer;
                }
                match run(&rig, target, flood, origin, &opts) {
                    Ok(row) => {
                        eprintln!("round {round}: {}", row.line());
                        rows.push(row);
                    }
                    Err(e) => eprintln!("{} / {}: failed: {e}", target.name(), flood.name()),
                }
            }
        }
    }
    if stopped() {
        eprintln!("interrupted: cleaning up");
    }
    let report = report(&rows, &opts);
    print!("{report}");
    if let Some(out) = &opts.out {
        if let Err(e) = std::fs::write(out, &report) {
            eprintln!("writing {}: {e}", out.display());
        }
    }
    drop(rig);
}

// ---------------------------------------------------------------------------------------
// One run

struct Row {
    proxy: &'static str,
    flood: &'static str,
    ok_per_s: f64,
    ok_share: f64,
    failed: u64,
    p99: Duration,
    max: Duration,
    syns: u64,
    syns_per_s: f64,
    xdp_drops_per_s: Option<f64>,
    /// SYNs of new sources passed without state (the new-source backstop exhausted).
    xdp_untracked_per_s: Option<f64>,
    proxy_cpu: f64,
    softirq: f64,
    seconds: f64,
}

impl Row {
    fn line(&self) -> String {
        format!(
            "{:12} {:28} {:8.0} req/s ok ({:.1} %), {} failed, p99 {:.1} ms, max {:.0} ms, {} SYNs ({:.0}/s), XDP drops {}/s, untracked {}/s, proxy CPU {:.2} s, softirq {:.2} s (window {:.2} s)",
            self.proxy,
            self.flood,
            self.ok_per_s,
            self.ok_share,
            self.failed,
            self.p99.as_secs_f64() * 1e3,
            self.max.as_secs_f64() * 1e3,
            self.syns,
            self.syns_per_s,
            self.xdp_drops_per_s
                .map_or_else(|| "-".to_string(), |d| format!("{d:.0}")),
            self.xdp_untracked_per_s
                .map_or_else(|| "-".to_string(), |d| format!("{d:.0}")),
            self.proxy_cpu,
            self.softirq,
            self.seconds
        )
    }
}

fn report(rows: &[Row], opts: &Options) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    // Online CPUs (this process is pinned to one, so not `available_parallelism`).
    // SAFETY: sysconf has no preconditions.
    let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_default();
    let command: Vec<String> = std::env::args().collect();
    let _ = writeln!(
        s,
        "Machine: {cpus} CPUs ({model}), kernel {}.",
        kernel.trim()
    );
    let _ = writeln!(s, "Command: `{}`", command.join(" "));
    let _ = writeln!(
        s,
        "{} s per run after a 1 s warm-up, {} client threads, proxy pinned to CPU {PROXY_CPU}, \
         everything else to CPU {GENERATOR_CPU}; spoofed flood paced at {} SYN/s (0: unpaced); \
         hping3 interval {} µs (0: --flood); legitimate client: {}.\n",
        opts.seconds,
        opts.clients,
        opts.spoof_pps,
        opts.hping_interval_us,
        if opts.new_clients {
            "a new source (random /64 of 2001:db8:c1::/48) per request, not exempt"
        } else {
            "one address, exempt (allow)"
        }
    );
    let _ = writeln!(
        s,
        "| proxy | flood | legit ok req/s | legit ok % | legit failed | legit p99 | legit max | attacker SYNs (per s) | XDP drops/s | XDP untracked/s | proxy CPU s | softirq CPU s | softirq µs per SYN |"
    );
    let _ = writeln!(
        s,
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for r in rows {
        let _ = writeln!(
            s,
            "| {} | {} | {:.0} | {:.1} | {} | {:.1} ms | {:.0} ms | {} ({:.0}) | {} | {} | {:.2} | {:.2} | {} |",
            r.proxy,
            r.flood,
            r.ok_per_s,
            r.ok_share,
            r.failed,
            r.p99.as_secs_f64() * 1e3,
            r.max.as_secs_f64() * 1e3,
            r.syns,
            r.syns_per_s,
            r.xdp_drops_per_s
                .map_or_else(|| "-".to_string(), |d| format!("{d:.0}")),
            r.xdp_untracked_per_s
                .map_or_else(|| "-".to_string(), |d| format!("{d:.0}")),
            r.proxy_cpu,
            r.softirq,
            if r.syns > 1000 {
                format!("{:.2}", r.softirq / r.syns as f64 * 1e6)
            } else {
                "-".to_string()
            }
        );
    }
    s
}

fn run(
    rig: &Rig,
    target: &Target,
    flood: Flood,
    origin: SocketAddr,
    opts: &Options,
) -> Result<Row, String> {
    let proxy = start_proxy(rig, target, origin, opts.new_clients)?;
    let (to, sources) = if opts.new_clients {
        (
            SocketAddr::new(rig.client.host6.into(), proxy.port),
            Some(CLIENTS6_NET),
        )
    } else {
        (SocketAddr::new(rig.client.host4.into(), proxy.port), None)
    };
    // The path works before anything is measured.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match in_netns(&rig.client.netns, move || {
            one_request(
                to,
                sources.map(|net| random_in(net, 48, std::process::id().into())),
            )
        }) {
            Ok(_) => break,
            Err(e) if Instant::now() > deadline => {
                return Err(format!(
                    "no 200 from {} before the flood: {e}",
                    target.name()
                ))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }

    let flooder = match flood {
        Flood::None => None,
        Flood::Hping => Some(Flooder::hping(rig, proxy.port, opts.hping_interval_us)?),
        Flood::Spoof => Some(Flooder::spoof(rig, proxy.port, opts.spoof_pps)),
        Flood::Spoof6 => Some(Flooder::spoof6(rig, to, opts.spoof_pps)?),
    };
    let clients = Clients::start(&rig.client.netns, to, sources, opts.clients);
    if !sleep_unless_stopped(WARMUP) {
        return Err("interrupted".into());
    }

    let snapshot = |proxy: &Proxy| {
        (
            Instant::now(),
            proc_cpu_seconds(proxy.child.id()),
            softirq_seconds(),
            syns_sent(&rig.attacker),
            proxy.xdp_drops(),
            proxy.xdp_packets("pass_untracked"),
        )
    };
    let (t0, cpu0, soft0, tx0, drops0, untracked0) = snapshot(&proxy);
    clients.measuring.store(true, Ordering::SeqCst);
    let complete = sleep_unless_stopped(Duration::from_secs(opts.seconds));
    clients.measuring.store(false, Ordering::SeqCst);
    let (t1, cpu1, soft1, tx1, drops1, untracked1) = snapshot(&proxy);
    drop(flooder);
    let (ok, failed, mut latencies) = clients.finish();
    drop(proxy);
    if !complete {
        return Err("interrupted".into());
    }
    let secs = (t1 - t0).as_secs_f64();
    latencies.sort_unstable();
    let p99 = latencies
        .get((latencies.len() * 99).div_ceil(100).saturating_sub(1))
        .copied()
        .unwrap_or_default();
    let syns = tx1.saturating_sub(tx0);
    Ok(Row {
        proxy: target.name(),
        flood: flood.name(),
        ok_per_s: ok as f64 / secs,
        ok_share: if ok + failed == 0 {
            0.0
        } else {
            ok as f64 * 100.0 / (ok + failed) as f64
        },
        failed,
        p99,
        max: latencies.last().copied().unwrap_or_default(),
        syns,
        syns_per_s: syns as f64 / secs,
        xdp_drops_per_s: match (drops0, drops1) {
            (Some(a), Some(b)) => Some(b.saturating_sub(a) as f64 / secs),
            _ => None,
        },
        xdp_untracked_per_s: match (untracked0, untracked1) {
            (Some(a), Some(b)) => Some(b.saturating_sub(a) as f64 / secs),
            _ => None,
        },
        proxy_cpu: cpu1 - cpu0,
        softirq: soft1 - soft0,
        seconds: secs,
    })
}

/// Softirq time of all CPUs (the `softirq` column of the `cpu` line of `/proc/stat`).
fn softirq_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: u64 = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .and_then(|l| l.split_whitespace().nth(7))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    ticks as f64 / hz
}

// ---------------------------------------------------------------------------------------
// The legitimate client

struct Clients {
    stop: Arc<AtomicBool>,
    measuring: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<(u64, u64, Vec<Duration>)>>,
}

impl Clients {
    /// `sources`: bind every request to a fresh random /64 of this /48 (new clients).
    fn start(netns: &str, to: SocketAddr, sources: Option<Ipv6Addr>, n: usize) -> Clients {
        let stop = Arc::new(AtomicBool::new(false));
        let measuring = Arc::new(AtomicBool::new(false));
        let threads = (0..n)
            .map(|i| {
                let (stop, measuring, netns) = (stop.clone(), measuring.clone(), netns.to_owned());
                let mut seed =
                    0x2545_f491_4f6c_dd1d_u64 ^ (i as u64) << 32 ^ u64::from(std::process::id());
                std::thread::spawn(move || {
                    let (mut ok, mut failed, mut lat) = (0u64, 0u64, Vec::new());
                    if enter_netns(&netns).is_err() {
                        return (ok, failed, lat);
                    }
                    while !stop.load(Ordering::Relaxed) && !stopped() {
                        let counted = measuring.load(Ordering::Relaxed);
                        let t = Instant::now();
                        seed = xorshift64(seed);
                        let result = one_request(to, sources.map(|net| random_in(net, 48, seed)));
                        // Only requests that started and ended inside the window count.
                        if counted && measuring.load(Ordering::Relaxed) {
                            match result {
                                Ok(()) => {
                                    ok += 1;
                                    lat.push(t.elapsed());
                                }
                                Err(_) => failed += 1,
                            }
                        } else if result.is_err() {
                            std::thread::sleep(Duration::from_millis(10));
                        }
                    }
                    (ok, failed, lat)
                })
            })
            .collect();
        Clients {
            stop,
            measuring,
            threads,
        }
    }

    fn finish(mut self) -> (u64, u64, Vec<Duration>) {
        self.stop.store(true, Ordering::SeqCst);
        let (mut ok, mut failed, mut lat) = (0, 0, Vec::new());
        for t in self.threads.drain(..) {
            if let Ok((o, f, l)) = t.join() {
                ok += o;
                failed += f;
                lat.extend(l);
            }
        }
        (ok, failed, lat)
    }
}

impl Drop for Clients {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn xorshift64(mut x: u64) -> u64 {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    x
}

/// An address in `net`/`len` (len < 64) with a random /64 (from `seed`) and host ::1.
fn random_in(net: Ipv6Addr, len: u8, seed: u64) -> Ipv6Addr {
    let mask = u64::MAX >> len;
    let hi = (u128::from(net) >> 64) as u64 & !mask | xorshift64(seed | 1) & mask;
    Ipv6Addr::from(u128::from(hi) << 64 | 1)
}

/// One request on a new connection, from `source` when given (a non-local address the
/// namespace routes to itself: `IPV6_FREEBIND`); `Ok` on a complete `200` response.
fn one_request(to: SocketAddr, source: Option<Ipv6Addr>) -> Result<(), String> {
    let e = |e: io::Error| e.to_string();
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(to),
        socket2::Type::STREAM,
        None,
    )
    .map_err(e)?;
    if let Some(source) = source {
        socket.set_freebind_ipv6(true).map_err(e)?;
        socket
            .bind(&SocketAddr::new(IpAddr::V6(source), 0).into())
            .map_err(|err| format!("bind {source}: {err}"))?;
    }
    // A new client must get in on its first SYN: the kernel retransmits a lost one after
    // 1 s, so a lockout shows as a failure here rather than as a slow success.
    let connect_timeout = if source.is_some() {
        NEW_CLIENT_CONNECT_TIMEOUT
    } else {
        CLIENT_TIMEOUT
    };
    socket
        .connect_timeout(&to.into(), connect_timeout)
        .map_err(e)?;
    let mut s: TcpStream = socket.into();
    s.set_read_timeout(Some(CLIENT_TIMEOUT))
        .and_then(|()| s.set_write_timeout(Some(CLIENT_TIMEOUT)))
        .and_then(|()| s.set_nodelay(true))
        .map_err(|e| e.to_string())?;
    s.write_all(REQUEST).map_err(|e| e.to_string())?;
    let mut buf = Vec::with_capacity(512);
    s.read_to_end(&mut buf).map_err(|e| e.to_string())?;
    if buf.starts_with(b"HTTP/1.1 200") && buf.ends_with(b"ok\n") {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&buf[..buf.len().min(80)]).into_owned())
    }
}

// ---------------------------------------------------------------------------------------
// The origin: answers every request `200 ok`, keep-alive, one thread per connection (the
// proxies pool a few connections).

fn start_origin() -> io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || serve_origin(stream));
        }
    });
    Ok(addr)
}

fn serve_origin(mut s: TcpStream) {
    const RESPONSE: &[u8] =
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n\r\nok\n";
    let _ = s.set_nodelay(true);
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    loop {
        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            buf.drain(..end + 4);
            if s.write_all(RESPONSE).is_err() {
                return;
            }
        }
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

// ---------------------------------------------------------------------------------------
// The proxies

struct Proxy {
    child: Child,
    port: u16,
    admin: Option<SocketAddr>,
    dir: PathBuf,
}

impl Proxy {
    /// Sum of the XDP drop verdicts from the admin `/metrics` (gateway with XDP only).
    fn xdp_drops(&self) -> Option<u64> {
        self.xdp_packets("drop")
    }

    /// Sum of the XDP verdicts whose label starts with `verdict` (gateway with XDP only).
    fn xdp_packets(&self, verdict: &str) -> Option<u64> {
        let body = http_get(self.admin?, "/metrics").ok()?;
        let prefix = format!("gateway_xdp_packets_total{{verdict=\"{verdict}");
        let mut sum = None;
        for line in body.lines() {
            if let Some(rest) = line.strip_prefix(prefix.as_str()) {
                let n: u64 = rest.split_whitespace().last()?.parse().ok()?;
                *sum.get_or_insert(0) += n;
            }
        }
        sum
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        // SIGTERM first: an nginx master killed outright leaves its workers running.
        stop_child_and_pid_file(
            &mut self.child,
            &self.dir.join("nginx.pid"),
            Duration::from_secs(3),
        );
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn http_get(addr: SocketAddr, path: &str) -> io::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n"
    )?;
    let mut body = String::new();
    s.read_to_string(&mut body)?;
    Ok(body)
}

fn start_proxy(
    rig: &Rig,
    target: &Target,
    origin: SocketAddr,
    ipv6: bool,
) -> Result<Proxy, String> {
    let e = |e: io::Error| e.to_string();
    // Free on every address: the proxy listens on the unspecified address.
    let port = free_port_on(Ipv4Addr::UNSPECIFIED.into());
    let dir = std::env::temp_dir().join(format!(
        "flood-bench-{}-{}",
        std::process::id(),
        target.name()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(e)?;
    let legit = rig.client.peer4;
    // The new clients and the IPv6 flood only (the gateway's `[::]` is IPv6-only).
    let listen = if ipv6 {
        format!("[::]:{port}")
    } else {
        format!("0.0.0.0:{port}")
    };
    let mut admin = None;
    let mut cmd;
    match target {
        Target::Gateway { bin, xdp } => {
            let admin_addr = free_addr();
            let xdp_table = if *xdp {
                admin = Some(admin_addr);
                format!(
                    "[xdp]\nmode = \"native\"\ninterface = [\"{}\", \"{}\"]\npin_path = \"{}\"\n",
                    rig.attacker.host_if,
                    rig.client.host_if,
                    rig.pins.path().display()
                )
            } else {
                "[xdp]\nmode = \"off\"\n".to_string()
            };
            let config = format!(
                "[server]\nworkers = 1\n\n[log]\naccess = \"off\"\nlevel = \"warn\"\n\n\
                 [admin]\nlisten = \"{admin_addr}\"\n\n\
                 [[listener]]\nname = \"http\"\nlisten = \"{listen}\"\n\n\
                 [[upstream]]\nname = \"api\"\nservers = [\"{origin}\"]\nkeepalive = 32\n\n\
                 [[route]]\npath_prefix = \"/api/\"\nupstream = \"api\"\n\n\
                 [limits]\nconn_rate = \"50/s\"\nconn_burst = 100\nmax_conns_per_ip = 64\n\
                 allow = [\"{legit}/32\"]\n\n{xdp_table}"
            );
            let path = dir.join("gateway.toml");
            std::fs::write(&path, config).map_err(e)?;
            cmd = Command::new(bin);
            cmd.arg("run").arg("--config").arg(&path);
        }
        Target::Nginx { bin } => {
            let template = std::fs::read_to_string(
                workspace_root().join("tests/fixtures/nginx-reference.conf"),
            )
            .map_err(e)?;
            // The limits of the gateway's [limits], with the legitimate client exempt like the
            // gateway's `allow` (an empty key is not limited).
            let zones = format!(
                "http {{\n    geo $flood_limited {{ default 1; {legit}/32 0; }}\n    \
                 map $flood_limited $flood_key {{ 0 \"\"; 1 $binary_remote_addr; }}\n    \
                 limit_conn_zone $flood_key zone=perip:10m;\n    \
                 limit_req_zone $flood_key zone=rate:10m rate=50r/s;\n"
            );
            let conf = template
                .replacen("http {\n", &zones, 1)
                .replacen(
                    "location /api/ {\n",
                    "location /api/ {\n            limit_conn perip 64;\n            \
                     limit_req zone=rate burst=100 nodelay;\n",
                    1,
                )
                .replace("@WORKERS@", "1")
                .replace("@PREFIX@", &dir.display().to_string())
                .replace("@LISTEN@", &listen)
                .replace("@API_UPSTREAM@", &origin.to_string())
                .replace("@WS_UPSTREAM@", &origin.to_string());
            if !conf.contains("limit_req zone=rate") || !conf.contains("limit_req_zone") {
                return Err("the nginx template changed: could not add the limits".into());
            }
            let path = dir.join("nginx.conf");
            std::fs::write(&path, conf).map_err(e)?;
            cmd = Command::new(bin);
            cmd.arg("-p")
                .arg(format!("{}/", dir.display()))
                .arg("-c")
                .arg(&path)
                .arg("-g")
                .arg("daemon off;");
        }
    }
    let stderr = File::create(dir.join("stderr.log")).map_err(e)?;
    // SAFETY: sched_setaffinity is async-signal-safe; runs in the child before exec.
    unsafe {
        cmd.pre_exec(|| {
            let _ = pin_to_cpu(PROXY_CPU);
            Ok(())
        });
    }
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .map_err(|err| format!("start {}: {err}", target.name()))?;
    let mut proxy = Proxy {
        child,
        port,
        admin,
        dir,
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let probe = if ipv6 { "::1" } else { "127.0.0.1" };
    while TcpStream::connect((probe, port)).is_err() {
        let exited = proxy.child.try_wait().ok().flatten().is_some();
        if exited || Instant::now() > deadline || stopped() {
            let log = std::fs::read_to_string(proxy.dir.join("stderr.log")).unwrap_or_default();
            return Err(format!("{} did not listen: {log}", target.name()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if let Some(admin) = proxy.admin {
        // XDP attached: the counters are there.
        let deadline = Instant::now() + Duration::from_secs(5);
        while proxy.xdp_drops().is_none() {
            if Instant::now() > deadline {
                return Err(format!("no XDP counters on http://{admin}/metrics"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Ok(proxy)
}

// ---------------------------------------------------------------------------------------
// The floods

enum Flooder {
    Hping(Child),
    Spoof {
        stop: Arc<AtomicBool>,
        thread: Option<std::thread::JoinHandle<()>>,
        sent: Arc<AtomicU64>,
    },
}

impl Flooder {
    fn hping(rig: &Rig, port: u16, interval_us: u64) -> Result<Flooder, String> {
        let pace = if interval_us == 0 {
            vec!["--flood".to_string()]
        } else {
            vec!["-i".to_string(), format!("u{interval_us}")]
        };
        // `ip netns exec` execs hping3 in place: the child's pid is hping3's own.
        let child = rig
            .attacker
            .command("hping3")
            .args(["-q", "-S"])
            .args(&pace)
            .arg("-p")
            .arg(port.to_string())
            .arg(rig.attacker.host4.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("start hping3: {e}"))?;
        Ok(Flooder::Hping(child))
    }

    fn spoof(rig: &Rig, port: u16, pps: u64) -> Flooder {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let netns = rig.attacker.netns.clone();
        let dst = rig.attacker.host4;
        let thread = {
            let (stop, sent) = (stop.clone(), sent.clone());
            std::thread::spawn(move || {
                if let Err(e) = spoof_syns(&netns, dst, port, pps, &stop, &sent) {
                    eprintln!("spoofed flood: {e}");
                }
            })
        };
        Flooder::Spoof {
            stop,
            thread: Some(thread),
            sent,
        }
    }
}

impl Flooder {
    /// Random-source SYNs to `to` (the client's listener address, through the attacker's
    /// link: the host takes any local address on any interface).
    fn spoof6(rig: &Rig, to: SocketAddr, pps: u64) -> Result<Flooder, String> {
        let SocketAddr::V6(to) = to else {
            return Err("spoof6 needs --new-clients (an IPv6 target)".into());
        };
        let mac = rig.attacker.host_mac();
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let (netns, peer_if) = (rig.attacker.netns.clone(), rig.attacker.peer_if.clone());
        let thread = {
            let (stop, sent) = (stop.clone(), sent.clone());
            std::thread::spawn(move || {
                if let Err(e) = spoof6_syns(&netns, &peer_if, &mac, to, pps, &stop, &sent) {
                    eprintln!("spoofed IPv6 flood: {e}");
                }
            })
        };
        Ok(Flooder::Spoof {
            stop,
            thread: Some(thread),
            sent,
        })
    }
}

impl Drop for Flooder {
    fn drop(&mut self) {
        match self {
            Flooder::Hping(child) => {
                // Our own child (hping3 itself), by its pid.
                let _ = child.kill();
                let _ = child.wait();
            }
            Flooder::Spoof { stop, thread, sent } => {
                stop.store(true, Ordering::SeqCst);
                if let Some(t) = thread.take() {
                    let _ = t.join();
                }
                eprintln!(
                    "  spoofed flood: {} SYNs sent (generator count, warm-up included)",
                    sent.load(Ordering::Relaxed)
                );
            }
        }
    }
}

/// Sends SYNs from 203.0.113.1-254 (rotating, sequential ports) to `dst:port` through a
/// raw socket in `netns` until `stop`.
fn spoof_syns(
    netns: &str,
    dst: Ipv4Addr,
    port: u16,
    pps: u64,
    stop: &AtomicBool,
    sent: &AtomicU64,
) -> io::Result<()> {
    enter_netns(netns)?;
    let sock = raw_socket(libc::AF_INET, libc::IPPROTO_RAW)?;
    let to = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(dst).to_be(),
        },
        sin_zero: [0; 8],
    };
    let mut state: u32 = 0x9e37_79b9 ^ std::process::id();
    send_paced(&sock, &to, pps, stop, sent, |n| {
        // xorshift32 for sequence numbers and ports.
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        let src = Ipv4Addr::from(u32::from(SPOOF_NET) | (1 + (n % 254) as u32));
        let sport = 1024 + (state % 64000) as u16;
        syn_packet(src, dst, sport, port, state)
    })
}

/// Sends SYNs from random /64s of `SPOOF6_NET` to `to` as Ethernet frames out of
/// `peer_if` in `netns` (AF_PACKET: no source address check), paced at `pps`, until `stop`.
fn spoof6_syns(
    netns: &str,
    peer_if: &str,
    dst_mac: &[u8],
    to: std::net::SocketAddrV6,
    pps: u64,
    stop: &AtomicBool,
    sent: &AtomicU64,
) -> io::Result<()> {
    enter_netns(netns)?;
    let sock = raw_socket(libc::AF_PACKET, 0)?;
    let name = std::ffi::CString::new(peer_if).map_err(io::Error::other)?;
    // SAFETY: a NUL-terminated name.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: all-zero is a valid sockaddr_ll; the fields that matter are set below.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_ifindex = index as i32;
    addr.sll_halen = 6;
    addr.sll_addr[..6].copy_from_slice(&dst_mac[..6]);
    let mut state = 0x9e37_79b9_7f4a_7c15u64 ^ u64::from(std::process::id());
    send_paced(&sock, &addr, pps, stop, sent, |_| {
        state = xorshift64(state);
        let src = random_in(SPOOF6_NET, SPOOF6_LEN, state);
        let sport = 1024 + (state >> 48) as u16 % 64000;
        syn6_frame(dst_mac, src, &to, sport, state as u32)
    })
}

/// A raw socket of `family` and `protocol`.
fn raw_socket(family: libc::c_int, protocol: libc::c_int) -> io::Result<std::os::fd::OwnedFd> {
    // SAFETY: plain socket(2); the descriptor is owned by the result.
    let fd = unsafe { libc::socket(family, libc::SOCK_RAW, protocol) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor, closed when the `OwnedFd` drops.
    Ok(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}

/// Sends `packet(n)` for n = 0, 1, ... to `addr` (a `sockaddr_*`) on `sock` until `stop`,
/// paced at `pps` (0: as fast as it can), counting into `sent`.
fn send_paced<A, P: AsRef<[u8]>>(
    sock: &std::os::fd::OwnedFd,
    addr: &A,
    pps: u64,
    stop: &AtomicBool,
    sent: &AtomicU64,
    mut packet: impl FnMut(u64) -> P,
) -> io::Result<()> {
    let mut n: u64 = 0;
    let started = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        // Paced: every 256 packets, wait until the schedule catches up.
        if pps > 0 && n & 255 == 0 {
            let due = Duration::from_secs_f64(n as f64 / pps as f64);
            if let Some(ahead) = due.checked_sub(started.elapsed()) {
                std::thread::sleep(ahead);
            }
        }
        let packet = packet(n);
        let packet = packet.as_ref();
        // SAFETY: sendto with a valid buffer and an address of its own size.
        let rc = unsafe {
            libc::sendto(
                sock.as_raw_fd(),
                packet.as_ptr().cast(),
                packet.len(),
                0,
                std::ptr::from_ref(addr).cast(),
                std::mem::size_of::<A>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::ENOBUFS) {
                return Err(err);
            }
            continue;
        }
        n += 1;
        if n & 1023 == 0 {
            sent.store(n, Ordering::Relaxed);
        }
    }
    sent.store(n, Ordering::Relaxed);
    Ok(())
}

/// Ethernet + IPv6 + TCP SYN, TCP checksum over the pseudo-header (RFC 8200 section 8.1).
fn syn6_frame(
    dst_mac: &[u8],
    src: Ipv6Addr,
    to: &std::net::SocketAddrV6,
    sport: u16,
    seq: u32,
) -> Vec<u8> {
    let mut t = [0u8; 20];
    t[0..2].copy_from_slice(&sport.to_be_bytes());
    t[2..4].copy_from_slice(&to.port().to_be_bytes());
    t[4..8].copy_from_slice(&seq.to_be_bytes());
    t[12] = 5 << 4;
    t[13] = 0x02; // SYN
    t[14..16].copy_from_slice(&64240u16.to_be_bytes());
    let mut pseudo = 0u32;
    for w in src.octets().chunks(2).chain(to.ip().octets().chunks(2)) {
        pseudo += u32::from(u16::from_be_bytes([w[0], w[1]]));
    }
    pseudo += u32::from(libc::IPPROTO_TCP as u16) + 20;
    let sum = checksum(&t, pseudo);
    t[16..18].copy_from_slice(&sum.to_be_bytes());
    let mut frame = dst_mac[..6].to_vec();
    frame.extend_from_slice(&[
        0x02, 0, 0, 0, 0x0f, 0x10, 0x86, 0xdd, 0x60, 0, 0, 0, 0, 20, 6, 64,
    ]);
    frame.extend_from_slice(&src.octets());
    frame.extend_from_slice(&to.ip().octets());
    frame.extend_from_slice(&t);
    frame
}

/// An IPv4 + TCP SYN (no options), checksums filled in.
fn syn_packet(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, seq: u32) -> [u8; 40] {
    let mut p = [0u8; 40];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&40u16.to_be_bytes());
    p[4..6].copy_from_slice(&(seq as u16).to_be_bytes());
    p[8] = 64;
    p[9] = libc::IPPROTO_TCP as u8;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    let ip_sum = checksum(&p[..20], 0);
    p[10..12].copy_from_slice(&ip_sum.to_be_bytes());
    let t = &mut p[20..];
    t[0..2].copy_from_slice(&sport.to_be_bytes());
    t[2..4].copy_from_slice(&dport.to_be_bytes());
    t[4..8].copy_from_slice(&seq.to_be_bytes());
    t[12] = 5 << 4;
    t[13] = 0x02; // SYN
    t[14..16].copy_from_slice(&64240u16.to_be_bytes());
    let mut pseudo = 0u32;
    for w in [src.octets(), dst.octets()] {
        pseudo += u32::from(u16::from_be_bytes([w[0], w[1]]));
        pseudo += u32::from(u16::from_be_bytes([w[2], w[3]]));
    }
    pseudo += u32::from(libc::IPPROTO_TCP as u16) + 20;
    let tcp_sum = checksum(&p[20..], pseudo);
    p[36..38].copy_from_slice(&tcp_sum.to_be_bytes());
    p
}

fn checksum(bytes: &[u8], initial: u32) -> u16 {
    let mut sum = initial;
    for pair in bytes.chunks(2) {
        let hi = u32::from(pair[0]) << 8;
        let lo = pair.get(1).map_or(0, |&b| u32::from(b));
        sum += hi | lo;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

// ---------------------------------------------------------------------------------------
// Namespaces and links

/// The two namespaces, a route for the spoofed network into the attacker's, and the pin
/// directory of the XDP maps; all removed on drop (the routes go with the links).
struct Rig {
    attacker: VethPair,
    client: VethPair,
    pins: PinDir,
}

impl Rig {
    fn new() -> Rig {
        let attacker = VethPair::create();
        let client = VethPair::create();
        // SYN-ACKs to the spoofed sources go back into the attacker namespace (which drops
        // them), never out of the host's default route.
        attacker.route_into(&format!("{SPOOF_NET}/24"));
        // The same for the random IPv6 sources; and the new clients' /48 is routed to the
        // client namespace, which takes all of it as local (AnyIP) so a client can bind any
        // address of it.
        attacker.route_into(&format!("{SPOOF6_NET}/{SPOOF6_LEN}"));
        client.route_into(&format!("{CLIENTS6_NET}/48"));
        ip(&[
            "-n",
            &client.netns,
            "-6",
            "route",
            "add",
            "local",
            &format!("{CLIENTS6_NET}/48"),
            "dev",
            "lo",
        ]);
        Rig {
            attacker,
            client,
            pins: PinDir::new("flood-bench"),
        }
    }
}

/// SYNs the attacker sent: frames its veth end transmitted (XDP drops on the host side
/// included) minus the RSTs its own kernel sent for SYN-ACKs it did not expect (`Tcp:
/// OutRsts` of the namespace; hping3's raw SYNs are not in the TCP counters). What is
/// left beside SYNs is a few ARP frames.
fn syns_sent(veth: &VethPair) -> u64 {
    let rsts = veth
        .command("cat")
        .arg("/proc/net/snmp")
        .output()
        .ok()
        .and_then(|o| parse_out_rsts(&String::from_utf8_lossy(&o.stdout)))
        .unwrap_or(0);
    tx_packets(veth).saturating_sub(rsts)
}

/// Frames the peer (in the namespace) transmitted.
fn tx_packets(veth: &VethPair) -> u64 {
    Command::new("ip")
        .args([
            "-n",
            &veth.netns,
            "-s",
            "-o",
            "link",
            "show",
            "dev",
            &veth.peer_if,
        ])
        .output()
        .ok()
        .and_then(|o| parse_tx_packets(&String::from_utf8_lossy(&o.stdout)))
        .unwrap_or(0)
}

/// `OutRsts` from the `Tcp:` header and value lines of `/proc/net/snmp`.
fn parse_out_rsts(snmp: &str) -> Option<u64> {
    let mut tcp = snmp.lines().filter(|l| l.starts_with("Tcp:"));
    let (names, values) = (tcp.next()?, tcp.next()?);
    let column = names.split_whitespace().position(|n| n == "OutRsts")?;
    values.split_whitespace().nth(column)?.parse().ok()
}

/// From `ip -s -o link show` (`... TX:  bytes packets errors ...\    123 456 ...`).
fn parse_tx_packets(out: &str) -> Option<u64> {
    let tx = out.find("TX:")?;
    let rest = &out[tx..];
    let values = rest.split('\\').nth(1)?;
    values.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn syn_checksums_verify() {
        let p = syn_packet(
            Ipv4Addr::new(203, 0, 113, 9),
            Ipv4Addr::new(198, 51, 100, 1),
            40000,
            8080,
            0x1234_5678,
        );
        assert_eq!(checksum(&p[..20], 0), 0);
        let mut pseudo = 0u32;
        for w in [[203u8, 0, 113, 9], [198, 51, 100, 1]] {
            pseudo += u32::from(u16::from_be_bytes([w[0], w[1]]));
            pseudo += u32::from(u16::from_be_bytes([w[2], w[3]]));
        }
        pseudo += 6 + 20;
        assert_eq!(checksum(&p[20..], pseudo), 0);
    }

    #[test]
    fn syn6_checksum_verifies_and_sources_stay_in_their_network() {
        let to = std::net::SocketAddrV6::new("2001:db8:77:201::1".parse().unwrap(), 8080, 0, 0);
        let src = random_in(SPOOF6_NET, SPOOF6_LEN, 12345);
        assert_eq!(u128::from(src) >> 92, u128::from(SPOOF6_NET) >> 92);
        assert_ne!(
            random_in(SPOOF6_NET, SPOOF6_LEN, 1),
            random_in(SPOOF6_NET, SPOOF6_LEN, 2)
        );
        let frame = syn6_frame(&[2, 0, 0, 0, 0, 1], src, &to, 40000, 7);
        let mut pseudo = 0u32;
        for w in frame[22..54].chunks(2) {
            pseudo += u32::from(u16::from_be_bytes([w[0], w[1]]));
        }
        pseudo += 6 + 20;
        assert_eq!(checksum(&frame[54..], pseudo), 0);
    }

    #[test]
    fn out_rsts_from_snmp() {
        let snmp = "Ip: Forwarding DefaultTTL\nIp: 2 64\nTcp: RtoAlgorithm RtoMin ActiveOpens OutRsts InCsumErrors\nTcp: 1 200 5 777 0\nUdp: InDatagrams\nUdp: 0\n";
        assert_eq!(parse_out_rsts(snmp), Some(777));
    }

    #[test]
    fn tx_packets_from_ip_link() {
        let out = "5: gfp1a@if6: <BROADCAST> mtu 1500 ...\\    RX:  bytes packets errors dropped missed   mcast           \\          1234      10      0       0      0       0 \\    TX:  bytes packets errors dropped carrier collsns           \\      99999999  1500000      0       0       0       0 ";
        assert_eq!(parse_tx_packets(out), Some(1_500_000));
    }
}
