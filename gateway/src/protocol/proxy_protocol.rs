//! The PROXY protocol header (HAProxy's spec, versions 1 and 2) that an L4 load balancer
//! puts in front of a connection to pass on the real client address.
//!
//! Only what a listener with `proxy_protocol = true` needs: the source address of a TCP
//! connection. `LOCAL` (v2) and `UNKNOWN` (v1) headers, used by health checks of the
//! balancer itself, keep the peer address. TLVs are skipped.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// A v1 header is at most 107 bytes including CRLF (spec §2.1).
const V1_MAX: usize = 107;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    /// More bytes are needed.
    Incomplete,
    /// A complete header of `len` bytes; `source` is the client when the header names one.
    Header {
        len: usize,
        source: Option<SocketAddr>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Invalid;

/// Parses a PROXY header at the start of `buf`.
pub fn parse(buf: &[u8]) -> Result<Parsed, Invalid> {
    if buf.is_empty() {
        return Ok(Parsed::Incomplete);
    }
    let sig_len = buf.len().min(V2_SIGNATURE.len());
    if buf[..sig_len] == V2_SIGNATURE[..sig_len] {
        return parse_v2(buf);
    }
    let v1_len = buf.len().min(6);
    if buf[..v1_len] == b"PROXY "[..v1_len] {
        return parse_v1(buf);
    }
    Err(Invalid)
}

fn parse_v1(buf: &[u8]) -> Result<Parsed, Invalid> {
    let Some(end) = buf.iter().take(V1_MAX).position(|&b| b == b'\n') else {
        return if buf.len() >= V1_MAX {
            Err(Invalid)
        } else {
            Ok(Parsed::Incomplete)
        };
    };
    let line = &buf[..end];
    let line = line.strip_suffix(b"\r").ok_or(Invalid)?;
    let text = std::str::from_utf8(line).map_err(|_| Invalid)?;
    let mut parts = text.split(' ');
    let (_proxy, proto) = (parts.next(), parts.next().ok_or(Invalid)?);
    let len = end + 1;
    if proto == "UNKNOWN" {
        return Ok(Parsed::Header { len, source: None });
    }
    let src: IpAddr = parts.next().ok_or(Invalid)?.parse().map_err(|_| Invalid)?;
    let dst: IpAddr = parts.next().ok_or(Invalid)?.parse().map_err(|_| Invalid)?;
    let sport: u16 = parts.next().ok_or(Invalid)?.parse().map_err(|_| Invalid)?;
    let _dport: u16 = parts.next().ok_or(Invalid)?.parse().map_err(|_| Invalid)?;
    let family_ok = match proto {
        "TCP4" => src.is_ipv4() && dst.is_ipv4(),
        "TCP6" => src.is_ipv6() && dst.is_ipv6(),
        _ => false,
    };
    if !family_ok || parts.next().is_some() {
        return Err(Invalid);
    }
    Ok(Parsed::Header {
        len,
        source: Some(SocketAddr::new(src, sport)),
    })
}

fn parse_v2(buf: &[u8]) -> Result<Parsed, Invalid> {
    if buf.len() < 16 {
        return Ok(Parsed::Incomplete);
    }
    let version_command = buf[12];
    if version_command >> 4 != 2 {
        return Err(Invalid);
    }
    let family = buf[13];
    let body_len = u16::from_be_bytes([buf[14], buf[15]]) as usize;
    let len = 16 + body_len;
    if buf.len() < len {
        return Ok(Parsed::Incomplete);
    }
    let body = &buf[16..len];
    // Spec §2.2: the family byte is an address family (UNSPEC, INET, INET6, UNIX) and a
    // transport (UNSPEC, STREAM, DGRAM); other values "must be rejected as invalid", and a
    // length shorter than the family's address block is a malformed header, never a
    // header without an address: the bytes left over would be read as HTTP.
    let address_len = match (family >> 4, family & 0x0f) {
        (_, 3..) => return Err(Invalid),
        (0, _) => 0,
        (1, _) => 12,
        (2, _) => 36,
        (3, _) => 216,
        _ => return Err(Invalid),
    };
    let source = match version_command & 0x0f {
        // LOCAL: the balancer talking for itself; the address block is ignored.
        0 => None,
        1 if body.len() < address_len => return Err(Invalid),
        // PROXY over TCP/IPv4.
        1 if family == 0x11 => {
            let ip = Ipv4Addr::new(body[0], body[1], body[2], body[3]);
            Some(SocketAddr::new(
                IpAddr::V4(ip),
                u16::from_be_bytes([body[8], body[9]]),
            ))
        }
        // PROXY over TCP/IPv6.
        1 if family == 0x21 => {
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&body[..16]);
            let ip = Ipv6Addr::from(octets);
            Some(SocketAddr::new(
                IpAddr::V6(ip),
                u16::from_be_bytes([body[32], body[33]]),
            ))
        }
        // Other families (UNSPEC, UDP, unix): nothing a TCP proxy can use.
        1 => None,
        _ => return Err(Invalid),
    };
    Ok(Parsed::Header { len, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1() {
        let h = b"PROXY TCP4 203.0.113.7 10.0.0.1 51234 443\r\nGET / HTTP/1.1\r\n";
        assert_eq!(
            parse(h),
            Ok(Parsed::Header {
                len: 43,
                source: Some("203.0.113.7:51234".parse().unwrap())
            })
        );
        let h6 = b"PROXY TCP6 2001:db8::1 2001:db8::2 1 2\r\n";
        assert!(
            matches!(parse(h6), Ok(Parsed::Header { source: Some(s), .. }) if s.ip() == "2001:db8::1".parse::<IpAddr>().unwrap())
        );
        assert_eq!(
            parse(b"PROXY UNKNOWN\r\n"),
            Ok(Parsed::Header {
                len: 15,
                source: None
            })
        );
        assert_eq!(parse(b"PROXY TCP4 203.0"), Ok(Parsed::Incomplete));
        assert_eq!(parse(b"PRO"), Ok(Parsed::Incomplete));
        assert_eq!(parse(b"GET / HTTP/1.1\r\n"), Err(Invalid));
        for bad in [
            &b"PROXY TCP4 2001:db8::1 1.2.3.4 1 2\r\n"[..],
            b"PROXY TCP4 1.2.3.4 2001:db8::1 1 2\r\n",
            b"PROXY TCP6 2001:db8::1 1.2.3.4 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",
            b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n",
        ] {
            assert_eq!(parse(bad), Err(Invalid), "{}", String::from_utf8_lossy(bad));
        }
        assert_eq!(parse(&[b'P'; 200][..]), Err(Invalid));
    }

    #[test]
    fn v2() {
        let mut h = V2_SIGNATURE.to_vec();
        h.extend_from_slice(&[0x21, 0x11, 0, 12]);
        h.extend_from_slice(&[203, 0, 113, 7, 10, 0, 0, 1]);
        h.extend_from_slice(&51234u16.to_be_bytes());
        h.extend_from_slice(&443u16.to_be_bytes());
        for split in 0..h.len() {
            assert_eq!(parse(&h[..split]), Ok(Parsed::Incomplete), "split {split}");
        }
        assert_eq!(
            parse(&h),
            Ok(Parsed::Header {
                len: 28,
                source: Some("203.0.113.7:51234".parse().unwrap())
            })
        );
        // An address block shorter than the family's, an unknown family or transport, an
        // unknown command: invalid, never a header without an address.
        for (command_family, body_len) in [
            ([0x21, 0x11], 4),
            ([0x21, 0x11], 11),
            ([0x21, 0x12], 0),
            ([0x21, 0x21], 12),
            ([0x21, 0x31], 108),
            ([0x21, 0x41], 12),
            ([0x21, 0x13], 12),
            ([0x22, 0x11], 12),
            ([0x11, 0x11], 12),
        ] {
            let mut bad = V2_SIGNATURE.to_vec();
            bad.extend_from_slice(&command_family);
            bad.extend_from_slice(&(body_len as u16).to_be_bytes());
            bad.resize(16 + body_len, 1);
            bad.extend_from_slice(b"GET / HTTP/1.1\r\n");
            assert_eq!(
                parse(&bad),
                Err(Invalid),
                "{command_family:x?} length {body_len}"
            );
        }
        // A longer block (TLVs) is fine.
        let mut tlv = h.clone();
        tlv[15] = 15;
        tlv.extend_from_slice(&[0x04, 0, 0]);
        assert!(matches!(
            parse(&tlv),
            Ok(Parsed::Header {
                len: 31,
                source: Some(_)
            })
        ));
        // LOCAL (the balancer's own check) and PROXY with UNSPEC carry no address.
        for command in [0x20, 0x21] {
            let mut none = V2_SIGNATURE.to_vec();
            none.extend_from_slice(&[command, 0x00, 0, 0]);
            assert_eq!(
                parse(&none),
                Ok(Parsed::Header {
                    len: 16,
                    source: None
                })
            );
        }
    }
}
