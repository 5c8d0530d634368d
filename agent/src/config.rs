//! `kp5-agent`: the sidecar next to each match server. This part holds its
//! configuration (SPEC §3.2); registration, heartbeats and the local API
//! build on it.
#![forbid(unsafe_code)]

use kp5_shared::Env;
use serde::Deserialize;
use std::net::SocketAddr;

pub use kp5_shared::ConfigError;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    agent: RawAgent,
    redis: Option<RawRedis>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgent {
    server_id: Option<String>,
    #[serde(default = "d_pool")]
    pool: String,
    advertise: String,
    #[serde(default = "d_listen")]
    listen: String,
    #[serde(default = "d_one")]
    weight: u32,
    #[serde(default = "d_hb")]
    heartbeat_interval_ms: u64,
    #[serde(default = "d_ttl")]
    heartbeat_ttl_ms: u64,
    load: Option<RawLoad>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLoad {
    source: String,
    url: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRedis {
    url: String,
}

fn d_pool() -> String {
    "matches".into()
}
fn d_listen() -> String {
    "127.0.0.1:9902".into()
}
fn d_one() -> u32 {
    1
}
fn d_hb() -> u64 {
    1000
}
fn d_ttl() -> u64 {
    3000
}

/// Where live load comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoadSource {
    /// The match server calls `PUT /v1/load`.
    Push,
    /// The agent reads the match server's stats URL.
    Scrape { url: String },
}

/// A checked agent configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub server_id: String,
    pub pool: String,
    pub advertise: String,
    pub listen: SocketAddr,
    pub weight: u32,
    pub heartbeat_interval_ms: u64,
    pub heartbeat_ttl_ms: u64,
    pub load: LoadSource,
    pub redis_url: Option<String>,
}

fn invalid(field: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::invalid(field, message)
}

impl Config {
    pub fn load(path: &std::path::Path, env: &dyn Env) -> Result<Config, ConfigError> {
        Self::from_toml(&kp5_shared::config::read(path)?, env)
    }

    pub fn from_toml(text: &str, env: &dyn Env) -> Result<Config, ConfigError> {
        let raw: RawConfig = kp5_shared::config::parse_toml(text)?;
        let a = raw.agent;
        let server_id = a
            .server_id
            .or_else(|| env.get("HOSTNAME"))
            .ok_or_else(|| invalid("agent.server_id", "not set and $HOSTNAME is empty"))?;
        let listen = a
            .listen
            .parse()
            .map_err(|_| invalid("agent.listen", format!("{:?} is not IP:PORT", a.listen)))?;
        if a.advertise
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse::<u16>().ok())
            .is_none()
        {
            return Err(invalid(
                "agent.advertise",
                format!("{:?} is not HOST:PORT", a.advertise),
            ));
        }
        if a.weight == 0 || a.weight > 1000 {
            return Err(invalid(
                "agent.weight",
                format!("{} is outside 1..=1000", a.weight),
            ));
        }
        if a.heartbeat_interval_ms == 0 || a.heartbeat_ttl_ms <= a.heartbeat_interval_ms {
            return Err(invalid(
                "agent.heartbeat_ttl_ms",
                "must be greater than heartbeat_interval_ms (which must be > 0)",
            ));
        }
        let load = match a.load {
            None => LoadSource::Push,
            Some(l) => match (l.source.as_str(), l.url) {
                ("push", _) => LoadSource::Push,
                ("scrape", Some(url)) => LoadSource::Scrape { url },
                ("scrape", None) => {
                    return Err(invalid(
                        "agent.load.url",
                        "required when source = \"scrape\"",
                    ))
                }
                (other, _) => {
                    return Err(invalid(
                        "agent.load.source",
                        format!("{other:?}: expected \"push\" or \"scrape\""),
                    ))
                }
            },
        };
        let redis_url = env.get("REDIS_URL").or(raw.redis.map(|r| r.url));
        Ok(Config {
            server_id,
            pool: a.pool,
            advertise: a.advertise,
            listen,
            weight: a.weight,
            heartbeat_interval_ms: a.heartbeat_interval_ms,
            heartbeat_ttl_ms: a.heartbeat_ttl_ms,
            load,
            redis_url,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kp5_shared::MapEnv;

    #[test]
    fn parses_and_names_bad_fields() {
        let text = "[agent]\nadvertise = \"127.0.0.1:3001\"\n";
        let env = MapEnv::new().with("HOSTNAME", "box-1");
        let c = Config::from_toml(text, &env).unwrap();
        assert_eq!(c.server_id, "box-1");
        assert_eq!(c.load, LoadSource::Push);
        let e = Config::from_toml("[agent]\nadvertise = \"nope\"\nserver_id = \"a\"\n", &env)
            .unwrap_err();
        assert!(e.to_string().contains("agent.advertise"), "{e}");
        let e = Config::from_toml(
            "[agent]\nadvertise = \"h:1\"\nserver_id = \"a\"\nload = { source = \"scrape\" }\n",
            &env,
        )
        .unwrap_err();
        assert!(e.to_string().contains("agent.load.url"), "{e}");
    }
}
