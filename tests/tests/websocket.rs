//! WebSockets through the proxy: relay, close codes, strategies on live
//! connections, match affinity, and shutdown with 1001.

use futures_util::{SinkExt, StreamExt};
use kp5_tests::support::*;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

async fn next(ws: &mut Ws) -> Message {
    tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .expect("message within 10 s")
        .expect("stream open")
        .expect("valid message")
}

/// Acceptance 2: text, 1 MiB binary, ping/pong and close (codes and reasons
/// both ways) through the proxy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_relay_and_close_codes() {
    let b = backends(1).await;
    let proxy = start_proxy(&config(&servers_of(&b), "", "")).await;
    let url = format!("ws://{}/matches/1/ws", proxy.listen[0]);

    let (mut ws, server) = ws(&url).await;
    assert_eq!(server, "s1");
    ws.send(Message::text("hello")).await.unwrap();
    assert_eq!(next(&mut ws).await, Message::text("hello"));
    let big: Vec<u8> = (0..1024 * 1024).map(|i| (i * 7 % 256) as u8).collect();
    ws.send(Message::binary(big.clone())).await.unwrap();
    assert_eq!(next(&mut ws).await.into_data(), big);
    ws.send(Message::Ping("p1".into())).await.unwrap();
    assert_eq!(next(&mut ws).await, Message::Pong("p1".into()));

    // client closes with a code and reason: the server echoes them back
    ws.send(Message::Close(Some(CloseFrame {
        code: CloseCode::Library(4000),
        reason: "client bye".into(),
    })))
    .await
    .unwrap();
    match next(&mut ws).await {
        Message::Close(Some(f)) => {
            assert_eq!(u16::from(f.code), 4000);
            assert_eq!(f.reason.as_str(), "client bye");
        }
        other => panic!("expected close, got {other:?}"),
    }

    // the client reads the end of the stream and closes its socket
    assert!(ws.next().await.is_none());
    drop(ws);

    // server closes with its own code and reason
    let (mut ws, _) = kp5_tests::support::ws(&url).await;
    ws.send(Message::text("close:4001:server bye"))
        .await
        .unwrap();
    match next(&mut ws).await {
        Message::Close(Some(f)) => {
            assert_eq!(u16::from(f.code), 4001);
            assert_eq!(f.reason.as_str(), "server bye");
        }
        other => panic!("expected close, got {other:?}"),
    }
    assert!(ws.next().await.is_none());
    drop(ws);
    let c = client();
    wait_until(
        Duration::from_secs(3),
        "tunnels closed and counted down",
        || {
            let (c, p) = (c.clone(), &proxy);
            async move { per_server(&lb_stats(&c, p).await, "websockets")["s1"] == 0 }
        },
    )
    .await;
}

/// Acceptance 3: least_connections with 30 WebSockets open on A: the next 30 go to B.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_connections_counts_open_websockets() {
    let b = backends(2).await;
    let servers = servers_of(&b);
    // only A at first, so the first 30 certainly land there
    let proxy = start_proxy(&config(
        &servers[..1],
        "strategy = \"least_connections\"",
        "",
    ))
    .await;
    let url = format!("ws://{}/lobby", proxy.listen[0]);
    let mut held = Vec::new();
    for _ in 0..30 {
        let (ws, s) = ws(&url).await;
        assert_eq!(s, "s1");
        held.push(ws);
    }
    // B joins (same live state: A's 30 stay counted)
    proxy
        .reload(
            kp5_proxy::Config::from_toml(
                &config(&servers, "strategy = \"least_connections\"", ""),
                &kp5_shared::MapEnv::new(),
            )
            .unwrap(),
        )
        .await
        .expect("reload applies");
    for i in 0..30 {
        let (ws, s) = ws(&url).await;
        assert_eq!(s, "s2", "connection {i} of the next 30 went to {s}");
        held.push(ws);
    }
    let stats = lb_stats(&client(), &proxy).await;
    assert_eq!(
        per_server(&stats, "websockets"),
        BTreeMap::from([("s1".into(), 30), ("s2".into(), 30)])
    );
}

/// Acceptance 4: least_matches spreads 20 matches 10/10 and every connection
/// of a match reaches the one server that owns it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_matches_and_match_affinity() {
    let b = backends(2).await;
    let pool = r#"strategy = "least_matches"
match_id = [{ from = "path", pattern = "/matches/{id}" }, { from = "query", name = "matchId" }]"#;
    let proxy = start_proxy(&config(&servers_of(&b), pool, "")).await;
    let base = proxy.listen[0];
    let mut held = Vec::new();
    let mut owner: BTreeMap<u32, String> = BTreeMap::new();
    // first connection of each of 20 matches
    for m in 0..20 {
        let (ws, s) = ws(&format!("ws://{base}/matches/{m}/ws")).await;
        owner.insert(m, s);
        held.push(ws);
    }
    let per: BTreeMap<String, usize> = owner.values().fold(BTreeMap::new(), |mut acc, s| {
        *acc.entry(s.clone()).or_default() += 1;
        acc
    });
    assert_eq!(
        per,
        BTreeMap::from([("s1".into(), 10), ("s2".into(), 10)]),
        "{owner:?}"
    );
    // four more connections per match, by path, by query and by plain HTTP
    let c = client();
    for m in 0..20u32 {
        for k in 0..2 {
            let (mut ws, s) = ws(&format!("ws://{base}/matches/{m}/ws?k={k}")).await;
            assert_eq!(s, owner[&m], "match {m}");
            ws.send(Message::text(format!("m{m}"))).await.unwrap();
            assert_eq!(next(&mut ws).await, Message::text(format!("m{m}")));
            held.push(ws);
        }
        let (ws, s) = ws(&format!("ws://{base}/socket?matchId={m}")).await;
        assert_eq!(s, owner[&m]);
        held.push(ws);
        let g = get(&c, &format!("http://{base}/matches/{m}/state")).await;
        assert_eq!(g.server(), owner[&m]);
    }
    let stats = lb_stats(&c, &proxy).await;
    assert_eq!(
        per_server(&stats, "matches"),
        BTreeMap::from([("s1".into(), 10), ("s2".into(), 10)])
    );
    assert_eq!(per_server(&stats, "websockets").values().sum::<u64>(), 80);
}

/// Matches end after their last connection closed and the grace period passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn match_ends_after_grace() {
    let b = backends(2).await;
    let pool = r#"strategy = "least_matches"
match_grace_ms = 300
match_id = [{ from = "path", pattern = "/matches/{id}" }]"#;
    let proxy = start_proxy(&config(&servers_of(&b), pool, "")).await;
    let (ws1, _) = ws(&format!("ws://{}/matches/9/ws", proxy.listen[0])).await;
    let c = client();
    assert_eq!(
        per_server(&lb_stats(&c, &proxy).await, "matches")
            .values()
            .sum::<u64>(),
        1
    );
    drop(ws1);
    wait_until(Duration::from_secs(3), "match ended", || {
        let (c, p) = (c.clone(), &proxy);
        async move {
            per_server(&lb_stats(&c, p).await, "matches")
                .values()
                .sum::<u64>()
                == 0
        }
    })
    .await;
}

/// Acceptance 10: SIGTERM with open WebSockets: each receives close 1001 and
/// the process exits 0; a request in flight completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_websockets_with_1001_and_exits_0() {
    let b = backends(2).await;
    let port = free_port();
    let admin = free_port();
    let cfg = config(&servers_of(&b), "", "drain_timeout_ms = 500")
        .replace(
            "listen = [\"127.0.0.1:0\"]",
            &format!("listen = [\"127.0.0.1:{port}\"]"),
        )
        .replace(
            "listen = \"127.0.0.1:0\"",
            &format!("listen = \"127.0.0.1:{admin}\""),
        );
    let dir = std::env::temp_dir().join(format!("kp5-sigterm-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("proxy.toml");
    std::fs::write(&path, cfg).unwrap();
    let mut child = tokio::process::Command::new(proxy_bin())
        .arg("--config")
        .arg(&path)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let c = client();
    wait_until(Duration::from_secs(10), "proxy up", || {
        let c = c.clone();
        async move {
            let req = http::Request::get(format!("http://127.0.0.1:{admin}/healthz"))
                .body(Default::default())
                .unwrap();
            request(&c, req).await.is_ok_and(|g| g.status == 200)
        }
    })
    .await;
    let mut sockets = Vec::new();
    for i in 0..10 {
        let (mut w, _) = ws(&format!("ws://127.0.0.1:{port}/matches/{i}")).await;
        w.send(Message::text("hi")).await.unwrap();
        assert_eq!(next(&mut w).await, Message::text("hi"));
        sockets.push(w);
    }
    // a slow request in flight when the signal arrives still completes
    let slow = tokio::spawn({
        let c = c.clone();
        async move { get(&c, &format!("http://127.0.0.1:{port}/slow/300")).await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let pid = child.id().unwrap().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    assert_eq!(slow.await.unwrap().status, 200);
    let mut codes = BTreeSet::new();
    for mut w in sockets {
        match next(&mut w).await {
            Message::Close(Some(f)) => {
                codes.insert(u16::from(f.code));
            }
            other => panic!("expected close 1001, got {other:?}"),
        }
    }
    assert_eq!(codes, BTreeSet::from([1001]));
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0));
    std::fs::remove_dir_all(&dir).ok();
}

/// Byte-level: the upgrade request reaches the server in origin-form with the
/// upgrade headers and without the client's hop-by-hop headers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_request_bytes_on_the_wire() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let raw = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = raw.local_addr().unwrap();
    let proxy = start_proxy(&config(&[("raw", addr, 1)], "", "")).await;
    let got = tokio::spawn(async move {
        let (mut s, _) = raw.accept().await.unwrap();
        let mut buf = vec![0u8; 8192];
        let mut n = 0;
        while !buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
            n += s.read(&mut buf[n..]).await.unwrap();
        }
        s.write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
            .await
            .unwrap();
        String::from_utf8_lossy(&buf[..n]).to_string()
    });
    let mut c = tokio::net::TcpStream::connect(proxy.listen[0])
        .await
        .unwrap();
    c.write_all(b"GET /socket.io/?EIO=4&transport=websocket HTTP/1.1\r\nHost: play.example\r\nConnection: Upgrade, Keep-Alive\r\nKeep-Alive: 5\r\nUpgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").await.unwrap();
    let head = got.await.unwrap();
    assert!(
        head.starts_with("GET /socket.io/?EIO=4&transport=websocket HTTP/1.1\r\n"),
        "{head}"
    );
    let lower = head.to_ascii_lowercase();
    assert!(
        lower.contains("\r\nupgrade: websocket\r\n")
            && lower.contains("\r\nconnection: upgrade\r\n"),
        "{head}"
    );
    assert!(lower.contains("\r\nhost: play.example\r\n"), "{head}");
    assert!(!lower.contains("keep-alive"), "{head}");
    let mut resp = vec![0u8; 256];
    let n = c.read(&mut resp).await.unwrap();
    assert!(String::from_utf8_lossy(&resp[..n]).starts_with("HTTP/1.1 400"));
}
