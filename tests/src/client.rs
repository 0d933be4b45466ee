//! The raw test client: exact bytes out, one fully parsed response in.
//!
//! Requests are built with [`Req`] (or written by hand as bytes, for malformed input) and
//! sent over a plain `TcpStream`, optionally from a chosen loopback source address
//! (127.0.0.0/8 is all local on Linux, so `127.0.0.7` is a distinct "client IP"). Responses
//! are read per RFC 9112 §6.3: no body for HEAD/1xx/204/304, else chunked, else
//! Content-Length, else until close. Interim 1xx responses (other than 101) are collected
//! on the final [`Response`]. Every read has a timeout, so a hung proxy fails a test
//! instead of hanging it.

use std::io::{self, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::Duration;

use socket2::{Domain, Socket, Type};

use crate::wire::{self, BodyFraming, CloseOutcome, Head, Headers, Wire};

/// Default bound on any single read by the client.
pub const CLIENT_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// An interim (1xx) response.
#[derive(Clone, Debug)]
pub struct Interim {
    pub status: u16,
    pub headers: Headers,
}

/// One final response as the client received it.
#[derive(Clone, Debug)]
pub struct Response {
    pub version: String,
    pub status: u16,
    pub reason: String,
    pub headers: Headers,
    pub body: Vec<u8>,
    pub framing: BodyFraming,
    pub trailers: Headers,
    /// 1xx responses received before this one, in order.
    pub interim: Vec<Interim>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        wire::header(&self.headers, name)
    }
    pub fn header_all(&self, name: &str) -> Vec<&str> {
        wire::header_all(&self.headers, name)
    }
    pub fn body_str(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    /// True when the response says the server will close the connection.
    pub fn says_close(&self) -> bool {
        wire::header_tokens(&self.headers, "connection")
            .iter()
            .any(|t| t == "close")
    }
}

/// A request to send: start line, headers in order, and a body with its framing.
#[derive(Clone, Debug)]
pub struct Req {
    pub method: String,
    pub target: String,
    pub version: String,
    pub headers: Headers,
    pub body: Vec<u8>,
    /// `None`: Content-Length when the body is non-empty or the method is POST/PUT/PATCH.
    /// `Some(sizes)`: chunked with these chunk sizes.
    pub chunked: Option<Vec<usize>>,
    /// Suppress the automatic Content-Length (for hand-made framing headers).
    pub no_auto_length: bool,
}

impl Req {
    pub fn new(method: &str, target: &str) -> Req {
        Req {
            method: method.to_string(),
            target: target.to_string(),
            version: "HTTP/1.1".to_string(),
            headers: vec![("Host".to_string(), "gateway.test".to_string())],
            body: Vec::new(),
            chunked: None,
            no_auto_length: false,
        }
    }
    pub fn get(target: &str) -> Req {
        Req::new("GET", target)
    }
    pub fn head(target: &str) -> Req {
        Req::new("HEAD", target)
    }
    pub fn post(target: &str, body: impl Into<Vec<u8>>) -> Req {
        Req::new("POST", target).body(body)
    }
    /// Appends a header (duplicates allowed).
    pub fn header(mut self, name: &str, value: &str) -> Req {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }
    /// Replaces the Host header (removes it when `host` is `None`).
    pub fn host(mut self, host: Option<&str>) -> Req {
        self.headers
            .retain(|(n, _)| !n.eq_ignore_ascii_case("host"));
        if let Some(h) = host {
            self.headers.insert(0, ("Host".to_string(), h.to_string()));
        }
        self
    }
    pub fn version(mut self, v: &str) -> Req {
        self.version = v.to_string();
        self
    }
    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Req {
        self.body = body.into();
        self
    }
    /// Sends the body chunked, cut into chunks of these sizes (cycled).
    pub fn chunked(mut self, sizes: &[usize]) -> Req {
        self.chunked = Some(sizes.to_vec());
        self
    }
    pub fn no_auto_length(mut self) -> Req {
        self.no_auto_length = true;
        self
    }
    /// The exact bytes of this request.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = format!("{} {} {}\r\n", self.method, self.target, self.version).into_bytes();
        for (n, v) in &self.headers {
            out.extend_from_slice(format!("{n}: {v}\r\n").as_bytes());
        }
        match &self.chunked {
            Some(sizes) => {
                out.extend_from_slice(b"Transfer-Encoding: chunked\r\n\r\n");
                out.extend_from_slice(&wire::encode_chunked(&self.body, sizes));
            }
            None => {
                let wants_length = !self.body.is_empty()
                    || matches!(self.method.as_str(), "POST" | "PUT" | "PATCH");
                if wants_length && !self.no_auto_length {
                    out.extend_from_slice(
                        format!("Content-Length: {}\r\n", self.body.len()).as_bytes(),
                    );
                }
                out.extend_from_slice(b"\r\n");
                out.extend_from_slice(&self.body);
            }
        }
        out
    }
}

/// Connects to `addr` (5 s connect timeout) with the default read/write timeouts.
pub fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    s.set_read_timeout(Some(CLIENT_READ_TIMEOUT)).unwrap();
    s.set_write_timeout(Some(CLIENT_READ_TIMEOUT)).unwrap();
    s.set_nodelay(true).unwrap();
    s
}

/// Connects to `addr` from the local address `source` (port chosen by the kernel).
pub fn connect_from(source: IpAddr, addr: SocketAddr) -> TcpStream {
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, None).unwrap();
    sock.bind(&SocketAddr::new(source, 0).into())
        .unwrap_or_else(|e| panic!("bind client to {source}: {e}"));
    sock.connect_timeout(&addr.into(), Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("connect to {addr} from {source}: {e}"));
    let s: TcpStream = sock.into();
    s.set_read_timeout(Some(CLIENT_READ_TIMEOUT)).unwrap();
    s.set_write_timeout(Some(CLIENT_READ_TIMEOUT)).unwrap();
    s.set_nodelay(true).unwrap();
    s
}

/// One client connection.
pub struct Client {
    pub wire: Wire,
}

impl Client {
    pub fn connect(addr: SocketAddr) -> Client {
        Client {
            wire: Wire::new(connect(addr)),
        }
    }
    pub fn connect_from(source: IpAddr, addr: SocketAddr) -> Client {
        Client {
            wire: Wire::new(connect_from(source, addr)),
        }
    }
    pub fn stream(&self) -> &TcpStream {
        &self.wire.stream
    }
    pub fn set_read_timeout(&self, t: Duration) {
        self.wire.stream.set_read_timeout(Some(t)).unwrap();
    }
    /// Writes exactly these bytes.
    pub fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.wire.stream.write_all(bytes)?;
        self.wire.stream.flush()
    }
    /// Reads one head (interim or final) without its body.
    pub fn read_head(&mut self) -> io::Result<Head> {
        self.wire.read_head()?.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed before a response",
            )
        })
    }
    /// Reads the final response to a request with method `method`, collecting 1xx on the way.
    pub fn read_response_for(&mut self, method: &str) -> io::Result<Response> {
        let mut interim = Vec::new();
        loop {
            let head = self.read_head()?;
            let (version, status, reason) = parse_status_line(&head.start_line)?;
            if (100..200).contains(&status) && status != 101 {
                interim.push(Interim {
                    status,
                    headers: head.headers,
                });
                continue;
            }
            let (body, framing, trailers) = match self.read_body(method, status, &head.headers) {
                Ok(b) => b,
                Err(e) => {
                    // The partial body belongs to the failed response, not to whatever
                    // follows: drop it so `wait_closed` reports only later bytes.
                    self.wire.discard_buffered();
                    return Err(e);
                }
            };
            return Ok(Response {
                version,
                status,
                reason,
                headers: head.headers,
                body,
                framing,
                trailers,
                interim,
            });
        }
    }
    /// Reads the final response to a non-HEAD request.
    pub fn read_response(&mut self) -> io::Result<Response> {
        self.read_response_for("GET")
    }
    fn read_body(
        &mut self,
        method: &str,
        status: u16,
        headers: &Headers,
    ) -> io::Result<(Vec<u8>, BodyFraming, Headers)> {
        if method == "HEAD" || status == 204 || status == 304 || status == 101 {
            return Ok((Vec::new(), BodyFraming::None, Vec::new()));
        }
        let te = wire::header_tokens(headers, "transfer-encoding");
        let cls = wire::header_all(headers, "content-length");
        if !te.is_empty() {
            if !cls.is_empty() {
                return Err(invalid(
                    "response has both Transfer-Encoding and Content-Length",
                ));
            }
            if te != ["chunked"] {
                return Err(invalid(&format!("response transfer coding {te:?}")));
            }
            let (body, sizes, trailers) = self.wire.read_chunked()?;
            return Ok((body, BodyFraming::Chunked(sizes), trailers));
        }
        if !cls.is_empty() {
            if cls.len() > 1 {
                return Err(invalid(&format!(
                    "response has several Content-Length {cls:?}"
                )));
            }
            let n: usize = cls[0]
                .parse()
                .map_err(|_| invalid(&format!("bad response Content-Length {:?}", cls[0])))?;
            let body = self.wire.read_exact_vec(n)?;
            return Ok((body, BodyFraming::ContentLength(n), Vec::new()));
        }
        let body = self.wire.read_to_eof()?;
        Ok((body, BodyFraming::Close, Vec::new()))
    }
    /// Sends `req` and reads its response.
    pub fn request(&mut self, req: &Req) -> io::Result<Response> {
        self.send(&req.to_bytes())?;
        self.read_response_for(&req.method)
    }
    /// Like [`Client::request`], panicking with context on any I/O error.
    pub fn must(&mut self, req: &Req) -> Response {
        self.request(req).unwrap_or_else(|e| {
            if wire::is_timeout(&e) {
                let t = self.wire.stream.read_timeout().ok().flatten();
                panic!(
                    "{} {}: no complete response within {t:?}",
                    req.method, req.target
                )
            }
            panic!("{} {}: {e}", req.method, req.target)
        })
    }
    pub fn get(&mut self, target: &str) -> Response {
        self.must(&Req::get(target))
    }
    /// Sends `req` `n` times on this connection, one after the other (keep-alive).
    pub fn repeat(&mut self, req: &Req, n: usize) -> Vec<Response> {
        (0..n).map(|_| self.must(req)).collect()
    }
    /// Sends every request in one write, then reads the responses in order.
    pub fn pipeline(&mut self, reqs: &[Req]) -> io::Result<Vec<Response>> {
        let mut all = Vec::new();
        for r in reqs {
            all.extend_from_slice(&r.to_bytes());
        }
        self.send(&all)?;
        reqs.iter()
            .map(|r| self.read_response_for(&r.method))
            .collect()
    }
    /// Waits up to `timeout` for the server to close; see [`Wire::wait_closed`].
    pub fn wait_closed(&mut self, timeout: Duration) -> (CloseOutcome, Vec<u8>) {
        self.wire.wait_closed(timeout)
    }
    /// Asserts that the server closes the connection within `timeout` without sending more.
    pub fn expect_closed(&mut self, timeout: Duration, context: &str) {
        let (outcome, extra) = self.wait_closed(timeout);
        assert!(
            outcome.is_closed(),
            "{context}: connection still open after {timeout:?}"
        );
        assert!(
            extra.is_empty(),
            "{context}: {} unexpected bytes before close: {:?}",
            extra.len(),
            crate::wire::excerpt(&extra)
        );
    }
}

fn invalid(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_string())
}

/// `HTTP/1.1 200 OK` → ("HTTP/1.1", 200, "OK").
pub fn parse_status_line(line: &str) -> io::Result<(String, u16, String)> {
    let mut parts = line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    let code = parts.next().unwrap_or_default();
    let reason = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") || code.len() != 3 {
        return Err(invalid(&format!("bad status line {line:?}")));
    }
    let status = code
        .parse()
        .map_err(|_| invalid(&format!("bad status line {line:?}")))?;
    Ok((version.to_string(), status, reason.to_string()))
}

/// One request on a fresh connection.
pub fn one_shot(addr: SocketAddr, req: &Req) -> io::Result<Response> {
    Client::connect(addr).request(req)
}

/// One request on a fresh connection; panics on I/O errors.
pub fn get(addr: SocketAddr, target: &str) -> Response {
    one_shot(addr, &Req::get(target)).unwrap_or_else(|e| panic!("GET {target}: {e}"))
}

/// Sends raw bytes on a fresh connection and reads one response (to a non-HEAD request).
pub fn raw_request(addr: SocketAddr, bytes: &[u8]) -> (Client, io::Result<Response>) {
    let mut c = Client::connect(addr);
    // A server that rejects early may close before every byte is written; its response is
    // still what counts, so a failed write is reported only when no response can be read.
    let sent = c.send(bytes);
    let r = match (c.read_response(), sent) {
        (Err(read_err), Err(send_err)) => Err(io::Error::new(
            read_err.kind(),
            format!("{read_err} (after write error: {send_err})"),
        )),
        (r, _) => r,
    };
    (c, r)
}
