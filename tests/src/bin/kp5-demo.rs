//! The README's first command: a proxy in front of three demo match servers,
//! with simulated players joining and leaving matches so there is traffic
//! to watch on the dashboard. Where `redis-server` is installed it starts
//! one (on a free port, nothing saved) and gives every match server its
//! `kp5-agent`, so the proxy discovers them through the Redis registry;
//! where it is not, the proxy runs on its embedded registry with the
//! servers listed in its config.

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
    /// Run on the embedded registry even where redis-server is installed.
    #[arg(long)]
    no_redis: bool,
}

/// A redis-server child process, killed when dropped.
struct Redis {
    child: std::process::Child,
    url: String,
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `redis-server` on a free port, if it is installed.
async fn start_redis() -> Option<Redis> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .ok()?
        .local_addr()
        .ok()?
        .port();
    let child = std::process::Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .ok()?;
    let redis = Redis {
        child,
        url: format!("redis://127.0.0.1:{port}/0"),
    };
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return Some(redis);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("kp5-demo: redis-server did not start; using the embedded registry");
    None
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
    let redis = if cli.no_redis {
        None
    } else {
        start_redis().await
    };
    let mut agents = Vec::new();
    let (registry, pool_servers) = match &redis {
        Some(r) => {
            // every match server gets its agent, which registers it in Redis
            for s in &servers {
                let text = format!(
                    r#"[agent]
server_id = "{id}"
pool = "matches"
advertise = "{addr}"
listen = "127.0.0.1:0"
heartbeat_interval_ms = 500
heartbeat_ttl_ms = 2000
load = {{ source = "scrape", url = "http://{addr}/stats" }}
[redis]
url = "{url}"
"#,
                    id = s.id,
                    addr = s.addr,
                    url = r.url
                );
                let cfg = kp5_agent::Config::from_toml(&text, &kp5_shared::MapEnv::new())?;
                agents.push(kp5_agent::start(cfg).await?);
            }
            (
                format!("[redis]\nurl = \"{}\"", r.url),
                "discover = true".to_owned(),
            )
        }
        None => {
            let backends: Vec<String> = servers
                .iter()
                .map(|s| format!("{{ id = \"{}\", address = \"{}\" }}", s.id, s.addr))
                .collect();
            (
                String::new(),
                format!("backends = [{}]", backends.join(", ")),
            )
        }
    };
    let config = format!(
        r#"
[proxy]
listen = ["127.0.0.1:{port}"]
[admin]
listen = "127.0.0.1:{admin}"
token = "demo-token"
[log]
access_log = false
{registry}
[[routes]]
path_prefix = "/"
pool = "matches"
[pools.matches]
strategy = "least_matches"
match_grace_ms = 5000
sticky_cookie = "kp5_srv"
match_id = [{{ from = "path", pattern = "/matches/{{id}}" }}, {{ from = "query", name = "matchId" }}]
health_check = {{ path = "/health", interval_ms = 2000, timeout_ms = 1000 }}
{pool_servers}
"#,
        port = cli.port,
        admin = cli.admin_port,
    );
    let cfg = kp5_proxy::Config::from_toml(&config, &kp5_shared::ProcessEnv)?;
    let proxy = kp5_proxy::start(cfg).await?;
    let (p, a) = (proxy.listen[0], proxy.admin);
    // with agents, the proxy learns the servers from Redis: wait for all of them
    for _ in 0..200 {
        let rt = proxy.shared.runtime.load();
        if rt.pools.iter().map(|p| p.servers.len()).sum::<usize>() >= servers.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!("kp5-demo ready");
    match &redis {
        Some(r) => println!("  registry   Redis at {} (redis-server started for the demo), one kp5-agent per server", r.url),
        None => println!("  registry   embedded (redis-server not found; servers listed in the config)"),
    }
    println!("  dashboard  http://{a}/dashboard   (token: demo-token)");
    println!("  proxy      http://{p}/   WebSocket ws://{p}/matches/<id>/ws");
    println!("  stats      curl -H 'Authorization: Bearer demo-token' http://{a}/api/scaling/loadbalancer/stats");
    println!("  metrics    http://{a}/metrics");
    for (i, s) in servers.iter().enumerate() {
        match agents.get(i) {
            Some(ag) => println!(
                "  {}   http://{}/ (direct), agent http://{}/v1/status",
                s.id, s.addr, ag.addr
            ),
            None => println!("  {}   http://{}/ (direct)", s.id, s.addr),
        }
    }
    println!("  Ctrl-C stops everything.");

    for n in 0..cli.players {
        tokio::spawn(player(p, n));
    }
    // Ctrl-C or SIGTERM: stop the players' proxy, deregister, stop Redis
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r?,
        _ = term.recv() => {}
    }
    proxy.shutdown(Duration::from_secs(2)).await;
    for a in agents {
        a.shutdown().await;
    }
    drop(redis);
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
