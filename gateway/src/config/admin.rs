//! Validation of the `[admin]` table, and the reading of its `token_file` (part of loading
//! the config, like the file it names: a rotated Secret is picked up at each reload).

use crate::config::AdminConfig;
use std::net::SocketAddr;
use std::path::Path;

/// Largest token file read: a token is a short secret, not a document.
const MAX_TOKEN_FILE: u64 = 4096;

impl AdminConfig {
    /// Reads `token_file` into `token` (at load and at every reload, so a rotated Secret
    /// is picked up by SIGHUP or `POST /reload`). Surrounding whitespace is dropped: the
    /// usual ways of writing a Secret leave a trailing newline.
    pub(crate) fn load_token_file(&mut self, config_path: &Path) -> Result<(), String> {
        let Some(file) = &self.token_file else {
            return Ok(());
        };
        if self.token.is_some() {
            return Err("set token or token_file, not both".into());
        }
        let path = match config_path.parent() {
            Some(dir) if file.is_relative() => dir.join(file),
            _ => file.clone(),
        };
        // Read at most one byte past the cap: a device or FIFO (`/dev/zero`) reports no size,
        // so the cap must hold on the read itself, not on metadata.
        let mut bytes = Vec::new();
        std::fs::File::open(&path)
            .and_then(|f| {
                std::io::Read::read_to_end(
                    &mut std::io::Read::take(f, MAX_TOKEN_FILE + 1),
                    &mut bytes,
                )
            })
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        if bytes.len() as u64 > MAX_TOKEN_FILE {
            return Err(format!(
                "{}: larger than {MAX_TOKEN_FILE} bytes",
                path.display()
            ));
        }
        let text = String::from_utf8(bytes)
            .map_err(|_| format!("cannot read {}: not UTF-8", path.display()))?;
        let token = text.trim();
        if token.is_empty() {
            return Err(format!("{} is empty", path.display()));
        }
        self.token = Some(token.to_string());
        Ok(())
    }

    /// What is wrong with this table, as (key, message) pairs.
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut problems = Vec::new();
        match self.listen.parse::<SocketAddr>() {
            Err(_) => problems.push((
                "listen",
                format!("{:?} is not an address like 127.0.0.1:9901", self.listen),
            )),
            // With a token_file that could not be read, that error is the one to report.
            Ok(addr)
                if !addr.ip().is_loopback()
                    && self.token.is_none()
                    && self.token_file.is_none() =>
            {
                problems.push((
                    "listen",
                    format!(
                        "{addr} is reachable from other hosts, so POST /reload and GET /config \
                     need a token: set admin.token_file (or admin.token), or listen on \
                     127.0.0.1"
                    ),
                ))
            }
            Ok(_) => {}
        }
        if let Some(token) = &self.token {
            // The header value is trimmed before the comparison; a token that is empty or
            // holds whitespace or control bytes could never match, or would match "".
            if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
                problems.push((
                    if self.token_file.is_some() {
                        "token_file"
                    } else {
                        "token"
                    },
                    "the token must be non-empty visible ASCII (no spaces)".into(),
                ));
            }
        }
        if !(1..=4096).contains(&self.max_connections) {
            problems.push(("max_connections", "must be between 1 and 4096".into()));
        }
        if self.request_timeout.0.is_zero() {
            problems.push(("request_timeout", "must be greater than zero".into()));
        }
        problems
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admin(listen: &str, token: Option<&str>) -> AdminConfig {
        AdminConfig {
            listen: listen.into(),
            token: token.map(String::from),
            ..AdminConfig::default()
        }
    }

    #[test]
    fn a_network_listener_needs_a_token() {
        assert!(admin("127.0.0.1:9901", None).problems().is_empty());
        assert!(admin("[::1]:9901", None).problems().is_empty());
        for listen in ["0.0.0.0:9901", "[::]:9901", "192.0.2.1:9901"] {
            let p = admin(listen, None).problems();
            assert_eq!(p.len(), 1, "{listen}: {p:?}");
            assert!(p[0].1.contains("token_file"), "{p:?}");
            assert!(admin(listen, Some("t0ken")).problems().is_empty());
        }
    }

    #[test]
    fn tokens_that_could_never_match_or_match_empty_are_refused() {
        for bad in ["", "two words", "tab\t"] {
            assert_eq!(
                admin("127.0.0.1:1", Some(bad)).problems().len(),
                1,
                "{bad:?}"
            );
        }
    }

    #[test]
    fn token_file_is_read_trimmed_relative_to_the_config() {
        let dir = std::env::temp_dir().join(format!("gateway-admin-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("token"), "s3cret\n").unwrap();
        let mut a = admin("0.0.0.0:9901", None);
        a.token_file = Some("token".into());
        a.load_token_file(&dir.join("gateway.toml")).unwrap();
        assert_eq!(a.token.as_deref(), Some("s3cret"));
        // Both at once is ambiguous.
        assert!(a.load_token_file(&dir.join("gateway.toml")).is_err());
        let mut empty = admin("0.0.0.0:9901", None);
        std::fs::write(dir.join("empty"), "\n").unwrap();
        empty.token_file = Some(dir.join("empty"));
        assert!(empty.load_token_file(Path::new("/x.toml")).is_err());
        let mut missing = admin("0.0.0.0:9901", None);
        missing.token_file = Some("nope".into());
        assert!(missing.load_token_file(Path::new("/x.toml")).is_err());
        // A device with no size must not be read whole (it would never end).
        let mut endless = admin("0.0.0.0:9901", None);
        endless.token_file = Some("/dev/zero".into());
        let err = endless.load_token_file(Path::new("/x.toml")).unwrap_err();
        assert!(err.contains("larger than"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
