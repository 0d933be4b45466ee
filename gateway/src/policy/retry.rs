//! When a failed upstream attempt is tried again, and where: the one place these rules live.
//!
//! - A connect that fails (refused, unreachable, timed out) moves on to another server that
//!   is up and not yet tried, as nginx's `proxy_next_upstream error timeout` does for
//!   connects. Nothing was sent, so any request may go elsewhere. A connect that fails for
//!   the gateway's own lack of resources (descriptors, memory) is not retried: another
//!   server would fail the same way.
//! - A request sent on a *reused* idle connection that fails before any response byte (the
//!   upstream closed it just as we reused it, the classic keep-alive race) is replayed once
//!   on a fresh connection, but only when the request is replayable: an idempotent method
//!   (RFC 9110 §9.2.2) whose body the gateway holds whole. Never after a timeout (the
//!   upstream may be working on it), never once a response byte arrived.
//! - Everything else fails the request.
//!
//! The bound: every server of the upstream at most once, and at most [`MAX_SERVERS`]
//! servers, plus the one replay, so a request makes at most `MAX_SERVERS + 1` attempts
//! (nginx's `proxy_next_upstream_tries 0`, "every server", with a ceiling).

use crate::protocol::error::{HttpError, RetryClass};

/// Most distinct servers one request tries.
pub(crate) const MAX_SERVERS: usize = 32;

/// The servers one request has tried: a bitset that needs no allocation for the first 64
/// servers (the common case) and grows past them, so no server is ever silently left out.
#[derive(Debug, Default, Clone)]
pub(crate) struct Tried {
    low: u64,
    high: Vec<u64>,
    count: usize,
}

impl Tried {
    pub fn contains(&self, server: usize) -> bool {
        if server < 64 {
            return self.low & (1 << server) != 0;
        }
        let (word, bit) = (server / 64 - 1, server % 64);
        self.high.get(word).is_some_and(|w| w & (1 << bit) != 0)
    }

    pub fn insert(&mut self, server: usize) {
        if self.contains(server) {
            return;
        }
        self.count += 1;
        if server < 64 {
            self.low |= 1 << server;
            return;
        }
        let (word, bit) = (server / 64 - 1, server % 64);
        if self.high.len() <= word {
            self.high.resize(word + 1, 0);
        }
        self.high[word] |= 1 << bit;
    }

    pub fn len(&self) -> usize {
        self.count
    }
}

/// What to do after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Pick another server (this one is in the tried set).
    NextServer,
    /// Send the request again on a fresh connection (no idle connection is taken).
    Replay,
    /// Fail the request with this attempt's error.
    GiveUp,
}

/// How far an attempt on an established connection got when it failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Attempt {
    /// The connection came from the idle pool.
    pub reused: bool,
    /// Some of the response had arrived.
    pub(crate) response_started: bool,
}

/// One request's retry state.
#[derive(Debug)]
pub(crate) struct RetryPolicy {
    replayable: bool,
    replayed: bool,
    max_servers: usize,
    tried: Tried,
}

impl RetryPolicy {
    /// For a request to an upstream of `servers` servers; `replayable`: idempotent and its
    /// body is held whole.
    pub fn new(servers: usize, replayable: bool) -> RetryPolicy {
        RetryPolicy {
            replayable,
            replayed: false,
            max_servers: servers.min(MAX_SERVERS),
            tried: Tried::default(),
        }
    }

    /// Servers not to pick again.
    pub fn tried(&self) -> &Tried {
        &self.tried
    }

    /// Whether the next attempt must open a fresh connection (a replay).
    pub(crate) fn fresh_only(&self) -> bool {
        self.replayed
    }

    /// A connect to `server` failed with `error`.
    pub(crate) fn connect_failed(&mut self, server: usize, error: &HttpError) -> Decision {
        self.tried.insert(server);
        if error.retry_class() == RetryClass::Never || self.tried.len() >= self.max_servers {
            return Decision::GiveUp;
        }
        Decision::NextServer
    }

    /// An attempt on an open connection failed with `error`.
    pub(crate) fn attempt_failed(&mut self, attempt: Attempt, error: &HttpError) -> Decision {
        if attempt.reused
            && self.replayable
            && !attempt.response_started
            && !self.replayed
            && error.retry_class() == RetryClass::Replayable
        {
            self.replayed = true;
            return Decision::Replay;
        }
        Decision::GiveUp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const REUSED: Attempt = Attempt {
        reused: true,
        response_started: false,
    };

    #[test]
    fn tried_set_beyond_64_servers() {
        let mut t = Tried::default();
        for i in [0, 5, 63, 64, 65, 127, 128, 1000] {
            assert!(!t.contains(i));
            t.insert(i);
            assert!(t.contains(i), "{i}");
        }
        t.insert(64);
        assert_eq!(t.len(), 8);
        assert!(!t.contains(1) && !t.contains(66) && !t.contains(999) && !t.contains(5000));
        // No allocation for 64 servers or fewer.
        let mut small = Tried::default();
        (0..64).for_each(|i| small.insert(i));
        assert_eq!(small.high.capacity(), 0);
    }

    #[test]
    fn connect_failures_try_each_server_once_and_stop() {
        let refused = HttpError::UpstreamFailed("connect");
        let mut p = RetryPolicy::new(3, false);
        assert_eq!(p.connect_failed(0, &refused), Decision::NextServer);
        assert_eq!(
            p.connect_failed(1, &HttpError::UpstreamTimeout("connect")),
            Decision::NextServer,
            "a connect timeout moves on: nothing was sent"
        );
        assert_eq!(p.connect_failed(2, &refused), Decision::GiveUp);
        assert!(p.tried().contains(0) && p.tried().contains(2));
        // Bounded however many servers there are.
        let mut p = RetryPolicy::new(1000, true);
        let mut attempts = 0;
        while p.connect_failed(attempts, &refused) == Decision::NextServer {
            attempts += 1;
        }
        assert_eq!(attempts + 1, MAX_SERVERS);
        // Our own shortage: no other server would do better.
        let mut p = RetryPolicy::new(3, true);
        assert_eq!(
            p.connect_failed(0, &HttpError::LocalResource("connect")),
            Decision::GiveUp
        );
    }

    #[test]
    fn reused_connection_replayed_once_when_replayable() {
        let reset = HttpError::UpstreamFailed("closed before responding");
        let mut p = RetryPolicy::new(2, true);
        assert!(!p.fresh_only());
        assert_eq!(p.attempt_failed(REUSED, &reset), Decision::Replay);
        assert!(p.fresh_only());
        assert_eq!(p.attempt_failed(REUSED, &reset), Decision::GiveUp, "once");
    }

    #[test]
    fn no_replay_when_unsafe() {
        let reset = HttpError::UpstreamFailed("read");
        // A POST, or a body not held whole.
        let mut p = RetryPolicy::new(2, false);
        assert_eq!(p.attempt_failed(REUSED, &reset), Decision::GiveUp);
        let mut p = RetryPolicy::new(2, true);
        // A fresh connection failing is the server's failure, not a stale connection.
        let fresh = Attempt {
            reused: false,
            response_started: false,
        };
        assert_eq!(p.attempt_failed(fresh, &reset), Decision::GiveUp);
        // Part of the response arrived.
        let started = Attempt {
            reused: true,
            response_started: true,
        };
        assert_eq!(p.attempt_failed(started, &reset), Decision::GiveUp);
        // A timeout: the upstream may be working on it.
        for e in [
            HttpError::UpstreamTimeout("read"),
            HttpError::UpstreamTimeout("send"),
            HttpError::BadUpstream("bad status line"),
            HttpError::ClientGone("write"),
            HttpError::ResponseRefused("101 without an upgrade request"),
        ] {
            assert_eq!(p.attempt_failed(REUSED, &e), Decision::GiveUp, "{e:?}");
        }
    }
}
