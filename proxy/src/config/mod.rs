//! Proxy configuration in two stages: [`raw`] is the TOML as written;
//! [`Config`] is the checked, typed form the runtime is built from. Every
//! error names the field (or the environment variable) and the bad value.

pub mod raw;
mod validate;

use kp5_shared::env::parse_var;
use kp5_shared::Env;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub use raw::RawConfig;

pub use kp5_shared::ConfigError;

/// A load-balancing strategy (SPEC §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StrategyKind {
    RoundRobin,
    LeastConnections,
    LeastMatches,
    Weighted,
}

impl StrategyKind {
    pub const NAMES: &'static str = "round_robin, least_connections, least_matches, weighted";

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "round_robin" => Self::RoundRobin,
            "least_connections" => Self::LeastConnections,
            "least_matches" => Self::LeastMatches,
            "weighted" => Self::Weighted,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::RoundRobin => "round_robin",
            Self::LeastConnections => "least_connections",
            Self::LeastMatches => "least_matches",
            Self::Weighted => "weighted",
        }
    }
}

/// Data-plane settings (`[proxy]`).
#[derive(Debug, Clone)]
pub struct ProxySettings {
    pub listen: Vec<SocketAddr>,
    pub worker_threads: Option<usize>,
    pub connect_timeout: Duration,
    pub header_read_timeout: Duration,
    pub upstream_timeout: Duration,
    pub idle_timeout: Duration,
    pub tunnel_idle_timeout: Duration,
    pub send_timeout: Duration,
    pub drain_timeout: Duration,
    pub max_header_bytes: usize,
    pub retries: u32,
    pub upstream_keepalive: usize,
    pub upstream_idle_timeout: Duration,
    pub forwarded: ForwardedHeaders,
    pub tls: Option<TlsSettings>,
}

/// Which forwarding headers go to the backends (`proxy.forwarded_headers`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ForwardedHeaders {
    pub x_forwarded_for: bool,
    pub x_forwarded_proto: bool,
    pub x_forwarded_host: bool,
    pub forwarded: bool,
    pub x_real_ip: bool,
}

/// `[proxy.tls]`, checked. Files are read when the config is applied.
#[derive(Debug, Clone, PartialEq)]
pub struct TlsSettings {
    pub listen: Vec<SocketAddr>,
    pub certs: Vec<CertFiles>,
    /// Only TLS 1.3 (`min_version = "1.3"`); otherwise 1.2 and 1.3.
    pub tls13_only: bool,
    pub http2: bool,
}

/// One certificate/key pair of `[proxy.tls]`.
#[derive(Debug, Clone, PartialEq)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Lower-case names from `names`; empty: the certificate's own names.
    pub names: Vec<String>,
}

/// `backend_tls` of a pool, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct BackendTls {
    pub ca: Option<PathBuf>,
    pub server_name: Option<String>,
}

/// `[admin]`.
#[derive(Debug, Clone)]
pub struct AdminSettings {
    pub listen: SocketAddr,
    /// `None` leaves `/api/*` open; only allowed on a loopback address.
    pub token: Option<String>,
}

/// `[redis]`.
#[derive(Debug, Clone)]
pub struct RedisSettings {
    /// Where Redis is: url, password, db, command timeout.
    pub target: kp5_shared::redis::RedisTarget,
    pub key_prefix: String,
    pub reconcile_interval: Duration,
}

/// `[log]`.
#[derive(Debug, Clone)]
pub struct LogSettings {
    pub level: String,
    pub json: bool,
    pub access_log: bool,
}

/// `[monitoring]`.
#[derive(Debug, Clone)]
pub struct MonitoringSettings {
    pub interval: Duration,
    /// Hours; fractions allowed (`METRICS_RETENTION_HOURS=0.5`).
    pub retention_hours: f64,
    pub max_metrics_stored: usize,
    pub thresholds: crate::monitor::Thresholds,
}

impl MonitoringSettings {
    pub fn retention_ms(&self) -> u64 {
        (self.retention_hours * 3_600_000.0) as u64
    }
}

/// A route: requests whose host matches (when given) and whose path starts
/// with `path_prefix` go to `pool`. Longest prefix wins; a host-specific route
/// beats a host-less one of the same length.
#[derive(Debug, Clone)]
pub struct Route {
    pub host: Option<String>,
    pub path_prefix: String,
    pub pool: String,
}

/// Where a match id comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MatchRule {
    /// Path starts with `prefix`, then the id is the next segment, then
    /// `suffix` (if any) must follow: "/matches/{id}/ws" → prefix "/matches/", suffix "/ws".
    Path {
        prefix: String,
        suffix: String,
    },
    Query {
        name: String,
    },
    Header {
        name: http::HeaderName,
    },
}

/// Active health checks.
#[derive(Debug, Clone)]
pub struct HealthCheck {
    pub path: http::uri::PathAndQuery,
    pub interval: Duration,
    pub timeout: Duration,
    pub healthy_threshold: u32,
    pub unhealthy_threshold: u32,
}

/// Passive ejection.
#[derive(Debug, Clone)]
pub struct Passive {
    pub connect_failures: u32,
    pub consecutive_5xx: u32,
    pub ejection: Duration,
    pub max_ejection: Duration,
    pub slow_start: Duration,
}

/// A static backend.
#[derive(Debug, Clone)]
pub struct Backend {
    pub id: String,
    /// `host:port`, as connected to (IP literals skip DNS).
    pub address: http::uri::Authority,
    pub weight: u32,
}

/// `[pools.NAME]`.
#[derive(Debug, Clone)]
pub struct Pool {
    pub name: String,
    pub strategy: StrategyKind,
    pub max_connections_per_server: u64,
    pub max_matches_per_server: u64,
    pub discover: bool,
    pub match_id: Vec<MatchRule>,
    pub match_grace: Duration,
    pub sticky_cookie: Option<String>,
    pub health_check: Option<HealthCheck>,
    pub passive: Passive,
    pub backends: Vec<Backend>,
    pub backend_tls: Option<BackendTls>,
}

/// A complete, checked proxy configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub proxy: ProxySettings,
    pub admin: AdminSettings,
    pub redis: Option<RedisSettings>,
    pub log: LogSettings,
    pub monitoring: MonitoringSettings,
    /// Sorted: most specific first.
    pub routes: Vec<Route>,
    pub pools: Vec<Arc<Pool>>,
}

impl Config {
    /// Reads, parses, applies the environment and validates `path`.
    pub fn load(path: &Path, env: &dyn Env) -> Result<Config, ConfigError> {
        let mut config = Self::from_toml(&kp5_shared::config::read(path)?, env)?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            config.resolve_paths(dir);
        }
        Ok(config)
    }

    /// Makes the relative file paths (certificates, keys, CAs) relative to `dir`.
    pub fn resolve_paths(&mut self, dir: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = dir.join(&*p);
            }
        };
        if let Some(tls) = self.proxy.tls.as_mut() {
            for c in &mut tls.certs {
                fix(&mut c.cert);
                fix(&mut c.key);
            }
        }
        for pool in &mut self.pools {
            if let Some(ca) = Arc::make_mut(pool)
                .backend_tls
                .as_mut()
                .and_then(|t| t.ca.as_mut())
            {
                fix(ca);
            }
        }
    }

    /// Parses TOML text, applies the environment and validates.
    pub fn from_toml(text: &str, env: &dyn Env) -> Result<Config, ConfigError> {
        let mut raw: RawConfig = kp5_shared::config::parse_toml(text)?;
        apply_env(&mut raw, env).map_err(ConfigError::Env)?;
        validate::build(raw)
    }

    pub fn pool(&self, name: &str) -> Option<&Arc<Pool>> {
        self.pools.iter().find(|p| p.name == name)
    }
}

/// The seed's environment variables override the file (for every pool).
fn apply_env(raw: &mut RawConfig, env: &dyn Env) -> Result<(), String> {
    if let Some(url) = env.get("REDIS_URL") {
        let redis = raw.redis.get_or_insert_with(|| raw::RawRedis {
            url: String::new(),
            password: None,
            db: None,
            key_prefix: "kp5".into(),
            timeout_ms: 500,
            reconcile_interval_ms: 5000,
        });
        redis.url = url;
    }
    if let Some(redis) = raw.redis.as_mut() {
        if let Some(pw) = env.get("REDIS_PASSWORD") {
            redis.password = Some(pw);
        }
        if let Some(db) = parse_var(env, "REDIS_DB", |s| s.parse::<u32>())? {
            redis.db = Some(db);
        }
    }
    if let Some(token) = env.get("KP5_ADMIN_TOKEN") {
        raw.admin.token = Some(token);
    }
    if let Some(level) = env.get("LOG_LEVEL") {
        raw.log.level = level;
    }
    let max_conn = parse_var(env, "MAX_CONNECTIONS_PER_SERVER", |s| s.parse::<u64>())?;
    let max_matches = parse_var(env, "MAX_MATCHES_PER_SERVER", |s| s.parse::<u64>())?;
    let interval = parse_var(env, "LOAD_BALANCER_HEALTH_CHECK_INTERVAL", |s| {
        s.parse::<u64>()
    })?;
    let strategy = match env.get("LOAD_BALANCING_STRATEGY") {
        Some(s) if StrategyKind::parse(s.trim()).is_none() => {
            return Err(format!(
                "environment variable LOAD_BALANCING_STRATEGY={s:?}: unknown strategy; expected one of {}",
                StrategyKind::NAMES
            ))
        }
        other => other.map(|s| s.trim().to_owned()),
    };
    for pool in raw.pools.values_mut() {
        if let Some(v) = max_conn {
            pool.max_connections_per_server = v;
        }
        if let Some(v) = max_matches {
            pool.max_matches_per_server = v;
        }
        if let (Some(v), Some(hc)) = (interval, pool.health_check.as_mut()) {
            hc.interval_ms = v;
        }
        if let Some(s) = &strategy {
            pool.strategy = s.clone();
        }
    }
    if let Some(v) = parse_var(env, "PERFORMANCE_MONITORING_INTERVAL", |s| s.parse::<u64>())? {
        raw.monitoring.interval_ms = v;
    }
    if let Some(v) = parse_var(env, "METRICS_RETENTION_HOURS", |s| s.parse::<f64>())? {
        raw.monitoring.retention_hours = v;
    }
    if let Some(v) = parse_var(env, "MAX_METRICS_STORED", |s| s.parse::<usize>())? {
        raw.monitoring.max_metrics_stored = v;
    }
    Ok(())
}
