//! Request and response heads: parsed with httparse, recorded as offsets into the read
//! buffer (no allocation per header), and checked for the framing rules of RFC 9112 that
//! request smuggling exploits.

use super::target;
use crate::protocol::error::HttpError;
use std::ops::Range;

/// Most header fields in one head. More is answered 431, as an oversized head is.
pub const MAX_HEADERS: usize = 128;

/// Most `Connection` tokens in one head (all its `Connection` fields together, repeats
/// included; empty list elements are not tokens). Every field forwarded is checked
/// against them, and each token against the ones before, so without a cap a head of
/// `x,x,x,…` and many fields costs tokens × fields (8000 × 120 in 64 KiB, seconds at
/// 1 MiB). Real clients send one to three (`keep-alive`, `Upgrade`, `TE`); more is a 400
/// (a 502 from an upstream), and the work per head stays linear in its size.
pub(crate) const MAX_CONNECTION_TOKENS: usize = 32;

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
    pub(crate) x_forwarded_for: Vec<usize>,
    /// `Connection: close` seen.
    pub(crate) conn_close: bool,
    /// `Connection: keep-alive` seen.
    pub(crate) conn_keep_alive: bool,
    /// `Connection: upgrade` seen.
    pub(crate) conn_upgrade: bool,
    /// The distinct tokens of the `Connection` headers (they name more hop-by-hop fields)
    /// as spans of the buffer: at most `MAX_CONNECTION_TOKENS`.
    pub(crate) connection_tokens: Vec<(u32, u32)>,
    /// How many `Connection` tokens were listed, repeats included.
    connection_listed: usize,
    pub expect_continue: bool,
    /// The one `Content-Length` value (lists of equal values folded), even where the
    /// framing ignores it (a response to HEAD keeps the representation's length).
    pub content_length: Option<u64>,
}

impl Known {
    /// Forgets the previous head's fields but keeps the vectors' memory for the next one.
    fn clear(&mut self) {
        let mut xff = std::mem::take(&mut self.x_forwarded_for);
        let mut connection_tokens = std::mem::take(&mut self.connection_tokens);
        xff.clear();
        connection_tokens.clear();
        *self = Known {
            x_forwarded_for: xff,
            connection_tokens,
            ..Known::default()
        };
    }
}

impl Known {
    /// Records a `Connection` token of `buf` unless an equal one (ignoring case) is
    /// recorded. `false`: it is one more than `MAX_CONNECTION_TOKENS` listed.
    fn note_connection_token(&mut self, buf: &[u8], token: &[u8]) -> bool {
        self.connection_listed += 1;
        if self.connection_listed > MAX_CONNECTION_TOKENS {
            return false;
        }
        if !self
            .connection_names(buf)
            .any(|t| t.eq_ignore_ascii_case(token))
        {
            let start = token.as_ptr() as usize - buf.as_ptr() as usize;
            self.connection_tokens
                .push((start as u32, (start + token.len()) as u32));
        }
        true
    }

    /// The distinct field names the `Connection` headers list.
    pub(crate) fn connection_names<'b>(
        &'b self,
        buf: &'b [u8],
    ) -> impl Iterator<Item = &'b [u8]> + 'b {
        self.connection_tokens
            .iter()
            .map(move |&(s, e)| &buf[s as usize..e as usize])
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
    /// The normalised target (path, then the query as received): routed and forwarded.
    /// Its memory is reused from one request of the connection to the next.
    norm: Vec<u8>,
    /// Length of the path part of `norm`.
    norm_path: usize,
    /// The normalised path without `;params`, routed on when `has_params`.
    stripped: Vec<u8>,
    has_params: bool,
    /// The authority of an absolute-form target, which replaces `Host` (RFC 9112 §3.2.2).
    authority: Option<Range<usize>>,
}

impl RequestHead {
    pub fn method<'b>(&self, buf: &'b [u8]) -> &'b [u8] {
        &buf[self.method.clone()]
    }
    pub fn target<'b>(&self, buf: &'b [u8]) -> &'b [u8] {
        &buf[self.target.clone()]
    }
    /// The path the request is routed on: the normalised path with each segment's
    /// `;params` removed (`target::strip_parameters`).
    pub fn path(&self) -> &[u8] {
        if self.has_params {
            &self.stripped
        } else {
            &self.norm[..self.norm_path]
        }
    }
    /// The request target sent upstream: the normalised path in origin form, with the
    /// query as received.
    pub(crate) fn forward_target(&self) -> &[u8] {
        &self.norm
    }
    /// The host the request is for: an absolute-form target's authority, or `Host`.
    pub fn host<'b>(&self, buf: &'b [u8]) -> Option<&'b [u8]> {
        match &self.authority {
            Some(a) => Some(&buf[a.clone()]),
            None => self.known.host.map(|i| self.headers[i].value(buf)),
        }
    }
    pub fn is_head(&self, buf: &[u8]) -> bool {
        self.method(buf) == b"HEAD"
    }
    /// Requests that can be replayed safely on a fresh upstream connection (RFC 9110 §9.2.2).
    pub(crate) fn is_idempotent(&self, buf: &[u8]) -> bool {
        matches!(
            self.method(buf),
            b"GET" | b"HEAD" | b"OPTIONS" | b"TRACE" | b"PUT" | b"DELETE"
        )
    }
    pub(crate) fn wants_keep_alive(&self) -> bool {
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
    pub(crate) fn websocket_handshake(&self, buf: &[u8]) -> WebSocketHandshake {
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
        // Exactly one `Sec-WebSocket-Version` (RFC 6455 §4.1 item 9): with two, the proxy
        // and the upstream could each read a different one.
        let mut versions = self
            .headers
            .iter()
            .filter(|h| h.is(buf, "sec-websocket-version"));
        match (versions.next(), versions.next()) {
            (Some(_), Some(_)) => return WebSocketHandshake::Invalid,
            (Some(v), None) if trim(v.value(buf)) == b"13" => {}
            _ => return WebSocketHandshake::UnsupportedVersion,
        }
        WebSocketHandshake::Valid
    }
}

/// The `Sec-WebSocket-Accept` value that proves an upstream read this handshake's key
/// (RFC 6455 §4.2.2): base64(SHA-1(key + GUID)). Only for a `Valid` handshake.
pub(crate) fn websocket_accept(buf: &[u8], head: &RequestHead) -> [u8; 28] {
    let key = head
        .headers
        .iter()
        .find(|h| h.is(buf, "sec-websocket-key"))
        .map(|h| trim(h.value(buf)))
        .unwrap_or_default();
    websocket_accept_of(key)
}

/// base64(SHA-1(key + GUID)) for a `Sec-WebSocket-Key` (RFC 6455 §4.2.2).
pub(crate) fn websocket_accept_of(key: &[u8]) -> [u8; 28] {
    const GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY);
    ctx.update(key);
    ctx.update(GUID);
    base64(ctx.finish().as_ref())
}

/// A fresh `Sec-WebSocket-Key` (RFC 6455 §4.1: 16 random bytes, base64), for a handshake
/// the gateway makes itself (WebSocket over HTTP/2 has no key of its own, RFC 8441 §5).
pub(crate) fn websocket_key() -> [u8; 24] {
    use ring::rand::SecureRandom;
    let mut nonce = [0u8; 16];
    // The system's random source does not fail on Linux once booted; a zero nonce would
    // still make a valid (predictable) key, which only the upstream ever sees.
    let _ = ring::rand::SystemRandom::new().fill(&mut nonce);
    base64(&nonce)
}

/// Standard base64 with padding; `N` must be `4 * ceil(bytes.len() / 3)`.
fn base64<const N: usize>(bytes: &[u8]) -> [u8; N] {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = [b'='; N];
    for (i, group) in bytes.chunks(3).enumerate() {
        let n = group
            .iter()
            .enumerate()
            .fold(0u32, |n, (j, &b)| n | (b as u32) << (16 - 8 * j));
        for k in 0..=group.len() {
            out[i * 4 + k] = ALPHABET[(n >> (18 - 6 * k)) as usize & 63];
        }
    }
    out
}

impl ResponseHead {
    /// Whether a 101 accepts exactly the WebSocket handshake whose accept value is `accept`:
    /// an HTTP/1.1 101 (HTTP/1.0 has no Upgrade, RFC 9110 §7.8), `Upgrade: websocket`,
    /// `Connection: upgrade` and the right `Sec-WebSocket-Accept`. Anything else must not
    /// become a raw tunnel.
    pub(crate) fn accepts_websocket(&self, buf: &[u8], accept: &[u8; 28]) -> bool {
        if self.version != 1 {
            return false;
        }
        let upgrade_ok = self
            .known
            .upgrade
            .is_some_and(|i| trim(self.headers[i].value(buf)).eq_ignore_ascii_case(b"websocket"));
        let mut accepts = self
            .headers
            .iter()
            .filter(|h| h.is(buf, "sec-websocket-accept"));
        let accept_ok = match (accepts.next(), accepts.next()) {
            (Some(h), None) => trim(h.value(buf)) == accept,
            _ => false,
        };
        upgrade_ok && self.known.conn_upgrade && accept_ok
    }
}

/// What a request on a WebSocket route asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WebSocketHandshake {
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
    if !crlf_only(&buf[..len]) {
        return Err(HttpError::BadRequest("bare LF in request head"));
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
    if head.version == 0 {
        // RFC 9110 §10.1.1: a 100-continue expectation in an HTTP/1.0 request is ignored
        // (and no 1xx may be sent to such a client).
        head.known.expect_continue = false;
    }
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
    if head
        .known
        .host
        .is_some_and(|i| !target::valid_authority(head.headers[i].value(buf)))
    {
        return Err(HttpError::BadRequest("invalid Host header"));
    }
    if head.method(buf) == b"CONNECT" {
        // Not a forward proxy: there is nothing a CONNECT could be routed to (nginx: 405).
        return Err(HttpError::MethodNotAllowed);
    }
    route_target(buf, head)?;
    Ok(true)
}

/// Fills the normalised target and the authority of an absolute-form target.
fn route_target(buf: &[u8], head: &mut RequestHead) -> Result<(), HttpError> {
    let raw = &buf[head.target.clone()];
    head.authority = None;
    let origin_form = if raw == b"*" {
        // Asterisk form is for OPTIONS only (RFC 9112 §3.2.4); it matches no route.
        if head.method(buf) != b"OPTIONS" {
            return Err(HttpError::BadRequest("asterisk form outside OPTIONS"));
        }
        head.norm.clear();
        head.norm.push(b'*');
        head.norm_path = 1;
        head.has_params = false;
        return Ok(());
    } else if raw.first() == Some(&b'/') {
        raw
    } else {
        let (authority, rest) =
            target::split_absolute(raw).ok_or(HttpError::BadRequest("invalid request target"))?;
        let t0 = head.target.start;
        head.authority = Some(t0 + authority.start..t0 + authority.end);
        &raw[rest..]
    };
    head.norm_path =
        target::normalise(origin_form, &mut head.norm).map_err(HttpError::BadRequest)?;
    head.has_params = target::strip_parameters(&head.norm[..head.norm_path], &mut head.stripped);
    Ok(())
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
///
/// The number of fields is bounded by the head size only, as in nginx (a response that
/// reflects many request headers is relayed): up to `MAX_HEADERS` are parsed on the stack,
/// a rare larger head takes one allocation sized by its bytes.
pub fn parse_response(
    buf: &[u8],
    head: &mut ResponseHead,
    max_head: usize,
    request_was_head: bool,
) -> Result<bool, HttpError> {
    let mut raw = [httparse::EMPTY_HEADER; MAX_HEADERS];
    match parse_response_in(buf, head, max_head, request_was_head, &mut raw) {
        Err(httparse::Error::TooManyHeaders) => {}
        other => return other.map_err(malformed)?,
    }
    // Every field line takes at least three bytes (`a:` and a line end).
    let mut raw = vec![httparse::EMPTY_HEADER; buf.len().min(max_head) / 3 + 1];
    parse_response_in(buf, head, max_head, request_was_head, &mut raw).map_err(malformed)?
}

fn malformed(e: httparse::Error) -> HttpError {
    match e {
        // A status that is not three digits: refused like one outside 100–599.
        httparse::Error::Status => HttpError::ResponseRefused("invalid status code"),
        _ => HttpError::BadUpstream("malformed response head"),
    }
}

fn parse_response_in<'b>(
    buf: &'b [u8],
    head: &mut ResponseHead,
    max_head: usize,
    request_was_head: bool,
    raw: &mut [httparse::Header<'b>],
) -> Result<Result<bool, HttpError>, httparse::Error> {
    let mut resp = httparse::Response::new(raw);
    let len = match resp.parse(buf)? {
        httparse::Status::Partial => {
            if buf.len() >= max_head {
                return Ok(Err(HttpError::ResponseRefused("response head too large")));
            }
            return Ok(Ok(false));
        }
        httparse::Status::Complete(len) => len,
    };
    if len > max_head {
        return Ok(Err(HttpError::ResponseRefused("response head too large")));
    }
    if !crlf_only(&buf[..len]) {
        return Ok(Err(HttpError::BadUpstream("bad line end in response head")));
    }
    // RFC 9110 §15: a status is three digits, 100 to 599. Anything else is refused, never
    // re-serialised, and never becomes a metric label.
    let status = resp.code.unwrap_or(0);
    if !(100..=599).contains(&status) || !three_digit_status(buf) {
        return Ok(Err(HttpError::ResponseRefused("invalid status code")));
    }
    let base = buf.as_ptr();
    head.status = status;
    head.version = resp.version.unwrap_or(1);
    let reason = resp.reason.unwrap_or("");
    let r0 = if reason.is_empty() {
        0
    } else {
        reason.as_ptr() as usize - base as usize
    };
    head.reason = r0..r0 + reason.len();
    head.len = len;
    if head.headers.capacity() > 4 * MAX_HEADERS && resp.headers.len() <= MAX_HEADERS {
        // A huge head grew the vector; do not keep that memory for the connection's life.
        head.headers = Vec::with_capacity(MAX_HEADERS);
    }
    head.headers.clear();
    head.known.clear();
    for h in resp.headers.iter() {
        head.headers.push(HeaderSpan::new(base, h));
    }
    let framing = match classify(buf, &head.headers, &mut head.known, Side::Response) {
        Ok(f) => f,
        Err(e) => return Ok(Err(e)),
    };
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
    Ok(Ok(true))
}

/// Whether the status line's code is exactly three digits followed by a space or the line
/// end (`HTTP/1.1 200 OK`), not `0200` or `20`.
fn three_digit_status(buf: &[u8]) -> bool {
    let Some(sp) = buf.iter().position(|&b| b == b' ') else {
        return false;
    };
    let code = &buf[sp + 1..];
    code.len() >= 4 && code[..3].iter().all(u8::is_ascii_digit) && matches!(code[3], b' ' | b'\r')
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
                for token in value.split(|&b| b == b',') {
                    let token = trim(token);
                    if token.is_empty() {
                        continue;
                    }
                    if !known.note_connection_token(buf, token) {
                        return Err(match side {
                            Side::Request => HttpError::BadRequest("too many Connection tokens"),
                            // The gateway's own limit: never booked against the server.
                            Side::Response => {
                                HttpError::ResponseRefused("too many Connection tokens")
                            }
                        });
                    }
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
    known.content_length = content_length;
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
            // The gateway writes the client's framing itself, so it must understand the
            // upstream's: only a lone `chunked` (empty list elements ignored). nginx too
            // answers 502 to "unknown Transfer-Encoding"; relaying `gzip` until close
            // would hand the client a body whose coding no header names any more.
            Side::Response if chunked_last && !other_coding => Ok(BodyFraming::Chunked),
            Side::Response => Err(bad("transfer coding other than chunked")),
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

/// Whether every line of a head ends in CR LF. httparse accepts a bare LF as a line end
/// (RFC 9112 §2.2 allows a recipient to); a proxy must not, because the peer behind it
/// may split the same bytes differently. One pass over the head, no allocation.
fn crlf_only(head: &[u8]) -> bool {
    let mut prev = 0u8;
    for &b in head {
        if b == b'\n' && prev != b'\r' {
            return false;
        }
        prev = b;
    }
    true
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
        assert_eq!(h.path(), b"/api/x");
        assert_eq!(h.forward_target(), b"/api/x?y=1");
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
    fn targets_are_normalised_and_absolute_form_replaces_host() {
        let text = "GET http://Admin.Example.com.:8080/public/%2e%2e/admin?x HTTP/1.1\r\nHost: other\r\n\r\n";
        let h = req(text).unwrap();
        assert_eq!(h.path(), b"/admin");
        assert_eq!(h.forward_target(), b"/admin?x");
        assert_eq!(
            h.host(text.as_bytes()),
            Some(&b"Admin.Example.com.:8080"[..])
        );
        for bad in [
            "GET /../admin HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET /a%2fb HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET http://u@h/ HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET * HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a..b\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: u@a\r\n\r\n",
        ] {
            assert_eq!(req(bad).unwrap_err().status(), 400, "{bad:?}");
        }
        assert!(req("OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n").is_ok());
        // Routed without `;params`, forwarded as normalised.
        let h = req("GET /;x/admin;y/secret.txt?a;b HTTP/1.1\r\nHost: a\r\n\r\n").unwrap();
        assert_eq!(h.path(), b"/admin/secret.txt");
        assert_eq!(h.forward_target(), b"/;x/admin;y/secret.txt?a;b");
        let h = req("GET /admin/x?a;b HTTP/1.1\r\nHost: a\r\n\r\n").unwrap();
        assert_eq!(h.path(), b"/admin/x");
        let connect = req("CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n");
        assert_eq!(connect.unwrap_err().status(), 405);
    }

    #[test]
    fn connection_tokens_are_capped() {
        // The attack head: thousands of tokens and many fields in 1 MiB. It is refused at
        // the 33rd token, so no work grows with tokens × fields (or tokens × tokens).
        let mut text = String::from("GET /echo HTTP/1.1\r\nHost: a\r\nConnection: x-a");
        text.push_str(&",X-A".repeat(100_000));
        text.push_str("\r\n");
        for i in 0..120 {
            text.push_str(&format!("X-A{i}: 1\r\n"));
        }
        text.push_str("\r\n");
        assert!(text.len() < 1 << 20);
        let mut head = RequestHead::default();
        let err = parse_request(text.as_bytes(), &mut head, 1 << 20).unwrap_err();
        assert_eq!(err.status(), 400);
        // Up to the cap, across all Connection fields, repeats folded; empty elements
        // are not tokens.
        let names = |n: usize| (0..n).map(|i| format!("x-{i}")).collect::<Vec<_>>();
        let ok = format!(
            "GET / HTTP/1.1\r\nHost: a\r\nConnection: close, {}\r\nConnection: CLOSE, ,,, x-0\r\n\r\n",
            names(MAX_CONNECTION_TOKENS - 3).join(",")
        );
        let h = req(&ok).unwrap();
        assert_eq!(h.known.connection_tokens.len(), MAX_CONNECTION_TOKENS - 2);
        assert!(h.known.conn_close);
        let over = |n: usize| {
            let split = names(n);
            let (one, two) = split.split_at(10);
            format!(
                "GET / HTTP/1.1\r\nHost: a\r\nConnection: {}\r\nConnection: {}\r\n\r\n",
                one.join(","),
                two.join(",")
            )
        };
        assert!(req(&over(MAX_CONNECTION_TOKENS)).is_ok());
        assert_eq!(
            req(&over(MAX_CONNECTION_TOKENS + 1)).unwrap_err().status(),
            400
        );
        let repeated = format!(
            "GET / HTTP/1.1\r\nHost: a\r\nConnection: {}\r\n\r\n",
            ["keep-alive"; MAX_CONNECTION_TOKENS + 1].join(",")
        );
        assert_eq!(req(&repeated).unwrap_err().status(), 400);
        let mut r = ResponseHead::default();
        let resp = format!(
            "HTTP/1.1 200 OK\r\nConnection: {}\r\nContent-Length: 0\r\n\r\n",
            names(MAX_CONNECTION_TOKENS + 1).join(",")
        );
        let err = parse_response(resp.as_bytes(), &mut r, 8192, false).unwrap_err();
        assert!(matches!(err, HttpError::ResponseRefused(_)), "{err:?}");
    }

    #[test]
    fn bare_lf_is_rejected() {
        for text in [
            "GET / HTTP/1.1\nHost: a\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\n\n",
            "\nGET / HTTP/1.1\r\nHost: a\r\n\r\n",
        ] {
            assert_eq!(req(text).unwrap_err().status(), 400, "{text:?}");
        }
        let mut h = ResponseHead::default();
        let text = b"HTTP/1.1 200 OK\nContent-Length: 0\r\n\r\n";
        assert_eq!(
            parse_response(text, &mut h, 8192, false)
                .unwrap_err()
                .status(),
            502
        );
    }

    #[test]
    fn status_lines() {
        let mut h = ResponseHead::default();
        for bad in [
            &b"HTTP/1.1 99 X\r\n\r\n"[..],
            b"HTTP/1.1 000 X\r\n\r\n",
            b"HTTP/1.1 600 X\r\n\r\n",
            b"HTTP/1.1 0200 OK\r\n\r\n",
            b"HTTP/1.1 20 OK\r\n\r\n",
            b"HTTP/1.1 2000 OK\r\n\r\n",
            b"HTTP/1.1 +20 OK\r\n\r\n",
        ] {
            let r = parse_response(bad, &mut h, 8192, false);
            assert!(
                matches!(
                    r,
                    Err(HttpError::BadUpstream(_) | HttpError::ResponseRefused(_))
                ),
                "{:?}: {r:?}",
                String::from_utf8_lossy(bad)
            );
        }
        for good in [&b"HTTP/1.1 599 X\r\n\r\n"[..], b"HTTP/1.1 100\r\n\r\n"] {
            assert!(parse_response(good, &mut h, 8192, false).unwrap());
        }
    }

    #[test]
    fn many_response_fields_within_the_size_are_parsed() {
        let mut text = String::from("HTTP/1.1 200 OK\r\n");
        for i in 0..1000 {
            text.push_str(&format!("X-H{i}: v\r\n"));
        }
        text.push_str("Content-Length: 0\r\n\r\n");
        let mut h = ResponseHead::default();
        assert!(parse_response(text.as_bytes(), &mut h, 64 * 1024, false).unwrap());
        assert_eq!(h.headers.len(), 1001);
        let small = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
        assert!(parse_response(small, &mut h, 64 * 1024, false).unwrap());
        assert!(h.headers.capacity() <= 4 * MAX_HEADERS);
        let err = parse_response(text.as_bytes(), &mut h, 4096, false).unwrap_err();
        assert_eq!(err.status(), 502);
    }

    #[test]
    fn websocket_accept_value() {
        // The example of RFC 6455 §1.3.
        let text =
            "GET /ws HTTP/1.1\r\nHost: a\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
        let h = req(text).unwrap();
        assert_eq!(
            &websocket_accept(text.as_bytes(), &h),
            b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
        let accept = websocket_accept(text.as_bytes(), &h);
        let mut r = ResponseHead::default();
        let ok = b"HTTP/1.1 101 S\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n";
        assert!(parse_response(ok, &mut r, 8192, false).unwrap());
        assert!(r.accepts_websocket(ok, &accept));
        for bad in [
            &b"HTTP/1.1 101 S\r\nUpgrade: h2c\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"[..],
            b"HTTP/1.1 101 S\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
            b"HTTP/1.1 101 S\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: AAAAAAAAAAAAAAAAAAAAAAAAAAA=\r\n\r\n",
            b"HTTP/1.1 101 S\r\nUpgrade: websocket\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n",
            // HTTP/1.0 has no protocol upgrade.
            b"HTTP/1.0 101 S\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n",
        ] {
            assert!(parse_response(bad, &mut r, 8192, false).unwrap());
            assert!(!r.accepts_websocket(bad, &accept), "{}", String::from_utf8_lossy(bad));
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
        // Two versions, whatever the order: which one the upstream reads is unknown.
        for two in [
            "8\r\nSec-WebSocket-Version: 13",
            "13\r\nSec-WebSocket-Version: 8",
        ] {
            assert_eq!(
                ws(&format!("{key}Sec-WebSocket-Version: {two}\r\n")),
                WebSocketHandshake::Invalid
            );
        }
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
