//! One client connection: its preamble, the HTTP/1 session, and the WebSocket tunnel an
//! upgrade turns it into.

pub mod h1;
pub mod preamble;
pub mod tunnel;
