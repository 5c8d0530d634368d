//! Registration and heartbeats: every `heartbeat_interval` (and at once on a
//! change such as a load push or a drain) the agent writes its server's
//! record with the heartbeat TTL, adds it to its pool's index, and publishes
//! it on the registry channel. A clean exit deregisters. While Redis is away
//! the agent keeps serving its local API and retries on every beat; the
//! connection manager reconnects with back-off.

use crate::config::{Config, LoadSource};
use crate::load;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use kp5_shared::wire::{unix_ms, RegistryEvent, ServerRecord};
use kp5_shared::Keys;
use redis::aio::ConnectionManager;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use kp5_shared::StartError;

/// A load figure not reported yet.
const NONE: u64 = u64::MAX;
/// Beats triggered by changes (load pushes, drain) come at most this often,
/// so a match server pushing on every join cannot flood Redis and proxies.
const MIN_GAP: Duration = Duration::from_millis(50);

/// Everything the agent knows and reports.
pub struct Agent {
    pub cfg: Config,
    pub(crate) keys: Keys,
    pub started_at: u64,
    seq: AtomicU64,
    connections: AtomicU64,
    matches: AtomicU64,
    pub draining: AtomicBool,
    cpu_permille: AtomicU32,
    memory_permille: AtomicU32,
    pub(crate) redis: Option<ConnectionManager>,
    /// For connections of their own (blocking stream reads of subscribers).
    pub(crate) redis_client: Option<redis::Client>,
    pub(crate) scripts: crate::matches::Scripts,
    redis_up: AtomicBool,
    pub heartbeats: AtomicU64,
    pub heartbeat_failures: AtomicU64,
    pub scrape_failures: AtomicU64,
    last_heartbeat: AtomicU64,
    last_error: Mutex<Option<String>>,
    /// Wakes the heartbeat loop for an immediate beat.
    wake: Notify,
}

fn opt(v: u64) -> Option<u64> {
    (v != NONE).then_some(v)
}

impl Agent {
    /// Load pushed by the match server (`PUT /v1/load`).
    pub fn set_load(&self, connections: Option<u64>, matches: Option<u64>) {
        if let Some(c) = connections {
            self.connections.store(c.min(NONE - 1), Relaxed);
        }
        if let Some(m) = matches {
            self.matches.store(m.min(NONE - 1), Relaxed);
        }
        self.wake.notify_one();
    }

    pub fn set_draining(&self, draining: bool) {
        if self.draining.swap(draining, Relaxed) != draining {
            tracing::info!(draining, "drain mode changed");
        }
        self.wake.notify_one();
    }

    pub fn redis_up(&self) -> bool {
        self.redis_up.load(Relaxed)
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn last_heartbeat(&self) -> u64 {
        self.last_heartbeat.load(Relaxed)
    }

    /// The record as the next heartbeat would publish it.
    pub fn record(&self) -> ServerRecord {
        let c = &self.cfg;
        ServerRecord {
            id: c.server_id.clone(),
            pool: c.pool.clone(),
            address: c.advertise.clone(),
            weight: c.weight,
            max_connections: c.max_connections,
            max_matches: c.max_matches,
            version: env!("CARGO_PKG_VERSION").into(),
            started_at: self.started_at,
            updated_at: unix_ms(),
            seq: self.seq.load(Relaxed),
            heartbeat_ttl_ms: c.heartbeat_ttl.as_millis() as u64,
            connections: opt(self.connections.load(Relaxed)),
            matches: opt(self.matches.load(Relaxed)),
            cpu: self.cpu_permille.load(Relaxed) as f64 / 10.0,
            memory: self.memory_permille.load(Relaxed) as f64 / 10.0,
            draining: self.draining.load(Relaxed),
        }
    }

    fn note(&self, result: Result<(), String>) {
        match result {
            Ok(()) => {
                self.heartbeats.fetch_add(1, Relaxed);
                self.last_heartbeat.store(unix_ms(), Relaxed);
                if !self.redis_up.swap(true, Relaxed) {
                    tracing::info!(server = %self.cfg.server_id, "registered in Redis");
                }
            }
            Err(e) => {
                self.heartbeat_failures.fetch_add(1, Relaxed);
                if self.redis_up.swap(false, Relaxed) {
                    tracing::warn!(error = %e, "Redis unreachable; the local API keeps serving and heartbeats retry");
                }
                *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
            }
        }
    }

    /// One heartbeat: record with TTL, pool index, event.
    async fn beat(&self) -> Result<(), String> {
        if self.redis.is_none() {
            return Ok(());
        }
        self.seq.fetch_add(1, Relaxed);
        let rec = self.record();
        let json = serde_json::to_string(&rec).map_err(|e| e.to_string())?;
        let mut pipe = redis::pipe();
        pipe.cmd("SET")
            .arg(self.keys.server(&self.cfg.server_id))
            .arg(json)
            .arg("PX")
            .arg(self.cfg.heartbeat_ttl.as_millis() as u64)
            .ignore()
            .cmd("SADD")
            .arg(self.keys.pool_servers(&self.cfg.pool))
            .arg(&self.cfg.server_id)
            .ignore();
        self.send(pipe, &RegistryEvent::Heartbeat { server: rec })
            .await
    }

    /// Removes the record and tells the proxies, so they stop at once
    /// instead of waiting for the TTL.
    async fn deregister(&self) -> Result<(), String> {
        let mut pipe = redis::pipe();
        pipe.cmd("DEL")
            .arg(self.keys.server(&self.cfg.server_id))
            .ignore()
            .cmd("SREM")
            .arg(self.keys.pool_servers(&self.cfg.pool))
            .arg(&self.cfg.server_id)
            .ignore();
        let down = RegistryEvent::Down {
            id: self.cfg.server_id.clone(),
            pool: self.cfg.pool.clone(),
        };
        self.send(pipe, &down).await
    }

    /// Runs `pipe` and publishes `event` after it, in one round trip (the
    /// connection's response timeout bounds it).
    async fn send(&self, mut pipe: redis::Pipeline, event: &RegistryEvent) -> Result<(), String> {
        let Some(conn) = &self.redis else {
            return Ok(());
        };
        let event = serde_json::to_string(event).map_err(|e| e.to_string())?;
        pipe.cmd("PUBLISH")
            .arg(self.keys.registry_channel())
            .arg(event)
            .ignore();
        pipe.query_async::<()>(&mut conn.clone())
            .await
            .map_err(|e| e.to_string())
    }
}

/// A running agent.
pub struct AgentHandle {
    pub agent: Arc<Agent>,
    /// The bound local API address.
    pub addr: SocketAddr,
    stop: CancellationToken,
    tasks: TaskTracker,
}

/// Binds the local API, registers and starts heartbeating. Must run inside
/// a Tokio runtime.
pub async fn start(cfg: Config) -> Result<AgentHandle, StartError> {
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|source| StartError::Bind {
            addr: cfg.listen,
            source,
        })?;
    let addr = listener.local_addr().unwrap_or(cfg.listen);
    let (redis, redis_client) = match &cfg.redis {
        Some(r) => {
            let e = |e: redis::RedisError| StartError::Redis(e.to_string());
            (
                Some(kp5_shared::redis::connect(&r.target, None).map_err(e)?),
                Some(kp5_shared::redis::client(&r.target).map_err(e)?),
            )
        }
        None => {
            tracing::warn!("no [redis]: serving the local API without registering anywhere");
            (None, None)
        }
    };
    let keys = Keys::new(cfg.redis.as_ref().map_or("kp5", |r| &r.key_prefix));
    let agent = Arc::new(Agent {
        keys,
        started_at: unix_ms(),
        seq: AtomicU64::new(0),
        connections: AtomicU64::new(NONE),
        matches: AtomicU64::new(NONE),
        draining: AtomicBool::new(false),
        cpu_permille: AtomicU32::new(0),
        memory_permille: AtomicU32::new(0),
        redis,
        redis_client,
        scripts: crate::matches::Scripts::default(),
        redis_up: AtomicBool::new(false),
        heartbeats: AtomicU64::new(0),
        heartbeat_failures: AtomicU64::new(0),
        scrape_failures: AtomicU64::new(0),
        last_heartbeat: AtomicU64::new(0),
        last_error: Mutex::new(None),
        wake: Notify::new(),
        cfg,
    });
    let stop = CancellationToken::new();
    let tasks = TaskTracker::new();
    tasks.spawn(crate::api::serve(listener, agent.clone(), stop.clone()));
    tasks.spawn(heartbeat(agent.clone(), stop.clone()));
    tracing::info!(server = %agent.cfg.server_id, pool = %agent.cfg.pool, advertise = %agent.cfg.advertise, %addr, "kp5-agent started");
    Ok(AgentHandle {
        agent,
        addr,
        stop,
        tasks,
    })
}

impl AgentHandle {
    /// Stops heartbeating, deregisters and stops the local API.
    pub async fn shutdown(self) {
        self.stop.cancel();
        self.tasks.close();
        let _ = tokio::time::timeout(Duration::from_secs(3), self.tasks.wait()).await;
        match self.agent.deregister().await {
            Ok(()) => tracing::info!(server = %self.agent.cfg.server_id, "deregistered"),
            Err(e) => {
                tracing::warn!(error = %e, "could not deregister; the record expires with its TTL")
            }
        }
    }
}

/// Samples machine CPU and memory with `sysinfo`.
struct Machine {
    sys: Option<sysinfo::System>,
}

impl Machine {
    fn new() -> Self {
        let sys = match sysinfo::System::new() {
            Ok(mut sys) => {
                sys.refresh_cpu_usage();
                Some(sys)
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read CPU and memory; reporting 0");
                None
            }
        };
        Machine { sys }
    }

    /// (CPU %, memory %), CPU averaged since the previous sample.
    fn sample(&mut self) -> (f32, f32) {
        let Some(sys) = self.sys.as_mut() else {
            return (0.0, 0.0);
        };
        sys.refresh_cpu_usage();
        sys.refresh_memory();
        let total = sys.total_memory().max(1);
        let mem = sys.used_memory() as f64 * 100.0 / total as f64;
        (sys.global_cpu_usage(), mem as f32)
    }
}

async fn heartbeat(agent: Arc<Agent>, stop: CancellationToken) {
    let mut machine = Machine::new();
    let client: Client<_, Empty<bytes::Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut tick = tokio::time::interval(agent.cfg.heartbeat_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = tokio::time::Instant::now();
    loop {
        let scheduled = tokio::select! {
            _ = tick.tick() => true,
            _ = agent.wake.notified() => false,
            _ = stop.cancelled() => return,
        };
        if !scheduled {
            // coalesce bursts of changes into one beat
            tokio::select! {
                _ = tokio::time::sleep_until(last + MIN_GAP) => {}
                _ = stop.cancelled() => return,
            }
        }
        last = tokio::time::Instant::now();
        if scheduled {
            let (cpu, mem) = machine.sample();
            agent
                .cpu_permille
                .store((cpu.clamp(0.0, 100.0) * 10.0) as u32, Relaxed);
            agent
                .memory_permille
                .store((mem.clamp(0.0, 100.0) * 10.0) as u32, Relaxed);
            if let LoadSource::Scrape { url } = &agent.cfg.load {
                match scrape(&client, url, agent.cfg.heartbeat_interval).await {
                    Ok(l) => {
                        if let Some(c) = l.connections {
                            agent.connections.store(c.min(NONE - 1), Relaxed);
                        }
                        if let Some(m) = l.matches {
                            agent.matches.store(m.min(NONE - 1), Relaxed);
                        }
                    }
                    Err(e) => {
                        agent.scrape_failures.fetch_add(1, Relaxed);
                        tracing::warn!(%url, error = %e, "scraping the match server's load failed");
                    }
                }
            }
        }
        let r = agent.beat().await;
        agent.note(r);
    }
}

async fn scrape(
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, Empty<bytes::Bytes>>,
    url: &str,
    within: Duration,
) -> Result<load::Load, String> {
    let uri: http::Uri = url.parse().map_err(|e| format!("bad URL: {e}"))?;
    let fetch = async {
        let resp = client.get(uri).await.map_err(|e| e.to_string())?;
        if !resp.status().is_success() {
            return Err(format!("status {}", resp.status()));
        }
        let body = Limited::new(resp.into_body(), 1 << 20)
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        load::parse(&body)
    };
    tokio::time::timeout(within, fetch)
        .await
        .map_err(|_| "timed out".to_owned())?
}
