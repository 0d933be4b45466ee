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
    /// TLS only (`rediss://`), with the certificate of [`Redis::with_tls`].
    tls: bool,
}

impl Redis {
    /// Starts a Redis on a free loopback port and waits until it answers.
    pub fn start() -> Redis {
        Redis::launch(None, false)
    }

    /// Starts a Redis that requires `password` (`requirepass`).
    pub fn with_password(password: &str) -> Redis {
        Redis::launch(Some(password.to_string()), false)
    }

    /// Starts a Redis that speaks TLS only, for `localhost`, with a certificate issued by
    /// a CA of its own: [`ca_file`](Self::ca_file) is what a client must trust.
    pub fn with_tls() -> Redis {
        Redis::launch(None, true)
    }

    /// The CA certificate (PEM) that issued a TLS Redis's certificate.
    pub fn ca_file(&self) -> std::path::PathBuf {
        self.dir.path().join("ca.pem")
    }

    fn launch(password: Option<String>, tls: bool) -> Redis {
        let mut dir = tempfile::tempdir().expect("temp dir for redis");
        if tls {
            issue_certificate(dir.path());
        }
        // The port is picked free and released: another test may take it first, so a
        // start that does not answer is retried on a fresh port.
        for _ in 0..5 {
            let addr: SocketAddr = ([127, 0, 0, 1], crate::free_port()).into();
            let mut redis = Redis {
                child: None,
                dir,
                addr,
                password: password.clone(),
                tls,
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
        let port = self.addr.port().to_string();
        cmd.args(["--bind", "127.0.0.1", "-::1"]);
        if self.tls {
            let file = |name: &str| self.dir.path().join(name);
            cmd.args([
                "--port",
                "0",
                "--tls-port",
                &port,
                "--tls-auth-clients",
                "no",
            ])
            .arg("--tls-cert-file")
            .arg(file("redis.pem"))
            .arg("--tls-key-file")
            .arg(file("redis.key"))
            .arg("--tls-ca-cert-file")
            .arg(file("ca.pem"));
        } else {
            cmd.args(["--port", &port]);
        }
        cmd.args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
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

    /// Whether a PING gets an answer (`+PONG`, or `-NOAUTH` with a password); with TLS,
    /// whether the port accepts connections.
    fn answers(&self) -> bool {
        let Ok(mut s) = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)) else {
            return false;
        };
        if self.tls {
            return true;
        }
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
        if self.tls {
            return format!("rediss://localhost:{}/0", self.addr.port());
        }
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

    /// Empties its database 0 (`FLUSHDB`, as an operator would), over plain TCP; `true` once
    /// it answered `+OK`.
    pub fn flushdb(&self) -> bool {
        assert!(!self.tls, "flushdb speaks plain RESP");
        let Ok(mut s) = TcpStream::connect_timeout(&self.addr, Duration::from_secs(2)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        let mut command = String::new();
        if let Some(p) = &self.password {
            command.push_str(&format!("AUTH {p}\r\n"));
        }
        command.push_str("FLUSHDB\r\n");
        if s.write_all(command.as_bytes()).is_err() {
            return false;
        }
        let expected: &[u8] = if self.password.is_some() {
            b"+OK\r\n+OK\r\n"
        } else {
            b"+OK\r\n"
        };
        let mut got = Vec::new();
        let mut buf = [0u8; 64];
        while got.len() < expected.len() {
            match s.read(&mut buf) {
                Ok(n) if n > 0 => got.extend_from_slice(&buf[..n]),
                _ => return false,
            }
        }
        got == expected
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

/// A CA (`ca.pem`) and a certificate for `localhost` it issued (`redis.pem`, `redis.key`)
/// in `dir`, from the openssl CLI.
fn issue_certificate(dir: &std::path::Path) {
    let openssl = |args: &[&str]| {
        let status = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .stderr(Stdio::null())
            .status()
            .expect("run openssl");
        assert!(status.success(), "openssl {args:?} failed");
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    openssl(
        &[
            &["req", "-x509"][..],
            &ec,
            &[
                "-days",
                "1",
                "-subj",
                "/CN=test redis CA",
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
            ],
        ]
        .concat(),
    );
    openssl(
        &[
            &["req"][..],
            &ec,
            &[
                "-subj",
                "/CN=localhost",
                "-keyout",
                "redis.key",
                "-out",
                "redis.csr",
            ],
        ]
        .concat(),
    );
    std::fs::write(
        dir.join("leaf.ext"),
        "subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        "redis.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        "leaf.ext",
        "-out",
        "redis.pem",
    ]);
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
