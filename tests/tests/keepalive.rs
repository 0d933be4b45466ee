//! Connection reuse on both sides: the upstream pool (`keepalive` idle connections per
//! worker) is actually reused, survives an origin that closes idle connections, and does not
//! reuse a connection the origin said it would close; downstream keep-alive honours
//! `keepalive_timeout`, `Connection: close` and HTTP/1.0.

use std::thread;
use std::time::{Duration, Instant};

use gateway_tests::{Client, Config, Gateway, Origin, Reply, Req, Route, Upstream};

const WORKERS: usize = 2;
const KEEPALIVE: usize = 2;

fn pooled(origin: &Origin) -> Gateway {
    Gateway::with(
        &Config::new()
            .workers(WORKERS)
            .server("keepalive_timeout", "5s")
            .upstream(Upstream::new("app", &[origin.addr()]).keepalive(KEEPALIVE))
            .route(Route::prefix("/", "app")),
    )
}

#[test]
fn upstream_connections_are_reused_over_one_client_connection() {
    let origin = Origin::start(|r| Reply::ok(r.target.clone()));
    let gw = pooled(&origin);
    let mut c = gw.client();
    for i in 0..200 {
        let r = c.get(&format!("/r/{i}"));
        assert_eq!(r.status, 200, "request {i}");
        assert_eq!(r.body_str(), format!("/r/{i}"));
    }
    assert_eq!(origin.request_count(), 200);
    assert!(
        origin.accepts() <= KEEPALIVE * WORKERS,
        "200 sequential requests opened {} upstream connections; the pool allows at most \
         keepalive × workers = {}",
        origin.accepts(),
        KEEPALIVE * WORKERS
    );
}

#[test]
fn upstream_connections_are_reused_over_four_client_connections() {
    let origin = Origin::start(|r| Reply::ok(r.target.clone()));
    let gw = pooled(&origin);
    let mut clients: Vec<Client> = (0..4).map(|_| gw.client()).collect();
    // Requests go round the four connections one at a time, so no worker ever has more
    // than one upstream request in flight: every one can be served by a pooled connection.
    // (Concurrent requests beyond `keepalive` legitimately open extra connections.)
    for i in 0..200 {
        let c = &mut clients[i % 4];
        let r = c.get(&format!("/r/{i}"));
        assert_eq!(r.status, 200, "request {i}");
        assert_eq!(r.body_str(), format!("/r/{i}"));
    }
    assert_eq!(origin.request_count(), 200);
    assert!(
        origin.accepts() <= KEEPALIVE * WORKERS,
        "200 requests over 4 client connections opened {} upstream connections (limit {})",
        origin.accepts(),
        KEEPALIVE * WORKERS
    );
}

/// Each round: a request, then idle long enough for the origin to close the pooled
/// connection (50 ms) and for its FIN to arrive. The idle time is the scenario itself,
/// not a wait for readiness.
fn survive_idle_closes(method: &str) {
    let origin = Origin::builder()
        .idle_close(Duration::from_millis(50))
        .start(|r| Reply::ok(format!("{} {}", r.method, r.body.len())));
    let gw = pooled(&origin);
    let mut c = gw.client();
    for i in 0..6 {
        let req = if method == "POST" {
            Req::post(&format!("/r/{i}"), vec![b'p'; 100])
        } else {
            Req::get(&format!("/r/{i}"))
        };
        let r = c.request(&req).unwrap_or_else(|e| {
            panic!("{method} round {i} after the origin closed the idle connection: {e}")
        });
        assert_eq!(r.status, 200, "{method} round {i}: {}", r.body_str());
        let expect_len = if method == "POST" { 100 } else { 0 };
        assert_eq!(r.body_str(), format!("{method} {expect_len}"));
        thread::sleep(Duration::from_millis(150));
    }
    assert_eq!(
        origin.request_count(),
        6,
        "each request reached the origin exactly once"
    );
    assert!(
        origin.accepts() >= 6,
        "the origin closed every idle connection, so each round needs a new one"
    );
}

#[test]
fn origin_closing_idle_pooled_connections_get_still_succeeds() {
    survive_idle_closes("GET");
}

#[test]
fn origin_closing_idle_pooled_connections_post_still_succeeds() {
    // A POST cannot be retried blindly, so this passes only if the proxy notices the closed
    // pooled connection before reusing it (as nginx does with its read event on cached
    // upstream connections).
    survive_idle_closes("POST");
}

/// An origin that answers the first request of each connection and closes the connection
/// on the second without answering it: the keep-alive race at its worst, the close coming
/// at the very moment the pooled connection is reused, after every liveness check passed.
/// Records each request line it read, in order.
struct CloseOnReuse {
    addr: std::net::SocketAddr,
    seen: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl CloseOnReuse {
    fn start() -> CloseOnReuse {
        use std::io::{BufRead, BufReader, Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = seen.clone();
        thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { return };
                let log = log.clone();
                thread::spawn(move || {
                    let mut reader = BufReader::new(conn.try_clone().unwrap());
                    let mut writer = conn;
                    for n in 0.. {
                        let mut line = String::new();
                        if reader.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        let mut length = 0;
                        loop {
                            let mut field = String::new();
                            if reader.read_line(&mut field).unwrap_or(0) == 0 {
                                return;
                            }
                            if field == "\r\n" {
                                break;
                            }
                            let lower = field.to_ascii_lowercase();
                            if let Some(v) = lower.strip_prefix("content-length:") {
                                length = v.trim().parse().unwrap();
                            }
                        }
                        let mut body = vec![0; length];
                        if reader.read_exact(&mut body).is_err() {
                            return;
                        }
                        log.lock().unwrap().push(line.trim_end().to_string());
                        if n > 0 {
                            // Closed with the request read and unanswered.
                            return;
                        }
                        let _ =
                            writer.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst");
                    }
                });
            }
        });
        CloseOnReuse { addr, seen }
    }

    fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }
}

#[test]
fn upstream_closing_at_the_moment_of_reuse_replays_get_and_never_post() {
    for io in ["uring", "epoll"] {
        // One worker: the second request finds the first one's connection in the pool.
        let gateway = |origin: &CloseOnReuse| {
            Gateway::with(
                &Config::new()
                    .workers(1)
                    .server_raw("io", &format!("{io:?}"))
                    .upstream(Upstream::new("app", &[origin.addr]).keepalive(KEEPALIVE))
                    .route(Route::prefix("/", "app")),
            )
        };
        let origin = CloseOnReuse::start();
        let gw = gateway(&origin);
        let mut c = gw.client();
        assert_eq!(c.get("/get/1").status, 200, "{io}");
        // The pooled connection is taken, the origin closes it on receiving the request:
        // an idempotent request is sent again on a fresh connection, which answers.
        let r = c.get("/get/2");
        assert_eq!((r.status, r.body_str().as_str()), (200, "first"), "{io}");
        assert_eq!(
            origin.seen(),
            [
                "GET /get/1 HTTP/1.1",
                "GET /get/2 HTTP/1.1",
                "GET /get/2 HTTP/1.1"
            ],
            "{io}: the GET went once on the reused connection, once on a fresh one"
        );

        let origin = CloseOnReuse::start();
        let gw = gateway(&origin);
        let mut c = gw.client();
        let r = c.must(&Req::post("/post/1", "one"));
        assert_eq!(r.status, 200, "{io}");
        // The origin may have acted on the POST it read before closing: never sent twice.
        let r = c.must(&Req::post("/post/2", "two"));
        assert_eq!(r.status, 502, "{io}: {}", r.body_str());
        assert_eq!(
            origin.seen(),
            ["POST /post/1 HTTP/1.1", "POST /post/2 HTTP/1.1"],
            "{io}: the POST reached the origin exactly once"
        );
    }
}

#[test]
fn origin_connection_close_is_not_reused() {
    let origin = Origin::start(|_| Reply::ok("bye").close());
    let gw = pooled(&origin);
    let mut c = gw.client();
    for i in 0..3 {
        let r = c.get(&format!("/c/{i}"));
        assert_eq!(r.status, 200, "request {i}");
        assert_eq!(r.body_str(), "bye");
        if r.says_close() {
            c = gw.client();
        }
    }
    assert_eq!(
        origin.accepts(),
        3,
        "each `Connection: close` response ends that upstream connection"
    );
}

#[test]
fn downstream_idle_connection_closed_after_keepalive_timeout() {
    let origin = Origin::echo();
    let gw =
        Gateway::with(&Config::proxy_all(&[origin.addr()]).server("keepalive_timeout", "300ms"));
    let mut c = gw.client();
    assert_eq!(c.get("/x").status, 200);
    let t = Instant::now();
    let (outcome, extra) = c.wait_closed(Duration::from_secs(4));
    let waited = t.elapsed();
    assert!(
        outcome.is_closed(),
        "idle connection still open after 4 s (keepalive_timeout 300ms)"
    );
    assert!(
        waited >= Duration::from_millis(200),
        "closed after {waited:?}: too early for keepalive_timeout 300ms"
    );
    // nginx closes silently; a 408 here would be acceptable too, but nothing else.
    assert!(
        extra.is_empty() || String::from_utf8_lossy(&extra).starts_with("HTTP/1.1 408"),
        "unexpected bytes on idle close: {:?}",
        gateway_tests::wire::excerpt(&extra)
    );
}

#[test]
fn client_connection_close_is_honoured() {
    let origin = Origin::echo();
    let gw = Gateway::with(&Config::proxy_all(&[origin.addr()]));
    let mut c = gw.client();
    let r = c.must(&Req::get("/bye").header("Connection", "close"));
    assert_eq!(r.status, 200);
    assert!(
        r.says_close(),
        "the response announces the close (RFC 9112 §9.6)"
    );
    c.expect_closed(
        Duration::from_secs(3),
        "after a `Connection: close` request",
    );
}

#[test]
fn http10_client_without_keepalive_gets_a_closed_connection() {
    let origin = Origin::start(|_| Reply::ok("old"));
    let gw = Gateway::with(&Config::proxy_all(&[origin.addr()]));
    let mut c = gw.client();
    let r = c.must(&Req::get("/old").version("HTTP/1.0"));
    assert_eq!(r.status, 200);
    assert_eq!(r.body, b"old");
    assert!(
        r.header("transfer-encoding").is_none(),
        "no chunked coding towards an HTTP/1.0 client (RFC 9112 §6.1)"
    );
    c.expect_closed(
        Duration::from_secs(3),
        "after an HTTP/1.0 request without keep-alive",
    );
}
