//! Differential tests against the nginx reference front (`fixtures/nginx-reference.conf`,
//! the copy of the configuration the gateway replaces). The same requests go through nginx
//! and through the gateway running the equivalent config, each to its own recording origin;
//! the request heads the two origins receive must match, modulo the differences listed in
//! [`DIFFERENCES`], and the clients must get the same statuses and bodies.
//!
//! nginx is required: a missing binary fails these tests (`cargo xtask test` installs it).

use std::collections::BTreeMap;
use std::time::Duration;

use gateway_tests::nginx::{Nginx, NginxParams};
use gateway_tests::wire::header_tokens;
use gateway_tests::{
    free_addr, refused_addr, Client, Config, Gateway, Origin, RecordedRequest, Reply, Req,
    Response, Route, Upstream,
};

/// Every difference between what nginx (reference config) and the gateway send upstream
/// that these tests tolerate, and why. Anything else is a failure.
pub const DIFFERENCES: &[&str] = &[
    "Header order and header-name case are ignored (field names are case-insensitive, \
     RFC 9110 §5.1; the order of different names carries no meaning, §5.3). The order of \
     repeated fields with the same name is compared.",
    "Connection: the reference sets `proxy_set_header Connection \"\"`, so nginx sends none; \
     the gateway may send `Connection: keep-alive` (HTTP/1.1 implies it anyway). Any other \
     Connection value is a difference.",
    "Host: nginx sends `$host`, which is lower-cased and stripped of the port; the gateway \
     forwards the client's Host unchanged (the contract: Host preserved). Compared after \
     lower-casing and removing the port.",
    "Chunked request bodies: nginx buffers them (proxy_request_buffering on) and sends \
     Content-Length; the gateway streams them (contract: bounded buffers) and may send \
     Transfer-Encoding: chunked instead. For chunked client requests the framing fields are \
     ignored and the decoded bodies compared.",
    "Hop-by-hop fields nginx does not know: nginx forwards the fields named in the client's \
     Connection header and Proxy-Connection/Trailer (its proxy only clears Connection, \
     Keep-Alive, TE, Expect and Upgrade); the contract forbids forwarding them, so they are \
     dropped from nginx's side before comparing and must be absent on the gateway's side.",
];

/// A request head as an origin saw it, normalised per [`DIFFERENCES`].
#[derive(Debug, PartialEq, Eq)]
struct Seen {
    request_line: String,
    headers: BTreeMap<String, Vec<String>>,
    body: Vec<u8>,
}

fn normalise(got: &RecordedRequest, sent: &Req, is_nginx: bool) -> Seen {
    let sent_chunked = sent.chunked.is_some();
    let named_in_connection = header_tokens(&sent.headers, "connection");
    let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, value) in &got.headers {
        let name = name.to_ascii_lowercase();
        let mut value = value.clone();
        match name.as_str() {
            "connection" if value.eq_ignore_ascii_case("keep-alive") => continue,
            "content-length" | "transfer-encoding" if sent_chunked => continue,
            "host" => {
                value = value.to_ascii_lowercase();
                if let Some((h, port)) = value.rsplit_once(':') {
                    if port.bytes().all(|b| b.is_ascii_digit()) && !h.ends_with(']') {
                        value = h.to_string();
                    }
                }
            }
            _ => {}
        }
        if is_nginx
            && (named_in_connection.contains(&name)
                || name == "proxy-connection"
                || name == "trailer")
        {
            continue;
        }
        headers.entry(name).or_default().push(value);
    }
    Seen {
        request_line: format!("{} {} {}", got.method, got.target, got.version),
        headers,
        body: got.body.clone(),
    }
}

fn requests() -> Vec<Req> {
    vec![
        Req::get("/api/plain")
            .header("User-Agent", "difftest/1.0")
            .header("Accept", "*/*"),
        Req::get("/api/").header("User-Agent", "difftest/1.0"),
        Req::get("/api/xff").header("X-Forwarded-For", "1.2.3.4"),
        Req::get("/api/xff-list").header("X-Forwarded-For", "1.2.3.4, 198.51.100.7"),
        Req::get("/api/spoof")
            .header("X-Real-IP", "6.6.6.6")
            .header("X-Forwarded-Proto", "https"),
        Req::get("/api/custom")
            .header("X-Custom-A", "1")
            .header("X-Custom-B", "two words")
            .header("X-Dup", "first")
            .header("X-Dup", "second")
            .header("Cookie", "a=1; b=2")
            .header("Authorization", "Bearer token")
            .header("Accept-Encoding", "gzip, br"),
        Req::get("/api/conn")
            .header("Connection", "keep-alive, X-Hop")
            .header("X-Hop", "per-hop secret")
            .header("Keep-Alive", "timeout=5")
            .header("TE", "trailers")
            .header("X-After", "kept"),
        Req::get("/api/query?a=1&b=%20x&c=/d;e"),
        Req::get("/api/host").host(Some("Example.TEST:8080")),
        Req::head("/api/head").header("Accept", "text/plain"),
        Req::post("/api/post", "name=value&x=1")
            .header("Content-Type", "application/x-www-form-urlencoded"),
        Req::post("/api/chunked", "a chunked body in three parts").chunked(&[7, 7]),
        Req::new("PUT", "/api/empty-put").body(Vec::new()),
        Req::new("DELETE", "/api/resource/42"),
    ]
}

/// Answers with a body naming the request, so the clients' views can be compared too.
fn recorder() -> Origin {
    Origin::start(|r| {
        Reply::ok(format!("{} {} {}", r.method, r.target, r.body.len()))
            .header("Content-Type", "text/plain")
    })
}

/// The gateway config equivalent to the reference nginx front.
fn equivalent_config(api: std::net::SocketAddr, ws: std::net::SocketAddr) -> Config {
    Config::new()
        .workers(2)
        .server("keepalive_timeout", "5s")
        .upstream(Upstream::new("api", &[api]).keepalive(32))
        .upstream(
            Upstream::new("ws", &[ws])
                .balance("client_ip_hash")
                .keepalive(32),
        )
        .route(
            Route::prefix("/api/", "api")
                .connect_timeout("60s")
                .send_timeout("300s")
                .read_timeout("300s")
                .max_body_size("50MiB"),
        )
        .route(
            Route::prefix("/ws", "ws")
                .websocket(true)
                .connect_timeout("60s")
                .send_timeout("3600s")
                .read_timeout("3600s"),
        )
        .route(Route::prefix("/health", "api"))
}

struct Pair {
    nginx_origin: Origin,
    gw_origin: Origin,
    _ws_origins: (Origin, Origin),
    nginx: Nginx,
    gw: Gateway,
}

fn start_pair(api_override: Option<std::net::SocketAddr>) -> Pair {
    let nginx_origin = recorder();
    let gw_origin = recorder();
    let ws = (recorder(), recorder());
    let nginx = Nginx::start_reference(&NginxParams {
        workers: 2,
        listen: free_addr(),
        api_upstream: api_override.unwrap_or(nginx_origin.addr()),
        ws_upstream: ws.0.addr(),
    });
    let gw = Gateway::with(&equivalent_config(
        api_override.unwrap_or(gw_origin.addr()),
        ws.1.addr(),
    ));
    Pair {
        nginx_origin,
        gw_origin,
        _ws_origins: ws,
        nginx,
        gw,
    }
}

fn send(addr: std::net::SocketAddr, req: &Req) -> Response {
    let mut c = Client::connect(addr);
    c.set_read_timeout(Duration::from_secs(10));
    c.request(req)
        .unwrap_or_else(|e| panic!("{} {} via {addr}: {e}", req.method, req.target))
}

#[test]
fn upstream_request_heads_match_nginx() {
    let p = start_pair(None);
    let mut mismatches = Vec::new();
    for (i, req) in requests().iter().enumerate() {
        let rn = send(p.nginx.addr(), req);
        let rg = send(p.gw.http_addr(), req);
        let what = format!("#{i} {} {}", req.method, req.target);
        if (rn.status, &rn.body) != (rg.status, &rg.body) {
            mismatches.push(format!(
                "{what}: client got nginx {} {:?} vs gateway {} {:?}",
                rn.status,
                rn.body_str(),
                rg.status,
                rg.body_str()
            ));
        }
        let n = p.nginx_origin.wait_requests(i + 1, Duration::from_secs(5))[i].clone();
        let g = p.gw_origin.wait_requests(i + 1, Duration::from_secs(5))[i].clone();
        // The gateway side must not carry what the contract removes, whatever nginx does.
        for name in header_tokens(&req.headers, "connection")
            .into_iter()
            .filter(|t| t != "keep-alive" && t != "close")
            .chain(["proxy-connection".to_string(), "trailer".to_string()])
        {
            if g.has_header(&name) {
                mismatches.push(format!("{what}: gateway forwarded hop-by-hop {name}"));
            }
        }
        let (sn, sg) = (normalise(&n, req, true), normalise(&g, req, false));
        if sn.request_line != sg.request_line {
            mismatches.push(format!(
                "{what}: request line nginx {:?} vs gateway {:?}",
                sn.request_line, sg.request_line
            ));
        }
        if sn.body != sg.body {
            mismatches.push(format!("{what}: bodies differ"));
        }
        let names: std::collections::BTreeSet<&String> =
            sn.headers.keys().chain(sg.headers.keys()).collect();
        for name in names {
            let (vn, vg) = (sn.headers.get(name), sg.headers.get(name));
            if vn != vg {
                mismatches.push(format!("{what}: {name}: nginx {vn:?} vs gateway {vg:?}"));
            }
        }
    }
    assert!(
        mismatches.is_empty(),
        "the gateway's upstream requests differ from nginx's (allowed differences: {DIFFERENCES:#?}):\n{}",
        mismatches.join("\n")
    );
}

#[test]
fn error_statuses_match_nginx() {
    // Same front, same answers to trouble: no route, and smuggling shapes nginx also rejects.
    let p = start_pair(None);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("no route", Req::get("/nothing/here").to_bytes()),
        (
            "Content-Length with Transfer-Encoding",
            b"POST /api/x HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".to_vec(),
        ),
        (
            "two different Content-Length",
            b"POST /api/x HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab".to_vec(),
        ),
        ("HTTP/1.1 without Host", b"GET /api/x HTTP/1.1\r\n\r\n".to_vec()),
    ];
    let mut mismatches = Vec::new();
    for (case, raw) in &cases {
        let status = |addr| {
            let (_, r) = gateway_tests::client::raw_request(addr, raw);
            r.map(|r| r.status).unwrap_or(0)
        };
        let (sn, sg) = (status(p.nginx.addr()), status(p.gw.http_addr()));
        if sn != sg {
            mismatches.push(format!("{case}: nginx {sn} vs gateway {sg}"));
        }
    }
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
    assert_eq!(p.gw_origin.request_count(), 0);
}

#[test]
fn dead_upstream_gives_502_like_nginx() {
    let p = start_pair(Some(refused_addr()));
    let rn = send(p.nginx.addr(), &Req::get("/api/x"));
    let rg = send(p.gw.http_addr(), &Req::get("/api/x"));
    assert_eq!(rn.status, 502, "nginx reference");
    assert_eq!(
        rg.status, rn.status,
        "gateway {} vs nginx {}",
        rg.status, rn.status
    );
}
