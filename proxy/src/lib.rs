//! `kp5-proxy`: a WebSocket-aware layer-7 load-balancing proxy with match
//! affinity. `main.rs` is a thin shell around [`start`].
#![forbid(unsafe_code)]

pub mod balance;
pub mod config;
pub mod affinity;
pub mod clock;
pub mod health;
pub mod state;
pub mod tunnel;
