//! `chunked`: the chunked body decoder (RFC 9112 §7.1). The input is a raw chunked body
//! (and maybe what follows it).
//!
//! Invariants beyond "no panic":
//! - split invariance: whole, one byte at a time, and in input-seeded pieces, the decoder
//!   gives the same verdict, the same end of body and the same payload;
//! - the payload is never larger than the bytes consumed, and matches `payload`;
//! - a finished body consumes no byte past its end, an unfinished one consumes everything;
//! - `chunked-crlf` (issue 10): the framing (sizes, extensions, chunk ends, trailers) of an
//!   accepted body has no bare CR or LF.

use super::{strict_line_ends, Splits};
use crate::check::{invariant, show};
use gateway::protocol::http1::chunked::{ChunkedDecoder, ChunkedError};

#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    verdict: Result<usize, ChunkedError>,
    done: bool,
    payload: Vec<u8>,
}

fn decode(pieces: &[&[u8]]) -> Outcome {
    let mut d = ChunkedDecoder::new();
    let mut payload = Vec::new();
    let mut consumed = 0;
    for piece in pieces {
        match d.decode(piece, |s| payload.extend_from_slice(s)) {
            Ok(n) => {
                assert!(n <= piece.len());
                consumed += n;
                if d.is_done() {
                    break;
                }
                assert_eq!(
                    n,
                    piece.len(),
                    "an unfinished body consumes all it is given"
                );
            }
            Err(e) => {
                return Outcome {
                    verdict: Err(e),
                    done: false,
                    payload,
                }
            }
        }
    }
    // `payload` counts a chunk when its size line ends (so `max_body_size` can refuse it
    // before it arrives): all of it once the body is done, never less than was delivered.
    if d.is_done() {
        assert_eq!(d.payload, payload.len() as u64, "payload counter");
    } else {
        assert!(d.payload >= payload.len() as u64, "payload counter");
    }
    Outcome {
        verdict: Ok(consumed),
        done: d.is_done(),
        payload,
    }
}

pub fn run(data: &[u8]) {
    // Whole, remembering where the payload bytes were.
    let mut d = ChunkedDecoder::new();
    let mut is_payload = vec![false; data.len()];
    let mut payload = Vec::new();
    let whole = d.decode(data, |s| {
        let at = s.as_ptr() as usize - data.as_ptr() as usize;
        is_payload[at..at + s.len()]
            .iter_mut()
            .for_each(|p| *p = true);
        payload.extend_from_slice(s);
    });
    let reference = Outcome {
        verdict: whole,
        done: d.is_done(),
        payload,
    };
    if let Ok(n) = reference.verdict {
        assert!(reference.payload.len() <= n, "more payload than input");
        assert!(reference.done || n == data.len());
        if reference.done {
            let bad = strict_line_ends(&data[..n], |i| !is_payload[i]);
            invariant("chunked-crlf", bad.is_none(), || {
                format!(
                    "body accepted with a bare CR or LF at {bad:?}: {}",
                    show(&data[..n])
                )
            });
        }
    }

    let bytes: Vec<&[u8]> = data.chunks(1).collect();
    let by_byte = decode(&bytes);
    let mut splits = Splits::new(data);
    let pieces = splits.cut(data, 64);
    let seeded = decode(&pieces);
    let verdict = |o: &Outcome| o.verdict.map(|_| ());
    for (name, other) in [("one byte at a time", &by_byte), ("seeded pieces", &seeded)] {
        assert_eq!(
            verdict(other),
            verdict(&reference),
            "{name}: {}",
            show(data)
        );
        if reference.verdict.is_ok() {
            assert_eq!(other, &reference, "{name}: {}", show(data));
        }
    }
}
