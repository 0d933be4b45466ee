//! Hostile and malformed client input. Every request-smuggling shape in the contract is
//! answered 400 and the connection closed, before anything reaches the origin; heads over
//! `max_header_bytes` get 431 (414 when the request line alone is too long); bodies over
//! `max_body_size` get 413; a head trickled slower than `header_timeout` ends in 408 or a
//! close; unrouted paths get 404; `respond` routes answer without an upstream.
//!
//! Contract reading for transfer codings (PRODUCT.md: "a transfer coding other than a final
//! `chunked` ... is rejected with 400", and "501 unsupported transfer coding"), following
//! RFC 9112:
//! - the final coding is not `chunked` (`gzip`, `identity`, `chunked, gzip`): the body length
//!   cannot be determined, RFC 9112 §6.3 rule 4 says the server MUST answer 400 and close →
//!   **400** (the smuggling rule);
//! - `chunked` is final but preceded by a coding the proxy does not implement
//!   (`gzip, chunked`): the framing is known but the coding is not understood, RFC 9112 §6.1
//!   says SHOULD answer 501 → **501** (the "unsupported transfer coding" status).
//!
//! This is the only reading under which both statuses in the contract can occur.

use std::io::Write;
use std::thread;
use std::time::{Duration, Instant};

use gateway_tests::client::raw_request;
use gateway_tests::{Client, Config, Gateway, Origin, Req, Route, Upstream};

fn guarded(origin: &Origin) -> Gateway {
    Gateway::with(
        &Config::new()
            .server("max_header_bytes", "4KiB")
            .server("header_timeout", "500ms")
            .upstream(Upstream::new("app", &[origin.addr()]))
            .route(Route::respond_exact("/health", 200, "ok\n"))
            .route(Route::prefix("/", "app").max_body_size("1KiB")),
    )
}

/// Sends `raw` on a new connection; expects `status` and, when `closes`, the connection
/// closed right after the response.
fn expect_status(gw: &Gateway, case: &str, raw: &[u8], status: u16, closes: bool) {
    let (mut c, r) = raw_request(gw.http_addr(), raw);
    let r = r.unwrap_or_else(|e| panic!("{case}: no response: {e}"));
    assert_eq!(
        r.status,
        status,
        "{case}: got {} {:?}",
        r.status,
        r.body_str()
    );
    if closes {
        c.expect_closed(Duration::from_secs(3), case);
    }
}

const SMUGGLING: &[(&str, &str)] = &[
    (
        "Content-Length and Transfer-Encoding",
        "POST /s HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    ),
    (
        "Transfer-Encoding and Content-Length",
        "POST /s HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
    ),
    (
        "two different Content-Length fields",
        "POST /s HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    ),
    (
        "Content-Length list of different values",
        "POST /s HTTP/1.1\r\nHost: t\r\nContent-Length: 5, 6\r\n\r\nhello!",
    ),
    (
        "non-numeric Content-Length",
        "POST /s HTTP/1.1\r\nHost: t\r\nContent-Length: 5x\r\n\r\nhello",
    ),
    (
        "negative Content-Length",
        "POST /s HTTP/1.1\r\nHost: t\r\nContent-Length: -1\r\n\r\nhello",
    ),
    (
        "Transfer-Encoding gzip (final coding not chunked)",
        "POST /s HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip\r\n\r\nhello",
    ),
    (
        "Transfer-Encoding identity (final coding not chunked)",
        "POST /s HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: identity\r\n\r\nhello",
    ),
    (
        "Transfer-Encoding chunked, gzip (chunked not final)",
        "POST /s HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n",
    ),
    (
        "Transfer-Encoding chunked then gzip in two fields",
        "POST /s HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: gzip\r\n\r\n0\r\n\r\n",
    ),
    (
        "non-hex chunk size",
        "POST /s HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
    ),
    (
        "negative chunk size",
        "POST /s HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n-5\r\nhello\r\n0\r\n\r\n",
    ),
    (
        "overflowing chunk size",
        "POST /s HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n10000000000000005\r\nhello\r\n0\r\n\r\n",
    ),
    (
        "chunk size with 0x prefix",
        "POST /s HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n0\r\n\r\n",
    ),
    (
        "chunk data longer than its size",
        "POST /s HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nhello\r\n0\r\n\r\n",
    ),
    (
        "chunk size followed by text after whitespace",
        "POST /s HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5 junk\r\nhello\r\n0\r\n\r\n",
    ),
    (
        "chunk-size line ended by a bare LF",
        "POST /s HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n",
    ),
    (
        "chunk extension holding a bare LF",
        "POST /s HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5;x\ny\r\nhello\r\n0\r\n\r\n",
    ),
    (
        "last chunk followed by a bare LF, then a request",
        "POST /s HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\nGET /smuggled HTTP/1.1\r\nHost: t\r\n\r\n",
    ),
    (
        "trailer line ended by a bare LF",
        "POST /s HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX-T: 1\n\r\n",
    ),
    (
        "trailer line that is not a field",
        "POST /s HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nGET /smuggled HTTP/1.1\r\n\r\n",
    ),
    (
        "trailer standing in for a field the gateway writes",
        "POST /s HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX-Forwarded-For: 127.0.0.1\r\n\r\n",
    ),
    (
        "trailer carrying Content-Length",
        "POST /s HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nContent-Length: 40\r\n\r\n",
    ),
    (
        "request line ended by a bare LF",
        "GET /s HTTP/1.1\nHost: t\r\n\r\n",
    ),
    (
        "header line ended by a bare LF",
        "GET /s HTTP/1.1\r\nHost: t\nX-A: b\r\n\r\n",
    ),
    (
        "head ended by a bare LF",
        "GET /s HTTP/1.1\r\nHost: t\r\n\nGET /smuggled HTTP/1.1\r\nHost: t\r\n\r\n",
    ),
    (
        "obs-fold continuation line",
        "GET /s HTTP/1.1\r\nHost: t\r\nX-Folded: first\r\n  second\r\n\r\n",
    ),
    (
        "obs-fold with a tab",
        "GET /s HTTP/1.1\r\nHost: t\r\nX-Folded: first\r\n\tsecond\r\n\r\n",
    ),
    (
        "whitespace before a header colon",
        "GET /s HTTP/1.1\r\nHost: t\r\nX-Thing : value\r\n\r\n",
    ),
    (
        "whitespace before the Content-Length colon",
        "POST /s HTTP/1.1\r\nHost: t\r\nContent-Length : 5\r\n\r\nhello",
    ),
    (
        "whitespace before the Transfer-Encoding colon",
        "POST /s HTTP/1.1\r\nHost: t\r\nTransfer-Encoding\t: chunked\r\n\r\n0\r\n\r\n",
    ),
];

#[test]
fn smuggling_shapes_get_400_and_close() {
    let origin = Origin::echo();
    let gw = guarded(&origin);
    for (case, raw) in SMUGGLING {
        expect_status(&gw, case, raw.as_bytes(), 400, true);
    }
    assert_eq!(
        origin.request_count(),
        0,
        "a rejected request reached the origin: {:?}",
        origin
            .requests()
            .iter()
            .map(|r| String::from_utf8_lossy(&r.raw_head).into_owned())
            .collect::<Vec<_>>()
    );
}

#[test]
fn smuggled_request_after_a_rejected_one_never_runs() {
    // The classic CL.TE shape: whatever the proxy believes about the first body, the bytes
    // after it must never be parsed as a second request.
    let origin = Origin::echo();
    let gw = guarded(&origin);
    let raw = "POST /first HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: t\r\n\r\n";
    let (mut c, r) = raw_request(gw.http_addr(), raw.as_bytes());
    assert_eq!(r.expect("a response").status, 400);
    c.expect_closed(Duration::from_secs(3), "after CL+TE");
    assert!(
        origin.requests().iter().all(|r| r.path() != "/smuggled"),
        "the smuggled request reached the origin"
    );
}

#[test]
fn unsupported_transfer_coding_with_final_chunked_gets_501() {
    let origin = Origin::echo();
    let gw = guarded(&origin);
    let raw = "POST /s HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
    expect_status(
        &gw,
        "Transfer-Encoding gzip, chunked",
        raw.as_bytes(),
        501,
        false,
    );
    assert_eq!(origin.request_count(), 0);
}

#[test]
fn other_malformed_requests_get_400() {
    let origin = Origin::echo();
    let gw = guarded(&origin);
    let cases: &[(&str, &[u8])] = &[
        ("text garbage", b"GARBAGE\r\n\r\n"),
        ("random bytes", b"\x00\x01\x02\xff\xfe\r\n\r\n"),
        (
            "TLS ClientHello on the plain port",
            b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\r\n\r\n",
        ),
        ("request line without version", b"GET /\r\nHost: t\r\n\r\n"),
        (
            "header line without colon",
            b"GET / HTTP/1.1\r\nHost: t\r\nNoColonHere\r\n\r\n",
        ),
        (
            "space in header name",
            b"GET / HTTP/1.1\r\nHost: t\r\nBad Name: v\r\n\r\n",
        ),
        // RFC 9112 §3.2: a server MUST respond 400 to an HTTP/1.1 request without Host or
        // with more than one.
        (
            "HTTP/1.1 without Host",
            b"GET / HTTP/1.1\r\nUser-Agent: t\r\n\r\n",
        ),
        (
            "two Host fields",
            b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        ),
    ];
    for (case, raw) in cases {
        expect_status(&gw, case, raw, 400, false);
    }
    assert_eq!(
        origin.request_count(),
        0,
        "a malformed request reached the origin"
    );
    // And the gateway still serves well-formed ones.
    assert_eq!(gw.get("/fine").status, 200);
}

#[test]
fn oversized_head_gets_431_and_long_uri_gets_414() {
    let origin = Origin::echo();
    let gw = guarded(&origin);
    // Positive control: a head just under 4 KiB is fine.
    let mut ok = Req::get("/near-limit");
    for i in 0..3 {
        ok = ok.header(&format!("X-Pad-{i}"), &"p".repeat(1000));
    }
    assert!(ok.to_bytes().len() < 4096);
    assert_eq!(
        gw.request(&ok).status,
        200,
        "a 3.1 KiB head is within max_header_bytes = 4KiB"
    );

    let mut big = Req::get("/big-head");
    for i in 0..8 {
        big = big.header(&format!("X-Pad-{i}"), &"p".repeat(1000));
    }
    expect_status(&gw, "8 KiB of headers", &big.to_bytes(), 431, false);

    let long = Req::get(&format!("/{}", "u".repeat(6000)));
    expect_status(&gw, "6 KB request-target", &long.to_bytes(), 414, false);
    assert_eq!(
        origin.request_count(),
        1,
        "only the positive control reached the origin"
    );
}

#[test]
fn body_over_max_body_size_by_content_length_gets_413_before_forwarding() {
    let origin = Origin::echo();
    let gw = guarded(&origin);
    // Positive control: exactly the limit.
    let r = gw.request(&Req::post("/up", vec![b'a'; 1024]));
    assert_eq!(r.status, 200);
    assert_eq!(origin.accepts(), 1);

    let (_, r) = raw_request(
        gw.http_addr(),
        &Req::post("/up", vec![b'b'; 2048]).to_bytes(),
    );
    assert_eq!(r.expect("a response").status, 413);
    // With Expect: 100-continue the client must get the 413 instead of a 100.
    let mut c = gw.client();
    c.send(b"POST /up HTTP/1.1\r\nHost: t\r\nContent-Length: 4096\r\nExpect: 100-continue\r\n\r\n")
        .unwrap();
    let r = c
        .read_response()
        .expect("a final response without sending the body");
    assert!(
        r.interim.is_empty(),
        "no 100 Continue for a body that will be refused"
    );
    assert_eq!(r.status, 413);
    assert_eq!(
        origin.request_count(),
        1,
        "the over-limit requests never reached the origin"
    );
}

#[test]
fn chunked_body_over_max_body_size_gets_413_mid_stream() {
    let origin = Origin::echo();
    let gw = guarded(&origin);
    // Positive control: 1 KiB in chunks.
    let r = gw.request(&Req::post("/up", vec![b'a'; 1024]).chunked(&[100]));
    assert_eq!(r.status, 200);
    assert_eq!(origin.last_request().body.len(), 1024);

    let over = Req::post("/up", vec![b'c'; 2048]).chunked(&[256]);
    let (mut c, r) = raw_request(gw.http_addr(), &over.to_bytes());
    assert_eq!(r.expect("a response").status, 413);
    c.expect_closed(Duration::from_secs(3), "after 413 mid-body");
    assert_eq!(
        origin.request_count(),
        1,
        "the over-limit body never completed at the origin"
    );
}

/// Writes `bytes` one at a time, `gap` apart, until done or the peer goes away.
fn trickle(mut c: std::net::TcpStream, bytes: Vec<u8>, gap: Duration) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        for b in bytes {
            if c.write_all(&[b]).is_err() {
                return;
            }
            thread::sleep(gap);
        }
    })
}

#[test]
fn head_trickled_slower_than_header_timeout_is_cut_off() {
    let origin = Origin::echo();
    let gw = guarded(&origin);
    let mut c = gw.client();
    // Each byte is progress, but the whole head must arrive within 500 ms (the contract:
    // "whole request head must arrive within this"), so a slowloris cannot keep it alive.
    let head = format!(
        "GET / HTTP/1.1\r\nHost: t\r\nX-Slow: {}\r\n\r\n",
        "s".repeat(200)
    );
    let t = Instant::now();
    let writer = trickle(
        c.stream().try_clone().unwrap(),
        head.into_bytes(),
        Duration::from_millis(20),
    );
    let (outcome, bytes) = c.wait_closed(Duration::from_secs(4));
    let took = t.elapsed();
    assert!(
        outcome.is_closed(),
        "a trickled head kept the connection open for 4 s"
    );
    assert!(
        took >= Duration::from_millis(400),
        "cut off after {took:?}, before header_timeout"
    );
    assert!(
        took < Duration::from_millis(2500),
        "cut off only after {took:?} (header_timeout 500ms)"
    );
    let text = String::from_utf8_lossy(&bytes);
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 408"),
        "a cut-off head gets 408 or a plain close, got {:?}",
        gateway_tests::wire::excerpt(&bytes)
    );
    writer.join().unwrap();
    assert_eq!(origin.request_count(), 0);
}

#[test]
fn partial_head_then_silence_is_cut_off() {
    let origin = Origin::echo();
    let gw = guarded(&origin);
    let mut c = gw.client();
    c.send(b"GET /half HTTP/1.1\r\nHost: t\r\n").unwrap();
    let t = Instant::now();
    let (outcome, bytes) = c.wait_closed(Duration::from_secs(4));
    assert!(
        outcome.is_closed(),
        "a half head kept the connection open for 4 s"
    );
    assert!(
        t.elapsed() < Duration::from_millis(2500),
        "cut off after {:?}",
        t.elapsed()
    );
    let text = String::from_utf8_lossy(&bytes);
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 408"),
        "got {:?}",
        gateway_tests::wire::excerpt(&bytes)
    );
}

#[test]
fn unrouted_path_gets_404() {
    let origin = Origin::echo();
    let gw = Gateway::with(
        &Config::new()
            .upstream(Upstream::new("app", &[origin.addr()]))
            .route(Route::prefix("/app/", "app")),
    );
    for path in ["/", "/other", "/ap", "/app"] {
        let r = gw.get(path);
        assert_eq!(r.status, 404, "{path}");
        assert!(r.body.len() < 512);
    }
    assert_eq!(gw.get("/app/x").status, 200, "the routed prefix works");
    assert_eq!(origin.request_count(), 1, "404s never reach an upstream");
}

#[test]
fn respond_routes_answer_without_upstream() {
    let origin = Origin::echo();
    let gw = Gateway::with(
        &Config::new()
            .upstream(Upstream::new("app", &[origin.addr()]))
            .route(Route::respond_exact("/health", 200, "ok\n"))
            .route(Route::respond_prefix(
                "/maint/",
                503,
                "down for maintenance\n",
            ))
            .route(Route::prefix("/", "app")),
    );
    let mut c = gw.client();
    let r = c.get("/health");
    assert_eq!(r.status, 200);
    assert_eq!(r.body, b"ok\n");
    let r = c.get("/maint/page");
    assert_eq!(r.status, 503);
    assert_eq!(r.body_str(), "down for maintenance\n");
    let r = c.must(&Req::head("/health"));
    assert_eq!(r.status, 200);
    assert!(r.body.is_empty());
    assert_eq!(
        origin.accepts(),
        0,
        "respond routes never touch the upstream"
    );
    // The connection stays usable, and other paths still proxy.
    assert_eq!(c.get("/proxied").status, 200);
    assert_eq!(origin.request_count(), 1);
}

#[test]
fn keep_alive_connection_is_not_poisoned_by_a_good_request_with_body() {
    // Control for the smuggling tests: a legitimate body of exactly Content-Length bytes
    // followed by a second request on the same connection works.
    let origin = Origin::echo();
    let gw = guarded(&origin);
    let mut c = Client::connect(gw.http_addr());
    let rs = c
        .pipeline(&[Req::post("/one", "hello"), Req::get("/two")])
        .unwrap();
    assert_eq!(rs[0].body, b"hello");
    assert_eq!(rs[1].status, 200);
    assert_eq!(origin.request_count(), 2);
}

#[test]
fn endless_chunk_extension_gets_400() {
    // The decoder forwards raw bytes, so an extension that never ends would stream forever
    // (or grow a buffer): the chunk-size line is capped instead.
    let origin = Origin::echo();
    let gw = guarded(&origin);
    let mut c = Client::connect(gw.http_addr());
    c.send(b"POST /s HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5;")
        .unwrap();
    let junk = vec![b'a'; 8 * 1024];
    for _ in 0..16 {
        if c.send(&junk).is_err() {
            break;
        }
    }
    let r = c
        .read_response()
        .expect("a response to an endless extension");
    assert_eq!(r.status, 400);
    c.expect_closed(Duration::from_secs(3), "after an endless chunk extension");
}

// ---- hostile upstreams: status lines, 101s, interim responses (issue 10.7, 17.2, 17.5) ----

const WS_REQUEST: &[u8] = b"GET /ws HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
/// The accept value for the key above (RFC 6455 §1.3).
const WS_ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

fn raw_upstream(reply: &'static [u8], websocket: bool) -> (Origin, Gateway) {
    let origin = Origin::start(move |_| gateway_tests::Reply::raw(reply));
    let gw = Gateway::with(
        &Config::new()
            .upstream(Upstream::new("app", &[origin.addr()]))
            .route(Route::prefix("/", "app").websocket(websocket)),
    );
    (origin, gw)
}

#[test]
fn invalid_upstream_status_lines_get_502() {
    let replies: &[&'static [u8]] = &[
        b"HTTP/1.1 099 Odd\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 000 Zero\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 600 Big\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 0200 OK\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 20 OK\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nbody",
    ];
    for reply in replies {
        let (_origin, gw) = raw_upstream(reply, false);
        let r = gw.get("/s");
        let case = String::from_utf8_lossy(reply);
        assert_eq!(r.status, 502, "{case}");
        // Workers publish counters periodically: wait for this 502, then check every
        // status label is one the gateway validated.
        let deadline = Instant::now() + Duration::from_secs(5);
        let metrics = loop {
            let m = gw.admin_get("/metrics").body_str();
            if m.contains("status=\"502\"") {
                break m;
            }
            assert!(Instant::now() < deadline, "{case}: no 502 counted:\n{m}");
            thread::sleep(Duration::from_millis(50));
        };
        for line in metrics.lines().filter(|l| l.contains("status=\"")) {
            let status = line.split("status=\"").nth(1).unwrap_or("");
            let code: u16 = status.get(..3).and_then(|c| c.parse().ok()).unwrap_or(0);
            assert!(
                (100..=599).contains(&code) && status.as_bytes().get(3) == Some(&b'"'),
                "{case}: upstream value in a metric label: {line}"
            );
        }
    }
}

#[test]
fn a_response_with_many_fields_within_the_head_size_is_relayed() {
    // nginx has no field-count limit for responses, only a size limit: a header-reflecting
    // endpoint must not turn a client's request into a 502.
    let origin = Origin::start(|_| {
        (0..300).fold(gateway_tests::Reply::ok("many"), |r, i| {
            r.header(&format!("X-Reflected-{i}"), "v")
        })
    });
    let gw = Gateway::with(&Config::proxy_all(&[origin.addr()]));
    let r = gw.get("/many");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-reflected-299"), Some("v"));
    assert_eq!(r.body, b"many");
}

#[test]
fn a_101_is_a_tunnel_only_with_the_right_websocket_accept() {
    let bad: &[&'static [u8]] = &[
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: AAAAAAAAAAAAAAAAAAAAAAAAAAA=\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
    ];
    for reply in bad {
        let (_origin, gw) = raw_upstream(reply, true);
        let (_c, r) = raw_request(gw.http_addr(), WS_REQUEST);
        assert_eq!(r.unwrap().status, 502, "{}", String::from_utf8_lossy(reply));
    }
    // A 101 on a route that is not a WebSocket route.
    let good: &'static [u8] = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n";
    let (_origin, gw) = raw_upstream(good, false);
    let (_c, r) = raw_request(gw.http_addr(), WS_REQUEST);
    assert_eq!(r.unwrap().status, 502, "101 on a plain route");
    // The right accept on a WebSocket route switches.
    let (_origin, gw) = raw_upstream(good, true);
    let mut c = Client::connect(gw.http_addr());
    c.send(WS_REQUEST).unwrap();
    let head = c.read_head().expect("a 101");
    assert!(
        head.start_line.starts_with("HTTP/1.1 101"),
        "{}",
        head.start_line
    );
    assert_eq!(
        gateway_tests::wire::header(&head.headers, "sec-websocket-accept"),
        Some(WS_ACCEPT)
    );
}

#[test]
fn interim_responses_are_not_relayed_to_http10_clients() {
    let origin = Origin::start(|_| {
        gateway_tests::Reply::ok("final").interim(103, &[("Link", "</a.css>; rel=preload")])
    });
    let gw = Gateway::with(&Config::proxy_all(&[origin.addr()]));
    let mut c = Client::connect(gw.http_addr());
    let r = c.must(&Req::get("/hints").version("HTTP/1.0"));
    assert_eq!(r.status, 200);
    assert!(r.interim.is_empty(), "a 1xx reached an HTTP/1.0 client");
    assert_eq!(r.body, b"final");
    // HTTP/1.1 clients still get it.
    assert_eq!(gw.get("/hints").interim.len(), 1);
}

// ---- methods (issue 17.6) -------------------------------------------------------------

#[test]
fn trace_and_connect_get_405_unless_the_route_allows_trace() {
    let origin = Origin::echo();
    let toml = Config::new()
        .upstream(Upstream::new("app", &[origin.addr()]))
        .route(Route::prefix("/debug/", "app"))
        .route(Route::prefix("/", "app"))
        .to_toml()
        .replacen(
            "path_prefix = \"/debug/\"\n",
            "path_prefix = \"/debug/\"\nallow_trace = true\n",
            1,
        );
    let gw = Gateway::start(&toml);
    let trace = b"TRACE /x HTTP/1.1\r\nHost: t\r\nCookie: session=s\r\n\r\n";
    let (mut c, r) = raw_request(gw.http_addr(), trace);
    let r = r.expect("a response to TRACE");
    assert_eq!(r.status, 405);
    assert!(
        r.header("allow").is_some(),
        "a 405 names the allowed methods"
    );
    assert_eq!(c.get("/after").status, 200, "the connection stays usable");
    for connect in [
        &b"CONNECT internal.test:22 HTTP/1.1\r\nHost: internal.test:22\r\n\r\n"[..],
        b"CONNECT /x HTTP/1.1\r\nHost: t\r\n\r\n",
        b"CONNECT /debug/x HTTP/1.1\r\nHost: t\r\n\r\n",
    ] {
        expect_status(&gw, "CONNECT", connect, 405, true);
    }
    assert_eq!(origin.request_count(), 1, "only /after reached the origin");
    let (_c, r) = raw_request(
        gw.http_addr(),
        b"TRACE /debug/x HTTP/1.1\r\nHost: t\r\n\r\n",
    );
    assert_eq!(r.unwrap().status, 200, "allow_trace forwards TRACE");
    assert_eq!(origin.last_request().method, "TRACE");
}

#[test]
fn a_refused_status_does_not_mark_the_server_down() {
    // An endpoint that sets the status from the request: a client asking for a status the
    // gateway will not relay gets a 502, and the other requests are unaffected.
    let reflecting = |req: &gateway_tests::RecordedRequest| match req.path() {
        "/status" => {
            gateway_tests::Reply::raw(&b"HTTP/1.1 600 Odd\r\nContent-Length: 0\r\n\r\n"[..])
        }
        _ => gateway_tests::Reply::ok("fine"),
    };
    let (a, b) = (Origin::start(reflecting), Origin::start(reflecting));
    let gw = Gateway::with(
        &Config::new()
            .upstream(Upstream::new("app", &[a.addr(), b.addr()]).max_fails(1))
            .route(Route::prefix("/", "app")),
    );
    for _ in 0..4 {
        assert_eq!(gw.get("/status").status, 502);
    }
    for _ in 0..4 {
        assert_eq!(gw.get("/ok").status, 200, "a server was marked down");
    }
    for o in [&a, &b] {
        assert!(o.requests().iter().any(|r| r.path() == "/ok"));
    }
    // Workers publish their counters periodically: wait for the refusals to show.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let metrics = gw.admin_get("/metrics").body_str();
        if metrics.contains("kind=\"refused\"") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "refusals are not counted:\n{metrics}"
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until the gateway's `/metrics` counts `n` upstream errors of `kind` for `app`
/// (workers publish their counters periodically).
fn wait_upstream_errors(gw: &Gateway, kind: &str, n: f64, case: &str) {
    let series = format!("gateway_upstream_errors_total{{upstream=\"app\",kind=\"{kind}\"}} ");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let metrics = gw.admin_get("/metrics").body_str();
        let got = metrics
            .lines()
            .find_map(|l| l.strip_prefix(series.as_str())?.trim().parse::<f64>().ok())
            .unwrap_or(0.0);
        if got == n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{case}: {got} upstream errors of kind {kind}, expected {n}"
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// A malformed first chunk of an upstream response, arriving with the head, is found
/// before anything went to the client: the client gets a 502 (HTTP/1.1, and HTTP/1.0 whose
/// response is de-chunked), not a close with zero bytes, and the failure is booked to the
/// upstream as a protocol error (RFC 9112 §7.1: a chunk-size is hex digits, then optional
/// extensions, then CRLF).
#[test]
fn malformed_first_chunk_from_the_upstream_gets_502() {
    let long_extension: &'static [u8] = format!(
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;{}\r\nhello\r\n0\r\n\r\n",
        "e".repeat(8192)
    )
    .into_bytes()
    .leak();
    let replies: &[&'static [u8]] = &[
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5 \r\nhello\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n+5\r\nhello\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10000000000000005\r\nhello\r\n0\r\n\r\n",
        long_extension,
    ];
    for reply in replies {
        let case = String::from_utf8_lossy(&reply[..reply.len().min(80)]).into_owned();
        let (_origin, gw) = raw_upstream(reply, false);
        for (i, request) in [
            &b"GET /c HTTP/1.1\r\nHost: t\r\n\r\n"[..],
            &b"GET /c HTTP/1.0\r\nHost: t\r\n\r\n"[..],
        ]
        .into_iter()
        .enumerate()
        {
            let (_c, r) = raw_request(gw.http_addr(), request);
            let r = r.unwrap_or_else(|e| panic!("{case} (request {i}): no response: {e}"));
            assert_eq!(r.status, 502, "{case} (request {i})");
            assert!(r.says_close(), "{case} (request {i}): 502 without close");
        }
        wait_upstream_errors(&gw, "protocol", 2.0, &case);
    }
}

/// Once the head went to the client, a malformed chunk can only end the response with a
/// close: the client sees the 200 head and a body cut short, never a second status.
#[test]
fn malformed_chunk_after_the_head_was_sent_closes() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let origin = thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = [0u8; 4096];
        let mut got = Vec::new();
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = std::io::Read::read(&mut s, &mut buf).unwrap();
            assert!(n > 0, "request head cut short");
            got.extend_from_slice(&buf[..n]);
        }
        s.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            .unwrap();
        s.flush().unwrap();
        // The head goes out to the client before the body arrives.
        thread::sleep(Duration::from_millis(300));
        s.write_all(b"0x5\r\nhello\r\n0\r\n\r\n").unwrap();
        thread::sleep(Duration::from_millis(100));
    });
    let gw = Gateway::with(
        &Config::new()
            .upstream(Upstream::new("app", &[addr]))
            .route(Route::prefix("/", "app")),
    );
    let mut c = std::net::TcpStream::connect(gw.http_addr()).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    c.write_all(b"GET /late HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    let mut all = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match std::io::Read::read(&mut c, &mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => all.extend_from_slice(&buf[..n]),
        }
    }
    origin.join().unwrap();
    let text = String::from_utf8_lossy(&all);
    assert!(text.starts_with("HTTP/1.1 200 "), "{text}");
    assert!(
        !text.contains("502"),
        "a second status after the head: {text}"
    );
    assert!(
        !text.contains("hello"),
        "bytes of the bad chunk relayed: {text}"
    );
    wait_upstream_errors(&gw, "protocol", 1.0, "bad chunk after the head");
}

/// A v2 PROXY header (HAProxy spec §2.2) naming 203.0.113.7:51234 for IPv4, its address
/// block cut or zero-padded to `len` bytes.
fn proxy_v2(command_family: [u8; 2], len: u16) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.extend_from_slice(&command_family);
    h.extend_from_slice(&len.to_be_bytes());
    let mut block = vec![203, 0, 113, 7, 127, 0, 0, 1, 0xc8, 0x22, 0, 80];
    block.resize(len as usize, 0);
    h.extend_from_slice(&block);
    h
}

/// A listener with `proxy_protocol = true`: a missing or malformed PROXY header closes the
/// connection with no response at all (docs/configuration.md), including a v2 header whose
/// length is shorter than its family's address block, whose bytes would otherwise be read
/// as the start of the HTTP request (and answered 400).
#[test]
fn a_bad_proxy_header_closes_without_a_response() {
    let (origin, gw) = proxy_listener("proxy_protocol = true\n");
    let get = PROXIED_GET;
    let with = |header: &[u8]| [header, get].concat();
    // The listener works: a valid v2 header names the client.
    let (_c, r) = raw_request(gw.http_addr(), &with(&proxy_v2([0x21, 0x11], 12)));
    let r = r.expect("a response to a valid PROXY v2 header");
    assert_eq!(r.status, 200);
    assert_eq!(
        origin.requests()[0].header("x-real-ip"),
        Some("203.0.113.7")
    );
    for (case, header) in [
        ("v2 TCP4, length 4", proxy_v2([0x21, 0x11], 4)),
        ("v2 TCP4, length 11", proxy_v2([0x21, 0x11], 11)),
        ("v2 TCP6, length 12", proxy_v2([0x21, 0x21], 12)),
        ("v2 unknown family", proxy_v2([0x21, 0x41], 12)),
        ("v2 unknown command", proxy_v2([0x22, 0x11], 12)),
        (
            "v1 bad address",
            b"PROXY TCP4 203.0.113.x 127.0.0.1 1 80\r\n".to_vec(),
        ),
        (
            "v1 TCP4 to IPv6",
            b"PROXY TCP4 203.0.113.7 ::1 1 80\r\n".to_vec(),
        ),
        ("no header", Vec::new()),
    ] {
        let mut c = std::net::TcpStream::connect(gw.http_addr()).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = c.write_all(&with(&header));
        let mut got = Vec::new();
        let read = std::io::Read::read_to_end(&mut c, &mut got);
        assert!(
            read.is_ok() && got.is_empty(),
            "{case}: want the connection closed with nothing sent, got {read:?} and {:?}",
            String::from_utf8_lossy(&got)
        );
    }
    assert_eq!(
        origin.request_count(),
        1,
        "nothing after a bad header is forwarded"
    );
}

/// `proxy_protocol_from`: only a listed balancer may name the client. Any other peer could
/// name an address of its choice and walk past `deny`, the per-IP caps and rates, or spend
/// another client's allowance, so its connection is closed before a byte is read.
#[test]
fn a_proxy_header_from_an_unlisted_peer_is_not_believed() {
    let (origin, gw) =
        proxy_listener("proxy_protocol = true\nproxy_protocol_from = [\"127.0.0.2/32\"]\n");
    let get = PROXIED_GET;
    let request = [&proxy_v2([0x21, 0x11], 12)[..], get].concat();
    // The listed balancer names the client.
    let mut balancer = Client::connect_from("127.0.0.2".parse().unwrap(), gw.http_addr());
    balancer.send(&request).unwrap();
    let r = balancer.read_response().expect("the balancer is answered");
    assert_eq!(r.status, 200);
    assert_eq!(
        origin.requests()[0].header("x-real-ip"),
        Some("203.0.113.7")
    );
    // Anyone else is closed unanswered, whatever it names.
    for source in ["127.0.0.1", "127.0.0.3"] {
        let mut c = gateway_tests::client::connect_from(source.parse().unwrap(), gw.http_addr());
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = c.write_all(&request);
        let mut got = Vec::new();
        let read = std::io::Read::read_to_end(&mut c, &mut got);
        assert!(
            got.is_empty(),
            "{source}: want the connection closed with nothing sent, got {read:?} and {:?}",
            String::from_utf8_lossy(&got)
        );
    }
    assert_eq!(
        origin.request_count(),
        1,
        "only the balancer's request arrived"
    );
    let metrics = gw.admin_get("/metrics").body_str();
    let refused = |m: &str| {
        m.lines()
            .find_map(|l| {
                l.strip_prefix("gateway_local_refusals_total{reason=\"proxy_untrusted\"} ")?
                    .trim()
                    .parse::<f64>()
                    .ok()
            })
            .unwrap_or(0.0)
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut seen = refused(&metrics);
    while seen < 2.0 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(50));
        seen = refused(&gw.admin_get("/metrics").body_str());
    }
    assert_eq!(seen, 2.0, "both refusals are counted");
}

const PROXIED_GET: &[u8] = b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n";

/// An echo origin behind a gateway whose listener has these extra keys (PROXY settings).
fn proxy_listener(listener_keys: &str) -> (Origin, Gateway) {
    let origin = Origin::echo();
    let config = Config::new()
        .server("header_timeout", "2s")
        .upstream(Upstream::new("app", &[origin.addr()]))
        .route(Route::prefix("/", "app"));
    let gw = Gateway::start(&config.to_toml().replacen(
        "name = \"http\"\n",
        &format!("name = \"http\"\n{listener_keys}"),
        1,
    ));
    (origin, gw)
}
