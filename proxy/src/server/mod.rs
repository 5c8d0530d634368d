//! Client-facing listeners: accept (errors are logged and backed off, never
//! fatal), tell HTTP/2 prior knowledge from HTTP/1.1 by its preface, and serve
//! the connection with the timeouts and limits of `[proxy]`.

mod h1;
mod h2;
pub use h1::Prefixed;

use crate::app::{ConnCtx, Shared};
use crate::forward;
use crate::send_timeout::SendTimeout;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Binds with SO_REUSEADDR and a deep backlog.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    TcpListener::from_std(socket.into())
}

/// Accepts until `accept_stop` (this listener removed, or shutdown); the
/// connections it spawns finish gracefully on `shutdown` only, so removing a
/// listener leaves its open connections alone.
pub async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    accept_stop: CancellationToken,
    shutdown: CancellationToken,
    conns: TaskTracker,
    tls: bool,
) {
    let stop = accept_stop;
    let mut backoff = Duration::from_millis(5);
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = stop.cancelled() => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff = Duration::from_millis(5);
                let _ = stream.set_nodelay(true);
                let scheme = if tls { "https" } else { "http" };
                let ctx = Arc::new(ConnCtx::new(shared.clone(), peer, scheme));
                conns.spawn(serve(stream, ctx, shutdown.clone(), tls));
            }
            Err(e) => {
                // EMFILE and friends: wait and try again, never give up the listener
                tracing::warn!(error = %e, ?backoff, "accept failed");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.cancelled() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}

pub(crate) use kp5_shared::http::until_done;

/// Waits (within the header timeout) until the first bytes tell HTTP/2 from HTTP/1.
async fn is_h2(stream: &TcpStream) -> std::io::Result<Option<bool>> {
    let mut buf = [0u8; H2_PREFACE.len()];
    loop {
        let n = stream.peek(&mut buf).await?;
        if n == 0 {
            return Ok(None);
        }
        if buf[..n] != H2_PREFACE[..n] {
            return Ok(Some(false));
        }
        if n == H2_PREFACE.len() {
            return Ok(Some(true));
        }
        // a partial preface: wait for more instead of spinning on peek
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn serve(stream: TcpStream, ctx: Arc<ConnCtx>, stop: CancellationToken, tls: bool) {
    let counters = ctx.shared.counters.clone();
    counters.connections_total.fetch_add(1, Relaxed);
    counters.connections_active.fetch_add(1, Relaxed);
    if tls {
        // boxed: a TLS connection's state is large, plain connections need not carry it
        Box::pin(serve_tls(stream, ctx, stop)).await;
    } else {
        serve_plain(stream, ctx, stop).await;
    }
    counters.connections_active.fetch_sub(1, Relaxed);
}

async fn serve_plain(mut stream: TcpStream, ctx: Arc<ConnCtx>, stop: CancellationToken) {
    let settings = ctx.shared.runtime.load().config.proxy.clone();
    let h2 = match tokio::time::timeout(settings.header_read_timeout, is_h2(&stream)).await {
        Ok(Ok(Some(h2))) => h2,
        Ok(Ok(None)) | Ok(Err(_)) => return,
        Err(_) => {
            tracing::debug!(peer = %ctx.peer, "no request within the header timeout");
            return;
        }
    };
    if h2 {
        let io = SendTimeout::new(stream, settings.send_timeout);
        h2::serve(io, ctx, &stop, &settings).await;
        return;
    }
    // ours for the common request; hyper's from the first one it is not
    match h1::serve(&mut stream, &ctx, &stop, &settings).await {
        h1::End::Closed => {}
        h1::End::HandOver(read) => {
            let io = TokioIo::new(Prefixed::new(read, stream, settings.send_timeout));
            serve_http1(io, ctx, stop, &settings).await;
        }
    }
}

/// The TLS handshake (within the header timeout), then HTTP/2 or HTTP/1.1
/// as ALPN agreed.
async fn serve_tls(stream: TcpStream, ctx: Arc<ConnCtx>, stop: CancellationToken) {
    let settings = ctx.shared.runtime.load().config.proxy.clone();
    let tls = &ctx.shared.tls;
    let Some(acceptor) = tls.acceptor() else {
        return;
    };
    // under TLS: its own writes (the handshake, close_notify) are timed too
    let stream = SendTimeout::new(stream, settings.send_timeout);
    let stream =
        match tokio::time::timeout(settings.header_read_timeout, acceptor.accept(stream)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                tls.handshakes_failed.fetch_add(1, Relaxed);
                tracing::debug!(peer = %ctx.peer, error = %e, "TLS handshake failed");
                return;
            }
            Err(_) => {
                tls.handshakes_failed.fetch_add(1, Relaxed);
                tracing::debug!(peer = %ctx.peer, "no TLS handshake within the header timeout");
                return;
            }
        };
    tls.handshakes_ok.fetch_add(1, Relaxed);
    if stream.get_ref().1.alpn_protocol() == Some(crate::tls::H2) {
        h2::serve(stream, ctx, &stop, &settings).await;
    } else {
        serve_http1(TokioIo::new(stream), ctx, stop, &settings).await;
    }
}

/// An HTTP/1.1 connection on hyper's server (from its first request with
/// a body or an upgrade, or over TLS).
async fn serve_http1<I>(
    io: I,
    ctx: Arc<ConnCtx>,
    stop: CancellationToken,
    settings: &crate::config::ProxySettings,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let peer = ctx.peer;
    let counters = ctx.shared.counters.clone();
    let svc = service_fn(move |req| forward::handle(req, ctx.clone()));
    let mut b = hyper::server::conn::http1::Builder::new();
    b.timer(TokioTimer::new())
        .header_read_timeout(settings.header_read_timeout)
        .max_buf_size(settings.max_header_bytes)
        .keep_alive(true);
    let conn = b.serve_connection(io, svc).with_upgrades();
    if let Err(e) = until_done(conn, &stop, |c| c.graceful_shutdown()).await {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
        count_stall(&counters, &e);
    }
}

/// Counts a connection that ended at the send timeout.
fn count_stall(counters: &crate::app::Counters, e: &(dyn std::error::Error + 'static)) {
    if crate::send_timeout::is_stall(e) {
        counters.send_timeouts.fetch_add(1, Relaxed);
    }
}
