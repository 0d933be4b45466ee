//! HTTP/2 groundwork (issue 12), over real loopback sockets on a tokio-uring runtime thread,
//! as a worker runs:
//!
//! - the I/O adapter: our own TLS handshake (`tls::accept` over a `UringStream`), then
//!   `TlsIo` continuing that session over a readiness socket, against an independent
//!   blocking rustls client: echo, large transfers both ways, each way of closing;
//! - the spike: an `h2::server` connection over the adapter (TLS with ALPN h2) and over the
//!   plain socket (h2c prior knowledge), an `h2::client` on the other end, 100 concurrent
//!   streams with a fixed response. Not wired into the product.
//!

use bytes::{Bytes, BytesMut};
use gateway::config::{CertificateConfig, TlsConfig};
use gateway::io::UringStream;
use gateway::protocol::h2::io::{readiness_socket, TlsIo};
use gateway::protocol::h2::{translate_request, H2Request};
use gateway::protocol::http1::rewrite::Forwarding;
use gateway::protocol::tls::{self, TlsAcceptor};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore};
use std::future::Future;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{mpsc, Arc};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

const WAIT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------
// Certificates and TLS configs.

struct Certs {
    dir: PathBuf,
    ca: CertificateDer<'static>,
}

impl Drop for Certs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A throwaway CA and a leaf for `a.test` (ECDSA P-256), under a fresh temp directory.
fn certs() -> Certs {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "gateway-h2-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["a.test".to_string()])
        .unwrap()
        .signed_by(&key, &ca, &ca_key)
        .unwrap();
    std::fs::write(dir.join("a.crt"), leaf.pem()).unwrap();
    std::fs::write(dir.join("a.key"), key.serialize_pem()).unwrap();
    Certs {
        dir,
        ca: ca.der().clone(),
    }
}

fn acceptor(certs: &Certs, alpn: &[&[u8]]) -> TlsAcceptor {
    let config = TlsConfig {
        certificates: vec![CertificateConfig {
            cert: "a.crt".into(),
            key: "a.key".into(),
        }],
    };
    TlsAcceptor::from_config(&config, &certs.dir)
        .unwrap()
        .with_alpn(alpn)
}

fn client_config(certs: &Certs, alpn: &[u8]) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    roots.add(certs.ca.clone()).unwrap();
    let mut config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    Arc::new(config)
}

fn client_conn(config: &Arc<ClientConfig>) -> ClientConnection {
    ClientConnection::new(config.clone(), ServerName::try_from("a.test").unwrap()).unwrap()
}

// ---------------------------------------------------------------------------------------
// The server: a tokio-uring runtime on its own thread, like a worker. Each connection is
// accepted by io_uring, handshaken by our own TLS code (or not, for h2c), and handed to
// the handler as a tokio byte stream.

trait Duplex: AsyncRead + AsyncWrite + Unpin {}
impl<T: AsyncRead + AsyncWrite + Unpin> Duplex for T {}

type Handler =
    fn(Box<dyn Duplex>, Option<Vec<u8>>, mpsc::Sender<String>) -> Pin<Box<dyn Future<Output = ()>>>;

struct Server {
    addr: SocketAddr,
    /// What each handler reports (how a read ended, what ALPN chose...).
    reports: mpsc::Receiver<String>,
}

impl Server {
    /// Serves `conns` connections, one at a time accepted, all handled concurrently; the
    /// thread ends when they are done.
    fn start(tls: Option<TlsAcceptor>, conns: usize, handler: Handler) -> Server {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, reports) = mpsc::channel();
        std::thread::spawn(move || {
            let tx_cpu = tx.clone();
            tokio_uring::start(async move {
                let listener = tokio_uring::net::TcpListener::from_std(listener);
                let mut tasks = Vec::new();
                for _ in 0..conns {
                    let (socket, _) = listener.accept().await.unwrap();
                    let (tls, tx) = (tls.clone(), tx.clone());
                    tasks.push(tokio_uring::spawn(async move {
                        let stream = UringStream::new(socket);
                        let (io, alpn): (Box<dyn Duplex>, _) = match tls {
                            Some(acceptor) => {
                                let tls = tls::accept(&acceptor, stream, WAIT).await.unwrap();
                                let io = TlsIo::from_tls(tls).unwrap();
                                let alpn = io.alpn().map(<[u8]>::to_vec);
                                (Box::new(io), alpn)
                            }
                            None => (Box::new(readiness_socket(stream).unwrap()), None),
                        };
                        handler(io, alpn, tx).await;
                    }));
                }
                for t in tasks {
                    t.await.unwrap();
                }
            });
            let _ = tx_cpu.send(format!("cpu {}", thread_cpu().as_nanos()));
        });
        Server { addr, reports }
    }

    fn report(&self) -> String {
        self.reports
            .recv_timeout(WAIT)
            .expect("the handler reports")
    }
}

/// Echoes every byte; reports how the client's side ended ("eof" or the error kind), then
/// closes its own side (close_notify + FIN).
fn echo(
    mut io: Box<dyn Duplex>,
    _: Option<Vec<u8>>,
    tx: mpsc::Sender<String>,
) -> Pin<Box<dyn Future<Output = ()>>> {
    Box::pin(async move {
        let mut buf = vec![0u8; 16 * 1024];
        let end = loop {
            match io.read(&mut buf).await {
                Ok(0) => break "eof".to_string(),
                Ok(n) => {
                    if let Err(e) = io.write_all(&buf[..n]).await {
                        break format!("write: {:?}", e.kind());
                    }
                }
                Err(e) => break format!("{:?}", e.kind()),
            }
        };
        let _ = io.shutdown().await;
        tx.send(end).unwrap();
    })
}

/// A byte of the test pattern: not periodic in any power of two, so a lost or repeated
/// record shows.
fn pattern(i: usize) -> u8 {
    (i % 251) as u8
}

const BIG: usize = 8 << 20;

/// Writes `BIG` pattern bytes, then closes.
fn send_big(
    mut io: Box<dyn Duplex>,
    _: Option<Vec<u8>>,
    tx: mpsc::Sender<String>,
) -> Pin<Box<dyn Future<Output = ()>>> {
    Box::pin(async move {
        let data: Vec<u8> = (0..BIG).map(pattern).collect();
        let r = io.write_all(&data).await.and(io.shutdown().await);
        tx.send(format!("{r:?}")).unwrap();
    })
}

/// Reads until EOF, checking the pattern; reports the count.
fn receive_big(
    mut io: Box<dyn Duplex>,
    _: Option<Vec<u8>>,
    tx: mpsc::Sender<String>,
) -> Pin<Box<dyn Future<Output = ()>>> {
    Box::pin(async move {
        let mut buf = vec![0u8; 64 * 1024];
        let mut seen = 0;
        loop {
            match io.read(&mut buf).await {
                Ok(0) => break,
                Ok(n) => {
                    if buf[..n]
                        .iter()
                        .enumerate()
                        .any(|(i, &b)| b != pattern(seen + i))
                    {
                        tx.send("corrupt".into()).unwrap();
                        return;
                    }
                    seen += n;
                }
                Err(e) => {
                    tx.send(format!("{:?} after {seen}", e.kind())).unwrap();
                    return;
                }
            }
        }
        tx.send(format!("{seen}")).unwrap();
    })
}

fn tls_client(
    server: &Server,
    config: &Arc<ClientConfig>,
) -> rustls::StreamOwned<ClientConnection, TcpStream> {
    let sock = TcpStream::connect(server.addr).unwrap();
    sock.set_read_timeout(Some(WAIT)).unwrap();
    rustls::StreamOwned::new(client_conn(config), sock)
}

// ---------------------------------------------------------------------------------------
// The adapter.

/// Reads to EOF, checking the pattern; pauses before each read of the first `slow_for`
/// bytes. Returns the count.
fn read_pattern(client: &mut Client, slow_for: usize) -> usize {
    let mut seen = 0;
    let mut buf = vec![0u8; 4096];
    loop {
        if seen < slow_for {
            std::thread::sleep(Duration::from_micros(200));
        }
        let n = client.read(&mut buf).unwrap();
        if n == 0 {
            return seen;
        }
        let ok = buf[..n]
            .iter()
            .enumerate()
            .all(|(i, &b)| b == pattern(seen + i));
        assert!(ok, "corrupt at {seen}");
        seen += n;
    }
}

type Client = rustls::StreamOwned<ClientConnection, TcpStream>;

/// A server of one TLS connection (ALPN h2) running `handler`, and a client connected to it.
fn tls_pair(handler: Handler) -> (Certs, Server, Client) {
    let certs = certs();
    let server = Server::start(Some(acceptor(&certs, &[b"h2"])), 1, handler);
    let client = tls_client(&server, &client_config(&certs, b"h2"));
    (certs, server, client)
}

fn close_notify(client: &mut Client) {
    client.conn.send_close_notify();
    client.flush().unwrap();
}

/// One round trip through the echo handler: the session is up on both sides.
fn ping(client: &mut Client) {
    client.write_all(b"ping").unwrap();
    let mut back = [0u8; 4];
    client.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"ping");
}

#[test]
fn adapter_echoes_over_the_handshaken_session() {
    let (_certs, server, mut client) = tls_pair(echo);
    // The first write leaves with the client's Finished: the server's handshake reads it
    // too, so the adapter must start from the handshake's read-ahead.
    let mut back = vec![0u8; 16 * 1024];
    for round in 0..256 {
        let chunk: Vec<u8> = (0..16 * 1024).map(|i| pattern(i + round)).collect();
        client.write_all(&chunk).unwrap();
        client.read_exact(&mut back).unwrap();
        assert!(back == chunk, "round {round}");
    }
    // close_notify from the client: a clean EOF for the server, which closes in turn.
    close_notify(&mut client);
    assert_eq!(server.report(), "eof");
    let mut rest = Vec::new();
    assert_eq!(
        client.read_to_end(&mut rest).unwrap(),
        0,
        "close_notify, then EOF"
    );
}

#[test]
fn adapter_starts_from_the_handshakes_read_ahead() {
    let certs = certs();
    let server = Server::start(Some(acceptor(&certs, &[b"h2"])), 1, echo);
    let mut sock = TcpStream::connect(server.addr).unwrap();
    sock.set_read_timeout(Some(WAIT)).unwrap();
    let mut conn = client_conn(&client_config(&certs, b"h2"));
    // 64 KiB queued before the handshake leaves right behind the client's Finished, in one
    // write: the server's handshake reads records past its end, which rustls does not take
    // all at once; the adapter must give them to rustls before reading the socket.
    let early: Vec<u8> = (0..64 * 1024).map(pattern).collect();
    conn.writer().write_all(&early).unwrap();
    while conn.is_handshaking() {
        if conn.wants_write() {
            conn.write_tls(&mut sock).unwrap();
        } else {
            conn.read_tls(&mut sock).unwrap();
            conn.process_new_packets().unwrap();
        }
    }
    let mut client = rustls::StreamOwned::new(conn, sock);
    client.flush().unwrap();
    let mut back = vec![0u8; early.len()];
    client.read_exact(&mut back).unwrap();
    assert!(back == early);
    close_notify(&mut client);
    assert_eq!(server.report(), "eof");
}

#[test]
fn adapter_sends_large_transfers_to_a_slow_reader() {
    let (_certs, server, mut client) = tls_pair(send_big);
    // A slow reader at first: the server's writes wait and resume many times.
    assert_eq!(read_pattern(&mut client, 1 << 20), BIG);
    assert_eq!(server.report(), "Ok(())");
}

/// Writes until a write waits for the (not reading) client, reports how much the adapter
/// and the kernel took by then, then writes the rest of `STALL_TOTAL` and closes.
fn write_until_stalled(
    mut io: Box<dyn Duplex>,
    _: Option<Vec<u8>>,
    tx: mpsc::Sender<String>,
) -> Pin<Box<dyn Future<Output = ()>>> {
    Box::pin(async move {
        let data: Vec<u8> = (0..STALL_TOTAL).map(pattern).collect();
        let mut taken = 0;
        while taken < data.len() {
            let end = (taken + 64 * 1024).min(data.len());
            // The write future is polled before the timer: it times out only when Pending.
            match tokio::time::timeout(Duration::from_millis(300), io.write(&data[taken..end]))
                .await
            {
                Ok(n) => taken += n.unwrap(),
                Err(_) => break,
            }
        }
        tx.send(format!("{taken}")).unwrap();
        io.write_all(&data[taken..]).await.unwrap();
        io.shutdown().await.unwrap();
    })
}

const STALL_TOTAL: usize = 32 << 20;

#[test]
fn adapter_write_waits_for_a_slow_reader() {
    let (_certs, server, mut client) = tls_pair(write_until_stalled);
    while client.conn.is_handshaking() {
        client.conn.complete_io(&mut client.sock).unwrap();
    }
    // Nothing read yet: what the server could write is the kernel's buffers (a 4 MiB send
    // buffer at most here, and the receive window) plus rustls' 64 KiB, not the 32 MiB.
    let taken: usize = server.report().parse().unwrap();
    assert!(taken < 8 << 20, "{taken} bytes taken before the first wait");
    assert_eq!(read_pattern(&mut client, 0), STALL_TOTAL);
}

#[test]
fn adapter_receives_large_transfers() {
    let (_certs, server, mut client) = tls_pair(receive_big);
    let data: Vec<u8> = (0..BIG).map(pattern).collect();
    for chunk in data.chunks(100_000) {
        client.write_all(chunk).unwrap();
    }
    close_notify(&mut client);
    assert_eq!(server.report(), BIG.to_string());
}

#[test]
fn adapter_reports_a_close_without_close_notify_as_truncation() {
    let (_certs, server, mut client) = tls_pair(echo);
    ping(&mut client);
    // FIN with no close_notify: an attacker could cut a stream short this way.
    client.sock.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(server.report(), "UnexpectedEof");
}

#[test]
fn adapter_refuses_garbage_after_the_handshake() {
    let (_certs, server, mut client) = tls_pair(echo);
    ping(&mut client);
    // Not a TLS record: rustls refuses it and the adapter fails the read.
    client.sock.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    assert_eq!(server.report(), "InvalidData");
}

// ---------------------------------------------------------------------------------------
// The spike: h2::server over the adapter.

const BODY: &[u8] = b"hello from h2\n";
const STREAMS: usize = 100;

/// The settings the gateway would run with (docs/design/http2.md).
fn h2_builder() -> h2::server::Builder {
    let mut b = h2::server::Builder::new();
    b.max_concurrent_streams(STREAMS as u32)
        .max_header_list_size(16 * 1024)
        .max_pending_accept_reset_streams(20)
        .max_local_error_reset_streams(Some(1024))
        .max_send_buffer_size(64 * 1024)
        .initial_window_size(64 * 1024)
        .initial_connection_window_size(1 << 20);
    b
}

/// Serves every stream with a fixed 200; reports the ALPN protocol and how many streams
/// it served when the client closes.
fn h2_fixed(
    io: Box<dyn Duplex>,
    alpn: Option<Vec<u8>>,
    tx: mpsc::Sender<String>,
) -> Pin<Box<dyn Future<Output = ()>>> {
    Box::pin(async move {
        let mut conn = match h2_builder().handshake::<_, Bytes>(io).await {
            Ok(c) => c,
            Err(e) => {
                tx.send(format!("handshake: {e}")).unwrap();
                return;
            }
        };
        let mut served = 0;
        while let Some(next) = conn.accept().await {
            let Ok((request, mut respond)) = next else {
                break;
            };
            served += 1;
            tokio_uring::spawn(async move {
                let _ = request; // The body (none here) would be the exchange's source.
                let response = http::Response::builder()
                    .status(200)
                    .header("content-length", BODY.len())
                    .body(())
                    .unwrap();
                let mut send = respond.send_response(response, false).unwrap();
                let _ = send.send_data(Bytes::from_static(BODY), true);
            });
        }
        let alpn = alpn
            .map(|a| String::from_utf8(a).unwrap())
            .unwrap_or_default();
        tx.send(format!("{alpn} {served}")).unwrap();
    })
}

/// `STREAMS` concurrent GETs on one connection from `h2::client`; each must get the body.
async fn h2_requests<T: AsyncRead + AsyncWrite + Unpin + 'static>(io: T, rounds: usize) {
    let (client, conn) = h2::client::handshake(io).await.unwrap();
    let driver = tokio::task::spawn_local(async move {
        let _ = conn.await;
    });
    for _ in 0..rounds {
        let mut streams = Vec::new();
        for i in 0..STREAMS {
            let mut client = client.clone().ready().await.unwrap();
            let request = http::Request::get(format!("https://a.test/s/{i}"))
                .body(())
                .unwrap();
            let (response, _) = client.send_request(request, true).unwrap();
            streams.push(tokio::task::spawn_local(async move {
                let response = response.await.unwrap();
                assert_eq!(response.status(), 200);
                let mut body = response.into_body();
                let mut got = BytesMut::new();
                while let Some(chunk) = body.data().await {
                    let chunk = chunk.unwrap();
                    let _ = body.flow_control().release_capacity(chunk.len());
                    got.extend_from_slice(&chunk);
                }
                assert_eq!(&got[..], BODY);
            }));
        }
        for s in streams {
            s.await.unwrap();
        }
    }
    drop(client);
    driver.await.unwrap();
}

/// Runs `f` on a current-thread tokio runtime (the client side; any runtime would do).
fn client_runtime<F: Future<Output = ()>>(f: F) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let local = tokio::task::LocalSet::new();
    rt.block_on(local.run_until(async { tokio::time::timeout(WAIT, f).await }))
        .expect("in time");
}

#[test]
fn spike_h2_over_tls_serves_100_concurrent_streams() {
    let certs = certs();
    let server = Server::start(Some(acceptor(&certs, &[b"h2", b"http/1.1"])), 1, h2_fixed);
    let config = client_config(&certs, b"h2");
    let addr = server.addr;
    client_runtime(async move {
        let sock = tokio::net::TcpStream::connect(addr).await.unwrap();
        // The client's handshake runs inside its adapter: the ClientHello goes with h2's
        // first write, and the preface follows once the session is up.
        let io = TlsIo::new(sock, client_conn(&config), BytesMut::new());
        h2_requests(io, 3).await;
    });
    assert_eq!(server.report(), format!("h2 {}", 3 * STREAMS));
}

#[test]
fn spike_h2c_prior_knowledge_serves_100_concurrent_streams() {
    let server = Server::start(None, 1, h2_fixed);
    let addr = server.addr;
    client_runtime(async move {
        let sock = tokio::net::TcpStream::connect(addr).await.unwrap();
        h2_requests(sock, 3).await;
    });
    assert_eq!(server.report(), format!(" {}", 3 * STREAMS));
}

/// Translates each stream's request as the exchange will (`translate_request`, the body
/// held to its length by `BodyLength`) and answers with the HTTP/1.1 head it would send
/// upstream, or with the status a refusal maps to.
fn h2_translate(
    io: Box<dyn Duplex>,
    _: Option<Vec<u8>>,
    tx: mpsc::Sender<String>,
) -> Pin<Box<dyn Future<Output = ()>>> {
    Box::pin(async move {
        let mut conn = h2_builder().handshake::<_, Bytes>(io).await.unwrap();
        while let Some(Ok((request, mut respond))) = conn.accept().await {
            tokio_uring::spawn(async move {
                let (parts, mut body) = request.into_parts();
                let fwd = Forwarding {
                    client_ip: "203.0.113.7".parse().unwrap(),
                    peer_ip: "127.0.0.1".parse().unwrap(),
                    proto: "https",
                    upgrade: false,
                    default_host: "gw",
                    trusted_peer: false,
                    keep_forwarding: &[],
                    underscores: false,
                };
                let mut req = H2Request::default();
                let mut head = Vec::new();
                let translated = translate_request(
                    &parts,
                    body.is_end_stream(),
                    &fwd,
                    16 * 1024,
                    &mut req,
                    &mut head,
                );
                let mut result = translated.map(|()| req.body_length());
                if let Ok(length) = &mut result {
                    while let Some(chunk) = body.data().await {
                        let chunk = chunk.unwrap();
                        let _ = body.flow_control().release_capacity(chunk.len());
                        if let Err(e) = length.on_data(chunk.len()) {
                            result = Err(e);
                            break;
                        }
                    }
                }
                let (status, text) = match result.and_then(|l| l.on_end().map(|()| l.seen())) {
                    Ok(seen) => (
                        200,
                        format!("{}body {seen}", String::from_utf8(head).unwrap()),
                    ),
                    Err(e) => (e.status(), String::new()),
                };
                let response = http::Response::builder().status(status).body(()).unwrap();
                let mut send = respond.send_response(response, false).unwrap();
                let _ = send.send_data(Bytes::from(text), true);
            });
        }
        tx.send("done".into()).unwrap();
    })
}

/// Sends one request on an h2 client; returns the status and the body as text.
async fn fetch(
    client: &h2::client::SendRequest<Bytes>,
    request: http::Request<()>,
    body: &'static [u8],
) -> (u16, String) {
    let mut client = client.clone().ready().await.unwrap();
    let (response, mut send) = client.send_request(request, body.is_empty()).unwrap();
    if !body.is_empty() {
        send.send_data(Bytes::from_static(body), true).unwrap();
    }
    let response = response.await.unwrap();
    let status = response.status().as_u16();
    let mut body = response.into_body();
    let mut got = Vec::new();
    while let Some(chunk) = body.data().await {
        got.extend_from_slice(&chunk.unwrap());
    }
    (status, String::from_utf8(got).unwrap())
}

#[test]
fn spike_translates_real_h2_requests() {
    let certs = certs();
    let server = Server::start(Some(acceptor(&certs, &[b"h2"])), 1, h2_translate);
    let config = client_config(&certs, b"h2");
    let addr = server.addr;
    client_runtime(async move {
        let sock = tokio::net::TcpStream::connect(addr).await.unwrap();
        let io = TlsIo::new(sock, client_conn(&config), BytesMut::new());
        let (client, conn) = h2::client::handshake(io).await.unwrap();
        let driver = tokio::task::spawn_local(async move {
            let _ = conn.await;
        });
        let get = http::Request::get("https://a.test/p/../q;x?y")
            .header("cookie", "a=1")
            .header("cookie", "b=2")
            .header("x-forwarded-for", "198.51.100.1")
            .header("x-forwarded-proto", "http")
            .body(())
            .unwrap();
        let (status, text) = fetch(&client, get, b"").await;
        assert_eq!(status, 200);
        assert!(
            text.starts_with("GET /q;x?y HTTP/1.1\r\nHost: a.test\r\n"),
            "{text}"
        );
        for line in [
            "\r\ncookie: a=1; b=2\r\n",
            "\r\nX-Forwarded-For: 198.51.100.1, 127.0.0.1\r\n",
            "\r\nX-Forwarded-Proto: https\r\n",
        ] {
            assert!(text.contains(line), "{line:?} in {text}");
        }
        assert!(text.ends_with("\r\n\r\nbody 0"), "{text}");
        // A body without content-length goes upstream chunked; with one, as declared.
        let post = http::Request::post("https://a.test/up").body(()).unwrap();
        let (status, text) = fetch(&client, post, b"12345").await;
        assert_eq!(status, 200);
        assert!(
            text.contains("\r\nTransfer-Encoding: chunked\r\n\r\nbody 5"),
            "{text}"
        );
        let post = http::Request::post("https://a.test/up")
            .header("content-length", "5")
            .body(())
            .unwrap();
        let (status, text) = fetch(&client, post, b"12345").await;
        assert_eq!(status, 200);
        assert!(
            text.contains("\r\nContent-Length: 5\r\n\r\nbody 5"),
            "{text}"
        );
        // Refused as HTTP/1 refuses the same target.
        let bad = http::Request::get("https://a.test/%2e%2e/admin")
            .body(())
            .unwrap();
        assert_eq!(fetch(&client, bad, b"").await.0, 400);
        let bad = http::Request::get("https://a.test/a%2fb").body(()).unwrap();
        assert_eq!(fetch(&client, bad, b"").await.0, 400);
        drop(client);
        driver.await.unwrap();
    });
    assert_eq!(server.report(), "done");
}

/// A field as bytes on the wire.
type Field<'a> = (&'a [u8], &'a [u8]);

/// HPACK for one field, literal without indexing and without Huffman (RFC 7541 §6.2.2), so
/// any bytes at all can be put on the wire: what a hostile client can send.
fn literal(block: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    assert!(name.len() < 127 && value.len() < 127);
    block.push(0x00);
    block.push(name.len() as u8);
    block.extend_from_slice(name);
    block.push(value.len() as u8);
    block.extend_from_slice(value);
}

fn frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
    out.extend_from_slice(&[kind, flags]);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
}

/// Sends one GET on stream 1 of a fresh h2c connection with `fields` after the pseudo-headers
/// (`:method GET`, `:scheme http`, `:path /`, `:authority a.test`), and says how the server
/// ended it: `response`, `reset <code>` or `goaway <code>` (RFC 9113 §7 codes).
fn raw_h2c_request(addr: SocketAddr, fields: &[Field]) -> String {
    let mut block = vec![0x82, 0x86, 0x84]; // static table: GET, http, /
    literal(&mut block, b":authority", b"a.test");
    for (n, v) in fields {
        literal(&mut block, n, v);
    }
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    frame(&mut out, 0x4, 0, 0, &[]);
    frame(&mut out, 0x1, 0x4 | 0x1, 1, &block); // END_HEADERS | END_STREAM
    let mut sock = TcpStream::connect(addr).unwrap();
    sock.set_read_timeout(Some(WAIT)).unwrap();
    sock.write_all(&out).unwrap();
    loop {
        let mut head = [0u8; 9];
        if sock.read_exact(&mut head).is_err() {
            return "closed".into();
        }
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        let mut payload = vec![0u8; len];
        sock.read_exact(&mut payload).unwrap();
        let code = |at: usize| u32::from_be_bytes(payload[at..at + 4].try_into().unwrap());
        match (head[3], stream) {
            (0x1, 1) => return "response".into(),
            (0x3, 1) => return format!("reset {}", code(0)),
            (0x7, _) => return format!("goaway {}", code(4)),
            _ => {} // SETTINGS, its ACK, WINDOW_UPDATE
        }
    }
}

#[test]
fn spike_smuggling_shaped_fields_never_reach_the_translation() {
    // Each connection is one request; the control goes first.
    let cases: [(&str, &[Field], &str); 8] = [
        ("control", &[(b"x-a", b"1")], "response"),
        ("uppercase name", &[(b"X-A", b"1")], "goaway 1"),
        ("CR in a value", &[(b"x-a", b"1\r\nx-b: 2")], "goaway 1"),
        ("NUL in a value", &[(b"x-a", b"1\x002")], "goaway 1"),
        ("connection", &[(b"connection", b"close")], "reset 1"),
        (
            "transfer-encoding",
            &[(b"transfer-encoding", b"chunked")],
            "reset 1",
        ),
        ("te other than trailers", &[(b"te", b"gzip")], "reset 1"),
        (
            "content-length without DATA",
            &[(b"content-length", b"5")],
            "reset 1",
        ),
    ];
    let server = Server::start(None, cases.len(), h2_translate);
    for (name, fields, want) in cases {
        assert_eq!(raw_h2c_request(server.addr, fields), want, "{name}");
    }
}

// ---------------------------------------------------------------------------------------
/// CPU time this thread has used.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}
