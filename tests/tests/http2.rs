//! HTTP/2 for clients (issue 12), through the real binary to real HTTP/1.1 origins:
//! negotiation (ALPN per listener with curl, h2c with prior knowledge on and off), routes and
//! forwarded fields as for HTTP/1, request bodies with and without `content-length`, flow
//! control with a slow reader beside a fast stream, 100 concurrent streams, a client reset
//! reaching the upstream, the RFC 9113 §8.2 refusals (never reaching the upstream),
//! `request_rate` per stream, the access log and metrics, GOAWAY on drain, after
//! `max_requests_per_connection` and on a PING/SETTINGS flood; informational responses;
//! WebSocket over HTTP/2 (RFC 8441 extended CONNECT) through a real WebSocket origin and its
//! hostile cases. Runs on both I/O drivers (`GATEWAY_TEST_IO=epoll`).

use gateway_tests::control::{admin_request, scrape, write_atomically};
use gateway_tests::h2::{
    exchange, frame_bytes, get_fields, H2Client, H2Req, RawH2, StreamFate, CONTINUATION,
    END_HEADERS, END_STREAM, GOAWAY, HEADERS, PING, RST_STREAM, SETTINGS,
};
use gateway_tests::{wait_until, Config, Gateway, Origin, Reply, Route, Upstream};
use std::process::Command;
use std::time::{Duration, Instant};

/// RST_STREAM / GOAWAY error codes (RFC 9113 §7).
const PROTOCOL_ERROR: u32 = 0x1;
const ENHANCE_YOUR_CALM: u32 = 0xb;

fn h2c(config: Config) -> Config {
    config.listener_raw("h2c", "true")
}

fn echo_gateway() -> (Gateway, Origin) {
    let origin = Origin::echo();
    let gw = Gateway::with(&h2c(Config::proxy_all(&[origin.addr()]).workers(1)));
    (gw, origin)
}

#[test]
fn h2c_prior_knowledge_forwards_as_http1_would() {
    let origin = Origin::start(|r| Reply::ok(r.body.clone()).header("x-origin", "yes"));
    let config = h2c(Config::new()
        .workers(1)
        .upstream(Upstream::new("app", &[origin.addr()]))
        .route(Route::prefix("/api/", "app"))
        .extra(
            "[[route]]\npath_prefix = \"/static\"\nrespond = { status = 203, body = \"fixed\" }\n",
        ));
    let gw = Gateway::with(&config);
    let mut c = H2Client::connect(gw.http_addr());
    let r = c
        .request(
            &H2Req::get("/api/a/../b?q=1")
                .authority("app.test:8443")
                .header("cookie", "a=1")
                .header("cookie", "b=2")
                .header("x-forwarded-for", "203.0.113.9")
                .header("user-agent", "h2-test"),
        )
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-origin"), Some("yes"));
    let seen = &origin.requests()[0];
    assert_eq!(seen.version, "HTTP/1.1");
    assert_eq!(
        seen.target, "/api/b?q=1",
        "the path normalised as for HTTP/1"
    );
    assert_eq!(
        seen.header("host"),
        Some("app.test:8443"),
        ":authority -> Host"
    );
    assert_eq!(
        seen.header("x-forwarded-proto"),
        Some("http"),
        "h2c is http"
    );
    assert_eq!(
        seen.header_all("x-forwarded-for"),
        vec!["203.0.113.9, 127.0.0.1"],
        "appended to, as for HTTP/1"
    );
    assert_eq!(
        seen.header("x-real-ip"),
        Some("127.0.0.1"),
        "an untrusted peer's claim"
    );
    assert_eq!(
        seen.header_all("cookie"),
        vec!["a=1; b=2"],
        "RFC 9113 §8.2.3"
    );
    // Routes as for HTTP/1: a respond route, and no route at all.
    let fixed = c.get("/static/x");
    assert_eq!((fixed.status, &fixed.body[..]), (203, &b"fixed"[..]));
    assert_eq!(c.get("/nowhere").status, 404);
    assert_eq!(origin.request_count(), 1);
    // One access-log line per stream, as HTTP/2.0.
    gw.wait_access_line(Duration::from_secs(5), |l| {
        l.contains("\"GET /api/a/../b?q=1 HTTP/2.0\" 200") && l.contains("h2-test")
    });
    gw.wait_access_line(Duration::from_secs(5), |l| l.contains("HTTP/2.0\" 404"));
    // Requests counted with HTTP/1's; the h2 family beside them.
    wait_until(Duration::from_secs(5), "h2 metrics", || {
        let m = scrape(gw.admin_addr());
        m.get("gateway_http2_streams_total", &[("listener", "http")])
            .is_some_and(|n| n >= 3.0)
            && m.get("gateway_http2_connections_active", &[("listener", "http")]) == Some(1.0)
            && m.sum(
                "gateway_http_requests_total",
                &[("listener", "http"), ("status", "203")],
            ) == 1.0
    });
}

#[test]
fn h2c_is_off_by_default_and_the_preface_is_then_http1() {
    let origin = Origin::echo();
    let gw = Gateway::with(&Config::proxy_all(&[origin.addr()]).workers(1));
    let mut raw = RawH2::connect(gw.http_addr());
    raw.headers(1, &get_fields(b"/"), true);
    let mut answer = Vec::new();
    let _ = std::io::Read::read_to_end(&mut raw.sock, &mut answer);
    assert!(
        answer.starts_with(b"HTTP/1.1 4"),
        "an HTTP/1 refusal: {:?}",
        String::from_utf8_lossy(&answer)
    );
    assert_eq!(origin.request_count(), 0);
    // And HTTP/1 still works on an h2c listener.
    let gw = Gateway::with(&h2c(Config::proxy_all(&[origin.addr()]).workers(1)));
    assert_eq!(gw.get("/plain").status, 200);
}

#[test]
fn request_bodies_with_and_without_content_length() {
    let (gw, origin) = echo_gateway();
    let mut c = H2Client::connect(gw.http_addr());
    let body = vec![b'x'; 200_000];
    let sized = H2Req::get("/up")
        .method("POST")
        .header("content-length", &body.len().to_string())
        .body(body.clone());
    let r = c.request(&sized).unwrap();
    assert_eq!((r.status, r.body.len()), (200, body.len()));
    let streamed = H2Req::get("/up").method("POST").body(body.clone());
    let r = c.request(&streamed).unwrap();
    assert_eq!((r.status, r.body.len()), (200, body.len()));
    let seen = origin.requests();
    assert_eq!(seen[0].header("content-length"), Some("200000"));
    assert_eq!(seen[1].header("transfer-encoding"), Some("chunked"));
    assert_eq!(seen[1].body, body, "the DATA frames re-framed as chunks");
    // A content-length the DATA frames do not match is malformed (RFC 9113 §8.1.1).
    let short = H2Req::get("/up")
        .method("POST")
        .header("content-length", "10")
        .body(&b"12345"[..]);
    assert!(c.request(&short).is_err(), "a mismatch resets the stream");
}

#[test]
fn upstream_framings_become_data_frames_and_failures_the_http1_status() {
    let body: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let b = body.clone();
    let origin = Origin::start(move |r| match r.path() {
        "/chunked" => Reply::ok(b.clone()).chunked(&[1, 7000, 3]),
        "/close" => Reply::ok(b.clone()).close_delimited(),
        _ => Reply::ok(b.clone()).interim(103, &[("link", "</a.css>")]),
    });
    let config = h2c(Config::new()
        .workers(1)
        .upstream(Upstream::new("app", &[origin.addr()]))
        .upstream(Upstream::new("gone", &[gateway_tests::refused_addr()]))
        .route(Route::prefix("/gone", "gone"))
        .route(Route::prefix("/", "app")));
    let gw = Gateway::with(&config);
    let mut c = H2Client::connect(gw.http_addr());
    for path in ["/chunked", "/close", "/interim"] {
        let r = c.get(path);
        assert_eq!(r.status, 200, "{path}");
        assert!(r.body == body, "{path}: the payload, framing removed");
        assert!(r.header("transfer-encoding").is_none() && r.header("connection").is_none());
    }
    assert_eq!(c.get("/gone").status, 502);
}

#[test]
fn body_limits_and_connect_are_answered_as_for_http1() {
    let origin = Origin::echo();
    let config = h2c(Config::new()
        .workers(1)
        .upstream(Upstream::new("app", &[origin.addr()]))
        .route(Route::prefix("/", "app").max_body_size("1KiB")));
    let gw = Gateway::with(&config);
    let mut c = H2Client::connect(gw.http_addr());
    let declared = H2Req::get("/big")
        .method("POST")
        .header("content-length", "5000")
        .body(vec![b'a'; 5000]);
    assert_eq!(c.request(&declared).map(|r| r.status).ok(), Some(413));
    // Without a declared length the limit holds on the DATA frames as they come.
    let streamed = H2Req::get("/big").method("POST").body(vec![b'a'; 5000]);
    let mut c = H2Client::connect(gw.http_addr());
    let r = c.request(&streamed);
    assert!(
        r.as_ref().map_or(true, |r| r.status == 413),
        "{:?}",
        r.map(|r| r.status)
    );
    // CONNECT (and so WebSocket over HTTP/2, RFC 8441, which is not offered) is 405.
    let mut raw = RawH2::connect(gw.http_addr());
    raw.headers(
        1,
        &[
            (b":method", b"CONNECT"),
            (b":authority", b"example.test:443"),
        ],
        false,
    );
    assert_eq!(raw.fate(1), StreamFate::Answered);
    assert_eq!(origin.request_count(), 0, "nothing reached the upstream");
}

#[test]
fn h2load_many_streams_on_few_connections_and_one_per_connection() {
    let (gw, origin) = echo_gateway();
    let url = format!("http://{}/load", gw.http_addr());
    for args in [
        ["-n", "2000", "-c", "4", "-m", "50"],
        ["-n", "200", "-c", "20", "-m", "1"],
    ] {
        let out = Command::new("h2load")
            .args(args)
            .arg(&url)
            .output()
            .expect("run h2load (Debian nghttp2-client, cargo xtask install)");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let n = args[1];
        assert!(
            text.contains(&format!(
                "{n} total, {n} started, {n} done, {n} succeeded, 0 failed"
            )),
            "h2load {args:?}:\n{text}"
        );
        assert!(text.contains(&format!("status codes: {n} 2xx")), "{text}");
    }
    assert_eq!(origin.request_count(), 2200);
}

/// Streams that finish together give their upstream connections back together, far more
/// than `keepalive`: those linger (`keepalive_linger`), and the client's next round of
/// streams reuses them instead of connecting again. With nginx's rule (`"0s"`: close
/// beyond `keepalive` at once) nearly every round reconnects.
#[test]
fn a_burst_of_streams_reuses_the_connections_of_the_burst_before() {
    // 1000 per connection: `max_requests_per_connection`, after which h2load does not reconnect.
    let requests = 2000;
    let run = |linger: &str| {
        let origin = Origin::echo();
        let config = h2c(Config::new()
            .workers(1)
            .upstream(
                Upstream::new("app", &[origin.addr()])
                    .keepalive(4)
                    .keepalive_linger(linger),
            )
            .route(Route::prefix("/", "app")));
        let gw = Gateway::with(&config);
        let n = requests.to_string();
        let out = Command::new("h2load")
            .args(["-n", &n, "-c", "2", "-m", "100"])
            .arg(format!("http://{}/burst", gw.http_addr()))
            .output()
            .expect("run h2load");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(text.contains(&format!("status codes: {n} 2xx")), "{text}");
        origin.accepts()
    };
    let lingering = run("10s");
    // At most one connection per stream in flight at once (2 x 100), however many rounds.
    assert!(
        lingering <= 200,
        "{lingering} upstream connections for {requests} requests of 200 at a time"
    );
    let strict = run("0s");
    eprintln!(
        "upstream connections for {requests} requests: {lingering} lingering, {strict} strict"
    );
    assert!(
        strict > lingering,
        "closing beyond keepalive at once reconnects more: {strict} against {lingering}"
    );
}

#[test]
fn a_slow_reader_does_not_hold_up_another_stream() {
    let big = vec![b'b'; 4 << 20];
    let big2 = big.clone();
    let origin = Origin::start(move |r| {
        if r.path() == "/big" {
            Reply::ok(big2.clone())
        } else {
            Reply::ok("small")
        }
    });
    let gw = Gateway::with(&h2c(Config::proxy_all(&[origin.addr()]).workers(1)));
    // Stream windows of 64 KiB, a connection window that never fills: /big stalls on its
    // own stream window only.
    let mut builder = h2::client::Builder::new();
    builder
        .initial_window_size(65_535)
        .initial_connection_window_size(64 << 20);
    let c = H2Client::connect_with(gw.http_addr(), builder);
    let mut send = c.send.clone();
    c.rt.block_on(async move {
        let mut s = send.clone().ready().await.unwrap();
        let (resp, _) = s.send_request(H2Req::get("/big").build(), true).unwrap();
        let resp = resp.await.unwrap();
        let mut big_body = resp.into_body();
        // Read nothing of /big for a while: its window closes, and the gateway must keep
        // serving other streams on the connection.
        let started = Instant::now();
        let small = exchange(&mut send, &H2Req::get("/small")).await.unwrap();
        assert_eq!(small.body, b"small");
        assert!(started.elapsed() < Duration::from_secs(5));
        let mut got = 0;
        while let Some(chunk) = big_body.data().await {
            let chunk = chunk.unwrap();
            got += chunk.len();
            let _ = big_body.flow_control().release_capacity(chunk.len());
            tokio::time::sleep(Duration::from_micros(100)).await;
        }
        assert_eq!(got, big.len());
    });
}

#[test]
fn upstream_think_time_is_not_charged_to_the_client_write() {
    // The response's write clock (send_timeout, client_min_rate) starts with its head, as
    // for HTTP/1: an upstream slower than send_timeout does not cut a reading client, even
    // one whose small window makes the gateway wait for WINDOW_UPDATEs.
    let origin = Origin::start(|_| Reply::ok(vec![b's'; 1000]).delay(Duration::from_millis(1500)));
    let config = h2c(Config::new()
        .workers(1)
        .upstream(Upstream::new("app", &[origin.addr()]))
        .route(
            Route::prefix("/", "app")
                .send_timeout("1s")
                .read_timeout("5s"),
        ));
    let gw = Gateway::with(&config);
    let mut builder = h2::client::Builder::new();
    builder.initial_window_size(100);
    let mut c = H2Client::connect_with(gw.http_addr(), builder);
    let r = c.get("/think");
    assert_eq!((r.status, r.body.len()), (200, 1000));
}

#[test]
fn a_zero_window_reader_is_reset_at_send_timeout() {
    let origin = Origin::start(|r| match r.path() {
        "/empty" => Reply::new(204),
        _ => Reply::ok(vec![b'z'; 10_000]),
    });
    let config = h2c(Config::new()
        .workers(1)
        .upstream(Upstream::new("app", &[origin.addr()]).keepalive(4))
        .route(Route::prefix("/", "app").send_timeout("1s")));
    let gw = Gateway::with(&config);
    let mut raw = RawH2::connect(gw.http_addr());
    // SETTINGS_INITIAL_WINDOW_SIZE = 0: no DATA may be sent on any stream.
    raw.frame(SETTINGS, 0, 0, &[0x00, 0x04, 0, 0, 0, 0]);
    raw.headers(1, &get_fields(b"/zero"), true);
    assert_eq!(
        raw.fate(1),
        StreamFate::Answered,
        "the head is not flow-controlled"
    );
    let started = Instant::now();
    assert_eq!(
        raw.fate(1),
        StreamFate::Reset(0x8),
        "CANCEL at send_timeout"
    );
    assert!(started.elapsed() < Duration::from_secs(4));
    // HEAD and 204 need no window: answered without a body.
    let mut c = H2Client::connect(gw.http_addr());
    let head = c.request(&H2Req::get("/h").method("HEAD")).unwrap();
    assert_eq!((head.status, head.body.len()), (200, 0));
    assert_eq!(head.header("content-length"), Some("10000"));
    let empty = c.get("/empty");
    assert_eq!((empty.status, empty.body.len()), (204, 0));
}

#[test]
fn a_stalled_stream_holds_no_upstream_connection() {
    // The upstream connection goes back to the pool as soon as its response was read whole,
    // before the client has taken it (as nginx frees it before writing to the client): a
    // stream whose client keeps its window closed does not make the next request connect.
    let origin = Origin::start(|_| Reply::ok(vec![b'w'; 100]));
    let config = h2c(Config::new()
        .workers(1)
        .upstream(Upstream::new("app", &[origin.addr()]).keepalive(4))
        .route(Route::prefix("/", "app").send_timeout("30s")));
    let gw = Gateway::with(&config);
    let mut raw = RawH2::connect(gw.http_addr());
    // SETTINGS_INITIAL_WINDOW_SIZE = 0: the body waits for a WINDOW_UPDATE that never comes.
    raw.frame(SETTINGS, 0, 0, &[0x00, 0x04, 0, 0, 0, 0]);
    raw.headers(1, &get_fields(b"/stalled"), true);
    assert_eq!(raw.fate(1), StreamFate::Answered);
    let mut c = H2Client::connect(gw.http_addr());
    assert_eq!(c.get("/next").status, 200);
    let seen = origin.requests();
    assert_eq!(seen.len(), 2);
    assert_eq!(
        seen[1].conn, seen[0].conn,
        "the stalled stream's upstream connection served the next request"
    );
}

#[test]
fn a_hundred_concurrent_streams_on_one_connection() {
    let origin = Origin::start(|r| Reply::ok(r.target.clone()).delay(Duration::from_millis(50)));
    let gw = Gateway::with(&h2c(Config::proxy_all(&[origin.addr()]).workers(1)));
    let c = H2Client::connect(gw.http_addr());
    let send = c.send.clone();
    let started = Instant::now();
    let bodies = c.rt.block_on(async move {
        let mut set = tokio::task::JoinSet::new();
        for i in 0..100 {
            let mut send = send.clone();
            set.spawn(async move {
                let r = exchange(&mut send, &H2Req::get(&format!("/s/{i}")))
                    .await
                    .unwrap();
                (r.status, String::from_utf8(r.body).unwrap())
            });
        }
        let mut out = Vec::new();
        while let Some(r) = set.join_next().await {
            out.push(r.unwrap());
        }
        out
    });
    assert_eq!(bodies.len(), 100);
    assert!(bodies
        .iter()
        .all(|(s, b)| *s == 200 && b.starts_with("/s/")));
    // 100 × 50 ms one after another would take 5 s.
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn a_client_reset_closes_the_upstream_connection() {
    // Waiting for the head, and waiting for the rest of a body already begun.
    let origin = Origin::start(|r| {
        if r.path() == "/partial" {
            Reply::ok(vec![b'p'; 100_000]).partial_then_stall(1000)
        } else {
            Reply::stall()
        }
    });
    let gw = Gateway::with(&h2c(Config::proxy_all(&[origin.addr()]).workers(1)));
    let mut raw = RawH2::connect(gw.http_addr());
    for (stream, path) in [(1, &b"/slow"[..]), (3, b"/partial")] {
        let mut fields = get_fields(b"/");
        fields[3].1 = path;
        raw.headers(stream, &fields, true);
        wait_until(Duration::from_secs(5), "the request at the origin", || {
            origin.active() == 1
        });
        if stream == 3 {
            assert_eq!(
                raw.fate(3),
                StreamFate::Answered,
                "the head came before the stall"
            );
        }
        raw.frame(RST_STREAM, 0, stream, &0x8u32.to_be_bytes()); // CANCEL
        wait_until(
            Duration::from_secs(3),
            "the upstream connection closed",
            || origin.active() == 0,
        );
    }
    wait_until(Duration::from_secs(5), "the resets counted", || {
        scrape(gw.admin_addr())
            .get(
                "gateway_http2_resets_total",
                &[("listener", "http"), ("direction", "received")],
            )
            .is_some_and(|n| n >= 2.0)
    });
    // Both reached the origin: logged 499 with it, as HTTP/1 logs a request its client left.
    let upstream = origin.addr().to_string();
    for path in ["/slow", "/partial"] {
        let line = gw.wait_access_line(Duration::from_secs(5), |l| {
            l.contains(&format!("\"GET {path} HTTP/2.0\" 499"))
        });
        assert!(line.ends_with(&upstream), "{line}");
    }
}

#[test]
fn smuggling_shaped_requests_never_reach_the_upstream() {
    let (gw, origin) = echo_gateway();
    type Fields = Vec<(&'static [u8], &'static [u8])>;
    let with = |extra: Fields| {
        let mut f = get_fields(b"/x");
        f.extend(extra);
        f
    };
    let cases: Vec<(&str, Fields)> = vec![
        ("connection", with(vec![(b"connection", b"keep-alive")])),
        (
            "transfer-encoding",
            with(vec![(b"transfer-encoding", b"chunked")]),
        ),
        ("upgrade", with(vec![(b"upgrade", b"websocket")])),
        ("keep-alive", with(vec![(b"keep-alive", b"5")])),
        ("te gzip", with(vec![(b"te", b"gzip")])),
        ("uppercase", with(vec![(b"X-Upper", b"1")])),
        ("CR", with(vec![(b"x-a", b"1\r\nx-b: 2")])),
        ("LF", with(vec![(b"x-a", b"1\nx")])),
        ("NUL", with(vec![(b"x-a", b"1\0")])),
        // RFC 9113 §8.2.1: HTTP/1.1 would strip the whitespace, so the upstream would see
        // another value than the one checked.
        ("leading SP", with(vec![(b"x-a", b" 1")])),
        ("trailing HTAB", with(vec![(b"x-a", b"1\t")])),
        // The h2c Upgrade's field is connection-specific (RFC 7540 §3.2.1).
        (
            "http2-settings",
            with(vec![(b"http2-settings", b"AAMAAABkAAQAAP__")]),
        ),
        (
            "no :path",
            vec![
                (b":method", b"GET"),
                (b":scheme", b"http"),
                (b":authority", b"a"),
            ],
        ),
        ("unknown pseudo", with(vec![(b":foo", b"bar")])),
        ("pseudo after regular", {
            let mut f = vec![(&b":method"[..], &b"GET"[..]), (b"x-a", b"1")];
            f.extend([(&b":scheme"[..], &b"http"[..]), (b":path", b"/x")]);
            f
        }),
        ("two :path", with(vec![(b":path", b"/y")])),
        ("relative :path", {
            let mut f = get_fields(b"x");
            f.truncate(4);
            f
        }),
    ];
    for (what, fields) in cases {
        let mut raw = RawH2::connect(gw.http_addr());
        raw.headers(1, &fields, true);
        let fate = raw.fate(1);
        assert!(
            matches!(
                fate,
                StreamFate::Reset(PROTOCOL_ERROR) | StreamFate::GoAway(PROTOCOL_ERROR)
            ),
            "{what}: {fate:?}"
        );
    }
    // `te: trailers` is allowed (and not forwarded: the upstream leg has no trailers).
    let mut raw = RawH2::connect(gw.http_addr());
    let mut f = get_fields(b"/te");
    f.push((b"te", b"trailers"));
    raw.headers(1, &f, true);
    assert_eq!(raw.fate(1), StreamFate::Answered);
    wait_until(Duration::from_secs(5), "the te request", || {
        origin.request_count() == 1
    });
    let seen = origin.requests();
    assert_eq!(
        seen[0].path(),
        "/te",
        "only the valid request went upstream"
    );
    assert!(!seen[0].has_header("te"));
}

#[test]
fn request_rate_counts_each_stream() {
    let origin = Origin::echo();
    let config = h2c(Config::proxy_all(&[origin.addr()]).workers(1))
        .extra("[limits]\nrequest_rate = \"2/s\"\nrequest_burst = 2\n");
    let gw = Gateway::with(&config);
    let mut c = H2Client::connect(gw.http_addr());
    let statuses: Vec<u16> = (0..8).map(|_| c.get("/r").status).collect();
    assert_eq!(statuses[0], 200, "{statuses:?}");
    let limited = (0..4).map(|_| c.get("/r")).find(|r| r.status == 429);
    let limited = limited.expect("429 once over the rate");
    assert!(limited.header("retry-after").is_some());
}

#[test]
fn max_requests_per_connection_ends_with_goaway() {
    let origin = Origin::echo();
    let config = h2c(Config::proxy_all(&[origin.addr()]).workers(1))
        .extra("[http2]\nmax_requests_per_connection = 3\n");
    let gw = Gateway::with(&config);
    let mut c = H2Client::connect(gw.http_addr());
    for _ in 0..3 {
        assert_eq!(c.get("/m").status, 200);
    }
    assert!(
        c.request(&H2Req::get("/m")).is_err(),
        "a fourth stream after GOAWAY is refused"
    );
    assert!(c.closed_within(Duration::from_secs(5)));
    wait_until(Duration::from_secs(5), "the GOAWAY counted", || {
        scrape(gw.admin_addr())
            .get(
                "gateway_http2_goaways_total",
                &[("listener", "http"), ("reason", "max_requests")],
            )
            .is_some_and(|n| n >= 1.0)
    });
}

/// RST_STREAM REFUSED_STREAM (RFC 9113 §8.7): not processed, safe to retry.
const REFUSED_STREAM: u32 = 0x7;

/// Reads frames until the connection ends, never answering a PING (the client that keeps
/// h2's graceful shutdown from ever sending its final GOAWAY); returns the streams reset
/// with REFUSED_STREAM and when the connection ended.
fn refused_until_close(raw: &mut RawH2, within: Duration) -> (Vec<u32>, Instant) {
    let mut refused = Vec::new();
    let deadline = Instant::now() + within;
    while let Some(f) = raw.read_frame(deadline.saturating_duration_since(Instant::now())) {
        if f.kind == RST_STREAM
            && u32::from_be_bytes(f.payload[..4].try_into().unwrap()) == REFUSED_STREAM
        {
            refused.push(f.stream);
        }
    }
    (refused, Instant::now())
}

/// A burst of GETs on streams `ids`.
fn burst(raw: &mut RawH2, ids: impl Iterator<Item = u32>) {
    let block = gateway_tests::h2::hpack_literals(&get_fields(b"/burst"));
    let bytes: Vec<u8> = ids
        .flat_map(|id| frame_bytes(HEADERS, END_HEADERS | END_STREAM, id, &block))
        .collect();
    raw.send_bytes(&bytes);
}

#[test]
fn a_client_that_never_acks_the_goaway_ping_gets_no_stream_past_the_limit() {
    let origin = Origin::start(|_| Reply::ok("slow").delay(Duration::from_millis(800)));
    let config = h2c(Config::proxy_all(&[origin.addr()]).workers(1))
        .extra("[http2]\nmax_requests_per_connection = 3\n");
    let gw = Gateway::with(&config);
    let mut raw = RawH2::connect(gw.http_addr());
    let started = Instant::now();
    // Twice the limit in one burst: counted at accept, so only the first 3 are forwarded.
    burst(&mut raw, (0..6).map(|i| 1 + 2 * i));
    wait_until(Duration::from_secs(5), "the first three upstream", || {
        origin.heads_seen() >= 3
    });
    // While those are open, the client ignores the GOAWAY and its PING and keeps opening
    // streams: 3x the limit in all.
    burst(&mut raw, (6..9).map(|i| 1 + 2 * i));
    let (refused, closed) = refused_until_close(&mut raw, Duration::from_secs(10));
    assert_eq!(
        origin.heads_seen(),
        3,
        "exactly max_requests_per_connection forwarded"
    );
    assert_eq!(refused, [7, 9, 11, 13, 15, 17], "streams past the limit");
    assert!(
        closed - started < Duration::from_secs(5),
        "closed once the three streams ended, not at graceful_timeout (30 s)"
    );
}

#[test]
fn a_drain_forwards_no_stream_opened_after_it_and_exits_when_the_open_ones_end() {
    let origin = Origin::start(|_| Reply::ok("late").delay(Duration::from_millis(800)));
    let mut gw = Gateway::with(&h2c(Config::proxy_all(&[origin.addr()]).workers(1)));
    let mut raw = RawH2::connect(gw.http_addr());
    raw.headers(1, &get_fields(b"/inflight"), true);
    wait_until(Duration::from_secs(5), "the first request upstream", || {
        origin.active() == 1
    });
    let signalled = Instant::now();
    gw.signal(libc::SIGTERM);
    // The GOAWAY(2^31-1) of the drain, then streams from a client that never ACKs the PING.
    while let Some(f) = raw.read_frame(Duration::from_secs(5)) {
        if f.kind == GOAWAY {
            break;
        }
    }
    burst(&mut raw, (1..20).map(|i| 1 + 2 * i));
    let (refused, closed) = refused_until_close(&mut raw, Duration::from_secs(10));
    assert_eq!(
        origin.heads_seen(),
        1,
        "nothing opened after the drain went upstream"
    );
    assert_eq!(refused.len(), 19, "{refused:?}");
    assert!(
        closed - signalled < Duration::from_secs(5),
        "closed when the open stream ended, not at graceful_timeout"
    );
    assert!(gw.wait_exit(Duration::from_secs(5)).is_some());
}

#[test]
fn ping_and_settings_floods_close_the_connection() {
    let (gw, _origin) = echo_gateway();
    // Unsolicited PING ACKs cost h2 as much as PINGs: they count too.
    for (kind, flags) in [(PING, 0), (SETTINGS, 0), (PING, 0x1)] {
        let mut raw = RawH2::connect(gw.http_addr());
        let payload: &[u8] = if kind == PING { &[0; 8] } else { &[] };
        let flood: Vec<u8> = (0..1000)
            .flat_map(|_| frame_bytes(kind, flags, 0, payload))
            .collect();
        raw.send_bytes(&flood);
        let mut goaway = None;
        while let Some(f) = raw.read_frame(Duration::from_secs(5)) {
            if f.kind == GOAWAY {
                goaway = Some(u32::from_be_bytes(f.payload[4..8].try_into().unwrap()));
            }
        }
        assert_eq!(
            goaway,
            Some(ENHANCE_YOUR_CALM),
            "kind {kind} flags {flags}: GOAWAY, then close"
        );
    }
    // A client within the budget is served.
    let mut c = H2Client::connect(gw.http_addr());
    assert_eq!(c.get("/after").status, 200);
}

/// WINDOW_UPDATE, PRIORITY frames.
const PRIORITY: u8 = 0x2;
const WINDOW_UPDATE: u8 = 0x8;

/// Sends `frames` on a fresh connection whose stream 1 is an open GET the origin takes its
/// time over (a zero-window stream in all but name: nothing is sent on it meanwhile); the
/// GOAWAY codes seen until the gateway closed.
fn flood_codes(gw: &Gateway, frames: &[u8]) -> Vec<u32> {
    let mut raw = RawH2::connect(gw.http_addr());
    raw.headers(1, &get_fields(b"/slow"), true);
    raw.send_bytes(frames);
    goaways_until_close(&mut raw)
}

/// Opens `streams` on one connection to a slow origin: `forwarded` reach it, the others
/// are answered at once. The connection, still holding its streams.
fn streams_past_the_budget(gw: &Gateway, origin: &Origin, streams: u32, forwarded: usize) -> RawH2 {
    let mut raw = RawH2::connect(gw.http_addr());
    for i in 0..streams {
        raw.headers(1 + 2 * i, &get_fields(b"/held"), true);
    }
    wait_until(
        Duration::from_secs(10),
        "the budgeted streams upstream",
        || origin.active() == forwarded,
    );
    let mut refused = 0;
    let deadline = Instant::now() + Duration::from_secs(5);
    while let Some(f) = raw.read_frame(deadline.saturating_duration_since(Instant::now())) {
        // The 503 heads (HPACK static index 14 is `:status 503`, or a literal).
        if f.kind == HEADERS {
            refused += 1;
        }
        if refused == (streams as usize - forwarded) {
            break;
        }
    }
    assert_eq!(
        refused,
        streams as usize - forwarded,
        "streams answered at once"
    );
    assert_eq!(
        origin.active(),
        forwarded,
        "none past the budget reached the origin"
    );
    raw
}

#[test]
fn upstream_sockets_of_streams_count_as_connections() {
    // Attack report F2: each stream holds an upstream socket, so 100 streams on one
    // connection are 101 descriptors where `max_connections` allows two.
    let origin = Origin::start(|_| Reply::ok("held").delay(Duration::from_secs(3)));
    // Per IP: the connection and three streams make four.
    let config = h2c(Config::proxy_all(&[origin.addr()]).workers(1))
        .extra("[limits]\nmax_conns_per_ip = 4\n");
    let gw = Gateway::with(&config);
    let held = streams_past_the_budget(&gw, &origin, 6, 3);
    // Meanwhile the address is at its cap for connections too.
    let another = gateway_tests::client::one_shot(
        gw.http_addr(),
        &gateway_tests::client::Req::get("/refused"),
    );
    assert!(another.is_err(), "a fifth descriptor: {another:?}");
    wait_until(Duration::from_secs(5), "the refusals counted", || {
        scrape(gw.admin_addr()).sum(
            "gateway_limit_rejections_total",
            &[("limit", "max_conns_per_ip")],
        ) >= 4.0
    });
    // The client goes: its slots come back and it is served again.
    drop(held);
    wait_until(Duration::from_secs(10), "served again", || {
        gateway_tests::client::one_shot(gw.http_addr(), &gateway_tests::client::Req::get("/a"))
            .is_ok_and(|r| r.status == 200)
    });
    let mut c = H2Client::connect(gw.http_addr());
    assert_eq!(c.get("/again").status, 200);

    // For the whole process: `max_connections` 5 is the connection and four streams.
    let origin = Origin::start(|_| Reply::ok("held").delay(Duration::from_secs(3)));
    let config =
        h2c(Config::proxy_all(&[origin.addr()]).workers(1)).server_raw("max_connections", "5");
    let gw = Gateway::with(&config);
    let _held = streams_past_the_budget(&gw, &origin, 7, 4);
    wait_until(Duration::from_secs(10), "refusals counted", || {
        scrape(gw.admin_addr()).sum(
            "gateway_local_refusals_total",
            &[("reason", "max_connections")],
        ) >= 3.0
    });
}

#[test]
fn window_update_priority_and_unknown_frame_floods_close_the_connection() {
    let origin = Origin::start(|_| Reply::ok("late").delay(Duration::from_secs(3)));
    let gw = Gateway::with(&h2c(Config::proxy_all(&[origin.addr()]).workers(1)));
    let many = |kind: u8, flags: u8, stream: u32, payload: &[u8]| -> Vec<u8> {
        (0..5000)
            .flat_map(|_| frame_bytes(kind, flags, stream, payload))
            .collect()
    };
    let floods = [
        // +1 on a stream nothing is sent on (attack report F4), on the connection.
        (
            "stream WINDOW_UPDATE",
            many(WINDOW_UPDATE, 0, 1, &1u32.to_be_bytes()),
        ),
        (
            "connection WINDOW_UPDATE",
            many(WINDOW_UPDATE, 0, 0, &1u32.to_be_bytes()),
        ),
        ("PRIORITY", many(PRIORITY, 0, 3, &[0, 0, 0, 0, 15])),
        // RFC 9113 §5.5: unknown types are ignored, so they are free to send.
        ("unknown type", many(0xfa, 0, 0, b"x")),
        // Empty DATA carries nothing (stream 1 has ended: h2 answers each with a reset).
        ("empty DATA", many(0x0, 0, 1, b"")),
    ];
    for (name, frames) in &floods {
        let codes = flood_codes(&gw, frames);
        assert_eq!(codes.last(), Some(&ENHANCE_YOUR_CALM), "{name}: {codes:?}");
    }
    wait_until(Duration::from_secs(5), "the floods counted", || {
        scrape(gw.admin_addr()).get(
            "gateway_http2_goaways_total",
            &[("listener", "http"), ("reason", "flood")],
        ) >= Some(floods.len() as f64)
    });
    // A client reading a large body sends a WINDOW_UPDATE per chunk it consumed: served.
    let big = Origin::start(|_| Reply::ok(vec![b'b'; 8 << 20]));
    let gw = Gateway::with(&h2c(Config::proxy_all(&[big.addr()]).workers(1)));
    let mut c = H2Client::connect_with(
        gw.http_addr(),
        h2::client::Builder::new()
            .initial_window_size(16 * 1024)
            .initial_connection_window_size(16 * 1024)
            .clone(),
    );
    for _ in 0..3 {
        let r = c.get("/big");
        assert_eq!((r.status, r.body.len()), (200, 8 << 20));
    }
}

#[test]
fn a_frame_flood_within_the_budgets_does_not_starve_the_other_connections() {
    // A budget no flood reaches: only the fairness of the connection is left to protect
    // the worker's other clients (HTTP/1 on io_uring, upstream legs).
    let origin = Origin::echo();
    let config = h2c(Config::proxy_all(&[origin.addr()]).workers(1))
        .extra("[http2]\nmax_control_frames_per_second = 100000000\n");
    let gw = Gateway::with(&config);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flooders: Vec<_> = (0..3)
        .map(|_| {
            let mut raw = RawH2::connect(gw.http_addr());
            let mut reader = raw.sock.try_clone().unwrap();
            std::thread::spawn(move || {
                let mut sink = [0u8; 65536];
                while std::io::Read::read(&mut reader, &mut sink).is_ok_and(|n| n > 0) {}
            });
            let stop = stop.clone();
            // Frames of an unknown type: h2 reads and drops each (RFC 9113 §5.5), the
            // cheapest frame there is.
            let blob: Vec<u8> = (0..5000)
                .flat_map(|_| frame_bytes(0xfa, 0, 0, b"x"))
                .collect();
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    if std::io::Write::write_all(&mut raw.sock, &blob).is_err() {
                        return false;
                    }
                }
                true
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let mut slowest = Duration::ZERO;
    let probing = Instant::now();
    while probing.elapsed() < Duration::from_secs(3) {
        let asked = Instant::now();
        let r = gw.get("/probe");
        assert_eq!(r.status, 200);
        slowest = slowest.max(asked.elapsed());
        std::thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(
        slowest < Duration::from_secs(1),
        "an HTTP/1 request beside the flood took {slowest:?}"
    );
    for f in flooders {
        assert!(f.join().unwrap(), "a flood within the budget is not cut");
    }
}

#[test]
fn rapid_reset_and_continuation_floods_end_the_connection() {
    let (gw, origin) = echo_gateway();
    // Rapid reset (CVE-2023-44487): streams opened and reset at once, in one write.
    let mut raw = RawH2::connect(gw.http_addr());
    let block = gateway_tests::h2::hpack_literals(&get_fields(b"/reset"));
    let mut burst = Vec::new();
    for i in 0..2000u32 {
        let id = 1 + 2 * i;
        burst.extend(frame_bytes(HEADERS, END_HEADERS | END_STREAM, id, &block));
        burst.extend(frame_bytes(RST_STREAM, 0, id, &0x8u32.to_be_bytes()));
    }
    raw.send_bytes(&burst);
    let codes = goaways_until_close(&mut raw);
    assert_eq!(
        codes.last(),
        Some(&ENHANCE_YOUR_CALM),
        "rapid reset: {codes:?}"
    );
    // A CONTINUATION flood: a header block that never ends.
    let mut raw = RawH2::connect(gw.http_addr());
    raw.frame(HEADERS, END_STREAM, 1, &block);
    let filler = gateway_tests::h2::hpack_literals(&[(b"x-a", b"b")]);
    let flood: Vec<u8> = (0..20_000)
        .flat_map(|_| frame_bytes(CONTINUATION, 0, 1, &filler))
        .collect();
    raw.send_bytes(&flood);
    let codes = goaways_until_close(&mut raw);
    assert!(
        !codes.is_empty() && codes.iter().all(|&c| c != 0),
        "CONTINUATION: {codes:?}"
    );
    // Neither held the gateway up.
    let mut c = H2Client::connect(gw.http_addr());
    assert_eq!(c.get("/after").status, 200);
    assert!(origin.request_count() < 2000, "{}", origin.request_count());
}

#[test]
fn drain_sends_goaway_and_finishes_open_streams() {
    let origin = Origin::start(|_| Reply::ok("late").delay(Duration::from_millis(800)));
    let mut gw = Gateway::with(&h2c(Config::proxy_all(&[origin.addr()]).workers(1)));
    let c = H2Client::connect(gw.http_addr());
    let mut send = c.send.clone();
    let body = c.rt.block_on(async {
        let pending = tokio::spawn(async move { exchange(&mut send, &H2Req::get("/late")).await });
        let deadline = Instant::now() + Duration::from_secs(5);
        while origin.active() == 0 {
            assert!(
                Instant::now() < deadline,
                "the request never reached the origin"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        gw.signal(libc::SIGTERM);
        pending.await.unwrap()
    });
    let r = body.expect("the open stream finishes after GOAWAY");
    assert_eq!((r.status, &r.body[..]), (200, &b"late"[..]));
    assert!(gw.wait_exit(Duration::from_secs(10)).is_some());
}

#[test]
fn drain_goaway_is_a_frame_on_the_wire() {
    let (mut gw, _origin) = echo_gateway();
    let mut raw = RawH2::connect(gw.http_addr());
    raw.headers(1, &get_fields(b"/first"), true);
    assert_eq!(raw.fate(1), StreamFate::Answered);
    gw.signal(libc::SIGTERM);
    // GOAWAY, a PING to learn what the client sent meanwhile (h2's graceful shutdown),
    // then the final GOAWAY and the close.
    let mut kinds = Vec::new();
    let started = Instant::now();
    while let Some(f) = raw.read_frame(Duration::from_secs(5)) {
        kinds.push(f.kind);
        if f.kind == PING && f.flags & 0x1 == 0 {
            raw.frame(PING, 0x1, 0, &f.payload);
        }
    }
    assert!(kinds.contains(&GOAWAY), "{kinds:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "closed at once: {kinds:?}"
    );
    assert!(gw.wait_exit(Duration::from_secs(10)).is_some());
}

/// Reads frames (acking PINGs) until the connection ends; returns the GOAWAY codes seen.
fn goaways_until_close(raw: &mut RawH2) -> Vec<u32> {
    let mut codes = Vec::new();
    while let Some(f) = raw.read_frame(Duration::from_secs(5)) {
        match f.kind {
            GOAWAY => codes.push(u32::from_be_bytes(f.payload[4..8].try_into().unwrap())),
            PING if f.flags & 0x1 == 0 => raw.frame(PING, 0x1, 0, &f.payload),
            _ => {}
        }
    }
    codes
}

/// A gateway (h2c, no idle timeout in the way) and one raw connection that got an answer.
fn answered_connection() -> (Gateway, Origin, RawH2) {
    let origin = Origin::echo();
    let config = h2c(Config::proxy_all(&[origin.addr()]).workers(1))
        .extra("[http2]\nidle_timeout = \"60s\"\n");
    let gw = Gateway::with(&config);
    let mut raw = RawH2::connect(gw.http_addr());
    raw.headers(1, &get_fields(b"/a"), true);
    assert_eq!(raw.fate(1), StreamFate::Answered);
    (gw, origin, raw)
}

/// Rewrites the config file with `edit` and reloads it.
fn reload_with(gw: &Gateway, edit: impl FnOnce(&str) -> String) {
    let text = std::fs::read_to_string(gw.config_path()).unwrap();
    let new = edit(&text);
    assert_ne!(new, text);
    write_atomically(gw.config_path(), &new);
    let status = admin_request(gw.admin_addr(), "POST", "/reload", None).status;
    assert_eq!(status, 200);
}

#[test]
fn a_reload_that_changes_the_listener_sends_goaway() {
    let (gw, _origin, mut unchanged) = answered_connection();
    // A reload that leaves the listener as it is keeps the connection.
    reload_with(&gw, |text| format!("{text}\n# touched\n"));
    let quiet_until = Instant::now() + Duration::from_millis(2500);
    while let Some(left) = quiet_until.checked_duration_since(Instant::now()) {
        match unchanged.read_frame(left) {
            Some(f) => assert_ne!(
                f.kind, GOAWAY,
                "an unchanged listener keeps its connections"
            ),
            None => break,
        }
    }
    unchanged.headers(3, &get_fields(b"/b"), true);
    assert_eq!(unchanged.fate(3), StreamFate::Answered, "still serving");
    // One that changes it (trusted_proxies) ends them with GOAWAY, open streams finishing.
    reload_with(&gw, |text| {
        text.replacen(
            "h2c = true",
            "h2c = true\ntrusted_proxies = [\"192.0.2.0/24\"]",
            1,
        )
    });
    let codes = goaways_until_close(&mut unchanged);
    assert_eq!(codes.first(), Some(&0), "GOAWAY NO_ERROR: {codes:?}");
    wait_until(Duration::from_secs(5), "the reload GOAWAY counted", || {
        scrape(gw.admin_addr()).sum("gateway_http2_goaways_total", &[("reason", "reload")]) >= 1.0
    });
}

#[test]
fn a_reload_that_denies_the_client_closes_its_connection() {
    let (gw, _origin, mut raw) = answered_connection();
    reload_with(&gw, |text| {
        format!("{text}\n[limits]\ndeny = [\"127.0.0.1/32\"]\n")
    });
    let started = Instant::now();
    let codes = goaways_until_close(&mut raw);
    assert!(!codes.is_empty(), "GOAWAY, then the close");
    assert!(started.elapsed() < Duration::from_secs(4));
    wait_until(Duration::from_secs(5), "the denied GOAWAY counted", || {
        scrape(gw.admin_addr()).sum("gateway_http2_goaways_total", &[("reason", "denied")]) >= 1.0
    });
}

#[test]
fn an_idle_connection_is_closed_with_goaway() {
    let origin = Origin::echo();
    let config = h2c(Config::proxy_all(&[origin.addr()]).workers(1))
        .extra("[http2]\nidle_timeout = \"1s\"\n");
    let gw = Gateway::with(&config);
    let mut raw = RawH2::connect(gw.http_addr());
    raw.headers(1, &get_fields(b"/a"), true);
    assert_eq!(raw.fate(1), StreamFate::Answered);
    let started = Instant::now();
    let codes = goaways_until_close(&mut raw);
    assert_eq!(codes.first(), Some(&0), "{codes:?}");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(800) && waited < Duration::from_secs(4),
        "{waited:?}"
    );
}

#[test]
fn a_header_list_over_the_limit_never_reaches_the_upstream() {
    let origin = Origin::echo();
    let config = h2c(Config::proxy_all(&[origin.addr()]).workers(1))
        .extra("[http2]\nmax_header_list_size = \"2KiB\"\n");
    let gw = Gateway::with(&config);
    let big = vec![b'v'; 4096];
    let mut raw = RawH2::connect(gw.http_addr());
    let mut fields = get_fields(b"/big-head");
    fields.push((b"x-big", &big));
    raw.headers(1, &fields, true);
    let fate = raw.fate(1);
    assert_ne!(fate, StreamFate::Closed);
    // h2 answers 431 itself or resets; either way nothing went upstream.
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(origin.request_count(), 0, "{fate:?}");
}

// ---------------------------------------------------------------------------------------
// TLS: ALPN per listener, with curl.

/// curl over TLS: the HTTP version it used and the status.
fn curl(addr: std::net::SocketAddr, flag: &str) -> (String, String) {
    let out = Command::new("curl")
        .args([
            "-sk",
            flag,
            "-o",
            "/dev/null",
            "-w",
            "%{http_version} %{http_code}",
        ])
        .arg("--resolve")
        .arg(format!("localhost:{}:{}", addr.port(), addr.ip()))
        .arg(format!("https://localhost:{}/tls", addr.port()))
        .output()
        .expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (v, s) = text.split_once(' ').unwrap_or(("", ""));
    (v.to_string(), s.to_string())
}

#[test]
fn tls_listeners_offer_h2_then_http1_as_configured() {
    let origin = Origin::echo();
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = gateway_tests::self_signed_certificate(dir.path());
    let (both, h1_only) = (gateway_tests::free_addr(), gateway_tests::free_addr());
    let tls = format!(
        "tls = {{ certificates = [{{ cert = {:?}, key = {:?} }}] }}",
        cert.display().to_string(),
        key.display().to_string()
    );
    let config = Config::proxy_all(&[origin.addr()])
        .workers(1)
        .extra(&format!(
            "[[listener]]\nname = \"https\"\nlisten = \"{both}\"\n{tls}\n\n\
         [[listener]]\nname = \"legacy\"\nlisten = \"{h1_only}\"\nalpn = [\"http/1.1\"]\n{tls}\n"
        ));
    let gw = Gateway::with(&config);
    assert_eq!(curl(both, "--http2"), ("2".into(), "200".into()));
    assert_eq!(curl(both, "--http1.1"), ("1.1".into(), "200".into()));
    assert_eq!(curl(h1_only, "--http2"), ("1.1".into(), "200".into()));
    let seen = origin.requests();
    assert_eq!(seen[0].header("x-forwarded-proto"), Some("https"));
    assert_eq!(
        seen[0].header("host").map(|h| h.starts_with("localhost:")),
        Some(true)
    );
    gw.wait_access_line(Duration::from_secs(5), |l| {
        l.contains("\"GET /tls HTTP/2.0\" 200")
    });
    // h2load over TLS (ALPN h2): many streams on a few connections through TlsIo.
    let out = Command::new("h2load")
        .args(["-n", "1000", "-c", "4", "-m", "25"])
        .arg(format!("https://127.0.0.1:{}/tls-load", both.port()))
        .output()
        .expect("run h2load");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(text.contains("Application protocol: h2"), "{text}");
    assert!(text.contains("1000 succeeded, 0 failed"), "{text}");
}

#[test]
fn alpn_and_h2c_are_checked_per_listener_kind() {
    let origin = Origin::echo();
    for (key, value, complaint) in [
        ("alpn", "[\"h2\"]", "only on a TLS listener"),
        ("alpn", "[]", "at least one"),
        ("alpn", "[\"h3\"]", "allowed values"),
        ("h2c", "\"yes\"", "invalid type"),
    ] {
        let config = Config::proxy_all(&[origin.addr()]).listener_raw(key, value);
        let err = match Gateway::try_start(&config.to_toml()) {
            Err(e) => e,
            Ok(_) => panic!("{key} = {value} was accepted"),
        };
        assert!(err.contains(complaint), "{key}: {err}");
    }
}

// ---------------------------------------------------------------------------------------
// WebSocket over HTTP/2 (RFC 8441): extended CONNECT carried to HTTP/1.1 WebSocket origins.

/// What a WebSocket origin saw: the handshake's fields, and when a connection ended.
enum WsEvent {
    Handshake(Vec<(String, String)>),
    Ended,
}

/// A tungstenite echo origin (one thread per connection) that selects the first
/// subprotocol offered and reports each handshake and each connection's end.
fn ws_echo_origin() -> (std::net::SocketAddr, std::sync::mpsc::Receiver<WsEvent>) {
    use tungstenite::handshake::server::{Request, Response};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let (Ok(stream), tx) = (stream, tx.clone()) else {
                continue;
            };
            std::thread::spawn(move || {
                let seen = tx.clone();
                // tungstenite's callback type fixes the (large) error variant.
                #[allow(clippy::result_large_err)]
                let callback = move |req: &Request, mut resp: Response| {
                    let fields = req
                        .headers()
                        .iter()
                        .map(|(n, v)| (n.to_string(), v.to_str().unwrap_or("").to_string()))
                        .collect();
                    let _ = seen.send(WsEvent::Handshake(fields));
                    if let Some(p) = req.headers().get("sec-websocket-protocol") {
                        let first = p.to_str().unwrap().split(',').next().unwrap().trim();
                        resp.headers_mut()
                            .insert("sec-websocket-protocol", first.parse().unwrap());
                    }
                    Ok(resp)
                };
                if let Ok(mut ws) = tungstenite::accept_hdr(stream, callback) {
                    while let Ok(m) = ws.read() {
                        if (m.is_text() || m.is_binary()) && ws.send(m).is_err() {
                            break;
                        }
                    }
                }
                let _ = tx.send(WsEvent::Ended);
            });
        }
    });
    (addr, rx)
}

/// A WebSocket origin of raw bytes: answers the handshake with `accept` (given the key),
/// then runs `then` on the socket.
fn ws_raw_origin(
    accept: fn(&str) -> String,
    then: impl Fn(std::net::TcpStream) + Send + Sync + 'static,
) -> std::net::SocketAddr {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let then = std::sync::Arc::new(then);
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let (Ok(mut stream), then) = (stream, then.clone()) else {
                continue;
            };
            std::thread::spawn(move || {
                let mut key = String::new();
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    if line == "\r\n" {
                        break;
                    }
                    if let Some((n, v)) = line.split_once(':') {
                        if n.eq_ignore_ascii_case("sec-websocket-key") {
                            key = v.trim().to_string();
                        }
                    }
                }
                let head = format!(
                    "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
                    accept(&key)
                );
                let _ = stream.write_all(head.as_bytes());
                then(stream);
            });
        }
    });
    addr
}

fn right_accept(key: &str) -> String {
    tungstenite::handshake::derive_accept_key(key.as_bytes())
}

/// A client-to-server WebSocket frame (masked, RFC 6455 §5.2), FIN set.
fn ws_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let n = payload.len();
    let mut f = vec![0x80 | opcode];
    match n {
        0..=125 => f.push(0x80 | n as u8),
        126..=65535 => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        _ => {
            f.push(0x80 | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

/// One server frame from the front of `buf` (unmasked): (opcode, payload, its length).
fn ws_parse(buf: &[u8]) -> Option<(u8, Vec<u8>, usize)> {
    if buf.len() < 2 {
        return None;
    }
    let (len, at) = match buf[1] & 0x7f {
        126 if buf.len() >= 4 => (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4),
        127 if buf.len() >= 10 => (
            u64::from_be_bytes(buf[2..10].try_into().unwrap()) as usize,
            10,
        ),
        126 | 127 => return None,
        n => (n as usize, 2),
    };
    (buf.len() >= at + len).then(|| (buf[0] & 0x0f, buf[at..at + len].to_vec(), at + len))
}

/// An RFC 8441 WebSocket through the `h2` crate's client: extended CONNECT, then the
/// stream's DATA frames carry the WebSocket frames.
struct H2WebSocket {
    client: gateway_tests::h2::H2Client,
    send: h2::SendStream<bytes::Bytes>,
    recv: h2::RecvStream,
    buf: Vec<u8>,
}

/// Opens a WebSocket to `path` as RFC 8441 says (SETTINGS_ENABLE_CONNECT_PROTOCOL must
/// have come): the response status and fields, and the open stream when it is 200.
fn h2_websocket(
    addr: std::net::SocketAddr,
    path: &str,
    protocol: &'static str,
    fields: &[(&str, &str)],
) -> (u16, http::HeaderMap, Option<H2WebSocket>) {
    h2_websocket_on(H2Client::connect(addr), path, protocol, fields)
}

/// [`h2_websocket`] on a connection already open.
fn h2_websocket_on(
    client: H2Client,
    path: &str,
    protocol: &'static str,
    fields: &[(&str, &str)],
) -> (u16, http::HeaderMap, Option<H2WebSocket>) {
    let mut req = http::Request::builder()
        .method("CONNECT")
        .uri(format!("http://example.test{path}"));
    for (n, v) in fields {
        req = req.header(*n, *v);
    }
    let mut req = req.body(()).unwrap();
    req.extensions_mut()
        .insert(h2::ext::Protocol::from_static(protocol));
    let send = client.send.clone();
    let got = client.rt.block_on(async move {
        let mut send = send.ready().await.unwrap();
        // The server's SETTINGS come right after the handshake; the client knows of the
        // extended CONNECT only then.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !send.is_extended_connect_protocol_enabled() {
            assert!(
                Instant::now() < deadline,
                "SETTINGS_ENABLE_CONNECT_PROTOCOL never came"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let (response, body) = send.send_request(req, false).unwrap();
        let response = tokio::time::timeout(Duration::from_secs(30), response)
            .await
            .expect("an answer to the extended CONNECT")
            .unwrap();
        (response, body)
    });
    let (response, send) = got;
    let (parts, recv) = response.into_parts();
    let status = parts.status.as_u16();
    let ws = (status == 200).then(|| H2WebSocket {
        client,
        send,
        recv,
        buf: Vec::new(),
    });
    (status, parts.headers, ws)
}

impl H2WebSocket {
    fn send_frame(&mut self, opcode: u8, payload: &[u8]) {
        self.send
            .send_data(bytes::Bytes::from(ws_frame(opcode, payload)), false)
            .unwrap();
    }

    /// The next server frame (30 s at most); `None` when the stream ended (END_STREAM).
    fn read_frame(&mut self) -> Option<(u8, Vec<u8>)> {
        loop {
            if let Some((op, payload, used)) = ws_parse(&self.buf) {
                self.buf.drain(..used);
                return Some((op, payload));
            }
            let recv = &mut self.recv;
            let chunk = self.client.rt.block_on(async {
                tokio::time::timeout(Duration::from_secs(30), recv.data())
                    .await
                    .expect("tunnel data within 30 s")
            });
            match chunk {
                None => return None,
                Some(Ok(c)) => {
                    let _ = self.recv.flow_control().release_capacity(c.len());
                    self.buf.extend_from_slice(&c);
                }
                Some(Err(e)) => panic!("tunnel stream failed: {e}"),
            }
        }
    }

    /// Runs the client connection's I/O for `d` (frames queued get written).
    fn pump(&mut self, d: Duration) {
        self.client
            .rt
            .block_on(async { tokio::time::sleep(d).await });
    }
}

fn ws_gateway(
    ws_origin: std::net::SocketAddr,
    plain: std::net::SocketAddr,
    extra: &str,
) -> Gateway {
    Gateway::with(&h2c(Config::new()
        .workers(1)
        .upstream(Upstream::new("ws", &[ws_origin]))
        .upstream(Upstream::new("plain", &[plain]))
        .route(
            Route::prefix("/ws", "ws")
                .websocket(true)
                .read_timeout("5s"),
        )
        .route(Route::prefix("/plain", "plain"))
        .extra(extra)))
}

#[test]
fn websocket_over_h2_echoes_through_a_websocket_origin() {
    let (ws_addr, events) = ws_echo_origin();
    let plain = Origin::echo();
    let gw = ws_gateway(ws_addr, plain.addr(), "");
    let fields = [
        ("sec-websocket-version", "13"),
        ("sec-websocket-protocol", "chat, superchat"),
        ("origin", "http://example.test"),
        // Meaningless on HTTP/2 (RFC 8441 §5): never forwarded; the gateway sends its own.
        ("sec-websocket-key", "AAAAAAAAAAAAAAAAAAAAAA=="),
    ];
    let (status, headers, ws) = h2_websocket(gw.http_addr(), "/ws/echo", "websocket", &fields);
    assert_eq!(status, 200, "the upstream's 101 is RFC 8441's 200");
    assert_eq!(headers.get("sec-websocket-protocol").unwrap(), "chat");
    assert!(headers.get("sec-websocket-accept").is_none());
    let mut ws = ws.unwrap();
    let Ok(WsEvent::Handshake(seen)) = events.recv_timeout(Duration::from_secs(10)) else {
        panic!("no handshake at the origin");
    };
    let field = |n: &str| {
        seen.iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(n))
            .map(|(_, v)| v.as_str())
            .collect::<Vec<_>>()
    };
    assert_eq!(field("upgrade"), ["websocket"]);
    assert_eq!(field("sec-websocket-version"), ["13"]);
    assert_eq!(field("origin"), ["http://example.test"]);
    let key = field("sec-websocket-key");
    assert!(key.len() == 1 && key[0].len() == 24 && key[0] != "AAAAAAAAAAAAAAAAAAAAAA==");
    // Small and large messages: the large ones exceed both directions' windows.
    for size in [1usize, 125, 70_000, 300_000] {
        let payload: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
        ws.send_frame(0x2, &payload);
        let (op, back) = ws.read_frame().expect("echo");
        assert_eq!((op, back.len()), (0x2, size));
        assert!(back == payload, "echo of {size} bytes differs");
    }
    // The close handshake from the client: the origin answers and closes (FIN), which
    // ends the stream (END_STREAM).
    ws.send_frame(0x8, &[0x03, 0xe8]);
    assert_eq!(ws.read_frame().map(|f| f.0), Some(0x8));
    assert!(
        ws.read_frame().is_none(),
        "the upstream's FIN is END_STREAM"
    );
    let _ = ws.send.send_data(bytes::Bytes::new(), true);
    ws.pump(Duration::from_millis(50));
    gw.wait_access_line(Duration::from_secs(10), |l| {
        l.contains("\"CONNECT /ws/echo HTTP/2.0\" 200")
    });
    wait_until(Duration::from_secs(10), "tunnel metrics", || {
        let m = scrape(gw.admin_addr());
        m.get("gateway_tunnels_total", &[("path", "h2")]) == Some(1.0)
            && m.get("gateway_websocket_tunnels_active", &[]) == Some(0.0)
            && m.get("gateway_tunnel_bytes_total", &[("direction", "client")])
                .is_some_and(|n| n >= 370_000.0)
    });

    // What keeps its old answer: a plain CONNECT, another protocol, an extended CONNECT on
    // a route without WebSocket, a version other than 13. None reaches an origin.
    let mut c = H2Client::connect(gw.http_addr());
    let plain_connect = c
        .request(&H2Req::get("/ws/echo").method("CONNECT"))
        .map(|r| r.status);
    assert!(
        matches!(plain_connect, Ok(405) | Err(_)),
        "{plain_connect:?}"
    );
    let v13 = [("sec-websocket-version", "13")];
    assert_eq!(
        h2_websocket(gw.http_addr(), "/ws/echo", "chat", &v13).0,
        405
    );
    assert_eq!(
        h2_websocket(gw.http_addr(), "/plain/x", "websocket", &v13).0,
        405
    );
    let (status, headers, _) = h2_websocket(
        gw.http_addr(),
        "/ws/echo",
        "websocket",
        &[("sec-websocket-version", "8")],
    );
    assert_eq!(status, 426);
    assert_eq!(headers.get("sec-websocket-version").unwrap(), "13");
    assert_eq!(plain.request_count(), 0);
    assert!(
        !matches!(
            events.recv_timeout(Duration::from_millis(300)),
            Ok(WsEvent::Handshake(_))
        ),
        "a refused extended CONNECT reached the origin"
    );
}

/// A tunnel the client cuts by closing its TCP connection (a browser tab closed) is logged
/// as the 200 it was, with the bytes it carried, and counted in the tunnel metrics: the
/// stream sees its connection gone and ends itself, it is not aborted as `499 0`.
#[test]
fn an_h2_tunnel_cut_by_the_clients_close_is_logged_and_counted() {
    let (ws_addr, _events) = ws_echo_origin();
    let plain = Origin::echo();
    let gw = ws_gateway(ws_addr, plain.addr(), "");
    let v13 = [("sec-websocket-version", "13")];
    let (status, _, ws) = h2_websocket(gw.http_addr(), "/ws/echo", "websocket", &v13);
    assert_eq!(status, 200);
    let mut ws = ws.unwrap();
    let payload = vec![b'e'; 70_000];
    ws.send_frame(0x2, &payload);
    let (_, back) = ws.read_frame().expect("echo");
    assert_eq!(back.len(), payload.len());
    // No close handshake, no END_STREAM, no RST_STREAM: the client's socket closes.
    drop(ws);
    let line = gw.wait_access_line(Duration::from_secs(10), |l| {
        l.contains("\"CONNECT /ws/echo HTTP/2.0\"")
    });
    let logged: Vec<&str> = line
        .split("HTTP/2.0\" ")
        .nth(1)
        .unwrap()
        .split(' ')
        .take(2)
        .collect();
    assert_eq!(logged[0], "200", "{line}");
    let bytes: u64 = logged[1].parse().unwrap();
    assert!(bytes >= 70_000, "the echoed bytes are logged: {line}");
    wait_until(Duration::from_secs(10), "tunnel metrics", || {
        let m = scrape(gw.admin_addr());
        m.get("gateway_tunnels_total", &[("path", "h2")]) == Some(1.0)
            && m.get("gateway_websocket_tunnels_active", &[]) == Some(0.0)
            && m.get("gateway_tunnel_bytes_total", &[("direction", "client")])
                .is_some_and(|n| n >= 70_000.0)
    });
}

#[test]
fn hostile_extended_connects_never_open_a_tunnel() {
    let (ws_addr, events) = ws_echo_origin();
    let plain = Origin::echo();
    // `:protocol` on a method other than CONNECT: malformed (RFC 8441 §4).
    let gw = ws_gateway(ws_addr, plain.addr(), "");
    let mut raw = RawH2::connect(gw.http_addr());
    let mut fields = get_fields(b"/ws/echo");
    fields.push((b":protocol", b"websocket"));
    raw.headers(1, &fields, true);
    assert_eq!(raw.fate(1), StreamFate::Reset(PROTOCOL_ERROR));
    // With `[http2] websocket = false` the setting is not advertised and a `:protocol`
    // is a PROTOCOL_ERROR too.
    let off = ws_gateway(ws_addr, plain.addr(), "[http2]\nwebsocket = false\n");
    let mut raw = RawH2::connect(off.http_addr());
    let settings = raw
        .read_frame(Duration::from_secs(10))
        .expect("server SETTINGS");
    assert_eq!(settings.kind, SETTINGS);
    assert!(
        !settings.payload.chunks(6).any(|s| s[..2] == [0, 8]),
        "SETTINGS_ENABLE_CONNECT_PROTOCOL advertised while off"
    );
    let connect: Vec<(&[u8], &[u8])> = vec![
        (b":method", b"CONNECT"),
        (b":protocol", b"websocket"),
        (b":scheme", b"http"),
        (b":authority", b"example.test"),
        (b":path", b"/ws/echo"),
        (b"sec-websocket-version", b"13"),
    ];
    raw.headers(1, &connect, false);
    assert_eq!(raw.fate(1), StreamFate::Reset(PROTOCOL_ERROR));
    assert!(events.recv_timeout(Duration::from_millis(300)).is_err());
    assert_eq!(plain.request_count(), 0);

    // An upstream whose 101 carries the wrong accept: 502, never a tunnel.
    let liar = ws_raw_origin(
        |_| "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=".into(),
        |s| {
            std::thread::sleep(Duration::from_secs(5));
            drop(s);
        },
    );
    let gw = ws_gateway(liar, plain.addr(), "");
    let v13 = [("sec-websocket-version", "13")];
    assert_eq!(
        h2_websocket(gw.http_addr(), "/ws/x", "websocket", &v13).0,
        502
    );
}

#[test]
fn only_the_validated_101_opens_a_tunnel_and_other_2xx_are_502() {
    // RFC 8441 §5: any 2xx to an extended CONNECT means the tunnel is open, so an upstream
    // that answers the handshake with a 200 and a body, or a 204, must not be relayed: the
    // client would read the body as WebSocket bytes (attack report F1).
    let v13 = [("sec-websocket-version", "13")];
    let plain = Origin::echo();
    for (reply, expected) in [
        (Reply::ok("not a websocket"), 502),
        (Reply::new(204), 502),
        // A refusal is relayed with its status: the client learns the tunnel failed.
        (Reply::new(403).body("no"), 403),
    ] {
        let origin = Origin::start(move |_| reply.clone());
        let gw = ws_gateway(origin.addr(), plain.addr(), "");
        let (status, _, ws) = h2_websocket(gw.http_addr(), "/ws/x", "websocket", &v13);
        assert_eq!(status, expected);
        assert!(ws.is_none());
        assert_eq!(origin.request_count(), 1, "the handshake went upstream");
    }
    // Two version fields, in either order: 400, nothing upstream (as on HTTP/1).
    let (ws_addr, events) = ws_echo_origin();
    let gw = ws_gateway(ws_addr, plain.addr(), "");
    for two in [["8", "13"], ["13", "8"]] {
        let fields = [
            ("sec-websocket-version", two[0]),
            ("sec-websocket-version", two[1]),
        ];
        assert_eq!(
            h2_websocket(gw.http_addr(), "/ws/echo", "websocket", &fields).0,
            400
        );
    }
    assert!(events.recv_timeout(Duration::from_millis(300)).is_err());
}

#[test]
fn a_reload_that_turns_websocket_off_applies_to_open_connections() {
    let (ws_addr, events) = ws_echo_origin();
    let plain = Origin::echo();
    let gw = ws_gateway(ws_addr, plain.addr(), "");
    let v13 = [("sec-websocket-version", "13")];
    // Opened while on: its SETTINGS advertised extended CONNECT.
    let client = H2Client::connect(gw.http_addr());
    assert_eq!(client_get(&client, "/plain/before"), 200);
    reload_with(&gw, |text| format!("{text}\n[http2]\nwebsocket = false\n"));
    let (status, _, ws) = h2_websocket_on(client, "/ws/echo", "websocket", &v13);
    assert_eq!(
        status, 405,
        "the stream read the flag of the current snapshot"
    );
    assert!(ws.is_none());
    assert!(events.recv_timeout(Duration::from_millis(300)).is_err());
}

/// One GET on an open client connection: its status.
fn client_get(client: &H2Client, path: &str) -> u16 {
    let mut send = client.send.clone();
    client
        .rt
        .block_on(async move { exchange(&mut send, &H2Req::get(path)).await })
        .expect("a response")
        .status
}

#[test]
fn streams_cut_by_the_client_closing_its_connection_are_logged_and_counted() {
    // Attack report F3: streams whose task ended with the connection left no trace.
    let origin = Origin::start(|_| Reply::ok("late").delay(Duration::from_secs(5)));
    let (ws_addr, events) = ws_echo_origin();
    let gw = ws_gateway(ws_addr, origin.addr(), "");
    let mut raw = RawH2::connect(gw.http_addr());
    for id in [1, 3, 5] {
        raw.headers(id, &get_fields(b"/plain/cut"), true);
    }
    wait_until(Duration::from_secs(10), "three streams upstream", || {
        origin.heads_seen() >= 3
    });
    drop(raw);
    // A tunnel, then its client's TCP close.
    let v13 = [("sec-websocket-version", "13")];
    let (_, _, ws) = h2_websocket(gw.http_addr(), "/ws/echo", "websocket", &v13);
    let mut ws = ws.expect("tunnel");
    ws.send_frame(0x1, b"hello");
    assert_eq!(ws.read_frame().unwrap().1, b"hello");
    // The tunnel's upstream socket is an upstream connection (attack report L4).
    let gauge = || {
        scrape(gw.admin_addr()).get("gateway_upstream_connections_active", &[("upstream", "ws")])
    };
    wait_until(Duration::from_secs(5), "the tunnel counted", || {
        gauge() == Some(1.0)
    });
    drop(ws);
    wait_until(Duration::from_secs(10), "and uncounted", || {
        gauge() == Some(0.0)
    });
    assert!(matches!(
        events.recv_timeout(Duration::from_secs(10)),
        Ok(WsEvent::Handshake(_))
    ));
    // The tunnel had its 200: logged as such, with its bytes (5 echoed, in a frame of 7).
    gw.wait_access_line(Duration::from_secs(10), |l| {
        l.contains("\"CONNECT /ws/echo HTTP/2.0\" 200 7 ")
    });
    wait_until(Duration::from_secs(10), "each stream logged once", || {
        gw.access_log()
            .lines()
            .filter(|l| l.contains("\"GET /plain/cut HTTP/2.0\" 499"))
            .count()
            == 3
    });
    // They reached the origin: logged with it, as HTTP/1 logs a request its client left
    // (attack report on the linger, F2: `-`, as if no server had been involved).
    let upstream = origin.addr().to_string();
    for line in gw.access_log().lines().filter(|l| l.contains("/plain/cut")) {
        assert!(line.ends_with(&upstream), "{line}");
    }
    wait_until(Duration::from_secs(10), "and counted", || {
        scrape(gw.admin_addr()).sum(
            "gateway_http_requests_total",
            &[("listener", "http"), ("status", "499")],
        ) == 3.0
    });
}

#[test]
fn a_client_reset_closes_the_upstream_and_a_client_that_never_reads_holds_it_back() {
    // RST_STREAM mid-tunnel: the upstream connection is closed at once.
    let (ws_addr, events) = ws_echo_origin();
    let plain = Origin::echo();
    let gw = ws_gateway(ws_addr, plain.addr(), "");
    let v13 = [("sec-websocket-version", "13")];
    let (_, _, ws) = h2_websocket(gw.http_addr(), "/ws/echo", "websocket", &v13);
    let mut ws = ws.expect("tunnel");
    assert!(matches!(
        events.recv_timeout(Duration::from_secs(10)),
        Ok(WsEvent::Handshake(_))
    ));
    ws.send_frame(0x1, b"hello");
    assert_eq!(ws.read_frame().unwrap().1, b"hello");
    ws.send.send_reset(h2::Reason::CANCEL);
    ws.pump(Duration::from_millis(20));
    assert!(
        matches!(
            events.recv_timeout(Duration::from_secs(5)),
            Ok(WsEvent::Ended)
        ),
        "the origin's connection outlived the client's RST_STREAM"
    );
    wait_until(Duration::from_secs(10), "tunnel counted down", || {
        scrape(gw.admin_addr()).get("gateway_websocket_tunnels_active", &[]) == Some(0.0)
    });

    // A client that never reads: the upstream is held back by flow control and TCP, so
    // what it can write is bounded (socket buffers plus one buffer and h2's send buffer),
    // not the 256 MiB it tries.
    let (tx, written) = std::sync::mpsc::channel();
    let flood = ws_raw_origin(right_accept, move |mut s| {
        use std::io::Write;
        s.set_write_timeout(Some(Duration::from_secs(3))).unwrap();
        let chunk = vec![0x5a; 64 * 1024];
        let mut total = 0usize;
        while total < 256 << 20 {
            match s.write(&chunk) {
                Ok(n) => total += n,
                Err(_) => break,
            }
        }
        let _ = tx.send(total);
        std::thread::sleep(Duration::from_secs(2));
    });
    let gw = ws_gateway(flood, plain.addr(), "");
    let (status, _, ws) = h2_websocket(gw.http_addr(), "/ws/x", "websocket", &v13);
    assert_eq!(status, 200);
    let total = written
        .recv_timeout(Duration::from_secs(30))
        .expect("the origin stalled or finished");
    assert!(
        total < 32 << 20,
        "the upstream wrote {total} bytes to a client that reads nothing"
    );
    drop(ws);
}

/// HEADERS frames and the body of stream 1, to its END_STREAM (RawH2: no HPACK decoding).
fn heads_and_body(raw: &mut RawH2) -> (Vec<gateway_tests::h2::Frame>, Vec<u8>) {
    let (mut heads, mut body) = (Vec::new(), Vec::new());
    while let Some(f) = raw.read_frame(Duration::from_secs(10)) {
        if f.stream != 1 {
            continue;
        }
        let end = f.flags & END_STREAM != 0;
        match f.kind {
            HEADERS => heads.push(f),
            gateway_tests::h2::DATA => body.extend_from_slice(&f.payload),
            RST_STREAM => panic!("stream reset"),
            _ => {}
        }
        if end {
            break;
        }
    }
    (heads, body)
}

#[test]
fn early_hints_are_relayed_a_100_is_not_and_the_final_response_follows_intact() {
    let origin = Origin::start(|r| {
        let reply = Reply::ok("final body").header("x-final", "1");
        if r.path() == "/many" {
            // A hostile upstream: 20 informational heads of 2 KiB each.
            let big = "x".repeat(2048);
            (0..20).fold(reply, |r, _| r.interim(103, &[("link", big.as_str())]))
        } else {
            reply
                .interim(100, &[])
                .interim(103, &[("link", "</s.css>; rel=preload")])
        }
    });
    let gw = Gateway::with(&h2c(Config::proxy_all(&[origin.addr()]).workers(1)));
    let mut raw = RawH2::connect(gw.http_addr());
    raw.headers(1, &get_fields(b"/hints"), true);
    let (heads, body) = heads_and_body(&mut raw);
    assert_eq!(
        heads.len(),
        2,
        "the 103, then the final head; the 100 is hop-by-hop"
    );
    assert!(heads.iter().all(|h| h.flags & END_STREAM == 0));
    assert_eq!(body, b"final body");
    // h2's client reads past the 103 to the final response.
    let r = H2Client::connect(gw.http_addr()).get("/hints");
    assert_eq!(
        (r.status, &r.body[..], r.header("x-final")),
        (200, &b"final body"[..], Some("1"))
    );
    // At most 4 informational heads per stream (HEADERS are not flow-controlled).
    let mut raw = RawH2::connect(gw.http_addr());
    raw.headers(1, &get_fields(b"/many"), true);
    let (heads, body) = heads_and_body(&mut raw);
    assert_eq!(heads.len(), 5, "4 relayed 103s, then the final head");
    assert_eq!(body, b"final body");
}

#[test]
fn a_drain_lets_an_open_h2_tunnel_run_until_graceful_timeout() {
    let (ws_addr, events) = ws_echo_origin();
    let plain = Origin::echo();
    let mut gw = Gateway::with(&h2c(Config::new()
        .workers(1)
        .server("graceful_timeout", "3s")
        .upstream(Upstream::new("ws", &[ws_addr]))
        .upstream(Upstream::new("plain", &[plain.addr()]))
        .route(Route::prefix("/ws", "ws").websocket(true))));
    let v13 = [("sec-websocket-version", "13")];
    let (_, _, ws) = h2_websocket(gw.http_addr(), "/ws/echo", "websocket", &v13);
    let mut ws = ws.expect("tunnel");
    ws.send_frame(0x1, b"before");
    assert_eq!(ws.read_frame().unwrap().1, b"before");
    let signalled = Instant::now();
    gw.signal(libc::SIGTERM);
    // The drain's GOAWAY goes out at once; the tunnel, an open stream, keeps working.
    while signalled.elapsed() < Duration::from_millis(1500) {
        ws.send_frame(0x1, b"during the drain");
        assert_eq!(ws.read_frame().unwrap().1, b"during the drain");
        ws.pump(Duration::from_millis(100));
    }
    // graceful_timeout cuts it: the origin sees its connection end, the gateway exits.
    let ended = loop {
        match events.recv_timeout(Duration::from_secs(15)) {
            Ok(WsEvent::Ended) => break signalled.elapsed(),
            Ok(WsEvent::Handshake(_)) => continue,
            Err(_) => panic!("the tunnel outlived graceful_timeout"),
        }
    };
    assert!(ended >= Duration::from_millis(1500), "{ended:?}");
    assert!(gw.wait_exit(Duration::from_secs(10)).is_some());
    // Cut, it is still logged (attack report F3): before the exit, not lost with it, as
    // the 200 it had.
    let log = gw.access_log();
    assert!(log.contains("\"CONNECT /ws/echo HTTP/2.0\" 200 "), "{log}");
}

#[test]
fn a_response_of_known_length_ends_on_its_last_data_frame() {
    let origin = Origin::start(|r| match r.path() {
        "/chunked" => Reply::ok("abcdef").chunked(&[2, 4]),
        "/empty" => Reply::new(200),
        _ => Reply::ok(vec![b'x'; 40_000]),
    });
    let gw = Gateway::with(&h2c(Config::proxy_all(&[origin.addr()]).workers(1)));
    // (frame kind, flags & END_STREAM, payload length) of stream 1.
    let frames = |path: &'static [u8]| {
        let mut raw = RawH2::connect(gw.http_addr());
        raw.headers(1, &get_fields(path), true);
        let mut seen = Vec::new();
        while let Some(f) = raw.read_frame(Duration::from_secs(10)) {
            if f.stream != 1 || !matches!(f.kind, HEADERS | gateway_tests::h2::DATA) {
                continue;
            }
            let end = f.flags & END_STREAM != 0;
            seen.push((f.kind, end, f.payload.len()));
            if end {
                break;
            }
        }
        seen
    };
    // 40,000 bytes within the default 65,535 window: END_STREAM on the last DATA frame,
    // no empty frame after it.
    let known = frames(b"/known");
    assert_eq!(known.iter().skip(1).map(|f| f.2).sum::<usize>(), 40_000);
    assert_eq!(
        known.last().map(|f| (f.0, f.1)),
        Some((gateway_tests::h2::DATA, true))
    );
    assert!(known.last().unwrap().2 > 0, "{known:?}");
    // Unknown length: the end is an empty DATA frame; no body: END_STREAM on HEADERS.
    let chunked = frames(b"/chunked");
    assert_eq!(
        chunked.last().map(|f| (f.1, f.2)),
        Some((true, 0)),
        "{chunked:?}"
    );
    let empty = frames(b"/empty");
    assert_eq!(
        (empty.len(), empty[0].0, empty[0].1),
        (1, HEADERS, true),
        "{empty:?}"
    );
}
