//! Match state through the agent (SPEC §3.4): versioned state with
//! conditional writes, an event stream of every change that a subscriber
//! can resume without a silent gap, and the end of a match.
//!
//! Every check-and-write is one Lua script on the match's own keys (one
//! Cluster slot), so two agents can never both win a version. Each change is
//! appended to the match's stream in the same script; the SSE id is the
//! stream offset. A subscriber resumes only from an entry still in the
//! stream, and a version that does not follow the last one sent (entries
//! trimmed, Redis restarted empty) turns into `event: reload` carrying the
//! current state, never a silent gap.

// Helpers here return `Err(response)` to end a handler early; the response
// is the error, built once and sent as is, so its size does not matter.
#![allow(clippy::result_large_err)]

use crate::api::{error, json_response, Resp};
use crate::registry::Agent;
use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, StatusCode};
use http_body_util::BodyExt;
use redis::streams::{StreamId, StreamRangeReply, StreamReadOptions, StreamReadReply};
use redis::Value;
use serde_json::{json, Map};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// Longest match id accepted (the proxy uses the same limit).
pub const MAX_ID: usize = 128;
/// Largest state document accepted.
pub const MAX_STATE: usize = 1 << 20;
/// How long one blocking stream read waits before a keep-alive comment.
const BLOCK: Duration = Duration::from_secs(5);

const WRITE: &str = r#"
-- KEYS: state hash, events stream
-- ARGV: expected version ('' any, '*' existing, N), state JSON, server,
--       stream max length, idle TTL ms
local v = tonumber(redis.call('HGET', KEYS[1], 'version')) or 0
local want = ARGV[1]
if (want == '*' and v == 0) or (want ~= '' and want ~= '*' and tonumber(want) ~= v) then
  return {'0', tostring(v), ''}
end
v = v + 1
local t = redis.call('TIME')
local now = string.format('%.0f', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
redis.call('HSET', KEYS[1], 'version', v, 'state', ARGV[2], 'server', ARGV[3], 'updatedAt', now)
redis.call('HDEL', KEYS[1], 'ended')
local id = redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[4], '*',
  'kind', 'change', 'version', v, 'state', ARGV[2], 'server', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
redis.call('PEXPIRE', KEYS[2], ARGV[5])
return {'1', tostring(v), id}
"#;

const SNAPSHOT: &str = r#"
-- KEYS: state hash, events stream. The state and the stream position it
-- corresponds to, read together.
local h = redis.call('HMGET', KEYS[1], 'version', 'state', 'server', 'updatedAt', 'ended')
local last = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
local id = '0-0'
if last[1] then id = last[1][1] end
return {h[1] or '0', h[2] or '', h[3] or '', h[4] or '0', h[5] or '', id}
"#;

const END: &str = r#"
-- KEYS: owner hash, state hash, events stream
-- ARGV: retention ms, channel, pool, match id, server, stream max length
local owner = redis.call('HGET', KEYS[1], 'server')
local h = redis.call('HMGET', KEYS[2], 'version', 'state')
if not owner and not h[1] then return 0 end
redis.call('DEL', KEYS[1])
if h[1] then
  redis.call('HSET', KEYS[2], 'ended', '1')
  redis.call('XADD', KEYS[3], 'MAXLEN', ARGV[6], '*',
    'kind', 'end', 'version', h[1], 'state', h[2], 'server', ARGV[5])
  redis.call('PEXPIRE', KEYS[2], ARGV[1])
  redis.call('PEXPIRE', KEYS[3], ARGV[1])
end
redis.call('PUBLISH', ARGV[2], cjson.encode({kind = 'release', pool = ARGV[3],
  matchId = ARGV[4], server = owner or ''}))
return 1
"#;

/// The scripts, loaded once per agent.
pub struct Scripts {
    write: redis::Script,
    snapshot: redis::Script,
    end: redis::Script,
}

impl Default for Scripts {
    fn default() -> Self {
        Scripts {
            write: redis::Script::new(WRITE),
            snapshot: redis::Script::new(SNAPSHOT),
            end: redis::Script::new(END),
        }
    }
}

/// A match id from the URL: one path segment, 1..=128 bytes, printable.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_ID && !id.chars().any(|c| c.is_control() || c == '/')
}

/// The state of a match and the stream position it corresponds to.
#[derive(Debug, Clone)]
struct Snapshot {
    version: u64,
    state: serde_json::Value,
    server: String,
    updated_at: u64,
    ended: bool,
    last_id: String,
}

impl Snapshot {
    fn event_data(&self) -> serde_json::Value {
        json!({ "version": self.version, "state": self.state, "server": self.server })
    }
}

fn redis_down(e: &redis::RedisError) -> Resp {
    tracing::warn!(error = %e, "Redis unavailable for match state");
    let mut r = error(
        StatusCode::SERVICE_UNAVAILABLE,
        format!("match state store unavailable: {e}"),
    );
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    r
}

fn no_redis() -> Resp {
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "this agent has no [redis]: match state needs Redis",
    )
}

fn with_etag(mut r: Resp, version: u64) -> Resp {
    if let Ok(v) = HeaderValue::from_str(&format!("\"{version}\"")) {
        r.headers_mut().insert(header::ETAG, v);
    }
    r
}

/// `If-Match` as the write script takes it: '' (absent), '*' or a version.
fn if_match(headers: &HeaderMap) -> Result<String, Resp> {
    let Some(v) = headers.get(header::IF_MATCH) else {
        return Ok(String::new());
    };
    let s = v.to_str().unwrap_or("").trim();
    if s == "*" {
        return Ok("*".into());
    }
    let s = s.strip_prefix("W/").unwrap_or(s).trim_matches('"');
    s.parse::<u64>().map(|n| n.to_string()).map_err(|_| {
        error(
            StatusCode::BAD_REQUEST,
            "If-Match: expected a version such as \"3\" (or *)",
        )
    })
}

async fn read_object(body: hyper::body::Incoming) -> Result<Map<String, serde_json::Value>, Resp> {
    use kp5_shared::http::{read_limited, BodyError};
    let bytes = read_limited(body, MAX_STATE).await.map_err(|e| match e {
        BodyError::TooLarge => error(StatusCode::PAYLOAD_TOO_LARGE, "state over 1 MiB"),
        BodyError::Read(e) => error(StatusCode::BAD_REQUEST, format!("reading the body: {e}")),
    })?;
    match serde_json::from_slice::<serde_json::Value>(&bytes) {
        Ok(serde_json::Value::Object(m)) => Ok(m),
        Ok(_) => Err(error(
            StatusCode::BAD_REQUEST,
            "state: must be a JSON object",
        )),
        Err(e) => Err(error(
            StatusCode::BAD_REQUEST,
            format!("state: not JSON: {e}"),
        )),
    }
}

impl Agent {
    fn state_keys(&self, id: &str) -> (String, String) {
        let pool = &self.cfg.pool;
        (
            self.keys.match_state(pool, id),
            self.keys.match_events(pool, id),
        )
    }

    async fn snapshot(&self, id: &str) -> redis::RedisResult<Snapshot> {
        let Some(conn) = &self.redis else {
            return Err(redis::RedisError::from((
                redis::ErrorKind::Client,
                "no [redis]",
            )));
        };
        let (state_key, events_key) = self.state_keys(id);
        let (v, state, server, at, ended, last_id): (
            String,
            String,
            String,
            String,
            String,
            String,
        ) = self
            .scripts
            .snapshot
            .key(state_key)
            .key(events_key)
            .invoke_async(&mut conn.clone())
            .await?;
        Ok(Snapshot {
            version: v.parse().unwrap_or(0),
            state: serde_json::from_str(&state).unwrap_or(serde_json::Value::Null),
            server,
            updated_at: at.parse().unwrap_or(0),
            ended: !ended.is_empty(),
            last_id,
        })
    }

    /// `GET /v1/matches/:id/state`, with who owns the match now and whether
    /// this server took it over from another.
    pub async fn get_state(&self, id: &str) -> Resp {
        let Some(conn) = &self.redis else {
            return no_redis();
        };
        let snap = match self.snapshot(id).await {
            Ok(s) => s,
            Err(e) => return redis_down(&e),
        };
        if snap.version == 0 {
            return error(StatusCode::NOT_FOUND, "no state for this match");
        }
        let owner: HashMap<String, String> = match redis::cmd("HGETALL")
            .arg(self.keys.match_owner(&self.cfg.pool, id))
            .query_async(&mut conn.clone())
            .await
        {
            Ok(o) => o,
            Err(e) => return redis_down(&e),
        };
        let me = &self.cfg.server_id;
        let owner_id = owner.get("server").cloned();
        let previous = owner.get("previous").cloned().unwrap_or_default();
        let taken_over =
            owner_id.as_deref() == Some(me.as_str()) && !previous.is_empty() && &previous != me;
        let body = json!({
            "version": snap.version,
            "state": snap.state,
            "server": snap.server,
            "updatedAt": snap.updated_at,
            "ended": snap.ended,
            "owner": owner_id,
            "previousOwner": (!previous.is_empty()).then_some(previous),
            "fencingToken": owner.get("token").and_then(|t| t.parse::<u64>().ok()),
            "takenOver": taken_over,
        });
        with_etag(json_response(StatusCode::OK, body), snap.version)
    }

    /// `PUT` (replace) or `PATCH` (merge top-level fields; `null` removes a
    /// field) of `/v1/matches/:id/state`.
    pub async fn write_state(
        &self,
        id: &str,
        patch: bool,
        headers: &HeaderMap,
        body: hyper::body::Incoming,
    ) -> Resp {
        let Some(conn) = &self.redis else {
            return no_redis();
        };
        let expected = match if_match(headers) {
            Ok(e) => e,
            Err(r) => return r,
        };
        let given = match read_object(body).await {
            Ok(m) => m,
            Err(r) => return r,
        };
        let (state_key, events_key) = self.state_keys(id);
        // an unconditional PATCH reads, merges and writes conditionally,
        // again on a race: the merge never loses a concurrent write
        for _ in 0..32 {
            let (state, want) = if patch {
                let snap = match self.snapshot(id).await {
                    Ok(s) => s,
                    Err(e) => return redis_down(&e),
                };
                if !expected.is_empty() && expected != "*" && expected != snap.version.to_string() {
                    return conflict(snap.version);
                }
                if expected == "*" && snap.version == 0 {
                    return conflict(0);
                }
                let mut merged = match snap.state {
                    serde_json::Value::Object(m) => m,
                    _ => Map::new(),
                };
                for (k, v) in &given {
                    if v.is_null() {
                        merged.remove(k);
                    } else {
                        merged.insert(k.clone(), v.clone());
                    }
                }
                (merged, snap.version.to_string())
            } else {
                (given.clone(), expected.clone())
            };
            let text = serde_json::Value::Object(state).to_string();
            if text.len() > MAX_STATE {
                return error(StatusCode::PAYLOAD_TOO_LARGE, "state over 1 MiB");
            }
            let r: redis::RedisResult<(String, String, String)> = self
                .scripts
                .write
                .key(&state_key)
                .key(&events_key)
                .arg(&want)
                .arg(&text)
                .arg(&self.cfg.server_id)
                .arg(self.cfg.events_max_len)
                .arg(self.cfg.idle_retention.as_millis() as u64)
                .invoke_async(&mut conn.clone())
                .await;
            let (ok, version, _) = match r {
                Ok(x) => x,
                Err(e) => return redis_down(&e),
            };
            let version: u64 = version.parse().unwrap_or(0);
            if ok == "1" {
                let state: serde_json::Value =
                    serde_json::from_str(&text).unwrap_or(serde_json::Value::Null);
                return with_etag(
                    json_response(
                        StatusCode::OK,
                        json!({ "version": version, "state": state }),
                    ),
                    version,
                );
            }
            if !(patch && expected.is_empty()) {
                return conflict(version);
            }
        }
        error(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many concurrent writes to this match; retry",
        )
    }

    /// `DELETE /v1/matches/:id`: releases the assignment (proxies forget the
    /// owner, so match counts drop), tells subscribers, keeps the state for
    /// `ended_retention_ms`.
    pub async fn end_match(&self, id: &str) -> Resp {
        let Some(conn) = &self.redis else {
            return no_redis();
        };
        let pool = &self.cfg.pool;
        let retention = self.cfg.ended_retention.as_millis() as u64;
        let r: redis::RedisResult<i64> = self
            .scripts
            .end
            .key(self.keys.match_owner(pool, id))
            .key(self.keys.match_state(pool, id))
            .key(self.keys.match_events(pool, id))
            .arg(retention)
            .arg(self.keys.registry_channel())
            .arg(pool)
            .arg(id)
            .arg(&self.cfg.server_id)
            .arg(self.cfg.events_max_len)
            .invoke_async(&mut conn.clone())
            .await;
        match r {
            Ok(1) => json_response(
                StatusCode::OK,
                json!({ "matchId": id, "ended": true, "retentionMs": retention }),
            ),
            Ok(_) => error(StatusCode::NOT_FOUND, "unknown match"),
            Err(e) => redis_down(&e),
        }
    }
}

impl Agent {
    /// `POST /v1/matches/:id/performance`: the match server's figures for
    /// one match, kept (newest first) for `metrics_retention_hours` and at
    /// most `max_metrics_stored` reports; proxies show them at
    /// `GET /api/scaling/performance/matches/:id`.
    pub async fn report_performance(&self, id: &str, body: hyper::body::Incoming) -> Resp {
        let Some(conn) = &self.redis else {
            return no_redis();
        };
        let v = match read_object(body).await {
            Ok(m) => m,
            Err(r) => return r,
        };
        let num = |k: &str| -> Result<f64, Resp> {
            match v.get(k).and_then(|x| x.as_f64()) {
                Some(n) if n >= 0.0 && n.is_finite() => Ok(n),
                _ => Err(error(
                    StatusCode::BAD_REQUEST,
                    format!("{k}: required, a number of at least 0"),
                )),
            }
        };
        let (participants, eps, latency) = match (
            num("participantCount"),
            num("eventsPerSecond"),
            num("averageLatency"),
        ) {
            (Ok(a), Ok(b), Ok(c)) => (a, b, c),
            (Err(r), _, _) | (_, Err(r), _) | (_, _, Err(r)) => return r,
        };
        if participants.fract() != 0.0 {
            return error(
                StatusCode::BAD_REQUEST,
                "participantCount: must be an integer",
            );
        }
        let report = json!({
            "at": kp5_shared::wire::unix_ms(),
            "server": self.cfg.server_id,
            "participantCount": participants as u64,
            "eventsPerSecond": eps,
            "averageLatency": latency,
        });
        let key = self.keys.match_performance(&self.cfg.pool, id);
        let mut pipe = redis::pipe();
        pipe.cmd("LPUSH")
            .arg(&key)
            .arg(report.to_string())
            .ignore()
            .cmd("LTRIM")
            .arg(&key)
            .arg(0)
            .arg(self.cfg.max_metrics_stored.saturating_sub(1))
            .ignore()
            .cmd("PEXPIRE")
            .arg(&key)
            .arg(self.cfg.metrics_retention.as_millis() as u64)
            .ignore();
        match pipe.query_async::<()>(&mut conn.clone()).await {
            Ok(()) => json_response(StatusCode::OK, json!({ "stored": true, "report": report })),
            Err(e) => redis_down(&e),
        }
    }
}

fn conflict(current: u64) -> Resp {
    with_etag(
        json_response(
            StatusCode::CONFLICT,
            json!({
                "error": "version mismatch: re-read the state and retry",
                "status": 409,
                "version": current,
            }),
        ),
        current,
    )
}

/// One SSE frame.
fn frame(event: Option<&str>, id: &str, data: &serde_json::Value) -> Bytes {
    let mut s = String::with_capacity(128);
    if let Some(e) = event {
        s.push_str("event: ");
        s.push_str(e);
        s.push('\n');
    }
    s.push_str("id: ");
    s.push_str(id);
    s.push_str("\ndata: ");
    s.push_str(&data.to_string());
    s.push_str("\n\n");
    Bytes::from(s)
}

/// A stream entry as an event: (kind, version, data).
fn entry(e: &StreamId) -> (String, u64, serde_json::Value) {
    let text = |k: &str| match e.map.get(k) {
        Some(Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
        Some(Value::SimpleString(s)) => s.clone(),
        Some(Value::Int(i)) => i.to_string(),
        _ => String::new(),
    };
    let version = text("version").parse().unwrap_or(0);
    let state = serde_json::from_str(&text("state")).unwrap_or(serde_json::Value::Null);
    let data = json!({ "version": version, "state": state, "server": text("server") });
    (text("kind"), version, data)
}

/// `GET /v1/matches/:id/events`: streams changes from `Last-Event-ID` (or
/// from the moment of the request) until the client goes away. The start
/// is fixed before the response begins, so a change written right after
/// the subscriber got its response headers is never missed.
pub async fn events(agent: Arc<Agent>, id: String, last_event_id: Option<String>) -> Resp {
    let (Some(client), Some(conn)) = (agent.redis_client.clone(), agent.redis.clone()) else {
        return no_redis();
    };
    let (_, events_key) = agent.state_keys(&id);
    let mut first = Bytes::from_static(b": kp5-agent match events\nretry: 1000\n\n");
    let start = match last_event_id {
        Some(last) => match resume_point(&mut conn.clone(), &events_key, &last).await {
            Ok(Some(version)) => Ok(Position { id: last, version }),
            Ok(None) => match agent.snapshot(&id).await {
                Ok(snap) => {
                    let reload = frame(Some("reload"), &snap.last_id, &snap.event_data());
                    first = Bytes::from([first.as_ref(), reload.as_ref()].concat());
                    Ok(Position {
                        id: snap.last_id,
                        version: snap.version,
                    })
                }
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        },
        None => agent.snapshot(&id).await.map(|s| Position {
            id: s.last_id,
            version: s.version,
        }),
    };
    let start = match start {
        Ok(p) => p,
        Err(e) => return redis_down(&e),
    };
    let (tx, rx) = mpsc::channel::<Bytes>(256);
    tokio::spawn(async move {
        if tx.send(first).await.is_err() {
            return;
        }
        if let Err(e) = pump(&agent, &client, &id, start, &tx).await {
            tracing::debug!(match_id = %id, error = %e, "event stream ended");
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| {
            (
                Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(b)),
                rx,
            )
        })
    });
    let mut r = http::Response::new(http_body_util::StreamBody::new(stream).boxed());
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    r
}

/// Where a subscriber stands: the last stream id and version sent.
struct Position {
    id: String,
    version: u64,
}

/// Relays new entries after `start` until the subscriber goes away. Across
/// a Redis outage it resumes only from an entry still in the stream, and a
/// version that does not follow the last one sent becomes a reload.
async fn pump(
    agent: &Agent,
    client: &redis::Client,
    id: &str,
    start: Position,
    tx: &mpsc::Sender<Bytes>,
) -> Result<(), String> {
    let (_, events_key) = agent.state_keys(id);
    let cfg = redis::AsyncConnectionConfig::new()
        .set_response_timeout(Some(BLOCK + Duration::from_secs(5)))
        .set_connection_timeout(Some(Duration::from_secs(2)));
    let mut conn: Option<redis::aio::MultiplexedConnection> = None;
    let mut p = start;
    let mut check_resume = false;
    let mut backoff = Duration::from_millis(100);
    loop {
        let c = match conn.as_mut() {
            Some(c) => c,
            None => match client
                .get_multiplexed_async_connection_with_config(&cfg)
                .await
            {
                Ok(c) => conn.insert(c),
                Err(e) => {
                    wait_for_redis(tx, &e, &mut backoff).await?;
                    continue;
                }
            },
        };
        if check_resume {
            // back after an outage: our last entry must still be there (it
            // is not if Redis restarted empty or trimmed it meanwhile)
            match resume_point(c, &events_key, &p.id).await {
                Ok(Some(_)) => {}
                Ok(None) if p.id == "0-0" => {}
                Ok(None) => p = reload(agent, id, tx).await?,
                Err(e) => {
                    conn = None;
                    wait_for_redis(tx, &e, &mut backoff).await?;
                    continue;
                }
            }
            check_resume = false;
        }
        let c = conn.as_mut().expect("connected");
        let opts = StreamReadOptions::default()
            .block(BLOCK.as_millis() as usize)
            .count(100);
        let read: redis::RedisResult<Option<StreamReadReply>> = redis::cmd("XREAD")
            .arg(&opts)
            .arg("STREAMS")
            .arg(&events_key)
            .arg(&p.id)
            .query_async(c)
            .await;
        let reply = match read {
            Ok(r) => {
                backoff = Duration::from_millis(100);
                r
            }
            Err(e) => {
                conn = None;
                check_resume = true;
                wait_for_redis(tx, &e, &mut backoff).await?;
                continue;
            }
        };
        let Some(reply) = reply else {
            send(tx, Bytes::from_static(b": keep-alive\n\n")).await?;
            continue;
        };
        'entries: for key in reply.keys {
            for e in key.ids {
                let (kind, version, data) = entry(&e);
                let follows = match kind.as_str() {
                    "end" => version == p.version,
                    _ => version == p.version + 1,
                };
                if !follows {
                    // a gap (trimmed before we read it, or Redis lost the
                    // stream): never skip silently
                    p = reload(agent, id, tx).await?;
                    break 'entries;
                }
                let event = if kind == "end" { Some("end") } else { None };
                send(tx, frame(event, &e.id, &data)).await?;
                p.id = e.id.clone();
                p.version = version;
            }
        }
    }
}

/// Tells the subscriber Redis is away (a comment line, which also finds out
/// whether it is still there), then backs off.
async fn wait_for_redis(
    tx: &mpsc::Sender<Bytes>,
    e: &redis::RedisError,
    backoff: &mut Duration,
) -> Result<(), String> {
    send(
        tx,
        Bytes::from(format!(": redis unavailable ({e}); retrying\n\n")),
    )
    .await?;
    tokio::time::sleep(*backoff).await;
    *backoff = (*backoff * 2).min(Duration::from_secs(2));
    Ok(())
}

/// The version of entry `last` if it is still in the stream.
async fn resume_point(
    c: &mut impl redis::aio::ConnectionLike,
    key: &str,
    last: &str,
) -> redis::RedisResult<Option<u64>> {
    if !is_stream_id(last) {
        return Ok(None);
    }
    let r: StreamRangeReply = redis::cmd("XRANGE")
        .arg(key)
        .arg(last)
        .arg(last)
        .query_async(c)
        .await?;
    Ok(r.ids.first().map(|e| entry(e).1))
}

fn is_stream_id(s: &str) -> bool {
    let (a, b) = s.split_once('-').unwrap_or((s, "0"));
    a.parse::<u64>().is_ok() && b.parse::<u64>().is_ok()
}

/// Tells the subscriber to reload, with the current state so it need not
/// ask, and positions it right after that state.
async fn reload(agent: &Agent, id: &str, tx: &mpsc::Sender<Bytes>) -> Result<Position, String> {
    let snap = agent.snapshot(id).await.map_err(|e| e.to_string())?;
    send(tx, frame(Some("reload"), &snap.last_id, &snap.event_data())).await?;
    Ok(Position {
        id: snap.last_id,
        version: snap.version,
    })
}

async fn send(tx: &mpsc::Sender<Bytes>, b: Bytes) -> Result<(), String> {
    tx.send(b)
        .await
        .map_err(|_| "subscriber went away".to_owned())
}
