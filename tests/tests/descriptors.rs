//! Upstream connects that find no descriptor free (issue 13, the scale run): the gateway,
//! run with a low RLIMIT_NOFILE, has its descriptors taken by idle client connections down
//! to the admin reserve. A burst of requests then needs more upstream sockets than are
//! free: each request waits (for an idle pooled connection or a retried connect) instead of
//! failing with a 500 at once, since descriptors free up as the other requests finish.
//! When nothing frees up within `connect_timeout` the request still gets the 500
//! `upstream_local`, in bounded time.

use std::io::Read;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use gateway_tests::{Client, Config, Gateway, Origin, Reply, Req, Route, Upstream};

const NOFILE: u64 = 256;

fn gateway(origin: &Origin, io: Option<&str>, connect_timeout: &str) -> Gateway {
    gateway_with(origin, io, connect_timeout, |c| c)
}

fn gateway_with(
    origin: &Origin,
    io: Option<&str>,
    connect_timeout: &str,
    tweak: impl FnOnce(Config) -> Config,
) -> Gateway {
    let mut config = Config::new()
        .workers(1)
        // Explicit and high, and idle clients kept for the whole test: the descriptor
        // limit is what these tests hit, not the connection cap or a timeout.
        .server_raw("max_connections", "10000")
        .server("header_timeout", "300s")
        .server("keepalive_timeout", "300s")
        .upstream(Upstream::new("app", &[origin.addr()]).max_fails(1))
        .route(Route::prefix("/", "app").connect_timeout(connect_timeout));
    if let Some(io) = io {
        config = config.server_raw("io", &format!("\"{io}\""));
    }
    Gateway::with_nofile(&tweak(config), NOFILE)
}

fn open_fds(gw: &Gateway) -> usize {
    std::fs::read_dir(format!("/proc/{}/fd", gw.pid()))
        .map(|d| d.count())
        .unwrap_or(usize::MAX)
}

/// Whether the gateway closed `s` (EOF or reset waiting), without blocking.
fn closed_by_gateway(s: &TcpStream) -> bool {
    s.set_nonblocking(true).expect("nonblocking");
    let mut byte = [0u8; 1];
    let closed = match (&*s).read(&mut byte) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
    };
    s.set_nonblocking(false).expect("blocking");
    closed
}

/// Connections in the accept queue of the gateway's listener (the `rx_queue` of a
/// listening socket in /proc/net/tcp is its accept backlog).
fn accept_backlog(port: u16) -> usize {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let local_port = u16::from_str_radix(fields.get(1)?.rsplit(':').next()?, 16).ok()?;
            let listening = *fields.get(3)? == "0A";
            let rx = fields.get(4)?.rsplit(':').next()?;
            (listening && local_port == port).then(|| usize::from_str_radix(rx, 16).ok())?
        })
        .sum()
}

/// Opens idle client connections until the gateway refuses one at accept (its descriptor
/// fell in the admin reserve): the data plane then has no descriptor left. Returns the
/// connections it kept. A connection is taken as accepted once the listener's backlog is
/// empty; one refused just after that is merely held in vain, and the next is refused too.
fn fill_descriptors(gw: &Gateway) -> Vec<TcpStream> {
    let mut held = Vec::new();
    let port = gw.http_addr().port();
    for _ in 0..2 * NOFILE {
        let before = open_fds(gw);
        let s = gateway_tests::client::connect(gw.http_addr());
        // Polled every millisecond, not at wait_until's 20 ms: some 200 connections each.
        let deadline = Instant::now() + Duration::from_secs(10);
        let refused = loop {
            if closed_by_gateway(&s) {
                break true;
            }
            if open_fds(gw) > before || accept_backlog(port) == 0 {
                break false;
            }
            assert!(
                Instant::now() < deadline,
                "the gateway neither accepted nor refused a held connection in 10 s"
            );
            std::thread::sleep(Duration::from_millis(1));
        };
        if refused {
            return held;
        }
        held.push(s);
    }
    panic!(
        "{} connections held and none refused: the descriptor limit was not reached",
        held.len()
    );
}

/// Lets go of [`FREE`] held connections and waits until the gateway closed them. The first
/// held are surely accepted (the last may be one refused just after the backlog emptied):
/// these FREE descriptors come free, and only these.
fn free_descriptors(gw: &Gateway, held: &mut Vec<TcpStream>) {
    let full = open_fds(gw);
    held.drain(..FREE);
    gateway_tests::wait_until(
        Duration::from_secs(10),
        "the gateway to close the connections let go",
        || open_fds(gw) <= full - FREE,
    );
}

fn metric(gw: &Gateway, name: &str, labels: &[(&str, &str)]) -> f64 {
    gateway_tests::control::scrape(gw.admin_addr())
        .get(name, labels)
        .unwrap_or(0.0)
}

const WAITS: &str = "gateway_upstream_descriptor_waits_total";
const LOCAL_REFUSALS: &str = "gateway_local_refusals_total";

/// Descriptors left for upstream sockets when the burst comes.
const FREE: usize = 4;
/// Requests in the burst, all at once: many more than the free descriptors.
const BURST: usize = 24;

fn a_burst_beyond_the_free_descriptors_waits_and_is_served(io: Option<&str>) {
    let origin = Origin::start(|_| Reply::ok("served").delay(Duration::from_millis(50)));
    // connect_timeout bounds the wait: long enough for a loaded machine to serve the
    // burst a few at a time.
    let gw = gateway(&origin, io, "20s");
    // The burst's own client connections are accepted first: they need no descriptor later.
    let burst: Vec<Client> = (0..BURST).map(|_| gw.client()).collect();
    let mut held = fill_descriptors(&gw);
    assert!(held.len() > 100, "{} held", held.len());
    free_descriptors(&gw, &mut held);

    let threads: Vec<_> = burst
        .into_iter()
        .enumerate()
        .map(|(i, mut c)| {
            std::thread::spawn(move || {
                c.set_read_timeout(Duration::from_secs(60));
                c.request(&Req::get(&format!("/burst/{i}")))
                    .map(|r| (r.status, r.body_str()))
            })
        })
        .collect();
    for (i, t) in threads.into_iter().enumerate() {
        let got = t.join().expect("burst thread");
        assert!(
            matches!(&got, Ok((200, body)) if body == "served"),
            "burst request {i} ({io:?}): {got:?}"
        );
    }
    assert!(
        metric(&gw, WAITS, &[]) >= 1.0,
        "the burst ran out of descriptors and waited"
    );
    assert_eq!(
        metric(&gw, LOCAL_REFUSALS, &[("reason", "upstream_local")]),
        0.0,
        "no request failed for the shortage"
    );
    drop(held);
}

#[test]
fn a_burst_beyond_the_free_descriptors_waits_and_is_served_uring() {
    a_burst_beyond_the_free_descriptors_waits_and_is_served(None);
}

#[test]
fn a_burst_beyond_the_free_descriptors_waits_and_is_served_epoll() {
    a_burst_beyond_the_free_descriptors_waits_and_is_served(Some("epoll"));
}

/// Nothing frees up: the wait ends at `connect_timeout` with the 500 `upstream_local` of
/// before, no hang, no server marked down, and service resumes once descriptors are back.
#[test]
fn descriptors_that_never_free_end_the_wait_at_connect_timeout() {
    let origin = Origin::start(|_| Reply::ok("served"));
    let gw = gateway(&origin, None, "300ms");
    let mut c = gw.client();
    c.set_read_timeout(Duration::from_secs(30));
    let held = fill_descriptors(&gw);
    let started = Instant::now();
    let r = c.request(&Req::get("/starved")).expect("a response");
    let waited = started.elapsed();
    assert_eq!(r.status, 500, "{:?}", r.body_str());
    assert!(
        waited >= Duration::from_millis(300),
        "answered after {waited:?}: before connect_timeout, so it did not wait"
    );
    assert!(metric(&gw, WAITS, &[]) >= 1.0);
    assert!(metric(&gw, LOCAL_REFUSALS, &[("reason", "upstream_local")]) >= 1.0);
    let fds = open_fds(&gw);
    drop(held);
    gateway_tests::wait_until(
        Duration::from_secs(10),
        "the gateway to close the held connections",
        || open_fds(&gw) + 100 < fds,
    );
    // The single server was not marked down (max_fails 1): served at once.
    assert_eq!(gw.get("/after").status, 200);
}

/// HTTP/2 streams call the same exchange: a burst of streams on one connection, more than
/// the free descriptors, is served in full too.
#[test]
fn http2_streams_beyond_the_free_descriptors_wait_and_are_served() {
    use gateway_tests::h2::{exchange, runtime, H2Req};
    let origin = Origin::start(|_| Reply::ok("served").delay(Duration::from_millis(50)));
    let gw = gateway_with(&origin, None, "20s", |c| c.listener_raw("h2c", "true"));
    let rt = runtime();
    let addr = gw.http_addr();
    let (send, _conn) = rt.block_on(async {
        let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (send, conn) = h2::client::handshake(tcp).await.expect("h2 handshake");
        (send, tokio::spawn(conn))
    });
    let mut held = fill_descriptors(&gw);
    free_descriptors(&gw, &mut held);
    let results = rt.block_on(async {
        let streams: Vec<_> = (0..BURST)
            .map(|i| {
                let mut send = send.clone();
                tokio::spawn(async move {
                    let req = H2Req::get(&format!("/h2-burst/{i}"));
                    tokio::time::timeout(Duration::from_secs(60), exchange(&mut send, &req)).await
                })
            })
            .collect();
        let mut results = Vec::new();
        for s in streams {
            results.push(s.await.expect("stream task"));
        }
        results
    });
    for (i, r) in results.into_iter().enumerate() {
        let r = r.expect("answered within 60 s");
        let r = r.unwrap_or_else(|e| panic!("stream {i}: {e}"));
        assert_eq!(
            r.status,
            200,
            "stream {i}: {:?}",
            String::from_utf8_lossy(&r.body)
        );
    }
    assert!(metric(&gw, WAITS, &[]) >= 1.0, "the streams waited");
    assert_eq!(
        metric(&gw, LOCAL_REFUSALS, &[("reason", "upstream_local")]),
        0.0
    );
    drop(held);
}

/// Idle upstream connections kept beyond `keepalive` (`keepalive_linger`) hold descriptors
/// that neither `max_connections` nor the pipe budget counts. One client's bursts of HTTP/2
/// streams to several upstreams in turn (each leaving a burst's connections idle) must not
/// fill the process with them and get another client's accepts refused or its requests
/// 500 (attack report on the linger, F1: 265 of 381 of the victim's connections refused).
#[test]
fn lingering_idle_connections_never_lock_other_clients_out() {
    use gateway_tests::h2::{exchange, H2Client, H2Req};
    let origin = Origin::start(|_| Reply::ok("ok").delay(Duration::from_millis(20)));
    let mut config = Config::new().workers(1).listener_raw("h2c", "true");
    for name in ["a", "b", "c", "d", "victim"] {
        config = config.upstream(Upstream::new(name, &[origin.addr()]).keepalive(2));
    }
    for name in ["a", "b", "c", "d"] {
        config = config.route(Route::prefix("/", name).host(name));
    }
    config = config.route(Route::prefix("/", "victim").connect_timeout("2s"));
    // The derived max_connections for 256 descriptors is 48: 45 streams fit beside the
    // attacker's connection and the victim's.
    let gw = Gateway::with_nofile(&config, NOFILE);
    let addr = gw.http_addr();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let attacker = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let client = H2Client::connect(addr);
            let mut bursts = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let host = ["a", "b", "c", "d"][bursts % 4];
                client.rt.block_on(async {
                    let streams: Vec<_> = (0..45)
                        .map(|i| {
                            let mut send = client.send.clone();
                            let req = H2Req::get(&format!("/burst/{i}")).authority(host);
                            tokio::spawn(async move { exchange(&mut send, &req).await })
                        })
                        .collect();
                    for s in streams {
                        let _ = s.await;
                    }
                });
                bursts += 1;
            }
            bursts
        })
    };
    let (mut ok, mut failed) = (0, Vec::new());
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(4) {
        let answer = (|| -> std::io::Result<String> {
            use std::io::Write;
            let mut s = TcpStream::connect(addr)?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            s.write_all(b"GET /v HTTP/1.1\r\nHost: victim.test\r\nConnection: close\r\n\r\n")?;
            let mut out = String::new();
            s.read_to_string(&mut out)?;
            Ok(out)
        })();
        match answer {
            Ok(r) if r.starts_with("HTTP/1.1 200") => ok += 1,
            other => failed.push(format!("{other:?}").chars().take(80).collect::<String>()),
        }
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let bursts = attacker.join().expect("attacker");
    assert!(bursts >= 8, "the attacker ran only {bursts} bursts");
    assert!(
        failed.is_empty(),
        "{} of {} victim requests failed while one client burst to 4 upstreams: {:?}",
        failed.len(),
        ok + failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(ok > 20, "only {ok} victim requests in 4 s");
}
