//! Issue 17 item 3, against the real binary: with the XDP guard attached to one interface,
//! connections that arrive on another (`lo` here, standing for a second NIC, a bond member
//! or a tunnel) are still charged `conn_rate`, in user space at accept. Before, user space
//! skipped `conn_rate` whenever the program was attached, so such clients were never rate
//! limited. The veth-level proof (a second link without the program) is
//! `gateway/tests/xdp_guard.rs::veth_conn_rate_is_charged_for_connections_on_an_interface_without_the_program`.
//!
//! Needs root (attaching XDP): not root, it is skipped with a SKIPPED line on stderr,
//! unless `CI=true`, where that is a failure. The veth pair it attaches to (the test kit's
//! rig) is created and deleted by the test; no traffic crosses it: it only hosts the program.

use gateway_test_support::{privileged, PinDir, VethPair};
use gateway_tests::client::Client;
use gateway_tests::control::scrape;
use gateway_tests::{wait_until, Config, Gateway, Origin};
use std::net::IpAddr;
use std::time::Duration;

/// One request on a new connection from `source`; `None` when the gateway closed it at
/// accept (refused) instead of answering.
fn status_from(gw: &Gateway, source: &str) -> Option<u16> {
    let source: IpAddr = source.parse().unwrap();
    let mut c = Client::connect_from(source, gw.http_addr());
    c.send(b"GET /x HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
        .ok()?;
    c.read_response().ok().map(|r| r.status)
}

#[test]
fn conn_rate_is_charged_on_lo_while_xdp_guards_another_interface() {
    if !privileged(
        "conn_rate_is_charged_on_lo_while_xdp_guards_another_interface",
        "CAP_BPF, CAP_NET_ADMIN",
    ) {
        return;
    }
    let veth = VethPair::create();
    // Declared before the gateway, so it is dropped (the pins removed) after it stops.
    let pin = PinDir::new("gateway-test-xdp-unguarded");
    let origin = Origin::named("api");
    let config = Config::proxy_all(&[origin.addr()])
        .workers(1)
        .extra(&format!(
            "[limits]\nconn_rate = \"0.05/s\"\nconn_burst = 3\n\n\
         [xdp]\nmode = \"generic\"\ninterface = \"{}\"\npin_path = \"{}\"\n",
            veth.host_if,
            pin.path().display()
        ));
    let gw = Gateway::with(&config);
    // The program is attached (the gateway would not start otherwise in generic mode).
    assert!(
        scrape(gw.admin_addr()).has_family("gateway_xdp_packets_total"),
        "no XDP metrics: {}",
        gw.stderr()
    );
    for i in 0..3 {
        assert_eq!(
            status_from(&gw, "127.0.0.21"),
            Some(200),
            "connection {i} is within the burst"
        );
    }
    assert_eq!(
        status_from(&gw, "127.0.0.21"),
        None,
        "a fourth connection over lo, where no program charged it, must be refused"
    );
    // Another source has its own bucket.
    assert_eq!(status_from(&gw, "127.0.0.22"), Some(200));
    wait_until(Duration::from_secs(5), "the refusal in the metrics", || {
        scrape(gw.admin_addr())
            .get(
                "gateway_limit_rejections_total",
                &[("limit", "conn_rate"), ("enforcer", "userspace")],
            )
            .is_some_and(|n| n >= 1.0)
    });
}
