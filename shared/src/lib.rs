//! Types shared by `kp5-proxy` and `kp5-agent`: the environment seam used by
//! config parsing, and the wire types both binaries exchange (through Redis) or show on their admin APIs.
#![forbid(unsafe_code)]

pub mod config;
pub mod env;
pub mod http;
pub mod keys;
pub mod redis;
pub mod start;
pub mod wire;

pub use config::ConfigError;
pub use env::{Env, MapEnv, ProcessEnv};
pub use keys::Keys;
pub use start::StartError;
