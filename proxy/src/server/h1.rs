//! Our own HTTP/1.1 server loop for plain connections, nginx's way: one
//! read buffer, `httparse`, and the response head written with the first
//! bytes of its body in one `send`. No task, timer entry or channel per
//! request: the connection's one timer moves only when it fires early.
//!
//! It serves the common request (HTTP/1.1, no body, no upgrade) and hands
//! the connection, with every byte it has read, to hyper's server for
//! anything else (a body, an upgrade, `Expect`, HTTP/1.0, a target that is
//! not a path), which serves the rest of the connection as before.

use crate::app::ConnCtx;
use crate::config::ProxySettings;
use crate::forward::headers::{header_map, offsets, range, write_field, FieldSpan};
use crate::forward::{self, body::BodySlot, body::ProxyBody};
use crate::send_timeout::SendTimeout;
use bytes::{Bytes, BytesMut};
use http::header;
use http::{Method, Response, StatusCode, Uri, Version};
use http_body::Body;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;

/// Most header fields accepted in a request head (hyper's limit too).
const MAX_HEADERS: usize = 100;
/// How much room a read is given at least.
const READ_SIZE: usize = 8 * 1024;
/// Response bytes gathered before they are written.
const WRITE_AT: usize = 64 * 1024;
/// Most response-buffer capacity kept between requests.
const KEEP_OUT: usize = 16 * 1024;
/// Body chunks at least this large are written as they are, not copied.
const COPY_LIMIT: usize = 16 * 1024;
/// After an error answer, how long the client's remaining bytes are read
/// and dropped, so closing does not reset the connection under the answer.
const LINGER: Duration = Duration::from_secs(1);

/// How the loop left the connection.
pub(super) enum End {
    /// Closed: by either side, at a timeout, on an error, or at shutdown.
    Closed,
    /// A request this loop does not serve: hyper's server takes the
    /// connection, starting with these bytes.
    HandOver(Bytes),
}

/// Serves requests on `stream` until it closes or a request needs hyper.
pub(super) async fn serve(
    stream: &mut TcpStream,
    ctx: &Arc<ConnCtx>,
    stop: &CancellationToken,
    settings: &ProxySettings,
) -> End {
    let mut buf = BytesMut::with_capacity(READ_SIZE);
    let mut out = Vec::new();
    let cancelled = stop.cancelled();
    tokio::pin!(cancelled);
    // armed at the first wait; see `Read` for how it follows the deadlines
    let timer = tokio::time::sleep(settings.header_read_timeout);
    tokio::pin!(timer);
    // when the wait for the next request head began: as under hyper, the
    // header timeout covers a keep-alive connection's idle time too
    let mut head_since: Option<Instant> = None;
    loop {
        if !buf.is_empty() {
            match parse(&mut buf, settings.max_header_bytes) {
                Parsed::Request { parts, close } => {
                    head_since = None;
                    let head_only = parts.method == Method::HEAD;
                    let resp =
                        forward::handle_parts(parts, BodySlot::empty(), None, ctx.clone()).await;
                    let close = close || stop.is_cancelled();
                    let mut to = SendTimeout::new(&mut *stream, settings.send_timeout);
                    let written = write_response(&mut to, &mut out, resp, head_only, close).await;
                    if let Err(e) = &written {
                        tracing::debug!(peer = %ctx.peer, error = %e, "response not delivered");
                        super::count_stall(&ctx.shared.counters, e);
                    }
                    if written.is_err() || close {
                        let _ = stream.shutdown().await;
                        return End::Closed;
                    }
                    if out.capacity() > KEEP_OUT {
                        // a large body passed: an idle connection keeps no more
                        out = Vec::new();
                    }
                    continue;
                }
                Parsed::Partial => {}
                Parsed::Other => return End::HandOver(buf.freeze()),
                Parsed::Bad(status) => {
                    tracing::debug!(peer = %ctx.peer, %status, "malformed request");
                    refuse(stream, &mut out, status, settings.send_timeout).await;
                    return End::Closed;
                }
            }
        }
        if buf.capacity() - buf.len() < READ_SIZE / 2 {
            buf.reserve(READ_SIZE);
        }
        let read = Read {
            stream: &mut *stream,
            buf: &mut buf,
            timer: timer.as_mut(),
            since: &mut head_since,
            timeout: settings.header_read_timeout,
            cancelled: cancelled.as_mut(),
        };
        match read.await {
            Woke::Read(0) | Woke::Failed => return End::Closed,
            Woke::Read(_) => {}
            Woke::Stop => return End::Closed,
            Woke::Timeout if !buf.is_empty() => {
                tracing::debug!(peer = %ctx.peer, "request head not complete within the header timeout");
                refuse(
                    stream,
                    &mut out,
                    StatusCode::REQUEST_TIMEOUT,
                    settings.send_timeout,
                )
                .await;
                return End::Closed;
            }
            Woke::Timeout => return End::Closed,
        }
    }
}

enum Woke {
    /// Bytes read (0: the client closed).
    Read(usize),
    Failed,
    Timeout,
    Stop,
}

/// Reads the client's next bytes, or waits for them until the deadline or
/// shutdown.
///
/// The read goes through `poll_read`, which takes a short read as the
/// socket drained (as hyper's reads did): the next read then waits for
/// readiness instead of costing a `recvfrom` that finds nothing.
///
/// The timer is moved only when it fires before the deadline: a
/// keep-alive connection pushes its deadline on with every request without
/// touching the timer wheel, which it did twice a request under hyper. The
/// deadline runs from the first wait for a head (a clock read per wait,
/// none when the bytes are already there).
struct Read<'a, C> {
    stream: &'a mut TcpStream,
    buf: &'a mut BytesMut,
    timer: Pin<&'a mut Sleep>,
    since: &'a mut Option<Instant>,
    timeout: Duration,
    cancelled: Pin<&'a mut C>,
}

impl<C: Future<Output = ()>> Future for Read<'_, C> {
    type Output = Woke;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Woke> {
        let this = self.get_mut();
        match tokio_util::io::poll_read_buf(Pin::new(&mut *this.stream), cx, this.buf) {
            Poll::Ready(Ok(n)) => return Poll::Ready(Woke::Read(n)),
            Poll::Ready(Err(_)) => return Poll::Ready(Woke::Failed),
            Poll::Pending => {}
        }
        if this.cancelled.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Woke::Stop);
        }
        let deadline = *this.since.get_or_insert_with(Instant::now) + this.timeout;
        while this.timer.as_mut().poll(cx).is_ready() {
            if Instant::now() >= deadline {
                return Poll::Ready(Woke::Timeout);
            }
            this.timer.as_mut().reset(deadline);
        }
        Poll::Pending
    }
}

#[allow(clippy::large_enum_variant)] // returned once per request, never stored
enum Parsed {
    /// A request this loop serves; its head has left the buffer.
    Request {
        parts: http::request::Parts,
        close: bool,
    },
    /// The head is not complete yet.
    Partial,
    /// A valid request this loop does not serve: hyper's.
    Other,
    /// Malformed or too large: answered with this status, then closed.
    Bad(StatusCode),
}

fn parse(buf: &mut BytesMut, max_head: usize) -> Parsed {
    // offsets into the head are kept in 32 bits
    let max_head = max_head.min(u32::MAX as usize);
    // uninitialised: parsed once or more per request, it need not be zeroed
    let mut slots = [const { std::mem::MaybeUninit::<httparse::Header>::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let len = match req.parse_with_uninit_headers(buf, &mut slots) {
        Ok(httparse::Status::Complete(n)) if n <= max_head => n,
        Ok(httparse::Status::Partial) if buf.len() < max_head => return Parsed::Partial,
        Ok(_) | Err(httparse::Error::TooManyHeaders) => {
            return Parsed::Bad(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE)
        }
        Err(_) => return Parsed::Bad(StatusCode::BAD_REQUEST),
    };
    let (Some(method), Some(path), Some(1)) = (req.method, req.path, req.version) else {
        return Parsed::Other;
    };
    if !path.starts_with('/') {
        return Parsed::Other;
    }
    let Ok(method) = Method::from_bytes(method.as_bytes()) else {
        return Parsed::Other;
    };
    let target = offsets(buf, path.as_bytes());
    let mut fields = [FieldSpan::default(); MAX_HEADERS];
    let mut close = false;
    for (f, h) in fields.iter_mut().zip(req.headers.iter()) {
        let name = h.name.as_bytes();
        let is = |n: &str| name.eq_ignore_ascii_case(n.as_bytes());
        if is("content-length") {
            if h.value != b"0" {
                return Parsed::Other;
            }
        } else if is("transfer-encoding") || is("upgrade") || is("expect") {
            return Parsed::Other;
        } else if is("connection") {
            close |= h
                .value
                .split(|&b| b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"));
        }
        *f = [offsets(buf, name), offsets(buf, h.value)];
    }
    let count = req.headers.len();
    let head = buf.split_to(len).freeze();
    let Ok(uri) = Uri::from_maybe_shared(head.slice(range(target))) else {
        return Parsed::Bad(StatusCode::BAD_REQUEST);
    };
    let Ok(headers) = header_map(&head, &fields[..count]) else {
        return Parsed::Bad(StatusCode::BAD_REQUEST);
    };
    let (mut parts, ()) = http::Request::new(()).into_parts();
    parts.method = method;
    parts.uri = uri;
    parts.version = Version::HTTP_11;
    parts.headers = headers;
    Parsed::Request { parts, close }
}

/// How the body follows the head.
#[derive(PartialEq)]
enum Framing {
    None,
    Length,
    Chunked,
}

/// Writes a response: its head, then its body as it streams, in as few
/// writes as its frames allow (one for a body that is already read).
async fn write_response<W: AsyncWrite + Unpin>(
    stream: &mut W,
    out: &mut Vec<u8>,
    resp: Response<ProxyBody>,
    head_only: bool,
    close: bool,
) -> io::Result<()> {
    let (parts, body) = resp.into_parts();
    let status = parts.status;
    out.clear();
    status_line(out, status);
    let no_body = head_only
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let (mut length, mut date) = (false, false);
    for (name, value) in &parts.headers {
        if name == header::TRANSFER_ENCODING || name == header::CONNECTION {
            continue;
        }
        length |= name == header::CONTENT_LENGTH;
        date |= name == header::DATE;
        write_field(out, name.as_str().as_bytes(), value.as_bytes());
    }
    let framing = if no_body {
        Framing::None
    } else if length {
        Framing::Length
    } else if let Some(n) = body.size_hint().exact() {
        write_field(out, b"content-length", n.to_string().as_bytes());
        Framing::Length
    } else {
        write_field(out, b"transfer-encoding", b"chunked");
        Framing::Chunked
    };
    if !date {
        with_date(|d| write_field(out, b"date", d));
    }
    if close {
        write_field(out, b"connection", b"close");
    }
    out.extend_from_slice(b"\r\n");
    if framing == Framing::None || body.is_end_stream() {
        if framing == Framing::Chunked {
            out.extend_from_slice(b"0\r\n\r\n");
        }
        return stream.write_all(out).await;
    }
    send_body(stream, out, body, framing == Framing::Chunked).await
}

async fn send_body<W: AsyncWrite + Unpin>(
    stream: &mut W,
    out: &mut Vec<u8>,
    mut body: ProxyBody,
    chunked: bool,
) -> io::Result<()> {
    use futures_util::FutureExt;
    use http_body_util::BodyExt;
    let mut ended = false;
    while !ended {
        // what is ready now joins the head; only a wait flushes first
        let next = match body.frame().now_or_never() {
            Some(f) => f,
            None => {
                stream.write_all(out).await?;
                out.clear();
                body.frame().await
            }
        };
        let frame = match next {
            None => break,
            Some(Err(e)) => return Err(io::Error::other(e)),
            Some(Ok(frame)) => frame,
        };
        match frame.into_data() {
            Ok(data) if data.is_empty() => {}
            Ok(data) => {
                if chunked {
                    out.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
                }
                if data.len() >= COPY_LIMIT {
                    stream.write_all(out).await?;
                    out.clear();
                    stream.write_all(&data).await?;
                } else {
                    out.extend_from_slice(&data);
                }
                if chunked {
                    out.extend_from_slice(b"\r\n");
                }
            }
            Err(frame) => {
                if let (Ok(trailers), true) = (frame.into_trailers(), chunked) {
                    out.extend_from_slice(b"0\r\n");
                    for (name, value) in &trailers {
                        write_field(out, name.as_str().as_bytes(), value.as_bytes());
                    }
                    out.extend_from_slice(b"\r\n");
                    return stream.write_all(out).await;
                }
            }
        }
        ended = body.is_end_stream();
        if out.len() >= WRITE_AT {
            stream.write_all(out).await?;
            out.clear();
        }
    }
    if chunked {
        out.extend_from_slice(b"0\r\n\r\n");
    }
    stream.write_all(out).await
}

/// Answers a request that will not be served, then closes: what the client
/// still sends is read and dropped for a while, so the close does not
/// reset the connection before the answer is read.
async fn refuse(stream: &mut TcpStream, out: &mut Vec<u8>, status: StatusCode, send: Duration) {
    let stream = &mut SendTimeout::new(stream, send);
    out.clear();
    status_line(out, status);
    write_field(out, b"content-length", b"0");
    with_date(|d| write_field(out, b"date", d));
    write_field(out, b"connection", b"close");
    out.extend_from_slice(b"\r\n");
    if stream.write_all(out).await.is_err() || stream.shutdown().await.is_err() {
        return;
    }
    let drain = async {
        let mut sink = [0u8; 4096];
        let mut left: usize = 1 << 20;
        while let Ok(n @ 1..) = tokio::io::AsyncReadExt::read(stream, &mut sink).await {
            left = left.saturating_sub(n);
            if left == 0 {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(LINGER, drain).await;
}

fn status_line(out: &mut Vec<u8>, status: StatusCode) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// The `Date` header's value now (for HTTP/2 responses without one).
pub(super) fn date_value() -> http::HeaderValue {
    let mut value = None;
    with_date(|d| value = http::HeaderValue::from_bytes(d).ok());
    value.unwrap_or_else(|| http::HeaderValue::from_static("Thu, 01 Jan 1970 00:00:00 GMT"))
}

/// The `Date` value, formatted once a second per thread.
fn with_date(f: impl FnOnce(&[u8])) {
    use std::cell::RefCell;
    use std::time::SystemTime;
    thread_local! {
        static DATE: RefCell<(u64, String)> = const { RefCell::new((0, String::new())) };
    }
    let now = SystemTime::now();
    let secs = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    DATE.with(|d| {
        let mut d = d.borrow_mut();
        if d.0 != secs || d.1.is_empty() {
            *d = (secs, httpdate::fmt_http_date(now));
        }
        f(d.1.as_bytes());
    });
}

/// A plain connection handed to hyper: the bytes already read, then the
/// socket, its writes under the send timeout.
pub struct Prefixed {
    pre: Bytes,
    io: SendTimeout<TcpStream>,
}

impl Prefixed {
    pub(super) fn new(pre: Bytes, io: TcpStream, send_timeout: Duration) -> Self {
        Prefixed {
            pre,
            io: SendTimeout::new(io, send_timeout),
        }
    }

    /// The socket, and what of the read bytes was not consumed yet.
    pub fn into_parts(self) -> (TcpStream, Bytes) {
        (self.io.into_inner(), self.pre)
    }
}

impl AsyncRead for Prefixed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.pre.is_empty() {
            let n = self.pre.len().min(buf.remaining());
            buf.put_slice(&self.pre.split_to(n));
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(head: &[u8]) -> (Parsed, BytesMut) {
        let mut buf = BytesMut::from(head);
        (parse(&mut buf, 1024), buf)
    }

    #[test]
    fn serves_a_bodyless_request_and_leaves_the_next_in_the_buffer() {
        let (p, rest) = parsed(
            b"GET /m/1?x=2 HTTP/1.1\r\nHost: a\r\nX-A: 1\r\nx-a: 2\r\nContent-Length: 0\r\n\r\nGET /next",
        );
        let Parsed::Request { parts, close } = p else {
            panic!("not served here");
        };
        assert!(!close);
        assert_eq!(parts.method, Method::GET);
        assert_eq!(parts.uri, "/m/1?x=2");
        assert_eq!(parts.version, Version::HTTP_11);
        assert_eq!(parts.headers["host"], "a");
        let a: Vec<_> = parts.headers.get_all("x-a").iter().collect();
        assert_eq!(a, ["1", "2"]);
        assert_eq!(&rest[..], b"GET /next");
    }

    #[test]
    fn connection_close_is_seen_among_other_tokens() {
        let (p, _) = parsed(b"GET / HTTP/1.1\r\nConnection: keep-alive, Close\r\n\r\n");
        assert!(matches!(p, Parsed::Request { close: true, .. }));
    }

    #[test]
    fn bodies_upgrades_and_other_forms_go_to_hyper() {
        for head in [
            &b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello"[..],
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"GET / HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
            b"PUT / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 0\r\n\r\n",
            b"GET / HTTP/1.0\r\n\r\n",
            b"GET http://a/ HTTP/1.1\r\n\r\n",
            b"OPTIONS * HTTP/1.1\r\n\r\n",
        ] {
            let (p, rest) = parsed(head);
            assert!(
                matches!(p, Parsed::Other),
                "{}",
                String::from_utf8_lossy(head)
            );
            assert_eq!(&rest[..], head, "nothing consumed");
        }
    }

    #[test]
    fn partial_malformed_and_oversized_heads() {
        assert!(matches!(parsed(b"GET / HTTP/1.1\r\nHo").0, Parsed::Partial));
        let bad = |p: Parsed| match p {
            Parsed::Bad(s) => s.as_u16(),
            _ => 0,
        };
        assert_eq!(bad(parsed(b"\x01\x02 NOT HTTP\r\n\r\n").0), 400);
        assert_eq!(bad(parsed(b"GET /a b HTTP/1.1\r\n\r\n").0), 400);
        let big = format!("GET / HTTP/1.1\r\nX: {}\r\n", "a".repeat(2000));
        assert_eq!(
            bad(parsed(big.as_bytes()).0),
            431,
            "incomplete and over the limit"
        );
        let big = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(2000));
        assert_eq!(
            bad(parsed(big.as_bytes()).0),
            431,
            "complete and over the limit"
        );
        let many: String = (0..=MAX_HEADERS).map(|i| format!("X{i}: 1\r\n")).collect();
        let many = format!("GET / HTTP/1.1\r\n{many}\r\n");
        let mut buf = BytesMut::from(many.as_bytes());
        assert!(matches!(parse(&mut buf, 1 << 20), Parsed::Bad(s) if s.as_u16() == 431));
    }
}
