//! `tls_stream`: the server side of a TLS connection ([`gateway::protocol::tls::accept`] and then
//! [`TlsStream`] reads) over a scripted in-memory socket. The input is a script of what the
//! client sends, read by read:
//!
//! - `[n] n bytes` (n = 1..=255): one read returns these bytes;
//! - `[0] [k]`: the previous read again `(k + 1) * 8` times, so a small input can send
//!   megabytes (a handshake message that declares 64 KiB and then keeps coming).
//!
//! The script ends in EOF. Invariants beyond "no panic": the handshake ends (success,
//! error or EOF) without waiting on time; `tls-input-bounded` (issue 10): the server never
//! asks the socket for more while holding more than [`MAX_BUFFERED`] bytes of ciphertext.
//!
//! Limit: a scripted client cannot finish a handshake (its Finished depends on the server's
//! random), so this covers the ClientHello, record layer and alert paths, and the reads
//! after a handshake only if one ever completes.

use crate::script::{runtime, Scripted};
use bytes::BytesMut;
use gateway::config::{CertificateConfig, TlsConfig};
use gateway::io::Stream;
use gateway::protocol::tls::{accept, TlsAcceptor};
use std::sync::OnceLock;
use std::time::Duration;

/// Ciphertext the server may hold between socket reads: two full reads of the stream
/// (`READ_CHUNK`, 32.5 KiB) plus rustls' own limit on a handshake message (64 KiB), with room.
pub const MAX_BUFFERED: usize = 256 * 1024;
/// Most bytes one input may make the client send.
const MAX_SCRIPT: usize = 4 << 20;

/// Decodes the script format above into reads.
pub fn script(data: &[u8]) -> Vec<Vec<u8>> {
    let mut reads: Vec<Vec<u8>> = Vec::new();
    let mut total = 0;
    let mut rest = data;
    while let [n, tail @ ..] = rest {
        if *n == 0 {
            let [k, tail @ ..] = tail else { break };
            rest = tail;
            let Some(last) = reads.last().cloned() else {
                continue;
            };
            for _ in 0..(*k as usize + 1) * 8 {
                if total + last.len() > MAX_SCRIPT {
                    break;
                }
                total += last.len();
                reads.push(last.clone());
            }
        } else {
            let take = (*n as usize).min(tail.len());
            if take == 0 || total + take > MAX_SCRIPT {
                break;
            }
            total += take;
            reads.push(tail[..take].to_vec());
            rest = &tail[take..];
        }
    }
    reads
}

/// The acceptor every input uses: one self-signed certificate for `fuzz.example`, written
/// to a temporary directory once per process (the gateway loads certificates from files).
pub(crate) fn acceptor() -> &'static TlsAcceptor {
    static ACCEPTOR: OnceLock<TlsAcceptor> = OnceLock::new();
    ACCEPTOR.get_or_init(|| {
        let cert = rcgen::generate_simple_self_signed(vec!["fuzz.example".to_string()])
            .expect("self-signed certificate");
        let dir = std::env::temp_dir().join(format!("gateway-fuzz-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temporary directory");
        std::fs::write(dir.join("cert.pem"), cert.cert.pem()).expect("write certificate");
        std::fs::write(dir.join("key.pem"), cert.key_pair.serialize_pem()).expect("write key");
        let tls = TlsConfig {
            certificates: vec![CertificateConfig {
                cert: "cert.pem".into(),
                key: "key.pem".into(),
            }],
        };
        let acceptor = TlsAcceptor::from_config(&tls, &dir).expect("acceptor");
        let _ = std::fs::remove_dir_all(&dir);
        acceptor
    })
}

pub fn run(data: &[u8]) {
    serve(data);
}

/// Runs the server side over the script in `data`; returns what it sent the client.
pub fn serve(data: &[u8]) -> Vec<u8> {
    let socket = Scripted::new(script(data), ("tls-input-bounded", MAX_BUFFERED));
    let peer = socket.peer.clone();
    let rt = runtime();
    rt.block_on(async {
        let handshake = accept(acceptor(), socket, Duration::from_secs(10));
        // Reads never wait, so a handshake that does not end at once is stuck on a timer.
        let Ok(result) = tokio::time::timeout(Duration::from_secs(5), handshake).await else {
            panic!("TLS handshake did not end on a script that ends in EOF");
        };
        let Ok(tls) = result else { return };
        // Application data, as the proxy reads it: into a head buffer, then body buffers.
        let mut buf = BytesMut::with_capacity(1024);
        for _ in 0..10_000 {
            let (res, b) = tls.read(std::mem::take(&mut buf)).await;
            buf = b;
            match res {
                Ok(0) | Err(_) => break,
                Ok(_) => buf.clear(),
            }
        }
        let (res, _) = tls
            .write_all(b"HTTP/1.1 204 No Content\r\n\r\n".to_vec())
            .await;
        let _ = res;
        tls.shutdown_write();
    });
    assert!(peer.max_buffered.get() <= MAX_SCRIPT + MAX_BUFFERED);
    peer.written.take()
}
