//! The HTTP/1.1 client to plain-TCP backends, driven from the request's own
//! task (pingora's way): the request task checks a connection out of the
//! idle pool, writes the request, parses the response head with `httparse`
//! and hands the connection to the response body, which puts it back the
//! moment the last byte is read. No connection task, no channel hand-off.
//!
//! It carries requests without a body (the common case: GETs, and upgrades,
//! whose connection becomes the tunnel). A request with a body goes through
//! hyper's client, which writes the body while it reads the response (an
//! echoing server would otherwise fill both directions' buffers and stall),
//! as do TLS backends; see `forward::proxy`.

use super::headers::{header_map, offsets, write_field, FieldSpan};
use crate::clock::{coarse_ms, instant_at, passed_or_rearm};
use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap};
use http::uri::Authority;
use http::{Method, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{ready, Context, Poll};
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// Largest response head accepted from a server.
const MAX_HEAD: usize = 64 * 1024;
/// Most header fields accepted in a response head.
const MAX_HEADERS: usize = 128;
/// Longest chunk-size line or trailer section accepted.
const MAX_LINE: usize = 4 * 1024;
/// How much is read from a server at a time.
const READ_SIZE: usize = 16 * 1024;

/// Keep-alive connections to backends, by address.
#[derive(Clone)]
pub struct Pool {
    inner: Arc<PoolInner>,
}

type IdleMap = HashMap<Authority, Vec<Idle>, std::hash::BuildHasherDefault<Fnv>>;

struct PoolInner {
    idle: Mutex<IdleMap>,
    max_idle: usize,
    idle_timeout: Duration,
    connect_timeout: Duration,
    reaper: AtomicBool,
}

/// FNV-1a for the pool's keys: a few short addresses from the config and
/// the agents, looked up on every request, where SipHash's flood resistance
/// buys nothing and costs a visible share of the request path.
#[derive(Default)]
struct Fnv(u64);

impl std::hash::Hasher for Fnv {
    fn write(&mut self, bytes: &[u8]) {
        let mut h = if self.0 == 0 {
            0xcbf2_9ce4_8422_2325
        } else {
            self.0
        };
        for &b in bytes {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        self.0 = h;
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

struct Idle {
    conn: Conn,
    /// When it came back, coarse ms.
    since: u64,
}

/// One connection to a server and what was read from it but not yet used.
struct Conn {
    stream: TcpStream,
    buf: BytesMut,
    timer: HeadTimer,
}

/// A connection's one timer for the response-head timeout, moved lazily
/// (as the server loop's header timer is): armed once, and when it fires
/// before the current request's deadline (it was set for an earlier
/// request) it is re-armed for the rest. A request costs a coarse clock
/// read, not a timer entry inserted into the wheel and taken out again.
#[derive(Default)]
struct HeadTimer {
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    /// When `sleep` fires, coarse ms.
    at: u64,
}

impl HeadTimer {
    /// Ready once `deadline` (coarse ms) has passed.
    fn poll_expired(&mut self, cx: &mut Context<'_>, deadline: u64) -> Poll<()> {
        loop {
            match &mut self.sleep {
                // a timer set for later (the timeout was lowered) is moved
                Some(sleep) if self.at <= deadline => {
                    ready!(sleep.as_mut().poll(cx));
                    if passed_or_rearm(sleep.as_mut(), deadline) {
                        return Poll::Ready(());
                    }
                    self.at = deadline;
                }
                _ => self.arm(deadline),
            }
        }
    }

    fn arm(&mut self, deadline: u64) {
        let at = instant_at(coarse_ms(), deadline);
        match &mut self.sleep {
            Some(sleep) => sleep.as_mut().reset(at),
            None => self.sleep = Some(Box::pin(tokio::time::sleep_until(at))),
        }
        self.at = deadline;
    }

    /// Drops the waker of the task that waited last: a pooled connection
    /// must not keep a finished task's memory alive until its timer fires.
    fn release(&mut self) {
        if let Some(sleep) = &mut self.sleep {
            let _ = sleep
                .as_mut()
                .poll(&mut Context::from_waker(std::task::Waker::noop()));
        }
    }
}

/// Why an exchange failed.
#[derive(Debug)]
pub enum SendError {
    /// Nothing reached the server: another one may be tried.
    Connect(String),
    /// The server failed after the request (or part of it) was sent.
    Upstream(String),
    /// No response head within the timeout.
    Timeout,
}

/// What a server answered to an upgrade request.
pub enum Upgrade {
    /// `101`: the connection now speaks the new protocol.
    Switched {
        response: Response<H1Body>,
        stream: TcpStream,
        /// Bytes of the new protocol that arrived with the head.
        early: Bytes,
    },
    /// Any other answer (the upgrade was refused), with its body.
    Answered(Response<H1Body>),
}

/// Where an exchange failed: writing the request or reading the head.
enum Failed {
    Write(io::Error),
    Head(HeadError),
}

/// A reused connection that failed before any byte of a response arrived:
/// the server closed it while idle, so the request (which has no body) is
/// sent again on a fresh one.
#[allow(clippy::large_enum_variant)] // returned once, never stored
enum Attempt {
    Done(Response<H1Body>),
    Stale(String),
}

impl Pool {
    pub fn new(p: &crate::config::ProxySettings) -> Pool {
        Pool::with(
            p.upstream_keepalive,
            p.upstream_idle_timeout,
            p.connect_timeout,
        )
    }

    /// At most `max_idle` idle connections per server, each for `idle_timeout`.
    pub fn with(max_idle: usize, idle_timeout: Duration, connect_timeout: Duration) -> Pool {
        Pool {
            inner: Arc::new(PoolInner {
                idle: Mutex::new(HashMap::default()),
                max_idle,
                idle_timeout,
                connect_timeout,
                reaper: AtomicBool::new(false),
            }),
        }
    }

    /// Idle connections held now (all servers).
    #[cfg(test)]
    pub fn idle_count(&self) -> usize {
        self.inner.lock().values().map(Vec::len).sum()
    }

    /// One request/response exchange (a request without a body) with the
    /// server at `addr`, its response head due within `timeout` (connecting
    /// included). The response body streams from the connection, which goes
    /// back to the pool when the body has been read to its end.
    pub async fn send(
        &self,
        addr: &Authority,
        req: Outgoing<'_>,
        timeout: Duration,
    ) -> Result<Response<H1Body>, SendError> {
        let deadline = coarse_ms().saturating_add(timeout.as_millis() as u64);
        let head = encode_head(req);
        let is_head = req.method == Method::HEAD;
        let mut fresh_only = false;
        loop {
            let (conn, reused) = match (!fresh_only).then(|| self.checkout(addr)).flatten() {
                Some(c) => (c, true),
                None => (self.connect(addr).await?, false),
            };
            match self
                .exchange(conn, addr, &head, is_head, reused, deadline)
                .await?
            {
                Attempt::Done(resp) => return Ok(resp),
                Attempt::Stale(reason) => {
                    tracing::debug!(server = %addr, %reason, "idle connection was closed by the server; sending on a new one");
                    fresh_only = true;
                }
            }
        }
    }

    /// An upgrade request (no body) on a connection of its own. On `101` the
    /// raw connection comes back with any bytes the server sent after its
    /// head, ready to become the tunnel's server side; any other answer is an
    /// ordinary response.
    pub async fn upgrade(&self, addr: &Authority, req: Outgoing<'_>) -> Result<Upgrade, SendError> {
        let head = encode_head(req);
        let mut conn = self.connect(addr).await?;
        conn.stream
            .write_all(&head)
            .await
            .map_err(|e| SendError::Upstream(format!("sending the request: {e}")))?;
        let parsed = match read_head(&mut conn, false, true).await {
            Ok(p) => p,
            Err(HeadError::Closed { reason, .. } | HeadError::Invalid(reason)) => {
                return Err(SendError::Upstream(reason))
            }
        };
        if parsed.response.status() == StatusCode::SWITCHING_PROTOCOLS {
            let Conn { stream, buf, .. } = conn;
            return Ok(Upgrade::Switched {
                response: parsed.response,
                stream,
                early: buf.freeze(),
            });
        }
        Ok(Upgrade::Answered(self.respond(conn, addr, parsed)))
    }

    async fn exchange(
        &self,
        mut conn: Conn,
        addr: &Authority,
        head: &[u8],
        is_head: bool,
        may_be_stale: bool,
        deadline: u64,
    ) -> Result<Attempt, SendError> {
        let stale_or = |e: String| {
            if may_be_stale {
                Ok(Attempt::Stale(e))
            } else {
                Err(SendError::Upstream(e))
            }
        };
        let mut timer = std::mem::take(&mut conn.timer);
        let answer = {
            let work = async {
                conn.stream.write_all(head).await.map_err(Failed::Write)?;
                read_head(&mut conn, is_head, false)
                    .await
                    .map_err(Failed::Head)
            };
            let mut work = std::pin::pin!(work);
            std::future::poll_fn(|cx| match work.as_mut().poll(cx) {
                Poll::Ready(r) => Poll::Ready(Some(r)),
                Poll::Pending => timer.poll_expired(cx, deadline).map(|()| None),
            })
            .await
        };
        conn.timer = timer;
        let Some(answer) = answer else {
            return Err(SendError::Timeout);
        };
        match answer {
            Err(Failed::Write(e)) => stale_or(format!("sending the request: {e}")),
            Ok(parsed) => Ok(Attempt::Done(self.respond(conn, addr, parsed))),
            Err(Failed::Head(HeadError::Closed {
                nothing_read: true,
                reason,
            })) => stale_or(reason),
            Err(Failed::Head(HeadError::Closed { reason, .. } | HeadError::Invalid(reason))) => {
                Err(SendError::Upstream(reason))
            }
        }
    }

    fn respond(&self, conn: Conn, addr: &Authority, parsed: Head) -> Response<H1Body> {
        let Head {
            mut response,
            framing,
            keep_alive,
        } = parsed;
        let mut body = H1Body {
            conn: Some(conn),
            framing,
            keep_alive,
            pool: Arc::downgrade(&self.inner),
            addr: addr.clone(),
        };
        if body.framing.is_done() {
            body.finish();
        }
        *response.body_mut() = body;
        response
    }

    /// The most recently used idle connection to `addr` that is still open.
    fn checkout(&self, addr: &Authority) -> Option<Conn> {
        let mut idle = self.inner.lock();
        let list = idle.get_mut(addr)?;
        let now = coarse_ms();
        while let Some(Idle { conn, since }) = list.pop() {
            if now.saturating_sub(since) < self.inner.idle_timeout.as_millis() as u64
                && conn.is_quiet()
            {
                return Some(conn);
            }
        }
        None
    }

    async fn connect(&self, addr: &Authority) -> Result<Conn, SendError> {
        let connecting = TcpStream::connect(addr.as_str());
        let stream = match tokio::time::timeout(self.inner.connect_timeout, connecting).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(SendError::Connect(e.to_string())),
            Err(_) => return Err(SendError::Connect("connect timed out".into())),
        };
        let _ = stream.set_nodelay(true);
        let keepalive = socket2::TcpKeepalive::new().with_time(Duration::from_secs(60));
        let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive);
        Ok(Conn {
            stream,
            buf: BytesMut::new(),
            timer: HeadTimer::default(),
        })
    }
}

impl PoolInner {
    fn lock(&self) -> std::sync::MutexGuard<'_, IdleMap> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn put(self: &Arc<Self>, addr: &Authority, mut conn: Conn) {
        if self.max_idle == 0 {
            return;
        }
        conn.timer.release();
        {
            let mut idle = self.lock();
            let list = match idle.get_mut(addr) {
                Some(l) => l,
                None => idle.entry(addr.clone()).or_default(),
            };
            if list.len() >= self.max_idle {
                // the oldest goes: the newest is the one most likely still open
                list.remove(0);
            }
            list.push(Idle {
                conn,
                since: coarse_ms(),
            });
        }
        if !self.reaper.swap(true, Ordering::Relaxed) {
            tokio::spawn(reap(Arc::downgrade(self), self.idle_timeout));
        }
    }
}

/// Closes connections idle longer than `idle_timeout`, until the pool goes.
async fn reap(pool: Weak<PoolInner>, idle_timeout: Duration) {
    let every = (idle_timeout / 2).clamp(Duration::from_millis(100), Duration::from_secs(30));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(pool) = pool.upgrade() else { return };
        let now = coarse_ms();
        let idle_ms = idle_timeout.as_millis() as u64;
        pool.lock().retain(|_, list| {
            list.retain(|i| now.saturating_sub(i.since) < idle_ms && i.conn.is_quiet());
            !list.is_empty()
        });
    }
}

impl Conn {
    /// An idle connection is usable when the server has sent nothing on it:
    /// no close, no stray bytes. Costs no syscall unless the socket was
    /// reported readable.
    fn is_quiet(&self) -> bool {
        self.buf.is_empty()
            && matches!(self.stream.try_read(&mut [0u8; 1]), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }

    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        self.buf.reserve(READ_SIZE);
        tokio_util::io::poll_read_buf(Pin::new(&mut self.stream), cx, &mut self.buf)
    }
}

/// A request without a body, as our client sends it.
#[derive(Debug, Clone, Copy)]
pub struct Outgoing<'a> {
    pub method: &'a Method,
    /// Path and query.
    pub target: &'a str,
    pub headers: &'a HeaderMap,
    /// Sent as the fencing header, instead of any the headers carry.
    pub fencing: Option<u64>,
}

/// The request head as it goes on the wire.
fn encode_head(req: Outgoing<'_>) -> Vec<u8> {
    let Outgoing {
        method,
        target,
        headers,
        fencing,
    } = req;
    let mut h = Vec::with_capacity(256 + headers.len() * 48);
    h.extend_from_slice(method.as_str().as_bytes());
    h.push(b' ');
    h.extend_from_slice(target.as_bytes());
    h.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in headers {
        if fencing.is_some() && name.as_str() == super::FENCING_HEADER {
            continue;
        }
        write_field(&mut h, name.as_str().as_bytes(), value.as_bytes());
    }
    if let Some(token) = fencing {
        let token = token.to_string();
        write_field(&mut h, super::FENCING_HEADER.as_bytes(), token.as_bytes());
    }
    h.extend_from_slice(b"\r\n");
    h
}

/// A parsed response head.
struct Head {
    response: Response<H1Body>,
    framing: Framing,
    keep_alive: bool,
}

enum HeadError {
    /// The connection ended or failed before a whole head arrived.
    Closed { nothing_read: bool, reason: String },
    /// The server sent something that is not an HTTP/1.x response head.
    Invalid(String),
}

/// Reads until a final (non-1xx) response head is complete.
async fn read_head(conn: &mut Conn, is_head: bool, upgrade: bool) -> Result<Head, HeadError> {
    let mut nothing_read = conn.buf.is_empty();
    loop {
        if !conn.buf.is_empty() {
            if let Some(head) = parse_head(&mut conn.buf, is_head, upgrade)? {
                return Ok(head);
            }
            if conn.buf.len() > MAX_HEAD {
                return Err(HeadError::Invalid(format!(
                    "response head larger than {MAX_HEAD} bytes"
                )));
            }
        }
        let n = std::future::poll_fn(|cx| conn.poll_fill(cx))
            .await
            .map_err(|e| HeadError::Closed {
                nothing_read,
                reason: format!("reading the response: {e}"),
            })?;
        if n == 0 {
            return Err(HeadError::Closed {
                nothing_read,
                reason: "the server closed the connection before responding".into(),
            });
        }
        nothing_read = false;
    }
}

/// Parses a head at the start of `buf` and removes it; skips interim
/// (1xx) responses. `None`: more bytes are needed.
fn parse_head(buf: &mut BytesMut, is_head: bool, upgrade: bool) -> Result<Option<Head>, HeadError> {
    loop {
        // left uninitialised: 4 KiB need not be zeroed for every response
        let mut slots = [const { MaybeUninit::<httparse::Header>::uninit() }; MAX_HEADERS];
        let mut parsed = httparse::Response::new(&mut []);
        let config = httparse::ParserConfig::default();
        let len = match config.parse_response_with_uninit_headers(&mut parsed, buf, &mut slots) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(e) => return Err(HeadError::Invalid(format!("invalid response head: {e}"))),
        };
        let code = parsed.code.unwrap_or(0);
        let status = StatusCode::from_u16(code)
            .map_err(|_| HeadError::Invalid(format!("invalid status code {code}")))?;
        let switched = status == StatusCode::SWITCHING_PROTOCOLS;
        if status.is_informational() && !(switched && upgrade) {
            if switched {
                return Err(HeadError::Invalid(
                    "101 to a request that asked for no upgrade".into(),
                ));
            }
            buf.advance(len);
            continue;
        }
        let http11 = parsed.version == Some(1);
        // the header values are slices of the frozen head: no copy per value
        let mut fields = [FieldSpan::default(); MAX_HEADERS];
        let count = parsed.headers.len();
        for (f, h) in fields.iter_mut().zip(parsed.headers.iter()) {
            *f = [offsets(buf, h.name.as_bytes()), offsets(buf, h.value)];
        }
        let frozen = buf.split_to(len).freeze();
        let headers = header_map(&frozen, &fields[..count]).map_err(HeadError::Invalid)?;
        let framing = framing(&headers, status, is_head)?;
        let keep_alive =
            !matches!(framing, Framing::Close) && connection_persists(&headers, http11);
        let mut response = Response::new(H1Body::empty());
        *response.status_mut() = status;
        *response.version_mut() = Version::HTTP_11;
        *response.headers_mut() = headers;
        return Ok(Some(Head {
            response,
            framing,
            keep_alive,
        }));
    }
}

/// How the response body is delimited (RFC 9112 §6.3).
fn framing(headers: &HeaderMap, status: StatusCode, is_head: bool) -> Result<Framing, HeadError> {
    if is_head || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        return Ok(Framing::Length(0));
    }
    if headers.contains_key(header::TRANSFER_ENCODING) {
        let last = headers
            .get_all(header::TRANSFER_ENCODING)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .rfind(|t| !t.is_empty());
        return Ok(match last {
            Some(t) if t.eq_ignore_ascii_case("chunked") => Framing::Chunked(Chunk::Size),
            // another coding last: the body runs to the connection's end
            _ => Framing::Close,
        });
    }
    let mut length = None;
    for v in headers.get_all(header::CONTENT_LENGTH) {
        for part in v.to_str().unwrap_or("x").split(',') {
            let n: u64 = part
                .trim()
                .parse()
                .map_err(|_| HeadError::Invalid(format!("invalid content-length {v:?}")))?;
            if length.is_some_and(|l| l != n) {
                return Err(HeadError::Invalid(
                    "conflicting content-length values".into(),
                ));
            }
            length = Some(n);
        }
    }
    Ok(length.map_or(Framing::Close, Framing::Length))
}

/// HTTP/1.1 keeps the connection unless told `close`; 1.0 only if told `keep-alive`.
fn connection_persists(headers: &HeaderMap, http11: bool) -> bool {
    let has = |token: &str| {
        headers.get_all(header::CONNECTION).iter().any(|v| {
            v.to_str()
                .is_ok_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        })
    };
    if http11 {
        !has("close")
    } else {
        has("keep-alive")
    }
}

/// Where the response body ends.
#[derive(Debug)]
enum Framing {
    /// This many bytes remain.
    Length(u64),
    Chunked(Chunk),
    /// Everything until the server closes.
    Close,
    /// Read to its end.
    Done,
}

#[derive(Debug, Clone, Copy)]
enum Chunk {
    /// Expecting a chunk-size line.
    Size,
    /// This many bytes of chunk data remain.
    Data(u64),
    /// Expecting the CRLF after chunk data.
    DataEnd,
    /// After the last chunk: trailer fields until an empty line.
    Trailer,
}

impl Framing {
    fn is_done(&self) -> bool {
        matches!(self, Framing::Length(0) | Framing::Done)
    }
}

/// A response body read from a backend connection. The connection goes back
/// to the pool when the body is complete and the server keeps it open; a
/// body dropped half-read closes it.
pub struct H1Body {
    conn: Option<Conn>,
    framing: Framing,
    keep_alive: bool,
    pool: Weak<PoolInner>,
    addr: Authority,
}

impl std::fmt::Debug for H1Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H1Body")
            .field("framing", &self.framing)
            .field("addr", &self.addr)
            .finish()
    }
}

impl H1Body {
    fn empty() -> H1Body {
        H1Body {
            conn: None,
            framing: Framing::Done,
            keep_alive: false,
            pool: Weak::new(),
            addr: Authority::from_static("unset"),
        }
    }

    /// The body is complete: the connection is free again.
    fn finish(&mut self) {
        self.framing = Framing::Done;
        if let Some(conn) = self.conn.take() {
            if self.keep_alive && conn.buf.is_empty() {
                if let Some(pool) = self.pool.upgrade() {
                    pool.put(&self.addr, conn);
                }
            }
        }
    }

    fn ended_early() -> io::Error {
        io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the server closed the connection before the body ended",
        )
    }

    /// Takes up to `n` buffered bytes as a frame.
    fn take(conn: &mut Conn, n: u64) -> Bytes {
        let n = (conn.buf.len() as u64).min(n) as usize;
        conn.buf.split_to(n).freeze()
    }

    /// Decodes chunked framing from the buffer. `Some(data)`: a frame;
    /// `None`: more bytes are needed (or the body ended: see `framing`).
    fn decode_chunked(&mut self) -> io::Result<Option<Bytes>> {
        let invalid = |m: &str| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("invalid chunked body: {m}"),
            )
        };
        let Some(conn) = self.conn.as_mut() else {
            return Ok(None);
        };
        loop {
            let Framing::Chunked(state) = &mut self.framing else {
                return Ok(None);
            };
            match *state {
                Chunk::Size => {
                    let Some(end) = find_line(&conn.buf) else {
                        if conn.buf.len() > MAX_LINE {
                            return Err(invalid("chunk-size line too long"));
                        }
                        return Ok(None);
                    };
                    let line = &conn.buf[..end];
                    let digits = line
                        .iter()
                        .position(|b| !b.is_ascii_hexdigit())
                        .unwrap_or(line.len());
                    if digits == 0 || digits > 15 {
                        return Err(invalid("bad chunk size"));
                    }
                    let rest = &line[digits..];
                    if !(rest.is_empty()
                        || rest[0] == b';'
                        || rest[0] == b' '
                        || rest[0] == b'\t'
                        || rest[0] == b'\r')
                    {
                        return Err(invalid("bad chunk size"));
                    }
                    let size = u64::from_str_radix(
                        std::str::from_utf8(&line[..digits]).unwrap_or("x"),
                        16,
                    )
                    .map_err(|_| invalid("bad chunk size"))?;
                    conn.buf.advance(end + 1);
                    *state = if size == 0 {
                        Chunk::Trailer
                    } else {
                        Chunk::Data(size)
                    };
                }
                Chunk::Data(rem) => {
                    if conn.buf.is_empty() {
                        return Ok(None);
                    }
                    let data = Self::take(conn, rem);
                    let left = rem - data.len() as u64;
                    *state = if left == 0 {
                        Chunk::DataEnd
                    } else {
                        Chunk::Data(left)
                    };
                    return Ok(Some(data));
                }
                Chunk::DataEnd => {
                    match conn.buf.first() {
                        None => return Ok(None),
                        Some(b'\n') => conn.buf.advance(1),
                        Some(b'\r') if conn.buf.len() < 2 => return Ok(None),
                        Some(b'\r') if conn.buf[1] == b'\n' => conn.buf.advance(2),
                        _ => return Err(invalid("missing CRLF after chunk data")),
                    }
                    *state = Chunk::Size;
                }
                Chunk::Trailer => {
                    let Some(end) = find_line(&conn.buf) else {
                        if conn.buf.len() > MAX_LINE {
                            return Err(invalid("trailer line too long"));
                        }
                        return Ok(None);
                    };
                    // trailer fields are not forwarded
                    let empty = end == 0 || (end == 1 && conn.buf[0] == b'\r');
                    conn.buf.advance(end + 1);
                    if empty {
                        self.finish();
                        return Ok(None);
                    }
                }
            }
        }
    }
}

/// Index of the `\n` ending the first line of `buf`.
fn find_line(buf: &[u8]) -> Option<usize> {
    buf.iter().position(|&b| b == b'\n')
}

impl Body for H1Body {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<io::Result<Frame<Bytes>>>> {
        let this = &mut *self;
        loop {
            match this.framing {
                Framing::Done | Framing::Length(0) => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Framing::Length(rem) => {
                    let Some(conn) = this.conn.as_mut() else {
                        return Poll::Ready(None);
                    };
                    if !conn.buf.is_empty() {
                        let data = Self::take(conn, rem);
                        let left = rem - data.len() as u64;
                        this.framing = Framing::Length(left);
                        if left == 0 {
                            this.finish();
                        }
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    if ready!(conn.poll_fill(cx))? == 0 {
                        this.conn = None;
                        this.framing = Framing::Done;
                        return Poll::Ready(Some(Err(Self::ended_early())));
                    }
                }
                Framing::Chunked(_) => {
                    if let Some(data) = this.decode_chunked()? {
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    if this.framing.is_done() {
                        return Poll::Ready(None);
                    }
                    let Some(conn) = this.conn.as_mut() else {
                        return Poll::Ready(None);
                    };
                    if ready!(conn.poll_fill(cx))? == 0 {
                        this.conn = None;
                        this.framing = Framing::Done;
                        return Poll::Ready(Some(Err(Self::ended_early())));
                    }
                }
                Framing::Close => {
                    let Some(conn) = this.conn.as_mut() else {
                        return Poll::Ready(None);
                    };
                    if !conn.buf.is_empty() {
                        let data = conn.buf.split().freeze();
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    if ready!(conn.poll_fill(cx))? == 0 {
                        this.conn = None;
                        this.framing = Framing::Done;
                        return Poll::Ready(None);
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.framing.is_done()
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Length(n) => SizeHint::with_exact(n),
            Framing::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header::HeaderValue;
    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A server on a real socket; each accepted connection runs `script`.
    /// Returns its address and a count of connections accepted.
    async fn server<F, Fut>(script: F) -> (Authority, Arc<std::sync::atomic::AtomicUsize>)
    where
        F: Fn(TcpStream, usize) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr: Authority = l.local_addr().unwrap().to_string().parse().unwrap();
        let n = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = n.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                let i = count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(script(s, i));
            }
        });
        (addr, n)
    }

    /// Reads one request head (these tests send no request bodies unless said).
    async fn read_request(s: &mut TcpStream) -> Option<String> {
        let mut buf = Vec::new();
        let mut b = [0u8; 1];
        while !buf.ends_with(b"\r\n\r\n") {
            if s.read(&mut b).await.ok()? == 0 {
                return None;
            }
            buf.push(b[0]);
        }
        Some(String::from_utf8(buf).unwrap())
    }

    fn pool() -> Pool {
        Pool::with(4, Duration::from_secs(30), Duration::from_secs(1))
    }

    fn outgoing<'a>(
        method: &'a Method,
        target: &'a str,
        headers: &'a HeaderMap,
        fencing: Option<u64>,
    ) -> Outgoing<'a> {
        Outgoing {
            method,
            target,
            headers,
            fencing,
        }
    }

    async fn get(
        pool: &Pool,
        addr: &Authority,
        method: Method,
    ) -> Result<(StatusCode, HeaderMap, Bytes), String> {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("example"));
        let resp = pool
            .send(
                addr,
                outgoing(&method, "/x?y=1", &h, None),
                Duration::from_secs(30),
            )
            .await
            .map_err(|e| format!("{e:?}"))?;
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
        Ok((parts.status, parts.headers, body))
    }

    #[tokio::test]
    async fn chunked_body_split_into_single_bytes_is_decoded_and_the_connection_reused() {
        let (addr, conns) = server(|mut s, _| async move {
            while let Some(req) = read_request(&mut s).await {
                assert!(req.starts_with("GET /x?y=1 HTTP/1.1\r\nhost: example\r\n"), "{req}");
                let wire = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-A: 1\r\n\r\n5;ext=1\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\nX-Trailer: t\r\n\r\n";
                for b in wire {
                    s.write_all(&[*b]).await.unwrap();
                }
            }
        })
        .await;
        let pool = pool();
        for _ in 0..3 {
            let (status, headers, body) = get(&pool, &addr, Method::GET).await.unwrap();
            assert_eq!(status, 200);
            assert_eq!(headers["x-a"], "1");
            assert_eq!(&body[..], b"hello world");
            assert_eq!(pool.idle_count(), 1);
        }
        assert_eq!(
            conns.load(Ordering::SeqCst),
            1,
            "one connection for all three"
        );
    }

    /// A request on a pooled connection, its body read so the connection
    /// goes back; how long it took, or the error.
    async fn timed(
        pool: &Pool,
        addr: &Authority,
        timeout_ms: u64,
    ) -> (Duration, Result<StatusCode, String>) {
        let h = HeaderMap::new();
        let started = std::time::Instant::now();
        let sent = pool
            .send(
                addr,
                outgoing(&Method::GET, "/", &h, None),
                Duration::from_millis(timeout_ms),
            )
            .await;
        let r = match sent {
            Ok(resp) => {
                let status = resp.status();
                match resp.into_body().collect().await {
                    Ok(_) => Ok(status),
                    Err(e) => Err(e.to_string()),
                }
            }
            Err(e) => Err(format!("{e:?}")),
        };
        (started.elapsed(), r)
    }

    /// Answers a connection's requests after the delays in `delays_ms`
    /// (ms, one per request), then reads until the client goes.
    async fn answer_after(mut s: TcpStream, delays_ms: &[u64]) {
        for &ms in delays_ms {
            if read_request(&mut s).await.is_none() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(ms)).await;
            if s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                .await
                .is_err()
            {
                return;
            }
        }
        let _ = s.read_to_end(&mut Vec::new()).await;
    }

    #[tokio::test]
    async fn each_request_on_a_reused_connection_gets_the_whole_head_timeout() {
        // the connection's timer is armed by the first request, answered
        // after 200 ms; the second is answered 300 ms later, after the
        // first one's deadline but within its own; the third never is
        let (addr, conns) = server(|s, _| answer_after(s, &[200, 300])).await;
        let pool = pool();
        let (_, first) = timed(&pool, &addr, 400).await;
        assert_eq!(first, Ok(StatusCode::OK));
        let (took, second) = timed(&pool, &addr, 400).await;
        assert_eq!(second, Ok(StatusCode::OK), "answered within its own 400 ms");
        assert!(took >= Duration::from_millis(300));
        let (took, third) = timed(&pool, &addr, 400).await;
        assert_eq!(third, Err("Timeout".to_string()));
        assert!(
            took >= Duration::from_millis(390) && took < Duration::from_secs(2),
            "timed out after {took:?}"
        );
        assert_eq!(conns.load(Ordering::SeqCst), 1, "all on one connection");
    }

    #[tokio::test]
    async fn a_lowered_head_timeout_applies_at_once_on_a_reused_connection() {
        // armed for 30 s by the first request; the second may wait 200 ms
        let (addr, conns) = server(|s, _| answer_after(s, &[0])).await;
        let pool = pool();
        assert_eq!(timed(&pool, &addr, 30_000).await.1, Ok(StatusCode::OK));
        let (took, second) = timed(&pool, &addr, 200).await;
        assert_eq!(second, Err("Timeout".to_string()));
        assert!(
            took >= Duration::from_millis(190) && took < Duration::from_secs(2),
            "timed out after {took:?}"
        );
        assert_eq!(conns.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_connection_the_server_closed_while_idle_is_replaced_without_an_error() {
        let (addr, conns) = server(|mut s, _| async move {
            if read_request(&mut s).await.is_some() {
                s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                    .await
                    .unwrap();
            }
            // closes after one response, without saying so
        })
        .await;
        let pool = pool();
        for _ in 0..3 {
            let (status, _, body) = get(&pool, &addr, Method::GET).await.unwrap();
            assert_eq!((status.as_u16(), &body[..]), (200, &b"ok"[..]));
        }
        assert_eq!(conns.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn head_and_204_have_no_body_and_interim_responses_are_skipped() {
        let (addr, conns) = server(|mut s, _| async move {
            while let Some(req) = read_request(&mut s).await {
                let answer: &[u8] = if req.starts_with("HEAD") {
                    b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"
                } else {
                    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n"
                };
                s.write_all(answer).await.unwrap();
            }
        })
        .await;
        let pool = pool();
        let (status, headers, body) = get(&pool, &addr, Method::HEAD).await.unwrap();
        assert_eq!((status.as_u16(), body.len()), (200, 0));
        assert_eq!(headers["content-length"], "1000");
        let (status, headers, body) = get(&pool, &addr, Method::GET).await.unwrap();
        assert_eq!((status.as_u16(), body.len()), (204, 0));
        assert!(headers.get("link").is_none());
        assert_eq!(conns.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_body_delimited_by_close_is_read_to_the_end_and_not_pooled() {
        let (addr, conns) = server(|mut s, _| async move {
            if read_request(&mut s).await.is_some() {
                s.write_all(b"HTTP/1.0 200 OK\r\n\r\nuntil the end")
                    .await
                    .unwrap();
            }
        })
        .await;
        let pool = pool();
        for _ in 0..2 {
            let (_, _, body) = get(&pool, &addr, Method::GET).await.unwrap();
            assert_eq!(&body[..], b"until the end");
            assert_eq!(pool.idle_count(), 0);
        }
        assert_eq!(conns.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn broken_responses_are_errors() {
        let (addr, _) = server(|mut s, i| async move {
            if read_request(&mut s).await.is_some() {
                let answer: &[u8] = match i {
                    0 => b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
                    1 => b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
                    2 => b"SSH-2.0-OpenSSH\r\n\r\n",
                    _ => b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
                };
                s.write_all(answer).await.unwrap();
            }
        })
        .await;
        let pool = pool();
        let short = get(&pool, &addr, Method::GET).await.unwrap_err();
        assert!(short.contains("before the body ended"), "{short}");
        let conflict = get(&pool, &addr, Method::GET).await.unwrap_err();
        assert!(
            conflict.contains("conflicting content-length"),
            "{conflict}"
        );
        let garbage = get(&pool, &addr, Method::GET).await.unwrap_err();
        assert!(garbage.contains("invalid response head"), "{garbage}");
        let chunk = get(&pool, &addr, Method::GET).await.unwrap_err();
        assert!(chunk.contains("bad chunk size"), "{chunk}");
        assert_eq!(pool.idle_count(), 0);
    }

    #[tokio::test]
    async fn an_upgrade_gives_back_the_raw_connection_with_early_bytes() {
        let (addr, _) = server(|mut s, i| async move {
            let req = read_request(&mut s).await.unwrap();
            assert!(req.contains("upgrade: websocket\r\n"), "{req}");
            if i == 0 {
                // the new protocol's first bytes in the same write as the head
                s.write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n\x81\x02hi")
                    .await
                    .unwrap();
                let mut echo = [0u8; 4];
                s.read_exact(&mut echo).await.unwrap();
                s.write_all(&echo).await.unwrap();
            } else {
                s.write_all(b"HTTP/1.1 426 Upgrade Required\r\nContent-Length: 4\r\n\r\nnope")
                    .await
                    .unwrap();
            }
        })
        .await;
        let pool = pool();
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("example"));
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        match pool
            .upgrade(&addr, outgoing(&Method::GET, "/ws", &h, Some(7)))
            .await
            .unwrap()
        {
            Upgrade::Switched {
                response,
                mut stream,
                early,
            } => {
                assert_eq!(response.status(), 101);
                assert_eq!(response.headers()["upgrade"], "websocket");
                assert_eq!(&early[..], b"\x81\x02hi");
                stream.write_all(b"ping").await.unwrap();
                let mut back = [0u8; 4];
                stream.read_exact(&mut back).await.unwrap();
                assert_eq!(&back, b"ping");
            }
            Upgrade::Answered(r) => panic!("expected 101, got {}", r.status()),
        }
        match pool
            .upgrade(&addr, outgoing(&Method::GET, "/ws", &h, None))
            .await
            .unwrap()
        {
            Upgrade::Answered(r) => {
                assert_eq!(r.status(), 426);
                let body = r.into_body().collect().await.unwrap().to_bytes();
                assert_eq!(&body[..], b"nope");
            }
            Upgrade::Switched { .. } => panic!("expected the refusal"),
        }
    }
}
