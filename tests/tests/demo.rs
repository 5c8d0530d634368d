//! Acceptance 12 (first part): the README's first command starts a working
//! demo with no setup: a proxy, three match servers and simulated players.

use kp5_tests::support::*;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_starts_and_carries_traffic() {
    let bin = proxy_bin().with_file_name("kp5-demo");
    assert!(
        bin.exists(),
        "{} missing: build with `cargo build --workspace --bins`",
        bin.display()
    );
    let (port, admin) = (free_port(), free_port());
    let mut child = tokio::process::Command::new(bin)
        .args([
            "--port",
            &port.to_string(),
            "--admin-port",
            &admin.to_string(),
        ])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // even if an assertion fails: SIGINT, so the demo stops its redis-server too
    let stop = Interrupt(child.id().unwrap());
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.as_deref(), Some("kp5-demo ready"));
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });

    let c = client();
    let g = get(&c, &format!("http://127.0.0.1:{port}/hello")).await;
    assert_eq!(g.status, 200);
    let stats_url = format!("http://127.0.0.1:{admin}/api/scaling/loadbalancer/stats");
    wait_until(
        Duration::from_secs(20),
        "players on all three servers",
        || {
            let (c, url) = (c.clone(), stats_url.clone());
            async move {
                let s = get_with(&c, &url, &[("authorization", "Bearer demo-token")])
                    .await
                    .json();
                let servers = s["pools"][0]["servers"].as_array().unwrap().clone();
                servers.len() == 3
                    && servers
                        .iter()
                        .all(|s| s["matches"].as_u64().unwrap_or(0) > 0)
            }
        },
    )
    .await;
    // the dashboard is there, and with redis-server installed (tests/run.sh
    // installs it) the servers came through their agents and Redis
    let page = get(&c, &format!("http://127.0.0.1:{admin}/dashboard")).await;
    assert_eq!(page.status, 200);
    assert!(String::from_utf8_lossy(&page.body).contains("kp5-proxy dashboard"));
    let redis_installed = std::process::Command::new("redis-server")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if redis_installed {
        let s = get_with(
            &c,
            &format!("http://127.0.0.1:{admin}/api/scaling/distributed/servers"),
            &[("authorization", "Bearer demo-token")],
        )
        .await
        .json();
        let sources: Vec<_> = s["servers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["source"].clone())
            .collect();
        assert_eq!(sources, vec!["agent"; 3], "{s}");
    }
    let pid = child.id().unwrap().to_string();
    std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());
    std::mem::forget(stop); // stopped and reaped: its pid is no longer ours
}

/// Sends SIGINT to the demo when dropped (a SIGKILL would orphan the
/// redis-server it started) and gives it a few seconds to stop.
struct Interrupt(u32);

impl Drop for Interrupt {
    fn drop(&mut self) {
        let pid = self.0.to_string();
        let _ = std::process::Command::new("kill")
            .args(["-INT", &pid])
            .status();
        for _ in 0..100 {
            let alive = std::process::Command::new("kill")
                .args(["-0", &pid])
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if !alive {
                return;
            }
            std::thread::sleep(Duration::from_millis(30));
        }
    }
}
