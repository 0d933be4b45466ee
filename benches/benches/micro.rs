//! Micro-benchmarks of the per-request CPU work the proxy does in user space: parsing a
//! request head into offsets, rewriting it for the upstream, parsing the response head,
//! and choosing a route. `cargo bench -p gateway-benches --bench micro`.

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use gateway::config::Config;
use gateway::policy::route::Router;
use gateway::protocol::http1::head::{parse_request, parse_response, RequestHead, ResponseHead};
use gateway::protocol::http1::rewrite::{
    write_client_response, write_upstream_request, Forwarding,
};
use std::path::Path;

/// A browser-like request head (~500 bytes, 12 fields).
const REQUEST: &[u8] = b"GET /api/v1/orders/12345?expand=items&page=2 HTTP/1.1\r\n\
Host: api.example.com\r\n\
User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0 Safari/537.36\r\n\
Accept: application/json, text/plain, */*\r\n\
Accept-Language: en-GB,en;q=0.9\r\n\
Accept-Encoding: gzip, deflate, br\r\n\
Referer: https://app.example.com/orders\r\n\
Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NSJ9.c2lnbmF0dXJl\r\n\
X-Request-Id: 7f1c2e9a-4b3d-4c6e-9a8b-1d2e3f4a5b6c\r\n\
X-Forwarded-For: 198.51.100.23\r\n\
Connection: keep-alive\r\n\
Cookie: session=abc123; theme=dark\r\n\r\n";

const RESPONSE: &[u8] = b"HTTP/1.1 200 OK\r\n\
Content-Type: application/json\r\n\
Content-Length: 512\r\n\
Cache-Control: no-store\r\n\
Date: Thu, 26 Nov 2026 20:03:09 GMT\r\n\
Server: upstream\r\n\
Keep-Alive: timeout=60\r\n\
X-Request-Id: 7f1c2e9a-4b3d-4c6e-9a8b-1d2e3f4a5b6c\r\n\r\n";

fn router() -> Router {
    let mut text = String::from(
        "[[listener]]\nname = \"http\"\nlisten = \"127.0.0.1:8080\"\n\
         [[upstream]]\nname = \"u\"\nservers = [\"127.0.0.1:8081\"]\n",
    );
    for i in 0..30 {
        text.push_str(&format!(
            "[[route]]\npath_prefix = \"/svc{i}/\"\nupstream = \"u\"\n"
        ));
    }
    text.push_str("[[route]]\npath_prefix = \"/api/\"\nupstream = \"u\"\n");
    text.push_str(
        "[[route]]\npath_prefix = \"/api/v1/\"\nupstream = \"u\"\nhost = \"api.example.com\"\n",
    );
    text.push_str("[[route]]\npath = \"/health\"\nrespond = { status = 200, body = \"ok\" }\n");
    Router::build(&Config::parse(Path::new("bench.toml"), &text).expect("bench config"))
}

fn benches(c: &mut Criterion) {
    let mut head = RequestHead::default();
    c.bench_function("parse_request_head", |b| {
        b.iter(|| parse_request(black_box(REQUEST), &mut head, 16 * 1024).unwrap())
    });

    assert!(parse_request(REQUEST, &mut head, 16 * 1024).unwrap());
    let fwd = Forwarding {
        client_ip: "203.0.113.7".parse().unwrap(),
        peer_ip: "203.0.113.7".parse().unwrap(),
        proto: "https",
        upgrade: false,
        default_host: "gw",
        trusted_peer: false,
        keep_forwarding: &[],
        underscores: false,
    };
    let mut out = Vec::with_capacity(4096);
    c.bench_function("rewrite_request_head", |b| {
        b.iter(|| {
            out.clear();
            write_upstream_request(&mut out, black_box(REQUEST), &head, &fwd);
            out.len()
        })
    });

    let mut resp = ResponseHead::default();
    c.bench_function("parse_and_rewrite_response_head", |b| {
        b.iter(|| {
            parse_response(black_box(RESPONSE), &mut resp, 64 * 1024, false).unwrap();
            out.clear();
            write_client_response(&mut out, RESPONSE, &resp, 1, false, false);
            out.len()
        })
    });

    let router = router();
    c.bench_function("route_match_33_routes", |b| {
        b.iter(|| {
            router
                .find(
                    black_box(Some(&b"api.example.com"[..])),
                    black_box(b"/api/v1/orders/12345"),
                )
                .is_some()
        })
    });
}

criterion_group!(micro, benches);
criterion_main!(micro);
