//! Test upstreams ("origins"): real HTTP/1.1 servers on 127.0.0.1:0, one thread per
//! connection, that record what the proxy sent them and answer through a handler closure.
//!
//! Misbehaviour is first-class (the sozu habit): a [`Reply`] can reset the connection
//! mid-body, stall forever, send arbitrary bytes instead of a response, or precede the final
//! response with 1xx; an origin can close idle keep-alive connections after a delay, or be a
//! black hole that accepts and never reads; [`refused_addr`] is a port nobody listens on.
//!
//! The origin parses request framing itself, strictly (see `wire`), and records any framing
//! error it saw in [`Origin::errors`]: a proxy that sends malformed requests upstream shows
//! up there rather than as a vague timeout.

use std::io::Write;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::wire::{self, BodyFraming, Headers, Wire};

/// One request as the origin received it.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    /// Sequence number of the connection it arrived on (1 = first accepted connection).
    pub conn: usize,
    /// Position of this request on its connection (1 = first).
    pub nth_on_conn: usize,
    pub peer: SocketAddr,
    pub method: String,
    pub target: String,
    pub version: String,
    /// Header fields in arrival order, names as sent.
    pub headers: Headers,
    pub body: Vec<u8>,
    pub framing: BodyFraming,
    /// The request head exactly as received.
    pub raw_head: Vec<u8>,
}

impl RecordedRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        wire::header(&self.headers, name)
    }
    pub fn header_all(&self, name: &str) -> Vec<&str> {
        wire::header_all(&self.headers, name)
    }
    pub fn has_header(&self, name: &str) -> bool {
        self.header(name).is_some()
    }
    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or_default()
    }
}

/// How the reply body is delimited on the wire.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Framing {
    ContentLength,
    /// Chunked, cut into chunks of these sizes (cycled; empty = one chunk).
    Chunked(Vec<usize>),
    /// No length header; the origin closes the connection after the body.
    CloseDelimited,
    /// Send the head exactly as given (no length header added) and no body.
    HeadOnly,
}

/// What to do instead of (or while) answering normally.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    Respond,
    /// Send the head (with the full length) and this many body bytes, then RST
    /// (SO_LINGER 0 and close).
    ResetAfter(usize),
    /// Send the head (with the full length) and this many body bytes, then stall with the
    /// connection open (until the proxy closes it or the origin is dropped).
    PartialThenStall(usize),
    /// Read the request, then never answer (until the origin is dropped).
    Stall,
    /// Send the head, then the body one byte at a time, each after this pause (an event
    /// stream, or an upstream slow to produce).
    Trickle(Duration),
    /// Send these bytes verbatim instead of a response, then close.
    Raw(Vec<u8>),
}

/// The origin's answer to one request.
#[derive(Clone, Debug)]
pub struct Reply {
    pub status: u16,
    pub reason: Option<String>,
    pub headers: Headers,
    pub body: Vec<u8>,
    pub framing: Framing,
    /// 1xx responses sent first: (status, headers).
    pub interim: Vec<(u16, Headers)>,
    /// Wait this long before answering.
    pub delay: Duration,
    pub action: Action,
    /// Close the connection after this reply (adds `Connection: close`).
    pub close: bool,
}

impl Reply {
    pub fn new(status: u16) -> Reply {
        Reply {
            status,
            reason: None,
            headers: Vec::new(),
            body: Vec::new(),
            framing: Framing::ContentLength,
            interim: Vec::new(),
            delay: Duration::ZERO,
            action: Action::Respond,
            close: false,
        }
    }
    /// 200 with this body, Content-Length framing.
    pub fn ok(body: impl Into<Vec<u8>>) -> Reply {
        Reply::new(200).body(body)
    }
    /// 200 echoing the request body.
    pub fn echo(req: &RecordedRequest) -> Reply {
        Reply::ok(req.body.clone())
    }
    pub fn stall() -> Reply {
        Reply::new(200).action(Action::Stall)
    }
    pub fn raw(bytes: impl Into<Vec<u8>>) -> Reply {
        Reply::new(200).action(Action::Raw(bytes.into()))
    }
    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Reply {
        self.body = body.into();
        self
    }
    pub fn header(mut self, name: &str, value: &str) -> Reply {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }
    pub fn reason(mut self, reason: &str) -> Reply {
        self.reason = Some(reason.to_string());
        self
    }
    pub fn framing(mut self, framing: Framing) -> Reply {
        self.framing = framing;
        self
    }
    pub fn chunked(self, sizes: &[usize]) -> Reply {
        self.framing(Framing::Chunked(sizes.to_vec()))
    }
    pub fn close_delimited(self) -> Reply {
        self.framing(Framing::CloseDelimited)
    }
    pub fn interim(mut self, status: u16, headers: &[(&str, &str)]) -> Reply {
        self.interim.push((
            status,
            headers
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect(),
        ));
        self
    }
    pub fn delay(mut self, d: Duration) -> Reply {
        self.delay = d;
        self
    }
    pub fn action(mut self, a: Action) -> Reply {
        self.action = a;
        self
    }
    pub fn reset_after(self, body_bytes: usize) -> Reply {
        self.action(Action::ResetAfter(body_bytes))
    }
    pub fn trickle(self, pause: Duration) -> Reply {
        self.action(Action::Trickle(pause))
    }
    pub fn partial_then_stall(self, body_bytes: usize) -> Reply {
        self.action(Action::PartialThenStall(body_bytes))
    }
    pub fn close(mut self) -> Reply {
        self.close = true;
        self
    }
}

type Handler = dyn Fn(&RecordedRequest) -> Reply + Send + Sync;

/// Origin options beyond the handler.
#[derive(Clone, Debug, Default)]
pub struct OriginBuilder {
    idle_close: Option<Duration>,
    black_hole: bool,
    no_auto_continue: bool,
    /// Listen here instead of 127.0.0.1:0 (several origins on one port, different
    /// loopback addresses: the addresses one DNS name resolves to).
    bind: Option<SocketAddr>,
}

impl OriginBuilder {
    /// Listen on `addr` (e.g. `127.0.0.3:PORT`) instead of 127.0.0.1 on a free port.
    pub fn bind(mut self, addr: SocketAddr) -> Self {
        self.bind = Some(addr);
        self
    }
    /// Close a keep-alive connection that stays idle (between requests) this long.
    pub fn idle_close(mut self, d: Duration) -> Self {
        self.idle_close = Some(d);
        self
    }
    /// Accept connections and never read from or write to them.
    pub fn black_hole(mut self) -> Self {
        self.black_hole = true;
        self
    }
    /// Do not answer `Expect: 100-continue` with an interim 100 before reading the body.
    pub fn no_auto_continue(mut self) -> Self {
        self.no_auto_continue = true;
        self
    }
    pub fn start(
        self,
        handler: impl Fn(&RecordedRequest) -> Reply + Send + Sync + 'static,
    ) -> Origin {
        Origin::spawn(self, Box::new(handler))
    }
}

struct Shared {
    opts: OriginBuilder,
    handler: Box<Handler>,
    stop: AtomicBool,
    accepts: AtomicUsize,
    active: AtomicUsize,
    heads: AtomicUsize,
    requests: Mutex<Vec<RecordedRequest>>,
    arrived: Condvar,
    errors: Mutex<Vec<String>>,
    /// Clones of the open connections, so drop can unblock their threads; a connection's
    /// entry is removed when its thread ends, so the socket really closes then.
    conns: Mutex<std::collections::HashMap<usize, TcpStream>>,
}

/// A running test origin; stops (and closes every connection it holds) on drop.
pub struct Origin {
    addr: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<thread::JoinHandle<()>>,
}

impl Origin {
    pub fn builder() -> OriginBuilder {
        OriginBuilder::default()
    }
    /// An origin answering every request through `handler`.
    pub fn start(handler: impl Fn(&RecordedRequest) -> Reply + Send + Sync + 'static) -> Origin {
        Origin::builder().start(handler)
    }
    /// Answers 200 with the request body.
    pub fn echo() -> Origin {
        Origin::start(Reply::echo)
    }
    /// Answers 200 with `name` as the body and `X-Origin: name`: for telling servers apart.
    pub fn named(name: &str) -> Origin {
        let name = name.to_string();
        Origin::start(move |_| Reply::ok(name.clone()).header("X-Origin", &name))
    }
    /// Accepts connections and never answers.
    pub fn black_hole() -> Origin {
        Origin::builder().black_hole().start(|_| Reply::stall())
    }

    fn spawn(opts: OriginBuilder, handler: Box<Handler>) -> Origin {
        let listener = match opts.bind {
            Some(addr) => TcpListener::bind(addr),
            None => TcpListener::bind("127.0.0.1:0"),
        }
        .expect("bind origin");
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            opts,
            handler,
            stop: AtomicBool::new(false),
            accepts: AtomicUsize::new(0),
            active: AtomicUsize::new(0),
            heads: AtomicUsize::new(0),
            requests: Mutex::new(Vec::new()),
            arrived: Condvar::new(),
            errors: Mutex::new(Vec::new()),
            conns: Mutex::new(std::collections::HashMap::new()),
        });
        let sh = shared.clone();
        let acceptor = thread::Builder::new()
            .name(format!("origin-{addr}"))
            .spawn(move || {
                for stream in listener.incoming() {
                    if sh.stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(stream) = stream else { continue };
                    let n = sh.accepts.fetch_add(1, Ordering::SeqCst) + 1;
                    if let Ok(clone) = stream.try_clone() {
                        sh.conns.lock().unwrap().insert(n, clone);
                    }
                    if sh.opts.black_hole {
                        continue;
                    }
                    let sh2 = sh.clone();
                    thread::spawn(move || {
                        sh2.active.fetch_add(1, Ordering::SeqCst);
                        serve_conn(&sh2, stream, n);
                        sh2.conns.lock().unwrap().remove(&n);
                        sh2.active.fetch_sub(1, Ordering::SeqCst);
                    });
                }
            })
            .unwrap();
        Origin {
            addr,
            shared,
            acceptor: Some(acceptor),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
    /// Connections accepted so far.
    pub fn accepts(&self) -> usize {
        self.shared.accepts.load(Ordering::SeqCst)
    }
    /// Connections currently being served.
    pub fn active(&self) -> usize {
        self.shared.active.load(Ordering::SeqCst)
    }
    /// Request heads received so far, including those whose body has not (yet) arrived.
    pub fn heads_seen(&self) -> usize {
        self.shared.heads.load(Ordering::SeqCst)
    }
    /// Every complete request received so far.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.requests.lock().unwrap().clone()
    }
    pub fn request_count(&self) -> usize {
        self.shared.requests.lock().unwrap().len()
    }
    pub fn last_request(&self) -> RecordedRequest {
        self.requests()
            .pop()
            .expect("origin received no request at all")
    }
    /// Framing errors seen in what the proxy sent.
    pub fn errors(&self) -> Vec<String> {
        self.shared.errors.lock().unwrap().clone()
    }
    /// Blocks until at least `n` requests have arrived; panics after `timeout`.
    pub fn wait_requests(&self, n: usize, timeout: Duration) -> Vec<RecordedRequest> {
        let deadline = Instant::now() + timeout;
        let mut reqs = self.shared.requests.lock().unwrap();
        while reqs.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "origin {}: {} of {n} requests after {timeout:?} (errors: {:?})",
                self.addr,
                reqs.len(),
                self.errors()
            );
            reqs = self.shared.arrived.wait_timeout(reqs, left).unwrap().0;
        }
        reqs.clone()
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wake the acceptor, then unblock every connection thread.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(h) = self.acceptor.take() {
            let _ = h.join();
        }
        for (_, c) in self.shared.conns.lock().unwrap().drain() {
            let _ = c.shutdown(Shutdown::Both);
        }
    }
}

/// A loopback address with nothing listening (connections are refused).
pub fn refused_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let a = l.local_addr().unwrap();
    drop(l);
    a
}

fn serve_conn(sh: &Shared, stream: TcpStream, conn: usize) {
    let _ = stream.set_nodelay(true);
    let _ = stream.set_write_timeout(Some(Duration::from_secs(30)));
    let peer = stream
        .peer_addr()
        .unwrap_or_else(|_| "0.0.0.0:0".parse().unwrap());
    let mut wire = Wire::new(stream);
    let mut nth = 0;
    loop {
        if sh.stop.load(Ordering::SeqCst) {
            return;
        }
        // Between requests: the idle limit (if any); inside a request: generous, since the
        // proxy may be streaming a large body slowly under load.
        let idle = if wire.buffered().is_empty() {
            sh.opts.idle_close
        } else {
            None
        };
        let _ = wire
            .stream
            .set_read_timeout(Some(idle.unwrap_or(Duration::from_secs(60))));
        let head = match wire.read_head() {
            Ok(Some(h)) => h,
            Ok(None) => return,
            Err(e) if wire::is_timeout(&e) && idle.is_some() => return, // idle close
            Err(e) => {
                if !sh.stop.load(Ordering::SeqCst) && !is_disconnect(&e) {
                    sh.errors.lock().unwrap().push(format!("reading head: {e}"));
                }
                return;
            }
        };
        let _ = wire.stream.set_read_timeout(Some(Duration::from_secs(60)));
        nth += 1;
        sh.heads.fetch_add(1, Ordering::SeqCst);
        let mut parts = head.start_line.splitn(3, ' ');
        let method = parts.next().unwrap_or_default().to_string();
        let target = parts.next().unwrap_or_default().to_string();
        let version = parts.next().unwrap_or_default().to_string();
        if version != "HTTP/1.1" && version != "HTTP/1.0" {
            sh.errors
                .lock()
                .unwrap()
                .push(format!("bad request line {:?}", head.start_line));
            return;
        }
        let te = wire::header_tokens(&head.headers, "transfer-encoding");
        let cl = wire::header_all(&head.headers, "content-length");
        if !te.is_empty() && !cl.is_empty() {
            sh.errors
                .lock()
                .unwrap()
                .push("request with both Transfer-Encoding and Content-Length".into());
            return;
        }
        if wire::header_tokens(&head.headers, "expect")
            .iter()
            .any(|t| t == "100-continue")
            && !sh.opts.no_auto_continue
            && wire
                .stream
                .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                .is_err()
        {
            return;
        }
        let (body, framing) = if !te.is_empty() {
            if te != ["chunked"] {
                sh.errors
                    .lock()
                    .unwrap()
                    .push(format!("request transfer coding {te:?}"));
                return;
            }
            match wire.read_chunked() {
                Ok((b, sizes, _)) => (b, BodyFraming::Chunked(sizes)),
                Err(e) => {
                    if !sh.stop.load(Ordering::SeqCst) && !is_disconnect(&e) {
                        sh.errors.lock().unwrap().push(format!("chunked body: {e}"));
                    }
                    return;
                }
            }
        } else if !cl.is_empty() {
            let Some(n) = (cl.len() == 1)
                .then(|| cl[0].parse::<usize>().ok())
                .flatten()
            else {
                sh.errors
                    .lock()
                    .unwrap()
                    .push(format!("bad request Content-Length {cl:?}"));
                return;
            };
            match wire.read_exact_vec(n) {
                Ok(b) => (b, BodyFraming::ContentLength(n)),
                Err(e) => {
                    if !sh.stop.load(Ordering::SeqCst) && !is_disconnect(&e) {
                        sh.errors.lock().unwrap().push(format!("body: {e}"));
                    }
                    return;
                }
            }
        } else {
            (Vec::new(), BodyFraming::None)
        };
        let req = RecordedRequest {
            conn,
            nth_on_conn: nth,
            peer,
            method,
            target,
            version,
            headers: head.headers,
            body,
            framing,
            raw_head: head.raw,
        };
        let reply = (sh.handler)(&req);
        let wants_close = wire::header_tokens(&req.headers, "connection")
            .iter()
            .any(|t| t == "close")
            || (req.version == "HTTP/1.0"
                && !wire::header_tokens(&req.headers, "connection")
                    .iter()
                    .any(|t| t == "keep-alive"));
        let is_head = req.method == "HEAD";
        {
            let mut reqs = sh.requests.lock().unwrap();
            reqs.push(req);
            sh.arrived.notify_all();
        }
        if !sleep_unless_stopped(sh, reply.delay) {
            return;
        }
        match write_reply(sh, &mut wire.stream, &reply, is_head, wants_close) {
            Ok(true) => {}
            _ => return,
        }
    }
}

fn is_disconnect(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe
    )
}

/// Sleeps `d` in small slices; false when the origin is stopping.
fn sleep_unless_stopped(sh: &Shared, d: Duration) -> bool {
    let end = Instant::now() + d;
    while Instant::now() < end {
        if sh.stop.load(Ordering::SeqCst) {
            return false;
        }
        thread::sleep((end - Instant::now()).min(Duration::from_millis(20)));
    }
    !sh.stop.load(Ordering::SeqCst)
}

/// Writes one reply; `Ok(true)` when the connection stays open for another request.
fn write_reply(
    sh: &Shared,
    stream: &mut TcpStream,
    reply: &Reply,
    is_head: bool,
    wants_close: bool,
) -> std::io::Result<bool> {
    match &reply.action {
        Action::Stall => {
            stall(sh, stream);
            return Ok(false);
        }
        Action::Raw(bytes) => {
            stream.write_all(bytes)?;
            let _ = stream.shutdown(Shutdown::Write);
            // Let the proxy read the bytes before the socket goes away for good.
            thread::sleep(Duration::from_millis(50));
            return Ok(false);
        }
        _ => {}
    }
    for (status, headers) in &reply.interim {
        let mut h = format!("HTTP/1.1 {status} {}\r\n", reason_for(*status));
        for (n, v) in headers {
            h.push_str(&format!("{n}: {v}\r\n"));
        }
        h.push_str("\r\n");
        stream.write_all(h.as_bytes())?;
        stream.flush()?;
    }
    let no_body_status =
        (100..200).contains(&reply.status) || reply.status == 204 || reply.status == 304;
    let close = reply.close || wants_close || reply.framing == Framing::CloseDelimited;
    let mut head = format!(
        "HTTP/1.1 {} {}\r\n",
        reply.status,
        reply.reason.as_deref().unwrap_or(reason_for(reply.status))
    );
    for (n, v) in &reply.headers {
        head.push_str(&format!("{n}: {v}\r\n"));
    }
    let framing = if no_body_status {
        &Framing::HeadOnly
    } else {
        &reply.framing
    };
    match framing {
        Framing::ContentLength => {
            head.push_str(&format!("Content-Length: {}\r\n", reply.body.len()))
        }
        Framing::Chunked(_) => head.push_str("Transfer-Encoding: chunked\r\n"),
        Framing::CloseDelimited | Framing::HeadOnly => {}
    }
    if close {
        head.push_str("Connection: close\r\n");
    }
    head.push_str("\r\n");
    let mut out = head.into_bytes();
    let head_len = out.len();
    if !is_head {
        match framing {
            Framing::ContentLength | Framing::CloseDelimited => out.extend_from_slice(&reply.body),
            Framing::Chunked(sizes) => {
                out.extend_from_slice(&wire::encode_chunked(&reply.body, sizes))
            }
            Framing::HeadOnly => {}
        }
    }
    if let Action::PartialThenStall(n) = reply.action {
        let keep = out.len() - reply.body.len() + n.min(reply.body.len());
        stream.write_all(&out[..keep])?;
        stream.flush()?;
        stall(sh, stream);
        return Ok(false);
    }
    if let Action::ResetAfter(n) = reply.action {
        let keep = out.len() - reply.body.len() + n.min(reply.body.len());
        stream.write_all(&out[..keep])?;
        stream.flush()?;
        // Give the proxy a moment to receive the partial body before the RST discards
        // whatever is still queued, then abort the connection (SO_LINGER 0 → RST).
        thread::sleep(Duration::from_millis(100));
        let _ = socket2::SockRef::from(&*stream).set_linger(Some(Duration::ZERO));
        let _ = stream.shutdown(Shutdown::Read);
        return Ok(false);
    }
    if let Action::Trickle(pause) = reply.action {
        stream.write_all(&out[..head_len])?;
        for byte in &out[head_len..] {
            if !sleep_unless_stopped(sh, pause) {
                return Ok(false);
            }
            stream.write_all(std::slice::from_ref(byte))?;
        }
    } else {
        // Write in slices so a 10 MiB body does not need one huge syscall to succeed at
        // once.
        for part in out.chunks(256 * 1024) {
            stream.write_all(part)?;
        }
    }
    stream.flush()?;
    if close {
        let _ = stream.shutdown(Shutdown::Write);
        return Ok(false);
    }
    Ok(true)
}

/// Never answers, but notices when the proxy gives up on the connection (EOF or reset), so
/// `Origin::active` shows whether the proxy released it.
fn stall(sh: &Shared, stream: &mut TcpStream) {
    use std::io::Read;
    let _ = stream.set_read_timeout(Some(Duration::from_millis(20)));
    let mut scratch = [0u8; 4096];
    while !sh.stop.load(Ordering::SeqCst) {
        match stream.read(&mut scratch) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if wire::is_timeout(&e) || e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// Standard reason phrases for the statuses the tests use.
pub fn reason_for(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        101 => "Switching Protocols",
        102 => "Processing",
        103 => "Early Hints",
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        301 => "Moved Permanently",
        302 => "Found",
        304 => "Not Modified",
        400 => "Bad Request",
        404 => "Not Found",
        418 => "I'm a teapot",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Status",
    }
}
