//! TLS termination seen by a real OpenSSL client (`openssl s_client`): session resumption
//! (TLS 1.3 tickets, TLS 1.2 tickets and session IDs) on every worker and across a reload,
//! and the server's cipher-suite preference (AES-128-GCM first, whatever the client's order).
//!
//! OpenSSL is the client the bench's wrk and most non-browser clients are built on, so these
//! are the handshakes the `tls_new_connection` figure measures.

use gateway_tests::control::admin_request;
use gateway_tests::{Config, Gateway, Origin};
use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};

/// A gateway with 2 workers whose only proxied listener is TLS (ECDSA P-256, `localhost`),
/// in front of an echo origin.
struct TlsGateway {
    gw: Gateway,
    tls: SocketAddr,
    _origin: Origin,
}

fn tls_gateway(dir: &Path) -> TlsGateway {
    let origin = Origin::echo();
    let (cert, key) = gateway_tests::self_signed_certificate(dir);
    let tls = gateway_tests::free_addr();
    let config = Config::proxy_all(&[origin.addr()])
        .workers(2)
        .extra(&format!(
            "[[listener]]\nname = \"https\"\nlisten = \"{tls}\"\n\
             tls = {{ certificates = [{{ cert = {:?}, key = {:?} }}] }}\n",
            cert.display().to_string(),
            key.display().to_string()
        ));
    TlsGateway {
        gw: Gateway::with(&config),
        tls,
        _origin: origin,
    }
}

/// What one `openssl s_client` connection reported.
struct Handshake {
    /// The session summary said "Reused" (an abbreviated handshake), not "New".
    reused: bool,
    /// The negotiated suite, in OpenSSL's naming.
    cipher: String,
    /// The response to our request came back (status line 200).
    answered: bool,
    /// TLS 1.3 session tickets (NewSessionTicket messages) the server sent.
    tickets: usize,
    output: String,
}

/// One connection with `openssl s_client`: `args` (e.g. `-sess_out F`, `-tls1_2`), then one
/// request with `Connection: close`, read to the end (so TLS 1.3 tickets, which follow the
/// handshake, reach `-sess_out`).
fn s_client(addr: SocketAddr, args: &[&str]) -> Handshake {
    let mut child = Command::new("openssl")
        .args(["s_client", "-connect", &addr.to_string()])
        .args(["-servername", "localhost", "-ign_eof"])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run openssl s_client");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"GET /tls HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .unwrap();
    let out = child.wait_with_output().expect("openssl s_client");
    let output =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    // "New, TLSv1.3, Cipher is TLS_AES_128_GCM_SHA256" or "Reused, TLSv1.2, Cipher is ...".
    let summary = output
        .lines()
        .find(|l| l.contains(", Cipher is "))
        .unwrap_or_else(|| panic!("no session summary from s_client:\n{output}"));
    Handshake {
        reused: summary.starts_with("Reused"),
        cipher: summary.rsplit(' ').next().unwrap_or("").to_string(),
        answered: output.contains("HTTP/1.1 200"),
        tickets: output
            .matches("Post-Handshake New Session Ticket arrived")
            .count(),
        output,
    }
}

/// `gateway_tls_handshakes_total{listener="https",result}`.
fn handshakes(gw: &Gateway, result: &str) -> u64 {
    let metrics = gw.admin_get("/metrics").body_str();
    let series = format!("gateway_tls_handshakes_total{{listener=\"https\",result=\"{result}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&series))
        .map_or(0, |v| v.trim().parse().unwrap())
}

/// A client that kept its session resumes it, with TLS 1.3 tickets and with TLS 1.2 tickets
/// and session IDs, on whichever worker accepts the connection: the ticket keys and session
/// cache are shared by the workers. Each worker has its own `SO_REUSEPORT` socket and the
/// kernel hashes the client's port, so 12 reconnections reach both workers except with
/// probability 2⁻¹¹; a worker with keys of its own would fail the first one it took.
#[test]
fn sessions_resume_on_every_worker() {
    let dir = tempfile::tempdir().unwrap();
    let g = tls_gateway(dir.path());
    for (case, version) in [
        ("TLS 1.3 ticket", "-tls1_3"),
        ("TLS 1.2 ticket", "-tls1_2"),
        ("TLS 1.2 session ID", "-no_ticket"),
    ] {
        let session = dir.path().join(format!("{case}.pem"));
        let session = session.to_str().unwrap();
        let mut args = vec![version, "-sess_out", session];
        if version == "-no_ticket" {
            args.push("-tls1_2");
        }
        let first = s_client(g.tls, &args);
        assert!(!first.reused && first.answered, "{case}: {}", first.output);
        let resumed_before = handshakes(&g.gw, "resumed");
        let mut args = vec![version, "-sess_in", session];
        if version == "-no_ticket" {
            args.push("-tls1_2");
        }
        for i in 0..12 {
            let again = s_client(g.tls, &args);
            assert!(again.reused, "{case}, reconnection {i}: {}", again.output);
            assert!(again.answered, "{case}, reconnection {i}: {}", again.output);
        }
        gateway_tests::wait_until(
            std::time::Duration::from_secs(5),
            "the resumed handshakes counted",
            || handshakes(&g.gw, "resumed") >= resumed_before + 12,
        );
    }
}

/// Two TLS 1.3 tickets after a full handshake (a client may open two resumed connections at
/// once), one after a resumed handshake (it replaces the ticket spent), as nginx does; and
/// the ticket from a resumed handshake resumes in turn. The count follows what the
/// ClientHello offers, not what came of it: a ticket a restarted gateway cannot decrypt
/// makes a full handshake that sends one ticket, enough to resume next time.
#[test]
fn tickets_two_after_a_full_handshake_one_after_a_resumed_one() {
    let dir = tempfile::tempdir().unwrap();
    let g = tls_gateway(dir.path());
    let first = dir.path().join("first.pem");
    let chained = dir.path().join("chained.pem");
    let (first, chained) = (first.to_str().unwrap(), chained.to_str().unwrap());
    let full = s_client(g.tls, &["-tls1_3", "-sess_out", first]);
    assert!(!full.reused && full.answered, "{}", full.output);
    assert_eq!(full.tickets, 2, "{}", full.output);
    let resumed = s_client(g.tls, &["-tls1_3", "-sess_in", first, "-sess_out", chained]);
    assert!(resumed.reused && resumed.answered, "{}", resumed.output);
    assert_eq!(resumed.tickets, 1, "{}", resumed.output);
    let again = s_client(g.tls, &["-tls1_3", "-sess_in", chained]);
    assert!(again.reused && again.answered, "{}", again.output);
    assert_eq!(again.tickets, 1, "{}", again.output);
    drop(g);
    let g = tls_gateway(dir.path());
    let fresh = dir.path().join("fresh.pem");
    let fresh = fresh.to_str().unwrap();
    let stale = s_client(g.tls, &["-tls1_3", "-sess_in", chained, "-sess_out", fresh]);
    assert!(!stale.reused && stale.answered, "{}", stale.output);
    assert_eq!(stale.tickets, 1, "{}", stale.output);
    let after = s_client(g.tls, &["-tls1_3", "-sess_in", fresh]);
    assert!(after.reused && after.answered, "{}", after.output);
}

/// A reload keeps the ticket keys and the session cache (`TlsAcceptor::rebuild`), also
/// when the certificate changes: clients resume across it instead of paying for a full
/// handshake each. A restart starts afresh (the keys live in memory only).
#[test]
fn sessions_resume_across_a_reload() {
    let dir = tempfile::tempdir().unwrap();
    let g = tls_gateway(dir.path());
    let session13 = dir.path().join("s13.pem");
    let session12 = dir.path().join("s12.pem");
    let (s13, s12) = (session13.to_str().unwrap(), session12.to_str().unwrap());
    assert!(!s_client(g.tls, &["-tls1_3", "-sess_out", s13]).reused);
    assert!(!s_client(g.tls, &["-tls1_2", "-no_ticket", "-sess_out", s12]).reused);
    // A new certificate (and key) under the same paths, then a reload.
    gateway_tests::self_signed_certificate(dir.path());
    let r = admin_request(g.gw.admin_addr(), "POST", "/reload", None);
    assert_eq!(r.status, 200, "POST /reload: {}", r.body_str());
    let ticket = s_client(g.tls, &["-tls1_3", "-sess_in", s13]);
    assert!(ticket.reused && ticket.answered, "{}", ticket.output);
    let id = s_client(g.tls, &["-tls1_2", "-no_ticket", "-sess_in", s12]);
    assert!(id.reused && id.answered, "{}", id.output);
}

/// The server's order decides the suite: AES-128-GCM, though OpenSSL lists AES-256-GCM
/// first (its SHA-384 key schedule costs more than SHA-256's, see `protocol::tls::provider`);
/// a client that offers only ChaCha20-Poly1305 or only AES-256-GCM still gets it.
#[test]
fn the_server_prefers_aes_128_gcm() {
    let dir = tempfile::tempdir().unwrap();
    let g = tls_gateway(dir.path());
    for (args, cipher) in [
        (&["-tls1_3"][..], "TLS_AES_128_GCM_SHA256"),
        (&["-tls1_2"][..], "ECDHE-ECDSA-AES128-GCM-SHA256"),
        (
            &["-tls1_3", "-ciphersuites", "TLS_CHACHA20_POLY1305_SHA256"][..],
            "TLS_CHACHA20_POLY1305_SHA256",
        ),
        (
            &["-tls1_3", "-ciphersuites", "TLS_AES_256_GCM_SHA384"][..],
            "TLS_AES_256_GCM_SHA384",
        ),
        (
            &["-tls1_2", "-cipher", "ECDHE-ECDSA-CHACHA20-POLY1305"][..],
            "ECDHE-ECDSA-CHACHA20-POLY1305",
        ),
    ] {
        let h = s_client(g.tls, args);
        assert_eq!(h.cipher, cipher, "{args:?}: {}", h.output);
        assert!(h.answered, "{args:?}: {}", h.output);
    }
}

/// TLS 1.3 tickets leave as soon as the client's Finished is in, before any request: a
/// client that leaves Nagle on (Python's `http.client` and many others) sends its request
/// only once its Finished is acknowledged, and a server that sent nothing after the Finished
/// would leave that ACK to the delayed-ACK timer, 40 ms on every new connection (found by
/// the bench's idle TLS client; nginx sends its tickets at once). `s_client` sends nothing
/// here and reports each ticket as it arrives.
#[test]
fn tls13_tickets_arrive_before_the_first_request() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let g = tls_gateway(dir.path());
    // Unbuffered: piped, s_client's output would come only when it exits.
    let mut child = Command::new("stdbuf")
        .args(["-o0", "openssl", "s_client", "-connect", &g.tls.to_string()])
        .args(["-servername", "localhost", "-tls1_3", "-ign_eof"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("run openssl s_client");
    // Held open and never written: no request.
    let _stdin = child.stdin.take();
    let stdout = child.stdout.take().unwrap();
    let (lines, seen) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    // Well inside `header_timeout` (10 s): the close at its end would flush them too.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let mut output = String::new();
    let mut tickets = 0;
    while tickets < 2 {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match seen.recv_timeout(left) {
            Ok(line) => {
                tickets += usize::from(line.contains("Post-Handshake New Session Ticket arrived"));
                output.push_str(&line);
                output.push('\n');
            }
            Err(_) => break,
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(
        tickets, 2,
        "the server's tickets did not come before a request:\n{output}"
    );
}
