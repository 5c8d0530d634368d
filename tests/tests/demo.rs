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
    // port 0: the demo binds ports of its own (match servers, agents) right
    // before the proxy's, so a port chosen here and released could be taken
    // by one of them; the demo prints the addresses it bound
    let mut child = tokio::process::Command::new(bin)
        .args(["--port", "0", "--admin-port", "0"])
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
    // "  dashboard  http://ADDR/dashboard ..." and "  proxy      http://ADDR/ ..."
    let (mut admin, mut port) = (None, None);
    while admin.is_none() || port.is_none() {
        let line = tokio::time::timeout(Duration::from_secs(5), lines.next_line())
            .await
            .expect("the demo prints its addresses after `ready`")
            .unwrap()
            .expect("the demo's output ended before its addresses");
        let mut words = line.split_whitespace();
        let (Some(what), Some(url)) = (words.next(), words.next()) else {
            continue;
        };
        let addr = url.trim_start_matches("http://").split('/').next();
        let port_of = || {
            addr.and_then(|a| a.parse::<std::net::SocketAddr>().ok())
                .map(|a| a.port())
        };
        match what {
            "dashboard" => admin = port_of(),
            "proxy" => port = port_of(),
            _ => {}
        }
    }
    let (admin, port) = (admin.unwrap(), port.unwrap());
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
