//! The accept path under a burst: connections queued on the listener while the gateway
//! cannot run (stopped with SIGSTOP, so all of them are in the kernel's accept queue when it
//! resumes) are taken many per readiness event, in batches, and every defence still applies
//! to each connection of a batch: here the per-IP connection cap. Runs on the driver
//! `GATEWAY_TEST_IO` selects, like every suite.

use gateway_tests::client::Client;
use gateway_tests::control::scrape;
use gateway_tests::{wait_until, Config, Gateway, Origin};
use std::net::IpAddr;
use std::time::Duration;

/// More than one accept batch of the gateway (64 connections per readiness event).
const BURST: usize = 200;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// Runs `connect` while the gateway is stopped, so everything it connects waits in the
/// listener's accept queue (the kernel completes the handshakes), then resumes it.
fn while_stopped<T>(gw: &Gateway, connect: impl FnOnce() -> T) -> T {
    gw.signal(libc::SIGSTOP);
    let out = connect();
    gw.signal(libc::SIGCONT);
    out
}

#[test]
fn a_burst_larger_than_an_accept_batch_is_all_served() {
    let origin = Origin::named("api");
    let gw = Gateway::with(&Config::proxy_all(&[origin.addr()]).workers(1));
    let mut clients = while_stopped(&gw, || {
        (0..BURST)
            .map(|_| {
                let mut c = Client::connect(gw.http_addr());
                c.send(b"GET /burst HTTP/1.1\r\nHost: gw\r\n\r\n")
                    .expect("request written while the gateway is stopped");
                c
            })
            .collect::<Vec<_>>()
    });
    for (i, c) in clients.iter_mut().enumerate() {
        let response = c
            .read_response()
            .unwrap_or_else(|e| panic!("connection {i} of the burst: {e}"));
        assert_eq!(response.status, 200, "connection {i} of the burst");
    }
    // The worker still accepts after the burst.
    assert_eq!(gw.get("/after").status, 200);
}

/// A connection whose request is not queued when it is accepted (here the request comes
/// after the gateway counted the connection, in two writes) is read as it arrives: the
/// batch of accepts leaves each connection to its own task.
#[test]
fn a_request_sent_after_the_accept_is_served() {
    let origin = Origin::named("api");
    let gw = Gateway::with(&Config::proxy_all(&[origin.addr()]).workers(1));
    let mut c = Client::connect(gw.http_addr());
    wait_until(Duration::from_secs(5), "the connection accepted", || {
        scrape(gw.admin_addr()).get("gateway_connections_active", &[("listener", "http")])
            == Some(1.0)
    });
    c.send(b"GET /late HTTP/1.1\r\n").unwrap();
    c.send(b"Host: gw\r\n\r\n").unwrap();
    assert_eq!(c.read_response().expect("a response").status, 200);
}

#[test]
fn the_per_ip_cap_refuses_inside_one_accept_batch() {
    let origin = Origin::named("api");
    let config = Config::proxy_all(&[origin.addr()])
        .workers(1)
        .extra("[limits]\nmax_conns_per_ip = 2\n");
    let gw = Gateway::with(&config);
    // Ten connections from one address and one from another, all queued at once: the
    // batch admits two of the ten, refuses the other eight, and serves the other address.
    let (mut capped, mut other) = while_stopped(&gw, || {
        let capped: Vec<Client> = (0..10)
            .map(|_| Client::connect_from(ip("127.0.0.31"), gw.http_addr()))
            .collect();
        let other = Client::connect_from(ip("127.0.0.32"), gw.http_addr());
        (capped, other)
    });
    let mut served = 0;
    for c in &mut capped {
        // A refused connection is closed at accept: the write may already fail, the read
        // does.
        let _ = c.send(b"GET /capped HTTP/1.1\r\nHost: gw\r\n\r\n");
        if let Ok(response) = c.read_response() {
            assert_eq!(response.status, 200);
            served += 1;
        }
    }
    assert_eq!(served, 2, "max_conns_per_ip = 2 within one accept batch");
    assert_eq!(other.get("/other").status, 200);
}
