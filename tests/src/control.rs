//! Control-plane helpers: a strict parser for the Prometheus text format (0.0.4) that
//! `/metrics` serves, scraping and polling it, admin requests with an optional bearer
//! token, and the list of metric families the product contract names.
//!
//! The parser is deliberately strict (a scrape that Prometheus would reject, or accept with
//! a silently wrong meaning, is an error here):
//! - every sample line is `name{label="value",...} value [timestamp]`, label names and
//!   metric names match the Prometheus grammar, label values use only the `\\`, `\"` and
//!   `\n` escapes, and no label name repeats within a sample;
//! - `# TYPE` (and `# HELP`, when given) come before the first sample of their family,
//!   each at most once, and a family's samples form one contiguous group;
//! - no two samples have the same name and label set;
//! - counters are not negative; histograms have `_bucket` series with strictly increasing
//!   `le` bounds, cumulative counts that never decrease, a last bucket `le="+Inf"` equal to
//!   `_count`, and a `_sum`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::client::{Client, Req, Response};

/// Metric families the product contract (PRODUCT.md, "Metric names") requires, with the
/// labels each sample carries (histograms: the labels besides `le`).
pub const CONTRACT_FAMILIES: &[(&str, &str, &[&str])] = &[
    (
        "gateway_http_requests_total",
        "counter",
        &["listener", "route", "status"],
    ),
    (
        "gateway_http_request_duration_seconds",
        "histogram",
        &["route"],
    ),
    (
        "gateway_upstream_request_duration_seconds",
        "histogram",
        &["upstream"],
    ),
    ("gateway_connections_active", "gauge", &["listener"]),
    ("gateway_connections_total", "counter", &["listener"]),
    (
        "gateway_upstream_connections_active",
        "gauge",
        &["upstream"],
    ),
    (
        "gateway_upstream_server_up",
        "gauge",
        &["upstream", "server"],
    ),
    (
        "gateway_upstream_errors_total",
        "counter",
        &["upstream", "kind"],
    ),
    ("gateway_websocket_tunnels_active", "gauge", &[]),
    ("gateway_tunnel_bytes_total", "counter", &["direction"]),
    ("gateway_xdp_packets_total", "counter", &["verdict"]),
    (
        "gateway_limit_rejections_total",
        "counter",
        &["limit", "enforcer"],
    ),
    ("gateway_worker_busy_ratio", "gauge", &["worker"]),
    ("gateway_config_reloads_total", "counter", &["result"]),
];

/// Families the gateway serves beyond the contract's list (metrics.rs, control.rs).
pub const EXTRA_FAMILIES: &[(&str, &str, &[&str])] = &[
    ("gateway_upstream_connections_idle", "gauge", &["upstream"]),
    ("gateway_tunnels_total", "counter", &["path"]),
    ("gateway_body_splice_total", "counter", &["direction"]),
    ("gateway_limit_enforcer", "gauge", &["enforcer"]),
    ("gateway_io_driver", "gauge", &["driver"]),
    ("gateway_admin_connections_rejected_total", "counter", &[]),
    ("gateway_admin_accept_errors_total", "counter", &[]),
    ("gateway_access_log_dropped_total", "counter", &[]),
    ("gateway_log_lines_dropped_total", "counter", &[]),
    ("gateway_connections_parked", "gauge", &["worker"]),
    ("gateway_connections_parks_total", "counter", &["worker"]),
];

/// A sample's labels as sorted (name, value) pairs.
type LabelSet = Vec<(String, String)>;

/// One sample line.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// One metric family: its `# TYPE` and `# HELP`.
#[derive(Clone, Debug, Default)]
pub struct Family {
    pub name: String,
    /// `counter`, `gauge`, `histogram`, `summary` or `untyped` (`untyped` when no TYPE line).
    pub kind: String,
    pub help: Option<String>,
}

/// A parsed scrape.
#[derive(Clone, Debug, Default)]
pub struct Metrics {
    pub families: BTreeMap<String, Family>,
    pub samples: Vec<Sample>,
    pub text: String,
}

fn is_metric_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn is_label_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// A sample value as Go's `strconv.ParseFloat` (which Prometheus uses) reads it.
fn parse_value(s: &str) -> Option<f64> {
    if s.is_empty()
        || !s
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '+' | '-'))
    {
        return None;
    }
    s.parse::<f64>().ok()
}

/// The family a sample belongs to, given the families declared so far.
fn family_of(name: &str, families: &BTreeMap<String, Family>) -> String {
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix) {
            if let Some(f) = families.get(base) {
                if f.kind == "histogram" || (f.kind == "summary" && suffix != "_bucket") {
                    return base.to_string();
                }
            }
        }
    }
    name.to_string()
}

/// Parses `{a="x",b="y"}` at the start of `s`; returns the labels and the rest after `}`.
fn parse_labels(s: &str) -> Result<(BTreeMap<String, String>, &str), String> {
    let mut labels = BTreeMap::new();
    let bytes = s.as_bytes();
    debug_assert_eq!(bytes[0], b'{');
    let mut i = 1;
    loop {
        if bytes.get(i) == Some(&b'}') {
            return Ok((labels, &s[i + 1..]));
        }
        let name_end = s[i..].find('=').map(|p| p + i).ok_or("label without '='")?;
        let name = &s[i..name_end];
        if !is_label_name(name) {
            return Err(format!("bad label name {name:?}"));
        }
        i = name_end + 1;
        if bytes.get(i) != Some(&b'"') {
            return Err(format!("label {name} value is not quoted"));
        }
        i += 1;
        let mut value = String::new();
        loop {
            match bytes.get(i) {
                None => return Err(format!("label {name} value not terminated")),
                Some(b'"') => {
                    i += 1;
                    break;
                }
                Some(b'\\') => {
                    match bytes.get(i + 1) {
                        Some(b'\\') => value.push('\\'),
                        Some(b'"') => value.push('"'),
                        Some(b'n') => value.push('\n'),
                        other => {
                            return Err(format!(
                                "label {name}: bad escape \\{:?}",
                                other.map(|b| *b as char)
                            ))
                        }
                    }
                    i += 2;
                }
                Some(b'\n') => return Err(format!("label {name}: raw newline in value")),
                Some(_) => {
                    let c = s[i..].chars().next().expect("in bounds");
                    value.push(c);
                    i += c.len_utf8();
                }
            }
        }
        if labels.insert(name.to_string(), value).is_some() {
            return Err(format!("label {name} repeated"));
        }
        match bytes.get(i) {
            Some(b',') => i += 1,
            Some(b'}') => {}
            _ => return Err(format!("expected ',' or '}}' after label {name}")),
        }
    }
}

impl Metrics {
    /// Parses a scrape strictly (see the module docs).
    pub fn parse(text: &str) -> Result<Metrics, String> {
        let mut m = Metrics {
            text: text.to_string(),
            ..Metrics::default()
        };
        if !text.is_empty() && !text.ends_with('\n') {
            return Err("the exposition does not end in a newline".into());
        }
        // Families whose samples have started, and the one being written now.
        let mut started: BTreeSet<String> = BTreeSet::new();
        let mut current: Option<String> = None;
        let mut seen: BTreeSet<(String, Vec<(String, String)>)> = BTreeSet::new();
        for (n, line) in text.lines().enumerate() {
            let at = |msg: String| format!("line {}: {msg}: {line:?}", n + 1);
            if line.is_empty() {
                continue;
            }
            if let Some(comment) = line.strip_prefix('#') {
                let mut parts = comment.trim_start_matches(' ').splitn(3, ' ');
                let keyword = parts.next().unwrap_or("");
                if keyword != "HELP" && keyword != "TYPE" {
                    continue; // a plain comment
                }
                let name = parts.next().unwrap_or("");
                let rest = parts.next().unwrap_or("");
                if !is_metric_name(name) {
                    return Err(at(format!("bad metric name {name:?} in # {keyword}")));
                }
                if started.contains(name) {
                    return Err(at(format!("# {keyword} {name} after its samples")));
                }
                let family = m.families.entry(name.to_string()).or_insert(Family {
                    name: name.to_string(),
                    kind: String::new(),
                    help: None,
                });
                if keyword == "HELP" {
                    if family.help.is_some() {
                        return Err(at(format!("second # HELP for {name}")));
                    }
                    family.help = Some(rest.to_string());
                } else {
                    if !family.kind.is_empty() {
                        return Err(at(format!("second # TYPE for {name}")));
                    }
                    if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&rest) {
                        return Err(at(format!("unknown type {rest:?}")));
                    }
                    family.kind = rest.to_string();
                }
                continue;
            }
            // A sample.
            let name_end = line
                .find(['{', ' '])
                .ok_or_else(|| at("sample without a value".into()))?;
            let name = &line[..name_end];
            if !is_metric_name(name) {
                return Err(at(format!("bad metric name {name:?}")));
            }
            let (labels, rest) = if line[name_end..].starts_with('{') {
                parse_labels(&line[name_end..]).map_err(at)?
            } else {
                (BTreeMap::new(), &line[name_end..])
            };
            let rest = rest
                .strip_prefix(' ')
                .ok_or_else(|| at("no single space before the value".into()))?;
            let mut fields = rest.split(' ');
            let value_text = fields.next().unwrap_or("");
            let value =
                parse_value(value_text).ok_or_else(|| at(format!("bad value {value_text:?}")))?;
            if let Some(ts) = fields.next() {
                if ts.parse::<i64>().is_err() {
                    return Err(at(format!("bad timestamp {ts:?}")));
                }
            }
            if fields.next().is_some() {
                return Err(at("trailing fields after the value".into()));
            }
            let family = family_of(name, &m.families);
            let Some(f) = m.families.get(&family).filter(|f| !f.kind.is_empty()) else {
                return Err(at(format!(
                    "sample of {family} before (or without) its # TYPE"
                )));
            };
            if f.help.is_none() {
                return Err(at(format!("sample of {family} without a # HELP before it")));
            }
            if f.kind == "counter" && (value < 0.0 || value.is_nan()) {
                return Err(at(format!("counter {name} is {value}")));
            }
            if current.as_deref() != Some(family.as_str()) {
                if started.contains(&family) {
                    return Err(at(format!("samples of {family} are not one group")));
                }
                started.insert(family.clone());
                current = Some(family.clone());
            }
            let key = (
                name.to_string(),
                labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            );
            if !seen.insert(key) {
                return Err(at("duplicate sample (same name and labels)".into()));
            }
            m.samples.push(Sample {
                name: name.to_string(),
                labels,
                value,
            });
        }
        for f in m.families.values_mut() {
            if f.kind.is_empty() {
                f.kind = "untyped".into();
            }
        }
        m.check_histograms()?;
        Ok(m)
    }

    fn check_histograms(&self) -> Result<(), String> {
        for f in self.families.values().filter(|f| f.kind == "histogram") {
            let base = &f.name;
            let mut series: BTreeMap<LabelSet, Vec<(f64, f64)>> = BTreeMap::new();
            let strip_le = |s: &Sample| -> LabelSet {
                s.labels
                    .iter()
                    .filter(|(k, _)| *k != "le")
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect()
            };
            for s in &self.samples {
                if s.name == format!("{base}_bucket") {
                    let le = s
                        .labels
                        .get("le")
                        .ok_or_else(|| format!("{base}_bucket without le: {:?}", s.labels))?;
                    let bound =
                        parse_value(le).ok_or_else(|| format!("{base}_bucket: bad le {le:?}"))?;
                    series
                        .entry(strip_le(s))
                        .or_default()
                        .push((bound, s.value));
                } else if s.name == *base {
                    return Err(format!("histogram {base} has a plain sample"));
                } else if s.name.starts_with(base.as_str())
                    && s.labels.contains_key("le")
                    && s.name != format!("{base}_bucket")
                {
                    return Err(format!("{} carries an le label", s.name));
                }
            }
            for (labels, buckets) in &series {
                for pair in buckets.windows(2) {
                    if pair[1].0 <= pair[0].0 {
                        return Err(format!(
                            "{base}{labels:?}: le bounds not increasing ({} then {})",
                            pair[0].0, pair[1].0
                        ));
                    }
                    if pair[1].1 < pair[0].1 {
                        return Err(format!(
                            "{base}{labels:?}: buckets not cumulative ({} then {})",
                            pair[0].1, pair[1].1
                        ));
                    }
                }
                let last = buckets.last().expect("at least one bucket");
                if last.0 != f64::INFINITY {
                    return Err(format!("{base}{labels:?}: last bucket is not le=\"+Inf\""));
                }
                let find = |suffix: &str| {
                    self.samples.iter().find(|s| {
                        s.name == format!("{base}{suffix}")
                            && strip_le(s) == *labels
                            && !s.labels.contains_key("le")
                    })
                };
                let count = find("_count").ok_or_else(|| format!("{base}{labels:?}: no _count"))?;
                if count.value != last.1 {
                    return Err(format!(
                        "{base}{labels:?}: _count {} != +Inf bucket {}",
                        count.value, last.1
                    ));
                }
                find("_sum").ok_or_else(|| format!("{base}{labels:?}: no _sum"))?;
            }
            // Every _count/_sum has its buckets.
            for s in &self.samples {
                if (s.name == format!("{base}_count") || s.name == format!("{base}_sum"))
                    && !series.contains_key(&strip_le(s))
                {
                    return Err(format!("{}{:?} without buckets", s.name, s.labels));
                }
            }
        }
        Ok(())
    }

    /// Whether a family has a `# TYPE` (samples or not).
    pub fn has_family(&self, name: &str) -> bool {
        self.families.contains_key(name)
    }

    /// The `# TYPE` of a family.
    pub fn kind(&self, name: &str) -> Option<&str> {
        self.families.get(name).map(|f| f.kind.as_str())
    }

    /// Samples named `name` whose labels include every pair in `labels`.
    pub fn matching<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
    }

    /// The value of the one sample named `name` with exactly these labels.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.matching(name, labels)
            .find(|s| s.labels.len() == labels.len())
            .map(|s| s.value)
    }

    /// The sum over samples named `name` whose labels include `labels` (0 when none).
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.matching(name, labels).map(|s| s.value).sum()
    }
}

/// `GET /metrics` on the admin listener: asserts 200 and the text-format content type, and
/// parses strictly (panicking with the whole text when it does not parse).
pub fn scrape(admin: SocketAddr) -> Metrics {
    let r = admin_request(admin, "GET", "/metrics", None);
    assert_eq!(r.status, 200, "GET /metrics: {}", r.body_str());
    let ct = r.header("content-type").unwrap_or_default();
    assert!(
        ct.starts_with("text/plain") && ct.contains("version=0.0.4"),
        "GET /metrics content type {ct:?}"
    );
    let text = r.body_str();
    Metrics::parse(&text)
        .unwrap_or_else(|e| panic!("/metrics is not valid Prometheus text: {e}\n{text}"))
}

/// Scrapes every 50 ms until `pred` holds; panics with `what` and the last scrape after
/// `timeout`. Workers publish their counters every 200 ms, so counters lag traffic a little.
pub fn wait_metrics(
    admin: SocketAddr,
    timeout: Duration,
    what: &str,
    pred: impl Fn(&Metrics) -> bool,
) -> Metrics {
    let deadline = Instant::now() + timeout;
    loop {
        let m = scrape(admin);
        if pred(&m) {
            return m;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}; last scrape:\n{}",
            m.text
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One admin request on a fresh connection (the admin listener closes after each), with
/// `Authorization: Bearer TOKEN` when `token` is given.
pub fn admin_request(admin: SocketAddr, method: &str, path: &str, token: Option<&str>) -> Response {
    admin_request_with(admin, method, path, token.map(|t| format!("Bearer {t}")))
}

/// Like [`admin_request`] with a raw `Authorization` value (or none).
pub fn admin_request_with(
    admin: SocketAddr,
    method: &str,
    path: &str,
    authorization: Option<String>,
) -> Response {
    let mut req = Req::new(method, path)
        .host(Some("admin"))
        .header("Connection", "close");
    if let Some(a) = authorization {
        req = req.header("Authorization", &a);
    }
    if method == "POST" {
        req = req.body(Vec::new());
    }
    Client::connect(admin).must(&req)
}

/// Replaces a file atomically (write a sibling, then rename), so a reload never reads a
/// half-written config.
pub fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp-write");
    std::fs::write(&tmp, text).unwrap_or_else(|e| panic!("write {}: {e}", tmp.display()));
    std::fs::rename(&tmp, path).unwrap_or_else(|e| panic!("rename to {}: {e}", path.display()));
}

/// Inserts keys into the `[admin]` table of a config text made by the config builder.
pub fn with_admin_keys(config_toml: &str, keys: &str) -> String {
    assert!(config_toml.contains("\n[admin]\n"), "no [admin] table");
    config_toml.replacen("\n[admin]\n", &format!("\n[admin]\n{keys}\n"), 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "# HELP a_total A.\n# TYPE a_total counter\na_total{x=\"1\"} 3\na_total{x=\"q\\\"\\\\\\n\"} 0\n\
# HELP h H.\n# TYPE h histogram\nh_bucket{r=\"/\",le=\"0.1\"} 1\nh_bucket{r=\"/\",le=\"+Inf\"} 2\nh_sum{r=\"/\"} 0.3\nh_count{r=\"/\"} 2\n\
# HELP g G.\n# TYPE g gauge\ng -1.5e3 1700000000000\n";

    #[test]
    fn parses_good_text() {
        let m = Metrics::parse(GOOD).unwrap();
        assert_eq!(m.get("a_total", &[("x", "1")]), Some(3.0));
        assert_eq!(m.get("a_total", &[("x", "q\"\\\n")]), Some(0.0));
        assert_eq!(m.get("h_count", &[("r", "/")]), Some(2.0));
        assert_eq!(m.get("g", &[]), Some(-1500.0));
        assert_eq!(m.kind("h"), Some("histogram"));
    }

    #[test]
    fn rejects_bad_text() {
        let bad = [
            "a 1\n",                                                    // no TYPE
            "# TYPE a counter\na 1\n",                                  // no HELP
            "# HELP a A.\n# TYPE a counter\na{x=1} 1\n",                // unquoted
            "# HELP a A.\n# TYPE a counter\na  1\n",                    // two spaces
            "# HELP a A.\n# TYPE a counter\na -1\n",                    // negative counter
            "# HELP a A.\n# TYPE a counter\na 1\na 2\n",                // duplicate
            "# HELP a A.\n# TYPE a counter\na{x=\"\\t\"} 1\n",          // bad escape
            "# HELP a A.\n# TYPE a counter\na x\n",                     // bad value
            "# HELP a A.\n# TYPE a counter\na 1\n# TYPE a counter\n",   // TYPE after samples
            "# HELP a A.\n# TYPE a wat\na 1\n",                         // unknown type
            "# HELP h H.\n# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_sum 1\nh_count 1\n", // not cumulative
            "# HELP h H.\n# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_sum 1\nh_count 2\n", // no +Inf
            "# HELP h H.\n# TYPE h histogram\nh_bucket{le=\"+Inf\"} 2\nh_sum 1\nh_count 3\n", // count mismatch
            "# HELP a A.\n# TYPE a gauge\n# HELP b B.\n# TYPE b gauge\na 1\nb 1\na{x=\"1\"} 1\n", // split group
            "# HELP a A.\n# TYPE a gauge\na 1",                         // no final newline
        ];
        for text in bad {
            assert!(Metrics::parse(text).is_err(), "accepted: {text:?}");
        }
    }
}
