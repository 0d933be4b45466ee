//! `tls_session`: a [`TlsStream`] after a real handshake. A rustls client in the same
//! thread completes the handshake over an in-memory socket; then the input is a list of
//! operations on the established session:
//!
//! - `[0] [n] n bytes`: the client sends these bytes (encrypted), the server reads;
//! - `[1] [n] n bytes`: these raw bytes are injected into the ciphertext the server reads
//!   (a forged or corrupted record), the server reads;
//! - `[2] [n]`: the server writes `n * 97` bytes, which the client must decrypt intact;
//! - `[3] [_]`: the client sends a KeyUpdate (TLS 1.3) or close_notify, the server reads.
//!
//! The server reads ciphertext in pieces seeded from the input. Invariants beyond "no
//! panic": what the server reads is exactly what the client sent, in order, until the first
//! injection, after which it reads at most a prefix of it and then fails or ends (record
//! integrity); what it writes reaches the client intact; `tls-input-bounded` as in
//! `tls_stream`.

use super::tls_stream::{acceptor, MAX_BUFFERED};
use super::Splits;
use crate::script::{read_queued, runtime};
use bytes::BytesMut;
use gateway::io::Stream;
use gateway::protocol::tls::accept;
use gateway_test_support::tls::{provider, AcceptAnyCertificate};
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection};
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;
use tokio_uring::buf::BoundedBuf;

/// The client's end of the in-memory connection.
struct Client {
    conn: RefCell<ClientConnection>,
    /// Ciphertext on its way to the server, already cut into the server's reads.
    to_server: RefCell<VecDeque<Vec<u8>>>,
    /// Plaintext the client received.
    received: RefCell<Vec<u8>>,
    splits: RefCell<Splits>,
    max_buffered: Cell<usize>,
}

impl Client {
    /// Moves whatever the client wants to send into `to_server`, in seeded pieces.
    fn flush(&self) {
        let mut out = Vec::new();
        let mut conn = self.conn.borrow_mut();
        while conn.wants_write() {
            if conn.write_tls(&mut out).is_err() {
                break;
            }
        }
        self.queue(&out);
    }

    fn queue(&self, bytes: &[u8]) {
        let mut splits = self.splits.borrow_mut();
        let mut queue = self.to_server.borrow_mut();
        queue.extend(splits.cut(bytes, 700).into_iter().map(<[u8]>::to_vec));
    }

    /// Takes ciphertext the server wrote.
    fn receive(&self, mut bytes: &[u8]) {
        let mut conn = self.conn.borrow_mut();
        while !bytes.is_empty() {
            match conn.read_tls(&mut bytes) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            if conn.process_new_packets().is_err() {
                break;
            }
            let mut plain = Vec::new();
            let _ = conn.reader().read_to_end(&mut plain);
            self.received.borrow_mut().extend_from_slice(&plain);
        }
    }
}

/// The server's socket: reads take the client's queued ciphertext, writes go to the client.
struct Socket(Rc<Client>);

impl Stream for Socket {
    async fn read(&self, buf: BytesMut) -> (io::Result<usize>, BytesMut) {
        let c = &self.0;
        let budget = ("tls-input-bounded", MAX_BUFFERED);
        read_queued(&c.to_server, buf, budget, &c.max_buffered)
    }

    async fn write_all<B: BoundedBuf>(&self, buf: B) -> (io::Result<()>, B) {
        // SAFETY: a BoundedBuf points at `bytes_init()` initialised bytes that stay put while
        // it is alive, and we hold it until we return it.
        let data = unsafe { std::slice::from_raw_parts(buf.stable_ptr(), buf.bytes_init()) };
        self.0.receive(data);
        // The client answers at once (its handshake flight), ready for the server's next read.
        self.0.flush();
        (Ok(()), buf)
    }

    async fn connect(_: SocketAddr, _: Duration) -> io::Result<Self> {
        Err(io::ErrorKind::Unsupported.into())
    }

    async fn ready_io<R>(
        &self,
        _: tokio::io::Interest,
        _: impl FnMut(RawFd) -> io::Result<R>,
    ) -> io::Result<R> {
        std::future::pending().await
    }

    fn shutdown_write(&self) {}

    fn abort(&self) {
        self.0.to_server.borrow_mut().clear();
    }

    fn raw_fd(&self) -> RawFd {
        -1
    }
}

/// Client configs: TLS 1.3 and TLS 1.2, both offering `http/1.1`.
fn client_config(tls12: bool) -> Arc<ClientConfig> {
    let provider = provider();
    let versions: &[&rustls::SupportedProtocolVersion] = if tls12 {
        &[&rustls::version::TLS12]
    } else {
        &[&rustls::version::TLS13]
    };
    let mut config = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .expect("protocol versions")
        .dangerous()
        // The gateway's throwaway certificate: this client tests the server, not PKI.
        .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate(provider)))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

pub fn run(data: &[u8]) {
    let tls12 = data.len() % 2 == 1;
    let name = ServerName::try_from("fuzz.example").expect("server name");
    let conn = ClientConnection::new(client_config(tls12), name).expect("client connection");
    let client = Rc::new(Client {
        conn: RefCell::new(conn),
        to_server: RefCell::default(),
        received: RefCell::default(),
        splits: RefCell::new(Splits::new(data)),
        max_buffered: Cell::new(0),
    });
    client.flush();
    let rt = runtime();
    rt.block_on(async {
        let handshake = accept(acceptor(), Socket(client.clone()), Duration::from_secs(10));
        let tls = match tokio::time::timeout(Duration::from_secs(5), handshake).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => panic!("the handshake with a real client failed: {e}"),
            Err(_) => panic!("the handshake with a real client did not end"),
        };
        let mut sent = Vec::new();
        let mut read = Vec::new();
        let mut injected = false;
        let mut ended = false;
        let mut ops = data;
        while let [op, n, rest @ ..] = ops {
            let n = *n as usize;
            match op % 4 {
                0 | 1 => {
                    let bytes = &rest[..n.min(rest.len())];
                    ops = &rest[bytes.len()..];
                    if op % 4 == 0 {
                        let _ = client.conn.borrow_mut().writer().write_all(bytes);
                        client.flush();
                        sent.extend_from_slice(bytes);
                    } else {
                        client.queue(bytes);
                        injected |= !bytes.is_empty();
                    }
                }
                2 => {
                    ops = rest;
                    let body: Vec<u8> = (0..n * 97).map(|i| (i % 251) as u8).collect();
                    let before = client.received.borrow().len();
                    let (res, _) = tls.write_all(body.clone()).await;
                    if res.is_ok() && !ended && !injected {
                        let got = client.received.borrow()[before..].to_vec();
                        assert_eq!(
                            got, body,
                            "the client got other bytes than the server wrote"
                        );
                    }
                }
                _ => {
                    ops = rest;
                    let mut conn = client.conn.borrow_mut();
                    if n.is_multiple_of(2) {
                        let _ = conn.refresh_traffic_keys();
                    } else {
                        conn.send_close_notify();
                    }
                    drop(conn);
                    client.flush();
                }
            }
            if ended {
                continue;
            }
            // Read until the server has taken everything queued and delivered all it got.
            loop {
                let expecting = read.len() < sent.len();
                if client.to_server.borrow().is_empty() && !expecting {
                    break;
                }
                let buf = BytesMut::with_capacity(1 + read.len() % 9000);
                let (res, buf) = tls.read(buf).await;
                match res {
                    Ok(0) | Err(_) => {
                        ended = true;
                        break;
                    }
                    Ok(_) => read.extend_from_slice(&buf),
                }
            }
            assert!(
                sent.starts_with(&read),
                "the server read bytes the client never sent"
            );
            if !injected {
                assert_eq!(
                    read.len(),
                    sent.len(),
                    "the server lost bytes the client sent"
                );
            }
        }
    });
}
