//! TLS termination: turning a listener's `tls` table into a [`TlsAcceptor`] (certificates,
//! SNI choice, protocol policy, session resumption), and [`stream`], the [`Stream`] that
//! speaks TLS over a worker's socket.
//!
//! rustls is driven directly, not through tokio-rustls: the data plane is owned-buffer
//! io_uring I/O ([`crate::io`]), not tokio's `AsyncRead`/`AsyncWrite`. The acceptor is an
//! immutable `Arc<ServerConfig>` shared by every worker; a reload builds a new one
//! ([`TlsAcceptor::rebuild`] keeps the session-ticket keys and the session cache), new
//! handshakes use it, and connections already up keep the certificate they were given.
//!
//! Policy: TLS 1.2 and 1.3 only, rustls' default cipher suites (AEAD, forward secret) in the
//! server's order of preference, AES-128-GCM first ([`provider`]), ALPN `http/1.1`, no 0-RTT
//! (replayable), resumption by tickets and by a server-side session cache.
//! `docs/design/tls.md` has the design and its non-goals.
//!
//! [`Stream`]: crate::io::Stream

pub mod stream;

pub use stream::{accept, accept_with_prefix, HandshakeInfo, TlsStream};

use crate::config::TlsConfig;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, ServerConfig, ServerSessionMemoryCache};
use rustls::server::{ProducesTickets, StoresServerSessions};
use rustls::sign::CertifiedKey;
use rustls::{CipherSuite, SupportedCipherSuite};
use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Sessions kept for resumption by session ID (TLS 1.2 clients that do not take tickets) and
/// by stateful TLS 1.3 tickets; about 200 bytes each, shared by all workers.
pub(crate) const SESSION_CACHE_SIZE: usize = 64 * 1024;

/// The cryptography under rustls: aws-lc-rs's with the default `aws-lc` feature, ring's
/// without it. aws-lc-rs signs RSA 2048 with its AVX-512 code and seals AES-GCM records with
/// VAES where the CPU has them, and cost less CPU than ring in every TLS scenario of the bench
/// (`docs/benchmarks.md`, "TLS, third pass (issue 13)").
#[cfg(feature = "aws-lc")]
use rustls::crypto::aws_lc_rs as crypto;
#[cfg(not(feature = "aws-lc"))]
use rustls::crypto::ring as crypto;

/// The only application protocol offered: the proxy speaks HTTP/1.1 to clients.
const ALPN_HTTP_1_1: &[u8] = b"http/1.1";

/// TLS 1.3 session tickets sent after a full handshake: two, so a client can open two
/// resumed connections at once (tickets are single-use, RFC 8446 §C.4).
pub(crate) const TICKETS_WHEN_FULL: usize = 2;

/// TLS 1.3 session tickets sent after a handshake whose ClientHello offered one: one, to
/// replace the ticket it spent, as OpenSSL (nginx) does. Each ticket costs random values, an
/// HKDF, an AEAD seal and about 250 bytes on the wire on every reconnect.
pub(crate) const TICKETS_WHEN_RESUMING: usize = 1;

/// Why a TLS acceptor could not be built or a handshake failed. The `kind` of a handshake
/// failure is its metric label ([`TlsError::metric_label`]).
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A certificate or key file is missing, unreadable, not PEM, or does not fit its pair.
    /// Always names the file, so `gateway check` and `/reload` can point at it.
    #[error("{}: {reason}", path.display())]
    File { path: PathBuf, reason: String },
    /// The `tls` table itself is unusable (no certificate).
    #[error("{0}")]
    Config(String),
    /// The client did not finish the handshake within the deadline.
    #[error("TLS handshake timed out")]
    Timeout,
    /// The client spoke something other than acceptable TLS: not a ClientHello, an old
    /// protocol version, no common cipher suite or ALPN protocol, a bad record.
    #[error("TLS handshake failed: {0}")]
    Protocol(rustls::Error),
    /// The connection failed or closed during the handshake.
    #[error("connection lost during TLS handshake: {0}")]
    Io(io::Error),
}

impl TlsError {
    /// The `result` label of `gateway_tls_handshakes_total` for a failed handshake (a
    /// successful one takes [`HandshakeInfo::metric_label`]).
    pub fn metric_label(&self) -> &'static str {
        match self {
            TlsError::Timeout => "timeout",
            TlsError::Protocol(_) => "protocol_error",
            TlsError::Io(_) => "client_gone",
            TlsError::File { .. } | TlsError::Config(_) => "config_error",
        }
    }
}

/// Everything new handshakes on one listener need: certificates, policy, resumption state.
/// Cheap to clone; `Send + Sync`, built once per config and shared by all workers.
#[derive(Clone)]
pub struct TlsAcceptor {
    /// For handshakes whose ClientHello offers no session to resume: full handshakes.
    config: Arc<ServerConfig>,
    /// The same, sending [`TICKETS_WHEN_RESUMING`] TLS 1.3 tickets instead of
    /// [`TICKETS_WHEN_FULL`]: for ClientHellos that offer a ticket (`pre_shared_key`).
    resuming: Arc<ServerConfig>,
    /// The DNS names the certificates cover, in config order, for logs and reload summaries.
    names: Arc<[String]>,
}

impl std::fmt::Debug for TlsAcceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsAcceptor")
            .field("names", &self.names)
            .finish_non_exhaustive()
    }
}

impl TlsAcceptor {
    /// Loads every certificate and key of `tls` (paths relative to `base_dir`, the config
    /// file's directory) with fresh session-resumption state.
    pub fn from_config(tls: &TlsConfig, base_dir: &Path) -> Result<TlsAcceptor, TlsError> {
        let ticketer = crypto::Ticketer::new()
            .map_err(|e| TlsError::Config(format!("cannot create session ticket keys: {e}")))?;
        let cache: Arc<dyn StoresServerSessions> =
            ServerSessionMemoryCache::new(SESSION_CACHE_SIZE);
        build(tls, base_dir, ticketer, cache)
    }

    /// Like [`from_config`](Self::from_config), but keeps this acceptor's ticket keys and
    /// session cache, so clients resume across a reload instead of paying a full handshake.
    pub fn rebuild(&self, tls: &TlsConfig, base_dir: &Path) -> Result<TlsAcceptor, TlsError> {
        build(
            tls,
            base_dir,
            self.config.ticketer.clone(),
            self.config.session_storage.clone(),
        )
    }

    /// The DNS names (exact and `*.` wildcards) the certificates cover, in config order.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// The configuration for a handshake: `offers_ticket` if the ClientHello offers a
    /// session to resume (TLS 1.3 `pre_shared_key`), which changes only how many tickets
    /// are sent.
    pub(crate) fn server_config(&self, offers_ticket: bool) -> &Arc<ServerConfig> {
        if offers_ticket {
            &self.resuming
        } else {
            &self.config
        }
    }
}

/// ALPN per listener (issue 12: TLS listeners offer `h2`, then `http/1.1`). Kept apart
/// from the loading above; the HTTP/2 spike and, later, the listener use it.
impl TlsAcceptor {
    /// The same certificates and resumption state, offering `protocols` in ALPN (in order
    /// of preference, e.g. `[b"h2", b"http/1.1"]`).
    pub fn with_alpn(&self, protocols: &[&[u8]]) -> TlsAcceptor {
        let alpn = |config: &ServerConfig| {
            let mut config = config.clone();
            config.alpn_protocols = protocols.iter().map(|p| p.to_vec()).collect();
            Arc::new(config)
        };
        TlsAcceptor {
            config: alpn(&self.config),
            resuming: alpn(&self.resuming),
            names: self.names.clone(),
        }
    }
}

fn build(
    tls: &TlsConfig,
    base_dir: &Path,
    ticketer: Arc<dyn ProducesTickets>,
    cache: Arc<dyn StoresServerSessions>,
) -> Result<TlsAcceptor, TlsError> {
    let provider = Arc::new(provider());
    let mut resolver = SniResolver::default();
    let mut names = Vec::new();
    for (i, c) in tls.certificates.iter().enumerate() {
        let key = load_certified_key(&provider, &base_dir.join(&c.cert), &base_dir.join(&c.key))?;
        let cert_names = dns_names(&key, &base_dir.join(&c.cert))?;
        if cert_names.is_empty() && i > 0 {
            // Only the first certificate serves clients whose name matches none.
            tracing::warn!(
                cert = %base_dir.join(&c.cert).display(),
                "certificate has no DNS name in subjectAltName: SNI can never select it"
            );
        }
        let key = Arc::new(key);
        if i == 0 {
            resolver.default = Some(key.clone());
        }
        for name in cert_names {
            let table = match name.strip_prefix("*.") {
                Some(suffix) => resolver.wildcard.entry(suffix.to_owned()),
                None => resolver.exact.entry(name.clone()),
            };
            table.or_default().push(key.clone());
            names.push(name);
        }
    }
    if resolver.default.is_none() {
        return Err(TlsError::Config("needs at least one certificate".into()));
    }
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Config(format!("TLS policy: {e}")))?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));
    config.alpn_protocols = vec![ALPN_HTTP_1_1.to_vec()];
    // Our order, not the client's: see `provider`.
    config.ignore_client_order = true;
    config.ticketer = ticketer;
    config.session_storage = cache;
    // 0-RTT data can be replayed by an attacker; a proxy cannot know which requests are
    // idempotent upstream. rustls' default is already 0; stated here because it matters.
    config.max_early_data_size = 0;
    config.send_tls13_tickets = TICKETS_WHEN_FULL;
    let mut resuming = config.clone();
    resuming.send_tls13_tickets = TICKETS_WHEN_RESUMING;
    Ok(TlsAcceptor {
        config: Arc::new(config),
        resuming: Arc::new(resuming),
        names: names.into(),
    })
}

/// The crypto provider of every TLS listener: rustls' default suites, key exchange groups and
/// signature algorithms, with the cipher suites in our order of preference (the acceptor
/// ignores the client's): AES-128-GCM, then AES-256-GCM, then ChaCha20-Poly1305, in each
/// protocol version.
///
/// Why AES-128 first: OpenSSL clients (curl, wrk, most libraries) list AES-256-GCM-SHA384
/// first, and in TLS 1.3 the suite's hash runs the whole key schedule (RFC 8446 §7.1: about
/// twenty HMACs per handshake, more with a ticket). The provider's SHA-384 has no vector code
/// on AMD CPUs and took 10 % of the gateway's CPU on resumed handshakes, where SHA-256 runs
/// on the CPU's SHA instructions. AES-128-GCM is what browsers, Go and BoringSSL servers pick
/// first anyway, with 128-bit security. The cost: a client without AES instructions that
/// prefers ChaCha20 gets AES-GCM too.
pub(crate) fn provider() -> CryptoProvider {
    let mut provider = crypto::default_provider();
    provider.cipher_suites.sort_by_key(suite_rank);
    provider
}

/// Makes [`provider`] rustls' process-wide default. Called once at start, before any
/// rustls configuration is built without an explicit provider (redis' `rediss://` client
/// builds its own with `ClientConfig::builder()`): with both ring and aws-lc-rs compiled into
/// rustls (the `aws-lc` feature; ring stays for other uses), rustls cannot pick one itself
/// and would panic there. A second call (tests starting several runtimes) changes nothing.
pub fn install_process_default() {
    let _ = provider().install_default();
}

/// Lower is preferred; the sort is stable, so rustls' order stands among equals.
fn suite_rank(suite: &SupportedCipherSuite) -> u8 {
    match suite.suite() {
        CipherSuite::TLS13_AES_128_GCM_SHA256
        | CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
        | CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 => 0,
        CipherSuite::TLS13_AES_256_GCM_SHA384
        | CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384
        | CipherSuite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384 => 1,
        _ => 2,
    }
}

/// Reads a PEM certificate chain (leaf first) and its private key (PKCS#8, PKCS#1 RSA or
/// SEC1 EC), and checks that they belong together.
fn load_certified_key(
    provider: &CryptoProvider,
    cert_path: &Path,
    key_path: &Path,
) -> Result<CertifiedKey, TlsError> {
    let file_err = |path: &Path, reason: String| TlsError::File {
        path: path.to_owned(),
        reason,
    };
    let cert_pem =
        std::fs::read(cert_path).map_err(|e| file_err(cert_path, format!("cannot read: {e}")))?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_err(cert_path, format!("not a PEM certificate file: {e}")))?;
    if chain.is_empty() {
        return Err(file_err(
            cert_path,
            "no certificate in it (expected PEM \"-----BEGIN CERTIFICATE-----\")".into(),
        ));
    }
    let key_pem =
        std::fs::read(key_path).map_err(|e| file_err(key_path, format!("cannot read: {e}")))?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
        file_err(
            key_path,
            format!("no usable private key in it (PKCS#8, RSA or EC PEM): {e}"),
        )
    })?;
    let key = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| file_err(key_path, format!("unsupported private key: {e}")))?;
    let certified = CertifiedKey::new(chain, key);
    certified.keys_match().map_err(|e| {
        file_err(
            key_path,
            format!("does not match certificate {}: {e}", cert_path.display()),
        )
    })?;
    Ok(certified)
}

/// The DNS names in the leaf certificate's subjectAltName, lower-cased. The subject CN is not
/// consulted: browsers have ignored it since 2017 (RFC 6125 §6.4.4 made it a fallback only).
fn dns_names(key: &CertifiedKey, cert_path: &Path) -> Result<Vec<String>, TlsError> {
    let leaf = &key.cert[0];
    let parsed = webpki::EndEntityCert::try_from(leaf).map_err(|e| TlsError::File {
        path: cert_path.to_owned(),
        reason: format!("cannot parse the certificate: {e}"),
    })?;
    Ok(parsed
        .valid_dns_names()
        .map(|n| n.trim_end_matches('.').to_ascii_lowercase())
        .collect())
}

/// Picks the certificate for a ClientHello: the SNI name exactly, else a `*.` wildcard one
/// label up (`*.example.com` covers `a.example.com`, not `example.com` nor `a.b.example.com`,
/// RFC 6125 §6.4.3), else the first certificate of the config. Among certificates for the same
/// name (say RSA and ECDSA), the first in config order whose key can sign with a scheme the
/// client offers.
#[derive(Debug, Default)]
struct SniResolver {
    exact: HashMap<String, Vec<Arc<CertifiedKey>>>,
    /// Keyed by the part after `*.`.
    wildcard: HashMap<String, Vec<Arc<CertifiedKey>>>,
    default: Option<Arc<CertifiedKey>>,
}

impl SniResolver {
    fn candidates(&self, name: &str) -> Option<&[Arc<CertifiedKey>]> {
        if let Some(keys) = self.exact.get(name) {
            return Some(keys);
        }
        let (_, parent) = name.split_once('.')?;
        self.wildcard.get(parent).map(Vec::as_slice)
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        // rustls hands the SNI over validated and lower-cased.
        let found = hello.server_name().and_then(|name| self.candidates(name));
        let Some(keys) = found else {
            return self.default.clone();
        };
        let schemes = hello.signature_schemes();
        keys.iter()
            .find(|k| k.key.choose_scheme(schemes).is_some())
            .or(keys.first())
            .cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::{install_process_default, provider};
    use rustls::crypto::CryptoProvider;

    /// With both providers compiled into rustls, a configuration built without an explicit
    /// provider (redis' `rediss://` client) panics unless the process default is installed;
    /// after `install_process_default` it is ours, with our cipher-suite order.
    #[test]
    fn the_process_default_is_the_listeners_provider() {
        install_process_default();
        install_process_default();
        let installed = CryptoProvider::get_default().expect("a process default");
        let ours = provider();
        let suites = |p: &CryptoProvider| {
            p.cipher_suites
                .iter()
                .map(|s| s.suite())
                .collect::<Vec<_>>()
        };
        assert_eq!(suites(installed), suites(&ours));
        let _ = rustls::ClientConfig::builder();
    }
}
