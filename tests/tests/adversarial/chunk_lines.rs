//! Issue 17 items 7 and 8 (request side): chunk-size lines are hex digits, optional
//! `;` extensions, CRLF (RFC 9112 §7.1.1), nothing else; empty `Transfer-Encoding` list
//! elements are normalised away and what is forwarded carries the gateway's own single
//! `Transfer-Encoding: chunked` (or none, when de-chunked); `Content-Length` forms such as
//! `0005` and `5, 5` (RFC 9110 §8.6) are forwarded as one canonical value.

use gateway_tests::adversary::{first_status, Rig};

use super::{expect_status, request};

/// Chunk-size lines with something besides hex digits and `;` extensions.
pub(crate) const BAD_SIZE_LINES: &[&str] = &[
    "5 junk",
    "5\tjunk",
    "5 5",
    "5 ",
    "5\t",
    "5 0",
    " 5",
    "+5",
    "5;",
    "5;a=b junk",
];

#[test]
fn chunk_size_with_trailing_text_is_400() {
    let rig = Rig::start();
    let mut failures = Vec::new();
    for (i, line) in BAD_SIZE_LINES.iter().enumerate() {
        for target in ["/public/index.html", "/echo/chunk"] {
            let raw = request(
                "POST",
                target,
                &["Transfer-Encoding: chunked"],
                format!("{line}\r\nhello\r\n0\r\n\r\n").as_bytes(),
            );
            let case = format!("#{i} chunk-size line {line:?} ({target})");
            expect_status(&rig, &case, &raw, &[400], &mut failures);
        }
    }
    rig.finish(failures);
}

#[test]
fn valid_chunk_extensions_pass() {
    // RFC 9112 §7.1.1: chunk-ext = *( BWS ";" BWS name [ BWS "=" BWS value ] ).
    let rig = Rig::start();
    let mut failures = Vec::new();
    for (i, line) in ["5;a=b", "5;a", "5 ;a=b", "5;a=\"q v\"", "5;a=b;c=d"]
        .iter()
        .enumerate()
    {
        let target = format!("/echo/ext/{i}");
        let raw = request(
            "POST",
            &target,
            &["Transfer-Encoding: chunked"],
            format!("{line}\r\nhello\r\n0\r\n\r\n").as_bytes(),
        );
        let case = format!("#{i} chunk-size line {line:?}");
        let status = first_status(&rig.exchange(&case, &raw));
        let got = rig.echo_requests(&target);
        if status != Some(200) || got.len() != 1 || got[0].body != b"hello" {
            failures.push(format!(
                "[{case}] status {status:?}, upstream got {} request(s) (want 200 and one \
                 request with body \"hello\")",
                got.len()
            ));
        }
    }
    rig.finish(failures);
}

/// What an accepted request must look like upstream: a single framing, canonical.
fn check_forwarded_framing(
    rig: &Rig,
    case: &str,
    target: &str,
    want_body: &[u8],
    failures: &mut Vec<String>,
) {
    let got = rig.echo_requests(target);
    let [r] = got.as_slice() else {
        failures.push(format!(
            "[{case}] upstream got {} requests, want 1",
            got.len()
        ));
        return;
    };
    let te = r.header_all("transfer-encoding");
    let cl = r.header_all("content-length");
    let canonical_len = want_body.len().to_string();
    let framing_ok =
        (te == ["chunked"] && cl.is_empty()) || (te.is_empty() && cl == [canonical_len.as_str()]);
    if !framing_ok || r.body != want_body {
        failures.push(format!(
            "[{case}] upstream framing Transfer-Encoding {te:?} Content-Length {cl:?}, body \
             {} bytes; want exactly one of `Transfer-Encoding: chunked` or `Content-Length: \
             {canonical_len}`, and the {}-byte body",
            r.body.len(),
            want_body.len()
        ));
    }
}

/// Sends each variant's header lines with `wire_body` (decoding to "hello") through the
/// echo route; each must be answered 200 and forwarded with canonical framing.
fn forwarded_canonically(kind: &str, variants: &[&[&str]], wire_body: &[u8]) {
    let rig = Rig::start();
    let mut failures = Vec::new();
    for (i, lines) in variants.iter().enumerate() {
        let target = format!("/echo/{kind}/{i}");
        let case = format!("#{i} {lines:?}");
        let raw = request("POST", &target, lines, wire_body);
        match first_status(&rig.exchange(&case, &raw)) {
            Some(200) => check_forwarded_framing(&rig, &case, &target, b"hello", &mut failures),
            s => failures.push(format!(
                "[{case}] status {s:?}, want 200 and the request forwarded with canonical framing"
            )),
        }
    }
    rig.finish(failures);
}

#[test]
fn empty_transfer_encoding_elements_are_normalised_away() {
    forwarded_canonically(
        "te",
        &[
            &["Transfer-Encoding: chunked,"],
            &["Transfer-Encoding: ,chunked"],
            &["Transfer-Encoding: chunked, "],
            &["Transfer-Encoding: chunked", "Transfer-Encoding:"],
            &["Transfer-Encoding:", "Transfer-Encoding: chunked"],
            &["Transfer-Encoding: Chunked"],
        ],
        b"5\r\nhello\r\n0\r\n\r\n",
    );
}

#[test]
fn content_length_forms_are_forwarded_canonical() {
    forwarded_canonically(
        "cl",
        &[
            &["Content-Length: 0005"],
            &["Content-Length: 5, 5"],
            &["Content-Length: 5,5"],
            &["Content-Length: 5", "Content-Length: 5"],
            &["Content-Length: 000005"],
        ],
        b"hello",
    );
}
