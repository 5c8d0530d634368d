//! HTTP/2 client connections, served on the `h2` crate by a loop of our
//! own rather than hyper's server: the connection and all its streams run
//! in the connection's task ([`Driver`]), each stream a plain state machine
//! ([`Stream`]) in one `FuturesUnordered`, not a boxed future handed to an
//! executor. What hyper's HTTP/2 server did per stream is done here the
//! same way: the client's RST_STREAM cancels the request, a `Date` is
//! added where missing, and the body is piped under the stream's flow
//! control ([`Pipe`]).

use crate::app::ConnCtx;
use crate::clock::{coarse_ms, instant_at};
use crate::config::ProxySettings;
use crate::forward;
use crate::forward::body::{BodySlot, H2Body, ProxyBody};
use bytes::Bytes;
use futures_util::stream::{FuturesUnordered, StreamExt};
use h2::server::SendResponse;
use h2::{Reason, RecvStream, SendStream};
use http::{header, Method, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::Either;
use kp5_shared::http::until_done;
use pin_project_lite::pin_project;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::CancellationToken;

/// Flow-control windows offered to clients, per stream and per connection
/// (hyper's defaults: the protocol's 64 KiB holds back uploads).
const WINDOW: u32 = 1024 * 1024;
/// Streams a client may have open at once (hyper's and nginx's default
/// is 200 and 128).
const MAX_STREAMS: u32 = 200;
/// Response bytes buffered per stream beyond what the client's window
/// takes.
const MAX_SEND_BUFFER: usize = 400 * 1024;
/// Streams a client may make us reset before the connection is refused.
const MAX_LOCAL_RESETS: usize = 1024;

/// Serves an HTTP/2 connection (its preface already seen, or agreed by
/// ALPN) until the client closes it, it errs, it is idle for the idle
/// timeout, or `stop` (then gracefully: GOAWAY, and the streams in flight
/// finish).
pub(super) async fn serve<I>(
    io: I,
    ctx: Arc<ConnCtx>,
    stop: &CancellationToken,
    settings: &ProxySettings,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let peer = ctx.peer;
    let counters = ctx.shared.counters.clone();
    let last_read = Arc::new(AtomicU64::new(coarse_ms()));
    let io = H2Socket {
        io,
        last_read: last_read.clone(),
    };
    let mut b = h2::server::Builder::new();
    b.initial_window_size(WINDOW)
        .initial_connection_window_size(WINDOW)
        .max_header_list_size(settings.max_header_bytes as u32)
        .max_concurrent_streams(MAX_STREAMS)
        .max_send_buffer_size(MAX_SEND_BUFFER)
        .max_local_error_reset_streams(Some(MAX_LOCAL_RESETS));
    // our SETTINGS out and the client's preface in, within the header timeout
    let handshake = tokio::time::timeout(settings.header_read_timeout, b.handshake::<_, Bytes>(io));
    let conn = tokio::select! {
        r = handshake => match r {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => {
                tracing::debug!(%peer, error = %e, "h2 handshake failed");
                return;
            }
            Err(_) => {
                tracing::debug!(%peer, "no h2 handshake within the header timeout");
                return;
            }
        },
        _ = stop.cancelled() => return,
    };
    let driver = Driver {
        conn,
        running: FuturesUnordered::new(),
        make: move |req| service(req, &ctx),
        idle: IdleClose::new(settings.idle_timeout, last_read),
        closing: false,
        counters: counters.clone(),
        send_timeout: settings.send_timeout,
    };
    if let Err(e) = until_done(driver, stop, |d| d.get_mut().conn.graceful_shutdown()).await {
        tracing::debug!(%peer, error = %e, "h2 connection ended with an error");
        if let Some(io) = e.get_io() {
            super::count_stall(&counters, io);
        }
    }
}

/// One stream's request, handed to the request path.
fn service(
    req: Request<RecvStream>,
    ctx: &Arc<ConnCtx>,
) -> impl Future<Output = Response<ProxyBody>> + Send {
    let (parts, recv) = req.into_parts();
    let body = if recv.is_end_stream() {
        BodySlot::empty()
    } else {
        let length = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        BodySlot::new(Either::Right(H2Body::new(recv, length)))
    };
    forward::handle_parts(parts, body, None, ctx.clone())
}

/// Drives an HTTP/2 connection and its streams in one task. Each wake-up
/// first polls the streams, so every response that is ready queues its
/// frames, then the connection, which writes them all in one flush (with a
/// task per stream, hyper flushed about once per response: 0.92 `writev`
/// per request under h2load against HAProxy's batched 0.18). Streams
/// accepted during that poll start at once. A connection idle for the idle
/// timeout is shut down gracefully ([`IdleClose`]).
struct Driver<I, M, F> {
    conn: h2::server::Connection<H2Socket<I>, Bytes>,
    running: FuturesUnordered<Stream<F>>,
    /// The request path's future for a stream's request.
    make: M,
    idle: IdleClose,
    /// The idle close has begun.
    closing: bool,
    counters: Arc<crate::app::Counters>,
    /// How long a stream's response may wait for the client's window.
    send_timeout: Duration,
}

impl<I, M, F> Future for Driver<I, M, F>
where
    I: AsyncRead + AsyncWrite + Unpin,
    M: FnMut(Request<RecvStream>) -> F + Unpin,
    F: Future<Output = Response<ProxyBody>>,
{
    type Output = Result<(), h2::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        loop {
            let had = !this.running.is_empty();
            while let Poll::Ready(Some(end)) = this.running.poll_next_unpin(cx) {
                if end == End::Stalled {
                    this.counters.send_timeouts.fetch_add(1, Relaxed);
                }
            }
            if had && this.running.is_empty() {
                // the idle time runs from the last stream's end
                this.idle.last_stream = coarse_ms();
            }
            // writes what the streams queued, reads what came
            match this.conn.poll_accept(cx) {
                Poll::Ready(Some(Ok((req, mut reply)))) => {
                    if req.method() == Method::CONNECT {
                        // no tunnels over HTTP/2 (nor extended CONNECT,
                        // which is not offered)
                        let refused = Response::builder()
                            .status(StatusCode::METHOD_NOT_ALLOWED)
                            .body(())
                            .expect("a valid status");
                        let _ = reply.send_response(refused, true);
                    } else {
                        let fut = (this.make)(req);
                        this.running.push(Stream {
                            reply,
                            send_timeout: this.send_timeout,
                            stage: Stage::Service { fut },
                        });
                    }
                    // polled at once, with the streams before it
                    continue;
                }
                // the connection failed: its streams can send nothing more
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e)),
                // closed (the client went, or a GOAWAY and no stream left)
                Poll::Ready(None) => return Poll::Ready(Ok(())),
                Poll::Pending => {}
            }
            if !this.closing && this.idle.expired(cx, !this.running.is_empty()) {
                tracing::debug!("closing an idle HTTP/2 connection");
                this.closing = true;
                this.conn.graceful_shutdown();
                // polled again: the GOAWAY is written, and with no stream
                // open the connection ends
                continue;
            }
            return Poll::Pending;
        }
    }
}

pin_project! {
    /// One stream: its request on the request path until the response
    /// comes, then the response's body piped to the client.
    struct Stream<F> {
        reply: SendResponse<Bytes>,
        send_timeout: Duration,
        #[pin]
        stage: Stage<F>,
    }
}

pin_project! {
    #[project = StageProj]
    enum Stage<F> {
        Service { #[pin] fut: F },
        Body { pipe: Pipe },
    }
}

/// How a stream ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Done,
    /// Reset: the client's window stayed shut for the send timeout.
    Stalled,
}

impl<F: Future<Output = Response<ProxyBody>>> Future for Stream<F> {
    type Output = End;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<End> {
        let mut me = self.project();
        let pipe = match me.stage.as_mut().project() {
            StageProj::Body { pipe } => return pipe.poll(cx),
            StageProj::Service { fut } => {
                let resp = match fut.poll(cx) {
                    Poll::Ready(resp) => resp,
                    Poll::Pending => {
                        // the client's RST_STREAM cancels the request
                        return match me.reply.poll_reset(cx) {
                            Poll::Ready(reason) => {
                                tracing::debug!(?reason, "stream reset by the client");
                                Poll::Ready(End::Done)
                            }
                            Poll::Pending => Poll::Pending,
                        };
                    }
                };
                let (mut head, body) = resp.into_parts();
                let h = &mut head.headers;
                // hop-by-hop headers, which HTTP/2 forbids (RFC 9113
                // §8.2.2), are gone: the request path strips them from
                // every server's response (were one left, `h2` would
                // refuse the response, and the stream be reset)
                if !h.contains_key(header::DATE) {
                    h.insert(header::DATE, super::h1::date_value());
                }
                let eos = body.is_end_stream();
                if let (false, Some(n)) = (eos, body.size_hint().exact()) {
                    h.entry(header::CONTENT_LENGTH).or_insert_with(|| n.into());
                }
                let tx = match me.reply.send_response(Response::from_parts(head, ()), eos) {
                    Ok(tx) => tx,
                    Err(e) => {
                        tracing::debug!(error = %e, "response not sent");
                        me.reply.send_reset(Reason::INTERNAL_ERROR);
                        return Poll::Ready(End::Done);
                    }
                };
                if eos {
                    return Poll::Ready(End::Done);
                }
                Pipe {
                    tx,
                    body,
                    waiting: None,
                    send_timeout: *me.send_timeout,
                    stalled: None,
                }
            }
        };
        me.stage.set(Stage::Body { pipe });
        match me.stage.project() {
            StageProj::Body { pipe } => pipe.poll(cx),
            StageProj::Service { .. } => unreachable!("just set"),
        }
    }
}

/// A response body sent on its stream as the client's flow-control window
/// allows: the next chunk is read from the server only once the last one
/// has been given capacity, so a slow client holds back the server rather
/// than filling the proxy's memory. (hyper's `PipeToSendStream`, the same
/// way: the body is polled before capacity is claimed, and then one byte is
/// claimed, so a body that never yields pins no share of the connection's
/// window.) A client that keeps its window shut for the send timeout gets
/// the stream reset, and the server's connection is let go: nginx's
/// `send_timeout`, here per stream (the socket's own writes are under it
/// too, [`crate::send_timeout`]).
struct Pipe {
    tx: SendStream<Bytes>,
    body: ProxyBody,
    /// A chunk read, waiting for capacity; with whether it ends the body.
    waiting: Option<(Bytes, bool)>,
    send_timeout: Duration,
    /// Runs while the chunk waits for capacity.
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Pipe {
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<End> {
        match self.poll_send(cx) {
            Poll::Ready(Err(e)) => {
                tracing::debug!(error = %e, "response body not sent");
                Poll::Ready(End::Done)
            }
            Poll::Ready(Ok(end)) => Poll::Ready(end),
            Poll::Pending => Poll::Pending,
        }
    }

    /// Waits for the client's window to take the waiting chunk: `Ready(true)`
    /// once it has room, `Ready(false)` once the stream is gone (`stalled`
    /// left set where the send timeout reset it).
    fn poll_room(&mut self, cx: &mut Context<'_>) -> Poll<Result<bool, h2::Error>> {
        while self.tx.capacity() == 0 {
            match self.tx.poll_capacity(cx) {
                Poll::Ready(Some(Ok(_))) => {}
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e)),
                // reset or closed meanwhile
                Poll::Ready(None) => {
                    self.stalled = None;
                    return Poll::Ready(Ok(false));
                }
                Poll::Pending => {
                    let timeout = self.send_timeout;
                    let timer = self
                        .stalled
                        .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                    ready!(timer.as_mut().poll(cx));
                    tracing::debug!(?timeout, "client's window shut for the send timeout");
                    self.tx.send_reset(Reason::CANCEL);
                    return Poll::Ready(Ok(false));
                }
            }
        }
        self.stalled = None;
        Poll::Ready(Ok(true))
    }

    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<Result<End, h2::Error>> {
        loop {
            // woken by the client's RST_STREAM while waiting below
            if let Poll::Ready(reason) = self.tx.poll_reset(cx) {
                return Poll::Ready(Err(h2::Error::from(reason?)));
            }
            if let Some((_, eos)) = self.waiting {
                if !ready!(self.poll_room(cx))? {
                    let timed_out = self.stalled.is_some();
                    return Poll::Ready(Ok(if timed_out { End::Stalled } else { End::Done }));
                }
                let (data, _) = self.waiting.take().expect("checked");
                self.tx.send_data(data, eos)?;
                if eos {
                    return Poll::Ready(Ok(End::Done));
                }
                continue;
            }
            match ready!(Pin::new(&mut self.body).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        let eos = self.body.is_end_stream();
                        if data.is_empty() {
                            self.tx.send_data(data, eos)?;
                            if eos {
                                return Poll::Ready(Ok(End::Done));
                            }
                            continue;
                        }
                        self.tx.reserve_capacity(1);
                        self.waiting = Some((data, eos));
                    }
                    Err(frame) => {
                        if let Ok(trailers) = frame.into_trailers() {
                            self.tx.reserve_capacity(0);
                            self.tx.send_trailers(trailers)?;
                            return Poll::Ready(Ok(End::Done));
                        }
                    }
                },
                Some(Err(e)) => {
                    // the server's body broke off: the client must not
                    // take what it got for the whole
                    tracing::debug!(error = %e, "server's response body failed");
                    self.tx.send_reset(Reason::INTERNAL_ERROR);
                    return Poll::Ready(Ok(End::Done));
                }
                None => {
                    self.tx.send_data(Bytes::new(), true)?;
                    return Poll::Ready(Ok(End::Done));
                }
            }
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
/// carried under h2load with its CPU held (`bench/pair.sh`). Here the
/// socket's reads stamp the coarse clock ([`H2Socket`]), and the one timer,
/// once it holds the task's waker, is checked with a plain load of its
/// state; when it fires it is moved to where the idle period really ends,
/// if that is later.
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

impl<I: AsyncRead + Unpin> AsyncRead for H2Socket<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let read = Pin::new(&mut self.io).poll_read(cx, buf);
        if read.is_ready() {
            self.last_read.store(coarse_ms(), Relaxed);
        }
        read
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for H2Socket<I> {
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
