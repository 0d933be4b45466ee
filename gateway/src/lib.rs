//! The gateway library, laid out in layers; imports point down only (`cargo xtask test`
//! fails on a module import cycle):
//!
//! ```text
//! control   reload orchestration, admin endpoints, Prometheus exposition
//! xdp       the kernel guard: program, pinned maps, policy sync
//! dataplane worker threads, listeners, connections (preamble, HTTP/1 session, the
//!           exchange with the upstream, body relay, tunnel)
//! snapshot  the compiled config: the only config the data plane reads
//! upstream  servers, health, balance, pools
//! policy    routes, the retry policy, per-IP limits
//! protocol  the error type, status words, HTTP/1 codec, HTTP/2 translation, PROXY header, TLS
//! telemetry counters, access log
//! config    TOML types and validation       io   streams, drivers, sockets, pipes
//! util      clock, hash map, resource budget
//! ```
//!
//! A request flows: [`dataplane::listener`] (accept) → [`dataplane::conn::preamble`] →
//! [`dataplane::conn::h1`] (head, keep-alive) → [`dataplane::conn::exchange`] (route's
//! upstream: pick, pool or connect, forward, retry) → [`dataplane::conn::relay`] (response
//! body) → [`telemetry::access_log`]. `docs/architecture.md` draws it whole.

pub mod config;
pub mod control;
pub mod dataplane;
pub mod io;
pub mod policy;
pub mod protocol;
pub mod snapshot;
pub mod telemetry;
pub mod upstream;
pub mod util;
pub mod xdp;
