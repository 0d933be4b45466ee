//! Wire protocols, free of sockets and policy: the HTTP/1 codec, the PROXY protocol header,
//! TLS termination, and the error type every exchange reports with.

pub mod error;
pub mod h2;
pub mod http1;
pub mod proxy_protocol;
pub mod status;
pub mod tls;
