//! Self-tests of the harness, client straight to origin with no gateway in between: when a
//! gateway test fails, these show the fixtures themselves are sound (and they run before the
//! gateway binary exists).

use std::time::{Duration, Instant};

use gateway_tests::client::{connect_from, Client, Req};
use gateway_tests::config::{Config, Route, Upstream};
use gateway_tests::wire::{encode_chunked, BodyFraming, CloseOutcome};
use gateway_tests::{pattern_bytes, refused_addr, Origin, Reply};

#[test]
fn origin_records_and_answers_content_length_and_chunked() {
    let origin = Origin::echo();
    let mut c = Client::connect(origin.addr());
    let r = c.must(&Req::post("/a?x=1", "hello, world!").header("X-One", "1"));
    assert_eq!(r.status, 200);
    assert_eq!(r.body, b"hello, world!");
    assert_eq!(r.framing, BodyFraming::ContentLength(13));
    let big = pattern_bytes(300_000, 1);
    let r = c.must(&Req::post("/b", big.clone()).chunked(&[1, 7, 65536]));
    assert_eq!(r.body, big);
    let reqs = origin.requests();
    assert_eq!(reqs.len(), 2);
    assert_eq!(reqs[0].target, "/a?x=1");
    assert_eq!(reqs[0].path(), "/a");
    assert_eq!(reqs[0].header("x-one"), Some("1"));
    assert_eq!(reqs[0].framing, BodyFraming::ContentLength(13));
    assert!(matches!(&reqs[1].framing, BodyFraming::Chunked(s) if s[..3] == [1, 7, 65536]));
    assert_eq!(reqs[1].conn, 1, "both requests on one connection");
    assert_eq!(reqs[1].nth_on_conn, 2);
    assert_eq!(origin.accepts(), 1);
    assert!(origin.errors().is_empty());
}

#[test]
fn origin_reply_framings_parse_byte_exact() {
    let body = pattern_bytes(1 << 20, 2);
    let b2 = body.clone();
    let origin = Origin::start(move |req| match req.path() {
        "/cl" => Reply::ok(b2.clone()),
        "/chunked" => Reply::ok(b2.clone()).chunked(&[3, 4096, 100_000]),
        "/close" => Reply::ok(b2.clone()).close_delimited(),
        "/head" => Reply::ok("0123456789"),
        "/204" => Reply::new(204),
        "/103" => Reply::ok("final").interim(103, &[("Link", "</s.css>; rel=preload")]),
        _ => Reply::new(404),
    });
    let mut c = Client::connect(origin.addr());
    let r = c.get("/cl");
    assert_eq!(
        (r.framing.clone(), r.body == body),
        (BodyFraming::ContentLength(1 << 20), true)
    );
    let r = c.get("/chunked");
    assert!(matches!(r.framing, BodyFraming::Chunked(_)));
    assert!(r.body == body);
    let r = c.must(&Req::head("/head"));
    assert_eq!(r.header("content-length"), Some("10"));
    assert!(r.body.is_empty());
    let r = c.get("/204");
    assert_eq!(r.status, 204);
    let r = c.get("/103");
    assert_eq!(r.interim.len(), 1);
    assert_eq!(r.interim[0].status, 103);
    assert_eq!(r.body, b"final");
    let r = c.get("/close");
    assert_eq!(r.framing, BodyFraming::Close);
    assert!(r.body == body);
}

#[test]
fn misbehaving_fixtures_misbehave() {
    let origin = Origin::start(|req| match req.path() {
        "/reset" => Reply::ok(vec![b'x'; 100_000]).reset_after(50_000),
        "/garbage" => Reply::raw("SSH-2.0-nonsense\r\n\r\n"),
        "/stall" => Reply::stall(),
        _ => Reply::ok("fine"),
    });
    // Reset mid-body: the client sees the head, then an error before the body completes.
    let mut c = Client::connect(origin.addr());
    let r = c.request(&Req::get("/reset"));
    assert!(
        r.is_err(),
        "a reset mid-body must not look like a complete response"
    );
    // Garbage: not a status line.
    let mut c = Client::connect(origin.addr());
    assert!(c.request(&Req::get("/garbage")).is_err());
    // Stall: no answer within the read timeout.
    let mut c = Client::connect(origin.addr());
    c.set_read_timeout(Duration::from_millis(300));
    let t = Instant::now();
    assert!(c.request(&Req::get("/stall")).is_err());
    assert!(t.elapsed() >= Duration::from_millis(250));
    // Refused.
    assert!(std::net::TcpStream::connect(refused_addr()).is_err());
    // Black hole: connects, never answers.
    let hole = Origin::black_hole();
    let mut c = Client::connect(hole.addr());
    let (outcome, _) = c.wait_closed(Duration::from_millis(200));
    assert_eq!(outcome, CloseOutcome::StillOpen);
    assert_eq!(hole.accepts(), 1);
}

#[test]
fn origin_idle_close_and_expect_continue() {
    let origin = Origin::builder()
        .idle_close(Duration::from_millis(50))
        .start(Reply::echo);
    let mut c = Client::connect(origin.addr());
    c.send(b"POST /up HTTP/1.1\r\nHost: o\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n")
        .unwrap();
    let head = c.read_head().unwrap();
    assert!(head.start_line.starts_with("HTTP/1.1 100 "));
    c.send(b"abc").unwrap();
    assert_eq!(c.read_response().unwrap().body, b"abc");
    let (outcome, _) = c.wait_closed(Duration::from_secs(2));
    assert!(
        outcome.is_closed(),
        "origin closes an idle connection after 50 ms"
    );
}

#[test]
fn client_binds_chosen_loopback_source() {
    let origin = Origin::echo();
    let s = connect_from("127.0.0.7".parse().unwrap(), origin.addr());
    let mut c = Client {
        wire: gateway_tests::wire::Wire::new(s),
    };
    c.get("/");
    assert_eq!(origin.last_request().peer.ip().to_string(), "127.0.0.7");
}

#[test]
fn pipelined_client_reads_in_order() {
    let origin = Origin::start(|r| Reply::ok(r.target.clone()));
    let mut c = Client::connect(origin.addr());
    let reqs: Vec<Req> = (0..5).map(|i| Req::get(&format!("/{i}"))).collect();
    let rs = c.pipeline(&reqs).unwrap();
    for (i, r) in rs.iter().enumerate() {
        assert_eq!(r.body_str(), format!("/{i}"));
    }
}

#[test]
fn config_builder_writes_contract_keys() {
    let a = refused_addr();
    let t = Config::new()
        .server("header_timeout", "500ms")
        .upstream(
            Upstream::new("api", &[a])
                .weighted(a, 2)
                .balance("least_conn")
                .keepalive(2),
        )
        .route(
            Route::prefix("/api/", "api")
                .read_timeout("300ms")
                .host("h.test"),
        )
        .route(Route::respond_exact("/health", 200, "ok\n"))
        .to_toml();
    let v: toml::Value = t.parse().expect("valid TOML");
    assert_eq!(v["server"]["workers"].as_integer(), Some(2));
    assert_eq!(v["server"]["header_timeout"].as_str(), Some("500ms"));
    assert_eq!(v["log"]["access"].as_str(), Some("stdout"));
    assert!(v["admin"]["listen"]
        .as_str()
        .unwrap()
        .starts_with("127.0.0.1:"));
    assert_eq!(v["listener"][0]["name"].as_str(), Some("http"));
    assert_eq!(
        v["upstream"][0]["servers"][1]["weight"].as_integer(),
        Some(2)
    );
    assert_eq!(v["upstream"][0]["keepalive"].as_integer(), Some(2));
    assert_eq!(v["route"][0]["path_prefix"].as_str(), Some("/api/"));
    assert_eq!(v["route"][1]["respond"]["body"].as_str(), Some("ok\n"));
}

#[test]
fn chunked_encoder_round_trips() {
    let body = pattern_bytes(10_000, 3);
    let enc = encode_chunked(&body, &[1, 2, 4096]);
    assert!(enc.starts_with(b"1\r\n"));
    assert!(enc.ends_with(b"0\r\n\r\n"));
    assert_eq!(encode_chunked(b"", &[5]), b"0\r\n\r\n");
}
