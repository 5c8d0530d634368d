//! End-to-end support: a demo match server (HTTP echo, WebSocket echo,
//! health and stats endpoints) used by the README's demo and as the real
//! backend of the tests, plus helpers to start proxies and clients.

pub mod cluster;
pub mod demo;
pub mod schema;
pub mod sse;
pub mod support;
pub mod tls;
