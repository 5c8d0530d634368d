//! The bodies of the admin API's GET endpoints (documented in
//! docs/admin-api.md and docs/openapi.json).

use super::{error, json_response, Resp};
use crate::app::Shared;
use http::StatusCode;
use kp5_shared::wire::{Health, ServerStats};
use serde_json::json;
use std::sync::atomic::Ordering::Relaxed;

/// Every server of every pool, with its live and cluster-wide figures.
pub fn server_list(shared: &Shared) -> Vec<ServerStats> {
    let rt = shared.runtime.load();
    rt.pools
        .iter()
        .flat_map(|p| pool_servers(shared, p))
        .collect()
}

pub fn pool_servers(shared: &Shared, p: &crate::runtime::PoolRuntime) -> Vec<ServerStats> {
    let now = shared.clock.now_ms();
    p.servers
        .iter()
        .map(|u| {
            let s = &u.state;
            let agent = u.discovered || s.reported_connections().is_some();
            ServerStats {
                id: s.id.to_string(),
                pool: p.name.to_string(),
                address: u.address.to_string(),
                weight: u.weight,
                health: s.health(now),
                draining: s.draining.load(Relaxed),
                source: if u.discovered { "agent" } else { "static" }.into(),
                connections: s.connections.load(Relaxed),
                websockets: s.websockets.load(Relaxed),
                matches: s.matches.load(Relaxed),
                cluster_connections: s.cluster_connections(),
                cluster_matches: s.cluster_matches(),
                reported_connections: s.reported_connections(),
                reported_matches: s.reported_matches(),
                cpu: agent.then(|| s.cpu_permille.load(Relaxed) as f64 / 10.0),
                memory: agent.then(|| s.memory_permille.load(Relaxed) as f64 / 10.0),
                max_connections: u.max_connections,
                max_matches: u.max_matches,
                selections: s.selections.load(Relaxed),
                requests: s.requests.load(Relaxed),
                failures: s.failures.load(Relaxed),
            }
        })
        .collect()
}

pub fn stats(shared: &Shared) -> serde_json::Value {
    let rt = shared.runtime.load();
    let pools: Vec<_> = rt
        .pools
        .iter()
        .map(|p| {
            json!({ "name": &*p.name, "strategy": p.cfg.strategy.as_str(), "servers": pool_servers(shared, p) })
        })
        .collect();
    let c = &shared.counters;
    json!({
        "pools": pools,
        "totals": {
            "activeHttpConnections": c.connections_active.load(Relaxed),
            "activeWebsockets": c.websockets_active.load(Relaxed),
            "activeMatches": shared.affinity.len(),
            "noServer": c.no_capacity.load(Relaxed),
        }
    })
}

pub fn redis_status(shared: &Shared) -> serde_json::Value {
    let Some(c) = &shared.cluster else {
        return json!({ "configured": false, "connected": false, "mode": "embedded" });
    };
    let s = c.status();
    let n = &c.counters;
    json!({
        "configured": true,
        "connected": s.connected,
        "subscribed": s.subscribed,
        "mode": if s.connected { "redis" } else { "degraded" },
        "url": c.target.redacted_url(),
        "keyPrefix": c.keys.prefix(),
        "since": s.since,
        "lastError": s.last_error,
        "reconnects": n.reconnects.load(Relaxed),
        "errors": n.redis_errors.load(Relaxed),
        "eventsReceived": n.events.load(Relaxed),
        "reconciles": n.reconciles.load(Relaxed),
    })
}

/// `healthy` with every part working, `degraded` while Redis is away, no
/// server can take traffic, the last config was rejected, or a critical
/// alert is open.
pub fn health(shared: &Shared) -> Resp {
    json_response(StatusCode::OK, health_body(shared))
}

fn health_body(shared: &Shared) -> serde_json::Value {
    let servers = server_list(shared);
    let available = servers
        .iter()
        .filter(|s| s.health == Health::Healthy && !s.draining)
        .count();
    let redis_ok = shared.cluster.as_ref().is_none_or(|c| c.is_up());
    let config = shared.control().status();
    let alerts = shared.monitor.alerts();
    let open: Vec<_> = alerts.iter().filter(|a| a.status == "open").collect();
    let critical = open
        .iter()
        .filter(|a| a.severity == crate::monitor::Severity::Critical)
        .count();
    let mut problems = Vec::new();
    if !redis_ok {
        problems.push("redis unreachable: routing on the last-known registry; new matches placed by rendezvous hashing".to_owned());
    }
    if available == 0 {
        problems.push("no server can take new traffic".to_owned());
    }
    if let Some(e) = &config.last_error {
        problems.push(format!("config rejected ({}): {}", e.source, e.reason));
    }
    if critical > 0 {
        problems.push(format!("{critical} critical alert(s) open"));
    }
    let status = if problems.is_empty() {
        "healthy"
    } else {
        "degraded"
    };
    json!({
        "status": status,
        "problems": problems,
        "version": env!("CARGO_PKG_VERSION"),
        "uptimeSeconds": kp5_shared::wire::unix_ms().saturating_sub(shared.started_at) / 1000,
        "config": config,
        "redis": redis_status(shared),
        "servers": { "total": servers.len(), "available": available },
        "openAlerts": open.len(),
        "activeMatches": shared.affinity.len(),
    })
}

/// The config in effect and the last rejected one.
pub fn config_status(shared: &Shared) -> serde_json::Value {
    let path = shared
        .control()
        .config_path()
        .map(|p| p.display().to_string());
    json!({ "path": path, "status": shared.control().status(), "listening": shared.control().listening() })
}

pub fn distributed_status(shared: &Shared) -> serde_json::Value {
    let servers = server_list(shared);
    let registered = servers.iter().filter(|s| s.source == "agent").count();
    let (instance, counters) = match &shared.cluster {
        Some(c) => {
            let n = &c.counters;
            (
                Some(c.instance.clone()),
                json!({
                    "claimsWon": n.claims_won.load(Relaxed),
                    "claimsAdopted": n.claims_adopted.load(Relaxed),
                    "reassignments": n.reassignments.load(Relaxed),
                    "degradedPlacements": n.degraded_placements.load(Relaxed),
                }),
            )
        }
        None => (None, json!({})),
    };
    json!({
        "mode": match &shared.cluster { None => "embedded", Some(c) if c.is_up() => "redis", Some(_) => "degraded" },
        "proxyId": instance,
        "servers": servers.len(),
        "registeredServers": registered,
        "drainingServers": servers.iter().filter(|s| s.draining).count(),
        "clusterConnections": servers.iter().map(|s| s.cluster_connections).sum::<u64>(),
        "clusterMatches": servers.iter().map(|s| s.cluster_matches).sum::<u64>(),
        "localMatches": shared.affinity.len(),
        "matchClaims": counters,
    })
}

/// The owner of a match: from Redis when it is up, else from this proxy's
/// cache. `?pool=NAME` narrows the search to one pool.
pub async fn match_owner(shared: &Shared, id: &str, query: Option<&str>) -> Resp {
    let want = query.and_then(|q| {
        q.split('&')
            .find_map(|kv| kv.strip_prefix("pool="))
            .map(str::to_owned)
    });
    let pools: Vec<String> = {
        let rt = shared.runtime.load();
        rt.pools
            .iter()
            .map(|p| p.name.to_string())
            .filter(|n| want.as_ref().is_none_or(|w| w == n))
            .collect()
    };
    if pools.is_empty() {
        return error(StatusCode::NOT_FOUND, "no such pool");
    }
    for pool in &pools {
        if let Some(c) = shared.cluster.as_ref().filter(|c| c.is_up()) {
            let owner = c.owner(pool, id).await;
            let state = c.match_state(pool, id).await.unwrap_or_default();
            match owner {
                Ok(o) if o.is_some() || !state.is_empty() => {
                    let st = (!state.is_empty()).then(|| {
                        json!({
                            "version": state.get("version").and_then(|v| v.parse::<u64>().ok()),
                            "state": state.get("state").and_then(|s| serde_json::from_str::<serde_json::Value>(s).ok()),
                            "server": state.get("server"),
                            "updatedAt": state.get("updatedAt").and_then(|v| v.parse::<u64>().ok()),
                            "ended": state.contains_key("ended"),
                        })
                    });
                    return json_response(
                        StatusCode::OK,
                        json!({ "matchId": id, "pool": pool, "source": "redis", "owner": o, "state": st }),
                    );
                }
                Ok(_) => continue,
                Err(e) => c.note_error(&e),
            }
        }
        if let Some(s) = shared.affinity.owner(pool, id) {
            return json_response(
                StatusCode::OK,
                json!({ "matchId": id, "pool": pool, "source": "local", "owner": { "server": &*s.id } }),
            );
        }
    }
    error(StatusCode::NOT_FOUND, "unknown match")
}

fn round1(v: f64) -> f64 {
    (v * 10.0).round() / 10.0
}

fn pct(n: u64, of: u64) -> f64 {
    round1(n as f64 * 100.0 / of.max(1) as f64)
}

/// `GET /overview`: everything at a glance.
pub async fn overview(shared: &Shared) -> Resp {
    let t = thresholds(shared).await;
    let servers = server_list(shared);
    let alerts = shared.monitor.alerts();
    let open = alerts.iter().filter(|a| a.status == "open").count();
    let rt = shared.runtime.load();
    let c = &shared.counters;
    let status = health_body(shared);
    json_response(
        StatusCode::OK,
        json!({
            "status": status["status"],
            "problems": status["problems"],
            "version": env!("CARGO_PKG_VERSION"),
            "uptimeSeconds": kp5_shared::wire::unix_ms().saturating_sub(shared.started_at) / 1000,
            "mode": match &shared.cluster { None => "embedded", Some(c) if c.is_up() => "redis", Some(_) => "degraded" },
            "pools": rt.pools.iter().map(|p| json!({
                "name": &*p.name,
                "strategy": p.cfg.strategy.as_str(),
                "servers": p.servers.len(),
            })).collect::<Vec<_>>(),
            "servers": {
                "total": servers.len(),
                "available": servers.iter().filter(|s| s.health == Health::Healthy && !s.draining).count(),
                "draining": servers.iter().filter(|s| s.draining).count(),
                "unhealthy": servers.iter().filter(|s| s.health != Health::Healthy).count(),
            },
            "totals": {
                "clusterConnections": servers.iter().map(|s| s.cluster_connections).sum::<u64>(),
                "clusterMatches": servers.iter().map(|s| s.cluster_matches).sum::<u64>(),
                "activeWebsockets": c.websockets_active.load(Relaxed),
                "activeMatches": shared.affinity.len(),
                "requests": c.requests.iter().map(|r| r.load(Relaxed)).sum::<u64>(),
                "noServer": c.no_capacity.load(Relaxed),
            },
            "openAlerts": open,
            "recommendations": recommendation_list(shared, &t).len(),
            "config": shared.control().status(),
        }),
    )
}

/// `GET /loadbalancer/status`.
pub fn lb_status(shared: &Shared) -> serde_json::Value {
    let rt = shared.runtime.load();
    let now = shared.clock.now_ms();
    let pools: Vec<_> = rt
        .pools
        .iter()
        .map(|p| {
            let available = p.servers.iter().filter(|u| p.eligible(u, now, false)).count();
            json!({
                "name": &*p.name,
                "strategy": p.cfg.strategy.as_str(),
                "discover": p.cfg.discover,
                "servers": p.servers.len(),
                "available": available,
                "draining": p.servers.iter().filter(|u| u.state.draining.load(Relaxed)).count(),
                "unhealthy": p.servers.iter().filter(|u| u.state.health(now) != Health::Healthy).count(),
                "maxConnectionsPerServer": p.cfg.max_connections_per_server,
                "maxMatchesPerServer": p.cfg.max_matches_per_server,
                "healthCheck": p.cfg.health_check.as_ref().map(|h| json!({
                    "path": h.path.as_str(),
                    "intervalMs": h.interval.as_millis() as u64,
                    "timeoutMs": h.timeout.as_millis() as u64,
                })),
            })
        })
        .collect();
    let routes: Vec<_> = rt
        .config
        .routes
        .iter()
        .map(|r| json!({ "host": r.host, "pathPrefix": r.path_prefix, "pool": r.pool }))
        .collect();
    json!({
        "status": if rt.pools.iter().all(|p| p.servers.iter().any(|u| p.eligible(u, now, false))) { "ok" } else { "degraded" },
        "pools": pools,
        "routes": routes,
        "noServer": shared.counters.no_capacity.load(Relaxed),
    })
}

/// `GET /loadbalancer/metrics`: connection and match figures per server.
pub fn lb_metrics(shared: &Shared) -> serde_json::Value {
    let servers = server_list(shared);
    let latest = shared.monitor.latest();
    let rps = |id: &str| {
        latest
            .as_ref()
            .and_then(|s| s.servers.iter().find(|x| x.server == id))
            .map_or(0.0, |x| x.requests_per_second)
    };
    let per: Vec<_> = servers
        .iter()
        .map(|s| {
            json!({
                "id": s.id,
                "pool": s.pool,
                "connections": s.cluster_connections,
                "maxConnections": s.max_connections,
                "connectionUtilization": pct(s.cluster_connections, s.max_connections),
                "matches": s.cluster_matches,
                "maxMatches": s.max_matches,
                "matchUtilization": pct(s.cluster_matches, s.max_matches),
                "websockets": s.websockets,
                "requestsPerSecond": rps(&s.id),
            })
        })
        .collect();
    let conns: u64 = servers.iter().map(|s| s.cluster_connections).sum();
    let cap: u64 = servers.iter().map(|s| s.max_connections).sum();
    let matches: u64 = servers.iter().map(|s| s.cluster_matches).sum();
    let mcap: u64 = servers.iter().map(|s| s.max_matches).sum();
    json!({
        "totals": {
            "connections": conns,
            "connectionCapacity": cap,
            "connectionUtilization": pct(conns, cap),
            "matches": matches,
            "matchCapacity": mcap,
            "matchUtilization": pct(matches, mcap),
        },
        "servers": per,
    })
}

/// `GET /loadbalancer/config`: what the strategies run with now.
pub fn lb_config(shared: &Shared) -> serde_json::Value {
    let rt = shared.runtime.load();
    let pools: Vec<_> = rt
        .config
        .pools
        .iter()
        .map(|p| {
            json!({
                "pool": p.name,
                "strategy": p.strategy.as_str(),
                "maxConnectionsPerServer": p.max_connections_per_server,
                "maxMatchesPerServer": p.max_matches_per_server,
                "healthCheckInterval": p.health_check.as_ref().map(|h| h.interval.as_millis() as u64),
                "discover": p.discover,
            })
        })
        .collect();
    json!({ "pools": pools, "source": shared.control().status().applied_from })
}

/// Recommendations from the latest figures, each with the numbers behind it.
pub fn recommendation_list(
    shared: &Shared,
    t: &crate::monitor::Thresholds,
) -> Vec<serde_json::Value> {
    let servers = server_list(shared);
    let mut out = Vec::new();
    let usable: Vec<_> = servers
        .iter()
        .filter(|s| s.health == Health::Healthy && !s.draining)
        .collect();
    for s in &servers {
        let cu = pct(s.cluster_connections, s.max_connections);
        let mu = pct(s.cluster_matches, s.max_matches);
        if cu >= t.connection_utilization || mu >= t.match_utilization {
            let low_machine = s.cpu.is_some_and(|c| c < 50.0) && s.memory.is_some_and(|m| m < 50.0);
            out.push(json!({
                "type": "hot_server",
                "severity": "warning",
                "server": s.id,
                "message": format!(
                    "{} is hot: {cu}% of its connections and {mu}% of its matches in use (thresholds {}% / {}%)",
                    s.id, t.connection_utilization, t.match_utilization
                ),
                "figures": { "connections": s.cluster_connections, "maxConnections": s.max_connections, "connectionUtilization": cu, "matches": s.cluster_matches, "maxMatches": s.max_matches, "matchUtilization": mu, "cpu": s.cpu, "memory": s.memory },
            }));
            if low_machine {
                out.push(json!({
                    "type": "raise_limits",
                    "severity": "info",
                    "server": s.id,
                    "message": format!(
                        "{} is at its limits but its machine is not busy (CPU {:?}%, memory {:?}%): consider raising max_connections_per_server / max_matches_per_server",
                        s.id, s.cpu, s.memory
                    ),
                    "figures": { "connectionUtilization": cu, "matchUtilization": mu, "cpu": s.cpu, "memory": s.memory },
                }));
            }
        }
        for (name, v, limit) in [
            ("cpu", s.cpu, t.cpu_usage),
            ("memory", s.memory, t.memory_usage),
        ] {
            if let Some(v) = v.filter(|&v| v >= limit) {
                out.push(json!({
                    "type": "hot_machine",
                    "severity": "warning",
                    "server": s.id,
                    "message": format!("{}: {name} at {v}% (threshold {limit}%)", s.id),
                    "figures": { name: v, "threshold": limit },
                }));
            }
        }
    }
    if usable.len() >= 2 {
        let util = |s: &ServerStats| pct(s.cluster_connections, s.max_connections);
        let max = usable
            .iter()
            .max_by(|a, b| util(a).total_cmp(&util(b)))
            .expect("two servers");
        let min = usable
            .iter()
            .min_by(|a, b| util(a).total_cmp(&util(b)))
            .expect("two servers");
        let gap = round1(util(max) - util(min));
        if gap >= 30.0 && max.cluster_connections >= 10 {
            out.push(json!({
                "type": "imbalance",
                "severity": "info",
                "server": max.id,
                "message": format!(
                    "imbalance: {} at {}% of its connections, {} at {}% ({} points apart); check weights, long-lived matches and the strategy",
                    max.id, util(max), min.id, util(min), gap
                ),
                "figures": { "hottest": max.id, "hottestUtilization": util(max), "coolest": min.id, "coolestUtilization": util(min), "gap": gap },
            }));
        }
    }
    if !usable.is_empty() {
        let conns: u64 = usable.iter().map(|s| s.cluster_connections).sum();
        let cap: u64 = usable.iter().map(|s| s.max_connections).sum();
        let matches: u64 = usable.iter().map(|s| s.cluster_matches).sum();
        let mcap: u64 = usable.iter().map(|s| s.max_matches).sum();
        let (cu, mu) = (pct(conns, cap), pct(matches, mcap));
        if cu >= 70.0 || mu >= 70.0 {
            out.push(json!({
                "type": "scale_out",
                "severity": if cu >= t.connection_utilization || mu >= t.match_utilization { "warning" } else { "info" },
                "message": format!(
                    "add servers: the {} available servers are at {cu}% of their connections and {mu}% of their matches",
                    usable.len()
                ),
                "figures": { "availableServers": usable.len(), "connectionUtilization": cu, "matchUtilization": mu },
            }));
        }
    } else if !servers.is_empty() {
        out.push(json!({
            "type": "no_capacity",
            "severity": "critical",
            "message": "no server can take new traffic: every one is unhealthy or draining",
            "figures": { "servers": servers.len() },
        }));
    }
    out
}

/// Judged by the thresholds in effect (the cluster's, with Redis).
pub async fn recommendations(shared: &Shared) -> serde_json::Value {
    let t = thresholds(shared).await;
    json!({ "recommendations": recommendation_list(shared, &t), "thresholds": t })
}

/// The cluster's Redis when it is up (monitoring data lives there then).
fn cluster_up(shared: &Shared) -> Option<&crate::cluster::Cluster> {
    shared.cluster.as_deref().filter(|c| c.is_up())
}

/// Alerts: the cluster's with Redis, this proxy's without.
pub async fn alert_list(shared: &Shared) -> Vec<crate::monitor::Alert> {
    if let Some(c) = cluster_up(shared) {
        match c.alerts().await {
            Ok(mut v) => {
                v.sort_by(|a, b| {
                    (a.status != "open")
                        .cmp(&(b.status != "open"))
                        .then(b.updated_at.cmp(&a.updated_at))
                });
                return v;
            }
            Err(e) => c.note_error(&e),
        }
    }
    shared.monitor.alerts()
}

/// Thresholds in effect: set through any proxy's API (with Redis), or this
/// proxy's.
pub async fn thresholds(shared: &Shared) -> crate::monitor::Thresholds {
    if let Some(c) = cluster_up(shared) {
        match c.thresholds().await {
            Ok(Some(t)) => return t,
            Ok(None) => {}
            Err(e) => c.note_error(&e),
        }
    }
    shared.monitor.thresholds()
}

/// `POST /performance/alerts/:id/resolve`.
pub async fn resolve_alert(shared: &Shared, id: &str) -> Resp {
    let local = shared.monitor.resolve(id);
    if let Some(c) = cluster_up(shared) {
        match c.resolve_alert(id, kp5_shared::wire::unix_ms()).await {
            Ok(Some(a)) => return json_response(StatusCode::OK, json!({ "alert": a })),
            Ok(None) => {}
            Err(e) => c.note_error(&e),
        }
    }
    match local {
        Some(a) => json_response(StatusCode::OK, json!({ "alert": a })),
        None => error(StatusCode::NOT_FOUND, "unknown alert"),
    }
}

/// `GET /performance/status`.
pub async fn perf_status(shared: &Shared) -> serde_json::Value {
    let m = shared.runtime.load().config.monitoring.clone();
    let alerts = alert_list(shared).await;
    let (scope, stored) = match cluster_up(shared) {
        Some(c) => ("cluster", c.history_len().await.unwrap_or(0) as usize),
        None => ("proxy", shared.monitor.stored()),
    };
    let open = |sev| {
        alerts
            .iter()
            .filter(|a| a.status == "open" && a.severity == sev)
            .count()
    };
    use crate::monitor::Severity;
    json!({
        "enabled": true,
        "intervalMs": m.interval.as_millis() as u64,
        "retentionHours": m.retention_hours,
        "maxMetricsStored": m.max_metrics_stored,
        "scope": scope,
        "stored": stored,
        "lastSampleAt": shared.monitor.latest().map(|s| s.at),
        "openAlerts": { "warning": open(Severity::Warning), "error": open(Severity::Error), "critical": open(Severity::Critical) },
        "thresholds": thresholds(shared).await,
    })
}

fn query_param<'a>(query: Option<&'a str>, name: &str) -> Option<&'a str> {
    query?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == name).then_some(v)
    })
}

/// `GET /performance/metrics?hours=N` (default 1): the cluster's history
/// with Redis, this proxy's without.
pub async fn perf_metrics(shared: &Shared, query: Option<&str>) -> Resp {
    let hours = match query_param(query, "hours") {
        None => 1.0,
        Some(h) => match h.parse::<f64>() {
            Ok(v) if v > 0.0 && v <= 24.0 * 366.0 => v,
            _ => {
                return json_response(
                    StatusCode::BAD_REQUEST,
                    json!({ "error": "hours: must be a number above 0 (at most 8784)", "field": "hours", "status": 400 }),
                )
            }
        },
    };
    let since = kp5_shared::wire::unix_ms().saturating_sub((hours * 3_600_000.0) as u64);
    let history = match cluster_up(shared) {
        Some(c) => match c.history(since).await {
            Ok(h) => h,
            Err(e) => {
                c.note_error(&e);
                shared.monitor.history(hours)
            }
        },
        None => shared.monitor.history(hours),
    };
    let summary: Vec<_> = history
        .iter()
        .map(|snap| {
            let with = |f: fn(&crate::monitor::ServerSample) -> Option<f64>| {
                let v: Vec<f64> = snap.servers.iter().filter_map(f).collect();
                (!v.is_empty()).then(|| round1(v.iter().sum::<f64>() / v.len() as f64))
            };
            json!({
                "at": snap.at,
                "requestsPerSecond": round1(snap.servers.iter().map(|s| s.requests_per_second).sum::<f64>()),
                "responseTime": with(|s| s.response_time),
                "errorRate": with(|s| s.error_rate),
                "connectionUtilization": with(|s| Some(s.connection_utilization)),
                "matchUtilization": with(|s| Some(s.match_utilization)),
                "cpuUsage": with(|s| s.cpu_usage),
                "memoryUsage": with(|s| s.memory_usage),
            })
        })
        .collect();
    json_response(
        StatusCode::OK,
        json!({ "hours": hours, "count": history.len(), "summary": summary, "snapshots": history }),
    )
}

/// `GET /performance/alerts?status=open|resolved|all` (default all).
pub async fn alerts(shared: &Shared, query: Option<&str>) -> Resp {
    let want = query_param(query, "status").unwrap_or("all");
    if !matches!(want, "open" | "resolved" | "all") {
        return json_response(
            StatusCode::BAD_REQUEST,
            json!({ "error": "status: expected open, resolved or all", "field": "status", "status": 400 }),
        );
    }
    let list: Vec<_> = alert_list(shared)
        .await
        .into_iter()
        .filter(|a| want == "all" || a.status == want)
        .collect();
    json_response(
        StatusCode::OK,
        json!({ "count": list.len(), "alerts": list }),
    )
}

/// `GET /performance/matches/:matchId`: what the match's server reported
/// through its agent (`POST /v1/matches/:id/performance`), newest first.
pub async fn perf_match(shared: &Shared, id: &str) -> Resp {
    let Some(c) = shared.cluster.as_ref().filter(|c| c.is_up()) else {
        return error(
            StatusCode::NOT_FOUND,
            "unknown match (per-match performance needs Redis)",
        );
    };
    let pools: Vec<String> = shared
        .runtime
        .load()
        .pools
        .iter()
        .map(|p| p.name.to_string())
        .collect();
    for pool in pools {
        match c.match_performance(&pool, id).await {
            Ok(list) if !list.is_empty() => {
                let history: Vec<serde_json::Value> = list
                    .iter()
                    .filter_map(|s| serde_json::from_str(s).ok())
                    .collect();
                let avg = |k: &str| {
                    let v: Vec<f64> = history.iter().filter_map(|h| h[k].as_f64()).collect();
                    (!v.is_empty()).then(|| round1(v.iter().sum::<f64>() / v.len() as f64))
                };
                return json_response(
                    StatusCode::OK,
                    json!({
                        "matchId": id,
                        "pool": pool,
                        "latest": history.first(),
                        "averages": {
                            "participantCount": avg("participantCount"),
                            "eventsPerSecond": avg("eventsPerSecond"),
                            "averageLatency": avg("averageLatency"),
                        },
                        "count": history.len(),
                        "history": history,
                    }),
                );
            }
            Ok(_) => {}
            Err(e) => c.note_error(&e),
        }
    }
    error(
        StatusCode::NOT_FOUND,
        "unknown match: no performance reported",
    )
}

/// `GET /redis/info`: the Redis server's own figures.
pub async fn redis_info(shared: &Shared) -> Resp {
    let Some(c) = &shared.cluster else {
        return json_response(
            StatusCode::OK,
            json!({ "configured": false, "mode": "embedded" }),
        );
    };
    if !c.is_up() {
        return json_response(
            StatusCode::OK,
            json!({ "configured": true, "connected": false, "lastError": c.status().last_error }),
        );
    }
    match c.info().await {
        Ok(text) => {
            let fields: std::collections::BTreeMap<&str, &str> = text
                .lines()
                .filter_map(|l| l.trim().split_once(':'))
                .collect();
            let pick = |k: &str| fields.get(k).map(|v| v.to_string());
            let num = |k: &str| fields.get(k).and_then(|v| v.parse::<u64>().ok());
            let keyspace: std::collections::BTreeMap<&str, &str> = fields
                .iter()
                .filter(|(k, _)| k.starts_with("db"))
                .map(|(k, v)| (*k, *v))
                .collect();
            json_response(
                StatusCode::OK,
                json!({
                    "configured": true,
                    "connected": true,
                    "version": pick("redis_version"),
                    "mode": pick("redis_mode"),
                    "uptimeSeconds": num("uptime_in_seconds"),
                    "connectedClients": num("connected_clients"),
                    "usedMemoryBytes": num("used_memory"),
                    "usedMemoryHuman": pick("used_memory_human"),
                    "maxMemoryBytes": num("maxmemory"),
                    "opsPerSecond": num("instantaneous_ops_per_sec"),
                    "keyspace": keyspace,
                    "role": pick("role"),
                }),
            )
        }
        Err(e) => {
            c.note_error(&e);
            json_response(
                StatusCode::OK,
                json!({ "configured": true, "connected": false, "lastError": e.to_string() }),
            )
        }
    }
}

/// `GET /matches/:matchId/scaling`: where a match runs and how much room
/// its server has.
pub async fn match_scaling(shared: &Shared, id: &str) -> Resp {
    let rt = shared.runtime.load_full();
    let mut found: Option<(String, String, Option<u64>)> = None;
    for p in &rt.pools {
        if let Some(c) = shared.cluster.as_ref().filter(|c| c.is_up()) {
            if let Ok(Some(o)) = c.owner(&p.name, id).await {
                found = Some((p.name.to_string(), o.server, Some(o.token)));
                break;
            }
        }
        if let Some(s) = shared.affinity.owner(&p.name, id) {
            found = Some((p.name.to_string(), s.id.to_string(), None));
            break;
        }
    }
    let Some((pool_name, server, token)) = found else {
        return error(StatusCode::NOT_FOUND, "unknown match");
    };
    let now = shared.clock.now_ms();
    let pool = rt.pools.iter().find(|p| *p.name == pool_name);
    let u = pool.and_then(|p| p.find(&server));
    let Some((pool, u)) = pool.zip(u) else {
        return json_response(
            StatusCode::OK,
            json!({
                "matchId": id, "pool": pool_name, "server": server, "fencingToken": token,
                "serverKnown": false,
                "recommendation": "the owner is not in rotation here: the next connection of the match moves it",
            }),
        );
    };
    let s = &u.state;
    let cu = pct(s.cluster_connections(), u.max_connections);
    let mu = pct(s.cluster_matches(), u.max_matches);
    let t = thresholds(shared).await;
    let recommendation = if !s.alive(now) {
        "the server is down: the next connection of the match moves it to a live one".to_owned()
    } else if s.draining.load(Relaxed) {
        "the server is draining: the match stays until it ends; no new matches go there".to_owned()
    } else if cu >= t.connection_utilization {
        format!("the server is at {cu}% of its connections: new connections of this match may be refused; add capacity or raise its limit")
    } else {
        "the server has room for this match".to_owned()
    };
    json_response(
        StatusCode::OK,
        json!({
            "matchId": id,
            "pool": pool_name,
            "server": server,
            "fencingToken": token,
            "serverKnown": true,
            "health": s.health(now),
            "draining": s.draining.load(Relaxed),
            "connections": s.cluster_connections(),
            "maxConnections": u.max_connections,
            "connectionUtilization": cu,
            "matches": s.cluster_matches(),
            "maxMatches": u.max_matches,
            "matchUtilization": mu,
            "canAcceptConnections": s.alive(now) && pool.has_room(u),
            "recommendation": recommendation,
        }),
    )
}
