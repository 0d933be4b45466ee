//! The request target as the gateway routes it and forwards it: the path normalised the
//! way nginx and most origin servers normalise it, so that the route chosen is the one the
//! upstream will serve (RFC 3986 §6.2.2, RFC 9112 §3.2).
//!
//! - `%XX` of an unreserved character (`A-Z a-z 0-9 - . _ ~`) is decoded; other escapes
//!   stay encoded, their hex digits upper-cased;
//! - runs of `/` are merged; `.` and `..` segments are resolved (after decoding, so
//!   `%2e%2e` is `..`);
//! - refused with 400: an encoded `/` or `\` (`%2F`, `%5C`), a raw `\` (IIS and others
//!   read it as `/`), `%00`, a `%` not followed by two hex digits, a `..` above the root, a
//!   fragment, a dot segment with `;` parameters (`..;` or `..%3B`, which Tomcat and Jetty
//!   resolve as `..`), and a path that does not start with `/`.
//!
//! Routing uses the normalised path with each segment's `;params` (or `%3Bparams`)
//! removed (`strip_parameters`), the reading of servers that drop them.
//!
//! The query (from the first `?`) is kept byte for byte. The normalised target is what is
//! forwarded, so the upstream never sees a path other than the one that was routed.

/// Why a target cannot be normalised safely.
pub type Invalid = &'static str;

/// Writes the normalised `target` (an origin-form path with an optional query) into `out`,
/// reusing its memory, and returns the length of the path part.
pub fn normalise(target: &[u8], out: &mut Vec<u8>) -> Result<usize, Invalid> {
    out.clear();
    let path_end = target
        .iter()
        .position(|&b| b == b'?')
        .unwrap_or(target.len());
    let (path, query) = target.split_at(path_end);
    if path.is_empty() {
        // `http://h` or `http://h?q` in absolute form: the path is `/` (RFC 9112 §3.2.1).
        out.push(b'/');
        out.extend_from_slice(query);
        return Ok(1);
    }
    if path[0] != b'/' {
        return Err("path does not start with /");
    }
    if path.contains(&b'#') || path.contains(&b'\\') {
        return Err("fragment or backslash in path");
    }
    let mut i = 0;
    let mut ended_in_dot = false;
    while i < path.len() {
        // At a `/`: merge the run.
        while i < path.len() && path[i] == b'/' {
            i += 1;
        }
        if i == path.len() {
            out.push(b'/');
            ended_in_dot = false;
            break;
        }
        let segment_start = out.len();
        out.push(b'/');
        while i < path.len() && path[i] != b'/' {
            i += decode_one(&path[i..], out)?;
        }
        ended_in_dot = true;
        let segment = &out[segment_start + 1..];
        if dot_with_parameters(segment) {
            // Tomcat and Jetty drop `;params` before resolving dot segments, so `..;` is
            // `..` to them (`/public/..;/admin`), which nothing here would resolve.
            return Err("dot segment with parameters");
        }
        match segment {
            b"." => out.truncate(segment_start),
            b".." => {
                out.truncate(segment_start);
                let Some(parent) = out.iter().rposition(|&b| b == b'/') else {
                    return Err("dot segment above the root");
                };
                out.truncate(parent);
            }
            _ => ended_in_dot = false,
        }
    }
    if ended_in_dot || out.is_empty() {
        // `/a/.` and `/a/b/..` name a directory: `/a/`.
        out.push(b'/');
    }
    let path_len = out.len();
    out.extend_from_slice(query);
    Ok(path_len)
}

/// Whether a decoded segment is `.` or `..` followed by `;` or its escape `%3B` (kept
/// encoded, upper-case, by `decode_one`): a server that drops `;params`, before or after
/// decoding, reads it as a dot segment.
fn dot_with_parameters(segment: &[u8]) -> bool {
    let rest = segment
        .strip_prefix(b"..")
        .or_else(|| segment.strip_prefix(b"."));
    rest.is_some_and(|r| r.starts_with(b";") || r.starts_with(b"%3B"))
}

/// Writes the normalised `path` with each segment's `;params` removed into `out` (reusing
/// its memory): `/a;x/b;y` is `/a/b`, `/;/admin` is `/admin`, `/a/;x` is `/a/`.
///
/// Tomcat, Jetty and Spring drop path parameters per segment (RFC 3986 §3.3 leaves their
/// meaning to the scheme) and then merge the empty segments this leaves, so they serve
/// `/admin/secret.txt` for `/;/admin/secret.txt`. A server that decodes first reads `%3B`
/// as `;` too, so parameters start at either. Routing on this reading makes every spelling
/// with parameters meet the route of the path it names, while the target is forwarded as
/// normalised. Returns `false` (and leaves `out` alone) when `path` has no parameters.
pub(crate) fn strip_parameters(path: &[u8], out: &mut Vec<u8>) -> bool {
    if !path.iter().enumerate().any(|(i, _)| params_at(&path[i..])) {
        return false;
    }
    out.clear();
    let mut last_empty = false;
    for segment in path[1..].split(|&b| b == b'/') {
        let end = (0..segment.len())
            .find(|&i| params_at(&segment[i..]))
            .unwrap_or(segment.len());
        let name = &segment[..end];
        last_empty = name.is_empty();
        if !last_empty {
            out.push(b'/');
            out.extend_from_slice(name);
        }
    }
    if last_empty || out.is_empty() {
        out.push(b'/');
    }
    true
}

/// Whether path parameters start here: `;`, or `%3B` (upper-case in a normalised path).
fn params_at(rest: &[u8]) -> bool {
    rest.starts_with(b";") || rest.starts_with(b"%3B")
}

/// Copies one character (or one escape) of a path segment; returns the bytes consumed.
fn decode_one(input: &[u8], out: &mut Vec<u8>) -> Result<usize, Invalid> {
    if input[0] != b'%' {
        out.push(input[0]);
        return Ok(1);
    }
    let (Some(hi), Some(lo)) = (
        input.get(1).copied().and_then(hex),
        input.get(2).copied().and_then(hex),
    ) else {
        return Err("bad percent-encoding");
    };
    let byte = hi << 4 | lo;
    match byte {
        0 => return Err("encoded NUL"),
        b'/' | b'\\' => return Err("encoded slash in a segment"),
        b if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') => out.push(b),
        _ => {
            const HEX: &[u8; 16] = b"0123456789ABCDEF";
            out.extend_from_slice(&[b'%', HEX[hi as usize], HEX[lo as usize]]);
        }
    }
    Ok(3)
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// Splits an absolute-form target (`http://authority/path?q`, RFC 9112 §3.2.2) into the
/// authority and the origin-form rest (`/` when the path is empty). `None`: not a valid
/// `http`/`https` URI, or one with userinfo, which no client should send (RFC 9110 §4.2.4).
pub(crate) fn split_absolute(target: &[u8]) -> Option<(std::ops::Range<usize>, usize)> {
    let scheme_len = if target.len() >= 7 && target[..7].eq_ignore_ascii_case(b"http://") {
        7
    } else if target.len() >= 8 && target[..8].eq_ignore_ascii_case(b"https://") {
        8
    } else {
        return None;
    };
    let rest = &target[scheme_len..];
    let end = rest
        .iter()
        .position(|&b| b == b'/' || b == b'?')
        .unwrap_or(rest.len());
    let authority = &rest[..end];
    if authority.is_empty() || !valid_authority(authority) {
        return None;
    }
    Some((scheme_len..scheme_len + end, scheme_len + end))
}

/// Whether a `Host` value or an absolute-form authority is `host [":" port]` in the one
/// narrow form every server reads alike (RFC 9110 §7.2, RFC 3986 §3.2.2):
///
/// - host: a reg-name of ASCII letters, digits, `-`, `_` (nginx accepts it) and `.`
///   without an empty label (`..`, a leading `.`; one trailing `.` is the root), which also
///   covers IPv4; or an IPv6 literal in brackets (no zone, no IPvFuture);
/// - port: `:` then 1 to 5 digits, at most 65535; one `:` outside the brackets.
///
/// No `%` (a server that decodes `admin%2eexample.com` sees another host), userinfo,
/// path, whitespace or control bytes. Empty is valid only as a whole (`Host:` for a
/// target without authority, RFC 9112 §3.2).
pub(crate) fn valid_authority(authority: &[u8]) -> bool {
    if authority.is_empty() {
        return true;
    }
    let host_end = if authority[0] == b'[' {
        match authority.iter().position(|&b| b == b']') {
            Some(end) => end + 1,
            None => return false,
        }
    } else {
        authority
            .iter()
            .position(|&b| b == b':')
            .unwrap_or(authority.len())
    };
    let (host, port) = authority.split_at(host_end);
    let host_ok = match host {
        [b'[', literal @ .., b']'] => {
            std::str::from_utf8(literal).is_ok_and(|s| s.parse::<std::net::Ipv6Addr>().is_ok())
        }
        _ => reg_name(host),
    };
    host_ok && (port.is_empty() || valid_port(port))
}

/// Letters, digits, `-`, `_` and `.` with no empty label (a trailing `.` is allowed).
fn reg_name(host: &[u8]) -> bool {
    let mut prev = b'.';
    !host.is_empty()
        && host.iter().all(|&b| {
            let ok = b.is_ascii_alphanumeric()
                || matches!(b, b'-' | b'_')
                || (b == b'.' && prev != b'.');
            prev = b;
            ok
        })
}

/// `:` then 1 to 5 digits naming a port (0–65535).
fn valid_port(port: &[u8]) -> bool {
    match port {
        [b':', digits @ ..] => {
            (1..=5).contains(&digits.len())
                && digits.iter().all(u8::is_ascii_digit)
                && std::str::from_utf8(digits).is_ok_and(|d| d.parse::<u16>().is_ok())
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(target: &str) -> Result<String, Invalid> {
        let mut out = Vec::new();
        let path_len = normalise(target.as_bytes(), &mut out)?;
        let s = String::from_utf8(out).unwrap();
        assert!(s[path_len..].is_empty() || s[path_len..].starts_with('?'));
        Ok(s)
    }

    #[test]
    fn normalises_like_nginx() {
        for (raw, want) in [
            ("/", "/"),
            ("/a/b", "/a/b"),
            ("/a/b/", "/a/b/"),
            ("/public/../admin/secret.txt", "/admin/secret.txt"),
            ("/public/%2e%2e/admin", "/admin"),
            ("/public/%2E%2e/admin", "/admin"),
            ("//admin", "/admin"),
            ("/a//b///c", "/a/b/c"),
            ("/%61dmin", "/admin"),
            ("/./admin", "/admin"),
            ("/a/.", "/a/"),
            ("/a/b/..", "/a/"),
            ("/a/..", "/"),
            ("/a/b/../../c", "/c"),
            ("/a%20b;p=1?q=1&r=%2F&x=/../", "/a%20b;p=1?q=1&r=%2F&x=/../"),
            ("/%c3%a9", "/%C3%A9"),
            ("/.../x", "/.../x"),
            ("/a.b/..c", "/a.b/..c"),
            ("/a;p=1/b", "/a;p=1/b"),
            ("/a/...;/b", "/a/...;/b"),
            ("/a/.x;/b", "/a/.x;/b"),
            ("/a/x%3B/b", "/a/x%3B/b"),
            ("/%7euser", "/~user"),
            ("", "/"),
            ("?q=1", "/?q=1"),
        ] {
            assert_eq!(norm(raw).as_deref(), Ok(want), "{raw}");
        }
    }

    #[test]
    fn refuses_what_cannot_be_normalised_safely() {
        for raw in [
            "/..",
            "/../admin",
            "/a/../../admin",
            "/%2e%2e/admin",
            "/admin%2fsecret",
            "/admin%2Fsecret",
            "/admin%5csecret",
            "/admin\\secret",
            "/a%00",
            "/a%",
            "/a%4",
            "/a%zz",
            "/a#frag",
            "/public/..;/admin",
            "/public/..;x=1/admin",
            "/.;/admin",
            "/public/%2e%2e;/admin",
            "/pub/%2e%2e%3b/secret.txt",
            "/pub/..%3B/secret.txt",
            "/pub/..%3bx/secret.txt",
            "/pub/.%3B/secret.txt",
            "/pub/%2E%3b/secret.txt",
            "/pub/.;x",
            "a/b",
        ] {
            assert!(norm(raw).is_err(), "{raw:?} was accepted");
        }
    }

    #[test]
    fn parameters_are_stripped_per_segment_for_routing() {
        let mut out = Vec::new();
        assert!(!strip_parameters(b"/admin/secret.txt", &mut out));
        for (path, want) in [
            ("/;/admin/secret.txt", "/admin/secret.txt"),
            ("/;x/admin/secret.txt", "/admin/secret.txt"),
            ("/admin;x", "/admin"),
            ("/admin;x/secret.txt;jsessionid=1", "/admin/secret.txt"),
            ("/a;p=1/b", "/a/b"),
            ("/;/;x/admin", "/admin"),
            ("/a/;x", "/a/"),
            ("/a;x/", "/a/"),
            ("/;", "/"),
            ("/a;x;y/b", "/a/b"),
            ("/%3B/admin/secret.txt", "/admin/secret.txt"),
            ("/admin%3Bx/secret.txt", "/admin/secret.txt"),
        ] {
            assert!(strip_parameters(path.as_bytes(), &mut out), "{path}");
            assert_eq!(String::from_utf8_lossy(&out), want, "{path}");
        }
    }

    #[test]
    fn absolute_form() {
        let t = b"http://Admin.Example.com:80/x?y";
        let (auth, rest) = split_absolute(t).unwrap();
        assert_eq!(&t[auth], b"Admin.Example.com:80");
        assert_eq!(&t[rest..], b"/x?y");
        let t = b"https://h";
        let (auth, rest) = split_absolute(t).unwrap();
        assert_eq!((&t[auth], &t[rest..]), (&b"h"[..], &b""[..]));
        for bad in [
            &b"http://user@h/x"[..],
            b"http:///x",
            b"ftp://h/x",
            b"httpx",
        ] {
            assert!(split_absolute(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn hosts() {
        for good in [
            "a.example.com",
            "a.example.com.",
            "h:8080",
            "h:0",
            "h:65535",
            "[::1]:80",
            "[::1]",
            "[2001:db8::1]",
            "[::ffff:192.0.2.1]:443",
            "192.0.2.1:80",
            "x_y",
            "A-b.C",
            "",
        ] {
            assert!(valid_authority(good.as_bytes()), "{good}");
        }
        for bad in [
            "a..b",
            ".a",
            "a/b",
            "u@h",
            "a b",
            "a\\b",
            "h?x",
            "[admin.example.com]",
            "[admin.example.com]:80",
            "[v1.x]",
            "[fe80::1%25eth0]",
            "[::1",
            "[::1/admin",
            "[::1]x",
            "[::1]:",
            "::1",
            "admin%2eexample.com",
            "a%41",
            "a~b",
            "a:80:80",
            "a:",
            ":80",
            "a:123456",
            "a:65536",
            "a:8a",
            "a:+80",
            "a\tb",
            "é.example",
        ] {
            assert!(!valid_authority(bad.as_bytes()), "{bad}");
        }
    }

    #[test]
    fn absolute_form_authority_is_validated_like_host() {
        for bad in [
            &b"http://a:80:80/pub/index.html"[..],
            b"http://[::1/admin/secret.txt",
            b"http://[admin.example.com]/",
            b"http://admin%2eexample.com/",
            b"http://a:/",
        ] {
            assert!(
                split_absolute(bad).is_none(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        let t = b"http://[::1]:8080/a";
        let (auth, rest) = split_absolute(t).unwrap();
        assert_eq!((&t[auth], &t[rest..]), (&b"[::1]:8080"[..], &b"/a"[..]));
    }
}
