//! Issue 10 item 6: forwarding headers from untrusted clients are removed by default
//! (`Forwarded`, `X-Forwarded-Host`, `X-Forwarded-Port`, `X-Original-URL`, `X-Rewrite-URL`,
//! `True-Client-IP`, `X-Client-IP`), the gateway's own `X-Real-IP` and `X-Forwarded-Proto`
//! replace the client's, and `X-Forwarded-For` is appended to, never believed. From a
//! listener's `trusted_proxies` they are kept.

use gateway_tests::adversary::{Rig, CLIENT_IP};
use gateway_tests::RecordedRequest;

use super::request;

pub(crate) const SPOOFED: &[(&str, &str)] = &[
    (
        "Forwarded",
        "for=6.6.6.6;host=admin.example.com;proto=https",
    ),
    ("X-Forwarded-Host", "admin.example.com"),
    ("X-Forwarded-Port", "443"),
    ("X-Original-URL", "/admin/secret.txt"),
    ("X-Rewrite-URL", "/admin/secret.txt"),
    ("True-Client-IP", "6.6.6.6"),
    ("X-Client-IP", "6.6.6.6"),
];

pub(crate) fn send_spoofed(rig: &Rig, target: &str) -> Option<RecordedRequest> {
    let mut lines: Vec<String> = SPOOFED.iter().map(|(n, v)| format!("{n}: {v}")).collect();
    lines.push("X-Real-IP: 6.6.6.6".into());
    lines.push("X-Forwarded-Proto: https".into());
    lines.push("X-Forwarded-For: 6.6.6.6".into());
    let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
    let raw = request("GET", target, &lines, b"");
    rig.exchange_from(Some(CLIENT_IP.parse().unwrap()), target, &raw);
    rig.echo_requests(target).into_iter().next()
}

#[test]
fn untrusted_forwarding_headers_do_not_arrive() {
    let rig = Rig::start();
    let mut failures = Vec::new();
    match send_spoofed(&rig, "/echo/fwd") {
        None => failures.push("the request did not reach the upstream".into()),
        Some(r) => {
            for (name, value) in SPOOFED {
                if let Some(v) = r.header(name) {
                    failures.push(format!("{name}: {v:?} arrived (sent {value:?})"));
                }
            }
            let one = |name: &str| r.header_all(name);
            if one("x-real-ip") != [CLIENT_IP] {
                failures.push(format!(
                    "X-Real-IP {:?}, want [{CLIENT_IP}]",
                    one("x-real-ip")
                ));
            }
            if one("x-forwarded-proto") != ["http"] {
                failures.push(format!(
                    "X-Forwarded-Proto {:?}, want [http]",
                    one("x-forwarded-proto")
                ));
            }
            let xff = one("x-forwarded-for").join(",");
            let last = xff.rsplit(',').next().unwrap_or_default().trim();
            if last != CLIENT_IP {
                failures.push(format!(
                    "X-Forwarded-For {xff:?} does not end with the peer {CLIENT_IP}"
                ));
            }
        }
    }
    rig.finish(failures);
}

#[test]
fn trusted_proxies_keep_forwarding_headers() {
    let rig = Rig::start_edited(
        |c| c,
        |toml| {
            toml.replacen(
                "name = \"http\"\n",
                "name = \"http\"\ntrusted_proxies = [\"127.0.0.0/8\"]\n",
                1,
            )
        },
    );
    let mut failures = Vec::new();
    match send_spoofed(&rig, "/echo/trusted") {
        None => failures.push("the request did not reach the upstream".into()),
        Some(r) => {
            for (name, value) in SPOOFED {
                if r.header(name) != Some(value) {
                    failures.push(format!(
                        "from a trusted proxy {name} arrived as {:?}, want {value:?}",
                        r.header(name)
                    ));
                }
            }
        }
    }
    rig.finish(failures);
}
