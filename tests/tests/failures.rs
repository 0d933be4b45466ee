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

#[test]
fn stalled_upstream_gives_504_after_read_timeout() {
    let origin = Origin::start(|_| Reply::stall());
    let gw = single(origin.addr(), "300ms");
    let t = Instant::now();
    let r = gw.get("/slow");
    let took = t.elapsed();
    assert_clean_error(&r, 504, origin.addr());
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
