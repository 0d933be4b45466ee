//! The demo upstream: a tiny HTTP/1.1 origin (std::net, one thread per connection) that
//! answers every request with 200 and `{"upstream":"demo","path":...,"method":...}`.
//!
//! It exists so `cargo xtask run` serves a proxied response on a fresh machine, and for docs
//! and manual tests. It keeps connections alive (so the gateway's upstream pool is exercised),
//! reads and discards request bodies (Content-Length or chunked), answers
//! `Expect: 100-continue`, and closes idle connections after [`IDLE_TIMEOUT`].
//! Not a goal: being fast or strict; benchmarks and conformance tests use their own origins.

use std::{
    io::{self, BufRead, BufReader, Read, Write},
    net::{TcpListener, TcpStream},
    thread,
    time::Duration,
};

use anyhow::{Context, Result};

/// Idle keep-alive connections are closed after this long (nginx's default is 75 s).
const IDLE_TIMEOUT: Duration = Duration::from_secs(75);
/// A request head larger than this is answered 431 and the connection closed.
const MAX_HEAD_BYTES: usize = 64 * 1024;

#[derive(clap::Args)]
pub struct Args {
    /// Address to listen on (port 0 picks a free port; the address is printed).
    #[arg(long, default_value = "127.0.0.1:8081")]
    pub listen: String,
}

pub fn run(args: &Args) -> Result<()> {
    let listener = bind(&args.listen)?;
    println!(
        "demo upstream listening on {}",
        listener.local_addr().context("local_addr")?
    );
    serve(listener);
    Ok(())
}

pub fn bind(addr: &str) -> Result<TcpListener> {
    TcpListener::bind(addr).with_context(|| format!("demo upstream: binding {addr}"))
}

/// Accepts forever, one thread per connection.
pub fn serve(listener: TcpListener) {
    for conn in listener.incoming() {
        match conn {
            Ok(stream) => {
                thread::spawn(move || {
                    // A peer that goes away mid-request is not worth reporting.
                    let _ = handle(stream);
                });
            }
            Err(e) => {
                eprintln!("demo upstream: accept: {e}");
                thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// Starts [`serve`] on a background thread.
pub fn spawn(listener: TcpListener) -> thread::JoinHandle<()> {
    thread::spawn(move || serve(listener))
}

struct Head {
    method: String,
    path: String,
    keep_alive: bool,
    body: Body,
    expect_continue: bool,
}

enum Body {
    None,
    Length(u64),
    Chunked,
}

fn handle(stream: TcpStream) -> io::Result<()> {
    stream.set_read_timeout(Some(IDLE_TIMEOUT))?;
    let _ = stream.set_nodelay(true);
    let mut reader = BufReader::with_capacity(16 * 1024, stream.try_clone()?);
    let mut writer = stream;
    loop {
        let head = match read_head(&mut reader)? {
            None => return Ok(()),
            Some(Ok(head)) => head,
            Some(Err(status)) => {
                let reason = if status == 431 {
                    "Request Header Fields Too Large"
                } else {
                    "Bad Request"
                };
                let body = format!("{reason}\n");
                write!(
                    writer,
                    "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\n\
                     Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                )?;
                return writer.flush();
            }
        };
        if head.expect_continue && !matches!(head.body, Body::None) {
            writer.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
            writer.flush()?;
        }
        match head.body {
            Body::None => {}
            Body::Length(n) => {
                let copied = io::copy(&mut (&mut reader).take(n), &mut io::sink())?;
                if copied != n {
                    return Ok(()); // peer closed mid-body
                }
            }
            Body::Chunked => discard_chunked(&mut reader)?,
        }
        let body = format!(
            "{{\"upstream\":\"demo\",\"path\":\"{}\",\"method\":\"{}\"}}\n",
            json_escape(&head.path),
            json_escape(&head.method)
        );
        let connection = if head.keep_alive {
            "keep-alive"
        } else {
            "close"
        };
        let mut response = format!(
            "HTTP/1.1 200 OK\r\nServer: gateway-demo-upstream\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\nConnection: {connection}\r\n\r\n",
            body.len()
        );
        if head.method != "HEAD" {
            response.push_str(&body);
        }
        writer.write_all(response.as_bytes())?;
        writer.flush()?;
        if !head.keep_alive {
            return Ok(());
        }
    }
}

/// Reads one request head. `None` on a clean close before any byte; `Some(Err(status))` on a
/// head we will not serve.
fn read_head(reader: &mut impl BufRead) -> io::Result<Option<Result<Head, u16>>> {
    let mut total = 0usize;
    let mut line = Vec::new();
    // RFC 9112 section 2.2: a server should ignore empty lines before the request line.
    let request_line = loop {
        line.clear();
        let n = reader.read_until(b'\n', &mut line)?;
        if n == 0 {
            return Ok(None);
        }
        total += n;
        if total > MAX_HEAD_BYTES {
            return Ok(Some(Err(431)));
        }
        let l = trim_eol(&line);
        if !l.is_empty() {
            break String::from_utf8_lossy(l).into_owned();
        }
    };
    let mut parts = request_line.split_ascii_whitespace();
    let (Some(method), Some(path), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Ok(Some(Err(400)));
    };
    let http10 = version == "HTTP/1.0";
    if !http10 && version != "HTTP/1.1" {
        return Ok(Some(Err(400)));
    }

    let mut content_length: Option<u64> = None;
    let mut chunked = false;
    let mut connection = String::new();
    let mut expect_continue = false;
    loop {
        line.clear();
        let n = reader.read_until(b'\n', &mut line)?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        total += n;
        if total > MAX_HEAD_BYTES {
            return Ok(Some(Err(431)));
        }
        let l = trim_eol(&line);
        if l.is_empty() {
            break;
        }
        let l = String::from_utf8_lossy(l);
        let Some((name, value)) = l.split_once(':') else {
            return Ok(Some(Err(400)));
        };
        let value = value.trim();
        match name.to_ascii_lowercase().as_str() {
            "content-length" => match value.parse() {
                Ok(v) if content_length.is_none_or(|c| c == v) => content_length = Some(v),
                _ => return Ok(Some(Err(400))),
            },
            "transfer-encoding" => {
                chunked = value
                    .rsplit(',')
                    .next()
                    .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"));
                if !chunked {
                    return Ok(Some(Err(400)));
                }
            }
            "connection" => {
                connection.push(',');
                connection.push_str(&value.to_ascii_lowercase());
            }
            "expect" => expect_continue = value.eq_ignore_ascii_case("100-continue"),
            _ => {}
        }
    }
    let has = |token: &str| connection.split(',').any(|t| t.trim() == token);
    let keep_alive = if http10 {
        has("keep-alive")
    } else {
        !has("close")
    };
    let body = match (chunked, content_length) {
        (true, Some(_)) => return Ok(Some(Err(400))),
        (true, None) => Body::Chunked,
        (false, Some(n)) if n > 0 => Body::Length(n),
        _ => Body::None,
    };
    Ok(Some(Ok(Head {
        method: method.to_string(),
        path: path.to_string(),
        keep_alive,
        body,
        expect_continue,
    })))
}

/// Reads a chunked body (RFC 9112 section 7.1) to its end, trailers included, discarding it.
fn discard_chunked(reader: &mut impl BufRead) -> io::Result<()> {
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "bad chunked body");
    let mut line = Vec::new();
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line)? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let text = String::from_utf8_lossy(trim_eol(&line)).into_owned();
        let size_hex = text.split(';').next().unwrap_or("").trim();
        let size = u64::from_str_radix(size_hex, 16).map_err(|_| bad())?;
        if size == 0 {
            // Trailer section, up to the empty line.
            loop {
                line.clear();
                if reader.read_until(b'\n', &mut line)? == 0 || trim_eol(&line).is_empty() {
                    return Ok(());
                }
            }
        }
        let copied = io::copy(&mut reader.take(size), &mut io::sink())?;
        if copied != size {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        line.clear();
        reader.read_until(b'\n', &mut line)?;
        if !trim_eol(&line).is_empty() {
            return Err(bad());
        }
    }
}

fn trim_eol(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

fn json_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn head(raw: &str) -> Result<Head, u16> {
        read_head(&mut Cursor::new(raw.as_bytes()))
            .unwrap()
            .unwrap()
    }

    #[test]
    fn parses_keep_alive_and_bodies() {
        let h = head("GET /api/x HTTP/1.1\r\nHost: a\r\n\r\n").unwrap();
        assert_eq!((h.method.as_str(), h.path.as_str()), ("GET", "/api/x"));
        assert!(h.keep_alive && matches!(h.body, Body::None));
        let h = head("POST / HTTP/1.1\r\nContent-Length: 5\r\nConnection: close\r\n\r\n").unwrap();
        assert!(!h.keep_alive && matches!(h.body, Body::Length(5)));
        let h = head("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n").unwrap();
        assert!(!h.keep_alive && matches!(h.body, Body::Chunked));
        assert_eq!(
            head("POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n")
                .err(),
            Some(400)
        );
        assert_eq!(head("nonsense\r\n\r\n").err(), Some(400));
    }

    #[test]
    fn discards_chunked_body_and_trailers() {
        let mut r = Cursor::new(&b"5\r\nhello\r\n3;ext=1\r\nabc\r\n0\r\nX-T: 1\r\n\r\nNEXT"[..]);
        discard_chunked(&mut r).unwrap();
        let mut rest = String::new();
        r.read_to_string(&mut rest).unwrap();
        assert_eq!(rest, "NEXT");
    }

    #[test]
    fn escapes_json() {
        assert_eq!(json_escape("/a\"b\\c\u{1}"), "/a\\\"b\\\\c\\u0001");
    }
}
