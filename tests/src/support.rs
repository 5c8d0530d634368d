//! Helpers for the end-to-end tests: backends, proxies, clients, polling.

use crate::demo::DemoServer;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use kp5_proxy::{Config, ProxyHandle};
use kp5_shared::MapEnv;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// Starts `n` demo servers named `s1`..`sN` on free ports.
pub async fn backends(n: usize) -> Vec<DemoServer> {
    let mut v = Vec::new();
    for i in 1..=n {
        v.push(
            DemoServer::start(&format!("s{i}"), "127.0.0.1:0".parse().unwrap())
                .await
                .unwrap(),
        );
    }
    v
}

/// A proxy config with one pool `p` over `servers` (id, addr, weight);
/// `pool_extra` is TOML added to `[pools.p]`, `proxy_extra` to `[proxy]`.
pub fn config(servers: &[(&str, SocketAddr, u32)], pool_extra: &str, proxy_extra: &str) -> String {
    let backends: Vec<String> = servers
        .iter()
        .map(|(id, a, w)| format!("{{ id = \"{id}\", address = \"{a}\", weight = {w} }}"))
        .collect();
    format!(
        r#"
[proxy]
listen = ["127.0.0.1:0"]
{proxy_extra}

[admin]
listen = "127.0.0.1:0"
token = "test-token"

[log]
access_log = false

[[routes]]
path_prefix = "/"
pool = "p"

[pools.p]
backends = [{}]
{pool_extra}
"#,
        backends.join(", ")
    )
}

pub fn servers_of(b: &[DemoServer]) -> Vec<(&str, SocketAddr, u32)> {
    b.iter().map(|s| (s.id.as_str(), s.addr, 1)).collect()
}

/// Starts a proxy in this process.
pub async fn start_proxy(toml: &str) -> ProxyHandle {
    let cfg = Config::from_toml(toml, &MapEnv::new())
        .unwrap_or_else(|e| panic!("bad test config: {e}\n{toml}"));
    kp5_proxy::start(cfg).await.expect("proxy starts")
}

pub fn client() -> HttpClient {
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(32)
        .build_http()
}

/// A response read whole.
#[derive(Debug)]
pub struct Got {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Got {
    pub fn server(&self) -> String {
        self.headers
            .get("x-server")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }
}

pub async fn request(c: &HttpClient, req: http::Request<Full<Bytes>>) -> Result<Got, String> {
    let resp = c.request(req).await.map_err(|e| format!("{e:?}"))?;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok(Got {
        status,
        headers,
        body,
    })
}

pub async fn get(c: &HttpClient, url: &str) -> Got {
    let req = http::Request::get(url)
        .body(Full::new(Bytes::new()))
        .unwrap();
    request(c, req)
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
}

pub async fn get_with(c: &HttpClient, url: &str, headers: &[(&str, &str)]) -> Got {
    let mut b = http::Request::get(url);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    request(c, b.body(Full::new(Bytes::new())).unwrap())
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
}

/// Polls `f` until it returns true or `within` passes.
pub async fn wait_until<F, Fut>(within: Duration, what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if f().await {
            return;
        }
        if Instant::now() > deadline {
            panic!("timed out after {within:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens a WebSocket and returns it with the id of the server that answered.
pub async fn ws(url: &str) -> (Ws, String) {
    let (ws, resp) = tokio_tungstenite::connect_async(url)
        .await
        .unwrap_or_else(|e| panic!("ws {url}: {e}"));
    let server = resp
        .headers()
        .get("x-server")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    (ws, server)
}

/// The stats JSON of the proxy's admin API.
pub async fn lb_stats(c: &HttpClient, p: &ProxyHandle) -> serde_json::Value {
    let got = get_with(
        c,
        &format!("http://{}/api/scaling/loadbalancer/stats", p.admin),
        &[("authorization", "Bearer test-token")],
    )
    .await;
    assert_eq!(got.status, 200, "{:?}", got.body);
    got.json()
}

/// `server id → field` from the stats JSON.
pub fn per_server(
    stats: &serde_json::Value,
    field: &str,
) -> std::collections::BTreeMap<String, u64> {
    stats["pools"][0]["servers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["id"].as_str().unwrap().to_owned(),
                s[field].as_u64().unwrap(),
            )
        })
        .collect()
}

/// The built `kp5-proxy` binary (the README's test command builds it first).
pub fn proxy_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test exe");
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let bin = dir.join("kp5-proxy");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build --workspace --bins` first (tests/run.sh does)",
        bin.display()
    );
    bin
}

/// A free port on 127.0.0.1 (for configs handed to a child process).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A backend whose every response is a 64 MiB body; what each of its
/// connections ends with comes back on the channel (`Err` once the proxy
/// closed the connection under it).
pub async fn endless_backend() -> (
    SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<std::io::Result<()>>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let raw = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = raw.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut c, _)) = raw.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut chunk = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match c.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&chunk[..n]),
                    }
                }
                let body = vec![b'z'; 1024 * 1024];
                let sent = async {
                    c.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 67108864\r\n\r\n")
                        .await?;
                    for _ in 0..64 {
                        c.write_all(&body).await?;
                    }
                    Ok(())
                };
                let _ = tx.send(sent.await);
            });
        }
    });
    (addr, rx)
}

/// Waits for the end of the endless backend's next connection, which the
/// proxy must have closed before the whole body was sent.
pub async fn assert_cut_short(
    ends: &mut tokio::sync::mpsc::UnboundedReceiver<std::io::Result<()>>,
    within: Duration,
) {
    let end = tokio::time::timeout(within, ends.recv())
        .await
        .expect("the server's connection closes too")
        .unwrap();
    assert!(end.is_err(), "the server sent the whole body");
}

/// Opens a WebSocket on `s` by hand: the upgrade request for `path`, then
/// the head of the answer, which is returned.
pub async fn raw_upgrade<S>(s: &mut S, host: &str, path: &str) -> String
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    s.flush().await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut byte).await.unwrap(), 1, "the upgrade answer");
        head.push(byte[0]);
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// A WebSocket client that sends and never reads: binary frames of
/// 60,000 bytes (masked with a zero key) until a write has not gone
/// through for half a second, or failed. The echoes it does not read have
/// filled every buffer on the way by then.
pub async fn send_until_stuck<S: tokio::io::AsyncWrite + Unpin>(s: &mut S) {
    use tokio::io::AsyncWriteExt;
    let mut frame = vec![
        0x82,
        0x80 | 126,
        (60_000u16 >> 8) as u8,
        60_000u16 as u8,
        0,
        0,
        0,
        0,
    ];
    frame.resize(frame.len() + 60_000, b'e');
    for _ in 0..2000 {
        let sent = async {
            s.write_all(&frame).await?;
            s.flush().await
        };
        match tokio::time::timeout(Duration::from_millis(500), sent).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) | Err(_) => return,
        }
    }
    panic!("2,000 frames went through: the echoes are being read");
}
