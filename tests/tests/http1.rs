//! The proxy's own HTTP/1.1 server loop (plain connections), byte by byte:
//! pipelining, HEAD and 204, re-framing a server's chunked or
//! close-delimited body, `Connection: close`, the keep-alive timeout, and
//! handing a connection to hyper mid-way for a body or an upgrade.

use futures_util::{SinkExt, StreamExt};
use kp5_tests::support::*;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

const WITHIN: Duration = Duration::from_secs(5);

#[derive(Debug)]
struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!("{e}: {}", String::from_utf8_lossy(&self.body));
        })
    }
}

/// Reads one response from `s`; `buf` carries bytes read past it.
async fn read_response(s: &mut TcpStream, buf: &mut Vec<u8>, no_body: bool) -> Resp {
    async fn more(s: &mut TcpStream, buf: &mut Vec<u8>) -> usize {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(WITHIN, s.read(&mut chunk))
            .await
            .expect("response within the deadline")
            .expect("read");
        buf.extend_from_slice(&chunk[..n]);
        n
    }
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        assert!(more(s, buf).await > 0, "closed before a response head");
    };
    let head = String::from_utf8(buf.drain(..head_end).collect()).unwrap();
    let mut lines = head.trim_end().split("\r\n");
    let status_line = lines.next().unwrap();
    assert!(status_line.starts_with("HTTP/1.1 "), "{status_line}");
    let status: u16 = status_line[9..12].parse().unwrap();
    let headers: Vec<(String, String)> = lines
        .map(|l| {
            let (n, v) = l.split_once(':').expect("a header field");
            (n.trim().to_owned(), v.trim().to_owned())
        })
        .collect();
    let mut r = Resp {
        status,
        headers,
        body: Vec::new(),
    };
    if no_body || status == 204 || status == 304 {
        return r;
    }
    if let Some(len) = r.header("content-length") {
        let len: usize = len.parse().unwrap();
        while buf.len() < len {
            assert!(more(s, buf).await > 0, "closed inside a body");
        }
        r.body = buf.drain(..len).collect();
        return r;
    }
    assert_eq!(r.header("transfer-encoding"), Some("chunked"), "{r:?}");
    loop {
        let line_end = loop {
            if let Some(i) = buf.windows(2).position(|w| w == b"\r\n") {
                break i;
            }
            assert!(more(s, buf).await > 0, "closed inside a chunk size");
        };
        let size = usize::from_str_radix(std::str::from_utf8(&buf[..line_end]).unwrap(), 16)
            .expect("a chunk size");
        buf.drain(..line_end + 2);
        while buf.len() < size + 2 {
            assert!(more(s, buf).await > 0, "closed inside a chunk");
        }
        if size == 0 {
            assert_eq!(&buf[..2], b"\r\n", "no trailers expected");
            buf.drain(..2);
            return r;
        }
        r.body.extend(buf.drain(..size));
        assert_eq!(buf.drain(..2).collect::<Vec<_>>(), b"\r\n");
    }
}

async fn closed(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 64];
    matches!(
        tokio::time::timeout(WITHIN, s.read(&mut b)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

/// Pipelined requests are answered in order, HEAD and 204 without a body,
/// each with a Date; a POST then moves the connection to hyper's server,
/// which keeps serving it; `Connection: close` is answered and closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_head_204_then_a_body_then_close() {
    let b = backends(1).await;
    let proxy = start_proxy(&config(&servers_of(&b), "", "")).await;
    let mut s = TcpStream::connect(proxy.listen[0]).await.unwrap();
    s.write_all(
        b"GET /a?x=1 HTTP/1.1\r\nHost: h\r\n\r\n\
          HEAD /b HTTP/1.1\r\nHost: h\r\n\r\n\
          GET /status/204 HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n\
          GET /c HTTP/1.1\r\nHost: h\r\nX-Custom: v1\r\nX-Custom: v2\r\n\r\n",
    )
    .await
    .unwrap();
    let mut buf = Vec::new();
    let a = read_response(&mut s, &mut buf, false).await;
    assert_eq!(a.status, 200);
    assert_eq!(a.json()["uri"], "/a?x=1");
    assert!(a.header("date").is_some(), "{a:?}");
    let head = read_response(&mut s, &mut buf, true).await;
    assert_eq!(head.status, 200);
    assert!(head.header("content-length").is_some(), "{head:?}");
    let nc = read_response(&mut s, &mut buf, false).await;
    assert_eq!(nc.status, 204);
    let c = read_response(&mut s, &mut buf, false).await;
    assert_eq!(c.status, 200);
    assert_eq!(c.json()["uri"], "/c");
    assert!(buf.is_empty(), "nothing after the fourth response");

    // a body: hyper's server takes over, the connection goes on
    s.write_all(b"POST /echo HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello")
        .await
        .unwrap();
    let echo = read_response(&mut s, &mut buf, false).await;
    assert_eq!((echo.status, &echo.body[..]), (200, &b"hello"[..]));
    s.write_all(b"GET /d HTTP/1.1\r\nHost: h\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(
        read_response(&mut s, &mut buf, false).await.json()["uri"],
        "/d"
    );

    // Connection: close on our loop's side
    let mut s = TcpStream::connect(proxy.listen[0]).await.unwrap();
    s.write_all(b"GET /e HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let e = read_response(&mut s, &mut buf, false).await;
    assert_eq!(e.status, 200);
    assert_eq!(e.header("connection"), Some("close"));
    assert!(closed(&mut s).await, "closed after Connection: close");
}

/// One GET on `s`: the status, and how long the response took.
async fn timed_get(s: &mut TcpStream, buf: &mut Vec<u8>, path: &str) -> (u16, Duration) {
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: h\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let r = read_response(s, buf, false).await;
    (r.status, started.elapsed())
}

/// A server slower than `upstream_timeout_ms` gets the client a 504 at the
/// timeout (our client's lazily moved timer, armed by the request before,
/// holds for each request); the next request on the same client connection
/// is answered as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_server_is_cut_at_the_upstream_timeout_with_504() {
    let b = backends(1).await;
    let proxy = start_proxy(&config(&servers_of(&b), "", "upstream_timeout_ms = 400")).await;
    let mut s = TcpStream::connect(proxy.listen[0]).await.unwrap();
    let mut buf = Vec::new();
    // the backend connection's timer is armed for 400 ms from here
    assert_eq!(timed_get(&mut s, &mut buf, "/slow/200").await.0, 200);
    // answered within its own 400 ms, after the first request's deadline
    let (status, took) = timed_get(&mut s, &mut buf, "/slow/300").await;
    assert_eq!(status, 200);
    assert!(took >= Duration::from_millis(300), "{took:?}");
    let (status, took) = timed_get(&mut s, &mut buf, "/slow/3000").await;
    assert_eq!(status, 504);
    assert!(
        took >= Duration::from_millis(390) && took < Duration::from_millis(2500),
        "504 after {took:?}"
    );
    assert_eq!(timed_get(&mut s, &mut buf, "/after").await.0, 200);
}

/// A WebSocket upgrade on a connection that already carried a request is
/// handed over with the bytes read so far and tunnels as on a fresh one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_after_a_request_on_the_same_connection() {
    let b = backends(1).await;
    let proxy = start_proxy(&config(&servers_of(&b), "", "")).await;
    let mut s = TcpStream::connect(proxy.listen[0]).await.unwrap();
    s.write_all(b"GET /first HTTP/1.1\r\nHost: h\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    assert_eq!(read_response(&mut s, &mut buf, false).await.status, 200);
    let (mut ws, _) = tokio_tungstenite::client_async("ws://h/matches/m1", s)
        .await
        .expect("upgrade");
    for i in 0..3 {
        ws.send(Message::text(format!("hi {i}"))).await.unwrap();
        let got = tokio::time::timeout(WITHIN, ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(got, Message::text(format!("hi {i}")));
    }
}

/// A server's chunked body and a body that ends at the server's close both
/// reach the client chunked, on a connection that stays open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_and_close_delimited_bodies_are_reframed() {
    let raw = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = raw.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let answers: [&[u8]; 2] = [
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end",
        ];
        for answer in answers {
            let (mut c, _) = raw.accept().await.unwrap();
            let mut req = Vec::new();
            let mut chunk = [0u8; 1024];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = c.read(&mut chunk).await.unwrap();
                assert!(n > 0);
                req.extend_from_slice(&chunk[..n]);
            }
            c.write_all(answer).await.unwrap();
            // the chunked answer's connection may be kept; either way a new one comes
            drop(c);
        }
    });
    let proxy = start_proxy(&config(&[("raw", addr, 1)], "", "")).await;
    let mut s = TcpStream::connect(proxy.listen[0]).await.unwrap();
    let mut buf = Vec::new();
    for want in [&b"hello world"[..], &b"until the end"[..]] {
        s.write_all(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
            .await
            .unwrap();
        let r = read_response(&mut s, &mut buf, false).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("transfer-encoding"), Some("chunked"), "{r:?}");
        assert_eq!(r.body, want);
    }
    server.await.unwrap();
}

/// An idle keep-alive connection is closed at the header timeout, silently;
/// a head left half-sent gets 408.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keepalive_closed_and_a_half_head_gets_408() {
    let b = backends(1).await;
    let proxy = start_proxy(&config(&servers_of(&b), "", "header_read_timeout_ms = 500")).await;
    let mut s = TcpStream::connect(proxy.listen[0]).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    assert_eq!(read_response(&mut s, &mut buf, false).await.status, 200);
    let mut rest = Vec::new();
    let n = tokio::time::timeout(WITHIN, s.read_to_end(&mut rest))
        .await
        .expect("closed within the deadline");
    assert!(
        n.is_ok() && rest.is_empty(),
        "{:?}",
        String::from_utf8_lossy(&rest)
    );

    let mut s = TcpStream::connect(proxy.listen[0]).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: h\r\n\r\nGET /next HTTP/1.1\r\nHo")
        .await
        .unwrap();
    assert_eq!(read_response(&mut s, &mut buf, false).await.status, 200);
    let timeout = read_response(&mut s, &mut buf, false).await;
    assert_eq!(timeout.status, 408);
    assert_eq!(timeout.header("connection"), Some("close"));
    assert!(closed(&mut s).await);
}

/// A client that asks for a large response and reads none of it is closed
/// at the send timeout (nginx's `send_timeout`), on our server loop (GET)
/// and on hyper's (a POST with a body), and the server's connection with
/// it; the client gets only what the buffers held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_reads_nothing_is_closed_at_the_send_timeout() {
    let (addr, mut ends) = endless_backend().await;
    let proxy = start_proxy(&config(&[("raw", addr, 1)], "", "send_timeout_ms = 300")).await;
    let active = || {
        proxy
            .shared
            .counters
            .connections_active
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    for request in [
        &b"GET /big HTTP/1.1\r\nHost: h\r\n\r\n"[..],
        &b"POST /big HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\n\r\nx"[..],
    ] {
        let mut s = TcpStream::connect(proxy.listen[0]).await.unwrap();
        s.write_all(request).await.unwrap();
        wait_until(WITHIN, "the proxy to take the connection", || async {
            active() == 1
        })
        .await;
        wait_until(WITHIN, "the proxy to close the connection", || async {
            active() == 0
        })
        .await;
        assert_cut_short(&mut ends, WITHIN).await;
        let mut got = 0usize;
        let mut buf = vec![0u8; 256 * 1024];
        while let Ok(Ok(n @ 1..)) = tokio::time::timeout(WITHIN, s.read(&mut buf)).await {
            got += n;
        }
        assert!(got < 64 * 1024 * 1024, "the client got {got} bytes");
    }
    let counted = &proxy.shared.counters.send_timeouts;
    assert_eq!(counted.load(std::sync::atomic::Ordering::Relaxed), 2);
}

/// A WebSocket client that sends and reads nothing back: the echoes fill
/// the buffers, and the tunnel is closed at the send timeout, long before
/// its idle timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_client_that_reads_nothing_is_closed_at_the_send_timeout() {
    let b = backends(1).await;
    let proxy = start_proxy(&config(&servers_of(&b), "", "send_timeout_ms = 300")).await;
    let ws_active = || {
        proxy
            .shared
            .counters
            .websockets_active
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    let mut s = TcpStream::connect(proxy.listen[0]).await.unwrap();
    let head = raw_upgrade(&mut s, "h", "/matches/m1/ws").await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    wait_until(WITHIN, "the tunnel to open", || async { ws_active() == 1 }).await;
    send_until_stuck(&mut s).await;
    wait_until(
        WITHIN,
        "the tunnel to close at the send timeout",
        || async { ws_active() == 0 },
    )
    .await;
    let counted = &proxy.shared.counters.send_timeouts;
    assert_eq!(counted.load(std::sync::atomic::Ordering::Relaxed), 1);
}
