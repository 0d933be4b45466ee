//! Builders for gateway config files, using exactly the keys of the product contract
//! (PRODUCT.md, "The config file"). Only keys a test sets are written, so each test's config
//! says what the test depends on. Every config gets `workers = 2`, `[log] access = "stdout"`,
//! an `[admin]` listener and one `[[listener]]` named "http", both on free loopback ports.

use std::fmt::Write as _;
use std::net::SocketAddr;

use crate::free_addr;

/// A TOML string literal (quoted and escaped).
pub fn toml_str(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// A whole gateway config.
#[derive(Clone, Debug)]
pub struct Config {
    pub http_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// `[server]` keys with their TOML values, in order.
    pub server: Vec<(String, String)>,
    /// `[log]` keys with their TOML values.
    pub log: Vec<(String, String)>,
    pub upstreams: Vec<Upstream>,
    pub routes: Vec<Route>,
    /// Raw TOML appended at the end (for keys this builder does not model).
    pub extra: String,
    /// More keys of the `[[listener]]` "http", with their TOML values.
    pub listener: Vec<(String, String)>,
}

impl Default for Config {
    fn default() -> Self {
        Config::new()
    }
}

impl Config {
    pub fn new() -> Config {
        Config {
            http_addr: free_addr(),
            admin_addr: free_addr(),
            // No upgrade socket unless a test asks for one: otherwise every test gateway
            // would contend for the host-wide default `/run/gateway/upgrade.sock`, and a
            // gateway starting in one test would probe (and hold a descriptor for) a socket
            // another test's gateway owns.
            server: vec![
                ("workers".into(), "2".into()),
                ("upgrade_socket".into(), "\"\"".into()),
            ],
            log: vec![("access".into(), toml_str("stdout"))],
            upstreams: Vec::new(),
            routes: Vec::new(),
            extra: String::new(),
            listener: Vec::new(),
        }
    }
    /// Sets a key of the `[[listener]]` "http" to a raw TOML value.
    pub fn listener_raw(mut self, key: &str, value: &str) -> Config {
        self.listener.retain(|(k, _)| k != key);
        self.listener.push((key.to_string(), value.to_string()));
        self
    }
    /// Sets a `[server]` key to a raw TOML value (replacing an earlier one).
    pub fn server_raw(mut self, key: &str, value: &str) -> Config {
        self.server.retain(|(k, _)| k != key);
        self.server.push((key.to_string(), value.to_string()));
        self
    }
    /// Sets a `[server]` key to a string value (durations, sizes).
    pub fn server(self, key: &str, value: &str) -> Config {
        self.server_raw(key, &toml_str(value))
    }
    pub fn workers(self, n: usize) -> Config {
        self.server_raw("workers", &n.to_string())
    }
    /// Sets a `[log]` key to a string value.
    pub fn log(mut self, key: &str, value: &str) -> Config {
        self.log.retain(|(k, _)| k != key);
        self.log.push((key.to_string(), toml_str(value)));
        self
    }
    pub fn upstream(mut self, u: Upstream) -> Config {
        self.upstreams.push(u);
        self
    }
    pub fn route(mut self, r: Route) -> Config {
        self.routes.push(r);
        self
    }
    pub fn extra(mut self, toml: &str) -> Config {
        self.extra.push_str(toml);
        self.extra.push('\n');
        self
    }
    /// The common case: one upstream "app" with these servers and one `/` prefix route to it.
    pub fn proxy_all(servers: &[SocketAddr]) -> Config {
        Config::new()
            .upstream(Upstream::new("app", servers))
            .route(Route::prefix("/", "app"))
    }

    pub fn to_toml(&self) -> String {
        let mut t = String::new();
        t.push_str("[server]\n");
        for (k, v) in &self.server {
            let _ = writeln!(t, "{k} = {v}");
        }
        // The whole suite runs once per I/O driver: `cargo xtask test` sets this to
        // "epoll" for the second pass (and leaves the default, io_uring, for the first).
        if let Ok(io) = std::env::var("GATEWAY_TEST_IO") {
            if !self.server.iter().any(|(k, _)| k == "io") {
                let _ = writeln!(t, "io = {io:?}");
            }
        }
        t.push_str("\n[log]\n");
        for (k, v) in &self.log {
            let _ = writeln!(t, "{k} = {v}");
        }
        let _ = writeln!(
            t,
            "\n[admin]\nlisten = {}",
            toml_str(&self.admin_addr.to_string())
        );
        let _ = writeln!(
            t,
            "\n[[listener]]\nname = \"http\"\nlisten = {}",
            toml_str(&self.http_addr.to_string())
        );
        for (k, v) in &self.listener {
            let _ = writeln!(t, "{k} = {v}");
        }
        for u in &self.upstreams {
            t.push('\n');
            t.push_str(&u.to_toml());
        }
        for r in &self.routes {
            t.push('\n');
            t.push_str(&r.to_toml());
        }
        if !self.extra.is_empty() {
            t.push('\n');
            t.push_str(&self.extra);
        }
        t
    }
}

/// One `[[upstream]]`.
#[derive(Clone, Debug)]
pub struct Upstream {
    pub name: String,
    /// (address, weight); weight `None` writes the plain string form.
    pub servers: Vec<(SocketAddr, Option<u32>)>,
    pub keys: Vec<(String, String)>,
}

impl Upstream {
    pub fn new(name: &str, servers: &[SocketAddr]) -> Upstream {
        Upstream {
            name: name.to_string(),
            servers: servers.iter().map(|a| (*a, None)).collect(),
            keys: Vec::new(),
        }
    }
    /// Adds a server written as `{ addr = "...", weight = w }`.
    pub fn weighted(mut self, addr: SocketAddr, weight: u32) -> Upstream {
        self.servers.push((addr, Some(weight)));
        self
    }
    fn key(mut self, k: &str, raw: String) -> Upstream {
        self.keys.retain(|(kk, _)| kk != k);
        self.keys.push((k.to_string(), raw));
        self
    }
    /// `round_robin` | `least_conn` | `client_ip_hash`.
    pub fn balance(self, b: &str) -> Upstream {
        self.key("balance", toml_str(b))
    }
    pub fn keepalive(self, n: usize) -> Upstream {
        self.key("keepalive", n.to_string())
    }
    pub fn keepalive_linger(self, d: &str) -> Upstream {
        self.key("keepalive_linger", toml_str(d))
    }
    pub fn max_fails(self, n: usize) -> Upstream {
        self.key("max_fails", n.to_string())
    }
    pub fn fail_timeout(self, d: &str) -> Upstream {
        self.key("fail_timeout", toml_str(d))
    }
    pub fn to_toml(&self) -> String {
        let servers: Vec<String> = self
            .servers
            .iter()
            .map(|(a, w)| match w {
                None => toml_str(&a.to_string()),
                Some(w) => format!("{{ addr = {}, weight = {w} }}", toml_str(&a.to_string())),
            })
            .collect();
        let mut t = format!(
            "[[upstream]]\nname = {}\nservers = [{}]\n",
            toml_str(&self.name),
            servers.join(", ")
        );
        for (k, v) in &self.keys {
            let _ = writeln!(t, "{k} = {v}");
        }
        t
    }
}

/// One `[[route]]`.
#[derive(Clone, Debug)]
pub struct Route {
    /// ("path_prefix" | "path", value).
    pub matcher: (String, String),
    pub keys: Vec<(String, String)>,
}

impl Route {
    /// `path_prefix = p`, `upstream = u`.
    pub fn prefix(p: &str, upstream: &str) -> Route {
        Route {
            matcher: ("path_prefix".into(), p.into()),
            keys: vec![("upstream".into(), toml_str(upstream))],
        }
    }
    /// `path = p`, `upstream = u`.
    pub fn exact(p: &str, upstream: &str) -> Route {
        Route {
            matcher: ("path".into(), p.into()),
            keys: vec![("upstream".into(), toml_str(upstream))],
        }
    }
    /// `path = p`, `respond = { status, body }`: a direct response.
    pub fn respond_exact(p: &str, status: u16, body: &str) -> Route {
        Route {
            matcher: ("path".into(), p.into()),
            keys: vec![(
                "respond".into(),
                format!("{{ status = {status}, body = {} }}", toml_str(body)),
            )],
        }
    }
    /// `path_prefix = p`, `respond = { status, body }`.
    pub fn respond_prefix(p: &str, status: u16, body: &str) -> Route {
        let mut r = Route::respond_exact(p, status, body);
        r.matcher.0 = "path_prefix".into();
        r
    }
    fn key(mut self, k: &str, raw: String) -> Route {
        self.keys.retain(|(kk, _)| kk != k);
        self.keys.push((k.to_string(), raw));
        self
    }
    pub fn host(self, h: &str) -> Route {
        self.key("host", toml_str(h))
    }
    pub fn connect_timeout(self, d: &str) -> Route {
        self.key("connect_timeout", toml_str(d))
    }
    pub fn send_timeout(self, d: &str) -> Route {
        self.key("send_timeout", toml_str(d))
    }
    pub fn read_timeout(self, d: &str) -> Route {
        self.key("read_timeout", toml_str(d))
    }
    pub fn max_body_size(self, s: &str) -> Route {
        self.key("max_body_size", toml_str(s))
    }
    pub fn websocket(self, on: bool) -> Route {
        self.key("websocket", on.to_string())
    }
    pub fn to_toml(&self) -> String {
        let mut t = format!(
            "[[route]]\n{} = {}\n",
            self.matcher.0,
            toml_str(&self.matcher.1)
        );
        for (k, v) in &self.keys {
            let _ = writeln!(t, "{k} = {v}");
        }
        t
    }
}
