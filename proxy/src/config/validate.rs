//! Stage two: every cross-field rule, turning [`RawConfig`] into [`Config`].

use super::raw::*;
use super::*;
use std::collections::HashSet;

pub(super) fn build(raw: RawConfig) -> Result<Config, ConfigError> {
    let proxy = proxy_settings(&raw.proxy)?;
    let admin = admin_settings(&raw.admin)?;
    let redis = raw.redis.as_ref().map(redis_settings).transpose()?;
    let log = log_settings(&raw.log)?;
    let monitoring = MonitoringSettings {
        interval: positive_ms("monitoring.interval_ms", raw.monitoring.interval_ms)?,
        retention_hours: raw.monitoring.retention_hours,
        max_metrics_stored: raw.monitoring.max_metrics_stored,
        thresholds: raw.monitoring.thresholds.clone(),
    };
    if monitoring.max_metrics_stored == 0 {
        return Err(ConfigError::invalid(
            "monitoring.max_metrics_stored",
            "must be at least 1",
        ));
    }
    if !(monitoring.retention_hours > 0.0 && monitoring.retention_hours <= 24.0 * 366.0) {
        return Err(ConfigError::invalid(
            "monitoring.retention_hours",
            format!(
                "{} must be above 0 (and at most 8784)",
                monitoring.retention_hours
            ),
        ));
    }
    monitoring
        .thresholds
        .check()
        .map_err(|(f, m)| ConfigError::invalid(format!("monitoring.thresholds.{f}"), m))?;

    if raw.pools.is_empty() {
        return Err(ConfigError::invalid(
            "pools",
            "at least one pool is required",
        ));
    }
    let mut server_ids = HashSet::new();
    let mut pools = Vec::with_capacity(raw.pools.len());
    for (name, p) in &raw.pools {
        pools.push(Arc::new(pool(name, p, redis.is_some(), &mut server_ids)?));
    }

    if raw.routes.is_empty() {
        return Err(ConfigError::invalid(
            "routes",
            "at least one [[routes]] entry is required",
        ));
    }
    let mut routes = Vec::with_capacity(raw.routes.len());
    let mut seen = HashSet::new();
    for (i, r) in raw.routes.iter().enumerate() {
        let field = |k: &str| format!("routes[{i}].{k}");
        if !r.path_prefix.starts_with('/') {
            return Err(ConfigError::invalid(
                field("path_prefix"),
                format!("{:?} must start with '/'", r.path_prefix),
            ));
        }
        if !raw.pools.contains_key(&r.pool) {
            return Err(ConfigError::invalid(
                field("pool"),
                format!("no pool named {:?} (see [pools.*])", r.pool),
            ));
        }
        let host = r.host.as_ref().map(|h| h.to_ascii_lowercase());
        if let Some(h) = &host {
            if h.is_empty() || h.contains('/') {
                return Err(ConfigError::invalid(
                    field("host"),
                    format!("{h:?} is not a host name"),
                ));
            }
        }
        if !seen.insert((host.clone(), r.path_prefix.clone())) {
            return Err(ConfigError::invalid(
                field("path_prefix"),
                format!(
                    "duplicate route for host {:?} and prefix {:?}",
                    host, r.path_prefix
                ),
            ));
        }
        routes.push(Route {
            host,
            path_prefix: r.path_prefix.clone(),
            pool: r.pool.clone(),
        });
    }
    routes.sort_by(|a, b| {
        b.path_prefix
            .len()
            .cmp(&a.path_prefix.len())
            .then(b.host.is_some().cmp(&a.host.is_some()))
    });

    Ok(Config {
        proxy,
        admin,
        redis,
        log,
        monitoring,
        routes,
        pools,
    })
}

fn socket_addr(field: &str, s: &str) -> Result<SocketAddr, ConfigError> {
    s.parse().map_err(|_| {
        ConfigError::invalid(
            field,
            format!("{s:?} is not an address of the form IP:PORT (e.g. \"127.0.0.1:8080\")"),
        )
    })
}

/// The longest duration taken, in ms: a year (`clock::LONGEST`).
const MAX_MS: u64 = crate::clock::LONGEST.as_millis() as u64;

/// A timeout: more than 0, at most a year.
fn positive_ms(field: &str, v: u64) -> Result<Duration, ConfigError> {
    if v == 0 {
        return Err(ConfigError::invalid(field, "must be greater than 0"));
    }
    ms_to_a_year(field, v)
}

/// A duration where 0 means "none" (drain, grace, slow start): at most a
/// year.
fn ms_to_a_year(field: &str, v: u64) -> Result<Duration, ConfigError> {
    if v > MAX_MS {
        return Err(ConfigError::invalid(
            field,
            format!("must be at most {MAX_MS} (a year)"),
        ));
    }
    Ok(Duration::from_millis(v))
}

fn proxy_settings(p: &RawProxy) -> Result<ProxySettings, ConfigError> {
    if p.listen.is_empty() && p.tls.as_ref().is_none_or(|t| t.listen.is_empty()) {
        return Err(ConfigError::invalid(
            "proxy.listen",
            "at least one listen address (here or in [proxy.tls]) is required",
        ));
    }
    let mut listen = Vec::with_capacity(p.listen.len());
    for (i, l) in p.listen.iter().enumerate() {
        let addr = socket_addr(&format!("proxy.listen[{i}]"), l)?;
        if listen.contains(&addr) {
            return Err(ConfigError::invalid(
                format!("proxy.listen[{i}]"),
                format!("{l:?} is listed twice"),
            ));
        }
        listen.push(addr);
    }
    let tls = p
        .tls
        .as_ref()
        .map(|t| tls_settings(t, &listen))
        .transpose()?;
    if p.worker_threads == Some(0) {
        return Err(ConfigError::invalid(
            "proxy.worker_threads",
            "must be at least 1",
        ));
    }
    if p.max_header_bytes < 8192 {
        return Err(ConfigError::invalid(
            "proxy.max_header_bytes",
            format!("{} is below the minimum of 8192", p.max_header_bytes),
        ));
    }
    Ok(ProxySettings {
        listen,
        worker_threads: p.worker_threads,
        connect_timeout: positive_ms("proxy.connect_timeout_ms", p.connect_timeout_ms)?,
        header_read_timeout: positive_ms("proxy.header_read_timeout_ms", p.header_read_timeout_ms)?,
        upstream_timeout: positive_ms("proxy.upstream_timeout_ms", p.upstream_timeout_ms)?,
        idle_timeout: positive_ms("proxy.idle_timeout_ms", p.idle_timeout_ms)?,
        tunnel_idle_timeout: positive_ms("proxy.tunnel_idle_timeout_ms", p.tunnel_idle_timeout_ms)?,
        send_timeout: positive_ms("proxy.send_timeout_ms", p.send_timeout_ms)?,
        drain_timeout: ms_to_a_year("proxy.drain_timeout_ms", p.drain_timeout_ms)?,
        max_header_bytes: p.max_header_bytes,
        retries: p.retries,
        upstream_keepalive: p.upstream_keepalive,
        upstream_idle_timeout: positive_ms(
            "proxy.upstream_idle_timeout_ms",
            p.upstream_idle_timeout_ms,
        )?,
        forwarded: forwarded_headers(&p.forwarded_headers)?,
        tls,
    })
}

fn forwarded_headers(names: &[String]) -> Result<ForwardedHeaders, ConfigError> {
    let mut f = ForwardedHeaders::default();
    for (i, name) in names.iter().enumerate() {
        let slot = match name.to_ascii_lowercase().as_str() {
            "x-forwarded-for" => &mut f.x_forwarded_for,
            "x-forwarded-proto" => &mut f.x_forwarded_proto,
            "x-forwarded-host" => &mut f.x_forwarded_host,
            "forwarded" => &mut f.forwarded,
            "x-real-ip" => &mut f.x_real_ip,
            _ => {
                return Err(ConfigError::invalid(
                    format!("proxy.forwarded_headers[{i}]"),
                    format!(
                        "{name:?} is not one of \"x-forwarded-for\", \"x-forwarded-proto\", \"x-forwarded-host\", \"forwarded\", \"x-real-ip\""
                    ),
                ))
            }
        };
        if std::mem::replace(slot, true) {
            return Err(ConfigError::invalid(
                format!("proxy.forwarded_headers[{i}]"),
                format!("{name:?} is listed twice"),
            ));
        }
    }
    Ok(f)
}

fn tls_settings(t: &RawTls, plain: &[SocketAddr]) -> Result<TlsSettings, ConfigError> {
    if t.listen.is_empty() {
        return Err(ConfigError::invalid(
            "proxy.tls.listen",
            "at least one listen address is required",
        ));
    }
    let mut listen: Vec<SocketAddr> = Vec::with_capacity(t.listen.len());
    for (i, l) in t.listen.iter().enumerate() {
        let field = format!("proxy.tls.listen[{i}]");
        let addr = socket_addr(&field, l)?;
        // port 0 (any free port, in tests) may appear in both lists
        if listen.contains(&addr) || (addr.port() != 0 && plain.contains(&addr)) {
            return Err(ConfigError::invalid(
                field,
                format!("{l:?} is already a listen address"),
            ));
        }
        listen.push(addr);
    }
    if t.certs.is_empty() {
        return Err(ConfigError::invalid(
            "proxy.tls.certs",
            "at least one { cert, key } pair is required",
        ));
    }
    let mut certs = Vec::with_capacity(t.certs.len());
    for (i, c) in t.certs.iter().enumerate() {
        for (k, v) in [("cert", &c.cert), ("key", &c.key)] {
            if v.trim().is_empty() {
                return Err(ConfigError::invalid(
                    format!("proxy.tls.certs[{i}].{k}"),
                    "a file path is required",
                ));
            }
        }
        let mut names = Vec::new();
        for (j, n) in c.names.iter().flatten().enumerate() {
            let n = n.trim().to_ascii_lowercase();
            let label = n.strip_prefix("*.").unwrap_or(&n);
            if label.is_empty() || label.contains('*') || label.contains(char::is_whitespace) {
                return Err(ConfigError::invalid(
                    format!("proxy.tls.certs[{i}].names[{j}]"),
                    format!("{n:?} is not a host name (\"*.\" may only start one)"),
                ));
            }
            names.push(n);
        }
        certs.push(CertFiles {
            cert: PathBuf::from(&c.cert),
            key: PathBuf::from(&c.key),
            names,
        });
    }
    let tls13_only = match t.min_version.trim() {
        "1.2" => false,
        "1.3" => true,
        other => {
            return Err(ConfigError::invalid(
                "proxy.tls.min_version",
                format!(
                    "{other:?}: expected \"1.2\" or \"1.3\" (older versions are not supported)"
                ),
            ))
        }
    };
    Ok(TlsSettings {
        listen,
        certs,
        tls13_only,
        http2: t.http2,
    })
}

fn admin_settings(a: &RawAdmin) -> Result<AdminSettings, ConfigError> {
    let listen = socket_addr("admin.listen", &a.listen)?;
    let token = a.token.clone().filter(|t| !t.is_empty());
    if token.is_none() && !listen.ip().is_loopback() {
        return Err(ConfigError::invalid(
            "admin.token",
            format!(
                "required when admin.listen ({listen}) is not a loopback address; set it or KP5_ADMIN_TOKEN"
            ),
        ));
    }
    Ok(AdminSettings { listen, token })
}

fn redis_settings(r: &RawRedis) -> Result<RedisSettings, ConfigError> {
    kp5_shared::redis::check_url(&r.url).map_err(|m| ConfigError::invalid("redis.url", m))?;
    kp5_shared::redis::check_key_prefix(&r.key_prefix)
        .map_err(|m| ConfigError::invalid("redis.key_prefix", m))?;
    if !(10..=60_000).contains(&r.timeout_ms) {
        return Err(ConfigError::invalid(
            "redis.timeout_ms",
            format!("{} is outside 10..=60000", r.timeout_ms),
        ));
    }
    if !(100..=3_600_000).contains(&r.reconcile_interval_ms) {
        return Err(ConfigError::invalid(
            "redis.reconcile_interval_ms",
            format!("{} is outside 100..=3600000", r.reconcile_interval_ms),
        ));
    }
    Ok(RedisSettings {
        target: kp5_shared::redis::RedisTarget {
            url: r.url.clone(),
            password: r.password.clone(),
            db: r.db,
            timeout: Duration::from_millis(r.timeout_ms),
        },
        key_prefix: r.key_prefix.clone(),
        reconcile_interval: Duration::from_millis(r.reconcile_interval_ms),
    })
}

fn log_settings(l: &RawLog) -> Result<LogSettings, ConfigError> {
    let json = match l.format.as_str() {
        "text" => false,
        "json" => true,
        other => {
            return Err(ConfigError::invalid(
                "log.format",
                format!("{other:?}: expected \"text\" or \"json\""),
            ))
        }
    };
    Ok(LogSettings {
        level: l.level.clone(),
        json,
        access_log: l.access_log,
    })
}

fn pool(
    name: &str,
    p: &RawPool,
    has_redis: bool,
    server_ids: &mut HashSet<String>,
) -> Result<Pool, ConfigError> {
    let field = |k: &str| format!("pools.{name}.{k}");
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err(ConfigError::invalid(
            format!("pools.{name:?}"),
            "a pool name uses letters, digits, '-', '_' and '.' only",
        ));
    }
    let strategy = StrategyKind::parse(&p.strategy).ok_or_else(|| {
        ConfigError::invalid(
            field("strategy"),
            format!(
                "unknown strategy {:?}; expected one of {}",
                p.strategy,
                StrategyKind::NAMES
            ),
        )
    })?;
    if p.max_connections_per_server == 0 {
        return Err(ConfigError::invalid(
            field("max_connections_per_server"),
            "must be at least 1",
        ));
    }
    if p.max_matches_per_server == 0 {
        return Err(ConfigError::invalid(
            field("max_matches_per_server"),
            "must be at least 1",
        ));
    }
    if p.discover && !has_redis {
        return Err(ConfigError::invalid(
            field("discover"),
            "discovery needs a [redis] section (or REDIS_URL)",
        ));
    }
    if p.backends.is_empty() && !p.discover {
        return Err(ConfigError::invalid(
            field("backends"),
            "a pool needs static backends or discover = true",
        ));
    }

    let mut match_id = Vec::with_capacity(p.match_id.len());
    for (i, r) in p.match_id.iter().enumerate() {
        match_id.push(match_rule(&format!("pools.{name}.match_id[{i}]"), r)?);
    }

    if let Some(c) = &p.sticky_cookie {
        let ok = !c.is_empty()
            && c.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
        if !ok {
            return Err(ConfigError::invalid(
                field("sticky_cookie"),
                format!("{c:?} is not a valid cookie name"),
            ));
        }
    }

    let health_check = p
        .health_check
        .as_ref()
        .map(|h| -> Result<HealthCheck, ConfigError> {
            let path = h
                .path
                .parse::<http::uri::PathAndQuery>()
                .ok()
                .filter(|_| h.path.starts_with('/'))
                .ok_or_else(|| {
                    ConfigError::invalid(
                        field("health_check.path"),
                        format!("{:?} is not a path", h.path),
                    )
                })?;
            let interval = positive_ms(&field("health_check.interval_ms"), h.interval_ms)?;
            let timeout = positive_ms(&field("health_check.timeout_ms"), h.timeout_ms)?;
            if h.healthy_threshold == 0 || h.unhealthy_threshold == 0 {
                return Err(ConfigError::invalid(
                    field("health_check"),
                    "healthy_threshold and unhealthy_threshold must be at least 1",
                ));
            }
            Ok(HealthCheck {
                path,
                interval,
                timeout,
                healthy_threshold: h.healthy_threshold,
                unhealthy_threshold: h.unhealthy_threshold,
            })
        })
        .transpose()?;

    let passive = Passive {
        connect_failures: p.passive.connect_failures,
        consecutive_5xx: p.passive.consecutive_5xx,
        ejection: ms_to_a_year(&field("passive.ejection_ms"), p.passive.ejection_ms)?,
        max_ejection: ms_to_a_year(
            &field("passive.max_ejection_ms"),
            p.passive.max_ejection_ms.max(p.passive.ejection_ms),
        )?,
        slow_start: ms_to_a_year(&field("passive.slow_start_ms"), p.passive.slow_start_ms)?,
    };

    let mut backends = Vec::with_capacity(p.backends.len());
    for (i, b) in p.backends.iter().enumerate() {
        let bf = |k: &str| format!("pools.{name}.backends[{i}].{k}");
        if b.id.is_empty() || b.id.len() > 128 || !b.id.bytes().all(|c| c.is_ascii_graphic()) {
            return Err(ConfigError::invalid(
                bf("id"),
                format!("{:?} must be 1-128 visible ASCII characters", b.id),
            ));
        }
        if !server_ids.insert(b.id.clone()) {
            return Err(ConfigError::invalid(
                bf("id"),
                format!("duplicate server id {:?}", b.id),
            ));
        }
        let address = parse_authority(&b.address).ok_or_else(|| {
            ConfigError::invalid(
                bf("address"),
                format!("{:?} is not HOST:PORT (e.g. \"127.0.0.1:3001\")", b.address),
            )
        })?;
        if b.weight == 0 || b.weight > 1000 {
            return Err(ConfigError::invalid(
                bf("weight"),
                format!("{} is outside 1..=1000", b.weight),
            ));
        }
        backends.push(Backend {
            id: b.id.clone(),
            address,
            weight: b.weight,
        });
    }

    Ok(Pool {
        name: name.to_owned(),
        strategy,
        max_connections_per_server: p.max_connections_per_server,
        max_matches_per_server: p.max_matches_per_server,
        discover: p.discover,
        match_id,
        match_grace: ms_to_a_year(&field("match_grace_ms"), p.match_grace_ms)?,
        sticky_cookie: p.sticky_cookie.clone(),
        health_check,
        passive,
        backends,
        backend_tls: match &p.backend_tls {
            None => None,
            Some(t) => Some(BackendTls {
                ca: t.ca.as_ref().map(PathBuf::from),
                server_name: match &t.server_name {
                    Some(n) if rustls_pki_types::ServerName::try_from(n.as_str()).is_err() => {
                        return Err(ConfigError::invalid(
                            format!("pools.{name}.backend_tls.server_name"),
                            format!("{n:?} is not a DNS name or IP address"),
                        ))
                    }
                    other => other.clone(),
                },
            }),
        },
    })
}

/// `host:port` with an explicit, non-zero port.
pub(crate) fn parse_authority(s: &str) -> Option<http::uri::Authority> {
    let a: http::uri::Authority = s.parse().ok()?;
    if a.as_str().contains('@') || a.host().is_empty() {
        return None;
    }
    match a.port_u16() {
        Some(p) if p != 0 => Some(a),
        _ => None,
    }
}

fn match_rule(field: &str, r: &RawMatchRule) -> Result<MatchRule, ConfigError> {
    match r.from.as_str() {
        "path" => {
            let pattern = r.pattern.as_deref().ok_or_else(|| {
                ConfigError::invalid(format!("{field}.pattern"), "required when from = \"path\"")
            })?;
            let bad = |m: &str| {
                ConfigError::invalid(format!("{field}.pattern"), format!("{pattern:?}: {m}"))
            };
            if !pattern.starts_with('/') {
                return Err(bad("must start with '/'"));
            }
            if pattern.matches("{id}").count() != 1 {
                return Err(bad("must contain {id} exactly once"));
            }
            let (prefix, suffix) = pattern.split_once("{id}").unwrap_or((pattern, ""));
            if !prefix.ends_with('/') || !(suffix.is_empty() || suffix.starts_with('/')) {
                return Err(bad("{id} must be a whole path segment"));
            }
            Ok(MatchRule::Path {
                prefix: prefix.to_owned(),
                suffix: suffix.to_owned(),
            })
        }
        "query" => {
            let name = r.name.as_deref().filter(|n| !n.is_empty()).ok_or_else(|| {
                ConfigError::invalid(format!("{field}.name"), "required when from = \"query\"")
            })?;
            Ok(MatchRule::Query {
                name: name.to_owned(),
            })
        }
        "header" => {
            let name = r.name.as_deref().unwrap_or_default();
            let name = http::HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
                ConfigError::invalid(
                    format!("{field}.name"),
                    format!("{name:?} is not a header name"),
                )
            })?;
            Ok(MatchRule::Header { name })
        }
        other => Err(ConfigError::invalid(
            format!("{field}.from"),
            format!("{other:?}: expected \"path\", \"query\" or \"header\""),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kp5_shared::MapEnv;

    const GOOD: &str = r#"
[proxy]
listen = ["127.0.0.1:8080"]
[[routes]]
path_prefix = "/"
pool = "matches"
[pools.matches]
strategy = "least_matches"
match_id = [
  { from = "path", pattern = "/matches/{id}" },
  { from = "query", name = "matchId" },
  { from = "header", name = "x-match-id" },
]
sticky_cookie = "kp5_srv"
health_check = { path = "/health", interval_ms = 1000, timeout_ms = 500 }
backends = [
  { id = "server-1", address = "127.0.0.1:3001", weight = 2 },
  { id = "server-2", address = "localhost:3002" },
]
"#;

    fn err(text: &str) -> String {
        Config::from_toml(text, &MapEnv::new())
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn good_config_builds() {
        let c = Config::from_toml(GOOD, &MapEnv::new()).unwrap();
        let p = c.pool("matches").unwrap();
        assert_eq!(p.strategy, StrategyKind::LeastMatches);
        assert_eq!(p.backends.len(), 2);
        assert_eq!(p.backends[0].weight, 2);
        assert_eq!(p.backends[1].weight, 1);
        assert_eq!(
            p.match_id[0],
            MatchRule::Path {
                prefix: "/matches/".into(),
                suffix: String::new()
            }
        );
        assert_eq!(c.admin.listen.to_string(), "127.0.0.1:9901");
    }

    #[test]
    fn errors_name_the_field() {
        let e = err(&GOOD.replace("least_matches", "fastest"));
        assert!(
            e.contains("pools.matches.strategy") && e.contains("fastest"),
            "{e}"
        );
        let e = err(&GOOD.replace("127.0.0.1:3001", "nowhere"));
        assert!(e.contains("pools.matches.backends[0].address"), "{e}");
        let e = err(&GOOD.replace("server-2", "server-1"));
        assert!(e.contains("duplicate server id"), "{e}");
        let e = err(&GOOD.replace("/matches/{id}", "/matches/x{id}"));
        assert!(e.contains("match_id[0].pattern"), "{e}");
        let e = err(&GOOD.replace("pool = \"matches\"", "pool = \"nope\""));
        assert!(e.contains("routes[0].pool"), "{e}");
        let e = err(&GOOD.replace("[proxy]", "[proxy]\nlisten_typo = 1"));
        assert!(e.contains("listen_typo") && e.contains("line"), "{e}");
        let e = err(&GOOD.replace("listen = [\"127.0.0.1:8080\"]", "listen = [\"8080\"]"));
        assert!(e.contains("proxy.listen[0]"), "{e}");
    }

    #[test]
    fn timeouts_are_positive_and_at_most_a_year() {
        let with = |v: &str| GOOD.replace("[proxy]", &format!("[proxy]\nidle_timeout_ms = {v}"));
        let e = err(&with("0"));
        assert!(
            e.contains("proxy.idle_timeout_ms") && e.contains("greater than 0"),
            "{e}"
        );
        // refused with the field's name
        let too_long = |text: &str, field: &str| {
            let e = err(text);
            assert!(e.contains(field) && e.contains("a year"), "{e}");
        };
        too_long(&with("9223372036854775807"), "proxy.idle_timeout_ms");
        let c = Config::from_toml(&with("31536000000"), &MapEnv::new()).unwrap();
        assert_eq!(c.proxy.idle_timeout, Duration::from_secs(365 * 86_400));
        // durations where 0 means none: 0 is taken, more than a year is not
        let c = Config::from_toml(
            &GOOD.replace("[proxy]", "[proxy]\ndrain_timeout_ms = 0"),
            &MapEnv::new(),
        )
        .unwrap();
        assert_eq!(c.proxy.drain_timeout, Duration::ZERO);
        too_long(
            &GOOD.replace("[proxy]", "[proxy]\ndrain_timeout_ms = 31536000001"),
            "proxy.drain_timeout_ms",
        );
        let in_pool =
            |line: &str| GOOD.replace("sticky_cookie = ", &format!("{line}\nsticky_cookie = "));
        too_long(
            &in_pool("match_grace_ms = 9223372036854775807"),
            "pools.matches.match_grace_ms",
        );
        too_long(
            &in_pool("passive = { ejection_ms = 9223372036854775807 }"),
            "pools.matches.passive.ejection_ms",
        );
    }

    #[test]
    fn forwarded_headers_default_to_four_and_are_checked() {
        let c = Config::from_toml(GOOD, &MapEnv::new()).unwrap();
        let f = c.proxy.forwarded;
        assert!(f.x_forwarded_for && f.x_forwarded_proto && f.x_forwarded_host && f.forwarded);
        assert!(!f.x_real_ip);
        let with =
            |list: &str| GOOD.replace("[proxy]", &format!("[proxy]\nforwarded_headers = {list}"));
        let c = Config::from_toml(&with(r#"["X-Real-IP", "x-forwarded-for"]"#), &MapEnv::new())
            .unwrap();
        let f = c.proxy.forwarded;
        assert!(f.x_real_ip && f.x_forwarded_for && !f.forwarded && !f.x_forwarded_proto);
        let c = Config::from_toml(&with("[]"), &MapEnv::new()).unwrap();
        assert_eq!(c.proxy.forwarded, ForwardedHeaders::default());
        let e = err(&with(r#"["x-forwarded-for", "x-client-ip"]"#));
        assert!(
            e.contains("proxy.forwarded_headers[1]") && e.contains("x-client-ip"),
            "{e}"
        );
        let e = err(&with(r#"["forwarded", "Forwarded"]"#));
        assert!(
            e.contains("proxy.forwarded_headers[1]") && e.contains("twice"),
            "{e}"
        );
    }

    #[test]
    fn monitoring_retention_takes_whole_and_fractional_hours() {
        let c = Config::from_toml(
            &format!("{GOOD}\n[monitoring]\nretention_hours = 2\n"),
            &MapEnv::new(),
        )
        .unwrap();
        assert_eq!(c.monitoring.retention_hours, 2.0);
        let c = Config::from_toml(
            &format!("{GOOD}\n[monitoring]\nretention_hours = 0.5\n"),
            &MapEnv::new(),
        )
        .unwrap();
        assert_eq!(c.monitoring.retention_ms(), 1_800_000);
        let e = Config::from_toml(
            &format!("{GOOD}\n[monitoring]\nretention_hours = 0\n"),
            &MapEnv::new(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("monitoring.retention_hours"), "{e}");
    }

    #[test]
    fn admin_off_loopback_needs_token() {
        let text = format!("{GOOD}\n[admin]\nlisten = \"0.0.0.0:9901\"\n");
        assert!(err(&text).contains("admin.token"));
        let env = MapEnv::new().with("KP5_ADMIN_TOKEN", "s3cret");
        let c = Config::from_toml(&text, &env).unwrap();
        assert_eq!(c.admin.token.as_deref(), Some("s3cret"));
    }

    #[test]
    fn seed_environment_overrides_every_pool() {
        let env = MapEnv::new()
            .with("MAX_CONNECTIONS_PER_SERVER", "7")
            .with("MAX_MATCHES_PER_SERVER", "3")
            .with("LOAD_BALANCING_STRATEGY", "round_robin")
            .with("LOAD_BALANCER_HEALTH_CHECK_INTERVAL", "250")
            .with("METRICS_RETENTION_HOURS", "2")
            .with("LOG_LEVEL", "debug");
        let c = Config::from_toml(GOOD, &env).unwrap();
        let p = c.pool("matches").unwrap();
        assert_eq!(p.max_connections_per_server, 7);
        assert_eq!(p.max_matches_per_server, 3);
        assert_eq!(p.strategy, StrategyKind::RoundRobin);
        assert_eq!(
            p.health_check.as_ref().unwrap().interval,
            Duration::from_millis(250)
        );
        assert_eq!(c.monitoring.retention_hours, 2.0);
        assert_eq!(c.log.level, "debug");

        let bad = MapEnv::new().with("MAX_MATCHES_PER_SERVER", "many");
        let e = Config::from_toml(GOOD, &bad).unwrap_err().to_string();
        assert!(e.contains("MAX_MATCHES_PER_SERVER"), "{e}");
        let bad = MapEnv::new().with("LOAD_BALANCING_STRATEGY", "random");
        let e = Config::from_toml(GOOD, &bad).unwrap_err().to_string();
        assert!(e.contains("LOAD_BALANCING_STRATEGY"), "{e}");
    }

    #[test]
    fn routes_sort_longest_prefix_first() {
        let text = GOOD.replace(
            "[[routes]]\npath_prefix = \"/\"\npool = \"matches\"",
            "[[routes]]\npath_prefix = \"/\"\npool = \"matches\"\n[[routes]]\npath_prefix = \"/api\"\npool = \"matches\"\n[[routes]]\npath_prefix = \"/api\"\nhost = \"A.example\"\npool = \"matches\"",
        );
        let c = Config::from_toml(&text, &MapEnv::new()).unwrap();
        assert_eq!(c.routes[0].host.as_deref(), Some("a.example"));
        assert_eq!(c.routes[1].path_prefix, "/api");
        assert_eq!(c.routes[2].path_prefix, "/");
    }
}
