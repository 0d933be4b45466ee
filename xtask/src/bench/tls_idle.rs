//! The client of `cargo xtask bench --only tls_idle` (issue 13): idle TLS 1.3 keep-alive
//! connections, each a full handshake (ECDSA P-256, no resumption) and one `GET
//! /api/small`, then held. Only the socket is kept: the client's TLS state is dropped once
//! the answer is in, so 10,000 held connections cost this process a descriptor each and
//! not a rustls connection each (the figure is the proxy's, another process, but the bench
//! should not need gigabytes to take it). The proxy never learns that the client forgot
//! its keys; the close is a reset (`SO_LINGER` 0) either way.
//!
//! rustls with ring (`gateway_test_support::tls`), the test clients' provider, accepting
//! the bench's self-signed certificate: the handshake signatures are still checked, so
//! every connection costs the proxy a real ECDSA signature and key exchange.

use super::close_with_reset;
use anyhow::{bail, Context, Result};
use gateway_test_support::tls::{provider, AcceptAnyCertificate};
use rustls::client::Resumption;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, ProtocolVersion};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

/// The name in the bench's certificate (`self_signed`), sent as SNI.
const SERVER_NAME: &str = "bench.test";

/// Opens idle TLS 1.3 connections with one configuration shared by all of them.
pub struct TlsIdleClient {
    config: Arc<ClientConfig>,
    server_name: ServerName<'static>,
}

impl TlsIdleClient {
    pub fn new() -> Result<TlsIdleClient> {
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .context("a TLS 1.3 client configuration")?
            .dangerous()
            .with_custom_certificate_verifier(AcceptAnyCertificate::new())
            .with_no_client_auth();
        // HTTP/1.1, the plaintext figure's protocol: without ALPN every contender answers
        // HTTP/1.1 too, but saying so keeps a listener that prefers h2 from guessing.
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        // Every connection a full handshake: no ticket is stored, none offered.
        config.resumption = Resumption::disabled();
        Ok(TlsIdleClient {
            config: Arc::new(config),
            server_name: ServerName::try_from(SERVER_NAME)?,
        })
    }

    /// One connection to `addr`: TCP connect, TLS 1.3 handshake, `GET /api/small`, the
    /// start of a 200 answer read; returns the socket, whose TLS state is dropped.
    pub fn open(&self, addr: SocketAddr) -> Result<TcpStream> {
        let mut sock = TcpStream::connect(addr)?;
        close_with_reset(&sock);
        sock.set_read_timeout(Some(Duration::from_secs(10)))?;
        sock.set_write_timeout(Some(Duration::from_secs(10)))?;
        sock.set_nodelay(true)?;
        let mut tls = ClientConnection::new(self.config.clone(), self.server_name.clone())?;
        let mut stream = rustls::Stream::new(&mut tls, &mut sock);
        // The write completes the handshake first, then sends the request.
        stream
            .write_all(super::IDLE_REQUEST)
            .context("TLS handshake or request")?;
        let mut buf = [0u8; 1024];
        let got = stream.read(&mut buf).context("reading the answer")?;
        super::expect_ok(&buf[..got])?;
        if tls.protocol_version() != Some(ProtocolVersion::TLSv1_3) {
            bail!("negotiated {:?}, not TLS 1.3", tls.protocol_version());
        }
        Ok(sock)
    }
}
