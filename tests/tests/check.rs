//! The command line: `gateway check --config PATH` validates like `nginx -t` (exit 0, or exit
//! 1 naming every error by file, line and key), `--version` and `--help` exit 0, and `run`
//! refuses a bad config instead of serving something else.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use gateway_tests::{free_addr, gateway_bin, workspace_root, Config, Gateway, Route, Upstream};
use regex::Regex;

/// Runs the gateway binary with `args`, killing it if it takes over 15 s.
fn run(args: &[&str], dir: &Path) -> Output {
    let mut child = Command::new(gateway_bin())
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn gateway");
    let deadline = Instant::now() + Duration::from_secs(15);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("`gateway {}` did not finish within 15 s", args.join(" "));
        }
        thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().unwrap()
}

fn check(file: &str, text: &str) -> (Output, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(file);
    std::fs::write(&path, text).unwrap();
    let out = run(&["check", "--config", path.to_str().unwrap()], dir.path());
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out, stderr)
}

/// The error output mentions line `n` (as `line n`, `file:n` or `file:n:col`).
fn mentions_line(stderr: &str, n: usize) -> bool {
    Regex::new(&format!(r"(?i)(line\s*{n}\b|:{n}(:\d+)?\b)"))
        .unwrap()
        .is_match(stderr)
}

/// A config text with up to three errors planted in it; without any it is valid.
fn bad_config(unknown_key: bool, bad_duration: bool, missing_upstream: bool) -> String {
    let text = format!(
        "[server]\n\
         workers = 2\n\
         {keepalive}\n\
         {header}\n\
         \n\
         [admin]\n\
         listen = \"{admin}\"\n\
         \n\
         [[listener]]\n\
         name = \"http\"\n\
         listen = \"{http}\"\n\
         \n\
         [[upstream]]\n\
         name = \"api\"\n\
         servers = [\"127.0.0.1:9\"]\n\
         \n\
         [[route]]\n\
         path_prefix = \"/\"\n\
         {upstream}\n",
        keepalive = if unknown_key {
            "keepalive_timeot = \"5s\""
        } else {
            "keepalive_timeout = \"5s\""
        },
        header = if bad_duration {
            "header_timeout = \"10 parsecs\""
        } else {
            "header_timeout = \"10s\""
        },
        upstream = if missing_upstream {
            "upstream = \"missing\""
        } else {
            "upstream = \"api\""
        },
        admin = free_addr(),
        http = free_addr(),
    );
    // The line numbers the assertions use.
    assert_eq!(line_of(&text, "keepalive_time"), 3);
    assert_eq!(line_of(&text, "header_timeout"), 4);
    assert_eq!(line_of(&text, "[[route]]"), 17);
    assert_eq!(line_of(&text, "upstream = "), 19);
    text
}

/// 1-based number of the first line containing `needle`.
fn line_of(text: &str, needle: &str) -> usize {
    text.lines().position(|l| l.contains(needle)).unwrap() + 1
}

#[test]
fn check_accepts_a_good_config() {
    let text = Config::new()
        .server("keepalive_timeout", "5s")
        .server("header_timeout", "10s")
        .server("max_header_bytes", "16KiB")
        .upstream(
            Upstream::new("api", &[free_addr()])
                .balance("round_robin")
                .keepalive(32)
                .max_fails(3)
                .fail_timeout("10s"),
        )
        .route(
            Route::prefix("/api/", "api")
                .connect_timeout("60s")
                .send_timeout("300s")
                .read_timeout("300s")
                .max_body_size("50m"),
        )
        .route(Route::respond_exact("/health", 200, "ok\n"))
        .to_toml();
    let (out, stderr) = check("good.toml", &text);
    assert_eq!(
        out.status.code(),
        Some(0),
        "good config rejected:\n{stderr}\n{text}"
    );
    // The same text with no errors in the numbered template passes too.
    let (out, stderr) = check("good2.toml", &bad_config(false, false, false));
    assert_eq!(
        out.status.code(),
        Some(0),
        "template config rejected:\n{stderr}"
    );
}

#[test]
fn check_accepts_the_documented_example_config() {
    // The contract: `cargo xtask run` serves docs/examples/gateway.toml out of the box.
    let example = workspace_root().join("docs/examples/gateway.toml");
    assert!(example.is_file(), "{} is missing", example.display());
    let out = run(
        &["check", "--config", example.to_str().unwrap()],
        &workspace_root(),
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "docs/examples/gateway.toml fails check:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn check_names_an_unknown_key() {
    let (out, stderr) = check("bad.toml", &bad_config(true, false, false));
    assert_eq!(out.status.code(), Some(1), "stderr:\n{stderr}");
    assert!(stderr.contains("bad.toml"), "file not named:\n{stderr}");
    assert!(
        stderr.contains("keepalive_timeot"),
        "key not named:\n{stderr}"
    );
    assert!(mentions_line(&stderr, 3), "line 3 not named:\n{stderr}");
}

#[test]
fn check_names_a_bad_duration() {
    let (out, stderr) = check("bad.toml", &bad_config(false, true, false));
    assert_eq!(out.status.code(), Some(1), "stderr:\n{stderr}");
    assert!(stderr.contains("bad.toml"), "file not named:\n{stderr}");
    assert!(
        stderr.contains("header_timeout"),
        "key not named:\n{stderr}"
    );
    assert!(mentions_line(&stderr, 4), "line 4 not named:\n{stderr}");
}

#[test]
fn check_names_a_route_to_a_missing_upstream() {
    let (out, stderr) = check("bad.toml", &bad_config(false, false, true));
    assert_eq!(out.status.code(), Some(1), "stderr:\n{stderr}");
    assert!(stderr.contains("bad.toml"), "file not named:\n{stderr}");
    assert!(stderr.contains("upstream"), "key not named:\n{stderr}");
    assert!(
        stderr.contains("missing"),
        "the missing upstream's name not given:\n{stderr}"
    );
    // The key's own line, or the [[route]] table it belongs to.
    assert!(
        mentions_line(&stderr, 19) || mentions_line(&stderr, 17),
        "line 19 (or the route's line 17) not named:\n{stderr}"
    );
}

#[test]
fn check_reports_every_error_at_once() {
    // "exit 1 with every error named by file, line and key": not just the first.
    let (out, stderr) = check("bad.toml", &bad_config(true, true, true));
    assert_eq!(out.status.code(), Some(1), "stderr:\n{stderr}");
    for (what, ok) in [
        (
            "unknown key keepalive_timeot",
            stderr.contains("keepalive_timeot") && mentions_line(&stderr, 3),
        ),
        (
            "bad duration header_timeout",
            stderr.contains("header_timeout") && mentions_line(&stderr, 4),
        ),
        (
            "missing upstream",
            stderr.contains("missing")
                && (mentions_line(&stderr, 19) || mentions_line(&stderr, 17)),
        ),
    ] {
        assert!(ok, "{what} not reported (with its line):\n{stderr}");
    }
}

#[test]
fn check_rejects_a_missing_file() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(&["check", "--config", "does-not-exist.toml"], dir.path());
    assert_ne!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stderr).contains("does-not-exist.toml"));
}

#[test]
fn run_refuses_a_bad_config() {
    let err = match Gateway::try_start(&bad_config(true, false, false)) {
        Ok(_) => panic!("`gateway run` started with an unknown key in its config"),
        Err(e) => e,
    };
    assert!(
        err.contains("keepalive_timeot"),
        "the error does not name the key:\n{err}"
    );
}

#[test]
fn version_and_help_exit_zero() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(&["--version"], dir.path());
    assert_eq!(out.status.code(), Some(0));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("gateway") && stdout.contains(env!("CARGO_PKG_VERSION")),
        "--version prints {stdout:?}"
    );
    let out = run(&["--help"], dir.path());
    assert_eq!(out.status.code(), Some(0));
    let stdout = String::from_utf8_lossy(&out.stdout);
    for word in ["run", "check", "--config"] {
        assert!(
            stdout.contains(word),
            "--help does not mention {word}:\n{stdout}"
        );
    }
}

/// `check` on `text` exits 1 (not a panic's 101) and names file, `key` and line `line`.
fn assert_refused(text: &str, key: &str, line: usize) {
    let (out, stderr) = check("bad.toml", text);
    assert!(!stderr.contains("panicked"), "check panicked:\n{stderr}");
    assert_eq!(out.status.code(), Some(1), "stderr:\n{stderr}\n{text}");
    assert!(stderr.contains("bad.toml"), "file not named:\n{stderr}");
    assert!(stderr.contains(key), "key {key} not named:\n{stderr}");
    assert!(
        mentions_line(&stderr, line),
        "line {line} not named:\n{stderr}"
    );
}

#[test]
fn check_refuses_huge_numbers_without_panicking() {
    // Each once overflowed a float or an integer in unit parsing and panicked the parser.
    let good = bad_config(false, false, false);
    for value in [
        "\"99999999999999999999h\"",
        "\"18446744073709551615s\"",
        "\"213503982334601d\"",
        "\"1e400s\"",
        "\"366d\"",
    ] {
        let text = good.replace(
            "keepalive_timeout = \"5s\"",
            &format!("keepalive_timeout = {value}"),
        );
        assert_refused(&text, "keepalive_timeout", 3);
    }
    for (key, value) in [
        ("max_header_bytes", "\"99999999999999999999999G\""),
        ("client_min_rate", "\"18446744073709551615K\""),
    ] {
        let text = good.replace("keepalive_timeout = \"5s\"", &format!("{key} = {value}"));
        assert_refused(&text, key, 3);
    }
    for value in ["\"NaN/s\"", "\"inf/s\"", "\"1e999/s\"", "\"99999999999/s\""] {
        let text = format!("{good}\n[limits]\nconn_rate = {value}\n");
        let line = line_of(&text, "conn_rate");
        assert_refused(&text, "conn_rate", line);
    }
}

#[test]
fn check_refuses_zero_timeouts_that_would_flap_or_fail_everything() {
    let good = bad_config(false, false, false);
    let servers = "servers = [\"127.0.0.1:9\"]";
    for (extra, key) in [
        // A server marked down for 0 s is back before the next request: it only flaps.
        ("fail_timeout = \"0s\"", "fail_timeout"),
        ("fail_timeout = \"500ms\"", "fail_timeout"),
        ("keepalive_timeout = \"0s\"", "keepalive_timeout"),
    ] {
        let text = good.replace(servers, &format!("{servers}\n{extra}"));
        assert_refused(&text, key, line_of(&text, extra));
    }
    for extra in ["connect_timeout = \"0s\"", "read_timeout = \"0ms\""] {
        let text = good.replace(
            "path_prefix = \"/\"",
            &format!("path_prefix = \"/\"\n{extra}"),
        );
        let key = extra.split(' ').next().unwrap();
        assert_refused(&text, key, line_of(&text, extra));
    }
    let text = good.replace(servers, &format!("{servers}\nfail_timeout = \"1s\""));
    let (out, stderr) = check("good.toml", &text);
    assert_eq!(out.status.code(), Some(0), "1s refused:\n{stderr}");
}

#[test]
fn check_refuses_a_deny_or_allow_list_longer_than_the_xdp_tries_when_xdp_is_on() {
    // One IPv4 network more than the guard's trie holds (16384 per list and family): the
    // kernel would refuse the insert at start or reload; `check` says so first, naming the
    // file, the line and the key.
    const CAP: usize = 16_384;
    let good = bad_config(false, false, false);
    let nets = |n: usize| {
        (0..n)
            .map(|i| format!("\"10.{}.{}.0/24\"", i / 256, i % 256))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let with = |xdp: &str, key: &str, n: usize| {
        format!(
            "{good}\n[limits]\nipv6_prefix = 64\n{key} = [{}]\n\n[xdp]\n{xdp}\n",
            nets(n)
        )
    };
    let on = "mode = \"auto\"\ninterface = \"lo\"";
    for key in ["deny", "allow"] {
        let text = with(on, key, CAP + 1);
        let line = line_of(&text, &format!("{key} = ["));
        assert_refused(&text, &format!("limits.{key}"), line);
        let (_, stderr) = check("bad.toml", &text);
        assert!(stderr.contains("16384"), "the cap is named:\n{stderr}");
        // At the cap it fits; with XDP off the list is enforced in user space, uncapped.
        for ok in [with(on, key, CAP), with("mode = \"off\"", key, CAP + 1)] {
            let (out, stderr) = check("ok.toml", &ok);
            assert_eq!(out.status.code(), Some(0), "{stderr}");
        }
    }
}
