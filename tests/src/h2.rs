//! HTTP/2 clients for the tests (issue 12).
//!
//! - [`H2Client`]: the `h2` crate's client on a current-thread runtime of its own, behind a
//!   synchronous API: real streams, flow control, concurrency, resets. h2c with prior
//!   knowledge (plain TCP) only; TLS with ALPN is tested with `curl --http2`.
//! - [`RawH2`]: hand-made frames over a plain socket, for what a well-behaved client never
//!   sends (smuggling-shaped fields, floods) and to see exactly which frame comes back.
//!   Header blocks are HPACK literals without indexing (RFC 7541 §6.2.2), so any bytes can
//!   be sent as a name or value.

use bytes::Bytes;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// The client connection preface (RFC 9113 §3.4).
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// A response as an h2 client received it.
#[derive(Debug)]
pub struct H2Response {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Vec<u8>,
}

impl H2Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// One HTTP/2 connection (h2c, prior knowledge) through the `h2` crate.
pub struct H2Client {
    pub rt: tokio::runtime::Runtime,
    pub send: h2::client::SendRequest<Bytes>,
    conn: Option<tokio::task::JoinHandle<Result<(), h2::Error>>>,
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// A request to send: method, path, extra fields, body (`None`: END_STREAM on HEADERS).
#[derive(Clone, Debug)]
pub struct H2Req {
    pub method: String,
    pub authority: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Option<Vec<u8>>,
}

impl H2Req {
    pub fn get(path: &str) -> H2Req {
        H2Req {
            method: "GET".into(),
            authority: "example.test".into(),
            path: path.into(),
            headers: Vec::new(),
            body: None,
        }
    }
    pub fn method(mut self, m: &str) -> H2Req {
        self.method = m.into();
        self
    }
    pub fn authority(mut self, a: &str) -> H2Req {
        self.authority = a.into();
        self
    }
    pub fn header(mut self, n: &str, v: &str) -> H2Req {
        self.headers.push((n.into(), v.into()));
        self
    }
    pub fn body(mut self, b: impl Into<Vec<u8>>) -> H2Req {
        self.body = Some(b.into());
        self
    }

    /// The request head as the `h2` client API takes it.
    pub fn build(&self) -> http::Request<()> {
        let mut b = http::Request::builder()
            .method(self.method.as_str())
            .uri(format!("http://{}{}", self.authority, self.path));
        for (n, v) in &self.headers {
            b = b.header(n, v);
        }
        b.body(()).expect("valid request")
    }
}

/// Sends `req` on `send` and reads the whole response.
pub async fn exchange(
    send: &mut h2::client::SendRequest<Bytes>,
    req: &H2Req,
) -> Result<H2Response, h2::Error> {
    let mut send = send.clone().ready().await?;
    let end = req.body.is_none();
    let (response, mut body) = send.send_request(req.build(), end)?;
    if let Some(b) = &req.body {
        body.send_data(Bytes::from(b.clone()), true)?;
    }
    let response = response.await?;
    let (parts, mut recv) = response.into_parts();
    let mut out = Vec::new();
    while let Some(chunk) = recv.data().await {
        let chunk = chunk?;
        out.extend_from_slice(&chunk);
        let _ = recv.flow_control().release_capacity(chunk.len());
    }
    Ok(H2Response {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body: out,
    })
}

impl H2Client {
    /// Connects with prior knowledge (h2c) and completes the handshake.
    pub fn connect(addr: SocketAddr) -> H2Client {
        H2Client::connect_with(addr, h2::client::Builder::new())
    }

    pub fn connect_with(addr: SocketAddr, builder: h2::client::Builder) -> H2Client {
        let rt = runtime();
        let (send, conn) = rt.block_on(async {
            let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
            let (send, conn) = builder.handshake(tcp).await.expect("h2 handshake");
            (send, tokio::spawn(conn))
        });
        H2Client {
            rt,
            send,
            conn: Some(conn),
        }
    }

    /// One request, its whole response (30 s at most).
    pub fn request(&mut self, req: &H2Req) -> Result<H2Response, h2::Error> {
        let send = &mut self.send;
        self.rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(30), exchange(send, req))
                .await
                .expect("no answer within 30 s")
        })
    }

    pub fn get(&mut self, path: &str) -> H2Response {
        self.request(&H2Req::get(path)).expect("h2 request")
    }

    /// Waits for the connection to end (the server closed it), within `timeout`.
    pub fn closed_within(&mut self, timeout: Duration) -> bool {
        let conn = self.conn.take().expect("connection task");
        self.rt
            .block_on(async { tokio::time::timeout(timeout, conn).await.is_ok() })
    }
}

/// A frame as read off the wire.
#[derive(Debug, Clone)]
pub struct Frame {
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
    pub payload: Vec<u8>,
}

pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const RST_STREAM: u8 = 0x3;
pub const SETTINGS: u8 = 0x4;
pub const PING: u8 = 0x6;
pub const GOAWAY: u8 = 0x7;
pub const WINDOW_UPDATE: u8 = 0x8;
pub const CONTINUATION: u8 = 0x9;
pub const END_STREAM: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;
pub const ACK: u8 = 0x1;

/// What the server did with a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamFate {
    /// A response HEADERS frame.
    Answered,
    /// RST_STREAM with this error code.
    Reset(u32),
    /// GOAWAY with this error code.
    GoAway(u32),
    /// The connection closed with neither.
    Closed,
}

/// Hand-made frames over a plain socket (h2c, prior knowledge).
pub struct RawH2 {
    pub sock: TcpStream,
    buf: Vec<u8>,
}

impl RawH2 {
    /// Connects, sends the preface and an empty SETTINGS frame.
    pub fn connect(addr: SocketAddr) -> RawH2 {
        let sock = TcpStream::connect(addr).expect("connect");
        sock.set_nodelay(true).unwrap();
        let mut raw = RawH2 {
            sock,
            buf: Vec::new(),
        };
        raw.send_bytes(PREFACE);
        raw.frame(SETTINGS, 0, 0, &[]);
        raw
    }

    pub fn send_bytes(&mut self, b: &[u8]) {
        // The server may close first (a flood); what it sent is read afterwards.
        let _ = self.sock.write_all(b);
    }

    pub fn frame(&mut self, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
        self.send_bytes(&frame_bytes(kind, flags, stream, payload));
    }

    /// A HEADERS frame (END_HEADERS; END_STREAM when `end`) of literal fields.
    pub fn headers(&mut self, stream: u32, fields: &[(&[u8], &[u8])], end: bool) {
        let block = hpack_literals(fields);
        let flags = END_HEADERS | if end { END_STREAM } else { 0 };
        self.frame(HEADERS, flags, stream, &block);
    }

    /// The next frame, or `None` on EOF, error or `timeout`.
    pub fn read_frame(&mut self, timeout: Duration) -> Option<Frame> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.buf.len() >= 9 {
                let len = (self.buf[0] as usize) << 16
                    | (self.buf[1] as usize) << 8
                    | self.buf[2] as usize;
                if self.buf.len() >= 9 + len {
                    let f = Frame {
                        kind: self.buf[3],
                        flags: self.buf[4],
                        stream: u32::from_be_bytes([
                            self.buf[5],
                            self.buf[6],
                            self.buf[7],
                            self.buf[8],
                        ]) & 0x7fff_ffff,
                        payload: self.buf[9..9 + len].to_vec(),
                    };
                    self.buf.drain(..9 + len);
                    return Some(f);
                }
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            self.sock
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .unwrap();
            let mut chunk = [0u8; 16384];
            match self.sock.read(&mut chunk) {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Reads until `stream` is answered or reset, or the connection ends (10 s at most).
    pub fn fate(&mut self, stream: u32) -> StreamFate {
        while let Some(f) = self.read_frame(Duration::from_secs(10)) {
            match f.kind {
                HEADERS if f.stream == stream => return StreamFate::Answered,
                RST_STREAM if f.stream == stream => return StreamFate::Reset(code(&f.payload)),
                GOAWAY => return StreamFate::GoAway(code(&f.payload[4..])),
                _ => {}
            }
        }
        StreamFate::Closed
    }
}

fn code(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

pub fn frame_bytes(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let n = payload.len();
    let mut f = vec![(n >> 16) as u8, (n >> 8) as u8, n as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An HPACK integer with an `n`-bit prefix (RFC 7541 §5.1), `first` holding the high bits.
fn hpack_int(out: &mut Vec<u8>, first: u8, n: u32, mut v: usize) {
    let max = (1usize << n) - 1;
    if v < max {
        out.push(first | v as u8);
        return;
    }
    out.push(first | max as u8);
    v -= max;
    while v >= 128 {
        out.push((v % 128) as u8 | 0x80);
        v /= 128;
    }
    out.push(v as u8);
}

/// A header block of literal fields without indexing, new names, no Huffman coding.
pub fn hpack_literals(fields: &[(&[u8], &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in fields {
        out.push(0x00);
        hpack_int(&mut out, 0, 7, name.len());
        out.extend_from_slice(name);
        hpack_int(&mut out, 0, 7, value.len());
        out.extend_from_slice(value);
    }
    out
}

/// The pseudo-headers of a well-formed GET for `path`.
pub fn get_fields(path: &'static [u8]) -> Vec<(&'static [u8], &'static [u8])> {
    vec![
        (b":method", b"GET"),
        (b":scheme", b"http"),
        (b":authority", b"example.test"),
        (b":path", path),
    ]
}
