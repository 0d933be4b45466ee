//! `connection`: a whole client connection through [`gateway::dataplane::conn::h1::serve`] over in-memory
//! streams: the client is scripted by the input, the upstream answers every request with
//! the same scripted bytes. The real worker, snapshot, router and upstream pool run on a
//! tokio current-thread runtime; [`Stream::connect`](gateway::io::Stream::connect) hands
//! out scripted upstream connections instead of sockets.
//!
//! Input: what the client sends, optionally followed by `\n@@UPSTREAM@@\n` and what the
//! upstream answers (default: a keep-alive `200` with a 2-byte body). Read boundaries on
//! both sides are seeded from the input.
//!
//! Invariants beyond "no panic":
//! - the connection ends (both scripts end in EOF; nothing may wait on a timer for long);
//! - `connection-memory-bounded` (issue 10): neither side's buffer grows past
//!   [`MAX_BUFFERED`] between reads;
//! - `upstream-stream-parses` (issue 10): the bytes each upstream connection receives parse
//!   as a sequence of requests with our own parser (up to an upgrade, after which they are
//!   a tunnel's): the upstream and the gateway agree where each request ends;
//! - `upstream-only-routed-paths` (issue 10): none of those requests is for what a
//!   `respond` route guards (`/admin`, after percent-decoding, dot segments and slash
//!   merging, as nginx normalises; `Host: admin.example.com`, any case, port, final dot).

use super::Splits;
use crate::check::{invariant, show};
use crate::script::{runtime, Peer, Scripted, CONNECT};
use bytes::BytesMut;
use gateway::config::{Config, LoadedConfig};
use gateway::dataplane::conn::{h1::serve, ListenerCtx};
use gateway::dataplane::ctx::Worker;
use gateway::policy::limits::{ConnLimiter, Enforcement};
use gateway::protocol::http1::chunked::ChunkedDecoder;
use gateway::protocol::http1::head::{parse_request, trim, BodyFraming, RequestHead};
use gateway::{dataplane::shared::Shared, snapshot::Snapshot};
use std::cell::RefCell;
use std::net::SocketAddr;
use std::path::Path;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const SEPARATOR: &[u8] = b"\n@@UPSTREAM@@\n";
/// Most bytes either side may hold in its read buffer when it reads again: a full head
/// (`max_header_bytes`, 16 KiB here), a body buffer (64 KiB) and a pipelined head, with room.
pub const MAX_BUFFERED: usize = 256 * 1024;
const BUDGET: (&str, usize) = ("connection-memory-bounded", MAX_BUFFERED);
const DEFAULT_RESPONSE: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";

/// The documentation address (RFC 5737) the upstream is configured at; never dialled.
const CONFIG: &str = r#"
[server]
workers = 1
header_timeout = "2s"
keepalive_timeout = "2s"

[log]
access = "off"

[admin]
listen = "127.0.0.1:0"

[[listener]]
name = "http"
listen = "127.0.0.1:0"

[[upstream]]
name = "app"
servers = ["192.0.2.10:80"]

[[route]]
path_prefix = "/admin"
respond = { status = 403 }

[[route]]
host = "admin.example.com"
path_prefix = "/"
respond = { status = 403 }

[[route]]
path_prefix = "/ws"
upstream = "app"
websocket = true

[[route]]
path_prefix = "/"
upstream = "app"
max_body_size = "64KiB"
"#;

fn shared() -> Arc<Shared> {
    let path = Path::new("/fuzz/gateway.toml");
    let config = Config::parse(path, CONFIG).expect("fuzz config parses");
    let limiter = ConnLimiter::new(&config.limits, Enforcement::default(), None);
    let loaded = LoadedConfig {
        path: path.to_path_buf(),
        config,
        source: CONFIG.to_string(),
    };
    Shared::new(Snapshot::build(loaded, 1, None).expect("snapshot"), limiter)
}
/// What the two peers of one connection received.
pub struct Exchange {
    /// Bytes the gateway sent the client.
    pub client: Vec<u8>,
    /// Bytes the gateway sent on each upstream connection, in connect order.
    pub upstreams: Vec<Vec<u8>>,
}

pub fn run(data: &[u8]) {
    for upstream in exchange(data).upstreams {
        check_upstream_bytes(&upstream);
    }
}

/// Serves one connection scripted by `data` (format above) and returns what each peer got.
pub fn exchange(data: &[u8]) -> Exchange {
    let (client, upstream) = match find(data, SEPARATOR) {
        Some(at) => (&data[..at], &data[at + SEPARATOR.len()..]),
        None => (data, DEFAULT_RESPONSE),
    };
    let mut splits = Splits::new(data);
    let client_reads: Vec<Vec<u8>> = splits
        .cut(client, 512)
        .into_iter()
        .map(<[u8]>::to_vec)
        .collect();
    let upstream_reads: Vec<Vec<u8>> = splits
        .cut(upstream, 512)
        .into_iter()
        .map(<[u8]>::to_vec)
        .collect();

    let upstreams: Rc<RefCell<Vec<Rc<Peer>>>> = Rc::default();
    let seen = upstreams.clone();
    CONNECT.with(|c| {
        *c.borrow_mut() = Some(Box::new(move |_addr| {
            let s = Scripted::new(upstream_reads.clone(), BUDGET);
            seen.borrow_mut().push(s.peer.clone());
            Ok(s)
        }))
    });
    let socket = Scripted::new(client_reads, BUDGET);
    let client_peer = socket.peer.clone();
    let rt = runtime();
    rt.block_on(async {
        let worker = Rc::new(Worker::new(0, shared(), None));
        let listener = ListenerCtx::new(worker.shared.snapshot().listeners[0].clone());
        let peer: SocketAddr = "198.51.100.7:40000".parse().expect("address");
        let conn = serve(
            worker,
            listener,
            socket,
            peer,
            Instant::now(),
            BytesMut::new(),
            None,
        );
        // Both scripts end in EOF, so only a timer can keep the connection this long.
        if tokio::time::timeout(Duration::from_secs(10), conn)
            .await
            .is_err()
        {
            panic!(
                "connection still open 10 s after both scripts ended: {}",
                show(data)
            );
        }
    });
    CONNECT.with(|c| c.borrow_mut().take());
    let client = client_peer.written.take();
    let upstreams = upstreams
        .borrow()
        .iter()
        .map(|p| p.written.take())
        .collect();
    Exchange { client, upstreams }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Parses what one upstream connection received as requests, and checks each.
fn check_upstream_bytes(mut rest: &[u8]) {
    let mut head = RequestHead::default();
    while !rest.is_empty() {
        let parsed = parse_request(rest, &mut head, 1 << 20);
        // The gateway writes every head itself and never half of one, so anything else here
        // is body bytes the upstream will read as a request: the streams disagree.
        invariant("upstream-stream-parses", parsed == Ok(true), || {
            format!("upstream got {parsed:?} for: {}", show(rest))
        });
        if parsed != Ok(true) {
            return;
        }
        // What the upstream reads: the raw target it was sent, normalised its own way.
        let target = head.target(rest);
        let path = normalise(target.split(|&b| b == b'?').next().unwrap_or(target));
        let host = head.host(rest).map(host_key);
        invariant(
            "upstream-only-routed-paths",
            !path.starts_with(b"/admin") && host.as_deref() != Some(b"admin.example.com"),
            || {
                format!(
                    "upstream got a guarded request: {}",
                    show(&rest[..head.len])
                )
            },
        );
        let upgrade = head.known.upgrade.is_some();
        rest = &rest[head.len..];
        match head.framing {
            BodyFraming::Length(n) => rest = &rest[(n as usize).min(rest.len())..],
            BodyFraming::Chunked => {
                let mut d = ChunkedDecoder::new();
                match d.decode(rest, |_| {}) {
                    Ok(n) => rest = &rest[n..],
                    // Bodies are forwarded as they arrive: a bad one is cut short there.
                    Err(_) => return,
                }
            }
            _ => {}
        }
        if upgrade {
            // Past an upgrade the bytes belong to the tunnel, whatever they look like.
            return;
        }
    }
}

/// A `Host` value as routing should compare it: lower case, no port, no final dot.
fn host_key(host: &[u8]) -> Vec<u8> {
    let host = trim(host);
    let host = match host.iter().rposition(|&b| b == b':') {
        Some(i) if !host.starts_with(b"[") || host[..i].ends_with(b"]") => &host[..i],
        _ => host,
    };
    let host = host.strip_suffix(b".").unwrap_or(host);
    host.to_ascii_lowercase()
}

/// The path as an origin server such as nginx resolves it: percent-decoded, slashes merged,
/// dot segments removed (RFC 3986 §5.2.4).
/// An absolute-form target (`http://host/path`) is reduced to its path first.
fn normalise(path: &[u8]) -> Vec<u8> {
    let lower = path.to_ascii_lowercase();
    let path = match [&b"http://"[..], b"https://"]
        .iter()
        .find(|p| lower.starts_with(p))
    {
        Some(scheme) => {
            let after = &path[scheme.len()..];
            &after[after.iter().position(|&b| b == b'/').unwrap_or(after.len())..]
        }
        None => path,
    };
    let mut decoded = Vec::with_capacity(path.len());
    let mut i = 0;
    while i < path.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if path[i] == b'%' && i + 2 < path.len() {
            if let (Some(h), Some(l)) = (hex(path[i + 1]), hex(path[i + 2])) {
                decoded.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        decoded.push(path[i]);
        i += 1;
    }
    let mut segments: Vec<&[u8]> = Vec::new();
    for seg in decoded.split(|&b| b == b'/') {
        match seg {
            b"" | b"." => {}
            b".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    let mut out = Vec::with_capacity(decoded.len());
    for s in segments {
        out.push(b'/');
        out.extend_from_slice(s);
    }
    if out.is_empty() {
        out.push(b'/');
    }
    out
}
