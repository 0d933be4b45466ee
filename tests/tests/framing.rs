//! Message framing through the proxy, both directions (RFC 9112 §6, §7): request bodies by
//! Content-Length and chunked, response bodies by Content-Length, chunked and connection
//! close, at 0 B, 13 B and 10 MiB, compared byte for byte at the origin and at the client.
//! Bodiless responses (HEAD, 204, 304), `Expect: 100-continue`, pipelining and interim 1xx.

use std::time::Duration;

use gateway_tests::{
    pattern_bytes, BodyFraming, Client, Config, Framing, Gateway, Origin, RecordedRequest, Reply,
    Req, Route, Upstream,
};

const SIZES: [usize; 3] = [0, 13, 10 * 1024 * 1024];
/// Odd chunk sizes, cycled: 1-byte chunks, a typical buffer, one bigger than any buffer.
const CHUNKS: [usize; 4] = [1, 13, 4096, 100_000];

/// Echoes the request body back, framed as the request's `X-Reply-Framing` says.
fn echo_with_framing(req: &RecordedRequest) -> Reply {
    let reply = Reply::echo(req);
    match req.header("x-reply-framing") {
        Some("chunked") => reply.chunked(&[7, 8192, 65536, 1]),
        Some("close") => reply.close_delimited(),
        _ => reply,
    }
}

fn start_echo() -> (Origin, Gateway) {
    let origin = Origin::start(echo_with_framing);
    // The contract sets no default body limit (nginx's is 1m): state one above 10 MiB.
    let gw = Gateway::with(
        &Config::new()
            .upstream(Upstream::new("app", &[origin.addr()]))
            .route(Route::prefix("/", "app").max_body_size("64MiB")),
    );
    (origin, gw)
}

/// One exchange: sends `body` framed as asked, has it echoed with `reply_framing`, and checks
/// both copies byte for byte.
fn exchange(
    gw: &Gateway,
    origin: &Origin,
    chunked_request: bool,
    reply_framing: &str,
    size: usize,
) {
    let body = pattern_bytes(size, size as u64 + 1);
    let case = format!(
        "request {} / response {reply_framing} / {size} B",
        if chunked_request {
            "chunked"
        } else {
            "content-length"
        }
    );
    let mut req =
        Req::post(&format!("/echo/{size}"), body.clone()).header("X-Reply-Framing", reply_framing);
    if chunked_request {
        req = req.chunked(&CHUNKS);
    }
    let before = origin.request_count();
    let mut c = gw.client();
    let resp = c.request(&req).unwrap_or_else(|e| panic!("{case}: {e}"));
    assert_eq!(resp.status, 200, "{case}");
    let got = origin.wait_requests(before + 1, Duration::from_secs(5))[before].clone();
    assert!(
        origin.errors().is_empty(),
        "{case}: origin saw bad framing: {:?}",
        origin.errors()
    );
    assert_eq!(got.body.len(), size, "{case}: body length at origin");
    assert!(got.body == body, "{case}: body bytes at origin differ");
    if !chunked_request {
        // A Content-Length body can be streamed as is; it must not be re-framed. (An empty
        // POST may lose its `Content-Length: 0` without harm.)
        assert!(
            got.framing == BodyFraming::ContentLength(size)
                || (size == 0 && got.framing == BodyFraming::None),
            "{case}: origin framing {:?}",
            got.framing
        );
    }
    assert_eq!(resp.body.len(), size, "{case}: body length at client");
    assert!(resp.body == body, "{case}: body bytes at client differ");
    if reply_framing == "cl" {
        assert_eq!(
            resp.header("content-length"),
            Some(size.to_string().as_str()),
            "{case}: the origin's Content-Length reaches the client"
        );
    }
}

#[test]
fn matrix_content_length_requests() {
    let (origin, gw) = start_echo();
    for reply in ["cl", "chunked", "close"] {
        for size in SIZES {
            exchange(&gw, &origin, false, reply, size);
        }
    }
}

#[test]
fn matrix_chunked_requests() {
    let (origin, gw) = start_echo();
    for reply in ["cl", "chunked", "close"] {
        for size in SIZES {
            exchange(&gw, &origin, true, reply, size);
        }
    }
}

#[test]
fn many_exchanges_on_one_connection_keep_framing() {
    // Mixed framings back to back on one client connection: any leftover or missing byte
    // shifts every later message, so the last response would be wrong.
    let (origin, gw) = start_echo();
    let mut c = gw.client();
    for i in 0..30usize {
        let size = [0, 1, 13, 4097, 70_000][i % 5];
        let body = pattern_bytes(size, i as u64);
        let mut req =
            Req::post("/mix", body.clone()).header("X-Reply-Framing", ["cl", "chunked"][i % 2]);
        if i % 3 == 0 {
            req = req.chunked(&[5, 1000]);
        }
        let r = c.must(&req);
        assert_eq!(r.status, 200, "exchange {i}");
        assert!(r.body == body, "exchange {i}: body differs");
    }
    assert!(origin.errors().is_empty(), "{:?}", origin.errors());
}

#[test]
fn get_without_body_is_forwarded_without_body_framing() {
    let (origin, gw) = start_echo();
    let r = gw.get("/plain");
    assert_eq!(r.status, 200);
    let got = origin.last_request();
    assert!(got.body.is_empty());
    assert!(
        !got.has_header("transfer-encoding"),
        "a GET without a body must not become chunked upstream"
    );
}

#[test]
fn head_204_304_have_no_body_and_keep_the_connection_in_sync() {
    let origin = Origin::start(|req| match req.path() {
        "/head" => Reply::ok("eleven byte"),
        "/204" => Reply::new(204).header("X-Kind", "no-content"),
        "/304" => Reply::new(304).header("ETag", "\"v1\""),
        _ => Reply::ok(format!("after {}", req.target)),
    });
    let gw = Gateway::with(&Config::proxy_all(&[origin.addr()]));
    let mut c = gw.client();

    let r = c.must(&Req::head("/head"));
    assert_eq!(r.status, 200);
    assert!(r.body.is_empty());
    assert_eq!(
        r.header("content-length"),
        Some("11"),
        "HEAD keeps the Content-Length of the GET it describes (RFC 9110 §9.3.2)"
    );
    let r = c.get("/a");
    assert_eq!(
        r.body_str(),
        "after /a",
        "the connection is in sync after HEAD"
    );

    let r = c.get("/204");
    assert_eq!(r.status, 204);
    assert_eq!(r.header("x-kind"), Some("no-content"));
    assert!(
        r.header("transfer-encoding").is_none(),
        "204 has no body framing"
    );
    let r = c.get("/b");
    assert_eq!(
        r.body_str(),
        "after /b",
        "the connection is in sync after 204"
    );

    let r = c.must(&Req::get("/304").header("If-None-Match", "\"v1\""));
    assert_eq!(r.status, 304);
    assert_eq!(r.header("etag"), Some("\"v1\""));
    assert!(
        r.header("transfer-encoding").is_none(),
        "304 has no body framing"
    );
    let r = c.get("/c");
    assert_eq!(
        r.body_str(),
        "after /c",
        "the connection is in sync after 304"
    );
}

#[test]
fn expect_100_continue() {
    let (origin, gw) = start_echo();
    let mut c = gw.client();
    c.set_read_timeout(Duration::from_secs(5));
    c.send(
        b"POST /upload HTTP/1.1\r\nHost: gateway.test\r\nContent-Length: 13\r\nExpect: 100-continue\r\n\r\n",
    )
    .unwrap();
    // The client holds the body back until it hears 100 (or a final status).
    let head = c
        .read_head()
        .expect("a `100 Continue` before the client sends the body (RFC 9110 §10.1.1)");
    assert!(
        head.start_line.starts_with("HTTP/1.1 100"),
        "expected 100 Continue, got {:?}",
        head.start_line
    );
    c.send(b"hello, world!").unwrap();
    let r = c.read_response().unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.body, b"hello, world!");
    let got = origin.last_request();
    assert_eq!(got.body, b"hello, world!", "the body reached the origin");
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    let origin = Origin::start(|req| {
        Reply::ok(format!("{} {} {}", req.method, req.target, req.body.len()))
            // Later requests answer faster: a proxy that answers as responses complete
            // rather than in request order would reorder them.
            .delay(Duration::from_millis(if req.path() == "/p/0" {
                150
            } else {
                0
            }))
    });
    let gw = Gateway::with(&Config::proxy_all(&[origin.addr()]));
    let mut c = gw.client();
    let reqs: Vec<Req> = (0..10)
        .map(|i| {
            let t = format!("/p/{i}");
            match i % 3 {
                0 => Req::get(&t),
                1 => Req::post(&t, vec![b'x'; i * 10]),
                _ => Req::post(&t, vec![b'y'; i]).chunked(&[1]),
            }
        })
        .collect();
    let rs = c.pipeline(&reqs).expect("ten pipelined responses");
    for (i, r) in rs.iter().enumerate() {
        let expect = format!("{} /p/{i} {}", reqs[i].method, reqs[i].body.len());
        assert_eq!(r.status, 200, "response {i}");
        assert_eq!(r.body_str(), expect, "response {i} out of order or wrong");
    }
}

#[test]
fn interim_1xx_from_origin_is_forwarded() {
    // RFC 9110 §15.2: "A proxy MUST forward 1xx responses unless the proxy itself requested
    // the generation of the 1xx response."
    let origin = Origin::start(|_| {
        Reply::ok("final body")
            .interim(103, &[("Link", "</style.css>; rel=preload; as=style")])
            .header("X-Final", "yes")
    });
    let gw = Gateway::with(&Config::proxy_all(&[origin.addr()]));
    let mut c = gw.client();
    let r = c.get("/hints");
    assert_eq!(r.interim.len(), 1, "the 103 reaches the client");
    assert_eq!(r.interim[0].status, 103);
    assert_eq!(
        gateway_tests::wire::header(&r.interim[0].headers, "link"),
        Some("</style.css>; rel=preload; as=style")
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-final"), Some("yes"));
    assert_eq!(r.body, b"final body");
    // And the connection is still usable.
    assert_eq!(c.get("/again").status, 200);
}

#[test]
fn close_delimited_response_reaches_client_whole_then_upstream_is_fresh() {
    // After a close-delimited response the upstream connection is gone; the next request
    // must go on a new upstream connection and succeed.
    let origin = Origin::start(|req| match req.path() {
        "/close" => Reply::ok(pattern_bytes(100_000, 9)).framing(Framing::CloseDelimited),
        _ => Reply::ok("next"),
    });
    let gw = Gateway::with(&Config::proxy_all(&[origin.addr()]));
    let mut c = gw.client();
    let r = c.get("/close");
    assert!(r.body == pattern_bytes(100_000, 9));
    if r.framing == BodyFraming::Close {
        c = Client::connect(gw.http_addr());
    }
    assert_eq!(c.get("/next").body_str(), "next");
    assert!(origin.accepts() >= 2);
}

/// A route with room for 10 MiB bodies and a generous read timeout.
fn streaming_gateway(origin: &Origin) -> Gateway {
    Gateway::with(
        &Config::new()
            .upstream(Upstream::new("app", &[origin.addr()]))
            .route(
                Route::prefix("/", "app")
                    .max_body_size("64MiB")
                    .read_timeout("10s"),
            ),
    )
}

#[test]
fn response_body_streams_before_the_origin_finishes() {
    // Contract: "Bodies stream in both directions with bounded buffers". The origin sends
    // the head and 1 MiB of a 10 MiB body, then holds the rest: the client must already
    // have the head and most of that MiB.
    let origin =
        Origin::start(|_| Reply::ok(pattern_bytes(10 << 20, 5)).partial_then_stall(1 << 20));
    let gw = streaming_gateway(&origin);
    let mut c = gw.client();
    c.set_read_timeout(Duration::from_secs(5));
    c.send(&Req::get("/stream").to_bytes()).unwrap();
    let head = c
        .read_head()
        .expect("the response head arrives while the origin still holds most of the body");
    assert!(
        head.start_line.starts_with("HTTP/1.1 200"),
        "{}",
        head.start_line
    );
    while c.wire.buffered().len() < 512 * 1024 {
        match c.wire.fill() {
            Ok(n) if n > 0 => {}
            other => panic!(
                "only {} body bytes reached the client while the origin had sent 1 MiB ({other:?})",
                c.wire.buffered().len()
            ),
        }
    }
    assert!(c.wire.buffered() == &pattern_bytes(10 << 20, 5)[..c.wire.buffered().len()]);
}

#[test]
fn request_body_streams_before_the_client_finishes() {
    // The other direction: the origin gets the request head while the client is still
    // sending a 10 MiB body (no store-and-forward of whole bodies).
    let origin = Origin::start(|r| Reply::ok(r.body.len().to_string()));
    let gw = streaming_gateway(&origin);
    let body = pattern_bytes(10 << 20, 6);
    let mut c = gw.client();
    let head = format!(
        "POST /upload HTTP/1.1\r\nHost: gateway.test\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    c.send(head.as_bytes()).unwrap();
    c.send(&body[..1 << 20]).unwrap();
    gateway_tests::wait_until(
        Duration::from_secs(5),
        "the origin to see the request head while the client still sends the body",
        || origin.heads_seen() == 1,
    );
    assert_eq!(origin.request_count(), 0, "the body is not complete yet");
    c.send(&body[1 << 20..]).unwrap();
    let r = c.read_response().unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.body_str(), (10 << 20).to_string());
    assert!(origin.last_request().body == body);
}

// ---- the framing rule: the gateway writes the framing it parsed (issue 10.1, 17.7, 17.8) --

/// A body that is itself a request: if the upstream ever reads it as one, it runs.
const SMUGGLED: &[u8] = b"GET /admin/secret.txt HTTP/1.1\r\nHost: t\r\n\r\n";

fn guarded_origin() -> (Origin, Gateway) {
    let origin = Origin::start(|req| Reply::ok(format!("{} {}", req.path(), req.body.len())));
    let gw = Gateway::with(
        &Config::new()
            .upstream(Upstream::new("app", &[origin.addr()]))
            .route(Route::respond_prefix("/admin", 403, "no\n"))
            .route(Route::prefix("/", "app")),
    );
    (origin, gw)
}

#[test]
fn connection_cannot_remove_framing_or_proxy_headers() {
    let (origin, gw) = guarded_origin();
    for connection in [
        "Content-Length",
        "content-length, keep-alive",
        "Transfer-Encoding",
        "Host",
        "X-Forwarded-For, X-Real-IP, X-Forwarded-Proto",
    ] {
        let mut c = gw.client();
        let head = format!(
            "GET /public/ HTTP/1.1\r\nHost: t\r\nConnection: {connection}\r\nContent-Length: {}\r\n\r\n",
            SMUGGLED.len()
        );
        let mut raw = head.into_bytes();
        raw.extend_from_slice(SMUGGLED);
        c.send(&raw).unwrap();
        let r = c.read_response().expect("a response");
        assert_eq!(r.status, 200, "Connection: {connection}");
        assert_eq!(r.body_str(), format!("/public/ {}", SMUGGLED.len()));
        let got = origin.last_request();
        assert_eq!(got.body, SMUGGLED, "Connection: {connection}");
        assert_eq!(got.header("host"), Some("t"), "Connection: {connection}");
        for name in ["x-forwarded-for", "x-real-ip", "x-forwarded-proto"] {
            assert!(
                got.has_header(name),
                "{name} missing: Connection: {connection}"
            );
        }
        // The connection is still in sync.
        assert_eq!(c.get("/after").body_str(), "/after 0");
    }
    assert!(
        origin
            .requests()
            .iter()
            .all(|r| !r.path().starts_with("/admin")),
        "a body reached the origin as a request"
    );
    assert!(origin.errors().is_empty(), "{:?}", origin.errors());
}

#[test]
fn odd_request_framing_is_forwarded_canonical() {
    let (origin, gw) = guarded_origin();
    let cases: &[(&str, &str, &str)] = &[
        ("Content-Length: 0005", "hello", "5"),
        ("Content-Length: 5, 5", "hello", "5"),
        ("Content-Length: 5\r\nContent-Length: 5", "hello", "5"),
    ];
    for (fields, body, want) in cases {
        let raw = format!("POST /p HTTP/1.1\r\nHost: t\r\n{fields}\r\n\r\n{body}");
        let (_c, r) = gateway_tests::client::raw_request(gw.http_addr(), raw.as_bytes());
        assert_eq!(r.unwrap().status, 200, "{fields}");
        let got = origin.last_request();
        assert_eq!(got.header_all("content-length"), vec![*want], "{fields}");
    }
    for te in [
        "Transfer-Encoding: chunked,",
        "Transfer-Encoding: ,chunked",
        "Transfer-Encoding: chunked\r\nTransfer-Encoding: ",
    ] {
        let raw = format!("POST /p HTTP/1.1\r\nHost: t\r\n{te}\r\n\r\n5\r\nhello\r\n0\r\n\r\n");
        let (_c, r) = gateway_tests::client::raw_request(gw.http_addr(), raw.as_bytes());
        assert_eq!(r.unwrap().status, 200, "{te:?}");
        let got = origin.last_request();
        assert_eq!(got.body, b"hello", "{te:?}");
        assert_eq!(
            got.header_all("transfer-encoding"),
            vec!["chunked"],
            "{te:?}"
        );
    }
}

#[test]
fn upstream_connection_cannot_unframe_the_response() {
    let origin = Origin::start(|req| match req.path() {
        "/cl" => Reply::ok("abc").header("Connection", "Content-Length"),
        "/te" => Reply::ok("chunky")
            .header("Connection", "Transfer-Encoding")
            .chunked(&[2]),
        "/204" => Reply::raw(&b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n"[..]),
        _ => Reply::ok("next"),
    });
    let gw = Gateway::with(&Config::proxy_all(&[origin.addr()]));
    let mut c = gw.client();
    let r = c.get("/cl");
    assert_eq!(r.header("content-length"), Some("3"));
    assert_eq!(r.body, b"abc");
    assert!(!r.says_close());
    assert_eq!(c.get("/x").body_str(), "next", "in sync after /cl");
    let r = c.get("/te");
    assert_eq!(r.header("transfer-encoding"), Some("chunked"));
    assert_eq!(r.body, b"chunky");
    assert_eq!(c.get("/y").body_str(), "next", "in sync after /te");
    let r = c.get("/204");
    assert_eq!(r.status, 204);
    assert!(
        r.header("content-length").is_none(),
        "204 carries no framing"
    );
}

#[test]
fn http10_expect_is_ignored_and_gets_no_interim_response() {
    // RFC 9110 §10.1.1: a 100-continue expectation in an HTTP/1.0 request is ignored, and
    // such a client never gets a 1xx (it could not tell it from the final response).
    let (origin, gw) = start_echo();
    // The gateway reads small bodies before it connects upstream, and answers an HTTP/1.1
    // expectation at once: the control shows how soon a 100 would come.
    let head = |v: &str| {
        format!("POST /up HTTP/{v}\r\nHost: t\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
    };
    let mut control = gw.client();
    control.send(head("1.1").as_bytes()).unwrap();
    control.set_read_timeout(Duration::from_secs(5));
    let interim = control.read_head().unwrap();
    assert!(
        interim.start_line.starts_with("HTTP/1.1 100"),
        "the HTTP/1.1 control gets its 100 Continue: {}",
        interim.start_line
    );
    let mut c = gw.client();
    c.send(head("1.0").as_bytes()).unwrap();
    // Twice the time the control needed is plenty; nothing may arrive before the body.
    c.set_read_timeout(Duration::from_millis(500));
    let mut byte = [0u8; 1];
    match std::io::Read::read(&mut c.stream(), &mut byte) {
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) => {}
        other => panic!("an HTTP/1.0 client got bytes before sending its body: {other:?}"),
    }
    c.set_read_timeout(Duration::from_secs(5));
    c.send(b"hello").unwrap();
    let r = c.read_response().unwrap();
    assert!(r.interim.is_empty(), "{:?}", r.interim);
    assert_eq!(r.status, 200);
    assert_eq!(r.body, b"hello");
    assert_eq!(origin.last_request().body, b"hello");
}
