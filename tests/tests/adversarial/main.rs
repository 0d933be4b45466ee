//! The adversarial suite (issue 10 "How it is proven", issue 17): one module per attack
//! class, several variants each, every case run against the real gateway in front of a
//! real nginx that serves a secret behind a gateway 403 route
//! ([`gateway_tests::adversary::Rig`]). Besides each case's own expectation (the status the
//! contract names in PRODUCT.md "Behaviour at the edge", what the upstream received), every
//! case checks the rig's shared invariants: the secret never reaches a client, nginx never
//! serves a request the gateway did not log, and each upstream sees exactly the requests
//! the gateway accepted.
//!
//! Run: `GATEWAY_BIN=$PWD/target/debug/gateway cargo test -p gateway-tests --test adversarial`

mod bare_lf;
mod bodyless;
mod chunk_lines;
mod connection_framing;
mod forwarding_headers;
mod header_aliases;
mod methods;
mod nginx_reference;
mod path_normalisation;
mod protocol_details;
mod response_framing;
mod status_lines;

/// `GET`-style request bytes with a Host and extra header lines (each without CRLF).
pub fn request(method: &str, target: &str, headers: &[&str], body: &[u8]) -> Vec<u8> {
    let mut out = format!("{method} {target} HTTP/1.1\r\nHost: gateway.test\r\n").into_bytes();
    for h in headers {
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
    out
}

/// A complete request for the secret, as a smuggled payload.
pub const SMUGGLED: &str = "GET /admin/secret.txt HTTP/1.1\r\nHost: gateway.test\r\n\r\n";

/// Sends `raw` through the rig and records a finding unless the first status is one of
/// `allowed`. When the first status is a 4xx/5xx the gateway produced, the connection must
/// also be closed after it (the follow-up request [`Rig::exchange`] sends on a still-open
/// connection must not be answered). Returns every byte received.
pub fn expect_status(
    rig: &gateway_tests::adversary::Rig,
    case: &str,
    raw: &[u8],
    allowed: &[u16],
    failures: &mut Vec<String>,
) -> Vec<u8> {
    let got = rig.exchange(case, raw);
    let responses = gateway_tests::adversary::split_responses(&got);
    let statuses: Vec<u16> = responses.iter().map(|r| r.0).collect();
    let first = gateway_tests::adversary::first_status(&got);
    // The refusals the contract names are the gateway's own: the same status produced by
    // the upstream means the request was forwarded.
    let from_upstream = responses.first().is_some_and(|(_, head, _)| {
        gateway_tests::wire::header(&head.headers, "server").is_some_and(|v| v.starts_with("nginx"))
    });
    match first {
        Some(s) if allowed.contains(&s) && from_upstream && matches!(s, 400 | 403 | 405 | 502) => {
            failures.push(format!(
                "[{case}] {s} came from the upstream (nginx): the gateway forwarded the request instead of answering {s} itself"
            ));
        }
        Some(s) if allowed.contains(&s) => {
            if s == 400 && statuses.len() > 1 {
                failures.push(format!(
                    "[{case}] answered 400 but kept the connection open (statuses {statuses:?})"
                ));
            }
        }
        _ => failures.push(format!(
            "[{case}] first status {first:?}, want one of {allowed:?}; got {:?}",
            gateway_tests::wire::excerpt(&got)
        )),
    }
    got
}

/// The rig plus a hostile origin behind `/hostile/` (and `/ws/`, a WebSocket route), whose
/// answers come from `handler`.
pub fn rig_with_hostile(
    handler: impl Fn(&gateway_tests::RecordedRequest) -> gateway_tests::Reply + Send + Sync + 'static,
) -> (gateway_tests::adversary::Rig, gateway_tests::Origin) {
    use gateway_tests::{Route, Upstream};
    let hostile = gateway_tests::Origin::start(handler);
    let addr = hostile.addr();
    let rig = gateway_tests::adversary::Rig::start_with(|c| {
        c.upstream(Upstream::new("hostile", &[addr]))
            .route(Route::prefix("/hostile/", "hostile"))
            .route(Route::prefix("/ws/", "hostile").websocket(true))
    });
    (rig, hostile)
}
