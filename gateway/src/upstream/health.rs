//! Active health checks: a control-plane thread per checked upstream sends
//! `GET <path>` to each server every `interval`; a 2xx or 3xx within `timeout` is up.
//! Workers only read the result (an atomic per server).

use super::Upstream;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Stops its checker thread when dropped (on reload or shutdown).
pub struct Checker {
    stop: Arc<AtomicBool>,
    pub(crate) upstream_id: u64,
}

impl Drop for Checker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

pub fn spawn(upstream: Arc<Upstream>) -> Option<Checker> {
    let check = upstream.health_check.clone()?;
    let stop = Arc::new(AtomicBool::new(false));
    let stop_thread = stop.clone();
    let upstream_id = upstream.id;
    std::thread::Builder::new()
        .name(format!("health-{}", upstream.name))
        .spawn(move || {
            while !stop_thread.load(Ordering::Relaxed) {
                let round = Instant::now();
                for server in &upstream.servers {
                    let healthy = probe(server.addr, &server.authority, &check.path, check.timeout.0);
                    if !healthy && server.state.is_up(crate::util::clock::now_ms()) {
                        tracing::warn!(upstream = %upstream.name, server = %server.label, "health check failed: server marked down");
                    }
                    server.state.set_check_result(healthy);
                }
                while round.elapsed() < check.interval.0 && !stop_thread.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(50).min(check.interval.0));
                }
            }
        })
        .ok()?;
    Some(Checker { stop, upstream_id })
}

fn probe(addr: std::net::SocketAddr, host: &str, path: &str, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, timeout) else {
        return false;
    };
    let left = || {
        deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1))
    };
    let _ = stream.set_write_timeout(Some(left()));
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: gateway-health-check\r\nConnection: close\r\n\r\n"
    );
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut buf = [0u8; 64];
    let mut got = 0;
    while got < 12 {
        let _ = stream.set_read_timeout(Some(left()));
        match stream.read(&mut buf[got..]) {
            Ok(0) | Err(_) => return false,
            Ok(n) => got += n,
        }
    }
    // "HTTP/1.1 200"
    let status = std::str::from_utf8(&buf[9..12])
        .ok()
        .and_then(|s| s.parse::<u16>().ok());
    buf.starts_with(b"HTTP/1.") && matches!(status, Some(200..=399))
}
