//! Prometheus exposition of the gateway's state, rendered when `/metrics` is scraped.

use crate::control::Control;
use std::fmt::Write;
use std::sync::atomic::Ordering;

pub fn render(control: &Control) -> String {
    let mut out = String::new();
    let shared = &control.shared;
    let snap = shared.snapshot();
    let _ = writeln!(
        out,
        "# HELP gateway_connections_active Client connections open."
    );
    let _ = writeln!(out, "# TYPE gateway_connections_active gauge");
    let _ = writeln!(
        out,
        "gateway_connections_active {}",
        shared.connections.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "# HELP gateway_upstream_server_up Whether an upstream server is taking requests."
    );
    let _ = writeln!(out, "# TYPE gateway_upstream_server_up gauge");
    let now = crate::clock::now_ms();
    for u in &snap.upstreams {
        for s in &u.servers {
            let _ = writeln!(
                out,
                "gateway_upstream_server_up{{upstream=\"{}\",server=\"{}\"}} {}",
                u.name,
                s.label,
                u8::from(s.state.is_up(now))
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP gateway_config_reloads_total Config reloads by result."
    );
    let _ = writeln!(out, "# TYPE gateway_config_reloads_total counter");
    let _ = writeln!(
        out,
        "gateway_config_reloads_total{{result=\"success\"}} {}",
        control.reloads_ok.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "gateway_config_reloads_total{{result=\"error\"}} {}",
        control.reloads_failed.load(Ordering::Relaxed)
    );
    out
}
