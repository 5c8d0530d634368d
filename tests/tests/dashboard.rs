//! The admin dashboard in a real browser (issue 9): headless Chromium,
//! driven by playwright-core, against a running cluster (Redis, three demo
//! servers with agents, two proxies) under traffic. The page loads with no
//! console error, asks for the token once, shows every server, and shows a
//! killed server as down within a few seconds. It leaves a screenshot
//! (`KP5_DASHBOARD_SCREENSHOT`, default in the temp dir; `docs/dashboard.png`
//! is one).

use kp5_tests::cluster::*;
use kp5_tests::support::*;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

async fn next_step(
    lines: &mut tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
) -> serde_json::Value {
    let line = tokio::time::timeout(Duration::from_secs(40), lines.next_line())
        .await
        .expect("the browser script answers within 40 s")
        .expect("read")
        .expect("the browser script ended early");
    let step: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|_| panic!("{line}"));
    assert_ne!(step["step"], "failed", "{step}");
    step
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_in_chromium_shows_servers_live_and_a_killed_one_down() {
    let mut c = cluster("least_matches", "").await;
    let proxy = &c.proxies[0];

    // something to watch: matches on every server and a stream of requests
    let mut sockets = Vec::new();
    for i in 0..12 {
        sockets.push(ws_via(proxy, &format!("/matches/dash{i}/ws")).await.0);
    }
    let stop = tokio_util::sync::CancellationToken::new();
    let traffic = tokio::spawn({
        let (url, stop) = (format!("http://{}/api/ping", proxy.listen[0]), stop.clone());
        async move {
            let hc = client();
            while !stop.is_cancelled() {
                let req = http::Request::get(&url)
                    .body(http_body_util::Full::new(bytes::Bytes::new()))
                    .unwrap();
                let _ = request(&hc, req).await;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    });

    let shot = std::env::var("KP5_DASHBOARD_SCREENSHOT")
        .map(PathBuf::from)
        .unwrap_or_else(|_| std::env::temp_dir().join("kp5-dashboard.png"));
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("node/dashboard-check.js");
    let mut child = tokio::process::Command::new("node")
        .arg(&script)
        .arg(format!("http://{}/dashboard", proxy.admin))
        .arg("test-token")
        .arg(&shot)
        .args(["s1", "s2", "s3"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("node is installed (tests/run.sh installs it)");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut stdin = child.stdin.take().unwrap();

    let shown = next_step(&mut lines).await;
    assert_eq!(shown["step"], "servers", "{shown}");
    for id in ["s1", "s2", "s3"] {
        assert_eq!(shown["states"][id], "up", "{shown}");
    }

    // kill s2: its server and its agent, so its record expires
    let server = c.servers.remove(1);
    assert_eq!(server.id, "s2");
    c.agents[1].kill9();
    server.kill().await;
    stdin.write_all(b"killed s2\n").await.unwrap();
    stdin.flush().await.unwrap();

    let down = next_step(&mut lines).await;
    assert_eq!(down["step"], "down", "{down}");
    let after = down["after"].as_u64().unwrap();
    eprintln!("the dashboard showed s2 down {after} ms after the kill");
    assert!(after < 5000, "s2 shown down after {after} ms");
    assert_eq!(down["states"]["s1"], "up");
    assert_eq!(down["states"]["s3"], "up");

    let done = next_step(&mut lines).await;
    assert_eq!(done["step"], "done", "{done}");
    assert_eq!(
        done["consoleErrors"],
        serde_json::json!([]),
        "console errors: {done}"
    );
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .expect("the browser script exits")
        .unwrap();
    assert!(status.success());
    let png = std::fs::read(&shot).expect("a screenshot");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "a real screenshot"
    );
    eprintln!("screenshot: {}", shot.display());

    stop.cancel();
    traffic.await.unwrap();
    drop(sockets);
    for p in c.proxies.drain(..) {
        p.shutdown(Duration::from_secs(1)).await;
    }
}
