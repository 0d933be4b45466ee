//! A real `redis-server` (Debian's, installed by `cargo xtask install`) for the fleet-wide
//! limit tests: its own port and directory, no persistence, killed on drop. It can be
//! killed and restarted on the same port, or stalled with SIGSTOP.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tempfile::TempDir;

pub struct Redis {
    child: Option<Child>,
    dir: TempDir,
    addr: SocketAddr,
    password: Option<String>,
}

impl Redis {
    /// Starts a Redis on a free loopback port and waits until it answers.
    pub fn start() -> Redis {
        Redis::launch(None)
    }

    /// Starts a Redis that requires `password` (`requirepass`).
    pub fn with_password(password: &str) -> Redis {
        Redis::launch(Some(password.to_string()))
    }

    fn launch(password: Option<String>) -> Redis {
        let mut dir = tempfile::tempdir().expect("temp dir for redis");
        // The port is picked free and released: another test may take it first, so a
        // start that does not answer is retried on a fresh port.
        for _ in 0..5 {
            let addr: SocketAddr = ([127, 0, 0, 1], crate::free_port()).into();
            let mut redis = Redis {
                child: None,
                dir,
                addr,
                password: password.clone(),
            };
            if redis.spawn() {
                return redis;
            }
            dir = redis.take_dir();
        }
        panic!("redis-server did not start (is it installed? `cargo xtask install`)");
    }

    fn take_dir(mut self) -> TempDir {
        self.kill();
        std::mem::replace(&mut self.dir, tempfile::tempdir().expect("temp dir"))
    }

    /// Runs redis-server on `self.addr`; `true` once it answers PING.
    fn spawn(&mut self) -> bool {
        let mut cmd = Command::new("redis-server");
        cmd.args(["--bind", "127.0.0.1", "--port"])
            .arg(self.addr.port().to_string())
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(p) = &self.password {
            cmd.args(["--requirepass", p]);
        }
        let mut child = cmd.spawn().expect("running redis-server");
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return false;
            }
            if self.answers() {
                self.child = Some(child);
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        false
    }

    /// Whether a PING gets an answer (`+PONG`, or `-NOAUTH` with a password).
    fn answers(&self) -> bool {
        let Ok(mut s) = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
        if s.write_all(b"PING\r\n").is_err() {
            return false;
        }
        let mut buf = [0u8; 64];
        matches!(s.read(&mut buf), Ok(n) if n > 0)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The URL a gateway's `[limits.global] redis` takes (with the password, if any).
    pub fn url(&self) -> String {
        match &self.password {
            Some(p) => format!("redis://:{p}@{}/0", self.addr),
            None => format!("redis://{}/0", self.addr),
        }
    }

    /// Kills the server (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port (after [`kill`](Self::kill)).
    pub fn restart(&mut self) {
        self.kill();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.spawn() {
            assert!(
                Instant::now() < deadline,
                "redis-server did not restart on {}",
                self.addr
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn signal(&self, sig: libc::c_int) {
        let pid = self.child.as_ref().expect("redis is running").id();
        // SAFETY: kill(2) on our own child's pid.
        assert_eq!(unsafe { libc::kill(pid as libc::pid_t, sig) }, 0);
    }

    /// Stalls it (SIGSTOP): connections stay open, nothing answers.
    pub fn stop(&self) {
        self.signal(libc::SIGSTOP);
    }

    /// Resumes it after [`stop`](Self::stop).
    pub fn resume(&self) {
        self.signal(libc::SIGCONT);
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        if let Some(child) = &self.child {
            // A stopped process still dies of SIGKILL; SIGCONT first is harmless.
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGCONT) };
        }
        self.kill();
    }
}
