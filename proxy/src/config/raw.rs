//! Stage one: the TOML file as written, with serde defaults and no
//! cross-field checks. Unknown keys are errors, so a typo never goes unseen.

use serde::Deserialize;
use std::collections::BTreeMap;

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub proxy: RawProxy,
    #[serde(default)]
    pub admin: RawAdmin,
    pub redis: Option<RawRedis>,
    #[serde(default)]
    pub log: RawLog,
    #[serde(default)]
    pub monitoring: RawMonitoring,
    #[serde(default)]
    pub routes: Vec<RawRoute>,
    #[serde(default)]
    pub pools: BTreeMap<String, RawPool>,
}

/// `[proxy]`: listeners, timeouts and limits of the data plane.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProxy {
    /// Plain HTTP/1.1, cleartext HTTP/2 (prior knowledge) and WebSocket listeners.
    /// May be empty when `[proxy.tls]` listens.
    #[serde(default)]
    pub listen: Vec<String>,
    /// `[proxy.tls]`: HTTPS and WSS listeners.
    pub tls: Option<RawTls>,
    /// Runtime worker threads. Default: number of cores.
    pub worker_threads: Option<usize>,
    /// Connecting to a backend, ms. Default 3000.
    #[serde(default = "d_connect")]
    pub connect_timeout_ms: u64,
    /// A client must send its whole request head within this, ms. Default 10000.
    #[serde(default = "d_header")]
    pub header_read_timeout_ms: u64,
    /// A backend must answer with a response head within this, ms. Default 60000.
    #[serde(default = "d_upstream")]
    pub upstream_timeout_ms: u64,
    /// An HTTP/2 client connection with no stream for this long is closed, ms. Default 60000.
    #[serde(default = "d_idle")]
    pub idle_timeout_ms: u64,
    /// A WebSocket (or other upgraded) tunnel with no byte either way for this long is
    /// closed, with close code 1001 where the protocol is WebSocket, ms. Default 3600000.
    #[serde(default = "d_tunnel_idle")]
    pub tunnel_idle_timeout_ms: u64,
    /// A client that takes nothing of what is sent to it (a response, or a
    /// tunnel's data) for this long is closed, as is a tunnel's server that
    /// takes nothing; the time runs only while a write waits (nginx's
    /// `send_timeout`), ms. Default 60000.
    #[serde(default = "d_idle")]
    pub send_timeout_ms: u64,
    /// On SIGTERM, open WebSockets get this long to finish before 1001, ms. Default 10000.
    #[serde(default = "d_drain")]
    pub drain_timeout_ms: u64,
    /// Largest request head accepted; larger gets 431, bytes. Default 32768.
    #[serde(default = "d_max_header")]
    pub max_header_bytes: usize,
    /// Further servers tried when connecting failed before any byte was sent. Default 2.
    #[serde(default = "d_retries")]
    pub retries: u32,
    /// Idle keep-alive connections kept per backend. Default 256.
    #[serde(default = "d_pool_idle")]
    pub upstream_keepalive: usize,
    /// An idle pooled backend connection is closed after this, ms. Default 60000.
    #[serde(default = "d_idle")]
    pub upstream_idle_timeout_ms: u64,
    /// Forwarding headers added to each request sent to a backend, any of
    /// "x-forwarded-for" (appended to), "x-forwarded-proto",
    /// "x-forwarded-host", "forwarded" (RFC 7239, appended to) and
    /// "x-real-ip" (nginx's `$remote_addr`). Default: the first four.
    #[serde(default = "d_forwarded")]
    pub forwarded_headers: Vec<String>,
}

/// `[proxy.tls]`: TLS listeners (rustls): HTTPS with HTTP/2 or HTTP/1.1 by
/// ALPN, and WSS. Certificate and key files are watched and reloaded.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub listen: Vec<String>,
    /// Certificate chains and keys (PEM). SNI picks the first whose
    /// certificate is valid for the name asked for (or whose `names` lists
    /// it); the first pair is the default for other names and no SNI.
    pub certs: Vec<RawCertPair>,
    /// Lowest TLS version accepted: "1.2" or "1.3". Default "1.2".
    #[serde(default = "d_tls_min")]
    pub min_version: String,
    /// Offer HTTP/2 by ALPN (besides HTTP/1.1). Default true.
    #[serde(default = "d_true")]
    pub http2: bool,
}

/// One `certs` entry. Relative paths are relative to the config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCertPair {
    /// PEM certificate chain, leaf first.
    pub cert: String,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: String,
    /// Host names this pair serves, instead of those in the certificate
    /// ("*.example.com" matches one label).
    pub names: Option<Vec<String>>,
}

/// `backend_tls = { ... }` of a pool: its servers speak TLS (https/wss).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBackendTls {
    /// PEM file of the CAs that sign the servers' certificates. Default:
    /// the Mozilla root store. Relative to the config file.
    pub ca: Option<String>,
    /// Name to send by SNI and to verify the certificate for. Default: the
    /// host of each server's address.
    pub server_name: Option<String>,
}

/// `[admin]`: the admin API, `/metrics` and `/healthz`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    /// Default "127.0.0.1:9901".
    #[serde(default = "d_admin_listen")]
    pub listen: String,
    /// Bearer token for `/api/*`; env `KP5_ADMIN_TOKEN` overrides.
    pub token: Option<String>,
}

impl Default for RawAdmin {
    fn default() -> Self {
        Self {
            listen: d_admin_listen(),
            token: None,
        }
    }
}

/// `[redis]`: the shared registry. Absent: the embedded in-process registry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRedis {
    pub url: String,
    pub password: Option<String>,
    pub db: Option<u32>,
    #[serde(default = "d_prefix")]
    pub key_prefix: String,
    /// A Redis command slower than this counts as a failure, ms. Default 500.
    #[serde(default = "d_redis_timeout")]
    pub timeout_ms: u64,
    /// Full re-read of the registry (beside pub/sub), ms. Default 5000.
    #[serde(default = "d_reconcile")]
    pub reconcile_interval_ms: u64,
}

/// `[log]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLog {
    /// A `tracing` filter such as "info" or "kp5_proxy=debug". Env `LOG_LEVEL` overrides.
    #[serde(default = "d_level")]
    pub level: String,
    /// "text" or "json". Default "text".
    #[serde(default = "d_format")]
    pub format: String,
    /// One line per proxied request at info level on target `access`. Default true.
    #[serde(default = "d_true")]
    pub access_log: bool,
}

impl Default for RawLog {
    fn default() -> Self {
        Self {
            level: d_level(),
            format: d_format(),
            access_log: true,
        }
    }
}

/// `[monitoring]`: performance history settings of the seed.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMonitoring {
    /// Env `PERFORMANCE_MONITORING_INTERVAL`, ms. Default 10000.
    #[serde(default = "d_monitor_interval")]
    pub interval_ms: u64,
    /// Env `METRICS_RETENTION_HOURS`. Default 24.
    #[serde(default = "d_retention")]
    pub retention_hours: f64,
    /// Env `MAX_METRICS_STORED`. Default 1000.
    #[serde(default = "d_max_stored")]
    pub max_metrics_stored: usize,
    /// Alert thresholds; the seed's defaults.
    #[serde(default)]
    pub thresholds: crate::monitor::Thresholds,
}

impl Default for RawMonitoring {
    fn default() -> Self {
        Self {
            interval_ms: d_monitor_interval(),
            retention_hours: d_retention(),
            max_metrics_stored: d_max_stored(),
            thresholds: Default::default(),
        }
    }
}

/// `[[routes]]`: host + longest path prefix → pool.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    pub path_prefix: String,
    pub host: Option<String>,
    pub pool: String,
}

/// `[pools.NAME]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPool {
    /// round_robin | least_connections | least_matches | weighted. Default least_connections.
    #[serde(default = "d_strategy")]
    pub strategy: String,
    /// Default 1000.
    #[serde(default = "d_max_conn")]
    pub max_connections_per_server: u64,
    /// Default 100.
    #[serde(default = "d_max_matches")]
    pub max_matches_per_server: u64,
    /// Use servers that agents register for this pool (needs `[redis]`). Default false.
    #[serde(default)]
    pub discover: bool,
    #[serde(default)]
    pub match_id: Vec<RawMatchRule>,
    /// A match with no open connection is forgotten after this, ms. Default 30000.
    #[serde(default = "d_grace")]
    pub match_grace_ms: u64,
    pub sticky_cookie: Option<String>,
    pub health_check: Option<RawHealthCheck>,
    #[serde(default)]
    pub passive: RawPassive,
    #[serde(default)]
    pub backends: Vec<RawBackend>,
    /// TLS to this pool's servers. Absent: plain HTTP and WebSocket.
    pub backend_tls: Option<RawBackendTls>,
}

/// One `match_id` rule.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMatchRule {
    /// "path" | "query" | "header".
    pub from: String,
    /// For `path`: a path prefix with one `{id}` segment, e.g. "/matches/{id}".
    pub pattern: Option<String>,
    /// For `query` and `header`: the parameter or header name.
    pub name: Option<String>,
}

/// `health_check = { ... }`: active HTTP checks.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHealthCheck {
    #[serde(default = "d_health_path")]
    pub path: String,
    /// Default 30000 (env `LOAD_BALANCER_HEALTH_CHECK_INTERVAL`).
    #[serde(default = "d_health_interval")]
    pub interval_ms: u64,
    /// Default 2000.
    #[serde(default = "d_health_timeout")]
    pub timeout_ms: u64,
    /// Consecutive passes that make an unhealthy server healthy. Default 2.
    #[serde(default = "d_two")]
    pub healthy_threshold: u32,
    /// Consecutive failures that make a healthy server unhealthy. Default 3.
    #[serde(default = "d_three")]
    pub unhealthy_threshold: u32,
}

/// `passive = { ... }`: ejection on observed failures.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPassive {
    /// Consecutive connect failures that eject a server. Default 1.
    #[serde(default = "d_one")]
    pub connect_failures: u32,
    /// Consecutive 5xx responses that eject a server. Default 5; 0 disables.
    #[serde(default = "d_five")]
    pub consecutive_5xx: u32,
    /// First ejection, ms; doubles on each repeat up to `max_ejection_ms`. Default 5000.
    #[serde(default = "d_ejection")]
    pub ejection_ms: u64,
    /// Default 60000.
    #[serde(default = "d_max_ejection")]
    pub max_ejection_ms: u64,
    /// After an ejection the server takes a share of new traffic that grows
    /// linearly to the full share over this time, ms. Default 10000; 0 disables.
    #[serde(default = "d_slow_start")]
    pub slow_start_ms: u64,
}

impl Default for RawPassive {
    fn default() -> Self {
        Self {
            connect_failures: d_one(),
            consecutive_5xx: d_five(),
            ejection_ms: d_ejection(),
            max_ejection_ms: d_max_ejection(),
            slow_start_ms: d_slow_start(),
        }
    }
}

/// One static backend.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBackend {
    pub id: String,
    pub address: String,
    #[serde(default = "d_one")]
    pub weight: u32,
}

fn d_connect() -> u64 {
    3000
}
fn d_header() -> u64 {
    10_000
}
fn d_upstream() -> u64 {
    60_000
}
fn d_idle() -> u64 {
    60_000
}
fn d_tunnel_idle() -> u64 {
    3_600_000
}
fn d_drain() -> u64 {
    10_000
}
fn d_max_header() -> usize {
    32 * 1024
}
fn d_retries() -> u32 {
    2
}
fn d_forwarded() -> Vec<String> {
    [
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "forwarded",
    ]
    .map(String::from)
    .to_vec()
}
fn d_pool_idle() -> usize {
    256
}
fn d_admin_listen() -> String {
    "127.0.0.1:9901".into()
}
fn d_redis_timeout() -> u64 {
    500
}
fn d_reconcile() -> u64 {
    5000
}
fn d_prefix() -> String {
    "kp5".into()
}
fn d_level() -> String {
    "info".into()
}
fn d_format() -> String {
    "text".into()
}
fn d_true() -> bool {
    true
}
fn d_monitor_interval() -> u64 {
    10_000
}
fn d_retention() -> f64 {
    24.0
}
fn d_max_stored() -> usize {
    1000
}
fn d_strategy() -> String {
    "least_connections".into()
}
fn d_max_conn() -> u64 {
    1000
}
fn d_max_matches() -> u64 {
    100
}
fn d_grace() -> u64 {
    30_000
}
fn d_health_path() -> String {
    "/health".into()
}
fn d_health_interval() -> u64 {
    30_000
}
fn d_health_timeout() -> u64 {
    2000
}
fn d_one() -> u32 {
    1
}
fn d_two() -> u32 {
    2
}
fn d_three() -> u32 {
    3
}
fn d_five() -> u32 {
    5
}
fn d_ejection() -> u64 {
    5000
}
fn d_max_ejection() -> u64 {
    60_000
}
fn d_slow_start() -> u64 {
    10_000
}

fn d_tls_min() -> String {
    "1.2".into()
}
