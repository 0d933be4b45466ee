//! The HTTP/1 codec: heads parsed into offsets, chunked framing, the rewriting of heads on
//! their way through the proxy, and the error type whose kind decides the status code.

pub mod chunked;
pub mod head;
pub mod proxy_protocol;
pub mod rewrite;
pub mod target;

use std::fmt;

/// What went wrong while handling one request, and so what the client is told.
/// The kind decides the status code and the metric label; `Display` is for logs only
/// (nothing internal is sent to clients).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HttpError {
    /// Malformed request or smuggling attempt (400, connection closed).
    BadRequest(&'static str),
    /// No route matched (404).
    NoRoute,
    /// `CONNECT` (the gateway is not a forward proxy), or `TRACE` on a route that does not
    /// allow it (405).
    MethodNotAllowed,
    /// Head not received within `header_timeout` (408).
    HeadTimeout,
    /// Body over `max_body_size` (413).
    BodyTooLarge,
    /// Request line over `max_header_bytes` (414).
    UriTooLong,
    /// Over `request_rate` (429).
    TooManyRequests,
    /// Head over `max_header_bytes` or too many fields (431).
    HeadTooLarge,
    /// A transfer coding we do not implement (501).
    UnsupportedCoding,
    /// The upstream failed: refused, reset, closed early (502).
    UpstreamFailed(&'static str),
    /// The upstream sent bytes that are not valid HTTP (502).
    BadUpstream(&'static str),
    /// No server of the upstream is up (503).
    NoHealthyUpstream,
    /// The upstream did not answer within the route's timeouts (504).
    UpstreamTimeout(&'static str),
    /// The client went away or stalled mid-request: nothing can be answered.
    ClientGone(&'static str),
    /// The client sent its body too slowly (408): the upstream connection is closed.
    BodyTimeout,
    /// The gateway itself ran short (descriptors, buffers, memory) while connecting (500,
    /// as nginx answers when its `socket()` fails). Never booked to the upstream server.
    LocalResource(&'static str),
    /// A response the gateway refuses by a rule of its own (an over-large head, a status
    /// outside 100–599, an unrequested or unproven 101, endless 1xx): 502 for this request
    /// only. A client can provoke these from a reflecting endpoint, so they never count
    /// against the server.
    ResponseRefused(&'static str),
}

/// Whose fault an error is: decides whether it counts against an upstream server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The client's request or behaviour.
    Client,
    /// The upstream server really failed (refused, reset, timed out, spoke bad HTTP):
    /// the only side passive health checks count.
    Upstream,
    /// The gateway's own limits or resources.
    Internal,
}

impl HttpError {
    pub fn status(&self) -> u16 {
        match self {
            HttpError::BadRequest(_) => 400,
            HttpError::NoRoute => 404,
            HttpError::MethodNotAllowed => 405,
            HttpError::HeadTimeout => 408,
            HttpError::BodyTooLarge => 413,
            HttpError::UriTooLong => 414,
            HttpError::TooManyRequests => 429,
            HttpError::HeadTooLarge => 431,
            HttpError::UnsupportedCoding => 501,
            HttpError::UpstreamFailed(_) | HttpError::BadUpstream(_) => 502,
            HttpError::NoHealthyUpstream => 503,
            HttpError::UpstreamTimeout(_) => 504,
            HttpError::ClientGone(_) => 499,
            HttpError::BodyTimeout => 408,
            HttpError::LocalResource(_) => 500,
            HttpError::ResponseRefused(_) => 502,
        }
    }

    /// Whose fault this is. Only [`Side::Upstream`] marks a server down.
    pub fn side(&self) -> Side {
        match self {
            HttpError::UpstreamFailed(_)
            | HttpError::BadUpstream(_)
            | HttpError::UpstreamTimeout(_) => Side::Upstream,
            HttpError::NoHealthyUpstream
            | HttpError::LocalResource(_)
            | HttpError::ResponseRefused(_) => Side::Internal,
            _ => Side::Client,
        }
    }

    /// Label for `gateway_upstream_errors_total{kind}` and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            HttpError::UpstreamFailed(_) => "failed",
            HttpError::BadUpstream(_) => "protocol",
            HttpError::NoHealthyUpstream => "unavailable",
            HttpError::UpstreamTimeout(_) => "timeout",
            HttpError::BadRequest(_) => "bad_request",
            HttpError::ClientGone(_) => "client_gone",
            HttpError::LocalResource(_) => "local",
            HttpError::ResponseRefused(_) => "refused",
            _ => "client",
        }
    }
}

impl fmt::Display for HttpError {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            HttpError::BadRequest(why)
            | HttpError::UpstreamFailed(why)
            | HttpError::BadUpstream(why)
            | HttpError::UpstreamTimeout(why)
            | HttpError::ClientGone(why)
            | HttpError::LocalResource(why)
            | HttpError::ResponseRefused(why) => write!(f, "{} ({why})", reason(self.status())),
            _ => f.write_str(reason(self.status())),
        }
    }
}

impl std::error::Error for HttpError {}

pub fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        101 => "Switching Protocols",
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        206 => "Partial Content",
        301 => "Moved Permanently",
        302 => "Found",
        304 => "Not Modified",
        307 => "Temporary Redirect",
        308 => "Permanent Redirect",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Content Too Large",
        414 => "URI Too Long",
        429 => "Too Many Requests",
        426 => "Upgrade Required",
        431 => "Request Header Fields Too Large",
        499 => "Client Closed Request",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "",
    }
}

/// Writes a complete short response generated by the proxy itself.
pub fn write_simple_response(
    out: &mut Vec<u8>,
    status: u16,
    content_type: &str,
    body: &[u8],
    close: bool,
    extra_headers: &[(&str, &str)],
) {
    use std::io::Write;
    let _ = write!(
        out,
        "HTTP/1.1 {status} {}\r\nServer: gateway\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n",
        reason(status),
        body.len()
    );
    if status == 405 {
        // RFC 9110 §15.5.6: a 405 names the methods the target supports.
        out.extend_from_slice(b"Allow: GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS\r\n");
    }
    for (name, value) in extra_headers {
        let _ = write!(out, "{name}: {value}\r\n");
    }
    if close {
        out.extend_from_slice(b"Connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
}

/// The plain-text body for an error status: short, and never anything internal.
pub fn error_body(status: u16) -> &'static [u8] {
    match status {
        400 => b"400 Bad Request\n",
        404 => b"404 Not Found\n",
        405 => b"405 Method Not Allowed\n",
        408 => b"408 Request Timeout\n",
        413 => b"413 Content Too Large\n",
        500 => b"500 Internal Server Error\n",
        414 => b"414 URI Too Long\n",
        426 => b"426 Upgrade Required\n",
        429 => b"429 Too Many Requests\n",
        431 => b"431 Request Header Fields Too Large\n",
        501 => b"501 Not Implemented\n",
        502 => b"502 Bad Gateway\n",
        503 => b"503 Service Unavailable\n",
        504 => b"504 Gateway Timeout\n",
        _ => b"error\n",
    }
}
