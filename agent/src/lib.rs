//! `kp5-agent`: the sidecar next to each match server. It registers the
//! server in Redis, heartbeats with a TTL, publishes the server's live load
//! (pushed by the match server or scraped from it) with the machine's CPU
//! and memory, and serves the match server a local HTTP API (SPEC §3.2,
//! §3.4). `main.rs` is a thin shell around [`start`].
#![forbid(unsafe_code)]

pub mod api;
pub mod config;
pub mod load;
pub mod matches;
pub mod registry;

pub use config::{Config, LoadSource, Overrides};
pub use kp5_shared::ConfigError;
pub use registry::{start, AgentHandle, StartError};
