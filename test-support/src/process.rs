//! Stopping children that tests and benches start (the gateway, nginx, hping3): always our
//! own child, by its pid, never by name.

use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

/// SIGTERM, then up to `grace` for it to exit, then SIGKILL; reaps it either way. SIGTERM
/// first because a process killed outright cannot clean up (an nginx master leaves its
/// workers running, the gateway leaves its XDP program attached). True when it exited
/// within the grace period.
pub fn stop_child(child: &mut Child, grace: Duration) -> bool {
    if let Ok(Some(_)) = child.try_wait() {
        return true;
    }
    let pid = libc::pid_t::try_from(child.id()).expect("pid fits pid_t");
    // SAFETY: kill(2) on our own child, not yet reaped (so the pid is still ours).
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    false
}

/// [`stop_child`], then SIGKILL to the process `pid_file` names if that is not the child:
/// a daemon whose master is not our direct child (an nginx that daemonised or re-executed)
/// must not outlive the run. Normally the pid file names the child itself, already gone.
pub fn stop_child_and_pid_file(child: &mut Child, pid_file: &Path, grace: Duration) {
    stop_child(child, grace);
    let Ok(text) = std::fs::read_to_string(pid_file) else {
        return;
    };
    if let Ok(pid) = text.trim().parse::<libc::pid_t>() {
        if pid > 0 && pid as u32 != child.id() {
            // SAFETY: kill(2) on the master our child started (its pid file in our
            // scratch directory).
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// A child killed (SIGKILL) and reaped on drop, also on panic: for helpers like hping3 that
/// have nothing to clean up.
#[derive(Debug)]
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn a_child_that_exits_on_sigterm_is_not_killed() {
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        let started = Instant::now();
        assert!(stop_child(&mut child, Duration::from_secs(5)));
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(child.try_wait().unwrap().is_some());
    }

    #[test]
    fn a_child_that_ignores_sigterm_is_killed_after_the_grace() {
        // The shell reports readiness after installing the trap, so SIGTERM cannot arrive
        // before it is ignored.
        let mut child = Command::new("sh")
            .args(["-c", "trap '' TERM; echo ready; exec sleep 30"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        assert_eq!(line, "ready\n");
        assert!(!stop_child(&mut child, Duration::from_millis(200)));
        assert!(child.try_wait().unwrap().is_some());
    }
}
