//! TLS termination end to end: a real io_uring runtime accepts on a real socket and wraps it in
//! `tls::accept`; rustls clients, curl and openssl talk to it. Certificates are made here with
//! rcgen (ECDSA) and the openssl CLI (RSA), signed by a throwaway CA.

use bytes::BytesMut;
use gateway::config::{CertificateConfig, TlsConfig};
use gateway::io::{EpollStream, Stream, UringStream};
use gateway::protocol::tls::{self, HandshakeInfo, TlsAcceptor, TlsError, TlsStream};
use gateway_test_support::tls::{provider, AcceptAnyCertificate};
use rustls::client::Tls12Resumption;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, HandshakeKind, RootCertStore};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------
// Certificates.

/// A directory of test certificates, removed on drop.
struct Certs {
    dir: PathBuf,
    ca_der: CertificateDer<'static>,
}

impl Drop for Certs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn temp_dir(tag: &str) -> PathBuf {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "gateway-tls-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A CA, then under `dir`: `a.crt`/`a.key` (ECDSA P-256, `a.test`), `b.crt`/`b.key` (RSA
/// 2048 with a PKCS#1 key file, `*.b.test` and `b.test`), `c.crt`/`c.key` (ECDSA, `b.test`),
/// `ca.crt`.
fn make_certs() -> Certs {
    let dir = temp_dir("certs");
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "gateway test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    std::fs::write(dir.join("ca.crt"), ca.pem()).unwrap();

    let leaf = |names: &[&str], key: &rcgen::KeyPair| {
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        rcgen::CertificateParams::new(names)
            .unwrap()
            .signed_by(key, &ca, &ca_key)
            .unwrap()
    };

    let a_key = rcgen::KeyPair::generate().unwrap();
    std::fs::write(dir.join("a.crt"), leaf(&["a.test"], &a_key).pem()).unwrap();
    std::fs::write(dir.join("a.key"), a_key.serialize_pem()).unwrap();
    let c_key = rcgen::KeyPair::generate().unwrap();
    std::fs::write(dir.join("c.crt"), leaf(&["b.test"], &c_key).pem()).unwrap();
    std::fs::write(dir.join("c.key"), c_key.serialize_pem()).unwrap();

    // ring cannot generate RSA keys; openssl can.
    let pkcs8 = dir.join("b.pkcs8.key");
    openssl(&[
        "genpkey",
        "-algorithm",
        "RSA",
        "-pkeyopt",
        "rsa_keygen_bits:2048",
        "-out",
        pkcs8.to_str().unwrap(),
    ]);
    let b_key = rcgen::KeyPair::from_pem_and_sign_algo(
        &std::fs::read_to_string(&pkcs8).unwrap(),
        &rcgen::PKCS_RSA_SHA256,
    )
    .unwrap();
    std::fs::write(
        dir.join("b.crt"),
        leaf(&["*.b.test", "b.test"], &b_key).pem(),
    )
    .unwrap();
    // The server gets the key as "BEGIN RSA PRIVATE KEY" (PKCS#1), the other common format.
    openssl(&[
        "pkey",
        "-in",
        pkcs8.to_str().unwrap(),
        "-traditional",
        "-out",
        dir.join("b.key").to_str().unwrap(),
    ]);
    Certs {
        dir,
        ca_der: ca.der().clone(),
    }
}

fn openssl(args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("the openssl CLI is needed to make RSA test keys (Debian package openssl)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn tls_config(pairs: &[(&str, &str)]) -> TlsConfig {
    TlsConfig {
        certificates: pairs
            .iter()
            .map(|(cert, key)| CertificateConfig {
                cert: cert.into(),
                key: key.into(),
            })
            .collect(),
    }
}

/// The acceptor every server test uses: `a` (ECDSA) first, so it is the default; then `b`.
fn acceptor(certs: &Certs) -> TlsAcceptor {
    TlsAcceptor::from_config(
        &tls_config(&[("a.crt", "a.key"), ("b.crt", "b.key")]),
        &certs.dir,
    )
    .unwrap()
}

// ---------------------------------------------------------------------------------------
// The server: a tokio-uring runtime on its own thread, like a worker.

#[derive(Clone, Copy)]
enum Mode {
    /// Echo every byte until EOF, then close_notify + FIN.
    Echo,
    /// Read one request head, answer with a body naming the handshake, close.
    Http,
    /// Read `n` bytes while writing `n` bytes (one stream, two futures), then write the
    /// FNV-1a hash of what was read.
    Duplex(usize),
}

type Outcome = Result<HandshakeInfo, &'static str>;

struct Server {
    addr: SocketAddr,
    outcomes: mpsc::Receiver<Outcome>,
    listener_fd: i32,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    fn start(acceptor: TlsAcceptor, timeout: Duration, mode: Mode) -> Server {
        Server::start_with(acceptor, timeout, mode, false, false)
    }

    /// `line_first`: each connection starts with a plaintext line (standing in for a PROXY
    /// protocol header) that the server reads off the socket before the TLS handshake.
    /// `epoll`: sockets driven by readiness ([`EpollStream`]) instead of io_uring.
    fn start_with(
        acceptor: TlsAcceptor,
        timeout: Duration,
        mode: Mode,
        line_first: bool,
        epoll: bool,
    ) -> Server {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let listener_fd = listener.as_raw_fd();
        let (tx, outcomes) = mpsc::channel();
        let conn = Conn {
            acceptor,
            timeout,
            mode,
            line_first,
            tx,
        };
        let thread = std::thread::spawn(move || {
            // Shutting the listening socket down (Drop) fails the pending accept.
            tokio_uring::start(async move {
                if epoll {
                    let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                    while let Ok((socket, _)) = listener.accept().await {
                        tokio_uring::spawn(conn.clone().run(EpollStream::new(socket)));
                    }
                } else {
                    let listener = tokio_uring::net::TcpListener::from_std(listener);
                    while let Ok((socket, _)) = listener.accept().await {
                        tokio_uring::spawn(conn.clone().run(UringStream::new(socket)));
                    }
                }
            })
        });
        Server {
            addr,
            outcomes,
            listener_fd,
            thread: Some(thread),
        }
    }

    fn outcome(&self) -> Outcome {
        self.outcomes
            .recv_timeout(WAIT)
            .expect("the server reports every handshake")
    }
}

/// What the server does with each accepted connection.
#[derive(Clone)]
struct Conn {
    acceptor: TlsAcceptor,
    timeout: Duration,
    mode: Mode,
    line_first: bool,
    tx: mpsc::Sender<Outcome>,
}

impl Conn {
    async fn run<S: Stream>(self, socket: S) {
        let mut read_ahead = BytesMut::with_capacity(4096);
        while self.line_first && !read_ahead.contains(&b'\n') {
            let (res, b) = socket.read(read_ahead).await;
            read_ahead = b;
            assert!(matches!(res, Ok(n) if n > 0));
        }
        if self.line_first {
            let end = read_ahead.iter().position(|&b| b == b'\n').unwrap();
            let _ = read_ahead.split_to(end + 1);
        }
        let accepted = tls::accept_with_prefix(&self.acceptor, socket, read_ahead, self.timeout);
        match accepted.await {
            Ok(stream) => {
                let _ = self.tx.send(Ok(stream.handshake().clone()));
                serve(self.mode, stream).await;
            }
            Err(e) => {
                let _ = self.tx.send(Err(e.metric_label()));
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // SAFETY: shutdown on the listening socket the server thread owns.
        unsafe { libc::shutdown(self.listener_fd, libc::SHUT_RDWR) };
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn serve<S: Stream>(mode: Mode, s: TlsStream<S>) {
    match mode {
        Mode::Echo => {
            let mut buf = BytesMut::with_capacity(64 * 1024);
            loop {
                let (res, b) = s.read(buf).await;
                buf = b;
                match res {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let (res, b) = s.write_all(buf).await;
                        buf = b;
                        buf.clear();
                        if res.is_err() {
                            return;
                        }
                    }
                }
            }
            s.shutdown_write();
        }
        Mode::Http => {
            let mut buf = BytesMut::with_capacity(4096);
            while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                let (res, b) = s.read(buf).await;
                buf = b;
                if !matches!(res, Ok(n) if n > 0) {
                    return;
                }
                if buf.len() == buf.capacity() {
                    buf.reserve(4096);
                }
            }
            let info = s.handshake();
            let body = format!(
                "sni={} version={} resumed={}\n",
                s.sni().unwrap_or("-"),
                info.version,
                info.resumed
            );
            let resp = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let (res, _) = s.write_all(resp.into_bytes()).await;
            res.unwrap();
            // Dropped here: close_notify goes out from Drop.
        }
        Mode::Duplex(n) => {
            let reader = async {
                let mut hash = Fnv::new();
                let mut got = 0;
                let mut buf = BytesMut::with_capacity(64 * 1024);
                while got < n {
                    buf.clear();
                    let (res, b) = s.read(buf).await;
                    buf = b;
                    match res {
                        Ok(0) | Err(_) => break,
                        Ok(k) => {
                            hash.update(&buf[..k]);
                            got += k;
                        }
                    }
                }
                hash.0
            };
            let writer = async {
                for chunk in pattern(n).chunks(64 * 1024) {
                    let (res, _) = s.write_all(chunk.to_vec()).await;
                    res.unwrap();
                }
            };
            let (hash, ()) = tokio::join!(reader, writer);
            let (res, _) = s.write_all(hash.to_be_bytes().to_vec()).await;
            res.unwrap();
            s.shutdown_write();
            // Wait for the client's EOF so the close is orderly.
            let _ = s.read(BytesMut::with_capacity(1024)).await;
        }
    }
}

struct Fnv(u64);

impl Fnv {
    fn new() -> Fnv {
        Fnv(0xcbf29ce484222325)
    }
    fn update(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= *b as u64;
            self.0 = self.0.wrapping_mul(0x100000001b3);
        }
    }
}

/// `n` bytes that are not periodic at any small stride, so a lost or repeated chunk shows.
fn pattern(n: usize) -> Vec<u8> {
    let mut x: u32 = 0x9e3779b9;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// Clients.

fn client_config(
    certs: &Certs,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> ClientConfig {
    let mut roots = RootCertStore::empty();
    roots.add(certs.ca_der.clone()).unwrap();
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config
}

fn tls13_client(certs: &Certs) -> Arc<ClientConfig> {
    Arc::new(client_config(certs, &[&rustls::version::TLS13]))
}

type Client = rustls::StreamOwned<ClientConnection, TcpStream>;

/// Connects and completes the handshake (blocking).
fn connect(addr: SocketAddr, config: &Arc<ClientConfig>, name: &str) -> Client {
    let name = ServerName::try_from(name.to_owned()).unwrap();
    let conn = ClientConnection::new(config.clone(), name).unwrap();
    let sock = TcpStream::connect(addr).unwrap();
    sock.set_read_timeout(Some(WAIT)).unwrap();
    let mut client = rustls::StreamOwned::new(conn, sock);
    while client.conn.is_handshaking() {
        client.conn.complete_io(&mut client.sock).unwrap();
    }
    client
}

/// One echo round trip: proves the connection carries data, and (TLS 1.3) makes the client
/// read the session tickets the server sent after the handshake.
fn ping(client: &mut Client) {
    client.write_all(b"ping").unwrap();
    let mut got = [0u8; 4];
    client.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"ping");
}

/// The DNS names of the certificate the server presented.
fn peer_names(conn: &ClientConnection) -> Vec<String> {
    let leaf = &conn.peer_certificates().unwrap()[0];
    webpki::EndEntityCert::try_from(leaf)
        .unwrap()
        .valid_dns_names()
        .map(str::to_owned)
        .collect()
}

/// Sends `send` and receives `expect` bytes at the same time over one TLS connection, on a
/// non-blocking socket: neither side ever waits for the other to stop talking.
fn duplex(addr: SocketAddr, config: &Arc<ClientConfig>, send: &[u8], expect: usize) -> Vec<u8> {
    let name = ServerName::try_from("a.test").unwrap();
    let mut conn = ClientConnection::new(config.clone(), name).unwrap();
    let mut sock = TcpStream::connect(addr).unwrap();
    sock.set_nonblocking(true).unwrap();
    let mut sent = 0;
    let mut got = Vec::with_capacity(expect);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut buf = vec![0u8; 64 * 1024];
    while got.len() < expect || sent < send.len() || conn.wants_write() {
        assert!(
            Instant::now() < deadline,
            "duplex stalled: sent {sent}, got {}",
            got.len()
        );
        let mut progress = false;
        if sent < send.len() && !conn.is_handshaking() {
            let n = conn
                .writer()
                .write(&send[sent..(sent + 16 * 1024).min(send.len())])
                .unwrap();
            sent += n;
            progress |= n > 0;
        }
        while conn.wants_write() {
            match conn.write_tls(&mut sock) {
                Ok(n) => progress |= n > 0,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("write: {e}"),
            }
        }
        match conn.read_tls(&mut sock) {
            Ok(0) => break,
            Ok(_) => {
                conn.process_new_packets().unwrap();
                progress = true;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("read: {e}"),
        }
        loop {
            match conn.reader().read(&mut buf) {
                Ok(0) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(_) => break,
            }
        }
        if !progress {
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    got
}

// ---------------------------------------------------------------------------------------
// Tests.

#[test]
fn sni_picks_the_certificate_and_unknown_or_missing_names_get_the_first() {
    let certs = make_certs();
    let server = Server::start(acceptor(&certs), WAIT, Mode::Echo);
    let both = Arc::new(client_config(
        &certs,
        &[&rustls::version::TLS13, &rustls::version::TLS12],
    ));

    // Exact name: the ECDSA certificate, verified by the client against the CA.
    let mut c = connect(server.addr, &both, "a.test");
    ping(&mut c);
    assert_eq!(peer_names(&c.conn), ["a.test"]);
    assert_eq!(server.outcome().unwrap().sni.as_deref(), Some("a.test"));

    // Wildcard and exact names of the RSA certificate.
    for name in ["x.b.test", "b.test"] {
        let mut c = connect(server.addr, &both, name);
        ping(&mut c);
        assert_eq!(peer_names(&c.conn), ["*.b.test", "b.test"], "for {name}");
        assert_eq!(server.outcome().unwrap().sni.as_deref(), Some(name));
    }
    // RSA over TLS 1.2 too (ECDHE_RSA suites).
    let tls12 = Arc::new(client_config(&certs, &[&rustls::version::TLS12]));
    let mut c = connect(server.addr, &tls12, "y.b.test");
    ping(&mut c);
    assert_eq!(peer_names(&c.conn), ["*.b.test", "b.test"]);
    assert_eq!(server.outcome().unwrap().version, "TLSv1.2");

    // No SNI at all: the first certificate (which is valid for the name the client checks).
    let mut no_sni = client_config(&certs, &[&rustls::version::TLS13]);
    no_sni.enable_sni = false;
    let mut c = connect(server.addr, &Arc::new(no_sni), "a.test");
    ping(&mut c);
    assert_eq!(peer_names(&c.conn), ["a.test"]);
    assert_eq!(server.outcome().unwrap().sni, None);

    // A name no certificate covers, nor a wildcard one label too deep: the first too.
    let mut any = client_config(&certs, &[&rustls::version::TLS13]);
    any.dangerous()
        .set_certificate_verifier(AcceptAnyCertificate::new());
    let any = Arc::new(any);
    for name in ["unknown.test", "deep.x.b.test"] {
        let mut c = connect(server.addr, &any, name);
        ping(&mut c);
        assert_eq!(peer_names(&c.conn), ["a.test"], "for {name}");
        assert_eq!(server.outcome().unwrap().sni.as_deref(), Some(name));
    }
}

#[test]
fn among_certificates_for_one_name_the_first_the_client_can_verify_wins() {
    let certs = make_certs();
    let acceptor = TlsAcceptor::from_config(
        &tls_config(&[("a.crt", "a.key"), ("c.crt", "c.key"), ("b.crt", "b.key")]),
        &certs.dir,
    )
    .unwrap();
    let server = Server::start(acceptor, WAIT, Mode::Echo);
    // A client that offers every scheme gets the ECDSA certificate, listed first.
    let mut c = connect(server.addr, &tls13_client(&certs), "b.test");
    ping(&mut c);
    assert_eq!(peer_names(&c.conn), ["b.test"]);
    // A client that offers only RSA signature schemes gets the RSA one.
    let mut rsa_only = (*provider()).clone();
    let algs = &mut rsa_only.signature_verification_algorithms;
    let mapping: Vec<_> = algs
        .mapping
        .iter()
        .filter(|(scheme, _)| format!("{scheme:?}").starts_with("RSA"))
        .cloned()
        .collect();
    algs.mapping = Box::leak(mapping.into_boxed_slice());
    let mut roots = RootCertStore::empty();
    roots.add(certs.ca_der.clone()).unwrap();
    let config = ClientConfig::builder_with_provider(Arc::new(rsa_only))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut c = connect(server.addr, &Arc::new(config), "b.test");
    ping(&mut c);
    assert_eq!(peer_names(&c.conn), ["*.b.test", "b.test"]);
}

#[test]
fn second_connection_resumes() {
    let certs = make_certs();
    let server = Server::start(acceptor(&certs), WAIT, Mode::Echo);
    let tls12 = || client_config(&certs, &[&rustls::version::TLS12]);
    let mut session_id_only = tls12();
    session_id_only.resumption = rustls::client::Resumption::in_memory_sessions(16)
        .tls12_resumption(Tls12Resumption::SessionIdOnly);
    let cases = [
        ("TLS 1.3 ticket", tls13_client(&certs)),
        ("TLS 1.2 ticket", Arc::new(tls12())),
        ("TLS 1.2 session cache", Arc::new(session_id_only)),
    ];
    for (case, config) in cases {
        let mut first = connect(server.addr, &config, "a.test");
        ping(&mut first);
        assert_eq!(
            first.conn.handshake_kind(),
            Some(HandshakeKind::Full),
            "{case}"
        );
        assert!(!server.outcome().unwrap().resumed, "{case}");
        drop(first);
        let mut second = connect(server.addr, &config, "a.test");
        ping(&mut second);
        assert_eq!(
            second.conn.handshake_kind(),
            Some(HandshakeKind::Resumed),
            "{case}"
        );
        let info = server.outcome().unwrap();
        assert!(info.resumed, "{case}");
        assert_eq!(info.metric_label(), "resumed");
    }
}

#[test]
fn resumption_survives_a_rebuilt_acceptor() {
    let certs = make_certs();
    let first_acceptor = acceptor(&certs);
    let rebuilt = first_acceptor
        .rebuild(
            &tls_config(&[("b.crt", "b.key"), ("a.crt", "a.key")]),
            &certs.dir,
        )
        .unwrap();
    let before = Server::start(first_acceptor, WAIT, Mode::Echo);
    let after = Server::start(rebuilt, WAIT, Mode::Echo);
    let config = tls13_client(&certs);
    let mut c = connect(before.addr, &config, "a.test");
    ping(&mut c);
    drop(c);
    let mut c = connect(after.addr, &config, "a.test");
    ping(&mut c);
    assert_eq!(c.conn.handshake_kind(), Some(HandshakeKind::Resumed));
}

/// A ClientHello offering TLS 1.1 at most (legacy_version 0x0302, no supported_versions
/// extension), with TLS 1.0-era suites.
fn tls11_client_hello() -> Vec<u8> {
    let mut body = vec![0x03, 0x02];
    body.extend([0x42; 32]); // random
    body.push(0); // session id
    let suites: [u16; 4] = [0xc013, 0xc014, 0x002f, 0x0035];
    body.extend(((suites.len() * 2) as u16).to_be_bytes());
    for s in suites {
        body.extend(s.to_be_bytes());
    }
    body.extend([1, 0]); // compression: null
    let mut handshake = vec![1]; // client_hello
    handshake.extend(&(body.len() as u32).to_be_bytes()[1..]);
    handshake.extend(body);
    let mut record = vec![0x16, 0x03, 0x01];
    record.extend((handshake.len() as u16).to_be_bytes());
    record.extend(handshake);
    record
}

/// Everything the server sends until it closes.
fn read_to_close(sock: &mut TcpStream) -> Vec<u8> {
    sock.set_read_timeout(Some(WAIT)).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match sock.read(&mut buf) {
            Ok(0) => return out,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return out,
            Err(e) => panic!("server did not close the connection: {e}"),
        }
    }
}

#[test]
fn tls_1_1_is_refused_with_a_fatal_alert() {
    let certs = make_certs();
    let server = Server::start(acceptor(&certs), WAIT, Mode::Echo);
    let mut sock = TcpStream::connect(server.addr).unwrap();
    sock.write_all(&tls11_client_hello()).unwrap();
    let answer = read_to_close(&mut sock);
    // One fatal alert record, then the close. rustls picks the certificate before it looks
    // at versions, and a TLS 1.1 hello has no signature_algorithms extension (a TLS 1.2
    // one, RFC 5246 §7.4.1.4.1), so the alert is handshake_failure (40) here rather than
    // protocol_version (70); both are fatal refusals (RFC 8446 §6.2).
    assert!(answer.len() >= 7, "answer {answer:?}");
    assert_eq!(answer[0], 0x15, "an alert record, got {answer:?}");
    assert_eq!(answer[5], 2, "a fatal alert, got {answer:?}");
    assert!(
        [40, 70].contains(&answer[6]),
        "handshake_failure or protocol_version: {answer:?}"
    );
    assert_eq!(server.outcome().unwrap_err(), "protocol_error");

    // And a real TLS 1.1 stack says the same (OpenSSL needs security level 0 to try 1.1).
    let out = Command::new("openssl")
        .args(["s_client", "-connect", &server.addr.to_string(), "-tls1_1"])
        .args(["-cipher", "DEFAULT@SECLEVEL=0", "-servername", "a.test"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "openssl -tls1_1 connected: {text}");
    assert!(
        text.contains("alert handshake failure") || text.contains("alert protocol version"),
        "openssl said: {text}"
    );
    assert!(!text.contains("Cipher is ECDHE"), "openssl said: {text}");
    assert_eq!(server.outcome().unwrap_err(), "protocol_error");
}

#[test]
fn close_notify_on_shutdown_write_and_on_drop() {
    let certs = make_certs();
    let config = tls13_client(&certs);
    // rustls clients report a close without close_notify as UnexpectedEof.
    let echo = Server::start(acceptor(&certs), WAIT, Mode::Echo);
    let mut c = connect(echo.addr, &config, "a.test");
    ping(&mut c);
    c.conn.send_close_notify();
    c.flush().unwrap();
    c.sock.shutdown(std::net::Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    c.read_to_end(&mut rest)
        .expect("shutdown_write sent close_notify");
    assert!(rest.is_empty());

    let http = Server::start(acceptor(&certs), WAIT, Mode::Http);
    let mut c = connect(http.addr, &config, "a.test");
    c.write_all(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
        .unwrap();
    let mut response = Vec::new();
    c.read_to_end(&mut response)
        .expect("dropping the stream sent close_notify");
    assert!(response.starts_with(b"HTTP/1.1 200 OK\r\n"));
}

#[test]
fn bytes_read_ahead_of_the_handshake_are_not_lost() {
    let certs = make_certs();
    let server = Server::start_with(acceptor(&certs), WAIT, Mode::Echo, true, false);
    // The line and the ClientHello in one segment, so the server's first read takes both.
    let name = ServerName::try_from("a.test").unwrap();
    let mut conn = ClientConnection::new(tls13_client(&certs), name).unwrap();
    let mut first = b"PROXY TCP4 192.0.2.1 127.0.0.1 5000 443\r\n".to_vec();
    conn.write_tls(&mut first).unwrap();
    let mut sock = TcpStream::connect(server.addr).unwrap();
    sock.set_read_timeout(Some(WAIT)).unwrap();
    sock.write_all(&first).unwrap();
    let mut client = rustls::StreamOwned::new(conn, sock);
    ping(&mut client);
    assert_eq!(server.outcome().unwrap().sni.as_deref(), Some("a.test"));
}

#[test]
fn garbage_is_closed_and_the_next_connection_is_served() {
    let certs = make_certs();
    let server = Server::start(acceptor(&certs), WAIT, Mode::Echo);
    // Plain HTTP on the TLS port, then bytes that are not TLS at all.
    for garbage in [
        &b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n"[..],
        &[0xff; 300][..],
    ] {
        let mut sock = TcpStream::connect(server.addr).unwrap();
        sock.write_all(garbage).unwrap();
        let answer = read_to_close(&mut sock);
        assert!(
            answer.is_empty() || answer[0] == 0x15,
            "only an alert, got {answer:?}"
        );
        assert_eq!(server.outcome().unwrap_err(), "protocol_error");
    }
    let mut c = connect(server.addr, &tls13_client(&certs), "a.test");
    ping(&mut c);
    assert!(server.outcome().is_ok());
}

#[test]
fn a_silent_client_times_out() {
    let certs = make_certs();
    let server = Server::start(acceptor(&certs), Duration::from_millis(300), Mode::Echo);
    let started = Instant::now();
    let mut silent = TcpStream::connect(server.addr).unwrap();
    assert_eq!(server.outcome().unwrap_err(), "timeout");
    assert!(read_to_close(&mut silent).is_empty());
    assert!(started.elapsed() < Duration::from_secs(5));
    // A client that stops halfway (a ClientHello cut short) too.
    let mut half = TcpStream::connect(server.addr).unwrap();
    half.write_all(&tls11_client_hello()[..20]).unwrap();
    assert_eq!(server.outcome().unwrap_err(), "timeout");
    assert!(read_to_close(&mut half).is_empty());
}

#[test]
fn one_mebibyte_echoes_byte_exact() {
    let certs = make_certs();
    let server = Server::start(acceptor(&certs), WAIT, Mode::Echo);
    let data = pattern(1 << 20);
    for config in [
        tls13_client(&certs),
        Arc::new(client_config(&certs, &[&rustls::version::TLS12])),
    ] {
        let got = duplex(server.addr, &config, &data, data.len());
        assert_eq!(got.len(), data.len());
        assert!(got == data, "echoed bytes differ");
        server.outcome().unwrap();
    }
}

#[test]
fn runs_over_the_epoll_driver_too() {
    let certs = make_certs();
    let server = Server::start_with(acceptor(&certs), WAIT, Mode::Echo, false, true);
    let data = pattern(1 << 20);
    let got = duplex(server.addr, &tls13_client(&certs), &data, data.len());
    assert!(got == data, "echoed bytes differ");
    server.outcome().unwrap();
    let n = 1 << 20;
    let server = Server::start_with(acceptor(&certs), WAIT, Mode::Duplex(n), false, true);
    let got = duplex(server.addr, &tls13_client(&certs), &pattern(n), n + 8);
    assert!(got[..n] == pattern(n)[..]);
    server.outcome().unwrap();
}

#[test]
fn one_stream_reads_and_writes_concurrently() {
    let certs = make_certs();
    let n = 4 << 20;
    let server = Server::start(acceptor(&certs), WAIT, Mode::Duplex(n));
    let to_server = pattern(n + 7)[7..].to_vec();
    let got = duplex(server.addr, &tls13_client(&certs), &to_server, n + 8);
    assert_eq!(got.len(), n + 8);
    assert!(got[..n] == pattern(n)[..], "bytes from the server differ");
    let mut hash = Fnv::new();
    hash.update(&to_server);
    assert_eq!(
        got[n..],
        hash.0.to_be_bytes(),
        "the server read different bytes"
    );
    server.outcome().unwrap();
}

#[test]
fn curl_gets_the_certificate_for_its_name() {
    let certs = make_certs();
    let server = Server::start(acceptor(&certs), WAIT, Mode::Http);
    let port = server.addr.port();
    let curl = |name: &str, extra: &[&str]| {
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "10", "--cacert"])
            .arg(certs.dir.join("ca.crt"))
            .arg("--resolve")
            .arg(format!("{name}:{port}:127.0.0.1"))
            .args(extra)
            .arg(format!("https://{name}:{port}/"))
            .output()
            .expect("curl is installed");
        assert!(
            out.status.success(),
            "curl {name} {extra:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    assert_eq!(
        curl("a.test", &[]),
        "sni=a.test version=TLSv1.3 resumed=false\n"
    );
    assert_eq!(
        curl("x.b.test", &["--tlsv1.2", "--tls-max", "1.2"]),
        "sni=x.b.test version=TLSv1.2 resumed=false\n"
    );
    assert_eq!(
        curl("b.test", &["--http1.1"]),
        "sni=b.test version=TLSv1.3 resumed=false\n"
    );
}

#[test]
fn bad_certificate_files_are_named_in_the_error() {
    let certs = make_certs();
    let dir = &certs.dir;
    std::fs::write(dir.join("junk.pem"), "not pem at all\n").unwrap();
    let err = |pairs: &[(&str, &str)]| -> String {
        match TlsAcceptor::from_config(&tls_config(pairs), dir) {
            Ok(_) => panic!("{pairs:?} was accepted"),
            Err(e) => {
                assert!(
                    matches!(e, TlsError::File { .. } | TlsError::Config(_)),
                    "{e:?}"
                );
                e.to_string()
            }
        }
    };
    let path = |f: &str| dir.join(f).display().to_string();

    let e = err(&[("missing.crt", "a.key")]);
    assert!(
        e.starts_with(&path("missing.crt")) && e.contains("cannot read"),
        "{e}"
    );
    let e = err(&[("a.crt", "missing.key")]);
    assert!(e.starts_with(&path("missing.key")), "{e}");
    let e = err(&[("junk.pem", "a.key")]);
    assert!(
        e.starts_with(&path("junk.pem")) && e.contains("no certificate"),
        "{e}"
    );
    let e = err(&[("a.crt", "junk.pem")]);
    assert!(
        e.starts_with(&path("junk.pem")) && e.contains("private key"),
        "{e}"
    );
    // A key that belongs to another certificate: named, with the certificate.
    let e = err(&[("a.crt", "b.key")]);
    assert!(
        e.starts_with(&path("b.key")) && e.contains(&path("a.crt")),
        "{e}"
    );
    // A later pair is checked as well as the first.
    let e = err(&[("a.crt", "a.key"), ("b.crt", "a.key")]);
    assert!(
        e.starts_with(&path("a.key")) && e.contains("does not match"),
        "{e}"
    );
    assert!(err(&[]).contains("at least one certificate"));

    // Absolute paths are taken as they are; relative ones from the base directory.
    let abs = TlsAcceptor::from_config(
        &tls_config(&[(&path("a.crt"), &path("a.key"))]),
        Path::new("/nonexistent"),
    )
    .unwrap();
    assert_eq!(abs.names(), ["a.test"]);
    assert_eq!(acceptor(&certs).names(), ["a.test", "*.b.test", "b.test"]);
}

/// Handshakes per second through the io_uring server, client and server in one process on
/// this machine's cores. The suite runs a short version (it must complete and every
/// handshake succeed); for the figures in docs/design/tls.md run
/// `GATEWAY_MEASURE=1 cargo test --release --test tls_stream handshake_throughput -- --nocapture`.
#[test]
fn handshake_throughput() {
    let measure = std::env::var_os("GATEWAY_MEASURE").is_some();
    let certs = make_certs();
    let server = Server::start(acceptor(&certs), WAIT, Mode::Echo);
    let both = &[&rustls::version::TLS13, &rustls::version::TLS12][..];
    let rounds = if measure { 2000 } else { 10 };
    for (case, name, versions, resume) in [
        ("ECDSA P-256 TLS 1.3 full", "a.test", both, false),
        ("RSA 2048 TLS 1.3 full", "b.test", both, false),
        (
            "ECDSA P-256 TLS 1.2 full",
            "a.test",
            &[&rustls::version::TLS12][..],
            false,
        ),
        ("ECDSA P-256 TLS 1.3 resumed", "a.test", both, true),
    ] {
        let mut config = client_config(&certs, versions);
        if !resume {
            config.resumption = rustls::client::Resumption::disabled();
        }
        let config = Arc::new(config);
        let started = Instant::now();
        for _ in 0..rounds {
            let mut c = connect(server.addr, &config, name);
            ping(&mut c);
            server.outcome().unwrap();
        }
        let rate = rounds as f64 / started.elapsed().as_secs_f64();
        println!("{case}: {rate:.0} handshakes/s (one client thread, one worker)");
    }
    let echo = Server::start(acceptor(&certs), WAIT, Mode::Echo);
    let mib = if measure { 64 } else { 4 };
    let data = pattern(mib << 20);
    let started = Instant::now();
    let got = duplex(echo.addr, &tls13_client(&certs), &data, data.len());
    assert!(got == data);
    let rate = mib as f64 / started.elapsed().as_secs_f64();
    println!("echo {mib} MiB through TLS 1.3 (AES-GCM or ChaCha20): {rate:.0} MiB/s each way");
}
