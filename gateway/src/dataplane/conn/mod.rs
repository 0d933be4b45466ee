//! One client connection: its preamble, the HTTP/1 or HTTP/2 session, the exchange they
//! hand each proxied request (or stream) to (and the body relay under it), and the
//! WebSocket tunnel an upgrade turns an HTTP/1 connection (or an HTTP/2 stream) into.

pub mod exchange;
pub mod h1;
pub(crate) mod h2;
pub(crate) mod preamble;
pub(crate) mod relay;
mod reuse;
pub mod tunnel;

use crate::snapshot::ListenerSettings;
use std::rc::Rc;
use std::sync::Arc;

/// The listener a connection came in on, as the connection sees it for its whole life: the
/// compiled settings of the bound listener at the moment of the accept. Everything per
/// connection (PROXY trust, the TLS acceptor, trusted proxies, proto, name) reads from here,
/// so a reload can never hand one connection a mix of an old and a new listener's settings.
pub struct ListenerCtx {
    pub name: Arc<str>,
    pub proto: &'static str,
    pub settings: Arc<ListenerSettings>,
}

impl ListenerCtx {
    pub fn new(settings: Arc<ListenerSettings>) -> Rc<ListenerCtx> {
        Rc::new(ListenerCtx {
            name: settings.name.as_str().into(),
            proto: settings.proto(),
            settings,
        })
    }
}
