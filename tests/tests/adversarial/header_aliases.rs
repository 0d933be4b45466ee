//! Issue 17 item 4: underscore aliases of the gateway's own headers. WSGI, CGI and Rack map
//! `-` and `_` to the same variable, so `X_Real_IP` arriving next to the gateway's
//! `X-Real-IP` lets the client choose the address and scheme the application sees (Puma
//! CVE-2024-45614). nginx drops names containing `_` (`underscores_in_headers off`); at the
//! least, no name that normalises (`_` as `-`, any case) to one the gateway sets or strips
//! may arrive. Proven at a recording origin and at a real `wsgiref` application.

use gateway_tests::adversary::{first_status, Rig, Wsgi, CLIENT_IP};
use gateway_tests::{Route, Upstream};

use super::request;

pub(crate) const ALIASES: &[(&str, &str)] = &[
    ("X_Real_IP", "6.6.6.6"),
    ("x_real_ip", "6.6.6.7"),
    ("X-Real_IP", "6.6.6.8"),
    ("X-Forwarded_For", "6.6.6.6"),
    ("X_Forwarded_For", "6.6.6.9"),
    ("X_Forwarded_Proto", "https"),
    ("X_Forwarded_Host", "admin.example.com"),
    ("True_Client_IP", "6.6.6.6"),
    ("Content_Length", "0"),
    ("Transfer_Encoding", "chunked"),
];

/// Names the gateway sets or strips, in the alias-normalised form.
pub(crate) const PROTECTED: &[&str] = &[
    "x-real-ip",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-forwarded-port",
    "forwarded",
    "true-client-ip",
    "x-client-ip",
    "content-length",
    "transfer-encoding",
    "connection",
    "host",
];

pub(crate) fn alias_lines() -> Vec<String> {
    ALIASES.iter().map(|(n, v)| format!("{n}: {v}")).collect()
}

#[test]
fn underscore_aliases_do_not_reach_the_upstream() {
    let rig = Rig::start();
    let mut failures = Vec::new();
    let lines = alias_lines();
    let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
    let target = "/echo/alias";
    let status = first_status(&rig.exchange_from(
        Some(CLIENT_IP.parse().unwrap()),
        "aliases",
        &request("GET", target, &lines, b""),
    ));
    match rig.echo_requests(target).into_iter().next() {
        None => failures.push(format!(
            "status {status:?} and nothing reached the upstream"
        )),
        Some(r) => {
            for (name, value) in &r.headers {
                let norm = name.replace('_', "-").to_ascii_lowercase();
                if name.contains('_') && PROTECTED.contains(&norm.as_str()) {
                    failures.push(format!("alias {name}: {value:?} reached the upstream"));
                }
            }
        }
    }
    rig.finish(failures);
}

#[test]
fn wsgi_application_sees_the_real_client() {
    let app = Wsgi::start();
    let addr = app.addr();
    let rig = Rig::start_with(|c| {
        c.upstream(Upstream::new("wsgi", &[addr]))
            .route(Route::prefix("/wsgi/", "wsgi"))
    });
    let mut failures = Vec::new();
    let lines = alias_lines();
    let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
    for (what, headers) in [("no aliases (control)", vec![]), ("aliases", lines)] {
        let got = rig.exchange_from(
            Some(CLIENT_IP.parse().unwrap()),
            what,
            &request("GET", "/wsgi/env", &headers, b""),
        );
        let responses = gateway_tests::adversary::split_responses(&got);
        let Some((200, _, body)) = responses.first() else {
            failures.push(format!(
                "[{what}] no 200 from the WSGI app: {:?}",
                gateway_tests::wire::excerpt(&got)
            ));
            continue;
        };
        let env: serde_json::Value = match serde_json::from_slice(body) {
            Ok(v) => v,
            Err(e) => {
                failures.push(format!("[{what}] app answer is not JSON ({e})"));
                continue;
            }
        };
        for (key, want) in [
            ("HTTP_X_REAL_IP", Some(CLIENT_IP)),
            ("HTTP_X_FORWARDED_FOR", Some(CLIENT_IP)),
            ("HTTP_X_FORWARDED_PROTO", Some("http")),
            ("HTTP_X_FORWARDED_HOST", None),
            ("HTTP_TRUE_CLIENT_IP", None),
            ("wsgi.url_scheme", Some("http")),
            ("REMOTE_ADDR", Some("127.0.0.1")),
        ] {
            let have = env.get(key).and_then(|v| v.as_str());
            if have != want {
                failures.push(format!(
                    "[{what}] the WSGI app sees {key} = {have:?}, want {want:?}"
                ));
            }
        }
    }
    rig.finish(failures);
}
