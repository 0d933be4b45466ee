//! The reference (issue 17: "with nginx's behaviour in the same case as the reference where
//! it has one"): the client-side cases of the other modules sent to nginx 1.22 as the front,
//! configured as the gateway is ([`Rig::start_nginx_front`]). nginx must hold the same
//! shared invariants, which shows they are achievable by a front that normalises and frames
//! what it forwards; what it answers in each case is printed as a table (`--nocapture`)
//! beside what the gateway's own tests require, for the closing notes.

use gateway_tests::adversary::{first_status, Rig, CLIENT_IP};

use super::{
    bare_lf, chunk_lines, connection_framing, header_aliases, methods, path_normalisation,
};
use super::{forwarding_headers, request, SMUGGLED};

/// (class, case, raw request) for every client-side case with a status expectation.
fn cases() -> Vec<(&'static str, String, Vec<u8>)> {
    let mut out = Vec::new();
    for conn in connection_framing::NAMES_CONTENT_LENGTH {
        let cl = format!("Content-Length: {}", SMUGGLED.len());
        let mut headers = conn.to_vec();
        headers.push(&cl);
        out.push((
            "Connection names Content-Length",
            format!("{conn:?}"),
            request("GET", "/public/index.html", &headers, SMUGGLED.as_bytes()),
        ));
    }
    for (what, body) in bare_lf::chunked_cases() {
        out.push((
            "bare LF in chunked body",
            what.to_string(),
            bare_lf::chunked_post("/public/index.html", &body),
        ));
    }
    for (what, raw) in bare_lf::HEAD_CASES {
        out.push(("bare LF in head", what.to_string(), raw.as_bytes().to_vec()));
    }
    for line in chunk_lines::BAD_SIZE_LINES {
        out.push((
            "chunk-size line",
            format!("{line:?}"),
            request(
                "POST",
                "/echo/chunk",
                &["Transfer-Encoding: chunked"],
                format!("{line}\r\nhello\r\n0\r\n\r\n").as_bytes(),
            ),
        ));
    }
    for target in path_normalisation::FORBIDDEN {
        out.push((
            "path to /admin",
            target.to_string(),
            request("GET", target, &[], b""),
        ));
    }
    for target in path_normalisation::UNSAFE
        .iter()
        .chain(path_normalisation::DOT_PARAMETERS)
    {
        out.push((
            "unsafe path",
            target.to_string(),
            request("GET", target, &[], b""),
        ));
    }
    for host in path_normalisation::HOSTS {
        out.push((
            "admin host",
            host.to_string(),
            format!("GET /public/index.html HTTP/1.1\r\nHost: {host}\r\n\r\n").into_bytes(),
        ));
    }
    for (what, raw) in methods::CASES {
        out.push(("method", what.to_string(), raw.as_bytes().to_vec()));
    }
    out
}

#[test]
fn nginx_front_holds_the_invariants() {
    let rig = Rig::start_nginx_front();
    let mut table = vec![format!("{:<34} {:<48} nginx", "class", "case")];
    for (class, case, raw) in cases() {
        let status = first_status(&rig.exchange(&format!("{class}: {case}"), &raw));
        let status = status.map_or("none".to_string(), |s| s.to_string());
        table.push(format!("{class:<34} {case:<48} {status}"));
    }
    // Headers: what nginx passes from an untrusted client.
    let spoofed = forwarding_headers::send_spoofed(&rig, "/echo/fwd");
    for (name, _) in forwarding_headers::SPOOFED {
        let passed = spoofed.as_ref().and_then(|r| r.header(name)).is_some();
        table.push(format!(
            "{:<34} {name:<48} {}",
            "forwarding header",
            passes(passed)
        ));
    }
    let lines = header_aliases::alias_lines();
    let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
    rig.exchange_from(
        Some(CLIENT_IP.parse().unwrap()),
        "aliases",
        &request("GET", "/echo/alias", &lines, b""),
    );
    let got = rig.echo_requests("/echo/alias");
    for (name, _) in header_aliases::ALIASES {
        let passed = got.iter().any(|r| r.headers.iter().any(|(n, _)| n == name));
        table.push(format!(
            "{:<34} {name:<48} {}",
            "underscore alias",
            passes(passed)
        ));
    }
    eprintln!("nginx 1.22 as the front, same cases:\n{}", table.join("\n"));
    rig.assert_invariants();
}

fn passes(passed: bool) -> &'static str {
    if passed {
        "forwarded"
    } else {
        "dropped"
    }
}
