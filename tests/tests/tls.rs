//! TLS termination (issue 8): HTTPS with HTTP/2 and HTTP/1.1 by ALPN, two
//! certificates chosen by SNI, WSS from Rust and Node, certificates replaced
//! on disk under 100 open WSS connections, old protocol versions refused,
//! and TLS to backends. Certificates are made at test time (rcgen).

use futures_util::{SinkExt, StreamExt};
use kp5_tests::cluster::TempDir;
use kp5_tests::support::*;
use kp5_tests::tls::{client_config, connect, presented, Ca};
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

const TLS12: &rustls::SupportedProtocolVersion = &rustls::version::TLS12;
const TLS13: &rustls::SupportedProtocolVersion = &rustls::version::TLS13;

/// Two CAs, `a.example` signed by the first and `b.example` by the second,
/// installed in `dir`.
struct Pki {
    a: Ca,
    b: Ca,
}

impl Pki {
    fn new(dir: &Path) -> Pki {
        let pki = Pki {
            a: Ca::new("kp5 test CA A"),
            b: Ca::new("kp5 test CA B"),
        };
        pki.a.issue(&["a.example"]).install(dir, "a");
        pki.b.issue(&["b.example"]).install(dir, "b");
        pki.a.write(dir, "ca-a.pem");
        pki.b.write(dir, "ca-b.pem");
        pki
    }
}

fn tls_section(dir: &Path) -> String {
    let d = dir.display();
    format!(
        r#"[proxy.tls]
listen = ["127.0.0.1:0"]
certs = [{{ cert = "{d}/a.pem", key = "{d}/a.key" }}, {{ cert = "{d}/b.pem", key = "{d}/b.key" }}]"#
    )
}

type Wss =
    tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

async fn wss(addr: SocketAddr, host: &str, ca: &Ca, path: &str) -> Wss {
    let s = connect(
        addr,
        host,
        client_config(&ca.pem, &[TLS12, TLS13], &[b"http/1.1"]),
    )
    .await
    .expect("TLS handshake");
    let (ws, resp) = tokio_tungstenite::client_async(format!("wss://{host}{path}"), s)
        .await
        .expect("WSS upgrade");
    assert_eq!(resp.status(), 101);
    ws
}

async fn echo(ws: &mut Wss, text: &str) {
    ws.send(Message::text(text)).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .expect("echo within 10 s")
        .expect("open")
        .expect("valid");
    assert_eq!(got, Message::text(text));
}

fn curl(args: &[&str]) -> (bool, String, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10"])
        .args(args)
        .output()
        .expect("curl is installed (tests/run.sh installs it)");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Acceptance 1: `curl --http2` and `--http1.1` over HTTPS, two host names
/// with two certificates chosen by SNI, each verified against its own CA.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_http2_and_http11_with_two_certificates_by_sni() {
    let dir = TempDir::new("tls-sni");
    let _pki = Pki::new(dir.path());
    let b = backends(1).await;
    let proxy = start_proxy(&config(&servers_of(&b), "", &tls_section(dir.path()))).await;
    let port = proxy.listening_tls()[0].port();
    let d = dir.path().display().to_string();

    for (host, ca) in [("a.example", "ca-a.pem"), ("b.example", "ca-b.pem")] {
        for (flag, version) in [("--http2", "2"), ("--http1.1", "1.1")] {
            let resolve = format!("{host}:{port}:127.0.0.1");
            let cacert = format!("{d}/{ca}");
            let url = format!("https://{host}:{port}/hello?x=1");
            let (ok, out, err) = tokio::task::spawn_blocking({
                let args = [
                    flag,
                    "--cacert",
                    &cacert,
                    "--resolve",
                    &resolve,
                    "-w",
                    "\n%{http_version}",
                    &url,
                ]
                .map(str::to_owned);
                move || curl(&args.iter().map(String::as_str).collect::<Vec<_>>())
            })
            .await
            .unwrap();
            assert!(ok, "curl {flag} {url}: {err}");
            let (body, got_version) = out.rsplit_once('\n').unwrap();
            assert_eq!(got_version, version, "{flag} to {host}");
            let json: serde_json::Value = serde_json::from_str(body).unwrap();
            assert_eq!(json["server"], "s1");
            assert_eq!(json["uri"], "/hello?x=1");
            assert_eq!(json["headers"]["x-forwarded-proto"], "https", "{json}");
        }
    }
    // each name's certificate is signed by its own CA only: the other CA fails it
    let (ok, _, err) = tokio::task::spawn_blocking(move || {
        curl(&[
            "--cacert",
            &format!("{d}/ca-b.pem"),
            "--resolve",
            &format!("a.example:{port}:127.0.0.1"),
            &format!("https://a.example:{port}/"),
        ])
    })
    .await
    .unwrap();
    assert!(!ok, "a.example must not verify against CA B");
    assert!(err.contains("certificate"), "{err}");
    proxy.shutdown(Duration::from_secs(1)).await;
}

/// Acceptance 2: WSS through the proxy from a Rust client and from Node's
/// `ws`, both echoed by the backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wss_from_rust_and_node() {
    let dir = TempDir::new("tls-wss");
    let pki = Pki::new(dir.path());
    let b = backends(1).await;
    let pool = r#"match_id = [{ from = "path", pattern = "/matches/{id}" }]"#;
    let proxy = start_proxy(&config(&servers_of(&b), pool, &tls_section(dir.path()))).await;
    let addr = proxy.listening_tls()[0];

    let mut ws = wss(addr, "b.example", &pki.b, "/matches/m1/ws").await;
    for i in 0..20 {
        echo(&mut ws, &format!("rust {i}")).await;
    }
    let big = vec![7u8; 256 * 1024];
    ws.send(Message::binary(big.clone())).await.unwrap();
    let got = ws.next().await.unwrap().unwrap();
    assert_eq!(got.into_data(), big);
    ws.close(None).await.unwrap();

    let script = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("node/wss-client.js");
    let url = format!("wss://127.0.0.1:{}/matches/m2/ws", addr.port());
    let ca = dir.path().join("ca-a.pem");
    let out = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .arg(&script)
            .arg(&url)
            .arg(&ca)
            .args(["a.example", "50"])
            .output()
            .expect("node is installed (tests/run.sh installs it)")
    })
    .await
    .unwrap();
    let line = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "node wss client: {line} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
    assert_eq!(report["echoed"], 50);
    assert_eq!(report["server"], "s1");
    assert_eq!(
        report["san"], "DNS:a.example",
        "SNI a.example got the a.example pair"
    );
    let msgs = figure_total(&proxy, "kp5_websocket_messages_total").await;
    assert!(msgs >= 140.0, "TLS tunnels count their messages: {msgs}");
    proxy.shutdown(Duration::from_secs(1)).await;
}

async fn figure_total(proxy: &kp5_proxy::ProxyHandle, name: &str) -> f64 {
    let got = get(&client(), &format!("http://{}/metrics", proxy.admin)).await;
    String::from_utf8_lossy(&got.body)
        .lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Acceptance 3: certificates replaced on disk while 100 WSS connections
/// are open: new handshakes get the new certificate within 1 s and none of
/// the 100 drops. A key that does not belong to its certificate is refused
/// with a clear reason and the pair in effect keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaced_certificates_reach_new_handshakes_within_a_second_and_drop_nothing() {
    let dir = TempDir::new("tls-rotate");
    let pki = Pki::new(dir.path());
    let b = backends(2).await;
    let pool = r#"match_id = [{ from = "path", pattern = "/matches/{id}" }]"#;
    let proxy = start_proxy(&config(&servers_of(&b), pool, &tls_section(dir.path()))).await;
    let addr = proxy.listening_tls()[0];
    let cc = client_config(&pki.a.pem, &[TLS12, TLS13], &[b"http/1.1"]);
    let first = presented(&connect(addr, "a.example", cc.clone()).await.unwrap());

    let mut open = Vec::new();
    for i in 0..100 {
        let mut ws = wss(
            addr,
            "a.example",
            &pki.a,
            &format!("/matches/r{}/ws", i % 10),
        )
        .await;
        echo(&mut ws, "before").await;
        open.push(ws);
    }

    let next = pki.a.issue(&["a.example"]);
    assert_ne!(next.der, first);
    let replaced = Instant::now();
    next.install(dir.path(), "a");
    let mut seen = first.clone();
    while seen != next.der {
        assert!(
            replaced.elapsed() < Duration::from_secs(1),
            "new handshakes still get the old certificate after 1 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
        seen = presented(&connect(addr, "a.example", cc.clone()).await.unwrap());
    }
    let took = replaced.elapsed();
    eprintln!("new certificate served {took:?} after the files were replaced");
    for (i, ws) in open.iter_mut().enumerate() {
        echo(ws, &format!("after {i}")).await;
    }

    // a key of another pair: refused, reported, and the current pair stays
    let stray = pki.a.issue(&["a.example"]);
    std::fs::write(dir.path().join("a.key.tmp"), &stray.key_pem).unwrap();
    std::fs::rename(dir.path().join("a.key.tmp"), dir.path().join("a.key")).unwrap();
    let hc = client();
    let health_url = format!("http://{}/api/scaling/health", proxy.admin);
    let problem = || {
        let (hc, url) = (hc.clone(), health_url.clone());
        async move {
            let h = get_with(&hc, &url, &[("authorization", "Bearer test-token")])
                .await
                .json();
            h["problems"].as_array().and_then(|p| {
                p.iter()
                    .filter_map(|p| p.as_str())
                    .find(|p| p.contains("certificate-files"))
                    .map(str::to_owned)
            })
        }
    };
    wait_until(
        Duration::from_secs(5),
        "the stray key to be refused",
        || async { problem().await.is_some() },
    )
    .await;
    let reason = problem().await.unwrap();
    assert!(
        reason.contains("a.key") && reason.contains("does not belong"),
        "{reason}"
    );
    assert!(
        figure_total(
            &proxy,
            "kp5_tls_certificate_reloads_total{result=\"error\"}"
        )
        .await
            >= 1.0
    );
    let still = presented(&connect(addr, "a.example", cc.clone()).await.unwrap());
    assert_eq!(still, next.der, "the pair in effect keeps serving");

    // the matching key back: accepted, and the problem clears
    next.install(dir.path(), "a");
    wait_until(Duration::from_secs(5), "the problem to clear", || async {
        problem().await.is_none()
    })
    .await;
    for ws in open.iter_mut() {
        echo(ws, "at the end").await;
    }
    proxy.shutdown(Duration::from_secs(1)).await;
}

/// A ClientHello offering only `version` (0x0301 TLS 1.0, 0x0302 TLS 1.1),
/// with no supported_versions extension.
fn legacy_client_hello(version: u16) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&version.to_be_bytes());
    body.extend_from_slice(&[0x42; 32]); // random
    body.push(0); // session id
    body.extend_from_slice(&[0x00, 0x04, 0xc0, 0x13, 0x00, 0x2f]); // two CBC suites
    body.extend_from_slice(&[0x01, 0x00]); // null compression
    let mut hs = vec![0x01, 0, 0, 0];
    hs[1..4].copy_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    hs.extend_from_slice(&body);
    let mut rec = vec![0x16, 0x03, 0x01];
    rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
    rec.extend_from_slice(&hs);
    rec
}

/// Acceptance 4: a handshake offering only TLS 1.0 or 1.1 is refused with
/// a fatal alert; TLS 1.2 and 1.3 are accepted, and
/// `min_version = "1.3"` refuses 1.2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_10_and_11_are_refused() {
    let dir = TempDir::new("tls-versions");
    let pki = Pki::new(dir.path());
    let b = backends(1).await;
    let proxy = start_proxy(&config(&servers_of(&b), "", &tls_section(dir.path()))).await;
    let addr = proxy.listening_tls()[0];

    for version in [0x0301u16, 0x0302] {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(&legacy_client_hello(version)).await.unwrap();
        let mut reply = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut reply)).await;
        assert!(reply.len() >= 7, "an alert, got {reply:?}");
        assert_eq!(
            reply[0], 0x15,
            "an alert record, not a ServerHello: {reply:?}"
        );
        assert_eq!(reply[5], 2, "fatal");
        // rustls answers handshake_failure (40); protocol_version (70) would do too
        assert!([40, 70].contains(&reply[6]), "alert {}", reply[6]);
    }
    assert!(figure_total(&proxy, "kp5_tls_handshakes_total{result=\"error\"}").await >= 2.0);

    for (v, name) in [(TLS12, "TLSv1_2"), (TLS13, "TLSv1_3")] {
        let s = connect(
            addr,
            "a.example",
            client_config(&pki.a.pem, &[v], &[b"http/1.1"]),
        )
        .await
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(
            format!("{:?}", s.get_ref().1.protocol_version().unwrap()),
            name
        );
    }

    // min_version = "1.3" by a reload: 1.2 is refused from then on
    // the same listen entries: the listeners stay as they are
    let toml = config(
        &servers_of(&b),
        "",
        &format!("{}\nmin_version = \"1.3\"", tls_section(dir.path())),
    );
    proxy
        .reload(kp5_proxy::Config::from_toml(&toml, &kp5_shared::MapEnv::new()).unwrap())
        .await
        .unwrap();
    let only12 = connect(
        addr,
        "a.example",
        client_config(&pki.a.pem, &[TLS12], &[b"http/1.1"]),
    )
    .await;
    assert!(only12.is_err(), "TLS 1.2 refused after min_version = 1.3");
    connect(
        addr,
        "a.example",
        client_config(&pki.a.pem, &[TLS13], &[b"http/1.1"]),
    )
    .await
    .expect("TLS 1.3 still accepted");
    proxy.shutdown(Duration::from_secs(1)).await;
}

/// TLS to backends: a pool with `backend_tls` reaches its servers over
/// https (keep-alive client) and wss (upgrades), verifying them against the
/// configured CA; a server whose certificate the CA did not sign is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backends_over_tls_for_requests_and_websockets() {
    let dir = TempDir::new("tls-backend");
    let _pki = Pki::new(dir.path());
    let b = backends(1).await;
    // the TLS "backend" is a second proxy terminating TLS in front of s1
    let edge = start_proxy(&config(&servers_of(&b), "", &tls_section(dir.path()))).await;
    let tls_backend = edge.listening_tls()[0];
    let d = dir.path().display();
    let pools = format!(
        r#"backend_tls = {{ ca = "{d}/ca-a.pem", server_name = "a.example" }}

[pools.wrongca]
backends = [{{ id = "w1", address = "{tls_backend}" }}]
backend_tls = {{ ca = "{d}/ca-b.pem", server_name = "a.example" }}

[[routes]]
path_prefix = "/wrong/"
pool = "wrongca""#
    );
    let front = start_proxy(&config(&[("t1", tls_backend, 1)], &pools, "retries = 0")).await;
    let hc = client();
    for i in 0..5 {
        let got = get(&hc, &format!("http://{}/over-tls/{i}", front.listen[0])).await;
        assert_eq!(got.status, 200, "{:?}", got.body);
        let json = got.json();
        assert_eq!(json["server"], "s1");
        // the edge got the request over TLS from the front proxy
        assert_eq!(json["headers"]["x-forwarded-proto"], "https", "{json}");
    }
    let (mut ws, server) = ws(&format!("ws://{}/matches/t/ws", front.listen[0])).await;
    assert_eq!(server, "s1");
    for i in 0..10 {
        ws.send(Message::text(format!("wss upstream {i}")))
            .await
            .unwrap();
        let got = ws.next().await.unwrap().unwrap();
        assert_eq!(got, Message::text(format!("wss upstream {i}")));
    }
    let refused = get(&hc, &format!("http://{}/wrong/x", front.listen[0])).await;
    let body = String::from_utf8_lossy(&refused.body);
    assert_eq!(refused.status, 502, "{body}");
    assert!(body.contains("certificate"), "{body}");
    front.shutdown(Duration::from_secs(1)).await;
    edge.shutdown(Duration::from_secs(1)).await;
}

/// Over TLS as in the clear, a client that reads nothing is given up on at
/// the send timeout: an HTTPS client that asked for a large response (the
/// server's connection closes with it), and a WSS client that sends and
/// reads no echo (the tunnel over TLS closes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_clients_that_read_nothing_are_closed_at_the_send_timeout() {
    use std::sync::atomic::Ordering::Relaxed;
    let dir = TempDir::new("tls-send-timeout");
    let pki = Pki::new(dir.path());
    let (endless, mut ends) = endless_backend().await;
    let b = backends(1).await;
    let servers = [("raw", endless, 1), ("s1", b[0].addr, 1)];
    // the large responses from the raw server, WebSockets to the demo one
    let extra = format!("send_timeout_ms = 300\n{}", tls_section(dir.path()));
    let toml = config(&servers[..1], "", &extra).replace(
        "[[routes]]",
        "[[routes]]\npath_prefix = \"/matches/\"\npool = \"ws\"\n\n[[routes]]",
    ) + &format!(
        "\n[pools.ws]\nbackends = [{{ id = \"s1\", address = \"{}\" }}]\n",
        servers[1].1
    );
    let proxy = start_proxy(&toml).await;
    let addr = proxy.listening_tls()[0];
    let counters = proxy.shared.counters.clone();
    let cc = client_config(&pki.a.pem, &[TLS13], &[b"http/1.1"]);

    let mut s = connect(addr, "a.example", cc.clone()).await.unwrap();
    s.write_all(b"GET /big HTTP/1.1\r\nHost: a.example\r\n\r\n")
        .await
        .unwrap();
    s.flush().await.unwrap();
    let within = Duration::from_secs(10);
    wait_until(within, "the HTTPS connection to close", || async {
        counters.connections_active.load(Relaxed) == 0
    })
    .await;
    assert_cut_short(&mut ends, within).await;
    assert_eq!(counters.send_timeouts.load(Relaxed), 1);
    drop(s);

    let mut s = connect(addr, "a.example", cc).await.unwrap();
    let head = raw_upgrade(&mut s, "a.example", "/matches/m1/ws").await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    wait_until(within, "the WSS tunnel to open", || async {
        counters.websockets_active.load(Relaxed) == 1
    })
    .await;
    send_until_stuck(&mut s).await;
    wait_until(
        within,
        "the WSS tunnel to close at the send timeout",
        || async { counters.websockets_active.load(Relaxed) == 0 },
    )
    .await;
    assert_eq!(counters.send_timeouts.load(Relaxed), 2);
}
