//! The request path, top to bottom: route → find the match id → choose a
//! server (affinity, sticky cookie or strategy) → connect and forward, or
//! tunnel an upgrade → account. A connect failure (nothing sent yet) is
//! retried on another server.

pub mod body;
pub mod error;
pub mod h1;
pub mod headers;
pub mod match_id;

use crate::affinity::{Existing, Hold, MatchLease, Placement};
use crate::app::{ConnCtx, Shared};
use crate::runtime::{PoolRuntime, Runtime, Upstream};
use crate::state::ConnGuard;
use crate::tunnel;
use body::{BodySlot, FromServer, ProxyBody, UpstreamBody};
use bytes::Bytes;
use error::ProxyError;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::Either;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

/// Header carrying a match's fencing token to its server.
pub const FENCING_HEADER: &str = "x-kp5-fencing-token";

/// Serves one request from hyper's HTTP/1.1 server (TLS, and plain
/// requests with a body or an upgrade).
pub fn handle(
    mut req: Request<Incoming>,
    ctx: Arc<ConnCtx>,
) -> impl std::future::Future<Output = Result<Response<ProxyBody>, Infallible>> + Send {
    use futures_util::FutureExt;
    let upgrade = req.version() == Version::HTTP_11 && headers::is_upgrade(req.headers());
    let on_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (parts, body) = req.into_parts();
    handle_parts(parts, BodySlot::new(Either::Left(body)), on_upgrade, ctx).map(Ok)
}

/// Serves one request taken apart: its head, its body (if any) and, for an
/// upgrade, the client's side of the connection to come.
///
/// Its future is moved into each HTTP/2 stream's state and lives as long
/// as the request, so it is kept small: the synchronous work is done here, and what follows
/// the exchange is a combinator (an `async` block would keep its own copy
/// of the future it awaits).
pub fn handle_parts(
    parts: http::request::Parts,
    body: BodySlot,
    on_upgrade: Option<hyper::upgrade::OnUpgrade>,
    ctx: Arc<ConnCtx>,
) -> impl std::future::Future<Output = Response<ProxyBody>> + Send {
    use futures_util::FutureExt;
    let rt = ctx.shared.runtime.load_full();
    let access = rt.config.log.access_log;
    let start = access.then(Instant::now);
    let head = access.then(|| (parts.method.clone(), parts.uri.clone()));
    let shared = ctx.shared.clone();
    let peer = ctx.peer;
    proxy(parts, body, on_upgrade, ctx, rt).map(move |result| {
        let resp = match result {
            Ok(r) => r,
            Err(e) => error_response(&shared, &e),
        };
        let status = resp.status().as_u16();
        shared.counters.requests[(status / 100).clamp(1, 5) as usize - 1].fetch_add(1, Relaxed);
        if let (Some((method, uri)), Some(start)) = (head, start) {
            tracing::info!(
                target: "access",
                client = %peer,
                %method,
                %uri,
                status,
                ms = start.elapsed().as_secs_f64() * 1e3,
            );
        }
        resp
    })
}

fn error_response(shared: &Shared, e: &ProxyError) -> Response<ProxyBody> {
    let status = e.status();
    match e.source_side() {
        error::ErrorSource::Upstream => tracing::warn!(error = %e, "upstream error"),
        _ => tracing::debug!(error = %e, "request refused"),
    }
    let body = serde_json::json!({ "error": e.to_string(), "status": status.as_u16() });
    let mut resp = Response::new(ProxyBody::text(body.to_string()));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if status == StatusCode::SERVICE_UNAVAILABLE {
        shared.counters.no_capacity.fetch_add(1, Relaxed);
        h.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    resp
}

/// Where one attempt goes.
struct Choice<'rt> {
    upstream: &'rt Upstream,
    lease: Option<MatchLease>,
    set_cookie: bool,
}

async fn choose<'rt>(
    shared: &Shared,
    pool: &'rt PoolRuntime,
    match_id: Option<&str>,
    sticky: Option<&str>,
    exclude: Option<&str>,
    now: u64,
) -> Result<Choice<'rt>, ProxyError> {
    if let Some(id) = match_id {
        // the match's owner takes the connection while it lives and has room
        let check = |s: &crate::state::ServerState| match pool.find(&s.id) {
            Some(u) if s.alive(now) && exclude != Some(&*s.id) => {
                if pool.has_room(u) {
                    Existing::Use
                } else {
                    Existing::Full
                }
            }
            _ => Existing::Gone,
        };
        let lease = match &shared.cluster {
            Some(cluster) => {
                // boxed: the Redis path would otherwise size every request's future
                Box::pin(place_in_cluster(
                    shared, cluster, pool, id, check, exclude, now,
                ))
                .await?
            }
            None => {
                let pick = || pick_new_match(pool, exclude, now).map(|u| u.state.clone());
                let grace = pool.cfg.match_grace.as_millis() as u64;
                match shared.affinity.place(&pool.name, id, grace, check, pick) {
                    Placement::Placed(lease) => lease,
                    Placement::Full | Placement::NoServer => return Err(ProxyError::NoCapacity),
                }
            }
        };
        let upstream = pool
            .find(&lease.server().id)
            .ok_or(ProxyError::NoCapacity)?;
        return Ok(Choice {
            upstream,
            lease: Some(lease),
            set_cookie: false,
        });
    }
    if let Some(u) = sticky.and_then(|id| pool.find(id)) {
        if u.state.alive(now) && pool.has_room(u) && exclude != Some(&*u.state.id) {
            return Ok(Choice {
                upstream: u,
                lease: None,
                set_cookie: false,
            });
        }
    }
    let upstream = pool.pick(now, false).ok_or(ProxyError::NoCapacity)?;
    Ok(Choice {
        upstream,
        lease: None,
        set_cookie: pool.cfg.sticky_cookie.is_some(),
    })
}

/// The strategy's choice for a new match, avoiding a server that just
/// refused a connection.
fn pick_new_match<'rt>(
    pool: &'rt PoolRuntime,
    exclude: Option<&str>,
    now: u64,
) -> Option<&'rt Upstream> {
    let u = pool.pick(now, true)?;
    if exclude != Some(&*u.state.id) {
        return Some(u);
    }
    // one more draw; the excluded server is usually the only one skipped
    pool.servers
        .iter()
        .filter(|o| exclude != Some(&*o.state.id) && pool.eligible(o, now, true))
        .min_by_key(|o| crate::balance::Load::matches(*o))
}

/// Places a connection of match `id` with the Redis registry: the owner
/// known here, else the owner Redis holds, else this proxy's candidate,
/// claimed atomically. A dead owner is replaced with its fencing token, so
/// concurrent proxies replace it once. Without Redis: rendezvous hashing.
async fn place_in_cluster(
    shared: &Shared,
    cluster: &crate::cluster::Cluster,
    pool: &PoolRuntime,
    id: &str,
    check: impl Fn(&crate::state::ServerState) -> Existing,
    exclude: Option<&str>,
    now: u64,
) -> Result<MatchLease, ProxyError> {
    let grace = pool.cfg.match_grace.as_millis() as u64;
    let mut replace = match shared.affinity.hold(&pool.name, id, &check) {
        Hold::Use(lease) => return Ok(lease),
        Hold::Full => return Err(ProxyError::NoCapacity),
        Hold::Missing => None,
        Hold::Gone { token } => Some(token).filter(|&t| t != 0),
    };
    if cluster.is_up() {
        let ttl = crate::cluster::claim::ttl(pool.cfg.match_grace);
        // at most: adopt a dead owner's token, then replace it
        for _ in 0..3 {
            let candidate = pick_new_match(pool, exclude, now);
            let claimed = match cluster
                .claim(
                    &pool.name,
                    id,
                    candidate.map(|u| &*u.state.id),
                    replace,
                    ttl,
                )
                .await
            {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(match_id = id, error = %e, "match claim failed; placing by rendezvous hashing");
                    break;
                }
            };
            let Some(owner) = pool.find(&claimed.server) else {
                if claimed.server.is_empty() {
                    return Err(ProxyError::NoCapacity);
                }
                // owned by a server this proxy does not know: one that has
                // just registered (its heartbeat is on the way) keeps the
                // match; one without a live record is gone
                if cluster.registered(&claimed.server).await.unwrap_or(false) {
                    tracing::info!(match_id = id, server = %claimed.server, "match owned by a server not known here yet");
                    return Err(ProxyError::NoCapacity);
                }
                replace = Some(claimed.token);
                continue;
            };
            if claimed.won {
                owner.state.note_new_match();
                if !claimed.previous.is_empty() {
                    tracing::info!(match_id = id, from = %claimed.previous, to = %claimed.server, token = claimed.token, "match reassigned");
                }
            } else {
                match check(&owner.state) {
                    Existing::Use => {}
                    Existing::Full => return Err(ProxyError::NoCapacity),
                    Existing::Gone => {
                        replace = Some(claimed.token);
                        continue;
                    }
                }
            }
            return Ok(shared.affinity.adopt(
                &pool.name,
                id,
                owner.state.clone(),
                claimed.token,
                grace,
            ));
        }
        if cluster.is_up() {
            return Err(ProxyError::NoCapacity);
        }
    }
    // Redis is away: every proxy with the same view picks the same server
    let i = crate::cluster::rendezvous::choose(
        id,
        pool.servers
            .iter()
            .enumerate()
            .filter(|(_, u)| exclude != Some(&*u.state.id) && pool.eligible(u, now, true))
            .map(|(i, u)| (i, &*u.state.id, u.weight)),
    )
    .ok_or(ProxyError::NoCapacity)?;
    let u = &pool.servers[i];
    u.state.note_new_match();
    cluster.counters.degraded_placements.fetch_add(1, Relaxed);
    Ok(shared
        .affinity
        .adopt(&pool.name, id, u.state.clone(), 0, grace))
}

fn host_without_port(h: &str) -> &str {
    if h.starts_with('[') {
        return h.split_once(']').map_or(h, |(a, _)| &a[1..]);
    }
    h.rsplit_once(':').map_or(h, |(a, _)| a)
}

async fn proxy(
    mut parts: http::request::Parts,
    body: BodySlot,
    mut on_upgrade: Option<hyper::upgrade::OnUpgrade>,
    ctx: Arc<ConnCtx>,
    rt: Arc<Runtime>,
) -> Result<Response<ProxyBody>, ProxyError> {
    let (ctx, rt) = (&*ctx, &*rt);
    let shared = &*ctx.shared;
    let settings = &rt.config.proxy;
    // HTTP/2 names the host in :authority; HTTP/1.1 in Host
    let host = match parts.headers.get(header::HOST) {
        Some(h) => h.to_str().ok(),
        None => parts.uri.authority().map(|a| a.as_str()),
    }
    .map(host_without_port);
    let pool = rt
        .route(host, parts.uri.path())
        .ok_or(ProxyError::NoRoute)?;

    let upgrade = on_upgrade.is_some();
    let websocket = upgrade && headers::is_websocket(&parts.headers);
    let match_id = match_id::extract(
        &pool.cfg.match_id,
        parts.uri.path(),
        parts.uri.query(),
        &parts.headers,
    )
    .map(|id| id.into_owned());
    let sticky = match (&pool.cfg.sticky_cookie, &match_id) {
        (Some(name), None) => headers::cookie(&parts.headers, name).map(str::to_owned),
        _ => None,
    };

    headers::strip_hop_by_hop(&mut parts.headers, upgrade);
    if upgrade {
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    if !parts.headers.contains_key(header::HOST) {
        if let Some(h) = parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        {
            parts.headers.insert(header::HOST, h);
        }
    }
    headers::add_forwarded(
        &mut parts.headers,
        settings.forwarded,
        &ctx.client,
        ctx.scheme,
    );
    let path = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
    let idempotent = matches!(
        parts.method,
        http::Method::GET
            | http::Method::HEAD
            | http::Method::OPTIONS
            | http::Method::PUT
            | http::Method::DELETE
    ) && !upgrade;

    let mut attempt = 0;
    let mut refused: Option<Arc<str>> = None;
    loop {
        attempt += 1;
        let now = shared.clock.now_ms();
        let choice = choose(
            shared,
            pool,
            match_id.as_deref(),
            sticky.as_deref(),
            refused.as_deref(),
            now,
        )
        .await?;
        let upstream = choice.upstream;
        let guard = ConnGuard::new(upstream.state.clone());
        upstream.state.requests.fetch_add(1, Relaxed);

        // a pool whose servers speak TLS: https/wss over its own client
        let backend_tls = match &pool.cfg.backend_tls {
            Some(_) => Some(
                shared
                    .tls
                    .backend(&pool.name)
                    .ok_or_else(|| ProxyError::Connect {
                        server: upstream.state.id.to_string(),
                        reason: "the pool's TLS client is not ready".into(),
                    })?,
            ),
            None => None,
        };
        let fencing = choice.lease.as_ref().map(|l| l.token()).filter(|&t| t != 0);

        let started = Instant::now();
        // a plain upgrade from a plain client: our client, and the raw
        // connection becomes the tunnel's server side
        let mut raw = None;
        let result = match (upgrade, backend_tls.as_deref()) {
            (false, None) if body.is_empty() => {
                send_h1(shared, rt, outgoing(&parts, &path, fencing), upstream).await
            }
            (false, None) => {
                // a body is written while the response is read: hyper's client
                let req = hyper_request(&parts, &path, &body, fencing, upstream, false)?;
                send(rt, shared.client.request(req), upstream).await
            }
            (true, None) if ctx.scheme == "http" && body.is_empty() => {
                upgrade_h1(shared, rt, outgoing(&parts, &path, fencing), upstream)
                    .await
                    .map(|(resp, r)| {
                        raw = r;
                        resp
                    })
            }
            (true, tls) => {
                let req = hyper_request(&parts, &path, &body, fencing, upstream, tls.is_some())?;
                Box::pin(send_upgrade(rt, req, upstream, tls)).await
            }
            (false, Some(tls)) => {
                let req = hyper_request(&parts, &path, &body, fencing, upstream, true)?;
                send(rt, tls.http.request(req), upstream).await
            }
        };
        let finished = Instant::now();
        let now = shared.clock.ms_at(finished);
        let resp = match result {
            Ok(resp) => resp,
            Err(e) => {
                let passive = &pool.cfg.passive;
                if e.retryable() {
                    upstream.state.record_connect_failure(passive, now);
                    refused = Some(upstream.state.id.clone());
                } else {
                    upstream.state.record_upstream_error(passive, now);
                }
                drop(choice.lease);
                // connect failures never reached the server; an idempotent
                // request without a body may also be repeated after a reset
                let repeatable = e.retryable()
                    || (matches!(e, ProxyError::Upstream { .. }) && idempotent && body.is_empty());
                if repeatable && attempt <= settings.retries && body.intact() {
                    tracing::warn!(server = %upstream.state.id, error = %e, attempt, "retrying on another server");
                    continue;
                }
                return Err(e);
            }
        };
        upstream.state.record_response(
            resp.status().as_u16(),
            finished.duration_since(started).as_micros() as u64,
            &pool.cfg.passive,
            now,
        );

        let mut resp = resp;
        let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
        let server_side = switching.then(|| match raw.take() {
            Some((stream, early)) => ServerSide::Raw(stream, early),
            None => ServerSide::Hyper(hyper::upgrade::on(&mut resp)),
        });
        let (mut head, incoming) = resp.into_parts();
        if let Some(server_side) = server_side {
            let Some(client_side) = on_upgrade.take() else {
                return Err(ProxyError::Upstream {
                    server: upstream.state.id.to_string(),
                    reason: "101 to a request that asked for no upgrade".into(),
                });
            };
            spawn_tunnel(
                shared,
                rt,
                (client_side, server_side),
                ctx.scheme == "http" && backend_tls.is_none(),
                guard,
                choice.lease,
                websocket,
            );
            headers::strip_hop_by_hop(&mut head.headers, true);
            head.headers
                .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            return Ok(Response::from_parts(head, ProxyBody::empty()));
        }
        headers::strip_hop_by_hop(&mut head.headers, false);
        if choice.set_cookie {
            if let Some(name) = &pool.cfg.sticky_cookie {
                let v = format!(
                    "{name}={}; Path=/; HttpOnly; SameSite=Lax",
                    upstream.state.id
                );
                if let Ok(v) = HeaderValue::from_str(&v) {
                    head.headers.append(header::SET_COOKIE, v);
                }
            }
        }
        let body = ProxyBody::Upstream {
            body: incoming,
            guard: Some(guard),
            lease: choice.lease,
        };
        return Ok(Response::from_parts(head, body));
    }
}

/// The request as hyper's client takes it: absolute URI, fencing token.
fn hyper_request(
    parts: &http::request::Parts,
    path: &http::uri::PathAndQuery,
    body: &BodySlot,
    fencing: Option<u64>,
    upstream: &Upstream,
    tls: bool,
) -> Result<Request<UpstreamBody>, ProxyError> {
    let uri = Uri::builder()
        .scheme(if tls { "https" } else { "http" })
        .authority(upstream.address.clone())
        .path_and_query(path.clone())
        .build()
        .map_err(|_| ProxyError::BadRequest("unusable request target"))?;
    let mut req = Request::new(body.body());
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = uri;
    *req.version_mut() = Version::HTTP_11;
    *req.headers_mut() = parts.headers.clone();
    if let Some(token) = fencing {
        // lets the match server refuse requests of a match it lost
        req.headers_mut()
            .insert(FENCING_HEADER, HeaderValue::from(token));
    }
    Ok(req)
}

/// The request as our HTTP/1.1 client takes it.
fn outgoing<'a>(
    parts: &'a http::request::Parts,
    path: &'a http::uri::PathAndQuery,
    fencing: Option<u64>,
) -> h1::Outgoing<'a> {
    h1::Outgoing {
        method: &parts.method,
        target: path.as_str(),
        headers: &parts.headers,
        fencing,
    }
}

/// A plain HTTP exchange without a body, with our own HTTP/1.1 client and
/// its keep-alive pool.
async fn send_h1(
    shared: &Shared,
    rt: &Runtime,
    req: h1::Outgoing<'_>,
    upstream: &Upstream,
) -> Result<Response<FromServer>, ProxyError> {
    let timeout = rt.config.proxy.upstream_timeout;
    // built in a statement of its own: a future made and moved in the
    // awaiting one would keep its bytes in this one's state while it runs
    let sent = shared.h1.send(&upstream.address, req, timeout);
    match sent.await {
        Ok(resp) => Ok(resp.map(FromServer::H1)),
        Err(e) => Err(h1_error(e, upstream.state.id.to_string(), timeout)),
    }
}

/// Our client's exchange within `upstream_timeout`, its errors as the
/// request path's.
///
/// A combinator, not an `async fn` or block: those keep what they were
/// given (an argument, a capture) besides the copy they await, and this
/// future is most of every request's state.
fn h1_within_timeout<'a, T>(
    rt: &Runtime,
    upstream: &'a Upstream,
    sent: impl std::future::Future<Output = Result<T, h1::SendError>> + 'a,
) -> impl std::future::Future<Output = Result<T, ProxyError>> + 'a {
    use futures_util::FutureExt;
    let timeout = rt.config.proxy.upstream_timeout;
    tokio::time::timeout(timeout, sent).map(move |r| {
        let server = || upstream.state.id.to_string();
        match r {
            Err(_) => Err(ProxyError::Timeout {
                server: server(),
                timeout,
            }),
            Ok(Err(e)) => Err(h1_error(e, server(), timeout)),
            Ok(Ok(v)) => Ok(v),
        }
    })
}

/// An upgrade request over our own client: on 101, the server's raw
/// connection and the bytes that came after its head.
async fn upgrade_h1(
    shared: &Shared,
    rt: &Runtime,
    req: h1::Outgoing<'_>,
    upstream: &Upstream,
) -> Result<(Response<FromServer>, Option<(TcpStream, Bytes)>), ProxyError> {
    let sent = h1_within_timeout(rt, upstream, shared.h1.upgrade(&upstream.address, req));
    Ok(match sent.await? {
        h1::Upgrade::Switched {
            response,
            stream,
            early,
        } => (response.map(FromServer::H1), Some((stream, early))),
        h1::Upgrade::Answered(response) => (response.map(FromServer::H1), None),
    })
}

fn h1_error(e: h1::SendError, server: String, timeout: Duration) -> ProxyError {
    match e {
        h1::SendError::Connect(reason) => ProxyError::Connect { server, reason },
        h1::SendError::Upstream(reason) => ProxyError::Upstream { server, reason },
        h1::SendError::Timeout => ProxyError::Timeout { server, timeout },
    }
}

/// An HTTP exchange over one of hyper's keep-alive clients: requests with a
/// body to plain backends, everything to TLS backends.
async fn send(
    rt: &Runtime,
    sent: hyper_util::client::legacy::ResponseFuture,
    upstream: &Upstream,
) -> Result<Response<FromServer>, ProxyError> {
    let timeout = rt.config.proxy.upstream_timeout;
    match tokio::time::timeout(timeout, sent).await {
        Err(_) => Err(ProxyError::Timeout {
            server: upstream.state.id.to_string(),
            timeout,
        }),
        Ok(Err(e)) if e.is_connect() => Err(ProxyError::Connect {
            server: upstream.state.id.to_string(),
            reason: error_chain(&e),
        }),
        Ok(Err(e)) => Err(ProxyError::Upstream {
            server: upstream.state.id.to_string(),
            reason: error_chain(&e),
        }),
        Ok(Ok(resp)) => Ok(resp.map(FromServer::Hyper)),
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

/// An upgrade request goes over a connection of its own (TLS where the
/// pool's servers speak it), which becomes the tunnel's server side if the
/// server answers 101.
async fn send_upgrade(
    rt: &Runtime,
    mut req: Request<UpstreamBody>,
    upstream: &Upstream,
    tls: Option<&crate::tls::BackendClient>,
) -> Result<Response<FromServer>, ProxyError> {
    // a direct connection speaks origin-form: "GET /path HTTP/1.1"
    let origin = req
        .uri()
        .path_and_query()
        .cloned()
        .map(Uri::from)
        .unwrap_or_else(|| Uri::from_static("/"));
    *req.uri_mut() = origin;
    let settings = &rt.config.proxy;
    let server = || upstream.state.id.to_string();
    let connect_failed = |reason: String| ProxyError::Connect {
        server: server(),
        reason,
    };
    let connecting = async {
        let stream = TcpStream::connect(upstream.address.as_str())
            .await
            .map_err(|e| e.to_string())?;
        let _ = stream.set_nodelay(true);
        Ok::<_, String>(stream)
    };
    let stream = match tokio::time::timeout(settings.connect_timeout, connecting).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(connect_failed(e)),
        Err(_) => return Err(connect_failed("connect timed out".into())),
    };
    let Some(tls) = tls else {
        return exchange(TokioIo::new(stream), req, settings, upstream).await;
    };
    // boxed: the TLS handshake's state is large and plain upgrades need not carry it
    Box::pin(async move {
        let name = tls.name_for(&upstream.address).map_err(connect_failed)?;
        let handshake = tls.connector.connect(name, stream);
        match tokio::time::timeout(settings.connect_timeout, handshake).await {
            Ok(Ok(s)) => exchange(TokioIo::new(s), req, settings, upstream).await,
            // the request was not sent: another server may take it
            Ok(Err(e)) => Err(connect_failed(format!("TLS handshake: {e}"))),
            Err(_) => Err(connect_failed("TLS handshake timed out".into())),
        }
    })
    .await
}

/// One HTTP/1.1 exchange on a fresh connection, kept for the upgrade.
async fn exchange<I>(
    io: I,
    req: Request<UpstreamBody>,
    settings: &crate::config::ProxySettings,
    upstream: &Upstream,
) -> Result<Response<FromServer>, ProxyError>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let server = || upstream.state.id.to_string();
    let (mut sender, conn) = hyper::client::conn::http1::Builder::new()
        .handshake::<_, UpstreamBody>(io)
        .await
        .map_err(|e| ProxyError::Upstream {
            server: server(),
            reason: e.to_string(),
        })?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, "upgrade connection to server ended");
        }
    });
    match tokio::time::timeout(settings.upstream_timeout, sender.send_request(req)).await {
        Err(_) => Err(ProxyError::Timeout {
            server: server(),
            timeout: settings.upstream_timeout,
        }),
        Ok(Err(e)) => Err(ProxyError::Upstream {
            server: server(),
            reason: error_chain(&e),
        }),
        Ok(Ok(resp)) => Ok(resp.map(FromServer::Hyper)),
    }
}

/// The server side of a tunnel: hyper's upgraded connection (TLS backends,
/// TLS clients) or the raw socket our client kept.
enum ServerSide {
    Hyper(hyper::upgrade::OnUpgrade),
    Raw(TcpStream, Bytes),
}

fn spawn_tunnel(
    shared: &Shared,
    rt: &Runtime,
    (client, server): (hyper::upgrade::OnUpgrade, ServerSide),
    plain: bool,
    mut guard: ConnGuard,
    lease: Option<MatchLease>,
    websocket: bool,
) {
    guard.mark_websocket();
    let counters = shared.counters.clone();
    counters.websockets_total.fetch_add(1, Relaxed);
    counters.websockets_active.fetch_add(1, Relaxed);
    let opts = tunnel::Options {
        idle_timeout: rt.config.proxy.tunnel_idle_timeout,
        send_timeout: rt.config.proxy.send_timeout,
        websocket,
        count_into: Some((guard.server().clone(), counters.clone())),
    };
    let close = shared.close_tunnels.clone();
    shared.tunnels.spawn(async move {
        let _lease = lease;
        let server_id = guard.server().id.clone();
        let ended = |sum: tunnel::Summary| {
            tracing::debug!(server = %server_id, end = ?sum.end, up = sum.bytes_up, down = sum.bytes_down, "tunnel closed");
            if sum.end == tunnel::End::Stalled {
                counters.send_timeouts.fetch_add(1, Relaxed);
            }
        };
        let server = match server {
            ServerSide::Raw(stream, early) => Ok(Raw(stream, early)),
            ServerSide::Hyper(on) => on.await.map(Upgraded),
        };
        match (client.await, server) {
            (Ok(c), Ok(Raw(s, s_early))) => match client_socket(c) {
                Ok((c, c_early)) => {
                    ended(tunnel::run(c, c_early, s, s_early, opts, close).await);
                }
                Err(_) => tracing::error!(server = %server_id, "upgraded client connection is not a TCP stream; closing"),
            },
            (Ok(c), Ok(Upgraded(s))) if plain => {
                match (client_socket(c), s.downcast::<TokioIo<TcpStream>>()) {
                    (Ok((c, c_early)), Ok(s)) => {
                        // move the read-ahead buffers in, so nothing of hyper's outlives the handshake
                        ended(tunnel::run(c, c_early, s.io.into_inner(), s.read_buf, opts, close).await);
                    }
                    _ => tracing::error!(server = %server_id, "upgraded connection is not a TCP stream; closing"),
                }
            }
            (Ok(c), Ok(Upgraded(s))) => {
                // TLS on either side: relay through the streams' own buffers.
                // Boxed, so the raw-socket tunnels above do not carry its size.
                ended(Box::pin(tunnel::run_streams(TokioIo::new(c), TokioIo::new(s), opts, close)).await);
            }
            (c, s) => {
                if let Err(e) = c.and(s.map(|_| ())) {
                    tracing::debug!(server = %server_id, error = %e, "upgrade did not complete");
                }
            }
        }
        counters.websockets_active.fetch_sub(1, Relaxed);
        drop(guard);
    });
}

/// The socket under a plain client's upgraded connection, and the bytes
/// read from it but not consumed: those hyper read ahead, then those our
/// server loop read before it handed the connection over.
fn client_socket(
    c: hyper::upgrade::Upgraded,
) -> Result<(TcpStream, Bytes), hyper::upgrade::Upgraded> {
    let c = c.downcast::<TokioIo<crate::server::Prefixed>>()?;
    let (stream, unread) = c.io.into_inner().into_parts();
    let early = match (c.read_buf.is_empty(), unread.is_empty()) {
        (_, true) => c.read_buf,
        (true, false) => unread,
        (false, false) => [c.read_buf, unread].concat().into(),
    };
    Ok((stream, early))
}

/// A tunnel's server side once connected.
enum Connected {
    Raw(TcpStream, Bytes),
    Upgraded(hyper::upgrade::Upgraded),
}
use Connected::{Raw, Upgraded};
