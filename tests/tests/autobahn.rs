//! WebSocket conformance from outside: the Autobahn TestSuite's fuzzing-client cases, run
//! by the `kosoku` runner (PyPI; it drives Autobahn's own case files under Python 3), once
//! straight at a WebSocket echo server and once through the gateway in front of the same
//! server. Every case must end with the same verdict (`behavior` and `behaviorClose`) both
//! ways: the gateway's tunnel must not change what a WebSocket peer sees — no byte lost,
//! reordered, coalesced into a different close, or held back — whatever the frames are
//! (fragmentation, control frames between fragments, invalid UTF-8, reserved bits and
//! opcodes, bad close codes, permessage-deflate).
//!
//! `OK` and `NON-STRICT` count as the same verdict for the exchange: both pass, and which
//! one a "fail fast" case (3.2–3.4, 4.1.3–4.2.5, 5.15, 6.4.*) gets depends only on how the
//! frames were cut into TCP segments — whether the server echoed the valid message before
//! it read the bad frame behind it. Any relay (and the kernel) may change that cut; the
//! runs print such cases without failing. Every other difference fails the test.
//!
//! The echo server is Python `websockets` (a conformant, independent implementation).
//! Performance cases 9.* are skipped (they only time large transfers). Of the compression
//! cases 12.* and 13.*, which repeat one exchange 1,000 times per message size, the four
//! smallest sizes of every group run by default, keeping the test to a few minutes on two
//! cores; `AUTOBAHN_FULL=1` runs every case but 9.*.
//!
//! The runner lives in a virtualenv that `cargo xtask install` creates at
//! `target/autobahn-venv` (or set `AUTOBAHN_PYTHON` to a Python with `kosoku` and
//! `websockets`). When it is missing the test fails under `CI=true`, and elsewhere says
//! loudly that it did not run.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use gateway_tests::{workspace_root, Config, Gateway, Route, Upstream};

/// An echo server: every message back as it came (text as text, binary as binary), with
/// permessage-deflate offered, no size limit and no keep-alive pings of its own. It prints
/// its port once listening.
const ECHO_SERVER: &str = r#"
import asyncio
from websockets.asyncio.server import serve

async def echo(ws):
    try:
        async for message in ws:
            await ws.send(message)
    except Exception:
        pass

async def main():
    async with serve(echo, "127.0.0.1", 0, max_size=None, ping_interval=None) as server:
        print(server.sockets[0].getsockname()[1], flush=True)
        await asyncio.Future()

asyncio.run(main())
"#;

/// The whole run must end within this (both runners run at once); `AUTOBAHN_FULL` runs
/// 463 cases, of which the large compression ones take minutes.
fn run_timeout() -> Duration {
    if std::env::var_os("AUTOBAHN_FULL").is_some() {
        Duration::from_secs(3600)
    } else {
        Duration::from_secs(600)
    }
}

/// A child process killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The Python that has `kosoku` and `websockets`, or why there is none.
fn python() -> Result<PathBuf, String> {
    let python = match std::env::var_os("AUTOBAHN_PYTHON") {
        Some(p) => PathBuf::from(p),
        None => std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| workspace_root().join("target"))
            .join("autobahn-venv/bin/python"),
    };
    let ok = Command::new(&python)
        .args(["-c", "import kosoku, websockets"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        Ok(python)
    } else {
        Err(format!(
            "{} cannot import kosoku and websockets: run `cargo xtask install` (it creates \
             that virtualenv) or set AUTOBAHN_PYTHON",
            python.display()
        ))
    }
}

/// The case ids to run (see the module doc).
fn cases() -> Vec<String> {
    let mut cases: Vec<String> = ["1", "2", "3", "4", "5", "6", "7", "10"]
        .iter()
        .map(|major| format!("{major}.*"))
        .collect();
    if std::env::var_os("AUTOBAHN_FULL").is_some() {
        cases.extend(["12.*".into(), "13.*".into()]);
    } else {
        for (major, groups) in [(12, 5), (13, 7)] {
            for group in 1..=groups {
                for size in 1..=4 {
                    cases.push(format!("{major}.{group}.{size}"));
                }
            }
        }
    }
    cases
}

fn start_echo(python: &Path) -> (Proc, SocketAddr) {
    let mut child = Command::new(python)
        .args(["-c", ECHO_SERVER])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the Python echo server");
    // The port line is printed once the socket listens: reading it is the readiness wait.
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let port: u16 = line
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("echo server printed {line:?}, not its port"));
    (Proc(child), SocketAddr::from(([127, 0, 0, 1], port)))
}

/// Starts one runner against `url`, writing its reports under `out`.
fn start_runner(python: &Path, url: &str, out: &Path) -> Proc {
    let kosoku = python.with_file_name("kosoku");
    let mut cmd = if kosoku.is_file() {
        Command::new(kosoku)
    } else {
        let mut c = Command::new(python);
        c.args(["-c", "from kosoku._cli import main; main()"]);
        c
    };
    for case in cases() {
        cmd.args(["-i", &case]);
    }
    cmd.args(["-x", "9.*", "-p", "4", "-o"])
        .arg(out)
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    Proc(cmd.spawn().expect("start kosoku"))
}

/// Case id → (behavior, behaviorClose) from a runner's `index.json`.
fn verdicts(out: &Path) -> BTreeMap<String, (String, String)> {
    let path = out.join("index.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (the runner wrote no report)", path.display()));
    let index: serde_json::Value = serde_json::from_str(&text).unwrap();
    let agents = index.as_object().expect("index.json maps agents");
    assert_eq!(agents.len(), 1, "one agent per run: {:?}", agents.keys());
    let cases = agents.values().next().unwrap().as_object().unwrap();
    cases
        .iter()
        .map(|(id, r)| {
            let field = |k: &str| r[k].as_str().unwrap_or("?").to_string();
            (id.clone(), (field("behavior"), field("behaviorClose")))
        })
        .collect()
}

/// Whether two (behavior, behaviorClose) verdicts are the same, with `OK` and `NON-STRICT`
/// one verdict for the exchange (see the module doc).
fn same(a: &(String, String), b: &(String, String)) -> bool {
    let exchange = |v: &str| if v == "NON-STRICT" { "OK" } else { v }.to_string();
    exchange(&a.0) == exchange(&b.0) && a.1 == b.1
}

fn wait_all(runners: &mut [&mut Proc]) {
    let deadline = Instant::now() + run_timeout();
    for r in runners.iter_mut() {
        loop {
            // Exit status 1 only says some case did not pass; the verdicts are compared
            // below, so only the report matters.
            if r.0.try_wait().unwrap().is_some() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the Autobahn runs did not finish within {:?}",
                run_timeout()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

#[test]
fn autobahn_cases_end_the_same_through_the_gateway_as_direct() {
    let python = match python() {
        Ok(p) => p,
        Err(why) if std::env::var("CI").as_deref() == Ok("true") => panic!("{why}"),
        Err(why) => {
            eprintln!("\n*** autobahn: NOT RUN: {why} ***\n");
            return;
        }
    };
    let (_echo, echo_addr) = start_echo(&python);
    let gw = Gateway::with(
        &Config::new()
            .upstream(Upstream::new("echo", &[echo_addr]))
            .route(
                Route::prefix("/", "echo")
                    .websocket(true)
                    .read_timeout("60s")
                    .send_timeout("60s"),
            ),
    );
    let reports = tempfile::tempdir().unwrap();
    let (direct_out, via_out) = (reports.path().join("direct"), reports.path().join("via"));
    let t0 = Instant::now();
    let mut direct = start_runner(&python, &format!("ws://{echo_addr}"), &direct_out);
    let mut via = start_runner(&python, &format!("ws://{}", gw.http_addr()), &via_out);
    wait_all(&mut [&mut direct, &mut via]);
    let took = t0.elapsed();

    // Every case really went through the gateway's tunnel (one upgrade each).
    let upgrades = gw
        .access_log()
        .lines()
        .filter(|l| l.contains("\" 101 "))
        .count();
    let direct = verdicts(&direct_out);
    let via = verdicts(&via_out);
    let ok = |v: &BTreeMap<String, (String, String)>| {
        v.values().filter(|(b, c)| b == "OK" && c == "OK").count()
    };
    eprintln!(
        "autobahn: {} cases in {took:?}; all-OK verdicts: {} direct, {} through the gateway",
        direct.len(),
        ok(&direct),
        ok(&via)
    );
    let not_ok: Vec<String> = direct
        .iter()
        .filter(|(_, (b, c))| b != "OK" || c != "OK")
        .map(|(id, (b, c))| format!("{id} {b}/{c}"))
        .collect();
    eprintln!("autobahn: not OK direct (the echo server's own verdicts): {not_ok:?}");
    // The harness itself works: the selection ran, and the echo server is conformant.
    assert!(direct.len() >= 290, "only {} cases ran", direct.len());
    assert!(
        upgrades >= direct.len(),
        "{upgrades} upgrades logged by the gateway for {} cases",
        direct.len()
    );
    assert!(
        ok(&direct) * 10 >= direct.len() * 9,
        "the direct run is mostly failing ({} of {} OK): the harness, not the gateway",
        ok(&direct),
        direct.len()
    );
    let describe = |id: &String, d: &(String, String)| {
        format!("{id}: direct {d:?}, through the gateway {:?}", via.get(id))
    };
    let resegmented: Vec<String> = direct
        .iter()
        .filter(|(id, d)| via.get(*id).is_some_and(|v| v != *d && same(v, d)))
        .map(|(id, d)| describe(id, d))
        .collect();
    eprintln!("autobahn: OK vs NON-STRICT only (TCP segmentation): {resegmented:?}");
    let differing: Vec<String> = direct
        .iter()
        .filter(|(id, d)| !via.get(*id).is_some_and(|v| same(v, d)))
        .map(|(id, d)| describe(id, d))
        .collect();
    assert!(
        differing.is_empty() && via.len() == direct.len(),
        "{} of {} Autobahn cases end differently through the gateway:\n{}",
        differing.len(),
        direct.len(),
        differing.join("\n")
    );
}
