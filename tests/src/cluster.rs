//! Helpers for the cluster tests: a real `redis-server` on a free port, real
//! `kp5-agent` processes, and proxy configs that discover servers through
//! Redis. Every process started here is killed when its handle drops.

use crate::demo::DemoServer;
use crate::support::*;
use kp5_proxy::ProxyHandle;
use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!(
            "kp5-{tag}-{}-{:08x}",
            std::process::id(),
            fastrand::u32(..)
        ));
        std::fs::create_dir_all(&p).expect("temp dir");
        TempDir(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A binary built next to `kp5-proxy` (`kp5-agent`, `kp5-loadgen`).
pub fn sibling_bin(name: &str) -> PathBuf {
    let bin = proxy_bin().with_file_name(name);
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build --workspace --bins` first (tests/run.sh does)",
        bin.display()
    );
    bin
}

/// A `redis-server` process without persistence.
pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts on a free port. `redis-server` cannot bind port 0 and report
    /// it, so the port is picked first; if another process takes it in
    /// between, another port is tried.
    pub fn start() -> RedisServer {
        let mut r = RedisServer {
            port: 0,
            child: None,
        };
        for _ in 0..5 {
            r.port = free_port();
            if r.spawn() {
                return r;
            }
        }
        panic!("redis-server did not start on any of 5 free ports");
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Starts `redis-server` on `self.port` and waits until it answers.
    /// False when the port was taken: our server exited, or the one that
    /// answers is another process (its `process_id` is not our child's).
    fn spawn(&mut self) -> bool {
        let which = Command::new("redis-server").arg("--version").output();
        assert!(
            which.is_ok(),
            "redis-server is not installed: the README's test command (tests/run.sh) installs it"
        );
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--protected-mode", "no", "--loglevel", "warning"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        let pid = format!("process_id:{}\r\n", child.id());
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(info) = self.command(&["INFO", "server"]) {
                if info.contains(&pid) {
                    return true;
                }
                if info.contains("process_id:") {
                    self.kill();
                    return false;
                }
            }
            if let Some(c) = self.child.as_mut() {
                if c.try_wait().ok().flatten().is_some() {
                    self.child = None;
                    return false;
                }
            }
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// PING over a raw socket.
    pub fn ping(&self) -> bool {
        self.command(&["PING"])
            .is_some_and(|r| r.starts_with("+PONG"))
    }

    /// Sends one command and returns the raw reply (first read).
    pub fn command(&self, args: &[&str]) -> Option<String> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        let mut req = format!("*{}\r\n", args.len());
        for a in args {
            req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        s.write_all(req.as_bytes()).ok()?;
        let mut buf = vec![0u8; 64 * 1024];
        let n = s.read(&mut buf).ok()?;
        Some(String::from_utf8_lossy(&buf[..n]).into_owned())
    }

    /// SIGKILL: Redis dies with everything it held.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts again on the same port, empty.
    pub fn restart(&mut self) {
        self.kill();
        assert!(
            self.spawn(),
            "port {} was taken while redis-server was down",
            self.port
        );
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A `kp5-agent` process.
pub struct Agent {
    pub id: String,
    pub api: SocketAddr,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Agent {
    /// Starts an agent for server `id` at `advertise`, scraping its
    /// `/stats`, with a short heartbeat (interval 200 ms, TTL `ttl_ms`).
    pub fn start(
        dir: &TempDir,
        redis_url: &str,
        id: &str,
        advertise: SocketAddr,
        ttl_ms: u64,
    ) -> Agent {
        let api: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let config = dir.path().join(format!("agent-{id}.toml"));
        std::fs::write(
            &config,
            format!(
                r#"[agent]
server_id = "{id}"
pool = "p"
advertise = "{advertise}"
listen = "{api}"
heartbeat_interval_ms = 200
heartbeat_ttl_ms = {ttl_ms}
load = {{ source = "scrape", url = "http://{advertise}/stats" }}

[redis]
url = "{redis_url}"
timeout_ms = 300
"#
            ),
        )
        .unwrap();
        let mut a = Agent {
            id: id.to_owned(),
            api,
            log: dir.path().join(format!("agent-{id}.log")),
            config,
            child: None,
        };
        a.spawn();
        a
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(sibling_bin("kp5-agent"))
            .arg("--config")
            .arg(&self.config)
            .env("LOG_LEVEL", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn kp5-agent");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(self.api).is_err() {
            assert!(
                Instant::now() < deadline,
                "agent {} did not start: {}",
                self.id,
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for the exit (the agent deregisters first).
    pub fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(st)) = c.try_wait() {
                return Some(st);
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                return c.wait().ok();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A proxy config whose pool `p` discovers its servers through Redis.
pub fn cluster_config(redis_url: &str, strategy: &str, pool_extra: &str) -> String {
    format!(
        r#"
[proxy]
listen = ["127.0.0.1:0"]
retries = 2

[admin]
listen = "127.0.0.1:0"
token = "test-token"

[log]
access_log = false

[redis]
url = "{redis_url}"
timeout_ms = 300
reconcile_interval_ms = 5000

[[routes]]
path_prefix = "/"
pool = "p"

[pools.p]
strategy = "{strategy}"
discover = true
match_id = [{{ from = "path", pattern = "/matches/{{id}}" }}]
{pool_extra}
"#
    )
}

// ---- a whole cluster: Redis, three demo servers with agents, two proxies

pub const TTL_MS: u64 = 1000;

/// Redis, three demo servers with their agents, two proxies.
pub struct Cluster {
    pub redis: RedisServer,
    pub servers: Vec<DemoServer>,
    pub agents: Vec<Agent>,
    pub proxies: Vec<ProxyHandle>,
    pub dir: TempDir,
}

pub async fn cluster(strategy: &str, pool_extra: &str) -> Cluster {
    let dir = TempDir::new("cluster");
    let redis = RedisServer::start();
    let servers = backends(3).await;
    let agents = servers
        .iter()
        .map(|s| Agent::start(&dir, &redis.url(), &s.id, s.addr, TTL_MS))
        .collect();
    let cfg = cluster_config(&redis.url(), strategy, pool_extra);
    let proxies = vec![start_proxy(&cfg).await, start_proxy(&cfg).await];
    let c = Cluster {
        redis,
        servers,
        agents,
        proxies,
        dir,
    };
    let hc = client();
    for p in &c.proxies {
        wait_until(
            Duration::from_secs(5),
            "both proxies see three servers",
            || {
                let hc = hc.clone();
                async move { available(&hc, p).await.len() == 3 }
            },
        )
        .await;
    }
    c
}

/// Ids of the servers a proxy would route new traffic to.
pub async fn available(c: &HttpClient, p: &ProxyHandle) -> BTreeSet<String> {
    let v = admin(c, p, "/api/scaling/distributed/servers").await;
    v["servers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["health"] == "healthy" && s["draining"] == false)
        .map(|s| s["id"].as_str().unwrap().to_owned())
        .collect()
}

pub async fn admin(c: &HttpClient, p: &ProxyHandle, path: &str) -> serde_json::Value {
    let got = get_with(
        c,
        &format!("http://{}{path}", p.admin),
        &[("authorization", "Bearer test-token")],
    )
    .await;
    assert_eq!(got.status, 200, "{path}: {:?}", got.body);
    got.json()
}

pub fn ids(n: &[&str]) -> BTreeSet<String> {
    n.iter().map(|s| s.to_string()).collect()
}

/// Which server answered a WebSocket of `path` through `p`.
pub async fn ws_via(p: &ProxyHandle, path: &str) -> (Ws, String) {
    ws(&format!("ws://{}{path}", p.listen[0])).await
}

pub async fn echo_ok(w: &mut Ws) {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    w.send(Message::text("ping")).await.expect("send");
    let got = tokio::time::timeout(Duration::from_secs(5), w.next())
        .await
        .expect("echo in time")
        .expect("open")
        .expect("frame");
    assert_eq!(got, Message::text("ping"));
}

/// `server id → field` from a proxy's distributed/servers.
pub async fn figure(hc: &HttpClient, p: &ProxyHandle, field: &str) -> BTreeMap<String, u64> {
    admin(hc, p, "/api/scaling/distributed/servers").await["servers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["id"].as_str().unwrap().to_owned(),
                s[field].as_u64().unwrap_or(0),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::RedisServer;

    /// A port another process holds is refused, whether that process
    /// answers like Redis or not, and leaves the holder alone.
    #[test]
    fn redis_refuses_a_taken_port() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut r = RedisServer {
            port: taken.local_addr().unwrap().port(),
            child: None,
        };
        assert!(!r.spawn(), "started on a port a listener holds");

        let a = RedisServer::start();
        let mut b = RedisServer {
            port: a.port,
            child: None,
        };
        assert!(!b.spawn(), "took another redis-server's answer for its own");
        assert!(b.child.is_none());
        assert!(a.ping());
    }
}
