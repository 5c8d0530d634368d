//! The proxy's side of the Redis registry: servers that agents register,
//! their live load, and match assignments claimed atomically so that every
//! proxy sends a match to one server.
//!
//! Traffic never waits on Redis: the request path reads what this module
//! keeps in memory, calls Redis only to claim a new match, and only while
//! Redis is up. While it is down, the last-known registry and assignments
//! keep serving, new matches are placed by rendezvous hashing, and the
//! health endpoint says `degraded`.

pub mod claim;
pub mod perf;
pub mod rendezvous;

use crate::app::Shared;
use crate::config::RedisSettings;
use kp5_shared::redis::RedisTarget;
use kp5_shared::wire::{RegistryEvent, ServerRecord};
use kp5_shared::Keys;
use redis::aio::ConnectionManager;
use redis::{PushInfo, PushKind, Value};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio_util::sync::CancellationToken;

/// How often held matches have their assignment TTL renewed.
const REFRESH: Duration = Duration::from_secs(1);
/// How often Redis is pinged (and a lost subscription retried).
const PING: Duration = Duration::from_millis(500);

/// A registered server as this proxy last saw it.
#[derive(Debug, Clone)]
struct Known {
    record: ServerRecord,
    /// Clock ms of the last heartbeat that reached this proxy.
    last_seen: u64,
}

/// Counters shown in metrics and on the admin API.
#[derive(Debug, Default)]
pub struct ClusterCounters {
    /// Claims this proxy won (a new match, or a reassignment).
    pub claims_won: AtomicU64,
    /// Claims that found another proxy's owner and adopted it.
    pub claims_adopted: AtomicU64,
    /// Of the won claims, those that replaced a dead owner.
    pub reassignments: AtomicU64,
    /// New matches placed by rendezvous hashing while Redis was away.
    pub degraded_placements: AtomicU64,
    pub redis_errors: AtomicU64,
    pub events: AtomicU64,
    pub reconciles: AtomicU64,
    /// Times Redis came back after being down.
    pub reconnects: AtomicU64,
}

/// Connection state for the status endpoints.
#[derive(Debug, Default, Clone)]
pub struct RedisStatus {
    pub connected: bool,
    pub subscribed: bool,
    /// Unix ms of the last change between up and down.
    pub since: u64,
    pub last_error: Option<String>,
}

pub struct Cluster {
    pub keys: Keys,
    /// This proxy's id in assign events and claims.
    pub instance: String,
    pub target: RedisTarget,
    pub reconcile_interval: Duration,
    conn: ConnectionManager,
    up: AtomicBool,
    subscribed: AtomicBool,
    status: Mutex<RedisStatus>,
    known: Mutex<HashMap<String, Known>>,
    pub counters: ClusterCounters,
    claim: claim::ClaimScript,
}

impl Cluster {
    /// Opens the (lazy) connection; nothing waits for Redis here.
    pub fn new(
        settings: &RedisSettings,
    ) -> redis::RedisResult<(Arc<Cluster>, UnboundedReceiver<PushInfo>)> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let target = settings.target.clone();
        let conn = kp5_shared::redis::connect(&target, Some(tx))?;
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "proxy".into());
        let cluster = Cluster {
            keys: Keys::new(&settings.key_prefix),
            instance: format!("{host}-{}-{:04x}", std::process::id(), fastrand::u16(..)),
            target,
            reconcile_interval: settings.reconcile_interval,
            conn,
            up: AtomicBool::new(false),
            subscribed: AtomicBool::new(false),
            status: Mutex::new(RedisStatus::default()),
            known: Mutex::new(HashMap::new()),
            counters: ClusterCounters::default(),
            claim: claim::ClaimScript::new(),
        };
        Ok((Arc::new(cluster), rx))
    }

    /// Is Redis reachable right now (as far as the last exchange tells)?
    #[inline]
    pub fn is_up(&self) -> bool {
        self.up.load(Relaxed)
    }

    pub fn status(&self) -> RedisStatus {
        let mut s = self.lock_status().clone();
        s.connected = self.is_up();
        s.subscribed = self.subscribed.load(Relaxed);
        s
    }

    fn lock_status(&self) -> std::sync::MutexGuard<'_, RedisStatus> {
        self.status.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_known(&self) -> std::sync::MutexGuard<'_, HashMap<String, Known>> {
        self.known.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every registered server this proxy knows, sorted by id.
    pub fn records(&self) -> Vec<ServerRecord> {
        let mut v: Vec<ServerRecord> = self
            .lock_known()
            .values()
            .map(|k| k.record.clone())
            .collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    /// Redis answered (or failed): keeps `up` and the status in step.
    fn mark(&self, ok: bool, error: Option<String>) -> bool {
        let was = self.up.swap(ok, Relaxed);
        if was != ok {
            let mut s = self.lock_status();
            s.since = kp5_shared::wire::unix_ms();
            if ok {
                self.counters.reconnects.fetch_add(1, Relaxed);
                tracing::info!(redis = %self.target.redacted_url(), "Redis is reachable");
            } else {
                tracing::warn!(redis = %self.target.redacted_url(), error = ?error, "Redis is unreachable; routing on the last-known registry (degraded)");
            }
        }
        if let Some(e) = error {
            self.counters.redis_errors.fetch_add(1, Relaxed);
            self.lock_status().last_error = Some(e);
        }
        was != ok
    }

    /// A command failed: Redis counts as down until the next good ping.
    pub fn note_error(&self, e: &redis::RedisError) {
        if self.mark(false, Some(e.to_string())) {
            self.subscribed.store(false, Relaxed);
        }
    }

    pub(crate) fn conn(&self) -> ConnectionManager {
        self.conn.clone()
    }

    /// Claims match `id` of `pool` (see [`claim`]).
    pub async fn claim(
        &self,
        pool: &str,
        id: &str,
        candidate: Option<&str>,
        replace: Option<u64>,
        ttl: Duration,
    ) -> redis::RedisResult<claim::Claimed> {
        let r = self
            .claim
            .run(
                &mut self.conn(),
                &self.keys,
                &self.instance,
                pool,
                id,
                candidate,
                replace,
                ttl,
            )
            .await;
        match &r {
            Ok(c) if c.won => {
                self.counters.claims_won.fetch_add(1, Relaxed);
                if !c.previous.is_empty() {
                    self.counters.reassignments.fetch_add(1, Relaxed);
                }
            }
            Ok(_) => {
                self.counters.claims_adopted.fetch_add(1, Relaxed);
            }
            Err(e) => self.note_error(e),
        }
        r
    }

    /// Is server `id` registered (its heartbeat record alive) in Redis?
    pub async fn registered(&self, id: &str) -> redis::RedisResult<bool> {
        redis::cmd("EXISTS")
            .arg(self.keys.server(id))
            .query_async(&mut self.conn())
            .await
    }

    /// `INFO` of the Redis server.
    pub async fn info(&self) -> redis::RedisResult<String> {
        redis::cmd("INFO").query_async(&mut self.conn()).await
    }

    /// A match's state hash (agents write it), empty if none.
    pub async fn match_state(
        &self,
        pool: &str,
        id: &str,
    ) -> redis::RedisResult<HashMap<String, String>> {
        redis::cmd("HGETALL")
            .arg(self.keys.match_state(pool, id))
            .query_async(&mut self.conn())
            .await
    }

    /// A match's performance reports (agents write them), newest first.
    pub async fn match_performance(&self, pool: &str, id: &str) -> redis::RedisResult<Vec<String>> {
        redis::cmd("LRANGE")
            .arg(self.keys.match_performance(pool, id))
            .arg(0)
            .arg(-1)
            .query_async(&mut self.conn())
            .await
    }

    /// The owner record of a match, read from Redis.
    pub async fn owner(&self, pool: &str, id: &str) -> redis::RedisResult<Option<claim::Owner>> {
        let v: HashMap<String, String> = redis::cmd("HGETALL")
            .arg(self.keys.match_owner(pool, id))
            .query_async(&mut self.conn())
            .await?;
        Ok(claim::Owner::from_hash(v))
    }

    /// Applies one record; true when the set of servers or their shape
    /// (pool, address, weight, limits) changed, so the runtime needs a rebuild.
    fn apply_record(&self, shared: &Shared, rec: ServerRecord, now: u64) -> bool {
        let mut known = self.lock_known();
        let (fresh, reshaped) = match known.get(&rec.id) {
            None => (true, true),
            Some(k) => {
                let o = &k.record;
                let newer = rec.started_at != o.started_at || rec.seq > o.seq;
                let reshaped = rec.pool != o.pool
                    || rec.address != o.address
                    || rec.weight != o.weight
                    || rec.max_connections != o.max_connections
                    || rec.max_matches != o.max_matches;
                (newer, newer && reshaped)
            }
        };
        if !fresh {
            return false;
        }
        if !known.contains_key(&rec.id) {
            tracing::info!(server = %rec.id, address = %rec.address, pool = %rec.pool, "server registered");
        }
        if let Some(state) = shared.live.get(&rec.id) {
            apply_load(&state, &rec);
        }
        known.insert(
            rec.id.clone(),
            Known {
                record: rec,
                last_seen: now,
            },
        );
        reshaped
    }

    /// Drops servers whose heartbeat is older than their TTL. Frozen while
    /// Redis is down: silence then says nothing about the servers.
    fn expire(&self, now: u64) -> Vec<String> {
        if !self.is_up() {
            return Vec::new();
        }
        let mut gone = Vec::new();
        self.lock_known().retain(|id, k| {
            let alive = now < k.last_seen + k.record.heartbeat_ttl_ms;
            if !alive {
                gone.push(id.clone());
            }
            alive
        });
        gone
    }

    fn forget(&self, id: &str) -> bool {
        self.lock_known().remove(id).is_some()
    }

    /// Redis is back: every known server gets one more TTL to be heard from.
    fn grace_all(&self, now: u64) {
        for k in self.lock_known().values_mut() {
            k.last_seen = k.last_seen.max(now);
        }
    }
}

fn apply_load(state: &crate::state::ServerState, rec: &ServerRecord) {
    state.apply_report(rec.connections, rec.matches);
    state
        .cpu_permille
        .store((rec.cpu.clamp(0.0, 100.0) * 10.0).round() as u32, Relaxed);
    state.memory_permille.store(
        (rec.memory.clamp(0.0, 100.0) * 10.0).round() as u32,
        Relaxed,
    );
    state.draining.store(rec.draining, Relaxed);
}

/// Pools that discover servers in the current config.
fn discovering_pools(shared: &Shared) -> Vec<String> {
    shared
        .runtime
        .load()
        .config
        .pools
        .iter()
        .filter(|p| p.discover)
        .map(|p| p.name.clone())
        .collect()
}

/// Starts the cluster's background tasks.
pub fn spawn(
    shared: Arc<Shared>,
    cluster: Arc<Cluster>,
    rx: UnboundedReceiver<PushInfo>,
    stop: CancellationToken,
    tasks: &tokio_util::task::TaskTracker,
) {
    let reconcile = Arc::new(tokio::sync::Notify::new());
    tasks.spawn(events(
        shared.clone(),
        cluster.clone(),
        rx,
        reconcile.clone(),
        stop.clone(),
    ));
    tasks.spawn(keepalive(
        shared.clone(),
        cluster.clone(),
        reconcile.clone(),
        stop.clone(),
    ));
    tasks.spawn(reconciler(
        shared.clone(),
        cluster.clone(),
        reconcile,
        stop.clone(),
    ));
    tasks.spawn(expiry(shared.clone(), cluster.clone(), stop.clone()));
    tasks.spawn(refresher(shared, cluster, stop));
}

/// Pub/sub messages and connection notices.
async fn events(
    shared: Arc<Shared>,
    cluster: Arc<Cluster>,
    mut rx: UnboundedReceiver<PushInfo>,
    reconcile: Arc<tokio::sync::Notify>,
    stop: CancellationToken,
) {
    loop {
        let push = tokio::select! {
            p = rx.recv() => match p { Some(p) => p, None => return },
            _ = stop.cancelled() => return,
        };
        match push.kind {
            PushKind::Disconnection => {
                cluster.subscribed.store(false, Relaxed);
                cluster.mark(false, Some("connection to Redis lost".into()));
            }
            PushKind::Subscribe => {
                // a (re)subscription after a reconnect: catch up on what
                // the channel carried while we were away
                cluster.subscribed.store(true, Relaxed);
                reconcile.notify_one();
            }
            PushKind::Message => {
                let Some(Value::BulkString(payload)) = push.data.get(1) else {
                    continue;
                };
                cluster.counters.events.fetch_add(1, Relaxed);
                match serde_json::from_slice::<RegistryEvent>(payload) {
                    Ok(ev) => on_event(&shared, &cluster, ev),
                    Err(e) => tracing::warn!(error = %e, "unreadable registry event ignored"),
                }
            }
            _ => {}
        }
    }
}

fn on_event(shared: &Arc<Shared>, cluster: &Cluster, ev: RegistryEvent) {
    let now = shared.clock.now_ms();
    match ev {
        RegistryEvent::Heartbeat { server } => {
            let id = server.id.clone();
            if cluster.apply_record(shared, server.clone(), now) {
                shared.rebuild();
                if let Some(state) = shared.live.get(&id) {
                    apply_load(&state, &server);
                }
            }
        }
        RegistryEvent::Down { id, .. } => {
            if cluster.forget(&id) {
                tracing::info!(server = %id, "server deregistered");
                shared.rebuild();
            }
        }
        RegistryEvent::Assign {
            pool,
            match_id,
            server,
            token,
            proxy,
            ..
        } => {
            if proxy == cluster.instance {
                return;
            }
            if let Some(state) = shared.live.get(&server) {
                state.note_new_match();
                shared.affinity.learn(&pool, &match_id, &state, token);
            }
        }
        RegistryEvent::Release { pool, match_id, .. } => {
            if shared.affinity.forget(&pool, &match_id) {
                tracing::debug!(%pool, %match_id, "match ended");
            }
        }
    }
}

/// Pings Redis, (re)subscribes, and notices when it comes back.
async fn keepalive(
    shared: Arc<Shared>,
    cluster: Arc<Cluster>,
    reconcile: Arc<tokio::sync::Notify>,
    stop: CancellationToken,
) {
    let channel = cluster.keys.registry_channel();
    let mut tick = tokio::time::interval(PING);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        let mut conn = cluster.conn();
        let ping: redis::RedisResult<String> = redis::cmd("PING").query_async(&mut conn).await;
        match ping {
            Ok(_) => {
                if !cluster.subscribed.load(Relaxed) {
                    match conn.subscribe(&channel).await {
                        Ok(()) => {
                            cluster.subscribed.store(true, Relaxed);
                            tracing::debug!(%channel, "subscribed");
                        }
                        Err(e) => {
                            cluster.note_error(&e);
                            continue;
                        }
                    }
                }
                if cluster.mark(true, None) {
                    cluster.grace_all(shared.clock.now_ms());
                    reconcile.notify_one();
                }
            }
            Err(e) => cluster.note_error(&e),
        }
    }
}

/// Full re-read of the registry: catches whatever pub/sub missed.
async fn reconciler(
    shared: Arc<Shared>,
    cluster: Arc<Cluster>,
    notify: Arc<tokio::sync::Notify>,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(cluster.reconcile_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = notify.notified() => {}
            _ = stop.cancelled() => return,
        }
        if !cluster.is_up() {
            continue;
        }
        if let Err(e) = reconcile(&shared, &cluster).await {
            tracing::debug!(error = %e, "reconcile failed");
            cluster.note_error(&e);
        }
    }
}

async fn reconcile(shared: &Arc<Shared>, cluster: &Cluster) -> redis::RedisResult<()> {
    let mut conn = cluster.conn();
    let mut changed = false;
    let now = shared.clock.now_ms();
    for pool in discovering_pools(shared) {
        let set = cluster.keys.pool_servers(&pool);
        let ids: Vec<String> = redis::cmd("SMEMBERS")
            .arg(&set)
            .query_async(&mut conn)
            .await?;
        if ids.is_empty() {
            continue;
        }
        let keys: Vec<String> = ids.iter().map(|id| cluster.keys.server(id)).collect();
        let values: Vec<Option<String>> =
            redis::cmd("MGET").arg(&keys).query_async(&mut conn).await?;
        let mut stale = Vec::new();
        for (id, v) in ids.iter().zip(values) {
            match v.map(|v| serde_json::from_str::<ServerRecord>(&v)) {
                Some(Ok(rec)) if rec.pool == pool => {
                    changed |= cluster.apply_record(shared, rec, now);
                }
                Some(Ok(_)) => stale.push(id.clone()),
                Some(Err(e)) => {
                    tracing::warn!(server = %id, error = %e, "unreadable server record ignored")
                }
                None => stale.push(id.clone()),
            }
        }
        if !stale.is_empty() {
            // records gone (expired) or moved to another pool: tidy the index
            let _: i64 = redis::cmd("SREM")
                .arg(&set)
                .arg(&stale)
                .query_async(&mut conn)
                .await?;
        }
    }
    cluster.counters.reconciles.fetch_add(1, Relaxed);
    if changed {
        shared.rebuild();
        for rec in cluster.records() {
            if let Some(state) = shared.live.get(&rec.id) {
                apply_load(&state, &rec);
            }
        }
    }
    Ok(())
}

/// Takes servers whose heartbeat stopped out of rotation.
async fn expiry(shared: Arc<Shared>, cluster: Arc<Cluster>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        let gone = cluster.expire(shared.clock.now_ms());
        if !gone.is_empty() {
            tracing::warn!(servers = ?gone, "heartbeat TTL passed; out of rotation");
            shared.rebuild();
        }
    }
}

/// Keeps the assignments of matches with open connections alive in Redis,
/// and writes the ones placed while Redis was away (or lost with it).
async fn refresher(shared: Arc<Shared>, cluster: Arc<Cluster>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(REFRESH);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        if !cluster.is_up() {
            continue;
        }
        if let Err(e) = refresh(&shared, &cluster).await {
            tracing::debug!(error = %e, "assignment refresh failed");
            cluster.note_error(&e);
        }
    }
}

async fn refresh(shared: &Arc<Shared>, cluster: &Cluster) -> redis::RedisResult<()> {
    let held = shared.affinity.held();
    if held.is_empty() {
        return Ok(());
    }
    let rt = shared.runtime.load_full();
    let ttl = |pool: &str| {
        rt.pools
            .iter()
            .find(|p| &*p.name == pool)
            .map_or(claim::MIN_TTL, |p| claim::ttl(p.cfg.match_grace))
    };
    let mut pipe = redis::pipe();
    for h in &held {
        pipe.cmd("PEXPIRE")
            .arg(cluster.keys.match_owner(&h.pool, &h.id))
            .arg(ttl(&h.pool).as_millis() as u64);
    }
    let alive: Vec<i64> = pipe.query_async(&mut cluster.conn()).await?;
    let mut seen = HashSet::new();
    for (h, ok) in held.into_iter().zip(alive) {
        if ok == 1 && h.token != 0 {
            continue;
        }
        if !seen.insert((h.pool.clone(), h.id.clone())) {
            continue;
        }
        let (pool, id, server) = (h.pool, h.id, h.server);
        // placed without Redis, or Redis lost it: write it now; whoever
        // already holds it wins, and this proxy follows
        let c = cluster
            .claim(&pool, &id, Some(&server), None, ttl(&pool))
            .await?;
        if let Some(state) = shared.live.get(&c.server) {
            shared.affinity.learn(&pool, &id, &state, c.token);
        }
    }
    Ok(())
}
