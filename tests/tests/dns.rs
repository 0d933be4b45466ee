//! Upstreams by name (issue 15) against a real DNS server each test starts itself: a
//! hickory-server on 127.0.0.1 (random port) whose records the test changes while a loop
//! of requests runs, named to the gateway by `[resolver] nameservers`.
//!
//! The origins behind one name listen on one port at different loopback addresses
//! (127.0.0.2, 127.0.0.3, ...), as the pods of a headless Service do.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use gateway_tests::{client, free_port, gateway_bin, Config, Gateway, Origin, Reply, Route};
use hickory_proto::op::{Header, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use hickory_server::authority::MessageResponseBuilder;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::ServerFuture;

/// How the test DNS server answers.
const NORMAL: u8 = 0;
const SERVFAIL: u8 = 1;
/// Reads queries and never answers (a DNS server unreachable or down).
const SILENT: u8 = 2;

/// The zone the test edits: names (lowercase, no trailing dot) to addresses. A name not
/// here is NXDOMAIN; a name here without an address of the asked type is NOERROR, empty.
#[derive(Default)]
struct Zone {
    names: Mutex<HashMap<String, Vec<IpAddr>>>,
    ttl: AtomicU32,
    mode: AtomicU8,
    /// A queries per name, with when they came.
    queries: Mutex<Vec<(Instant, String)>>,
}

struct Handler(Arc<Zone>);

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler>(
        &self,
        request: &Request,
        mut response: R,
    ) -> ResponseInfo {
        let zone = &self.0;
        let header = Header::response_from_request(request.header());
        let Ok(info) = request.request_info() else {
            return header.into();
        };
        let name = info
            .query
            .name()
            .to_string()
            .trim_end_matches('.')
            .to_ascii_lowercase();
        let qtype = info.query.query_type();
        if qtype == RecordType::A {
            zone.queries
                .lock()
                .unwrap()
                .push((Instant::now(), name.clone()));
        }
        let builder = MessageResponseBuilder::from_message_request(request);
        match zone.mode.load(Ordering::SeqCst) {
            SILENT => return header.into(),
            SERVFAIL => {
                let msg = builder.error_msg(request.header(), ResponseCode::ServFail);
                return response
                    .send_response(msg)
                    .await
                    .unwrap_or_else(|_| header.into());
            }
            _ => {}
        }
        let addrs = zone.names.lock().unwrap().get(&name).cloned();
        let Some(addrs) = addrs else {
            let msg = builder.error_msg(request.header(), ResponseCode::NXDomain);
            return response
                .send_response(msg)
                .await
                .unwrap_or_else(|_| header.into());
        };
        let ttl = zone.ttl.load(Ordering::SeqCst);
        let owner = Name::from_ascii(format!("{name}.")).unwrap();
        let records: Vec<Record> = addrs
            .iter()
            .filter_map(|ip| match (ip, qtype) {
                (IpAddr::V4(v4), RecordType::A) => Some(RData::A(A(*v4))),
                (IpAddr::V6(v6), RecordType::AAAA) => Some(RData::AAAA(AAAA(*v6))),
                _ => None,
            })
            .map(|rdata| Record::from_rdata(owner.clone(), ttl, rdata))
            .collect();
        let mut out = header;
        out.set_authoritative(true);
        let msg = builder.build(out, records.iter(), [], [], []);
        response
            .send_response(msg)
            .await
            .unwrap_or_else(|_| header.into())
    }
}

/// A DNS server on 127.0.0.1 (random port) serving [`Zone`] until dropped.
struct Dns {
    addr: SocketAddr,
    zone: Arc<Zone>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Dns {
    fn start(ttl: u32) -> Dns {
        let zone = Arc::new(Zone::default());
        zone.ttl.store(ttl, Ordering::SeqCst);
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.set_nonblocking(true).unwrap();
        let addr = socket.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let handler = Handler(zone.clone());
        let thread = thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let mut server = ServerFuture::new(handler);
                server.register_socket(tokio::net::UdpSocket::from_std(socket).unwrap());
                tokio::select! {
                    _ = server.block_until_done() => {}
                    _ = stopped => {}
                }
            });
        });
        Dns {
            addr,
            zone,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    fn set(&self, name: &str, addrs: &[IpAddr]) {
        self.zone
            .names
            .lock()
            .unwrap()
            .insert(name.to_string(), addrs.to_vec());
    }

    fn remove(&self, name: &str) {
        self.zone.names.lock().unwrap().remove(name);
    }

    fn mode(&self, mode: u8) {
        self.zone.mode.store(mode, Ordering::SeqCst);
    }

    /// A queries for `name` since `from`.
    fn queries_since(&self, name: &str, from: Instant) -> usize {
        self.zone
            .queries
            .lock()
            .unwrap()
            .iter()
            .filter(|(at, n)| n == name && *at >= from)
            .count()
    }
}

impl Drop for Dns {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// An origin named after its address, listening at `ip:port`.
fn origin_at(ip: &str, port: u16) -> Origin {
    let name = ip.to_string();
    Origin::builder()
        .bind(SocketAddr::new(self::ip(ip), port))
        .start(move |_| Reply::ok(name.clone()).header("X-Origin", &name))
}

/// A DNS server (records of TTL `ttl`) and two origins on one port, at 127.0.0.2 and
/// 127.0.0.3: two pods of one Service.
fn two_pods(ttl: u32) -> (Dns, u16, Origin, Origin) {
    let dns = Dns::start(ttl);
    let port = free_port();
    let a = origin_at("127.0.0.2", port);
    let b = origin_at("127.0.0.3", port);
    (dns, port, a, b)
}

/// [`two_pods`], with `one.test` naming the first and `two.test` the second, and a
/// gateway whose upstream is `one.test` (with `keys`).
fn one_and_two(ttl: u32, keys: &str) -> (Dns, u16, Gateway, [Origin; 2]) {
    let (dns, port, a, b) = two_pods(ttl);
    dns.set("one.test", &[ip("127.0.0.2")]);
    dns.set("two.test", &[ip("127.0.0.3")]);
    let gw = gateway(&dns, &format!("\"one.test:{port}\""), keys);
    (dns, port, gw, [a, b])
}

/// Waits until `GET path` answers `body` (the origin's address).
fn wait_body(gw: &Gateway, path: &str, body: &str, limit: Duration, what: &str) {
    let deadline = Instant::now() + limit;
    while gw.get(path).body != body.as_bytes() {
        assert!(Instant::now() < deadline, "{what}");
        thread::sleep(Duration::from_millis(50));
    }
}

/// A gateway whose upstream "app" is `servers` (raw TOML values), resolving through `dns`.
fn gateway(dns: &Dns, servers: &str, upstream_keys: &str) -> Gateway {
    let config = Config::new()
        .route(Route::prefix("/", "app"))
        .extra(&format!(
            "[[upstream]]\nname = \"app\"\nservers = [{servers}]\n{upstream_keys}\n\n[resolver]\nnameservers = [\"{}\"]\n",
            dns.addr
        ));
    Gateway::with(&config)
}

/// A loop of requests on a few threads (new connections and keep-alive), counting
/// failures and which origin answered, until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    failures: Arc<Mutex<Vec<String>>>,
    seen: Arc<Mutex<Vec<(Instant, String)>>>,
    done: Arc<AtomicUsize>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Load {
    fn start(addr: SocketAddr, threads: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let done = Arc::new(AtomicUsize::new(0));
        let handles = (0..threads)
            .map(|t| {
                let (stop, failures, seen, done) =
                    (stop.clone(), failures.clone(), seen.clone(), done.clone());
                thread::spawn(move || {
                    let mut keepalive: Option<client::Client> = None;
                    while !stop.load(Ordering::SeqCst) {
                        // Odd threads reuse a connection, even ones open a new one each time.
                        let result = if t % 2 == 1 {
                            let c = match keepalive.as_mut() {
                                Some(c) => c,
                                None => keepalive.insert(client::Client::connect(addr)),
                            };
                            let r = c.request(&client::Req::get("/"));
                            if r.is_err() {
                                keepalive = None;
                            }
                            r
                        } else {
                            client::one_shot(addr, &client::Req::get("/"))
                        };
                        match result {
                            Ok(r) if r.status == 200 => {
                                let origin = String::from_utf8_lossy(&r.body).into_owned();
                                seen.lock().unwrap().push((Instant::now(), origin));
                            }
                            Ok(r) => failures
                                .lock()
                                .unwrap()
                                .push(format!("status {}", r.status)),
                            Err(e) => failures.lock().unwrap().push(e.to_string()),
                        }
                        done.fetch_add(1, Ordering::SeqCst);
                        thread::sleep(Duration::from_millis(5));
                    }
                })
            })
            .collect();
        Load {
            stop,
            failures,
            seen,
            done,
            threads: handles,
        }
    }

    /// Waits until `origin` answered after `since`; how long that took.
    fn wait_for(&self, origin: &str, since: Instant, limit: Duration) -> Option<Duration> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some((at, _)) = self
                .seen
                .lock()
                .unwrap()
                .iter()
                .find(|(at, o)| *at >= since && o == origin)
            {
                return Some(at.duration_since(since));
            }
            thread::sleep(Duration::from_millis(20));
        }
        None
    }

    fn answered_since(&self, since: Instant) -> Vec<String> {
        let mut v: Vec<String> = self
            .seen
            .lock()
            .unwrap()
            .iter()
            .filter(|(at, _)| *at >= since)
            .map(|(_, o)| o.clone())
            .collect();
        v.sort();
        v.dedup();
        v
    }

    fn stop(mut self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            t.join().unwrap();
        }
        let failures = self.failures.lock().unwrap().clone();
        (self.done.load(Ordering::SeqCst), failures)
    }
}

fn metric(gw: &Gateway, prefix: &str) -> Option<f64> {
    let body = String::from_utf8(gw.admin_get("/metrics").body).unwrap();
    body.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[test]
fn addresses_added_and_removed_under_load_lose_no_request() {
    let dns = Dns::start(1);
    let port = free_port();
    let origins: Vec<Origin> = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
        .iter()
        .map(|a| origin_at(a, port))
        .collect();
    dns.set("svc.test", &[ip("127.0.0.2")]);
    let gw = gateway(
        &dns,
        &format!("\"svc.test:{port}\""),
        "resolve_min = \"1s\"\nbalance = \"round_robin\"",
    );
    let load = Load::start(gw.http_addr(), 4);
    assert!(load
        .wait_for("127.0.0.2", Instant::now(), Duration::from_secs(5))
        .is_some());

    // Added: within one TTL (1 s, resolve_min 1 s) plus a scheduling margin.
    let added = Instant::now();
    dns.set("svc.test", &[ip("127.0.0.2"), ip("127.0.0.3")]);
    let took = load
        .wait_for("127.0.0.3", added, Duration::from_secs(5))
        .expect("the added address never got traffic");
    assert!(took < Duration::from_millis(2500), "took {took:?}");

    // /config and the address gauge show the resolved set.
    let config = String::from_utf8(gw.admin_get("/config").body).unwrap();
    assert!(config.contains(&format!("127.0.0.3:{port}")), "{config}");
    assert_eq!(
        metric(&gw, "gateway_upstream_dns_addresses{upstream=\"app\"}"),
        Some(2.0)
    );

    // One removed, one added at once.
    let swapped = Instant::now();
    dns.set("svc.test", &[ip("127.0.0.3"), ip("127.0.0.4")]);
    load.wait_for("127.0.0.4", swapped, Duration::from_secs(5))
        .expect("the added address never got traffic");
    // Once the new set is installed (and in-flight requests are done), .2 gets nothing.
    thread::sleep(Duration::from_millis(300));
    let later = Instant::now();
    thread::sleep(Duration::from_secs(1));
    let answered = load.answered_since(later);
    assert_eq!(answered, vec!["127.0.0.3", "127.0.0.4"], "{answered:?}");

    let (done, failures) = load.stop();
    assert!(done > 100, "only {done} requests ran");
    assert!(
        failures.is_empty(),
        "{} failed: {failures:?}",
        failures.len()
    );
    assert!(metric(
        &gw,
        "gateway_upstream_dns_resolutions_total{upstream=\"app\",result=\"ok\"}"
    )
    .is_some_and(|n| n >= 3.0));
    // The access log's upstream field names the address used.
    gw.wait_access_line(Duration::from_secs(5), |l| {
        l.contains(&format!("127.0.0.4:{port}"))
    });
    drop(origins);
}

#[test]
fn the_ttl_is_respected_within_resolve_min_and_resolve_max() {
    let dns = Dns::start(3);
    let origin = Origin::named("o");
    dns.set("svc.test", &[ip("127.0.0.1")]);
    let gw = gateway(
        &dns,
        &format!("\"svc.test:{}\"", origin.addr().port()),
        "resolve_min = \"1s\"\nresolve_max = \"60s\"",
    );
    assert_eq!(gw.get("/").status, 200);
    // TTL 3 s: over 7 s, two or three lookups, not seven (one a second).
    let from = Instant::now();
    thread::sleep(Duration::from_secs(7));
    let n = dns.queries_since("svc.test", from);
    assert!((2..=3).contains(&n), "{n} lookups in 7 s with a 3 s TTL");

    // A TTL of 0 is clamped up to resolve_min (1 s): about one a second, not a storm.
    dns.zone.ttl.store(0, Ordering::SeqCst);
    thread::sleep(Duration::from_secs(4));
    let from = Instant::now();
    thread::sleep(Duration::from_secs(4));
    let n = dns.queries_since("svc.test", from);
    assert!(
        (3..=6).contains(&n),
        "{n} lookups in 4 s with TTL 0, resolve_min 1s"
    );
}

#[test]
fn a_dns_outage_changes_nothing() {
    let (dns, port, _a, _b) = two_pods(1);
    dns.set("svc.test", &[ip("127.0.0.2"), ip("127.0.0.3")]);
    let gw = gateway(
        &dns,
        &format!("\"svc.test:{port}\""),
        "resolve_min = \"1s\"",
    );
    let load = Load::start(gw.http_addr(), 2);
    dns.mode(SILENT);
    thread::sleep(Duration::from_secs(6));
    dns.mode(SERVFAIL);
    thread::sleep(Duration::from_secs(3));
    let now = Instant::now();
    thread::sleep(Duration::from_millis(500));
    assert_eq!(load.answered_since(now), vec!["127.0.0.2", "127.0.0.3"]);
    dns.mode(NORMAL);
    let (done, failures) = load.stop();
    assert!(done > 50);
    assert!(failures.is_empty(), "{failures:?}");
    let failed_lookups = ["timeout", "servfail", "error"]
        .iter()
        .filter_map(|r| {
            metric(
                &gw,
                &format!(
                    "gateway_upstream_dns_resolutions_total{{upstream=\"app\",result=\"{r}\"}}"
                ),
            )
        })
        .sum::<f64>();
    assert!(
        failed_lookups >= 2.0,
        "failed lookups counted: {failed_lookups}"
    );
    assert!(gw.stderr().contains("keeping its last good addresses"));
}

#[test]
fn nxdomain_keeps_the_old_set_for_the_grace_period_then_drops_it() {
    let dns = Dns::start(1);
    let origin = Origin::named("o");
    dns.set("svc.test", &[ip("127.0.0.1")]);
    let gw = gateway(
        &dns,
        &format!("\"svc.test:{}\"", origin.addr().port()),
        "resolve_min = \"1s\"\nnxdomain_grace = \"4s\"",
    );
    assert_eq!(gw.get("/").status, 200);
    let gone = Instant::now();
    dns.remove("svc.test");
    // Within the grace: still served.
    while gone.elapsed() < Duration::from_secs(3) {
        assert_eq!(
            gw.get("/").status,
            200,
            "dropped after {:?}",
            gone.elapsed()
        );
        thread::sleep(Duration::from_millis(100));
    }
    // Past it (4 s, plus a lookup interval): no servers, 503.
    let deadline = gone + Duration::from_secs(8);
    loop {
        let status = gw.get("/").status;
        if status == 503 {
            break;
        }
        assert!(Instant::now() < deadline, "still {status} past the grace");
        thread::sleep(Duration::from_millis(100));
    }
    assert!(gone.elapsed() >= Duration::from_secs(4));
    assert_eq!(
        metric(&gw, "gateway_upstream_dns_addresses{upstream=\"app\"}"),
        Some(0.0)
    );
    // Back: served again.
    dns.set("svc.test", &[ip("127.0.0.1")]);
    let deadline = Instant::now() + Duration::from_secs(5);
    while gw.get("/").status != 200 {
        assert!(
            Instant::now() < deadline,
            "not served once the name is back"
        );
        thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn aaaa_only_names_work() {
    if std::net::TcpListener::bind("[::1]:0").is_err() {
        panic!("IPv6 loopback is unavailable: this test needs ::1");
    }
    let dns = Dns::start(30);
    let port = free_port();
    let _origin = origin_at("::1", port);
    dns.set("v6only.test", &[ip("::1")]);
    let gw = gateway(&dns, &format!("\"v6only.test:{port}\""), "");
    let r = gw.get("/");
    assert_eq!(r.status, 200);
    assert_eq!(r.body, b"::1");
}

#[test]
fn resolve_required_false_answers_503_until_the_name_resolves() {
    let dns = Dns::start(1);
    let origin = Origin::named("o");
    let gw = gateway(
        &dns,
        &format!("\"later.test:{}\"", origin.addr().port()),
        "resolve_required = false\nresolve_min = \"1s\"",
    );
    assert_eq!(gw.get("/").status, 503);
    dns.set("later.test", &[ip("127.0.0.1")]);
    let deadline = Instant::now() + Duration::from_secs(5);
    while gw.get("/").status != 200 {
        assert!(Instant::now() < deadline, "never served once resolvable");
        thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_name_that_does_not_resolve_fails_check_and_start() {
    let dns = Dns::start(1);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.toml");
    let text = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n\n[[listener]]\nname = \"http\"\nlisten = \"127.0.0.1:0\"\n\n\
         [[upstream]]\nname = \"app\"\nservers = [\"missing.test:80\"]\n\n\
         [[route]]\npath_prefix = \"/\"\nupstream = \"app\"\n\n[resolver]\nnameservers = [\"{}\"]\n",
        dns.addr
    );
    std::fs::write(&path, &text).unwrap();
    let out = std::process::Command::new(gateway_bin())
        .args(["check", "--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    // File, line of `servers`, key and the name.
    let expected = format!("{}:10: upstream[0].servers", path.display());
    assert!(stderr.contains(&expected), "{stderr}");
    assert!(stderr.contains("missing.test"), "{stderr}");

    let start = Gateway::try_start(&text.replace(
        "[admin]\nlisten = \"127.0.0.1:0\"",
        &format!("[admin]\nlisten = \"127.0.0.1:{}\"", free_port()),
    ));
    let err = start.err().expect("the start must fail");
    assert!(err.contains("missing.test"), "{err}");

    // The same config with the name resolvable passes.
    dns.set("missing.test", &[ip("127.0.0.1")]);
    let out = std::process::Command::new(gateway_bin())
        .args(["check", "--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_reload_keeps_an_unchanged_name_and_resolves_a_new_one() {
    let (_dns, port, gw, _pods) = one_and_two(30, "");
    assert_eq!(gw.get("/").body, b"127.0.0.2");
    let text = std::fs::read_to_string(gw.config_path()).unwrap();
    std::fs::write(
        gw.config_path(),
        text.replace(
            &format!("\"one.test:{port}\""),
            &format!("\"one.test:{port}\", \"two.test:{port}\""),
        ),
    )
    .unwrap();
    let r = reload(&gw);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let mut seen: Vec<Vec<u8>> = (0..6).map(|_| gw.get("/").body).collect();
    seen.sort();
    seen.dedup();
    assert_eq!(seen, vec![b"127.0.0.2".to_vec(), b"127.0.0.3".to_vec()]);
}

fn reload(gw: &Gateway) -> client::Response {
    client::Client::connect(gw.admin_addr()).must(
        &client::Req::post("/reload", "")
            .host(Some("admin"))
            .header("Connection", "close"),
    )
}

/// A reload that resolves its names and then fails (a listen address taken) leaves the
/// running config's names as they were: still refreshed, still followed.
#[test]
fn a_failed_reload_leaves_the_running_names_followed() {
    let (dns, _port, gw, _pods) = one_and_two(1, "resolve_min = \"1s\"");
    assert_eq!(gw.get("/").body, b"127.0.0.2");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let text = std::fs::read_to_string(gw.config_path()).unwrap();
    let bad = text.replace("\"one.test:", "\"two.test:")
        + &format!(
            "\n[[listener]]\nname = \"taken\"\nlisten = \"{}\"\n",
            taken.local_addr().unwrap()
        );
    std::fs::write(gw.config_path(), bad).unwrap();
    assert_eq!(reload(&gw).status, 400);
    // one.test moves: the running config follows it.
    dns.set("one.test", &[ip("127.0.0.3")]);
    let why = "the running name is no longer followed";
    wait_body(&gw, "/", "127.0.0.3", Duration::from_secs(5), why);
}

/// Requests one after the other, paced so each upstream connection is back in its
/// worker's pool before the next request: the answering origins' bodies.
fn sequential(gw: &Gateway, n: usize) -> Vec<String> {
    (0..n)
        .map(|_| {
            let r = gw.get("/");
            assert_eq!(r.status, 200);
            thread::sleep(Duration::from_millis(10));
            String::from_utf8(r.body).unwrap()
        })
        .collect()
}

#[test]
fn servers_that_stay_keep_their_idle_connections() {
    let (dns, port, stays, _new) = two_pods(1);
    dns.set("svc.test", &[ip("127.0.0.2")]);
    let gw = gateway(
        &dns,
        &format!("\"svc.test:{port}\""),
        "resolve_min = \"1s\"",
    );
    sequential(&gw, 20);
    let warm = stays.accepts();
    assert!(
        warm <= 2,
        "{warm} connections for sequential requests on 2 workers"
    );

    dns.set("svc.test", &[ip("127.0.0.2"), ip("127.0.0.3")]);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !sequential(&gw, 2).iter().any(|o| o == "127.0.0.3") {
        assert!(
            Instant::now() < deadline,
            "the new address never got traffic"
        );
    }
    let answered = sequential(&gw, 20);
    assert!(answered.iter().any(|o| o == "127.0.0.2"));
    assert_eq!(
        stays.accepts(),
        warm,
        "the rebuilt upstream reused the pooled connections to the address that stayed"
    );
}

/// A name a reload adds is refreshed at its own TTL, even when every name before it was
/// due only minutes later.
#[test]
fn a_name_added_by_a_reload_is_refreshed_at_its_own_ttl() {
    let keys = "resolve_min = \"300s\"\nresolve_max = \"300s\"";
    let (dns, port, gw, _pods) = one_and_two(1, keys);
    let text = std::fs::read_to_string(gw.config_path()).unwrap();
    let added = format!(
        "{text}\n[[upstream]]\nname = \"b\"\nservers = [\"two.test:{port}\"]\nresolve_min = \"1s\"\n\n\
         [[route]]\npath_prefix = \"/b\"\nupstream = \"b\"\n"
    );
    std::fs::write(gw.config_path(), added).unwrap();
    assert_eq!(reload(&gw).status, 200);
    assert_eq!(gw.get("/b").body, b"127.0.0.3");
    dns.set("two.test", &[ip("127.0.0.2")]);
    let why = "the added name is not refreshed at its TTL";
    wait_body(&gw, "/b", "127.0.0.2", Duration::from_secs(4), why);
}

/// An active health check asks each address of a name with the server as written in
/// `Host` (a name-based virtual host answers it as it answers proxied requests).
#[test]
fn active_health_checks_send_the_name_as_host() {
    let dns = Dns::start(30);
    let origin = Origin::named("o");
    let port = origin.addr().port();
    dns.set("svc.test", &[ip("127.0.0.1")]);
    let _gw = gateway(
        &dns,
        &format!("\"svc.test:{port}\""),
        "health_check = { path = \"/hc\", interval = \"1s\", timeout = \"1s\" }",
    );
    let checks = origin.wait_requests(1, Duration::from_secs(5));
    let check = checks
        .iter()
        .find(|r| r.path() == "/hc")
        .expect("a health check");
    assert_eq!(
        check.header("host"),
        Some(format!("svc.test:{port}").as_str())
    );
}
