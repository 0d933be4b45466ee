//! The shared harness for the gateway's integration tests: run the real binary against real
//! sockets and real (sometimes deliberately misbehaving) upstreams, and talk to it in exact
//! bytes.
//!
//! - [`gateway`]: the gateway as a child process, ready when `/ready` says so.
//! - [`config`]: config builders with exactly the contract's keys.
//! - [`origin`]: recording test upstreams and their misbehaving modes.
//! - [`client`]: the raw client (exact bytes out, parsed response in, keep-alive, pipelining).
//! - [`wire`]: strict HTTP/1.1 reading shared by client and origins.
//! - [`nginx`]: the nginx reference front, for differential tests.
//! - [`redis`]: a real redis-server for the fleet-wide limits, killable and stoppable.
//! - [`h2`]: HTTP/2 clients: the `h2` crate behind a synchronous API, and hand-made frames.
//!
//! Everything is synchronous (std::net and threads): simple to reason about, and no async
//! runtime shares a bug with the code under test. Ports always come from port 0; readiness
//! is polled, never slept for.

pub mod adversary;
pub mod client;
pub mod config;
pub mod control;
pub mod gateway;
pub mod h2;
pub mod nginx;
pub mod origin;
pub mod recording;
pub mod redis;
pub mod wire;

use std::path::PathBuf;
use std::time::{Duration, Instant};

pub use client::{Client, Req, Response};
pub use config::{Config, Route, Upstream};
// The port pickers live in the workspace's test kit; re-exported so tests keep their paths.
pub use gateway::Gateway;
pub use gateway_test_support::{free_addr, free_port};
pub use origin::{refused_addr, Action, Framing, Origin, RecordedRequest, Reply};
pub use wire::{pattern_bytes, BodyFraming, CloseOutcome};

/// The workspace root: the parent of this crate's directory.
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The gateway binary: `$GATEWAY_BIN` (set by `cargo xtask test`), else
/// `<workspace>/target/debug/gateway`.
pub fn gateway_bin() -> PathBuf {
    let path = match std::env::var_os("GATEWAY_BIN") {
        Some(p) => PathBuf::from(p),
        None => workspace_root().join("target/debug/gateway"),
    };
    assert!(
        path.is_file(),
        "gateway binary not found at {} — build it first (`cargo build -p gateway`, or run \
         `cargo xtask test`, which does and sets GATEWAY_BIN)",
        path.display()
    );
    path
}

/// Polls `cond` every 20 ms until it holds; panics with `what` after `timeout`.
pub fn wait_until(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A self-signed certificate (ECDSA P-256) and key for `localhost` in `dir`, from the
/// openssl CLI: for TLS listeners.
pub fn self_signed_certificate(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let status = std::process::Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
        .arg("ec_paramgen_curve:prime256v1")
        .args(["-nodes", "-days", "1", "-subj", "/CN=localhost"])
        .args(["-addext", "subjectAltName=DNS:localhost"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(std::process::Stdio::null())
        .status()
        .expect("run openssl");
    assert!(status.success(), "openssl req failed");
    (cert, key)
}
