//! The adversarial rig (issue 10 "How it is proven", issue 17): the real gateway in front of
//! a real nginx that serves a secret file, with a gateway `respond = { status = 403 }` route
//! guarding `/admin` and a host route guarding `admin.example.com`.
//!
//! Every case sends hostile bytes through [`Rig::exchange`], which records every byte the
//! client got back, and ends with [`Rig::assert_invariants`], which checks the three rules
//! every case shares:
//! 1. the secret never appears in any byte returned to a client;
//! 2. nginx's access log never shows a request the gateway did not log as proxied to it;
//! 3. each watched upstream saw exactly as many requests as the gateway logged for it.
//!
//! nginx logs `$request_uri` (the raw target it received); the gateway logs the target the
//! client sent. The gateway may forward the original target or its normalised form
//! (issue 10: "document which"), so targets are compared after the same normalisation
//! ([`normalise_target`]).
//!
//! [`Wsgi`] is a Python `wsgiref` application that reports the environ it sees (client
//! address, forwarding headers, scheme): the class of server that maps `-` and `_` to the
//! same variable (issue 17 item 4).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::nginx::{Nginx, NginxParams};
use crate::wire::{self, excerpt};
use crate::{free_addr, Config, Gateway, Origin, Reply, Route, Upstream};

/// The content of `/admin/secret.txt` on nginx. Must never reach a client.
pub const SECRET: &str = "TOP-SECRET-5c1f0e9a-adversarial-rig";
/// A harmless file nginx serves, for follow-up requests.
pub const PUBLIC_PATH: &str = "/public/index.html";
pub const PUBLIC_BODY: &str = "public page\n";
/// The host the gateway guards with a host route.
pub const ADMIN_HOST: &str = "admin.example.com";

/// The part of both nginx configs that is the same: process, logs, temp paths.
fn nginx_conf(log_format: &str, http_body: &str) -> String {
    format!(
        r#"
worker_processes 1;
error_log @PREFIX@/error.log info;
pid @PREFIX@/nginx.pid;
events {{ worker_connections 1024; }}
http {{
    log_format adv escape=json '{log_format}';
    access_log @PREFIX@/access.log adv;
    client_body_temp_path @PREFIX@/body;
    proxy_temp_path @PREFIX@/proxy;
    fastcgi_temp_path @PREFIX@/fastcgi;
    uwsgi_temp_path @PREFIX@/uwsgi;
    scgi_temp_path @PREFIX@/scgi;
{http_body}
}}
"#
    )
}

/// nginx behind the front: serves a document root, logs every request it parsed as JSON
/// with the raw target.
fn backend_conf(www: &std::path::Path) -> String {
    nginx_conf(
        r#"{"method":"$request_method","uri":"$request_uri","status":$status,"request":"$request"}"#,
        &format!(
            "    keepalive_timeout 60s;\n    keepalive_requests 100000;\n    server {{\n        listen @LISTEN@;\n        root {};\n        location / {{ }}\n    }}",
            www.display()
        ),
    )
}

/// The reference front: nginx configured as the gateway is (403 for `/admin` and for the
/// admin host, `/echo/` and `/` proxied with the forwarding headers of the reference
/// config), logging what it proxied in the gateway's JSON keys.
fn front_conf() -> String {
    nginx_conf(
        r#"{"method":"$request_method","uri":"$request_uri","status":$status,"upstream":"$upstream_addr","request":"$request"}"#,
        r#"    upstream backend { server @API_UPSTREAM@; keepalive 32; }
    upstream echo { server @WS_UPSTREAM@; keepalive 32; }
    server {
        listen @LISTEN@ default_server;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header Host $host;
        proxy_set_header X-Real-IP $remote_addr;
        proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        proxy_set_header X-Forwarded-Proto $scheme;
        location /admin { return 403 "denied\n"; }
        location /echo/ { proxy_pass http://echo; }
        location / { proxy_pass http://backend; }
    }
    server {
        listen @LISTEN@;
        server_name admin.example.com;
        return 403 "denied host\n";
    }"#,
    )
}

/// One access-log record: method and target.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Logged {
    pub method: String,
    pub uri: String,
    /// The request line as logged (nginx's `$request`), for messages only.
    pub line: String,
}

/// What the client talks to: the gateway under test, or nginx as the reference front
/// (issue 17: "with nginx's behaviour in the same case as the reference").
pub enum Front {
    Gateway(Gateway),
    Nginx(Nginx),
}

/// The rig; see the module doc.
pub struct Rig {
    pub front: Front,
    pub nginx: Nginx,
    /// An origin that records (and so reflects) every header it gets, behind `/echo/`.
    pub echo: Origin,
    _www: TempDir,
    /// Every byte returned to a client, per case.
    received: Mutex<Vec<(String, Vec<u8>)>>,
}

impl Rig {
    /// The rig with its standard routes.
    pub fn start() -> Rig {
        Rig::start_with(|c| c)
    }

    /// The rig, with extra upstreams/routes/keys added by `extend` (e.g. a hostile origin).
    pub fn start_with(extend: impl Fn(Config) -> Config) -> Rig {
        Rig::start_edited(extend, |toml| toml)
    }

    /// [`Rig::start_with`], then `edit` rewrites the config text (for keys the builder does
    /// not model, such as a listener's `trusted_proxies`).
    pub fn start_edited(extend: impl Fn(Config) -> Config, edit: impl Fn(String) -> String) -> Rig {
        let (www, nginx, echo) = backends();
        let config = || {
            Config::new()
                .log("format", "json")
                .upstream(Upstream::new("nginx", &[nginx.addr()]))
                .upstream(Upstream::new("echo", &[echo.addr()]))
                .route(Route::respond_prefix("/admin", 403, "denied\n"))
                .route(Route::respond_prefix("/", 403, "denied host\n").host(ADMIN_HOST))
                .route(Route::prefix("/echo/", "echo"))
                .route(Route::prefix("/", "nginx"))
        };
        // Fresh ports on a lost race for one (as `Gateway::with` does).
        let mut attempt = 0;
        let gw = loop {
            attempt += 1;
            match Gateway::try_start(&edit(extend(config()).to_toml())) {
                Ok(gw) => break gw,
                Err(e) if attempt < 4 && e.contains("Address already in use") => {}
                Err(e) => panic!("{e}"),
            }
        };
        Rig::ready(Front::Gateway(gw), nginx, echo, www)
    }

    /// The same rig with nginx as the front instead of the gateway: the reference the
    /// suite's expectations are measured against.
    pub fn start_nginx_front() -> Rig {
        let (www, nginx, echo) = backends();
        let front = Nginx::start(
            &front_conf(),
            &NginxParams {
                workers: 1,
                listen: free_addr(),
                api_upstream: nginx.addr(),
                ws_upstream: echo.addr(),
            },
        );
        Rig::ready(Front::Nginx(front), nginx, echo, www)
    }

    /// Checks that the rig works before it is used to prove anything.
    fn ready(front: Front, nginx: Nginx, echo: Origin, www: TempDir) -> Rig {
        let rig = Rig {
            front,
            nginx,
            echo,
            _www: www,
            received: Mutex::new(Vec::new()),
        };
        // The rig itself must work before it can prove anything.
        let ok = rig.exchange("rig self-check", PUBLIC_GET.as_bytes());
        assert!(
            first_status(&ok) == Some(200) && contains(&ok, PUBLIC_BODY.as_bytes()),
            "rig self-check: GET {PUBLIC_PATH} through the gateway did not return the public \
             page: {:?}",
            excerpt(&ok)
        );
        let denied = rig.exchange(
            "rig self-check /admin",
            b"GET /admin/secret.txt HTTP/1.1\r\nHost: gateway.test\r\nConnection: close\r\n\r\n",
        );
        assert_eq!(
            first_status(&denied),
            Some(403),
            "rig self-check: /admin/secret.txt must be 403: {:?}",
            excerpt(&denied)
        );
        rig
    }

    /// The gateway under test (panics for the nginx reference front).
    pub fn gw(&self) -> &Gateway {
        match &self.front {
            Front::Gateway(gw) => gw,
            Front::Nginx(_) => panic!("this case needs the gateway as the front"),
        }
    }

    /// Where clients connect.
    pub fn front_addr(&self) -> SocketAddr {
        match &self.front {
            Front::Gateway(gw) => gw.http_addr(),
            Front::Nginx(n) => n.addr(),
        }
    }

    /// The front's access log (JSON lines with `method`, `uri`, `upstream`).
    fn front_log(&self) -> String {
        match &self.front {
            Front::Gateway(gw) => gw.access_log(),
            Front::Nginx(n) => {
                std::fs::read_to_string(n.prefix().join("access.log")).unwrap_or_default()
            }
        }
    }

    /// Sends `bytes` on a new connection and returns every byte that came back until the
    /// gateway closed or stayed quiet for a moment. When the connection is still open, a
    /// follow-up `GET /public/index.html` is sent on it, so a smuggled response queued on
    /// the upstream connection (response-queue poisoning) shows up in what is returned.
    pub fn exchange(&self, case: &str, bytes: &[u8]) -> Vec<u8> {
        self.exchange_from(None, case, bytes)
    }

    /// [`Rig::exchange`] from a chosen loopback source address (a distinct client IP).
    pub fn exchange_from(&self, source: Option<IpAddr>, case: &str, bytes: &[u8]) -> Vec<u8> {
        let mut s = match source {
            Some(ip) => crate::client::connect_from(ip, self.front_addr()),
            None => crate::client::connect(self.front_addr()),
        };
        // A rejecting gateway may close before everything is written; what it answered
        // still counts.
        let _ = s.write_all(bytes);
        let (mut got, open) = read_quiet(&mut s, Duration::from_millis(400));
        if open && s.write_all(FOLLOW_UP.as_bytes()).is_ok() {
            got.extend_from_slice(&read_quiet(&mut s, Duration::from_millis(400)).0);
        }
        self.received
            .lock()
            .unwrap()
            .push((case.to_string(), got.clone()));
        got
    }

    /// Sends `bytes` and returns the status of the first response (`None`: no response).
    pub fn status_of(&self, case: &str, bytes: &[u8]) -> Option<u16> {
        first_status(&self.exchange(case, bytes))
    }

    /// The requests the echo origin received for exactly this path.
    pub fn echo_requests(&self, path: &str) -> Vec<crate::RecordedRequest> {
        self.echo
            .requests()
            .into_iter()
            .filter(|r| r.path() == path)
            .collect()
    }

    /// What the gateway logged as proxied to `upstream`.
    pub fn gateway_logged(&self, upstream: SocketAddr) -> Vec<Logged> {
        let want = upstream.to_string();
        json_lines(&self.front_log())
            .into_iter()
            .filter(|v| v["upstream"].as_str() == Some(want.as_str()))
            .map(|v| Logged {
                method: v["method"].as_str().unwrap_or_default().to_string(),
                uri: v["uri"].as_str().unwrap_or_default().to_string(),
                line: String::new(),
            })
            .collect()
    }

    /// What nginx logged (every request it parsed, whatever it answered).
    pub fn nginx_logged(&self) -> Vec<Logged> {
        let text =
            std::fs::read_to_string(self.nginx.prefix().join("access.log")).unwrap_or_default();
        json_lines(&text)
            .into_iter()
            .map(|v| {
                let line = v["request"].as_str().unwrap_or_default().to_string();
                // nginx leaves `$request_uri` empty for a request it refused while parsing
                // the target (400 for `..` above the root): take the target from the line.
                let uri = match v["uri"].as_str().unwrap_or_default() {
                    "" => line.split(' ').nth(1).unwrap_or_default().to_string(),
                    u => u.to_string(),
                };
                Logged {
                    method: v["method"].as_str().unwrap_or_default().to_string(),
                    uri,
                    line,
                }
            })
            .collect()
    }

    /// The three shared invariants (module doc). Call at the end of every case.
    pub fn assert_invariants(&self) {
        self.finish(Vec::new());
    }

    /// Panics with `case_failures` (a test's own per-variant findings) and every broken
    /// shared invariant, all in one message, unless there are none.
    pub fn finish(&self, case_failures: Vec<String>) {
        let mut failures = case_failures;
        failures.extend(self.invariant_failures());
        assert!(
            failures.is_empty(),
            "{} finding(s):\n{}\n--- nginx access log ---\n{}",
            failures.len(),
            failures.join("\n"),
            std::fs::read_to_string(self.nginx.prefix().join("access.log")).unwrap_or_default()
        );
    }

    /// The broken shared invariants, as messages.
    pub fn invariant_failures(&self) -> Vec<String> {
        let mut failures = Vec::new();
        for (case, bytes) in self.received.lock().unwrap().iter() {
            if contains(bytes, SECRET.as_bytes()) {
                failures.push(format!(
                    "[{case}] THE SECRET reached the client: {:?}",
                    excerpt(bytes)
                ));
            }
        }
        // Logs are written after responses: wait (bounded) for both sides to agree on
        // their counts, then compare what they hold.
        let settle = |upstream_count: &dyn Fn() -> usize, addr: SocketAddr| {
            let deadline = Instant::now() + Duration::from_secs(3);
            while upstream_count() != self.gateway_logged(addr).len() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
        };
        settle(&|| self.nginx_logged().len(), self.nginx.addr());
        let (gw_nginx, nginx) = (self.gateway_logged(self.nginx.addr()), self.nginx_logged());
        for missing in unmatched(&nginx, &gw_nginx) {
            failures.push(format!(
                "nginx served {} {} (request line {:?}) but the gateway never logged proxying \
                 it: smuggled past the gateway",
                missing.method, missing.uri, missing.line
            ));
        }
        if nginx.len() != gw_nginx.len() {
            failures.push(format!(
                "nginx parsed {} requests, the gateway logged {} proxied to it\n  nginx: \
                 {nginx:?}\n  gateway: {gw_nginx:?}",
                nginx.len(),
                gw_nginx.len()
            ));
        }
        settle(&|| self.echo.request_count(), self.echo.addr());
        let echo: Vec<Logged> = self
            .echo
            .requests()
            .iter()
            .map(|r| Logged {
                method: r.method.clone(),
                uri: r.target.clone(),
                line: String::from_utf8_lossy(&r.raw_head)
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .to_string(),
            })
            .collect();
        let gw_echo = self.gateway_logged(self.echo.addr());
        for missing in unmatched(&echo, &gw_echo) {
            failures.push(format!(
                "the echo origin got {} {} but the gateway never logged proxying it: smuggled \
                 past the gateway",
                missing.method, missing.uri
            ));
        }
        if echo.len() != gw_echo.len() {
            failures.push(format!(
                "the echo origin got {} requests, the gateway logged {} proxied to it",
                echo.len(),
                gw_echo.len()
            ));
        }
        for e in self.echo.errors() {
            failures.push(format!(
                "the gateway sent the echo origin malformed HTTP: {e}"
            ));
        }
        failures
    }
}

/// The backends every rig has: nginx serving the document root, and the echo origin.
fn backends() -> (TempDir, Nginx, Origin) {
    let www = tempfile::Builder::new()
        .prefix("adv-www-")
        .tempdir()
        .unwrap();
    write_www(www.path());
    let nginx = Nginx::start(
        &backend_conf(www.path()),
        &NginxParams {
            workers: 1,
            listen: free_addr(),
            api_upstream: free_addr(),
            ws_upstream: free_addr(),
        },
    );
    let echo =
        Origin::start(|r| Reply::ok(format!("echo {} {} {}", r.method, r.target, r.body.len())));
    (www, nginx, echo)
}

const PUBLIC_GET: &str =
    "GET /public/index.html HTTP/1.1\r\nHost: gateway.test\r\nConnection: close\r\n\r\n";
const FOLLOW_UP: &str =
    "GET /public/index.html?follow-up HTTP/1.1\r\nHost: gateway.test\r\nConnection: close\r\n\r\n";

fn write_www(root: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    // nginx workers run as `nobody`: the tree must be world-readable.
    for dir in ["", "admin", "public"] {
        let d = root.join(dir);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    for (path, body) in [
        ("admin/secret.txt", SECRET),
        ("admin/index.html", SECRET),
        ("public/index.html", PUBLIC_BODY),
        ("index.html", "root\n"),
    ] {
        let p = root.join(path);
        std::fs::write(&p, body).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
}

/// Reads until EOF, an error, or `quiet` without a byte once bytes have started to come
/// (the first byte may take up to 3 s on a loaded machine; 5 s in all). Returns the bytes
/// and whether the connection still looked open.
fn read_quiet(s: &mut TcpStream, quiet: Duration) -> (Vec<u8>, bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut got = Vec::new();
    let mut buf = [0u8; 16384];
    while Instant::now() < deadline {
        let wait = if got.is_empty() {
            Duration::from_secs(3)
        } else {
            quiet
        };
        let _ = s.set_read_timeout(Some(wait));
        match s.read(&mut buf) {
            Ok(0) => return (got, false),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if wire::is_timeout(&e) => return (got, true),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return (got, false),
        }
    }
    (got, true)
}

fn json_lines(text: &str) -> Vec<serde_json::Value> {
    text.lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Entries of `seen` that have no counterpart (same method, same normalised target) in
/// `logged`, each counterpart used once.
pub fn unmatched(seen: &[Logged], logged: &[Logged]) -> Vec<Logged> {
    let mut pool: BTreeMap<(String, String), usize> = BTreeMap::new();
    for l in logged {
        *pool
            .entry((l.method.clone(), normalise_target(&l.uri)))
            .or_default() += 1;
    }
    let mut out = Vec::new();
    for s in seen {
        let key = (s.method.clone(), normalise_target(&s.uri));
        match pool.get_mut(&key) {
            Some(n) if *n > 0 => *n -= 1,
            _ => out.push(s.clone()),
        }
    }
    out
}

pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    wire::find(hay, needle).is_some()
}

/// A target normalised as nginx does for matching (RFC 3986 §6.2.2): percent-encoded
/// unreserved characters decoded, dot segments removed (§5.2.4), slashes merged. The
/// query is kept as is.
pub fn normalise_target(target: &str) -> String {
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    };
    let bytes = path.as_bytes();
    let mut decoded = String::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Ok(b) = u8::from_str_radix(&path[i + 1..i + 3], 16) {
                if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                    decoded.push(b as char);
                    i += 3;
                    continue;
                }
            }
        }
        decoded.push(bytes[i] as char);
        i += 1;
    }
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = decoded.split('/').filter(|s| !s.is_empty()).collect();
    for seg in &segments {
        match *seg {
            "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    let mut norm = format!("/{}", out.join("/"));
    let trailing = decoded.ends_with('/') || decoded.ends_with("/.") || decoded.ends_with("/..");
    if trailing && !norm.ends_with('/') {
        norm.push('/');
    }
    match query {
        Some(q) => format!("{norm}?{q}"),
        None => norm,
    }
}

/// The status of the first final response in `bytes` (1xx skipped).
pub fn first_status(bytes: &[u8]) -> Option<u16> {
    statuses(bytes)
        .into_iter()
        .find(|s| !(100..200).contains(s) || *s == 101)
}

/// The statuses of the responses in `bytes`, in order (interim ones included), as far as
/// they can be delimited (Content-Length or chunked; anything else ends the scan).
pub fn statuses(bytes: &[u8]) -> Vec<u16> {
    split_responses(bytes).into_iter().map(|r| r.0).collect()
}

/// Splits `bytes` into (status, head, body) responses, as far as they can be delimited.
pub fn split_responses(mut bytes: &[u8]) -> Vec<(u16, wire::Head, Vec<u8>)> {
    let mut out = Vec::new();
    while let Some(end) = wire::find(bytes, b"\r\n\r\n") {
        let Ok(head) = wire::parse_head(&bytes[..end + 4]) else {
            break;
        };
        let Ok((_, status, _)) = crate::client::parse_status_line(&head.start_line) else {
            break;
        };
        bytes = &bytes[end + 4..];
        let te = wire::header_tokens(&head.headers, "transfer-encoding");
        let cl: Option<usize> =
            wire::header(&head.headers, "content-length").and_then(|v| v.parse().ok());
        let bodyless = (100..200).contains(&status) || status == 204 || status == 304;
        let body: Vec<u8> = if bodyless {
            Vec::new()
        } else if te == ["chunked"] {
            match dechunk(bytes) {
                Some((body, used)) => {
                    bytes = &bytes[used..];
                    body
                }
                None => {
                    let b = bytes.to_vec();
                    bytes = &[];
                    b
                }
            }
        } else if let Some(n) = cl {
            let n = n.min(bytes.len());
            let b = bytes[..n].to_vec();
            bytes = &bytes[n..];
            b
        } else {
            let b = bytes.to_vec();
            bytes = &[];
            b
        };
        out.push((status, head, body));
    }
    out
}

/// Decodes a chunked body at the start of `bytes`: (body, bytes used).
fn dechunk(bytes: &[u8]) -> Option<(Vec<u8>, usize)> {
    let mut at = 0;
    let mut body = Vec::new();
    loop {
        let eol = wire::find(&bytes[at..], b"\r\n")?;
        let line = std::str::from_utf8(&bytes[at..at + eol]).ok()?;
        let size = usize::from_str_radix(line.split(';').next()?.trim(), 16).ok()?;
        at += eol + 2;
        if size == 0 {
            loop {
                let eol = wire::find(&bytes[at..], b"\r\n")?;
                at += eol + 2;
                if eol == 0 {
                    return Some((body, at));
                }
            }
        }
        body.extend_from_slice(bytes.get(at..at + size)?);
        at += size + 2;
    }
}

/// The client address for cases that compare forwarding headers: a distinct loopback IP.
pub const CLIENT_IP: &str = "127.0.0.9";

/// A Python `wsgiref` application that answers every request with a JSON object of the
/// environ keys a WSGI app trusts for the client's identity (`REMOTE_ADDR`,
/// `HTTP_X_REAL_IP`, `HTTP_X_FORWARDED_FOR`, `HTTP_X_FORWARDED_PROTO`, `wsgi.url_scheme`,
/// and every other `HTTP_*`). wsgiref maps `X_Real_IP` and `X-Real-IP` both to
/// `HTTP_X_REAL_IP` and joins duplicates with `,`: exactly the alias class of issue 17.4.
pub struct Wsgi {
    child: Child,
    addr: SocketAddr,
}

const WSGI_APP: &str = r#"
import json, sys
from wsgiref.simple_server import make_server, WSGIRequestHandler

class Quiet(WSGIRequestHandler):
    def log_message(self, *args):
        pass

def app(environ, start_response):
    seen = {k: v for k, v in environ.items() if k.startswith("HTTP_")}
    for k in ("REMOTE_ADDR", "wsgi.url_scheme"):
        seen[k] = environ.get(k)
    body = json.dumps(seen).encode()
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(body)))])
    return [body]

srv = make_server("127.0.0.1", 0, app, handler_class=Quiet)
print(srv.server_port, flush=True)
srv.serve_forever()
"#;

impl Wsgi {
    /// Starts the app (`python3`) and waits until it listens.
    pub fn start() -> Wsgi {
        let mut child = Command::new("python3")
            .arg("-c")
            .arg(WSGI_APP)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python3 is required for the WSGI alias tests");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .expect("read the wsgiref port");
        let port: u16 = line
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("wsgiref app printed {line:?}, not its port"));
        // The port is printed after bind and listen: the app accepts from here on.
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        Wsgi { child, addr }
    }
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Wsgi {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises_like_nginx() {
        for (raw, want) in [
            ("/public/../admin/secret.txt", "/admin/secret.txt"),
            ("/public/%2e%2e/admin/x", "/admin/x"),
            ("//admin//x", "/admin/x"),
            ("/%61dmin/x?q=/../", "/admin/x?q=/../"),
            ("/./admin/", "/admin/"),
            ("/%2fadmin", "/%2fadmin"),
            ("/", "/"),
        ] {
            assert_eq!(normalise_target(raw), want, "{raw}");
        }
    }

    #[test]
    fn unmatched_counts_each_log_line_once() {
        let l = |m: &str, u: &str| Logged {
            method: m.into(),
            uri: u.into(),
            line: String::new(),
        };
        let seen = [l("GET", "/a"), l("GET", "/a"), l("GET", "/admin/x")];
        let logged = [l("GET", "/a"), l("GET", "/public/../admin/x")];
        assert_eq!(unmatched(&seen, &logged), vec![l("GET", "/a")]);
    }

    #[test]
    fn splits_pipelined_responses() {
        let bytes = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 204 No Content\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n0\r\n\r\nHTTP/1.1 403 Forbidden\r\n\r\nrest";
        assert_eq!(statuses(bytes), vec![100, 200, 204, 200, 403]);
        assert_eq!(first_status(bytes), Some(200));
    }
}
