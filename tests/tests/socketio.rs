//! Acceptance 6: real Socket.IO 4 servers (two) and clients with the default
//! transports (long-polling, then the upgrade) through the proxy.

use kp5_tests::support::*;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

fn node_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("node")
}

async fn socketio_server(port: u16, id: &str) -> Child {
    let mut child = Command::new("node")
        .arg(node_dir().join("socketio-server.js"))
        .arg(port.to_string())
        .arg(id)
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("node is installed (tests/run.sh installs it)");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
        .await
        .expect("socket.io server ready in time")
        .unwrap()
        .unwrap_or_default();
    assert_eq!(line, format!("ready {id}"));
    child
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socketio_default_transports_across_two_servers() {
    assert!(
        node_dir().join("node_modules/socket.io").exists(),
        "run `npm ci` in tests/node first (tests/run.sh does)"
    );
    let (p1, p2) = (free_port(), free_port());
    let _s1 = socketio_server(p1, "io-1").await;
    let _s2 = socketio_server(p2, "io-2").await;
    let servers = [
        ("io-1", format!("127.0.0.1:{p1}").parse().unwrap(), 1),
        ("io-2", format!("127.0.0.1:{p2}").parse().unwrap(), 1),
    ];
    let pool = r#"strategy = "least_connections"
sticky_cookie = "kp5_srv"
match_id = [{ from = "query", name = "matchId" }]"#;
    let proxy = start_proxy(&config(&servers, pool, "")).await;

    let out = Command::new("node")
        .arg(node_dir().join("socketio-client.js"))
        .arg(format!("http://{}", proxy.listen[0]))
        .args(["40", "8", "20"])
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(90), out)
        .await
        .expect("clients finish")
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let r: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "client output ({e}): {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert_eq!(r["why"], "done", "{r}");
    assert_eq!(r["errors"].as_array().unwrap().len(), 0, "{r}");
    assert_eq!(r["connected"], 60, "{r}");
    assert_eq!(r["upgraded"], 60, "every client upgrades: {r}");
    assert_eq!(
        r["received"], r["expected"],
        "every room message arrives: {r}"
    );
    assert_eq!(r["expected"], 200, "{r}");
    assert_eq!(r["echoes"], 20, "lobby sessions stay on their server: {r}");
    let per = r["servers"].as_object().unwrap();
    assert!(
        per.get("io-1").and_then(|v| v.as_u64()).unwrap_or(0) > 0,
        "{r}"
    );
    assert!(
        per.get("io-2").and_then(|v| v.as_u64()).unwrap_or(0) > 0,
        "{r}"
    );
    for (room, servers) in r["roomServers"].as_object().unwrap() {
        assert_eq!(
            servers.as_array().unwrap().len(),
            1,
            "room {room} spans servers: {r}"
        );
    }
}
