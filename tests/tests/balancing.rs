//! Load balancing over real origins: round_robin (plain and weighted), least_conn,
//! client_ip_hash (clients from distinct 127/8 source addresses), and passive health:
//! refusing servers are skipped, and with every server down the answer is 502 then 503.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr};
use std::thread;
use std::time::Duration;

use gateway_tests::{refused_addr, Client, Config, Gateway, Origin, Reply, Req, Route, Upstream};

fn tally(gw: &Gateway, connections: usize, requests: usize) -> HashMap<String, usize> {
    // Spread over several client connections, hence over both workers.
    let mut clients: Vec<Client> = (0..connections).map(|_| gw.client()).collect();
    let mut hits = HashMap::new();
    for i in 0..requests {
        let r = clients[i % connections].get(&format!("/t/{i}"));
        assert_eq!(r.status, 200, "request {i}: {}", r.body_str());
        *hits.entry(r.body_str()).or_insert(0) += 1;
    }
    hits
}

fn assert_share(hits: &HashMap<String, usize>, name: &str, expected: f64) {
    let got = *hits.get(name).unwrap_or(&0) as f64;
    assert!(
        (got - expected).abs() <= expected * 0.10,
        "{name}: {got} requests, expected {expected} ±10% (all: {hits:?})"
    );
}

#[test]
fn round_robin_distributes_evenly() {
    let origins: Vec<Origin> = ["a", "b", "c"].iter().map(|n| Origin::named(n)).collect();
    let addrs: Vec<_> = origins.iter().map(|o| o.addr()).collect();
    let gw = Gateway::with(
        &Config::new()
            .upstream(Upstream::new("app", &addrs).balance("round_robin"))
            .route(Route::prefix("/", "app")),
    );
    let hits = tally(&gw, 3, 300);
    for n in ["a", "b", "c"] {
        assert_share(&hits, n, 100.0);
    }
}

#[test]
fn round_robin_honours_weights() {
    let a = Origin::named("a");
    let b = Origin::named("b");
    let gw = Gateway::with(
        &Config::new()
            .upstream(
                Upstream::new("app", &[a.addr()])
                    .weighted(b.addr(), 2)
                    .balance("round_robin"),
            )
            .route(Route::prefix("/", "app")),
    );
    let hits = tally(&gw, 3, 300);
    assert_share(&hits, "a", 100.0);
    assert_share(&hits, "b", 200.0);
}

#[test]
fn least_conn_prefers_the_idle_server() {
    // One worker: least_conn counts in-flight requests per worker (as nginx does without a
    // shared `zone`), and this test is about the choice, not about cross-worker sharing.
    let slow = |name: &'static str| {
        Origin::start(move |r| {
            let reply = Reply::ok(name);
            if r.path() == "/slow" {
                reply.delay(Duration::from_millis(2500))
            } else {
                reply
            }
        })
    };
    let a = slow("a");
    let b = slow("b");
    let gw = Gateway::with(
        &Config::new()
            .workers(1)
            .upstream(Upstream::new("app", &[a.addr(), b.addr()]).balance("least_conn"))
            .route(Route::prefix("/", "app")),
    );
    let addr = gw.http_addr();
    let slow_req = thread::spawn(move || Client::connect(addr).get("/slow").body_str());
    // Wait (polling) until one origin holds the slow request.
    gateway_tests::wait_until(
        Duration::from_secs(5),
        "the slow request to reach an origin",
        || a.request_count() + b.request_count() == 1,
    );
    let busy = if a.request_count() == 1 { "a" } else { "b" };
    let idle = if busy == "a" { "b" } else { "a" };
    let mut c = gw.client();
    for i in 0..10 {
        let r = c.get(&format!("/fast/{i}"));
        assert_eq!(
            r.body_str(),
            idle,
            "fast request {i} went to the busy server {busy} while {idle} was idle"
        );
    }
    assert_eq!(slow_req.join().unwrap(), busy);
}

#[test]
fn client_ip_hash_sticks_per_client_and_spreads_clients() {
    let origins: Vec<Origin> = ["a", "b", "c"].iter().map(|n| Origin::named(n)).collect();
    let addrs: Vec<_> = origins.iter().map(|o| o.addr()).collect();
    let gw = Gateway::with(
        &Config::new()
            .upstream(Upstream::new("app", &addrs).balance("client_ip_hash"))
            .route(Route::prefix("/", "app")),
    );
    // 24 client addresses across 127/8, varying every octet (an ip_hash that only looks at
    // the first three octets, like nginx's `ip_hash`, still sees different keys).
    let ips: Vec<IpAddr> = (0..24u32)
        .map(|i| {
            let o = |x: u32| (x % 250) as u8;
            IpAddr::V4(Ipv4Addr::new(127, o(1 + i * 7), o(3 + i * 11), o(2 + i)))
        })
        .collect();
    let mut owner: HashMap<IpAddr, String> = HashMap::new();
    for round in 0..4 {
        for ip in &ips {
            // A new connection each time: it may land on either worker; the choice must not
            // depend on which.
            let r = Client::connect_from(*ip, gw.http_addr()).get(&format!("/h/{round}"));
            assert_eq!(r.status, 200);
            let server = r.body_str();
            let first = owner.entry(*ip).or_insert_with(|| server.clone());
            assert_eq!(
                *first, server,
                "client {ip} moved from {first} to {server} in round {round}"
            );
        }
    }
    let used: HashSet<&String> = owner.values().collect();
    assert!(
        used.len() >= 2,
        "24 distinct client IPs all hashed to one server: {owner:?}"
    );
}

#[test]
fn refusing_server_is_skipped() {
    // nginx's default `proxy_next_upstream error timeout` retries a failed connect on the
    // next server: nothing was sent, so this is safe for any method. An operator expects
    // no client to see an error while another server is up.
    let a = Origin::named("a");
    let b = Origin::named("b");
    let dead = refused_addr();
    let gw = Gateway::with(
        &Config::new()
            .upstream(
                Upstream::new("app", &[a.addr(), dead, b.addr()])
                    .max_fails(1)
                    .fail_timeout("10s"),
            )
            .route(Route::prefix("/", "app")),
    );
    let hits = tally(&gw, 3, 30);
    assert_eq!(
        hits.get("a").unwrap_or(&0) + hits.get("b").unwrap_or(&0),
        30,
        "every request answered by a live server: {hits:?}"
    );
    assert!(
        hits.contains_key("a") && hits.contains_key("b"),
        "both live servers used: {hits:?}"
    );
    // POST too: a refused connect never sent the body.
    let r = gw.request(&Req::post("/p", "body"));
    assert_eq!(r.status, 200);
}

#[test]
fn all_servers_down_gives_502_then_503() {
    // Contract: 502 "upstream failed", 503 "no healthy server". While a server is merely
    // failing, the request fails with 502; once `max_fails` failures within `fail_timeout`
    // have marked every server down, there is no healthy server to try: 503.
    let gw = Gateway::with(
        &Config::new()
            .upstream(
                Upstream::new("app", &[refused_addr(), refused_addr()])
                    .max_fails(1)
                    .fail_timeout("30s"),
            )
            .route(Route::prefix("/", "app")),
    );
    let mut statuses = Vec::new();
    for i in 0..20 {
        // New connections, so both workers see failures whatever their health bookkeeping.
        let r = gw.get(&format!("/d/{i}"));
        statuses.push(r.status);
        assert!(
            r.status == 502 || r.status == 503,
            "request {i}: {} {}",
            r.status,
            r.body_str()
        );
        assert!(
            !r.body_str().contains("127.0.0.1:"),
            "the error body leaks an upstream address: {:?}",
            r.body_str()
        );
    }
    assert!(
        statuses[15..].iter().all(|s| *s == 503),
        "after every server was marked down the answer is 503: {statuses:?}"
    );
}

#[test]
fn single_server_upstream_is_never_marked_down() {
    // nginx (ngx_http_upstream_module, `server`): "If there is only a single server in a
    // group, max_fails, fail_timeout and slow_start parameters are ignored, and such a server
    // will never be considered unavailable." Marking the only server down would turn one
    // upstream hiccup into fail_timeout of 503s for every client; the contract is silent, so
    // the gateway does what an nginx operator expects.
    let origin = Origin::start(|r| match r.path() {
        "/fail" => Reply::raw(""),
        _ => Reply::ok("fine"),
    });
    let gw = Gateway::with(
        &Config::new()
            .upstream(
                Upstream::new("app", &[origin.addr()])
                    .max_fails(1)
                    .fail_timeout("30s"),
            )
            .route(Route::prefix("/", "app")),
    );
    for i in 0..3 {
        assert_eq!(gw.get("/fail").status, 502, "failure {i}");
    }
    let r = gw.get("/ok");
    assert_eq!(
        (r.status, r.body_str().as_str()),
        (200, "fine"),
        "the only server must still be tried after failures"
    );
}
