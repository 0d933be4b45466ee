//! The access log: one line per request, nginx `combined` plus the request time in
//! microseconds and the upstream address, or the same fields as JSON.
//!
//! Workers format lines into a buffer of their own and hand full buffers (or every
//! 200 ms) to one writer thread, so a slow disk never stalls a request. The writer
//! reopens its file on reload, for logrotate.
//!
//! Memory is bounded on both sides of that hand-off:
//! - the queue to the writer holds at most [`QUEUE_BYTES`]; a buffer that does not fit is
//!   dropped whole and its lines are counted (`gateway_access_log_dropped_total`), because a
//!   worker must never wait for a disk, and an unbounded queue in front of a stalled disk
//!   grows until the process is killed;
//! - every variable field (method, target, referer, user agent) is cut at [`FIELD_CAP`]
//!   bytes as written, escapes included, and marked with [`TRUNCATED`], so a line stays
//!   below a few KiB whatever a client sends (escaping turns one byte into four).

use crate::config::AccessFormat;
use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};

/// Bytes of formatted lines waiting for the writer, at most.
pub(crate) const QUEUE_BYTES: usize = 8 << 20;

/// Largest written length of one field (after escaping).
pub(crate) const FIELD_CAP: usize = 2048;

/// Appended to a field cut at [`FIELD_CAP`].
pub(crate) const TRUNCATED: &[u8] = b"...[truncated]";

/// Where access lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Off,
    Stdout,
    File(PathBuf),
}

impl Target {
    pub fn from_config(access: &str) -> Target {
        match access {
            "off" => Target::Off,
            "stdout" | "-" => Target::Stdout,
            path => Target::File(PathBuf::from(path)),
        }
    }
}

/// What the workers and the control plane left for the writer.
#[derive(Default)]
struct Pending {
    lines: VecDeque<Vec<u8>>,
    bytes: usize,
    reopen: Option<Target>,
    flushes: Vec<mpsc::Sender<()>>,
}

struct Queue {
    pending: Mutex<Pending>,
    wake: Condvar,
    /// Lines dropped because the queue was full.
    dropped: AtomicU64,
    capacity: usize,
}

impl Queue {
    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Handle on the writer thread; cheap to clone into every worker.
#[derive(Clone)]
pub struct LogWriter {
    queue: Arc<Queue>,
}

impl LogWriter {
    /// Starts the writer thread. Fails when the file cannot be opened.
    pub fn start(target: Target) -> std::io::Result<LogWriter> {
        LogWriter::start_with(target, QUEUE_BYTES)
    }

    fn start_with(target: Target, capacity: usize) -> std::io::Result<LogWriter> {
        LogWriter::spawn(open(&target)?, capacity)
    }

    fn spawn(
        mut sink: Option<Box<dyn Write + Send>>,
        capacity: usize,
    ) -> std::io::Result<LogWriter> {
        let queue = Arc::new(Queue {
            pending: Mutex::default(),
            wake: Condvar::new(),
            dropped: AtomicU64::new(0),
            capacity,
        });
        let q = queue.clone();
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || loop {
                let batch = {
                    let mut p = q.lock();
                    while p.lines.is_empty() && p.reopen.is_none() && p.flushes.is_empty() {
                        p = q.wake.wait(p).unwrap_or_else(|e| e.into_inner());
                    }
                    p.bytes = 0;
                    std::mem::take(&mut *p)
                };
                // Lines queued before a reopen belong to the old file (logrotate renamed
                // it and then signalled), so they are written first.
                if let Some(out) = sink.as_mut() {
                    let written = batch
                        .lines
                        .iter()
                        .try_for_each(|lines| out.write_all(lines))
                        .and_then(|_| out.flush());
                    if let Err(e) = written {
                        tracing::error!(error = %e, "cannot write the access log");
                    }
                }
                if let Some(target) = batch.reopen {
                    match open(&target) {
                        Ok(new) => sink = new,
                        Err(e) => tracing::error!(error = %e, ?target, "cannot reopen the access log; keeping the old one"),
                    }
                }
                for done in batch.flushes {
                    let _ = done.send(());
                }
            })?;
        Ok(LogWriter { queue })
    }

    /// Reopens (or switches) the target: the old file is closed once the new one opened.
    pub(crate) fn reopen(&self, target: Target) -> std::io::Result<()> {
        // Open once here to report errors to the caller (a reload) before switching.
        open(&target)?;
        self.queue.lock().reopen = Some(target);
        self.queue.wake.notify_one();
        Ok(())
    }

    /// Queues a buffer of whole lines, or drops it (counted) when the queue is full. The
    /// queue is charged the buffer's capacity, which is what it holds in memory.
    fn send(&self, lines: Vec<u8>) {
        let cost = lines.capacity();
        let mut p = self.queue.lock();
        if p.bytes + cost > self.queue.capacity {
            drop(p);
            let n = lines.iter().filter(|&&b| b == b'\n').count() as u64;
            self.queue.dropped.fetch_add(n, Ordering::Relaxed);
            return;
        }
        p.bytes += cost;
        p.lines.push_back(lines);
        drop(p);
        self.queue.wake.notify_one();
    }

    /// Lines dropped so far because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.queue.dropped.load(Ordering::Relaxed)
    }

    /// Waits until everything sent so far is written (shutdown).
    pub fn flush(&self) {
        let (done, wait) = mpsc::channel();
        self.queue.lock().flushes.push(done);
        self.queue.wake.notify_one();
        let _ = wait.recv_timeout(std::time::Duration::from_secs(2));
    }
}

/// Whether `target` can be opened for appending (a reload checks before switching).
pub(crate) fn check_target(target: &Target) -> std::io::Result<()> {
    open(target).map(|_| ())
}

fn open(target: &Target) -> std::io::Result<Option<Box<dyn Write + Send>>> {
    Ok(match target {
        Target::Off => None,
        Target::Stdout => Some(Box::new(std::io::stdout())),
        Target::File(path) => Some(Box::new(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))?,
        ) as Box<File>),
    })
}

/// The fields of one access-log line, borrowed from the request's buffers.
pub struct Entry<'a> {
    pub client_ip: IpAddr,
    pub method: &'a [u8],
    pub target: &'a [u8],
    pub version: u8,
    pub status: u16,
    pub body_bytes: u64,
    pub referer: Option<&'a [u8]>,
    pub(crate) user_agent: Option<&'a [u8]>,
    pub duration_us: u64,
    pub upstream: Option<&'a str>,
}

/// A worker's buffer of formatted lines.
pub struct WorkerLog {
    writer: Option<LogWriter>,
    buf: Vec<u8>,
}

/// A buffer this large is handed to the writer at once; smaller ones wait for the tick.
const FLUSH_AT: usize = 32 * 1024;

impl WorkerLog {
    pub fn new(writer: Option<LogWriter>) -> WorkerLog {
        WorkerLog {
            writer,
            buf: Vec::with_capacity(FLUSH_AT + 1024),
        }
    }

    pub fn record(&mut self, format: AccessFormat, entry: &Entry) {
        if self.writer.is_none() {
            return;
        }
        match format {
            AccessFormat::Combined => write_combined(&mut self.buf, entry),
            AccessFormat::Json => write_json(&mut self.buf, entry),
        }
        if self.buf.len() >= FLUSH_AT {
            self.flush();
        }
    }

    pub fn flush(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        if let Some(w) = &self.writer {
            // The tick hands over a few lines in a 33 KiB buffer: a right-sized copy goes
            // instead (and the buffer is kept), so a queue bounded in bytes is not filled
            // by capacity that holds nothing.
            let lines = if self.buf.len() < FLUSH_AT / 2 {
                let copy = self.buf.to_vec();
                self.buf.clear();
                copy
            } else {
                std::mem::replace(&mut self.buf, Vec::with_capacity(FLUSH_AT + 1024))
            };
            w.send(lines);
        }
    }
}

/// `version`: 0 and 1 are HTTP/1.x's minor version; 2 is HTTP/2.
fn version_str(v: u8) -> &'static str {
    match v {
        0 => "HTTP/1.0",
        2 => "HTTP/2.0",
        _ => "HTTP/1.1",
    }
}

/// `203.0.113.7 - - [26/Nov/2026:20:03:09 +0000] "GET /api/x HTTP/1.1" 200 512 "-" "curl/8.0" 1534 127.0.0.1:8081`
pub(crate) fn write_combined(out: &mut Vec<u8>, e: &Entry) {
    let _ = write!(out, "{} - - [", e.client_ip);
    crate::util::clock::with_log_stamp(|stamp| out.extend_from_slice(stamp));
    out.extend_from_slice(b"] \"");
    escape_into(out, e.method);
    out.push(b' ');
    escape_into(out, e.target);
    let _ = write!(
        out,
        " {}\" {} {} \"",
        version_str(e.version),
        e.status,
        e.body_bytes
    );
    escape_into(out, e.referer.unwrap_or(b"-"));
    out.extend_from_slice(b"\" \"");
    escape_into(out, e.user_agent.unwrap_or(b"-"));
    let _ = writeln!(out, "\" {} {}", e.duration_us, e.upstream.unwrap_or("-"));
}

/// nginx escapes `"`, `\` and bytes outside printable ASCII as `\xHH`. At most
/// [`FIELD_CAP`] bytes are written (an escape is never split), then [`TRUNCATED`].
fn escape_into(out: &mut Vec<u8>, bytes: &[u8]) {
    let start = out.len();
    for (i, &b) in bytes.iter().enumerate() {
        let escaped = b == b'"' || b == b'\\' || !(0x20..0x7f).contains(&b);
        let width = if escaped { 4 } else { 1 };
        if out.len() - start + width > FIELD_CAP {
            // The marker is only needed when something is actually left out.
            if i < bytes.len() {
                out.extend_from_slice(TRUNCATED);
            }
            return;
        }
        if escaped {
            let _ = write!(out, "\\x{b:02X}");
        } else {
            out.push(b);
        }
    }
}

/// A field for the JSON format: invalid UTF-8 replaced, cut at [`FIELD_CAP`] bytes on a
/// character boundary and marked. JSON escaping can still widen control characters (up
/// to six bytes each), which keeps the line bounded all the same.
fn json_text(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    if text.len() <= FIELD_CAP {
        return text.into_owned();
    }
    let mut cut = FIELD_CAP;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    let mut s = text[..cut].to_string();
    s.push_str(std::str::from_utf8(TRUNCATED).unwrap_or_default());
    s
}

pub(crate) fn write_json(out: &mut Vec<u8>, e: &Entry) {
    let mut time = String::new();
    crate::util::clock::with_log_stamp(|s| time.push_str(std::str::from_utf8(s).unwrap_or("")));
    let line = serde_json::json!({
        "remote_addr": e.client_ip.to_string(),
        "time": time,
        "method": json_text(e.method),
        "uri": json_text(e.target),
        "protocol": version_str(e.version),
        "status": e.status,
        "body_bytes_sent": e.body_bytes,
        "referer": e.referer.map(json_text),
        "user_agent": e.user_agent.map(json_text),
        "request_time_us": e.duration_us,
        "upstream": e.upstream,
    });
    let _ = serde_json::to_writer(&mut *out, &line);
    out.push(b'\n');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Entry<'static> {
        Entry {
            client_ip: "203.0.113.7".parse().unwrap(),
            method: b"GET",
            target: b"/api/x",
            version: 1,
            status: 200,
            body_bytes: 512,
            referer: None,
            user_agent: Some(b"curl/8.0"),
            duration_us: 1534,
            upstream: Some("127.0.0.1:8081"),
        }
    }

    #[test]
    fn combined_line() {
        let mut out = Vec::new();
        write_combined(&mut out, &entry());
        let line = String::from_utf8(out).unwrap();
        let (head, tail) = line.split_once(" [").unwrap();
        assert_eq!(head, "203.0.113.7 - -");
        assert!(
            tail.ends_with(
                "] \"GET /api/x HTTP/1.1\" 200 512 \"-\" \"curl/8.0\" 1534 127.0.0.1:8081\n"
            ),
            "{line}"
        );
    }

    #[test]
    fn escapes_quotes() {
        let mut out = Vec::new();
        let mut e = entry();
        e.user_agent = Some(b"a\"b\n");
        write_combined(&mut out, &e);
        assert!(String::from_utf8(out).unwrap().contains("\"a\\x22b\\x0A\""));
    }

    #[test]
    fn fields_are_capped_after_escaping() {
        let long_ua = vec![b'"'; 100_000];
        let long_target = vec![b'a'; 100_000];
        let mut e = entry();
        e.user_agent = Some(&long_ua);
        e.target = &long_target;
        let mut out = Vec::new();
        write_combined(&mut out, &e);
        let line = String::from_utf8(out).unwrap();
        assert!(line.len() < 3 * FIELD_CAP, "{} bytes", line.len());
        let ua = line.split("\" \"").nth(1).unwrap();
        assert!(ua.starts_with("\\x22\\x22"), "{ua}");
        assert!(
            ua.contains("\\x22...[truncated]\""),
            "an escape is never split"
        );
        assert!(line.contains(&format!("{}...[truncated] HTTP/1.1", "a".repeat(FIELD_CAP))));

        // Exactly at the cap: nothing left out, no marker.
        let exact = vec![b'b'; FIELD_CAP];
        e.target = &exact;
        let mut out = Vec::new();
        write_combined(&mut out, &e);
        let line = String::from_utf8(out).unwrap();
        assert!(line.contains(&format!(" {} HTTP/1.1", "b".repeat(FIELD_CAP))));

        let mut out = Vec::new();
        e.target = &long_target;
        write_json(&mut out, &e);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        let uri = v["uri"].as_str().unwrap();
        assert_eq!(uri.len(), FIELD_CAP + TRUNCATED.len());
        assert!(out.len() < 2 * FIELD_CAP + 6 * FIELD_CAP);
    }

    #[test]
    fn a_full_queue_drops_and_counts_lines_instead_of_growing() {
        // A writer into a pipe nobody reads stalls like a dead disk; but the simplest
        // stall is a queue smaller than one buffer: nothing fits, everything is counted.
        let w = LogWriter::start_with(Target::Off, 10).unwrap();
        w.send(b"one\ntwo\nthree\n".to_vec());
        assert_eq!(w.dropped(), 3);
        w.send(b"ok\n".to_vec());
        w.flush();
        assert_eq!(w.dropped(), 3);
    }

    /// A sink whose writes block until the test ends: a dead disk.
    struct Stalled(Mutex<mpsc::Receiver<()>>);

    impl Write for Stalled {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let _ = self.0.lock().unwrap().recv();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stalled_writer_bounds_the_queue_by_memory_held_not_bytes_used() {
        let (_hold, rx) = mpsc::channel();
        let w = LogWriter::spawn(Some(Box::new(Stalled(Mutex::new(rx)))), 1 << 20).unwrap();
        let mut log = WorkerLog::new(Some(w.clone()));
        // Ticks that each hand over one short line: right-sized, so thousands fit.
        for _ in 0..2000 {
            write_combined(&mut log.buf, &entry());
            log.flush();
        }
        let kept = 2000 - w.dropped();
        assert!(kept > 1000, "only {kept} short lines queued in 1 MiB");
        // Buffers holding far more than they use are charged what they hold.
        for _ in 0..100 {
            let mut big = Vec::with_capacity(64 * 1024);
            big.extend_from_slice(b"x\n");
            w.send(big);
        }
        // About 800 KiB was left: a dozen of them fit, the rest are dropped.
        assert!(w.dropped() >= 2000 - kept + 80, "{}", w.dropped());
        assert!(w.queue.lock().bytes <= 1 << 20);
    }

    #[test]
    fn json_line() {
        let mut out = Vec::new();
        write_json(&mut out, &entry());
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["status"], 200);
        assert_eq!(v["upstream"], "127.0.0.1:8081");
        assert_eq!(v["request_time_us"], 1534);
    }
}
