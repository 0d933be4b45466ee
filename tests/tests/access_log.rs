//! The access log on stdout, in the contract's format: nginx `combined` plus the request time
//! in microseconds and the upstream address (PRODUCT.md, "Access log"):
//! `203.0.113.7 - - [26/Nov/2026:20:03:09 +0000] "GET /api/x HTTP/1.1" 200 512 "-" "curl/8.0" 1534 127.0.0.1:8081`.
//! Where nothing was proxied the upstream is `-`, as nginx logs an empty `$upstream_addr`.

use std::time::Duration;

use gateway_tests::{Client, Config, Gateway, Origin, Reply, Req, Route, Upstream};
use regex::Regex;

const CLIENT: &str = "127.0.0.5";

/// The combined-format prefix up to and including the user agent, then request time and
/// upstream: captures `us` and `upstream`.
fn line_re(request: &str, status: u16, bytes: &str, referer: &str, ua: &str) -> Regex {
    Regex::new(&format!(
        r#"^{ip} - - \[\d{{2}}/(Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)/\d{{4}}:\d{{2}}:\d{{2}}:\d{{2}} [+-]\d{{4}}\] "{req}" {status} {bytes} "{referer}" "{ua}" (?P<us>\d+) (?P<upstream>\S+)$"#,
        ip = regex::escape(CLIENT),
        req = regex::escape(request),
        referer = regex::escape(referer),
        ua = regex::escape(ua),
    ))
    .unwrap()
}

fn logged(origin: &Origin, format: Option<&str>) -> Gateway {
    let mut cfg = Config::new()
        .upstream(Upstream::new("api", &[origin.addr()]))
        .route(Route::respond_exact("/health", 200, "ok\n"))
        .route(Route::prefix("/api/", "api"));
    if let Some(f) = format {
        cfg = cfg.log("format", f);
    }
    Gateway::with(&cfg)
}

fn send_from_client(gw: &Gateway, req: &Req) -> gateway_tests::Response {
    Client::connect_from(CLIENT.parse().unwrap(), gw.http_addr()).must(req)
}

#[test]
fn proxied_request_is_logged_with_request_time_and_upstream() {
    let origin = Origin::start(|_| Reply::ok("hello").delay(Duration::from_millis(50)));
    let gw = logged(&origin, None);
    let r = send_from_client(
        &gw,
        &Req::get("/api/x?q=1")
            .header("User-Agent", "itest/1.0")
            .header("Referer", "http://ref.test/page"),
    );
    assert_eq!(r.status, 200);
    let line = gw.wait_access_line(Duration::from_secs(5), |l| l.contains("/api/x?q=1"));
    let re = line_re(
        "GET /api/x?q=1 HTTP/1.1",
        200,
        "5",
        "http://ref.test/page",
        "itest/1.0",
    );
    let caps = re.captures(&line).unwrap_or_else(|| {
        panic!("access log line not in the contract format:\n{line}\nexpected /{re}/")
    });
    let us: u64 = caps["us"].parse().unwrap();
    assert!(
        (50_000..10_000_000).contains(&us),
        "request time {us} µs, but the origin alone took 50 ms"
    );
    assert_eq!(
        &caps["upstream"],
        origin.addr().to_string(),
        "the upstream address"
    );
}

#[test]
fn one_line_per_request() {
    let origin = Origin::start(|_| Reply::ok("x"));
    let gw = logged(&origin, None);
    let mut c = Client::connect_from(CLIENT.parse().unwrap(), gw.http_addr());
    for i in 0..5 {
        assert_eq!(c.get(&format!("/api/n/{i}")).status, 200);
    }
    gateway_tests::wait_until(Duration::from_secs(5), "five access log lines", || {
        gw.access_log()
            .lines()
            .filter(|l| l.contains("/api/n/"))
            .count()
            == 5
    });
    let log = gw.access_log();
    for i in 0..5 {
        assert_eq!(
            log.lines()
                .filter(|l| l.contains(&format!("\"GET /api/n/{i} HTTP/1.1\"")))
                .count(),
            1,
            "request {i} logged once:\n{log}"
        );
    }
}

#[test]
fn unproxied_requests_log_dash_as_upstream() {
    let origin = Origin::echo();
    let gw = logged(&origin, None);
    let r = send_from_client(&gw, &Req::get("/health"));
    assert_eq!(r.status, 200);
    let r404 = send_from_client(&gw, &Req::get("/nowhere"));
    assert_eq!(r404.status, 404);

    let line = gw.wait_access_line(Duration::from_secs(5), |l| l.contains("/health"));
    let caps = line_re("GET /health HTTP/1.1", 200, "3", "-", "-")
        .captures(&line)
        .unwrap_or_else(|| panic!("respond-route line not in the contract format:\n{line}"));
    assert_eq!(&caps["upstream"], "-");

    let line = gw.wait_access_line(Duration::from_secs(5), |l| l.contains("/nowhere"));
    let caps = line_re(
        "GET /nowhere HTTP/1.1",
        404,
        &r404.body.len().to_string(),
        "-",
        "-",
    )
    .captures(&line)
    .unwrap_or_else(|| panic!("404 line not in the contract format:\n{line}"));
    assert_eq!(&caps["upstream"], "-");
}

#[test]
fn json_format_writes_the_same_fields() {
    let origin = Origin::start(|_| Reply::ok("hello"));
    let gw = logged(&origin, Some("json"));
    send_from_client(
        &gw,
        &Req::get("/api/json").header("User-Agent", "itest/1.0"),
    );
    let line = gw.wait_access_line(Duration::from_secs(5), |l| l.contains("/api/json"));
    let v: serde_json::Value = serde_json::from_str(&line)
        .unwrap_or_else(|e| panic!("json access log line is not JSON ({e}): {line}"));
    let obj = v.as_object().expect("one JSON object per line");
    // The contract names the fields (same as combined) but not the JSON keys: look for the
    // values.
    let values: Vec<String> = obj
        .values()
        .map(|v| match v {
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        })
        .collect();
    let has = |pred: &dyn Fn(&str) -> bool, what: &str| {
        assert!(values.iter().any(|v| pred(v)), "no {what} in {line}");
    };
    has(&|v| v == CLIENT, "client address");
    has(&|v| v.contains("/api/json"), "request path");
    has(&|v| v == "200", "status");
    has(&|v| v == "5", "body bytes");
    has(&|v| v == "itest/1.0", "user agent");
    has(&|v| v == origin.addr().to_string(), "upstream address");
}

#[test]
fn long_fields_are_cut_with_a_marker_so_escaping_cannot_grow_a_line() {
    let origin = Origin::start(|_| Reply::ok("x"));
    let gw = logged(&origin, None);
    // Every byte of these escapes to four (`\x22`): uncapped, this line would be 40 KiB
    // (the head stays under the default 16 KiB max_header_bytes).
    let quotes = "\"".repeat(4500);
    let target = format!("/api/{}", "a".repeat(4500));
    let r = send_from_client(
        &gw,
        &Req::get(&target)
            .header("User-Agent", &quotes)
            .header("Referer", &quotes),
    );
    assert_eq!(r.status, 200);
    let line = gw.wait_access_line(Duration::from_secs(5), |l| l.contains("/api/aaa"));
    assert!(line.len() < 3 * 2048 + 300, "{} bytes", line.len());
    assert_eq!(line.matches("...[truncated]").count(), 3, "{line}");
    assert!(line.contains(&format!("GET /api/{}", "a".repeat(2043))));
    // An escape is never split.
    assert!(line.contains("\\x22...[truncated]\" \"\\x22"), "{line}");
}

#[test]
fn a_stalled_log_drops_lines_counts_them_and_keeps_serving() {
    use std::os::unix::fs::OpenOptionsExt;

    // The access log is a FIFO that is opened for reading and never read: the writer thread
    // blocks once the pipe's 64 KiB are full, as on a dead disk.
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("access.fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo with a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let _reader = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&fifo)
        .unwrap();
    let origin = Origin::start(|_| Reply::ok("x"));
    let cfg = Config::new()
        .upstream(Upstream::new("api", &[origin.addr()]))
        .route(Route::prefix("/api/", "api"))
        .log("access", fifo.to_str().unwrap());
    let gw = Gateway::with(&cfg);
    let rss = |pid: u32| -> u64 {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    };
    let before = rss(gw.pid());

    // About 6 KiB per line: 3,000 lines are twice the 8 MiB queue.
    let long = "b".repeat(2000);
    let target = format!("/api/{long}");
    let mut client = gw.client();
    let req = Req::get(&target)
        .header("User-Agent", &long)
        .header("Referer", &long);
    for _ in 0..3000 {
        assert_eq!(client.must(&req).status, 200);
    }
    let m = gateway_tests::control::wait_metrics(
        gw.admin_addr(),
        Duration::from_secs(10),
        "dropped access-log lines",
        |m| {
            m.get("gateway_access_log_dropped_total", &[])
                .unwrap_or(0.0)
                > 0.0
        },
    );
    let dropped = m.get("gateway_access_log_dropped_total", &[]).unwrap();
    assert!(dropped <= 3000.0, "{dropped}");
    let grown = rss(gw.pid()).saturating_sub(before);
    assert!(
        grown < 32 * 1024,
        "RSS grew {grown} KiB behind a stalled access log (queue is 8 MiB)"
    );
    // Still serving, and still answering the admin listener.
    assert_eq!(gw.get("/api/still").status, 200);
    assert_eq!(gw.admin_get("/healthz").status, 200);
}

#[test]
fn a_client_that_hangs_up_is_logged_499_with_zero_bytes_sent() {
    // The gateway answers a client gone before the response with nothing (499, as nginx):
    // the log says 0 body bytes, not the length of an error body that was never sent.
    use std::io::Write as _;
    let origin = Origin::start(|_| Reply::ok("late").delay(Duration::from_secs(2)));
    let gw = logged(&origin, None);
    let mut s = std::net::TcpStream::connect(gw.http_addr()).unwrap();
    s.write_all(b"GET /api/gone HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    gateway_tests::wait_until(Duration::from_secs(5), "the request at the origin", || {
        origin.heads_seen() == 1
    });
    drop(s);
    let line = gw.wait_access_line(Duration::from_secs(5), |l| l.contains("/api/gone"));
    assert!(
        line.contains("\"GET /api/gone HTTP/1.1\" 499 0 "),
        "a 499 sends no body:\n{line}"
    );
}

/// A request whose upstream refused the connection is logged with the server it tried, as
/// nginx's `$upstream_addr` names it: an operator reading the 502 sees which server failed
/// (attack12 F3.2: the log said `-`).
#[test]
fn a_failed_connect_is_logged_with_the_server_it_went_to() {
    let dead = gateway_tests::refused_addr();
    let gw = Gateway::with(
        &Config::new()
            .upstream(Upstream::new("api", &[dead]))
            .route(Route::prefix("/api/", "api")),
    );
    let r = send_from_client(&gw, &Req::get("/api/refused"));
    assert_eq!(r.status, 502);
    let line = gw.wait_access_line(Duration::from_secs(5), |l| l.contains("/api/refused"));
    assert!(
        line.ends_with(&format!(" {dead}")),
        "the log names the server the connect went to ({dead}):\n{line}"
    );
}

/// A drain that runs out of `graceful_timeout` with a request still waiting on its upstream
/// answers it 503 with `Connection: close` (the client may try another node) and logs it,
/// with its upstream, as nginx logs what `worker_shutdown_timeout` cut. Before, the worker
/// dropped the request with its task: the client saw a reset, the log had no line.
#[test]
fn a_request_cut_at_the_end_of_a_drain_is_answered_503_and_logged() {
    let origin = Origin::start(|_| Reply::stall());
    let cfg = Config::new()
        .server("graceful_timeout", "1s")
        .upstream(Upstream::new("api", &[origin.addr()]))
        .route(Route::prefix("/api/", "api"));
    let mut gw = Gateway::with(&cfg);
    let http = gw.http_addr();
    let cut = std::thread::spawn(move || {
        let mut c = Client::connect_from(CLIENT.parse().unwrap(), http);
        c.set_read_timeout(Duration::from_secs(10));
        c.request(&Req::get("/api/cut"))
            .map(|r| (r.status, r.says_close()))
    });
    gateway_tests::wait_until(Duration::from_secs(5), "the request at the origin", || {
        origin.heads_seen() == 1
    });
    gw.signal(libc::SIGTERM);
    let answer = cut.join().unwrap();
    assert_eq!(
        answer.ok(),
        Some((503, true)),
        "the cut request gets a 503 that closes the connection"
    );
    let line = gw.wait_access_line(Duration::from_secs(5), |l| l.contains("/api/cut"));
    assert!(
        line.contains("\"GET /api/cut HTTP/1.1\" 503 ")
            && line.ends_with(&origin.addr().to_string()),
        "logged as 503 with its upstream:\n{line}"
    );
    assert!(
        gw.wait_exit(Duration::from_secs(5)).is_some(),
        "exits after the drain"
    );
}
