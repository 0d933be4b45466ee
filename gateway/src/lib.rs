//! The gateway library: everything the binary runs, split by what each module owns.
//!
//! Request path, in order: [`worker`] (threads, listeners, accept) → [`proxy`] (one client
//! connection) → [`http`] (codec) → [`route`] → [`upstream`] (choice, pools, health) →
//! [`tunnel`] (after an upgrade) → [`access_log`]. Control plane: [`config`], [`state`]
//! (the snapshot), [`control`] (reload), [`admin`], [`metrics`], [`xdp`] (kernel guard).

pub mod access_log;
pub mod admin;
pub mod budget;
pub mod clock;
pub mod config;
pub mod control;
pub mod fasthash;
pub mod http;
pub mod io;
pub mod limits;
pub mod metrics;
pub mod pipe;
pub mod proxy;
pub mod route;
pub mod state;
pub mod tls;
pub mod tunnel;
pub mod upstream;
pub mod worker;
pub mod xdp;
