//! `kp5-proxy`: a WebSocket-aware layer-7 load-balancing proxy with match
//! affinity. `main.rs` is a thin shell around [`start`].
#![deny(unsafe_code)]

pub mod admin;
pub mod affinity;
pub mod app;
pub mod balance;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod forward;
pub mod health;
pub mod memory;
pub mod metrics;
pub mod monitor;
pub mod reload;
pub mod runtime;
pub mod send_timeout;
pub mod server;
pub mod state;
pub mod tls;
pub mod tunnel;

pub use app::{start, start_with, Options, ProxyHandle, StartError};
pub use config::{Config, ConfigError};
