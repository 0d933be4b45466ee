//! Tunnel benchmark: bulk throughput through one tunnel and through 100 tunnels, and the
//! proxy's CPU seconds per GiB moved, for
//!
//! - `gateway-splice`: the gateway (one worker), tunnels on the splice path;
//! - `gateway-copy`:   the same binary with `GATEWAY_TUNNEL_SPLICE=off` (buffered copy);
//! - `nginx`:          nginx 1 worker, from `tests/fixtures/nginx-reference.conf`;
//! - `relay-readiness`, `relay-uring`: this binary as a minimal one-thread TCP relay
//!   (no HTTP), splicing through pipes driven either by epoll readiness (tokio `AsyncFd`,
//!   what the gateway does) or by io_uring's `IORING_OP_SPLICE` on a ring of its own. These
//!   two isolate the splice engine from everything else.
//!
//! Traffic: after the WebSocket handshake (gateway, nginx) the upstream streams bytes to the
//! client as fast as it can; the client reads and counts. The load generator (upstream and
//! clients, one thread) is pinned to CPU 0, the proxy to CPU 1. After a warm-up second the
//! bytes the clients received and the proxy's user+system CPU (its threads, io_uring
//! workers and child processes included) are sampled over the measured window.
//!
//! ```text
//! cargo run --release -p gateway-benches --bin tunnel-bench -- \
//!     --gateway target/release/gateway --nginx /usr/sbin/nginx [--seconds 5] [--only NAME,..]
//! ```

use std::cell::Cell;
use std::io;
use std::net::{SocketAddr, TcpListener as StdListener, TcpStream as StdStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::rc::Rc;
use std::time::{Duration, Instant};

use gateway_benches::{pin_to_cpu, proc_cpu_seconds, proc_threads, workspace_root};
use gateway_test_support::{free_addr, stop_child_and_pid_file};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const CHUNK: usize = 256 * 1024;
const PIPE_SIZE: usize = 64 * 1024;
const GENERATOR_CPU: usize = 0;
const PROXY_CPU: usize = 1;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("relay") {
        return relay_main(&args[1..]);
    }
    let mut gateway: Option<PathBuf> = None;
    let mut nginx: Option<PathBuf> = None;
    let mut seconds = 5u64;
    let mut only: Option<Vec<String>> = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || {
            it.next()
                .cloned()
                .unwrap_or_else(|| usage(&format!("{a} needs a value")))
        };
        match a.as_str() {
            "--gateway" => gateway = Some(value().into()),
            "--nginx" => nginx = Some(value().into()),
            "--seconds" => seconds = value().parse().unwrap_or_else(|_| usage("--seconds N")),
            "--only" => only = Some(value().split(',').map(str::to_string).collect()),
            "-h" | "--help" => usage(""),
            other => usage(&format!("unknown argument {other}")),
        }
    }
    let mut targets: Vec<Target> = Vec::new();
    if let Some(g) = &gateway {
        targets.push(Target::Gateway {
            bin: g.clone(),
            splice: true,
        });
        targets.push(Target::Gateway {
            bin: g.clone(),
            splice: false,
        });
    }
    if let Some(n) = &nginx {
        targets.push(Target::Nginx { bin: n.clone() });
    }
    targets.push(Target::Relay {
        engine: "readiness",
    });
    targets.push(Target::Relay { engine: "uring" });
    if let Some(only) = &only {
        targets.retain(|t| only.iter().any(|o| *o == t.name()));
    }
    if let Err(e) = pin_to_cpu(GENERATOR_CPU) {
        eprintln!("warning: cannot pin the load generator to CPU {GENERATOR_CPU}: {e}");
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let window = Duration::from_secs(seconds);
    let mut rows = Vec::new();
    for target in &targets {
        for tunnels in [1usize, 100] {
            let r = rt.block_on(
                tokio::task::LocalSet::new().run_until(scenario(target, tunnels, window)),
            );
            match r {
                Ok(row) => {
                    eprintln!("{}", row.line());
                    rows.push(row);
                }
                Err(e) => eprintln!("{} x{tunnels}: failed: {e}", target.name()),
            }
        }
    }
    println!("| proxy | tunnels | throughput | proxy CPU s per GiB | proxy threads |");
    println!("|---|---:|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {} | {:.2} GiB/s | {:.3} | {} |",
            r.name,
            r.tunnels,
            r.bytes_per_s / (1u64 << 30) as f64,
            r.cpu_per_gib,
            r.threads
        );
    }
}

fn usage(msg: &str) -> ! {
    if !msg.is_empty() {
        eprintln!("tunnel-bench: {msg}");
    }
    eprintln!(
        "usage: tunnel-bench [--gateway PATH] [--nginx PATH] [--seconds N] [--only NAME,...]\n\
         names: gateway-splice gateway-copy nginx relay-readiness relay-uring"
    );
    std::process::exit(2)
}

enum Target {
    Gateway { bin: PathBuf, splice: bool },
    Nginx { bin: PathBuf },
    Relay { engine: &'static str },
}

impl Target {
    fn name(&self) -> String {
        match self {
            Target::Gateway { splice: true, .. } => "gateway-splice".into(),
            Target::Gateway { splice: false, .. } => "gateway-copy".into(),
            Target::Nginx { .. } => "nginx".into(),
            Target::Relay { engine } => format!("relay-{engine}"),
        }
    }
    /// Whether clients go through a WebSocket handshake (a real proxy) or straight in.
    fn http(&self) -> bool {
        !matches!(self, Target::Relay { .. })
    }
}

struct Row {
    name: String,
    tunnels: usize,
    bytes_per_s: f64,
    cpu_per_gib: f64,
    /// Threads of the proxy (its own and its children's) at the end of the window: shows
    /// io_uring's io-wq workers parked in blocking splices.
    threads: usize,
}

impl Row {
    fn line(&self) -> String {
        format!(
            "{:16} x{:<4} {:6.2} GiB/s  {:.3} CPU s/GiB  {} threads",
            self.name,
            self.tunnels,
            self.bytes_per_s / (1u64 << 30) as f64,
            self.cpu_per_gib,
            self.threads
        )
    }
}

/// A started proxy; killed on drop.
struct Proxy {
    child: Child,
    listen: SocketAddr,
    _dir: ScratchDir,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        // SIGTERM first: an nginx master killed outright leaves its workers running.
        let pid_file = self._dir.0.join("nginx.pid");
        stop_child_and_pid_file(&mut self.child, &pid_file, Duration::from_secs(3));
    }
}

struct ScratchDir(PathBuf);

impl ScratchDir {
    fn new(name: &str) -> ScratchDir {
        let p = std::env::temp_dir().join(format!("tunnel-bench-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("scratch dir");
        ScratchDir(p)
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn pinned(cmd: &mut Command) -> &mut Command {
    // SAFETY: sched_setaffinity is async-signal-safe; runs in the child before exec.
    unsafe {
        cmd.pre_exec(|| {
            let _ = pin_to_cpu(PROXY_CPU);
            Ok(())
        })
    }
}

fn start_proxy(target: &Target, upstream: SocketAddr) -> io::Result<Proxy> {
    let listen = free_addr();
    let dir = ScratchDir::new(&target.name());
    let mut cmd;
    match target {
        Target::Gateway { bin, splice } => {
            let admin = free_addr();
            let config = format!(
                "[server]\nworkers = 1\n\n[log]\naccess = \"off\"\nlevel = \"warn\"\n\n\
                 [admin]\nlisten = \"{admin}\"\n\n[[listener]]\nname = \"http\"\nlisten = \"{listen}\"\n\n\
                 [[upstream]]\nname = \"ws\"\nservers = [\"{upstream}\"]\n\n\
                 [[route]]\npath_prefix = \"/ws\"\nupstream = \"ws\"\nwebsocket = true\n\
                 send_timeout = \"3600s\"\nread_timeout = \"3600s\"\n"
            );
            let path = dir.0.join("gateway.toml");
            std::fs::write(&path, config)?;
            cmd = Command::new(bin);
            cmd.arg("run").arg("--config").arg(&path);
            cmd.env("GATEWAY_TUNNEL_SPLICE", if *splice { "on" } else { "off" });
        }
        Target::Nginx { bin } => {
            let template = std::fs::read_to_string(
                workspace_root().join("tests/fixtures/nginx-reference.conf"),
            )?;
            let conf = template
                .replace("@WORKERS@", "1")
                .replace("@PREFIX@", &dir.0.display().to_string())
                .replace("@LISTEN@", &listen.to_string())
                .replace("@API_UPSTREAM@", &upstream.to_string())
                .replace("@WS_UPSTREAM@", &upstream.to_string());
            let path = dir.0.join("nginx.conf");
            std::fs::write(&path, conf)?;
            cmd = Command::new(bin);
            cmd.arg("-p")
                .arg(format!("{}/", dir.0.display()))
                .arg("-c")
                .arg(&path)
                .arg("-g")
                .arg("daemon off;");
        }
        Target::Relay { engine } => {
            cmd = Command::new(std::env::current_exe()?);
            cmd.args(["relay", "--engine", engine])
                .arg("--listen")
                .arg(listen.to_string())
                .arg("--upstream")
                .arg(upstream.to_string());
        }
    }
    let stderr = std::fs::File::create(dir.0.join("stderr.log"))?;
    let child = pinned(&mut cmd)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()?;
    let proxy = Proxy {
        child,
        listen,
        _dir: dir,
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while StdStream::connect(listen).is_err() {
        if Instant::now() > deadline {
            let err = std::fs::read_to_string(proxy._dir.0.join("stderr.log")).unwrap_or_default();
            return Err(io::Error::other(format!(
                "{} did not listen: {err}",
                target.name()
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(proxy)
}

/// Runs one measurement: `tunnels` tunnels, upstream → client bulk.
async fn scenario(target: &Target, tunnels: usize, window: Duration) -> io::Result<Row> {
    let http = target.http();
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let upstream = listener.local_addr()?;
    let stop = Rc::new(Cell::new(false));
    let payload: Rc<[u8]> = vec![0x5a; CHUNK].into();
    {
        let (stop, payload) = (stop.clone(), payload.clone());
        tokio::task::spawn_local(async move {
            while let Ok((s, _)) = listener.accept().await {
                let (stop, payload) = (stop.clone(), payload.clone());
                tokio::task::spawn_local(async move {
                    let _ = serve_upstream(s, http, &stop, &payload).await;
                });
            }
        });
    }
    let proxy = start_proxy(target, upstream)?;
    let received = Rc::new(Cell::new(0u64));
    let mut clients = Vec::new();
    for _ in 0..tunnels {
        let mut s = TcpStream::connect(proxy.listen).await?;
        s.set_nodelay(true)?;
        if http {
            s.write_all(
                b"GET /ws/bench HTTP/1.1\r\nHost: bench\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                  Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
            )
            .await?;
            let head = read_head(&mut s).await?;
            if !head.starts_with(b"HTTP/1.1 101") {
                return Err(io::Error::other(format!(
                    "no 101 from {}: {}",
                    target.name(),
                    String::from_utf8_lossy(&head)
                )));
            }
        }
        let (received, stop) = (received.clone(), stop.clone());
        clients.push(tokio::task::spawn_local(async move {
            let mut buf = vec![0u8; CHUNK];
            while !stop.get() {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => received.set(received.get() + n as u64),
                }
            }
        }));
    }
    let pid = proxy.child.id();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (b0, c0, t0) = (received.get(), proc_cpu_seconds(pid), Instant::now());
    tokio::time::sleep(window).await;
    let (b1, c1, t1) = (received.get(), proc_cpu_seconds(pid), Instant::now());
    let threads = proc_threads(pid);
    stop.set(true);
    drop(proxy);
    for c in clients {
        c.abort();
    }
    let bytes = (b1 - b0) as f64;
    if bytes == 0.0 {
        return Err(io::Error::other("no bytes moved"));
    }
    Ok(Row {
        name: target.name(),
        tunnels,
        bytes_per_s: bytes / (t1 - t0).as_secs_f64(),
        cpu_per_gib: (c1 - c0) / (bytes / (1u64 << 30) as f64),
        threads,
    })
}

async fn read_head(s: &mut TcpStream) -> io::Result<Vec<u8>> {
    // Byte by byte: nothing past the head may be consumed (the relay forwards raw bytes).
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut b).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        head.push(b[0]);
    }
    Ok(head)
}

async fn serve_upstream(
    mut s: TcpStream,
    http: bool,
    stop: &Cell<bool>,
    payload: &[u8],
) -> io::Result<()> {
    s.set_nodelay(true)?;
    if http {
        read_head(&mut s).await?;
        s.write_all(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
              Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n",
        )
        .await?;
    }
    while !stop.get() {
        s.write_all(payload).await?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The minimal relays (child process): accept on --listen, connect --upstream, splice.

fn relay_main(args: &[String]) {
    let mut engine = String::new();
    let mut listen = String::new();
    let mut upstream = String::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let v = it.next().cloned().unwrap_or_default();
        match a.as_str() {
            "--engine" => engine = v,
            "--listen" => listen = v,
            "--upstream" => upstream = v,
            other => usage(&format!("relay: unknown argument {other}")),
        }
    }
    let listen: SocketAddr = listen
        .parse()
        .unwrap_or_else(|_| usage("relay --listen ADDR"));
    let upstream: SocketAddr = upstream
        .parse()
        .unwrap_or_else(|_| usage("relay --upstream ADDR"));
    let result = match engine.as_str() {
        "readiness" => relay_readiness(listen, upstream),
        "uring" => relay_uring(listen, upstream),
        _ => usage("relay --engine readiness|uring"),
    };
    if let Err(e) = result {
        eprintln!("relay: {e}");
        std::process::exit(1);
    }
}

fn new_pipe(nonblocking: bool) -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    let flags = libc::O_CLOEXEC | if nonblocking { libc::O_NONBLOCK } else { 0 };
    // SAFETY: pipe2 fills the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), flags) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fresh descriptors, owned here.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: fcntl on our own descriptor.
    unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_SIZE as libc::c_int) };
    Ok((r, w))
}

fn splice(from: RawFd, to: RawFd, len: usize, flags: libc::c_uint) -> io::Result<usize> {
    // SAFETY: splice between open descriptors, no offsets.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            flags,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

struct Fd(RawFd);
impl AsRawFd for Fd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// Readiness engine: tokio current-thread reactor, `AsyncFd` on both sockets, non-blocking
/// splice — the same loop as the gateway's tunnel.
fn relay_readiness(listen: SocketAddr, upstream: SocketAddr) -> io::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let l = TcpListener::bind(listen).await?;
        loop {
            let (c, _) = l.accept().await?;
            let u = TcpStream::connect(upstream).await?;
            tokio::spawn(async move {
                let (c, u) = (c.into_std().unwrap(), u.into_std().unwrap());
                let reg = |fd: RawFd| {
                    // SAFETY: the std streams outlive the AsyncFds (dropped at the end of this task).
                    unsafe {
                        tokio::io::unix::AsyncFd::register_with_interest(
                            Fd(fd),
                            tokio::io::Interest::READABLE | tokio::io::Interest::WRITABLE,
                        )
                    }
                    .unwrap()
                };
                let (ca, ua) = (reg(c.as_raw_fd()), reg(u.as_raw_fd()));
                let _ = tokio::join!(readiness_dir(&ca, &ua), readiness_dir(&ua, &ca));
                drop((ca, ua));
                drop((c, u));
            });
        }
    })
}

async fn readiness_dir(
    from: &tokio::io::unix::AsyncFd<Fd>,
    to: &tokio::io::unix::AsyncFd<Fd>,
) -> io::Result<()> {
    let (r, w) = new_pipe(true)?;
    let flags = libc::SPLICE_F_NONBLOCK | libc::SPLICE_F_MOVE;
    loop {
        let n = from
            .async_io(tokio::io::Interest::READABLE, |fd| {
                splice(fd.0, w.as_raw_fd(), PIPE_SIZE, flags)
            })
            .await?;
        if n == 0 {
            // SAFETY: shutdown on an open socket.
            unsafe { libc::shutdown(to.as_raw_fd(), libc::SHUT_WR) };
            return Ok(());
        }
        let mut left = n;
        while left > 0 {
            left -= to
                .async_io(tokio::io::Interest::WRITABLE, |fd| {
                    splice(r.as_raw_fd(), fd.0, left, flags)
                })
                .await?;
        }
    }
}

/// io_uring engine: one ring, `IORING_OP_SPLICE` for both legs on blocking descriptors
/// (the kernel runs splice requests in its io-wq worker threads).
fn relay_uring(listen: SocketAddr, upstream: SocketAddr) -> io::Result<()> {
    use io_uring::{opcode, types, IoUring};
    const ACCEPT: u64 = u64::MAX;
    struct Dir {
        from: RawFd,
        to: RawFd,
        pipe: (OwnedFd, OwnedFd),
        buffered: usize,
        done: bool,
    }
    struct Tunnel {
        _socks: (StdStream, StdStream),
        dirs: [Dir; 2],
    }
    let listener = StdListener::bind(listen)?;
    let mut ring = IoUring::new(1024)?;
    let mut tunnels: Vec<Option<Tunnel>> = Vec::new();
    let fill = |d: &Dir, ud: u64| {
        opcode::Splice::new(
            types::Fd(d.from),
            -1,
            types::Fd(d.pipe.1.as_raw_fd()),
            -1,
            PIPE_SIZE as u32,
        )
        .flags(libc::SPLICE_F_MOVE)
        .build()
        .user_data(ud)
    };
    let drain = |d: &Dir, ud: u64| {
        opcode::Splice::new(
            types::Fd(d.pipe.0.as_raw_fd()),
            -1,
            types::Fd(d.to),
            -1,
            d.buffered as u32,
        )
        .flags(libc::SPLICE_F_MOVE)
        .build()
        .user_data(ud)
    };
    let accept = opcode::Accept::new(
        types::Fd(listener.as_raw_fd()),
        std::ptr::null_mut(),
        std::ptr::null_mut(),
    )
    .build()
    .user_data(ACCEPT);
    let mut pending = vec![accept.clone()];
    loop {
        {
            let mut sq = ring.submission();
            for e in pending.drain(..) {
                // SAFETY: every buffer and descriptor an entry names lives in `tunnels` or
                // `listener` until its completion arrives.
                unsafe { sq.push(&e).expect("submission queue sized for the load") };
            }
        }
        ring.submit_and_wait(1)?;
        let cqes: Vec<(u64, i32)> = ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        for (ud, res) in cqes {
            if ud == ACCEPT {
                pending.push(accept.clone());
                if res < 0 {
                    continue;
                }
                // SAFETY: the accepted descriptor is ours.
                let c = unsafe { StdStream::from_raw_fd(res) };
                let u = StdStream::connect(upstream)?;
                let _ = (c.set_nodelay(true), u.set_nodelay(true));
                let (cf, uf) = (c.as_raw_fd(), u.as_raw_fd());
                let t = Tunnel {
                    dirs: [
                        Dir {
                            from: cf,
                            to: uf,
                            pipe: new_pipe(false)?,
                            buffered: 0,
                            done: false,
                        },
                        Dir {
                            from: uf,
                            to: cf,
                            pipe: new_pipe(false)?,
                            buffered: 0,
                            done: false,
                        },
                    ],
                    _socks: (c, u),
                };
                let idx = tunnels.iter().position(Option::is_none).unwrap_or_else(|| {
                    tunnels.push(None);
                    tunnels.len() - 1
                });
                for (d, dir) in t.dirs.iter().enumerate() {
                    pending.push(fill(dir, ((idx as u64) << 1) | d as u64));
                }
                tunnels[idx] = Some(t);
                continue;
            }
            let (idx, d) = ((ud >> 1) as usize, (ud & 1) as usize);
            let Some(t) = tunnels[idx].as_mut() else {
                continue;
            };
            let dir = &mut t.dirs[d];
            if dir.buffered == 0 {
                // A fill completed.
                if res > 0 {
                    dir.buffered = res as usize;
                    pending.push(drain(dir, ud));
                } else {
                    // SAFETY: shutdown on open sockets.
                    unsafe {
                        libc::shutdown(
                            dir.to,
                            if res == 0 {
                                libc::SHUT_WR
                            } else {
                                libc::SHUT_RDWR
                            },
                        )
                    };
                    dir.done = true;
                }
            } else if res > 0 {
                dir.buffered -= res as usize;
                pending.push(if dir.buffered > 0 {
                    drain(dir, ud)
                } else {
                    fill(dir, ud)
                });
            } else {
                // SAFETY: as above.
                unsafe {
                    libc::shutdown(dir.from, libc::SHUT_RDWR);
                    libc::shutdown(dir.to, libc::SHUT_RDWR);
                }
                dir.done = true;
            }
            if t.dirs.iter().all(|d| d.done) {
                tunnels[idx] = None;
            }
        }
    }
}
