//! The gateway library, laid out in layers; imports point down only (`cargo xtask test`
//! fails on a module import cycle):
//!
//! ```text
//! control   reload orchestration, admin endpoints, Prometheus exposition
//! xdp       the kernel guard: program, pinned maps, policy sync
//! dataplane worker threads, listeners, connections (preamble, HTTP/1 session, tunnel)
//! snapshot  the compiled config: the only config the data plane reads
//! policy    routes and per-IP limits        upstream   servers, health, balance, pools
//! protocol  HTTP/1 codec, PROXY header, TLS telemetry  counters, access log
//! config    TOML types and validation       io         streams, drivers, sockets, pipes
//! util      clock, hash map, resource budget
//! ```
//!
//! A request flows: [`dataplane::listener`] (accept) → [`dataplane::conn::preamble`] →
//! [`dataplane::conn::h1`] (head, route, upstream, response) → [`telemetry::access_log`].

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
