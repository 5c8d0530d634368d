//! Errors of the request path. Each says where it came from and whether
//! another server may be tried; the HTTP status follows from that.

use std::time::Duration;

/// Which side caused an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorSource {
    /// The client: a bad request.
    Downstream,
    /// A backend: refused, reset, timed out.
    Upstream,
    /// The proxy: no route, no capacity.
    Internal,
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no route for this host and path")]
    NoRoute,
    #[error("no server can take this request")]
    NoCapacity,
    #[error("connecting to {server} failed: {reason}")]
    Connect { server: String, reason: String },
    #[error("{server} did not answer within {timeout:?}")]
    Timeout { server: String, timeout: Duration },
    #[error("{server} failed: {reason}")]
    Upstream { server: String, reason: String },
    #[error("bad request: {0}")]
    BadRequest(&'static str),
}

impl ProxyError {
    pub fn source_side(&self) -> ErrorSource {
        match self {
            ProxyError::NoRoute | ProxyError::NoCapacity => ErrorSource::Internal,
            ProxyError::BadRequest(_) => ErrorSource::Downstream,
            _ => ErrorSource::Upstream,
        }
    }

    /// Nothing reached the server: another one may be tried.
    pub fn retryable(&self) -> bool {
        matches!(self, ProxyError::Connect { .. })
    }

    pub fn status(&self) -> http::StatusCode {
        use http::StatusCode as S;
        match self {
            ProxyError::NoRoute => S::NOT_FOUND,
            ProxyError::NoCapacity => S::SERVICE_UNAVAILABLE,
            ProxyError::Connect { .. } | ProxyError::Upstream { .. } => S::BAD_GATEWAY,
            ProxyError::Timeout { .. } => S::GATEWAY_TIMEOUT,
            ProxyError::BadRequest(_) => S::BAD_REQUEST,
        }
    }
}
