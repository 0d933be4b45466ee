//! The Prometheus text exposition of `/metrics`: every worker's published counters merged,
//! with the control plane's own gauges and the process collector's.

use crate::control::Control;
use crate::telemetry::metrics::{
    Histogram, Stats, DURATION_BUCKETS, IO_DRIVER, PROCESS_GENERATION,
};
use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::Ordering;

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// Escapes a label value (Prometheus text format).
fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn histogram(out: &mut String, name: &str, label: &str, value: &str, h: &Histogram) {
    let mut cumulative = 0;
    for (i, bound) in DURATION_BUCKETS.iter().enumerate() {
        cumulative += h.counts[i];
        let _ = writeln!(
            out,
            "{name}_bucket{{{label}=\"{}\",le=\"{bound}\"}} {cumulative}",
            esc(value)
        );
    }
    cumulative += h.counts[DURATION_BUCKETS.len()];
    let _ = writeln!(
        out,
        "{name}_bucket{{{label}=\"{}\",le=\"+Inf\"}} {cumulative}",
        esc(value)
    );
    let _ = writeln!(out, "{name}_sum{{{label}=\"{}\"}} {}", esc(value), h.sum);
    let _ = writeln!(
        out,
        "{name}_count{{{label}=\"{}\"}} {cumulative}",
        esc(value)
    );
}

/// Renders every metric in the Prometheus text format.
pub(crate) fn render(control: &Control) -> String {
    let mut out = String::with_capacity(16 * 1024);
    let workers = control.shared.metrics.collect();
    let snap = control.shared.snapshot();

    let mut requests: BTreeMap<(String, String, u16), u64> = BTreeMap::new();
    let mut route_durations: BTreeMap<String, Histogram> = BTreeMap::new();
    let mut upstream_durations: BTreeMap<String, Histogram> = BTreeMap::new();
    let mut upstream_errors: BTreeMap<(String, &'static str), u64> = BTreeMap::new();
    let mut upstream_active: BTreeMap<String, (i64, i64)> = BTreeMap::new();
    let mut listeners: BTreeMap<String, (u64, i64)> = BTreeMap::new();
    let mut tunnels_active = 0;
    let mut tunnel_bytes = [0u64; 2];
    let mut tunnel_paths: BTreeMap<&'static str, u64> = BTreeMap::new();
    let mut body_splices = [0u64; 2];
    let mut limits: BTreeMap<(&'static str, &'static str), u64> = BTreeMap::new();
    let mut tls: BTreeMap<(String, &'static str), u64> = BTreeMap::new();
    let mut h2: BTreeMap<String, (i64, u64, [u64; 2])> = BTreeMap::new();
    let mut h2_goaways: BTreeMap<(String, &'static str), u64> = BTreeMap::new();
    let mut tls_durations: BTreeMap<String, Histogram> = BTreeMap::new();
    for u in &snap.upstreams {
        upstream_active.entry(u.name.clone()).or_default();
    }
    for l in &snap.listeners {
        listeners.entry(l.name.clone()).or_default();
    }
    for (_, s) in &workers {
        for (route, r) in &s.routes {
            for (listener, status, n) in &r.requests {
                *requests
                    .entry((listener.to_string(), route.to_string(), *status))
                    .or_default() += n;
            }
            route_durations
                .entry(route.to_string())
                .or_default()
                .merge(&r.duration);
        }
        for (name, u) in &s.upstreams {
            upstream_durations
                .entry(name.to_string())
                .or_default()
                .merge(&u.duration);
            for (kind, n) in &u.errors {
                *upstream_errors.entry((name.to_string(), kind)).or_default() += n;
            }
            let a = upstream_active.entry(name.to_string()).or_default();
            a.0 += u.active;
            a.1 += u.idle;
        }
        for (name, l) in &s.listeners {
            let e = listeners.entry(name.to_string()).or_default();
            e.0 += l.total;
            e.1 += l.active;
            let h = h2.entry(name.to_string()).or_default();
            h.0 += l.h2_active;
            h.1 += l.h2_streams;
            h.2[0] += l.h2_resets[0];
            h.2[1] += l.h2_resets[1];
            for (reason, n) in &l.h2_goaways {
                *h2_goaways.entry((name.to_string(), reason)).or_default() += n;
            }
        }
        tunnels_active += s.tunnels_active;
        tunnel_bytes[0] += s.tunnel_bytes[0];
        tunnel_bytes[1] += s.tunnel_bytes[1];
        for (path, n) in &s.tunnel_paths {
            *tunnel_paths.entry(path).or_default() += n;
        }
        body_splices[0] += s.body_splices[0];
        body_splices[1] += s.body_splices[1];
        for (listener, result, n) in &s.tls_handshakes {
            *tls.entry((listener.to_string(), result)).or_default() += n;
        }
        for (listener, h) in &s.tls_handshake_duration {
            tls_durations
                .entry(listener.to_string())
                .or_default()
                .merge(h);
        }
        for (limit, enforcer, n) in &s.limit_rejections {
            *limits.entry((limit, enforcer)).or_default() += n;
        }
    }
    for (limit, n) in control.xdp_rejections() {
        *limits
            .entry((limit, crate::policy::limits::ENFORCER_XDP))
            .or_default() += n;
    }

    header(
        &mut out,
        "gateway_http_requests_total",
        "counter",
        "HTTP requests answered, by listener, route and status.",
    );
    for ((listener, route, status), n) in &requests {
        let _ = writeln!(
            out,
            "gateway_http_requests_total{{listener=\"{}\",route=\"{}\",status=\"{status}\"}} {n}",
            esc(listener),
            esc(route)
        );
    }
    header(
        &mut out,
        "gateway_http_request_duration_seconds",
        "histogram",
        "Time from the first byte of a request to the end of its response, by route.",
    );
    for (route, h) in &route_durations {
        histogram(
            &mut out,
            "gateway_http_request_duration_seconds",
            "route",
            route,
            h,
        );
    }
    header(
        &mut out,
        "gateway_upstream_request_duration_seconds",
        "histogram",
        "Time from choosing an upstream server to the end of its response head, by upstream.",
    );
    for (name, h) in &upstream_durations {
        histogram(
            &mut out,
            "gateway_upstream_request_duration_seconds",
            "upstream",
            name,
            h,
        );
    }
    header(
        &mut out,
        "gateway_connections_active",
        "gauge",
        "Client connections open, by listener.",
    );
    for (name, (_, active)) in &listeners {
        let _ = writeln!(
            out,
            "gateway_connections_active{{listener=\"{}\"}} {active}",
            esc(name)
        );
    }
    header(
        &mut out,
        "gateway_connections_total",
        "counter",
        "Client connections accepted, by listener.",
    );
    for (name, (total, _)) in &listeners {
        let _ = writeln!(
            out,
            "gateway_connections_total{{listener=\"{}\"}} {total}",
            esc(name)
        );
    }
    header(
        &mut out,
        "gateway_upstream_connections_active",
        "gauge",
        "Upstream connections carrying a request, by upstream.",
    );
    for (name, (active, _)) in &upstream_active {
        let _ = writeln!(
            out,
            "gateway_upstream_connections_active{{upstream=\"{}\"}} {active}",
            esc(name)
        );
    }
    header(
        &mut out,
        "gateway_upstream_connections_idle",
        "gauge",
        "Idle keep-alive upstream connections held, by upstream.",
    );
    for (name, (_, idle)) in &upstream_active {
        let _ = writeln!(
            out,
            "gateway_upstream_connections_idle{{upstream=\"{}\"}} {idle}",
            esc(name)
        );
    }
    header(
        &mut out,
        "gateway_upstream_server_up",
        "gauge",
        "1 when an upstream server takes requests (passive and active health).",
    );
    let now = crate::util::clock::now_ms();
    for u in &snap.upstreams {
        for s in &u.servers {
            let _ = writeln!(
                out,
                "gateway_upstream_server_up{{upstream=\"{}\",server=\"{}\"}} {}",
                esc(&u.name),
                esc(&s.label),
                u8::from(s.state.is_up(now))
            );
        }
    }
    header(
        &mut out,
        "gateway_upstream_dns_addresses",
        "gauge",
        "Servers an upstream has now: its IP literals plus the addresses its names resolved to.",
    );
    for u in &snap.upstreams {
        let _ = writeln!(
            out,
            "gateway_upstream_dns_addresses{{upstream=\"{}\"}} {}",
            esc(&u.name),
            u.servers.len()
        );
    }
    control.dns.render(&mut out);
    header(
        &mut out,
        "gateway_upstream_errors_total",
        "counter",
        "Upstream failures by upstream and kind (failed, timeout, protocol, unavailable).",
    );
    for ((name, kind), n) in &upstream_errors {
        let _ = writeln!(
            out,
            "gateway_upstream_errors_total{{upstream=\"{}\",kind=\"{kind}\"}} {n}",
            esc(name)
        );
    }
    header(
        &mut out,
        "gateway_websocket_tunnels_active",
        "gauge",
        "WebSocket tunnels open.",
    );
    let _ = writeln!(out, "gateway_websocket_tunnels_active {tunnels_active}");
    header(
        &mut out,
        "gateway_tunnel_bytes_total",
        "counter",
        "Bytes relayed through tunnels, by direction.",
    );
    let _ = writeln!(
        out,
        "gateway_tunnel_bytes_total{{direction=\"upstream\"}} {}",
        tunnel_bytes[0]
    );
    let _ = writeln!(
        out,
        "gateway_tunnel_bytes_total{{direction=\"client\"}} {}",
        tunnel_bytes[1]
    );
    header(
        &mut out,
        "gateway_tunnels_total",
        "counter",
        "Tunnels opened, by path (splice, copy, or h2: WebSocket over HTTP/2).",
    );
    for (path, n) in &tunnel_paths {
        let _ = writeln!(out, "gateway_tunnels_total{{path=\"{path}\"}} {n}");
    }
    header(
        &mut out,
        "gateway_body_splice_total",
        "counter",
        "HTTP/1 bodies moved (at least in part) with splice(2), by direction.",
    );
    for (direction, n) in ["request", "response"].iter().zip(body_splices) {
        let _ = writeln!(
            out,
            "gateway_body_splice_total{{direction=\"{direction}\"}} {n}"
        );
    }
    header(
        &mut out,
        "gateway_limit_rejections_total",
        "counter",
        "Connections or requests refused by a limit, by limit and enforcer.",
    );
    for ((limit, enforcer), n) in &limits {
        let _ = writeln!(
            out,
            "gateway_limit_rejections_total{{limit=\"{limit}\",enforcer=\"{enforcer}\"}} {n}"
        );
    }
    // One sample per worker: (name, type, help, the value as text).
    type PerWorker = (
        &'static str,
        &'static str,
        &'static str,
        fn(&Stats) -> String,
    );
    let per_worker: [PerWorker; 3] = [
        (
            "gateway_worker_busy_ratio",
            "gauge",
            "Share of the last second a worker spent running rather than waiting on its ring.",
            |s| format!("{:.4}", s.busy_ratio),
        ),
        (
            "gateway_connections_parked",
            "gauge",
            "Idle keep-alive connections waiting in a worker's parking lot, with no task (counted in gateway_connections_active too).",
            |s| s.parked_connections.to_string(),
        ),
        (
            "gateway_connections_parks_total",
            "counter",
            "Times an idle keep-alive connection left its task for a worker's parking lot.",
            |s| s.parks.to_string(),
        ),
    ];
    for (name, kind, help, value) in per_worker {
        header(&mut out, name, kind, help);
        for (id, s) in &workers {
            let _ = writeln!(out, "{name}{{worker=\"{id}\"}} {}", value(s));
        }
    }
    render_http2(&mut out, &h2, &h2_goaways);
    header(&mut out, "gateway_tls_handshakes_total", "counter", "TLS handshakes by listener and result (full, resumed, timeout, protocol_error, client_gone).");
    for ((listener, result), n) in &tls {
        let _ = writeln!(
            out,
            "gateway_tls_handshakes_total{{listener=\"{}\",result=\"{result}\"}} {n}",
            esc(listener)
        );
    }
    header(
        &mut out,
        "gateway_tls_handshake_duration_seconds",
        "histogram",
        "Duration of successful TLS handshakes, by listener.",
    );
    for (listener, h) in &tls_durations {
        histogram(
            &mut out,
            "gateway_tls_handshake_duration_seconds",
            "listener",
            listener,
            h,
        );
    }
    header(
        &mut out,
        "gateway_process_generation",
        "gauge",
        "This process's generation: 1 at a plain start, one more at each binary upgrade.",
    );
    let _ = writeln!(
        out,
        "gateway_process_generation {}",
        PROCESS_GENERATION.load(Ordering::Relaxed)
    );
    header(
        &mut out,
        "gateway_io_driver",
        "gauge",
        "The data plane's I/O driver (1 = in use).",
    );
    for driver in ["io_uring", "epoll"] {
        let on = IO_DRIVER.get().is_some_and(|d| *d == driver);
        let _ = writeln!(
            out,
            "gateway_io_driver{{driver=\"{driver}\"}} {}",
            u8::from(on)
        );
    }
    header(
        &mut out,
        "gateway_config_reloads_total",
        "counter",
        "Config reloads by result.",
    );
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
    control.render_xdp(&mut out);
    crate::util::budget::render(&mut out);
    crate::telemetry::render_log_drops(&mut out);
    control.render_ops(&mut out);
    control.global_sync.render(control, &mut out);
    header(
        &mut out,
        "gateway_global_limit_sync_seconds",
        "histogram",
        "Round trips of the [limits.global] sync to Redis.",
    );
    histogram(
        &mut out,
        "gateway_global_limit_sync_seconds",
        "op",
        "sync",
        &control
            .global_sync
            .latency
            .lock()
            .unwrap_or_else(|e| e.into_inner()),
    );
    render_process(&mut out);
    out
}

fn render_process(out: &mut String) {
    use prometheus::Encoder;
    let registry = prometheus::Registry::new();
    let _ = registry.register(Box::new(
        prometheus::process_collector::ProcessCollector::for_self(),
    ));
    let mut buf = Vec::new();
    if prometheus::TextEncoder::new()
        .encode(&registry.gather(), &mut buf)
        .is_ok()
    {
        out.push_str(&String::from_utf8_lossy(&buf));
    }
}

/// CPU time of the calling thread, for the busy ratio.
/// The `gateway_http2_*` family: what is HTTP/2-specific (requests themselves are counted
/// in `gateway_http_requests_total` whatever the protocol).
fn render_http2(
    out: &mut String,
    h2: &BTreeMap<String, (i64, u64, [u64; 2])>,
    goaways: &BTreeMap<(String, &'static str), u64>,
) {
    header(
        out,
        "gateway_http2_connections_active",
        "gauge",
        "HTTP/2 client connections open, by listener.",
    );
    for (listener, (active, _, _)) in h2 {
        let _ = writeln!(
            out,
            "gateway_http2_connections_active{{listener=\"{}\"}} {active}",
            esc(listener)
        );
    }
    header(
        out,
        "gateway_http2_streams_total",
        "counter",
        "HTTP/2 streams accepted, by listener.",
    );
    for (listener, (_, streams, _)) in h2 {
        let _ = writeln!(
            out,
            "gateway_http2_streams_total{{listener=\"{}\"}} {streams}",
            esc(listener)
        );
    }
    header(out, "gateway_http2_resets_total", "counter", "RST_STREAM frames, by listener and direction (received: the client reset a stream; sent: the gateway did).");
    for (listener, (_, _, resets)) in h2 {
        for (direction, n) in [("received", resets[0]), ("sent", resets[1])] {
            let _ = writeln!(
                out,
                "gateway_http2_resets_total{{listener=\"{}\",direction=\"{direction}\"}} {n}",
                esc(listener)
            );
        }
    }
    header(out, "gateway_http2_goaways_total", "counter", "GOAWAY frames sent, by listener and reason (drain, reload, max_requests, idle, flood, error).");
    for ((listener, reason), n) in goaways {
        let _ = writeln!(
            out,
            "gateway_http2_goaways_total{{listener=\"{}\",reason=\"{reason}\"}} {n}",
            esc(listener)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets() {
        let mut h = Histogram::default();
        h.observe(0.00005);
        h.observe(0.0003);
        h.observe(1000.0);
        let mut out = String::new();
        histogram(&mut out, "x", "route", "/a", &h);
        assert!(
            out.contains("x_bucket{route=\"/a\",le=\"0.0001\"} 1\n"),
            "{out}"
        );
        assert!(
            out.contains("x_bucket{route=\"/a\",le=\"0.0005\"} 2\n"),
            "{out}"
        );
        assert!(
            out.contains("x_bucket{route=\"/a\",le=\"300\"} 2\n"),
            "{out}"
        );
        assert!(
            out.contains("x_bucket{route=\"/a\",le=\"+Inf\"} 3\n"),
            "{out}"
        );
        assert!(out.contains("x_count{route=\"/a\"} 3\n"), "{out}");
    }
}
