//! The I/O driver the gateway runs is the one asked for: `cargo xtask test` runs the data
//! plane suites once on io_uring and once on epoll, and this proves each pass really used
//! the driver it claims (`gateway_io_driver` in /metrics).

use gateway_tests::config::Config;
use gateway_tests::gateway::Gateway;

#[test]
fn metrics_name_the_driver_in_use() {
    let gw = Gateway::with(&Config::new());
    let want = std::env::var("GATEWAY_TEST_IO").unwrap_or_else(|_| "uring".into());
    let want = if want == "uring" || want == "auto" {
        "io_uring"
    } else {
        "epoll"
    };
    let metrics = gw.admin_get("/metrics").body_str();
    let line = format!("gateway_io_driver{{driver=\"{want}\"}} 1");
    assert!(
        metrics.lines().any(|l| l == line),
        "expected {line:?} in:\n{metrics}"
    );
}

#[test]
fn explicit_epoll_serves_requests() {
    let origin = gateway_tests::origin::Origin::echo();
    let gw = Gateway::with(&Config::proxy_all(&[origin.addr()]).server_raw("io", "\"epoll\""));
    let resp = gw.get("/hello");
    assert_eq!(resp.status, 200);
    let metrics = gw.admin_get("/metrics").body_str();
    assert!(
        metrics.contains("gateway_io_driver{driver=\"epoll\"} 1"),
        "{metrics}"
    );
}
