//! The access log: one line per request, nginx `combined` plus the request time in
//! microseconds and the upstream address, or the same fields as JSON.
//!
//! Workers format lines into a buffer of their own and hand full buffers (or every
//! 200 ms) to one writer thread, so a slow disk never stalls a request. The writer
//! reopens its file on reload, for logrotate.

use crate::config::AccessFormat;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::mpsc;

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

enum Message {
    Lines(Vec<u8>),
    Reopen(Target),
    Flush(mpsc::Sender<()>),
}

/// Handle on the writer thread; cheap to clone into every worker.
#[derive(Clone)]
pub struct LogWriter {
    tx: mpsc::Sender<Message>,
}

impl LogWriter {
    /// Starts the writer thread. Fails when the file cannot be opened.
    pub fn start(target: Target) -> std::io::Result<LogWriter> {
        let mut sink = open(&target)?;
        let (tx, rx) = mpsc::channel::<Message>();
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || {
                for message in rx {
                    match message {
                        Message::Lines(lines) => {
                            if let Some(out) = sink.as_mut() {
                                if let Err(e) = out.write_all(&lines).and_then(|_| out.flush()) {
                                    tracing::error!(error = %e, "cannot write the access log");
                                }
                            }
                        }
                        Message::Reopen(target) => match open(&target) {
                            Ok(new) => sink = new,
                            Err(e) => tracing::error!(error = %e, ?target, "cannot reopen the access log; keeping the old one"),
                        },
                        Message::Flush(done) => {
                            let _ = done.send(());
                        }
                    }
                }
            })?;
        Ok(LogWriter { tx })
    }

    /// Reopens (or switches) the target: the old file is closed once the new one opened.
    pub fn reopen(&self, target: Target) -> std::io::Result<()> {
        // Open once here to report errors to the caller (a reload) before switching.
        open(&target)?;
        let _ = self.tx.send(Message::Reopen(target));
        Ok(())
    }

    fn send(&self, lines: Vec<u8>) {
        let _ = self.tx.send(Message::Lines(lines));
    }

    /// Waits until everything sent so far is written (shutdown).
    pub fn flush(&self) {
        let (done, wait) = mpsc::channel();
        if self.tx.send(Message::Flush(done)).is_ok() {
            let _ = wait.recv_timeout(std::time::Duration::from_secs(2));
        }
    }
}

/// Whether `target` can be opened for appending (a reload checks before switching).
pub fn check_target(target: &Target) -> std::io::Result<()> {
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
    pub user_agent: Option<&'a [u8]>,
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
            let full = std::mem::replace(&mut self.buf, Vec::with_capacity(FLUSH_AT + 1024));
            w.send(full);
        }
    }
}

fn version_str(v: u8) -> &'static str {
    if v == 0 {
        "HTTP/1.0"
    } else {
        "HTTP/1.1"
    }
}

/// `203.0.113.7 - - [26/Nov/2026:20:03:09 +0000] "GET /api/x HTTP/1.1" 200 512 "-" "curl/8.0" 1534 127.0.0.1:8081`
pub fn write_combined(out: &mut Vec<u8>, e: &Entry) {
    let _ = write!(out, "{} - - [", e.client_ip);
    crate::clock::with_log_stamp(|stamp| out.extend_from_slice(stamp));
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

/// nginx escapes `"`, `\` and bytes outside printable ASCII as `\xHH`.
fn escape_into(out: &mut Vec<u8>, bytes: &[u8]) {
    for &b in bytes {
        if b == b'"' || b == b'\\' || !(0x20..0x7f).contains(&b) {
            let _ = write!(out, "\\x{b:02X}");
        } else {
            out.push(b);
        }
    }
}

pub fn write_json(out: &mut Vec<u8>, e: &Entry) {
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    let mut time = String::new();
    crate::clock::with_log_stamp(|s| time.push_str(std::str::from_utf8(s).unwrap_or("")));
    let line = serde_json::json!({
        "remote_addr": e.client_ip.to_string(),
        "time": time,
        "method": text(e.method),
        "uri": text(e.target),
        "protocol": version_str(e.version),
        "status": e.status,
        "body_bytes_sent": e.body_bytes,
        "referer": e.referer.map(text),
        "user_agent": e.user_agent.map(text),
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
    fn json_line() {
        let mut out = Vec::new();
        write_json(&mut out, &entry());
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["status"], 200);
        assert_eq!(v["upstream"], "127.0.0.1:8081");
        assert_eq!(v["request_time_us"], 1534);
    }
}
