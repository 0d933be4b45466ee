//! The config file: its TOML shape, defaults, and validation.
//!
//! Loading is two passes. Serde reads the file into [`Config`] (unknown keys, wrong types
//! and malformed units are reported by the TOML parser with their line). Then
//! [`Config::validate`] checks what types cannot (names that refer to each other, ranges,
//! duplicates) and collects every problem, each located by file, line and key, so
//! `gateway check` can print them all at once like `nginx -t`.

pub mod admin;
pub mod units;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use toml::Spanned;
pub use units::Rate;
pub(crate) use units::{Dur, Size};

/// One problem in a config file.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigError {
    pub file: PathBuf,
    pub line: usize,
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(
            f,
            "{}:{}: {}: {}",
            self.file.display(),
            self.line,
            self.key,
            self.message
        )
    }
}

/// Every problem found in one config file.
#[derive(Debug, Clone)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

#[derive(Debug, Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default, rename = "listener")]
    pub listeners: Vec<Spanned<ListenerConfig>>,
    #[serde(default, rename = "upstream")]
    pub upstreams: Vec<Spanned<UpstreamConfig>>,
    #[serde(default, rename = "route")]
    pub routes: Vec<Spanned<RouteConfig>>,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub xdp: XdpConfig,
    #[serde(default)]
    pub http2: Http2Config,
    #[serde(default)]
    pub resolver: ResolverConfig,
}

/// `[resolver]`: where upstream names are resolved (`upstream/dns.rs`).
#[derive(Debug, Deserialize, Serialize, Clone, Default, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ResolverConfig {
    /// `"IP:PORT"` of the name servers to ask; empty: those of `/etc/resolv.conf`, with
    /// its search domains and `ndots` (so a bare `aragora` resolves inside a pod).
    pub nameservers: Vec<String>,
}

/// The `[http2]` table: limits of HTTP/2 client connections (issue 12).
#[derive(Debug, Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields, default)]
pub struct Http2Config {
    /// Streams a client may have open at once on one connection (SETTINGS_MAX_CONCURRENT_STREAMS).
    pub max_concurrent_streams: u32,
    /// Streams accepted on one connection before it is closed with GOAWAY.
    pub max_requests_per_connection: u64,
    /// A connection with no open stream for this long is closed with GOAWAY; unset:
    /// `server.keepalive_timeout`.
    pub idle_timeout: Option<Dur>,
    /// SETTINGS_MAX_HEADER_LIST_SIZE; unset: `server.max_header_bytes`.
    pub max_header_list_size: Option<Size>,
    /// SETTINGS and PING frames (not ACKs) a client may send per second before the
    /// connection is closed: h2 answers each, so a flood costs CPU without bound.
    pub max_control_frames_per_second: u32,
    /// WebSocket over HTTP/2 (RFC 8441): advertise SETTINGS_ENABLE_CONNECT_PROTOCOL and
    /// carry extended CONNECT streams to WebSocket routes.
    pub websocket: bool,
}

impl Default for Http2Config {
    fn default() -> Self {
        Http2Config {
            max_concurrent_streams: 100,
            max_requests_per_connection: 1000,
            idle_timeout: None,
            max_header_list_size: None,
            max_control_frames_per_second: 100,
            websocket: true,
        }
    }
}

#[derive(Debug, Deserialize, Serialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum IoDriver {
    Auto,
    Uring,
    Epoll,
}

#[derive(Debug, Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    pub workers: usize,
    pub io: IoDriver,
    /// io_uring operations a busy worker queues before it submits them itself
    /// (`io::uring`'s early submission); 0: only when the worker goes idle.
    pub io_uring_submit_batch: u32,
    /// Unset: computed from the effective RLIMIT_NOFILE (`budget::default_max_connections`).
    pub max_connections: Option<usize>,
    pub nofile: u64,
    pub graceful_timeout: Dur,
    pub shutdown_delay: Dur,
    pub keepalive_timeout: Dur,
    /// A plaintext HTTP/1 keep-alive connection idle this long leaves its task for the
    /// worker's parking lot (`dataplane::parking`); 0: never.
    pub keepalive_park_after: Dur,
    pub header_timeout: Dur,
    pub max_header_bytes: Size,
    /// Forward request header names containing `_` (nginx `underscores_in_headers`).
    pub underscores_in_headers: bool,
    /// Forwarding headers (`Forwarded`, `X-Forwarded-Host`...) kept from untrusted peers.
    pub forward_client_headers: Vec<String>,
    /// Request bodies up to this size are read whole before an upstream is chosen; larger
    /// ones have this much read first, then stream (nginx `client_body_buffer_size`).
    pub request_buffering: Size,
    /// Longest pause between two reads of a request body, and the grace period before
    /// `client_min_rate` applies (nginx `client_body_timeout`).
    pub client_body_timeout: Dur,
    /// Average bytes per second a request body, and a response being sent to the client,
    /// must keep after their grace period; 0 turns the check off.
    pub client_min_rate: Size,
    /// HTTP/1 bodies between plaintext sockets move with `splice(2)` once at least this
    /// many of their bytes are left to move (a chunk's data, for chunked bodies); 0: never.
    pub splice_bodies_min: Size,
    /// The unix socket a running gateway hands its listeners over on, to a new binary
    /// started with `gateway run --upgrade` (`control/upgrade.rs`). Empty: no upgrades.
    pub upgrade_socket: PathBuf,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            workers: 0,
            io: IoDriver::Auto,
            io_uring_submit_batch: 32,
            max_connections: None,
            nofile: 65535,
            graceful_timeout: secs(30),
            shutdown_delay: secs(0),
            keepalive_timeout: secs(5),
            keepalive_park_after: Dur(std::time::Duration::from_millis(100)),
            header_timeout: secs(10),
            max_header_bytes: Size(16 * 1024),
            underscores_in_headers: false,
            forward_client_headers: Vec::new(),
            request_buffering: Size(64 * 1024),
            client_body_timeout: secs(60),
            client_min_rate: Size(1024),
            splice_bodies_min: Size(64 * 1024),
            upgrade_socket: PathBuf::from("/run/gateway/upgrade.sock"),
        }
    }
}

#[derive(Debug, Deserialize, Serialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum AccessFormat {
    Combined,
    Json,
}

#[derive(Debug, Deserialize, Serialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum StderrFormat {
    Text,
    Json,
}

#[derive(Debug, Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `stdout`, `off`, or a file path.
    pub access: String,
    pub format: AccessFormat,
    /// Diagnostic log level (tracing filter syntax), overridden by `RUST_LOG`.
    pub level: String,
    /// Diagnostic log format on stderr.
    pub stderr_format: StderrFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            access: "stdout".into(),
            format: AccessFormat::Combined,
            level: "info".into(),
            stderr_format: StderrFormat::Text,
        }
    }
}

#[derive(Debug, Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    pub listen: String,
    #[serde(serialize_with = "redact")]
    pub token: Option<String>,
    /// A file holding the token (a mounted Kubernetes Secret); read at load and on every
    /// reload into `token`. Relative paths are relative to the config file.
    pub token_file: Option<PathBuf>,
    /// Admin connections open at once; more are closed at accept.
    pub max_connections: usize,
    /// Time for a whole admin request to arrive and be answered.
    pub(crate) request_timeout: Dur,
}

fn redact<S: serde::Serializer>(v: &Option<String>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(_) => s.serialize_str("<redacted>"),
        None => s.serialize_none(),
    }
}

/// `url` with the password of its userinfo (`scheme://user:PASSWORD@host`) replaced by
/// `<redacted>`, the user kept: the one form of a URL that `/config`, the logs and
/// `gateway check` show. The authority ends at the first `/`, `?` or `#` after `://`
/// (RFC 3986 section 3.2) and the userinfo at its last `@`, as the `url` crate that the
/// Redis client parses with reads it, so what it takes for the password is what is hidden.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_string();
    };
    let authority_start = scheme_end + 3;
    let authority_end = url[authority_start..]
        .find(['/', '?', '#'])
        .map_or(url.len(), |i| authority_start + i);
    let authority = &url[authority_start..authority_end];
    let Some(at) = authority.rfind('@') else {
        return url.to_string();
    };
    let userinfo = &authority[..at];
    let user = userinfo.split_once(':').map_or(userinfo, |(user, _)| user);
    if user.len() == userinfo.len() {
        return url.to_string();
    }
    format!(
        "{}{user}:<redacted>{}",
        &url[..authority_start],
        &url[authority_start + at..]
    )
}

fn serialize_redacted_url<S: serde::Serializer>(v: &str, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&redact_url(v))
}

/// The connection parameters of a `[limits.global] redis` URL, by the rules both
/// `gateway check`/load and the sync task's connect apply (one function, so a URL the
/// check passes is one the runtime takes): `redis://` or `rediss://` only (no Unix
/// socket, no Cluster), parsed by the Redis client's own parser, and neither a query
/// (the client reads `?protocol=` and ignores the rest: a typo would pass silently) nor a
/// fragment (`#insecure` turns off certificate checks, which this build refuses at
/// connect: a `rediss://` URL is always verified against the system roots).
pub fn redis_connection_info(url: &str) -> Result<redis::ConnectionInfo, String> {
    if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
        return Err("must be a redis://HOST:PORT/DB or rediss://HOST:PORT/DB URL".into());
    }
    let parsed = redis::parse_redis_url(url).ok_or("not a URL")?;
    if parsed.query().is_some() {
        return Err(
            "a query (`?...`) is not supported: redis://[USER:PASSWORD@]HOST:PORT/DB".into(),
        );
    }
    if parsed.fragment().is_some() {
        return Err(
            "a fragment (`#...`, e.g. `#insecure`) is not supported: rediss:// always verifies \
             the server's certificate (percent-encode a `#` in the password as %23)"
                .into(),
        );
    }
    redis::IntoConnectionInfo::into_connection_info(url)
        .map_err(|e| format!("not a Redis URL: {e}"))
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: "127.0.0.1:9901".into(),
            token: None,
            token_file: None,
            max_connections: 64,
            request_timeout: secs(5),
        }
    }
}

#[derive(Debug, Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    pub name: String,
    pub listen: String,
    #[serde(default)]
    pub proxy_protocol: bool,
    /// Peers allowed to send a PROXY header (nginx `set_real_ip_from` for the PROXY
    /// protocol); empty: any peer that can reach the port.
    #[serde(default)]
    pub proxy_protocol_from: Vec<IpNet>,
    #[serde(default)]
    pub trusted_proxies: Vec<IpNet>,
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// ALPN protocols a TLS listener offers, in order of preference (`h2`, `http/1.1`);
    /// unset: both, `h2` first. Only on TLS listeners.
    #[serde(default)]
    pub alpn: Option<Vec<String>>,
    /// HTTP/2 with prior knowledge on a plaintext listener (RFC 9113 §3.3). Only on
    /// plaintext listeners.
    #[serde(default)]
    pub h2c: bool,
}

#[derive(Debug, Deserialize, Serialize, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub certificates: Vec<CertificateConfig>,
}

#[derive(Debug, Deserialize, Serialize, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CertificateConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Deserialize, Serialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    RoundRobin,
    LeastConn,
    ClientIpHash,
}

#[derive(Debug, Serialize, Clone, PartialEq)]
#[serde(untagged)]
pub enum ServerEntry {
    Addr(String),
    Weighted(WeightedServer),
}

/// By hand rather than `#[serde(untagged)]`, whose error ("did not match any variant")
/// would hide which key of `{ addr, weight }` is wrong.
impl<'de> Deserialize<'de> for ServerEntry {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Entry;
        impl<'de> serde::de::Visitor<'de> for Entry {
            type Value = ServerEntry;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an address like \"127.0.0.1:8081\" or { addr = \"...\", weight = N }")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ServerEntry, E> {
                Ok(ServerEntry::Addr(v.to_string()))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<ServerEntry, A::Error> {
                WeightedServer::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(ServerEntry::Weighted)
            }
        }
        d.deserialize_any(Entry)
    }
}

/// `{ addr = "...", weight = N }`; its own struct so unknown keys are refused here too
/// (serde cannot deny them on an untagged enum's variant).
#[derive(Debug, Deserialize, Serialize, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WeightedServer {
    pub addr: String,
    #[serde(default = "one")]
    pub weight: u32,
}

fn one() -> u32 {
    1
}

impl ServerEntry {
    pub fn addr(&self) -> &str {
        match self {
            ServerEntry::Addr(a) => a,
            ServerEntry::Weighted(w) => &w.addr,
        }
    }
    pub fn weight(&self) -> u32 {
        match self {
            ServerEntry::Addr(_) => 1,
            ServerEntry::Weighted(w) => w.weight,
        }
    }
}

#[derive(Debug, Deserialize, Serialize, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HealthCheckConfig {
    #[serde(default = "default_health_path")]
    pub path: String,
    #[serde(default = "default_health_interval")]
    pub interval: Dur,
    #[serde(default = "default_health_timeout")]
    pub timeout: Dur,
}

fn default_health_path() -> String {
    "/healthz".into()
}
fn default_health_interval() -> Dur {
    secs(5)
}
fn default_health_timeout() -> Dur {
    secs(2)
}

#[derive(Debug, Deserialize, Serialize, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    pub name: String,
    pub servers: Vec<ServerEntry>,
    #[serde(default = "default_balance")]
    pub balance: Balance,
    /// Idle keep-alive connections kept per worker (nginx `keepalive`).
    #[serde(default = "default_keepalive")]
    pub keepalive: usize,
    /// How long an idle pooled connection is kept (nginx `keepalive_timeout` in upstream).
    #[serde(default = "default_upstream_idle")]
    pub keepalive_timeout: Dur,
    /// How long connections given back beyond `keepalive` stay open idle before they are
    /// closed (`"0s"`: at once, as nginx does).
    #[serde(default = "default_keepalive_linger")]
    pub keepalive_linger: Dur,
    #[serde(default = "one")]
    pub max_fails: u32,
    #[serde(default = "default_fail_timeout")]
    pub fail_timeout: Dur,
    #[serde(default)]
    pub health_check: Option<HealthCheckConfig>,
    /// A server named `"NAME:PORT"` that does not resolve at start fails the start (and
    /// `gateway check`); `false`: the upstream starts empty (503) until it resolves.
    #[serde(default = "yes")]
    pub resolve_required: bool,
    /// Names are re-resolved at their TTL, but never more often than this (a TTL of 0 or
    /// 1 s would otherwise ask the name server on every tick).
    #[serde(default = "default_resolve_min")]
    pub resolve_min: Dur,
    /// ... and at least this often, whatever a long TTL says (nginx `resolver valid=`).
    #[serde(default = "default_resolve_max")]
    pub resolve_max: Dur,
    /// A name that resolved before and now answers NXDOMAIN keeps its addresses this long
    /// (a Service deleted and re-created, a DNS server briefly serving a stale zone).
    #[serde(default = "default_nxdomain_grace")]
    pub nxdomain_grace: Dur,
}

fn yes() -> bool {
    true
}
/// 1 s: long enough for the burst after a burst (a client's next round of streams) to
/// find the connections the last one opened, short enough that an upstream sees its idle
/// connections fall back to `keepalive` within two seconds.
fn default_keepalive_linger() -> Dur {
    secs(1)
}
/// 5 s: a moved pod is followed within seconds, without a query per request.
fn default_resolve_min() -> Dur {
    secs(5)
}
/// 300 s: a long TTL still gets checked every five minutes.
fn default_resolve_max() -> Dur {
    secs(300)
}
/// 60 s: longer than a Deployment's usual rollout gap, short enough that a removed service
/// stops getting traffic within a minute.
fn default_nxdomain_grace() -> Dur {
    secs(60)
}

/// A server address: an IP literal (`"10.0.0.1:80"`, `"[::1]:80"`) is used as it is; a
/// `"NAME:PORT"` is resolved (`upstream/dns.rs`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ServerAddr {
    Ip(SocketAddr),
    Name(String, u16),
}

impl ServerAddr {
    /// Parses `"IP:PORT"` or `"NAME:PORT"`; a name is a DNS name of letters, digits, `-`,
    /// `_` and dots (RFC 1123 labels of at most 63 bytes, 253 in all).
    pub fn parse(text: &str) -> Option<ServerAddr> {
        if let Ok(addr) = text.parse::<SocketAddr>() {
            return Some(ServerAddr::Ip(addr));
        }
        let (host, port) = text.rsplit_once(':')?;
        let port: u16 = port.parse().ok().filter(|&p| p != 0)?;
        let host = host.strip_suffix('.').unwrap_or(host);
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        };
        // An all-digit last label would be a mistyped IPv4 address, not a name.
        let numeric_tld = host
            .rsplit('.')
            .next()
            .is_some_and(|l| l.bytes().all(|b| b.is_ascii_digit()));
        if host.is_empty() || host.len() > 253 || numeric_tld || !host.split('.').all(label_ok) {
            return None;
        }
        Some(ServerAddr::Name(host.to_ascii_lowercase(), port))
    }
}

/// Upper bound of the number of servers in one upstream.
pub(crate) const MAX_UPSTREAM_SERVERS: usize = 1024;

/// Upper bound of the sum of one upstream's server weights.
pub(crate) const MAX_UPSTREAM_TOTAL_WEIGHT: u64 = 10_000;

/// Upper bound of `upstream.keepalive`, idle connections per worker.
pub(crate) const MAX_UPSTREAM_KEEPALIVE: usize = 65536;

fn default_balance() -> Balance {
    Balance::RoundRobin
}
fn default_keepalive() -> usize {
    32
}
fn default_upstream_idle() -> Dur {
    secs(60)
}
fn default_fail_timeout() -> Dur {
    secs(10)
}

#[derive(Debug, Deserialize, Serialize, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RespondConfig {
    #[serde(default = "default_status")]
    pub status: u16,
    #[serde(default)]
    pub body: String,
    #[serde(default = "default_content_type")]
    pub(crate) content_type: String,
}

fn default_status() -> u16 {
    200
}
fn default_content_type() -> String {
    "text/plain".into()
}

#[derive(Debug, Deserialize, Serialize, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default)]
    pub path_prefix: Option<String>,
    #[serde(default)]
    pub host: Option<String>,
    #[serde(default)]
    pub upstream: Option<String>,
    #[serde(default)]
    pub respond: Option<RespondConfig>,
    #[serde(default)]
    pub websocket: bool,
    #[serde(default)]
    pub connect_timeout: Option<Dur>,
    #[serde(default)]
    pub send_timeout: Option<Dur>,
    #[serde(default)]
    pub read_timeout: Option<Dur>,
    #[serde(default)]
    pub max_body_size: Option<Size>,
    /// Forward `TRACE` on this route (refused with 405 by default, as nginx does).
    #[serde(default)]
    pub allow_trace: bool,
}

/// Default of `[limits] ipv6_prefix`: a /64 is what one subscriber usually gets.
pub(crate) const DEFAULT_IPV6_PREFIX: u8 = 64;

#[derive(Debug, Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    pub conn_rate: Option<Rate>,
    pub conn_burst: Option<u32>,
    pub max_conns_per_ip: Option<u32>,
    pub request_rate: Option<Rate>,
    pub request_burst: Option<u32>,
    pub deny: Vec<IpNet>,
    pub allow: Vec<IpNet>,
    /// IPv6 clients are limited per prefix of this length (1..=128; default 64).
    pub ipv6_prefix: u8,
    /// `[limits.global]`: per-IP limits counted across the fleet in Redis (issue 16).
    pub global: Option<GlobalLimitsConfig>,
}

/// Default of `[limits.global] sync_interval`.
pub(crate) const DEFAULT_GLOBAL_SYNC_INTERVAL: std::time::Duration =
    std::time::Duration::from_millis(250);

fn default_global_sync_interval() -> Dur {
    Dur(DEFAULT_GLOBAL_SYNC_INTERVAL)
}

fn default_true() -> bool {
    true
}

/// `[limits.global]`: a per-IP rate shared by every node that points at the same Redis.
#[derive(Debug, Deserialize, Serialize, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GlobalLimitsConfig {
    /// `redis://[[USER]:PASSWORD@]HOST:PORT/DB` or `rediss://` (TLS); `/config` shows it
    /// through [`redact_url`].
    #[serde(serialize_with = "serialize_redacted_url")]
    pub redis: String,
    pub request_rate: Rate,
    #[serde(default)]
    pub request_burst: Option<u32>,
    #[serde(default)]
    pub conn_rate: Option<Rate>,
    #[serde(default)]
    pub conn_burst: Option<u32>,
    #[serde(default = "default_global_sync_interval")]
    pub sync_interval: Dur,
    /// Redis unreachable: `true` drops the fleet verdicts at once (local limits only);
    /// `false` keeps the sources already over until their windows clear.
    #[serde(default = "default_true")]
    pub fail_open: bool,
}

impl LimitsConfig {
    /// A fleet-wide `conn_rate` (`[limits.global]`) without a local one sets the local one
    /// to it, with its burst: the fleet learns a source is over only at a sync, and a node
    /// without a local rate admitted whatever it could accept until then (bursts of
    /// hundreds of connections each time the refusal lifted, ~19x the rate). No node
    /// should admit more connections than the whole fleet may; a local `conn_rate` set
    /// explicitly is kept. (`request_rate` is left alone: its overshoot is bounded by the
    /// local `request_rate` the operator sets, as configuration.md says, and a request
    /// refused locally would no longer reach the fleet's count.)
    fn derive_local_from_global(&mut self) {
        let Some(global) = &self.global else {
            return;
        };
        if self.conn_rate.is_none() && global.conn_rate.is_some() {
            self.conn_rate = global.conn_rate;
            self.conn_burst = global.conn_burst;
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            conn_rate: None,
            conn_burst: None,
            max_conns_per_ip: None,
            request_rate: None,
            request_burst: None,
            deny: Vec::new(),
            allow: Vec::new(),
            ipv6_prefix: DEFAULT_IPV6_PREFIX,
            global: None,
        }
    }
}

#[derive(Debug, Deserialize, Serialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum XdpMode {
    Auto,
    Native,
    Generic,
    Off,
}

#[derive(Debug, Deserialize, Serialize, Clone, PartialEq)]
#[serde(untagged)]
pub enum Interfaces {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields, default)]
pub struct XdpConfig {
    pub interface: Option<Interfaces>,
    pub mode: XdpMode,
    pub pin_path: PathBuf,
    /// Source addresses the kernel tracks (rate buckets); sizes the LRU maps.
    pub max_tracked_ips: u32,
}

impl Default for XdpConfig {
    fn default() -> Self {
        XdpConfig {
            interface: None,
            mode: XdpMode::Off,
            pin_path: PathBuf::from("/sys/fs/bpf/gateway"),
            max_tracked_ips: 65536,
        }
    }
}

impl XdpConfig {
    pub fn interfaces(&self) -> Vec<String> {
        match &self.interface {
            None => Vec::new(),
            Some(Interfaces::One(i)) => vec![i.clone()],
            Some(Interfaces::Many(v)) => v.clone(),
        }
    }
}

fn secs(s: u64) -> Dur {
    Dur(std::time::Duration::from_secs(s))
}

/// A config file read from disk: the parsed config plus what is needed to locate errors.
#[derive(Debug, Clone)]
pub struct LoadedConfig {
    pub path: PathBuf,
    pub config: Config,
    /// The file's text, to name the line of an error found after parsing (a certificate
    /// that does not load, found when `snapshot::Snapshot::build` reads it).
    pub source: String,
}

impl LoadedConfig {
    /// The error at `key` inside the table spanning `span` (e.g. `listener[0]`, `tls`):
    /// its line is where the key is written, or the table's first line.
    pub(crate) fn error_at(
        &self,
        span: Range<usize>,
        table: &str,
        key: &str,
        message: String,
    ) -> ConfigError {
        ConfigError {
            file: self.path.clone(),
            line: locate_key(&self.source, span, key),
            key: format!("{table}.{key}"),
            message,
        }
    }
}

impl Config {
    /// Reads, parses and validates a config file. Every error names file, line and key.
    pub fn load(path: &Path) -> Result<LoadedConfig, ConfigErrors> {
        let source = std::fs::read_to_string(path).map_err(|e| {
            ConfigErrors(vec![ConfigError {
                file: path.to_path_buf(),
                line: 0,
                key: "-".into(),
                message: format!("cannot read config file: {e}"),
            }])
        })?;
        Self::parse(path, &source).map(|config| LoadedConfig {
            path: path.to_path_buf(),
            config,
            source,
        })
    }

    /// Parses and validates config text; `path` is only used in error messages.
    pub fn parse(path: &Path, source: &str) -> Result<Config, ConfigErrors> {
        // Serde stops at the first error. To report every one (as `nginx -t` users expect
        // of a checker), each error's line is blanked out and the file parsed again, up to
        // a bound; semantic checks then run on what parsed, skipping the tables whose
        // lines were blanked (their errors would only be echoes of the first).
        const MAX_ROUNDS: usize = 32;
        let mut text = source.to_string();
        let mut errors = Vec::new();
        let mut blanked: Vec<String> = Vec::new();
        let mut parsed = None;
        for _ in 0..MAX_ROUNDS {
            match toml::from_str::<Config>(&text) {
                Ok(config) => {
                    parsed = Some(config);
                    break;
                }
                Err(e) => {
                    let span = e.span();
                    // "missing field `x`" right after blanking `x` is an echo, not a
                    // second mistake.
                    let echo = e
                        .message()
                        .strip_prefix("missing field `")
                        .and_then(|m| m.split('`').next());
                    if let Some(field) = echo {
                        if blanked.iter().any(|b| b.rsplit('.').next() == Some(field)) {
                            break;
                        }
                    }
                    let line = span.as_ref().map(|s| line_of(source, s.start)).unwrap_or(0);
                    let key = span
                        .as_ref()
                        .map(|s| key_at(source, s.start))
                        .unwrap_or_else(|| "-".into());
                    errors.push(ConfigError {
                        file: path.to_path_buf(),
                        line,
                        key: key.clone(),
                        message: e.message().trim().to_string(),
                    });
                    let Some(span) = span else { break };
                    if !blank_line(&mut text, span.start) {
                        break;
                    }
                    blanked.push(key);
                }
            }
        }
        if let Some(config) = parsed.as_mut() {
            if let Err(message) = config.admin.load_token_file(path) {
                errors.push(ConfigError {
                    file: path.to_path_buf(),
                    line: locate_table_key(source, "admin", "token_file"),
                    key: "admin.token_file".into(),
                    message,
                });
            }
        }
        if let Some(config) = &parsed {
            // A semantic error is an echo of a blanked line when it names that very key,
            // or when it is about a key missing from the same table (located at the
            // table's header line): `upstream = 5` blanked must not also say "set
            // upstream or respond".
            let header_line = |line: usize| {
                source
                    .lines()
                    .nth(line.saturating_sub(1))
                    .is_some_and(|l| l.trim_start().starts_with('['))
            };
            errors.extend(config.validate(path, source).into_iter().filter(|e| {
                !blanked.iter().any(|b| {
                    let table = b.rsplit_once('.').map(|(t, _)| t).unwrap_or(b);
                    e.key == *b || (header_line(e.line) && e.key.starts_with(table))
                })
            }));
        }
        match parsed {
            Some(mut config) if errors.is_empty() => {
                config.limits.derive_local_from_global();
                Ok(config)
            }
            _ => Err(ConfigErrors(errors)),
        }
    }

    pub fn effective_workers(&self) -> usize {
        if self.server.workers == 0 {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        } else {
            self.server.workers
        }
    }

    /// The ALPN protocols a listener offers (`alpn`, or its default), for TLS listeners.
    pub fn listener_alpn(l: &ListenerConfig) -> Vec<String> {
        l.alpn
            .clone()
            .unwrap_or_else(|| vec!["h2".into(), "http/1.1".into()])
    }

    fn validate(&self, file: &Path, source: &str) -> Vec<ConfigError> {
        let mut errors = Vec::new();
        let mut err = |span: Option<Range<usize>>, table: &str, key: &str, message: String| {
            let line = span
                .clone()
                .map(|s| locate_key(source, s, key))
                .unwrap_or_else(|| locate_table_key(source, table, key));
            let full = if table.is_empty() {
                key.to_string()
            } else if key.is_empty() {
                table.to_string()
            } else {
                format!("{table}.{key}")
            };
            errors.push(ConfigError {
                file: file.to_path_buf(),
                line,
                key: full,
                message,
            });
        };

        let s = &self.server;
        if s.io_uring_submit_batch > 4096 {
            err(
                None,
                "server",
                "io_uring_submit_batch",
                "must be at most 4096 (the ring's submission queue)".into(),
            );
        }
        if s.max_header_bytes.0 < 1024 || s.max_header_bytes.0 > 1 << 20 {
            err(
                None,
                "server",
                "max_header_bytes",
                "must be between 1KiB and 1MiB".into(),
            );
        }
        if s.max_connections == Some(0) {
            err(
                None,
                "server",
                "max_connections",
                "must be at least 1".into(),
            );
        }
        if s.request_buffering.0 > crate::util::budget::REQUEST_BUFFERING_MAX {
            err(
                None,
                "server",
                "request_buffering",
                "at most 1MiB (it is held in memory per connection)".into(),
            );
        }
        if s.client_body_timeout.0.is_zero() {
            err(
                None,
                "server",
                "client_body_timeout",
                "must be greater than zero".into(),
            );
        }
        if s.workers > 1024 {
            err(None, "server", "workers", "at most 1024 workers".into());
        }
        if s.header_timeout.0.is_zero() {
            err(
                None,
                "server",
                "header_timeout",
                "must be greater than zero".into(),
            );
        }
        for (key, message) in self.admin.problems() {
            err(None, "admin", key, message);
        }
        if self.log.access.is_empty() {
            err(
                None,
                "log",
                "access",
                "use \"stdout\", \"off\" or a file path".into(),
            );
        }
        if self.listeners.is_empty() {
            err(
                Some(0..0),
                "",
                "listener",
                "at least one [[listener]] is required".into(),
            );
        }
        let mut listener_names = std::collections::HashSet::new();
        let mut listen_addrs = std::collections::HashSet::new();
        for (i, l) in self.listeners.iter().enumerate() {
            let span = Some(l.span());
            let table = format!("listener[{i}]");
            if !listener_names.insert(l.get_ref().name.clone()) {
                err(
                    span.clone(),
                    &table,
                    "name",
                    format!("duplicate listener name {:?}", l.get_ref().name),
                );
            }
            match l.get_ref().listen.parse::<SocketAddr>() {
                Ok(addr) => {
                    if !listen_addrs.insert(addr) {
                        err(
                            span.clone(),
                            &table,
                            "listen",
                            format!("{addr} is used by another listener"),
                        );
                    }
                }
                Err(_) => err(
                    span.clone(),
                    &table,
                    "listen",
                    format!(
                        "{:?} is not an address like 0.0.0.0:8080",
                        l.get_ref().listen
                    ),
                ),
            }
            if !l.get_ref().proxy_protocol && !l.get_ref().proxy_protocol_from.is_empty() {
                err(
                    span.clone(),
                    &table,
                    "proxy_protocol_from",
                    "only means something with proxy_protocol = true".into(),
                );
            }
            if let Some(tls) = &l.get_ref().tls {
                if tls.certificates.is_empty() {
                    err(
                        span.clone(),
                        &table,
                        "tls",
                        "needs at least one certificate".into(),
                    );
                }
                // The files themselves are read once, by `Snapshot::build` (also in
                // `gateway check`): config stays pure validation, below protocol/.
            }
            validate_listener_http2(l.get_ref(), |key, message| {
                err(span.clone(), &table, key, message)
            });
        }

        let h2 = &self.http2;
        if h2.max_concurrent_streams == 0 {
            err(
                None,
                "http2",
                "max_concurrent_streams",
                "must be at least 1".into(),
            );
        }
        if h2.max_requests_per_connection == 0 {
            err(
                None,
                "http2",
                "max_requests_per_connection",
                "must be at least 1".into(),
            );
        }
        if h2.idle_timeout.as_ref().is_some_and(|d| d.0.is_zero()) {
            err(
                None,
                "http2",
                "idle_timeout",
                "must be greater than zero".into(),
            );
        }
        if let Some(n) = &h2.max_header_list_size {
            if n.0 < 1024 || n.0 > 1 << 20 {
                err(
                    None,
                    "http2",
                    "max_header_list_size",
                    "must be between 1KiB and 1MiB".into(),
                );
            }
        }
        if h2.max_control_frames_per_second == 0 {
            err(
                None,
                "http2",
                "max_control_frames_per_second",
                "must be at least 1".into(),
            );
        }

        let mut upstream_names = std::collections::HashSet::new();
        for (i, u) in self.upstreams.iter().enumerate() {
            let span = Some(u.span());
            let table = format!("upstream[{i}]");
            let up = u.get_ref();
            if !upstream_names.insert(up.name.clone()) {
                err(
                    span.clone(),
                    &table,
                    "name",
                    format!("duplicate upstream name {:?}", up.name),
                );
            }
            if up.servers.is_empty() {
                err(
                    span.clone(),
                    &table,
                    "servers",
                    "needs at least one server".into(),
                );
            }
            for server in &up.servers {
                if ServerAddr::parse(server.addr()).is_none() {
                    err(
                        span.clone(),
                        &table,
                        "servers",
                        format!(
                            "{:?} is not an address like 127.0.0.1:8081 or a name like backend:8081",
                            server.addr()
                        ),
                    );
                }
                if server.weight() == 0 || server.weight() > 1000 {
                    err(
                        span.clone(),
                        &table,
                        "weight",
                        "weight must be between 1 and 1000".into(),
                    );
                }
            }
            // Every upstream builds a consistent-hash ring of 160 points per unit of
            // weight at each load and reload: unbounded, a list of heavy servers is
            // gigabytes and seconds of work before the gateway serves anything.
            if up.servers.len() > MAX_UPSTREAM_SERVERS {
                err(
                    span.clone(),
                    &table,
                    "servers",
                    format!("at most {MAX_UPSTREAM_SERVERS} servers per upstream"),
                );
            }
            let total: u64 = up.servers.iter().map(|s| u64::from(s.weight())).sum();
            if total > MAX_UPSTREAM_TOTAL_WEIGHT {
                err(
                    span.clone(),
                    &table,
                    "servers",
                    format!("the weights add up to {total}, more than {MAX_UPSTREAM_TOTAL_WEIGHT}"),
                );
            }
            if up.max_fails == 0 {
                err(
                    span.clone(),
                    &table,
                    "max_fails",
                    "must be at least 1".into(),
                );
            }
            // nginx uses fail_timeout twice: the window failures are counted in, and how
            // long the server then stays down. Under a second the window hardly holds two
            // failures and the server is back before the next request: it only flaps.
            // nginx's `0` (folklore: "never mark down") has no equivalent here.
            if up.fail_timeout.0 < std::time::Duration::from_secs(1) {
                err(
                    span.clone(),
                    &table,
                    "fail_timeout",
                    "must be at least 1s (it is also how long a failed server stays down)".into(),
                );
            }
            if up.keepalive > 0 && up.keepalive_timeout.0.is_zero() {
                err(
                    span.clone(),
                    &table,
                    "keepalive_timeout",
                    "must be greater than zero; set keepalive = 0 to keep no idle connections"
                        .into(),
                );
            }
            if up.keepalive > MAX_UPSTREAM_KEEPALIVE {
                err(
                    span.clone(),
                    &table,
                    "keepalive",
                    format!(
                        "at most {MAX_UPSTREAM_KEEPALIVE} (each idle connection holds a descriptor)"
                    ),
                );
            }
            if up.resolve_min.0.is_zero() || up.resolve_min.0 > up.resolve_max.0 {
                err(
                    span.clone(),
                    &table,
                    "resolve_min",
                    "must be greater than zero and at most resolve_max".into(),
                );
            }
            if let Some(h) = &up.health_check {
                if !h.path.starts_with('/') {
                    err(
                        span.clone(),
                        &table,
                        "health_check",
                        "path must start with '/'".into(),
                    );
                }
                if h.interval.0.is_zero() || h.timeout.0.is_zero() {
                    err(
                        span.clone(),
                        &table,
                        "health_check",
                        "interval and timeout must be greater than zero".into(),
                    );
                }
            }
        }

        let mut route_keys = std::collections::HashSet::new();
        for (i, r) in self.routes.iter().enumerate() {
            let span = Some(r.span());
            let table = format!("route[{i}]");
            let route = r.get_ref();
            match (&route.path, &route.path_prefix) {
                (Some(_), Some(_)) => err(
                    span.clone(),
                    &table,
                    "path",
                    "set either path or path_prefix, not both".into(),
                ),
                (None, None) => err(
                    span.clone(),
                    &table,
                    "path_prefix",
                    "set path or path_prefix".into(),
                ),
                (Some(p), None) | (None, Some(p)) => {
                    let key = if route.path.is_some() {
                        "path"
                    } else {
                        "path_prefix"
                    };
                    if !p.starts_with('/') {
                        err(
                            span.clone(),
                            &table,
                            key,
                            format!("{p:?} must start with '/'"),
                        );
                    } else if p.contains(';') || p.to_ascii_lowercase().contains("%3b") {
                        // Requests are routed with their `;params` (or `%3Bparams`)
                        // removed, so this route could never match.
                        err(
                            span.clone(),
                            &table,
                            key,
                            format!("{p:?} contains ';': paths are matched without ;parameters"),
                        );
                    }
                }
            }
            let key = (
                route.host.clone(),
                route.path.clone(),
                route.path_prefix.clone(),
            );
            if !route_keys.insert(key) {
                err(
                    span.clone(),
                    &table,
                    "path",
                    "another route has the same host and path".into(),
                );
            }
            for (key, timeout) in [
                ("connect_timeout", route.connect_timeout),
                ("send_timeout", route.send_timeout),
                ("read_timeout", route.read_timeout),
            ] {
                if timeout.is_some_and(|t| t.0.is_zero()) {
                    err(
                        span.clone(),
                        &table,
                        key,
                        "must be greater than zero (every request would time out)".into(),
                    );
                }
            }
            match (&route.upstream, &route.respond) {
                (Some(_), Some(_)) => err(
                    span.clone(),
                    &table,
                    "respond",
                    "set either upstream or respond, not both".into(),
                ),
                (None, None) => err(
                    span.clone(),
                    &table,
                    "upstream",
                    "set upstream or respond".into(),
                ),
                (Some(name), None) => {
                    if !self.upstreams.iter().any(|u| &u.get_ref().name == name) {
                        err(
                            span.clone(),
                            &table,
                            "upstream",
                            format!("no upstream named {name:?}"),
                        );
                    }
                }
                (None, Some(respond)) => {
                    if !(100..=599).contains(&respond.status)
                        || (100..200).contains(&respond.status)
                    {
                        err(
                            span.clone(),
                            &table,
                            "respond",
                            format!("status {} is not a final HTTP status", respond.status),
                        );
                    }
                    if route.websocket {
                        err(
                            span.clone(),
                            &table,
                            "websocket",
                            "a respond route cannot be a websocket route".into(),
                        );
                    }
                }
            }
        }

        let l = &self.limits;
        for (key, burst, rate, rate_key) in [
            ("conn_burst", l.conn_burst, &l.conn_rate, "conn_rate"),
            (
                "request_burst",
                l.request_burst,
                &l.request_rate,
                "request_rate",
            ),
        ] {
            match burst {
                Some(_) if rate.is_none() => err(None, "limits", key, format!("needs {rate_key}")),
                // An empty bucket never refills past zero tokens: everything is refused.
                Some(0) => err(None, "limits", key, "must be at least 1".into()),
                _ => {}
            }
        }
        if !(1..=128).contains(&l.ipv6_prefix) {
            err(
                None,
                "limits",
                "ipv6_prefix",
                "must be between 1 and 128".into(),
            );
        }
        if let Some(g) = &l.global {
            for (key, message) in g.problems() {
                err(None, "limits.global", key, message);
            }
        }
        if l.max_conns_per_ip == Some(0) {
            err(
                None,
                "limits",
                "max_conns_per_ip",
                "must be at least 1".into(),
            );
        }
        if self.xdp.max_tracked_ips < 1024 || self.xdp.max_tracked_ips > 16 << 20 {
            err(
                None,
                "xdp",
                "max_tracked_ips",
                "must be between 1024 and 16777216".into(),
            );
        }
        if self.xdp.mode != XdpMode::Off {
            let ports: std::collections::HashSet<u16> = self
                .listeners
                .iter()
                .filter_map(|l| l.get_ref().listen.parse::<SocketAddr>().ok())
                .map(|a| a.port())
                .collect();
            if ports.len() > 16 {
                err(
                    None,
                    "xdp",
                    "mode",
                    "the XDP guard covers at most 16 listener ports".into(),
                );
            }
            // Each list is one LPM trie per family in the kernel, of a fixed size: a longer
            // list would only fail at start or at reload, when the kernel refuses an insert.
            for (key, list) in [("deny", &l.deny), ("allow", &l.allow)] {
                for (family, v4) in [("IPv4", true), ("IPv6", false)] {
                    let networks: std::collections::HashSet<IpNet> = list
                        .iter()
                        .filter(|n| matches!(n, IpNet::V4(_)) == v4)
                        .map(IpNet::trunc)
                        .collect();
                    if networks.len() > XDP_NET_ENTRIES {
                        err(
                            None,
                            "limits",
                            key,
                            format!(
                                "{} {family} networks: the XDP guard holds at most {XDP_NET_ENTRIES} \
                                 per family and list (xdp.mode is on)",
                                networks.len()
                            ),
                        );
                    }
                }
            }
        }
        for ns in &self.resolver.nameservers {
            if ns.parse::<SocketAddr>().is_err() {
                err(
                    None,
                    "resolver",
                    "nameservers",
                    format!("{ns:?} is not an address like 10.0.0.10:53"),
                );
            }
        }
        if self.xdp.mode != XdpMode::Off && self.xdp.interfaces().is_empty() {
            err(
                None,
                "xdp",
                "interface",
                "name the interface(s) to attach to, or set mode = \"off\"".into(),
            );
        }
        errors
    }
}

impl GlobalLimitsConfig {
    /// What is wrong with the table, as (key, message).
    fn problems(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        if let Err(e) = redis_connection_info(&self.redis) {
            out.push(("redis", e));
        }
        for (key, rate, burst_key, burst) in [
            (
                "request_rate",
                Some(self.request_rate),
                "request_burst",
                self.request_burst,
            ),
            ("conn_rate", self.conn_rate, "conn_burst", self.conn_burst),
        ] {
            match rate {
                Some(r) if r.per_second <= 0.0 => out.push((key, "must be above zero".into())),
                None if burst.is_some() => out.push((burst_key, format!("needs {key}"))),
                _ => {}
            }
            if burst == Some(0) {
                out.push((burst_key, "must be at least 1".into()));
            }
        }
        let interval = self.sync_interval.0;
        if interval < std::time::Duration::from_millis(10)
            || interval > std::time::Duration::from_secs(10)
        {
            out.push(("sync_interval", "must be between 10ms and 10s".into()));
        }
        out
    }
}

/// Networks per `limits.deny`/`limits.allow` list and address family that the XDP guard's
/// tries hold (the size the XDP object declares).
pub const XDP_NET_ENTRIES: usize = gateway_common::sizes::NET_ENTRIES as usize;

/// 1-based line number of a byte offset.
pub fn line_of(source: &str, offset: usize) -> usize {
    source[..offset.min(source.len())]
        .bytes()
        .filter(|&b| b == b'\n')
        .count()
        + 1
}

/// The line where `key = ...` is written inside a span (a table's text); the span's first
/// line when the key is absent (a missing required key belongs to its table).
fn locate_key(source: &str, span: Range<usize>, key: &str) -> usize {
    let end = span.end.min(source.len());
    let start = span.start.min(end);
    let text = &source[start..end];
    if !key.is_empty() {
        let mut offset = 0;
        while let Some(pos) = text[offset..].find(key) {
            let at = offset + pos;
            let before_ok = at == 0
                || !text.as_bytes()[at - 1].is_ascii_alphanumeric()
                    && text.as_bytes()[at - 1] != b'_';
            let rest = text[at + key.len()..].trim_start_matches([' ', '\t']);
            if before_ok && rest.starts_with('=') {
                return line_of(source, start + at);
            }
            offset = at + key.len();
        }
    }
    // Spans of array-of-tables elements start at their first key; point at the header
    // line above when there is one.
    let line = line_of(source, start);
    let header_above = source[..start].trim_end().ends_with(']');
    if header_above && line > 1 {
        line - 1
    } else {
        line
    }
}

/// Locates `key` inside a top-level `[table]` (or the table header itself).
pub(crate) fn locate_table_key(source: &str, table: &str, key: &str) -> usize {
    let header = format!("[{table}]");
    let Some(start) = source
        .lines()
        .scan(0usize, |off, line| {
            let here = *off;
            *off += line.len() + 1;
            Some((here, line))
        })
        .find(|(_, line)| line.trim() == header)
        .map(|(off, _)| off)
    else {
        return 1;
    };
    let end = source[start + header.len()..]
        .find("\n[")
        .map(|p| start + header.len() + p)
        .unwrap_or(source.len());
    locate_key(source, start..end, key)
}

/// Overwrites the line holding `offset` with spaces (keeping every byte offset valid).
/// Refuses table headers and lines already blank: removing those would only cascade.
fn blank_line(text: &mut String, offset: usize) -> bool {
    let offset = offset.min(text.len());
    let start = text[..offset].rfind('\n').map(|p| p + 1).unwrap_or(0);
    let end = text[offset..]
        .find('\n')
        .map(|p| offset + p)
        .unwrap_or(text.len());
    let line = text[start..end].trim();
    if line.is_empty() || line.starts_with('[') {
        return false;
    }
    let blank = " ".repeat(end - start);
    text.replace_range(start..end, &blank);
    true
}

/// Best-effort dotted path of the key at a byte offset, for parse errors: the nearest table
/// header above (with its index for arrays of tables, as `route[2]`) plus the key on that
/// line.
fn key_at(source: &str, offset: usize) -> String {
    let offset = offset.min(source.len());
    let line_start = source[..offset].rfind('\n').map(|p| p + 1).unwrap_or(0);
    let line_end = source[offset..]
        .find('\n')
        .map(|p| offset + p)
        .unwrap_or(source.len());
    let line = &source[line_start..line_end];
    let key = line
        .split_once('=')
        .map(|(k, _)| k.trim().to_string())
        .unwrap_or_default();
    // An error on a table header line belongs to that table.
    let before = if line.trim_start().starts_with('[') {
        &source[..line_end]
    } else {
        &source[..line_start]
    };
    let table = before
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(|header| {
            if let Some(name) = header.strip_prefix("[[").and_then(|h| h.split(']').next()) {
                let name = name.trim();
                let index = before
                    .lines()
                    .filter(|l| {
                        l.trim()
                            .strip_prefix("[[")
                            .and_then(|h| h.split(']').next())
                            .map(str::trim)
                            == Some(name)
                    })
                    .count();
                format!("{name}[{}]", index.saturating_sub(1))
            } else {
                header
                    .trim_matches(|c| c == '[' || c == ']')
                    .trim()
                    .to_string()
            }
        })
        .unwrap_or_default();
    match (table.is_empty(), key.is_empty() || key.starts_with('[')) {
        (true, true) => "-".into(),
        (true, false) => key,
        (false, true) => table,
        (false, false) => format!("{table}.{key}"),
    }
}

/// `alpn` and `h2c` of one listener: each only where it means something.
fn validate_listener_http2(l: &ListenerConfig, mut err: impl FnMut(&str, String)) {
    if let Some(alpn) = &l.alpn {
        if l.tls.is_none() {
            err(
                "alpn",
                "only on a TLS listener (plaintext has no ALPN; see h2c)".into(),
            );
        }
        if alpn.is_empty() {
            err("alpn", "offer at least one of \"h2\", \"http/1.1\"".into());
        }
        let mut seen = std::collections::HashSet::new();
        for p in alpn {
            if p != "h2" && p != "http/1.1" {
                err(
                    "alpn",
                    format!("{p:?}: allowed values are \"h2\" and \"http/1.1\""),
                );
            } else if !seen.insert(p) {
                err("alpn", format!("{p:?} is listed twice"));
            }
        }
    }
    if l.h2c && l.tls.is_some() {
        err(
            "h2c",
            "only on a plaintext listener (TLS listeners negotiate h2 by alpn)".into(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigErrors> {
        Config::parse(Path::new("test.toml"), text)
    }

    #[test]
    fn a_server_is_an_ip_literal_or_a_dns_name_with_a_port() {
        let ip = |s: &str| Some(ServerAddr::Ip(s.parse().unwrap()));
        let name = |h: &str, p| Some(ServerAddr::Name(h.into(), p));
        assert_eq!(ServerAddr::parse("10.0.0.1:80"), ip("10.0.0.1:80"));
        assert_eq!(
            ServerAddr::parse("[2001:db8::1]:80"),
            ip("[2001:db8::1]:80")
        );
        assert_eq!(ServerAddr::parse("aragora:8080"), name("aragora", 8080));
        assert_eq!(
            ServerAddr::parse("API.prod.svc.cluster.local.:443"),
            name("api.prod.svc.cluster.local", 443)
        );
        assert_eq!(
            ServerAddr::parse("_svc-1.example:81"),
            name("_svc-1.example", 81)
        );
        for bad in [
            "aragora",           // no port
            "aragora:0",         // port 0
            "aragora:70000",     // out of range
            ":80",               // no host
            "10.0.0.300:80",     // a mistyped IPv4 address, not a name
            "-bad.example:80",   // label starts with '-'
            "a..b:80",           // empty label
            "a b:80",            // space
            "2001:db8::1:80",    // IPv6 without brackets
            "http://aragora:80", // a URL
        ] {
            assert_eq!(ServerAddr::parse(bad), None, "{bad}");
        }
        let long = format!("{}.example:80", "a".repeat(64));
        assert_eq!(ServerAddr::parse(&long), None, "a label over 63 bytes");
    }

    const GOOD: &str = r#"
[server]
workers = 2

[[listener]]
name = "http"
listen = "127.0.0.1:8080"

[[upstream]]
name = "api"
servers = ["127.0.0.1:8081", { addr = "127.0.0.1:8082", weight = 2 }]

[[route]]
path_prefix = "/api/"
upstream = "api"

[[route]]
path = "/health"
respond = { status = 200, body = "ok\n" }
"#;

    #[test]
    fn good_config_parses() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.listeners.len(), 1);
        assert_eq!(c.upstreams[0].get_ref().servers[1].weight(), 2);
        assert_eq!(c.server.keepalive_timeout.0.as_secs(), 5);
    }

    #[test]
    fn unknown_key_names_line_and_key() {
        let text = GOOD.replace("workers = 2", "workers = 2\nwrokers = 3");
        let e = parse(&text).unwrap_err();
        assert_eq!(e.0.len(), 1);
        assert_eq!(e.0[0].line, 4, "{e}");
        assert!(e.0[0].message.contains("wrokers"), "{e}");
        assert_eq!(e.0[0].key, "server.wrokers");
    }

    #[test]
    fn misspelled_weight_is_named() {
        let text = GOOD.replace("weight = 2", "wieght = 2");
        let e = parse(&text).unwrap_err();
        assert!(e.0[0].message.contains("wieght"), "{e}");
        assert_eq!(e.0[0].line, 11, "{e}");
        assert_eq!(e.0[0].key, "upstream[0].servers", "{e}");
        // Blanking that line must not be reported as a second error.
        assert_eq!(e.0.len(), 1, "{e}");
    }

    #[test]
    fn bad_duration_names_line() {
        let text = GOOD.replace("workers = 2", "workers = 2\nheader_timeout = \"5x\"");
        let e = parse(&text).unwrap_err();
        assert_eq!(e.0[0].line, 4, "{e}");
        assert_eq!(e.0[0].key, "server.header_timeout");
    }

    #[test]
    fn every_error_is_reported_at_once() {
        let text = GOOD
            .replace(
                "workers = 2",
                "workers = 2\nwrokers = 3\nheader_timeout = \"5x\"",
            )
            .replace(
                "upstream = \"api\"",
                "upstream = \"apii\"\nconnect_timeout = 5",
            );
        let e = parse(&text).unwrap_err();
        let keys: Vec<&str> = e.0.iter().map(|e| e.key.as_str()).collect();
        assert!(keys.contains(&"server.wrokers"), "{e}");
        assert!(keys.contains(&"server.header_timeout"), "{e}");
        assert!(keys.contains(&"route[0].connect_timeout"), "{e}");
        // The same table's other problem is still found once the rest of it parses.
        assert!(keys.contains(&"route[0].upstream"), "{e}");
        assert_eq!(e.0.len(), 4, "{e}");
    }

    #[test]
    fn http2_keys_default_and_are_checked() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.http2.max_concurrent_streams, 100);
        assert_eq!(c.http2.max_requests_per_connection, 1000);
        assert!(c.http2.idle_timeout.is_none() && c.http2.max_header_list_size.is_none());
        let l = c.listeners[0].get_ref();
        assert!(!l.h2c);
        assert_eq!(Config::listener_alpn(l), ["h2", "http/1.1"]);
        let keys = |text: &str| -> Vec<String> {
            parse(text)
                .err()
                .map(|e| e.0.into_iter().map(|e| e.key).collect())
                .unwrap_or_default()
        };
        let listener = |extra: &str| {
            GOOD.replace(
                "listen = \"127.0.0.1:8080\"",
                &format!("listen = \"127.0.0.1:8080\"\n{extra}"),
            )
        };
        assert_eq!(keys(&listener("h2c = true")), Vec::<String>::new());
        assert_eq!(keys(&listener("alpn = [\"h2\"]")), ["listener[0].alpn"]);
        let tls = "tls = { certificates = [{ cert = \"c.pem\", key = \"k.pem\" }] }";
        assert_eq!(
            keys(&listener(&format!("{tls}\nalpn = [\"http/1.1\"]"))),
            Vec::<String>::new()
        );
        for bad in ["[]", "[\"h3\"]", "[\"h2\", \"h2\"]"] {
            let text = listener(&format!("{tls}\nalpn = {bad}"));
            assert_eq!(keys(&text), ["listener[0].alpn"], "{bad}");
        }
        assert_eq!(
            keys(&listener(&format!("{tls}\nh2c = true"))),
            ["listener[0].h2c"]
        );
        let http2 = |body: &str| format!("{GOOD}\n[http2]\n{body}\n");
        assert_eq!(
            keys(&http2("max_concurrent_streams = 0")),
            ["http2.max_concurrent_streams"]
        );
        assert_eq!(
            keys(&http2("max_header_list_size = \"2MiB\"")),
            ["http2.max_header_list_size"]
        );
        assert_eq!(
            keys(&http2("max_streams = 5")),
            ["http2.max_streams"],
            "strict keys"
        );
    }

    #[test]
    fn ipv6_prefix_defaults_to_64_and_is_bounded() {
        assert_eq!(parse(GOOD).unwrap().limits.ipv6_prefix, 64);
        let with = |v: &str| format!("{GOOD}\n[limits]\nipv6_prefix = {v}\n");
        assert_eq!(parse(&with("48")).unwrap().limits.ipv6_prefix, 48);
        assert_eq!(parse(&with("128")).unwrap().limits.ipv6_prefix, 128);
        for bad in ["0", "129", "300", "\"64\""] {
            let e = parse(&with(bad)).unwrap_err();
            assert!(
                e.0.iter().any(|e| e.key.ends_with("ipv6_prefix")),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn semantic_errors_are_all_reported() {
        let text = GOOD
            .replace("upstream = \"api\"", "upstream = \"apii\"")
            .replace("listen = \"127.0.0.1:8080\"", "listen = \"nowhere\"");
        let e = parse(&text).unwrap_err();
        assert_eq!(e.0.len(), 2, "{e}");
        let listen = e.0.iter().find(|e| e.key == "listener[0].listen").unwrap();
        assert_eq!(listen.line, 7);
        let up = e.0.iter().find(|e| e.key == "route[0].upstream").unwrap();
        assert_eq!(up.line, 15);
        assert!(up.message.contains("apii"));
    }

    #[test]
    fn route_paths_with_parameters_are_refused() {
        // Requests are routed without `;params`: such a route could never match.
        for (from, to, key) in [
            ("\"/api/\"", "\"/api;v=1/\"", "route[0].path_prefix"),
            ("\"/health\"", "\"/health;x\"", "route[1].path"),
            ("\"/health\"", "\"/health%3bx\"", "route[1].path"),
        ] {
            let e = parse(&GOOD.replace(from, to)).unwrap_err();
            assert_eq!(e.0.len(), 1, "{e}");
            assert_eq!(e.0[0].key, key, "{e}");
        }
    }

    #[test]
    fn huge_numbers_are_located_errors() {
        for (line, key) in [
            (
                "keepalive_timeout = \"99999999999999999999h\"",
                "server.keepalive_timeout",
            ),
            (
                "graceful_timeout = \"18446744073709551615s\"",
                "server.graceful_timeout",
            ),
            (
                "max_header_bytes = \"99999999999999999999G\"",
                "server.max_header_bytes",
            ),
        ] {
            let e =
                parse(&GOOD.replace("workers = 2", &format!("workers = 2\n{line}"))).unwrap_err();
            assert_eq!(e.0.len(), 1, "{e}");
            assert_eq!((e.0[0].line, e.0[0].key.as_str()), (4, key), "{e}");
            assert!(e.0[0].message.contains("too"), "{e}");
        }
    }

    #[test]
    fn limits_global_is_validated_strictly() {
        let global = |body: &str| format!("{GOOD}\n[limits.global]\n{body}\n");
        let good = global("redis = \"redis://:pw@127.0.0.1:6379/2\"\nrequest_rate = \"100/s\"");
        let g = parse(&good).unwrap().limits.global.unwrap();
        assert_eq!(g.sync_interval.0, DEFAULT_GLOBAL_SYNC_INTERVAL);
        assert!(g.fail_open);
        assert!(parse(&global(
            "redis = \"rediss://h:6380\"\nrequest_rate = \"5/s\"\nrequest_burst = 9\n\
             conn_rate = \"1/s\"\nconn_burst = 2\nsync_interval = \"100ms\"\nfail_open = false"
        ))
        .is_ok());
        for (body, key) in [
            (
                "redis = \"http://h:1\"\nrequest_rate = \"1/s\"",
                "limits.global.redis",
            ),
            (
                "redis = \"redis://h:1\"\nrequest_rate = \"1/s\"\nrequest_burst = 0",
                "limits.global.request_burst",
            ),
            (
                "redis = \"redis://h:1\"\nrequest_rate = \"1/s\"\nconn_burst = 3",
                "limits.global.conn_burst",
            ),
            (
                "redis = \"redis://h:1\"\nrequest_rate = \"1/s\"\nsync_interval = \"1ms\"",
                "limits.global.sync_interval",
            ),
            (
                "redis = \"redis://h:1\"\nrequest_rate = \"0/s\"",
                "limits.global.request_rate",
            ),
            // What the runtime's connect refuses, refused at load (one function).
            (
                "redis = \"rediss://u:pw@h:1/0#insecure\"\nrequest_rate = \"1/s\"",
                "limits.global.redis",
            ),
            (
                "redis = \"redis://h:1/0?x=1\"\nrequest_rate = \"1/s\"",
                "limits.global.redis",
            ),
            (
                "redis = \"redis+unix:///tmp/r.sock\"\nrequest_rate = \"1/s\"",
                "limits.global.redis",
            ),
        ] {
            let text = global(body);
            let e = parse(&text).unwrap_err();
            assert_eq!(e.0.len(), 1, "{e}\n{text}");
            assert_eq!(e.0[0].key, key, "{e}\n{text}");
            assert!(e.0[0].line > 20, "located in the table: {e}");
        }
        // Unknown keys and a missing redis are errors too.
        assert!(parse(&global(
            "redis = \"redis://h:1\"\nrequest_rate = \"1/s\"\nprefix = \"x\""
        ))
        .is_err());
        assert!(parse(&global("request_rate = \"1/s\"")).is_err());
    }

    #[test]
    fn a_global_conn_rate_without_a_local_one_sets_the_local_one() {
        let text = format!(
            "{GOOD}\n[limits]\nconn_rate = \"50/s\"\n[limits.global]\nredis = \"redis://h\"\n\
             request_rate = \"5/s\"\nrequest_burst = 9\nconn_rate = \"2/s\"\nconn_burst = 3\n"
        );
        let l = parse(&text).unwrap().limits;
        assert_eq!(l.request_rate, None);
        // Set explicitly: kept.
        assert_eq!(l.conn_rate, Some(Rate { per_second: 50.0 }));
        assert_eq!(l.conn_burst, None);
        let text = format!(
            "{GOOD}\n[limits.global]\nredis = \"redis://h\"\nrequest_rate = \"5/s\"\n\
             conn_rate = \"2/s\"\nconn_burst = 3\n"
        );
        let l = parse(&text).unwrap().limits;
        assert_eq!(l.conn_rate, Some(Rate { per_second: 2.0 }));
        assert_eq!(l.conn_burst, Some(3));
        assert_eq!(l.request_burst, None);
    }

    #[test]
    fn url_passwords_are_redacted_and_users_kept() {
        for (url, shown) in [
            ("redis://:pw@h:6379/0", "redis://:<redacted>@h:6379/0"),
            (
                "rediss://gw:p%40ss@h:6380/1",
                "rediss://gw:<redacted>@h:6380/1",
            ),
            // The userinfo ends at the authority's last `@`.
            ("redis://u:a@b@h/0", "redis://u:<redacted>@h/0"),
            // A user without a password, or no userinfo: nothing to hide.
            ("redis://gw@h/0", "redis://gw@h/0"),
            ("redis://h:6379/0", "redis://h:6379/0"),
            // An `@` after the authority is the path's, not a password's.
            ("redis://h:1/0#x@y", "redis://h:1/0#x@y"),
            ("not a url", "not a url"),
        ] {
            assert_eq!(redact_url(url), shown, "{url}");
        }
        let text = format!(
            "{GOOD}\n[limits.global]\nredis = \"redis://gw:TOPSECRET@127.0.0.1:6379/2\"\n\
             request_rate = \"100/s\"\n"
        );
        let shown = serde_json::to_string(&parse(&text).unwrap()).unwrap();
        assert!(!shown.contains("TOPSECRET"), "{shown}");
        assert!(
            shown.contains("redis://gw:<redacted>@127.0.0.1:6379/2"),
            "{shown}"
        );
    }

    #[test]
    fn absurd_upstream_route_and_limit_values_are_refused() {
        let upstream = |extra: &str| GOOD.replace("servers = [", &format!("{extra}\nservers = ["));
        let route = |extra: &str| {
            GOOD.replace(
                "upstream = \"api\"",
                &format!("upstream = \"api\"\n{extra}"),
            )
        };
        let limits = |extra: &str| format!("{GOOD}\n[limits]\n{extra}\n");
        for (text, key, line) in [
            (
                upstream("fail_timeout = \"0s\""),
                "upstream[0].fail_timeout",
                11,
            ),
            (
                upstream("fail_timeout = \"999ms\""),
                "upstream[0].fail_timeout",
                11,
            ),
            (
                upstream("keepalive_timeout = \"0s\""),
                "upstream[0].keepalive_timeout",
                11,
            ),
            (upstream("keepalive = 65537"), "upstream[0].keepalive", 11),
            (
                GOOD.replace("weight = 2", "weight = 1000").replace(
                    "servers = [",
                    &format!(
                        "servers = [{}",
                        "{ addr = \"127.0.0.1:1\", weight = 1000 },".repeat(9)
                    ),
                ),
                "upstream[0].servers",
                11,
            ),
            (
                GOOD.replace(
                    "servers = [",
                    &format!("servers = [{}", "\"127.0.0.1:1\",".repeat(1023)),
                ),
                "upstream[0].servers",
                11,
            ),
            (
                route("connect_timeout = \"0s\""),
                "route[0].connect_timeout",
                16,
            ),
            (route("send_timeout = \"0ms\""), "route[0].send_timeout", 16),
            (route("read_timeout = \"0s\""), "route[0].read_timeout", 16),
            (limits("request_burst = 5"), "limits.request_burst", 22),
            (
                limits("conn_rate = \"1/s\"\nconn_burst = 0"),
                "limits.conn_burst",
                23,
            ),
            (
                limits("request_rate = \"1/s\"\nrequest_burst = 0"),
                "limits.request_burst",
                23,
            ),
        ] {
            let e = parse(&text).unwrap_err();
            assert_eq!(e.0.len(), 1, "{e}\n{text}");
            assert_eq!(
                (e.0[0].key.as_str(), e.0[0].line),
                (key, line),
                "{e}\n{text}"
            );
        }
        for fine in [
            upstream("fail_timeout = \"1s\""),
            upstream("keepalive = 0\nkeepalive_timeout = \"0s\""),
            upstream("keepalive = 65536"),
            GOOD.replace("weight = 2", "weight = 1000").replace(
                "servers = [",
                &format!(
                    "servers = [{}",
                    "{ addr = \"127.0.0.1:1\", weight = 1000 },".repeat(8)
                ),
            ),
            GOOD.replace(
                "servers = [",
                &format!("servers = [{}", "\"127.0.0.1:1\",".repeat(1022)),
            ),
            route("read_timeout = \"1ms\""),
            limits("request_rate = \"1/s\"\nrequest_burst = 1"),
        ] {
            assert!(parse(&fine).is_ok(), "{fine}");
        }
    }
}
