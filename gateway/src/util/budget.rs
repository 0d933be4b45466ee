//! The memory budget of one connection, and the process-wide counters of what was refused
//! for lack of resources (memory, descriptors, connection slots).
//!
//! Every buffer that grows with input has a cap here or in the config, and an error path:
//! over the cap the connection is closed, counted in
//! `gateway_connections_over_budget_total{buffer}` and logged at a bounded rate (one line
//! per second per kind at most, with the count suppressed meanwhile), so a flood of hostile
//! connections cannot turn the log into a second resource to exhaust.
//!
//! Counters are process-wide atomics rather than per-worker stats because some of the code
//! that hits a cap (the TLS stream, the descriptor guard) has no worker at hand.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Ciphertext waiting in a TLS stream's input buffer: two TLS records of the largest size
/// (RFC 8446 §5.2: 2^14 + 256 bytes each) plus slack. rustls' own deframer refuses a
/// message above its limit ("message buffer full"); what it refuses must not pile up here.
pub(crate) const TLS_INPUT_MAX: usize = 2 * (16 * 1024 + 256) + 1024;
/// Body bytes held in memory while a request body is buffered before the upstream is
/// chosen is `[server] request_buffering`, bounded by this (a sanity cap on the config).
pub(crate) const REQUEST_BUFFERING_MAX: u64 = 1 << 20;

/// Pipes open per worker, in use or idle (two per spliced tunnel), whatever the descriptor
/// budget allows.
pub(crate) const MAX_PIPES: usize = 8192;

/// The buffers that have a cap, as the `buffer` label of the over-budget counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Buffer {
    /// Ciphertext in a TLS stream's input buffer, or a TLS message rustls refused.
    TlsInput,
    /// The request head (`max_header_bytes`).
    RequestHead,
    /// A buffered request body, or a chunked body's extensions/trailers.
    RequestBody,
    /// The upstream's response head.
    ResponseHead,
}

impl Buffer {
    const ALL: [Buffer; 4] = [
        Buffer::TlsInput,
        Buffer::RequestHead,
        Buffer::RequestBody,
        Buffer::ResponseHead,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Buffer::TlsInput => "tls_input",
            Buffer::RequestHead => "request_head",
            Buffer::RequestBody => "request_body",
            Buffer::ResponseHead => "response_head",
        }
    }
}

/// Why a connection or an upstream connect was refused locally (label `reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `server.max_connections` reached at accept.
    MaxConnections,
    /// The accepted descriptor fell inside the reserve kept for the admin listener.
    FdReserve,
    /// `socket()`/`connect()` to an upstream failed for a local reason (EMFILE, ENFILE,
    /// ENOBUFS, ENOMEM, or the descriptor reserve): booked to the gateway, not the server.
    UpstreamLocal,
    /// A client was too slow: request body past its deadline, or response not taken.
    SlowClient,
    /// A peer outside the listener's `proxy_protocol_from` connected to a PROXY listener:
    /// its header would name any address it liked, past every per-IP limit.
    ProxyUntrusted,
}

impl Refusal {
    const ALL: [Refusal; 5] = [
        Refusal::MaxConnections,
        Refusal::FdReserve,
        Refusal::UpstreamLocal,
        Refusal::SlowClient,
        Refusal::ProxyUntrusted,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Refusal::MaxConnections => "max_connections",
            Refusal::FdReserve => "fd_reserve",
            Refusal::UpstreamLocal => "upstream_local",
            Refusal::SlowClient => "slow_client",
            Refusal::ProxyUntrusted => "proxy_untrusted",
        }
    }
}

/// A counter with a rate-limited log line.
struct Counted {
    count: AtomicU64,
    /// Unix second of the last log line.
    logged_at: AtomicU64,
    /// Events since the last log line.
    unlogged: AtomicU64,
}

impl Counted {
    const fn new() -> Counted {
        Counted {
            count: AtomicU64::new(0),
            logged_at: AtomicU64::new(0),
            unlogged: AtomicU64::new(0),
        }
    }

    /// Counts one event; returns how many events the caller's log line stands for, or
    /// `None` when a line was already written this second.
    fn hit(&self) -> Option<u64> {
        self.count.fetch_add(1, Ordering::Relaxed);
        self.unlogged.fetch_add(1, Ordering::Relaxed);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let last = self.logged_at.load(Ordering::Relaxed);
        if last == now
            || self
                .logged_at
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return None;
        }
        Some(self.unlogged.swap(0, Ordering::Relaxed))
    }
}

static OVER_BUDGET: [Counted; Buffer::ALL.len()] = [const { Counted::new() }; 4];
static REFUSED: [Counted; Refusal::ALL.len()] = [const { Counted::new() }; Refusal::ALL.len()];

/// A connection went over its budget for `buffer`: count it, log at a bounded rate. The
/// caller closes the connection.
pub(crate) fn over_budget(buffer: Buffer, peer: Option<std::net::SocketAddr>) {
    if let Some(n) = OVER_BUDGET[buffer as usize].hit() {
        tracing::warn!(buffer = buffer.label(), peer = ?peer, events = n, "connection over its memory budget: closed");
    }
}

/// A connection, an upstream connect or a slow client was refused for a limit or shortage
/// of the gateway's own: count, log at a bounded rate.
pub fn refused(reason: Refusal, detail: &dyn std::fmt::Display) {
    if reason == Refusal::FdReserve {
        descriptor_pressure();
    }
    if let Some(n) = REFUSED[reason as usize].hit() {
        tracing::warn!(
            reason = reason.label(),
            events = n,
            "refused for a local limit: {detail}"
        );
    }
}

/// Per-request warnings that an upstream outage multiplies (one per failed request).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum UpstreamWarning {
    /// A connect to an upstream server failed (refused, unreachable, timed out).
    ConnectFailed,
    /// An upstream response ended before its framing said it would.
    ResponseCutShort,
}

static UPSTREAM_WARNINGS: [Counted; 2] = [const { Counted::new() }; 2];

/// Rate limit for [`UpstreamWarning`]s: one line per second per kind, whatever the number of
/// requests or servers failing. Returns how many events (over all servers) the caller's
/// line stands for, or `None` when a line was already written this second. A dead upstream
/// under load otherwise writes a line per request: a log flood that costs the workers their
/// time and drowns every other line (the failures themselves are counted per server in
/// `/metrics`).
pub(crate) fn upstream_warning(kind: UpstreamWarning) -> Option<u64> {
    UPSTREAM_WARNINGS[kind as usize].hit()
}

/// Appends the counters in Prometheus text format.
pub(crate) fn render(out: &mut String) {
    family(
        out,
        "gateway_connections_over_budget_total",
        "Connections closed because a buffer went over its memory budget.",
        "buffer",
        Buffer::ALL.map(|b| (b.label(), &OVER_BUDGET[b as usize])),
    );
    family(
        out,
        "gateway_local_refusals_total",
        "Connections or requests refused or cut off for a limit or shortage of the gateway's own (never booked to an upstream server).",
        "reason",
        Refusal::ALL.map(|r| (r.label(), &REFUSED[r as usize])),
    );
    use std::fmt::Write;
    let waits = DESCRIPTOR_WAITS.load(Ordering::Relaxed);
    let _ = writeln!(
        out,
        "# HELP gateway_upstream_descriptor_waits_total Upstream connects that found no descriptor free and waited for one (an idle connection or a retried connect) instead of failing at once.\n# TYPE gateway_upstream_descriptor_waits_total counter\ngateway_upstream_descriptor_waits_total {waits}"
    );
}

fn family<const N: usize>(
    out: &mut String,
    name: &str,
    help: &str,
    label: &str,
    values: [(&str, &Counted); N],
) {
    use std::fmt::Write;
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
    for (value, counted) in values {
        let n = counted.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}{{{label}=\"{value}\"}} {n}");
    }
}

/// Descriptors kept free for the admin listener, logs and reloads: client accepts and
/// upstream connects stop short of them (see [`fd_in_reserve`]).
pub(crate) const FD_RESERVE: u64 = 64;

/// The effective RLIMIT_NOFILE soft limit, set once at startup by the binary.
static NOFILE: AtomicU64 = AtomicU64::new(u64::MAX);

/// Records the effective descriptor limit (after `server.nofile` was applied).
pub fn set_nofile(limit: u64) {
    NOFILE.store(limit, Ordering::Relaxed);
}

/// The effective descriptor limit (`u64::MAX` if unknown).
pub fn nofile() -> u64 {
    NOFILE.load(Ordering::Relaxed)
}

/// Whether a descriptor the data plane just got lies in the reserve. The kernel hands out
/// the lowest free number, so descriptor `fd` at or above `nofile - FD_RESERVE` means
/// fewer than `FD_RESERVE` are left: the data plane closes it, and the admin listener
/// (which never checks) still finds descriptors to answer `/healthz` with.
pub(crate) fn fd_in_reserve(fd: std::os::fd::RawFd) -> bool {
    (fd as u64).saturating_add(FD_RESERVE) >= nofile()
}

/// Descriptors no connection may count on: the reserve itself, and as many again for what
/// the process holds anyway (listeners per worker, rings or epoll, eventfds, log files,
/// admin connections).
const FD_FIXED: u64 = FD_RESERVE * 2;

/// The descriptors the pipes of spliced tunnels may hold, all workers together.
///
/// Pipes are a cache (a tunnel without them copies), so they get a budget of their own that
/// the connection cap leaves free: a quarter of the descriptors past [`FD_FIXED`], or, when
/// an explicit `max_connections` leaves less room (two descriptors per connection: client
/// and upstream), what it leaves, possibly nothing. Without this each spliced tunnel held
/// six descriptors against the two the cap counts, and tunnels from one client ran the
/// process out of descriptors long before `max_connections`.
pub(crate) fn pipe_fd_budget(nofile: u64, max_connections: usize) -> u64 {
    let usable = nofile.saturating_sub(FD_FIXED);
    (usable / 4).min(usable.saturating_sub(2 * max_connections as u64))
}

/// Pipes one worker may hold open, in use or idle: its share of [`pipe_fd_budget`] (two
/// descriptors a pipe), rounded down to whole pairs since a tunnel takes two.
pub(crate) fn pipes_per_worker(nofile: u64, max_connections: usize, workers: usize) -> usize {
    let pairs = pipe_fd_budget(nofile, max_connections) / 4 / workers.max(1) as u64;
    (pairs.saturating_mul(2)).min(MAX_PIPES as u64) as usize
}

/// The `max_connections` default for a descriptor limit: each client connection may hold
/// two descriptors (client and upstream), after the fixed reserve and the pipe budget.
pub(crate) fn default_max_connections(nofile: u64) -> usize {
    let usable = nofile.saturating_sub(FD_FIXED);
    ((usable - usable / 4) / 2).clamp(1, 1 << 20) as usize
}

/// Whether an `io::Error` from `socket()`/`connect()` is the gateway's own shortage
/// (descriptors, buffers, memory), not the upstream's fault.
pub(crate) fn is_local_resource_error(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM | libc::EADDRNOTAVAIL)
    )
}

/// Whether a `socket()`/`connect()` error means the process (EMFILE, or the descriptor
/// reserve, which [`crate::io::connect`] reports as EMFILE) or the system (ENFILE) has no
/// descriptor free: a shortage that lasts only until another request closes or pools its
/// upstream connection, so the caller waits for one instead of failing. ENOMEM, ENOBUFS and
/// EADDRNOTAVAIL are not waited for: nothing in the gateway signals their end, and a
/// request that waited for memory would hold more of it meanwhile.
pub(crate) fn is_descriptor_shortage(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

/// Upstream connects that waited for a descriptor
/// (`gateway_upstream_descriptor_waits_total`).
static DESCRIPTOR_WAITS: AtomicU64 = AtomicU64::new(0);

/// Counts one upstream connect that began to wait for a descriptor.
pub(crate) fn descriptor_wait() {
    DESCRIPTOR_WAITS.fetch_add(1, Ordering::Relaxed);
    descriptor_pressure();
}

/// When an accept or a connect last found descriptors short (`clock::now_ms`; 0: never).
static DESCRIPTOR_PRESSURE_MS: AtomicU64 = AtomicU64::new(0);

/// How long after a shortage idle connections beyond `keepalive` are not kept at all.
const PRESSURE_HOLD_MS: u64 = 10_000;

/// Idle upstream connections kept beyond `keepalive` (`keepalive_linger`), all workers.
static LINGERING: AtomicU64 = AtomicU64::new(0);

/// Records a descriptor shortage: every worker closes its lingering idle connections at
/// its next tick (200 ms), and keeps none for [`PRESSURE_HOLD_MS`].
fn descriptor_pressure() {
    DESCRIPTOR_PRESSURE_MS.store(crate::util::clock::now_ms(), Ordering::Relaxed);
}

/// Whether descriptors ran short lately (see [`descriptor_pressure`]).
pub(crate) fn under_descriptor_pressure() -> bool {
    let at = DESCRIPTOR_PRESSURE_MS.load(Ordering::Relaxed);
    at != 0 && crate::util::clock::now_ms().saturating_sub(at) < PRESSURE_HOLD_MS
}

/// Whether one more idle connection may be kept beyond `keepalive`. Those hold descriptors
/// that neither `max_connections` nor the pipe budget counts, so all workers together keep
/// at most an eighth of the usable descriptors so, and none while descriptors are short:
/// a client's bursts to many upstreams cannot fill the process up with idle connections
/// and get other clients' accepts refused.
pub(crate) fn may_linger() -> bool {
    let cap = nofile().saturating_sub(FD_FIXED) / 8;
    LINGERING.load(Ordering::Relaxed) < cap && !under_descriptor_pressure()
}

/// Adjusts the count of lingering connections by `delta`.
pub(crate) fn lingering_changed(delta: i64) {
    if delta >= 0 {
        LINGERING.fetch_add(delta as u64, Ordering::Relaxed);
    } else {
        LINGERING.fetch_sub(delta.unsigned_abs(), Ordering::Relaxed);
    }
}

/// This worker's requests waiting for a descriptor, and the signal that wakes them.
struct DescriptorWaiters {
    count: std::cell::Cell<usize>,
    freed: std::rc::Rc<tokio::sync::Notify>,
}

thread_local! {
    /// Woken when this worker (one thread) pools or lets go of an upstream connection:
    /// the moments a request of the same worker waiting for a descriptor may find one (or
    /// an idle connection). Frees by other workers are not seen; waiters back off instead.
    static DESCRIPTOR_WAITERS: DescriptorWaiters = DescriptorWaiters {
        count: std::cell::Cell::new(0),
        freed: std::rc::Rc::new(tokio::sync::Notify::new()),
    };
}

/// Wakes this worker's requests waiting for a descriptor. Called twice per request, so it
/// costs a thread-local read when none waits (no lock, no syscall).
pub(crate) fn descriptor_freed() {
    DESCRIPTOR_WAITERS.with(|w| {
        if w.count.get() != 0 {
            w.freed.notify_waiters();
        }
    });
}

/// One request of this worker waiting for a descriptor, for as long as it lives: makes
/// [`descriptor_freed`] wake it through [`DescriptorWait::signal`].
pub(crate) struct DescriptorWait {
    freed: std::rc::Rc<tokio::sync::Notify>,
}

impl DescriptorWait {
    pub(crate) fn new() -> DescriptorWait {
        DESCRIPTOR_WAITERS.with(|w| {
            w.count.set(w.count.get() + 1);
            DescriptorWait {
                freed: w.freed.clone(),
            }
        })
    }

    /// The signal [`descriptor_freed`] raises on this worker.
    pub(crate) fn signal(&self) -> &tokio::sync::Notify {
        &self.freed
    }
}

impl Drop for DescriptorWait {
    fn drop(&mut self) {
        DESCRIPTOR_WAITERS.with(|w| w.count.set(w.count.get().saturating_sub(1)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_leave_the_reserve_and_the_pipe_budget() {
        // 1024: 896 past the fixed reserve, 224 for pipes, 672 for 336 connections.
        assert_eq!(default_max_connections(1024), 336);
        assert_eq!(pipe_fd_budget(1024, 336), 224);
        assert_eq!(default_max_connections(10), 1);
        for nofile in [256, 512, 1000, 1024, 20_000, 65_535] {
            let max = default_max_connections(nofile);
            let pipes = pipe_fd_budget(nofile, max);
            assert!(pipes > 0, "{nofile}");
            assert!(2 * max as u64 + pipes + FD_FIXED <= nofile, "{nofile}");
        }
    }

    #[test]
    fn explicit_max_connections_shrinks_the_pipe_budget() {
        // 1024 − 128 = 896; 400 connections leave 96 descriptors: 24 pipes in pairs.
        assert_eq!(pipe_fd_budget(1024, 400), 96);
        assert_eq!(pipes_per_worker(1024, 400, 2), 24);
        assert_eq!(pipes_per_worker(1024, 400, 3), 16);
        assert_eq!(pipe_fd_budget(1024, 448), 0);
        assert_eq!(pipe_fd_budget(1024, 10_000), 0);
        assert_eq!(pipes_per_worker(1024, 10_000, 1), 0);
        assert_eq!(pipes_per_worker(u64::MAX, 1, 1), MAX_PIPES);
    }

    #[test]
    fn a_free_wakes_the_requests_waiting_on_the_worker() {
        let woken = |wait: &DescriptorWait| {
            let notified = wait.signal().notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            descriptor_freed();
            tokio::runtime::Builder::new_current_thread()
                .build()
                .expect("runtime")
                .block_on(async {
                    tokio::select! {
                        biased;
                        _ = notified => true,
                        _ = std::future::ready(()) => false,
                    }
                })
        };
        let wait = DescriptorWait::new();
        assert!(woken(&wait));
        let other = DescriptorWait::new();
        drop(wait);
        assert!(woken(&other), "still one waiting");
        drop(other);
        DESCRIPTOR_WAITERS.with(|w| assert_eq!(w.count.get(), 0));
    }

    #[test]
    fn only_descriptor_shortages_are_waited_for() {
        for code in [libc::EMFILE, libc::ENFILE] {
            assert!(is_descriptor_shortage(&std::io::Error::from_raw_os_error(
                code
            )));
        }
        for code in [
            libc::ENOBUFS,
            libc::ENOMEM,
            libc::EADDRNOTAVAIL,
            libc::ECONNREFUSED,
        ] {
            assert!(!is_descriptor_shortage(&std::io::Error::from_raw_os_error(
                code
            )));
        }
    }

    #[test]
    fn local_errors_are_recognised() {
        for code in [libc::EMFILE, libc::ENFILE, libc::ENOBUFS, libc::ENOMEM] {
            assert!(is_local_resource_error(&std::io::Error::from_raw_os_error(
                code
            )));
        }
        assert!(!is_local_resource_error(
            &std::io::Error::from_raw_os_error(libc::ECONNREFUSED)
        ));
    }
}
