//! One HTTP/1 message-body decoder for both directions (RFC 9112 §6): how many of the bytes
//! that follow a head belong to its body, where the body ends, and (for chunked framing)
//! the payload inside the chunks. The request side and the response side differ only in
//! what a malformed body is (the client's 400, the upstream's 502), in the size cap (the
//! route's `max_body_size` applies to requests), and in `UntilClose`, which only a
//! response may use (RFC 9112 §6.3 rule 8; a request without framing has no body, rule 7).

use crate::protocol::error::HttpError;
use crate::protocol::http1::chunked::{ChunkedDecoder, ChunkedError};
use crate::protocol::http1::head::BodyFraming;

/// Which message the body belongs to: decides whose fault a framing error is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Direction {
    /// From the client: a bad body is a 400, an over-large one a 413.
    Request,
    /// From the upstream: a bad body is the upstream's protocol error (502).
    Response,
}

/// Progress through one message body.
#[derive(Debug, Clone)]
pub struct Body {
    framing: BodyFraming,
    direction: Direction,
    /// Bytes left (Content-Length framing).
    remaining: u64,
    decoder: ChunkedDecoder,
    /// Most payload bytes accepted (requests only; `u64::MAX` for responses).
    max: u64,
    done: bool,
}

impl Body {
    /// A request body under `framing`, at most `max` payload bytes.
    pub fn request(framing: BodyFraming, max: u64) -> Body {
        // A request never reads until close (RFC 9112 §6.3 rule 7): no framing, no body.
        let framing = match framing {
            BodyFraming::UntilClose => BodyFraming::None,
            f => f,
        };
        Body::new(framing, Direction::Request, max)
    }

    /// A response body under `framing` (already resolved for HEAD, 1xx, 204 and 304).
    pub fn response(framing: BodyFraming) -> Body {
        Body::new(framing, Direction::Response, u64::MAX)
    }

    fn new(framing: BodyFraming, direction: Direction, max: u64) -> Body {
        let (remaining, done) = match framing {
            BodyFraming::Length(n) => (n, n == 0),
            BodyFraming::Chunked | BodyFraming::UntilClose => (0, false),
            BodyFraming::None => (0, true),
        };
        Body {
            framing,
            direction,
            remaining,
            decoder: ChunkedDecoder::new(),
            max,
            done,
        }
    }

    /// Whether the body ended (it never does for `UntilClose` before [`Body::finish`]).
    pub fn is_done(&self) -> bool {
        self.done
    }

    pub fn framing(&self) -> BodyFraming {
        self.framing
    }

    /// How many bytes of `input` belong to the body (all of them unless it ends inside
    /// `input`); the payload they carry goes to `on_data` (the chunk data without its
    /// framing, for chunked bodies). Marks the body done at its end.
    pub fn take(
        &mut self,
        input: &[u8],
        mut on_data: impl FnMut(&[u8]),
    ) -> Result<usize, HttpError> {
        if self.done {
            return Ok(0);
        }
        match self.framing {
            BodyFraming::Length(_) => {
                let n = (input.len() as u64).min(self.remaining) as usize;
                self.remaining -= n as u64;
                self.done = self.remaining == 0;
                on_data(&input[..n]);
                Ok(n)
            }
            BodyFraming::Chunked => {
                let n = self
                    .decoder
                    .decode(input, &mut on_data)
                    .map_err(|e| self.framing_error(e))?;
                if self.decoder.payload > self.max {
                    return Err(HttpError::BodyTooLarge);
                }
                self.done = self.decoder.is_done();
                Ok(n)
            }
            BodyFraming::UntilClose => {
                on_data(input);
                Ok(input.len())
            }
            BodyFraming::None => Ok(0),
        }
    }

    /// Body bytes that may be moved next without being looked at (spliced): the rest of a
    /// `Content-Length` body, the rest of the current chunk's data (the chunk-size lines
    /// and trailers always go through [`Body::take`]), or `u64::MAX` for a body read until
    /// close. 0 when the next bytes are framing, or the body is done.
    pub fn opaque_run(&self) -> u64 {
        if self.done {
            return 0;
        }
        match self.framing {
            BodyFraming::Length(_) => self.remaining,
            BodyFraming::Chunked => self.decoder.data_left(),
            BodyFraming::UntilClose => u64::MAX,
            BodyFraming::None => 0,
        }
    }

    /// Counts `n` body bytes (at most [`Body::opaque_run`]) moved without [`Body::take`].
    pub fn skip(&mut self, n: u64) {
        debug_assert!(n <= self.opaque_run(), "skipped past the body's framing");
        match self.framing {
            BodyFraming::Length(_) => {
                self.remaining -= n.min(self.remaining);
                self.done = self.remaining == 0;
            }
            BodyFraming::Chunked => self.decoder.skip_data(n),
            BodyFraming::UntilClose | BodyFraming::None => {}
        }
    }

    /// The peer closed: the end of an `UntilClose` body, a truncated body otherwise.
    pub fn finish(&mut self) -> Result<(), HttpError> {
        if self.done {
            return Ok(());
        }
        match (self.framing, self.direction) {
            (BodyFraming::UntilClose, _) => {
                self.done = true;
                Ok(())
            }
            (_, Direction::Request) => Err(HttpError::ClientGone("closed mid-body")),
            (_, Direction::Response) => Err(HttpError::UpstreamFailed("closed mid-body")),
        }
    }

    fn framing_error(&self, e: ChunkedError) -> HttpError {
        match self.direction {
            Direction::Response => HttpError::BadUpstream("bad chunked framing"),
            Direction::Request => match e {
                ChunkedError::BadSize => HttpError::BadRequest("bad chunk size"),
                ChunkedError::TooLong => {
                    // An endless chunk extension or trailer section.
                    crate::util::budget::over_budget(
                        crate::util::budget::Buffer::RequestBody,
                        None,
                    );
                    HttpError::BadRequest("chunk line or trailers too long")
                }
                ChunkedError::BadFraming => HttpError::BadRequest("bad chunked framing"),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `input` in pieces cut at `cuts`, as reads would deliver it: returns the bytes
    /// taken, the payload, and the first error.
    fn feed(body: &mut Body, input: &[u8], cuts: &[usize]) -> (usize, Vec<u8>, Option<HttpError>) {
        let mut taken = 0;
        let mut payload = Vec::new();
        let mut start = 0;
        for &end in cuts.iter().chain(std::iter::once(&input.len())) {
            if body.is_done() {
                break;
            }
            match body.take(&input[start..end], |d| payload.extend_from_slice(d)) {
                Ok(n) => {
                    taken += n;
                    if n < end - start {
                        break;
                    }
                }
                Err(e) => return (taken, payload, Some(e)),
            }
            start = end;
        }
        (taken, payload, None)
    }

    /// Every split of `input` into two reads gives the same answer as one read.
    fn every_split(
        make: impl Fn() -> Body,
        input: &[u8],
    ) -> (usize, Vec<u8>, Option<HttpError>, bool) {
        let mut whole = make();
        let expected = feed(&mut whole, input, &[]);
        for at in 0..=input.len() {
            let mut body = make();
            let got = feed(&mut body, input, &[at]);
            if expected.2.is_some() {
                // How far a read got before the error depends on the split; the error not.
                assert_eq!(got.2, expected.2, "split at {at}");
                continue;
            }
            assert_eq!(got, expected, "split at {at}");
            assert_eq!(body.is_done(), whole.is_done(), "split at {at}");
        }
        (expected.0, expected.1, expected.2, whole.is_done())
    }

    #[test]
    fn exact_content_length_stops_at_its_end() {
        let input = b"hello worldGET / HTTP/1.1\r\n";
        for direction in [Direction::Request, Direction::Response] {
            let make = || Body::new(BodyFraming::Length(11), direction, u64::MAX);
            let (taken, payload, err, done) = every_split(make, input);
            assert_eq!(
                (taken, &payload[..], err, done),
                (11, &b"hello world"[..], None, true)
            );
        }
    }

    #[test]
    fn short_content_length_is_not_done_and_eof_is_a_truncation() {
        let mut body = Body::request(BodyFraming::Length(10), u64::MAX);
        assert_eq!(body.take(b"abc", |_| {}), Ok(3));
        assert!(!body.is_done());
        assert_eq!(body.finish(), Err(HttpError::ClientGone("closed mid-body")));
        let mut body = Body::response(BodyFraming::Length(10));
        assert_eq!(body.take(b"abc", |_| {}), Ok(3));
        assert_eq!(
            body.finish(),
            Err(HttpError::UpstreamFailed("closed mid-body"))
        );
    }

    #[test]
    fn chunked_body_at_every_boundary() {
        let input = b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: 1\r\n\r\nNEXT";
        for direction in [Direction::Request, Direction::Response] {
            let make = || Body::new(BodyFraming::Chunked, direction, u64::MAX);
            let (taken, payload, err, done) = every_split(make, input);
            assert_eq!(err, None);
            assert!(done);
            assert_eq!(taken, input.len() - 4, "stops before the next message");
            assert_eq!(payload, b"hello world");
        }
    }

    #[test]
    fn bad_chunk_is_the_senders_fault() {
        let input = b"zz\r\nhello\r\n0\r\n\r\n";
        let (_, _, err, _) = every_split(|| Body::request(BodyFraming::Chunked, u64::MAX), input);
        assert_eq!(err, Some(HttpError::BadRequest("bad chunk size")));
        let (_, _, err, _) = every_split(|| Body::response(BodyFraming::Chunked), input);
        assert_eq!(err, Some(HttpError::BadUpstream("bad chunked framing")));
        // Data longer than its chunk size announced.
        let input = b"2\r\nhello\r\n0\r\n\r\n";
        let (_, _, err, _) = every_split(|| Body::request(BodyFraming::Chunked, u64::MAX), input);
        assert_eq!(err, Some(HttpError::BadRequest("bad chunked framing")));
    }

    #[test]
    fn chunked_request_over_max_body_is_413_at_every_boundary() {
        let input = b"4\r\nabcd\r\n4\r\nefgh\r\n0\r\n\r\n";
        let (_, _, err, done) = every_split(|| Body::request(BodyFraming::Chunked, 6), input);
        assert_eq!(err, Some(HttpError::BodyTooLarge));
        assert!(!done);
        // Exactly at the cap is fine.
        let (_, payload, err, done) = every_split(|| Body::request(BodyFraming::Chunked, 8), input);
        assert_eq!((err, done, &payload[..]), (None, true, &b"abcdefgh"[..]));
    }

    #[test]
    fn until_close_only_for_responses() {
        let mut body = Body::response(BodyFraming::UntilClose);
        assert_eq!(body.take(b"abc", |_| {}), Ok(3));
        assert!(!body.is_done());
        assert_eq!(body.finish(), Ok(()));
        assert!(body.is_done());
        // A request has no body without framing (RFC 9112 §6.3 rule 7).
        let mut body = Body::request(BodyFraming::UntilClose, u64::MAX);
        assert!(body.is_done());
        assert_eq!(body.take(b"GET / HTTP/1.1\r\n", |_| {}), Ok(0));
    }

    #[test]
    fn skipped_runs_keep_the_framing() {
        // Content-Length: the run is the rest of the body, and skipping it ends the body.
        let mut body = Body::response(BodyFraming::Length(10));
        assert_eq!(body.take(b"abc", |_| {}), Ok(3));
        assert_eq!(body.opaque_run(), 7);
        body.skip(7);
        assert!(body.is_done());
        assert_eq!(body.opaque_run(), 0);
        // Chunked: the run is the rest of a chunk's data; the CRLF after it, the next
        // size line and the trailers still go through the decoder.
        let mut body = Body::request(BodyFraming::Chunked, 20);
        assert_eq!(body.opaque_run(), 0, "a size line comes first");
        assert_eq!(body.take(b"a\r\nhel", |_| {}), Ok(6));
        assert_eq!(body.opaque_run(), 7);
        body.skip(7);
        assert_eq!(body.opaque_run(), 0);
        assert!(!body.is_done());
        let mut payload = Vec::new();
        let rest = b"\r\n3\r\nabc\r\n0\r\n\r\nNEXT";
        assert_eq!(
            body.take(rest, |d| payload.extend_from_slice(d)),
            Ok(rest.len() - 4)
        );
        assert!(body.is_done());
        assert_eq!(payload, b"abc");
        // A skipped chunk whose CRLF is missing is still refused.
        let mut body = Body::response(BodyFraming::Chunked);
        assert_eq!(body.take(b"2\r\n", |_| {}), Ok(3));
        body.skip(2);
        assert_eq!(
            body.take(b"xx\r\n", |_| {}),
            Err(HttpError::BadUpstream("bad chunked framing"))
        );
        // The size cap was charged when the size line was read, before any skip.
        let mut body = Body::request(BodyFraming::Chunked, 5);
        assert_eq!(body.take(b"10\r\n", |_| {}), Err(HttpError::BodyTooLarge));
    }

    #[test]
    fn no_body_takes_nothing() {
        for framing in [BodyFraming::None, BodyFraming::Length(0)] {
            let mut body = Body::response(framing);
            assert!(body.is_done());
            assert_eq!(body.take(b"HTTP/1.1 200 OK\r\n", |_| {}), Ok(0));
        }
    }
}
