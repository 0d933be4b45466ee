//! Issue 10 item 4: routing on the raw target. nginx normalises the path before it serves a
//! file (percent-decoding, dot segments, merged slashes), so every spelling of
//! `/admin/secret.txt` it would serve must meet the gateway's `/admin` respond route (403),
//! or be refused as not safely normalisable (400: an encoded `/`, `..` above the root, a
//! dot segment with `;` parameters). Spellings with `;params` (`/;/admin/secret.txt`) meet
//! the route too, because a Tomcat or Spring upstream drops them per segment.
//! `Host` is compared case-insensitively, without a trailing dot and without the port, so
//! spellings of the guarded `admin.example.com` meet its host route (403).

use gateway_tests::adversary::Rig;

use super::{expect_status, request};

/// Spellings of the guarded secret that normalise onto the `/admin` route.
pub(crate) const FORBIDDEN: &[&str] = &[
    "/public/../admin/secret.txt",
    "/public/%2e%2e/admin/secret.txt",
    "/public/%2E%2E/admin/secret.txt",
    "/public/.%2e/admin/secret.txt",
    "/public/%2e./admin/secret.txt",
    "//admin/secret.txt",
    "///admin//secret.txt",
    "/%61dmin/secret.txt",
    "/%61%64%6d%69%6e/secret.txt",
    "/adm%69n/secret.txt",
    "/./admin/secret.txt",
    "/%2e/admin/secret.txt",
    "/public/./../admin/secret.txt",
    "/public/x/../../admin/secret.txt",
    "/admin/./secret.txt",
    "/admin/",
    "/admin",
    "/public/../admin/secret.txt?x=1",
    // `;params` dropped per segment, as Tomcat/Spring upstreams read the path.
    "/;/admin/secret.txt",
    "/;x/admin/secret.txt",
    "/;/;x//admin;y/secret.txt",
    "/admin;x/secret.txt",
    "/admin;x",
    "/admin/secret.txt;jsessionid=1",
    "/public/;x/../../admin;/secret.txt",
    // The same with `;` encoded, for a server that decodes before dropping parameters.
    "/%3b/admin/secret.txt",
    "/%3Bx/admin/secret.txt",
];

/// Dot segments with parameters, before or after decoding (`..;`, `%2e%2e%3b`, `.%3B`): a
/// server that drops `;params` resolves them as `.`/`..`, so they are refused (400).
pub(crate) const DOT_PARAMETERS: &[&str] = &[
    "/pub/%2e%2e%3b/secret.txt",
    "/public/%2e%2e%3b/admin/secret.txt",
    "/public/..%3B/admin/secret.txt",
    "/public/..%3bx=1/admin/secret.txt",
    "/public/.%3B/../admin/secret.txt",
    "/public/..;/admin/secret.txt",
    "/public/%2e%2e;x/admin/secret.txt",
];

/// Targets that cannot be normalised safely: an encoded `/`, `..` above the root.
pub(crate) const UNSAFE: &[&str] = &[
    "/%2fadmin/secret.txt",
    "/%2Fadmin/secret.txt",
    "/admin%2fsecret.txt",
    "/public/..%2fadmin/secret.txt",
    "/public%2f..%2fadmin/secret.txt",
    "/../admin/secret.txt",
    "/public/../../admin/secret.txt",
    "/%2e%2e/admin/secret.txt",
];

/// Spellings of the guarded admin host.
pub(crate) const HOSTS: &[&str] = &[
    "admin.example.com",
    "admin.example.com.",
    "ADMIN.EXAMPLE.COM",
    "Admin.Example.Com",
    "admin.example.com:80",
    "admin.example.com:8080",
    "ADMIN.example.com.:80",
];

#[test]
fn path_spellings_of_the_secret_meet_the_admin_route() {
    let rig = Rig::start();
    let mut failures = Vec::new();
    for (i, target) in FORBIDDEN.iter().enumerate() {
        let raw = request("GET", target, &[], b"");
        expect_status(
            &rig,
            &format!("#{i} GET {target}"),
            &raw,
            &[403],
            &mut failures,
        );
    }
    for (i, target) in DOT_PARAMETERS.iter().enumerate() {
        let raw = request("GET", target, &[], b"");
        let case = format!("#{i} GET {target}");
        expect_status(&rig, &case, &raw, &[400], &mut failures);
    }
    for (i, target) in UNSAFE.iter().enumerate() {
        let raw = request("GET", target, &[], b"");
        // The contract asks for 400; a 403 from the admin route is as safe, so both pass.
        expect_status(
            &rig,
            &format!("#{i} GET {target}"),
            &raw,
            &[400, 403],
            &mut failures,
        );
    }
    rig.finish(failures);
}

#[test]
fn host_spellings_of_the_admin_host_meet_its_route() {
    let rig = Rig::start();
    let mut failures = Vec::new();
    expect_for_hosts(&rig, HOSTS, &[403], &mut failures);
    rig.finish(failures);
}

/// `GET /public/index.html` with each of `hosts` as `Host`, expecting one of `allowed`.
fn expect_for_hosts(rig: &Rig, hosts: &[&str], allowed: &[u16], failures: &mut Vec<String>) {
    for (i, host) in hosts.iter().enumerate() {
        let raw = format!("GET /public/index.html HTTP/1.1\r\nHost: {host}\r\n\r\n");
        let case = format!("#{i} Host: {host}");
        expect_status(rig, &case, raw.as_bytes(), allowed, failures);
    }
}

/// Host and absolute-form authorities outside the one narrow form (reg-name, IPv4 or
/// `[IPv6]`, then an optional port of 1 to 5 digits): an upstream could read another host
/// in them (brackets around a name, `%2e` decoded, a second port) than the gateway routed
/// on. Each is a 400 from the gateway, whatever route the bytes would meet.
pub(crate) const BAD_HOSTS: &[&str] = &[
    "[admin.example.com]",
    "[admin.example.com]:80",
    "admin%2eexample.com",
    "admin%2Eexample.com:80",
    "admin.example.com:80:80",
    "admin.example.com:",
    "admin.example.com:123456",
    "[::1",
    "[::1]80",
    "admin~example.com",
];

/// The same class in absolute-form targets (RFC 9112 §3.2.2), whose authority replaces Host.
pub(crate) const BAD_AUTHORITIES: &[&str] = &[
    "http://a:80:80/public/index.html",
    "http://[::1/admin/secret.txt",
    "http://[admin.example.com]/public/index.html",
    "http://admin%2eexample.com/public/index.html",
    "http://admin.example.com:/public/index.html",
];

#[test]
fn malformed_hosts_and_authorities_get_400() {
    let rig = Rig::start();
    let mut failures = Vec::new();
    expect_for_hosts(&rig, BAD_HOSTS, &[400], &mut failures);
    for (i, target) in BAD_AUTHORITIES.iter().enumerate() {
        let raw = request("GET", target, &[], b"");
        let case = format!("#{i} GET {target}");
        expect_status(&rig, &case, &raw, &[400], &mut failures);
    }
    rig.finish(failures);
}
