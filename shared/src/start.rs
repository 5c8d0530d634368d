//! Why a binary could not start (both binaries bind listeners and open Redis).

use std::net::SocketAddr;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("[redis]: {0}")]
    Redis(String),
    /// Certificates, keys or CAs that cannot be read or do not fit.
    #[error("{0}")]
    Tls(String),
}
