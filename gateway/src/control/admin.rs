//! The admin listener: `/metrics`, `/healthz`, `/ready`, `POST /reload`, `GET /config`.
//!
//! It runs on the control-plane thread, apart from the workers, so a saturated data plane
//! still answers health checks and scrapes. Requests are tiny and few: one request per
//! connection, answered and closed. `POST /reload` runs the reload on a blocking thread of
//! its own, so a slow reload (many certificates, a stalled file) never holds up `/healthz`,
//! `/ready` or `/metrics`; a second `POST /reload` during one waits for it and then runs.
//!
//! The listener is reachable by whoever can reach its address, so it defends itself like a
//! data-plane listener, on a smaller scale:
//! - at most `admin.max_connections` connections at once. One accepted at the cap evicts
//!   (closes) the OLDEST held connection that has not yet delivered a whole request head,
//!   and is served in its place: idle or slow peers cannot shut probes out, since a probe
//!   sends its head at once and is then never the eviction target. Only when every held
//!   connection is mid-answer is the new one closed at once, unread. Both evictions and
//!   refusals count in `gateway_admin_connections_rejected_total`;
//! - a connection must deliver its whole head within [`HEAD_TIMEOUT`] (or
//!   `admin.request_timeout` when shorter), and its request and answer within
//!   `admin.request_timeout`. A `POST /reload` is the exception: its answer is written
//!   (within `admin.request_timeout` again) once the reload is done, or after
//!   [`RELOAD_ANSWER_WAIT`] as a 503 saying the result will be logged. A client that asked
//!   for a reload is never left without an answer while the reload takes effect;
//! - a request head is at most [`MAX_HEAD`] bytes (431 beyond);
//! - `POST /reload` and `GET /config` need the bearer token when one is set, and a
//!   non-loopback `listen` without a token is a config error: the control endpoints are
//!   never open to a network by default. `/metrics`, `/healthz` and `/ready` stay open for
//!   Prometheus and the kubelet's probes.

use crate::control::Control;
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Longest a `POST /reload` waits for the reload's result before answering `503 reload
/// still running`: the reload carries on, and its result is logged and counted in
/// `gateway_config_reloads_total`. Explicit so a stalled reload (a certificate on a hung
/// network file system) holds an admin slot for a bounded time.
pub const RELOAD_ANSWER_WAIT: Duration = Duration::from_secs(60);

/// Largest admin request head (request line and headers). Admin requests carry a few
/// short headers; anything bigger is not a client of this API.
pub const MAX_HEAD: usize = 8 * 1024;

/// Time for a connection's whole request head to arrive. Probes, scrapers and `curl` send
/// the head in one write, so a second is generous; a peer still silent after it holds a
/// slot for nothing.
pub(crate) const HEAD_TIMEOUT: Duration = Duration::from_secs(1);

/// Accepts admin connections until the runtime stops.
pub async fn serve(listener: TcpListener, control: Arc<Control>) {
    let held = Held::default();
    let mut backoff = ACCEPT_BACKOFF_MIN;
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => {
                backoff = ACCEPT_BACKOFF_MIN;
                stream
            }
            Err(e) => {
                // Out of descriptors (EMFILE/ENFILE) or out of buffers: the pending
                // connection stays in the backlog. Back off, doubling up to a bound, rather
                // than spin on a listener that stays readable. This is the place for a
                // descriptor reserve to free a spare fd and accept once more.
                control.admin_accept_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "admin accept failed; backing off {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                continue;
            }
        };
        let (cap, timeout) = {
            let snap = control.shared.snapshot();
            (
                snap.config.admin.max_connections,
                snap.config.admin.request_timeout.0,
            )
        };
        let (admitted, evicted) = held.admit(cap);
        // Evictions and refusals both count: each is a connection the cap closed.
        control.admin_connections_rejected.fetch_add(
            evicted as u64 + u64::from(admitted.is_none()),
            Ordering::Relaxed,
        );
        let Some((slot, evicted_rx)) = admitted else {
            // Every held connection is mid-answer. Dropping the stream closes it without
            // reading: a flood costs a descriptor for an instant, not a task and a buffer.
            drop(stream);
            continue;
        };
        let control = control.clone();
        tokio::spawn(async move {
            let head_timeout = timeout.min(HEAD_TIMEOUT);
            tokio::select! {
                // Evicted for a newer connection: dropping the stream closes it.
                _ = evicted_rx => {}
                _ = handle(stream, control, head_timeout, timeout, &slot) => {}
            }
        });
    }
}

const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_millis(500);

/// The admin connections held open, oldest first (ids rise with each accept). The count of
/// entries is the count against `max_connections`.
#[derive(Default, Clone)]
struct Held(Arc<Mutex<HeldInner>>);

#[derive(Default)]
struct HeldInner {
    next_id: u64,
    conns: BTreeMap<u64, HeldConn>,
}

struct HeldConn {
    /// A whole request head has arrived: the connection is being answered and is not
    /// evicted (that would cut a probe's or a reload's answer).
    head_done: bool,
    /// Sending (or dropping) this makes the connection's task close it.
    evict: tokio::sync::oneshot::Sender<()>,
}

impl Held {
    fn lock(&self) -> std::sync::MutexGuard<'_, HeldInner> {
        // The critical sections cannot panic midway; a poisoned lock holds consistent data.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes room for one more connection under `cap`, evicting the oldest ones still
    /// waiting for their head. Returns the new connection's slot (`None` when every held
    /// connection is mid-answer) and how many were evicted.
    #[allow(clippy::type_complexity)]
    fn admit(&self, cap: usize) -> (Option<(Slot, tokio::sync::oneshot::Receiver<()>)>, usize) {
        let mut inner = self.lock();
        let mut evicted = 0;
        // A reload may have lowered the cap below what is held: evict down to it.
        while inner.conns.len() >= cap {
            let Some(oldest_idle) = inner
                .conns
                .iter()
                .find(|(_, c)| !c.head_done)
                .map(|(&id, _)| id)
            else {
                return (None, evicted);
            };
            if let Some(conn) = inner.conns.remove(&oldest_idle) {
                // The task may have ended already; then there is nothing to close.
                let _ = conn.evict.send(());
                evicted += 1;
            }
        }
        let id = inner.next_id;
        inner.next_id += 1;
        let (evict, evicted_rx) = tokio::sync::oneshot::channel();
        inner.conns.insert(
            id,
            HeldConn {
                head_done: false,
                evict,
            },
        );
        (
            Some((
                Slot {
                    held: self.clone(),
                    id,
                },
                evicted_rx,
            )),
            evicted,
        )
    }
}

/// One held connection's place, given back on drop (however the handler ends).
struct Slot {
    held: Held,
    id: u64,
}

impl Slot {
    /// The request head has arrived: from now on this connection is not evicted.
    fn head_done(&self) {
        if let Some(conn) = self.held.lock().conns.get_mut(&self.id) {
            conn.head_done = true;
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.held.lock().conns.remove(&self.id);
    }
}

struct Response {
    status: u16,
    content_type: &'static str,
    body: String,
}

fn text(status: u16, body: impl Into<String>) -> Response {
    Response {
        status,
        content_type: "text/plain; charset=utf-8",
        body: body.into(),
    }
}

async fn handle(
    mut stream: TcpStream,
    control: Arc<Control>,
    head_timeout: Duration,
    request_timeout: Duration,
    slot: &Slot,
) -> std::io::Result<()> {
    // `request_timeout` bounds the request and its answer, measured from the accept; for a
    // reload, from the moment its result is known (the reload's own wait is bounded by
    // RELOAD_ANSWER_WAIT), so a reload that outlasts the timeout still gets its answer.
    let mut deadline = tokio::time::Instant::now() + request_timeout;
    let Ok(head) = tokio::time::timeout(head_timeout, read_head(&mut stream)).await else {
        // No whole head in time: close, unanswered, and free the slot.
        return Ok(());
    };
    let Some((method, path, authorization)) = head? else {
        return Ok(());
    };
    slot.head_done();
    // Every route answers at once but the reload, which waits at most RELOAD_ANSWER_WAIT.
    let response = route(&control, &method, &path, authorization.as_deref()).await;
    if method == "POST" && path == "/reload" {
        deadline = tokio::time::Instant::now() + request_timeout;
    }
    match tokio::time::timeout_at(deadline, write(&mut stream, response)).await {
        Ok(res) => res,
        Err(_) => Ok(()),
    }
}

/// A parsed request head: method, path without query, `Authorization` value.
type Head = (String, String, Option<String>);

/// Reads one request head. `None` when the peer closed first or was answered with an error
/// (400, 431) already.
async fn read_head(stream: &mut TcpStream) -> std::io::Result<Option<Head>> {
    let mut buf = vec![0u8; MAX_HEAD];
    let mut len = 0;
    loop {
        let n = stream.read(&mut buf[len..]).await?;
        if n == 0 {
            return Ok(None);
        }
        len += n;
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf[..len]) {
            Ok(httparse::Status::Complete(_)) => {
                let auth = req
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("authorization"))
                    .map(|h| String::from_utf8_lossy(h.value).into_owned());
                return Ok(Some((
                    req.method.unwrap_or("").to_string(),
                    req.path
                        .unwrap_or("")
                        .split('?')
                        .next()
                        .unwrap_or("")
                        .to_string(),
                    auth,
                )));
            }
            Ok(httparse::Status::Partial) if len < buf.len() => continue,
            Ok(httparse::Status::Partial) | Err(httparse::Error::TooManyHeaders) => {
                write(stream, text(431, "request head too large\n")).await?;
                return Ok(None);
            }
            Err(_) => {
                write(stream, text(400, "bad request\n")).await?;
                return Ok(None);
            }
        }
    }
}

async fn route(
    control: &Arc<Control>,
    method: &str,
    path: &str,
    authorization: Option<&str>,
) -> Response {
    let shared = &control.shared;
    let authorized = || {
        let snap = shared.snapshot();
        match &snap.config.admin.token {
            None => true,
            Some(token) => authorization
                .and_then(|a| a.strip_prefix("Bearer "))
                .is_some_and(|given| constant_time_eq(given.trim().as_bytes(), token.as_bytes())),
        }
    };
    match (method, path) {
        ("GET" | "HEAD", "/healthz") => {
            // Workers publish every 200 ms from their own runtime; one silent for seconds
            // is wedged (or its thread died), which a liveness probe must see.
            let silent = shared.metrics.silent_workers(5_000);
            if silent.is_empty() {
                text(200, "ok\n")
            } else {
                text(503, format!("workers not answering: {silent:?}\n"))
            }
        }
        ("GET" | "HEAD", "/ready") => {
            if shared.handed_over.load(Ordering::Relaxed) {
                text(503, "draining: handed over to a new process\n")
            } else if shared.is_draining() {
                text(503, "draining\n")
            } else if shared.dead_listeners.load(Ordering::SeqCst) > 0 {
                text(503, "a listening socket died: re-binding it\n")
            } else if !shared.listening.load(std::sync::atomic::Ordering::Acquire)
                || !shared.is_accepting()
            {
                text(503, "starting\n")
            } else {
                text(200, "ready\n")
            }
        }
        ("GET", "/metrics") => Response {
            status: 200,
            content_type: "text/plain; version=0.0.4; charset=utf-8",
            body: crate::control::exposition::render(control),
        },
        ("POST", "/reload") => {
            if !authorized() {
                return text(401, "unauthorized\n");
            }
            // Off the admin thread: a reload reads files (certificates, a token file) that
            // may be slow or stalled, and `/healthz` and `/ready` must keep answering
            // meanwhile. A second reload waits for the running one (`Control::reload`).
            let control = control.clone();
            let reload = tokio::task::spawn_blocking(move || control.reload());
            match tokio::time::timeout(RELOAD_ANSWER_WAIT, reload).await {
                Ok(Ok(Ok(summary))) => text(200, format!("{summary}\n")),
                Ok(Ok(Err(errors))) => text(400, format!("{errors}\n")),
                Ok(Err(e)) => text(500, format!("the reload failed: {e}\n")),
                Err(_) => text(
                    503,
                    format!(
                        "reload still running after {}s, result will be logged\n",
                        RELOAD_ANSWER_WAIT.as_secs()
                    ),
                ),
            }
        }
        ("GET", "/config") => {
            if !authorized() {
                return text(401, "unauthorized\n");
            }
            let snap = shared.snapshot();
            // The config as loaded, plus what its upstream names resolved to now.
            let mut body = serde_json::to_value(&snap.config).unwrap_or_default();
            if let Some(obj) = body.as_object_mut() {
                let resolved: serde_json::Map<String, serde_json::Value> = snap
                    .upstreams
                    .iter()
                    .map(|u| {
                        let servers = u.servers.iter().map(|s| s.label.clone().into()).collect();
                        (u.name.clone(), serde_json::Value::Array(servers))
                    })
                    .collect();
                obj.insert("resolved_servers".into(), resolved.into());
            }
            Response {
                status: 200,
                content_type: "application/json",
                body: serde_json::to_string_pretty(&body).unwrap_or_default() + "\n",
            }
        }
        (_, "/healthz" | "/ready" | "/metrics" | "/reload" | "/config") => {
            text(405, "method not allowed\n")
        }
        _ => text(404, "not found\n"),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn write(stream: &mut TcpStream, r: Response) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nGateway-Generation: {}\r\nConnection: close\r\n\r\n",
        r.status,
        crate::protocol::http1::reason(r.status),
        r.content_type,
        r.body.len(),
        crate::telemetry::metrics::PROCESS_GENERATION.load(Ordering::Relaxed)
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(r.body.as_bytes()).await?;
    stream.shutdown().await
}
