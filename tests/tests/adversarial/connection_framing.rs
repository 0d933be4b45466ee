//! Issue 10 item 1: `Connection` naming a framing or routing header (`Content-Length`,
//! `Transfer-Encoding`, `Host`) or a header the gateway sets. The gateway frames what it
//! forwards itself from what it parsed (RFC 9110 §7.6.1 lets `Connection` name hop-by-hop
//! fields, but a proxy that drops `Content-Length` after framing by it forwards the body as
//! a second request). Either the request is refused (400) or it reaches the upstream whole,
//! with its own framing, Host and the gateway's forwarding headers.

use gateway_tests::adversary::{first_status, Rig};

use super::{expect_status, request, SMUGGLED};

/// `Connection` values (and extra lines) that name `Content-Length`, in many spellings.
pub(crate) const NAMES_CONTENT_LENGTH: &[&[&str]] = &[
    &["Connection: Content-Length"],
    &["Connection: content-length"],
    &["Connection: CONTENT-LENGTH"],
    &["Connection:  keep-alive ,\tContent-Length  "],
    &["Connection: keep-alive,Content-Length"],
    &["Connection: keep-alive", "Connection: Content-Length"],
    &["Connection: x-a, Content-Length, x-b"],
];

#[test]
fn connection_cannot_remove_content_length() {
    let rig = Rig::start();
    let mut failures = Vec::new();
    for (i, conn) in NAMES_CONTENT_LENGTH.iter().enumerate() {
        for method in ["GET", "POST"] {
            let mut headers = conn.to_vec();
            let cl = format!("Content-Length: {}", SMUGGLED.len());
            headers.push(&cl);
            let raw = request(method, "/public/index.html", &headers, SMUGGLED.as_bytes());
            let case = format!("#{i} {method} with {conn:?}");
            let got = rig.exchange(&case, &raw);
            // 405: nginx refuses POST to a static file, which is its business.
            match first_status(&got) {
                Some(200) | Some(400) | Some(405) => {}
                s => failures.push(format!("[{case}] first status {s:?}, want 200/405 or 400")),
            }
        }
    }
    rig.finish(failures);
}

#[test]
fn content_length_body_arrives_whole_at_the_upstream() {
    // The echo origin parses strictly: it must see one request with the 48-byte body.
    let rig = Rig::start();
    let mut failures = Vec::new();
    for (i, conn) in NAMES_CONTENT_LENGTH.iter().enumerate() {
        let target = format!("/echo/cl/{i}");
        let mut headers = conn.to_vec();
        let cl = format!("Content-Length: {}", SMUGGLED.len());
        headers.push(&cl);
        let raw = request("POST", &target, &headers, SMUGGLED.as_bytes());
        let case = format!("#{i} POST {target} with {conn:?}");
        let status = first_status(&rig.exchange(&case, &raw));
        let got = rig.echo_requests(&target);
        match status {
            Some(400) if got.is_empty() => {}
            Some(200) if got.len() == 1 && got[0].body == SMUGGLED.as_bytes() => {}
            s => failures.push(format!(
                "[{case}] status {s:?}; the upstream got {} request(s) with bodies {:?} (want \
                 400 and nothing forwarded, or 200 and the {}-byte body framed)",
                got.len(),
                got.iter().map(|r| r.body.len()).collect::<Vec<_>>(),
                SMUGGLED.len()
            )),
        }
    }
    rig.finish(failures);
}

#[test]
fn connection_cannot_remove_transfer_encoding() {
    let rig = Rig::start();
    let mut failures = Vec::new();
    // The chunk data is a request: if `Transfer-Encoding` is dropped, the chunk-size line and
    // the data reach nginx as a pipeline of their own.
    let chunk = format!("{:x}\r\n{SMUGGLED}\r\n0\r\n\r\n", SMUGGLED.len());
    for (i, conn) in [
        "Connection: Transfer-Encoding",
        "Connection: transfer-encoding",
        "Connection: keep-alive, TRANSFER-ENCODING",
        "Connection: \tTransfer-Encoding\t",
    ]
    .iter()
    .enumerate()
    {
        for method in ["GET", "POST"] {
            let raw = request(
                method,
                "/public/index.html",
                &[conn, "Transfer-Encoding: chunked"],
                chunk.as_bytes(),
            );
            let case = format!("#{i} {method} with {conn:?}");
            match first_status(&rig.exchange(&case, &raw)) {
                Some(200) | Some(400) | Some(405) => {}
                s => failures.push(format!("[{case}] first status {s:?}, want 200/405 or 400")),
            }
        }
        // The same through the strict echo origin: one request, the decoded body.
        let target = format!("/echo/te/{i}");
        let raw = request(
            "POST",
            &target,
            &[conn, "Transfer-Encoding: chunked"],
            chunk.as_bytes(),
        );
        let case = format!("#{i} POST {target} with {conn:?}");
        let status = first_status(&rig.exchange(&case, &raw));
        let got = rig.echo_requests(&target);
        let whole = got.len() == 1 && got[0].body == SMUGGLED.as_bytes();
        if !(status == Some(400) && got.is_empty() || status == Some(200) && whole) {
            failures.push(format!(
                "[{case}] status {status:?}; upstream got {} request(s), bodies {:?}",
                got.len(),
                got.iter().map(|r| r.body.len()).collect::<Vec<_>>()
            ));
        }
    }
    rig.finish(failures);
}

#[test]
fn connection_cannot_remove_host_or_gateway_headers() {
    let rig = Rig::start();
    let mut failures = Vec::new();
    for (i, conn) in [
        "Connection: Host",
        "Connection: host",
        "Connection: keep-alive, HOST",
        "Connection: X-Real-IP",
        "Connection: X-Forwarded-For",
        "Connection: X-Forwarded-Proto",
        "Connection: Host, X-Real-IP, X-Forwarded-For, X-Forwarded-Proto",
    ]
    .iter()
    .enumerate()
    {
        let target = format!("/echo/conn/{i}");
        let raw = request("GET", &target, &[conn], b"");
        let case = format!("#{i} {conn:?}");
        let status = first_status(&rig.exchange(&case, &raw));
        if status == Some(400) {
            continue; // refusing is acceptable
        }
        let Some(r) = rig.echo_requests(&target).into_iter().next() else {
            failures.push(format!(
                "[{case}] status {status:?} but nothing reached the upstream"
            ));
            continue;
        };
        for (name, want) in [
            ("host", Some("gateway.test")),
            ("x-real-ip", Some("127.0.0.1")),
            ("x-forwarded-for", Some("127.0.0.1")),
            ("x-forwarded-proto", Some("http")),
        ] {
            let have = r.header_all(name);
            if have.len() != 1 || Some(have[0]) != want {
                failures.push(format!(
                    "[{case}] upstream got {name}: {have:?}, want exactly {want:?} \
                     (Connection must not remove what the gateway routes by or sets)"
                ));
            }
        }
    }
    rig.finish(failures);
}

/// A `Connection` flood: every forwarded field is checked against the `Connection` tokens,
/// so `x-a,x-a,…` (tens of thousands) with many fields once cost tokens × fields of worker
/// CPU per head (seconds at 1 MiB). More than 32 tokens, repeats included, is a 400 with
/// nothing forwarded; up to 32 still hide the fields they name.
#[test]
fn connection_token_floods_are_refused() {
    let rig = Rig::start_with(|c| c.server("max_header_bytes", "1MiB"));
    let mut failures = Vec::new();
    let fields: Vec<String> = (0..120).map(|i| format!("X-A{i}: 1")).collect();
    let names: Vec<String> = (0..33).map(|i| format!("x-{i}")).collect();
    let cases = [
        (
            "duplicate flood",
            format!("Connection: x-a{}", ",x-a".repeat(100_000)),
        ),
        ("33 distinct", format!("Connection: {}", names.join(","))),
        (
            "33 over two fields",
            format!(
                "Connection: {}\r\nConnection: {}",
                names[..16].join(","),
                names[16..].join(", ")
            ),
        ),
    ];
    for (i, (what, conn)) in cases.iter().enumerate() {
        let target = format!("/echo/flood/{i}");
        let mut headers: Vec<&str> = vec![conn, "X-A: hidden"];
        headers.extend(fields.iter().map(String::as_str));
        let raw = request("GET", &target, &headers, b"");
        expect_status(&rig, what, &raw, &[400], &mut failures);
        if !rig.echo_requests(&target).is_empty() {
            failures.push(format!("[{what}] refused but forwarded"));
        }
    }
    // At the cap the request passes and `Connection` still removes what it names.
    let at_cap = format!("Connection: x-a,{}", names[..31].join(","));
    let raw = request(
        "GET",
        "/echo/flood/cap",
        &[&at_cap, "X-A: hidden", "X-B: 1"],
        b"",
    );
    let status = first_status(&rig.exchange("32 tokens", &raw));
    let got = rig.echo_requests("/echo/flood/cap");
    match (status, got.as_slice()) {
        (Some(200), [r]) if r.header("x-a").is_none() && r.header("x-b") == Some("1") => {}
        (s, got) => failures.push(format!(
            "[32 tokens] status {s:?}, upstream got {} request(s); want 200 with X-A removed \
             and X-B forwarded",
            got.len()
        )),
    }
    rig.finish(failures);
}
