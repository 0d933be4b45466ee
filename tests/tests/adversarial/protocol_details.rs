//! Issue 10 item 7: 1xx responses are never relayed to HTTP/1.0 clients (RFC 9110 §15.2:
//! "a server MUST NOT send a 1xx response to an HTTP/1.0 client"), and a `101` is a tunnel
//! only when it is a WebSocket handshake answer: `Upgrade: websocket` and the
//! `Sec-WebSocket-Accept` computed from the client's key (RFC 6455 §4.1). Anything else
//! is a 502, and no byte after it is relayed.

use gateway_tests::adversary::{first_status, statuses};
use gateway_tests::wire::excerpt;
use gateway_tests::Reply;

use super::{expect_status, request, rig_with_hostile};

const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
/// RFC 6455 §1.3's example: the accept value for [`KEY`].
const ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

fn upgrade_replies() -> Vec<(&'static str, String)> {
    let tail = "tunnelled-bytes-from-upstream";
    vec![
        ("101 without Upgrade", format!("HTTP/1.1 101 Switching Protocols\r\n\r\n{tail}")),
        (
            "101 Upgrade: h2c",
            format!("HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n{tail}"),
        ),
        (
            "101 with a wrong Sec-WebSocket-Accept",
            format!("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: AAAAAAAAAAAAAAAAAAAAAAAAAAA=\r\n\r\n{tail}"),
        ),
        (
            "101 without Sec-WebSocket-Accept",
            format!("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n{tail}"),
        ),
        (
            "101 without Connection: Upgrade",
            format!("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nSec-WebSocket-Accept: {ACCEPT}\r\n\r\n{tail}"),
        ),
        (
            "a correct 101 (control: must be relayed)",
            format!("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {ACCEPT}\r\n\r\n"),
        ),
    ]
}

#[test]
fn improper_101_is_not_a_tunnel() {
    let all = upgrade_replies();
    let (rig, _hostile) = rig_with_hostile(move |r| {
        let i: usize = r.path().rsplit('/').next().unwrap().parse().unwrap();
        Reply::raw(all[i].1.clone())
    });
    let mut failures = Vec::new();
    let n = upgrade_replies().len();
    for (i, (what, _)) in upgrade_replies().iter().enumerate() {
        let raw = request(
            "GET",
            &format!("/ws/up/{i}"),
            &[
                "Upgrade: websocket",
                "Connection: Upgrade",
                &format!("Sec-WebSocket-Key: {KEY}"),
                "Sec-WebSocket-Version: 13",
            ],
            b"",
        );
        let want: &[u16] = if i == n - 1 { &[101] } else { &[502] };
        let got = expect_status(&rig, what, &raw, want, &mut failures);
        if i != n - 1 && gateway_tests::adversary::contains(&got, b"tunnelled-bytes") {
            failures.push(format!(
                "[{what}] upstream bytes after the 101 were relayed raw"
            ));
        }
    }
    // A 101 to a request that asked for no upgrade, on a plain route.
    let raw = request("GET", "/hostile/up/0", &[], b"");
    expect_status(&rig, "101 to a plain GET", &raw, &[502], &mut failures);
    rig.finish(failures);
}

#[test]
fn no_1xx_for_http10_clients() {
    let (rig, _hostile) = rig_with_hostile(|_| {
        Reply::ok("final")
            .interim(100, &[])
            .interim(103, &[("Link", "</style.css>; rel=preload")])
            .interim(102, &[])
    });
    let mut failures = Vec::new();
    let cases: &[(&str, &str)] = &[
        ("HTTP/1.0 GET", "GET /hostile/1xx HTTP/1.0\r\nHost: gateway.test\r\n\r\n"),
        (
            "HTTP/1.0 keep-alive GET",
            "GET /hostile/1xx HTTP/1.0\r\nHost: gateway.test\r\nConnection: keep-alive\r\n\r\n",
        ),
        (
            "HTTP/1.0 POST with Expect: 100-continue",
            "POST /hostile/1xx HTTP/1.0\r\nHost: gateway.test\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\nhello",
        ),
    ];
    for (what, raw) in cases {
        let got = rig.exchange(what, raw.as_bytes());
        let all = statuses(&got);
        if first_status(&got) != Some(200) || all.iter().any(|s| (100..200).contains(s)) {
            failures.push(format!(
                "[{what}] statuses {all:?} (want a lone 200, no 1xx): {:?}",
                excerpt(&got)
            ));
        }
    }
    rig.finish(failures);
}
