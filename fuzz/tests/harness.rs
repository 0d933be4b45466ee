//! The harnesses themselves: they drive the real code (a fuzz target that never reaches the
//! code under test passes every input), and a broken invariant fails.

use gateway_fuzz::targets::{connection, tls_stream};

fn seed(target: &str, name: &str) -> Vec<u8> {
    let path = gateway_fuzz::replay::corpus_dir(target).join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn connection_harness_proxies_a_request_to_the_scripted_upstream() {
    let ex = connection::exchange(&seed("connection", "get-pipelined"));
    assert!(
        ex.client.starts_with(b"HTTP/1.1 200 OK\r\n"),
        "{}",
        ex.client.escape_ascii()
    );
    assert_eq!(
        ex.client
            .windows(15)
            .filter(|w| w == b"HTTP/1.1 200 OK")
            .count(),
        3,
        "three pipelined requests, three answers: {}",
        ex.client.escape_ascii()
    );
    let sent: Vec<u8> = ex.upstreams.concat();
    for path in ["GET /a ", "GET /b ", "GET /c "] {
        assert!(
            sent.windows(path.len()).any(|w| w == path.as_bytes()),
            "{path} not forwarded: {}",
            sent.escape_ascii()
        );
    }
}

#[test]
fn connection_harness_answers_respond_routes_without_an_upstream() {
    let ex = connection::exchange(&seed("connection", "respond-route"));
    assert!(
        ex.client.starts_with(b"HTTP/1.1 403 "),
        "{}",
        ex.client.escape_ascii()
    );
    assert!(ex.upstreams.iter().all(Vec::is_empty));
}

#[test]
fn tls_harness_reaches_the_handshake() {
    // A real ClientHello gets a ServerHello: a handshake record of TLS 1.2 record version.
    let sent = tls_stream::serve(&seed("tls_stream", "hello-tls13"));
    assert!(
        sent.starts_with(b"\x16\x03\x03"),
        "{:?}",
        &sent[..sent.len().min(16)]
    );
    // Plain HTTP on a TLS port gets an alert, or nothing, never a panic.
    let sent = tls_stream::serve(&seed("tls_stream", "plain-http"));
    assert!(sent.is_empty() || sent[0] == 0x15, "{:?}", sent);
}

#[test]
#[should_panic(expected = "invariant test-never-pending broken")]
fn an_invariant_not_listed_as_pending_panics() {
    gateway_fuzz::check::invariant("test-never-pending", false, || "as it should".into());
}
