//! Issue 17 item 8 (response side): responses that carry no body carry no framing for one.
//! RFC 9110 §8.6: no `Content-Length` in a 204; RFC 9112 §6.1: no `Transfer-Encoding` in
//! 204 or 304 (and none is needed for HEAD); RFC 9112 §6.3 rule 1: these responses end at
//! the head, so whatever body bytes a hostile upstream sends after one must not reach the
//! client, where they would be read as the next response.

use gateway_tests::adversary::split_responses;
use gateway_tests::wire::{excerpt, find, header_all};
use gateway_tests::Reply;

use super::{request, rig_with_hostile};

/// (method, upstream reply) pairs; each reply carries body bytes it must not carry.
const CASES: &[(&str, &str)] = &[
    (
        "GET",
        "HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\nhello",
    ),
    (
        "GET",
        "HTTP/1.1 204 No Content\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    ),
    (
        "GET",
        "HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    ),
    (
        "GET",
        "HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\nhello",
    ),
    ("HEAD", "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"),
    (
        "HEAD",
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    ),
];

#[test]
fn bodyless_responses_carry_no_body_framing() {
    let (rig, _hostile) = rig_with_hostile(|r| {
        let i: usize = r.path().rsplit('/').next().unwrap().parse().unwrap();
        Reply::raw(CASES[i].1)
    });
    let mut failures = Vec::new();
    for (i, (method, reply)) in CASES.iter().enumerate() {
        let case = format!("#{i} {method} answered {reply:?}");
        let got = rig.exchange(
            &case,
            &request(method, &format!("/hostile/bodyless/{i}"), &[], b""),
        );
        let Some(end) = find(&got, b"\r\n\r\n") else {
            failures.push(format!("[{case}] no response head: {:?}", excerpt(&got)));
            continue;
        };
        let Ok(head) = gateway_tests::wire::parse_head(&got[..end + 4]) else {
            failures.push(format!("[{case}] malformed head: {:?}", excerpt(&got)));
            continue;
        };
        let status = split_responses(&got).first().map(|r| r.0);
        let te = header_all(&head.headers, "transfer-encoding");
        let cl = header_all(&head.headers, "content-length");
        if status == Some(204) && !(te.is_empty() && cl.is_empty()) {
            failures.push(format!("[{case}] 204 relayed with TE {te:?} CL {cl:?}"));
        }
        if status == Some(304) && !te.is_empty() {
            failures.push(format!(
                "[{case}] 304 relayed with Transfer-Encoding {te:?}"
            ));
        }
        if !matches!(status, Some(204) | Some(304) | Some(200) | Some(502)) {
            failures.push(format!("[{case}] status {status:?}"));
        }
        // After the head: nothing, or the next response (the follow-up), never "hello".
        let rest = &got[end + 4..];
        if !(rest.is_empty() || rest.starts_with(b"HTTP/1.")) {
            failures.push(format!(
                "[{case}] body bytes after a bodyless response: {:?}",
                excerpt(rest)
            ));
        }
    }
    rig.finish(failures);
}
