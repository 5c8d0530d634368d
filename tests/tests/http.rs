//! HTTP through the proxy: streaming, keep-alive, strategies, failures, limits.

use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::TokioIo;
use kp5_tests::support::*;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Acceptance 1: GET and POST to two backends, 10 MiB streamed each way with
/// chunked encoding over one keep-alive connection; round_robin alternates exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_post_streaming_keepalive_and_round_robin() {
    let b = backends(2).await;
    let proxy = start_proxy(&config(&servers_of(&b), "strategy = \"round_robin\"", "")).await;
    let addr = proxy.listen[0];

    // one client connection, many requests: keep-alive
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake::<
        _,
        http_body_util::combinators::BoxBody<Bytes, std::io::Error>,
    >(TokioIo::new(stream))
    .await
    .unwrap();
    tokio::spawn(conn);

    let mut order = Vec::new();
    for i in 0..10 {
        send.ready().await.unwrap();
        let req = http::Request::get(format!("/get/{i}?x=1"))
            .header("host", "play.example:8080")
            .header("connection", "keep-alive, x-hop")
            .header("x-hop", "secret")
            .body(Full::new(Bytes::new()).map_err(|e| match e {}).boxed())
            .unwrap();
        let resp = send.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        order.push(v["server"].as_str().unwrap().to_owned());
        let h = &v["headers"];
        assert_eq!(h["host"], "play.example:8080", "Host is kept");
        assert_eq!(h["x-forwarded-for"], "127.0.0.1");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "play.example:8080");
        assert_eq!(
            h["forwarded"],
            "for=127.0.0.1;proto=http;host=\"play.example:8080\""
        );
        assert!(
            h.get("x-hop").is_none(),
            "headers named by Connection are removed"
        );
        assert_eq!(v["uri"], format!("/get/{i}?x=1"));
    }
    let first = order[0].clone();
    for (i, s) in order.iter().enumerate() {
        assert_eq!(
            *s == first,
            i % 2 == 0,
            "round_robin alternates exactly: {order:?}"
        );
    }

    // 10 MiB up and down, chunked, on the same connection
    for _ in 0..2 {
        let chunk = Bytes::from(vec![7u8; 64 * 1024]);
        let chunks = futures_util::stream::iter(
            (0..160).map(move |_| Ok::<_, std::io::Error>(Frame::data(chunk.clone()))),
        );
        send.ready().await.unwrap();
        let req = http::Request::post("/echo")
            .header("host", "play.example")
            .body(BodyExt::boxed(StreamBody::new(chunks)))
            .unwrap();
        let resp = send.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["transfer-encoding"], "chunked");
        let mut body = resp.into_body().into_data_stream();
        let mut total = 0usize;
        while let Some(chunk) = body.next().await {
            let chunk = chunk.unwrap();
            assert!(chunk.iter().all(|&b| b == 7));
            total += chunk.len();
        }
        assert_eq!(total, 10 * 1024 * 1024);
    }
    assert_eq!(
        proxy.shared.counters.connections_total.load(Relaxed),
        1,
        "one keep-alive client connection"
    );
    let stats = lb_stats(&client(), &proxy).await;
    assert_eq!(per_server(&stats, "requests").values().sum::<u64>(), 12);
    assert_eq!(
        per_server(&stats, "requests")
            .values()
            .copied()
            .collect::<Vec<_>>(),
        [6, 6]
    );
}

/// Acceptance 5: weights 3 and 1 send 75% ± 3% of 4,000 requests to the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_three_to_one() {
    let b = backends(2).await;
    let servers = [
        (b[0].id.as_str(), b[0].addr, 3),
        (b[1].id.as_str(), b[1].addr, 1),
    ];
    let proxy = start_proxy(&config(&servers, "strategy = \"weighted\"", "")).await;
    let url = format!("http://{}/w", proxy.listen[0]);
    let c = client();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (c, url) = (c.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            let mut first = 0;
            for _ in 0..500 {
                let g = get(&c, &url).await;
                assert_eq!(g.status, 200);
                if g.server() == "s1" {
                    first += 1;
                }
            }
            first
        }));
    }
    let mut first = 0;
    for t in tasks {
        first += t.await.unwrap();
    }
    let share = first as f64 / 4000.0;
    assert!((0.72..=0.78).contains(&share), "s1 got {share:.3} of 4000");
}

/// `proxy.forwarded_headers` chooses what the backends see, and a reload
/// changes it for the next request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_headers_follow_the_config_and_reloads() {
    let b = backends(1).await;
    let with = |list: &str| {
        kp5_proxy::Config::from_toml(
            &config(&servers_of(&b), "", &format!("forwarded_headers = {list}")),
            &kp5_shared::MapEnv::new(),
        )
        .unwrap()
    };
    let proxy = kp5_proxy::start(with(r#"["x-real-ip", "x-forwarded-for"]"#))
        .await
        .unwrap();
    let url = format!("http://{}/h", proxy.listen[0]);
    let c = client();
    let seen = |g: Got| -> Vec<String> {
        let v: serde_json::Value = serde_json::from_slice(&g.body).unwrap();
        let mut names: Vec<String> = v["headers"]
            .as_object()
            .unwrap()
            .keys()
            .filter(|k| k.starts_with("x-") || *k == "forwarded")
            .cloned()
            .collect();
        names.sort();
        names
    };
    let g = get_with(&c, &url, &[("x-forwarded-for", "10.0.0.9")]).await;
    let v: serde_json::Value = serde_json::from_slice(&g.body).unwrap();
    assert_eq!(v["headers"]["x-forwarded-for"], "10.0.0.9, 127.0.0.1");
    assert_eq!(v["headers"]["x-real-ip"], "127.0.0.1");
    assert_eq!(seen(g), ["x-forwarded-for", "x-real-ip"]);

    proxy.reload(with("[]")).await.unwrap();
    assert!(
        seen(get(&c, &url).await).is_empty(),
        "none when the list is empty"
    );

    proxy
        .reload(with(r#"["forwarded", "x-forwarded-proto"]"#))
        .await
        .unwrap();
    let g = get(&c, &url).await;
    let v: serde_json::Value = serde_json::from_slice(&g.body).unwrap();
    assert_eq!(
        v["headers"]["forwarded"],
        format!("for=127.0.0.1;proto=http;host=\"{}\"", proxy.listen[0])
    );
    assert_eq!(seen(g), ["forwarded", "x-forwarded-proto"]);
}

/// Acceptance 7: a backend killed during a stream of requests; no idempotent
/// request fails, it leaves rotation at once, and returns when it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_backend_is_retried_ejected_and_readmitted() {
    let mut b = backends(2).await;
    let pool = r#"strategy = "round_robin"
health_check = { path = "/health", interval_ms = 300, timeout_ms = 200, healthy_threshold = 1, unhealthy_threshold = 1 }
passive = { slow_start_ms = 0 }"#;
    let proxy = start_proxy(&config(&servers_of(&b), pool, "")).await;
    let url = format!("http://{}/x", proxy.listen[0]);
    let c = client();
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..20 {
        let g = get(&c, &url).await;
        assert_eq!(g.status, 200);
        seen.insert(g.server());
    }
    assert_eq!(seen.len(), 2);

    let s2 = b.pop().unwrap();
    let s2_addr = s2.addr;
    s2.kill().await;
    let killed_at = std::time::Instant::now();
    for i in 0..60 {
        let g = get(&c, &url).await;
        assert_eq!(
            g.status, 200,
            "request {i} after the kill failed: {:?}",
            g.body
        );
        assert_eq!(g.server(), "s1");
    }
    // out of rotation within one health interval (passive ejection is immediate)
    wait_until(Duration::from_millis(300), "s2 marked down", || {
        let c = c.clone();
        let proxy = &proxy;
        async move { lb_stats(&c, proxy).await["pools"][0]["servers"][1]["health"] != "healthy" }
    })
    .await;
    assert!(killed_at.elapsed() < Duration::from_secs(5));

    // back on the same address: active checks readmit it
    let revived = kp5_tests::demo::DemoServer::start("s2", s2_addr)
        .await
        .unwrap();
    wait_until(Duration::from_secs(3), "s2 back in rotation", || {
        let (c, url) = (c.clone(), url.clone());
        async move { get(&c, &url).await.server() == "s2" }
    })
    .await;
    drop(revived);
}

/// Acceptance 8: every server full → 503 with Retry-After.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_servers_full_is_503_with_retry_after() {
    let b = backends(2).await;
    let proxy = start_proxy(&config(
        &servers_of(&b),
        "max_connections_per_server = 1",
        "",
    ))
    .await;
    let (_w1, s1) = ws(&format!("ws://{}/a", proxy.listen[0])).await;
    let (_w2, s2) = ws(&format!("ws://{}/b", proxy.listen[0])).await;
    assert_ne!(s1, s2, "one connection per server");
    let c = client();
    let g = get(&c, &format!("http://{}/c", proxy.listen[0])).await;
    assert_eq!(g.status, 503);
    assert_eq!(g.headers["retry-after"], "1");
    assert!(g.json()["error"].as_str().unwrap().contains("no server"));
    let m = get(&c, &format!("http://{}/metrics", proxy.admin)).await;
    let text = String::from_utf8_lossy(&m.body);
    assert!(text.contains("kp5_no_server_total 1"), "{text}");
}

async fn read_all(s: &mut TcpStream, within: Duration) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let closed = loop {
        match tokio::time::timeout(within, s.read(&mut buf)).await {
            Ok(Ok(0)) => break true,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Ok(Err(_)) => break true,
            Err(_) => break false,
        }
    };
    (out, closed)
}

/// Acceptance 9: slowloris is cut at the header timeout, a 64 KiB header is
/// 431, a garbage request line is 400, and the proxy keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_clients_get_clear_errors() {
    let b = backends(1).await;
    let proxy = start_proxy(&config(
        &servers_of(&b),
        "",
        "header_read_timeout_ms = 1000",
    ))
    .await;
    let addr = proxy.listen[0];

    // one byte a second
    let start = std::time::Instant::now();
    let mut slow = TcpStream::connect(addr).await.unwrap();
    let mut cut = false;
    for b in b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: 1234567890\r\n\r\n" {
        if slow.write_all(&[*b]).await.is_err() {
            cut = true;
            break;
        }
        let mut buf = [0u8; 256];
        match tokio::time::timeout(Duration::from_secs(1), slow.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                cut = true;
                break;
            }
            Ok(Ok(n)) => {
                let text = String::from_utf8_lossy(&buf[..n]).to_string();
                assert!(text.starts_with("HTTP/1.1 408"), "{text}");
                cut = true;
                break;
            }
            Err(_) => {}
        }
    }
    assert!(cut, "trickled headers were never cut");
    let took = start.elapsed();
    assert!(took < Duration::from_secs(4), "cut after {took:?}");

    // 64 KiB header
    let mut big = TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    let _ = big.write_all(req.as_bytes()).await;
    let (resp, _) = read_all(&mut big, Duration::from_secs(3)).await;
    let text = String::from_utf8_lossy(&resp);
    assert!(text.starts_with("HTTP/1.1 431"), "{text}");

    // garbage
    let mut junk = TcpStream::connect(addr).await.unwrap();
    junk.write_all(b"\x01\x02 NOT HTTP AT ALL\r\n\r\n")
        .await
        .unwrap();
    let (resp, _) = read_all(&mut junk, Duration::from_secs(3)).await;
    let text = String::from_utf8_lossy(&resp);
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");

    // still serving
    let g = get(&client(), &format!("http://{addr}/ok")).await;
    assert_eq!(g.status, 200);
}

/// Cleartext HTTP/2 with prior knowledge reaches an HTTP/1.1 backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_prior_knowledge_to_http1_backend() {
    let b = backends(1).await;
    let proxy = start_proxy(&config(&servers_of(&b), "", "")).await;
    let c: HttpClient =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .http2_only(true)
            .build_http();
    let g = get(&c, &format!("http://{}/h2", proxy.listen[0])).await;
    assert_eq!(g.status, 200);
    let v = g.json();
    assert_eq!(v["version"], "HTTP/1.1");
    assert_eq!(v["headers"]["host"], proxy.listen[0].to_string());
}

type H2cConnection = hyper::client::conn::http2::Connection<
    TokioIo<TcpStream>,
    Full<Bytes>,
    hyper_util::rt::TokioExecutor,
>;

/// An HTTP/2 client connection by prior knowledge (h2c) to `addr`: the
/// request sender, and the connection to drive.
async fn h2c(
    addr: std::net::SocketAddr,
) -> (
    hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    H2cConnection,
) {
    let stream = TcpStream::connect(addr).await.unwrap();
    hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(stream),
    )
    .await
    .unwrap()
}

/// Many concurrent HTTP/2 streams on one connection, small and large bodies
/// both ways: the proxy runs a connection's streams in the connection's own
/// task and batches their frames, and none may be lost or mixed up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_many_concurrent_streams_on_one_connection() {
    let b = backends(2).await;
    let proxy = start_proxy(&config(&servers_of(&b), "", "")).await;
    let (send, conn) = h2c(proxy.listen[0]).await;
    tokio::spawn(conn);
    let requests = (0..300).map(|i| {
        let mut send = send.clone();
        async move {
            // a third small GETs, a third small echoes (under the 1 KiB the
            // codec batches), a third 256 KiB echoes (several DATA frames)
            let (req, expect) = match i % 3 {
                0 => (
                    http::Request::get(format!("http://play.example/h2/{i}"))
                        .body(Full::new(Bytes::new()))
                        .unwrap(),
                    None,
                ),
                1 => {
                    let body = Bytes::from(format!("stream {i} ").repeat(60));
                    (
                        http::Request::post("http://play.example/echo")
                            .body(Full::new(body.clone()))
                            .unwrap(),
                        Some(body),
                    )
                }
                _ => {
                    let body = Bytes::from(vec![(i % 251) as u8; 256 * 1024]);
                    (
                        http::Request::post("http://play.example/echo")
                            .body(Full::new(body.clone()))
                            .unwrap(),
                        Some(body),
                    )
                }
            };
            let resp = send.send_request(req).await.unwrap();
            assert_eq!(resp.status(), 200, "stream {i}");
            let got = resp.into_body().collect().await.unwrap().to_bytes();
            match expect {
                Some(body) => assert!(
                    got == body,
                    "stream {i}: echo differs ({} bytes back)",
                    got.len()
                ),
                None => {
                    let v: serde_json::Value = serde_json::from_slice(&got).unwrap();
                    assert_eq!(v["uri"], format!("/h2/{i}"), "stream {i}");
                }
            }
        }
    });
    futures_util::future::join_all(requests).await;
    assert_eq!(proxy.shared.counters.connections_total.load(Relaxed), 1);
}

/// The proxy's own HTTP/2 loop does per stream what hyper's server did: a
/// client's RST_STREAM cancels the request in flight (its server
/// connection is let go at once, not when the server answers), CONNECT is
/// refused with 405, and a response the proxy makes itself gets a `Date`.
/// The connection serves on after each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_reset_stream_cancels_the_request_and_connect_is_refused() {
    const WITHIN: Duration = Duration::from_secs(5);
    let b = backends(1).await;
    let proxy = start_proxy(&config(
        &servers_of(&b),
        "max_connections_per_server = 1",
        "",
    ))
    .await;
    let (mut send, conn) = h2c(proxy.listen[0]).await;
    tokio::spawn(conn);
    let server = proxy.shared.live.get(&b[0].id).unwrap();
    let open = || server.connections.load(Relaxed);
    let get = |path: &str| {
        http::Request::get(format!("http://play.example{path}"))
            .body(Full::new(Bytes::new()))
            .unwrap()
    };

    // a request the server holds for 20 s
    let slow = tokio::spawn(send.send_request(get("/slow/20000")));
    wait_until(WITHIN, "the slow request to reach the server", || async {
        open() == 1
    })
    .await;
    // meanwhile the server is full: the proxy's own 503, with a Date
    let full = send.send_request(get("/full")).await.unwrap();
    assert_eq!(full.status(), 503);
    assert!(full.headers().contains_key("date"), "{:?}", full.headers());
    assert_eq!(full.headers()["retry-after"], "1");
    // dropped by the client (hyper's client resets the stream): the
    // proxy lets the server's request go at once
    slow.abort();
    wait_until(
        WITHIN,
        "the reset stream's request to be let go",
        || async { open() == 0 },
    )
    .await;

    // CONNECT: refused, not forwarded
    let connect = http::Request::connect("play.example:443")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = send.send_request(connect).await.unwrap();
    assert_eq!(resp.status(), 405);

    // the connection serves on
    let resp = send.send_request(get("/status/204")).await.unwrap();
    assert_eq!(resp.status(), 204);
    assert_eq!(proxy.shared.counters.connections_total.load(Relaxed), 1);
}

/// An HTTP/2 client that asks for a large response and never opens its
/// flow-control window past the first 16 KiB: its socket takes every
/// frame, so only the stream stalls. At the send timeout the proxy resets
/// the stream (counted as a send timeout) and lets the server's connection
/// go; the client's connection stays open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_stream_whose_window_stays_shut_is_reset_at_the_send_timeout() {
    const WITHIN: Duration = Duration::from_secs(5);
    let (addr, mut ends) = endless_backend().await;
    let proxy = start_proxy(&config(&[("raw", addr, 1)], "", "send_timeout_ms = 300")).await;
    let stream = TcpStream::connect(proxy.listen[0]).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .initial_stream_window_size(16 * 1024)
            .initial_connection_window_size(16 * 1024)
            .handshake::<_, Full<Bytes>>(TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = http::Request::get("http://play.example/big")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let counted = || proxy.shared.counters.send_timeouts.load(Relaxed);
    wait_until(WITHIN, "the stalled stream to be reset", || async {
        counted() == 1
    })
    .await;
    assert_cut_short(&mut ends, WITHIN).await;
    // the body the client never read ends in the reset, short of 64 MiB
    let mut body = resp.into_body();
    let mut got = 0;
    let end = loop {
        match tokio::time::timeout(WITHIN, body.frame()).await {
            Ok(Some(Ok(f))) => got += f.data_ref().map_or(0, |d| d.len()),
            Ok(Some(Err(e))) => break Some(e),
            Ok(None) => break None,
            Err(_) => panic!("the body neither ended nor broke off"),
        }
    };
    assert!(end.is_some(), "the body ended cleanly after {got} bytes");
    assert!(got < 1024 * 1024, "the client got {got} bytes");
    assert_eq!(proxy.shared.counters.connections_active.load(Relaxed), 1);
}

/// An HTTP/2 connection is closed (GOAWAY, then the socket) once it has had
/// no stream in flight and received nothing for `idle_timeout_ms`, like
/// nginx's `keepalive_timeout`; a stream in flight for longer than that, or
/// a client that keeps sending requests, keeps it open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_idle_connection_closed_after_idle_timeout() {
    let b = backends(1).await;
    let proxy = start_proxy(&config(&servers_of(&b), "", "idle_timeout_ms = 400")).await;
    let (mut send, conn) = h2c(proxy.listen[0]).await;
    let ended = tokio::spawn(async move {
        let r = conn.await;
        (r, std::time::Instant::now())
    });
    let mut request = |path: &str| {
        let req = http::Request::get(format!("http://play.example{path}"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let sent = send.send_request(req);
        async move {
            let resp = sent.await.expect("the connection is still open");
            assert_eq!(resp.status(), 200);
            resp.into_body().collect().await.unwrap();
        }
    };
    // a stream in flight for 2.5 idle timeouts
    request("/slow/1000").await;
    // requests every 150 ms for 1.2 s
    for i in 0..8 {
        request(&format!("/keep/{i}")).await;
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    request("/last").await;
    let last = std::time::Instant::now();
    assert!(!ended.is_finished(), "closed while in use");
    let (r, at) = tokio::time::timeout(Duration::from_secs(5), ended)
        .await
        .expect("the idle connection was closed")
        .unwrap();
    r.expect("closed gracefully, with a GOAWAY");
    let idle = at.duration_since(last);
    // the coarse clock may run a tick behind
    assert!(idle >= Duration::from_millis(370), "closed after {idle:?}");
}

/// A server that answers before it reads the upload (32 MiB each way, more
/// than the socket buffers hold): the proxy must read the response while it
/// still writes the request body, or both directions stall.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_and_download_at_once_with_a_server_that_answers_first() {
    const SIZE: usize = 32 * 1024 * 1024;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = l.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            s.read_exact(&mut b).await.unwrap();
            head.push(b[0]);
        }
        s.write_all(format!("HTTP/1.1 200 OK\r\ncontent-length: {SIZE}\r\n\r\n").as_bytes())
            .await
            .unwrap();
        s.write_all(&vec![b'd'; SIZE]).await.unwrap();
        let mut upload = vec![0u8; SIZE];
        s.read_exact(&mut upload).await.unwrap();
        assert!(upload.iter().all(|&c| c == b'u'));
    });
    let proxy = start_proxy(&config(&[("s", backend, 1)], "", "")).await;
    let req = http::Request::post(format!("http://{}/both", proxy.listen[0]))
        .body(Full::new(Bytes::from(vec![b'u'; SIZE])))
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(30), client().request(req))
        .await
        .expect("the response head arrives while the upload is still going")
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body = tokio::time::timeout(Duration::from_secs(30), resp.into_body().collect())
        .await
        .expect("no stall")
        .unwrap()
        .to_bytes();
    assert_eq!(body.len(), SIZE);
    server.await.unwrap();
}

/// Acceptance 11: `--check` names the bad field and exits non-zero.
#[test]
fn check_names_the_bad_field() {
    let dir = std::env::temp_dir().join(format!("kp5-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.toml");
    std::fs::write(
        &bad,
        config(
            &[("a", "127.0.0.1:1".parse().unwrap(), 1)],
            "strategy = \"fastest\"",
            "",
        ),
    )
    .unwrap();
    let out = std::process::Command::new(proxy_bin())
        .arg("--config")
        .arg(&bad)
        .arg("--check")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("pools.p.strategy") && err.contains("fastest"),
        "{err}"
    );

    let good = dir.join("good.toml");
    std::fs::write(
        &good,
        config(&[("a", "127.0.0.1:1".parse().unwrap(), 1)], "", ""),
    )
    .unwrap();
    let out = std::process::Command::new(proxy_bin())
        .arg("--config")
        .arg(&good)
        .arg("--check")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let syntax = dir.join("syntax.toml");
    std::fs::write(&syntax, "[proxy\nlisten = 1").unwrap();
    let out = std::process::Command::new(proxy_bin())
        .arg("--config")
        .arg(&syntax)
        .arg("--check")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("line 1"));
    std::fs::remove_dir_all(&dir).ok();
}

/// The admin API: `/healthz` is open, `/api/*` needs the bearer token (401
/// with a JSON error otherwise), unknown endpoints are 404.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_auth_and_errors() {
    let b = backends(1).await;
    let proxy = start_proxy(&config(&servers_of(&b), "", "")).await;
    let c = client();
    let base = format!("http://{}", proxy.admin);
    assert_eq!(get(&c, &format!("{base}/healthz")).await.status, 200);
    let stats = format!("{base}/api/scaling/loadbalancer/stats");
    let none = get(&c, &stats).await;
    assert_eq!(none.status, 401);
    assert_eq!(none.headers["www-authenticate"], "Bearer");
    assert!(none.json()["error"].as_str().unwrap().contains("token"));
    let wrong = get_with(&c, &stats, &[("authorization", "Bearer test-tokeN")]).await;
    assert_eq!(wrong.status, 401);
    let ok = get_with(&c, &stats, &[("authorization", "Bearer test-token")]).await;
    assert_eq!(ok.status, 200);
    assert_eq!(ok.json()["pools"][0]["strategy"], "least_connections");
    let missing = get_with(
        &c,
        &format!("{base}/api/scaling/nope"),
        &[("authorization", "Bearer test-token")],
    )
    .await;
    assert_eq!(missing.status, 404);
    let metrics = get(&c, &format!("{base}/metrics")).await;
    assert_eq!(metrics.status, 200);
    let text = String::from_utf8_lossy(&metrics.body);
    assert!(
        text.contains("kp5_upstream_healthy{pool=\"p\",server=\"s1\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("# TYPE kp5_upstream_response_seconds histogram"),
        "{text}"
    );
}
