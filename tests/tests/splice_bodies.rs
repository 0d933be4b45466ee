//! Spliced HTTP bodies (issue 13): between plaintext sockets, the long runs of a body
//! (`server.splice_bodies_min` and more: the rest of a `Content-Length` body, the rest of a
//! chunk's data, a close-delimited body) move socket → pipe → socket with `splice(2)`.
//! What these tests hold the splice path to is the copy path's contract: byte-identical
//! bodies and framing, nothing moved past the framing (a pipelined request, an upstream's
//! stray bytes), every failure booked to the side at fault, the rate clock, and an upstream
//! connection pooled only when its body ended exactly on its framing. Each test checks
//! `gateway_body_splice_total` to prove the splice path really ran; the main ones run on
//! both I/O drivers, and one with `GATEWAY_TUNNEL_SPLICE=off` (the copy path).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use gateway_tests::control::scrape;
use gateway_tests::{
    pattern_bytes, BodyFraming, Config, Gateway, Origin, Reply, Req, Route, Upstream,
};

const MIB: usize = 1 << 20;
/// Both I/O drivers: each is asked for explicitly, whatever `GATEWAY_TEST_IO` says.
const DRIVERS: [&str; 2] = ["uring", "epoll"];

/// A gateway in front of `origin` on the `io` driver.
fn gateway(origin: SocketAddr, io: &str) -> Gateway {
    Gateway::with(&config(origin, io))
}

fn config(origin: SocketAddr, io: &str) -> Config {
    Config::new()
        .server_raw("io", &format!("{io:?}"))
        .upstream(Upstream::new("app", &[origin]).max_fails(1000))
        .route(
            Route::prefix("/", "app")
                .read_timeout("5s")
                .max_body_size("64MiB"),
        )
}

/// An origin answering `/big` with `big`, and any other path with that path and the length
/// of the request body it received.
fn serving(big: &[u8]) -> Origin {
    let big = big.to_vec();
    Origin::start(move |r| match r.path() {
        "/big" => Reply::ok(big.clone()),
        _ => Reply::ok(format!("{} {}", r.path(), r.body.len())),
    })
}

/// `gateway_body_splice_total{direction}` as last published.
fn splices_now(gw: &Gateway, direction: &str) -> f64 {
    scrape(gw.admin_addr())
        .get("gateway_body_splice_total", &[("direction", direction)])
        .unwrap_or(0.0)
}

/// `gateway_body_splice_total{direction}` once the workers have published `requests`
/// finished requests: counters are published every tick, not per request, and a request's
/// splices are counted before it is.
fn splices(gw: &Gateway, direction: &str, requests: usize) -> f64 {
    let mut splices = 0.0;
    gateway_tests::wait_until(Duration::from_secs(5), "the counters published", || {
        let m = scrape(gw.admin_addr());
        splices = m
            .get("gateway_body_splice_total", &[("direction", direction)])
            .unwrap_or(0.0);
        m.sum("gateway_http_requests_total", &[]) >= requests as f64
    });
    splices
}

fn upstream_failures(gw: &Gateway) -> f64 {
    scrape(gw.admin_addr())
        .get(
            "gateway_upstream_errors_total",
            &[("upstream", "app"), ("kind", "failed")],
        )
        .unwrap_or(0.0)
}

#[test]
fn large_content_length_response_is_spliced_and_the_upstream_reused() {
    let big = pattern_bytes(MIB + 12_345, 1);
    let origin = serving(&big);
    for io in DRIVERS {
        let gw = gateway(origin.addr(), io);
        let accepts = origin.accepts();
        let mut c = gw.client();
        assert_eq!(c.get("/small").body_str(), "/small 0", "{io}");
        assert_eq!(
            splices(&gw, "response", 1),
            0.0,
            "{io}: a small body is copied"
        );
        for round in 0..3 {
            let r = c.get("/big");
            assert_eq!(r.status, 200, "{io} round {round}");
            assert_eq!(r.framing, BodyFraming::ContentLength(big.len()), "{io}");
            assert!(r.body == big, "{io} round {round}: the body differs");
        }
        assert_eq!(splices(&gw, "response", 4), 3.0, "{io}");
        // One upstream connection for the four requests: each spliced body ended exactly
        // on its Content-Length, so the connection went back to the pool.
        assert_eq!(
            origin.accepts() - accepts,
            1,
            "{io}: upstream connection not reused"
        );
        let line = gw.wait_access_line(Duration::from_secs(5), |l| l.contains("/big"));
        assert!(
            line.contains(&format!(" 200 {} ", big.len())),
            "{io}: the access log counts the spliced bytes: {line}"
        );
    }
}

#[test]
fn large_chunked_response_keeps_the_upstreams_chunks() {
    let big = pattern_bytes(3 * MIB, 2);
    let body = big.clone();
    // Large chunks (spliced after their first bytes), a tiny one in between (copied), and
    // a last one smaller than the threshold.
    let sizes = [700_000, 5, 1_500_000, 100, 300_000];
    let origin = Origin::start(move |_| Reply::ok(body.clone()).chunked(&sizes));
    for io in DRIVERS {
        let gw = gateway(origin.addr(), io);
        let mut c = gw.client();
        for round in 0..2 {
            let r = c.get("/chunked");
            assert_eq!(r.status, 200, "{io} round {round}");
            let BodyFraming::Chunked(got) = &r.framing else {
                panic!("{io}: not chunked: {:?}", r.framing);
            };
            let mut want = Vec::new();
            let mut left = big.len();
            for s in sizes.iter().cycle() {
                if left == 0 {
                    break;
                }
                want.push((*s).min(left));
                left -= (*s).min(left);
            }
            assert_eq!(got, &want, "{io}: the client gets the upstream's chunks");
            assert!(r.body == big, "{io} round {round}: the body differs");
        }
        assert_eq!(splices(&gw, "response", 2), 2.0, "{io}");
        assert_eq!(
            c.get("/again").status,
            200,
            "{io}: the connection is still good"
        );
    }
}

#[test]
fn close_delimited_response_is_spliced_to_the_end() {
    let big = pattern_bytes(2 * MIB, 3);
    let body = big.clone();
    let origin = Origin::start(move |_| Reply::ok(body.clone()).close_delimited());
    let gw = gateway(origin.addr(), "uring");
    let mut c = gw.client();
    let r = c.get("/until-close");
    assert_eq!(r.status, 200);
    assert!(r.body == big, "the body differs ({} bytes)", r.body.len());
    assert!(r.says_close());
    c.expect_closed(Duration::from_secs(5), "after a close-delimited body");
    assert_eq!(splices(&gw, "response", 1), 1.0);
}

#[test]
fn large_upload_is_spliced() {
    let origin = serving(&[]);
    for io in DRIVERS {
        let gw = gateway(origin.addr(), io);
        let body = pattern_bytes(10 * MIB, 4);
        let mut c = gw.client();
        let r = c.must(&Req::post("/upload", body.clone()));
        assert_eq!(
            (r.status, r.body_str()),
            (200, format!("/upload {}", body.len())),
            "{io}"
        );
        assert!(
            origin.last_request().body == body,
            "{io}: the upload differs"
        );
        assert_eq!(splices(&gw, "request", 1), 1.0, "{io}");
        // Chunked uploads splice their large chunks too.
        let chunked = Req::post("/chunked-upload", body.clone()).chunked(&[3 * MIB, 17, 2 * MIB]);
        let r = c.must(&chunked);
        assert_eq!(
            (r.status, r.body_str()),
            (200, format!("/chunked-upload {}", body.len())),
            "{io}"
        );
        assert!(
            origin.last_request().body == body,
            "{io}: the chunked upload differs"
        );
        assert_eq!(splices(&gw, "request", 2), 2.0, "{io}");
        assert_eq!(c.get("/after").status, 200, "{io}");
    }
}

#[test]
fn upload_with_its_first_bytes_in_the_head_packet() {
    let origin = serving(&[]);
    let gw = Gateway::with(&config(origin.addr(), "uring").server("request_buffering", "0"));
    let body = pattern_bytes(2 * MIB, 5);
    let mut c = gw.client();
    let mut first = format!(
        "POST /up HTTP/1.1\r\nHost: app\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    first.extend_from_slice(&body[..3000]);
    c.send(&first).unwrap();
    // Let the head and the first bytes be read on their own before the rest arrives.
    gateway_tests::wait_until(Duration::from_secs(5), "the head at the origin", || {
        origin.heads_seen() == 1
    });
    c.send(&body[3000..]).unwrap();
    let r = c.read_response().unwrap();
    assert_eq!(
        (r.status, r.body_str()),
        (200, format!("/up {}", body.len()))
    );
    assert!(origin.last_request().body == body, "the upload differs");
    assert_eq!(splices(&gw, "request", 1), 1.0);
}

#[test]
fn pipelined_requests_after_spliced_bodies_are_answered() {
    let big = pattern_bytes(MIB, 6);
    let origin = serving(&big);
    for io in DRIVERS {
        let gw = gateway(origin.addr(), io);
        let upload = pattern_bytes(MIB, 7);
        let mut c = gw.client();
        // An upload, a download and a small request, written back to back in one go: the
        // splice of each body must stop exactly at its end.
        let mut bytes = Req::post("/up", upload.clone()).to_bytes();
        bytes.extend_from_slice(&Req::get("/big").to_bytes());
        bytes.extend_from_slice(&Req::post("/next", "tail").to_bytes());
        let writer = {
            let mut s = c.stream().try_clone().unwrap();
            thread::spawn(move || s.write_all(&bytes))
        };
        let r = c.read_response().unwrap();
        assert_eq!(r.body_str(), format!("/up {}", upload.len()), "{io}");
        let r = c.read_response().unwrap();
        assert!(
            r.status == 200 && r.body == big,
            "{io}: the download differs"
        );
        let r = c.read_response().unwrap();
        assert_eq!(r.body_str(), "/next 4", "{io}: the pipelined request");
        writer.join().unwrap().unwrap();
        let up = origin
            .requests()
            .into_iter()
            .rfind(|r| r.path() == "/up")
            .unwrap();
        assert!(up.body == upload, "{io}: the upload differs");
        assert_eq!(splices(&gw, "request", 3), 1.0, "{io}");
        assert_eq!(splices(&gw, "response", 3), 1.0, "{io}");
    }
}

#[test]
fn upstream_closing_mid_body_closes_the_client_and_is_booked_upstream() {
    const FULL: usize = 4 * MIB;
    let origin = Origin::start(|r| match r.path() {
        "/reset" => Reply::ok(vec![b'r'; FULL]).reset_after(FULL / 2),
        _ => Reply::ok("fine"),
    });
    // And an upstream that ends with a clean FIN short of its Content-Length.
    let fin = raw_origin(|_, s| {
        let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {FULL}\r\n\r\n");
        let _ = s.write_all(head.as_bytes());
        let _ = s.write_all(&vec![b'f'; FULL / 2]);
        false
    });
    for (io, addr, path) in [
        ("uring", origin.addr(), "/reset"),
        ("epoll", origin.addr(), "/reset"),
        ("uring", fin.addr, "/fin"),
        ("epoll", fin.addr, "/fin"),
    ] {
        let gw = gateway(addr, io);
        let mut c = gw.client();
        c.set_read_timeout(Duration::from_secs(10));
        let started = Instant::now();
        let result = c.request(&Req::get(path));
        assert!(
            result.is_err(),
            "{io} {path}: a truncated body looked complete: {:?}",
            result.map(|r| (r.status, r.body.len()))
        );
        assert!(
            started.elapsed() < Duration::from_secs(8),
            "{io} {path}: hung"
        );
        c.expect_closed(Duration::from_secs(3), path);
        assert!(splices(&gw, "response", 1) >= 1.0, "{io} {path}");
        gateway_tests::wait_until(
            Duration::from_secs(5),
            "the failure booked upstream",
            || upstream_failures(&gw) >= 1.0,
        );
        let line = gw.wait_access_line(Duration::from_secs(5), |l| l.contains(path));
        assert!(line.contains(&addr.to_string()), "{io}: {line}");
        if path == "/fin" {
            // The size field is what reached the client, as nginx's `$body_bytes_sent`:
            // every byte before the FIN went out, not 0 for a failed response.
            let sent = format!("\" 502 {} ", FULL / 2);
            assert!(line.contains(&sent), "{io}: {line}");
        }
    }
    // The copy path logs the same.
    let gw = Gateway::with(&config(fin.addr, "uring").server_raw("splice_bodies_min", "\"0\""));
    let mut c = gw.client();
    c.set_read_timeout(Duration::from_secs(10));
    assert!(c.request(&Req::get("/fin")).is_err());
    let line = gw.wait_access_line(Duration::from_secs(5), |l| l.contains("/fin"));
    assert!(
        line.contains(&format!("\" 502 {} ", FULL / 2)),
        "copy: {line}"
    );
    assert_eq!(splices_now(&gw, "response"), 0.0);
}

#[test]
fn bytes_past_the_content_length_never_reach_the_client() {
    const LEN: usize = 300_000;
    let stray = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nEVIL!";
    // Every response comes with a forged second response glued to its end, in the same
    // write; the connection stays open for more requests.
    let origin = raw_origin(move |n, s| {
        let mut out = format!("HTTP/1.1 200 OK\r\nContent-Length: {LEN}\r\n\r\n").into_bytes();
        out.extend_from_slice(&pattern_bytes(LEN, n as u64));
        out.extend_from_slice(stray);
        s.write_all(&out).is_ok()
    });
    for io in DRIVERS {
        let gw = gateway(origin.addr, io);
        let accepts = origin.accepts.load(Ordering::SeqCst);
        let mut c = gw.client();
        for round in 0..3 {
            let r = c.get("/x");
            assert_eq!(r.status, 200, "{io} round {round}");
            assert_eq!(r.body.len(), LEN, "{io} round {round}");
            assert!(!r.body.ends_with(b"EVIL!"), "{io}: stray bytes relayed");
        }
        assert!(splices(&gw, "response", 3) >= 1.0, "{io}");
        // An upstream out of step is never reused: every request had a connection of its
        // own (a reused one would have answered with the forged response).
        assert_eq!(
            origin.accepts.load(Ordering::SeqCst) - accepts,
            3,
            "{io}: a connection with stray bytes was reused"
        );
    }
}

#[test]
fn client_aborting_a_download_frees_the_upstream_connection() {
    let origin = Origin::start(|_| Reply::ok(vec![b'a'; 32 * MIB]));
    for io in DRIVERS {
        let gw = gateway(origin.addr(), io);
        let mut s = TcpStream::connect(gw.http_addr()).unwrap();
        s.write_all(b"GET /big HTTP/1.1\r\nHost: app\r\n\r\n")
            .unwrap();
        let mut buf = vec![0u8; 256 * 1024];
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.read_exact(&mut buf).unwrap();
        gateway_tests::wait_until(Duration::from_secs(5), "a spliced response", || {
            splices_now(&gw, "response") == 1.0
        });
        drop(s);
        gateway_tests::wait_until(
            Duration::from_secs(5),
            "the upstream connection of the aborted download to be closed",
            || origin.active() == 0,
        );
        let accepts = origin.accepts();
        assert_eq!(gw.get("/small-after").status, 200, "{io}");
        assert_eq!(origin.accepts(), accepts + 1, "{io}: a fresh connection");
        assert_eq!(
            upstream_failures(&gw),
            0.0,
            "{io}: a client abort is not the upstream's"
        );
    }
}

#[test]
fn slow_reader_of_a_spliced_response_is_cut_off() {
    const BIG: usize = 64 * MIB;
    let origin = Origin::start(|_| Reply::ok(vec![b'r'; BIG]));
    let gw = Gateway::with(
        &Config::new()
            .server_raw("io", "\"uring\"")
            .server("client_min_rate", "4MiB")
            .upstream(Upstream::new("app", &[origin.addr()]))
            .route(Route::prefix("/", "app").send_timeout("1s")),
    );
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(64 * 1024).unwrap();
    socket.connect(&gw.http_addr().into()).unwrap();
    let mut stream: TcpStream = socket.into();
    stream
        .write_all(b"GET /big HTTP/1.1\r\nHost: app\r\n\r\n")
        .unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    origin.wait_requests(1, Duration::from_secs(5));
    let started = Instant::now();
    let mut got = 0usize;
    let mut buf = vec![0u8; 16 * 1024];
    // About 320 KiB/s against a 4 MiB/s minimum.
    while origin.active() > 0 {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "still served ({got} bytes)"
        );
        thread::sleep(Duration::from_millis(50));
    }
    assert!(
        got < BIG,
        "the whole response was delivered to a slow reader"
    );
    gateway_tests::wait_until(Duration::from_secs(3), "the upstream closed", || {
        origin.active() == 0
    });
    let m = scrape(gw.admin_addr());
    assert_eq!(
        m.get("gateway_body_splice_total", &[("direction", "response")]),
        Some(1.0)
    );
    assert!(
        m.get("gateway_local_refusals_total", &[("reason", "slow_client")])
            .unwrap_or(0.0)
            >= 1.0
    );
}

#[test]
fn slow_spliced_upload_gets_408_and_frees_the_upstream_connection() {
    let origin = Origin::echo();
    let gw = Gateway::with(
        &config(origin.addr(), "epoll")
            .server("request_buffering", "1KiB")
            .server("client_body_timeout", "1s")
            .server("client_min_rate", "64KiB"),
    );
    let mut c = gw.client();
    c.set_read_timeout(Duration::from_secs(10));
    c.send(b"POST /slow HTTP/1.1\r\nHost: app\r\nContent-Length: 1000000\r\n\r\n")
        .unwrap();
    c.send(&[b'x'; 2048]).unwrap();
    gateway_tests::wait_until(Duration::from_secs(5), "the upstream connected", || {
        origin.active() == 1
    });
    let started = Instant::now();
    let writer = {
        let mut s = c.stream().try_clone().unwrap();
        thread::spawn(move || {
            // 1 KiB every 100 ms: 10 KiB/s, far under the 64 KiB/s minimum.
            for _ in 0..100 {
                if s.write_all(&[b'y'; 1024]).is_err() {
                    return;
                }
                thread::sleep(Duration::from_millis(100));
            }
        })
    };
    let r = c.read_response().expect("a 408 response");
    assert_eq!(r.status, 408, "{:?}", r.body_str());
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "408 after {:?}",
        started.elapsed()
    );
    assert_eq!(splices(&gw, "request", 1), 1.0);
    gateway_tests::wait_until(Duration::from_secs(3), "the upstream closed", || {
        origin.active() == 0
    });
    drop(c);
    writer.join().unwrap();
    assert_eq!(
        upstream_failures(&gw),
        0.0,
        "a slow client is not the upstream's fault"
    );
}

#[test]
fn splice_off_copies_every_body() {
    let big = pattern_bytes(2 * MIB, 8);
    let origin = serving(&big);
    let gw = Gateway::with_env(
        &config(origin.addr(), "uring"),
        &[("GATEWAY_TUNNEL_SPLICE", "off")],
    );
    let mut c = gw.client();
    assert!(c.get("/big").body == big);
    let upload = pattern_bytes(2 * MIB, 9);
    assert_eq!(
        c.must(&Req::post("/up", upload.clone())).body_str(),
        format!("/up {}", upload.len())
    );
    assert!(origin.last_request().body == upload);
    assert_eq!(splices(&gw, "request", 2), 0.0);
    assert_eq!(splices(&gw, "response", 2), 0.0);
}

#[test]
fn zero_threshold_turns_body_splice_off() {
    let big = pattern_bytes(MIB, 10);
    let origin = serving(&big);
    let gw = Gateway::with(&config(origin.addr(), "uring").server("splice_bodies_min", "0"));
    assert!(gw.get("/big").body == big);
    assert_eq!(splices(&gw, "response", 1), 0.0);
}

/// A hand-rolled upstream: `answer(n, stream)` answers the n-th request (from 1) after its
/// head was read (requests carry no body here), and says whether to keep the connection.
struct RawOrigin {
    addr: SocketAddr,
    accepts: Arc<AtomicUsize>,
}

fn raw_origin(answer: impl Fn(usize, &mut TcpStream) -> bool + Send + Sync + 'static) -> RawOrigin {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let accepts = Arc::new(AtomicUsize::new(0));
    let count = accepts.clone();
    let answer = Arc::new(answer);
    let served = Arc::new(AtomicUsize::new(0));
    thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(mut s) = s else { return };
            count.fetch_add(1, Ordering::SeqCst);
            let (answer, served) = (answer.clone(), served.clone());
            thread::spawn(move || {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                loop {
                    match s.read(&mut byte) {
                        Ok(1) => head.push(byte[0]),
                        _ => return,
                    }
                    if head.ends_with(b"\r\n\r\n") {
                        head.clear();
                        let n = served.fetch_add(1, Ordering::SeqCst) + 1;
                        if !answer(n, &mut s) {
                            return;
                        }
                    }
                }
            });
        }
    });
    RawOrigin { addr, accepts }
}

#[test]
fn the_pipe_budget_falls_back_to_copying() {
    // With no descriptors to spare for pipes (1100 descriptors, 128 fixed, and two for
    // each of 486 connections: `budget::pipes_per_worker` is 0), bodies are copied, and
    // still served.
    let big = pattern_bytes(MIB, 11);
    let origin = serving(&big);
    let gw = Gateway::with_nofile(
        &config(origin.addr(), "uring").server_raw("max_connections", "486"),
        1100,
    );
    assert!(gw.get("/big").body == big);
    assert_eq!(splices(&gw, "response", 1), 0.0);
}
