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
}
