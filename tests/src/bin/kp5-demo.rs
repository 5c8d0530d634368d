//! The README's first command: a proxy in front of three demo match servers,
//! with simulated players joining and leaving matches so there is traffic
//! to watch. Needs no Redis (the proxy runs on its embedded registry).

use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use kp5_tests::demo::DemoServer;
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

#[derive(Parser, Debug)]
#[command(
    name = "kp5-demo",
    version,
    about = "kp5-proxy in front of demo match servers, with simulated players"
)]
struct Cli {
    /// Proxy port on 127.0.0.1 (0 = any free port).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Admin port on 127.0.0.1 (0 = any free port).
    #[arg(long, default_value_t = 9901)]
    admin_port: u16,
    /// Demo match servers to start.
    #[arg(long, default_value_t = 3)]
    servers: usize,
    /// Simulated players connected at any time (0 = none).
    #[arg(long, default_value_t = 24)]
    players: usize,
}

#[tokio::main]
async fn main() -> anyhow_free::Result {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("info,access=warn"))
        .with_writer(std::io::stderr)
        .init();
    let mut servers = Vec::new();
    for i in 1..=cli.servers {
        servers.push(DemoServer::start(&format!("server-{i}"), "127.0.0.1:0".parse()?).await?);
    }
    let backends: Vec<String> = servers
        .iter()
        .map(|s| format!("{{ id = \"{}\", address = \"{}\" }}", s.id, s.addr))
        .collect();
    let config = format!(
        r#"
[proxy]
listen = ["127.0.0.1:{port}"]
[admin]
listen = "127.0.0.1:{admin}"
token = "demo-token"
[log]
access_log = false
[[routes]]
path_prefix = "/"
pool = "matches"
[pools.matches]
strategy = "least_matches"
match_grace_ms = 5000
sticky_cookie = "kp5_srv"
match_id = [{{ from = "path", pattern = "/matches/{{id}}" }}, {{ from = "query", name = "matchId" }}]
health_check = {{ path = "/health", interval_ms = 2000, timeout_ms = 1000 }}
backends = [{backends}]
"#,
        port = cli.port,
        admin = cli.admin_port,
        backends = backends.join(", ")
    );
    let cfg = kp5_proxy::Config::from_toml(&config, &kp5_shared::ProcessEnv)?;
    let proxy = kp5_proxy::start(cfg).await?;
    let (p, a) = (proxy.listen[0], proxy.admin);
    println!("kp5-demo ready");
    println!("  proxy      http://{p}/   WebSocket ws://{p}/matches/<id>/ws");
    println!("  stats      curl -H 'Authorization: Bearer demo-token' http://{a}/api/scaling/loadbalancer/stats");
    println!("  metrics    http://{a}/metrics");
    for s in &servers {
        println!("  {}   http://{}/ (direct)", s.id, s.addr);
    }
    println!("  Ctrl-C stops everything.");

    for n in 0..cli.players {
        tokio::spawn(player(p, n));
    }
    tokio::signal::ctrl_c().await?;
    proxy.shutdown(Duration::from_secs(2)).await;
    Ok(())
}

/// A player: joins a random match, chats for a few seconds, leaves, repeats.
async fn player(proxy: std::net::SocketAddr, n: usize) {
    tokio::time::sleep(Duration::from_millis(n as u64 * 100)).await;
    loop {
        let m = fastrand::u32(1..=12);
        if let Ok((mut ws, _)) =
            tokio_tungstenite::connect_async(format!("ws://{proxy}/matches/{m}/ws")).await
        {
            for i in 0..fastrand::u32(5..30) {
                if ws
                    .send(Message::text(format!("player {n} move {i}")))
                    .await
                    .is_err()
                {
                    break;
                }
                let _ = ws.next().await;
                tokio::time::sleep(Duration::from_millis(fastrand::u64(100..400))).await;
            }
            let _ = ws.close(None).await;
        }
        tokio::time::sleep(Duration::from_millis(fastrand::u64(200..1500))).await;
    }
}

/// Errors of `main` without pulling anyhow into the test crate.
mod anyhow_free {
    pub type Result = std::result::Result<(), Box<dyn std::error::Error>>;
}
