//! WebSocket tunnels end to end: a real tungstenite client, the real gateway binary, a real
//! tungstenite echo server (std::net, one thread per connection).
//!
//! Covered: text and binary messages from 1 byte to 16 MiB, fragmented messages, ping/pong
//! both ways, the close handshake from either side, 1,000 concurrent tunnels, bytes sent
//! right behind either side's handshake, half-close, an upstream that dies, the idle
//! timeout (a watchdog: a busy tunnel outlives it), a non-101 answer relayed, and which
//! copy path plaintext tunnels took (splice).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use gateway_tests::{wait_until, Config, Gateway, Origin, Reply, Req, Route, Upstream};
use tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
use tungstenite::protocol::frame::{CloseFrame, Frame};
use tungstenite::protocol::{Role, WebSocketConfig};
use tungstenite::{Error as WsError, Message, WebSocket};

type Ws = WebSocket<TcpStream>;

/// Room for the 16 MiB messages (tungstenite's default frame limit is exactly 16 MiB).
fn ws_config() -> WebSocketConfig {
    WebSocketConfig {
        max_message_size: Some(64 << 20),
        max_frame_size: Some(64 << 20),
        ..WebSocketConfig::default()
    }
}

// ---------------------------------------------------------------------------------------
// The echo origin.

/// A WebSocket echo server. Text commands change its behaviour: `server-close` starts the
/// close handshake, `server-die` resets the connection, `server-ping:<x>` sends a ping and
/// answers `pong:<x>` when the pong arrives; everything else is echoed.
struct WsOrigin {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    accepted: Arc<AtomicUsize>,
    /// Clones of open connections, so drop can unblock their threads; removed when the
    /// handler ends so that the socket really closes then.
    conns: Arc<Mutex<HashMap<usize, TcpStream>>>,
    /// Connections whose handler has ended (the origin saw the tunnel close).
    ended: Arc<AtomicUsize>,
}

impl WsOrigin {
    fn start() -> WsOrigin {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let origin = WsOrigin {
            addr,
            stop: Arc::default(),
            accepted: Arc::default(),
            conns: Arc::default(),
            ended: Arc::default(),
        };
        let (stop, accepted, conns, ended) = (
            origin.stop.clone(),
            origin.accepted.clone(),
            origin.conns.clone(),
            origin.ended.clone(),
        );
        thread::spawn(move || {
            for stream in listener.incoming() {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                let id = accepted.fetch_add(1, Ordering::SeqCst);
                if let Ok(c) = stream.try_clone() {
                    conns.lock().unwrap().insert(id, c);
                }
                let (ended, conns) = (ended.clone(), conns.clone());
                thread::Builder::new()
                    .stack_size(256 * 1024)
                    .spawn(move || {
                        serve_echo(stream);
                        conns.lock().unwrap().remove(&id);
                        ended.fetch_add(1, Ordering::SeqCst);
                    })
                    .unwrap();
            }
        });
        origin
    }
}

impl Drop for WsOrigin {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
        for (_, c) in self.conns.lock().unwrap().drain() {
            let _ = c.shutdown(Shutdown::Both);
        }
    }
}

fn serve_echo(stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let Ok(mut ws) = tungstenite::accept_with_config(stream, Some(ws_config())) else {
        return;
    };
    echo_loop(&mut ws);
}

fn echo_loop(ws: &mut Ws) {
    loop {
        let msg = match ws.read() {
            Ok(m) => m,
            Err(_) => return,
        };
        let reply = match msg {
            Message::Text(t) if t == "server-close" => {
                let _ = ws.close(Some(CloseFrame {
                    code: CloseCode::Normal,
                    reason: "server says bye".into(),
                }));
                continue;
            }
            Message::Text(t) if t == "server-die" => {
                let _ = socket2::SockRef::from(ws.get_ref()).set_linger(Some(Duration::ZERO));
                return;
            }
            Message::Text(t) if t.starts_with("server-ping:") => {
                Message::Ping(t.as_bytes()["server-ping:".len()..].to_vec())
            }
            Message::Pong(p) => Message::Text(format!("pong:{}", String::from_utf8_lossy(&p))),
            m @ (Message::Text(_) | Message::Binary(_)) => m,
            _ => {
                // Pings are answered and closes confirmed by tungstenite itself.
                let _ = ws.flush();
                continue;
            }
        };
        if ws.send(reply).is_err() {
            return;
        }
    }
}

// ---------------------------------------------------------------------------------------
// Gateway, clients, helpers.

/// A gateway with `/ws` as a WebSocket route to `origin`, tunnel logging at debug.
fn gateway(origin: SocketAddr, read_timeout: &str) -> Gateway {
    Gateway::with(
        &Config::new()
            .log("level", "info,gateway::dataplane::conn::tunnel=debug")
            .upstream(Upstream::new("ws", &[origin]))
            .route(
                Route::prefix("/ws", "ws")
                    .websocket(true)
                    .read_timeout(read_timeout),
            ),
    )
}

fn connect(gw: &Gateway) -> Ws {
    let stream = TcpStream::connect(gw.http_addr()).unwrap();
    stream.set_nodelay(true).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let url = format!("ws://{}/ws/echo", gw.http_addr());
    let (ws, resp) =
        tungstenite::client::client_with_config(url.as_str(), stream, Some(ws_config()))
            .unwrap_or_else(|e| panic!("WebSocket handshake through the gateway: {e}"));
    assert_eq!(resp.status(), 101);
    ws
}

/// Sends `msg` and expects it back unchanged.
fn round_trip(ws: &mut Ws, msg: Message) {
    let len = msg.len();
    ws.send(msg.clone()).unwrap();
    let back = read_data(ws);
    assert!(back == msg, "echo of a {len}-byte message differs");
}

/// The next text or binary message (pings and pongs are handled on the way).
fn read_data(ws: &mut Ws) -> Message {
    loop {
        match ws.read().expect("read from the tunnel") {
            m @ (Message::Text(_) | Message::Binary(_)) => return m,
            _ => continue,
        }
    }
}

/// Reads until the connection ends; true when a close frame came first.
fn read_until_closed(ws: &mut Ws) -> (bool, WsError) {
    let mut saw_close = false;
    loop {
        match ws.read() {
            Ok(Message::Close(_)) => saw_close = true,
            Ok(_) => {}
            Err(e) => return (saw_close, e),
        }
    }
}

/// A counter or gauge from the admin `/metrics` (0 when absent).
fn metric(gw: &Gateway, series: &str) -> f64 {
    let body = gw.admin_get("/metrics").body_str();
    body.lines()
        .find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0.0)
}

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn text(n: usize) -> String {
    "abcdefghijklmnopqrstuvwxyz0123456789"
        .chars()
        .cycle()
        .take(n)
        .collect()
}

/// A client frame (masked, as RFC 6455 requires of clients).
fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    assert!(payload.len() < 126);
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    let mut f = vec![0x80 | opcode, 0x80 | payload.len() as u8];
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

/// A server frame (unmasked).
fn server_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    assert!(payload.len() < 126);
    let mut f = vec![0x80 | opcode, payload.len() as u8];
    f.extend_from_slice(payload);
    f
}

const UPGRADE: &str = "GET /ws/raw HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\n\
Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";

/// Reads an HTTP head; returns it and the bytes read past it.
fn read_head(s: &mut TcpStream) -> (String, Vec<u8>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(i + 4);
            return (String::from_utf8_lossy(&buf).into_owned(), rest);
        }
        let n = s.read(&mut chunk).expect("read head");
        assert!(n > 0, "EOF before the end of the head: {buf:?}");
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn header<'h>(head: &'h str, name: &str) -> Option<&'h str> {
    head.lines().find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

fn read_exactly(s: &mut TcpStream, mut have: Vec<u8>, n: usize) -> Vec<u8> {
    let mut chunk = [0u8; 4096];
    while have.len() < n {
        let got = s.read(&mut chunk).expect("read");
        assert!(got > 0, "EOF after {} of {n} bytes", have.len());
        have.extend_from_slice(&chunk[..got]);
    }
    have
}

/// A raw origin for one connection: reads the upgrade request, then runs `then` with the
/// stream, the head and whatever arrived behind it.
fn raw_origin(
    then: impl FnOnce(TcpStream, String, Vec<u8>) + Send + 'static,
) -> (SocketAddr, thread::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let h = thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let (head, rest) = read_head(&mut s);
        then(s, head, rest);
    });
    (addr, h)
}

fn switching_protocols(head: &str) -> String {
    let key = header(head, "sec-websocket-key").expect("Sec-WebSocket-Key forwarded");
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {}\r\n\r\n",
        tungstenite::handshake::derive_accept_key(key.as_bytes())
    )
}

/// `(splice, copy)` as the path every plaintext tunnel should take: splice, unless the
/// suite runs with `GATEWAY_TUNNEL_SPLICE=off` (which the gateway inherits) to cover the
/// copy path with the same tests.
fn expected(n: usize) -> (usize, usize) {
    match std::env::var("GATEWAY_TUNNEL_SPLICE").as_deref() {
        Ok("off") | Ok("0") => (0, n),
        _ => (n, 0),
    }
}

/// Closed tunnels the gateway logged, by path: `(splice, copy)`.
fn logged_paths(gw: &Gateway) -> (usize, usize) {
    let err = gw.stderr();
    let closed = err.lines().filter(|l| l.contains("tunnel closed"));
    let (mut splice, mut copy) = (0, 0);
    for l in closed {
        if l.contains("path=\"splice\"") || l.contains("path=splice") {
            splice += 1;
        } else if l.contains("path=\"copy\"") || l.contains("path=copy") {
            copy += 1;
        }
    }
    (splice, copy)
}

fn wait_logged_reason(gw: &Gateway, reason: &str) {
    wait_until(
        Duration::from_secs(5),
        &format!("tunnel closed with {reason}"),
        || {
            gw.stderr()
                .lines()
                .any(|l| l.contains("tunnel closed") && l.contains(reason))
        },
    );
}

// ---------------------------------------------------------------------------------------
// Tests.

#[test]
fn messages_of_every_size_both_kinds() {
    let origin = WsOrigin::start();
    let gw = gateway(origin.addr, "60s");
    let mut ws = connect(&gw);
    for &n in &[1, 125, 126, 127, 65_535, 65_536, 65_537, 1 << 20, 16 << 20] {
        round_trip(&mut ws, Message::Binary(pattern(n, n as u8)));
        round_trip(&mut ws, Message::Text(text(n)));
    }
    ws.close(None).unwrap();
    let (saw_close, _) = read_until_closed(&mut ws);
    assert!(saw_close, "the origin's close frame came back");
}

#[test]
fn fragmented_messages() {
    let origin = WsOrigin::start();
    let gw = gateway(origin.addr, "60s");
    let mut ws = connect(&gw);
    // Text split across frames, with a ping interleaved (control frames may come between
    // fragments), then binary in many small fragments.
    let parts = ["frag", "mented ", "text ✓"];
    for (i, p) in parts.iter().enumerate() {
        let op = if i == 0 {
            OpCode::Data(Data::Text)
        } else {
            OpCode::Data(Data::Continue)
        };
        ws.write(Message::Frame(Frame::message(
            p.as_bytes().to_vec(),
            op,
            i == parts.len() - 1,
        )))
        .unwrap();
        if i == 1 {
            ws.write(Message::Ping(b"mid".to_vec())).unwrap();
        }
    }
    ws.flush().unwrap();
    let mut got_pong = false;
    let back = loop {
        match ws.read().unwrap() {
            Message::Pong(p) => {
                assert_eq!(p, b"mid");
                got_pong = true;
            }
            m @ Message::Text(_) => break m,
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(back, Message::Text("fragmented text ✓".into()));
    let data = pattern(300_000, 9);
    let chunks: Vec<&[u8]> = data.chunks(1000).collect();
    for (i, c) in chunks.iter().enumerate() {
        let op = if i == 0 {
            OpCode::Data(Data::Binary)
        } else {
            OpCode::Data(Data::Continue)
        };
        ws.write(Message::Frame(Frame::message(
            c.to_vec(),
            op,
            i == chunks.len() - 1,
        )))
        .unwrap();
    }
    ws.flush().unwrap();
    loop {
        match ws.read().unwrap() {
            Message::Pong(_) => got_pong = true,
            Message::Binary(b) => {
                assert!(b == data, "reassembled binary differs");
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(got_pong, "the ping between fragments was answered");
}

#[test]
fn ping_pong_both_ways() {
    let origin = WsOrigin::start();
    let gw = gateway(origin.addr, "60s");
    let mut ws = connect(&gw);
    ws.send(Message::Ping(b"from-client".to_vec())).unwrap();
    match ws.read().unwrap() {
        Message::Pong(p) => assert_eq!(p, b"from-client"),
        other => panic!("expected the pong, got {other:?}"),
    }
    // The origin pings; tungstenite answers on the next write/flush.
    ws.send(Message::Text("server-ping:abc".into())).unwrap();
    match ws.read().unwrap() {
        Message::Ping(p) => assert_eq!(p, b"abc"),
        other => panic!("expected the origin's ping, got {other:?}"),
    }
    ws.flush().unwrap();
    assert_eq!(read_data(&mut ws), Message::Text("pong:abc".into()));
}

#[test]
fn close_handshake_from_the_client() {
    let origin = WsOrigin::start();
    let gw = gateway(origin.addr, "60s");
    let mut ws = connect(&gw);
    round_trip(&mut ws, Message::Text("hi".into()));
    ws.close(Some(CloseFrame {
        code: CloseCode::Away,
        reason: "client leaving".into(),
    }))
    .unwrap();
    let (saw_close, err) = read_until_closed(&mut ws);
    assert!(saw_close, "the origin confirmed the close");
    assert!(
        matches!(err, WsError::ConnectionClosed),
        "clean end after the close handshake, got {err:?}"
    );
    // The client closes TCP after the handshake; the tunnel ends once both sides have.
    drop(ws);
    wait_until(Duration::from_secs(5), "the origin handler to end", || {
        origin.ended.load(Ordering::SeqCst) == 1
    });
    // The origin closes TCP first after the close handshake (RFC 6455 §7.1.1).
    wait_logged_reason(&gw, "upstream_closed");
    wait_until(Duration::from_secs(5), "the tunnel gauge to drop", || {
        metric(&gw, "gateway_websocket_tunnels_active") == 0.0
    });
}

#[test]
fn close_handshake_from_the_origin() {
    let origin = WsOrigin::start();
    let gw = gateway(origin.addr, "60s");
    let mut ws = connect(&gw);
    ws.send(Message::Text("server-close".into())).unwrap();
    let mut frame = None;
    let err = loop {
        match ws.read() {
            Ok(Message::Close(f)) => frame = f,
            Ok(other) => panic!("unexpected {other:?}"),
            Err(e) => break e,
        }
    };
    let frame = frame.expect("the origin's close frame reached the client");
    assert_eq!(frame.code, CloseCode::Normal);
    assert_eq!(frame.reason, "server says bye");
    assert!(matches!(err, WsError::ConnectionClosed), "got {err:?}");
}

#[test]
fn thousand_concurrent_tunnels() {
    const THREADS: usize = 10;
    const PER_THREAD: usize = 100;
    let started = Instant::now();
    let origin = WsOrigin::start();
    let gw = gateway(origin.addr, "60s");
    let barrier = Arc::new(Barrier::new(THREADS + 1));
    let done = Arc::new(Barrier::new(THREADS + 1));
    let addr = gw.http_addr();
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let (barrier, done) = (barrier.clone(), done.clone());
            thread::spawn(move || {
                let mut socks: Vec<Ws> = (0..PER_THREAD)
                    .map(|_| {
                        let s = TcpStream::connect(addr).unwrap();
                        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
                        let url = format!("ws://{addr}/ws/many");
                        tungstenite::client(url.as_str(), s).expect("handshake").0
                    })
                    .collect();
                // All open at once before any traffic.
                barrier.wait();
                for (i, ws) in socks.iter_mut().enumerate() {
                    let msg = Message::Binary(pattern(1024 + i, t as u8));
                    ws.send(msg.clone()).unwrap();
                    assert!(read_data(ws) == msg);
                }
                done.wait();
                for ws in &mut socks {
                    ws.close(None).unwrap();
                }
                for ws in &mut socks {
                    let _ = read_until_closed(ws);
                }
            })
        })
        .collect();
    barrier.wait();
    // Workers publish their counters every 200 ms.
    wait_until(Duration::from_secs(5), "1,000 tunnels open at once", || {
        metric(&gw, "gateway_websocket_tunnels_active") == (THREADS * PER_THREAD) as f64
    });
    done.wait();
    for h in handles {
        h.join().unwrap();
    }
    wait_until(Duration::from_secs(10), "every tunnel to close", || {
        metric(&gw, "gateway_websocket_tunnels_active") == 0.0
    });
    assert_eq!(
        logged_paths(&gw),
        expected(THREADS * PER_THREAD),
        "every tunnel on the expected path (splice, copy)"
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "took {:?}",
        started.elapsed()
    );
}

#[test]
fn bytes_right_behind_both_handshakes() {
    // The client sends its upgrade request and a first frame in one write; the origin
    // answers 101 and a first frame in one write. Neither may be lost or reordered.
    let (addr, origin) = raw_origin(|mut s, head, rest| {
        let mut out = switching_protocols(&head).into_bytes();
        out.extend(server_frame(0x1, b"origin-first"));
        s.write_all(&out).unwrap();
        let mut ws = WebSocket::from_partially_read(s, rest, Role::Server, None);
        echo_loop(&mut ws);
    });
    let gw = gateway(addr, "60s");
    let mut c = TcpStream::connect(gw.http_addr()).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut out = UPGRADE.as_bytes().to_vec();
    out.extend(client_frame(0x1, b"client-first"));
    c.write_all(&out).unwrap();
    let (head, rest) = read_head(&mut c);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert_eq!(
        header(&head, "sec-websocket-accept"),
        Some("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
    );
    let first = server_frame(0x1, b"origin-first");
    let echo = server_frame(0x1, b"client-first");
    let got = read_exactly(&mut c, rest, first.len() + echo.len());
    assert_eq!(
        &got[..first.len()],
        &first[..],
        "the origin's first frame first"
    );
    assert_eq!(
        &got[first.len()..],
        &echo[..],
        "the client's first frame echoed"
    );
    c.write_all(&client_frame(0x8, &[0x03, 0xe8])).unwrap();
    drop(c);
    origin.join().unwrap();
}

#[test]
fn half_close_is_passed_on_both_ways() {
    let (addr, origin) = raw_origin(|mut s, head, rest| {
        s.write_all(switching_protocols(&head).as_bytes()).unwrap();
        // Read to EOF (the client's FIN, passed on), then answer and close.
        let got = {
            let mut all = rest;
            s.read_to_end(&mut all).unwrap();
            all
        };
        s.write_all(format!("got {} bytes", got.len()).as_bytes())
            .unwrap();
    });
    let gw = gateway(addr, "60s");
    let mut c = TcpStream::connect(gw.http_addr()).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(UPGRADE.as_bytes()).unwrap();
    let (head, rest) = read_head(&mut c);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(rest.is_empty());
    c.write_all(&[7u8; 5000]).unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    let mut answer = String::new();
    c.read_to_string(&mut answer).unwrap();
    assert_eq!(answer, "got 5000 bytes");
    origin.join().unwrap();
    wait_logged_reason(&gw, "client_closed");
}

#[test]
fn origin_that_dies_ends_the_tunnel_promptly() {
    let origin = WsOrigin::start();
    let gw = gateway(origin.addr, "60s");
    let mut ws = connect(&gw);
    round_trip(&mut ws, Message::Text("alive".into()));
    ws.send(Message::Text("server-die".into())).unwrap();
    let t = Instant::now();
    let (saw_close, err) = read_until_closed(&mut ws);
    assert!(!saw_close);
    assert!(
        !matches!(err, WsError::Io(ref e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the client waited for its read timeout instead of seeing the end"
    );
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "took {:?}",
        t.elapsed()
    );
    wait_until(Duration::from_secs(5), "the tunnel gauge to drop", || {
        metric(&gw, "gateway_websocket_tunnels_active") == 0.0
    });
    // An abrupt end is an error, not a clean close.
    wait_logged_reason(&gw, "reason=\"error\"");
}

#[test]
fn idle_tunnel_closes_at_read_timeout_busy_one_does_not() {
    let origin = WsOrigin::start();
    let gw = gateway(origin.addr, "500ms");
    let mut ws = connect(&gw);
    // Busy for three times the timeout: the watchdog counts from the last byte.
    let busy_until = Instant::now() + Duration::from_millis(1500);
    let idle_from = loop {
        round_trip(&mut ws, Message::Text("tick".into()));
        let last = Instant::now();
        if last >= busy_until {
            break last;
        }
        thread::sleep(Duration::from_millis(150));
    };
    let (_, err) = read_until_closed(&mut ws);
    let waited = idle_from.elapsed();
    assert!(
        !matches!(err, WsError::Io(ref e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the tunnel was never closed"
    );
    assert!(
        waited >= Duration::from_millis(400) && waited < Duration::from_secs(3),
        "closed after {waited:?} idle, expected about 500ms"
    );
    wait_logged_reason(&gw, "reason=\"idle\"");
}

#[test]
fn non_101_answer_is_relayed() {
    let origin = Origin::start(|_| {
        Reply::new(403)
            .header("Content-Type", "text/plain")
            .body("no websocket for you\n")
    });
    let gw = gateway(origin.addr(), "60s");
    let stream = TcpStream::connect(gw.http_addr()).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let url = format!("ws://{}/ws/denied", gw.http_addr());
    match tungstenite::client(url.as_str(), stream) {
        Err(tungstenite::HandshakeError::Failure(WsError::Http(resp))) => {
            assert_eq!(resp.status(), 403);
            assert_eq!(resp.body().as_deref(), Some(&b"no websocket for you\n"[..]));
        }
        Err(e) => panic!("expected the 403 relayed, got {e}"),
        Ok(_) => panic!("expected the 403 relayed, got a tunnel"),
    }
    let req = origin.last_request();
    assert_eq!(req.header("upgrade"), Some("websocket"));
    assert_eq!(metric(&gw, "gateway_websocket_tunnels_active"), 0.0);
}

#[test]
fn plaintext_tunnels_take_the_splice_path() {
    let origin = WsOrigin::start();
    let gw = gateway(origin.addr, "60s");
    for _ in 0..3 {
        let mut ws = connect(&gw);
        round_trip(&mut ws, Message::Binary(pattern(200_000, 1)));
        ws.close(None).unwrap();
        let _ = read_until_closed(&mut ws);
    }
    wait_until(
        Duration::from_secs(5),
        "three tunnels logged closed",
        || logged_paths(&gw).0 + logged_paths(&gw).1 == 3,
    );
    assert_eq!(logged_paths(&gw), expected(3), "tunnels logged by path");
    wait_until(Duration::from_secs(5), "tunnel bytes counted", || {
        metric(&gw, "gateway_tunnel_bytes_total{direction=\"upstream\"}") >= 600_000.0
            && metric(&gw, "gateway_tunnel_bytes_total{direction=\"client\"}") >= 600_000.0
    });
}

/// Needs `gateway_tunnels_total{path}` recorded from `TunnelBytes::path` at tunnel end.
#[test]
fn splice_path_is_counted_in_metrics() {
    let origin = WsOrigin::start();
    let gw = gateway(origin.addr, "60s");
    for _ in 0..2 {
        let mut ws = connect(&gw);
        round_trip(&mut ws, Message::Text("x".into()));
        ws.close(None).unwrap();
        let _ = read_until_closed(&mut ws);
    }
    let count = |path: &str| metric(&gw, &format!("gateway_tunnels_total{{path=\"{path}\"}}"));
    let (splice, copy) = expected(2);
    wait_until(Duration::from_secs(5), "tunnels counted by path", || {
        (count("splice"), count("copy")) == (splice as f64, copy as f64)
    });
}

#[test]
fn slow_101_still_splices() {
    // An upstream slower than the proxy's hang-up watch (which registers the client socket
    // with the reactor while the response is awaited): the tunnel shares that registration.
    let (addr, origin) = raw_origin(|mut s, head, rest| {
        thread::sleep(Duration::from_millis(900));
        s.write_all(switching_protocols(&head).as_bytes()).unwrap();
        let mut ws = WebSocket::from_partially_read(s, rest, Role::Server, None);
        echo_loop(&mut ws);
    });
    let gw = gateway(addr, "60s");
    let mut ws = connect(&gw);
    round_trip(&mut ws, Message::Binary(pattern(100_000, 3)));
    ws.close(None).unwrap();
    let _ = read_until_closed(&mut ws);
    drop(ws);
    origin.join().unwrap();
    wait_until(Duration::from_secs(5), "the tunnel logged closed", || {
        logged_paths(&gw) == expected(1)
    });
}

#[test]
fn drain_keeps_tunnels_until_the_graceful_deadline() {
    let origin = WsOrigin::start();
    let mut gw = Gateway::with(
        &Config::new()
            .server("graceful_timeout", "1500ms")
            .log("level", "info,gateway::dataplane::conn::tunnel=debug")
            .upstream(Upstream::new("ws", &[origin.addr]))
            .route(Route::prefix("/ws", "ws").websocket(true)),
    );
    let mut ws = connect(&gw);
    round_trip(&mut ws, Message::Text("before".into()));
    let t = Instant::now();
    gw.signal(libc::SIGTERM);
    // Still carrying traffic while the gateway drains.
    thread::sleep(Duration::from_millis(300));
    round_trip(&mut ws, Message::Text("during the drain".into()));
    let (_, err) = read_until_closed(&mut ws);
    let closed_after = t.elapsed();
    assert!(
        !matches!(err, WsError::Io(ref e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the tunnel outlived the drain"
    );
    assert!(
        closed_after >= Duration::from_millis(1200) && closed_after < Duration::from_secs(5),
        "closed {closed_after:?} after SIGTERM, expected at the 1.5 s deadline"
    );
    let status = gw
        .wait_exit(Duration::from_secs(5))
        .expect("the gateway exits");
    assert!(status.success(), "exit status {status}");
    // Cut at the deadline, the tunnel still ends through its own path: its access-log
    // line (the 101 and the bytes it carried) and its close reason are written before
    // the exit.
    let log = gw.access_log();
    let line = log
        .lines()
        .find(|l| l.contains("\"GET /ws"))
        .unwrap_or_else(|| panic!("the cut tunnel is not logged:\n{log}"));
    let bytes: u64 = line
        .split("HTTP/1.1\" 101 ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("not a 101 with its bytes: {line}"));
    assert!(bytes > 0, "{line}");
    wait_logged_reason(&gw, "drain");
}

#[test]
fn malformed_handshakes_are_refused_before_the_origin() {
    let (origin, accepts) = {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let accepts = Arc::new(AtomicUsize::new(0));
        let counter = accepts.clone();
        thread::spawn(move || {
            for s in listener.incoming().flatten() {
                counter.fetch_add(1, Ordering::SeqCst);
                drop(s);
            }
        });
        (addr, accepts)
    };
    let gw = gateway(origin, "5s");
    let ask = |extra: &str| {
        let req = format!(
            "GET /ws HTTP/1.1\r\nHost: gw\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n{extra}\r\n"
        );
        gateway_tests::client::raw_request(gw.http_addr(), req.as_bytes())
            .1
            .expect("a response")
    };
    // No key, a key of the wrong length, two keys: 400.
    for extra in [
        "Sec-WebSocket-Version: 13\r\n",
        "Sec-WebSocket-Key: c2hvcnQ=\r\nSec-WebSocket-Version: 13\r\n",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n",
    ] {
        let resp = ask(extra);
        assert_eq!(resp.status, 400, "{extra:?}");
    }
    // A version other than 13: 426 naming the one we speak (RFC 6455 §4.4).
    let resp = ask("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n");
    assert_eq!(resp.status, 426);
    assert_eq!(resp.header("sec-websocket-version"), Some("13"));
    assert_eq!(
        accepts.load(Ordering::SeqCst),
        0,
        "nothing reached the origin"
    );
}

/// Descriptors the gateway process holds open.
fn open_fds(gw: &Gateway) -> usize {
    std::fs::read_dir(format!("/proc/{}/fd", gw.pid()))
        .map(|d| d.count())
        .unwrap_or(usize::MAX)
}

/// Client connections open on every listener (`gateway_connections_active`).
fn connections_active(gw: &Gateway) -> f64 {
    let body = gw.admin_get("/metrics").body_str();
    body.lines()
        .filter(|l| l.starts_with("gateway_connections_active{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Spliced tunnels hold six descriptors (client, upstream, two pipes) against the two the
/// connection cap counts; pipes have a budget of their own that the default
/// `max_connections` leaves free. One client opening tunnels up to `max_connections` must
/// leave the gateway serving (or refusing at the cap, never for descriptors), and once the
/// tunnels close the idle pipes left fit the budget, so plain connections up to the cap
/// are all served again.
#[test]
fn tunnels_up_to_max_connections_leave_descriptors_for_everyone() {
    // (512 − 128 fixed − 96 for pipes) / 2; the pipe budget is 96 descriptors, 24 pipes a
    // worker: 12 spliced tunnels per worker, the rest copy.
    tunnels_fill_the_cap(None, 144, 96);
}

/// An explicit `max_connections` that leaves no room for pipes, (512 − 128) / 2: the pipe
/// budget is 0 and every tunnel copies, within the descriptors the cap counts on.
#[test]
fn explicit_max_connections_without_room_for_pipes_copies() {
    tunnels_fill_the_cap(Some(192), 192, 0);
}

/// At `nofile` 512 with two workers, one client opens tunnels up to `max` (`explicit`, or
/// the default) and the checks of the tests above run; `pipe_fds` is the pipe budget.
fn tunnels_fill_the_cap(explicit: Option<usize>, max: usize, pipe_fds: usize) {
    const NOFILE: u64 = 512;
    let ws_origin = WsOrigin::start();
    let plain = Origin::named("plain");
    let mut config = Config::new();
    if let Some(n) = explicit {
        config = config.server_raw("max_connections", &n.to_string());
    }
    let gw = Gateway::with_nofile(
        &config
            .workers(2)
            .log("level", "info,gateway::dataplane::conn::tunnel=debug")
            .upstream(Upstream::new("ws", &[ws_origin.addr]))
            .upstream(Upstream::new("plain", &[plain.addr()]))
            .route(
                Route::prefix("/ws", "ws")
                    .websocket(true)
                    .read_timeout("60s"),
            )
            .route(Route::prefix("/", "plain")),
        NOFILE,
    );
    let refusals = |reason: &str| {
        metric(
            &gw,
            &format!("gateway_local_refusals_total{{reason=\"{reason}\"}}"),
        )
    };
    assert_eq!(gw.get("/").status, 200);
    let baseline = open_fds(&gw);

    let mut tunnels: Vec<Ws> = (0..max - 1)
        .map(|i| {
            let mut ws = connect(&gw);
            round_trip(&mut ws, Message::Binary(pattern(100 + i, i as u8)));
            ws
        })
        .collect();
    // Another client takes the last slot and is served.
    let mut other = gw.client();
    other.set_read_timeout(Duration::from_secs(5));
    other.send(&Req::get("/other").to_bytes()).unwrap();
    assert_eq!(other.read_response().unwrap().status, 200);
    // Past the cap: refused for the cap, not for descriptors.
    for _ in 0..3 {
        let mut c = gw.client();
        c.set_read_timeout(Duration::from_secs(5));
        let served = c
            .send(&Req::get("/over").to_bytes())
            .and_then(|()| c.read_response());
        assert!(served.is_err(), "a connection past max_connections served");
    }
    assert_eq!(refusals("max_connections"), 3.0);
    assert_eq!(
        refusals("fd_reserve"),
        0.0,
        "connections refused for descriptors"
    );
    assert_eq!(
        refusals("upstream_local"),
        0.0,
        "upstream connects without a descriptor"
    );
    assert_eq!(
        gateway_tests::gateway::admin_status(gw.admin_addr(), "/healthz"),
        Some(200)
    );
    // Every tunnel still moves bytes.
    for (i, ws) in tunnels.iter_mut().enumerate() {
        round_trip(ws, Message::Binary(pattern(50 + i, 7)));
    }
    assert!(
        open_fds(&gw) + 64 <= NOFILE as usize,
        "{} descriptors open at the cap: into the reserve",
        open_fds(&gw)
    );

    drop(other);
    for ws in &mut tunnels {
        ws.close(None).unwrap();
    }
    for ws in &mut tunnels {
        let _ = read_until_closed(ws);
    }
    drop(tunnels);
    wait_until(Duration::from_secs(10), "every connection to close", || {
        metric(&gw, "gateway_websocket_tunnels_active") == 0.0 && connections_active(&gw) == 0.0
    });
    // Idle pipes stay cached, within their budget; nothing else is left behind.
    wait_until(
        Duration::from_secs(5),
        "descriptors back near the baseline",
        || open_fds(&gw) <= baseline + pipe_fds + 8,
    );
    let (splice, copy) = logged_paths(&gw);
    assert_eq!(splice + copy, max - 1, "tunnels logged closed");
    assert!(
        splice <= pipe_fds / 4,
        "{splice} tunnels spliced: the pipe budget allows {}",
        pipe_fds / 4
    );
    if expected(1) == (1, 0) && pipe_fds > 0 {
        assert!(
            splice >= 1,
            "no tunnel spliced within a pipe budget of {pipe_fds}"
        );
    }

    // Plain connections up to the cap are all served after the tunnels.
    let held: Vec<_> = (0..max)
        .map(|i| {
            let mut c = gw.client();
            c.set_read_timeout(Duration::from_secs(5));
            c.send(&Req::get(&format!("/after/{i}")).to_bytes())
                .unwrap();
            let r = c
                .read_response()
                .unwrap_or_else(|e| panic!("plain connection {i} after the tunnels: {e}"));
            assert_eq!(r.status, 200, "plain connection {i} after the tunnels");
            c
        })
        .collect();
    assert_eq!(held.len(), max);
    assert_eq!(refusals("fd_reserve"), 0.0);
    assert_eq!(refusals("upstream_local"), 0.0);
}
