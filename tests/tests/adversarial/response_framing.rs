//! Issue 10 item 1, response side: a hostile upstream names `Content-Length` or
//! `Transfer-Encoding` in its `Connection` header. The gateway writes the framing of what it
//! forwards itself (PRODUCT.md "Behaviour at the edge"), so the client gets the body framed
//! (or delimited by a close) and never the bytes the upstream appended after it, here a
//! second response carrying the secret.

use gateway_tests::adversary::{split_responses, PUBLIC_BODY, SECRET};
use gateway_tests::wire::{excerpt, header_all};
use gateway_tests::Reply;

use super::{request, rig_with_hostile};

fn replies() -> Vec<String> {
    let tail = format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{SECRET}",
        SECRET.len()
    );
    vec![
        format!("HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: Content-Length\r\n\r\nhello{tail}"),
        format!("HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: keep-alive, content-length\r\n\r\nhello{tail}"),
        format!("HTTP/1.1 200 OK\r\nConnection: CONTENT-LENGTH\r\nContent-Length: 5\r\n\r\nhello{tail}"),
        format!("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: Transfer-Encoding\r\n\r\n5\r\nhello\r\n0\r\n\r\n{tail}"),
        format!("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: transfer-encoding, keep-alive\r\n\r\n5\r\nhello\r\n0\r\n\r\n{tail}"),
    ]
}

#[test]
fn upstream_connection_header_cannot_unframe_the_response() {
    let all = replies();
    let (rig, _hostile) = rig_with_hostile(move |r| {
        let i: usize = r.path().rsplit('/').next().unwrap().parse().unwrap();
        Reply::raw(all[i].clone())
    });
    let mut failures = Vec::new();
    for (i, reply) in replies().iter().enumerate() {
        let case = format!("#{i} upstream {:?}", excerpt(reply.as_bytes()));
        let got = rig.exchange(
            &case,
            &request("GET", &format!("/hostile/frame/{i}"), &[], b""),
        );
        let responses = split_responses(&got);
        let Some((status, head, body)) = responses.first() else {
            failures.push(format!("[{case}] no response: {:?}", excerpt(&got)));
            continue;
        };
        let te = header_all(&head.headers, "transfer-encoding");
        let cl = header_all(&head.headers, "content-length");
        let framed = (te == ["chunked"] && cl.is_empty()) || (te.is_empty() && cl == ["5"]);
        if *status == 200 && !framed {
            // Close-delimited is acceptable only if the connection really ended with "hello".
            if body.as_slice() != b"hello" || responses.len() > 1 {
                failures.push(format!(
                    "[{case}] response relayed without framing (TE {te:?}, CL {cl:?}) and not \
                     closed after the body: {:?}",
                    excerpt(&got)
                ));
            }
        } else if *status == 200 && body.as_slice() != b"hello" {
            failures.push(format!("[{case}] body {:?}, want \"hello\"", excerpt(body)));
        } else if *status != 200 && *status != 502 {
            failures.push(format!(
                "[{case}] status {status}, want 200 (framed) or 502"
            ));
        }
        // A second response on this connection may only be the follow-up's public page.
        if let Some((s2, _, b2)) = responses.get(1) {
            if *s2 != 200 || b2.as_slice() != PUBLIC_BODY.as_bytes() {
                failures.push(format!(
                    "[{case}] the follow-up got {s2} {:?}, not the public page",
                    excerpt(b2)
                ));
            }
        }
    }
    rig.finish(failures);
}
