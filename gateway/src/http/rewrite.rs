//! Heads on their way through the proxy: the request head sent upstream (proxy headers set,
//! hop-by-hop fields dropped) and the response head sent back to the client.
//!
//! Both are written into one reused output buffer so a head leaves in a single write.

use super::head::{BodyFraming, HeaderSpan, Known, RequestHead, ResponseHead};
use std::io::Write;
use std::net::IpAddr;

/// Fields that describe one connection, never forwarded (RFC 9110 §7.6.1), plus the ones
/// the proxy sets itself.
fn is_hop_by_hop(name: &[u8]) -> bool {
    const HOP: [&[u8]; 8] = [
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"upgrade",
        b"proxy-authenticate",
        b"proxy-authorization",
    ];
    HOP.iter().any(|h| name.eq_ignore_ascii_case(h))
}

/// Whether a `Connection` header of the message names this field.
fn named_by_connection(buf: &[u8], headers: &[HeaderSpan], known: &Known, name: &[u8]) -> bool {
    known.connection.iter().any(|&i| {
        headers[i]
            .value(buf)
            .split(|&b| b == b',')
            .any(|token| super::head::trim(token).eq_ignore_ascii_case(name))
    })
}

/// What the proxy adds to a request it forwards.
pub struct Forwarding<'a> {
    /// The client address: the peer, or the one a PROXY header or trusted proxy names.
    pub client_ip: IpAddr,
    /// The TCP peer, appended to `X-Forwarded-For`.
    pub peer_ip: IpAddr,
    /// `http` or `https`.
    pub proto: &'a str,
    /// Whether to keep `Upgrade`/`Connection: upgrade` (a WebSocket route).
    pub upgrade: bool,
    /// Used as `Host` when the client sent none (HTTP/1.0).
    pub default_host: &'a str,
}

/// Writes the request head to send upstream, always as HTTP/1.1 on a keep-alive
/// connection (nginx: `proxy_http_version 1.1; proxy_set_header Connection "";`).
pub fn write_upstream_request(out: &mut Vec<u8>, buf: &[u8], head: &RequestHead, fwd: &Forwarding) {
    out.extend_from_slice(head.method(buf));
    out.push(b' ');
    out.extend_from_slice(head.target(buf));
    out.extend_from_slice(b" HTTP/1.1\r\n");
    if head.known.host.is_none() {
        out.extend_from_slice(b"Host: ");
        out.extend_from_slice(fwd.default_host.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    let mut forwarded_for_written = false;
    for h in &head.headers {
        let name = h.name(buf);
        if name.eq_ignore_ascii_case(b"x-forwarded-for") {
            // $proxy_add_x_forwarded_for: every incoming value, joined, then the peer.
            if !forwarded_for_written {
                forwarded_for_written = true;
                out.extend_from_slice(b"X-Forwarded-For: ");
                for (n, &i) in head.known.x_forwarded_for.iter().enumerate() {
                    if n > 0 {
                        out.extend_from_slice(b", ");
                    }
                    out.extend_from_slice(head.headers[i].value(buf));
                }
                let _ = write!(out, ", {}\r\n", fwd.peer_ip);
            }
            continue;
        }
        if is_hop_by_hop(name)
            || name.eq_ignore_ascii_case(b"x-real-ip")
            || name.eq_ignore_ascii_case(b"x-forwarded-proto")
            || name.eq_ignore_ascii_case(b"expect")
            || named_by_connection(buf, &head.headers, &head.known, name)
        {
            continue;
        }
        out.extend_from_slice(name);
        out.extend_from_slice(b": ");
        out.extend_from_slice(h.value(buf));
        out.extend_from_slice(b"\r\n");
    }
    if !forwarded_for_written {
        let _ = write!(out, "X-Forwarded-For: {}\r\n", fwd.peer_ip);
    }
    let _ = write!(
        out,
        "X-Real-IP: {}\r\nX-Forwarded-Proto: {}\r\n",
        fwd.client_ip, fwd.proto
    );
    if fwd.upgrade {
        out.extend_from_slice(b"Upgrade: websocket\r\nConnection: upgrade\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// How the response body travels to the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientFraming {
    /// As the upstream framed it (Content-Length, chunked, or none).
    Same,
    /// Chunked upstream body decoded for an HTTP/1.0 client, ended by closing.
    Dechunk,
}

/// Writes the response head for the client. Returns how the body must be relayed.
pub fn write_client_response(
    out: &mut Vec<u8>,
    buf: &[u8],
    head: &ResponseHead,
    client_version: u8,
    close: bool,
    upgrade: bool,
) -> ClientFraming {
    let framing = if client_version == 0 && head.framing == BodyFraming::Chunked {
        ClientFraming::Dechunk
    } else {
        ClientFraming::Same
    };
    let _ = write!(out, "HTTP/1.1 {} ", head.status);
    out.extend_from_slice(&buf[head.reason.clone()]);
    out.extend_from_slice(b"\r\n");
    for h in &head.headers {
        let name = h.name(buf);
        if is_hop_by_hop(name) || named_by_connection(buf, &head.headers, &head.known, name) {
            continue;
        }
        if framing == ClientFraming::Dechunk && name.eq_ignore_ascii_case(b"transfer-encoding") {
            continue;
        }
        out.extend_from_slice(name);
        out.extend_from_slice(b": ");
        out.extend_from_slice(h.value(buf));
        out.extend_from_slice(b"\r\n");
    }
    if upgrade {
        out.extend_from_slice(b"Upgrade: websocket\r\nConnection: upgrade\r\n");
    } else if close {
        out.extend_from_slice(b"Connection: close\r\n");
    } else if client_version == 0 {
        out.extend_from_slice(b"Connection: keep-alive\r\n");
    }
    out.extend_from_slice(b"\r\n");
    framing
}

/// Writes an informational (1xx) response head as received, minus hop-by-hop fields.
pub fn write_informational(out: &mut Vec<u8>, buf: &[u8], head: &ResponseHead) {
    let _ = write_client_response(out, buf, head, 1, false, false);
}

#[cfg(test)]
mod tests {
    use super::super::head::{parse_request, parse_response};
    use super::*;

    fn forward(text: &str) -> String {
        let mut head = RequestHead::default();
        assert!(parse_request(text.as_bytes(), &mut head, 16384).unwrap());
        let mut out = Vec::new();
        let fwd = Forwarding {
            client_ip: "203.0.113.7".parse().unwrap(),
            peer_ip: "127.0.0.1".parse().unwrap(),
            proto: "http",
            upgrade: false,
            default_host: "gw",
        };
        write_upstream_request(&mut out, text.as_bytes(), &head, &fwd);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn proxy_headers() {
        let out = forward(
            "GET /a HTTP/1.1\r\nHost: h\r\nX-Forwarded-For: 1.1.1.1\r\nX-Real-IP: 9.9.9.9\r\nConnection: keep-alive, X-Secret\r\nX-Secret: s\r\nKeep-Alive: 5\r\nTE: trailers\r\nX-Ok: y\r\n\r\n",
        );
        assert_eq!(
            out,
            "GET /a HTTP/1.1\r\nHost: h\r\nX-Forwarded-For: 1.1.1.1, 127.0.0.1\r\nX-Ok: y\r\nX-Real-IP: 203.0.113.7\r\nX-Forwarded-Proto: http\r\n\r\n"
        );
    }

    #[test]
    fn multiple_forwarded_for_are_joined() {
        let out = forward(
            "GET / HTTP/1.1\r\nX-Forwarded-For: 1.1.1.1\r\nHost: h\r\nX-Forwarded-For: 2.2.2.2\r\n\r\n",
        );
        assert!(
            out.contains("X-Forwarded-For: 1.1.1.1, 2.2.2.2, 127.0.0.1\r\n"),
            "{out}"
        );
        assert_eq!(out.matches("X-Forwarded-For").count(), 1);
    }

    #[test]
    fn http10_gets_a_host() {
        let out = forward("GET / HTTP/1.0\r\n\r\n");
        assert!(out.starts_with("GET / HTTP/1.1\r\nHost: gw\r\n"), "{out}");
    }

    #[test]
    fn response_drops_hop_by_hop() {
        let text = b"HTTP/1.1 200 Fine\r\nConnection: X-A\r\nX-A: 1\r\nKeep-Alive: timeout=5\r\nContent-Length: 2\r\n\r\nok";
        let mut head = ResponseHead::default();
        assert!(parse_response(text, &mut head, 8192, false).unwrap());
        let mut out = Vec::new();
        let f = write_client_response(&mut out, text, &head, 1, true, false);
        assert_eq!(f, ClientFraming::Same);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "HTTP/1.1 200 Fine\r\nContent-Length: 2\r\nConnection: close\r\n\r\n"
        );
    }
}
