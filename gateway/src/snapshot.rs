//! The running configuration compiled into one immutable snapshot: the only form of the
//! config the data plane reads. A reload builds a new snapshot and swaps it in; each
//! request takes the snapshot current when its head arrived and keeps it to the end, so
//! in-flight work never sees a half-applied config.

use crate::config::{AccessFormat, Config, ConfigErrors, LoadedConfig};
use crate::policy::route::Router;
use crate::protocol::tls::TlsAcceptor;
use crate::upstream::{Resolved, Upstream};
use ipnet::IpNet;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Settings of the `[server]` table the data plane reads per request.
#[derive(Debug, Clone)]
pub struct ServerSettings {
    pub keepalive_timeout: Duration,
    /// `server.keepalive_park_after`; zero: idle connections never park.
    pub keepalive_park_after: Duration,
    pub header_timeout: Duration,
    pub max_header_bytes: usize,
    pub graceful_timeout: Duration,
    pub max_connections: usize,
    /// Pipes each worker's pool may hold for spliced tunnels (`budget::pipes_per_worker`).
    pub(crate) pipes_per_worker: usize,
    pub request_buffering: usize,
    pub client_body_timeout: Duration,
    pub client_min_rate: u64,
    /// `server.splice_bodies_min`: body bytes left at least worth splicing; 0: never.
    pub(crate) splice_bodies_min: u64,
    /// Worker threads (`server.workers`, resolved): the request limiter's share of the rate.
    pub workers: usize,
    /// `server.forward_client_headers`: client-supplied forwarding headers kept.
    pub forward_client_headers: Vec<String>,
    /// `server.underscores_in_headers`.
    pub underscores_in_headers: bool,
    /// The `[limits]` table, for the per-worker request limiter.
    pub limits: crate::config::LimitsConfig,
}

/// One listener's settings, compiled: the data plane never reads `[[listener]]` itself. A
/// bound listener holds the `ListenerSettings` of the snapshot that bound it (refreshed by
/// a reload that changes none of [`ListenerSettings::identity`]), and every connection it
/// accepts reads its settings from there, never by name from a later snapshot.
#[derive(Debug, Clone)]
pub struct ListenerSettings {
    pub name: String,
    pub listen: SocketAddr,
    pub trusted_proxies: Vec<IpNet>,
    pub proxy_protocol: bool,
    /// Peers whose PROXY header is believed; empty: every peer.
    pub proxy_protocol_from: Vec<IpNet>,
    /// The TLS acceptor (certificates, session cache, ticket keys) of a TLS listener,
    /// offering the listener's ALPN protocols.
    pub tls: Option<TlsAcceptor>,
    /// ALPN as offered (TLS listeners; empty on plaintext ones).
    pub alpn: Vec<String>,
    /// h2c with prior knowledge (plaintext listeners).
    pub h2c: bool,
}

/// The `[http2]` table, compiled (defaults resolved against `[server]`).
#[derive(Debug, Clone)]
pub struct Http2Settings {
    pub max_concurrent_streams: u32,
    pub max_requests_per_connection: u64,
    pub idle_timeout: Duration,
    pub max_header_list_size: u32,
    pub max_control_frames_per_second: u32,
    pub websocket: bool,
}

#[derive(Debug)]
pub struct Snapshot {
    pub generation: u64,
    pub path: PathBuf,
    pub config: Config,
    pub router: Router,
    pub upstreams: Vec<Arc<Upstream>>,
    pub server: ServerSettings,
    pub http2: Http2Settings,
    pub listeners: Vec<Arc<ListenerSettings>>,
    pub(crate) access_format: AccessFormat,
    pub(crate) access_enabled: bool,
}

impl Snapshot {
    /// Builds the snapshot for a validated config. Upstreams unchanged from `previous`
    /// are reused as they are (their workers' idle pools carry over).
    pub fn build(
        loaded: LoadedConfig,
        generation: u64,
        previous: Option<&Snapshot>,
    ) -> Result<Snapshot, ConfigErrors> {
        Self::build_resolved(loaded, generation, previous, &|_| Resolved::new())
    }

    /// [`Snapshot::build`] with the addresses each upstream's names resolved to
    /// (`upstream::dns::Dns::resolved`).
    pub fn build_resolved(
        loaded: LoadedConfig,
        generation: u64,
        previous: Option<&Snapshot>,
        resolved: &dyn Fn(&str) -> Resolved,
    ) -> Result<Snapshot, ConfigErrors> {
        // Certificates and keys are read here, once per load (config validation does not
        // touch them). A listener that had an acceptor keeps its ticket keys and session
        // cache (clients resume across a reload); new certificates apply to new handshakes.
        // Every listener's failure is reported, each at its `tls` key's line.
        let base = loaded.path.parent().unwrap_or(Path::new(".")).to_path_buf();
        let mut listeners = Vec::with_capacity(loaded.config.listeners.len());
        let mut errors = Vec::new();
        for (i, spanned) in loaded.config.listeners.iter().enumerate() {
            let l = spanned.get_ref();
            let tls = match &l.tls {
                None => None,
                Some(tls) => {
                    let old = previous
                        .and_then(|p| p.listener(&l.name))
                        .and_then(|s| s.tls.as_ref());
                    let built = match old {
                        Some(old) => old.rebuild(tls, &base),
                        None => TlsAcceptor::from_config(tls, &base),
                    };
                    let alpn = Config::listener_alpn(l);
                    let alpn: Vec<&[u8]> = alpn.iter().map(|p| p.as_bytes()).collect();
                    match built {
                        Ok(acceptor) => Some(acceptor.with_alpn(&alpn)),
                        Err(e) => {
                            let table = format!("listener[{i}]");
                            errors.push(loaded.error_at(
                                spanned.span(),
                                &table,
                                "tls",
                                e.to_string(),
                            ));
                            continue;
                        }
                    }
                }
            };
            let listen = match l.listen.parse() {
                Ok(addr) => addr,
                Err(e) => {
                    let table = format!("listener[{i}]");
                    errors.push(loaded.error_at(spanned.span(), &table, "listen", format!("{e}")));
                    continue;
                }
            };
            listeners.push(Arc::new(ListenerSettings {
                name: l.name.clone(),
                listen,
                trusted_proxies: l.trusted_proxies.clone(),
                proxy_protocol: l.proxy_protocol,
                proxy_protocol_from: l.proxy_protocol_from.clone(),
                alpn: if tls.is_some() {
                    Config::listener_alpn(l)
                } else {
                    Vec::new()
                },
                tls,
                h2c: l.h2c,
            }));
        }
        if !errors.is_empty() {
            return Err(ConfigErrors(errors));
        }
        let config = loaded.config;
        let old: &[Arc<Upstream>] = previous.map(|p| p.upstreams.as_slice()).unwrap_or(&[]);
        let own = own_sockets(&listeners, &config);
        let upstreams = config
            .upstreams
            .iter()
            .map(|u| Upstream::build_resolved(u.get_ref(), old, &resolved(&u.get_ref().name), &own))
            .collect();
        let router = Router::build(&config);
        let s = &config.server;
        let nofile = crate::util::budget::nofile();
        let max_connections = s
            .max_connections
            .unwrap_or_else(|| crate::util::budget::default_max_connections(nofile));
        Ok(Snapshot {
            generation,
            path: loaded.path,
            router,
            upstreams,
            server: ServerSettings {
                keepalive_timeout: s.keepalive_timeout.0,
                keepalive_park_after: s.keepalive_park_after.0,
                header_timeout: s.header_timeout.0,
                max_header_bytes: s.max_header_bytes.0 as usize,
                graceful_timeout: s.graceful_timeout.0,
                max_connections,
                pipes_per_worker: crate::util::budget::pipes_per_worker(
                    nofile,
                    max_connections,
                    config.effective_workers(),
                ),
                request_buffering: s.request_buffering.0 as usize,
                client_body_timeout: s.client_body_timeout.0,
                client_min_rate: s.client_min_rate.0,
                splice_bodies_min: s.splice_bodies_min.0,
                workers: config.effective_workers(),
                forward_client_headers: s.forward_client_headers.clone(),
                underscores_in_headers: s.underscores_in_headers,
                limits: config.limits.clone(),
            },
            http2: Http2Settings {
                max_concurrent_streams: config.http2.max_concurrent_streams,
                max_requests_per_connection: config.http2.max_requests_per_connection,
                idle_timeout: config
                    .http2
                    .idle_timeout
                    .as_ref()
                    .map_or(s.keepalive_timeout.0, |d| d.0),
                max_header_list_size: config
                    .http2
                    .max_header_list_size
                    .as_ref()
                    .map_or(s.max_header_bytes.0, |n| n.0)
                    as u32,
                max_control_frames_per_second: config.http2.max_control_frames_per_second,
                websocket: config.http2.websocket,
            },
            listeners,
            access_format: config.log.format,
            access_enabled: config.log.access != "off",
            config,
        })
    }

    /// A copy of this snapshot at `generation` with the upstreams named in `names` rebuilt
    /// from `resolved` (their names' new addresses): what the DNS refresh installs. Every
    /// other upstream is the same `Arc` (its pools carry over); routes keep their indices.
    pub fn with_resolved(
        &self,
        generation: u64,
        names: &[String],
        resolved: &dyn Fn(&str) -> Resolved,
    ) -> Snapshot {
        let upstreams = self
            .upstreams
            .iter()
            .map(|u| {
                if names.contains(&u.name) {
                    Upstream::build_resolved(
                        &u.config,
                        &self.upstreams,
                        &resolved(&u.name),
                        &own_sockets(&self.listeners, &self.config),
                    )
                } else {
                    u.clone()
                }
            })
            .collect();
        Snapshot {
            generation,
            path: self.path.clone(),
            config: self.config.clone(),
            router: Router::build(&self.config),
            upstreams,
            server: self.server.clone(),
            http2: self.http2.clone(),
            listeners: self.listeners.clone(),
            access_format: self.access_format,
            access_enabled: self.access_enabled,
        }
    }

    /// The listener named `name`: for the control plane (a reload carrying a listener's
    /// TLS state over). The data plane reads a connection's listener from its `ListenerCtx`.
    pub fn listener(&self, name: &str) -> Option<&ListenerSettings> {
        self.listeners.iter().find(|l| l.name == name).map(|l| &**l)
    }
}

/// What identifies a bound listener: address, name, whether it terminates TLS, whether it
/// expects a PROXY header. A reload that changes any of these binds a new socket (the old
/// one's connections carry on with their settings); any other change is applied in place.
pub(crate) type ListenerIdentity = (SocketAddr, String, bool, bool);

impl ListenerSettings {
    pub fn identity(&self) -> ListenerIdentity {
        (
            self.listen,
            self.name.clone(),
            self.tls.is_some(),
            self.proxy_protocol,
        )
    }

    /// `"https"` on a TLS listener, else `"http"` (`X-Forwarded-Proto`, the access log).
    pub fn proto(&self) -> &'static str {
        if self.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }

    /// Whether a PROXY header from `peer` is believed: only a listed balancer may name
    /// the client (an empty list believes every peer).
    pub(crate) fn proxy_trusted(&self, peer: IpAddr) -> bool {
        self.proxy_protocol_from.is_empty()
            || self.proxy_protocol_from.iter().any(|n| n.contains(&peer))
    }

    /// Whether a connection accepted with these settings may carry on serving under
    /// `now` (the same listener in a later snapshot): an HTTP/2 connection is sent GOAWAY
    /// when a reload changes or removes its listener.
    pub(crate) fn same_as(&self, now: &ListenerSettings) -> bool {
        self.identity() == now.identity()
            && self.trusted_proxies == now.trusted_proxies
            && self.proxy_protocol_from == now.proxy_protocol_from
            && self.alpn == now.alpn
            && self.h2c == now.h2c
    }

    /// The listener offers HTTP/2: ALPN `h2` on TLS, h2c on plaintext.
    pub fn offers_h2(&self) -> bool {
        self.h2c || self.alpn.iter().any(|p| p == "h2")
    }

    pub fn trusts(&self, ip: IpAddr) -> bool {
        self.trusted_proxies.iter().any(|net| net.contains(&ip))
    }
}

/// The gateway's own listening sockets (listeners and admin): a name must not resolve to one.
fn own_sockets(listeners: &[Arc<ListenerSettings>], config: &Config) -> Vec<SocketAddr> {
    let mut own: Vec<SocketAddr> = listeners.iter().map(|l| l.listen).collect();
    own.extend(config.admin.listen.parse::<SocketAddr>().ok());
    own
}
