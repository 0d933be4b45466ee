//! nginx as a child process, run from the reference configuration
//! (`fixtures/nginx-reference.conf`, a copy of the front the gateway is measured against).
//!
//! The @...@ placeholders are substituted, nginx is started in the foreground
//! (`nginx -p <prefix>/ -c <conf> -g 'daemon off;'`), readiness is "the listen port accepts a
//! connection" (polled every 20 ms), and drop stops it by PID with SIGQUIT (graceful: the
//! master takes its workers down with it; a SIGKILL would orphan them), escalating to SIGTERM
//! and then SIGKILL. nginx is not optional: a missing binary fails the test (`cargo xtask
//! test` installs it).

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// The reference configuration, with placeholders.
pub const REFERENCE_CONF: &str = include_str!("../fixtures/nginx-reference.conf");

/// The nginx binary: `$NGINX_BIN`, else `/usr/sbin/nginx`, else `nginx` on `PATH`.
pub fn nginx_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("NGINX_BIN") {
        return PathBuf::from(p);
    }
    let sbin = PathBuf::from("/usr/sbin/nginx");
    if sbin.exists() {
        return sbin;
    }
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let p = dir.join("nginx");
            if p.exists() {
                return p;
            }
        }
    }
    panic!(
        "nginx not found (looked at $NGINX_BIN, /usr/sbin/nginx and PATH); the differential \
         tests need it: `cargo xtask test` installs it (apt-get install nginx-light or nginx)"
    );
}

/// Placeholder values for the reference config.
pub struct NginxParams {
    pub workers: usize,
    pub listen: SocketAddr,
    pub api_upstream: SocketAddr,
    pub ws_upstream: SocketAddr,
}

pub struct Nginx {
    child: Option<Child>,
    prefix: TempDir,
    conf_path: PathBuf,
    listen: SocketAddr,
}

impl Nginx {
    /// Starts nginx from the reference config and waits until its port accepts.
    pub fn start_reference(p: &NginxParams) -> Nginx {
        Nginx::start(REFERENCE_CONF, p)
    }

    /// Starts nginx from `template` with the placeholders substituted.
    pub fn start(template: &str, p: &NginxParams) -> Nginx {
        let bin = nginx_bin();
        let prefix = tempfile::Builder::new()
            .prefix("nginx-test-")
            .tempdir()
            .unwrap();
        // nginx workers run as `nobody` when the master is root: let them reach the prefix.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(prefix.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let conf = template
            .replace("@WORKERS@", &p.workers.to_string())
            .replace("@PREFIX@", &prefix.path().display().to_string())
            .replace("@LISTEN@", &p.listen.to_string())
            .replace("@API_UPSTREAM@", &p.api_upstream.to_string())
            .replace("@WS_UPSTREAM@", &p.ws_upstream.to_string());
        let leftover = regex::Regex::new(r"@[A-Z_]+@").unwrap();
        let body: String = conf
            .lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .collect();
        assert!(
            !leftover.is_match(&body),
            "unsubstituted placeholder left in nginx config:\n{conf}"
        );
        let conf_path = prefix.path().join("nginx.conf");
        std::fs::write(&conf_path, conf).unwrap();
        let mut prefix_arg = prefix.path().display().to_string();
        prefix_arg.push('/');
        let child = Command::new(&bin)
            .arg("-p")
            .arg(&prefix_arg)
            .arg("-c")
            .arg(&conf_path)
            .arg("-g")
            .arg("daemon off;")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(prefix.path().join("stderr.log")).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
        let mut n = Nginx {
            child: Some(child),
            prefix,
            conf_path,
            listen: p.listen,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = n.child.as_mut().unwrap().try_wait().unwrap() {
                n.child = None;
                panic!(
                    "nginx exited ({status}) at start\n--- stderr ---\n{}\n--- error.log ---\n{}",
                    n.read("stderr.log"),
                    n.read("error.log")
                );
            }
            if TcpStream::connect_timeout(&n.listen, Duration::from_millis(200)).is_ok() {
                return n;
            }
            assert!(
                Instant::now() < deadline,
                "nginx did not accept on {} within 20 s\n{}",
                n.listen,
                n.read("error.log")
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.listen
    }
    pub fn prefix(&self) -> &Path {
        self.prefix.path()
    }
    pub fn conf_path(&self) -> &Path {
        &self.conf_path
    }
    fn read(&self, name: &str) -> String {
        std::fs::read_to_string(self.prefix.path().join(name)).unwrap_or_default()
    }
    pub fn error_log(&self) -> String {
        self.read("error.log")
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = child.id() as i32;
        for sig in [libc::SIGQUIT, libc::SIGTERM] {
            // SAFETY: kill(2) on our own child's pid.
            unsafe {
                libc::kill(pid, sig);
            }
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if child.try_wait().ok().flatten().is_some() {
                    if thread::panicking() {
                        eprintln!("===== nginx error.log =====\n{}", self.error_log());
                    }
                    return;
                }
                thread::sleep(Duration::from_millis(10));
            }
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}
