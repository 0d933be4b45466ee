//! HTTP/2 for clients (issue 12), the parts below the session: the translation of an h2
//! stream's request to the HTTP/1.1 head sent upstream (and of the upstream's response head
//! back), with the validation RFC 9113 asks of an intermediary; the byte streams `h2` runs
//! on ([`io::TlsIo`], or the plain socket for h2c); and the SETTINGS/PING flood guard in
//! front of `h2` ([`guard::FrameGuard`]). The session itself is `dataplane::conn::h2`; see
//! `docs/design/http2.md` for the runtime choice.

pub mod guard;
pub mod io;
pub(crate) mod translate;

pub use translate::{translate_request, BodyLength, H2Request};
