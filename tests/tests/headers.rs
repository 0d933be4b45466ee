//! What the origin receives, and where: the forwarding headers (`Host` preserved,
//! `X-Real-IP`, `X-Forwarded-For` appended, `X-Forwarded-Proto`), hop-by-hop headers and the
//! ones named in `Connection` removed, end-to-end headers untouched; and route choice (exact
//! over prefix, longest prefix, host-specific over hostless, no match 404).

use std::net::IpAddr;

use gateway_tests::{Client, Config, Gateway, Origin, Reply, Req, Route, Upstream};

fn client_ip() -> IpAddr {
    // A source other than 127.0.0.1, so a gateway that hard-codes or mixes up addresses shows.
    "127.0.0.9".parse().unwrap()
}

fn proxied() -> (Origin, Gateway) {
    let origin = Origin::start(|r| Reply::ok(r.target.clone()));
    let gw = Gateway::with(&Config::proxy_all(&[origin.addr()]));
    (origin, gw)
}

fn send(gw: &Gateway, req: &Req) -> gateway_tests::Response {
    let r = Client::connect_from(client_ip(), gw.http_addr()).must(req);
    assert_eq!(r.status, 200, "{:?}", r.body_str());
    r
}

#[test]
fn host_is_preserved() {
    let (origin, gw) = proxied();
    for host in ["example.test", "example.test:8080", "Mixed.Case.Test"] {
        send(&gw, &Req::get("/h").host(Some(host)));
        let got = origin.last_request();
        assert_eq!(got.header_all("host"), vec![host], "Host {host:?}");
    }
}

#[test]
fn request_line_and_end_to_end_headers_pass_unchanged() {
    let (origin, gw) = proxied();
    let target = "/path/a%20b;p=1?q=1&r=%2F&empty=";
    send(
        &gw,
        &Req::get(target)
            .header("Accept", "text/html, */*;q=0.1")
            .header("X-Custom", "  value with  inner  spaces")
            .header("X-Dup", "one")
            .header("X-Dup", "two")
            .header("Authorization", "Bearer abc")
            .header("Cookie", "a=1; b=2"),
    );
    let got = origin.last_request();
    assert_eq!(got.method, "GET");
    assert_eq!(
        got.target, target,
        "the request-target is forwarded as sent"
    );
    assert_eq!(got.version, "HTTP/1.1", "HTTP/1.1 to the upstream");
    assert_eq!(got.header("accept"), Some("text/html, */*;q=0.1"));
    assert_eq!(got.header("x-custom"), Some("value with  inner  spaces"));
    assert_eq!(
        got.header_all("x-dup"),
        vec!["one", "two"],
        "repeated fields keep their order"
    );
    assert_eq!(got.header("authorization"), Some("Bearer abc"));
    assert_eq!(got.header("cookie"), Some("a=1; b=2"));
}

#[test]
fn x_real_ip_is_the_client_address() {
    let (origin, gw) = proxied();
    // A client-supplied X-Real-IP is replaced, never believed.
    send(&gw, &Req::get("/ip").header("X-Real-IP", "6.6.6.6"));
    let got = origin.last_request();
    assert_eq!(got.header_all("x-real-ip"), vec!["127.0.0.9"]);
}

#[test]
fn x_forwarded_for_is_set_or_appended() {
    let (origin, gw) = proxied();
    send(&gw, &Req::get("/none"));
    assert_eq!(
        origin.last_request().header_all("x-forwarded-for"),
        vec!["127.0.0.9"]
    );

    send(&gw, &Req::get("/one").header("X-Forwarded-For", "1.2.3.4"));
    assert_eq!(
        origin.last_request().header_all("x-forwarded-for"),
        vec!["1.2.3.4, 127.0.0.9"],
        "an untrusted X-Forwarded-For is appended to"
    );

    send(
        &gw,
        &Req::get("/list").header("X-Forwarded-For", "1.2.3.4, 5.6.7.8"),
    );
    assert_eq!(
        origin.last_request().header_all("x-forwarded-for"),
        vec!["1.2.3.4, 5.6.7.8, 127.0.0.9"]
    );

    // Several fields are one list (RFC 9110 §5.3); the origin gets one field.
    send(
        &gw,
        &Req::get("/two")
            .header("X-Forwarded-For", "1.1.1.1")
            .header("X-Forwarded-For", "2.2.2.2"),
    );
    assert_eq!(
        origin.last_request().header_all("x-forwarded-for"),
        vec!["1.1.1.1, 2.2.2.2, 127.0.0.9"]
    );
}

#[test]
fn x_forwarded_proto_is_http_on_a_plain_listener() {
    let (origin, gw) = proxied();
    send(&gw, &Req::get("/p"));
    assert_eq!(
        origin.last_request().header_all("x-forwarded-proto"),
        vec!["http"]
    );
    // A client claiming https over plain HTTP is overruled.
    send(&gw, &Req::get("/p").header("X-Forwarded-Proto", "https"));
    assert_eq!(
        origin.last_request().header_all("x-forwarded-proto"),
        vec!["http"]
    );
}

#[test]
fn hop_by_hop_headers_are_not_forwarded() {
    let (origin, gw) = proxied();
    send(
        &gw,
        &Req::get("/hop")
            .header("Connection", "keep-alive, X-Secret, X-Other-Hop")
            .header("Keep-Alive", "timeout=5")
            .header("Proxy-Connection", "keep-alive")
            .header("TE", "trailers")
            .header("Trailer", "X-Checksum")
            .header("Upgrade", "h2c")
            .header("X-Secret", "do not forward")
            .header("X-Other-Hop", "nor this")
            .header("X-Kept", "end-to-end"),
    );
    let got = origin.last_request();
    // RFC 9110 §7.6.1: Connection and the fields it names are for this hop only; Keep-Alive,
    // Proxy-Connection, TE, Trailer (when no trailers follow) and Upgrade (on a route that is
    // not a WebSocket route) are hop-by-hop too. Proxy-Authorization is left out of this list
    // on purpose: the contract does not say whether the gateway consumes it.
    for name in [
        "x-secret",
        "x-other-hop",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "upgrade",
    ] {
        assert!(
            !got.has_header(name),
            "hop-by-hop header {name} was forwarded: {:?}",
            got.headers
        );
    }
    // The gateway may manage its own upstream connection with `Connection: keep-alive` (or
    // nothing, as HTTP/1.1 implies it), but never forwards the client's.
    for v in got.header_all("connection") {
        assert!(
            v.eq_ignore_ascii_case("keep-alive"),
            "Connection to the upstream is {v:?}"
        );
    }
    assert_eq!(got.header("x-kept"), Some("end-to-end"));
}

#[test]
fn connection_close_from_client_is_not_forwarded() {
    let (origin, gw) = proxied();
    let mut c = Client::connect(gw.http_addr());
    let r = c.must(
        &Req::get("/close")
            .header("Connection", "close, X-Secret")
            .header("X-Secret", "s"),
    );
    assert_eq!(r.status, 200);
    let got = origin.last_request();
    assert!(!got.has_header("x-secret"));
    assert!(
        got.header_all("connection")
            .iter()
            .all(|v| !v.to_ascii_lowercase().contains("x-secret")),
        "{:?}",
        got.headers
    );
}

#[test]
fn chunked_request_reaches_origin_with_one_framing() {
    let (origin, gw) = proxied();
    send(&gw, &Req::post("/c", "chunky body").chunked(&[3]));
    let got = origin.last_request();
    assert_eq!(got.body, b"chunky body");
    let te = got.header_all("transfer-encoding");
    let cl = got.header_all("content-length");
    assert!(
        (te == ["chunked"] && cl.is_empty()) || (te.is_empty() && cl == ["11"]),
        "exactly one framing upstream: TE {te:?}, CL {cl:?}"
    );
}

#[test]
fn response_hop_by_hop_headers_are_not_forwarded_to_the_client() {
    let origin = Origin::start(|_| {
        Reply::ok("r")
            .header("Connection", "X-Upstream-Secret")
            .header("X-Upstream-Secret", "internal")
            .header("Keep-Alive", "timeout=60")
            .header("X-Kept", "yes")
    });
    let gw = Gateway::with(&Config::proxy_all(&[origin.addr()]));
    let r = gw.get("/r");
    assert_eq!(r.status, 200);
    assert!(r.header("x-upstream-secret").is_none(), "{:?}", r.headers);
    assert!(
        r.header("keep-alive").is_none_or(|v| !v.contains("60")),
        "the upstream's Keep-Alive leaked: {:?}",
        r.headers
    );
    assert_eq!(r.header("x-kept"), Some("yes"));
}

// ---- routing ----------------------------------------------------------------------------

fn routed() -> (Vec<Origin>, Gateway) {
    let origins: Vec<Origin> = ["a", "b", "c", "d"]
        .iter()
        .map(|n| Origin::named(n))
        .collect();
    let mut cfg = Config::new();
    for (o, n) in origins.iter().zip(["a", "b", "c", "d"]) {
        cfg = cfg.upstream(Upstream::new(n, &[o.addr()]));
    }
    // Declared in an order that makes "first match wins" give wrong answers everywhere.
    let cfg = cfg
        .route(Route::prefix("/exact", "b"))
        .route(Route::exact("/exact", "a"))
        .route(Route::prefix("/p/", "b"))
        .route(Route::prefix("/p/q/", "c"))
        .route(Route::prefix("/h/", "a"))
        .route(Route::prefix("/h/", "d").host("special.test"));
    let gw = Gateway::with(&cfg);
    (origins, gw)
}

fn served_by(gw: &Gateway, target: &str, host: &str) -> (u16, String) {
    let r = gw.request(&Req::get(target).host(Some(host)));
    (r.status, r.body_str())
}

#[test]
fn exact_path_beats_prefix() {
    let (_o, gw) = routed();
    assert_eq!(served_by(&gw, "/exact", "x.test"), (200, "a".into()));
    assert_eq!(
        served_by(&gw, "/exact?query=1", "x.test"),
        (200, "a".into()),
        "the query is not part of the path"
    );
    assert_eq!(served_by(&gw, "/exactly", "x.test"), (200, "b".into()));
    assert_eq!(served_by(&gw, "/exact/sub", "x.test"), (200, "b".into()));
}

#[test]
fn longest_prefix_wins() {
    let (_o, gw) = routed();
    assert_eq!(served_by(&gw, "/p/x", "x.test"), (200, "b".into()));
    assert_eq!(served_by(&gw, "/p/q/x", "x.test"), (200, "c".into()));
    assert_eq!(served_by(&gw, "/p/q/", "x.test"), (200, "c".into()));
    assert_eq!(served_by(&gw, "/p/qq", "x.test"), (200, "b".into()));
}

#[test]
fn host_route_beats_hostless() {
    let (_o, gw) = routed();
    assert_eq!(served_by(&gw, "/h/x", "other.test"), (200, "a".into()));
    assert_eq!(served_by(&gw, "/h/x", "special.test"), (200, "d".into()));
    // Host names compare case-insensitively and without the port, as nginx's server_name
    // matching does (RFC 9110 §4.2.3: the host is case-insensitive).
    assert_eq!(served_by(&gw, "/h/x", "SPECIAL.test"), (200, "d".into()));
    assert_eq!(
        served_by(&gw, "/h/x", "special.test:8080"),
        (200, "d".into())
    );
}

#[test]
fn no_matching_route_is_404() {
    let (origins, gw) = routed();
    for target in ["/", "/nothing", "/p", "/h", "/exac"] {
        assert_eq!(served_by(&gw, target, "special.test").0, 404, "{target}");
    }
    assert!(
        origins.iter().all(|o| o.request_count() == 0),
        "a 404 reached an upstream"
    );
}

// ---- forwarding headers and underscore aliases (issue 10.6, 17.4) -------------------------

/// Claims about the client that only a trusted proxy may make.
const FORWARDING: [(&str, &str); 9] = [
    ("Forwarded", "for=198.51.100.1;host=evil.test;proto=https"),
    ("X-Forwarded-Host", "evil.test"),
    ("X-Forwarded-Port", "443"),
    ("X-Original-URL", "/admin/secret.txt"),
    ("X-Rewrite-URL", "/admin/secret.txt"),
    ("True-Client-IP", "198.51.100.1"),
    ("X-Client-IP", "198.51.100.1"),
    ("X-Real-IP", "198.51.100.1"),
    ("X-Forwarded-Proto", "https"),
];

/// A gateway whose listener trusts 127.0.0.8 only, with extra `[server]` keys.
fn trusting(origin: &Origin, server: &[(&str, &str)]) -> Gateway {
    let mut cfg = Config::proxy_all(&[origin.addr()]);
    for (k, v) in server {
        cfg = cfg.server_raw(k, v);
    }
    let toml = cfg.to_toml().replacen(
        "name = \"http\"\n",
        "name = \"http\"\ntrusted_proxies = [\"127.0.0.8/32\"]\n",
        1,
    );
    Gateway::start(&toml)
}

fn with_forwarding(path: &str) -> Req {
    FORWARDING
        .iter()
        .fold(Req::get(path), |r, (n, v)| r.header(n, v))
}

#[test]
fn forwarding_headers_from_untrusted_peers_are_removed() {
    let origin = Origin::start(|r| Reply::ok(r.target.clone()));
    let gw = trusting(&origin, &[]);
    send(&gw, &with_forwarding("/f"));
    let got = origin.last_request();
    for (name, value) in FORWARDING {
        assert!(
            got.header_all(name).iter().all(|v| *v != value),
            "{name}: {value} reached the origin from an untrusted peer"
        );
    }
    assert_eq!(got.header("x-real-ip"), Some("127.0.0.9"));
    assert_eq!(got.header("x-forwarded-proto"), Some("http"));
}

#[test]
fn forwarding_headers_from_trusted_proxies_or_the_keep_list_stay() {
    let origin = Origin::start(|r| Reply::ok(r.target.clone()));
    let gw = trusting(
        &origin,
        &[("forward_client_headers", "[\"X-Forwarded-Host\"]")],
    );
    send(&gw, &with_forwarding("/f"));
    let got = origin.last_request();
    assert_eq!(got.header("x-forwarded-host"), Some("evil.test"), "kept");
    assert!(!got.has_header("x-original-url"), "not in the keep-list");
    let r = Client::connect_from("127.0.0.8".parse().unwrap(), gw.http_addr())
        .must(&with_forwarding("/t"));
    assert_eq!(r.status, 200);
    let got = origin.last_request();
    for name in [
        "forwarded",
        "x-forwarded-port",
        "x-original-url",
        "true-client-ip",
    ] {
        assert!(got.has_header(name), "{name} from a trusted proxy");
    }
}

#[test]
fn underscore_aliases_never_reach_the_origin() {
    let origin = Origin::start(|r| Reply::ok(r.target.clone()));
    let aliased = |path: &str| {
        Req::get(path)
            .header("X_Real_IP", "198.51.100.1")
            .header("X-Forwarded_For", "198.51.100.1")
            .header("x_forwarded_proto", "https")
            .header("X_Original_URL", "/admin")
            .header("X_App_Token", "t")
    };
    let gw = trusting(&origin, &[]);
    send(&gw, &aliased("/u"));
    let got = origin.last_request();
    assert!(
        got.headers.iter().all(|(n, _)| !n.contains('_')),
        "underscored names are dropped by default: {:?}",
        got.headers
    );
    let gw = trusting(&origin, &[("underscores_in_headers", "true")]);
    send(&gw, &aliased("/u"));
    let got = origin.last_request();
    let underscored: Vec<&str> = got
        .headers
        .iter()
        .map(|(n, _)| n.as_str())
        .filter(|n| n.contains('_'))
        .collect();
    assert_eq!(
        underscored,
        ["X_App_Token"],
        "only non-aliases pass when allowed"
    );
}

// ---- normalised routing, in front of a real nginx (issue 10.4) ----------------------------

/// nginx serving a secret file, which the gateway guards with a 403 route on `/admin` and
/// on the host `admin.example.com`.
const NGINX_FILES: &str = r#"
worker_processes 1;
error_log @PREFIX@/error.log;
pid @PREFIX@/nginx.pid;
events { worker_connections 64; }
http {
    access_log @PREFIX@/access.log;
    client_body_temp_path @PREFIX@;
    proxy_temp_path @PREFIX@;
    fastcgi_temp_path @PREFIX@;
    uwsgi_temp_path @PREFIX@;
    scgi_temp_path @PREFIX@;
    server {
        listen @LISTEN@;
        root @PREFIX@/www;
    }
}
"#;

const SECRET: &str = "TOP-SECRET-9f1c";

fn guarded_nginx() -> (gateway_tests::nginx::Nginx, Gateway) {
    use gateway_tests::nginx::{Nginx, NginxParams};
    let unused = gateway_tests::free_addr();
    let nginx = Nginx::start(
        NGINX_FILES,
        &NginxParams {
            workers: 1,
            listen: gateway_tests::free_addr(),
            api_upstream: unused,
            ws_upstream: unused,
        },
    );
    let www = nginx.prefix().join("www");
    std::fs::create_dir_all(www.join("admin")).unwrap();
    std::fs::create_dir_all(www.join("public")).unwrap();
    std::fs::write(www.join("admin/secret.txt"), SECRET).unwrap();
    std::fs::write(www.join("public/index.html"), "public\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    for dir in [www.clone(), www.join("admin"), www.join("public")] {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let gw = Gateway::with(
        &Config::new()
            .upstream(Upstream::new("files", &[nginx.addr()]))
            .route(Route::respond_prefix("/admin", 403, "guarded\n"))
            .route(Route::respond_prefix("/", 403, "guarded host\n").host("admin.example.com"))
            .route(Route::prefix("/", "files")),
    );
    (nginx, gw)
}

#[test]
fn routing_is_on_the_normalised_path_and_host() {
    let (nginx, gw) = guarded_nginx();
    assert_eq!(gw.get("/public/index.html").body_str(), "public\n");
    let cases: &[(&str, &str, u16)] = &[
        ("/admin/secret.txt", "t", 403),
        ("/public/../admin/secret.txt", "t", 403),
        ("/public/%2e%2e/admin/secret.txt", "t", 403),
        ("/public/%2E%2E/admin/secret.txt", "t", 403),
        ("/public/./../admin/secret.txt", "t", 403),
        ("//admin/secret.txt", "t", 403),
        ("///admin//secret.txt", "t", 403),
        ("/%61dmin/secret.txt", "t", 403),
        ("/%61%64%6d%69%6e/secret.txt", "t", 403),
        ("/admin%2fsecret.txt", "t", 400),
        ("/admin%2Fsecret.txt", "t", 400),
        ("/public%2f..%2fadmin/secret.txt", "t", 400),
        ("/../admin/secret.txt", "t", 400),
        ("/%2e%2e/admin/secret.txt", "t", 400),
        ("/admin\\secret.txt", "t", 400),
        ("/public/%00/../../admin/secret.txt", "t", 400),
        ("/public/%zz", "t", 400),
        ("/public/..;/admin/secret.txt", "t", 400),
        ("/public/index.html", "admin.example.com", 403),
        ("/public/index.html", "admin.example.com.", 403),
        ("/public/index.html", "ADMIN.Example.COM.:8080", 403),
        ("/public/index.html", "admin.example.com..", 400),
        ("/public/index.html", "user@admin.example.com", 400),
        ("http://t/admin/secret.txt", "t", 403),
        ("HTTP://t/public/../admin/secret.txt", "t", 403),
        ("http://admin.example.com/public/index.html", "t", 403),
        ("http://admin.example.com./public/index.html", "t", 403),
        ("http://user@t/public/index.html", "t", 400),
    ];
    for (target, host, status) in cases {
        let (_c, r) = gateway_tests::client::raw_request(
            gw.http_addr(),
            format!("GET {target} HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes(),
        );
        let r = r.unwrap_or_else(|e| panic!("{target} {host}: {e}"));
        assert_eq!(
            r.status,
            *status,
            "{target} Host {host}: {:?}",
            r.body_str()
        );
        assert!(
            !r.body_str().contains(SECRET),
            "{target} Host {host}: the secret"
        );
    }
    // The framing rule, the issue's own exploit: a body that is a request, with
    // `Connection` naming the field that frames it.
    let smuggled = "GET /admin/secret.txt HTTP/1.1\r\nHost: t\r\n\r\n";
    for connection in ["Content-Length", "Transfer-Encoding", "host"] {
        let mut c = gw.client();
        let raw = format!(
            "GET /public/index.html HTTP/1.1\r\nHost: t\r\nConnection: {connection}\r\nContent-Length: {}\r\n\r\n{smuggled}",
            smuggled.len()
        );
        c.send(raw.as_bytes()).unwrap();
        let r = c.read_response().expect("a response");
        assert_eq!(r.status, 200, "Connection: {connection}");
        assert!(!r.body_str().contains(SECRET), "Connection: {connection}");
        let r = c.get("/public/index.html");
        assert_eq!(
            r.body_str(),
            "public\n",
            "Connection: {connection}: out of sync"
        );
    }
    let log = std::fs::read_to_string(nginx.prefix().join("access.log")).unwrap_or_default();
    assert!(!log.contains("admin"), "nginx served an admin path:\n{log}");
}

#[test]
fn the_normalised_target_is_forwarded() {
    let (origin, gw) = proxied();
    for (target, forwarded) in [
        ("/a/./b//c/../d?x=/../&y=%2F", "/a/b/d?x=/../&y=%2F"),
        ("/%7Euser/%c3%a9", "/~user/%C3%A9"),
        ("http://example.test/abs?q", "/abs?q"),
    ] {
        send(&gw, &Req::get(target));
        assert_eq!(origin.last_request().target, forwarded, "{target}");
    }
    send(
        &gw,
        &Req::get("http://abs.test:81/x").host(Some("other.test")),
    );
    assert_eq!(
        origin.last_request().header_all("host"),
        vec!["abs.test:81"]
    );
}

/// A WSGI application (Python's `wsgiref`), which maps `-` and `_` to the same variable
/// as CGI, WSGI and Rack servers do, reporting the client address and scheme it sees.
const WSGI_APP: &str = r#"
import sys
from wsgiref.simple_server import make_server, WSGIRequestHandler
class Quiet(WSGIRequestHandler):
    def log_message(self, *args):
        pass
def app(environ, start_response):
    body = "\n".join("%s=%s" % (k, environ.get(k, "")) for k in
        ("HTTP_X_REAL_IP", "HTTP_X_FORWARDED_FOR", "HTTP_X_FORWARDED_PROTO")).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
server = make_server("127.0.0.1", 0, app, handler_class=Quiet)
print(server.server_port, flush=True)
server.serve_forever()
"#;

struct Wsgi(std::process::Child, std::net::SocketAddr);

impl Wsgi {
    fn start() -> Wsgi {
        use std::io::BufRead;
        let mut child = std::process::Command::new("python3")
            .args(["-c", WSGI_APP])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("python3 runs the wsgiref application");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port: u16 = line.trim().parse().expect("the wsgiref port");
        Wsgi(child, ([127, 0, 0, 1], port).into())
    }
}

impl Drop for Wsgi {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_wsgi_application_sees_the_gateways_client_address_and_scheme() {
    let app = Wsgi::start();
    for underscores in ["false", "true"] {
        let gw = Gateway::with(
            &Config::proxy_all(&[app.1]).server_raw("underscores_in_headers", underscores),
        );
        let r = send(
            &gw,
            &Req::get("/whoami")
                .header("X_Real_IP", "198.51.100.1")
                .header("X-Forwarded_For", "198.51.100.1")
                .header("X_Forwarded_Proto", "https"),
        );
        assert_eq!(
            r.body_str(),
            "HTTP_X_REAL_IP=127.0.0.9\nHTTP_X_FORWARDED_FOR=127.0.0.9\nHTTP_X_FORWARDED_PROTO=http",
            "underscores_in_headers = {underscores}"
        );
    }
}
