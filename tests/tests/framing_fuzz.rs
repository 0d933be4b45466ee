//! The framing differential fuzzer (issue 10 "How it is proven").
//!
//! A seeded PRNG generates client connections carrying one to three pipelined requests with
//! mutated framing: header-name case and whitespace, `Content-Length`/`Transfer-Encoding`
//! combinations and spellings, `Connection` lists naming framing headers, chunk extensions,
//! trailers, bare-LF line ends, and bodies that are themselves requests. They go through
//! the real gateway to a recording upstream ([`gateway_tests::recording`]) that parses every
//! forwarded byte stream twice, strictly and leniently. The checks:
//!
//! 1. what the gateway forwarded parses strictly, and both parsers read the same requests
//!    (same method, target and body length) out of it: no server behind the gateway,
//!    strict or forgiving, can be desynchronised;
//! 2. every request the upstream parsed (under either parser) is one the gateway logged as
//!    proxied (JSON access log), and the counts match: nothing is smuggled;
//! 3. every request whose meaning is unambiguous arrives with the body length the client
//!    framed; every connection of only valid requests is forwarded whole.
//!
//! Seed and size: `FRAMING_FUZZ_SEED` (default: from the clock, printed) and
//! `FRAMING_FUZZ_CASES` (default 3000). Reproduce a failure with the printed seed.
//! Run: `GATEWAY_BIN=$PWD/target/debug/gateway cargo test -p gateway-tests --test framing_fuzz`

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gateway_tests::recording::{parse_stream, Mode, Recorder};
use gateway_tests::{Config, Gateway, Route, Upstream};

/// xorshift64*: small, seedable, good enough to pick mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    /// True with probability `p` percent.
    fn pct(&mut self, p: usize) -> bool {
        self.below(100) < p
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// What the generator meant by one request.
#[derive(Clone, Debug)]
struct Intent {
    target: String,
    /// The body length under RFC 9112, when the framing is unambiguous (valid or
    /// canonicalisable); `None` when a compliant proxy must refuse it.
    body_len: Option<usize>,
    /// No mutation that a proxy may refuse: the gateway must forward it.
    valid: bool,
}

/// One client connection.
struct Case {
    id: usize,
    bytes: Vec<u8>,
    intents: Vec<Intent>,
}

fn name_case(rng: &mut Rng, name: &str) -> String {
    match rng.below(4) {
        0 => name.to_ascii_lowercase(),
        1 => name.to_ascii_uppercase(),
        2 => name
            .chars()
            .enumerate()
            .map(|(i, c)| {
                if i % 2 == 0 {
                    c.to_ascii_uppercase()
                } else {
                    c.to_ascii_lowercase()
                }
            })
            .collect(),
        _ => name.to_string(),
    }
}

/// Writes one header line with mutated name case and whitespace; may break the line end.
fn header(rng: &mut Rng, out: &mut Vec<u8>, name: &str, value: &str, valid: &mut bool) {
    let name = name_case(rng, name);
    let ows = *rng.pick(&["", " ", " ", " ", "\t", "  "]);
    let tail = *rng.pick(&["", "", "", " ", "\t"]);
    let before_colon = if rng.pct(2) {
        *valid = false;
        " "
    } else {
        ""
    };
    let eol = if rng.pct(3) {
        *valid = false;
        "\n"
    } else {
        "\r\n"
    };
    out.extend_from_slice(format!("{name}{before_colon}:{ows}{value}{tail}{eol}").as_bytes());
}

fn body_bytes(rng: &mut Rng, case: usize, i: usize) -> Vec<u8> {
    if rng.pct(20) {
        // A body that is a request: if a server behind the gateway ever parses it, the
        // gateway never logged it, and check 2 fails.
        format!("GET /fz/{case}/smuggled{i} HTTP/1.1\r\nHost: fz\r\n\r\n").into_bytes()
    } else {
        let n = rng.below(40);
        (0..n).map(|k| b'a' + ((k + i) % 26) as u8).collect()
    }
}

fn chunked_body(rng: &mut Rng, body: &[u8], valid: &mut bool) -> Vec<u8> {
    let mut out = Vec::new();
    let mut at = 0;
    let bare = |rng: &mut Rng, valid: &mut bool| {
        if rng.pct(3) {
            *valid = false;
            "\n"
        } else {
            "\r\n"
        }
    };
    while at < body.len() {
        let n = (1 + rng.below(16)).min(body.len() - at);
        let size = if rng.pct(10) {
            format!("{n:04x}")
        } else {
            format!("{n:x}")
        };
        let ext = match rng.below(12) {
            0 => ";a=b".to_string(),
            1 => ";name".to_string(),
            2 => " ;a=\"q v\"".to_string(),
            3 => {
                *valid = false;
                " junk".to_string()
            }
            4 => {
                *valid = false;
                ";".to_string()
            }
            _ => String::new(),
        };
        let eol = bare(rng, valid);
        out.extend_from_slice(format!("{size}{ext}{eol}").as_bytes());
        out.extend_from_slice(&body[at..at + n]);
        out.extend_from_slice(bare(rng, valid).as_bytes());
        at += n;
    }
    out.extend_from_slice(format!("0{}", bare(rng, valid)).as_bytes());
    if rng.pct(20) {
        out.extend_from_slice(format!("X-Trailer: t{}", bare(rng, valid)).as_bytes());
    }
    out.extend_from_slice(bare(rng, valid).as_bytes());
    out
}

fn gen_request(rng: &mut Rng, case: usize, i: usize, last: bool, out: &mut Vec<u8>) -> Intent {
    let target = format!("/fz/{case}/{i}");
    let method = *rng.pick(&["GET", "POST", "POST", "PUT"]);
    let mut valid = true;
    out.extend_from_slice(format!("{method} {target} HTTP/1.1\r\n").as_bytes());
    header(rng, out, "Host", "fz.test", &mut valid);
    let body = body_bytes(rng, case, i);
    let mut body_len = Some(body.len());
    // Connection: sometimes naming framing or routing headers, sometimes closing.
    let mut conn: Vec<&str> = Vec::new();
    if rng.pct(25) {
        let named = *rng.pick(&[
            "keep-alive",
            "Content-Length",
            "Transfer-Encoding",
            "Host",
            "X-Foo",
        ]);
        // Naming what frames or routes the message: a proxy may refuse it (or must keep
        // the header); either way it is not a plain valid request.
        valid &= !matches!(named, "Content-Length" | "Transfer-Encoding" | "Host");
        conn.push(named);
    }
    if last {
        conn.push("close");
    }
    if !conn.is_empty() {
        let v = conn.join(*rng.pick(&[", ", ",", " , "]));
        header(rng, out, "Connection", &v, &mut valid);
    }
    let framing = if body.is_empty() && rng.pct(50) {
        0
    } else {
        1 + rng.below(5)
    };
    let mut wire_body = body.clone();
    match framing {
        0 => {}
        1 | 2 => {
            // Content-Length, mostly plain, sometimes in forms to canonicalise or refuse.
            let n = body.len();
            // Forms to canonicalise (issue 17.8) are unambiguous but may be refused.
            match rng.below(10) {
                0 => {
                    header(rng, out, "Content-Length", &format!("{n:04}"), &mut valid);
                    valid = false;
                }
                1 => {
                    header(rng, out, "Content-Length", &format!("{n}, {n}"), &mut valid);
                    valid = false;
                }
                2 => {
                    header(rng, out, "Content-Length", &n.to_string(), &mut valid);
                    header(rng, out, "Content-Length", &n.to_string(), &mut valid);
                    valid = false;
                }
                3 => {
                    header(rng, out, "Content-Length", &(n + 1).to_string(), &mut valid);
                    body_len = None;
                    valid = false;
                }
                4 => {
                    header(
                        rng,
                        out,
                        "Content-Length",
                        &format!("{n}, {}", n + 1),
                        &mut valid,
                    );
                    body_len = None;
                    valid = false;
                }
                _ => header(rng, out, "Content-Length", &n.to_string(), &mut valid),
            }
        }
        3 | 4 => {
            let te = *rng.pick(&[
                "chunked",
                "chunked",
                "chunked",
                "Chunked",
                "chunked,",
                ", chunked",
                "gzip, chunked",
                "identity",
                "chunked, identity",
            ]);
            if matches!(te, "gzip, chunked" | "identity" | "chunked, identity") {
                valid = false;
                body_len = None;
            }
            // Empty list elements are normalised away (issue 17.7), or refused.
            valid &= te == "chunked" || te == "Chunked";
            header(rng, out, "Transfer-Encoding", te, &mut valid);
            if rng.pct(10) {
                header(rng, out, "Transfer-Encoding", "", &mut valid);
                valid = false;
            }
            wire_body = chunked_body(rng, &body, &mut valid);
        }
        _ => {
            // Both framings: RFC 9112 §6.1, a proxy must not forward this as it stands.
            header(
                rng,
                out,
                "Content-Length",
                &body.len().to_string(),
                &mut valid,
            );
            header(rng, out, "Transfer-Encoding", "chunked", &mut valid);
            wire_body = chunked_body(rng, &body, &mut valid);
            valid = false;
            body_len = None;
        }
    }
    if rng.pct(10) {
        header(rng, out, "X_Forwarded_For", "6.6.6.6", &mut valid);
    }
    out.extend_from_slice(if rng.pct(3) {
        valid = false;
        b"\n"
    } else {
        b"\r\n"
    });
    out.extend_from_slice(&wire_body);
    Intent {
        target,
        body_len,
        valid,
    }
}

fn gen_case(rng: &mut Rng, id: usize) -> Case {
    let n = 1 + rng.below(3);
    let mut bytes = Vec::new();
    let intents = (0..n)
        .map(|i| gen_request(rng, id, i, i + 1 == n, &mut bytes))
        .collect();
    Case { id, bytes, intents }
}

/// Sends a case and reads until the gateway closes (every case's last request says close,
/// and a refusal closes too), stays silent for 1 s, or 5 s pass: closing earlier could cut
/// off pipelined requests the gateway has yet to forward.
fn run_case(addr: std::net::SocketAddr, case: &Case) {
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)) else {
        return;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    let _ = s.write_all(&case.bytes);
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut buf = [0u8; 8192];
    while Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
}

fn env_num(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

#[test]
fn framing_differential_fuzz() {
    let seed = env_num("FRAMING_FUZZ_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
    });
    let cases = env_num("FRAMING_FUZZ_CASES").unwrap_or(3000) as usize;
    eprintln!("framing fuzz: FRAMING_FUZZ_SEED={seed} FRAMING_FUZZ_CASES={cases}");

    let recorder = Recorder::start();
    let gw = Gateway::with(
        &Config::new()
            .log("format", "json")
            .upstream(Upstream::new("rec", &[recorder.addr()]).keepalive(8))
            .route(Route::prefix("/", "rec")),
    );
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let all: Arc<Vec<Case>> = Arc::new((0..cases).map(|id| gen_case(&mut rng, id)).collect());
    let started = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let (all, next, addr) = (all.clone(), next.clone(), gw.http_addr());
            std::thread::spawn(move || loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                let Some(case) = all.get(i) else { break };
                run_case(addr, case);
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    // Let both logs settle: the gateway's access log and the recorder's streams.
    let snapshot = || {
        (
            gw.access_log().len(),
            recorder.streams().iter().map(Vec::len).sum::<usize>(),
        )
    };
    let (mut last, mut stable) = (snapshot(), 0);
    while stable < 2 {
        std::thread::sleep(Duration::from_millis(300));
        let now = snapshot();
        stable = if now == last { stable + 1 } else { 0 };
        last = now;
    }
    eprintln!(
        "framing fuzz: {cases} cases sent in {:?}",
        started.elapsed()
    );

    let intents: BTreeMap<String, (usize, Intent)> = all
        .iter()
        .flat_map(|c| {
            c.intents
                .iter()
                .map(move |i| (i.target.clone(), (c.id, i.clone())))
        })
        .collect();
    let mut logged: BTreeMap<String, usize> = BTreeMap::new();
    let rec = recorder.addr().to_string();
    for line in gw.access_log().lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if v["upstream"].as_str() == Some(rec.as_str()) {
            *logged
                .entry(v["uri"].as_str().unwrap_or_default().to_string())
                .or_default() += 1;
        }
    }
    let logged_total: usize = logged.values().sum();

    let mut findings = Findings::default();
    let mut parsed_total = 0;
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for (n, stream) in recorder.streams().iter().enumerate() {
        let strict = parse_stream(stream, Mode::Strict);
        let lenient = parse_stream(stream, Mode::Lenient);
        if let Some(e) = &strict.error {
            // A body still arriving (the client under-sent a Content-Length) is not the
            // gateway's doing; anything else is.
            if !e.contains("left incomplete") {
                findings.add(
                    "forwarded framing a strict parser rejects (non-canonical or invalid)",
                    format!(
                        "upstream connection {n}, after {} request(s): {e}",
                        strict.requests.len()
                    ),
                );
            }
        }
        // After a strict error the lenient parser reads on by design; what it reads there is
        // judged by the smuggling checks below. Without one, the two must agree exactly.
        if strict.error.is_none() && strict.requests != lenient.requests {
            findings.add(
                "strict and lenient parsers disagree (desync)",
                format!(
                    "upstream connection {n}:\n    strict:  {:?}\n    lenient: {:?}",
                    strict.requests, lenient.requests
                ),
            );
        }
        parsed_total += strict.requests.len();
        let mut union = strict.requests.clone();
        union.extend(
            lenient
                .requests
                .iter()
                .filter(|p| !strict.requests.contains(p))
                .cloned(),
        );
        for p in &union {
            *seen.entry(p.target.clone()).or_default() += 1;
            match intents.get(&p.target) {
                None => findings.add(
                    "SMUGGLED: the upstream parsed a request no client sent as one",
                    format!("{} {} (upstream connection {n})", p.method, p.target),
                ),
                Some((case, intent)) => {
                    if let Some(len) = intent.body_len.filter(|len| *len != p.body_len) {
                        findings.add(
                            "body length differs from what the client framed",
                            format!(
                                "{} arrived with {} body bytes, the client framed {len}; sent: {}",
                                p.target,
                                p.body_len,
                                excerpt(&all[*case].bytes)
                            ),
                        );
                    }
                }
            }
        }
    }
    for (target, n) in &seen {
        let l = logged.get(target).copied().unwrap_or(0);
        if *n > l && intents.contains_key(target) {
            findings.add(
                "SMUGGLED: parsed upstream more often than the gateway logged proxying it",
                format!("{target}: parsed {n}, logged {l}"),
            );
        }
    }
    // The gateway also logs requests the strict recorder refused (as proxied), so only an
    // excess upstream is a finding.
    if parsed_total > logged_total {
        findings.add(
            "SMUGGLED: more requests upstream than logged",
            format!(
                "the upstream parsed {parsed_total}, the gateway logged {logged_total} proxied"
            ),
        );
    }
    let mut all_valid = 0;
    for case in all.iter().filter(|c| c.intents.iter().all(|i| i.valid)) {
        all_valid += 1;
        for i in case
            .intents
            .iter()
            .filter(|i| !seen.contains_key(&i.target))
        {
            findings.add(
                "a valid request never reached the upstream",
                format!("{}; sent: {}", i.target, excerpt(&case.bytes)),
            );
        }
    }
    eprintln!(
        "framing fuzz: {all_valid} all-valid connections, {parsed_total} requests parsed \
         upstream, {logged_total} logged proxied, {} finding(s)",
        findings.total()
    );
    assert!(
        findings.total() == 0,
        "framing fuzz (FRAMING_FUZZ_SEED={seed} FRAMING_FUZZ_CASES={cases}): {} finding(s) by \
         class, up to {EXAMPLES} examples each:\n{}",
        findings.total(),
        findings.report()
    );
}

const EXAMPLES: usize = 6;

/// Findings grouped by class, with a few examples each.
#[derive(Default)]
struct Findings(BTreeMap<&'static str, (usize, Vec<String>)>);

impl Findings {
    fn add(&mut self, class: &'static str, example: String) {
        let e = self.0.entry(class).or_default();
        e.0 += 1;
        if e.1.len() < EXAMPLES {
            e.1.push(example);
        }
    }
    fn total(&self) -> usize {
        self.0.values().map(|v| v.0).sum()
    }
    fn report(&self) -> String {
        let mut out = String::new();
        for (class, (n, examples)) in &self.0 {
            out.push_str(&format!("== {class}: {n}\n"));
            for e in examples {
                out.push_str(&format!("  - {e}\n"));
            }
        }
        out
    }
}

fn excerpt(bytes: &[u8]) -> String {
    format!(
        "{:?}",
        String::from_utf8_lossy(&bytes[..bytes.len().min(300)])
    )
}
