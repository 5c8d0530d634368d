//! A small match server: what a KP5 match server looks like to the proxy.
//!
//! - `GET /health` → 200 (503 after [`DemoServer::set_healthy`]`(false)`)
//! - `GET /stats` → `{"server","connections","websockets","matches"}`:
//!   open WebSockets, and the distinct match ids among them (from a
//!   `/matches/{id}` path prefix or a `matchId` query parameter)
//! - any WebSocket upgrade → echo; a text `close:CODE:REASON` makes the
//!   server close with that code and reason
//! - `.../status/NNN` → that status (anywhere in the path, so
//!   `/matches/7/status/500` works too)
//! - `.../slow/MS` → answers after MS milliseconds
//! - anything else → `x-server` header, and the request body streamed back
//!   (or, for an empty body, a JSON description of the request)

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{header, Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

type Body = BoxBody<Bytes, hyper::Error>;

#[derive(Debug, Default)]
pub struct DemoStats {
    pub requests: AtomicU64,
    pub websockets: AtomicU64,
    pub websockets_total: AtomicU64,
    pub ws_messages: AtomicU64,
    /// Open WebSockets per match id.
    pub matches: std::sync::Mutex<std::collections::HashMap<String, u64>>,
}

impl DemoStats {
    /// Matches with at least one open WebSocket.
    pub fn match_count(&self) -> usize {
        self.matches.lock().unwrap().len()
    }

    /// Ids of the matches with open WebSockets.
    pub fn match_ids(&self) -> Vec<String> {
        self.matches.lock().unwrap().keys().cloned().collect()
    }

    fn open_match(&self, id: &str) {
        *self
            .matches
            .lock()
            .unwrap()
            .entry(id.to_owned())
            .or_default() += 1;
    }

    fn close_match(&self, id: &str) {
        let mut m = self.matches.lock().unwrap();
        if let Some(n) = m.get_mut(id) {
            *n -= 1;
            if *n == 0 {
                m.remove(id);
            }
        }
    }
}

/// The match id of a request, as the demo understands it.
fn match_of(uri: &http::Uri) -> Option<String> {
    if let Some(rest) = uri.path().strip_prefix("/matches/") {
        let id = rest.split('/').next().unwrap_or("");
        if !id.is_empty() {
            return Some(id.to_owned());
        }
    }
    uri.query()?
        .split('&')
        .find_map(|kv| kv.strip_prefix("matchId="))
        .filter(|v| !v.is_empty())
        .map(str::to_owned)
}

/// A running demo match server.
pub struct DemoServer {
    pub id: String,
    pub addr: SocketAddr,
    pub stats: Arc<DemoStats>,
    healthy: Arc<AtomicBool>,
    stop: CancellationToken,
    tasks: TaskTracker,
}

impl DemoServer {
    /// Starts on `addr` (port 0 for any).
    pub async fn start(id: &str, addr: SocketAddr) -> std::io::Result<DemoServer> {
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM,
            None,
        )?;
        socket.set_reuse_address(true)?;
        socket.set_nonblocking(true)?;
        socket.bind(&addr.into())?;
        socket.listen(1024)?;
        let listener = TcpListener::from_std(socket.into())?;
        let addr = listener.local_addr()?;
        let stats = Arc::new(DemoStats::default());
        let healthy = Arc::new(AtomicBool::new(true));
        let stop = CancellationToken::new();
        let tasks = TaskTracker::new();
        let ctx = Arc::new(Ctx {
            id: id.to_owned(),
            stats: stats.clone(),
            healthy: healthy.clone(),
        });
        let (t2, s2) = (tasks.clone(), stop.clone());
        tasks.spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    r = listener.accept() => match r { Ok(a) => a, Err(_) => continue },
                    _ = s2.cancelled() => return,
                };
                let _ = stream.set_nodelay(true);
                let ctx = ctx.clone();
                let s3 = s2.clone();
                let t3 = t2.clone();
                t2.spawn(async move {
                    let s4 = s3.clone();
                    let svc =
                        service_fn(move |req| handle(req, ctx.clone(), t3.clone(), s4.clone()));
                    let builder =
                        hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc);
                    tokio::select! {
                        _ = conn => {}
                        _ = s3.cancelled() => {}
                    }
                });
            }
        });
        Ok(DemoServer {
            id: id.to_owned(),
            addr,
            stats,
            healthy,
            stop,
            tasks,
        })
    }

    pub fn set_healthy(&self, healthy: bool) {
        self.healthy.store(healthy, Relaxed);
    }

    /// Kills the server: the listener closes and every connection drops at once.
    pub async fn kill(self) {
        self.stop.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }
}

impl Drop for DemoServer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

struct Ctx {
    id: String,
    stats: Arc<DemoStats>,
    healthy: Arc<AtomicBool>,
}

fn full(
    status: StatusCode,
    ctype: &'static str,
    body: impl Into<Bytes>,
    id: &str,
) -> Response<Body> {
    let mut r = Response::new(
        Full::new(body.into())
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(ctype),
    );
    if let Ok(v) = header::HeaderValue::from_str(id) {
        r.headers_mut().insert("x-server", v);
    }
    r
}

async fn handle(
    mut req: Request<Incoming>,
    ctx: Arc<Ctx>,
    tasks: TaskTracker,
    stop: CancellationToken,
) -> Result<Response<Body>, hyper::Error> {
    ctx.stats.requests.fetch_add(1, Relaxed);
    let path = req.uri().path().to_owned();
    if path == "/health" {
        let ok = ctx.healthy.load(Relaxed);
        let status = if ok {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        return Ok(full(
            status,
            "application/json",
            format!("{{\"healthy\":{ok}}}"),
            &ctx.id,
        ));
    }
    if path == "/stats" {
        let body = serde_json::json!({
            "server": ctx.id,
            "connections": ctx.stats.websockets.load(Relaxed),
            "websockets": ctx.stats.websockets.load(Relaxed),
            "matches": ctx.stats.match_count(),
            "requests": ctx.stats.requests.load(Relaxed),
        });
        return Ok(full(
            StatusCode::OK,
            "application/json",
            body.to_string(),
            &ctx.id,
        ));
    }
    if let Some(key) = req.headers().get("sec-websocket-key").cloned() {
        let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
        let on_upgrade = hyper::upgrade::on(&mut req);
        let stats = ctx.stats.clone();
        let match_id = match_of(req.uri());
        if let Some(m) = &match_id {
            stats.open_match(m);
        }
        stats.websockets.fetch_add(1, Relaxed);
        stats.websockets_total.fetch_add(1, Relaxed);
        tasks.spawn(async move {
            if let Ok(upgraded) = on_upgrade.await {
                // tungstenite zero-fills its whole read buffer (128 KiB by
                // default) before every read: that memset was 40 % of the
                // core the benchmark's backends share with the load generator
                let config = WebSocketConfig::default().read_buffer_size(4096);
                let ws = WebSocketStream::from_raw_socket(
                    TokioIo::new(upgraded),
                    Role::Server,
                    Some(config),
                )
                .await;
                tokio::select! {
                    _ = echo(ws, &stats) => {}
                    _ = stop.cancelled() => {}
                }
            }
            stats.websockets.fetch_sub(1, Relaxed);
            if let Some(m) = &match_id {
                stats.close_match(m);
            }
        });
        let mut r = full(
            StatusCode::SWITCHING_PROTOCOLS,
            "text/plain",
            Bytes::new(),
            &ctx.id,
        );
        r.headers_mut().remove(header::CONTENT_TYPE);
        let h = r.headers_mut();
        h.insert(
            header::CONNECTION,
            header::HeaderValue::from_static("Upgrade"),
        );
        h.insert(
            header::UPGRADE,
            header::HeaderValue::from_static("websocket"),
        );
        h.insert(
            "sec-websocket-accept",
            header::HeaderValue::from_str(&accept).expect("base64"),
        );
        return Ok(r);
    }
    if let Some(code) = path
        .rsplit_once("/status/")
        .and_then(|(_, c)| c.parse::<u16>().ok())
    {
        let status = StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_REQUEST);
        return Ok(full(
            status,
            "text/plain",
            format!("status {code}\n"),
            &ctx.id,
        ));
    }
    if let Some(ms) = path
        .rsplit_once("/slow/")
        .and_then(|(_, c)| c.parse::<u64>().ok())
    {
        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
        return Ok(full(StatusCode::OK, "text/plain", "slow\n", &ctx.id));
    }
    let has_body = !http_body::Body::is_end_stream(req.body());
    if has_body {
        // stream the body straight back: never buffered whole
        let ctype = req.headers().get(header::CONTENT_TYPE).cloned();
        let mut r = Response::new(req.into_body().boxed());
        if let Ok(v) = header::HeaderValue::from_str(&ctx.id) {
            r.headers_mut().insert("x-server", v);
        }
        if let Some(c) = ctype {
            r.headers_mut().insert(header::CONTENT_TYPE, c);
        }
        return Ok(r);
    }
    let headers: serde_json::Map<String, serde_json::Value> = req
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.to_string(),
                serde_json::Value::String(v.to_str().unwrap_or("").to_owned()),
            )
        })
        .collect();
    let body = serde_json::json!({
        "server": ctx.id,
        "method": req.method().as_str(),
        "uri": req.uri().to_string(),
        "version": format!("{:?}", req.version()),
        "headers": headers,
    });
    Ok(full(
        StatusCode::OK,
        "application/json",
        body.to_string(),
        &ctx.id,
    ))
}

async fn echo<S>(mut ws: WebSocketStream<S>, stats: &DemoStats)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    while let Some(msg) = ws.next().await {
        let Ok(msg) = msg else { return };
        stats.ws_messages.fetch_add(1, Relaxed);
        let reply = match msg {
            Message::Text(t) => {
                if let Some(rest) = t.as_str().strip_prefix("close:") {
                    let (code, reason) = rest.split_once(':').unwrap_or((rest, ""));
                    let code: u16 = code.parse().unwrap_or(1000);
                    let frame = CloseFrame {
                        code: CloseCode::from(code),
                        reason: reason.to_owned().into(),
                    };
                    let _ = ws.close(Some(frame)).await;
                    // wait for the peer's close reply
                    while let Some(Ok(_)) = ws.next().await {}
                    return;
                }
                Message::Text(t)
            }
            Message::Binary(b) => Message::Binary(b),
            Message::Close(_) => {
                // tungstenite answers the close with the same code
                let _ = ws.flush().await;
                while let Some(Ok(_)) = ws.next().await {}
                return;
            }
            _ => continue,
        };
        if ws.send(reply).await.is_err() {
            return;
        }
    }
}
