//! Config primitives both binaries use: the error type that names the field
//! (or environment variable) and the file reading that goes with it.

use std::path::Path;

/// What is wrong with a config, precise enough to fix it without guessing.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    /// TOML syntax or type errors; the message carries line and column.
    #[error("{0}")]
    Parse(String),
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
    /// A bad environment override; the message names the variable.
    #[error("{0}")]
    Env(String),
}

impl ConfigError {
    /// `field: message`.
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError::Invalid {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Reads a config file, naming it in the error.
pub fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.display().to_string(),
        source,
    })
}

/// Parses TOML into `T`; syntax and type errors carry line and column.
pub fn parse_toml<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))
}
