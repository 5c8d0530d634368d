//! The tunnel for upgraded connections that are not two bare TCP sockets
//! (TLS on the client side, the server side, or both): the same relay,
//! half-close, idle timeout, message counts and close 1001 as
//! [`super::run`], over `AsyncRead + AsyncWrite` streams. The TLS streams
//! hold buffers of their own, so each direction reads into a small buffer.

use super::frames::{close_frame, FrameTracker};
use super::{Close, End, Options, Summary, LINGER};
use crate::send_timeout::SendTimeout;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

const BUF: usize = 8 * 1024;

#[derive(Default)]
struct Side {
    bytes: u64,
    frames: Option<FrameTracker>,
}

/// Relays until both sides closed, an error, the idle timeout or `shutdown`.
pub async fn run_streams<C, S>(client: C, server: S, opts: Options, shutdown: Close) -> Summary
where
    C: AsyncRead + AsyncWrite + Unpin,
    S: AsyncRead + AsyncWrite + Unpin,
{
    // either side's writes under the send timeout
    let (mut cr, mut cw) = tokio::io::split(SendTimeout::new(client, opts.send_timeout));
    let (mut sr, mut sw) = tokio::io::split(SendTimeout::new(server, opts.send_timeout));
    let mut up = Side::default();
    let mut down = Side::default();
    if opts.websocket {
        up.frames = Some(FrameTracker::default());
        down.frames = Some(FrameTracker::default());
    }
    let base = Instant::now();
    // ms since `base` of the last byte either way
    let last = AtomicU64::new(0);
    let end = {
        let both = async {
            let (a, b) = tokio::join!(
                pump(&mut cr, &mut sw, &mut up, &last, base, &opts),
                pump(&mut sr, &mut cw, &mut down, &last, base, &opts),
            );
            let timed_out =
                |r: &io::Result<()>| r.as_ref().is_err_and(|e| crate::send_timeout::is_stall(e));
            if a.is_ok() && b.is_ok() {
                End::Closed
            } else if timed_out(&a) || timed_out(&b) {
                End::Stalled
            } else {
                End::Error
            }
        };
        let idle = async {
            loop {
                let deadline =
                    base + std::time::Duration::from_millis(last.load(Relaxed)) + opts.idle_timeout;
                if Instant::now() >= deadline {
                    return;
                }
                tokio::time::sleep_until(deadline).await;
            }
        };
        tokio::select! {
            e = both => e,
            _ = idle => End::Idle,
            _ = shutdown.token().cancelled() => End::Shutdown,
        }
    };
    if matches!(end, End::Idle | End::Shutdown) {
        let work = async {
            let boundary = |s: &Side| s.frames.as_ref().is_some_and(FrameTracker::may_close);
            if boundary(&down) {
                cw.write_all(&close_frame(1001, "going away", false))
                    .await?;
            }
            if boundary(&up) {
                sw.write_all(&close_frame(1001, "going away", true)).await?;
            }
            let _ = cw.shutdown().await;
            let _ = sw.shutdown().await;
            let (c, s) = tokio::join!(read_to_eof(&mut cr), read_to_eof(&mut sr));
            c.and(s)
        };
        if let Ok(Err(e)) = tokio::time::timeout(LINGER, work).await {
            tracing::debug!(error = %e, "tunnel close handshake cut short");
        }
    }
    let count = |s: &Side| s.frames.as_ref().map_or(0, |t| t.messages);
    Summary {
        end,
        bytes_up: up.bytes,
        bytes_down: down.bytes,
        messages_up: count(&up),
        messages_down: count(&down),
    }
}

/// One direction: read, count, write on; EOF is passed on as a half-close.
async fn pump<R, W>(
    r: &mut R,
    w: &mut W,
    side: &mut Side,
    last: &AtomicU64,
    base: Instant,
    opts: &Options,
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; BUF];
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            return w.shutdown().await;
        }
        last.store(base.elapsed().as_millis() as u64, Relaxed);
        side.bytes += n as u64;
        if let Some(t) = side.frames.as_mut() {
            let before = t.messages;
            t.feed(&buf[..n]);
            let new = t.messages - before;
            if let (Some((server, total)), true) = (&opts.count_into, new > 0) {
                server.ws_messages.fetch_add(new, Relaxed);
                total.ws_messages.fetch_add(new, Relaxed);
            }
        }
        w.write_all(&buf[..n]).await?;
        w.flush().await?;
    }
}

async fn read_to_eof<R: AsyncRead + Unpin>(r: &mut R) -> io::Result<()> {
    let mut sink = vec![0u8; 1024];
    while r.read(&mut sink).await? != 0 {}
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn relays_half_closes_and_sends_1001_when_idle() {
        let (mut client, proxy_c) = tokio::io::duplex(64 * 1024);
        let (proxy_s, mut server) = tokio::io::duplex(64 * 1024);
        let t = tokio::spawn(run_streams(
            proxy_c,
            proxy_s,
            Options {
                idle_timeout: Duration::from_millis(300),
                send_timeout: Duration::from_secs(60),
                websocket: true,
                count_into: None,
            },
            Close::new(),
        ));
        // one masked text frame "hi" up, one unmasked frame back
        let up = [0x81, 0x82, 1, 2, 3, 4, b'h' ^ 1, b'i' ^ 2];
        client.write_all(&up).await.unwrap();
        let mut got = [0u8; 8];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(got, up);
        server.write_all(&[0x81, 0x02, b'o', b'k']).await.unwrap();
        let mut back = [0u8; 4];
        client.read_exact(&mut back).await.unwrap();
        assert_eq!(&back[2..], b"ok");
        // then silence: both sides get close 1001
        let mut close = vec![0u8; 64];
        let n = client.read(&mut close).await.unwrap();
        assert_eq!(&close[..n], &close_frame(1001, "going away", false)[..]);
        let n = server.read(&mut close).await.unwrap();
        assert_eq!(close[0], 0x88);
        assert_eq!(n, 6 + 12);
        drop((client, server));
        let sum = t.await.unwrap();
        assert_eq!(sum.end, End::Idle);
        assert_eq!((sum.messages_up, sum.messages_down), (1, 1));
    }
}
