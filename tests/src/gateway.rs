//! The gateway under test as a child process.
//!
//! [`Gateway::start`] writes the config into a fresh temp dir, runs
//! `gateway run --config <dir>/gateway.toml` with stdout (the access log) and stderr captured
//! to files in that dir, and returns once `GET /ready` on the admin listener answers 200
//! (polled every 20 ms, 20 s at most; never a fixed sleep). Drop sends SIGTERM (a second one
//! after 3 s), then SIGKILL after 5 s; when the test is failing it prints the config, the
//! stderr and the access log, so the failure can be understood from the test output alone.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::client::{self, Client, Req, Response};
use crate::config::Config;
use crate::gateway_bin;

/// How long `start` waits for `/ready`.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);
const POLL: Duration = Duration::from_millis(20);

pub struct Gateway {
    child: Option<Child>,
    dir: TempDir,
    config_path: PathBuf,
    config_text: String,
    http_addr: SocketAddr,
    admin_addr: SocketAddr,
}

impl Gateway {
    /// Starts the gateway with this config text and waits until it is ready.
    pub fn start(config_toml: &str) -> Gateway {
        Gateway::try_start(config_toml).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Starts the gateway from a [`Config`]. Ports come from binding port 0 and letting go,
    /// so a concurrent test can take one before the gateway binds it: on "Address already
    /// in use" the start is retried with fresh listener and admin ports.
    pub fn with(config: &Config) -> Gateway {
        Gateway::with_limit(config, None, None, &[])
    }

    /// [`Gateway::with`], with these variables added to the gateway's environment (e.g.
    /// `GATEWAY_TUNNEL_SPLICE=off`, read once at start).
    pub fn with_env(config: &Config, env: &[(&str, &str)]) -> Gateway {
        Gateway::with_limit(config, None, None, env)
    }

    /// [`Gateway::with`], with RLIMIT_NOFILE (soft and hard) set to `nofile` in the child
    /// before exec, so descriptor exhaustion is reached with a handful of connections.
    pub fn with_nofile(config: &Config, nofile: u64) -> Gateway {
        Gateway::with_limit(config, Some(nofile), None, &[])
    }

    /// [`Gateway::with`], with the gateway's stderr opened from `path` (read and write, so
    /// a FIFO opens without a reader and a write never fails with EPIPE: a FIFO nobody
    /// reads stands for a log shipper that stalled). [`Gateway::stderr`] is then empty.
    pub fn with_stderr(config: &Config, path: &Path) -> Gateway {
        Gateway::with_limit(config, None, Some(path), &[])
    }

    fn with_limit(
        config: &Config,
        nofile: Option<u64>,
        stderr: Option<&Path>,
        env: &[(&str, &str)],
    ) -> Gateway {
        let mut config = config.clone();
        for _ in 0..4 {
            match Gateway::try_start_limited(&config.to_toml(), nofile, stderr, env) {
                Ok(gw) => return gw,
                Err(e) if e.contains("Address already in use") => {
                    config.http_addr = crate::free_addr();
                    config.admin_addr = crate::free_addr();
                }
                Err(e) => panic!("{e}"),
            }
        }
        Gateway::try_start_limited(&config.to_toml(), nofile, stderr, env)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Like [`Gateway::start`] but returns the reason instead of panicking.
    pub fn try_start(config_toml: &str) -> Result<Gateway, String> {
        Gateway::try_start_limited(config_toml, None, None, &[])
    }

    fn try_start_limited(
        config_toml: &str,
        nofile: Option<u64>,
        stderr_path: Option<&Path>,
        env: &[(&str, &str)],
    ) -> Result<Gateway, String> {
        let (http_addr, admin_addr) = addresses_of(config_toml)?;
        let dir = tempfile::Builder::new()
            .prefix("gateway-test-")
            .tempdir()
            .map_err(|e| format!("tempdir: {e}"))?;
        let config_path = dir.path().join("gateway.toml");
        std::fs::write(&config_path, config_toml).map_err(|e| format!("write config: {e}"))?;
        // O_APPEND, as an operator's log file would be: after a binary upgrade
        // ([`Gateway::spawn_upgrade`]) two processes write to the same files.
        let stdout = append(&dir.path().join("stdout.log"));
        let stderr = match stderr_path {
            Some(p) => std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(p)
                .map_err(|e| format!("open {}: {e}", p.display()))?,
            None => append(&dir.path().join("stderr.log")),
        };
        let mut command = Command::new(gateway_bin());
        command
            .arg("run")
            .arg("--config")
            .arg(&config_path)
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .envs(env.iter().copied());
        if let Some(n) = nofile {
            use std::os::unix::process::CommandExt;
            // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
            unsafe {
                command.pre_exec(move || {
                    let limit = libc::rlimit {
                        rlim_cur: n,
                        rlim_max: n,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = command
            .spawn()
            .map_err(|e| format!("spawn {}: {e}", gateway_bin().display()))?;
        let mut gw = Gateway {
            child: Some(child),
            dir,
            config_path,
            config_text: config_toml.to_string(),
            http_addr,
            admin_addr,
        };
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = gw.child.as_mut().unwrap().try_wait().unwrap() {
                let msg = format!(
                    "gateway exited ({status}) before becoming ready\n--- config ---\n{}\n--- stderr ---\n{}",
                    gw.config_text,
                    gw.stderr()
                );
                gw.child = None;
                return Err(msg);
            }
            if admin_status(admin_addr, "/ready") == Some(200) {
                return Ok(gw);
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "gateway not ready ({} GET /ready != 200) within {READY_TIMEOUT:?}\n--- config ---\n{}\n--- stderr ---\n{}",
                    admin_addr,
                    gw.config_text,
                    gw.stderr()
                ));
            }
            thread::sleep(POLL);
        }
    }

    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }
    /// Everything the gateway wrote to stdout so far (the access log).
    pub fn access_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stdout.log")).unwrap_or_default()
    }
    /// Everything the gateway wrote to stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default()
    }
    /// Polls the access log until a complete line satisfies `pred`; panics after `timeout`.
    /// A line still being written (no newline yet) is not looked at: a long line can reach
    /// the file in more than one write.
    pub fn wait_access_line(&self, timeout: Duration, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let log = self.access_log();
            let complete = log
                .split_inclusive('\n')
                .filter_map(|l| l.strip_suffix('\n'));
            if let Some(l) = complete.into_iter().find(|l| pred(l)) {
                return l.to_string();
            }
            assert!(
                Instant::now() < deadline,
                "no matching access log line within {timeout:?}; log so far:\n{log}"
            );
            thread::sleep(POLL);
        }
    }
    /// A new client connection to the HTTP listener.
    pub fn client(&self) -> Client {
        Client::connect(self.http_addr)
    }
    /// One GET on a fresh connection.
    pub fn get(&self, target: &str) -> Response {
        client::get(self.http_addr, target)
    }
    /// One request on a fresh connection.
    pub fn request(&self, req: &Req) -> Response {
        client::one_shot(self.http_addr, req)
            .unwrap_or_else(|e| panic!("{} {}: {e}", req.method, req.target))
    }
    /// One GET on the admin listener.
    pub fn admin_get(&self, path: &str) -> Response {
        let mut c = Client::connect(self.admin_addr);
        c.must(
            &Req::get(path)
                .host(Some("admin"))
                .header("Connection", "close"),
        )
    }
    /// Sends a signal to the gateway process.
    pub fn signal(&self, sig: i32) {
        if let Some(c) = &self.child {
            // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
            unsafe {
                libc::kill(c.id() as i32, sig);
            }
        }
    }
    /// Starts `bin run --config CONFIG --upgrade` (with `env`) to take over from this
    /// gateway: its access log (stdout) and stderr are appended to this gateway's files.
    pub fn spawn_upgrade(&self, bin: &Path, config: &Path, env: &[(&str, &str)]) -> Child {
        Command::new(bin)
            .arg("run")
            .arg("--config")
            .arg(config)
            .arg("--upgrade")
            .envs(env.iter().copied())
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(append(&self.dir.path().join("stdout.log")))
            .stderr(append(&self.dir.path().join("stderr.log")))
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()))
    }

    /// Waits until the admin listener's `/ready` says 200 from `generation` (its
    /// `Gateway-Generation` header), then makes `new` this gateway's process and returns
    /// the one it replaced. Panics if `new` exits first or within [`READY_TIMEOUT`].
    pub fn adopt(&mut self, mut new: Child, generation: u64) -> Child {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = new.try_wait().unwrap() {
                panic!(
                    "the upgrade process exited ({status})\n{}",
                    tail(&self.stderr(), 40)
                );
            }
            if admin_ready_generation(self.admin_addr) == Some((200, generation)) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "generation {generation} not ready within {READY_TIMEOUT:?}\n{}",
                tail(&self.stderr(), 40)
            );
            thread::sleep(POLL);
        }
        self.child.replace(new).expect("a running gateway")
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut()?;
        loop {
            if let Some(s) = child.try_wait().unwrap() {
                return Some(s);
            }
            if Instant::now() > deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let panicking = thread::panicking();
        if self.child.is_some() {
            // SIGTERM drains; a test may leave a request in flight (a stalled upstream), so
            // after 3 s a second SIGTERM ("stops at once", per the contract), and SIGKILL if
            // the process is still there 5 s after the first.
            self.signal(libc::SIGTERM);
            if self.wait_exit(Duration::from_secs(3)).is_none() {
                self.signal(libc::SIGTERM);
                if self.wait_exit(Duration::from_secs(2)).is_none() {
                    if let Some(c) = self.child.as_mut() {
                        let _ = c.kill();
                        let _ = c.wait();
                    }
                }
            }
        }
        if panicking {
            let mut err = std::io::stderr().lock();
            let _ = writeln!(
                err,
                "\n===== gateway (failed test) config {} =====\n{}\n===== gateway stderr =====\n{}\n===== gateway access log (tail) =====\n{}\n==========",
                self.config_path.display(),
                self.config_text,
                tail(&self.stderr(), 200),
                tail(&self.access_log(), 50),
            );
        }
    }
}

fn append(path: &Path) -> File {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

/// `/ready`'s status and the `Gateway-Generation` header of the process that answered.
pub fn admin_ready_generation(addr: SocketAddr) -> Option<(u16, u64)> {
    // Not listening yet (a process still starting): no answer, rather than a panic.
    TcpStream::connect(addr).ok()?;
    let mut c = Client::connect(addr);
    c.set_read_timeout(Duration::from_secs(5));
    let r = c
        .request(
            &Req::get("/ready")
                .host(Some("admin"))
                .header("Connection", "close"),
        )
        .ok()?;
    Some((r.status, r.header("gateway-generation")?.parse().ok()?))
}

fn tail(s: &str, lines: usize) -> String {
    let all: Vec<&str> = s.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The first listener's and the admin listener's addresses named in a config text.
fn addresses_of(config_toml: &str) -> Result<(SocketAddr, SocketAddr), String> {
    let v: toml::Value = config_toml
        .parse()
        .map_err(|e| format!("test config is not TOML: {e}\n{config_toml}"))?;
    let admin = v
        .get("admin")
        .and_then(|a| a.get("listen"))
        .and_then(|l| l.as_str())
        .ok_or("test config has no [admin] listen")?;
    let http = v
        .get("listener")
        .and_then(|l| l.as_array())
        .and_then(|l| l.first())
        .and_then(|l| l.get("listen"))
        .and_then(|l| l.as_str())
        .ok_or("test config has no [[listener]] listen")?;
    let parse = |s: &str| {
        s.parse::<SocketAddr>()
            .map_err(|e| format!("address {s:?}: {e}"))
    };
    Ok((parse(http)?, parse(admin)?))
}

/// Status of `GET path` on an admin address, or `None` when it does not answer (yet).
pub fn admin_status(addr: SocketAddr, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
    s.set_write_timeout(Some(Duration::from_secs(1))).ok()?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .ok()?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    while !buf.windows(2).any(|w| w == b"\r\n") {
        let n = s.read(&mut chunk).ok()?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let line = String::from_utf8_lossy(&buf);
    let line = line.lines().next()?;
    client::parse_status_line(line).ok().map(|(_, s, _)| s)
}
