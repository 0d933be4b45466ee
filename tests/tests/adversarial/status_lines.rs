//! Issue 17 item 5: a final status outside 200–599, a 1xx where a final status must stand,
//! or a status that is not three digits (RFC 9112 §4: `status-code = 3DIGIT`) is a 502.
//! The gateway never re-serialises it (`HTTP/1.1 99`, `HTTP/1.1 0`) and never lets the
//! upstream choose the `status` label of a metric.

use gateway_tests::Reply;

use super::{expect_status, request, rig_with_hostile};

const BAD_STATUS_LINES: &[&str] = &[
    "HTTP/1.1 99 Low",
    "HTTP/1.1 0 Zero",
    "HTTP/1.1 1000 Long",
    "HTTP/1.1 20 Short",
    "HTTP/1.1 600 High",
    "HTTP/1.1 999 High",
    "HTTP/1.1 099 Padded",
    "HTTP/1.1 +200 Sign",
    "HTTP/1.1 2OO Letters",
    "HTTP/1.1 -200 Negative",
    "HTTP/1.1 2000 Long",
    "HTTP/1.1  200 Double-space",
];

/// Interim responses with nothing final after them (the upstream then closes).
const INTERIM_ONLY: &[&str] = &[
    "HTTP/1.1 100 Continue\r\n\r\n",
    "HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n",
];

#[test]
fn bad_upstream_status_lines_are_502() {
    let (rig, _hostile) = rig_with_hostile(|r| {
        let mut parts = r.path().rsplit('/');
        let i: usize = parts.next().unwrap().parse().unwrap();
        match parts.next() {
            Some("interim-only") => Reply::raw(INTERIM_ONLY[i]),
            _ => Reply::raw(format!(
                "{}\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
                BAD_STATUS_LINES[i]
            )),
        }
    });
    let mut failures = Vec::new();
    for (i, line) in BAD_STATUS_LINES.iter().enumerate() {
        let raw = request("GET", &format!("/hostile/status/{i}"), &[], b"");
        expect_status(
            &rig,
            &format!("#{i} upstream {line:?}"),
            &raw,
            &[502],
            &mut failures,
        );
    }
    for (i, reply) in INTERIM_ONLY.iter().enumerate() {
        let raw = request("GET", &format!("/hostile/interim-only/{i}"), &[], b"");
        let case = format!("#{i} upstream sends only {reply:?} and closes");
        expect_status(&rig, &case, &raw, &[502], &mut failures);
    }
    // The metrics' status labels stay within what HTTP allows.
    let metrics = rig.gw().admin_get("/metrics").body_str();
    let label = regex::Regex::new(r#"status="([^"]*)""#).unwrap();
    for cap in label.captures_iter(&metrics) {
        let v = &cap[1];
        let ok = v.len() == 3 && v.parse::<u16>().is_ok_and(|s| (100..600).contains(&s));
        if !ok {
            failures.push(format!("metric status label {v:?} chosen by the upstream"));
        }
    }
    rig.finish(failures);
}
