//! Heads on their way through the proxy: the request head sent upstream (proxy headers set,
//! hop-by-hop fields dropped) and the response head sent back to the client.
//!
//! Both are written into one reused output buffer so a head leaves in a single write.

use super::head::{BodyFraming, Known, RequestHead, ResponseHead};
use std::io::Write;
use std::net::IpAddr;

/// What a request field is to the proxy, which decides whether it is forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Class {
    /// `Content-Length`, `Transfer-Encoding`: the proxy writes the framing it parsed.
    Framing,
    /// Written by the proxy from the request target or the `Host` it parsed.
    Host,
    /// `X-Forwarded-For`: the incoming values, joined, then the peer.
    ForwardedFor,
    /// Set by the proxy itself: `X-Real-IP`, `X-Forwarded-Proto`.
    GatewaySet,
    /// Claims about the client or the original request that only a trusted proxy may make.
    Forwarding,
    /// Describes one connection (RFC 9110 §7.6.1), or is answered by the proxy (`Expect`).
    HopByHop,
    /// End-to-end: forwarded unless `Connection` names it.
    Other,
}

/// Fields that say who the client is or what it asked for, which applications trust for
/// access control, logging and redirects. From an untrusted peer they are spoofed.
const FORWARDING: [&[u8]; 16] = [
    b"forwarded",
    b"x-forwarded-host",
    b"x-forwarded-port",
    b"x-forwarded-server",
    b"x-forwarded-prefix",
    b"x-forwarded-scheme",
    b"x-forwarded-ssl",
    b"x-original-url",
    b"x-rewrite-url",
    b"x-original-host",
    b"x-host",
    b"true-client-ip",
    b"x-client-ip",
    b"x-cluster-client-ip",
    b"cf-connecting-ip",
    b"fastly-client-ip",
];

const HOP_BY_HOP: [&[u8]; 9] = [
    b"connection",
    b"keep-alive",
    b"proxy-connection",
    b"te",
    b"trailer",
    b"upgrade",
    b"proxy-authenticate",
    b"proxy-authorization",
    b"expect",
];

pub(crate) fn class_of(name: &[u8]) -> Class {
    let is = |n: &[u8]| name.eq_ignore_ascii_case(n);
    if is(b"content-length") || is(b"transfer-encoding") {
        Class::Framing
    } else if is(b"host") {
        Class::Host
    } else if is(b"x-forwarded-for") {
        Class::ForwardedFor
    } else if is(b"x-real-ip") || is(b"x-forwarded-proto") {
        Class::GatewaySet
    } else if FORWARDING.iter().any(|n| is(n)) {
        Class::Forwarding
    } else if HOP_BY_HOP.iter().any(|n| is(n)) {
        Class::HopByHop
    } else {
        Class::Other
    }
}

/// The class of the name a CGI/WSGI/Rack server sees for `name`: those map `-` and `_` to
/// the same variable, so `X_Real_IP` is `X-Real-IP` to the application (Puma
/// CVE-2024-45614). No allocation: no name the proxy manages is longer than 32 bytes.
pub(crate) fn alias_class(name: &[u8]) -> Class {
    let mut folded = [0u8; 32];
    if name.len() > folded.len() {
        return Class::Other;
    }
    for (d, &b) in folded.iter_mut().zip(name) {
        *d = if b == b'_' { b'-' } else { b };
    }
    class_of(&folded[..name.len()])
}

/// Whether the proxy writes, strips or vouches for this field (or an underscore alias of
/// one): such a name must never come from anywhere the proxy does not control.
pub(crate) fn is_managed(name: &[u8]) -> bool {
    class_of(name) != Class::Other || alias_class(name) != Class::Other
}

/// Whether a `Connection` header of the message names this field: at most
/// `MAX_CONNECTION_TOKENS` comparisons, whatever the size of the head.
fn named_by_connection(buf: &[u8], known: &Known, name: &[u8]) -> bool {
    known
        .connection_names(buf)
        .any(|token| token.eq_ignore_ascii_case(name))
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
    /// The peer is one of the listener's `trusted_proxies`: its forwarding fields stand.
    pub trusted_peer: bool,
    /// Forwarding fields kept even from untrusted peers (lowercase names).
    pub keep_forwarding: &'a [String],
    /// `underscores_in_headers`: forward names containing `_` (except aliases of the
    /// fields the proxy manages).
    pub underscores: bool,
}

/// Writes the request head to send upstream, always as HTTP/1.1 on a keep-alive
/// connection (nginx: `proxy_http_version 1.1; proxy_set_header Connection "";`).
///
/// The framing rule: the fields that decide how the upstream reads this message (`Host`,
/// `Content-Length`, `Transfer-Encoding`) and the ones the proxy vouches for are never
/// copied from the client; they are written from what the proxy parsed, so no `Connection`
/// token, duplicate or odd spelling can make the upstream frame or attribute the request
/// differently from the proxy (RFC 9112 §6.3, RFC 9110 §7.6.1).
pub fn write_upstream_request(out: &mut Vec<u8>, buf: &[u8], head: &RequestHead, fwd: &Forwarding) {
    out.extend_from_slice(head.method(buf));
    out.push(b' ');
    out.extend_from_slice(head.forward_target());
    out.extend_from_slice(b" HTTP/1.1\r\nHost: ");
    match head.host(buf) {
        Some(host) => out.extend_from_slice(host),
        None => out.extend_from_slice(fwd.default_host.as_bytes()),
    }
    out.extend_from_slice(b"\r\n");
    let mut forwarded_for_written = false;
    for h in &head.headers {
        let name = h.name(buf);
        let class = class_of(name);
        if name.contains(&b'_') && (!fwd.underscores || alias_class(name) != Class::Other) {
            // nginx `underscores_in_headers off`; when on, still never an alias.
            continue;
        }
        match class {
            Class::Framing | Class::Host | Class::GatewaySet | Class::HopByHop => continue,
            Class::ForwardedFor => {
                // $proxy_add_x_forwarded_for: every incoming value, joined, then the peer.
                if !forwarded_for_written {
                    forwarded_for_written = true;
                    out.extend_from_slice(b"X-Forwarded-For: ");
                    for &i in &head.known.x_forwarded_for {
                        out.extend_from_slice(head.headers[i].value(buf));
                        out.extend_from_slice(b", ");
                    }
                    put_ip(out, fwd.peer_ip);
                    out.extend_from_slice(b"\r\n");
                }
                continue;
            }
            Class::Forwarding => {
                let kept = fwd.trusted_peer
                    || fwd
                        .keep_forwarding
                        .iter()
                        .any(|k| name.eq_ignore_ascii_case(k.as_bytes()));
                if !kept {
                    continue;
                }
            }
            Class::Other => {
                if named_by_connection(buf, &head.known, name) {
                    continue;
                }
            }
        }
        out.extend_from_slice(name);
        out.extend_from_slice(b": ");
        out.extend_from_slice(h.value(buf));
        out.extend_from_slice(b"\r\n");
    }
    if !forwarded_for_written {
        out.extend_from_slice(b"X-Forwarded-For: ");
        put_ip(out, fwd.peer_ip);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"X-Real-IP: ");
    put_ip(out, fwd.client_ip);
    out.extend_from_slice(b"\r\nX-Forwarded-Proto: ");
    out.extend_from_slice(fwd.proto.as_bytes());
    out.extend_from_slice(b"\r\n");
    write_framing(out, head.framing);
    if fwd.upgrade {
        out.extend_from_slice(b"Upgrade: websocket\r\nConnection: upgrade\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// Appends `n` in decimal. By hand rather than through `write!`: the formatting machinery
/// was a measurable part of a small request's user-space time (an address, a length and a
/// status per request).
fn put_decimal(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

/// Appends `ip` as text, exactly as its `Display` would: IPv4 (the common case, twice per
/// request) by hand, IPv6 through `Display`.
fn put_ip(out: &mut Vec<u8>, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                put_decimal(out, u64::from(octet));
            }
        }
        IpAddr::V6(v6) => {
            let _ = write!(out, "{v6}");
        }
    }
}

/// The proxy's own framing field for a body framed as `framing`: one canonical
/// `Content-Length` (never `0005` or `5, 5`) or one `Transfer-Encoding: chunked`.
pub(crate) fn write_framing(out: &mut Vec<u8>, framing: BodyFraming) {
    match framing {
        BodyFraming::Length(n) => {
            out.extend_from_slice(b"Content-Length: ");
            put_decimal(out, n);
            out.extend_from_slice(b"\r\n");
        }
        BodyFraming::Chunked => out.extend_from_slice(b"Transfer-Encoding: chunked\r\n"),
        BodyFraming::None | BodyFraming::UntilClose => {}
    }
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
///
/// The framing fields are the proxy's own, as for requests: none for 1xx, 204 and 304
/// (RFC 9110 §8.6, §15.4.5: no body follows), the representation's canonical
/// `Content-Length` for a response to HEAD (as nginx keeps it, RFC 9110 §9.3.2), and
/// otherwise what the proxy will actually relay. `Connection` cannot remove them.
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
    out.extend_from_slice(b"HTTP/1.1 ");
    put_decimal(out, u64::from(head.status));
    out.push(b' ');
    out.extend_from_slice(&buf[head.reason.clone()]);
    out.extend_from_slice(b"\r\n");
    for h in &head.headers {
        let name = h.name(buf);
        match class_of(name) {
            Class::Framing | Class::HopByHop => continue,
            _ if named_by_connection(buf, &head.known, name) => continue,
            _ => {}
        }
        out.extend_from_slice(name);
        out.extend_from_slice(b": ");
        out.extend_from_slice(h.value(buf));
        out.extend_from_slice(b"\r\n");
    }
    let bodiless = head.status < 200 || head.status == 204 || head.status == 304;
    match head.framing {
        // Only a response to HEAD has no body framing with a status that allows a body.
        BodyFraming::None if !bodiless => {
            if let Some(n) = head.known.content_length {
                write_framing(out, BodyFraming::Length(n));
            }
        }
        BodyFraming::Chunked if framing == ClientFraming::Dechunk => {}
        f if !bodiless => write_framing(out, f),
        _ => {}
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
pub(crate) fn write_informational(out: &mut Vec<u8>, buf: &[u8], head: &ResponseHead) {
    let _ = write_client_response(out, buf, head, 1, false, false);
}

#[cfg(test)]
mod tests {
    use super::super::head::{parse_request, parse_response};
    use super::*;

    #[test]
    fn numbers_and_addresses_are_written_as_display_writes_them() {
        for n in [0u64, 7, 10, 99, 100, 204, 65535, u64::MAX] {
            let mut out = Vec::new();
            put_decimal(&mut out, n);
            assert_eq!(out, n.to_string().into_bytes());
        }
        for ip in [
            "0.0.0.0",
            "127.0.0.1",
            "198.51.100.7",
            "255.255.255.255",
            "::1",
            "2001:db8::1",
            "::ffff:192.0.2.1",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            let mut out = Vec::new();
            put_ip(&mut out, ip);
            assert_eq!(out, ip.to_string().into_bytes());
        }
    }

    fn forward_with(text: &str, trusted_peer: bool, keep: &[String], underscores: bool) -> String {
        let mut head = RequestHead::default();
        assert!(parse_request(text.as_bytes(), &mut head, 16384).unwrap());
        let mut out = Vec::new();
        let fwd = Forwarding {
            client_ip: "203.0.113.7".parse().unwrap(),
            peer_ip: "127.0.0.1".parse().unwrap(),
            proto: "http",
            upgrade: false,
            default_host: "gw",
            trusted_peer,
            keep_forwarding: keep,
            underscores,
        };
        write_upstream_request(&mut out, text.as_bytes(), &head, &fwd);
        String::from_utf8(out).unwrap()
    }

    fn forward(text: &str) -> String {
        forward_with(text, false, &[], false)
    }

    fn respond(text: &[u8], request_was_head: bool, client_version: u8) -> String {
        let mut head = ResponseHead::default();
        assert!(parse_response(text, &mut head, 8192, request_was_head).unwrap());
        let mut out = Vec::new();
        write_client_response(&mut out, text, &head, client_version, false, false);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn connection_cannot_remove_what_the_proxy_writes() {
        let out = forward(
            "POST /a HTTP/1.1\r\nHost: h\r\nConnection: Content-Length, host, X-Real-IP, X-Forwarded-For, X-Forwarded-Proto, Transfer-Encoding\r\nContent-Length: 0005\r\n\r\n",
        );
        assert_eq!(
            out,
            "POST /a HTTP/1.1\r\nHost: h\r\nX-Forwarded-For: 127.0.0.1\r\nX-Real-IP: 203.0.113.7\r\nX-Forwarded-Proto: http\r\nContent-Length: 5\r\n\r\n"
        );
        let out = forward(
            "POST /a HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked,\r\nTransfer-Encoding:\r\nConnection: transfer-encoding\r\n\r\n",
        );
        assert!(out.ends_with("Transfer-Encoding: chunked\r\n\r\n"), "{out}");
        assert_eq!(out.matches("Transfer-Encoding").count(), 1, "{out}");
        let out = forward("POST /a HTTP/1.1\r\nHost: h\r\nContent-Length: 5, 5\r\n\r\n");
        assert_eq!(out.matches("Content-Length").count(), 1, "{out}");
        assert!(out.contains("Content-Length: 5\r\n"), "{out}");
    }

    #[test]
    fn forwarding_headers_from_untrusted_peers_are_dropped() {
        let text = "GET / HTTP/1.1\r\nHost: h\r\nForwarded: for=1.2.3.4\r\nX-Forwarded-Host: evil\r\nX-Original-URL: /admin\r\nTrue-Client-IP: 1.2.3.4\r\nX-Forwarded-Port: 1\r\n\r\n";
        let out = forward(text);
        for name in [
            "Forwarded:",
            "X-Forwarded-Host",
            "X-Original-URL",
            "True-Client-IP",
            "X-Forwarded-Port",
        ] {
            assert!(!out.contains(name), "{name} in {out}");
        }
        let out = forward_with(text, false, &["x-forwarded-host".into()], false);
        assert!(out.contains("X-Forwarded-Host: evil\r\n"), "{out}");
        assert!(!out.contains("X-Original-URL"), "{out}");
        let out = forward_with(text, true, &[], false);
        assert!(
            out.contains("Forwarded: for=1.2.3.4\r\n") && out.contains("X-Original-URL"),
            "{out}"
        );
    }

    #[test]
    fn underscore_aliases_are_dropped() {
        let text = "GET / HTTP/1.1\r\nHost: h\r\nX_Real_IP: 1.1.1.1\r\nX-Forwarded_For: 1.1.1.1\r\nx_forwarded_proto: https\r\nContent_Length: 5\r\nX_App: y\r\n\r\n";
        let out = forward(text);
        assert!(!out.contains('_'), "{out}");
        let out = forward_with(text, false, &[], true);
        assert!(out.contains("X_App: y\r\n"), "{out}");
        assert_eq!(
            out.matches('_').count(),
            1,
            "only the non-alias survives: {out}"
        );
    }

    #[test]
    fn response_framing_is_the_proxys() {
        let out = respond(
            b"HTTP/1.1 200 OK\r\nConnection: Content-Length\r\nContent-Length: 0003\r\n\r\nabc",
            false,
            1,
        );
        assert_eq!(out, "HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n");
        let out = respond(b"HTTP/1.1 200 OK\r\nConnection: transfer-encoding\r\nTransfer-Encoding: chunked\r\n\r\n", false, 1);
        assert_eq!(out, "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n");
        let out = respond(
            b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n",
            false,
            1,
        );
        assert_eq!(out, "HTTP/1.1 204 No Content\r\n\r\n");
        let out = respond(
            b"HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: chunked\r\n\r\n",
            false,
            1,
        );
        assert_eq!(out, "HTTP/1.1 304 Not Modified\r\n\r\n");
        let out = respond(b"HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\n", true, 1);
        assert_eq!(out, "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n");
        let out = respond(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            true,
            1,
        );
        assert_eq!(out, "HTTP/1.1 200 OK\r\n\r\n");
        let out = respond(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            false,
            0,
        );
        assert_eq!(out, "HTTP/1.1 200 OK\r\nConnection: keep-alive\r\n\r\n");
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
