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
                async move { Ok::<_, Infallible>(route(req, &shared)) }
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

fn route(req: Request<Incoming>, shared: &Arc<Shared>) -> Resp {
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
            match (req.method(), p) {
                (&Method::GET, "/api/scaling/loadbalancer/stats") => {
                    json_response(StatusCode::OK, stats(shared))
                }
                (_, "/api/scaling/loadbalancer/stats") => {
                    error(StatusCode::METHOD_NOT_ALLOWED, "use GET")
                }
                _ => error(StatusCode::NOT_FOUND, "no such endpoint"),
            }
        }
        _ => error(StatusCode::NOT_FOUND, "no such endpoint"),
    }
}

fn stats(shared: &Shared) -> serde_json::Value {
    let rt = shared.runtime.load();
    let now = shared.clock.now_ms();
    let pools: Vec<_> = rt
        .pools
        .iter()
        .map(|p| {
            let servers: Vec<ServerStats> = p
                .servers
                .iter()
                .map(|u| ServerStats {
                    id: u.state.id.to_string(),
                    pool: p.name.to_string(),
                    address: u.address.to_string(),
                    weight: u.weight,
                    health: u.state.health(now),
                    draining: u.state.draining.load(Relaxed),
                    connections: u.state.connections.load(Relaxed),
                    websockets: u.state.websockets.load(Relaxed),
                    matches: u.state.matches.load(Relaxed),
                    max_connections: p.cfg.max_connections_per_server,
                    max_matches: p.cfg.max_matches_per_server,
                    selections: u.state.selections.load(Relaxed),
                    requests: u.state.requests.load(Relaxed),
                    failures: u.state.failures.load(Relaxed),
                })
                .collect();
            json!({ "name": &*p.name, "strategy": p.cfg.strategy.as_str(), "servers": servers })
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
