//! Request and response heads: parsed with httparse, recorded as offsets into the read
//! buffer (no allocation per header), and checked for the framing rules of RFC 9112 that
//! request smuggling exploits.

use super::HttpError;
use std::ops::Range;

/// Most header fields in one head. More is answered 431, as an oversized head is.
pub const MAX_HEADERS: usize = 128;

/// How the body of a message is delimited (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BodyFraming {
    #[default]
    None,
    Length(u64),
    Chunked,
    /// Response only: the body runs until the upstream closes.
    UntilClose,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct HeaderSpan {
    pub name: (u32, u32),
    pub value: (u32, u32),
}

impl HeaderSpan {
    fn new(base: *const u8, h: &httparse::Header) -> Self {
        let name_start = h.name.as_ptr() as usize - base as usize;
        let value_start = h.value.as_ptr() as usize - base as usize;
        HeaderSpan {
            name: (name_start as u32, (name_start + h.name.len()) as u32),
            value: (value_start as u32, (value_start + h.value.len()) as u32),
        }
    }
    pub fn name<'b>(&self, buf: &'b [u8]) -> &'b [u8] {
        &buf[self.name.0 as usize..self.name.1 as usize]
    }
    pub fn value<'b>(&self, buf: &'b [u8]) -> &'b [u8] {
        &buf[self.value.0 as usize..self.value.1 as usize]
    }
    pub fn is(&self, buf: &[u8], name: &str) -> bool {
        self.name(buf).eq_ignore_ascii_case(name.as_bytes())
    }
}

/// Which well-known headers a head carries, found in the one pass over its fields.
#[derive(Debug, Clone, Default)]
pub struct Known {
    pub host: Option<usize>,
    pub upgrade: Option<usize>,
    pub x_forwarded_for: Vec<usize>,
    /// `Connection: close` seen.
    pub conn_close: bool,
    /// `Connection: keep-alive` seen.
    pub conn_keep_alive: bool,
    /// `Connection: upgrade` seen.
    pub conn_upgrade: bool,
    /// Indexes of the `Connection` headers (their tokens name more hop-by-hop fields).
    pub connection: Vec<usize>,
    pub expect_continue: bool,
}

impl Known {
    /// Forgets the previous head's fields but keeps the vectors' memory for the next one.
    fn clear(&mut self) {
        let mut xff = std::mem::take(&mut self.x_forwarded_for);
        let mut connection = std::mem::take(&mut self.connection);
        xff.clear();
        connection.clear();
        *self = Known {
            x_forwarded_for: xff,
            connection,
            ..Known::default()
        };
    }
}

/// A parsed request head. Offsets refer to the buffer it was parsed from.
#[derive(Debug, Clone, Default)]
pub struct RequestHead {
    pub method: Range<usize>,
    pub target: Range<usize>,
    /// Minor version: 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub version: u8,
    pub headers: Vec<HeaderSpan>,
    /// Bytes of the head, including the final empty line.
    pub len: usize,
    pub framing: BodyFraming,
    pub known: Known,
}

impl RequestHead {
    pub fn method<'b>(&self, buf: &'b [u8]) -> &'b [u8] {
        &buf[self.method.clone()]
    }
    pub fn target<'b>(&self, buf: &'b [u8]) -> &'b [u8] {
        &buf[self.target.clone()]
    }
    pub fn path<'b>(&self, buf: &'b [u8]) -> &'b [u8] {
        let target = self.target(buf);
        let end = target
            .iter()
            .position(|&b| b == b'?')
            .unwrap_or(target.len());
        &target[..end]
    }
    pub fn host<'b>(&self, buf: &'b [u8]) -> Option<&'b [u8]> {
        self.known.host.map(|i| self.headers[i].value(buf))
    }
    pub fn is_head(&self, buf: &[u8]) -> bool {
        self.method(buf) == b"HEAD"
    }
    /// Requests that can be replayed safely on a fresh upstream connection (RFC 9110 §9.2.2).
    pub fn is_idempotent(&self, buf: &[u8]) -> bool {
        matches!(
            self.method(buf),
            b"GET" | b"HEAD" | b"OPTIONS" | b"TRACE" | b"PUT" | b"DELETE"
        )
    }
    pub fn wants_keep_alive(&self) -> bool {
        if self.version == 0 {
            self.known.conn_keep_alive && !self.known.conn_close
        } else {
            !self.known.conn_close
        }
    }
    /// Whether the client asks to switch to WebSocket (`Connection: upgrade` and a
    /// `websocket` token in `Upgrade`), valid or not.
    pub fn asks_websocket(&self, buf: &[u8]) -> bool {
        self.known.conn_upgrade
            && self.known.upgrade.is_some_and(|i| {
                self.headers[i]
                    .value(buf)
                    .split(|&b| b == b',')
                    .any(|t| trim(t).eq_ignore_ascii_case(b"websocket"))
            })
    }

    /// Checks a WebSocket opening handshake (RFC 6455 §4.1): HTTP/1.1 GET, no body, one
    /// `Sec-WebSocket-Key` of 16 bytes in base64, `Sec-WebSocket-Version: 13`.
    pub fn websocket_handshake(&self, buf: &[u8]) -> WebSocketHandshake {
        if !self.asks_websocket(buf) {
            return WebSocketHandshake::NotAsked;
        }
        if self.version != 1 || self.method(buf) != b"GET" || self.framing != BodyFraming::None {
            return WebSocketHandshake::Invalid;
        }
        let mut keys = self
            .headers
            .iter()
            .filter(|h| h.is(buf, "sec-websocket-key"));
        let key_ok = match (keys.next(), keys.next()) {
            (Some(k), None) => {
                let k = trim(k.value(buf));
                k.len() == 24
                    && k.ends_with(b"==")
                    && k[..22]
                        .iter()
                        .all(|b| b.is_ascii_alphanumeric() || *b == b'+' || *b == b'/')
            }
            _ => false,
        };
        if !key_ok {
            return WebSocketHandshake::Invalid;
        }
        let version_13 = self
            .headers
            .iter()
            .filter(|h| h.is(buf, "sec-websocket-version"))
            .any(|h| trim(h.value(buf)) == b"13");
        if !version_13 {
            return WebSocketHandshake::UnsupportedVersion;
        }
        WebSocketHandshake::Valid
    }
}

/// What a request on a WebSocket route asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WebSocketHandshake {
    /// No upgrade asked: an ordinary request.
    NotAsked,
    Valid,
    /// Malformed handshake: 400.
    Invalid,
    /// Not version 13: 426 with `Sec-WebSocket-Version: 13` (RFC 6455 §4.4).
    UnsupportedVersion,
}

/// Parses a request head from the start of `buf`. `Ok(false)` means more bytes are needed.
pub fn parse_request(
    buf: &[u8],
    head: &mut RequestHead,
    max_head: usize,
) -> Result<bool, HttpError> {
    let mut raw = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut raw);
    let status = match req.parse(buf) {
        Ok(s) => s,
        Err(httparse::Error::TooManyHeaders) => return Err(HttpError::HeadTooLarge),
        Err(_) => return Err(HttpError::BadRequest("malformed request head")),
    };
    let len = match status {
        httparse::Status::Partial => {
            if buf.len() >= max_head {
                // Still inside the request line: the URI is what is too long.
                let line_done = buf[..max_head].contains(&b'\n');
                return Err(if line_done {
                    HttpError::HeadTooLarge
                } else {
                    HttpError::UriTooLong
                });
            }
            return Ok(false);
        }
        httparse::Status::Complete(len) => len,
    };
    if len > max_head {
        let line_end = buf.iter().position(|&b| b == b'\n').unwrap_or(len);
        return Err(if line_end >= max_head {
            HttpError::UriTooLong
        } else {
            HttpError::HeadTooLarge
        });
    }
    let base = buf.as_ptr();
    let method = req.method.expect("complete head has a method");
    let target = req.path.expect("complete head has a target");
    let m0 = method.as_ptr() as usize - base as usize;
    let t0 = target.as_ptr() as usize - base as usize;
    head.method = m0..m0 + method.len();
    head.target = t0..t0 + target.len();
    head.version = req.version.unwrap_or(1);
    head.len = len;
    head.headers.clear();
    head.known.clear();
    for h in req.headers.iter() {
        head.headers.push(HeaderSpan::new(base, h));
    }
    let framing = classify(buf, &head.headers, &mut head.known, Side::Request)?;
    head.framing = framing;
    if head.version == 0 && framing == BodyFraming::Chunked {
        // RFC 9112 §6.1: Transfer-Encoding in HTTP/1.0 means the framing is faulty.
        return Err(HttpError::BadRequest(
            "transfer-encoding in an HTTP/1.0 request",
        ));
    }
    if head.version == 1 && head.known.host.is_none() {
        // RFC 9112 §3.2: a request without Host gets 400.
        return Err(HttpError::BadRequest("missing Host header"));
    }
    let target = head.target(buf);
    if target.first() != Some(&b'/') && target != b"*" && !target.starts_with(b"http") {
        return Err(HttpError::BadRequest("invalid request target"));
    }
    Ok(true)
}

/// A parsed response head. Offsets refer to the buffer it was parsed from.
#[derive(Debug, Clone, Default)]
pub struct ResponseHead {
    pub status: u16,
    pub version: u8,
    pub reason: Range<usize>,
    pub headers: Vec<HeaderSpan>,
    pub len: usize,
    pub framing: BodyFraming,
    pub known: Known,
}

impl ResponseHead {
    pub fn keep_alive(&self) -> bool {
        if self.version == 0 {
            self.known.conn_keep_alive && !self.known.conn_close
        } else {
            !self.known.conn_close
        }
    }
}

/// Parses a response head. `request_was_head` tells whether the body is absent whatever the
/// headers say (RFC 9112 §6.3 rule 1).
pub fn parse_response(
    buf: &[u8],
    head: &mut ResponseHead,
    max_head: usize,
    request_was_head: bool,
) -> Result<bool, HttpError> {
    let mut raw = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut raw);
    // A limit of the gateway's own (field count, head size) refuses the response for this
    // request only: it says nothing about the server's health (HttpError::side).
    let status = resp.parse(buf).map_err(|e| match e {
        httparse::Error::TooManyHeaders => HttpError::ResponseRefused("too many header fields"),
        _ => HttpError::BadUpstream("malformed response head"),
    })?;
    let len = match status {
        httparse::Status::Partial => {
            if buf.len() >= max_head {
                return Err(HttpError::ResponseRefused("response head too large"));
            }
            return Ok(false);
        }
        httparse::Status::Complete(len) => len,
    };
    let base = buf.as_ptr();
    head.status = resp.code.unwrap_or(0);
    head.version = resp.version.unwrap_or(1);
    let reason = resp.reason.unwrap_or("");
    let r0 = if reason.is_empty() {
        0
    } else {
        reason.as_ptr() as usize - base as usize
    };
    head.reason = r0..r0 + reason.len();
    head.len = len;
    head.headers.clear();
    head.known.clear();
    for h in resp.headers.iter() {
        head.headers.push(HeaderSpan::new(base, h));
    }
    let framing = classify(buf, &head.headers, &mut head.known, Side::Response)?;
    head.framing = if request_was_head
        || (100..200).contains(&head.status)
        || head.status == 204
        || head.status == 304
    {
        BodyFraming::None
    } else {
        match framing {
            BodyFraming::None => BodyFraming::UntilClose,
            other => other,
        }
    };
    Ok(true)
}

#[derive(Clone, Copy, PartialEq)]
enum Side {
    Request,
    Response,
}

/// One pass over the header fields: notes the well-known ones and decides the body framing,
/// rejecting the ambiguous combinations used for request smuggling (RFC 9112 §6.1, §6.3).
fn classify(
    buf: &[u8],
    headers: &[HeaderSpan],
    known: &mut Known,
    side: Side,
) -> Result<BodyFraming, HttpError> {
    let bad = |why: &'static str| match side {
        Side::Request => HttpError::BadRequest(why),
        Side::Response => HttpError::BadUpstream(why),
    };
    let mut content_length: Option<u64> = None;
    let mut transfer_encoding = false;
    let mut chunked_last = false;
    let mut chunked_seen = false;
    let mut other_coding = false;
    for (i, h) in headers.iter().enumerate() {
        let name = h.name(buf);
        let value = h.value(buf);
        match name.len() {
            4 if name.eq_ignore_ascii_case(b"host") => {
                if known.host.is_some() && side == Side::Request {
                    return Err(bad("duplicate Host header"));
                }
                known.host = Some(i);
            }
            7 if name.eq_ignore_ascii_case(b"upgrade") => known.upgrade = Some(i),
            6 if name.eq_ignore_ascii_case(b"expect")
                && trim(value).eq_ignore_ascii_case(b"100-continue") =>
            {
                known.expect_continue = true;
            }
            10 if name.eq_ignore_ascii_case(b"connection") => {
                known.connection.push(i);
                for token in value.split(|&b| b == b',') {
                    let token = trim(token);
                    if token.eq_ignore_ascii_case(b"close") {
                        known.conn_close = true;
                    } else if token.eq_ignore_ascii_case(b"keep-alive") {
                        known.conn_keep_alive = true;
                    } else if token.eq_ignore_ascii_case(b"upgrade") {
                        known.conn_upgrade = true;
                    }
                }
            }
            14 if name.eq_ignore_ascii_case(b"content-length") => {
                // A list of identical values is tolerated (RFC 9110 §8.6); differing
                // values are a smuggling attempt.
                for part in value.split(|&b| b == b',') {
                    let n =
                        parse_decimal(trim(part)).ok_or_else(|| bad("invalid Content-Length"))?;
                    match content_length {
                        Some(prev) if prev != n => return Err(bad("conflicting Content-Length")),
                        _ => content_length = Some(n),
                    }
                }
            }
            15 if name.eq_ignore_ascii_case(b"x-forwarded-for") => known.x_forwarded_for.push(i),
            17 if name.eq_ignore_ascii_case(b"transfer-encoding") => {
                transfer_encoding = true;
                for coding in value.split(|&b| b == b',') {
                    let coding = trim(coding);
                    if coding.is_empty() {
                        continue;
                    }
                    if coding.eq_ignore_ascii_case(b"chunked") {
                        if chunked_seen {
                            return Err(bad("chunked applied twice"));
                        }
                        chunked_seen = true;
                        chunked_last = true;
                    } else {
                        other_coding = true;
                        chunked_last = false;
                    }
                }
            }
            _ => {}
        }
    }
    if transfer_encoding {
        if content_length.is_some() {
            return Err(bad("both Content-Length and Transfer-Encoding"));
        }
        return match side {
            Side::Request if !chunked_last => Err(HttpError::BadRequest(
                "transfer coding other than a final chunked",
            )),
            Side::Request if other_coding => Err(HttpError::UnsupportedCoding),
            Side::Request => Ok(BodyFraming::Chunked),
            // RFC 9112 §6.3 rule 4: a response whose final coding is not chunked runs
            // until the connection closes.
            Side::Response if chunked_last => Ok(BodyFraming::Chunked),
            Side::Response => Ok(BodyFraming::UntilClose),
        };
    }
    Ok(match content_length {
        Some(0) | None => BodyFraming::None,
        Some(n) => BodyFraming::Length(n),
    }
    .or_explicit_zero(content_length))
}

impl BodyFraming {
    /// `Content-Length: 0` on a response is an explicit empty body, not "until close".
    fn or_explicit_zero(self, content_length: Option<u64>) -> BodyFraming {
        match (self, content_length) {
            (BodyFraming::None, Some(0)) => BodyFraming::Length(0),
            (f, _) => f,
        }
    }
}

pub fn trim(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

fn parse_decimal(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 18 {
        return None;
    }
    let mut n: u64 = 0;
    for &b in s {
        if !b.is_ascii_digit() {
            return None;
        }
        n = n * 10 + (b - b'0') as u64;
    }
    Some(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(text: &str) -> Result<RequestHead, HttpError> {
        let mut head = RequestHead::default();
        match parse_request(text.as_bytes(), &mut head, 16 * 1024)? {
            true => Ok(head),
            false => Err(HttpError::BadRequest("incomplete")),
        }
    }

    #[test]
    fn simple_get() {
        let text =
            "GET /api/x?y=1 HTTP/1.1\r\nHost: example.com\r\nX-Forwarded-For: 1.2.3.4\r\n\r\n";
        let h = req(text).unwrap();
        let buf = text.as_bytes();
        assert_eq!(h.method(buf), b"GET");
        assert_eq!(h.path(buf), b"/api/x");
        assert_eq!(h.host(buf), Some(&b"example.com"[..]));
        assert_eq!(h.framing, BodyFraming::None);
        assert_eq!(h.known.x_forwarded_for.len(), 1);
        assert!(h.wants_keep_alive());
        assert_eq!(h.len, text.len());
    }

    #[test]
    fn framing() {
        let h = req("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n").unwrap();
        assert_eq!(h.framing, BodyFraming::Length(5));
        let h = req("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n").unwrap();
        assert_eq!(h.framing, BodyFraming::Chunked);
        let h = req("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 5\r\n\r\n").unwrap();
        assert_eq!(h.framing, BodyFraming::Length(5));
    }

    #[test]
    fn smuggling_is_rejected() {
        let cases = [
            ("Content-Length: 5\r\nTransfer-Encoding: chunked", 400),
            ("Content-Length: 5\r\nContent-Length: 6", 400),
            ("Content-Length: 5, 6", 400),
            ("Content-Length: -5", 400),
            ("Content-Length: 0x5", 400),
            ("Transfer-Encoding: chunked, gzip", 400),
            ("Transfer-Encoding: gzip", 400),
            (
                "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked",
                400,
            ),
            ("Transfer-Encoding: gzip, chunked", 501),
            ("X-Folded: a\r\n  b", 400),
            ("X-Space : a", 400),
            ("Host: b", 400),
        ];
        for (headers, status) in cases {
            let text = format!("POST / HTTP/1.1\r\nHost: a\r\n{headers}\r\n\r\n");
            let err = req(&text).unwrap_err();
            assert_eq!(err.status(), status, "{headers:?}: {err:?}");
        }
    }

    #[test]
    fn websocket_handshakes() {
        let ws = |extra: &str| {
            let text = format!("GET /ws HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, Upgrade\r\nUpgrade: WebSocket\r\n{extra}\r\n");
            req(&text).unwrap().websocket_handshake(text.as_bytes())
        };
        let key = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";
        assert_eq!(
            ws(&format!("{key}Sec-WebSocket-Version: 13\r\n")),
            WebSocketHandshake::Valid
        );
        assert_eq!(
            ws(&format!("{key}Sec-WebSocket-Version: 8\r\n")),
            WebSocketHandshake::UnsupportedVersion
        );
        assert_eq!(
            ws("Sec-WebSocket-Version: 13\r\n"),
            WebSocketHandshake::Invalid
        );
        assert_eq!(
            ws(&format!("{key}{key}Sec-WebSocket-Version: 13\r\n")),
            WebSocketHandshake::Invalid
        );
        let plain = "GET /ws HTTP/1.1\r\nHost: a\r\n\r\n";
        assert_eq!(
            req(plain).unwrap().websocket_handshake(plain.as_bytes()),
            WebSocketHandshake::NotAsked
        );
        let post = format!("POST /ws HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\nContent-Length: 1\r\n{key}Sec-WebSocket-Version: 13\r\n\r\n");
        assert_eq!(
            req(&post).unwrap().websocket_handshake(post.as_bytes()),
            WebSocketHandshake::Invalid
        );
    }

    #[test]
    fn too_large() {
        let long_uri = format!("GET /{} HTTP/1.1\r\n", "a".repeat(2000));
        let mut head = RequestHead::default();
        let err = parse_request(long_uri.as_bytes(), &mut head, 1024).unwrap_err();
        assert_eq!(err.status(), 414);
        let big = format!("GET / HTTP/1.1\r\nHost: a\r\nX: {}\r\n", "b".repeat(2000));
        let err = parse_request(big.as_bytes(), &mut head, 1024).unwrap_err();
        assert_eq!(err.status(), 431);
        let partial = "GET / HTTP/1.1\r\nHost: a\r\n";
        assert!(!parse_request(partial.as_bytes(), &mut head, 1024).unwrap());
    }

    #[test]
    fn response_framing() {
        let mut h = ResponseHead::default();
        let text = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc";
        assert!(parse_response(text, &mut h, 8192, false).unwrap());
        assert_eq!(h.framing, BodyFraming::Length(3));
        assert!(parse_response(text, &mut h, 8192, true).unwrap());
        assert_eq!(h.framing, BodyFraming::None);
        let text = b"HTTP/1.1 200 OK\r\n\r\n";
        assert!(parse_response(text, &mut h, 8192, false).unwrap());
        assert_eq!(h.framing, BodyFraming::UntilClose);
        let text = b"HTTP/1.1 204 No Content\r\n\r\n";
        assert!(parse_response(text, &mut h, 8192, false).unwrap());
        assert_eq!(h.framing, BodyFraming::None);
        let text = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
        assert!(parse_response(text, &mut h, 8192, false).unwrap());
        assert_eq!(h.framing, BodyFraming::Length(0));
        let text = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert!(parse_response(text, &mut h, 8192, false).unwrap());
        assert_eq!(h.framing, BodyFraming::Chunked);
    }
}
