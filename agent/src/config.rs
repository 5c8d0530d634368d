//! The agent's configuration (SPEC §3.2): a TOML file, where every key can
//! also be given as a flag or an environment variable (flags and variables
//! win over the file).

use kp5_shared::{ConfigError, Env};
use serde::Deserialize;
use std::net::SocketAddr;
use std::time::Duration;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    agent: RawAgent,
    redis: Option<RawRedis>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgent {
    server_id: Option<String>,
    pool: Option<String>,
    advertise: Option<String>,
    listen: Option<String>,
    weight: Option<u32>,
    max_connections: Option<u64>,
    max_matches: Option<u64>,
    heartbeat_interval_ms: Option<u64>,
    heartbeat_ttl_ms: Option<u64>,
    load: Option<RawLoad>,
    events_max_len: Option<u64>,
    ended_retention_ms: Option<u64>,
    idle_retention_ms: Option<u64>,
    metrics_retention_hours: Option<f64>,
    max_metrics_stored: Option<u64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLoad {
    source: String,
    url: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRedis {
    url: Option<String>,
    password: Option<String>,
    db: Option<u32>,
    key_prefix: Option<String>,
    timeout_ms: Option<u64>,
}

/// Values given as flags or environment variables; each wins over the file.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub server_id: Option<String>,
    pub pool: Option<String>,
    pub advertise: Option<String>,
    pub listen: Option<String>,
    pub weight: Option<u32>,
    pub max_connections: Option<u64>,
    pub max_matches: Option<u64>,
    pub heartbeat_interval_ms: Option<u64>,
    pub heartbeat_ttl_ms: Option<u64>,
    /// "push" or "scrape".
    pub load_source: Option<String>,
    pub load_url: Option<String>,
    pub redis_url: Option<String>,
    pub redis_key_prefix: Option<String>,
    pub events_max_len: Option<u64>,
    pub ended_retention_ms: Option<u64>,
    pub idle_retention_ms: Option<u64>,
}

/// Where live load comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoadSource {
    /// The match server calls `PUT /v1/load`.
    Push,
    /// The agent reads the match server's stats URL (JSON or Prometheus text).
    Scrape { url: String },
}

/// Redis settings of the agent.
#[derive(Debug, Clone)]
pub struct RedisConfig {
    pub target: kp5_shared::redis::RedisTarget,
    pub key_prefix: String,
}

/// A checked agent configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub server_id: String,
    pub pool: String,
    pub advertise: String,
    pub listen: SocketAddr,
    pub weight: u32,
    pub max_connections: Option<u64>,
    pub max_matches: Option<u64>,
    pub heartbeat_interval: Duration,
    pub heartbeat_ttl: Duration,
    pub load: LoadSource,
    /// Match state: changes kept per match for resuming event streams.
    pub events_max_len: u64,
    /// State and events of an ended match are removed after this.
    pub ended_retention: Duration,
    /// State and events of a match nobody writes are removed after this.
    pub idle_retention: Duration,
    /// Per-match performance reports: kept this long and at most this many.
    pub metrics_retention: Duration,
    pub max_metrics_stored: u64,
    /// Absent: the agent serves its local API but registers nowhere.
    pub redis: Option<RedisConfig>,
}

fn invalid(field: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::invalid(field, message)
}

impl Config {
    pub fn load(path: &std::path::Path, env: &dyn Env) -> Result<Config, ConfigError> {
        Self::build(&kp5_shared::config::read(path)?, env, Overrides::default())
    }

    pub fn from_toml(text: &str, env: &dyn Env) -> Result<Config, ConfigError> {
        Self::build(text, env, Overrides::default())
    }

    /// File text (may be empty), then the seed's environment variables,
    /// then `o` (flags and `KP5_AGENT_*` variables).
    pub fn build(text: &str, env: &dyn Env, o: Overrides) -> Result<Config, ConfigError> {
        let raw: RawConfig = kp5_shared::config::parse_toml(text)?;
        let a = raw.agent;
        let server_id = o
            .server_id
            .or(a.server_id)
            .or_else(|| env.get("HOSTNAME"))
            .filter(|s| !s.is_empty())
            .ok_or_else(|| invalid("agent.server_id", "not set and $HOSTNAME is empty"))?;
        if server_id.contains(|c: char| c.is_whitespace() || c.is_control()) {
            return Err(invalid(
                "agent.server_id",
                format!("{server_id:?} must not contain spaces"),
            ));
        }
        let pool = o.pool.or(a.pool).unwrap_or_else(|| "matches".into());
        if pool.is_empty() || pool.contains(['{', '}', ' ', ':']) {
            return Err(invalid(
                "agent.pool",
                format!("{pool:?} must be non-empty, without braces, colons or spaces"),
            ));
        }
        let advertise = o
            .advertise
            .or(a.advertise)
            .ok_or_else(|| invalid("agent.advertise", "required: HOST:PORT of the match server"))?;
        if advertise.parse::<http::uri::Authority>().is_err()
            || advertise
                .rsplit_once(':')
                .and_then(|(_, p)| p.parse::<u16>().ok())
                .is_none()
        {
            return Err(invalid(
                "agent.advertise",
                format!("{advertise:?} is not HOST:PORT"),
            ));
        }
        let listen_text = o
            .listen
            .or(a.listen)
            .unwrap_or_else(|| "127.0.0.1:9902".into());
        let listen = listen_text
            .parse()
            .map_err(|_| invalid("agent.listen", format!("{listen_text:?} is not IP:PORT")))?;
        let weight = o.weight.or(a.weight).unwrap_or(1);
        if weight == 0 || weight > 1000 {
            return Err(invalid(
                "agent.weight",
                format!("{weight} is outside 1..=1000"),
            ));
        }
        let max_connections = o.max_connections.or(a.max_connections);
        let max_matches = o.max_matches.or(a.max_matches);
        for (field, v) in [
            ("agent.max_connections", max_connections),
            ("agent.max_matches", max_matches),
        ] {
            if v == Some(0) {
                return Err(invalid(field, "must be at least 1 (or left out)"));
            }
        }
        let interval = o
            .heartbeat_interval_ms
            .or(a.heartbeat_interval_ms)
            .unwrap_or(1000);
        let ttl = o.heartbeat_ttl_ms.or(a.heartbeat_ttl_ms).unwrap_or(3000);
        if !(10..=60_000).contains(&interval) {
            return Err(invalid(
                "agent.heartbeat_interval_ms",
                format!("{interval} is outside 10..=60000"),
            ));
        }
        if ttl <= interval || ttl > 600_000 {
            return Err(invalid(
                "agent.heartbeat_ttl_ms",
                format!("{ttl} must be greater than heartbeat_interval_ms ({interval}) and at most 600000"),
            ));
        }
        let (source, url) = match (o.load_source, a.load) {
            (Some(s), file) => (s, o.load_url.or(file.and_then(|l| l.url))),
            (None, Some(l)) => (l.source, o.load_url.or(l.url)),
            (None, None) => ("push".into(), o.load_url),
        };
        let load = match (source.as_str(), url) {
            ("push", _) => LoadSource::Push,
            ("scrape", Some(url)) => {
                if !url.starts_with("http://") {
                    return Err(invalid(
                        "agent.load.url",
                        format!("{url:?} must be an http:// URL"),
                    ));
                }
                LoadSource::Scrape { url }
            }
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
        };
        let events_max_len = o.events_max_len.or(a.events_max_len).unwrap_or(1000);
        if !(10..=1_000_000).contains(&events_max_len) {
            return Err(invalid(
                "agent.events_max_len",
                format!("{events_max_len} is outside 10..=1000000"),
            ));
        }
        let ended = o
            .ended_retention_ms
            .or(a.ended_retention_ms)
            .unwrap_or(3_600_000);
        let idle = o
            .idle_retention_ms
            .or(a.idle_retention_ms)
            .unwrap_or(86_400_000);
        for (field, v) in [
            ("agent.ended_retention_ms", ended),
            ("agent.idle_retention_ms", idle),
        ] {
            if !(100..=30 * 86_400_000).contains(&v) {
                return Err(invalid(field, format!("{v} is outside 100..=2592000000")));
            }
        }
        let retention_hours = match a.metrics_retention_hours {
            Some(h) => h,
            None => {
                kp5_shared::env::parse_var(env, "METRICS_RETENTION_HOURS", |s| s.parse::<f64>())
                    .map_err(ConfigError::Env)?
                    .unwrap_or(24.0)
            }
        };
        let max_stored = match a.max_metrics_stored {
            Some(n) => n,
            None => kp5_shared::env::parse_var(env, "MAX_METRICS_STORED", |s| s.parse::<u64>())
                .map_err(ConfigError::Env)?
                .unwrap_or(1000),
        };
        if !(retention_hours > 0.0 && retention_hours <= 24.0 * 366.0) {
            return Err(invalid(
                "agent.metrics_retention_hours",
                format!("{retention_hours} must be above 0 (and at most 8784)"),
            ));
        }
        if !(1..=1_000_000).contains(&max_stored) {
            return Err(invalid(
                "agent.max_metrics_stored",
                format!("{max_stored} is outside 1..=1000000"),
            ));
        }
        let mut r = raw.redis.unwrap_or_default();
        if let Some(u) = o.redis_url.or_else(|| env.get("REDIS_URL")) {
            r.url = Some(u);
        }
        if let Some(pw) = env.get("REDIS_PASSWORD") {
            r.password = Some(pw);
        }
        if let Some(db) = kp5_shared::env::parse_var(env, "REDIS_DB", |s| s.parse::<u32>())
            .map_err(ConfigError::Env)?
        {
            r.db = Some(db);
        }
        if let Some(p) = o.redis_key_prefix {
            r.key_prefix = Some(p);
        }
        let redis = match r.url {
            None => None,
            Some(url) => {
                kp5_shared::redis::check_url(&url).map_err(|m| invalid("redis.url", m))?;
                let key_prefix = r.key_prefix.unwrap_or_else(|| "kp5".into());
                kp5_shared::redis::check_key_prefix(&key_prefix)
                    .map_err(|m| invalid("redis.key_prefix", m))?;
                let timeout_ms = r.timeout_ms.unwrap_or(500);
                if !(10..=60_000).contains(&timeout_ms) {
                    return Err(invalid(
                        "redis.timeout_ms",
                        format!("{timeout_ms} is outside 10..=60000"),
                    ));
                }
                Some(RedisConfig {
                    target: kp5_shared::redis::RedisTarget {
                        url,
                        password: r.password,
                        db: r.db,
                        timeout: Duration::from_millis(timeout_ms),
                    },
                    key_prefix,
                })
            }
        };
        Ok(Config {
            server_id,
            pool,
            advertise,
            listen,
            weight,
            max_connections,
            max_matches,
            heartbeat_interval: Duration::from_millis(interval),
            heartbeat_ttl: Duration::from_millis(ttl),
            load,
            events_max_len,
            ended_retention: Duration::from_millis(ended),
            idle_retention: Duration::from_millis(idle),
            metrics_retention: Duration::from_secs_f64(retention_hours * 3600.0),
            max_metrics_stored: max_stored,
            redis,
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
        assert!(c.redis.is_none());
        let e = Config::from_toml("[agent]\nadvertise = \"nope\"\nserver_id = \"a\"\n", &env)
            .unwrap_err();
        assert!(e.to_string().contains("agent.advertise"), "{e}");
        let e = Config::from_toml(
            "[agent]\nadvertise = \"h:1\"\nserver_id = \"a\"\nload = { source = \"scrape\" }\n",
            &env,
        )
        .unwrap_err();
        assert!(e.to_string().contains("agent.load.url"), "{e}");
        let e = Config::from_toml(
            "[agent]\nadvertise = \"h:1\"\nheartbeat_interval_ms = 1000\nheartbeat_ttl_ms = 500\n",
            &env,
        )
        .unwrap_err();
        assert!(e.to_string().contains("agent.heartbeat_ttl_ms"), "{e}");
    }

    #[test]
    fn flags_and_env_win_over_the_file() {
        let text = "[agent]\nserver_id = \"file\"\nadvertise = \"127.0.0.1:3001\"\n[redis]\nurl = \"redis://file:1\"\n";
        let env = MapEnv::new().with("REDIS_URL", "redis://env:2");
        let o = Overrides {
            server_id: Some("flag".into()),
            load_source: Some("scrape".into()),
            load_url: Some("http://127.0.0.1:3001/stats".into()),
            ..Overrides::default()
        };
        let c = Config::build(text, &env, o).unwrap();
        assert_eq!(c.server_id, "flag");
        assert_eq!(c.redis.unwrap().target.url, "redis://env:2");
        assert!(matches!(c.load, LoadSource::Scrape { .. }));
        // the seed's retention variable, fractions allowed as on the proxy
        let env = MapEnv::new().with("METRICS_RETENTION_HOURS", "0.5");
        let c =
            Config::from_toml("[agent]\nadvertise = \"h:1\"\nserver_id = \"a\"\n", &env).unwrap();
        assert_eq!(c.metrics_retention, Duration::from_secs(1800));
        // everything from flags, no file at all
        let o = Overrides {
            server_id: Some("s".into()),
            advertise: Some("127.0.0.1:1".into()),
            ..Overrides::default()
        };
        assert_eq!(
            Config::build("", &MapEnv::new(), o).unwrap().advertise,
            "127.0.0.1:1"
        );
    }
}
