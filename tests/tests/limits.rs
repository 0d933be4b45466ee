//! `[limits]` enforced by the running gateway in user space (XDP off): deny lists and the
//! per-IP connection cap at accept, and `request_rate` answered 429 with `Retry-After`,
//! each while another client is served normally. The kernel side of the same limits is
//! proven by `gateway/tests/xdp_guard.rs`. Client addresses are distinct 127/8 sources.

use gateway_tests::client::Client;
use gateway_tests::control::scrape;
use gateway_tests::wire::CloseOutcome;
use gateway_tests::{wait_until, Config, Gateway, Origin};
use std::net::IpAddr;
use std::time::Duration;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn gateway_with_limits(limits: &str) -> (Gateway, Origin) {
    let origin = Origin::named("api");
    let config = Config::proxy_all(&[origin.addr()])
        .workers(1)
        .extra(&format!("[limits]\n{limits}\n"));
    (Gateway::with(&config), origin)
}

/// A connection the gateway refuses at accept is closed before any response.
fn refused(gw: &Gateway, source: &str) -> bool {
    let mut c = Client::connect_from(ip(source), gw.http_addr());
    let _ = c.send(b"GET /x HTTP/1.1\r\nHost: gw\r\n\r\n");
    c.read_response().is_err()
}

#[test]
fn request_rate_answers_429_with_retry_after_and_spares_other_clients() {
    let (gw, _origin) = gateway_with_limits("request_rate = \"2/s\"\nrequest_burst = 2");
    let mut greedy = Client::connect_from(ip("127.0.0.2"), gw.http_addr());
    let statuses: Vec<u16> = (0..8).map(|_| greedy.get("/x").status).collect();
    assert_eq!(statuses[0], 200, "{statuses:?}");
    assert!(
        statuses.contains(&429),
        "a burst of 8 over 2/s: {statuses:?}"
    );
    let mut last = greedy.get("/x");
    if last.status != 429 {
        last = greedy.get("/x");
    }
    assert_eq!(last.status, 429);
    let retry: u64 = last
        .header("retry-after")
        .expect("Retry-After on 429")
        .parse()
        .unwrap();
    assert!(retry >= 1, "Retry-After {retry}");
    // Another client is not affected by the first one's rate.
    let mut other = Client::connect_from(ip("127.0.0.3"), gw.http_addr());
    assert_eq!(other.get("/x").status, 200);
    wait_until(Duration::from_secs(5), "the 429s in the metrics", || {
        scrape(gw.admin_addr())
            .get(
                "gateway_limit_rejections_total",
                &[("limit", "request_rate"), ("enforcer", "userspace")],
            )
            .is_some_and(|n| n >= 1.0)
    });
}

#[test]
fn denied_networks_are_closed_at_accept_in_user_space() {
    let (gw, origin) = gateway_with_limits("deny = [\"127.0.0.9/32\", \"2001:db8::/32\"]");
    assert!(refused(&gw, "127.0.0.9"), "a denied source gets no answer");
    let mut ok = Client::connect_from(ip("127.0.0.10"), gw.http_addr());
    assert_eq!(ok.get("/x").status, 200);
    assert_eq!(
        origin.requests().len(),
        1,
        "only the allowed client reached the origin"
    );
    wait_until(Duration::from_secs(5), "the deny in the metrics", || {
        scrape(gw.admin_addr())
            .get(
                "gateway_limit_rejections_total",
                &[("limit", "deny"), ("enforcer", "userspace")],
            )
            .is_some_and(|n| n >= 1.0)
    });
}

#[test]
fn allowed_networks_are_exempt_from_the_connection_cap() {
    let (gw, _origin) = gateway_with_limits("max_conns_per_ip = 1\nallow = [\"127.0.0.20/32\"]");
    let mut held: Vec<Client> = (0..3)
        .map(|_| Client::connect_from(ip("127.0.0.20"), gw.http_addr()))
        .collect();
    for c in &mut held {
        assert_eq!(c.get("/x").status, 200);
    }
}

#[test]
fn connection_cap_holds_until_a_connection_closes() {
    let (gw, _origin) = gateway_with_limits("max_conns_per_ip = 2");
    let mut first = Client::connect_from(ip("127.0.0.4"), gw.http_addr());
    let mut second = Client::connect_from(ip("127.0.0.4"), gw.http_addr());
    assert_eq!(first.get("/x").status, 200);
    assert_eq!(second.get("/x").status, 200);
    assert!(
        refused(&gw, "127.0.0.4"),
        "a third connection is over the cap"
    );
    // Another address is not capped by the first one's connections.
    let mut other = Client::connect_from(ip("127.0.0.5"), gw.http_addr());
    assert_eq!(other.get("/x").status, 200);
    // Closing one makes room again (the gateway sees the close asynchronously).
    drop(first);
    wait_until(Duration::from_secs(5), "room after a close", || {
        !refused(&gw, "127.0.0.4")
    });
    assert_eq!(second.get("/y").status, 200);
    let (outcome, _) = second.wait_closed(Duration::from_millis(50));
    assert!(matches!(outcome, CloseOutcome::StillOpen));
}

/// A `deny` added by a reload also closes busy keep-alive connections from that address
/// (nginx checks `deny` per request), while other clients' connections carry on.
#[test]
fn deny_added_by_reload_reaches_open_keepalive_connections() {
    let (gw, _origin) = gateway_with_limits("");
    let mut blocked = Client::connect_from(ip("127.0.0.5"), gw.http_addr());
    let mut other = Client::connect_from(ip("127.0.0.6"), gw.http_addr());
    assert_eq!(blocked.get("/x").status, 200);
    assert_eq!(other.get("/x").status, 200);
    let config = std::fs::read_to_string(gw.config_path()).unwrap();
    std::fs::write(
        gw.config_path(),
        config.replacen("[limits]\n", "[limits]\ndeny = [\"127.0.0.5/32\"]\n", 1),
    )
    .unwrap();
    gw.signal(libc::SIGHUP);
    wait_until(Duration::from_secs(5), "the reload", || {
        scrape(gw.admin_addr()).get("gateway_config_reloads_total", &[("result", "success")])
            == Some(1.0)
    });
    let _ = blocked.send(b"GET /x HTTP/1.1\r\nHost: gw\r\n\r\n");
    assert!(
        blocked.read_response().is_err(),
        "the denied address's open connection is closed, not served"
    );
    assert_eq!(other.get("/x").status, 200, "other clients carry on");
    assert!(refused(&gw, "127.0.0.5"), "and it cannot connect again");
}
