//! Issue 10 item 2 and PRODUCT.md "Bare LF is rejected everywhere in HTTP/1 (heads, chunk
//! lines, trailers)". RFC 9112 §2.2 lets a recipient accept a bare LF as a line terminator;
//! a proxy must not, because the server behind it may split lines differently: `0\r\n\n`
//! ends the body for nginx while a lenient proxy reads on into "trailers", and what follows
//! runs on nginx as a request the gateway never routed. Every variant is 400 and a close.

use super::{expect_status, SMUGGLED};

pub(crate) fn chunked_post(target: &str, body: &str) -> Vec<u8> {
    format!(
        "POST {target} HTTP/1.1\r\nHost: gateway.test\r\nTransfer-Encoding: chunked\r\n\r\n{body}"
    )
    .into_bytes()
}

/// Chunked bodies with a bare LF or CR in a chunk line or the trailer section.
pub(crate) fn chunked_cases() -> Vec<(&'static str, String)> {
    vec![
        (
            "bare LF ending the trailer section",
            format!("5\r\nhello\r\n0\r\n\n{SMUGGLED}"),
        ),
        (
            "bare LF ending a trailer line",
            format!("5\r\nhello\r\n0\r\nX-T: 1\n\r\n{SMUGGLED}"),
        ),
        (
            "trailer line then bare LF end",
            format!("5\r\nhello\r\n0\r\nX-T: 1\r\n\n{SMUGGLED}"),
        ),
        (
            "bare LF after the last-chunk size",
            format!("5\r\nhello\r\n0\n\r\n{SMUGGLED}"),
        ),
        (
            "bare LF after a chunk size",
            "5\nhello\r\n0\r\n\r\n".to_string(),
        ),
        (
            "bare LF after chunk data",
            "5\r\nhello\n0\r\n\r\n".to_string(),
        ),
        (
            "bare CR after chunk data",
            "5\r\nhello\r0\r\n\r\n".to_string(),
        ),
        (
            "bare LF after a chunk extension",
            "5;a=b\nhello\r\n0\r\n\r\n".to_string(),
        ),
    ]
}

#[test]
fn bare_lf_in_chunked_bodies_is_400() {
    let rig = gateway_tests::adversary::Rig::start();
    let mut failures = Vec::new();
    let cases = chunked_cases();
    for (i, (what, body)) in cases.iter().enumerate() {
        for target in ["/public/index.html", "/echo/lf"] {
            let case = format!("#{i} {what} ({target})");
            expect_status(
                &rig,
                &case,
                &chunked_post(target, body),
                &[400],
                &mut failures,
            );
        }
    }
    rig.finish(failures);
}

/// Heads with a bare LF or CR somewhere.
pub(crate) const HEAD_CASES: &[(&str, &str)] = &[
    ("bare LF after the request line", "GET /public/index.html HTTP/1.1\nHost: gateway.test\r\n\r\n"),
    ("bare LF after a header line", "GET /public/index.html HTTP/1.1\r\nHost: gateway.test\nX-A: 1\r\n\r\n"),
    ("bare LF ending the head", "GET /public/index.html HTTP/1.1\r\nHost: gateway.test\r\n\n"),
    ("bare LF everywhere", "GET /public/index.html HTTP/1.1\nHost: gateway.test\n\n"),
    (
        "bare LF hiding a header line",
        "GET /public/index.html HTTP/1.1\r\nHost: gateway.test\r\nX-A: 1\nContent-Length: 54\r\n\r\nGET /admin/secret.txt HTTP/1.1\r\nHost: gateway.test\r\n\r\n",
    ),
    ("bare CR inside a header value", "GET /public/index.html HTTP/1.1\r\nHost: gateway.test\r\nX-A: a\rb\r\n\r\n"),
];

#[test]
fn bare_lf_in_heads_is_400() {
    let rig = gateway_tests::adversary::Rig::start();
    let mut failures = Vec::new();
    for (i, (what, raw)) in HEAD_CASES.iter().enumerate() {
        let case = format!("#{i} {what}");
        expect_status(&rig, &case, raw.as_bytes(), &[400], &mut failures);
    }
    rig.finish(failures);
}
