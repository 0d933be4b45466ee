//! One client connection: its preamble, the HTTP/1 session, the exchange it hands each
//! proxied request to (and the body relay under it), and the WebSocket tunnel an upgrade
//! turns it into.

pub mod exchange;
pub mod h1;
pub mod preamble;
pub(crate) mod relay;
pub mod tunnel;
