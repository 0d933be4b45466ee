#!/usr/bin/env python3
"""Writes the seed corpus under fuzz/corpus/<target>/ (run from anywhere; needs only the
standard library). Seeds are real requests and responses, the attacks of issue 10 and
classic smuggling shapes. Inputs a fuzzer found are added by hand next to these, named
after what they show; this script does not delete them."""

import os
import ssl
import struct

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")


def put(target, name, data):
    d = os.path.join(ROOT, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode("latin-1"))


def crlf(s):
    return s.replace("\n", "\r\n")


REQUESTS = {
    "get": crlf("GET / HTTP/1.1\nHost: a.example\nUser-Agent: curl/8\nAccept: */*\n\n"),
    "get-query": crlf("GET /search?q=a%20b&x=1 HTTP/1.1\nHost: a.example\n\n"),
    "http10-no-host": crlf("GET /index.html HTTP/1.0\n\n"),
    "http10-keepalive": crlf("GET / HTTP/1.0\nConnection: keep-alive\n\n"),
    "absolute-form": crlf("GET http://a.example/x HTTP/1.1\nHost: a.example\n\n"),
    "options-star": crlf("OPTIONS * HTTP/1.1\nHost: a.example\n\n"),
    "post-length": crlf("POST /api HTTP/1.1\nHost: a.example\nContent-Length: 5\n\n") + "hello",
    "post-chunked": crlf("POST /api HTTP/1.1\nHost: a.example\nTransfer-Encoding: chunked\n\n5\nhello\n0\n\n"),
    "cl-and-te": crlf("POST / HTTP/1.1\nHost: a\nContent-Length: 4\nTransfer-Encoding: chunked\n\n0\n\n"),
    "te-twice": crlf("POST / HTTP/1.1\nHost: a\nTransfer-Encoding: chunked\nTransfer-Encoding: chunked\n\n0\n\n"),
    "te-gzip-chunked": crlf("POST / HTTP/1.1\nHost: a\nTransfer-Encoding: gzip, chunked\n\n0\n\n"),
    "te-chunked-gzip": crlf("POST / HTTP/1.1\nHost: a\nTransfer-Encoding: chunked, gzip\n\n0\n\n"),
    "cl-conflict": crlf("POST / HTTP/1.1\nHost: a\nContent-Length: 3\nContent-Length: 4\n\nabcd"),
    "cl-list-same": crlf("POST / HTTP/1.1\nHost: a\nContent-Length: 3, 3\n\nabc"),
    "cl-dup-same": crlf("POST / HTTP/1.1\nHost: a\nContent-Length: 3\nContent-Length: 3\n\nabc"),
    "cl-plus": crlf("POST / HTTP/1.1\nHost: a\nContent-Length: +3\n\nabc"),
    "host-dup": crlf("GET / HTTP/1.1\nHost: a\nHost: b\n\n"),
    "bare-lf": "GET / HTTP/1.1\nHost: a\n\n",
    "bare-cr": "GET / HTTP/1.1\rHost: a\r\n\r\n",
    "obs-fold": crlf("GET / HTTP/1.1\nHost: a\nX-A: 1\n  continued\n\n"),
    "space-before-colon": crlf("GET / HTTP/1.1\nHost : a\nTransfer-Encoding : chunked\n\n0\n\n"),
    "nul-in-value": crlf("GET / HTTP/1.1\nHost: a\nX: a\x00b\n\n"),
    "websocket": crlf("GET /ws/chat HTTP/1.1\nHost: a\nUpgrade: websocket\nConnection: Upgrade\n"
                      "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\nSec-WebSocket-Version: 13\n\n"),
    "expect-continue": crlf("PUT /up HTTP/1.1\nHost: a\nExpect: 100-continue\nContent-Length: 3\n\nabc"),
    "xff": crlf("GET / HTTP/1.1\nHost: a\nX-Forwarded-For: 203.0.113.9\nX-Forwarded-For: 10.0.0.1, 10.0.0.2\n\n"),
    "forwarded-headers": crlf("GET / HTTP/1.1\nHost: a\nForwarded: for=1.2.3.4\nX-Forwarded-Host: evil\n"
                              "X-Original-URL: /admin\nX-Real-IP: 1.2.3.4\n\n"),
    # Issue 10, class 1: Connection names the framing headers.
    "connection-content-length": crlf("GET /public/ HTTP/1.1\nHost: a\nConnection: Content-Length\n"
                                      "Content-Length: 48\n\n") + crlf("GET /admin/secret.txt HTTP/1.1\nHost: a\n\n").ljust(48, "x"),
    "connection-host": crlf("GET / HTTP/1.1\nHost: a\nConnection: host\n\n"),
    "connection-te": crlf("POST / HTTP/1.1\nHost: a\nConnection: transfer-encoding\nTransfer-Encoding: chunked\n\n0\n\n"),
    "connection-many": crlf("GET / HTTP/1.1\nHost: a\nConnection: close, keep-alive, x-forwarded-for, upgrade\n"
                            "X-Forwarded-For: 1.1.1.1\n\n"),
    "long-target": "GET /" + "a" * 300 + " HTTP/1.1\r\nHost: a\r\n\r\n",
    "many-headers": "GET / HTTP/1.1\r\nHost: a\r\n" + "".join(f"X-{i}: {i}\r\n" for i in range(130)) + "\r\n",
    "no-version": "GET /\r\n\r\n",
    "http2-preface": "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
}

RESPONSES = {
    "resp-200-length": crlf("HTTP/1.1 200 OK\nContent-Type: text/plain\nContent-Length: 2\n\nok"),
    "resp-chunked": crlf("HTTP/1.1 200 OK\nTransfer-Encoding: chunked\n\n2\nok\n0\n\n"),
    "resp-until-close": crlf("HTTP/1.0 200 OK\n\nbody until close"),
    "resp-204": crlf("HTTP/1.1 204 No Content\nContent-Length: 0\n\n"),
    "resp-304": crlf("HTTP/1.1 304 Not Modified\nContent-Length: 1234\nETag: \"x\"\n\n"),
    "resp-101": crlf("HTTP/1.1 101 Switching Protocols\nUpgrade: websocket\nConnection: Upgrade\n"
                     "Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\n\n"),
    "resp-100-then-200": crlf("HTTP/1.1 100 Continue\n\nHTTP/1.1 200 OK\nContent-Length: 0\n\n"),
    "resp-connection-content-length": crlf("HTTP/1.1 200 OK\nConnection: Content-Length\nContent-Length: 2\n\nok"),
    "resp-connection-te": crlf("HTTP/1.1 200 OK\nConnection: Transfer-Encoding\nTransfer-Encoding: chunked\n\n0\n\n"),
    "resp-te-gzip": crlf("HTTP/1.1 200 OK\nTransfer-Encoding: gzip\n\nxxxx"),
    "resp-cl-te": crlf("HTTP/1.1 200 OK\nContent-Length: 3\nTransfer-Encoding: chunked\n\n0\n\n"),
    "resp-cl-list": crlf("HTTP/1.1 200 OK\nContent-Length: 2, 2\n\nok"),
    "resp-bare-lf": "HTTP/1.1 200 OK\nContent-Length: 2\n\nok",
    "resp-no-reason": crlf("HTTP/1.1 200\nContent-Length: 0\n\n"),
    "resp-keepalive-10": crlf("HTTP/1.0 200 OK\nConnection: keep-alive\nContent-Length: 2\n\nok"),
}

for name, data in {**REQUESTS, **RESPONSES}.items():
    put("head", name, data)
    put("rewrite", name, data)

CHUNKED = {
    "simple": "5\r\nhello\r\n0\r\n\r\n",
    "two-chunks-ext": "5;a=b\r\nhello\r\n6 ; x\r\n world\r\n0\r\n\r\n",
    "trailers": "3\r\nabc\r\n0\r\nX-Sum: 1\r\nY: 2\r\n\r\n",
    "upper-hex": "A\r\n0123456789\r\n0\r\n\r\n",
    "leading-zeros": "0005\r\nhello\r\n000\r\n\r\n",
    "pipelined": "0\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n",
    # Issue 10, class 2: a bare LF ends the trailers for nginx, not for us.
    "bare-lf-trailer": "0\r\n\nGET /admin/secret.txt HTTP/1.1\r\nHost: a\r\n\r\n",
    "bare-lf-in-trailer": "0\r\nX: 1\nGET /admin HTTP/1.1\r\n\r\n",
    "bare-lf-size": "5\nhello\r\n0\r\n\r\n",
    "bare-lf-data-end": "5\r\nhello\n0\r\n\r\n",
    "bare-cr-ext": "5;a\rb\r\nhello\r\n0\r\n\r\n",
    "overflow": "fffffffffffffffffff\r\n",
    "huge-size": "7fffffffffffffff\r\nabc",
    "negative": "-1\r\n",
    "hex-prefix": "0x5\r\nhello\r\n0\r\n\r\n",
    "no-data-crlf": "3\r\nabcX\r\n0\r\n\r\n",
    "long-ext": "1;" + "e" * 5000 + "\r\na\r\n0\r\n\r\n",
    "long-trailer": "0\r\nX: " + "t" * 17000 + "\r\n\r\n",
    "empty": "",
}
for name, data in CHUNKED.items():
    put("chunked", name, data)


def v2(cmd, fam, addr):
    return b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x20 | cmd, fam]) + struct.pack(">H", len(addr)) + addr


PROXY = {
    "v1-tcp4": b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\nGET / HTTP/1.1\r\n\r\n",
    "v1-tcp6": b"PROXY TCP6 2001:db8::1 2001:db8::2 56324 443\r\n",
    "v1-unknown": b"PROXY UNKNOWN\r\n",
    "v1-unknown-long": b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n",
    "v1-too-long": b"PROXY TCP4 " + b"1" * 120 + b"\r\n",
    "v1-bad-port": b"PROXY TCP4 192.0.2.1 198.51.100.2 99999 443\r\n",
    "v1-bare-lf": b"PROXY TCP4 192.0.2.1 198.51.100.2 1 2\n",
    "v2-tcp4": v2(1, 0x11, bytes([192, 0, 2, 1, 198, 51, 100, 2]) + struct.pack(">HH", 56324, 443)),
    "v2-tcp6": v2(1, 0x21, bytes(range(16)) + bytes(range(16, 32)) + struct.pack(">HH", 1, 2)),
    "v2-local": v2(0, 0x00, b""),
    "v2-tlv": v2(1, 0x11, bytes([192, 0, 2, 1, 198, 51, 100, 2]) + struct.pack(">HH", 1, 2)
                 + b"\x04\x00\x03abc"),
    "v2-unix": v2(1, 0x31, b"\x00" * 216),
    "v2-short-addr": v2(1, 0x11, b"\x01\x02"),
    "v2-bad-version": b"\r\n\r\n\x00\r\nQUIT\n\x11\x11\x00\x0c" + b"\x00" * 12,
}
for name, data in PROXY.items():
    put("proxy_protocol", name, data)


def script(reads):
    """The tls_stream script format: [len][bytes] per read, len 1..=255."""
    out = b""
    for r in reads:
        while r:
            out += bytes([min(len(r), 255)]) + r[:255]
            r = r[255:]
    return out


def client_hello(**kw):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    for k, v in kw.items():
        setattr(ctx, k, v)
    ctx.set_alpn_protocols(["http/1.1"])
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out, server_hostname="fuzz.example")
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return out.read()


hello13 = client_hello()
hello12 = client_hello(maximum_version=ssl.TLSVersion.TLSv1_2)
put("tls_stream", "hello-tls13", script([hello13]))
put("tls_stream", "hello-tls12", script([hello12]))
put("tls_stream", "hello-byte-by-byte", script([hello13[i:i + 1] for i in range(len(hello13))]))
put("tls_stream", "hello-then-junk", script([hello13, b"\x17\x03\x03\x00\x05hello", b"\x15\x03\x03\x00\x02\x01\x00"]))
put("tls_stream", "plain-http", script([crlf("GET / HTTP/1.1\nHost: a\n\n").encode()]))
put("tls_stream", "sslv2-hello", script([b"\x80\x2e\x01\x00\x02\x00\x15\x00\x00\x00\x10" + b"\x00" * 37]))
# Issue 10, class 3: a handshake message that declares 65,535 bytes, then a stream of
# records carrying it: 255-byte reads repeated (k+1)*8 times per [0][k].
first = b"\x16\x03\x01\x00\xfa" + b"\x01\x00\xff\xff" + b"\x03\x03" + b"\x00" * 244
record = b"\x16\x03\x01\x00\xfa" + b"\x41" * 250
put("tls_stream", "handshake-64k-flood", script([first, record]) + b"\x00\xff" * 4)
put("tls_stream", "junk-flood", script([b"\x16\x03\x01\xff\xff" + b"\x00" * 250]) + b"\x00\xff" * 4)

SEP = "\n@@UPSTREAM@@\n"
G = lambda path, extra="": crlf(f"GET {path} HTTP/1.1\nHost: a.example\n{extra}\n")
CONN = {
    "get": G("/"),
    "get-pipelined": G("/a") + G("/b") + G("/c"),
    "post-length": crlf("POST /api HTTP/1.1\nHost: a\nContent-Length: 5\n\nhello") + G("/next"),
    "post-chunked": crlf("POST /api HTTP/1.1\nHost: a\nTransfer-Encoding: chunked\n\n5\nhello\n0\n\n") + G("/next"),
    "http10": crlf("GET / HTTP/1.0\n\n"),
    "http10-chunked-upstream": crlf("GET / HTTP/1.0\nConnection: keep-alive\n\n") + SEP
        + crlf("HTTP/1.1 200 OK\nTransfer-Encoding: chunked\n\n2\nok\n0\n\n"),
    "head-request": crlf("HEAD / HTTP/1.1\nHost: a\n\n") + SEP + crlf("HTTP/1.1 200 OK\nContent-Length: 10\n\n"),
    "respond-route": G("/admin/secret.txt"),
    "expect-continue": crlf("PUT /up HTTP/1.1\nHost: a\nExpect: 100-continue\nContent-Length: 3\n\nabc") + SEP
        + crlf("HTTP/1.1 100 Continue\n\nHTTP/1.1 201 Created\nContent-Length: 0\n\n"),
    "websocket": crlf("GET /ws HTTP/1.1\nHost: a\nUpgrade: websocket\nConnection: Upgrade\n"
                      "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\nSec-WebSocket-Version: 13\n\n")
        + "\x81\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58" + SEP
        + crlf("HTTP/1.1 101 Switching Protocols\nUpgrade: websocket\nConnection: Upgrade\n"
               "Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\n\n") + "\x81\x05hello",
    "upstream-chunked": G("/") + G("/again") + SEP + crlf("HTTP/1.1 200 OK\nTransfer-Encoding: chunked\n\n2\nok\n0\n\n"),
    "upstream-until-close": G("/") + SEP + crlf("HTTP/1.1 200 OK\n\nuntil close"),
    "upstream-garbage": G("/") + SEP + "HTTP/1.1 2xx\r\n\r\n",
    "upstream-connection-content-length": G("/") + G("/2") + SEP
        + crlf("HTTP/1.1 200 OK\nConnection: Content-Length\nContent-Length: 2\n\nok"),
    "upstream-101-without-upgrade": G("/ws", "Upgrade: websocket\nConnection: upgrade\n") + "tunnel?" + SEP
        + crlf("HTTP/1.1 101 Switching Protocols\n\n"),
    # Issue 10, class 1: the body of a request framed by Content-Length is a request.
    "smuggle-connection-content-length": crlf("GET /public/ HTTP/1.1\nHost: a\nConnection: Content-Length\n"
        "Content-Length: 48\n\n") + crlf("GET /admin/secret.txt HTTP/1.1\nHost: a\n\n").ljust(48, "x"),
    "smuggle-connection-te": crlf("POST /public/ HTTP/1.1\nHost: a\nConnection: transfer-encoding\n"
        "Transfer-Encoding: chunked\n\n") + crlf("2b\nGET /admin/secret.txt HTTP/1.1\nHost: a\n\n\n0\n\n"),
    "smuggle-connection-host": crlf("GET /public/ HTTP/1.1\nHost: admin.example.com\nConnection: host\n\n"),
    "smuggle-cl-te": crlf("POST / HTTP/1.1\nHost: a\nContent-Length: 6\nTransfer-Encoding: chunked\n\n0\n\nG"),
    # Issue 10, class 2: bare LF in the trailer section.
    "smuggle-bare-lf-trailer": crlf("POST /public/ HTTP/1.1\nHost: a\nTransfer-Encoding: chunked\n\n") + "0\r\n\n"
        + crlf("GET /admin/secret.txt HTTP/1.1\nHost: a\n\n"),
    # Issue 10, class 4: routing on the raw target and host.
    "route-dot-dot": G("/public/../admin/secret.txt"),
    "route-encoded-dots": G("/public/%2e%2e/admin/secret.txt"),
    "route-double-slash": G("//admin/secret.txt"),
    "route-encoded-letter": G("/%61dmin/secret.txt"),
    "route-absolute-form": crlf("GET http://a.example/admin/secret.txt HTTP/1.1\nHost: a.example\n\n"),
    "route-host-final-dot": crlf("GET / HTTP/1.1\nHost: admin.example.com.\n\n"),
    "route-host-case-port": crlf("GET / HTTP/1.1\nHost: ADMIN.example.com:80\n\n"),
    "big-head": "GET / HTTP/1.1\r\nHost: a\r\nX: " + "v" * 20000 + "\r\n\r\n",
    "big-body": crlf("POST / HTTP/1.1\nHost: a\nContent-Length: 100000\n\n") + "b" * 100000,
    "slow-pipeline": G("/") * 20,
}
for name, data in CONN.items():
    put("connection", name, data)


def op(o, b=b"", n=None):
    """The tls_session format: [op][n] and, for ops 0 and 1, n bytes."""
    return bytes([o, len(b) if n is None else n]) + b


REQ = b"GET / HTTP/1.1\r\nHost: fuzz.example\r\n\r\n"
SESSION = {
    "request-response": op(0, REQ) + op(2, n=3),
    "pipelined": op(0, REQ) + op(0, REQ) + op(2, n=200) + op(0, b"x" * 255),
    "key-update": op(0, REQ) + op(3, n=0) + op(0, REQ) + op(2, n=10),
    "close-notify": op(0, REQ) + op(3, n=1) + op(0, b"after close"),
    "forged-record": op(0, REQ) + op(1, b"\x17\x03\x03\x00\x10" + b"A" * 16) + op(0, REQ),
    "forged-alert": op(1, b"\x15\x03\x03\x00\x02\x02\x28"),
    "truncated-record": op(1, b"\x17\x03\x03\x40\x00") + op(0, REQ),
    "oversized-record": op(1, b"\x17\x03\x03\xff\xff" + b"\x00" * 250),
    "handshake-after": op(1, b"\x16\x03\x03\x00\x04\x00\x00\x00\x00"),
    "big-write": op(2, n=255) + op(2, n=255) + op(0, REQ),
    "empty": b"",
}
for name, data in SESSION.items():
    put("tls_session", name, data)
    # The input's length parity picks the version: an odd-length twin runs over TLS 1.2.
    put("tls_session", name + "-tls12", data + b"\x02" if len(data) % 2 == 0 else data)
