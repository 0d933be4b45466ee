//! The one error type of the data plane: what went wrong with a request, whose fault it
//! is, and so which status the client gets and which counter moves.
//!
//! Everything derives from the variant (the kind): [`HttpError::status`], the
//! [`Side`] (whether a server is booked a failure), the [`RetryClass`] (which
//! `policy::retry` reads), the metric label ([`HttpError::kind`], the contract's
//! `gateway_upstream_errors_total{kind}` values) and the log reason (`Display`: the status
//! reason and the [`HttpError::cause`], the context where it happened). Code matches on the
//! variant or asks these methods; it never compares the label or the text.

use crate::protocol::status::reason;
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
    /// A drain's `graceful_timeout` ran out with the request still in flight: 503 with
    /// `Connection: close` when nothing of the response went out yet (the client may try
    /// another node), otherwise a close. Booked to neither the client nor the upstream.
    Shutdown,
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

/// Whether an upstream attempt that failed with this error may be tried again
/// ([`crate::policy::retry`] decides, from this and from how far the attempt got).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RetryClass {
    /// Never: the request itself is at fault, the gateway ran short, the upstream may still
    /// be working on it (a timeout), or it answered something unusable.
    Never,
    /// The connection failed (refused, reset, closed): another server, or a fresh
    /// connection when the request is replayable, may succeed.
    Replayable,
    /// A timeout: another server may be tried only when nothing was sent (a connect).
    Timeout,
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
            HttpError::Shutdown => 503,
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
            | HttpError::ResponseRefused(_)
            | HttpError::Shutdown => Side::Internal,
            _ => Side::Client,
        }
    }

    /// How a failed attempt with this error may be retried.
    pub(crate) fn retry_class(&self) -> RetryClass {
        match self {
            HttpError::UpstreamFailed(_) => RetryClass::Replayable,
            HttpError::UpstreamTimeout(_) => RetryClass::Timeout,
            _ => RetryClass::Never,
        }
    }

    /// The request itself was refused (a 4xx or 501 of the client's making, not a client
    /// that went away): nothing about the upstream worth logging.
    pub(crate) fn is_refused_request(&self) -> bool {
        self.side() == Side::Client && !matches!(self, HttpError::ClientGone(_))
    }

    /// The cause, for logs: what failed, where (`"connect"`, `"read body"`...).
    pub(crate) fn cause(&self) -> Option<&'static str> {
        match self {
            HttpError::BadRequest(why)
            | HttpError::UpstreamFailed(why)
            | HttpError::BadUpstream(why)
            | HttpError::UpstreamTimeout(why)
            | HttpError::ClientGone(why)
            | HttpError::LocalResource(why)
            | HttpError::ResponseRefused(why) => Some(why),
            _ => None,
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
            HttpError::Shutdown => "shutdown",
            _ => "client",
        }
    }
}

impl fmt::Display for HttpError {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self.cause() {
            Some(why) => write!(f, "{} ({why})", reason(self.status())),
            None => f.write_str(reason(self.status())),
        }
    }
}

impl std::error::Error for HttpError {}
