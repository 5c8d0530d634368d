//! The admin listener: `/healthz` (liveness, no auth), `/metrics`
//! (Prometheus text) and `/api/scaling/*` behind the bearer token. The rest
//! of the seed's admin API builds on this router.

use crate::app::Shared;
use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use kp5_shared::wire::ServerStats;
use serde_json::json;
use std::convert::Infallible;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub async fn serve(listener: TcpListener, shared: Arc<Shared>, stop: CancellationToken) {
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.cancelled() => return,
        };
        let shared = shared.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(route(req, &shared).await) }
            });
            let mut b = hyper::server::conn::http1::Builder::new();
            b.timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10));
            let conn = b.serve_connection(TokioIo::new(stream), svc);
            if let Err(e) = crate::server::until_done(conn, &stop, |c| c.graceful_shutdown()).await
            {
                tracing::debug!(error = %e, "admin connection ended with an error");
            }
        });
    }
}

type Resp = Response<Full<Bytes>>;

fn json_response(status: StatusCode, body: serde_json::Value) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

fn error(status: StatusCode, message: &str) -> Resp {
    json_response(
        status,
        json!({ "error": message, "status": status.as_u16() }),
    )
}

/// Constant-time bearer token check. No token configured: open (loopback only, checked by config).
fn authorized(req: &Request<Incoming>, token: Option<&str>) -> bool {
    let Some(token) = token else { return true };
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    bool::from(given.as_bytes().ct_eq(token.as_bytes()))
}

async fn route(req: Request<Incoming>, shared: &Arc<Shared>) -> Resp {
    let path = req.uri().path();
    match (req.method(), path) {
        (&Method::GET, "/healthz") => json_response(StatusCode::OK, json!({ "status": "ok" })),
        (&Method::GET, "/metrics") => {
            let mut r = Response::new(Full::new(Bytes::from(crate::metrics::render(shared))));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            r
        }
        (_, p) if p.starts_with("/api/") => {
            let rt = shared.runtime.load();
            if !authorized(&req, rt.config.admin.token.as_deref()) {
                let mut r = error(StatusCode::UNAUTHORIZED, "missing or wrong bearer token");
                r.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    header::HeaderValue::from_static("Bearer"),
                );
                return r;
            }
            let Some(rest) = p.strip_prefix("/api/scaling/") else {
                return error(StatusCode::NOT_FOUND, "no such endpoint");
            };
            const GET_ONLY: [&str; 5] = [
                "loadbalancer/stats",
                "health",
                "redis/status",
                "distributed/status",
                "distributed/servers",
            ];
            if req.method() != Method::GET {
                if GET_ONLY.contains(&rest) || rest.starts_with("distributed/matches/") {
                    return error(StatusCode::METHOD_NOT_ALLOWED, "use GET");
                }
                return error(StatusCode::NOT_FOUND, "no such endpoint");
            }
            match rest {
                "loadbalancer/stats" => json_response(StatusCode::OK, stats(shared)),
                "health" => health(shared),
                "redis/status" => json_response(StatusCode::OK, redis_status(shared)),
                "distributed/status" => json_response(StatusCode::OK, distributed_status(shared)),
                "distributed/servers" => {
                    json_response(StatusCode::OK, json!({ "servers": server_list(shared) }))
                }
                r => match r.strip_prefix("distributed/matches/") {
                    Some(id) if !id.is_empty() && !id.contains('/') => {
                        match_owner(shared, id, req.uri().query()).await
                    }
                    _ => error(StatusCode::NOT_FOUND, "no such endpoint"),
                },
            }
        }
        _ => error(StatusCode::NOT_FOUND, "no such endpoint"),
    }
}

/// Every server of every pool, with its live and cluster-wide figures.
fn server_list(shared: &Shared) -> Vec<ServerStats> {
    let rt = shared.runtime.load();
    rt.pools
        .iter()
        .flat_map(|p| pool_servers(shared, p))
        .collect()
}

fn pool_servers(shared: &Shared, p: &crate::runtime::PoolRuntime) -> Vec<ServerStats> {
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

fn stats(shared: &Shared) -> serde_json::Value {
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

fn redis_status(shared: &Shared) -> serde_json::Value {
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

/// `healthy` with every part working, `degraded` while Redis is away or no
/// server can take traffic.
fn health(shared: &Shared) -> Resp {
    let servers = server_list(shared);
    let healthy = servers
        .iter()
        .filter(|s| s.health == kp5_shared::wire::Health::Healthy && !s.draining)
        .count();
    let redis_ok = shared.cluster.as_ref().is_none_or(|c| c.is_up());
    let mut problems = Vec::new();
    if !redis_ok {
        problems.push("redis unreachable: routing on the last-known registry; new matches placed by rendezvous hashing".to_owned());
    }
    if healthy == 0 {
        problems.push("no server can take new traffic".to_owned());
    }
    let status = if problems.is_empty() {
        "healthy"
    } else {
        "degraded"
    };
    json_response(
        StatusCode::OK,
        json!({
            "status": status,
            "problems": problems,
            "redis": redis_status(shared),
            "servers": { "total": servers.len(), "available": healthy },
            "activeMatches": shared.affinity.len(),
        }),
    )
}

fn distributed_status(shared: &Shared) -> serde_json::Value {
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
async fn match_owner(shared: &Shared, id: &str, query: Option<&str>) -> Resp {
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
            match c.owner(pool, id).await {
                Ok(Some(o)) => {
                    return json_response(
                        StatusCode::OK,
                        json!({ "matchId": id, "pool": pool, "source": "redis", "owner": o }),
                    )
                }
                Ok(None) => continue,
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
