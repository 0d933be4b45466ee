//! `head`: the request and the response head parsers. The input is a raw head (and maybe
//! what follows it); one that starts with `HTTP/` is parsed as a response, the rest as a
//! request.
//!
//! Invariants beyond "no panic":
//! - a complete head lies inside the input and every span in it is inside the head;
//! - the result does not depend on read boundaries: the head alone parses the same, and
//!   every strict prefix of it is "need more bytes", never an error and never complete
//!   (the proxy parses a growing buffer, so a head must not change meaning with the
//!   segments it arrived in);
//! - `head-crlf` (issue 10): a complete head ends its lines with CR LF only;
//! - `response-status-valid`: a response status is from 100 to 599;
//! - `head-within-limit`: a complete head is within `max_header_bytes`, however it arrived.

use super::strict_line_ends;
use crate::check::{invariant, show};
use gateway::protocol::error::HttpError;
use gateway::protocol::http1::head::{
    parse_request, parse_response, BodyFraming, HeaderSpan, RequestHead, ResponseHead,
};

/// `max_header_bytes` for the parse: the default (16 KiB) is larger than most fuzz inputs,
/// so the limit paths get their own smaller one too.
const LIMITS: [usize; 2] = [16 * 1024, 256];

pub fn run(data: &[u8]) {
    for max in LIMITS {
        if data.starts_with(b"HTTP/") {
            response(data, max, data.len() % 2 == 1);
        } else {
            request(data, max);
        }
    }
}

/// Where a split-invariance check cuts a head: around every line end, and a few other places.
fn cuts(len: usize, data: &[u8]) -> Vec<usize> {
    let mut out: Vec<usize> = data[..len]
        .iter()
        .enumerate()
        .filter(|(_, &b)| b == b'\n' || b == b'\r')
        .flat_map(|(i, _)| [i, i + 1])
        .filter(|&i| i < len)
        .collect();
    out.extend(
        [1, len / 2, len.saturating_sub(1)]
            .into_iter()
            .filter(|&i| i > 0 && i < len),
    );
    out
}

/// What the checks compare of a parsed head, request or response alike.
#[derive(Debug, PartialEq, Eq)]
struct Summary {
    len: usize,
    framing: BodyFraming,
    /// 0 for a request.
    status: u16,
    /// The end of the furthest span (method, target, reason, field names and values).
    spans_end: usize,
}

/// Parses a head: `Some` when complete, `None` when more bytes are needed.
type Parse<'a> = &'a dyn Fn(&[u8]) -> Result<Option<Summary>, HttpError>;

fn spans_end(headers: &[HeaderSpan]) -> usize {
    headers
        .iter()
        .map(|h| h.name.1.max(h.value.1) as usize)
        .max()
        .unwrap_or(0)
}

fn request(data: &[u8], max: usize) {
    check(data, max, "request", &|buf| {
        let mut head = RequestHead::default();
        Ok(parse_request(buf, &mut head, max)?.then(|| Summary {
            len: head.len,
            framing: head.framing,
            status: 0,
            spans_end: spans_end(&head.headers)
                .max(head.method.end)
                .max(head.target.end),
        }))
    });
}

/// `response-status-valid` (RFC 9110 §15): a status code is three digits from 100 to 599;
/// anything else must not be relayed (it is answered 502), or the client gets a status line
/// the gateway wrote from a number it never checked.
pub(crate) fn status_valid(status: u16) -> bool {
    let valid = (100..=599).contains(&status);
    invariant("response-status-valid", valid, || {
        format!("upstream status {status} accepted")
    });
    valid
}

fn response(data: &[u8], max: usize, request_was_head: bool) {
    let mut head = ResponseHead::default();
    if let Ok(true) = parse_response(data, &mut head, max, request_was_head) {
        status_valid(head.status);
    }
    check(data, max, "response", &|buf| {
        let mut head = ResponseHead::default();
        Ok(
            parse_response(buf, &mut head, max, request_was_head)?.then(|| Summary {
                len: head.len,
                framing: head.framing,
                status: head.status,
                spans_end: spans_end(&head.headers).max(head.reason.end),
            }),
        )
    });
}

fn check(data: &[u8], max: usize, what: &str, parse: Parse) {
    let Ok(Some(full)) = parse(data) else {
        return;
    };
    let len = full.len;
    assert!(len <= data.len(), "head length {len} past the input");
    let head = &data[..len];
    // Found by this target: a response head over the limit is refused when it arrives in
    // pieces but accepted when one read brings all of it.
    invariant("head-within-limit", len <= max, || {
        format!("{what} head of {len} bytes accepted with a limit of {max}")
    });
    if len > max {
        return;
    }
    assert!(full.spans_end <= len, "a span past the head: {full:?}");
    assert_eq!(
        parse(head).ok().flatten(),
        Some(full),
        "the head alone: {}",
        show(head)
    );
    for cut in cuts(len, data) {
        let r = parse(&data[..cut]);
        assert!(
            matches!(r, Ok(None)),
            "prefix of {cut} bytes of {}: {r:?}",
            show(head)
        );
    }
    invariant(
        "head-crlf",
        strict_line_ends(head, |_| true).is_none(),
        || format!("{what} head accepted with a bare CR or LF: {}", show(head)),
    );
}
