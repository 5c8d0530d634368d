//! The admin listener: `/healthz` (liveness, no auth), `/metrics`
//! (Prometheus text) and the seed's `/api/scaling/*` endpoints behind the
//! bearer token (constant-time compare). Reference: docs/admin-api.md;
//! machine-readable: docs/openapi.json (checked against this router by a
//! test).

mod input;
pub mod views;

use crate::app::Shared;
use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use serde_json::json;
use std::sync::Arc;
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Largest admin request body.
const MAX_BODY: usize = 64 * 1024;

pub async fn serve(listener: TcpListener, shared: Arc<Shared>, stop: CancellationToken) {
    kp5_shared::http::serve(listener, stop, "admin", move |req| {
        let shared = shared.clone();
        async move { route(req, &shared).await }
    })
    .await
}

pub type Resp = Response<Full<Bytes>>;

pub fn json_response(status: StatusCode, body: serde_json::Value) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

pub fn error(status: StatusCode, message: &str) -> Resp {
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

async fn read_json(req: Request<Incoming>) -> Result<serde_json::Value, Resp> {
    use kp5_shared::http::{read_limited, BodyError};
    let body = read_limited(req.into_body(), MAX_BODY)
        .await
        .map_err(|e| match e {
            BodyError::TooLarge => error(StatusCode::PAYLOAD_TOO_LARGE, "body over 64 KiB"),
            BodyError::Read(e) => error(StatusCode::BAD_REQUEST, &format!("reading the body: {e}")),
        })?;
    serde_json::from_slice(&body)
        .map_err(|e| error(StatusCode::BAD_REQUEST, &format!("body is not JSON: {e}")))
}

/// What the router knows: (method, path pattern). `:x` is one segment.
pub const ENDPOINTS: [(&str, &str); 23] = [
    ("GET", "health"),
    ("GET", "overview"),
    ("GET", "distributed/status"),
    ("GET", "distributed/servers"),
    ("GET", "distributed/matches/:matchId"),
    ("GET", "loadbalancer/status"),
    ("GET", "loadbalancer/stats"),
    ("GET", "loadbalancer/recommendations"),
    ("GET", "loadbalancer/metrics"),
    ("GET", "loadbalancer/config"),
    ("PUT", "loadbalancer/config"),
    ("GET", "performance/status"),
    ("GET", "performance/metrics"),
    ("GET", "performance/matches/:matchId"),
    ("GET", "performance/alerts"),
    ("POST", "performance/alerts/:alertId/resolve"),
    ("GET", "performance/thresholds"),
    ("PUT", "performance/thresholds"),
    ("GET", "redis/status"),
    ("GET", "redis/info"),
    ("GET", "matches/:matchId/scaling"),
    ("POST", "reload"),
    ("GET", "config"),
];

/// Matches `path` against `pattern`, returning the one `:param` value (if any).
fn matches<'a>(pattern: &str, path: &'a str) -> Option<Option<&'a str>> {
    let mut param = None;
    let mut p = pattern.split('/');
    let mut s = path.split('/');
    loop {
        match (p.next(), s.next()) {
            (None, None) => return Some(param),
            (Some(a), Some(b)) if a.starts_with(':') => {
                if b.is_empty() {
                    return None;
                }
                param = Some(b);
            }
            (Some(a), Some(b)) if a == b => {}
            _ => return None,
        }
    }
}

/// The live dashboard: one self-contained page, no build step, no CDN.
const DASHBOARD: &str = include_str!("dashboard.html");

async fn route(req: Request<Incoming>, shared: &Arc<Shared>) -> Resp {
    let path = req.uri().path().to_owned();
    match (req.method(), path.as_str()) {
        (&Method::GET, "/healthz") => {
            return json_response(StatusCode::OK, json!({ "status": "ok" }))
        }
        (&Method::GET, "/dashboard") | (&Method::GET, "/dashboard/") => {
            // the page holds no data: it asks the API (with the token) and /metrics
            let mut r = Response::new(Full::new(Bytes::from_static(DASHBOARD.as_bytes())));
            let h = r.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("text/html; charset=utf-8"),
            );
            h.insert(
                header::CONTENT_SECURITY_POLICY,
                header::HeaderValue::from_static(
                    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src data:",
                ),
            );
            h.insert(
                header::CACHE_CONTROL,
                header::HeaderValue::from_static("no-cache"),
            );
            return r;
        }
        (&Method::GET, "/metrics") => {
            let mut r = Response::new(Full::new(Bytes::from(crate::metrics::render(shared))));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            return r;
        }
        _ => {}
    }
    let Some(rest) = path.strip_prefix("/api/") else {
        return error(StatusCode::NOT_FOUND, "no such endpoint");
    };
    let token = shared.runtime.load().config.admin.token.clone();
    if !authorized(&req, token.as_deref()) {
        let mut r = error(StatusCode::UNAUTHORIZED, "missing or wrong bearer token");
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer"),
        );
        return r;
    }
    let Some(rest) = rest.strip_prefix("scaling/") else {
        return error(StatusCode::NOT_FOUND, "no such endpoint");
    };
    let mut allowed = Vec::new();
    let mut hit = None;
    for (method, pattern) in ENDPOINTS {
        if let Some(param) = matches(pattern, rest) {
            if method == req.method().as_str() {
                hit = Some((pattern, param.map(str::to_owned)));
                break;
            }
            allowed.push(method);
        }
    }
    let Some((pattern, param)) = hit else {
        if allowed.is_empty() {
            return error(StatusCode::NOT_FOUND, "no such endpoint");
        }
        let mut r = error(
            StatusCode::METHOD_NOT_ALLOWED,
            &format!("use {}", allowed.join(" or ")),
        );
        if let Ok(v) = header::HeaderValue::from_str(&allowed.join(", ")) {
            r.headers_mut().insert(header::ALLOW, v);
        }
        return r;
    };
    let id = param.as_deref().unwrap_or("");
    let query = req.uri().query().map(str::to_owned);
    match (req.method().clone(), pattern) {
        (Method::GET, "health") => views::health(shared),
        (Method::GET, "overview") => views::overview(shared).await,
        (Method::GET, "distributed/status") => ok(views::distributed_status(shared)),
        (Method::GET, "distributed/servers") => {
            ok(json!({ "servers": views::server_list(shared) }))
        }
        (Method::GET, "distributed/matches/:matchId") => {
            views::match_owner(shared, id, query.as_deref()).await
        }
        (Method::GET, "loadbalancer/status") => ok(views::lb_status(shared)),
        (Method::GET, "loadbalancer/stats") => ok(views::stats(shared)),
        (Method::GET, "loadbalancer/recommendations") => ok(views::recommendations(shared).await),
        (Method::GET, "loadbalancer/metrics") => ok(views::lb_metrics(shared)),
        (Method::GET, "loadbalancer/config") => ok(views::lb_config(shared)),
        (Method::PUT, "loadbalancer/config") => match read_json(req).await {
            Ok(body) => input::put_lb_config(shared, body).await,
            Err(r) => r,
        },
        (Method::GET, "performance/status") => ok(views::perf_status(shared).await),
        (Method::GET, "performance/metrics") => views::perf_metrics(shared, query.as_deref()).await,
        (Method::GET, "performance/matches/:matchId") => views::perf_match(shared, id).await,
        (Method::GET, "performance/alerts") => views::alerts(shared, query.as_deref()).await,
        (Method::POST, "performance/alerts/:alertId/resolve") => {
            views::resolve_alert(shared, id).await
        }
        (Method::GET, "performance/thresholds") => {
            ok(json!({ "thresholds": views::thresholds(shared).await }))
        }
        (Method::PUT, "performance/thresholds") => match read_json(req).await {
            Ok(body) => input::put_thresholds(shared, body).await,
            Err(r) => r,
        },
        (Method::GET, "redis/status") => ok(views::redis_status(shared)),
        (Method::GET, "redis/info") => views::redis_info(shared).await,
        (Method::GET, "matches/:matchId/scaling") => views::match_scaling(shared, id).await,
        (Method::POST, "reload") => match shared.reload_file("api").await {
            Ok(generation) => ok(json!({ "reloaded": true, "generation": generation })),
            Err(reason) => json_response(
                StatusCode::UNPROCESSABLE_ENTITY,
                json!({ "error": reason, "status": 422, "reloaded": false }),
            ),
        },
        (Method::GET, "config") => ok(views::config_status(shared)),
        _ => error(StatusCode::NOT_FOUND, "no such endpoint"),
    }
}

fn ok(body: serde_json::Value) -> Resp {
    json_response(StatusCode::OK, body)
}

#[cfg(test)]
mod tests {
    #[test]
    fn patterns_match_one_segment_per_param() {
        assert_eq!(super::matches("health", "health"), Some(None));
        assert_eq!(
            super::matches("distributed/matches/:matchId", "distributed/matches/42"),
            Some(Some("42"))
        );
        assert_eq!(
            super::matches("distributed/matches/:matchId", "distributed/matches/"),
            None
        );
        assert_eq!(
            super::matches("distributed/matches/:matchId", "distributed/matches/4/2"),
            None
        );
        assert_eq!(
            super::matches(
                "performance/alerts/:alertId/resolve",
                "performance/alerts/a1/resolve"
            ),
            Some(Some("a1"))
        );
    }
}
