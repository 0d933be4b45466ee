//! Scale (issue 13), the CI-sized version of `cargo xtask bench --only scale`: 2,000
//! keep-alive clients and 500 WebSocket tunnels held at once on 2 workers, every one of them
//! busy (a request, or a frame echoed by the origin, every 500 ms) for the whole run, with no
//! failure: no refused or reset connection, no non-200 answer, no lost or altered echo, no
//! answer slower than 10 s. The gateway must hold them all at the same time
//! (`gateway_connections_active`) and still answer a fresh connection while they run.
//!
//! The load runs in this process ([`gateway_benches::scale`], 2,600 descriptors here, the
//! gateway ~3,100); the bench runs the full 10,000 + 2,000 split over processes.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gateway_benches::scale::{
    percentiles_ms, raise_nofile_limit, spawn_load, spawn_origin, Control, LoadSpec,
};
use gateway_tests::control::wait_metrics;
use gateway_tests::{Config, Gateway, Route, Upstream};

const KEEPALIVE: usize = 2_000;
const TUNNELS: usize = 500;
const HOLD: Duration = Duration::from_secs(4);

#[test]
fn thousands_of_keepalive_clients_and_tunnels_at_once_on_two_workers_without_a_failure() {
    let nofile = raise_nofile_limit();
    assert!(
        nofile >= 8_192,
        "this test holds ~3,000 descriptors in this process: RLIMIT_NOFILE is {nofile}"
    );
    let stop_origin = Arc::new(AtomicBool::new(false));
    let (origin, origin_thread) = spawn_origin(stop_origin.clone()).expect("origin");
    let config = Config::new()
        .workers(2)
        .log("access", "off")
        .upstream(Upstream::new("app", &[origin]).keepalive(32))
        .route(Route::prefix("/ws", "app").websocket(true))
        .route(Route::prefix("/api/", "app"));
    let gw = Gateway::with(&config);

    let control = Arc::new(Control::default());
    let spec = LoadSpec {
        target: gw.http_addr(),
        keepalive: KEEPALIVE,
        tunnels: TUNNELS,
        probes: 4,
        interval: Duration::from_millis(500),
        probe_interval: Duration::from_millis(50),
        connect_concurrency: 128,
        op_timeout: Duration::from_secs(10),
    };
    let load = spawn_load(spec, control.clone()).expect("load thread");
    let ramp_deadline = Instant::now() + Duration::from_secs(60);
    while !control.ramped.load(Ordering::Acquire) {
        assert!(
            Instant::now() < ramp_deadline,
            "the connections were not all up within 60 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    control.measuring.store(true, Ordering::Relaxed);
    // All of them open at once, counted by the gateway (plus the probes).
    let all = (KEEPALIVE + TUNNELS + 4) as f64;
    wait_metrics(
        gw.admin_addr(),
        Duration::from_secs(10),
        "every client connection open at once",
        |m| m.sum("gateway_connections_active", &[]) >= all,
    );
    // A fresh client is still served while they run.
    assert_eq!(gw.get("/api/small").status, 200);
    std::thread::sleep(HOLD);
    control.measuring.store(false, Ordering::Relaxed);
    control.stop.store(true, Ordering::Relaxed);
    let report = load.join().expect("load thread");
    stop_origin.store(true, Ordering::Relaxed);
    let _ = origin_thread.join();

    assert_eq!(
        report.errors, 0,
        "failures under load (first ones): {:?}",
        report.error_samples
    );
    assert_eq!(report.keepalive_up, KEEPALIVE);
    assert_eq!(report.tunnels_up, TUNNELS);
    // Each connection went round several times while measured: the load really ran.
    assert!(
        report.keepalive_us.len() >= KEEPALIVE * 2,
        "{} keep-alive requests measured",
        report.keepalive_us.len()
    );
    assert!(
        report.tunnel_us.len() >= TUNNELS * 2,
        "{} tunnel echoes measured",
        report.tunnel_us.len()
    );
    let (p50, p99, max) = percentiles_ms(&report.keepalive_us);
    let (t50, t99, tmax) = percentiles_ms(&report.tunnel_us);
    eprintln!(
        "keep-alive p50 {p50:.2} ms p99 {p99:.2} ms max {max:.2} ms; \
         tunnel echo p50 {t50:.2} ms p99 {t99:.2} ms max {tmax:.2} ms"
    );
}
