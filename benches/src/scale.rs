//! The scale load (issue 13, "Scale"): many keep-alive clients and WebSocket tunnels held
//! open at once against a proxy, each busy for the whole run, plus the origin behind it.
//!
//! - [`run_origin`]: the origin. `GET` on a keep-alive connection answers `200` with a
//!   2-byte body; an `Upgrade: websocket` request answers `101` and from then on echoes
//!   every byte back (the tunnel is opaque bytes to the proxy; the client sends real masked
//!   frames, the origin does not unmask them).
//! - [`run_load`]: the clients. `keepalive` connections each send `GET /api/small` every
//!   `interval` (staggered over the interval so the load is even); `tunnels` WebSocket
//!   tunnels each send one 32-byte frame every `interval` and wait for its echo; `probes`
//!   extra keep-alive connections send at the fixed rate `probe_interval` each, so a latency
//!   series exists whose rate does not depend on how many clients are held.
//!
//! Connections open with at most `connect_concurrency` connects in flight (a burst of
//! 10,000 SYNs would overflow any accept backlog and measure SYN retries, not the proxy).
//! Every connection starts its periodic traffic as soon as it is up, so none sits idle past
//! a keep-alive timeout while the others open. Latencies are recorded only while
//! [`Control::measuring`] is set (the hold, after every connection is up); failures are
//! counted the whole time: a failed connect, a non-`200`/`101` answer, a close, a short or
//! wrong echo, or no answer within `op_timeout`. A failed connection is not reopened.
//!
//! The WebSocket key is RFC 6455's example key (§1.3), so the origin's fixed
//! `Sec-WebSocket-Accept` is the right one and the proxy's check of it passes.
//!
//! Descriptors are per process: the caller raises `RLIMIT_NOFILE` ([`raise_nofile_limit`])
//! and splits larger loads over processes (`scale-load`).

use std::cell::RefCell;
use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What the clients do.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    pub target: SocketAddr,
    pub keepalive: usize,
    pub tunnels: usize,
    /// Fixed-rate latency probe connections.
    pub probes: usize,
    /// Period of each keep-alive client's request and each tunnel's message.
    pub interval: Duration,
    /// Period of each probe connection's request.
    pub probe_interval: Duration,
    pub connect_concurrency: usize,
    /// Longest wait for a connect, an answer or an echo before it counts as a failure.
    pub op_timeout: Duration,
}

/// Shared switches between the load and whoever drives it.
#[derive(Debug, Default)]
pub struct Control {
    /// Set once every connection is up (or failed): the caller may start the hold.
    pub ramped: AtomicBool,
    /// Latencies are recorded while set.
    pub measuring: AtomicBool,
    /// Every connection stops (and closes with RST) once set.
    pub stop: AtomicBool,
}

/// What the clients saw.
#[derive(Debug, Default, Clone)]
pub struct LoadReport {
    pub keepalive_up: usize,
    pub tunnels_up: usize,
    pub errors: u64,
    /// The first few failures, for the log.
    pub error_samples: Vec<String>,
    /// Latencies in microseconds recorded while measuring.
    pub keepalive_us: Vec<u32>,
    pub tunnel_us: Vec<u32>,
    pub probe_us: Vec<u32>,
}

impl LoadReport {
    fn fail(&mut self, what: String) {
        self.errors += 1;
        if self.error_samples.len() < 8 {
            self.error_samples.push(what);
        }
    }

    /// Adds another process's report into this one.
    pub fn merge(&mut self, other: LoadReport) {
        self.keepalive_up += other.keepalive_up;
        self.tunnels_up += other.tunnels_up;
        self.errors += other.errors;
        for e in other.error_samples {
            if self.error_samples.len() < 8 {
                self.error_samples.push(e);
            }
        }
        self.keepalive_us.extend(other.keepalive_us);
        self.tunnel_us.extend(other.tunnel_us);
        self.probe_us.extend(other.probe_us);
    }

    /// One line of text (counts, then `;`-separated latency lists), for `scale-load`'s
    /// stdout; [`LoadReport::parse`] reads it back.
    pub fn to_line(&self) -> String {
        let list = |v: &[u32]| v.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
        format!(
            "report {} {} {} ;{};{};{};{}",
            self.keepalive_up,
            self.tunnels_up,
            self.errors,
            self.error_samples.join(" | ").replace(';', ","),
            list(&self.keepalive_us),
            list(&self.tunnel_us),
            list(&self.probe_us)
        )
    }

    pub fn parse(line: &str) -> Option<LoadReport> {
        let rest = line.strip_prefix("report ")?;
        let (counts, lists) = rest.split_once(" ;")?;
        let mut counts = counts.split(' ').map(str::parse::<u64>);
        let mut parts = lists.split(';');
        let errors_text = parts.next()?;
        let list = |s: Option<&str>| -> Option<Vec<u32>> {
            let s = s?;
            if s.is_empty() {
                return Some(Vec::new());
            }
            s.split(',').map(|v| v.parse().ok()).collect()
        };
        Some(LoadReport {
            keepalive_up: counts.next()?.ok()? as usize,
            tunnels_up: counts.next()?.ok()? as usize,
            errors: counts.next()?.ok()?,
            error_samples: errors_text
                .split(" | ")
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect(),
            keepalive_us: list(parts.next())?,
            tunnel_us: list(parts.next())?,
            probe_us: list(parts.next())?,
        })
    }
}

/// p50, p99 and max of latencies in microseconds, in milliseconds (zeros when empty).
pub fn percentiles_ms(samples: &[u32]) -> (f64, f64, f64) {
    if samples.is_empty() {
        return (0.0, 0.0, 0.0);
    }
    let mut v = samples.to_vec();
    v.sort_unstable();
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize] as f64 / 1000.0;
    (at(0.50), at(0.99), at(1.0))
}

/// Raises this process's `RLIMIT_NOFILE` soft limit to its hard limit; returns the limit.
pub fn raise_nofile_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid pointers to an rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 1024;
        }
        if lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
    lim.rlim_cur
}

const REQUEST: &[u8] = b"GET /api/small HTTP/1.1\r\nHost: scale\r\n\r\n";
const UPGRADE: &[u8] =
    b"GET /ws HTTP/1.1\r\nHost: scale\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
      Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
const SWITCHING: &[u8] =
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
      Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n";
const OK: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok";
/// A masked binary frame with 26 bytes of payload (RFC 6455 §5.2): 32 bytes on the wire.
const FRAME: [u8; 32] = {
    let mut f = [b'm'; 32];
    f[0] = 0x82;
    f[1] = 0x80 | 26;
    f[2] = 0x11;
    f[3] = 0x22;
    f[4] = 0x33;
    f[5] = 0x44;
    f
};

/// Serves the origin on `listener` until `stop` is set (checked once a second).
pub async fn run_origin(listener: TcpListener, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        let accepted = tokio::time::timeout(Duration::from_secs(1), listener.accept()).await;
        match accepted {
            Ok(Ok((s, _))) => {
                tokio::task::spawn_local(origin_connection(s));
            }
            Ok(Err(_)) => tokio::time::sleep(Duration::from_millis(10)).await,
            Err(_) => {}
        }
    }
}

async fn origin_connection(mut s: TcpStream) {
    let _ = s.set_nodelay(true);
    let mut buf = Vec::with_capacity(1024);
    loop {
        let Ok(head_len) = read_head(&mut s, &mut buf).await else {
            return;
        };
        let upgrade = String::from_utf8_lossy(&buf[..head_len])
            .to_ascii_lowercase()
            .contains("upgrade: websocket");
        buf.drain(..head_len);
        if upgrade {
            if s.write_all(SWITCHING).await.is_err() {
                return;
            }
            // Echo, starting with whatever followed the head.
            let mut chunk = vec![0u8; 1024];
            if !buf.is_empty() && s.write_all(&buf).await.is_err() {
                return;
            }
            loop {
                match s.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if s.write_all(&chunk[..n]).await.is_err() {
                            return;
                        }
                    }
                }
            }
        }
        if s.write_all(OK).await.is_err() {
            return;
        }
    }
}

/// Reads into `buf` until it holds a whole head; returns the head's length.
async fn read_head(s: &mut TcpStream, buf: &mut Vec<u8>) -> io::Result<usize> {
    loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            return Ok(i + 4);
        }
        if buf.len() > 16 * 1024 {
            return Err(io::Error::other("head over 16 KiB"));
        }
        let mut chunk = [0u8; 1024];
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed"));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Reads one response (head and `Content-Length` body) and returns its status.
async fn read_response(s: &mut TcpStream, buf: &mut Vec<u8>) -> io::Result<u16> {
    let head_len = read_head(s, buf).await?;
    let head = String::from_utf8_lossy(&buf[..head_len]).to_ascii_lowercase();
    let status = head
        .get(9..12)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| io::Error::other("no status line"))?;
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    while buf.len() < head_len + length {
        let mut chunk = [0u8; 1024];
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "closed mid-body",
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    buf.drain(..head_len + length);
    Ok(status)
}

#[derive(Clone, Copy)]
enum Kind {
    KeepAlive,
    Tunnel,
    Probe,
}

/// Runs the load until `control.stop`, on the current thread's runtime (inside a
/// `LocalSet`). Sets `control.ramped` once every connection has been tried.
pub async fn run_load(spec: LoadSpec, control: Arc<Control>) -> LoadReport {
    let report = Rc::new(RefCell::new(LoadReport::default()));
    let slots = Rc::new(tokio::sync::Semaphore::new(spec.connect_concurrency.max(1)));
    let total = spec.keepalive + spec.tunnels + spec.probes;
    let mut tasks = Vec::with_capacity(total);
    let (up_tx, mut up_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    // Interleaved so tunnels and keep-alive clients open side by side: among the
    // non-probe connections, `j` is a tunnel when `j * tunnels / n` steps there (exactly
    // `tunnels` of them, evenly spread).
    let n = (spec.keepalive + spec.tunnels).max(1);
    let kind_of = |i: usize| {
        if i < spec.probes {
            return Kind::Probe;
        }
        let j = i - spec.probes;
        if j * spec.tunnels / n != (j + 1) * spec.tunnels / n {
            Kind::Tunnel
        } else {
            Kind::KeepAlive
        }
    };
    for i in 0..total {
        let kind = kind_of(i);
        let period = match kind {
            Kind::Probe => spec.probe_interval,
            _ => spec.interval,
        };
        // Staggered over the period so the requests spread evenly.
        let offset = period.mul_f64((i as f64 * 0.618_033_988_7).fract());
        tasks.push(tokio::task::spawn_local(connection(
            spec.clone(),
            kind,
            period,
            offset,
            slots.clone(),
            control.clone(),
            report.clone(),
            up_tx.clone(),
        )));
    }
    drop(up_tx);
    // Every connection reports once when it is up or has failed.
    for _ in 0..total {
        if up_rx.recv().await.is_none() {
            break;
        }
    }
    control.ramped.store(true, Ordering::Release);
    for t in tasks {
        let _ = t.await;
    }
    Rc::try_unwrap(report)
        .map(RefCell::into_inner)
        .unwrap_or_else(|r| r.borrow().clone())
}

#[allow(clippy::too_many_arguments)]
async fn connection(
    spec: LoadSpec,
    kind: Kind,
    period: Duration,
    offset: Duration,
    slots: Rc<tokio::sync::Semaphore>,
    control: Arc<Control>,
    report: Rc<RefCell<LoadReport>>,
    up: tokio::sync::mpsc::UnboundedSender<()>,
) {
    let name = match kind {
        Kind::KeepAlive => "keep-alive client",
        Kind::Tunnel => "tunnel",
        Kind::Probe => "probe",
    };
    let opened = {
        let _slot = slots.acquire().await;
        open(&spec, kind).await
    };
    let _ = up.send(());
    let (mut s, mut buf) = match opened {
        Ok(v) => v,
        Err(e) => {
            report.borrow_mut().fail(format!("{name} open: {e}"));
            return;
        }
    };
    match kind {
        Kind::Tunnel => report.borrow_mut().tunnels_up += 1,
        Kind::KeepAlive => report.borrow_mut().keepalive_up += 1,
        Kind::Probe => {}
    }
    let mut next = tokio::time::Instant::now() + offset;
    loop {
        // Wake at the next send time, or every 200 ms to notice `stop`.
        while tokio::time::Instant::now() < next {
            if control.stop.load(Ordering::Relaxed) {
                break;
            }
            let wake = next.min(tokio::time::Instant::now() + Duration::from_millis(200));
            tokio::time::sleep_until(wake).await;
        }
        if control.stop.load(Ordering::Relaxed) {
            break;
        }
        next += period;
        let sent = Instant::now();
        let r = tokio::time::timeout(spec.op_timeout, exchange(&mut s, &mut buf, kind)).await;
        let took = sent.elapsed();
        match r {
            Ok(Ok(())) => {
                if control.measuring.load(Ordering::Relaxed) {
                    let us = took.as_micros().min(u32::MAX as u128) as u32;
                    let mut r = report.borrow_mut();
                    match kind {
                        Kind::KeepAlive => r.keepalive_us.push(us),
                        Kind::Tunnel => r.tunnel_us.push(us),
                        Kind::Probe => r.probe_us.push(us),
                    }
                }
            }
            Ok(Err(e)) => {
                report.borrow_mut().fail(format!("{name}: {e}"));
                return;
            }
            Err(_) => {
                report
                    .borrow_mut()
                    .fail(format!("{name}: no answer within {:?}", spec.op_timeout));
                return;
            }
        }
        // A client far behind (a stalled run) does not burst to catch up.
        let now = tokio::time::Instant::now();
        if next < now {
            next = now;
        }
    }
    // RST, no TIME_WAIT: thousands of these per run must not use up the ephemeral ports.
    let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
}

/// Connects, and for a tunnel completes the upgrade.
async fn open(spec: &LoadSpec, kind: Kind) -> io::Result<(TcpStream, Vec<u8>)> {
    let connect = tokio::time::timeout(spec.op_timeout, TcpStream::connect(spec.target));
    let mut s = connect
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
    s.set_nodelay(true)?;
    let mut buf = Vec::with_capacity(256);
    if let Kind::Tunnel = kind {
        let upgrade = async {
            s.write_all(UPGRADE).await?;
            let head_len = read_head(&mut s, &mut buf).await?;
            if !buf.starts_with(b"HTTP/1.1 101") {
                let line = String::from_utf8_lossy(&buf[..head_len.min(40)]).into_owned();
                return Err(io::Error::other(format!("upgrade answered {line:?}")));
            }
            buf.drain(..head_len);
            Ok(())
        };
        tokio::time::timeout(spec.op_timeout, upgrade)
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "upgrade timed out"))??;
    }
    Ok((s, buf))
}

/// One request and its response, or one frame and its echo.
async fn exchange(s: &mut TcpStream, buf: &mut Vec<u8>, kind: Kind) -> io::Result<()> {
    match kind {
        Kind::KeepAlive | Kind::Probe => {
            s.write_all(REQUEST).await?;
            let status = read_response(s, buf).await?;
            if status != 200 {
                return Err(io::Error::other(format!("status {status}")));
            }
        }
        Kind::Tunnel => {
            s.write_all(&FRAME).await?;
            while buf.len() < FRAME.len() {
                let mut chunk = [0u8; 64];
                let n = s.read(&mut chunk).await?;
                if n == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "tunnel closed",
                    ));
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            if buf[..FRAME.len()] != FRAME {
                return Err(io::Error::other("echo differs from the frame sent"));
            }
            buf.drain(..FRAME.len());
        }
    }
    Ok(())
}

/// Runs [`run_origin`] on a thread of its own; returns its address. The thread stops once
/// `stop` is set.
pub fn spawn_origin(
    stop: Arc<AtomicBool>,
) -> io::Result<(SocketAddr, std::thread::JoinHandle<()>)> {
    let std_listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    std_listener.set_nonblocking(true)?;
    let addr = std_listener.local_addr()?;
    let handle = std::thread::Builder::new()
        .name("scale-origin".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("origin runtime");
            let local = tokio::task::LocalSet::new();
            local.block_on(&rt, async move {
                let listener = TcpListener::from_std(std_listener).expect("origin listener");
                run_origin(listener, stop).await
            });
        })?;
    Ok((addr, handle))
}

/// Runs [`run_load`] on a thread of its own.
pub fn spawn_load(
    spec: LoadSpec,
    control: Arc<Control>,
) -> io::Result<std::thread::JoinHandle<LoadReport>> {
    std::thread::Builder::new()
        .name("scale-load".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("load runtime");
            let local = tokio::task::LocalSet::new();
            local.block_on(&rt, run_load(spec, control))
        })
}
