//! nginx's `send_timeout` and HAProxy's `timeout client` for what we send:
//! a peer that takes nothing of it for `proxy.send_timeout_ms` is given up
//! on, where it would otherwise hold its connection (and the server's
//! response, or a tunnel) for as long as it keeps not reading.
//!
//! The timer runs only while a write waits, from the start of that wait,
//! and a write that moves any byte stops it: a slow reader that keeps up
//! at all is never cut, and a write that does not wait (nearly all of them)
//! costs a flag. The timer itself is made at the first wait.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// What a write's `TimedOut` error carries when its peer took nothing
/// for the send timeout (see [`is_stall`]).
#[derive(Debug)]
pub struct Stalled(Duration);

impl std::fmt::Display for Stalled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the peer took nothing of what was sent to it for {} ms (send timeout)",
            self.0.as_millis()
        )
    }
}

impl std::error::Error for Stalled {}

/// The error a write gets when its peer took nothing for the timeout.
pub fn stalled(timeout: Duration) -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, Stalled(timeout))
}

/// Whether `e`, or an error it was caused by, is a send timeout's.
pub fn is_stall(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(e);
    while let Some(e) = cause {
        let inner = e.downcast_ref::<io::Error>().and_then(io::Error::get_ref);
        if e.is::<Stalled>() || inner.is_some_and(|i| i.is::<Stalled>()) {
            return true;
        }
        cause = e.source();
    }
    false
}

/// Times the waits of one stream's writes.
struct SendTimer {
    timeout: Duration,
    timer: Option<Pin<Box<Sleep>>>,
    waiting: bool,
}

impl SendTimer {
    fn new(timeout: Duration) -> SendTimer {
        SendTimer {
            timeout,
            timer: None,
            waiting: false,
        }
    }

    /// Passes a write's poll on: one that waits starts the timer (if this
    /// wait has not), one that is done stops it, and a wait that has lasted
    /// the timeout becomes an error.
    fn check<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if polled.is_ready() {
            self.waiting = false;
            return polled;
        }
        let deadline = Instant::now() + self.timeout;
        let timer = match &mut self.timer {
            Some(t) => {
                if !self.waiting {
                    t.as_mut().reset(deadline);
                }
                t
            }
            None => self
                .timer
                .insert(Box::pin(tokio::time::sleep_until(deadline))),
        };
        self.waiting = true;
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(stalled(self.timeout))),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// A stream whose writes end in an error once its peer has taken nothing
/// for the send timeout. Reads pass through.
pub struct SendTimeout<S> {
    io: S,
    timer: SendTimer,
}

impl<S> SendTimeout<S> {
    pub fn new(io: S, timeout: Duration) -> SendTimeout<S> {
        SendTimeout {
            io,
            timer: SendTimer::new(timeout),
        }
    }

    pub fn into_inner(self) -> S {
        self.io
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for SendTimeout<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for SendTimeout<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.io).poll_write(cx, buf);
        this.timer.check(cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.timer.check(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // a TLS stream's flush writes what it holds
        let this = &mut *self;
        let polled = Pin::new(&mut this.io).poll_flush(cx);
        this.timer.check(cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // a TLS stream's shutdown writes its close_notify
        let this = &mut *self;
        let polled = Pin::new(&mut this.io).poll_shutdown(cx);
        this.timer.check(cx, polled)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        (a, b)
    }

    /// A peer that reads nothing: the write fails with `TimedOut` once the
    /// socket buffers are full and the timeout has passed.
    #[tokio::test]
    async fn a_peer_that_reads_nothing_fails_the_write() {
        let (a, _b) = pair().await;
        let mut w = SendTimeout::new(a, Duration::from_millis(200));
        let chunk = vec![7u8; 64 * 1024];
        let started = std::time::Instant::now();
        let err = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if let Err(e) = w.write_all(&chunk).await {
                    return e;
                }
            }
        })
        .await
        .expect("the write fails within the deadline");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
        assert!(is_stall(&err), "{err}");
        // another time-out is not the send timeout's
        assert!(!is_stall(&io::Error::from(io::ErrorKind::TimedOut)));
        assert!(started.elapsed() >= Duration::from_millis(200));
    }

    /// A peer that reads slowly but steadily takes everything: its pauses
    /// (150 ms each, seven of them) add up to more than the timeout
    /// (500 ms), but each byte it takes stops the timer.
    #[tokio::test]
    async fn a_slow_reader_that_keeps_reading_takes_everything() {
        let (a, mut b) = pair().await;
        // small buffers: the writer waits through each of the reader's pauses
        socket2::SockRef::from(&a)
            .set_send_buffer_size(64 * 1024)
            .unwrap();
        socket2::SockRef::from(&b)
            .set_recv_buffer_size(64 * 1024)
            .unwrap();
        let total = 8 * 1024 * 1024;
        let reader = tokio::spawn(async move {
            let mut chunk = vec![0u8; 64 * 1024];
            for i in 1..=total / chunk.len() {
                b.read_exact(&mut chunk).await.unwrap();
                if i % 16 == 0 && i < total / chunk.len() {
                    // the reader's pace is what is under test here
                    tokio::time::sleep(Duration::from_millis(150)).await;
                }
            }
            b.read(&mut chunk).await.unwrap()
        });
        let mut w = SendTimeout::new(a, Duration::from_millis(500));
        let started = std::time::Instant::now();
        w.write_all(&vec![1u8; total])
            .await
            .expect("a reader that keeps reading is never cut");
        w.shutdown().await.unwrap();
        assert_eq!(reader.await.unwrap(), 0, "nothing past the data");
        // the waits added up to more than the timeout
        assert!(
            started.elapsed() > Duration::from_millis(900),
            "{:?}",
            started.elapsed()
        );
    }
}
