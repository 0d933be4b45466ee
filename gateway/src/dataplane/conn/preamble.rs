//! What comes before HTTP on a connection: the PROXY protocol header, then the TLS
//! handshake.

use crate::dataplane::conn::ListenerCtx;
use crate::dataplane::ctx::{Worker, HEAD_BUF_SIZE};
use crate::io::Stream;
use crate::protocol::tls::stream::MaybeTls;
use crate::util::clock::timeout_at;
use bytes::{Buf, BytesMut};
use std::net::SocketAddr;
use std::time::Instant;

/// What comes before HTTP on a connection: the PROXY header when the listener expects one
/// (always in plaintext, ahead of any TLS), then the TLS handshake on TLS listeners, both
/// within `header_timeout` of the accept. `None` closes the connection.
pub(crate) async fn preamble<S: Stream>(
    w: &Worker<MaybeTls<S>>,
    ctx: &ListenerCtx,
    stream: S,
    peer: SocketAddr,
    accepted: Instant,
) -> Option<(MaybeTls<S>, SocketAddr, BytesMut)> {
    // The listener's settings as of the accept (`ListenerCtx`): never looked up again by
    // name, so a reload cannot mix another listener's PROXY or TLS settings into this one.
    let settings = &ctx.settings;
    let proxy_protocol = settings.proxy_protocol;
    // Only a listed balancer may name the client: anyone else could name any address and
    // walk past `deny`, the per-IP caps and rates, or spend someone else's allowance.
    if proxy_protocol && !settings.proxy_trusted(peer.ip()) {
        crate::util::budget::refused(crate::util::budget::Refusal::ProxyUntrusted, &peer);
        return None;
    }
    let acceptor = settings.tls.clone();
    let deadline = accepted + w.snapshot().server.header_timeout;
    let mut initial = BytesMut::new();
    let mut peer = peer;
    if proxy_protocol {
        peer = read_proxy_header(&stream, &mut initial, peer, deadline).await?;
    }
    let Some(acceptor) = acceptor else {
        return Some((MaybeTls::Plain(stream), peer, initial));
    };
    let budget = deadline.saturating_duration_since(Instant::now());
    match crate::protocol::tls::accept_with_prefix(&acceptor, stream, initial, budget).await {
        Ok(tls) => {
            let hs = tls.handshake();
            w.stats.borrow_mut().tls_handshake(
                &ctx.name,
                hs.metric_label(),
                Some(hs.duration.as_secs_f64()),
            );
            Some((MaybeTls::Tls(Box::new(tls)), peer, BytesMut::new()))
        }
        Err(e) => {
            w.stats
                .borrow_mut()
                .tls_handshake(&ctx.name, e.metric_label(), None);
            tracing::debug!(%peer, listener = %ctx.name, error = %e, "TLS handshake failed");
            None
        }
    }
}

/// Reads the PROXY protocol header a listener behind an L4 balancer expects, on the raw
/// socket (before any TLS handshake), and returns the client address it names (the peer
/// itself for LOCAL/UNKNOWN headers). Bytes read past the header stay in `buf`. `None`: no
/// valid header by `deadline`; the connection is closed without an answer, as HAProxy does.
pub(crate) async fn read_proxy_header<S: Stream>(
    io: &S,
    buf: &mut BytesMut,
    peer: SocketAddr,
    deadline: Instant,
) -> Option<SocketAddr> {
    use crate::protocol::proxy_protocol::{parse, Parsed};
    loop {
        match parse(buf) {
            Ok(Parsed::Header { len, source }) => {
                buf.advance(len);
                return Some(source.unwrap_or(peer));
            }
            Ok(Parsed::Incomplete) => {}
            Err(_) => {
                tracing::debug!(%peer, "invalid PROXY protocol header");
                return None;
            }
        }
        if buf.capacity() - buf.len() < 256 {
            buf.reserve(HEAD_BUF_SIZE);
        }
        match timeout_at(deadline, io.read(std::mem::take(buf))).await {
            Ok((Ok(n), b)) if n > 0 => *buf = b,
            _ => return None,
        }
    }
}
