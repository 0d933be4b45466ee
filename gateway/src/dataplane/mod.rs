//! The data plane: worker threads, their listeners, and each client connection from its
//! preamble (PROXY header, TLS) through HTTP/1 to the upstream and back.

pub mod conn;
pub mod ctx;
pub mod listener;
pub(crate) mod parking;
pub mod shared;
pub mod worker;
