//! The harnesses, one per fuzz target. Each takes the raw fuzz input; where a target needs
//! parameters (read boundaries, the upstream's answer), they come from the input in a way
//! that keeps seed files readable (see each module).

pub mod chunked;
pub mod connection;
pub mod head;
pub mod proxy_protocol;
pub mod rewrite;
pub mod tls_session;
pub mod tls_stream;

/// A small deterministic generator seeded from the input, for choices (read boundaries)
/// that should vary with the input without needing bytes of their own.
pub(crate) struct Splits(u64);

impl Splits {
    pub(crate) fn new(data: &[u8]) -> Splits {
        // FNV-1a of the input.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for &b in data {
            h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
        Splits(h | 1)
    }

    /// A length in `1..=max`.
    pub(crate) fn next(&mut self, max: usize) -> usize {
        // xorshift64
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        1 + (self.0 % max.max(1) as u64) as usize
    }

    /// Cuts `data` into pieces of 1..=max bytes.
    pub(crate) fn cut<'a>(&mut self, data: &'a [u8], max: usize) -> Vec<&'a [u8]> {
        let mut out = Vec::new();
        let mut rest = data;
        while !rest.is_empty() {
            let n = self.next(max).min(rest.len());
            out.push(&rest[..n]);
            rest = &rest[n..];
        }
        out
    }
}

/// Whether every CR in `bytes` is followed by LF and every LF preceded by CR, counting only
/// the positions `framing` selects (RFC 9112 §2.2: a recipient must not take a bare CR or
/// LF as a line end; a proxy that does disagrees with one that does not).
pub(crate) fn strict_line_ends(bytes: &[u8], framing: impl Fn(usize) -> bool) -> Option<usize> {
    for (i, &b) in bytes.iter().enumerate() {
        if !framing(i) {
            continue;
        }
        let bad = match b {
            b'\r' => bytes.get(i + 1) != Some(&b'\n') && i + 1 < bytes.len(),
            b'\n' => i == 0 || bytes[i - 1] != b'\r' || !framing(i - 1),
            _ => false,
        };
        if bad {
            return Some(i);
        }
    }
    None
}
