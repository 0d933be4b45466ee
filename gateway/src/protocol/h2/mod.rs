//! HTTP/2 for clients (issue 12), the parts that stand on their own: the translation of an
//! h2 stream's request to the HTTP/1.1 head sent upstream (and of the upstream's response
//! head back), with the validation RFC 9113 asks of an intermediary, and the `h2::server`
//! settings the gateway runs with. The engine is the `h2` crate, driven over
//! [`io::TlsIo`] (or the plain socket for h2c); see
//! `docs/design/http2.md` for the runtime choice and what the exchange offers each stream.

// Not wired to a listener yet (issue 12): the translation is exercised by its unit tests
// and by gateway/tests/h2_spike.rs until the HTTP/2 session calls it.
pub mod io;
#[allow(dead_code)]
pub(crate) mod translate;

pub use translate::{translate_request, BodyLength, H2Request};
