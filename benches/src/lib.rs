//! The benchmark harness against nginx (driven by `cargo xtask bench`) and micro-benchmarks.
//!
//! Shared pieces: [`proc_cpu_seconds`] (CPU a process tree used, for "CPU seconds per GiB"),
//! [`pin_to_cpu`] (keeping the proxy and the load generator on separate cores), and
//! [`workspace_root`]; [`scale`], the load of the scale figures (`scale-load`, and
//! `tests/tests/scale.rs` in-process).

pub mod scale;

use std::path::PathBuf;

/// The workspace root (the parent of this crate's directory).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("benches/ has a parent")
        .to_path_buf()
}

/// `pid` and its direct children (nginx's workers under its master), for CPU, memory and
/// descriptor accounting.
pub fn process_tree(pid: u32) -> Vec<u32> {
    let mut pids = vec![pid];
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Some(child) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            if stat_ticks(child).is_some_and(|(_, ppid)| ppid == pid) {
                pids.push(child);
            }
        }
    }
    pids
}

/// User + system CPU seconds of `pid` (all its threads, io_uring workers included) and of
/// its direct children (nginx workers), from `/proc/<pid>/stat`.
pub fn proc_cpu_seconds(pid: u32) -> f64 {
    let ticks: u64 = process_tree(pid)
        .into_iter()
        .filter_map(|p| stat_ticks(p).map(|(t, _)| t))
        .sum();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    ticks as f64 / hz
}

/// Threads of `pid` and of its direct children.
pub fn proc_threads(pid: u32) -> usize {
    process_tree(pid)
        .into_iter()
        .map(|p| {
            std::fs::read_dir(format!("/proc/{p}/task"))
                .map(|d| d.count())
                .unwrap_or(0)
        })
        .sum()
}

/// (utime + stime in clock ticks, parent pid) of one process.
fn stat_ticks(pid: u32) -> Option<(u64, u32)> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// (utime + stime, ppid) from the text of a `/proc/<pid>/stat`. Fields are counted by
/// position: `tpgid` is -1 for a process without a controlling terminal (every proxy a
/// bench starts), so dropping fields that do not parse as unsigned shifts the rest.
fn parse_stat(stat: &str) -> Option<(u64, u32)> {
    // The command name is in parentheses and may hold spaces: fields start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state(3) ppid(4) ... utime(14) stime(15), counted from 1 in proc(5).
    let ppid = fields.get(1)?.parse().ok()?;
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime, ppid))
}

/// Restricts the calling thread (and whatever it later spawns or execs) to one CPU.
pub fn pin_to_cpu(cpu: usize) -> std::io::Result<()> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET writes within it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_stat;

    #[test]
    fn cpu_is_user_plus_system_without_a_controlling_terminal() {
        // nginx's worker as a bench sees it: no tty (tty_nr 0, tpgid -1), utime 1097,
        // stime 217, cutime 5.
        let stat = "23133 (nginx: worker) S 23131 23131 23131 0 -1 4194624 900 0 0 0 \
                    1097 217 5 0 20 0 1 0 5000 20000000 900 18446744073709551615";
        assert_eq!(parse_stat(stat), Some((1097 + 217, 23131)));
    }
}
