//! Hot reload (issue 5): the watched file, the admin endpoint and SIGHUP;
//! rejected configs leave the old one serving and are reported; listeners
//! come and go without touching open connections.

use kp5_proxy::ProxyHandle;
use kp5_shared::MapEnv;
use kp5_tests::cluster::TempDir;
use kp5_tests::demo::DemoServer;
use kp5_tests::support::*;
use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

async fn start_from_file(path: &Path, watch: bool) -> ProxyHandle {
    let cfg = kp5_proxy::Config::load(path, &MapEnv::new()).expect("valid config");
    let opts = kp5_proxy::Options {
        config_path: Some(path.to_owned()),
        env: Arc::new(MapEnv::new()),
        watch,
    };
    kp5_proxy::start_with(cfg, opts)
        .await
        .expect("proxy starts")
}

/// Writes the file the way editors and config tools do: a new file renamed over.
fn write_config(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

async fn servers_seen(hc: &HttpClient, p: &ProxyHandle, n: usize) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    for _ in 0..n {
        let got = get(hc, &format!("http://{}/", p.listen[0])).await;
        assert_eq!(got.status, 200);
        seen.insert(got.server());
    }
    seen
}

async fn health(hc: &HttpClient, p: &ProxyHandle) -> serde_json::Value {
    get_with(
        hc,
        &format!("http://{}/api/scaling/health", p.admin),
        &[("authorization", "Bearer test-token")],
    )
    .await
    .json()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_changed_file_applies_within_a_second_and_bad_ones_are_rejected() {
    let dir = TempDir::new("reload");
    let path = dir.path().join("proxy.toml");
    let b = backends(3).await;
    let two = config(&servers_of(&b[..2]), "strategy = \"round_robin\"", "");
    write_config(&path, &two);
    let p = start_from_file(&path, true).await;
    let hc = client();
    assert_eq!(servers_seen(&hc, &p, 4).await.len(), 2);

    // a third server: in effect within 1 s of the write
    let started = Instant::now();
    write_config(
        &path,
        &config(&servers_of(&b), "strategy = \"round_robin\"", ""),
    );
    wait_until(Duration::from_secs(1), "s3 in rotation", || async {
        servers_seen(&hc, &p, 3).await.contains("s3")
    })
    .await;
    eprintln!("file change in effect after {:?}", started.elapsed());
    let good = config(&servers_of(&b), "strategy = \"round_robin\"", "");

    // each kind of bad config is rejected, reported, and the old one serves on
    let bad = [
        ("syntax", good.replace("[pools.p]", "[pools.p")),
        ("strategy", good.replace("round_robin", "fastest")),
        ("duplicate", good.replace("\"s2\"", "\"s1\"")),
        (
            "address",
            good.replace(&b[2].addr.to_string(), "not-an-address"),
        ),
    ];
    for (kind, text) in bad {
        let generation = health(&hc, &p).await["config"]["generation"]
            .as_u64()
            .unwrap();
        write_config(&path, &text);
        wait_until(Duration::from_secs(1), "rejection reported", || async {
            !health(&hc, &p).await["config"]["lastError"].is_null()
        })
        .await;
        let h = health(&hc, &p).await;
        let reason = h["config"]["lastError"]["reason"]
            .as_str()
            .unwrap()
            .to_owned();
        eprintln!("{kind}: {reason}");
        assert_eq!(h["status"], "degraded", "{kind}");
        assert_eq!(
            h["config"]["generation"], generation,
            "{kind}: nothing applied"
        );
        assert_eq!(
            servers_seen(&hc, &p, 6).await.len(),
            3,
            "{kind}: the old config serves"
        );
        // back to a good file clears it
        write_config(&path, &good);
        wait_until(Duration::from_secs(1), "good config applied", || async {
            health(&hc, &p).await["config"]["lastError"].is_null()
        })
        .await;
    }
    let metrics = get(&hc, &format!("http://{}/metrics", p.admin)).await;
    let text = String::from_utf8_lossy(&metrics.body).into_owned();
    assert!(
        text.contains("kp5_config_reloads_total{result=\"error\"} 4"),
        "{text}"
    );

    // the admin endpoint re-reads the file
    let generation = health(&hc, &p).await["config"]["generation"]
        .as_u64()
        .unwrap();
    let r = request(
        &hc,
        http::Request::post(format!("http://{}/api/scaling/reload", p.admin))
            .header("authorization", "Bearer test-token")
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert!(r.json()["generation"].as_u64().unwrap() > generation);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn listeners_come_and_go_without_touching_open_connections() {
    let dir = TempDir::new("listen");
    let path = dir.path().join("proxy.toml");
    let b = backends(1).await;
    let (a_port, b_port) = (free_port(), free_port());
    let with = |ports: &[u16]| {
        let listen: Vec<String> = ports.iter().map(|p| format!("\"127.0.0.1:{p}\"")).collect();
        config(&servers_of(&b), "", "").replace(
            "listen = [\"127.0.0.1:0\"]",
            &format!("listen = [{}]", listen.join(", ")),
        )
    };
    write_config(&path, &with(&[a_port]));
    let p = start_from_file(&path, false).await;
    let hc = client();
    let (mut ws_a, _) = ws(&format!("ws://127.0.0.1:{a_port}/ws")).await;

    // added: accepts
    p.reload(kp5_proxy::Config::from_toml(&with(&[a_port, b_port]), &MapEnv::new()).unwrap())
        .await
        .unwrap();
    let got = get(&hc, &format!("http://127.0.0.1:{b_port}/")).await;
    assert_eq!(got.status, 200);
    assert_eq!(p.listening().len(), 2);

    // removed: stops accepting, its open WebSocket keeps working
    p.reload(kp5_proxy::Config::from_toml(&with(&[b_port]), &MapEnv::new()).unwrap())
        .await
        .unwrap();
    wait_until(Duration::from_secs(1), "old address refuses", || async {
        tokio::net::TcpStream::connect(("127.0.0.1", a_port))
            .await
            .is_err()
    })
    .await;
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    for i in 0..3 {
        ws_a.send(Message::text(format!("still here {i}")))
            .await
            .unwrap();
        let echo = ws_a.next().await.unwrap().unwrap();
        assert_eq!(echo, Message::text(format!("still here {i}")));
    }
    assert_eq!(
        get(&hc, &format!("http://127.0.0.1:{b_port}/"))
            .await
            .status,
        200
    );

    // a listen address that cannot be bound rejects the whole reload
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = taken.local_addr().unwrap().port();
    let err = p
        .reload(kp5_proxy::Config::from_toml(&with(&[b_port, busy]), &MapEnv::new()).unwrap())
        .await
        .unwrap_err();
    assert!(err.contains("proxy.listen"), "{err}");
    assert_eq!(p.listening().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_proxy_binary() {
    let dir = TempDir::new("hup");
    let path = dir.path().join("proxy.toml");
    let b = DemoServer::start("s1", "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let admin_port = free_port();
    let text = config(&[("s1", b.addr, 1)], "", "").replace(
        "listen = \"127.0.0.1:0\"",
        &format!("listen = \"127.0.0.1:{admin_port}\""),
    );
    write_config(&path, &text);
    let mut child = std::process::Command::new(proxy_bin())
        .arg("--config")
        .arg(&path)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let hc = client();
    let url = format!("http://127.0.0.1:{admin_port}/api/scaling/health");
    let generation = || {
        let hc = hc.clone();
        let url = url.clone();
        async move {
            match request(
                &hc,
                http::Request::get(&url)
                    .header("authorization", "Bearer test-token")
                    .body(http_body_util::Full::new(bytes::Bytes::new()))
                    .unwrap(),
            )
            .await
            {
                Ok(g) if g.status == 200 => g.json()["config"]["generation"].as_u64(),
                _ => None,
            }
        }
    };
    wait_until(Duration::from_secs(10), "proxy up", || async {
        generation().await.is_some()
    })
    .await;
    let before = generation().await.unwrap();
    std::process::Command::new("kill")
        .args(["-HUP", &child.id().to_string()])
        .status()
        .unwrap();
    wait_until(Duration::from_secs(2), "SIGHUP reloaded", || async {
        generation().await > Some(before)
    })
    .await;
    let _ = child.kill();
    let _ = child.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_reloads_under_load_fail_nothing_and_keep_the_counts() {
    use futures_util::{SinkExt, StreamExt};
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
    use tokio_tungstenite::tungstenite::Message;

    let b = backends(4).await;
    let all = servers_of(&b);
    let cfg = |servers: &[(&str, std::net::SocketAddr, u32)], strategy: &str| {
        kp5_proxy::Config::from_toml(
            &config(servers, &format!("strategy = \"{strategy}\""), ""),
            &MapEnv::new(),
        )
        .unwrap()
    };
    let p = start_proxy(&config(&all[..3], "strategy = \"least_connections\"", "")).await;
    let hc = client();

    // 500 open WebSockets over s1..s3
    let url = format!("ws://{}/ws", p.listen[0]);
    let mut sockets = Vec::new();
    for _ in 0..500 {
        sockets.push(ws(&url).await);
    }
    let before = per_server(&lb_stats(&hc, &p).await, "websockets");
    assert_eq!(before.values().sum::<u64>(), 500);

    // steady HTTP load, paced to 2,000 requests/s
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut load = Vec::new();
    for _ in 0..20 {
        let (hc, stop, ok, failed) = (hc.clone(), stop.clone(), ok.clone(), failed.clone());
        let target = format!("http://{}/", p.listen[0]);
        load.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            while !stop.load(Relaxed) {
                tick.tick().await;
                let req = http::Request::get(&target)
                    .body(http_body_util::Full::new(bytes::Bytes::new()))
                    .unwrap();
                match request(&hc, req).await {
                    Ok(g) if g.status == 200 => ok.fetch_add(1, Relaxed),
                    other => {
                        eprintln!("failed: {other:?}");
                        failed.fetch_add(1, Relaxed)
                    }
                };
            }
        }));
    }
    let started = Instant::now();
    tokio::time::sleep(Duration::from_millis(300)).await;

    // 20 reloads: strategies, servers added and removed, including s1,
    // which holds a third of the open WebSockets
    let s1_gone: Vec<_> = all[1..3].to_vec();
    let variants = [
        cfg(&all[..3], "round_robin"),
        cfg(&all, "least_connections"),
        cfg(&s1_gone, "least_connections"),
        cfg(&all[..3], "weighted"),
        cfg(&all[1..], "least_matches"),
    ];
    for i in 0..20 {
        let next = if i == 19 {
            cfg(&all[..3], "least_connections")
        } else {
            variants[i % variants.len()].clone()
        };
        p.reload(next).await.expect("reload");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Relaxed);
    for l in load {
        l.await.unwrap();
    }
    let secs = started.elapsed().as_secs_f64();
    let (ok, failed) = (ok.load(Relaxed), failed.load(Relaxed));
    eprintln!(
        "{ok} requests in {secs:.1} s ({:.0}/s), {failed} failed, 20 reloads",
        ok as f64 / secs
    );
    assert_eq!(failed, 0, "no request failed");
    assert!(
        ok as f64 / secs > 1500.0,
        "the load was real: {:.0}/s",
        ok as f64 / secs
    );

    // every WebSocket survived, and the counts are what they were
    for (i, (w, _)) in sockets.iter_mut().enumerate() {
        w.send(Message::text(format!("m{i}"))).await.unwrap();
        let echo = tokio::time::timeout(Duration::from_secs(5), w.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(echo, Message::text(format!("m{i}")));
    }
    let after = per_server(&lb_stats(&hc, &p).await, "websockets");
    assert_eq!(after, before, "per-server counts unchanged by the reloads");
    let health = get_with(
        &hc,
        &format!("http://{}/api/scaling/health", p.admin),
        &[("authorization", "Bearer test-token")],
    )
    .await
    .json();
    assert_eq!(health["config"]["generation"], 21);
}
