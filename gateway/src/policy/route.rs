//! Route choice: which route a request takes, from its `Host` and path.
//!
//! Rules (the contract): routes whose `host` matches are tried before routes without a
//! host; within each group an exact `path` beats any `path_prefix`, and the longest prefix
//! wins. No match is 404.

use crate::config::{Config, RespondConfig};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Clone)]
pub enum Action {
    /// Forward to the upstream at this index of the snapshot's upstream list.
    Proxy(usize),
    /// Answer directly.
    Respond(Arc<RespondConfig>),
}

#[derive(Debug, Clone)]
pub struct Route {
    /// Bounded label for metrics and logs: the path or prefix, with the host if any.
    pub label: Arc<str>,
    host: Option<String>,
    path: String,
    exact: bool,
    pub action: Action,
    pub websocket: bool,
    pub connect_timeout: Duration,
    pub send_timeout: Duration,
    pub read_timeout: Duration,
    pub max_body_size: u64,
    /// `TRACE` is forwarded (else 405): upstreams that echo it leak cookies and the
    /// forwarding headers the gateway adds.
    pub allow_trace: bool,
}

#[derive(Debug, Clone, Default)]
pub struct Router {
    /// Host routes first, then hostless; within each, exact paths first, then prefixes by
    /// length, longest first. The first match in this order is the answer.
    routes: Vec<Route>,
}

/// nginx's defaults, which operators moving from it expect when a key is left out.
const DEFAULT_CONNECT: Duration = Duration::from_secs(60);
const DEFAULT_SEND: Duration = Duration::from_secs(60);
const DEFAULT_READ: Duration = Duration::from_secs(60);
const DEFAULT_WEBSOCKET_READ: Duration = Duration::from_secs(3600);
const DEFAULT_MAX_BODY: u64 = 1 << 20;

impl Router {
    pub fn build(config: &Config) -> Router {
        let mut routes: Vec<Route> = config
            .routes
            .iter()
            .map(|r| {
                let r = r.get_ref();
                let (path, exact) = match (&r.path, &r.path_prefix) {
                    (Some(p), _) => (p.clone(), true),
                    (None, Some(p)) => (p.clone(), false),
                    (None, None) => (String::from("/"), false),
                };
                let action = match (&r.upstream, &r.respond) {
                    (Some(name), _) => Action::Proxy(
                        config
                            .upstreams
                            .iter()
                            .position(|u| &u.get_ref().name == name)
                            .expect("validated: route names an existing upstream"),
                    ),
                    (None, Some(resp)) => Action::Respond(Arc::new(resp.clone())),
                    (None, None) => unreachable!("validated: route has upstream or respond"),
                };
                let host = r.host.as_ref().map(|h| h.to_ascii_lowercase());
                let label = match &host {
                    Some(h) => format!("{h}{path}"),
                    None => path.clone(),
                };
                let send = if r.websocket {
                    DEFAULT_WEBSOCKET_READ
                } else {
                    DEFAULT_SEND
                };
                let read = if r.websocket {
                    DEFAULT_WEBSOCKET_READ
                } else {
                    DEFAULT_READ
                };
                Route {
                    label: label.into(),
                    host,
                    path,
                    exact,
                    action,
                    websocket: r.websocket,
                    connect_timeout: r.connect_timeout.map(|d| d.0).unwrap_or(DEFAULT_CONNECT),
                    send_timeout: r.send_timeout.map(|d| d.0).unwrap_or(send),
                    read_timeout: r.read_timeout.map(|d| d.0).unwrap_or(read),
                    max_body_size: r.max_body_size.map(|s| s.0).unwrap_or(DEFAULT_MAX_BODY),
                    allow_trace: r.allow_trace,
                }
            })
            .collect();
        routes.sort_by(|a, b| {
            (b.host.is_some(), b.exact, b.path.len()).cmp(&(
                a.host.is_some(),
                a.exact,
                a.path.len(),
            ))
        });
        Router { routes }
    }

    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// The route for a request, if any. `host` is the `Host` header value or the
    /// authority of an absolute-form target, compared without its port and without one
    /// trailing dot (`admin.example.com.` is `admin.example.com`, as in nginx); `path` is
    /// the normalised path (`http::target`).
    pub fn find(&self, host: Option<&[u8]>, path: &[u8]) -> Option<&Route> {
        let host = host.map(|h| {
            let h = strip_port(h);
            h.strip_suffix(b".").unwrap_or(h)
        });
        self.routes.iter().find(|r| {
            if let Some(want) = &r.host {
                match host {
                    Some(h) if host_matches(want, h) => {}
                    _ => return false,
                }
            }
            if r.exact {
                path == r.path.as_bytes()
            } else {
                path.starts_with(r.path.as_bytes())
            }
        })
    }
}

fn strip_port(host: &[u8]) -> &[u8] {
    if host.first() == Some(&b'[') {
        // [v6]:port
        return match host.iter().position(|&b| b == b']') {
            Some(end) => &host[..=end],
            None => host,
        };
    }
    match host.iter().rposition(|&b| b == b':') {
        Some(colon) => &host[..colon],
        None => host,
    }
}

/// Exact (case-insensitive) or `*.example.com` wildcard, which matches one or more labels.
fn host_matches(want: &str, host: &[u8]) -> bool {
    if let Some(suffix) = want.strip_prefix('*') {
        host.len() > suffix.len()
            && host[host.len() - suffix.len()..].eq_ignore_ascii_case(suffix.as_bytes())
    } else {
        host.eq_ignore_ascii_case(want.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn router(routes: &str) -> Router {
        let text = format!(
            "[[listener]]\nname = \"h\"\nlisten = \"127.0.0.1:1\"\n[[upstream]]\nname = \"u\"\nservers = [\"127.0.0.1:2\"]\n{routes}"
        );
        Router::build(&Config::parse(Path::new("t.toml"), &text).unwrap())
    }

    #[test]
    fn precedence() {
        let r = router(
            r#"
[[route]]
path_prefix = "/"
upstream = "u"
[[route]]
path_prefix = "/api/"
upstream = "u"
[[route]]
path_prefix = "/api/v2/"
upstream = "u"
[[route]]
path = "/api/v2/exact"
upstream = "u"
[[route]]
path_prefix = "/api/"
host = "api.example.com"
upstream = "u"
[[route]]
path_prefix = "/"
host = "*.wild.test"
upstream = "u"
"#,
        );
        let label = |host: Option<&str>, path: &str| {
            r.find(host.map(str::as_bytes), path.as_bytes())
                .map(|r| r.label.to_string())
        };
        assert_eq!(label(None, "/x").as_deref(), Some("/"));
        assert_eq!(label(None, "/api/x").as_deref(), Some("/api/"));
        assert_eq!(label(None, "/api/v2/x").as_deref(), Some("/api/v2/"));
        assert_eq!(
            label(None, "/api/v2/exact").as_deref(),
            Some("/api/v2/exact")
        );
        assert_eq!(
            label(Some("api.example.com:8080"), "/api/v2/x").as_deref(),
            Some("api.example.com/api/")
        );
        assert_eq!(
            label(Some("API.example.com"), "/api/x").as_deref(),
            Some("api.example.com/api/")
        );
        assert_eq!(
            label(Some("api.example.com"), "/other").as_deref(),
            Some("/")
        );
        assert_eq!(
            label(Some("a.wild.test"), "/z").as_deref(),
            Some("*.wild.test/")
        );
        assert_eq!(label(Some("wild.test"), "/z").as_deref(), Some("/"));
        assert_eq!(
            label(Some("API.example.com.:80"), "/api/x").as_deref(),
            Some("api.example.com/api/")
        );
        assert_eq!(
            label(Some("a.wild.test."), "/z").as_deref(),
            Some("*.wild.test/")
        );
    }

    #[test]
    fn no_match() {
        let r = router("[[route]]\npath = \"/only\"\nupstream = \"u\"\n");
        assert!(r.find(None, b"/only/not").is_none());
        assert!(r.find(None, b"/only").is_some());
    }
}
