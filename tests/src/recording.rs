//! A recording upstream for the framing differential fuzzer: it keeps every byte each
//! connection brought, answers each request its strict parser completes with a tiny 200,
//! and afterwards lets a test parse each byte stream twice, with a strict and a lenient
//! parser.
//!
//! - [`Mode::Strict`] follows RFC 9112 as a proxy must emit it, plus the contract's rule that
//!   the gateway writes the framing it forwards itself (issue 17 items 7 and 8): CRLF line
//!   ends only (§2.2), `name:` with no whitespace before the colon (§5.1), no obs-fold
//!   (§5.2), exactly one framing (§6.3: never both `Content-Length` and
//!   `Transfer-Encoding`), one canonical decimal `Content-Length` field, one
//!   `Transfer-Encoding: chunked` exactly, chunk-size lines `HEX [BWS ";" ext] CRLF` (§7.1),
//!   chunk data followed by CRLF, trailer lines valid fields.
//! - [`Mode::Lenient`] parses as forgiving servers do (nginx, Python's `http.server`,
//!   WSGI stacks): a bare LF ends a line, header names are trimmed, any `Transfer-Encoding`
//!   mentioning `chunked` wins over `Content-Length`, the first `Content-Length`'s leading
//!   digits are the length, a chunk size is its leading hex digits whatever follows.
//!
//! When both parsers read the same requests out of what the gateway forwarded, no server
//! behind it can be desynchronised by those bytes.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

/// Which parser.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Strict,
    Lenient,
}

/// One request as a parser read it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parsed {
    pub method: String,
    pub target: String,
    pub body_len: usize,
}

/// The outcome of parsing a whole recorded stream.
#[derive(Clone, Debug, Default)]
pub struct StreamParse {
    pub requests: Vec<Parsed>,
    /// Why parsing stopped early, if it did (a bad message, or bytes left incomplete).
    pub error: Option<String>,
}

enum Step {
    Done(Parsed, usize),
    More,
    Bad(String),
}

/// Parses every request in `buf` with `mode`.
pub fn parse_stream(buf: &[u8], mode: Mode) -> StreamParse {
    let mut out = StreamParse::default();
    let mut at = 0;
    while at < buf.len() {
        match parse_one(&buf[at..], mode) {
            Step::Done(p, used) => {
                out.requests.push(p);
                at += used;
            }
            Step::More => {
                out.error = Some(format!(
                    "{} bytes left incomplete: {:?}",
                    buf.len() - at,
                    crate::wire::excerpt(&buf[at..])
                ));
                break;
            }
            Step::Bad(e) => {
                out.error = Some(format!(
                    "{e} (at byte {at}: {:?})",
                    crate::wire::excerpt(&buf[at..buf.len().min(at + 160)])
                ));
                break;
            }
        }
    }
    out
}

/// One line from `buf[at..]`: (line without its end, index after the end), `None` when the
/// line is incomplete, `Err` when strict line rules are broken.
fn line(buf: &[u8], at: usize, mode: Mode) -> Result<Option<(&[u8], usize)>, String> {
    let rest = &buf[at..];
    let Some(lf) = rest.iter().position(|&b| b == b'\n') else {
        if mode == Mode::Strict && rest.contains(&b'\r') {
            let cr = rest.iter().position(|&b| b == b'\r').unwrap();
            if cr + 1 < rest.len() {
                return Err(format!("bare CR in {:?}", crate::wire::excerpt(rest)));
            }
        }
        return Ok(None);
    };
    let raw = &rest[..lf];
    match mode {
        Mode::Strict => {
            let Some(text) = raw.strip_suffix(b"\r") else {
                return Err(format!("bare LF after {:?}", crate::wire::excerpt(raw)));
            };
            if text.contains(&b'\r') {
                return Err(format!("bare CR in {:?}", crate::wire::excerpt(text)));
            }
            Ok(Some((text, at + lf + 1)))
        }
        Mode::Lenient => Ok(Some((raw.strip_suffix(b"\r").unwrap_or(raw), at + lf + 1))),
    }
}

macro_rules! next_line {
    ($buf:expr, $at:expr, $mode:expr) => {
        match line($buf, $at, $mode) {
            Ok(Some(l)) => l,
            Ok(None) => return Step::More,
            Err(e) => return Step::Bad(e),
        }
    };
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Header fields, names lower-cased.
type Fields = Vec<(String, String)>;

/// Reads header lines until the empty line: (fields, index after the head).
fn read_fields(buf: &[u8], mut at: usize, mode: Mode) -> Result<Option<(Fields, usize)>, String> {
    let mut out: Vec<(String, String)> = Vec::new();
    loop {
        let (l, next) = match line(buf, at, mode)? {
            Some(l) => l,
            None => return Ok(None),
        };
        at = next;
        if l.is_empty() {
            return Ok(Some((out, at)));
        }
        let text = String::from_utf8_lossy(l).into_owned();
        if text.starts_with([' ', '\t']) {
            if mode == Mode::Strict {
                return Err(format!("obs-fold line {text:?}"));
            }
            continue;
        }
        let Some((name, value)) = text.split_once(':') else {
            if mode == Mode::Strict {
                return Err(format!("field line without colon {text:?}"));
            }
            continue;
        };
        if mode == Mode::Strict && (name.is_empty() || !name.bytes().all(is_tchar)) {
            return Err(format!("bad field name {name:?}"));
        }
        out.push((
            name.trim().to_ascii_lowercase(),
            value.trim_matches([' ', '\t']).to_string(),
        ));
    }
}

fn parse_one(buf: &[u8], mode: Mode) -> Step {
    let (request_line, at) = next_line!(buf, 0, mode);
    let rl = String::from_utf8_lossy(request_line).into_owned();
    let parts: Vec<&str> = match mode {
        Mode::Strict => rl.split(' ').collect(),
        Mode::Lenient => rl.split_whitespace().collect(),
    };
    let ok = match mode {
        Mode::Strict => {
            parts.len() == 3
                && !parts[0].is_empty()
                && parts[0].bytes().all(is_tchar)
                && !parts[1].is_empty()
                && (parts[2] == "HTTP/1.1" || parts[2] == "HTTP/1.0")
        }
        Mode::Lenient => parts.len() >= 2,
    };
    if !ok {
        return Step::Bad(format!("bad request line {rl:?}"));
    }
    let (method, target) = (parts[0].to_string(), parts[1].to_string());
    let (head_fields, mut at) = match read_fields(buf, at, mode) {
        Ok(Some(f)) => f,
        Ok(None) => return Step::More,
        Err(e) => return Step::Bad(e),
    };
    let all = |name: &str| -> Vec<&str> {
        head_fields
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    };
    let te = all("transfer-encoding");
    let cl = all("content-length");
    let chunked = match mode {
        Mode::Strict => {
            if !te.is_empty() && !cl.is_empty() {
                return Step::Bad("both Transfer-Encoding and Content-Length".into());
            }
            if !te.is_empty() && te != ["chunked"] {
                return Step::Bad(format!("Transfer-Encoding {te:?} is not exactly chunked"));
            }
            !te.is_empty()
        }
        Mode::Lenient => te
            .iter()
            .any(|v| v.to_ascii_lowercase().contains("chunked")),
    };
    let done = |body_len, used| {
        Step::Done(
            Parsed {
                method: method.clone(),
                target: target.clone(),
                body_len,
            },
            used,
        )
    };
    if !chunked {
        let len = match mode {
            Mode::Strict => match cl.as_slice() {
                [] => 0,
                [v] if !v.is_empty()
                    && v.bytes().all(|b| b.is_ascii_digit())
                    && (v.len() == 1 || !v.starts_with('0')) =>
                {
                    match v.parse::<usize>() {
                        Ok(n) => n,
                        Err(_) => return Step::Bad(format!("Content-Length {v:?}")),
                    }
                }
                _ => return Step::Bad(format!("Content-Length not one canonical value: {cl:?}")),
            },
            Mode::Lenient => cl.first().map_or(0, |v| {
                let digits: String = v.chars().take_while(|c| c.is_ascii_digit()).collect();
                digits.parse().unwrap_or(0)
            }),
        };
        if buf.len() < at + len {
            return Step::More;
        }
        return done(len, at + len);
    }
    let mut body_len = 0;
    loop {
        let (size_line, next) = next_line!(buf, at, mode);
        at = next;
        let text = String::from_utf8_lossy(size_line).into_owned();
        let size = match mode {
            Mode::Strict => {
                let (size, ext) = match text.split_once(';') {
                    Some((s, e)) => (s.trim_end_matches([' ', '\t']), Some(e)),
                    None => (text.as_str(), None),
                };
                let ext_ok = ext.is_none_or(|e| !e.trim().is_empty());
                if size.is_empty()
                    || size.len() > 15
                    || !size.bytes().all(|b| b.is_ascii_hexdigit())
                    || !ext_ok
                {
                    return Step::Bad(format!("bad chunk-size line {text:?}"));
                }
                usize::from_str_radix(size, 16).unwrap()
            }
            Mode::Lenient => {
                let hex: String = text
                    .trim_start()
                    .chars()
                    .take_while(|c| c.is_ascii_hexdigit())
                    .take(15)
                    .collect();
                usize::from_str_radix(&hex, 16).unwrap_or(0)
            }
        };
        if size == 0 {
            // Trailer section, then the empty line.
            match mode {
                Mode::Strict => match read_fields(buf, at, mode) {
                    Ok(Some((_, end))) => return done(body_len, end),
                    Ok(None) => return Step::More,
                    Err(e) => return Step::Bad(format!("trailer: {e}")),
                },
                Mode::Lenient => loop {
                    let (l, next) = next_line!(buf, at, mode);
                    at = next;
                    if l.is_empty() {
                        return done(body_len, at);
                    }
                },
            }
        }
        if buf.len() < at + size {
            return Step::More;
        }
        at += size;
        body_len += size;
        let (after, next) = next_line!(buf, at, mode);
        if mode == Mode::Strict && !after.is_empty() {
            return Step::Bad("chunk data not followed by CRLF".into());
        }
        at = next;
    }
}

struct Shared {
    stop: AtomicBool,
    conns: Mutex<Vec<Arc<Mutex<Vec<u8>>>>>,
    streams: Mutex<Vec<TcpStream>>,
}

/// The recording upstream; stops on drop.
pub struct Recorder {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

impl Recorder {
    pub fn start() -> Recorder {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind recorder");
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            conns: Mutex::new(Vec::new()),
            streams: Mutex::new(Vec::new()),
        });
        let sh = shared.clone();
        thread::spawn(move || {
            for stream in listener.incoming() {
                if sh.stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                let record = Arc::new(Mutex::new(Vec::new()));
                sh.conns.lock().unwrap().push(record.clone());
                if let Ok(c) = stream.try_clone() {
                    sh.streams.lock().unwrap().push(c);
                }
                thread::spawn(move || serve(stream, &record));
            }
        });
        Recorder { addr, shared }
    }
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
    /// Every connection's bytes so far, in accept order.
    pub fn streams(&self) -> Vec<Vec<u8>> {
        self.shared
            .conns
            .lock()
            .unwrap()
            .iter()
            .map(|r| r.lock().unwrap().clone())
            .collect()
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        for s in self.shared.streams.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

/// Records the connection; answers each strictly parsed request; on a strict error answers
/// 400 and closes (as a strict server would).
fn serve(mut stream: TcpStream, record: &Mutex<Vec<u8>>) {
    let _ = stream.set_nodelay(true);
    let mut buf = Vec::new();
    let mut consumed = 0usize;
    let mut chunk = [0u8; 16384];
    loop {
        let n = match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        record.lock().unwrap().extend_from_slice(&chunk[..n]);
        loop {
            match parse_one(&buf[consumed..], Mode::Strict) {
                Step::Done(p, used) => {
                    consumed += used;
                    let body = format!("{} {}", p.target, p.body_len);
                    let head = if p.method == "HEAD" { 0 } else { body.len() };
                    let mut out =
                        format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len());
                    if head > 0 {
                        out.push_str(&body);
                    }
                    if stream.write_all(out.as_bytes()).is_err() {
                        return;
                    }
                }
                Step::More => break,
                Step::Bad(_) => {
                    let _ = stream.write_all(
                        b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                    );
                    let _ = stream.shutdown(Shutdown::Both);
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn targets(p: &StreamParse) -> Vec<&str> {
        p.requests.iter().map(|r| r.target.as_str()).collect()
    }

    #[test]
    fn both_parsers_agree_on_clean_streams() {
        let s = b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabcGET /b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3;e=1\r\nabc\r\n0\r\nT: 1\r\n\r\n";
        let (strict, lenient) = (
            parse_stream(s, Mode::Strict),
            parse_stream(s, Mode::Lenient),
        );
        assert!(strict.error.is_none(), "{:?}", strict.error);
        assert_eq!(strict.requests, lenient.requests);
        assert_eq!(targets(&strict), ["/a", "/b"]);
        assert_eq!(strict.requests[1].body_len, 3);
    }

    #[test]
    fn bare_lf_trailer_desync_is_visible() {
        // Issue 10 item 2: the lenient parser ends the body at the bare LF and runs what
        // follows; the strict one refuses.
        let s = b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n";
        let strict = parse_stream(s, Mode::Strict);
        assert!(strict.error.is_some());
        assert_eq!(
            targets(&parse_stream(s, Mode::Lenient)),
            ["/a", "/smuggled"]
        );
    }

    #[test]
    fn strict_refuses_non_canonical_framing() {
        for head in [
            "Content-Length: 05",
            "Content-Length: 5, 5",
            "Transfer-Encoding: chunked,",
            "Transfer-Encoding: chunked\r\nContent-Length: 5",
            "X-A : 1\r\nContent-Length: 5",
        ] {
            let s = format!("POST /a HTTP/1.1\r\n{head}\r\n\r\nhello");
            assert!(
                parse_stream(s.as_bytes(), Mode::Strict).error.is_some(),
                "{head}"
            );
        }
    }

    #[test]
    fn lenient_reads_chunk_sizes_like_forgiving_servers() {
        let s = b"POST /a HTTP/1.1\nTransfer-Encoding: chunked\n\n5 junk\nhello\n0\n\n";
        let p = parse_stream(s, Mode::Lenient);
        assert!(p.error.is_none(), "{:?}", p.error);
        assert_eq!(p.requests[0].body_len, 5);
    }
}
