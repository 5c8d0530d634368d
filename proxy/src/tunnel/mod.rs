//! Upgraded connections (WebSocket and other `Upgrade:` protocols) relayed
//! both ways on the raw sockets. Memory per idle tunnel stays small: the
//! task waits for readiness and reads into a per-thread scratch buffer, and
//! keeps a buffer of its own only for bytes the other side could not take
//! yet (which is also the back-pressure: that side is not read again until
//! they are written). Half-close is passed on; an idle tunnel, or one still
//! open when the proxy shuts down, gets close code 1001 where it is WebSocket.
//! A side that takes nothing of what waits for it for the send timeout
//! ends the tunnel (nginx's `send_timeout` on an upgraded connection).

pub mod frames;
mod streams;

pub use streams::run_streams;

use frames::{close_frame, FrameTracker};
use socket2::SockRef;
use std::cell::RefCell;
use std::io::{self, ErrorKind, Read};
use std::net::Shutdown;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

const SCRATCH: usize = 16 * 1024;
/// Reads per wake-up before yielding to other tasks.
const BURST: usize = 8;
/// How long a closing tunnel waits for the peers' close replies.
const LINGER: Duration = Duration::from_secs(1);

thread_local! {
    static SCRATCH_BUF: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; SCRATCH].into_boxed_slice());
}

/// The signal that closes every open tunnel (at the end of a shutdown's
/// drain). A flag, read with a plain load on every wake-up of every
/// tunnel, and a token whose waiters list wakes each tunnel once.
/// `CancellationToken::is_cancelled` takes a lock, and polling its future
/// another (the waiters list's) on every wake-up: both were in the relay's
/// profile.
#[derive(Clone, Default)]
pub struct Close {
    closed: Arc<AtomicBool>,
    token: CancellationToken,
}

impl Close {
    pub fn new() -> Close {
        Close::default()
    }

    /// Closes the tunnels open now and any opened later.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.token.cancel();
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    pub fn token(&self) -> &CancellationToken {
        &self.token
    }
}

/// How a tunnel ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Both sides closed their halves.
    Closed,
    /// A socket error (reset, broken pipe).
    Error,
    /// No byte either way for the idle timeout.
    Idle,
    /// One side took nothing of what waited for it for the send timeout.
    Stalled,
    /// The proxy is shutting down.
    Shutdown,
}

/// Totals of one finished tunnel.
#[derive(Debug, Clone, Copy)]
pub struct Summary {
    pub end: End,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub messages_up: u64,
    pub messages_down: u64,
}

pub struct Options {
    pub idle_timeout: Duration,
    /// A side that takes nothing of what waits for it for this long ends
    /// the tunnel.
    pub send_timeout: Duration,
    /// Track WebSocket frames (for close 1001 and message counts).
    pub websocket: bool,
    /// Counters that see relayed messages as they pass (per server, total).
    pub count_into: Option<(
        std::sync::Arc<crate::state::ServerState>,
        std::sync::Arc<crate::app::Counters>,
    )>,
}

#[derive(Default)]
struct Dir {
    pending: Vec<u8>,
    /// Since when (coarse ms, 0: not) `pending` has waited for `dst` to
    /// take a byte.
    stalled_since: u64,
    eof: bool,
    shut: bool,
    bytes: u64,
    frames: Option<FrameTracker>,
}

enum Step {
    Progress,
    Idle,
    Failed,
}

impl Dir {
    fn can_read(&self) -> bool {
        !self.eof && self.pending.is_empty()
    }

    /// Reads what `src` has and writes it on to `dst`, keeping what `dst` refuses.
    fn relay(&mut self, src: &TcpStream, dst: &TcpStream) -> Step {
        SCRATCH_BUF.with(|cell| {
            let mut scratch = cell.borrow_mut();
            let mut moved = false;
            for _ in 0..BURST {
                let mut got = 0;
                let read = src.try_io(Interest::READABLE, || {
                    let n = (&*SockRef::from(src)).read(&mut scratch[..])?;
                    got = n;
                    if n > 0 && n < SCRATCH {
                        // a short read drained the socket: its readiness is
                        // cleared now (as tokio's poll_read does), rather
                        // than by one more read that finds nothing
                        return Err(ErrorKind::WouldBlock.into());
                    }
                    Ok(n)
                });
                let drained = got > 0 && got < SCRATCH;
                let n = match read {
                    Ok(0) => {
                        self.eof = true;
                        return self.finish_if_flushed(dst);
                    }
                    Ok(n) => n,
                    Err(e) if e.kind() == ErrorKind::WouldBlock && drained => got,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(_) => return Step::Failed,
                };
                moved = true;
                self.bytes += n as u64;
                if let Some(t) = self.frames.as_mut() {
                    t.feed(&scratch[..n]);
                }
                match dst.try_write(&scratch[..n]) {
                    Ok(w) if w == n && drained => break,
                    Ok(w) if w == n => continue,
                    Ok(w) => {
                        self.pending.extend_from_slice(&scratch[w..n]);
                        break;
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        self.pending.extend_from_slice(&scratch[..n]);
                        break;
                    }
                    Err(_) => return Step::Failed,
                }
            }
            if moved {
                Step::Progress
            } else {
                Step::Idle
            }
        })
    }

    /// Writes kept bytes to `dst` as it becomes writable.
    fn flush(&mut self, dst: &TcpStream) -> Step {
        let mut took = false;
        while !self.pending.is_empty() {
            match dst.try_write(&self.pending) {
                Ok(w) => {
                    self.pending.drain(..w);
                    took = true;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    if took {
                        // it took some: the send timeout starts over
                        self.stalled_since = crate::clock::coarse_ms().max(1);
                        return Step::Progress;
                    }
                    return Step::Idle;
                }
                Err(_) => return Step::Failed,
            }
        }
        // release the buffer: an idle tunnel holds no memory for data
        self.pending = Vec::new();
        self.finish_if_flushed(dst)
    }

    fn finish_if_flushed(&mut self, dst: &TcpStream) -> Step {
        if self.eof && self.pending.is_empty() && !self.shut {
            self.shut = true;
            // half-close: the peer sees EOF, the other direction goes on
            if SockRef::from(dst).shutdown(Shutdown::Write).is_err() {
                return Step::Failed;
            }
        }
        Step::Progress
    }

    fn done(&self) -> bool {
        self.shut
    }

    /// Keeps `stalled_since` in step with `pending`; the deadline (coarse
    /// ms) of a stall that has just begun.
    fn track_stall(&mut self, send_ms: u64) -> Option<u64> {
        match (self.pending.is_empty(), self.stalled_since) {
            (true, 0) | (false, 1..) => None,
            (true, _) => {
                self.stalled_since = 0;
                None
            }
            (false, 0) => {
                self.stalled_since = crate::clock::coarse_ms().max(1);
                Some(self.stalled_since + send_ms)
            }
        }
    }

    /// When this direction's stall passes the send timeout (coarse ms).
    fn stall_deadline(&self, send_ms: u64) -> Option<u64> {
        (self.stalled_since != 0).then_some(self.stalled_since + send_ms)
    }
}

/// Hyper's connection task and the request's task polled these sockets
/// before the tunnel took them over, and each socket still holds their
/// wakers in its reader and writer slots. A waker keeps its finished task's
/// memory, about 4 KiB, allocated for as long as it stays there. The tunnel's
/// own waker replaces the reader's at its first wait that finds nothing to
/// read ([`wait`]; a stale readiness is cleared by the read it causes), but
/// the writer slot is only polled once a write has had to wait, which may be
/// never: a no-op waker takes its place now (a slot is only filled while the
/// socket is not writable, as it rarely is here).
fn release_wakers(s: &TcpStream) {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    let _ = s.poll_write_ready(&mut cx);
}

/// Relays between `client` and `server` until both sides closed, an error,
/// the idle timeout, or `shutdown`. `client_early` and `server_early` are
/// bytes already read past the HTTP heads.
pub async fn run(
    mut client: TcpStream,
    client_early: bytes::Bytes,
    mut server: TcpStream,
    server_early: bytes::Bytes,
    opts: Options,
    shutdown: Close,
) -> Summary {
    let mut up = Dir::default(); // client → server
    let mut down = Dir::default(); // server → client
    if opts.websocket {
        up.frames = Some(FrameTracker::default());
        down.frames = Some(FrameTracker::default());
    }
    release_wakers(&client);
    release_wakers(&server);
    // copy what hyper read ahead and let its buffers go: an idle tunnel
    // keeps no data buffer (SPEC 6)
    for (dir, early) in [(&mut up, client_early), (&mut down, server_early)] {
        if !early.is_empty() {
            dir.bytes += early.len() as u64;
            if let Some(t) = dir.frames.as_mut() {
                t.feed(&early);
            }
            dir.pending.extend_from_slice(&early);
        }
    }

    let count = |d: &Dir| d.frames.as_ref().map_or(0, |t| t.messages);
    let mut counted = 0u64;
    // coarse: read on every relayed read, compared only when the timer fires
    let mut last = crate::clock::coarse_ms();
    let idle_ms = opts.idle_timeout.as_millis() as u64;
    let send_ms = opts.send_timeout.as_millis() as u64;
    // the one timer: the idle deadline, or a stall's when that is earlier
    let idle = tokio::time::sleep(opts.idle_timeout);
    tokio::pin!(idle);
    let cancelled = shutdown.token().cancelled();
    tokio::pin!(cancelled);
    let mut armed = Armed::default();

    let end = loop {
        if up.done() && down.done() {
            break End::Closed;
        }
        let event = std::future::poll_fn(|cx| {
            wait(
                cx,
                Sources {
                    client: &client,
                    server: &server,
                    close: &shutdown,
                    cancelled: cancelled.as_mut(),
                    idle: idle.as_mut(),
                },
                &up,
                &down,
                &mut armed,
            )
        })
        .await;
        // a socket we read or write may have had its readiness cleared,
        // and with it the waker its slot held: it is polled again
        let step = match event {
            Event::Shutdown => break End::Shutdown,
            Event::ClientWritable => {
                armed.clear(Armed::CLIENT_WRITE);
                down.flush(&client)
            }
            Event::ServerWritable => {
                armed.clear(Armed::SERVER_WRITE);
                up.flush(&server)
            }
            Event::ClientReadable => {
                armed.clear(Armed::CLIENT_READ | Armed::SERVER_WRITE);
                up.relay(&client, &server)
            }
            Event::ServerReadable => {
                armed.clear(Armed::SERVER_READ | Armed::CLIENT_WRITE);
                down.relay(&server, &client)
            }
            Event::Failed => Step::Failed,
            Event::Idle => {
                armed.clear(Armed::IDLE);
                let stall = [up.stall_deadline(send_ms), down.stall_deadline(send_ms)]
                    .into_iter()
                    .flatten()
                    .min();
                if stall.is_some_and(|d| d <= crate::clock::coarse_ms()) {
                    break End::Stalled;
                }
                let deadline = stall.map_or(last + idle_ms, |d| d.min(last + idle_ms));
                if crate::clock::passed_or_rearm(idle.as_mut(), deadline) {
                    break End::Idle;
                }
                Step::Idle
            }
        };
        // bytes left waiting for a side start its send timeout, which
        // brings the timer forward if it would fire later
        for d in [&mut up, &mut down] {
            if let Some(deadline) = d.track_stall(send_ms) {
                let now = crate::clock::coarse_ms();
                let at = crate::clock::instant_at(now, deadline);
                if at < idle.deadline() {
                    idle.as_mut().reset(at);
                    armed.clear(Armed::IDLE);
                }
            }
        }
        match step {
            Step::Progress => {
                last = crate::clock::coarse_ms();
                if let Some((server, total)) = &opts.count_into {
                    let seen = count(&up) + count(&down);
                    if seen > counted {
                        server
                            .ws_messages
                            .fetch_add(seen - counted, std::sync::atomic::Ordering::Relaxed);
                        total
                            .ws_messages
                            .fetch_add(seen - counted, std::sync::atomic::Ordering::Relaxed);
                        counted = seen;
                    }
                }
            }
            Step::Idle => {}
            Step::Failed => break End::Error,
        }
    };

    if matches!(end, End::Idle | End::Shutdown) {
        // boxed: its state is only needed while closing, not in every idle tunnel
        Box::pin(going_away(&mut client, &mut server, &mut up, &mut down)).await;
    }
    Summary {
        end,
        bytes_up: up.bytes,
        bytes_down: down.bytes,
        messages_up: count(&up),
        messages_down: count(&down),
    }
}

/// What woke a tunnel.
enum Event {
    Shutdown,
    ClientWritable,
    ServerWritable,
    ClientReadable,
    ServerReadable,
    Idle,
    Failed,
}

/// The tunnel's wake-up sources that hold this task's waker now (see
/// [`wait`]).
#[derive(Default, Clone, Copy)]
struct Armed(u8);

impl Armed {
    const CLIENT_READ: u8 = 1;
    const SERVER_READ: u8 = 2;
    const CLIENT_WRITE: u8 = 4;
    const SERVER_WRITE: u8 = 8;
    const IDLE: u8 = 16;
    const CLOSE: u8 = 32;

    fn has(self, bit: u8) -> bool {
        self.0 & bit != 0
    }

    fn set(&mut self, bit: u8) {
        self.0 |= bit;
    }

    fn clear(&mut self, bits: u8) {
        self.0 &= !bits;
    }
}

/// What a tunnel waits on besides its buffers.
struct Sources<'a, 'b> {
    client: &'a TcpStream,
    server: &'a TcpStream,
    close: &'a Close,
    cancelled: std::pin::Pin<&'a mut tokio_util::sync::WaitForCancellationFuture<'b>>,
    idle: std::pin::Pin<&'a mut tokio::time::Sleep>,
}

/// The first of the tunnel's events that is ready, in priority order:
/// shutdown, then writes owed (back-pressure first), then reads, then the
/// idle timer. Polled by hand rather than with `select!`: that built and
/// dropped a readiness future per socket and a cancellation future on every
/// wake-up, each registered in and removed from a waiter list under a lock.
///
/// A source is polled, which stores the task's waker in it (for a socket,
/// under its lock), only when it does not hold the waker yet; one that does
/// (`armed`) wakes the task when it fires, so a plain load of its state
/// tells whether it has: the readiness bits of a socket, the state of the
/// timer, the close flag. Of the two sockets only the one just read or
/// written is polled again, and the timer and the close token not at all,
/// where each wake-up used to take four locks. The task is spawned on its
/// own, so its waker never changes.
fn wait(
    cx: &mut std::task::Context<'_>,
    src: Sources<'_, '_>,
    up: &Dir,
    down: &Dir,
    armed: &mut Armed,
) -> std::task::Poll<Event> {
    use std::future::Future;
    use std::task::Poll::{Pending, Ready};
    if src.close.is_closed() {
        return Ready(Event::Shutdown);
    }
    if !armed.has(Armed::CLOSE) {
        if src.cancelled.poll(cx).is_ready() {
            return Ready(Event::Shutdown);
        }
        armed.set(Armed::CLOSE);
    }
    let ready =
        |r: io::Result<()>, event: Event| Ready(if r.is_ok() { event } else { Event::Failed });
    let checks = [
        (
            !down.pending.is_empty(),
            src.client,
            Interest::WRITABLE,
            Armed::CLIENT_WRITE,
        ),
        (
            !up.pending.is_empty(),
            src.server,
            Interest::WRITABLE,
            Armed::SERVER_WRITE,
        ),
        (
            up.can_read(),
            src.client,
            Interest::READABLE,
            Armed::CLIENT_READ,
        ),
        (
            down.can_read(),
            src.server,
            Interest::READABLE,
            Armed::SERVER_READ,
        ),
    ];
    for (wanted, socket, interest, bit) in checks {
        if !wanted {
            continue;
        }
        if let Some(r) = socket_ready(cx, socket, interest, armed, bit) {
            let event = match bit {
                Armed::CLIENT_WRITE => Event::ClientWritable,
                Armed::SERVER_WRITE => Event::ServerWritable,
                Armed::CLIENT_READ => Event::ClientReadable,
                _ => Event::ServerReadable,
            };
            return ready(r, event);
        }
    }
    if armed.has(Armed::IDLE) {
        if src.idle.is_elapsed() {
            return Ready(Event::Idle);
        }
    } else {
        // with the task's budget spent, the poll yields without storing the waker
        let stores = tokio::task::coop::has_budget_remaining();
        if src.idle.poll(cx).is_ready() {
            return Ready(Event::Idle);
        }
        if stores {
            armed.set(Armed::IDLE);
        }
    }
    Pending
}

/// Whether `socket` is ready for `interest`: a plain load of its readiness
/// when its slot holds the task's waker, a poll that stores it otherwise.
fn socket_ready(
    cx: &mut std::task::Context<'_>,
    socket: &TcpStream,
    interest: Interest,
    armed: &mut Armed,
    bit: u8,
) -> Option<io::Result<()>> {
    if armed.has(bit) {
        // readiness set since the waker was stored took the waker with it
        if socket.try_io(interest, || Ok(())).is_ok() {
            armed.clear(bit);
            return Some(Ok(()));
        }
        return None;
    }
    // with the task's budget spent, the poll yields without storing the waker
    let stores = tokio::task::coop::has_budget_remaining();
    let polled = if interest == Interest::WRITABLE {
        socket.poll_write_ready(cx)
    } else {
        socket.poll_read_ready(cx)
    };
    match polled {
        std::task::Poll::Ready(r) => Some(r),
        std::task::Poll::Pending => {
            if stores {
                armed.set(bit);
            }
            None
        }
    }
}

/// Flushes what is in flight, sends close 1001 to both peers where the
/// stream sits between frames, and waits briefly for them to finish.
async fn going_away(client: &mut TcpStream, server: &mut TcpStream, up: &mut Dir, down: &mut Dir) {
    let work = async {
        client.write_all(&down.pending).await?;
        server.write_all(&up.pending).await?;
        if down.frames.as_ref().is_some_and(FrameTracker::may_close) {
            client
                .write_all(&close_frame(1001, "going away", false))
                .await?;
        }
        if up.frames.as_ref().is_some_and(FrameTracker::may_close) {
            server
                .write_all(&close_frame(1001, "going away", true))
                .await?;
        }
        let _ = client.shutdown().await;
        let _ = server.shutdown().await;
        // drain until both peers close, so the close handshake completes
        let (c, s) = tokio::join!(read_to_eof(client), read_to_eof(server));
        c?;
        s?;
        Ok::<(), io::Error>(())
    };
    match tokio::time::timeout(LINGER, work).await {
        Ok(Ok(())) | Err(_) => {}
        Ok(Err(e)) => tracing::debug!(error = %e, "tunnel close handshake cut short"),
    }
}

/// Reads and discards until the peer closes its side. The buffer is on the
/// heap: a local array would sit in every tunnel's future, idle or not.
async fn read_to_eof(s: &mut TcpStream) -> io::Result<()> {
    let mut sink = vec![0u8; 1024];
    while s.read(&mut sink).await? != 0 {}
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use tokio::net::TcpListener;
    use tokio::time::Instant;

    /// The send timeout of the tunnels these tests start (but those of the
    /// send timeout's own tests).
    const SEND_TIMEOUT: Duration = Duration::from_secs(5);

    /// A tunnel between `c` (which sent `early` before it) and `s`.
    fn start(
        c: TcpStream,
        early: &'static [u8],
        s: TcpStream,
        idle_timeout: Duration,
        websocket: bool,
    ) -> tokio::task::JoinHandle<Summary> {
        start_closable(c, early, s, idle_timeout, websocket, Close::new())
    }

    fn start_closable(
        c: TcpStream,
        early: &'static [u8],
        s: TcpStream,
        idle_timeout: Duration,
        websocket: bool,
        close: Close,
    ) -> tokio::task::JoinHandle<Summary> {
        let opts = Options {
            idle_timeout,
            send_timeout: SEND_TIMEOUT,
            websocket,
            count_into: None,
        };
        let early = bytes::Bytes::from_static(early);
        tokio::spawn(run(c, early, s, bytes::Bytes::new(), opts, close))
    }

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        (a, b)
    }

    /// A waker that records when the last reference to it goes.
    struct Tracked(Arc<std::sync::atomic::AtomicBool>);

    impl std::task::Wake for Tracked {
        fn wake(self: Arc<Self>) {}
    }

    impl Drop for Tracked {
        fn drop(&mut self) {
            self.0.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }

    #[tokio::test]
    async fn a_tunnel_lets_go_of_the_wakers_of_the_tasks_that_used_its_sockets() {
        let (_client, proxy_c) = pair().await;
        let (proxy_s, _server) = pair().await;
        // as hyper's connection task leaves them: waiting to read, its waker stored
        let mut released = Vec::new();
        for s in [&proxy_c, &proxy_s] {
            let flag = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let waker = std::task::Waker::from(Arc::new(Tracked(flag.clone())));
            // a fresh socket may report stale readiness first; hyper's last
            // read cleared it, so clear it the same way
            let mut cx = std::task::Context::from_waker(&waker);
            while s.poll_read_ready(&mut cx).is_ready() {
                let mut b = [0u8; 1];
                assert!(s.try_read(&mut b).is_err(), "no data was sent");
            }
            drop(waker); // the socket holds the only reference now
            assert!(!flag.load(std::sync::atomic::Ordering::SeqCst));
            released.push(flag);
        }
        let t = start(proxy_c, b"", proxy_s, Duration::from_secs(30), true);
        let deadline = Instant::now() + Duration::from_secs(5);
        while !released
            .iter()
            .all(|f| f.load(std::sync::atomic::Ordering::SeqCst))
        {
            assert!(
                Instant::now() < deadline,
                "the idle tunnel still holds the old wakers"
            );
            tokio::task::yield_now().await;
        }
        assert!(!t.is_finished(), "the tunnel is idle, not closed");
        t.abort();
    }

    #[tokio::test]
    async fn relays_both_ways_with_half_close_and_back_pressure() {
        let (mut client, proxy_c) = pair().await;
        let (proxy_s, mut server) = pair().await;
        let t = start(proxy_c, b"early", proxy_s, Duration::from_secs(30), false);
        // 8 MiB up while the server does not read: back-pressure, then it all arrives
        let big: Vec<u8> = (0..8 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
        let sent = big.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&sent).await.unwrap();
            client.shutdown().await.unwrap(); // half-close
            let mut back = Vec::new();
            client.read_to_end(&mut back).await.unwrap();
            back
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got.len(), 5 + big.len());
        assert_eq!(&got[..5], b"early");
        assert!(got[5..] == big[..]);
        server.write_all(b"reply after half-close").await.unwrap();
        server.shutdown().await.unwrap();
        assert_eq!(writer.await.unwrap(), b"reply after half-close");
        let s = t.await.unwrap();
        assert_eq!(s.end, End::Closed);
        assert_eq!(s.bytes_up, 5 + big.len() as u64);
    }

    /// A tunnel with a short send timeout, sockets with small buffers.
    async fn stall_tunnel(
        send_timeout: Duration,
    ) -> (TcpStream, TcpStream, tokio::task::JoinHandle<Summary>) {
        let (client, proxy_c) = pair().await;
        let (proxy_s, server) = pair().await;
        for s in [&client, &proxy_c, &proxy_s, &server] {
            let r = SockRef::from(s);
            r.set_send_buffer_size(64 * 1024).unwrap();
            r.set_recv_buffer_size(64 * 1024).unwrap();
        }
        let opts = Options {
            idle_timeout: Duration::from_secs(30),
            send_timeout,
            websocket: false,
            count_into: None,
        };
        let t = tokio::spawn(run(
            proxy_c,
            bytes::Bytes::new(),
            proxy_s,
            bytes::Bytes::new(),
            opts,
            Close::new(),
        ));
        (client, server, t)
    }

    /// A client that reads nothing while its server sends: once the
    /// buffers are full nothing moves, and the tunnel ends at the send
    /// timeout (not at the idle timeout, 30 s), the server's socket closed.
    #[tokio::test]
    async fn a_client_that_takes_nothing_ends_the_tunnel_at_the_send_timeout() {
        let (_client, mut server, t) = stall_tunnel(Duration::from_millis(300)).await;
        let flood = tokio::spawn(async move {
            let chunk = vec![9u8; 64 * 1024];
            loop {
                if let Err(e) = server.write_all(&chunk).await {
                    return e;
                }
            }
        });
        let sum = tokio::time::timeout(Duration::from_secs(10), t)
            .await
            .expect("ended well before the idle timeout")
            .unwrap();
        assert_eq!(sum.end, End::Stalled);
        assert!(sum.bytes_down > 0);
        // the server's writes fail: the tunnel closed its side
        let e = tokio::time::timeout(Duration::from_secs(10), flood)
            .await
            .expect("the server sees the close")
            .unwrap();
        assert!(
            matches!(e.kind(), ErrorKind::BrokenPipe | ErrorKind::ConnectionReset),
            "{e}"
        );
    }

    /// A client that reads slowly but steadily gets everything: its pauses
    /// (150 ms, seven of them) add up to more than the send timeout
    /// (500 ms), but each byte it takes starts the timeout over.
    #[tokio::test]
    async fn a_slow_client_that_keeps_reading_gets_everything() {
        let (mut client, mut server, t) = stall_tunnel(Duration::from_millis(500)).await;
        let total = 8 * 1024 * 1024;
        let started = std::time::Instant::now();
        let sender = tokio::spawn(async move {
            server.write_all(&vec![3u8; total]).await.unwrap();
            server.shutdown().await.unwrap();
            server
        });
        let mut chunk = vec![0u8; 64 * 1024];
        for i in 1..=total / chunk.len() {
            client.read_exact(&mut chunk).await.unwrap();
            if i % 16 == 0 && i < total / chunk.len() {
                // the reader's pace is what is under test here
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
        }
        assert_eq!(
            client.read(&mut chunk).await.unwrap(),
            0,
            "then the half-close"
        );
        assert!(started.elapsed() > Duration::from_millis(900));
        client.shutdown().await.unwrap();
        drop(sender.await.unwrap());
        let sum = t.await.unwrap();
        assert_eq!((sum.end, sum.bytes_down), (End::Closed, total as u64));
    }

    /// Masked text frame `hi` (client to server).
    const UP: [u8; 8] = [0x81, 0x82, 1, 2, 3, 4, b'h' ^ 1, b'i' ^ 2];
    /// Text frame `ok` (server to client).
    const DOWN: [u8; 4] = [0x81, 0x02, b'o', b'k'];

    /// A tunnel that has relayed both ways (so it waits on its sockets,
    /// timer and close signal without polling them) still sees each of
    /// them: more traffic, then the close signal, which sends 1001 both ways.
    #[tokio::test]
    async fn a_busy_tunnel_relays_on_and_closes_at_the_signal() {
        let (mut client, proxy_c) = pair().await;
        let (proxy_s, mut server) = pair().await;
        let close = Close::new();
        let t = start_closable(
            proxy_c,
            b"",
            proxy_s,
            Duration::from_secs(30),
            true,
            close.clone(),
        );
        for _ in 0..3 {
            client.write_all(&UP).await.unwrap();
            let mut got = [0u8; 8];
            server.read_exact(&mut got).await.unwrap();
            assert_eq!(got, UP);
            server.write_all(&DOWN).await.unwrap();
            let mut back = [0u8; 4];
            client.read_exact(&mut back).await.unwrap();
            assert_eq!(back, DOWN);
        }
        close.close();
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(5), client.read(&mut buf))
            .await
            .expect("1001 within 5 s of the close signal")
            .unwrap();
        assert_eq!(&buf[..n], &close_frame(1001, "going away", false)[..]);
        let n = server.read(&mut buf).await.unwrap();
        assert_eq!((buf[0], n), (0x88, 6 + 12));
        drop((client, server));
        let sum = t.await.unwrap();
        assert_eq!(sum.end, End::Shutdown);
        assert_eq!((sum.messages_up, sum.messages_down), (3, 3));
    }

    /// Traffic keeps a tunnel open past its idle timeout (the timer is
    /// moved when it fires early, and not polled on each wake-up); it still
    /// ends the tunnel once the traffic stops.
    #[tokio::test]
    async fn a_tunnel_goes_idle_after_traffic() {
        let (mut client, proxy_c) = pair().await;
        let (proxy_s, mut server) = pair().await;
        let t = start(proxy_c, b"", proxy_s, Duration::from_millis(300), true);
        // 400 ms of traffic, longer than the idle timeout
        let mut last = std::time::Instant::now();
        for _ in 0..4 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            client.write_all(&UP).await.unwrap();
            last = std::time::Instant::now();
            let mut got = [0u8; 8];
            server.read_exact(&mut got).await.unwrap();
            assert_eq!(got, UP, "still open while the traffic goes on");
        }
        let mut buf = [0u8; 64];
        let n = client.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], &close_frame(1001, "going away", false)[..]);
        let quiet = last.elapsed();
        // less a tick of the coarse clock the activity is stamped with
        assert!(
            quiet >= Duration::from_millis(280),
            "closed after {quiet:?} of quiet"
        );
        drop((client, server));
        assert_eq!(t.await.unwrap().end, End::Idle);
    }

    #[tokio::test]
    async fn idle_websocket_gets_1001_both_ways() {
        let (mut client, proxy_c) = pair().await;
        let (proxy_s, mut server) = pair().await;
        let t = start(proxy_c, b"", proxy_s, Duration::from_millis(200), true);
        let mut buf = [0u8; 64];
        let n = client.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], &close_frame(1001, "going away", false)[..]);
        let n = server.read(&mut buf).await.unwrap();
        assert_eq!(buf[0], 0x88);
        assert_eq!(buf[1] & 0x80, 0x80, "client-to-server frames are masked");
        assert_eq!(n, 6 + 12);
        drop((client, server));
        assert_eq!(t.await.unwrap().end, End::Idle);
    }
}
