//! The example match server of `examples/match-server` (issue 9): two of
//! them, each with its kp5-agent, behind a proxy on Redis. A match is
//! played on one, that server dies, and the match goes on on the other with
//! every move it had.

use futures_util::{SinkExt, StreamExt};
use kp5_tests::cluster::*;
use kp5_tests::support::*;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

struct Node(Child);

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn example_server(id: &str, port: u16, agent: std::net::SocketAddr) -> Node {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let child = Command::new("node")
        .arg(root.join("../examples/match-server/server.js"))
        .args(["--id", id, "--port", &port.to_string()])
        .args(["--agent", &format!("http://{agent}")])
        // `ws` from the test's own node_modules (tests/run.sh runs npm ci there)
        .env("NODE_PATH", root.join("node/node_modules"))
        .stdout(Stdio::null())
        .spawn()
        .expect("node is installed (tests/run.sh installs it)");
    Node(child)
}

async fn state(ws: &mut Ws) -> serde_json::Value {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("a message within 10 s")
            .expect("open")
            .expect("valid");
        if let Message::Text(t) = msg {
            let v: serde_json::Value = serde_json::from_str(&t).unwrap();
            assert_ne!(v["type"], "error", "{v}");
            if v["type"] == "state" {
                return v;
            }
        }
    }
}

async fn play(ws: &mut Ws, player: &str, mv: &str) -> serde_json::Value {
    let m = serde_json::json!({ "type": "move", "player": player, "move": mv });
    ws.send(Message::text(m.to_string())).await.unwrap();
    state(ws).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn example_match_server_keeps_its_state_across_a_failover() {
    let dir = TempDir::new("example");
    let redis = RedisServer::start();
    let mut agents = Vec::new();
    let mut servers = Vec::new();
    let mut addrs: Vec<std::net::SocketAddr> = Vec::new();
    for id in ["js-1", "js-2"] {
        let port = free_port();
        let addr = format!("127.0.0.1:{port}").parse().unwrap();
        addrs.push(addr);
        let agent = Agent::start(&dir, &redis.url(), id, addr, TTL_MS);
        servers.push(example_server(id, port, agent.api));
        agents.push(agent);
    }
    let hc = client();
    for a in &addrs {
        let url = format!("http://{a}/health");
        wait_until(Duration::from_secs(15), "the example server up", || {
            let (hc, url) = (hc.clone(), url.clone());
            async move {
                let req = http::Request::get(&url).body(Default::default()).unwrap();
                request(&hc, req).await.is_ok_and(|g| g.status == 200)
            }
        })
        .await;
    }
    let proxy = start_proxy(&cluster_config(&redis.url(), "least_matches", "")).await;
    wait_until(
        Duration::from_secs(10),
        "both example servers in rotation",
        || {
            let hc = hc.clone();
            let proxy = &proxy;
            async move { available(&hc, proxy).await == ids(&["js-1", "js-2"]) }
        },
    )
    .await;

    let url = format!("ws://{}/matches/g1/ws", proxy.listen[0]);
    let (mut ws, _) = ws(&url).await;
    let first = state(&mut ws).await;
    assert_eq!(first["version"], 0, "a new match: {first}");
    let owner = first["server"].as_str().unwrap().to_owned();
    let mut last = first;
    for (i, mv) in ["e4", "e5", "Nf3"].iter().enumerate() {
        last = play(&mut ws, &format!("p{}", i % 2 + 1), mv).await;
    }
    assert_eq!(last["version"], 3, "{last}");
    assert_eq!(last["server"], owner.as_str());

    // the owner dies, and its agent with it
    let i = if owner == "js-1" { 0 } else { 1 };
    agents[i].kill9();
    drop(servers.remove(i));
    drop(ws);

    // players come back through the proxy: the match continues elsewhere
    let mut resumed = None;
    for _ in 0..100 {
        if let Ok(Ok((mut ws, _))) = tokio::time::timeout(
            Duration::from_secs(2),
            tokio_tungstenite::connect_async(&url),
        )
        .await
        {
            let s = state(&mut ws).await;
            resumed = Some((ws, s));
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (mut ws, s) = resumed.expect("the match reachable again within 5 s");
    assert_ne!(s["server"], owner.as_str(), "a new owner: {s}");
    assert_eq!(s["version"], 3, "every move kept: {s}");
    let moves: Vec<_> = s["state"]["moves"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["move"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(moves, ["e4", "e5", "Nf3"]);
    let next = play(&mut ws, "p2", "Nc6").await;
    assert_eq!(next["version"], 4, "{next}");
    proxy.shutdown(Duration::from_secs(1)).await;
}
