//! Upstream trouble as the client sees it: refused → 502, bad HTTP → 502, reset mid-body →
//! a visibly truncated response (never a clean end, never a hang), stalled past
//! `read_timeout` → 504 in bounded time, and the worker keeps serving others meanwhile.
//! Error bodies are short plain text and leak nothing internal.

use std::thread;
use std::time::{Duration, Instant};

use gateway_tests::{
    refused_addr, Client, Config, Gateway, Origin, Reply, Req, Response, Route, Upstream,
};

/// One upstream server. These tests are about how each failing request is answered, so
/// passive health is kept out of the way (a high `max_fails`): every request here reaches
/// the server. (Marking down is tested in balancing.rs.)
fn single(origin_addr: std::net::SocketAddr, read_timeout: &str) -> Gateway {
    Gateway::with(
        &Config::new()
            .upstream(Upstream::new("app", &[origin_addr]).max_fails(1000))
            .route(Route::prefix("/", "app").read_timeout(read_timeout)),
    )
}

/// The contract: "Short plain-text bodies; nothing internal leaks."
fn assert_clean_error(r: &Response, status: u16, upstream: std::net::SocketAddr) {
    assert_eq!(r.status, status, "body: {:?}", r.body_str());
    assert!(
        r.body.len() < 512,
        "error body is not short: {} bytes",
        r.body.len()
    );
    if let Some(ct) = r.header("content-type") {
        assert!(
            ct.starts_with("text/plain"),
            "error body content-type {ct:?}"
        );
    }
    let body = r.body_str();
    assert!(
        !body.contains(&upstream.to_string()) && !body.contains(&upstream.port().to_string()),
        "the error body leaks the upstream address: {body:?}"
    );
}

#[test]
fn refused_upstream_gives_502() {
    let dead = refused_addr();
    let gw = single(dead, "5s");
    let r = gw.get("/x");
    assert_clean_error(&r, 502, dead);
}

#[test]
fn garbage_instead_of_a_status_line_gives_502() {
    let origin = Origin::start(|_| Reply::raw("SSH-2.0-OpenSSH_9.2\r\nnot http at all\r\n\r\n"));
    let gw = single(origin.addr(), "5s");
    assert_clean_error(&gw.get("/x"), 502, origin.addr());
}

#[test]
fn bad_upstream_http_gives_502() {
    // RFC 9112 §6.3: a response with an invalid Content-Length is unrecoverable; a proxy
    // must discard it and answer 502. A four-digit status code is no status line at all.
    let origin = Origin::start(|r| match r.path() {
        "/bad-length" => Reply::raw("HTTP/1.1 200 OK\r\nContent-Length: 12abc\r\n\r\nhello"),
        "/bad-status" => Reply::raw("HTTP/1.1 2000 OK\r\nContent-Length: 2\r\n\r\nhi"),
        "/two-lengths" => {
            Reply::raw("HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nhi!")
        }
        _ => Reply::ok("fine"),
    });
    let gw = single(origin.addr(), "5s");
    for path in ["/bad-length", "/bad-status", "/two-lengths"] {
        let r = gw.get(path);
        assert_eq!(r.status, 502, "{path}: {} {:?}", r.status, r.body_str());
    }
    assert_eq!(
        gw.get("/ok").body_str(),
        "fine",
        "a good request afterwards works"
    );
}

#[test]
fn upstream_closing_without_answer_gives_502() {
    let origin = Origin::start(|r| match r.path() {
        "/close" => Reply::raw(""),
        _ => Reply::ok("fine"),
    });
    let gw = single(origin.addr(), "5s");
    assert_clean_error(&gw.get("/close"), 502, origin.addr());
    assert_eq!(gw.get("/ok").body_str(), "fine");
}

/// A response cut short by an upstream reset must reach the client as cut short: an I/O
/// error or early close while reading the body, or a 502 if nothing was sent yet. Never a
/// complete-looking response, never a hang.
fn assert_truncated(result: std::io::Result<Response>, full_len: usize, what: &str) {
    match result {
        Err(_) => {}
        Ok(r) => {
            assert_eq!(
                r.status,
                502,
                "{what}: got a complete-looking {} response of {} bytes (full body is {full_len})",
                r.status,
                r.body.len()
            );
        }
    }
}

#[test]
fn reset_mid_body_truncates_the_response() {
    const SMALL: usize = 200_000;
    const LARGE: usize = 4 << 20;
    let origin = Origin::start(|r| match r.path() {
        "/reset-cl" => Reply::ok(vec![b'x'; SMALL]).reset_after(SMALL / 2),
        // Re-chunking proxies must not end the client's stream with a last-chunk here.
        "/reset-chunked" => Reply::ok(vec![b'y'; SMALL])
            .chunked(&[8192])
            .reset_after(SMALL / 2),
        // 2 MiB in: a streaming proxy has long sent the head, so the only honest signal
        // left is a body that ends early.
        "/reset-late-cl" => Reply::ok(vec![b'z'; LARGE]).reset_after(LARGE / 2),
        "/reset-late-chunked" => Reply::ok(vec![b'w'; LARGE])
            .chunked(&[65536])
            .reset_after(LARGE / 2),
        _ => Reply::ok("fine"),
    });
    let gw = single(origin.addr(), "5s");
    for (path, full) in [
        ("/reset-cl", SMALL),
        ("/reset-chunked", SMALL),
        ("/reset-late-cl", LARGE),
        ("/reset-late-chunked", LARGE),
    ] {
        let t = Instant::now();
        let mut c = gw.client();
        let result = c.request(&Req::get(path));
        assert!(
            t.elapsed() < Duration::from_secs(8),
            "{path}: took {:?}",
            t.elapsed()
        );
        let errored = result.is_err();
        if full == LARGE {
            assert!(
                errored,
                "{path}: expected a 200 whose body ends early, got {:?}",
                result.map(|r| (r.status, r.body.len()))
            );
        } else {
            assert_truncated(result, full, path);
        }
        if errored {
            // The broken response also ends the client connection.
            c.expect_closed(Duration::from_secs(3), path);
        }
        // A new request on a new connection works.
        assert_eq!(gw.get("/next").body_str(), "fine", "after {path}");
    }
}

/// A clean 504 from `upstream`, `took` after the request went out: a `read_timeout` of
/// 300 ms, not earlier, and in bounded time.
fn assert_504_after_300ms(r: &Response, took: Duration, upstream: std::net::SocketAddr) {
    assert_clean_error(r, 504, upstream);
    assert!(
        took >= Duration::from_millis(250),
        "504 after only {took:?} (read_timeout 300ms)"
    );
    assert!(
        took < Duration::from_secs(3),
        "504 took {took:?} (read_timeout 300ms)"
    );
}

#[test]
fn stalled_upstream_gives_504_after_read_timeout() {
    let origin = Origin::start(|_| Reply::stall());
    let gw = single(origin.addr(), "300ms");
    let t = Instant::now();
    let r = gw.get("/slow");
    let took = t.elapsed();
    assert_504_after_300ms(&r, took, origin.addr());
}

/// The phases of a connection share one re-armed timer (`util::clock::PhaseTimer`): a
/// deadline earlier than the one left armed by the request before (60 s `read_timeout`,
/// then a 300 ms one on the same connection) must still fire on time, and a fast request
/// after a timed-out one on another connection must not see a stale deadline.
#[test]
fn read_timeout_fires_on_a_kept_alive_connection_after_fast_requests() {
    let origin = Origin::start(|r| {
        if r.target.starts_with("/stall") {
            Reply::stall()
        } else {
            Reply::ok(r.target.clone())
        }
    });
    let gw = Gateway::with(
        &Config::new()
            .workers(1)
            .upstream(Upstream::new("app", &[origin.addr()]).max_fails(1000))
            .route(Route::prefix("/stall", "app").read_timeout("300ms"))
            .route(Route::prefix("/", "app")),
    );
    let mut c = gw.client();
    c.set_read_timeout(Duration::from_secs(10));
    for i in 0..3 {
        let path = format!("/fast/{i}");
        let r = c.get(&path);
        assert_eq!(
            r.body_str(),
            path,
            "fast request {i} on the kept-alive connection"
        );
    }
    let t = Instant::now();
    let r = c.get("/stall");
    let took = t.elapsed();
    assert_504_after_300ms(&r, took, origin.addr());
    // A new connection is served normally afterwards (no timer left firing at it).
    let mut next = gw.client();
    next.set_read_timeout(Duration::from_secs(10));
    for i in 0..3 {
        let path = format!("/after/{i}");
        assert_eq!(next.get(&path).body_str(), path);
        thread::sleep(Duration::from_millis(150));
    }
}

#[test]
fn black_hole_upstream_gives_504() {
    // Accepts the connection and never reads: the request may sit in socket buffers, and
    // the answer never comes.
    let hole = Origin::black_hole();
    let gw = single(hole.addr(), "300ms");
    let t = Instant::now();
    let r = gw.get("/void");
    assert_eq!(r.status, 504);
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "504 took {:?}",
        t.elapsed()
    );
}

#[test]
fn worker_keeps_serving_while_an_upstream_stalls() {
    // One worker, so the stalled request and the others share it.
    let stall = Origin::start(|_| Reply::stall());
    let fast = Origin::start(|r| Reply::ok(r.target.clone()));
    let gw = Gateway::with(
        &Config::new()
            .workers(1)
            .upstream(Upstream::new("stall", &[stall.addr()]))
            .upstream(Upstream::new("fast", &[fast.addr()]))
            .route(Route::prefix("/stall", "stall").read_timeout("3s"))
            .route(Route::prefix("/", "fast")),
    );
    let addr = gw.http_addr();
    let stalled = thread::spawn(move || {
        let t = Instant::now();
        let r = Client::connect(addr).get("/stall");
        (r.status, t.elapsed())
    });
    stall.wait_requests(1, Duration::from_secs(5));
    let t = Instant::now();
    for i in 0..20 {
        let one = Instant::now();
        let r = gw.get(&format!("/f/{i}"));
        assert_eq!(r.body_str(), format!("/f/{i}"));
        assert!(
            one.elapsed() < Duration::from_secs(1),
            "request {i} took {:?}",
            one.elapsed()
        );
    }
    assert!(
        t.elapsed() < Duration::from_millis(2500),
        "20 requests took {:?} while an upstream stalled",
        t.elapsed()
    );
    let (status, took) = stalled.join().unwrap();
    assert_eq!(status, 504);
    assert!(
        took >= Duration::from_millis(2500),
        "stalled request answered after {took:?}"
    );
}

#[test]
fn client_going_away_releases_the_upstream_connection() {
    // "A client or upstream that goes away mid-request frees everything it held."
    let stall = Origin::start(|_| Reply::stall());
    let gw = single(stall.addr(), "60s");
    {
        let mut c = gw.client();
        c.send(&Req::get("/wait").to_bytes()).unwrap();
        stall.wait_requests(1, Duration::from_secs(5));
        assert_eq!(stall.active(), 1);
    } // client closes here
    gateway_tests::wait_until(
        Duration::from_secs(5),
        "the gateway to close the upstream connection of a departed client",
        || stall.active() == 0,
    );
}

/// Two servers that each close after every response (so each request needs a fresh
/// `connect()`), behind `max_fails = 1`: one failure booked to a server would mark it down.
fn fragile_pair() -> (Origin, Origin, Upstream) {
    let a = Origin::start(|_| Reply::ok("a").close());
    let b = Origin::start(|_| Reply::ok("b").close());
    let up = Upstream::new("app", &[a.addr(), b.addr()])
        .max_fails(1)
        .fail_timeout("60s");
    (a, b, up)
}

/// After the pressure is gone, every request is served at once, by both servers: none was
/// marked down.
fn assert_both_servers_serve(gw: &Gateway, context: &str) {
    let mut seen = std::collections::BTreeSet::new();
    for i in 0..12 {
        let r = gw.get(&format!("/after/{i}"));
        assert_eq!(
            r.status, 200,
            "{context}: request {i} after recovery: {}",
            r.status
        );
        seen.insert(r.body_str());
    }
    assert_eq!(
        seen.len(),
        2,
        "{context}: a server was marked down (only {seen:?} answered)"
    );
}

/// Opens a connection and sends one GET on it: the response, with the connection to hold.
fn hold(gw: &Gateway, i: usize) -> std::io::Result<(Client, Response)> {
    let mut c = gw.client();
    c.set_read_timeout(Duration::from_secs(5));
    c.send(&Req::get(&format!("/hold/{i}")).to_bytes())?;
    let r = c.read_response()?;
    Ok((c, r))
}

/// Waits until the gateway has seen the held clients go and closed their descriptors
/// (it learns of each hang-up asynchronously), so what follows measures recovery, not
/// the race with those closes.
fn wait_released(gw: &Gateway) {
    let fds = || {
        std::fs::read_dir(format!("/proc/{}/fd", gw.pid()))
            .map(|d| d.count())
            .unwrap_or(usize::MAX)
    };
    // Both: the descriptors closed, and the connection count that `max_connections`
    // checks back to zero (a closed descriptor can precede its task's end).
    let connections =
        || gateway_tests::control::scrape(gw.admin_addr()).sum("gateway_connections_active", &[]);
    gateway_tests::wait_until(
        Duration::from_secs(5),
        "the gateway to close the connections of departed clients",
        || fds() < 96 && connections() == 0.0,
    );
}

fn local_refusals(gw: &Gateway, reason: &str) -> f64 {
    gateway_tests::control::scrape(gw.admin_addr())
        .get("gateway_local_refusals_total", &[("reason", reason)])
        .unwrap_or(0.0)
}

/// Issue 17.1: descriptors run out while clients hold connections. The gateway must book
/// that to itself (500 for the request whose connect could not get a descriptor, or the
/// new connection closed at accept), never to the upstream servers; `/healthz` answers
/// throughout, and service is normal again as soon as the clients leave.
#[test]
fn descriptor_exhaustion_marks_no_server_down() {
    let (_a, _b, up) = fragile_pair();
    let gw = Gateway::with_nofile(
        &Config::new()
            .workers(1)
            // Explicit and high: the descriptor limit, not the connection cap, is what is hit.
            .server_raw("max_connections", "10000")
            // Held clients stay for the whole test, so no descriptor frees up: the request
            // that finds none waits out its short connect_timeout, then gets the 500.
            .server("keepalive_timeout", "60s")
            .upstream(up)
            .route(Route::prefix("/", "app").connect_timeout("200ms")),
        256,
    );
    let mut held = Vec::new();
    let (mut served, mut internal, mut closed) = (0, 0, 0);
    for i in 0..400 {
        match hold(&gw, i) {
            Ok((c, r)) if r.status == 200 => {
                served += 1;
                held.push(c);
            }
            Ok((_, r)) => {
                assert_eq!(
                    r.status,
                    500,
                    "request {i} under descriptor exhaustion: {} {:?}",
                    r.status,
                    r.body_str()
                );
                internal += 1;
                break;
            }
            Err(_) => {
                closed += 1;
                break;
            }
        }
    }
    assert!(
        served > 50 && internal + closed == 1,
        "expected the descriptor limit to be reached: {served} served, {internal} answered 500, {closed} closed"
    );
    // The admin listener still has descriptors while the data plane is out of them.
    assert_eq!(
        gateway_tests::gateway::admin_status(gw.admin_addr(), "/healthz"),
        Some(200),
        "/healthz under descriptor exhaustion"
    );
    assert!(local_refusals(&gw, "upstream_local") + local_refusals(&gw, "fd_reserve") >= 1.0);
    drop(held);
    wait_released(&gw);
    assert_both_servers_serve(&gw, "after descriptor exhaustion");
}

/// With `max_connections` unset it is derived from RLIMIT_NOFILE, so the connection cap
/// fires long before the descriptors run out; refusals are counted.
#[test]
fn default_max_connections_fires_before_descriptors_run_out() {
    let (_a, _b, up) = fragile_pair();
    // 256 descriptors: 128 past the fixed reserve (2 × 64), a quarter of them for tunnel
    // pipes, (128 − 32) / 2 = 48 connections.
    let gw = Gateway::with_nofile(
        &Config::new()
            .workers(1)
            .upstream(up)
            .route(Route::prefix("/", "app")),
        256,
    );
    let mut held = Vec::new();
    let mut refused = 0;
    for i in 0..80 {
        match hold(&gw, i) {
            Ok((c, r)) => {
                assert_eq!(r.status, 200, "request {i}");
                held.push(c);
            }
            Err(_) => refused += 1,
        }
    }
    assert_eq!(held.len(), 48, "connections served under the derived cap");
    assert_eq!(refused, 32);
    assert_eq!(
        gateway_tests::gateway::admin_status(gw.admin_addr(), "/healthz"),
        Some(200)
    );
    assert_eq!(local_refusals(&gw, "max_connections"), 32.0);
    drop(held);
    wait_released(&gw);
    assert_both_servers_serve(&gw, "after the connection cap");
}

/// Issue 17.2: a response refused for a limit of the gateway's own (too many header fields,
/// a head over the size limit) is a 502 for that request only: a client asking for such
/// responses on purpose must not take the servers down.
#[test]
fn refused_responses_never_mark_servers_down() {
    fn handler(name: &'static str) -> impl Fn(&gateway_tests::RecordedRequest) -> Reply {
        move |r| match r.path() {
            "/many" => (0..300).fold(Reply::ok(name), |reply, i| {
                reply.header(&format!("X-Reflect-{i}"), "v")
            }),
            "/huge" => Reply::ok(name).header("X-Huge", &"h".repeat(100 * 1024)),
            _ => Reply::ok(name),
        }
    }
    let a = Origin::start(handler("a"));
    let b = Origin::start(handler("b"));
    let gw = Gateway::with(
        &Config::new()
            .upstream(
                Upstream::new("app", &[a.addr(), b.addr()])
                    .max_fails(1)
                    .fail_timeout("60s"),
            )
            .route(Route::prefix("/", "app")),
    );
    for path in ["/many", "/huge", "/many", "/huge"] {
        let r = gw.get(path);
        // Relayed or refused, but never booked to the server.
        assert!(
            r.status == 200 || r.status == 502,
            "{path}: {} {:?}",
            r.status,
            r.body_str()
        );
    }
    assert_eq!(
        gw.get("/huge").status,
        502,
        "a 100 KiB response head is refused"
    );
    assert_both_servers_serve(&gw, "after refused responses");
}

/// Issue 10.5: a body within `request_buffering` is read whole before any upstream is
/// connected, so a client that trickles its body holds nothing upstream.
#[test]
fn small_body_is_read_whole_before_the_upstream_is_connected() {
    let origin = Origin::echo();
    let gw = single(origin.addr(), "5s");
    let body = vec![b'q'; 3000];
    let mut c = gw.client();
    c.set_read_timeout(Duration::from_secs(5));
    let head = format!(
        "POST /upload HTTP/1.1\r\nHost: app\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    c.send(head.as_bytes()).unwrap();
    c.send(&body[..1000]).unwrap();
    thread::sleep(Duration::from_millis(300));
    c.send(&body[1000..2999]).unwrap();
    thread::sleep(Duration::from_millis(300));
    assert_eq!(
        origin.accepts(),
        0,
        "the upstream was connected before the body was complete"
    );
    c.send(&body[2999..]).unwrap();
    let r = c.read_response().unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.body, body, "the whole body reached the upstream");
    assert_eq!(origin.accepts(), 1);
}

/// Issue 10.5: a body larger than `request_buffering` streams, under a minimum rate after
/// `client_body_timeout`. A trickling client gets 408 and the upstream sees its connection
/// closed (not kept, not pooled).
#[test]
fn slow_body_gets_408_and_frees_the_upstream_connection() {
    let origin = Origin::echo();
    let gw = Gateway::with(
        &Config::new()
            .server("request_buffering", "1KiB")
            .server("client_body_timeout", "1s")
            .server("client_min_rate", "1KiB")
            .upstream(Upstream::new("app", &[origin.addr()]).max_fails(1))
            .route(Route::prefix("/", "app")),
    );
    let mut c = gw.client();
    c.set_read_timeout(Duration::from_secs(10));
    c.send(b"POST /slow HTTP/1.1\r\nHost: app\r\nContent-Length: 100000\r\n\r\n")
        .unwrap();
    c.send(&[b'x'; 2048]).unwrap();
    gateway_tests::wait_until(
        Duration::from_secs(5),
        "the upstream to be connected once the buffered part arrived",
        || origin.active() == 1,
    );
    let started = Instant::now();
    let writer = {
        let mut s = c.stream().try_clone().unwrap();
        thread::spawn(move || {
            use std::io::Write;
            // 10 bytes every 100 ms: 100 B/s, far under the 1 KiB/s minimum.
            for _ in 0..100 {
                if s.write_all(&[b'y'; 10]).is_err() {
                    return;
                }
                thread::sleep(Duration::from_millis(100));
            }
        })
    };
    let r = c.read_response().expect("a 408 response");
    assert_eq!(r.status, 408, "{:?}", r.body_str());
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "408 only after {:?}",
        started.elapsed()
    );
    gateway_tests::wait_until(
        Duration::from_secs(3),
        "the upstream connection of the slow body to be closed",
        || origin.active() == 0,
    );
    drop(c);
    writer.join().unwrap();
    assert_eq!(
        gw.get("/after").status,
        200,
        "the server is not marked down"
    );
}

/// Issue 17.9: an error answered before the request was read (413 on Content-Length) is
/// followed by a lingering close, so a client still sending its body reads the 413 rather
/// than losing it to an RST. On loopback an RST does not destroy a response already
/// delivered, so what is asserted is the RST itself: the client's body is taken and
/// discarded (its writes succeed) and the connection ends with a FIN, not a reset.
#[test]
fn lingering_close_lets_the_client_read_a_413() {
    let origin = Origin::echo();
    let gw = Gateway::with(
        &Config::new()
            .upstream(Upstream::new("app", &[origin.addr()]))
            .route(Route::prefix("/", "app").max_body_size("1KiB")),
    );
    for round in 0..3 {
        let mut c = gw.client();
        c.set_read_timeout(Duration::from_secs(10));
        c.send(b"POST /big HTTP/1.1\r\nHost: app\r\nContent-Length: 8000000\r\n\r\n")
            .unwrap();
        let writer = {
            let mut s = c.stream().try_clone().unwrap();
            thread::spawn(move || {
                use std::io::Write;
                let chunk = vec![b'z'; 64 * 1024];
                for _ in 0..64 {
                    s.write_all(&chunk)?;
                }
                std::io::Result::Ok(())
            })
        };
        // Let the client's body run into the gateway after the 413 went out.
        let written = writer.join().unwrap();
        let r = c
            .read_response()
            .unwrap_or_else(|e| panic!("round {round}: the 413 was lost: {e}"));
        assert_eq!(r.status, 413, "round {round}");
        assert!(
            written.is_ok(),
            "round {round}: the body was refused with a reset: {written:?}"
        );
        let (outcome, _) = c.wait_closed(Duration::from_secs(3));
        assert_eq!(
            outcome,
            gateway_tests::CloseOutcome::Eof,
            "round {round}: the connection did not end with a FIN"
        );
    }
    assert_eq!(
        origin.accepts(),
        0,
        "a refused body never reaches the upstream"
    );
}

/// Issue 10.5, responses: a client that takes a large response more slowly than
/// `client_min_rate` (while each write still completes within `send_timeout`, which alone
/// never cut it off) is disconnected, and the upstream connection is closed with it.
#[test]
fn slow_reader_is_cut_off_and_frees_the_upstream_connection() {
    const BIG: usize = 64 << 20;
    let origin = Origin::start(|_| Reply::ok(vec![b'r'; BIG]));
    let gw = Gateway::with(
        &Config::new()
            .server("client_min_rate", "4MiB")
            .upstream(Upstream::new("app", &[origin.addr()]))
            .route(Route::prefix("/", "app").send_timeout("1s")),
    );
    // A small receive buffer, set before connecting so the kernel does not grow it: what
    // the gateway can park in socket buffers stays small next to the response.
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(64 * 1024).unwrap();
    socket.connect(&gw.http_addr().into()).unwrap();
    let mut stream: std::net::TcpStream = socket.into();
    {
        use std::io::Write;
        stream
            .write_all(b"GET /big HTTP/1.1\r\nHost: app\r\n\r\n")
            .unwrap();
    }
    origin.wait_requests(1, Duration::from_secs(5));
    let started = Instant::now();
    let mut got = 0usize;
    let mut buf = vec![0u8; 16 * 1024];
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    // 16 KiB every 50 ms: about 320 KiB/s, far under the 4 MiB/s minimum, yet no single
    // write of the gateway waits anywhere near send_timeout. Read until the gateway has
    // given up on this client and closed the upstream connection (what it had already
    // written may still sit in socket buffers).
    while origin.active() > 0 {
        use std::io::Read;
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "a slow reader is still served after {:?} ({got} bytes)",
            started.elapsed()
        );
        thread::sleep(Duration::from_millis(50));
    }
    assert!(
        got < BIG,
        "the whole response was delivered to a slow reader"
    );
    gateway_tests::wait_until(
        Duration::from_secs(3),
        "the upstream connection of the slow reader to be closed",
        || origin.active() == 0,
    );
    // Closed with RST, the unsent rest dropped: a plain close would leave megabytes queued
    // in the kernel, an orphan for as long as this client keeps its window shut
    // (attack12 F3.5; nginx's `reset_timedout_connection`).
    let end = loop {
        use std::io::Read;
        match stream.read(&mut buf) {
            Ok(0) => break Ok(()),
            Ok(_) => continue,
            Err(e) => break Err(e.kind()),
        }
    };
    assert_eq!(
        end,
        Err(std::io::ErrorKind::ConnectionReset),
        "the cut-off slow reader was closed with FIN, its queued response kept"
    );
    let m = gateway_tests::control::scrape(gw.admin_addr());
    assert!(
        m.get("gateway_local_refusals_total", &[("reason", "slow_client")])
            .unwrap_or(0.0)
            >= 1.0
    );
}

/// An upstream that streams slowly (an event stream: one byte every 300 ms, 2.4 s in all,
/// far under `client_min_rate`) to a client that takes every byte at once is relayed whole,
/// on both drivers: the client's rate counts only the time the gateway waited on the client,
/// never the time it waited on the upstream. Before, the io_uring driver (whose writes
/// always wait a turn) cut the stream once `send_timeout` had passed and booked it as a slow
/// client (attack12 F1).
#[test]
fn a_slow_upstream_stream_reaches_a_client_that_keeps_up() {
    use std::io::{Read, Write};
    const BODY: &[u8] = b"stream!!";
    let origin = Origin::start(|_| Reply::ok(BODY).trickle(Duration::from_millis(300)));
    let gw = Gateway::with(
        &Config::new()
            .server("client_min_rate", "1KiB")
            .upstream(Upstream::new("app", &[origin.addr()]))
            .route(Route::prefix("/", "app").send_timeout("1s")),
    );
    let mut stream = std::net::TcpStream::connect(gw.http_addr()).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
        .write_all(b"GET /events HTTP/1.1\r\nHost: app\r\n\r\n")
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !got.ends_with(BODY) {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    let text = String::from_utf8_lossy(&got);
    assert!(
        text.starts_with("HTTP/1.1 200") && got.ends_with(BODY),
        "the slow stream was cut: {text:?}"
    );
    let m = gateway_tests::control::scrape(gw.admin_addr());
    assert_eq!(
        m.get("gateway_local_refusals_total", &[("reason", "slow_client")])
            .unwrap_or(0.0),
        0.0,
        "a client that kept up was booked as slow"
    );
}

/// Diagnostic lines the gateway dropped because its stderr reader did not keep up.
fn log_lines_dropped(gw: &Gateway) -> f64 {
    gateway_tests::control::scrape(gw.admin_addr())
        .get("gateway_log_lines_dropped_total", &[])
        .expect("gateway_log_lines_dropped_total")
}

#[test]
fn a_stalled_stderr_reader_stops_neither_the_data_plane_nor_the_drain() {
    // stderr is a FIFO nobody reads (a stuck journald or log shipper): once its 64 KiB are
    // full, a write(2) to it blocks forever. Every failed request logs (at debug level, one
    // line or more each; the connect-failed warning besides, rate-limited): the workers and
    // the drain must go on, and the lines that do not fit are dropped and counted.
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("stderr.fifo");
    let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: mkfifo with a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
    let config = Config::new()
        .upstream(Upstream::new("app", &[refused_addr()]).max_fails(1000))
        .route(Route::prefix("/", "app"))
        .log("level", "debug")
        .server("graceful_timeout", "3s");
    let mut gw = Gateway::with_stderr(&config, &fifo);
    let mut answered = 0;
    // 2000 requests at least, and on until the log has visibly overflowed (bounded).
    while answered < 2000 || (log_lines_dropped(&gw) == 0.0 && answered < 20_000) {
        let r = Client::connect(gw.http_addr())
            .request(&Req::get("/x"))
            .unwrap_or_else(|e| panic!("request #{answered} unanswered: {e}"));
        assert!(
            matches!(r.status, 502 | 503),
            "request #{answered}: {}",
            r.status
        );
        answered += 1;
    }
    assert!(
        log_lines_dropped(&gw) > 0.0,
        "{answered} failed requests never filled the stderr pipe: the test proves nothing"
    );
    assert_eq!(
        gateway_tests::gateway::admin_status(gw.admin_addr(), "/healthz"),
        Some(200)
    );
    let t0 = Instant::now();
    gw.signal(libc::SIGTERM);
    let status = gw
        .wait_exit(Duration::from_secs(5))
        .expect("SIGTERM ends the gateway within graceful_timeout");
    assert_eq!(status.code(), Some(0), "{status}");
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
}
