//! Reading the environment through a trait, so that config parsing is tested
//! with a map instead of the process environment (linkerd's `Strings`).

use std::collections::HashMap;

/// A source of environment variables.
pub trait Env {
    /// The value of `key`, if set and not empty.
    fn get(&self, key: &str) -> Option<String>;
}

/// The real process environment.
#[derive(Debug, Default, Clone, Copy)]
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn get(&self, key: &str) -> Option<String> {
        std::env::var(key).ok().filter(|v| !v.is_empty())
    }
}

/// A fixed map of variables, for tests and for embedding.
#[derive(Debug, Default, Clone)]
pub struct MapEnv(pub HashMap<String, String>);

impl MapEnv {
    /// An empty environment.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `key=value`, builder style.
    pub fn with(mut self, key: &str, value: &str) -> Self {
        self.0.insert(key.to_owned(), value.to_owned());
        self
    }
}

impl Env for MapEnv {
    fn get(&self, key: &str) -> Option<String> {
        self.0.get(key).filter(|v| !v.is_empty()).cloned()
    }
}

/// Parses `key` from `env` with `parse`, naming the variable in the error.
pub fn parse_var<T, E: std::fmt::Display>(
    env: &dyn Env,
    key: &str,
    parse: impl FnOnce(&str) -> Result<T, E>,
) -> Result<Option<T>, String> {
    match env.get(key) {
        None => Ok(None),
        Some(raw) => parse(raw.trim())
            .map(Some)
            .map_err(|e| format!("environment variable {key}={raw:?}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_env_ignores_empty_values() {
        let env = MapEnv::new().with("A", "1").with("B", "");
        assert_eq!(env.get("A").as_deref(), Some("1"));
        assert_eq!(env.get("B"), None);
        assert_eq!(env.get("C"), None);
    }

    #[test]
    fn parse_var_names_the_variable() {
        let env = MapEnv::new().with("MAX", "lots");
        let err = parse_var(&env, "MAX", |s| s.parse::<u32>()).unwrap_err();
        assert!(err.contains("MAX=\"lots\""), "{err}");
        assert_eq!(parse_var(&env, "NONE", |s| s.parse::<u32>()), Ok(None));
    }
}
