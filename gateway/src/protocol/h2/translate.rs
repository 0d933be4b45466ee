//! HTTP/2 ↔ HTTP/1.1 translation at the gateway's edge: an h2 stream's request (the
//! `http::request::Parts` that `h2::server` yields) becomes the bytes of the HTTP/1.1
//! request head sent upstream, and an upstream's HTTP/1.1 response head becomes the
//! `http::Response` sent on the stream.
//!
//! Translation is a known smuggling surface (a field HTTP/2 frames differently from
//! HTTP/1.1 can split or merge requests upstream), so the request is validated here even
//! where `h2` already did (defence in depth, and independent of the `h2` version):
//!
//! - connection-specific fields make the request malformed (RFC 9113 §8.2.2); `te` is
//!   allowed only as `te: trailers`;
//! - field names must be lower-case, values free of CR, LF and NUL (RFC 9113 §8.2.1);
//! - pseudo-headers are checked (RFC 9113 §8.3.1): `:path` in origin form (or `*` for
//!   OPTIONS), normalised exactly as an HTTP/1 target (`http1::target`) so routing cannot
//!   differ between the protocols; `:authority` (or `host`) valid as an HTTP/1 `Host`;
//!   a plain CONNECT refused with 405 as HTTP/1 does; an extended CONNECT (RFC 8441) with
//!   `:protocol = websocket` becomes the HTTP/1.1 WebSocket handshake (`GET` with
//!   `Upgrade: websocket`, `Connection: upgrade` and a `Sec-WebSocket-Key` of the gateway's
//!   own, since the h2 side has no key, RFC 8441 §5), any other `:protocol` is 405;
//! - cookie crumbs are joined with `"; "` (RFC 9113 §8.2.3);
//! - `content-length` must match the DATA frames ([`BodyLength`], RFC 9113 §8.1.1).
//!
//! The head written has the shape of `http1::rewrite::write_upstream_request`: `Host` from
//! `:authority`, the gateway's own `X-Forwarded-For`, `X-Real-IP` and `X-Forwarded-Proto`,
//! and the framing field written by the gateway: `Content-Length` when it is known, else
//! `Transfer-Encoding: chunked` (the DATA frames are re-framed as chunks).

use crate::protocol::error::HttpError;
use crate::protocol::http1::head::{BodyFraming, ResponseHead};
use crate::protocol::http1::rewrite::{alias_class, class_of, write_framing, Class, Forwarding};
use crate::protocol::http1::target;
use http::{HeaderName, HeaderValue, Method};
use std::io::Write;

/// Why a stream's request (or an upstream's response) cannot be translated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TranslateError {
    /// What HTTP/1 would answer: the status and the log reason derive from it.
    pub error: HttpError,
    /// Malformed in the sense of RFC 9113 §8.1.1: a stream error of type PROTOCOL_ERROR.
    /// The server may send the 400 first; the stream is reset either way.
    pub malformed: bool,
}

impl TranslateError {
    fn malformed(why: &'static str) -> Self {
        TranslateError {
            error: HttpError::BadRequest(why),
            malformed: true,
        }
    }

    fn refused(error: HttpError) -> Self {
        TranslateError {
            error,
            malformed: false,
        }
    }

    pub fn status(&self) -> u16 {
        self.error.status()
    }

    /// The RST_STREAM code to end the stream with after the status (if any) was sent.
    pub(crate) fn reset_reason(&self) -> Option<h2::Reason> {
        self.malformed.then_some(h2::Reason::PROTOCOL_ERROR)
    }
}

impl From<HttpError> for TranslateError {
    fn from(error: HttpError) -> Self {
        TranslateError::refused(error)
    }
}

/// An h2 request as the exchange routes and forwards it. Its memory is reused from one
/// stream to the next, like `RequestHead`'s.
#[derive(Debug, Default)]
pub struct H2Request {
    method: Option<Method>,
    /// `:authority` (or the `host` field), validated as an HTTP/1 `Host`.
    host: Vec<u8>,
    /// The normalised target (path, then the query as received): routed and forwarded.
    norm: Vec<u8>,
    norm_path: usize,
    /// The normalised path without `;params`, routed on when `has_params`.
    stripped: Vec<u8>,
    has_params: bool,
    framing: BodyFraming,
    /// An extended CONNECT with `:protocol = websocket` (RFC 8441 §4): the upstream gets the
    /// HTTP/1.1 handshake with `ws_key`.
    websocket: bool,
    /// It carried `sec-websocket-version: 13`; otherwise 426 (RFC 6455 §4.4).
    ws_version_13: bool,
    /// The `Sec-WebSocket-Key` sent upstream (RFC 6455 §4.1), fresh per stream.
    ws_key: [u8; 24],
}

impl H2Request {
    pub fn method(&self) -> &Method {
        self.method.as_ref().unwrap_or(&Method::GET)
    }
    /// The host the request is for; empty when the client sent neither `:authority` nor
    /// `host` (the head then carries `Forwarding::default_host`).
    pub fn host(&self) -> &[u8] {
        &self.host
    }
    /// The path the request is routed on (see `RequestHead::path`).
    pub fn path(&self) -> &[u8] {
        if self.has_params {
            &self.stripped
        } else {
            &self.norm[..self.norm_path]
        }
    }
    /// The target sent upstream: the normalised path with the query as received.
    #[cfg(test)]
    pub(crate) fn forward_target(&self) -> &[u8] {
        &self.norm
    }
    /// How the request body is framed upstream.
    pub fn framing(&self) -> BodyFraming {
        self.framing
    }
    /// The checker the stream's DATA frames go through.
    pub fn body_length(&self) -> BodyLength {
        BodyLength::new(match self.framing {
            BodyFraming::Length(n) => Some(n),
            BodyFraming::None => Some(0),
            _ => None,
        })
    }
    pub(crate) fn is_idempotent(&self) -> bool {
        self.method().is_idempotent()
    }
    /// An RFC 8441 WebSocket: the stream becomes a tunnel once the upstream accepts.
    pub(crate) fn is_websocket(&self) -> bool {
        self.websocket
    }
    /// The WebSocket asks for version 13, the only one (RFC 6455 §4.4: else 426).
    pub(crate) fn websocket_version_ok(&self) -> bool {
        self.ws_version_13
    }
    /// The `Sec-WebSocket-Accept` the upstream's 101 must carry for the key sent.
    pub(crate) fn websocket_accept(&self) -> [u8; 28] {
        crate::protocol::http1::head::websocket_accept_of(&self.ws_key)
    }
}

/// Fields that describe one connection and are malformed in HTTP/2 (RFC 9113 §8.2.2).
/// `http2-settings` belongs to the HTTP/1.1 Upgrade to h2c (RFC 7540 §3.2.1, removed by
/// RFC 9113 §3.1) and is listed in `Connection` there: on an HTTP/2 stream it is malformed.
const CONNECTION_SPECIFIC: [&str; 6] = [
    "connection",
    "http2-settings",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
];

/// Validates `parts` and writes the HTTP/1.1 request head for the upstream into `out`
/// (cleared first). `end_stream`: the HEADERS frame ended the stream (no body follows).
/// `max_head` is the listener's `max_header_bytes`: a longer `:path` is 414, a longer
/// head 431, as for HTTP/1.
pub fn translate_request(
    parts: &http::request::Parts,
    end_stream: bool,
    fwd: &Forwarding,
    max_head: usize,
    req: &mut H2Request,
    out: &mut Vec<u8>,
) -> Result<(), TranslateError> {
    out.clear();
    // RFC 9113 §8.5: a plain CONNECT has no route here; nginx and the HTTP/1 path answer
    // 405. The extended CONNECT of RFC 8441 (h2 hands `:protocol` over as an extension, and
    // only when the session enabled it) is a WebSocket when it names `websocket`; another
    // protocol is not carried (405 as well).
    req.websocket = false;
    if parts.method == Method::CONNECT {
        let protocol = parts.extensions.get::<h2::ext::Protocol>();
        if !protocol.is_some_and(|p| p.as_str().eq_ignore_ascii_case("websocket")) {
            return Err(HttpError::MethodNotAllowed.into());
        }
        // The tunnel's bytes are the stream's DATA frames, so a CONNECT that ends its
        // stream or declares a body cannot be one (the HTTP/1 rule: a GET without body).
        if end_stream || parts.headers.contains_key(http::header::CONTENT_LENGTH) {
            return Err(
                HttpError::BadRequest("WebSocket CONNECT with a body or END_STREAM").into(),
            );
        }
        req.websocket = true;
        // Exactly one version field (RFC 6455 §4.1 item 9), as HTTP/1 requires: with two,
        // the proxy and the upstream could each read a different one.
        let mut versions = parts.headers.get_all("sec-websocket-version").iter();
        if let (Some(_), Some(_)) = (versions.next(), versions.next()) {
            return Err(HttpError::BadRequest("more than one sec-websocket-version").into());
        }
        req.ws_version_13 = parts
            .headers
            .get("sec-websocket-version")
            .is_some_and(|v| v.as_bytes() == b"13");
        req.ws_key = crate::protocol::http1::head::websocket_key();
    }
    check_pseudo(parts, max_head, req)?;
    req.host.clear();
    let mut host_fields = parts.headers.get_all(http::header::HOST).iter();
    match (
        parts.uri.authority(),
        host_fields.next(),
        host_fields.next(),
    ) {
        (_, Some(_), Some(_)) => return Err(TranslateError::malformed("more than one host")),
        // RFC 9113 §8.3.1: a `host` that differs from `:authority` names another entity.
        (Some(a), Some(h), None) if a.as_str().as_bytes() != h.as_bytes() => {
            return Err(TranslateError::malformed(":authority and host differ"))
        }
        (Some(a), _, _) => req.host.extend_from_slice(a.as_str().as_bytes()),
        (None, Some(h), _) => req.host.extend_from_slice(h.as_bytes()),
        (None, None, _) => {}
    }
    if !target::valid_authority(&req.host) {
        return Err(TranslateError::malformed("invalid :authority"));
    }
    req.framing = if req.websocket {
        BodyFraming::None
    } else {
        framing(parts, end_stream)?
    };
    req.method = Some(parts.method.clone());

    // RFC 8441 §5: the HTTP/1.1 upstream gets the GET handshake of RFC 6455 §4.1.
    let method = if req.websocket {
        "GET"
    } else {
        parts.method.as_str()
    };
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(&req.norm);
    out.extend_from_slice(b" HTTP/1.1\r\nHost: ");
    if req.host.is_empty() {
        out.extend_from_slice(fwd.default_host.as_bytes());
    } else {
        out.extend_from_slice(&req.host);
    }
    out.extend_from_slice(b"\r\n");
    write_fields(parts, fwd, req.websocket, out)?;
    if req.websocket {
        out.extend_from_slice(b"Upgrade: websocket\r\nConnection: upgrade\r\nSec-WebSocket-Key: ");
        out.extend_from_slice(&req.ws_key);
        out.extend_from_slice(b"\r\n");
    }
    let _ = write!(
        out,
        "X-Real-IP: {}\r\nX-Forwarded-Proto: {}\r\n",
        fwd.client_ip, fwd.proto
    );
    write_framing(out, req.framing);
    out.extend_from_slice(b"\r\n");
    if out.len() > max_head {
        return Err(HttpError::HeadTooLarge.into());
    }
    Ok(())
}

/// `:method`, `:scheme` and `:path` (RFC 9113 §8.3.1), and the normalised target.
fn check_pseudo(
    parts: &http::request::Parts,
    max_head: usize,
    req: &mut H2Request,
) -> Result<(), TranslateError> {
    // h2 keeps `:scheme` only with an `:authority`; when kept it must be one we serve.
    if let Some(scheme) = parts.uri.scheme_str() {
        if scheme != "http" && scheme != "https" {
            return Err(TranslateError::malformed("unsupported :scheme"));
        }
    }
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().as_bytes())
        .unwrap_or_default();
    if path.is_empty() {
        return Err(TranslateError::malformed("empty :path"));
    }
    if path.len() > max_head {
        return Err(HttpError::UriTooLong.into());
    }
    if path == b"*" {
        // Asterisk form is for OPTIONS only (RFC 9113 §8.3.1, RFC 9112 §3.2.4).
        if parts.method != Method::OPTIONS {
            return Err(TranslateError::malformed("asterisk :path outside OPTIONS"));
        }
        req.norm.clear();
        req.norm.push(b'*');
        req.norm_path = 1;
        req.has_params = false;
        return Ok(());
    }
    if path[0] != b'/' {
        return Err(TranslateError::malformed(":path not in origin form"));
    }
    req.norm_path = target::normalise(path, &mut req.norm)
        .map_err(|why| TranslateError::refused(HttpError::BadRequest(why)))?;
    req.has_params = target::strip_parameters(&req.norm[..req.norm_path], &mut req.stripped);
    Ok(())
}

/// The body framing upstream: none when HEADERS ended the stream, the one declared
/// `content-length` (every value equal and canonical decimal), else chunked.
fn framing(parts: &http::request::Parts, end_stream: bool) -> Result<BodyFraming, TranslateError> {
    let mut declared = None;
    for value in parts.headers.get_all(http::header::CONTENT_LENGTH) {
        let n = parse_length(value.as_bytes())
            .ok_or(TranslateError::malformed("invalid content-length"))?;
        if declared.is_some_and(|d| d != n) {
            return Err(TranslateError::malformed("conflicting content-length"));
        }
        declared = Some(n);
    }
    Ok(match declared {
        // RFC 9113 §8.1.1: a declared length the DATA frames (none here) do not match.
        Some(n) if end_stream && n != 0 => {
            return Err(TranslateError::malformed("content-length without DATA"))
        }
        Some(n) => BodyFraming::Length(n),
        None if end_stream => BodyFraming::None,
        None => BodyFraming::Chunked,
    })
}

/// 1 to 19 ASCII digits (no sign, no list, no space): below `u64::MAX`.
fn parse_length(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 19 || !s.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(s).ok()?.parse().ok()
}

/// The regular fields, checked and filtered as `write_upstream_request` filters HTTP/1
/// ones, then the joined `cookie` and `X-Forwarded-For`. On a WebSocket (`websocket`),
/// a client's `sec-websocket-key`/`-accept` are dropped: they have no meaning on HTTP/2
/// (RFC 8441 §5) and the key sent upstream is the gateway's.
fn write_fields(
    parts: &http::request::Parts,
    fwd: &Forwarding,
    websocket: bool,
    out: &mut Vec<u8>,
) -> Result<(), TranslateError> {
    let mut cookies = 0;
    for (name, value) in parts.headers.iter() {
        let n = name.as_str().as_bytes();
        let v = value.as_bytes();
        check_field(n, v)?;
        if name == http::header::TE {
            continue; // `trailers` only (checked); hop-by-hop, and the upstream leg has none.
        }
        if name == http::header::COOKIE {
            cookies += 1;
            continue;
        }
        if websocket && matches!(n, b"sec-websocket-key" | b"sec-websocket-accept") {
            continue;
        }
        if n.contains(&b'_') && (!fwd.underscores || alias_class(n) != Class::Other) {
            continue; // nginx `underscores_in_headers`, and never an alias of a managed field.
        }
        match class_of(n) {
            // Framing, host and the gateway's own fields are written from what was checked;
            // `expect` is answered by the gateway, the rest describe one connection.
            Class::Framing
            | Class::Host
            | Class::GatewaySet
            | Class::HopByHop
            | Class::ForwardedFor => continue,
            Class::Forwarding => {
                let kept = fwd.trusted_peer
                    || fwd
                        .keep_forwarding
                        .iter()
                        .any(|k| n.eq_ignore_ascii_case(k.as_bytes()));
                if !kept {
                    continue;
                }
            }
            Class::Other => {}
        }
        write_field(out, n, v);
    }
    if cookies > 0 {
        // RFC 9113 §8.2.3: crumbs are one field again for HTTP/1.1, joined with "; ".
        out.extend_from_slice(b"cookie: ");
        for (i, crumb) in parts
            .headers
            .get_all(http::header::COOKIE)
            .iter()
            .enumerate()
        {
            if i > 0 {
                out.extend_from_slice(b"; ");
            }
            out.extend_from_slice(crumb.as_bytes());
        }
        out.extend_from_slice(b"\r\n");
    }
    // $proxy_add_x_forwarded_for: every incoming value, joined, then the peer.
    out.extend_from_slice(b"X-Forwarded-For: ");
    for value in parts.headers.get_all("x-forwarded-for") {
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b", ");
    }
    let _ = write!(out, "{}\r\n", fwd.peer_ip);
    Ok(())
}

/// The checks of RFC 9113 §8.2 on one regular field, on its bytes (`http` lower-cases
/// names and refuses CR, LF and NUL itself; this holds whatever built the parts).
fn check_field(name: &[u8], value: &[u8]) -> Result<(), TranslateError> {
    if name.iter().any(u8::is_ascii_uppercase) {
        return Err(TranslateError::malformed("uppercase field name"));
    }
    if value.iter().any(|&b| matches!(b, b'\r' | b'\n' | 0)) {
        // These would end or split the line in HTTP/1.1.
        return Err(TranslateError::malformed("CR, LF or NUL in a field value"));
    }
    // RFC 9113 §8.2.1: a value must not start or end with SP or HTAB (HTTP/1.1 strips
    // them, so the upstream would see another value than the one checked here).
    if matches!(value.first(), Some(b' ' | b'\t')) || matches!(value.last(), Some(b' ' | b'\t')) {
        return Err(TranslateError::malformed("whitespace around a field value"));
    }
    if CONNECTION_SPECIFIC.iter().any(|c| c.as_bytes() == name) {
        return Err(TranslateError::malformed("connection-specific field"));
    }
    if name == b"te" && value != b"trailers" {
        return Err(TranslateError::malformed("te other than trailers"));
    }
    Ok(())
}

fn write_field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Holds a stream's request body to its declared `content-length` (RFC 9113 §8.1.1): the
/// DATA frames must carry exactly that many bytes. Without a declared length any amount
/// is accepted (the body goes upstream chunked).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyLength {
    declared: Option<u64>,
    seen: u64,
}

impl BodyLength {
    pub fn new(declared: Option<u64>) -> Self {
        BodyLength { declared, seen: 0 }
    }

    /// Bytes received so far.
    pub fn seen(&self) -> u64 {
        self.seen
    }

    /// A DATA frame of `len` payload bytes arrived: an error as soon as it goes past the
    /// declared length, before the bytes are forwarded.
    pub fn on_data(&mut self, len: usize) -> Result<(), TranslateError> {
        self.seen = self.seen.saturating_add(len as u64);
        match self.declared {
            Some(d) if self.seen > d => {
                Err(TranslateError::malformed("DATA beyond content-length"))
            }
            _ => Ok(()),
        }
    }

    /// The stream ended (END_STREAM): an error when fewer bytes came than declared.
    pub fn on_end(&self) -> Result<(), TranslateError> {
        match self.declared {
            Some(d) if self.seen != d => {
                Err(TranslateError::malformed("DATA short of content-length"))
            }
            _ => Ok(()),
        }
    }
}

/// The `http::Response` for an h2 stream from an upstream's HTTP/1.1 response head (parsed
/// from `buf`). Connection-specific fields, whatever `Connection` names and the HTTP/1
/// framing are dropped (RFC 9113 §8.2.2); the canonical `content-length` is kept where
/// HTTP/1 keeps it, since it lets the client size the body. A 101 cannot be relayed on
/// HTTP/2 (RFC 9113 §8.6): refused with 502 for this request only, unless it accepted
/// the WebSocket handshake of an extended CONNECT (`upgraded`, validated by the exchange):
/// then it is the `200` of RFC 8441 §5, with its `sec-websocket-protocol` and
/// `-extensions` and without the accept, which has no meaning on HTTP/2.
/// To an extended CONNECT (`websocket`) any 2xx means the tunnel is open (RFC 8441 §5),
/// so an upstream's 2xx other than the validated 101 (a 200 with a body, a 204) is refused
/// with 502: relayed, the client would read its body as WebSocket bytes. Its other
/// statuses (4xx, 5xx) are relayed and tell the client the tunnel failed.
pub(crate) fn translate_response(
    buf: &[u8],
    head: &ResponseHead,
    websocket: bool,
    upgraded: bool,
) -> Result<http::Response<()>, TranslateError> {
    let status = match head.status {
        101 if upgraded => 200,
        101 => return Err(HttpError::ResponseRefused("101 on an HTTP/2 stream").into()),
        200..=299 if websocket => {
            return Err(
                HttpError::ResponseRefused("2xx other than 101 to a WebSocket CONNECT").into(),
            )
        }
        s => s,
    };
    let status = http::StatusCode::from_u16(status)
        .map_err(|_| HttpError::ResponseRefused("invalid status code"))?;
    let mut response = http::Response::new(());
    *response.status_mut() = status;
    let headers = response.headers_mut();
    for h in &head.headers {
        let name = h.name(buf);
        match class_of(name) {
            Class::Framing | Class::HopByHop => continue,
            _ if head
                .known
                .connection_names(buf)
                .any(|t| t.eq_ignore_ascii_case(name)) =>
            {
                continue
            }
            _ if upgraded && name.eq_ignore_ascii_case(b"sec-websocket-accept") => continue,
            _ => {}
        }
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name),
            HeaderValue::from_bytes(h.value(buf)),
        ) else {
            return Err(HttpError::BadUpstream("field not valid in HTTP/2").into());
        };
        headers.append(name, value);
    }
    let bodiless = head.status < 200 || head.status == 204 || head.status == 304;
    let length = match head.framing {
        BodyFraming::Length(n) => Some(n),
        // A response to HEAD keeps the representation's length, as HTTP/1 does.
        BodyFraming::None => head.known.content_length,
        BodyFraming::Chunked | BodyFraming::UntilClose => None,
    };
    if let (false, Some(n)) = (bodiless, length) {
        headers.insert(http::header::CONTENT_LENGTH, HeaderValue::from(n));
    }
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::http1::head::parse_response;

    const MAX: usize = 8192;

    fn fwd(underscores: bool) -> Forwarding<'static> {
        Forwarding {
            client_ip: "203.0.113.7".parse().unwrap(),
            peer_ip: "127.0.0.1".parse().unwrap(),
            proto: "https",
            upgrade: false,
            default_host: "gw",
            trusted_peer: false,
            keep_forwarding: &[],
            underscores,
        }
    }

    fn parts(method: &str, uri: &str, fields: &[(&str, &str)]) -> http::request::Parts {
        let mut b = http::Request::builder().method(method).uri(uri);
        for (n, v) in fields {
            b = b.header(*n, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    fn run(
        p: &http::request::Parts,
        end_stream: bool,
    ) -> Result<(String, H2Request), TranslateError> {
        let mut req = H2Request::default();
        let mut out = Vec::new();
        translate_request(p, end_stream, &fwd(false), MAX, &mut req, &mut out)?;
        Ok((String::from_utf8(out).unwrap(), req))
    }

    fn ok(method: &str, uri: &str, fields: &[(&str, &str)], end_stream: bool) -> String {
        run(&parts(method, uri, fields), end_stream).unwrap().0
    }

    fn err(method: &str, uri: &str, fields: &[(&str, &str)]) -> TranslateError {
        run(&parts(method, uri, fields), true).unwrap_err()
    }

    #[test]
    fn head_has_the_http1_shape() {
        let out = ok(
            "GET",
            "https://a.test/x/../y?q=1",
            &[
                ("x-forwarded-for", "1.1.1.1"),
                ("x-app", "v"),
                ("x-real-ip", "9.9.9.9"),
            ],
            true,
        );
        assert_eq!(
            out,
            "GET /y?q=1 HTTP/1.1\r\nHost: a.test\r\nx-app: v\r\nX-Forwarded-For: 1.1.1.1, 127.0.0.1\r\nX-Real-IP: 203.0.113.7\r\nX-Forwarded-Proto: https\r\n\r\n"
        );
    }

    #[test]
    fn framing_is_the_gateways() {
        let out = ok("POST", "https://a.test/", &[("content-length", "5")], false);
        assert!(out.ends_with("Content-Length: 5\r\n\r\n"), "{out}");
        let out = ok("POST", "https://a.test/", &[], false);
        assert!(out.ends_with("Transfer-Encoding: chunked\r\n\r\n"), "{out}");
        let out = ok("GET", "https://a.test/", &[], true);
        assert!(
            !out.contains("Content-Length") && !out.contains("Transfer-Encoding"),
            "{out}"
        );
        let out = ok("POST", "https://a.test/", &[("content-length", "0")], true);
        assert!(out.ends_with("Content-Length: 0\r\n\r\n"), "{out}");
        for bad in ["5, 5", "+5", "0x5", " 5", "", "99999999999999999999"] {
            let e = run(
                &parts("POST", "https://a.test/", &[("content-length", bad)]),
                false,
            );
            assert!(e.is_err_and(|e| e.malformed), "{bad:?}");
        }
        let mut p = parts("POST", "https://a.test/", &[("content-length", "5")]);
        p.headers
            .append("content-length", HeaderValue::from_static("6"));
        assert!(run(&p, false).unwrap_err().malformed);
        // A declared length with END_STREAM on HEADERS: no DATA can match it.
        assert!(err("POST", "https://a.test/", &[("content-length", "5")]).malformed);
    }

    #[test]
    fn connection_specific_fields_are_malformed() {
        for (n, v) in [
            ("connection", "close"),
            ("keep-alive", "5"),
            ("proxy-connection", "keep-alive"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("te", "gzip"),
            ("te", "trailers, gzip"),
        ] {
            let e = err("GET", "https://a.test/", &[(n, v)]);
            assert!(e.malformed && e.status() == 400, "{n}: {v}");
            assert_eq!(e.reset_reason(), Some(h2::Reason::PROTOCOL_ERROR));
        }
        let out = ok("GET", "https://a.test/", &[("te", "trailers")], true);
        assert!(!out.to_ascii_lowercase().contains("te:"), "{out}");
    }

    #[test]
    fn names_and_values_are_checked_as_bytes() {
        // `http` refuses to build these; the check holds for any builder of the parts.
        for v in [&b"a\rb"[..], b"a\nb", b"a\0b", b"x\r\nx-injected: 1"] {
            assert!(check_field(b"x-a", v).unwrap_err().malformed, "{v:?}");
        }
        assert!(check_field(b"X-A", b"v").unwrap_err().malformed);
        assert!(check_field(b"TE", b"trailers").unwrap_err().malformed);
        check_field(b"x-a", b"v\tw \x80").unwrap();
        // RFC 9113 §8.2.1: no leading or trailing SP/HTAB.
        for v in [&b" v"[..], b"v ", b"\tv", b"v\t"] {
            assert!(check_field(b"x-a", v).unwrap_err().malformed, "{v:?}");
        }
        assert!(
            check_field(b"http2-settings", b"AAMAAABkAAQAAP__")
                .unwrap_err()
                .malformed
        );
        // Through `http`: the same values never reach the translation.
        assert!(HeaderValue::from_bytes(b"a\r\nb").is_err());
        assert!(HeaderName::from_bytes(b"x a").is_err());
    }

    #[test]
    fn pseudo_headers_are_validated() {
        assert_eq!(err("CONNECT", "a.test:443", &[]).status(), 405);
        assert!(err("GET", "ftp://a.test/", &[]).malformed);
        assert!(err("GET", "https://a.test/a/../../b", &[]).status() == 400);
        assert!(err("GET", "https://a.test/a%2fb", &[]).status() == 400);
        assert!(err("GET", "https://a.test/..;/admin", &[]).status() == 400);
        assert!(err("GET", "https://user@a.test/", &[]).malformed);
        assert!(err("GET", "https://a.test:99999/", &[]).malformed);
        let out = ok("OPTIONS", "*", &[("host", "a.test")], true);
        assert!(
            out.starts_with("OPTIONS * HTTP/1.1\r\nHost: a.test\r\n"),
            "{out}"
        );
        // `*` is for OPTIONS only; a path must be in origin form.
        let mut p = parts("GET", "https://a.test/", &[]);
        p.uri = http::Uri::from_static("*");
        assert!(run(&p, true).unwrap_err().malformed);
        let long = format!("https://a.test/{}", "a".repeat(MAX));
        assert_eq!(err("GET", &long, &[]).status(), 414);
    }

    #[test]
    fn routing_sees_the_http1_path() {
        let (out, req) = run(
            &parts("GET", "https://a.test//pub/%2e%2e/admin;x/s?q", &[]),
            true,
        )
        .unwrap();
        assert_eq!(req.path(), b"/admin/s");
        assert_eq!(req.forward_target(), b"/admin;x/s?q");
        assert!(out.starts_with("GET /admin;x/s?q HTTP/1.1\r\n"), "{out}");
        assert_eq!(req.host(), b"a.test");
        assert_eq!(req.method(), Method::GET);
    }

    #[test]
    fn host_and_authority_must_agree() {
        assert!(err("GET", "https://a.test/", &[("host", "b.test")]).malformed);
        let out = ok("GET", "https://a.test/", &[("host", "a.test")], true);
        assert_eq!(
            out.matches("Host:").count() + out.matches("host:").count(),
            1,
            "{out}"
        );
        let out = ok("GET", "/x", &[("host", "b.test")], true);
        assert!(
            out.starts_with("GET /x HTTP/1.1\r\nHost: b.test\r\n"),
            "{out}"
        );
        let out = ok("GET", "/x", &[], true);
        assert!(out.starts_with("GET /x HTTP/1.1\r\nHost: gw\r\n"), "{out}");
        assert!(err("GET", "/x", &[("host", "a b")]).malformed);
        let mut p = parts("GET", "/x", &[("host", "a.test")]);
        p.headers.append("host", HeaderValue::from_static("a.test"));
        assert!(run(&p, true).unwrap_err().malformed);
    }

    #[test]
    fn cookie_crumbs_are_joined() {
        let mut p = parts("GET", "https://a.test/", &[("cookie", "a=1")]);
        p.headers.append("cookie", HeaderValue::from_static("b=2"));
        p.headers.append("cookie", HeaderValue::from_static("c=3"));
        let out = run(&p, true).unwrap().0;
        assert!(out.contains("\r\ncookie: a=1; b=2; c=3\r\n"), "{out}");
        assert_eq!(out.matches("cookie").count(), 1, "{out}");
    }

    #[test]
    fn managed_fields_are_the_gateways() {
        let fields = [
            ("x-forwarded-proto", "http"),
            ("x-forwarded-host", "evil"),
            ("forwarded", "for=1.2.3.4"),
            ("x_real_ip", "1.1.1.1"),
            ("content_length", "5"),
            ("x_app", "y"),
            ("expect", "100-continue"),
            ("proxy-authorization", "x"),
        ];
        let out = ok("GET", "https://a.test/", &fields, true);
        for gone in [
            "http\r",
            "evil",
            "for=",
            "1.1.1.1",
            "_",
            "expect",
            "proxy-auth",
        ] {
            assert!(!out.contains(gone), "{gone} in {out}");
        }
        let mut req = H2Request::default();
        let mut out = Vec::new();
        translate_request(
            &parts("GET", "https://a.test/", &fields),
            true,
            &fwd(true),
            MAX,
            &mut req,
            &mut out,
        )
        .unwrap();
        let out = String::from_utf8(out).unwrap();
        assert!(
            out.contains("x_app: y\r\n") && !out.contains("x_real_ip"),
            "{out}"
        );
    }

    #[test]
    fn oversized_head_is_431() {
        let big = "v".repeat(MAX);
        assert_eq!(
            err("GET", "https://a.test/", &[("x-big", &big)]).status(),
            431
        );
    }

    #[test]
    fn body_length_must_match_data() {
        let mut b = BodyLength::new(Some(5));
        b.on_data(3).unwrap();
        assert!(b.on_end().unwrap_err().malformed);
        b.on_data(2).unwrap();
        b.on_end().unwrap();
        assert!(b.on_data(1).unwrap_err().malformed);
        let mut b = BodyLength::new(None);
        b.on_data(usize::MAX).unwrap();
        b.on_data(usize::MAX).unwrap();
        b.on_end().unwrap();
        let (_, req) = run(&parts("GET", "https://a.test/", &[]), true).unwrap();
        assert!(
            req.body_length().on_data(1).is_err(),
            "no DATA after END_STREAM"
        );
    }

    fn response(text: &[u8], request_was_head: bool) -> Result<http::Response<()>, TranslateError> {
        let mut head = ResponseHead::default();
        assert!(parse_response(text, &mut head, 8192, request_was_head).unwrap());
        translate_response(text, &head, false, false)
    }

    #[test]
    fn responses_lose_connection_fields() {
        let r = response(
            b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-A\r\nX-A: 1\r\nKeep-Alive: 5\r\nTransfer-Encoding: chunked\r\nUpgrade: h2c\r\nX-B: 2\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\n\r\n",
            false,
        )
        .unwrap();
        assert_eq!(r.status(), 200);
        let names: Vec<_> = r.headers().keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["x-b", "set-cookie"]);
        assert_eq!(r.headers().get_all("set-cookie").iter().count(), 2);
        let r = response(b"HTTP/1.1 200 OK\r\nContent-Length: 0003\r\n\r\nabc", false).unwrap();
        assert_eq!(r.headers()["content-length"], "3");
        let r = response(b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\n", true).unwrap();
        assert_eq!(r.headers()["content-length"], "7");
        let r = response(
            b"HTTP/1.1 204 No Content\r\nContent-Length: 7\r\n\r\n",
            false,
        )
        .unwrap();
        assert!(r.headers().get("content-length").is_none());
        let e = response(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
            false,
        )
        .unwrap_err();
        assert_eq!(e.status(), 502);
    }

    fn extended_connect(protocol: &'static str, fields: &[(&str, &str)]) -> http::request::Parts {
        let mut p = parts("CONNECT", "https://example.test/ws?x=1", fields);
        p.extensions
            .insert(h2::ext::Protocol::from_static(protocol));
        p
    }

    #[test]
    fn a_websocket_extended_connect_is_the_http1_handshake_with_a_key_of_our_own() {
        let fields = [
            ("sec-websocket-version", "13"),
            ("sec-websocket-protocol", "chat"),
            ("sec-websocket-key", "AAAAAAAAAAAAAAAAAAAAAA=="),
        ];
        let (head, req) = run(&extended_connect("websocket", &fields), false).unwrap();
        assert!(req.is_websocket() && req.websocket_version_ok());
        assert!(
            head.starts_with("GET /ws?x=1 HTTP/1.1\r\nHost: example.test\r\n"),
            "{head}"
        );
        assert!(head.contains("Upgrade: websocket\r\nConnection: upgrade\r\nSec-WebSocket-Key: "));
        assert!(head.contains("sec-websocket-protocol: chat\r\n"));
        assert!(
            !head.contains("AAAAAAAAAAAAAAAAAAAAAA=="),
            "the client's key is dropped"
        );
        assert!(!head.to_ascii_lowercase().contains("content-length"));
        assert!(!head.to_ascii_lowercase().contains("transfer-encoding"));
        let key = head
            .split("Sec-WebSocket-Key: ")
            .nth(1)
            .and_then(|k| k.split("\r\n").next())
            .unwrap();
        assert_eq!(key.len(), 24);
        assert_eq!(
            req.websocket_accept(),
            crate::protocol::http1::head::websocket_accept_of(key.as_bytes())
        );
        // Fresh per stream.
        let (again, _) = run(&extended_connect("websocket", &fields), false).unwrap();
        assert_ne!(head, again);
        // Refused: another protocol, a plain CONNECT, END_STREAM or a body, version 8.
        let other = run(&extended_connect("chat", &fields), false).unwrap_err();
        assert_eq!(other.status(), 405);
        let plain = parts("CONNECT", "example.test:443", &[]);
        assert_eq!(run(&plain, false).unwrap_err().status(), 405);
        let ended = run(&extended_connect("websocket", &fields), true).unwrap_err();
        assert_eq!(ended.status(), 400);
        let with_len = [("sec-websocket-version", "13"), ("content-length", "3")];
        let body = run(&extended_connect("websocket", &with_len), false).unwrap_err();
        assert_eq!(body.status(), 400);
        let (_, v8) = run(
            &extended_connect("websocket", &[("sec-websocket-version", "8")]),
            false,
        )
        .unwrap();
        assert!(!v8.websocket_version_ok());
        // Two version fields, whatever their values: 400, as on HTTP/1.
        let two = [
            ("sec-websocket-version", "8"),
            ("sec-websocket-version", "13"),
        ];
        let e = run(&extended_connect("websocket", &two), false).unwrap_err();
        assert_eq!(e.status(), 400);
    }

    #[test]
    fn an_accepted_101_is_the_200_of_rfc_8441() {
        let text = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\nSec-WebSocket-Protocol: chat\r\n\r\n";
        let mut head = ResponseHead::default();
        assert!(parse_response(text, &mut head, 8192, false).unwrap());
        let r = translate_response(text, &head, true, true).unwrap();
        assert_eq!(r.status(), 200);
        let names: Vec<_> = r.headers().keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["sec-websocket-protocol"]);
    }

    #[test]
    fn no_2xx_but_the_validated_101_answers_a_websocket_connect() {
        let mut head = ResponseHead::default();
        for text in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"[..],
            b"HTTP/1.1 204 No Content\r\n\r\n",
            b"HTTP/1.1 299 Odd\r\nContent-Length: 0\r\n\r\n",
        ] {
            assert!(parse_response(text, &mut head, 8192, false).unwrap());
            let e = translate_response(text, &head, true, false).unwrap_err();
            assert_eq!(e.status(), 502, "{}", String::from_utf8_lossy(text));
            // The same answer to an ordinary request is relayed.
            assert!(translate_response(text, &head, false, false).is_ok());
        }
        // A refusal is relayed with its status: it tells the client the tunnel failed.
        let text = b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n";
        assert!(parse_response(text, &mut head, 8192, false).unwrap());
        let r = translate_response(text, &head, true, false).unwrap();
        assert_eq!(r.status(), 403);
    }
}
