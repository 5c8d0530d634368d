//! The agent's local API for its match server (SPEC §3.4): load pushes,
//! drain, status, metrics and liveness. Bad input gets 400 naming the field.

use crate::registry::Agent;
use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde_json::json;
use std::convert::Infallible;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Largest request body the API reads.
const MAX_BODY: usize = 64 * 1024;

pub type Resp = Response<BoxBody<Bytes, Infallible>>;

fn full(b: impl Into<Bytes>) -> BoxBody<Bytes, Infallible> {
    Full::new(b.into()).boxed()
}

pub async fn serve(listener: TcpListener, agent: Arc<Agent>, stop: CancellationToken) {
    kp5_shared::http::serve(listener, stop, "agent API", move |req| {
        let agent = agent.clone();
        async move { route(req, &agent).await }
    })
    .await
}

pub fn json_response(status: StatusCode, body: serde_json::Value) -> Resp {
    let mut r = Response::new(full(body.to_string()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

pub fn error(status: StatusCode, message: impl Into<String>) -> Resp {
    json_response(
        status,
        json!({ "error": message.into(), "status": status.as_u16() }),
    )
}

async fn read_json(req: Request<Incoming>) -> Result<serde_json::Value, Resp> {
    use kp5_shared::http::{read_limited, BodyError};
    let body = read_limited(req.into_body(), MAX_BODY)
        .await
        .map_err(|e| match e {
            BodyError::TooLarge => error(StatusCode::PAYLOAD_TOO_LARGE, "body over 64 KiB"),
            BodyError::Read(e) => error(StatusCode::BAD_REQUEST, format!("reading the body: {e}")),
        })?;
    if body.is_empty() {
        return Ok(json!({}));
    }
    serde_json::from_slice(&body)
        .map_err(|e| error(StatusCode::BAD_REQUEST, format!("body is not JSON: {e}")))
}

/// A non-negative integer field, absent allowed.
fn count(v: &serde_json::Value, field: &str) -> Result<Option<u64>, String> {
    match v.get(field) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(x) => x
            .as_u64()
            .map(Some)
            .ok_or_else(|| format!("{field}: must be a non-negative integer")),
    }
}

async fn route(req: Request<Incoming>, agent: &Arc<Agent>) -> Resp {
    let path = req.uri().path().to_owned();
    match (req.method().clone(), path.as_str()) {
        (Method::GET, "/healthz") => json_response(StatusCode::OK, json!({ "status": "ok" })),
        (Method::GET, "/metrics") => metrics(agent),
        (Method::GET, "/v1/status") => json_response(StatusCode::OK, status(agent)),
        (Method::PUT, "/v1/load") => {
            let v = match read_json(req).await {
                Ok(v) => v,
                Err(r) => return r,
            };
            if !v.is_object() {
                return error(StatusCode::BAD_REQUEST, "body must be a JSON object");
            }
            let (c, m) = match (count(&v, "connections"), count(&v, "matches")) {
                (Ok(c), Ok(m)) => (c, m),
                (Err(e), _) | (_, Err(e)) => return error(StatusCode::BAD_REQUEST, e),
            };
            if c.is_none() && m.is_none() {
                return error(
                    StatusCode::BAD_REQUEST,
                    "connections: required (with or without matches)",
                );
            }
            agent.set_load(c, m);
            let rec = agent.record();
            json_response(
                StatusCode::OK,
                json!({ "connections": rec.connections, "matches": rec.matches }),
            )
        }
        (Method::POST, "/v1/drain") => {
            agent.set_draining(true);
            json_response(StatusCode::OK, json!({ "draining": true }))
        }
        (Method::DELETE, "/v1/drain") => {
            agent.set_draining(false);
            json_response(StatusCode::OK, json!({ "draining": false }))
        }
        (_, "/healthz" | "/metrics" | "/v1/status" | "/v1/load" | "/v1/drain") => {
            error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed here")
        }
        (method, p) => match p.strip_prefix("/v1/matches/") {
            Some(rest) => match_route(req, agent, method, rest).await,
            None => error(StatusCode::NOT_FOUND, "no such endpoint"),
        },
    }
}

/// `/v1/matches/:id[/state|/events]`.
async fn match_route(
    req: Request<Incoming>,
    agent: &Arc<Agent>,
    method: Method,
    rest: &str,
) -> Resp {
    let (id, tail) = rest.split_once('/').unwrap_or((rest, ""));
    if !crate::matches::valid_id(id) {
        return error(
            StatusCode::BAD_REQUEST,
            "matchId: 1 to 128 printable characters",
        );
    }
    match (method, tail) {
        (Method::GET, "state") => agent.get_state(id).await,
        (Method::PUT, "state") => {
            let (parts, body) = req.into_parts();
            agent.write_state(id, false, &parts.headers, body).await
        }
        (Method::PATCH, "state") => {
            let (parts, body) = req.into_parts();
            agent.write_state(id, true, &parts.headers, body).await
        }
        (Method::GET, "events") => {
            let last = req
                .headers()
                .get("last-event-id")
                .and_then(|v| v.to_str().ok())
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty());
            crate::matches::events(agent.clone(), id.to_owned(), last).await
        }
        (Method::DELETE, "") => agent.end_match(id).await,
        (Method::POST, "performance") => agent.report_performance(id, req.into_body()).await,
        (_, "state" | "events" | "performance" | "") => {
            error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed here")
        }
        _ => error(StatusCode::NOT_FOUND, "no such endpoint"),
    }
}

fn status(agent: &Agent) -> serde_json::Value {
    let rec = agent.record();
    json!({
        "server": rec,
        "redis": {
            "configured": agent.cfg.redis.is_some(),
            "connected": agent.redis_up(),
            "url": agent.cfg.redis.as_ref().map(|r| r.target.redacted_url()),
            "lastHeartbeat": agent.last_heartbeat(),
            "lastError": agent.last_error(),
        },
        "heartbeats": agent.heartbeats.load(Relaxed),
        "heartbeatFailures": agent.heartbeat_failures.load(Relaxed),
        "scrapeFailures": agent.scrape_failures.load(Relaxed),
    })
}

fn metrics(agent: &Agent) -> Resp {
    let rec = agent.record();
    let mut reg = Registry::with_prefix("kp5_agent");
    let gauge = |reg: &mut Registry, name: &str, help: &str, v: i64| {
        let g: Gauge = Gauge::default();
        g.set(v);
        reg.register(name, help, g);
    };
    let counter = |reg: &mut Registry, name: &str, help: &str, v: u64| {
        let c: Counter = Counter::default();
        c.inc_by(v);
        reg.register(name, help, c);
    };
    gauge(
        &mut reg,
        "connections",
        "Connections the match server reported (-1 before its first report).",
        rec.connections.map_or(-1, |c| c as i64),
    );
    gauge(
        &mut reg,
        "matches",
        "Matches the match server reported (-1 before its first report).",
        rec.matches.map_or(-1, |c| c as i64),
    );
    gauge(
        &mut reg,
        "cpu_permille",
        "Machine CPU use, permille of all cores.",
        (rec.cpu * 10.0) as i64,
    );
    gauge(
        &mut reg,
        "memory_permille",
        "Machine memory in use, permille.",
        (rec.memory * 10.0) as i64,
    );
    gauge(
        &mut reg,
        "draining",
        "1 while the server is draining.",
        i64::from(rec.draining),
    );
    gauge(
        &mut reg,
        "redis_up",
        "1 while heartbeats reach Redis.",
        i64::from(agent.redis_up()),
    );
    counter(
        &mut reg,
        "heartbeats",
        "Heartbeats written to Redis.",
        agent.heartbeats.load(Relaxed),
    );
    counter(
        &mut reg,
        "heartbeat_failures",
        "Heartbeats that failed to reach Redis.",
        agent.heartbeat_failures.load(Relaxed),
    );
    counter(
        &mut reg,
        "scrape_failures",
        "Failed reads of the match server's stats URL.",
        agent.scrape_failures.load(Relaxed),
    );
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &reg) {
        return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string());
    }
    let mut r = Response::new(full(out));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    r
}
