//! Binary upgrade (`gateway run --upgrade`): a new process takes the listening sockets
//! over through `server.upgrade_socket` while the old one drains.
//!
//! Under load: keep-alive request loops and 100 WebSocket tunnels (ten opened on each
//! generation) run while the binary is upgraded 10 times, alternating between two copies
//! of the binary (`gateway-a`, `gateway-b`: which one serves is checked through
//! `/proc/<pid>/exe`). No request fails, every tunnel echoes until the test closes it
//! (`graceful_timeout` outlasts the test), every old process exits 0, and the access log
//! has a line for every request answered. Run on io_uring and on epoll.
//!
//! The io_uring run is the privileged one (we are root): the listener is on the host end
//! of a veth pair, the clients in its namespace, and the XDP guard (generic mode, maps
//! pinned) on the host end. Across the upgrades a program stays attached at every sample,
//! each generation's program replaces the last on the same link (a new program id), and
//! the verdict counters never go back.
//!
//! Failure: a new config that does not load, a new process that dies right after it
//! received the sockets, and one run by another user (refused by its uid, whatever the
//! socket file's mode), leave the old process serving (same generation, keep-alive
//! connections untouched), and a later upgrade still works (and tells systemd its pid).
//!
//! Starting it: `--upgrade-if-running` takes over when a gateway listens on the socket and
//! starts afresh when none does; SIGUSR2 makes the running gateway start its binary with
//! `--upgrade` itself (the systemd procedure).

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use gateway_test_support::{enter_netns, free_port_on, PinDir, VethPair};
use gateway_tests::control::scrape;
use gateway_tests::gateway::admin_ready_generation;
use gateway_tests::{
    gateway_bin, wait_until, Client, Config, Gateway, Origin, Req, Route, Upstream,
};
use tungstenite::Message;

const UPGRADES: u64 = 10;
const TUNNELS_PER_GENERATION: usize = 10;
const REQUEST_LOOPS: usize = 4;
const FRESH_CONNECTION_LOOPS: usize = 2;

/// A WebSocket echo origin (tungstenite, a thread per connection).
fn ws_origin() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            thread::spawn(move || {
                let Ok(mut ws) = tungstenite::accept(stream) else {
                    return;
                };
                while let Ok(m) = ws.read() {
                    if (m.is_text() || m.is_binary()) && ws.send(m).is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

fn config(socket: &Path, io: &str) -> Config {
    let http = Origin::echo();
    let ws = ws_origin();
    let config = Config::new()
        .server("upgrade_socket", socket.to_str().unwrap())
        .server("io", io)
        // Longer than the test: every tunnel must be served until the test ends it.
        .server("graceful_timeout", "120s")
        .upstream(Upstream::new("http", &[http.addr()]))
        .upstream(Upstream::new("ws", &[ws]))
        .route(Route::prefix("/ws", "ws").websocket(true))
        .route(Route::prefix("/", "http"));
    // The origin lives as long as the test process (a leaked thread per connection).
    std::mem::forget(http);
    config
}

/// Two copies of the binary, so alternate upgrades run a different file.
fn two_builds(dir: &Path) -> [PathBuf; 2] {
    ["gateway-a", "gateway-b"].map(|name| {
        let path = dir.join(name);
        std::fs::copy(gateway_bin(), &path).unwrap();
        path
    })
}

/// Requests answered 200, and requests that failed in any way: an error status, a reset,
/// or a keep-alive connection closed under a request (which a client would have to retry,
/// RFC 9112 §9.3.1: the draining process must not close one it did not announce closing).
#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    failed: AtomicU64,
}

/// Keep-alive GETs in a loop until `stop`; reconnects after `Connection: close`.
fn request_loop(addr: SocketAddr, netns: Option<String>, stop: Arc<AtomicBool>, tally: Arc<Tally>) {
    if let Some(ns) = netns {
        enter_netns(&ns).unwrap();
    }
    let mut client = Client::connect(addr);
    while !stop.load(Ordering::Relaxed) {
        match client.request(&Req::get("/ka")) {
            Ok(r) if r.status == 200 => {
                tally.ok.fetch_add(1, Ordering::Relaxed);
                if r.says_close() {
                    client = Client::connect(addr);
                }
            }
            failed => {
                eprintln!("request failed: {:?}", failed.map(|r| r.status));
                tally.failed.fetch_add(1, Ordering::Relaxed);
                client = Client::connect(addr);
            }
        }
    }
}

/// A fresh connection per request (`Connection: close`) in a loop until `stop`: every one
/// must be answered 200, none reset or closed unanswered. A connection the kernel queued
/// on a socket the old process still held as it stopped accepting (an io_uring accept
/// left pending in it, then closed unserved as it exited) would show here as a reset.
fn fresh_connection_loop(
    addr: SocketAddr,
    netns: Option<String>,
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
) {
    use std::io::{Read, Write};
    if let Some(ns) = netns {
        enter_netns(&ns).unwrap();
    }
    while !stop.load(Ordering::Relaxed) {
        let answered = TcpStream::connect(addr).and_then(|mut s| {
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            s.write_all(b"GET /fresh HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")?;
            let mut response = Vec::new();
            s.read_to_end(&mut response)?;
            Ok(response)
        });
        match answered {
            Ok(r) if r.starts_with(b"HTTP/1.1 200") => {
                tally.ok.fetch_add(1, Ordering::Relaxed);
            }
            failed => {
                eprintln!(
                    "fresh connection failed: {:?}",
                    failed.map(|r| String::from_utf8_lossy(&r[..r.len().min(40)]).into_owned())
                );
                tally.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// A tunnel echoing a numbered message every 20 ms until `stop`; returns the number of
/// messages echoed, or what went wrong.
fn tunnel(
    addr: SocketAddr,
    netns: Option<String>,
    stop: Arc<AtomicBool>,
    echoing: Arc<AtomicU64>,
) -> Result<u64, String> {
    if let Some(ns) = netns {
        enter_netns(&ns).map_err(|e| format!("netns: {e}"))?;
    }
    let stream = TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let (mut ws, _) = tungstenite::client(format!("ws://{addr}/ws"), stream)
        .map_err(|e| format!("handshake: {e}"))?;
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let text = format!("message {n}");
        ws.send(Message::text(text.clone()))
            .map_err(|e| format!("send {n}: {e}"))?;
        match ws.read().map_err(|e| format!("read {n}: {e}"))? {
            Message::Text(t) if t == text => {
                if n == 0 {
                    echoing.fetch_add(1, Ordering::SeqCst);
                }
                n += 1
            }
            other => return Err(format!("echo {n}: {other:?}")),
        }
        thread::sleep(Duration::from_millis(20));
    }
    let _ = ws.close(None);
    let _ = ws.flush();
    Ok(n)
}

fn exe_of(pid: u32) -> PathBuf {
    std::fs::read_link(format!("/proc/{pid}/exe")).unwrap()
}

/// The XDP part: the veth pair, its pin dir, and a sampler of the program on the link.
struct XdpRig {
    veth: Arc<VethPair>,
    _pin: PinDir,
    /// Samples of `ip link`'s XDP program id, every 20 ms until `stop`: a `None` would be
    /// a moment the interface had no program.
    sampler: thread::JoinHandle<Vec<Option<u32>>>,
}

fn xdp_packets(gw: &Gateway) -> f64 {
    scrape(gw.admin_addr()).sum("gateway_xdp_packets_total", &[])
}

fn upgrade_under_load(io: &str, with_xdp: bool) {
    let socket_dir = tempfile::tempdir().unwrap();
    let socket = socket_dir.path().join("upgrade.sock");
    let builds = two_builds(socket_dir.path());
    let stop = Arc::new(AtomicBool::new(false));
    let mut config = config(&socket, io);
    let rig = with_xdp.then(|| {
        let veth = Arc::new(VethPair::create());
        let pin = PinDir::new(&format!("gateway-test-upgrade-{io}"));
        config.http_addr = SocketAddr::new(veth.host4.into(), free_port_on(veth.host4.into()));
        config = config.clone().extra(&format!(
            "[xdp]\nmode = \"generic\"\ninterface = \"{}\"\npin_path = \"{}\"\n",
            veth.host_if,
            pin.path().display()
        ));
        (veth, pin)
    });
    let mut gw = Gateway::with(&config);
    // From the first start on, every sample must find a program on the interface.
    let rig = rig.map(|(veth, pin)| {
        let (v, stop) = (veth.clone(), stop.clone());
        let sampler = thread::spawn(move || {
            let mut samples = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                samples.push(v.attached_xdp().map(|(_, id)| id));
                thread::sleep(Duration::from_millis(20));
            }
            samples
        });
        XdpRig {
            veth,
            _pin: pin,
            sampler,
        }
    });
    let netns = rig.as_ref().map(|r| r.veth.netns.clone());
    let addr = gw.http_addr();
    let tally = Arc::new(Tally::default());
    type Loop = fn(SocketAddr, Option<String>, Arc<AtomicBool>, Arc<Tally>);
    let spawn_loops = |count: usize, client: Loop, tally: &Arc<Tally>| -> Vec<_> {
        (0..count)
            .map(|_| {
                let (stop, tally, netns) = (stop.clone(), tally.clone(), netns.clone());
                thread::spawn(move || client(addr, netns, stop, tally))
            })
            .collect()
    };
    let loops = spawn_loops(REQUEST_LOOPS, request_loop, &tally);
    let fresh = Arc::new(Tally::default());
    let fresh_loops = spawn_loops(FRESH_CONNECTION_LOOPS, fresh_connection_loop, &fresh);
    let mut program_ids = Vec::new();
    let mut packets = Vec::new();
    let mut tunnels = Vec::new();
    let echoing = Arc::new(AtomicU64::new(0));
    let mut retired = Vec::new();
    let started = Instant::now();
    for generation in 1..=UPGRADES + 1 {
        for _ in 0..TUNNELS_PER_GENERATION {
            let (stop, netns, echoing) = (stop.clone(), netns.clone(), echoing.clone());
            tunnels.push(thread::spawn(move || tunnel(addr, netns, stop, echoing)));
        }
        // Every tunnel is open and echoing before the next upgrade.
        wait_until(Duration::from_secs(30), "every tunnel echoing", || {
            echoing.load(Ordering::SeqCst) == tunnels.len() as u64
        });
        // Let every loop and tunnel make progress on this generation first.
        let before = tally.ok.load(Ordering::Relaxed);
        wait_until(
            Duration::from_secs(20),
            "requests on this generation",
            || tally.ok.load(Ordering::Relaxed) >= before + 20,
        );
        let fresh_before = fresh.ok.load(Ordering::Relaxed);
        wait_until(
            Duration::from_secs(20),
            "fresh connections on this generation",
            || fresh.ok.load(Ordering::Relaxed) >= fresh_before + 20,
        );
        if let Some(rig) = &rig {
            program_ids.push(rig.veth.attached_xdp().map(|(_, id)| id));
            packets.push(xdp_packets(&gw));
        }
        if generation == UPGRADES + 1 {
            break;
        }
        let build = &builds[(generation % 2) as usize];
        let new = gw.spawn_upgrade(build, gw.config_path(), &[]);
        retired.push(gw.adopt(new, generation + 1));
        assert_eq!(
            &exe_of(gw.pid()),
            build,
            "generation {} runs {}",
            generation + 1,
            build.display()
        );
    }
    stop.store(true, Ordering::SeqCst);
    for l in loops.into_iter().chain(fresh_loops) {
        l.join().unwrap();
    }
    let mut echoed = 0;
    for (i, t) in tunnels.into_iter().enumerate() {
        match t.join().unwrap() {
            Ok(n) => {
                assert!(n > 0, "tunnel {i} echoed nothing");
                echoed += n;
            }
            Err(e) => panic!(
                "tunnel {i} (generation {}): {e}",
                i / TUNNELS_PER_GENERATION + 1
            ),
        }
    }
    // With their tunnels closed, every old process finishes its drain and exits 0.
    for (i, mut old) in retired.into_iter().enumerate() {
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(s) = old.try_wait().unwrap() {
                break s;
            }
            assert!(
                Instant::now() < deadline,
                "generation {} still running",
                i + 1
            );
            thread::sleep(Duration::from_millis(20));
        };
        assert!(status.success(), "generation {} exited {status}", i + 1);
    }
    let (ok, failed) = (
        tally.ok.load(Ordering::SeqCst),
        tally.failed.load(Ordering::SeqCst),
    );
    let (fresh_ok, fresh_failed) = (
        fresh.ok.load(Ordering::SeqCst),
        fresh.failed.load(Ordering::SeqCst),
    );
    eprintln!(
        "io={io}: {UPGRADES} upgrades in {:?}: {ok} requests ok, {failed} failed; \
         {fresh_ok} fresh connections ok, {fresh_failed} failed; {echoed} tunnel echoes",
        started.elapsed()
    );
    assert_eq!(failed, 0, "failed requests");
    assert_eq!(fresh_failed, 0, "fresh connections reset or unanswered");
    if let Some(rig) = rig {
        let samples = rig.sampler.join().unwrap();
        assert!(
            samples.iter().all(Option::is_some),
            "a moment without the XDP program: {samples:?}"
        );
        let ids: Vec<u32> = program_ids.iter().map(|id| id.expect("attached")).collect();
        assert!(
            ids.windows(2).all(|w| w[0] != w[1]),
            "each generation's program replaces the last: {ids:?}"
        );
        assert!(
            packets.windows(2).all(|w| w[1] > w[0]),
            "the verdict counters carry on across generations: {packets:?}"
        );
    }
    // Every answered request has its access-log line, whichever process answered it; the
    // last generation's lines are flushed within its 200 ms tick.
    let logged = || {
        gw.access_log()
            .lines()
            .filter(|l| l.contains("/ka"))
            .count() as u64
    };
    wait_until(
        Duration::from_secs(5),
        "an access-log line per request",
        || logged() >= ok,
    );
    assert_eq!(logged(), ok, "one access-log line per request answered");
    assert_eq!(
        admin_ready_generation(gw.admin_addr()),
        Some((200, UPGRADES + 1))
    );
    let metrics = gw.admin_get("/metrics").body_str();
    assert!(
        metrics.contains(&format!("gateway_process_generation {}", UPGRADES + 1)),
        "{metrics}"
    );
}

#[test]
fn upgrade_ten_times_under_load_on_io_uring_with_xdp() {
    upgrade_under_load("uring", true);
}

#[test]
fn upgrade_ten_times_under_load_on_epoll() {
    upgrade_under_load("epoll", false);
}

/// The old process after a failed attempt: same generation, ready, and a keep-alive
/// connection opened before the attempt still answers.
fn still_serving(gw: &Gateway, kept: &mut Client) {
    assert_eq!(admin_ready_generation(gw.admin_addr()), Some((200, 1)));
    let r = kept.get("/after");
    assert_eq!(r.status, 200);
    assert!(!r.says_close(), "the old process is not draining");
    assert_eq!(gw.get("/fresh").status, 200);
}

#[test]
fn failed_upgrades_leave_the_old_process_serving() {
    let socket_dir = tempfile::tempdir().unwrap();
    let socket = socket_dir.path().join("upgrade.sock");
    let mut gw = Gateway::with(&config(&socket, "auto"));
    let mut kept = gw.client();
    assert_eq!(kept.get("/before").status, 200);

    // A config that does not load: the new process names file, line and key, and exits 1
    // before it contacts the old one.
    let bad = socket_dir.path().join("bad.toml");
    let text = std::fs::read_to_string(gw.config_path()).unwrap();
    std::fs::write(
        &bad,
        text.replacen("[server]\n", "[server]\nbogus_key = 1\n", 1),
    )
    .unwrap();
    let status = gw.spawn_upgrade(&gateway_bin(), &bad, &[]).wait().unwrap();
    assert_eq!(status.code(), Some(1), "{}", gw.stderr());
    let stderr = gw.stderr();
    assert!(
        stderr.contains(&format!("{}:", bad.display())) && stderr.contains("server.bogus_key"),
        "{stderr}"
    );
    still_serving(&gw, &mut kept);

    // A new process that dies right after it received the sockets: the old one sees the
    // attempt end and goes on; the queued connection the test opens meanwhile is served.
    let status = gw
        .spawn_upgrade(
            &gateway_bin(),
            gw.config_path(),
            &[("GATEWAY_UPGRADE_TEST_ABORT", "1")],
        )
        .wait()
        .unwrap();
    assert!(!status.success());
    wait_until(
        Duration::from_secs(5),
        "the old process to abandon the attempt",
        || gw.stderr().contains("upgrade attempt abandoned"),
    );
    still_serving(&gw, &mut kept);

    // A new process that started its workers on the inherited sockets, then could not get
    // "drain" through and exits 1 (as one does when the old process gave up waiting): the
    // sockets it shares with the old process must stay listening (no process shuts a
    // shared listening socket down), so fresh connections are still accepted.
    let status = gw
        .spawn_upgrade(
            &gateway_bin(),
            gw.config_path(),
            &[("GATEWAY_UPGRADE_TEST_FAIL_DRAIN", "1")],
        )
        .wait()
        .unwrap();
    assert_eq!(status.code(), Some(1), "{}", gw.stderr());
    wait_until(
        Duration::from_secs(5),
        "the old process to abandon the second attempt",
        || gw.stderr().matches("upgrade attempt abandoned").count() >= 2,
    );
    for _ in 0..20 {
        still_serving(&gw, &mut kept);
    }
    assert!(
        !gw.stderr().contains("fd_reserve"),
        "the old process's accept loop failed: {}",
        gw.stderr()
    );

    // Another user (not the gateway's, not root) is refused whatever the socket's mode:
    // the sockets would be theirs.
    {
        use std::os::unix::fs::PermissionsExt;
        use std::os::unix::process::CommandExt;
        let open = |path: &Path, mode| {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap()
        };
        open(socket_dir.path(), 0o755);
        open(&socket, 0o777);
        let config = socket_dir.path().join("open.toml");
        std::fs::copy(gw.config_path(), &config).unwrap();
        open(&config, 0o644);
        let bin = socket_dir.path().join("gateway-nobody");
        std::fs::copy(gateway_bin(), &bin).unwrap();
        let status = std::process::Command::new(&bin)
            .args(["run", "--config"])
            .arg(&config)
            .arg("--upgrade")
            .uid(65534)
            .gid(65534)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(!status.success());
        wait_until(
            Duration::from_secs(5),
            "the old process to refuse uid 65534",
            || gw.stderr().contains("refused a connection from uid 65534"),
        );
        open(&socket, 0o600);
        open(socket_dir.path(), 0o700);
    }
    still_serving(&gw, &mut kept);

    // And the next attempt succeeds: the old process drains, the kept connection is told
    // to close on its next response, and systemd learns the new main pid.
    let notify_path = socket_dir.path().join("notify");
    let systemd = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    systemd
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let new = gw.spawn_upgrade(
        &gateway_bin(),
        gw.config_path(),
        &[("NOTIFY_SOCKET", notify_path.to_str().unwrap())],
    );
    let mut old = gw.adopt(new, 2);
    let mut datagram = [0u8; 256];
    let n = systemd.recv(&mut datagram).unwrap();
    assert_eq!(
        std::str::from_utf8(&datagram[..n]).unwrap(),
        format!("MAINPID={}\nREADY=1", gw.pid())
    );
    // The old process starts its drain as it answers "draining"; from then on, the kept
    // connection's next response (each one answered) says it closes.
    wait_until(
        Duration::from_secs(10),
        "the draining process to answer with Connection: close",
        || {
            let r = kept.get("/last");
            assert_eq!(r.status, 200);
            r.says_close()
        },
    );
    drop(kept);
    wait_until(Duration::from_secs(10), "the old process to exit", || {
        old.try_wait().unwrap().is_some()
    });
    assert!(old.wait().unwrap().success());
    assert_eq!(gw.get("/new").status, 200);
}

/// A process of the gateway binary started by the test (or by another gateway), stopped
/// with SIGTERM (SIGKILL after 5 s) when dropped.
struct Proc(u32);

impl Proc {
    fn alive(&self) -> bool {
        // A zombie (exited, not reaped yet) has state Z.
        std::fs::read_to_string(format!("/proc/{}/stat", self.0)).is_ok_and(|stat| {
            !stat
                .rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
    }
    fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on a pid this test started; no memory is involved.
        unsafe { libc::kill(self.0 as i32, sig) };
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if !self.alive() {
            return;
        }
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.alive() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
        self.signal(libc::SIGKILL);
    }
}

#[test]
fn upgrade_if_running_and_sigusr2_start_the_next_generation() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("upgrade.sock");
    let config = config(&socket, "auto");
    let config_path = dir.path().join("gateway.toml");
    std::fs::write(&config_path, config.to_toml()).unwrap();
    let log = dir.path().join("stderr.log");
    let start = |extra: &[&str]| {
        let mut child = std::process::Command::new(gateway_bin())
            .args(["run", "--config"])
            .arg(&config_path)
            .arg("--upgrade-if-running")
            .args(extra)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&log)
                    .unwrap(),
            )
            .spawn()
            .unwrap();
        let pid = Proc(child.id());
        // Reaped here, so `alive` sees it go.
        thread::spawn(move || child.wait());
        pid
    };
    let ready = |generation: u64| {
        wait_until(Duration::from_secs(20), "the next generation ready", || {
            admin_ready_generation(config.admin_addr) == Some((200, generation))
        })
    };
    let get = || Client::connect(config.http_addr).get("/x").status;
    // No gateway listens: a plain start.
    let first = start(&["--stay-after-handover"]);
    ready(1);
    assert_eq!(get(), 200);
    // One listens: it takes over; the first drains, then (a container's main process)
    // stays until SIGTERM.
    let second = start(&[]);
    ready(2);
    wait_until(Duration::from_secs(20), "generation 1 to drain", || {
        std::fs::read_to_string(&log)
            .unwrap()
            .contains("drained after the handover; waiting for SIGTERM")
    });
    assert!(first.alive());
    first.signal(libc::SIGTERM);
    wait_until(Duration::from_secs(20), "generation 1 to exit", || {
        !first.alive()
    });
    assert_eq!(get(), 200);
    // SIGUSR2: the running gateway starts its binary with --upgrade itself.
    second.signal(libc::SIGUSR2);
    ready(3);
    wait_until(Duration::from_secs(20), "generation 2 to exit", || {
        !second.alive()
    });
    let stderr = std::fs::read_to_string(&log).unwrap();
    let pid: u32 = stderr
        .lines()
        .find(|l| l.contains("SIGUSR2: started the binary to take over"))
        .and_then(|l| l.split("pid=").nth(1))
        .and_then(|p| p.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no pid logged:\n{stderr}"));
    let third = Proc(pid);
    assert!(third.alive());
    assert_eq!(get(), 200);
}

/// The upgrade socket: a regular file at its path is refused by name and left alone (never
/// deleted); a socket is made in a directory the gateway creates 0700, with mode 0600 even
/// under umask 000 (bound in a private directory, renamed into place: never reachable by
/// another user, not even between bind and chmod).
#[test]
fn upgrade_socket_is_private_and_never_replaces_a_file() {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-socket");
    std::fs::write(&file, "precious").unwrap();
    let gw = Gateway::with(&config(&file, "auto"));
    wait_until(Duration::from_secs(10), "the refusal logged", || {
        gw.stderr().contains("not a socket")
    });
    let stderr = gw.stderr();
    assert!(
        stderr.contains(&file.display().to_string()) && stderr.contains("ERROR"),
        "{stderr}"
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "precious");
    assert_eq!(gw.get("/still").status, 200);
    drop(gw);

    let socket_dir = dir.path().join("run/gateway");
    let socket = socket_dir.join("upgrade.sock");
    let config = config(&socket, "auto");
    let config_path = dir.path().join("gateway.toml");
    std::fs::write(&config_path, config.to_toml()).unwrap();
    let mut command = std::process::Command::new(gateway_bin());
    command
        .args(["run", "--config"])
        .arg(&config_path)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    // SAFETY: umask(2) only, between fork and exec.
    unsafe {
        use std::os::unix::process::CommandExt;
        command.pre_exec(|| {
            libc::umask(0);
            Ok(())
        });
    }
    let child = command.spawn().unwrap();
    let _proc = Proc(child.id());
    thread::spawn(move || {
        let mut child = child;
        child.wait()
    });
    wait_until(Duration::from_secs(20), "the gateway ready", || {
        admin_ready_generation(config.admin_addr) == Some((200, 1))
    });
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    assert!(std::fs::symlink_metadata(&socket)
        .unwrap()
        .file_type()
        .is_socket());
    assert_eq!(mode(&socket), 0o600);
    assert_eq!(mode(&socket_dir), 0o700);
    assert_eq!(mode(socket_dir.parent().unwrap()), 0o700);
    // Nothing of the private staging directory is left behind.
    let left: Vec<_> = std::fs::read_dir(&socket_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, [std::ffi::OsString::from("upgrade.sock")]);
}

/// A client at its per-IP cap in the old process keeps its connections there (the drain
/// after a handover keeps idle keep-alive connections) and opens new ones right after the
/// upgrade: each is the new process's, which counts none of the old ones, so every one is
/// served. An accept still armed in the old process (an io_uring accept left pending)
/// would take one and refuse it against the old process's count. Runs on both drivers.
#[test]
fn a_client_at_its_per_ip_cap_is_not_refused_by_the_old_process() {
    const CAP: usize = 3;
    for io in ["uring", "epoll"] {
        let socket_dir = tempfile::tempdir().unwrap();
        let socket = socket_dir.path().join("upgrade.sock");
        let config = config(&socket, io)
            .workers(2)
            .server("keepalive_timeout", "60s")
            .extra(&format!("[limits]\nmax_conns_per_ip = {CAP}\n"));
        let mut gw = Gateway::with(&config);
        let mut held: Vec<Client> = (0..CAP).map(|_| gw.client()).collect();
        for c in &mut held {
            assert_eq!(c.get("/held").status, 200);
        }
        let new = gw.spawn_upgrade(&gateway_bin(), gw.config_path(), &[]);
        let mut old = gw.adopt(new, 2);
        // One per worker socket and more: each would meet an armed accept in the old one.
        for i in 0..8 {
            let r = Client::connect(gw.http_addr()).get("/fresh");
            assert_eq!(r.status, 200, "io={io}: fresh connection {i}");
        }
        assert!(
            old.try_wait().unwrap().is_none(),
            "io={io}: the old process still holds the capped connections"
        );
        drop(held);
        wait_until(Duration::from_secs(10), "the old process to exit", || {
            old.try_wait().unwrap().is_some()
        });
    }
}
