//! `rewrite`: a head parsed, then rewritten as the proxy sends it on (upstream for a
//! request, to the client for a response), then parsed again. The input is a raw head; one
//! that starts with `HTTP/` is a response. Input bytes choose the rewrite's options.
//!
//! Invariants beyond "no panic":
//! - the rewritten head parses, completely, as exactly the bytes written;
//! - it is framed as the parsed head was (same framing, a dechunked response excepted);
//! - `one-framing-header` (issue 10): it carries exactly the framing header fields that
//!   framing needs, once (`Content-Length: N`, or `Transfer-Encoding: chunked`, or neither),
//!   and a request carries exactly one `Host`; `Connection` can never remove them.

use super::head::status_valid;
use crate::check::{invariant, show};
use gateway::protocol::error::HttpError;
use gateway::protocol::http1::head::{
    parse_request, parse_response, trim, BodyFraming, HeaderSpan, RequestHead, ResponseHead,
    MAX_HEADERS,
};
use gateway::protocol::http1::rewrite::{
    write_client_response, write_upstream_request, ClientFraming, Forwarding,
};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

const MAX_HEAD: usize = 16 * 1024;
/// The rewritten head may grow (added fields): it gets this much more room.
const GROWTH: usize = 1024;

pub fn run(data: &[u8]) {
    // Options from bytes of the input that do not change its meaning much: its length.
    let bits = data.len();
    if data.starts_with(b"HTTP/") {
        response(data, (bits & 1) as u8, bits & 2 != 0, bits & 4 != 0);
    } else {
        request(data, bits & 1 != 0);
    }
}

/// The values of every field named `name`.
fn fields<'b>(buf: &'b [u8], headers: &[HeaderSpan], name: &str) -> Vec<&'b [u8]> {
    headers
        .iter()
        .filter(|h| h.is(buf, name))
        .map(|h| trim(h.value(buf)))
        .collect()
}

/// Whether the framing fields of a head are exactly those `framing` needs, each once.
///
/// A response without a body (1xx, 204, 304, to HEAD) may keep one `Content-Length`: it
/// describes the representation (RFC 9110 §8.6).
fn framing_fields_exact(
    buf: &[u8],
    headers: &[HeaderSpan],
    framing: BodyFraming,
    response: bool,
) -> bool {
    let cl = fields(buf, headers, "content-length");
    let te = fields(buf, headers, "transfer-encoding");
    match framing {
        BodyFraming::Length(n) => te.is_empty() && cl == [n.to_string().as_bytes()],
        BodyFraming::Chunked => {
            cl.is_empty() && te.len() == 1 && te[0].eq_ignore_ascii_case(b"chunked")
        }
        BodyFraming::None if response => te.len() <= 1 && cl.len() <= 1,
        BodyFraming::None => te.is_empty() && (cl.is_empty() || cl == [b"0"]),
        BodyFraming::UntilClose => cl.is_empty(),
    }
}

fn request(data: &[u8], upgrade: bool) {
    let mut head = RequestHead::default();
    let Ok(true) = parse_request(data, &mut head, MAX_HEAD) else {
        return;
    };
    let fwd = Forwarding {
        client_ip: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7)),
        peer_ip: IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 7)),
        proto: "https",
        upgrade: upgrade && head.asks_websocket(data),
        default_host: "fuzz.example",
        trusted_peer: false,
        keep_forwarding: &[],
        underscores: false,
    };
    let mut out = Vec::new();
    write_upstream_request(&mut out, data, &head, &fwd);
    let mut again = RequestHead::default();
    let parsed = parse_request(&out, &mut again, MAX_HEAD + GROWTH);
    // `Connection: host` removing the only Host is the same fault as removing framing.
    // The proxy adds up to three fields; a head near `MAX_HEADERS` then exceeds what our
    // own parser takes, though not what an upstream does (it limits bytes, not fields).
    if parsed == Err(HttpError::HeadTooLarge) && head.headers.len() + 3 > MAX_HEADERS {
        return;
    }
    let missing_host = parsed == Err(HttpError::BadRequest("missing Host header"));
    if !missing_host {
        assert_eq!(
            parsed,
            Ok(true),
            "rewritten request does not parse: {}",
            show(&out)
        );
        assert_eq!(again.len, out.len(), "rewritten request: {}", show(&out));
    }
    invariant(
        "one-framing-header",
        !missing_host
            && again.framing == head.framing
            && framing_fields_exact(&out, &again.headers, head.framing, false)
            && fields(&out, &again.headers, "host").len() == 1,
        || format!("{} rewritten as {}", show(&data[..head.len]), show(&out)),
    );
}

fn response(data: &[u8], client_version: u8, close: bool, upgrade: bool) {
    let mut head = ResponseHead::default();
    let Ok(true) = parse_response(data, &mut head, MAX_HEAD, false) else {
        return;
    };
    // Found by this target: httparse takes any three digits, and `000` went out as `0`.
    if !status_valid(head.status) {
        return;
    }
    let upgrade = upgrade && head.status == 101;
    let mut out = Vec::new();
    let how = write_client_response(&mut out, data, &head, client_version, close, upgrade);
    let mut again = ResponseHead::default();
    let parsed = parse_response(&out, &mut again, MAX_HEAD + GROWTH, false);
    assert_eq!(
        parsed,
        Ok(true),
        "rewritten response does not parse: {}",
        show(&out)
    );
    assert_eq!(again.len, out.len(), "rewritten response: {}", show(&out));
    let expected = match how {
        // Decoded for an HTTP/1.0 client: the body runs until the close.
        ClientFraming::Dechunk => BodyFraming::UntilClose,
        ClientFraming::Same => head.framing,
    };
    invariant(
        "one-framing-header",
        again.framing == expected && framing_fields_exact(&out, &again.headers, expected, true),
        || format!("{} rewritten as {}", show(&data[..head.len]), show(&out)),
    );
}
