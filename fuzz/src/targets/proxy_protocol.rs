//! `proxy_protocol`: the PROXY protocol v1/v2 header parser. The input is what a client
//! sends first.
//!
//! Invariants beyond "no panic": a header lies inside the input; what follows it does not
//! change it (the header alone, and the header followed by other bytes, parse the same);
//! every strict prefix of a header is "incomplete", never invalid (the worker parses a
//! growing buffer); a v1 header is at most 107 bytes (spec §2.1).

use crate::check::show;
use gateway::protocol::proxy_protocol::{parse, Parsed};

pub fn run(data: &[u8]) {
    let Ok(Parsed::Header { len, source }) = parse(data) else {
        return;
    };
    assert!(
        len <= data.len(),
        "header of {len} bytes in {} bytes",
        data.len()
    );
    if data.starts_with(b"PROXY ") {
        assert!(len <= 107, "v1 header of {len} bytes");
    }
    let header = &data[..len];
    assert_eq!(
        parse(header),
        Ok(Parsed::Header { len, source }),
        "alone: {}",
        show(header)
    );
    let mut extended = header.to_vec();
    extended.extend_from_slice(b"\r\n\r\nGET / HTTP/1.1\r\n\r\n");
    assert_eq!(parse(&extended), Ok(Parsed::Header { len, source }));
    let step = (len / 256).max(1);
    for cut in (0..len).step_by(step) {
        assert_eq!(
            parse(&header[..cut]),
            Ok(Parsed::Incomplete),
            "prefix of {cut} bytes of {}",
            show(header)
        );
    }
}
