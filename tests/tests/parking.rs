//! Idle keep-alive connections parked with no task (issue 13, `dataplane::parking`): a
//! plaintext HTTP/1 connection quiet for `server.keepalive_park_after` leaves its task for
//! the worker's parking lot, and must come back for its next request as if it had never
//! left: served (every time it parks again), with no byte lost when a request arrives
//! just as it parks, closed and uncounted when its client goes, closed at its keep-alive
//! deadline, closed by a drain, and serving across a reload. Every case runs on both I/O
//! drivers (`GATEWAY_TEST_IO=epoll` re-runs the suite on the epoll driver).
//!
//! `gateway_connections_parked` tells when connections are parked: the tests wait on it
//! rather than sleeping past the grace.

use std::thread;
use std::time::{Duration, Instant};

use gateway_tests::control::{admin_request, scrape, wait_metrics, write_atomically};
use gateway_tests::{Client, Config, Gateway, Route};

/// The grace before an idle connection parks, short so that the tests park quickly.
const PARK_AFTER: &str = "50ms";
const SECOND: Duration = Duration::from_secs(1);

/// A gateway answering `/` itself with `body`, parking idle connections after
/// [`PARK_AFTER`], with `keepalive_timeout`.
fn config(body: &str, keepalive_timeout: &str) -> Config {
    Config::new()
        .server("keepalive_park_after", PARK_AFTER)
        .server("keepalive_timeout", keepalive_timeout)
        .route(Route::respond_prefix("/", 200, body))
}

fn parked(gw: &Gateway) -> f64 {
    scrape(gw.admin_addr()).sum("gateway_connections_parked", &[])
}

/// Waits until `n` connections are parked (and `n` are open at all: parked ones count).
fn wait_parked(gw: &Gateway, n: usize) {
    wait_metrics(
        gw.admin_addr(),
        10 * SECOND,
        &format!("{n} connections parked"),
        |m| {
            m.sum("gateway_connections_parked", &[]) == n as f64
                && m.sum("gateway_connections_active", &[]) == n as f64
        },
    );
}

/// `n` keep-alive connections, each after one request answered `body`.
fn clients(gw: &Gateway, n: usize, body: &str) -> Vec<Client> {
    (0..n)
        .map(|i| {
            let mut c = gw.client();
            c.set_read_timeout(10 * SECOND);
            let r = c.get(&format!("/first/{i}"));
            assert_eq!(
                (r.status, r.body_str().as_str()),
                (200, body),
                "connection {i}"
            );
            c
        })
        .collect()
}

#[test]
fn a_parked_connection_serves_its_next_request_every_time_it_parks() {
    let gw = Gateway::with(&config("parked", "30s"));
    let mut held = clients(&gw, 20, "parked");
    // Three rounds: the second and third park sockets the lot already watched once (a
    // one-shot registration re-armed, not added again).
    for round in 0..3 {
        wait_parked(&gw, 20);
        for (i, c) in held.iter_mut().enumerate() {
            let r = c.get(&format!("/round/{round}/{i}"));
            assert_eq!(r.status, 200, "round {round}, connection {i}");
            assert_eq!(r.body_str(), "parked", "round {round}, connection {i}");
            assert!(!r.says_close(), "round {round}, connection {i}: kept alive");
        }
    }
    // Pipelined requests on a woken connection are all answered, in order.
    wait_parked(&gw, 20);
    let replies = held[0]
        .pipeline(&[
            gateway_tests::Req::get("/p/1"),
            gateway_tests::Req::get("/p/2"),
            gateway_tests::Req::get("/p/3"),
        ])
        .expect("three pipelined requests on a parked connection");
    assert_eq!(replies.len(), 3);
    assert!(replies.iter().all(|r| r.status == 200));
}

/// Requests sent at the moment their connection parks (the grace ends, the socket moves
/// from the reactor to the lot) must be read: a byte that arrived between the task's last
/// look and the lot's arming would otherwise raise no event, and the request would hang.
/// Each connection sends its next request at a different point around the grace, over
/// and over.
#[test]
fn requests_arriving_as_their_connection_parks_are_not_lost() {
    let gw = Gateway::with(&config("ok", "30s"));
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let addr = gw.http_addr();
            thread::spawn(move || {
                let mut c = Client::connect(addr);
                c.set_read_timeout(10 * SECOND);
                for i in 0..40u64 {
                    // 40 to 64 ms after the last response: around the 50 ms grace, on
                    // both sides of it.
                    thread::sleep(Duration::from_micros(
                        40_000 + (i * 997 + t * 3_001) % 24_000,
                    ));
                    let r = c
                        .request(&gateway_tests::Req::get(&format!("/t{t}/{i}")))
                        .unwrap_or_else(|e| panic!("thread {t}, request {i}: {e}"));
                    assert_eq!(r.status, 200, "thread {t}, request {i}");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("a client thread failed");
    }
}

#[test]
fn a_client_that_closes_while_parked_is_closed_and_uncounted() {
    let gw = Gateway::with(&config("ok", "30s"));
    let held = clients(&gw, 10, "ok");
    wait_parked(&gw, 10);
    // Five close cleanly (FIN), five reset (RST): both wake the lot and end the connection.
    for (i, c) in held.into_iter().enumerate() {
        if i % 2 == 1 {
            socket2::SockRef::from(c.stream())
                .set_linger(Some(Duration::ZERO))
                .unwrap();
        }
        drop(c);
    }
    wait_metrics(
        gw.admin_addr(),
        10 * SECOND,
        "the closed parked connections closed and uncounted",
        |m| {
            m.sum("gateway_connections_parked", &[]) == 0.0
                && m.sum("gateway_connections_active", &[]) == 0.0
        },
    );
    // The gateway's side is closed too: nothing of those sockets is left established.
    assert_eq!(gw.get("/after").status, 200, "still serving");
}

#[test]
fn keepalive_timeout_closes_a_parked_connection() {
    let gw = Gateway::with(&config("ok", "700ms"));
    let mut c = gw.client();
    assert_eq!(c.get("/x").status, 200);
    let answered = Instant::now();
    wait_parked(&gw, 1);
    let (outcome, extra) = c.wait_closed(5 * SECOND);
    let waited = answered.elapsed();
    assert!(
        outcome.is_closed(),
        "parked connection still open after 5 s (keepalive_timeout 700ms)"
    );
    assert!(
        waited >= Duration::from_millis(500),
        "closed after {waited:?}: too early for keepalive_timeout 700ms"
    );
    assert!(extra.is_empty(), "an idle close sends nothing: {extra:?}");
    wait_metrics(
        gw.admin_addr(),
        5 * SECOND,
        "the expired connection uncounted",
        |m| m.sum("gateway_connections_active", &[]) == 0.0,
    );
}

#[test]
fn a_drain_closes_parked_connections_and_exits_promptly() {
    let mut gw = Gateway::with(&config("ok", "60s").server("graceful_timeout", "30s"));
    let mut held = clients(&gw, 10, "ok");
    wait_parked(&gw, 10);
    let started = Instant::now();
    gw.signal(libc::SIGTERM);
    for (i, c) in held.iter_mut().enumerate() {
        let (outcome, _) = c.wait_closed(10 * SECOND);
        assert!(
            outcome.is_closed(),
            "parked connection {i} not closed by the drain"
        );
    }
    let status = gw.wait_exit(10 * SECOND);
    assert!(status.is_some(), "the gateway did not exit after the drain");
    // Nowhere near graceful_timeout (30 s): parked connections do not hold the drain.
    assert!(
        started.elapsed() < 10 * SECOND,
        "the drain took {:?}",
        started.elapsed()
    );
}

#[test]
fn parked_connections_keep_serving_across_a_reload() {
    let before = config("before", "30s");
    let gw = Gateway::with(&before);
    let mut held = clients(&gw, 10, "before");
    wait_parked(&gw, 10);
    let after = Config {
        routes: vec![Route::respond_prefix("/", 200, "after")],
        ..before
    };
    write_atomically(gw.config_path(), &after.to_toml());
    let r = admin_request(gw.admin_addr(), "POST", "/reload", None);
    assert_eq!(r.status, 200, "reload: {}", r.body_str());
    // Each parked connection serves its next request, with the config current when the
    // request came, and parks again.
    for (i, c) in held.iter_mut().enumerate() {
        let r = c.get(&format!("/reloaded/{i}"));
        assert_eq!(
            (r.status, r.body_str().as_str()),
            (200, "after"),
            "connection {i}"
        );
    }
    wait_parked(&gw, 10);
    assert_eq!(parked(&gw), 10.0);
}

fn parks(gw: &Gateway) -> f64 {
    scrape(gw.admin_addr()).sum("gateway_connections_parks_total", &[])
}

/// A client pacing its requests just past `keepalive_park_after` would make every request
/// pay for a park and a wake (attack11: 33-48 % more CPU per request). Each wake that comes
/// soon after its park doubles the delay before the next (50, 100, 200 ... ms, at most 8
/// times), so a client sending every 150 ms parks a few times, then never again; with a
/// pause long enough to count as idle, it parks again.
#[test]
fn a_client_pacing_requests_past_the_park_delay_stops_parking() {
    let gw = Gateway::with(&config("ok", "30s"));
    let mut held = clients(&gw, 1, "ok");
    for i in 0..20 {
        thread::sleep(Duration::from_millis(150));
        assert_eq!(
            held[0].get(&format!("/paced/{i}")).status,
            200,
            "request {i}"
        );
    }
    // Published every 200 ms: wait for the count to settle.
    thread::sleep(Duration::from_millis(500));
    let paced = parks(&gw);
    assert!(
        (1.0..=4.0).contains(&paced),
        "20 requests 150 ms apart parked {paced} times (one per request without the doubling)"
    );
    // Idle for longer than 8 delays of the last park: the next park comes at 50 ms again.
    wait_parked(&gw, 1);
    assert_eq!(held[0].get("/after-a-pause").status, 200);
    wait_parked(&gw, 1);
}

/// `keepalive_park_after = "0s"` turns parking off: idle connections stay in their task.
#[test]
fn parking_can_be_turned_off() {
    let gw = Gateway::with(&config("ok", "30s").server("keepalive_park_after", "0s"));
    let mut held = clients(&gw, 5, "ok");
    // Past several grace periods and metric ticks: still nothing parked.
    thread::sleep(Duration::from_millis(600));
    assert_eq!(parked(&gw), 0.0);
    for c in &mut held {
        assert_eq!(c.get("/again").status, 200);
    }
}

/// Descriptors registered in any epoll instance of process `pid` (the reactors' and the
/// parking lots'), from the `tfd:` lines of `/proc/PID/fdinfo`.
fn epoll_registrations(pid: u32) -> usize {
    let mut n = 0;
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd")).expect("the gateway's fds") {
        let Ok(entry) = entry else { continue };
        let is_epoll = std::fs::read_link(entry.path())
            .is_ok_and(|t| t.to_string_lossy().contains("eventpoll"));
        if !is_epoll {
            continue;
        }
        let info = format!("/proc/{pid}/fdinfo/{}", entry.file_name().to_string_lossy());
        if let Ok(text) = std::fs::read_to_string(info) {
            n += text.lines().filter(|l| l.starts_with("tfd:")).count();
        }
    }
    n
}

/// A connection parked and woken again and again leaves no registration behind, in the
/// lot's epoll or the reactor's: on io_uring the parked socket is a duplicate with a new
/// number each time, whose old entry would otherwise stay until the connection closes.
/// Each park lasts past 8 park delays (400 ms), so none counts as a quick wake and every
/// one parks again after the configured 50 ms.
#[test]
fn a_connection_parked_again_and_again_leaves_no_registrations_behind() {
    let gw = Gateway::with(&config("ok", "30s"));
    let mut held = clients(&gw, 1, "ok");
    wait_parked(&gw, 1);
    let first = epoll_registrations(gw.pid());
    for i in 0..12 {
        thread::sleep(Duration::from_millis(500));
        assert_eq!(
            held[0].get(&format!("/again/{i}")).status,
            200,
            "request {i}"
        );
        wait_parked(&gw, 1);
    }
    let after = epoll_registrations(gw.pid());
    // A few come and go with the admin connections the metric scrapes open; a leak would
    // be one per park.
    assert!(
        after <= first + 5,
        "12 parks of one connection: {first} -> {after} epoll registrations"
    );
}
