//! Client-facing listeners: accept (errors are logged and backed off, never
//! fatal), tell HTTP/2 prior knowledge from HTTP/1.1 by its preface, and serve
//! the connection with the timeouts and limits of `[proxy]`.

mod h1;
pub use h1::Prefixed;

use crate::app::{ConnCtx, Shared};
use crate::clock::{coarse_ms, instant_at};
use crate::forward;
use crate::send_timeout::SendTimeout;
use futures_util::stream::{FuturesUnordered, StreamExt};
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::task::{Context, Poll};
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
        serve_http(TokioIo::new(io), true, ctx, stop, &settings).await;
        return;
    }
    // ours for the common request; hyper's from the first one it is not
    match h1::serve(&mut stream, &ctx, &stop, &settings).await {
        h1::End::Closed => {}
        h1::End::HandOver(read) => {
            let io = TokioIo::new(Prefixed::new(read, stream, settings.send_timeout));
            serve_http(io, false, ctx, stop, &settings).await;
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
    let h2 = stream.get_ref().1.alpn_protocol() == Some(crate::tls::H2);
    serve_http(TokioIo::new(stream), h2, ctx, stop, &settings).await;
}

async fn serve_http<I>(
    io: I,
    h2: bool,
    ctx: Arc<ConnCtx>,
    stop: CancellationToken,
    settings: &crate::config::ProxySettings,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let peer = ctx.peer;
    let counters = ctx.shared.counters.clone();
    let svc = service_fn(move |req| forward::handle(req, ctx.clone()));
    if h2 {
        let streams = StreamSet::default();
        let mut b = hyper::server::conn::http2::Builder::new(streams.clone());
        // no keep-alive pings (hyper's cost a timer poll and a lock on every
        // wake-up): idle connections are closed by the driver's IdleClose
        b.timer(TokioTimer::new())
            .max_header_list_size(settings.max_header_bytes as u32);
        let last_read = Arc::new(AtomicU64::new(coarse_ms()));
        let io = H2Socket {
            io,
            last_read: last_read.clone(),
        };
        let conn = H2Driver {
            conn: Box::pin(b.serve_connection(io, svc)),
            streams,
            running: FuturesUnordered::new(),
            done: None,
            idle: IdleClose::new(settings.idle_timeout, last_read),
            graceful: |c| c.graceful_shutdown(),
            closing: false,
        };
        if let Err(e) = until_done(conn, &stop, |d| d.connection().graceful_shutdown()).await {
            tracing::debug!(%peer, error = %e, "h2 connection ended with an error");
            count_stall(&counters, &e);
        }
    } else {
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
}

/// Counts a connection that ended at the send timeout.
fn count_stall(counters: &crate::app::Counters, e: &(dyn std::error::Error + 'static)) {
    if crate::send_timeout::is_stall(e) {
        counters.send_timeouts.fetch_add(1, Relaxed);
    }
}

type StreamFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The executor of an HTTP/2 connection's streams: instead of a task each,
/// they run inside the connection's own task ([`H2Driver`]). hyper hands
/// them over while the connection is polled; they wait here until then.
#[derive(Clone, Default)]
struct StreamSet(Arc<std::sync::Mutex<Vec<StreamFuture>>>);

impl<F> hyper::rt::Executor<F> for StreamSet
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, fut: F) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Box::pin(fut));
    }
}

/// Drives an HTTP/2 connection and its streams in one task. Each wake-up
/// first polls the streams, so every response that is ready queues its
/// frames, then the connection, which writes them all in one flush (with a
/// task per stream, hyper flushed about once per response: 0.92 `writev`
/// per request under h2load against HAProxy's batched 0.18). Streams
/// accepted during that poll start at once. A connection idle for the idle
/// timeout is shut down gracefully ([`IdleClose`]).
struct H2Driver<C: Future> {
    conn: Pin<Box<C>>,
    streams: StreamSet,
    running: FuturesUnordered<StreamFuture>,
    done: Option<C::Output>,
    idle: IdleClose,
    /// Starts the connection's graceful shutdown (a GOAWAY).
    graceful: fn(Pin<&mut C>),
    /// The idle close has begun.
    closing: bool,
}

impl<C: Future> H2Driver<C> {
    fn connection(self: Pin<&mut Self>) -> Pin<&mut C> {
        self.get_mut().conn.as_mut()
    }
}

// the connection is pinned in its box; nothing else is pinned
impl<C: Future> Unpin for H2Driver<C> {}

impl<C: Future> Future for H2Driver<C> {
    type Output = C::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<C::Output> {
        let this = self.get_mut();
        loop {
            this.running.extend(
                this.streams
                    .0
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .drain(..),
            );
            let had = !this.running.is_empty();
            while let Poll::Ready(Some(())) = this.running.poll_next_unpin(cx) {}
            if had && this.running.is_empty() {
                // the idle time runs from the last stream's end
                this.idle.last_stream = coarse_ms();
            }
            if this.done.is_none() {
                if let Poll::Ready(out) = this.conn.as_mut().poll(cx) {
                    this.done = Some(out);
                }
            }
            let accepted = !this
                .streams
                .0
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_empty();
            if accepted {
                continue;
            }
            // the connection is over once its last stream is
            if this.running.is_empty() {
                if let Some(out) = this.done.take() {
                    return Poll::Ready(out);
                }
            }
            if this.done.is_none()
                && !this.closing
                && this.idle.expired(cx, !this.running.is_empty())
            {
                tracing::debug!("closing an idle HTTP/2 connection");
                this.closing = true;
                (this.graceful)(this.conn.as_mut());
                // polled again: the GOAWAY is written, and with no stream
                // open the connection ends
                continue;
            }
            return Poll::Pending;
        }
    }
}

/// The idle timeout of an HTTP/2 connection: closed once it has had no
/// stream in flight and received nothing for `idle_timeout_ms` (nginx's
/// `keepalive_timeout` for HTTP/2, HAProxy's `timeout http-keep-alive`).
///
/// hyper's keep-alive pings did this job before, at a cost on every
/// wake-up of the connection and every frame received (a timer polled, a
/// lock taken, the precise clock read): 2 % of the requests the proxy
/// carried under h2load with its CPU held (`bench/pair.sh`). Here the socket's reads stamp the coarse clock
/// ([`H2Socket`]), and the one timer, once it holds the task's waker, is
/// checked with a plain load of its state; when it fires it is moved to
/// where the idle period really ends, if that is later.
struct IdleClose {
    timeout_ms: u64,
    /// When the client last sent anything, coarse ms.
    last_read: Arc<AtomicU64>,
    /// When the last stream in flight ended, coarse ms.
    last_stream: u64,
    sleep: Pin<Box<tokio::time::Sleep>>,
    /// `sleep` holds the task's waker (the task is the connection's own,
    /// so its waker never changes).
    armed: bool,
}

impl IdleClose {
    fn new(timeout: Duration, last_read: Arc<AtomicU64>) -> IdleClose {
        IdleClose {
            timeout_ms: timeout.as_millis() as u64,
            last_read,
            last_stream: 0,
            sleep: Box::pin(tokio::time::sleep(timeout)),
            armed: false,
        }
    }

    /// Whether the idle timeout has passed; `busy`: streams are in flight,
    /// so it has not, and runs again from now at the earliest.
    fn expired(&mut self, cx: &mut Context<'_>, busy: bool) -> bool {
        if self.armed {
            if !self.sleep.is_elapsed() {
                return false;
            }
            self.armed = false;
        }
        loop {
            let now = coarse_ms();
            let since = if busy {
                now
            } else {
                self.last_read.load(Relaxed).max(self.last_stream)
            };
            let deadline = since.saturating_add(self.timeout_ms);
            if now >= deadline {
                return true;
            }
            // at least a millisecond ahead: the timer can't have fired yet
            self.sleep.as_mut().reset(instant_at(now, deadline));
            // with the task's budget spent, the poll yields without storing the waker
            let stores = tokio::task::coop::has_budget_remaining();
            if self.sleep.as_mut().poll(cx).is_pending() {
                self.armed = stores;
                return false;
            }
        }
    }
}

/// An HTTP/2 connection's socket. Each read stamps the coarse clock for
/// the idle timeout ([`IdleClose`]). It is reported as not doing vectored
/// writes: the `h2` codec then copies DATA payloads up to 1 KiB into its
/// write buffer (instead of chaining those over 256 bytes, which forces a
/// flush per frame), so the responses of many streams leave in one write:
/// under h2load, one `writev` per response before.
struct H2Socket<I> {
    io: I,
    last_read: Arc<AtomicU64>,
}

impl<I: hyper::rt::Read + Unpin> hyper::rt::Read for H2Socket<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        let read = Pin::new(&mut self.io).poll_read(cx, buf);
        if read.is_ready() {
            self.last_read.store(coarse_ms(), Relaxed);
        }
        read
    }
}

impl<I: hyper::rt::Write + Unpin> hyper::rt::Write for H2Socket<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        false
    }
}
