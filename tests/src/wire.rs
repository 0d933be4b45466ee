//! Byte-level HTTP/1.1 reading shared by the test client and the test origins.
//!
//! Deliberately independent from the gateway's own codec (no `httparse`): a test that used
//! the same parser as the code under test could not catch that parser's mistakes. The rules
//! follow RFC 9112 and are strict where a proxy must be strict: heads end in CRLF CRLF,
//! header lines are `name ":" OWS value OWS`, chunk sizes are hex digits only. A message that
//! breaks them is an error here, so a proxy that emits sloppy framing fails the tests.

use std::io::{self, Read};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// How a message body was (or is to be) delimited (RFC 9112 §6.3).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BodyFraming {
    /// No body at all: HEAD, 1xx, 204, 304, or a request with neither CL nor TE.
    None,
    /// `Content-Length: n`.
    ContentLength(usize),
    /// `Transfer-Encoding: chunked`; the sizes of the data chunks as they arrived.
    Chunked(Vec<usize>),
    /// Response delimited by the connection closing.
    Close,
}

/// Headers in arrival order, names as sent (compare them case-insensitively).
pub type Headers = Vec<(String, String)>;

/// First value of header `name` (case-insensitive).
pub fn header<'a>(headers: &'a Headers, name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// Every value of header `name` in order (case-insensitive).
pub fn header_all<'a>(headers: &'a Headers, name: &str) -> Vec<&'a str> {
    headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
        .collect()
}

/// The comma-separated list elements of every `name` header, trimmed and lower-cased.
pub fn header_tokens(headers: &Headers, name: &str) -> Vec<String> {
    header_all(headers, name)
        .iter()
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect()
}

/// A parsed head: the start line and the header fields.
#[derive(Clone, Debug)]
pub struct Head {
    pub start_line: String,
    pub headers: Headers,
    /// The head exactly as received, CRLF CRLF included.
    pub raw: Vec<u8>,
}

/// Splits a raw head (ending in CRLF CRLF) into start line and header fields, strictly.
pub fn parse_head(raw: &[u8]) -> Result<Head, String> {
    let text = std::str::from_utf8(raw).map_err(|_| "head is not UTF-8".to_string())?;
    let text = text
        .strip_suffix("\r\n\r\n")
        .ok_or_else(|| "head does not end in CRLF CRLF".to_string())?;
    let mut lines = text.split("\r\n");
    let start_line = lines.next().unwrap_or_default().to_string();
    let mut headers = Vec::new();
    for line in lines {
        if line.contains('\n') || line.contains('\r') {
            return Err(format!("bare CR or LF in header line {line:?}"));
        }
        if line.starts_with(' ') || line.starts_with('\t') {
            return Err(format!("obs-fold line {line:?}"));
        }
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| format!("header line without colon {line:?}"))?;
        if name.is_empty() || name.bytes().any(|b| !is_tchar(b)) {
            return Err(format!("bad header name {name:?}"));
        }
        headers.push((
            name.to_string(),
            value.trim_matches([' ', '\t']).to_string(),
        ));
    }
    Ok(Head {
        start_line,
        headers,
        raw: raw.to_vec(),
    })
}

/// RFC 9110 §5.6.2 token characters.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// A buffered reader over one TCP connection. Read timeouts come from the socket; a timed-out
/// read surfaces as an `io::Error` of kind `WouldBlock`/`TimedOut`.
pub struct Wire {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

/// Upper bound on a head this reader accepts (a proxy that sends more is broken).
pub const MAX_HEAD: usize = 256 * 1024;

impl Wire {
    pub fn new(stream: TcpStream) -> Wire {
        Wire {
            stream,
            buf: Vec::with_capacity(64 * 1024),
        }
    }

    /// Bytes received but not consumed yet.
    pub fn buffered(&self) -> &[u8] {
        &self.buf
    }

    /// Forgets the bytes received but not consumed.
    pub fn discard_buffered(&mut self) {
        self.buf.clear();
    }

    /// Reads once more into the buffer; `Ok(0)` at end of stream.
    pub fn fill(&mut self) -> io::Result<usize> {
        let mut chunk = [0u8; 64 * 1024];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Reads one head. `Ok(None)` when the peer closed cleanly before sending any byte of it.
    pub fn read_head(&mut self) -> io::Result<Option<Head>> {
        loop {
            if let Some(end) = find(&self.buf, b"\r\n\r\n") {
                let raw: Vec<u8> = self.buf.drain(..end + 4).collect();
                return parse_head(&raw)
                    .map(Some)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e));
            }
            if self.buf.len() > MAX_HEAD {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "head too large"));
            }
            if self.fill()? == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!(
                            "connection closed inside a head: {:?}",
                            String::from_utf8_lossy(&self.buf)
                        ),
                    ))
                };
            }
        }
    }

    /// Reads exactly `n` bytes.
    pub fn read_exact_vec(&mut self, n: usize) -> io::Result<Vec<u8>> {
        while self.buf.len() < n {
            if self.fill()? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("closed after {} of {n} body bytes", self.buf.len()),
                ));
            }
        }
        Ok(self.buf.drain(..n).collect())
    }

    /// Reads one CRLF-terminated line, without its CRLF.
    pub fn read_line(&mut self) -> io::Result<Vec<u8>> {
        loop {
            if let Some(end) = find(&self.buf, b"\r\n") {
                let mut line: Vec<u8> = self.buf.drain(..end + 2).collect();
                line.truncate(end);
                return Ok(line);
            }
            if self.buf.len() > MAX_HEAD {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "line too long"));
            }
            if self.fill()? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "closed inside a line",
                ));
            }
        }
    }

    /// Reads a chunked body (RFC 9112 §7.1): returns the data, the chunk sizes seen and the
    /// trailer fields. Chunk extensions are accepted and ignored.
    pub fn read_chunked(&mut self) -> io::Result<(Vec<u8>, Vec<usize>, Headers)> {
        let mut body = Vec::new();
        let mut sizes = Vec::new();
        loop {
            let line = self.read_line()?;
            let line = String::from_utf8(line)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "chunk size not UTF-8"))?;
            let size_text = line
                .split(';')
                .next()
                .unwrap_or_default()
                .trim_end_matches([' ', '\t']);
            if size_text.is_empty()
                || size_text.len() > 15
                || !size_text.bytes().all(|b| b.is_ascii_hexdigit())
            {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("bad chunk size line {line:?}"),
                ));
            }
            let size = usize::from_str_radix(size_text, 16).unwrap();
            if size == 0 {
                let mut trailers = Vec::new();
                loop {
                    let t = self.read_line()?;
                    if t.is_empty() {
                        return Ok((body, sizes, trailers));
                    }
                    let t = String::from_utf8_lossy(&t).to_string();
                    let (n, v) = t.split_once(':').ok_or_else(|| {
                        io::Error::new(io::ErrorKind::InvalidData, format!("bad trailer {t:?}"))
                    })?;
                    trailers.push((n.to_string(), v.trim().to_string()));
                }
            }
            body.extend_from_slice(&self.read_exact_vec(size)?);
            sizes.push(size);
            let crlf = self.read_exact_vec(2)?;
            if crlf != b"\r\n" {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "chunk data not followed by CRLF",
                ));
            }
        }
    }

    /// Reads until the peer closes; a reset before that is an error.
    pub fn read_to_eof(&mut self) -> io::Result<Vec<u8>> {
        while self.fill()? != 0 {}
        Ok(std::mem::take(&mut self.buf))
    }

    /// Waits up to `timeout` for the peer to close. Returns how the wait ended and any bytes
    /// that arrived meanwhile (beyond those already buffered, which are included first).
    pub fn wait_closed(&mut self, timeout: Duration) -> (CloseOutcome, Vec<u8>) {
        let deadline = Instant::now() + timeout;
        let old = self.stream.read_timeout().ok().flatten();
        let outcome = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break CloseOutcome::StillOpen;
            }
            let _ = self.stream.set_read_timeout(Some(left));
            match self.fill() {
                Ok(0) => break CloseOutcome::Eof,
                Ok(_) => continue,
                Err(e) if is_timeout(&e) => break CloseOutcome::StillOpen,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => break CloseOutcome::Reset,
            }
        };
        let _ = self.stream.set_read_timeout(old);
        (outcome, std::mem::take(&mut self.buf))
    }
}

/// How [`Wire::wait_closed`] ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseOutcome {
    Eof,
    Reset,
    StillOpen,
}

impl CloseOutcome {
    pub fn is_closed(self) -> bool {
        self != CloseOutcome::StillOpen
    }
}

pub fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Encodes `body` with chunked transfer coding, cutting chunks of the given sizes in turn
/// (cycled; an empty list means one chunk). Ends with the last-chunk and no trailers.
pub fn encode_chunked(body: &[u8], sizes: &[usize]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + body.len() / 8 + 16);
    let mut at = 0;
    let mut i = 0;
    while at < body.len() {
        let want = if sizes.is_empty() {
            body.len()
        } else {
            sizes[i % sizes.len()].max(1)
        };
        let n = want.min(body.len() - at);
        out.extend_from_slice(format!("{n:x}\r\n").as_bytes());
        out.extend_from_slice(&body[at..at + n]);
        out.extend_from_slice(b"\r\n");
        at += n;
        i += 1;
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

/// Deterministic pseudo-random bytes (xorshift64*), so large bodies are not compressible or
/// periodic and a misplaced byte is caught by comparison.
pub fn pattern_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// At most the first 200 bytes of `bytes`, lossily as text, for assertion messages.
pub fn excerpt(bytes: &[u8]) -> String {
    let cut = &bytes[..bytes.len().min(200)];
    let mut s = String::from_utf8_lossy(cut).into_owned();
    if bytes.len() > 200 {
        s.push_str(&format!("… ({} bytes)", bytes.len()));
    }
    s
}
