//! Incremental `chunked` transfer-coding decoder (RFC 9112 §7.1).
//!
//! It walks the raw bytes of a chunked body as they arrive, split anywhere, and says how
//! many of them belong to the body and where the body ends. The proxy forwards the raw
//! bytes unchanged (no re-encoding, no copy) and only uses the decoder to find the end of
//! the message, to count payload bytes against `max_body_size`, and to reject malformed
//! framing; `on_data` hands out payload slices for the rare peer that needs them decoded.
//!
//! Because the raw bytes are forwarded, the decoder accepts only what every parser behind
//! it reads the same way (RFC 9112 §7.1): a chunk-size line is hex digits, optional
//! `BWS ; extension` text, then CR LF, nothing else (`5 junk` is refused); every line ends
//! in CR LF, never a bare LF (a peer that ends the body at a bare LF would run the rest
//! as a new request); trailer lines are forwarded only when each one is a well-formed
//! `name: value` field line; the line and trailer lengths are capped so an endless
//! extension or trailer section ends in an error rather than in unbounded forwarding.

/// Longest chunk-size line (size plus extensions) we accept; longer is an attack, not a
/// client (nginx and hyper cap it similarly).
const MAX_CHUNK_LINE: usize = 4096;
/// Most trailer bytes we accept after the last chunk.
const MAX_TRAILERS: usize = 16 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading hex digits of a chunk size.
    Size,
    /// Whitespace after the size (RFC 9112 §7.1.1 `BWS`): only a `;` may follow.
    SizeWs,
    /// A chunk extension (RFC 9112 §7.1.1), one part of
    /// `BWS ";" BWS name [ BWS "=" BWS ( token / quoted-string ) ]` at a time.
    Extension(Ext),
    SizeLf,
    Data,
    DataCr,
    DataLf,
    /// At the start of a trailer line (or the final empty line).
    TrailerStart,
    /// Inside a trailer field name (a token), up to `:`.
    TrailerName,
    /// Inside a trailer field value, up to CR.
    TrailerValue,
    TrailerLf,
    FinalLf,
    Done,
}

/// Where inside a chunk extension the decoder stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ext {
    /// After `;`: whitespace, then the first character of a name.
    BeforeName,
    /// Inside the name (a token).
    Name,
    /// Whitespace after the name: `=`, `;` or CR may follow.
    AfterName,
    /// After `=`: whitespace, then a token or a quoted string.
    BeforeValue,
    /// Inside a token value.
    Token,
    /// Inside a quoted string.
    Quoted,
    /// After a backslash inside a quoted string.
    Escaped,
    /// After a value: whitespace, then `;` or CR.
    AfterValue,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkedError {
    BadSize,
    BadFraming,
    TooLong,
}

#[derive(Debug, Clone)]
pub struct ChunkedDecoder {
    state: State,
    /// Size of the chunk being read, then bytes left of it.
    remaining: u64,
    size_digits: u32,
    line_len: usize,
    trailer_len: usize,
    /// The trailer field name being read (while it fits; longer names are no field the
    /// proxy manages).
    name: [u8; 32],
    name_len: usize,
    /// Payload bytes seen so far.
    pub payload: u64,
}

impl Default for ChunkedDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl ChunkedDecoder {
    pub fn new() -> Self {
        ChunkedDecoder {
            state: State::Size,
            remaining: 0,
            size_digits: 0,
            line_len: 0,
            trailer_len: 0,
            name: [0; 32],
            name_len: 0,
            payload: 0,
        }
    }

    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Consumes bytes of the body. Returns how many bytes of `input` belong to it (all of
    /// them unless the message ends inside `input`). Payload slices go to `on_data`.
    pub fn decode(
        &mut self,
        input: &[u8],
        mut on_data: impl FnMut(&[u8]),
    ) -> Result<usize, ChunkedError> {
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            match self.state {
                State::Size => {
                    if let Some(d) = hex(b) {
                        self.size_digits += 1;
                        if self.size_digits > 15 {
                            return Err(ChunkedError::BadSize);
                        }
                        self.remaining = self.remaining * 16 + d as u64;
                    } else if self.size_digits == 0 {
                        return Err(ChunkedError::BadSize);
                    } else if b == b'\r' {
                        self.state = State::SizeLf;
                    } else if b == b';' {
                        self.state = State::Extension(Ext::BeforeName);
                    } else if b == b' ' || b == b'\t' {
                        self.state = State::SizeWs;
                    } else {
                        return Err(ChunkedError::BadSize);
                    }
                    self.count_line()?;
                    i += 1;
                }
                State::SizeWs => {
                    match b {
                        b' ' | b'\t' => {}
                        b';' => self.state = State::Extension(Ext::BeforeName),
                        // `5 junk` or `5 \r\n`: not a chunk-size line.
                        _ => return Err(ChunkedError::BadSize),
                    }
                    self.count_line()?;
                    i += 1;
                }
                State::Extension(at) => {
                    // `5;` (no name) or `5;a=b junk` are read differently by different
                    // peers: only the exact grammar is forwarded.
                    let ws = b == b' ' || b == b'\t';
                    let next = match at {
                        Ext::BeforeName if ws => Ext::BeforeName,
                        Ext::BeforeName | Ext::Name if is_tchar(b) => Ext::Name,
                        Ext::Name | Ext::AfterName if ws => Ext::AfterName,
                        Ext::Name | Ext::AfterName | Ext::Token | Ext::AfterValue if b == b';' => {
                            Ext::BeforeName
                        }
                        Ext::Name | Ext::AfterName if b == b'=' => Ext::BeforeValue,
                        Ext::BeforeValue if ws => Ext::BeforeValue,
                        Ext::BeforeValue if b == b'"' => Ext::Quoted,
                        Ext::BeforeValue | Ext::Token if is_tchar(b) => Ext::Token,
                        Ext::Token | Ext::AfterValue if ws => Ext::AfterValue,
                        Ext::Quoted if b == b'"' => Ext::AfterValue,
                        Ext::Quoted if b == b'\\' => Ext::Escaped,
                        Ext::Quoted | Ext::Escaped if is_field_char(b) => Ext::Quoted,
                        Ext::Name | Ext::Token | Ext::AfterValue if b == b'\r' => {
                            self.state = State::SizeLf;
                            self.count_line()?;
                            i += 1;
                            continue;
                        }
                        _ => return Err(ChunkedError::BadFraming),
                    };
                    self.state = State::Extension(next);
                    self.count_line()?;
                    i += 1;
                }
                State::SizeLf => {
                    if b != b'\n' {
                        return Err(ChunkedError::BadFraming);
                    }
                    i += 1;
                    self.line_len = 0;
                    self.size_digits = 0;
                    if self.remaining == 0 {
                        self.state = State::TrailerStart;
                    } else {
                        self.payload += self.remaining;
                        self.state = State::Data;
                    }
                }
                State::Data => {
                    let take =
                        (input.len() - i).min(self.remaining.min(usize::MAX as u64) as usize);
                    on_data(&input[i..i + take]);
                    i += take;
                    self.remaining -= take as u64;
                    if self.remaining == 0 {
                        self.state = State::DataCr;
                    }
                }
                State::DataCr => {
                    if b != b'\r' {
                        return Err(ChunkedError::BadFraming);
                    }
                    self.state = State::DataLf;
                    i += 1;
                }
                State::DataLf => {
                    if b != b'\n' {
                        return Err(ChunkedError::BadFraming);
                    }
                    self.state = State::Size;
                    i += 1;
                }
                State::TrailerStart => {
                    if b == b'\r' {
                        self.state = State::FinalLf;
                    } else if is_tchar(b) {
                        self.state = State::TrailerName;
                        self.name_len = 0;
                        self.push_name(b);
                    } else {
                        // A bare LF here is where a lenient peer ends the body.
                        return Err(ChunkedError::BadFraming);
                    }
                    self.count_trailer()?;
                    i += 1;
                }
                State::TrailerName => {
                    if b == b':' {
                        // A trailer must not stand in for a field the proxy writes or
                        // strips: a server that merges trailers into the header section
                        // would take a spoofed `X-Forwarded-For` or `Content-Length` from
                        // it (RFC 9110 §6.5.1).
                        if self.name_len <= self.name.len()
                            && super::rewrite::is_managed(&self.name[..self.name_len])
                        {
                            return Err(ChunkedError::BadFraming);
                        }
                        self.state = State::TrailerValue;
                    } else if !is_tchar(b) {
                        return Err(ChunkedError::BadFraming);
                    } else {
                        self.push_name(b);
                    }
                    self.count_trailer()?;
                    i += 1;
                }
                State::TrailerValue => {
                    if b == b'\r' {
                        self.state = State::TrailerLf;
                    } else if !is_field_char(b) {
                        return Err(ChunkedError::BadFraming);
                    }
                    self.count_trailer()?;
                    i += 1;
                }
                State::TrailerLf => {
                    if b != b'\n' {
                        return Err(ChunkedError::BadFraming);
                    }
                    self.state = State::TrailerStart;
                    i += 1;
                }
                State::FinalLf => {
                    if b != b'\n' {
                        return Err(ChunkedError::BadFraming);
                    }
                    self.state = State::Done;
                    i += 1;
                }
                State::Done => break,
            }
            if self.state == State::Done {
                break;
            }
        }
        Ok(i)
    }
}

impl ChunkedDecoder {
    /// Chunk data bytes that may follow without being looked at: the rest of the chunk
    /// being read (0 outside chunk data). A spliced body moves these without user space.
    pub fn data_left(&self) -> u64 {
        if self.state == State::Data {
            self.remaining
        } else {
            0
        }
    }

    /// Counts `n` (at most [`ChunkedDecoder::data_left`]) chunk data bytes moved past the
    /// decoder; their chunk's CRLF (RFC 9112 §7.1) is checked by the next `decode`. The
    /// payload was already counted when the chunk-size line was read.
    pub fn skip_data(&mut self, n: u64) {
        debug_assert!(n <= self.data_left(), "skipped past the chunk's data");
        self.remaining -= n.min(self.remaining);
        if self.state == State::Data && self.remaining == 0 {
            self.state = State::DataCr;
        }
    }
}

impl ChunkedDecoder {
    fn count_line(&mut self) -> Result<(), ChunkedError> {
        self.line_len += 1;
        if self.line_len > MAX_CHUNK_LINE {
            return Err(ChunkedError::TooLong);
        }
        Ok(())
    }

    fn push_name(&mut self, b: u8) {
        if let Some(slot) = self.name.get_mut(self.name_len) {
            *slot = b;
        }
        self.name_len += 1;
    }

    fn count_trailer(&mut self) -> Result<(), ChunkedError> {
        self.trailer_len += 1;
        if self.trailer_len > MAX_TRAILERS {
            return Err(ChunkedError::TooLong);
        }
        Ok(())
    }
}

/// RFC 9110 §5.6.2 `tchar`: the characters of a field name.
pub fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// RFC 9110 §5.5 field-vchar, SP or HTAB: what a field value (or extension) may hold.
/// Excludes CR, LF, NUL and the other controls.
pub(crate) fn is_field_char(b: u8) -> bool {
    b == b'\t' || (b' '..=b'~').contains(&b) || b >= 0x80
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(input: &[u8]) -> Result<(usize, Vec<u8>, bool), ChunkedError> {
        let mut d = ChunkedDecoder::new();
        let mut out = Vec::new();
        let n = d.decode(input, |s| out.extend_from_slice(s))?;
        Ok((n, out, d.is_done()))
    }

    #[test]
    fn whole_body() {
        let body = b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n\r\nNEXT";
        let (n, out, done) = decode_all(body).unwrap();
        assert!(done);
        assert_eq!(&out, b"hello world");
        assert_eq!(&body[n..], b"NEXT");
    }

    #[test]
    fn trailers() {
        let body = b"3\r\nabc\r\n0\r\nX-Sum: 1\r\nY: 2\r\n\r\n";
        let (n, out, done) = decode_all(body).unwrap();
        assert!(done);
        assert_eq!(n, body.len());
        assert_eq!(&out, b"abc");
    }

    #[test]
    fn split_at_every_boundary() {
        let body = b"a\r\n0123456789\r\n1F\r\n0123456789012345678901234567890\r\n0\r\nT: v\r\n\r\n";
        for split in 0..body.len() {
            let mut d = ChunkedDecoder::new();
            let mut out = Vec::new();
            let a = d
                .decode(&body[..split], |s| out.extend_from_slice(s))
                .unwrap();
            assert_eq!(a, split);
            let b = d
                .decode(&body[split..], |s| out.extend_from_slice(s))
                .unwrap();
            assert_eq!(a + b, body.len());
            assert!(d.is_done(), "split at {split}");
            assert_eq!(out.len(), 41);
            assert_eq!(d.payload, 41);
        }
    }

    #[test]
    fn extensions_with_whitespace() {
        for body in [
            &b"5 ;a=1\r\nhello\r\n0;b\r\n\r\n"[..],
            b"5;a=b;c=d\r\nhello\r\n0;e=f\r\n\r\n",
            b"5; a = 1 ; b=\"x\\\"y; z\"\r\nhello\r\n0;c;d=e\r\n\r\n",
        ] {
            let (n, out, done) = decode_all(body).unwrap();
            assert!(done && n == body.len() && out == b"hello");
        }
    }

    #[test]
    fn endless_extension_and_trailers_are_capped() {
        let mut d = ChunkedDecoder::new();
        assert_eq!(d.decode(b"5;a=", |_| {}), Ok(4));
        let junk = vec![b'a'; 1024];
        let mut err = None;
        for _ in 0..64 {
            if let Err(e) = d.decode(&junk, |_| {}) {
                err = Some(e);
                break;
            }
        }
        assert_eq!(err, Some(ChunkedError::TooLong));
        let mut d = ChunkedDecoder::new();
        d.decode(b"0\r\n", |_| {}).unwrap();
        let line = b"X-Pad: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n";
        let failed = (0..1000).any(|_| d.decode(line, |_| {}).is_err());
        assert!(failed, "trailers are bounded");
    }

    #[test]
    fn bad_sizes() {
        for bad in [
            &b"x\r\n"[..],
            b"\r\n",
            b"-1\r\n",
            b"5\nhello",
            b"ffffffffffffffffff\r\n",
            b"3\r\nabcX\r\n",
            b"0x5\r\n",
            // Text after whitespace, trailing whitespace, a bare LF anywhere.
            b"5 junk\r\nhello\r\n0\r\n\r\n",
            b"5 \r\nhello\r\n0\r\n\r\n",
            b"5;a\nb\r\nhello\r\n",
            b"5;a\0\r\nhello\r\n",
            // Chunk extensions outside RFC 9112 §7.1.1.
            b"5;\r\nhello\r\n0\r\n\r\n",
            b"5;a=b junk\r\nhello\r\n0\r\n\r\n",
            b"5;a=\r\nhello\r\n0\r\n\r\n",
            b"5;=b\r\nhello\r\n0\r\n\r\n",
            b"5;a=\"b\r\nhello\r\n0\r\n\r\n",
            b"5;a;\r\nhello\r\n0\r\n\r\n",
            b"0\r\n\nGET /admin HTTP/1.1\r\n\r\n",
            b"0\r\nX: 1\n\r\n",
            b"0\r\nX: 1\r\n\n",
            b"0\r\nX 1\r\n\r\n",
            b"0\r\n: v\r\n\r\n",
            b"0\r\n X: 1\r\n\r\n",
            b"0\r\nX: a\rb\r\n\r\n",
            b"0\r\nContent-Length: 5\r\n\r\n",
            b"0\r\nX-Forwarded-For: 1.2.3.4\r\n\r\n",
            b"0\r\nx_real_ip: 1.2.3.4\r\n\r\n",
            b"0\r\nHost: evil\r\n\r\n",
        ] {
            assert!(
                decode_all(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
