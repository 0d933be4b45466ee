//! `scale-load`: one process of the scale load ([`gateway_benches::scale`]), so a load
//! larger than one process's descriptor limit runs split over several.
//!
//! ```text
//! scale-load origin
//!     prints "listening ADDR", serves until stdin closes
//! scale-load clients --target ADDR --keepalive N --tunnels N [--probes N]
//!                    [--interval-ms 1000] [--probe-interval-ms 100] [--connect-concurrency 128]
//!     opens every connection (traffic starts at once on each), prints "ramped", waits for a
//!     line on stdin ("measure"), records latencies until the next line ("stop"), then
//!     closes everything and prints one `report ...` line (LoadReport::to_line)
//! ```
//!
//! Both raise their `RLIMIT_NOFILE` soft limit to the hard limit first.

use std::io::BufRead;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use gateway_benches::scale::{raise_nofile_limit, run_origin, spawn_load, Control, LoadSpec};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    raise_nofile_limit();
    match args.first().map(String::as_str) {
        Some("origin") => origin(),
        Some("clients") => clients(&args[1..]),
        _ => usage("first argument: origin or clients"),
    }
}

fn usage(msg: &str) -> ! {
    eprintln!("scale-load: {msg}");
    eprintln!(
        "usage: scale-load origin\n       scale-load clients --target ADDR --keepalive N --tunnels N \
         [--probes N] [--interval-ms MS] [--probe-interval-ms MS] [--connect-concurrency N]"
    );
    std::process::exit(2)
}

fn origin() {
    let std_listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the origin");
    std_listener.set_nonblocking(true).expect("nonblocking");
    println!(
        "listening {}",
        std_listener.local_addr().expect("local addr")
    );
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = stop.clone();
    // Stops when the driver closes stdin (or dies).
    std::thread::spawn(move || {
        for _ in std::io::stdin().lock().lines() {}
        watcher.store(true, Ordering::Relaxed);
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    tokio::task::LocalSet::new().block_on(&rt, async move {
        let listener = tokio::net::TcpListener::from_std(std_listener).expect("listener");
        run_origin(listener, stop).await
    });
}

fn clients(args: &[String]) {
    let mut target = None;
    let mut spec = LoadSpec {
        target: "127.0.0.1:1".parse().expect("address"),
        keepalive: 0,
        tunnels: 0,
        probes: 0,
        interval: Duration::from_secs(1),
        probe_interval: Duration::from_millis(100),
        connect_concurrency: 128,
        op_timeout: Duration::from_secs(10),
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let value = it
            .next()
            .unwrap_or_else(|| usage(&format!("{a} needs a value")));
        let number = || {
            value
                .parse::<u64>()
                .unwrap_or_else(|_| usage(&format!("{a}: not a number")))
        };
        match a.as_str() {
            "--target" => {
                target = Some(
                    value
                        .parse()
                        .unwrap_or_else(|_| usage("--target: not an address")),
                )
            }
            "--keepalive" => spec.keepalive = number() as usize,
            "--tunnels" => spec.tunnels = number() as usize,
            "--probes" => spec.probes = number() as usize,
            "--interval-ms" => spec.interval = Duration::from_millis(number()),
            "--probe-interval-ms" => spec.probe_interval = Duration::from_millis(number()),
            "--connect-concurrency" => spec.connect_concurrency = number() as usize,
            other => usage(&format!("unknown argument {other}")),
        }
    }
    spec.target = target.unwrap_or_else(|| usage("--target is required"));
    let control = Arc::new(Control::default());
    let load = spawn_load(spec, control.clone()).expect("load thread");
    while !control.ramped.load(Ordering::Acquire) {
        std::thread::sleep(Duration::from_millis(20));
    }
    println!("ramped");
    let mut lines = std::io::stdin().lock().lines();
    // "measure", then "stop" (or stdin closed: stop).
    if lines.next().is_some() {
        control.measuring.store(true, Ordering::Relaxed);
        let _ = lines.next();
    }
    control.measuring.store(false, Ordering::Relaxed);
    control.stop.store(true, Ordering::Relaxed);
    let report = load.join().expect("load thread");
    println!("{}", report.to_line());
}
