//! Live state of every server, keyed by server id. It outlives config swaps:
//! a reload changes which servers exist and how to choose among them, never
//! their counts, health or ejections (SPEC §6).

use crate::config::Passive;
use crate::health::hysteresis::Hysteresis;
use crate::health::passive;
use kp5_shared::wire::Health;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock};

/// Upper bounds (seconds) of the per-server latency histogram.
pub const LATENCY_BUCKETS: [f64; 13] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A lock-free fixed-bucket histogram of response-head latency.
#[derive(Debug, Default)]
pub struct LatencyHistogram {
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    sum_us: AtomicU64,
    count: AtomicU64,
}

impl LatencyHistogram {
    pub fn observe_us(&self, us: u64) {
        let secs = us as f64 / 1e6;
        let i = LATENCY_BUCKETS
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.buckets[i].fetch_add(1, Relaxed);
        self.sum_us.fetch_add(us, Relaxed);
        self.count.fetch_add(1, Relaxed);
    }

    /// (sum in seconds, count, non-cumulative buckets ending with +Inf).
    pub fn snapshot(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let mut out: Vec<(f64, u64)> = LATENCY_BUCKETS
            .iter()
            .zip(&self.buckets)
            .map(|(&b, c)| (b, c.load(Relaxed)))
            .collect();
        out.push((f64::MAX, self.buckets[LATENCY_BUCKETS.len()].load(Relaxed)));
        (
            self.sum_us.load(Relaxed) as f64 / 1e6,
            self.count.load(Relaxed),
            out,
        )
    }
}

/// A reported figure not reported yet.
pub const NO_REPORT: u64 = u64::MAX;

/// Everything this proxy knows about one server right now.
#[derive(Debug)]
pub struct ServerState {
    pub id: Arc<str>,
    /// Open proxied connections: in-flight HTTP requests plus open tunnels.
    pub connections: AtomicU64,
    pub websockets: AtomicU64,
    /// WebSocket messages relayed to and from this server.
    pub ws_messages: AtomicU64,
    /// Matches assigned to this server by this proxy and not yet ended.
    pub matches: AtomicU64,
    pub selections: AtomicU64,
    pub requests: AtomicU64,
    /// Connect failures and upstream errors.
    pub failures: AtomicU64,
    /// Responses by class: 1xx..5xx.
    pub responses: [AtomicU64; 5],
    pub latency: LatencyHistogram,
    pub draining: AtomicBool,
    /// Load as the server's agent last reported it ([`NO_REPORT`] before
    /// the first report), and what this proxy added since that report.
    reported_connections: AtomicU64,
    reported_matches: AtomicU64,
    /// Connections this proxy opened minus those it closed since the report.
    conn_delta: std::sync::atomic::AtomicI64,
    match_delta: AtomicU64,
    /// Machine CPU and memory use from the agent, in permille.
    pub cpu_permille: AtomicU32,
    pub memory_permille: AtomicU32,
    active_up: AtomicBool,
    ejected_until: AtomicU64,
    readmitted_at: AtomicU64,
    ejections: AtomicU32,
    connect_fail_streak: AtomicU32,
    error_streak: AtomicU32,
    checks: Mutex<Option<Hysteresis>>,
}

impl ServerState {
    pub fn new(id: &str) -> Self {
        ServerState {
            id: Arc::from(id),
            connections: AtomicU64::new(0),
            websockets: AtomicU64::new(0),
            ws_messages: AtomicU64::new(0),
            matches: AtomicU64::new(0),
            selections: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            responses: Default::default(),
            latency: LatencyHistogram::default(),
            draining: AtomicBool::new(false),
            reported_connections: AtomicU64::new(NO_REPORT),
            reported_matches: AtomicU64::new(NO_REPORT),
            conn_delta: std::sync::atomic::AtomicI64::new(0),
            match_delta: AtomicU64::new(0),
            cpu_permille: AtomicU32::new(0),
            memory_permille: AtomicU32::new(0),
            active_up: AtomicBool::new(true),
            ejected_until: AtomicU64::new(0),
            readmitted_at: AtomicU64::new(0),
            ejections: AtomicU32::new(0),
            connect_fail_streak: AtomicU32::new(0),
            error_streak: AtomicU32::new(0),
            checks: Mutex::new(None),
        }
    }

    /// An agent report arrived: it already counts what this proxy opened
    /// before it, so the deltas start again from zero.
    pub fn apply_report(&self, connections: Option<u64>, matches: Option<u64>) {
        if let Some(c) = connections {
            self.reported_connections
                .store(c.min(NO_REPORT - 1), Relaxed);
            self.conn_delta.store(0, Relaxed);
        }
        if let Some(m) = matches {
            self.reported_matches.store(m.min(NO_REPORT - 1), Relaxed);
            self.match_delta.store(0, Relaxed);
        }
    }

    /// The server's reported connections (`None` before any report).
    pub fn reported_connections(&self) -> Option<u64> {
        Some(self.reported_connections.load(Relaxed)).filter(|&c| c != NO_REPORT)
    }

    pub fn reported_matches(&self) -> Option<u64> {
        Some(self.reported_matches.load(Relaxed)).filter(|&c| c != NO_REPORT)
    }

    /// Connections cluster-wide: the agent's last report plus what this
    /// proxy opened (minus what it closed) since, and never less than what
    /// this proxy holds open.
    #[inline]
    pub fn cluster_connections(&self) -> u64 {
        let local = self.connections.load(Relaxed);
        match self.reported_connections.load(Relaxed) {
            NO_REPORT => local,
            r => local.max((r as i64 + self.conn_delta.load(Relaxed)).max(0) as u64),
        }
    }

    /// Matches cluster-wide, by the same rule.
    #[inline]
    pub fn cluster_matches(&self) -> u64 {
        let local = self.matches.load(Relaxed);
        match self.reported_matches.load(Relaxed) {
            NO_REPORT => local,
            r => local.max(r + self.match_delta.load(Relaxed)),
        }
    }

    /// A match was just placed on this server (by this proxy or, as its
    /// assign event says, by another one) and no report counts it yet.
    pub fn note_new_match(&self) {
        self.match_delta.fetch_add(1, Relaxed);
    }

    pub fn health(&self, now: u64) -> Health {
        if !self.active_up.load(Relaxed) {
            Health::Unhealthy
        } else if self.ejected_until.load(Relaxed) > now {
            Health::Ejected
        } else {
            Health::Healthy
        }
    }

    /// Healthy, not ejected, not draining, and past the slow-start coin toss.
    pub fn available(&self, now: u64, policy: &Passive) -> bool {
        if self.health(now) != Health::Healthy || self.draining.load(Relaxed) {
            return false;
        }
        let since = self.readmitted_at.load(Relaxed);
        if since == 0 {
            return true;
        }
        let share = passive::slow_start_permille(policy, since, now);
        if share >= 1000 {
            self.readmitted_at.store(0, Relaxed);
            return true;
        }
        fastrand::u32(..1000) < share
    }

    /// Usable for requests of a match it already owns: alive, draining or not.
    pub fn alive(&self, now: u64) -> bool {
        self.health(now) == Health::Healthy
    }

    fn eject(&self, policy: &Passive, now: u64) {
        let n = self.ejections.fetch_add(1, Relaxed) + 1;
        let until = now + passive::ejection_ms(policy, n);
        self.ejected_until.store(until, Relaxed);
        self.readmitted_at.store(until, Relaxed);
        tracing::warn!(server = %self.id, ejected_ms = until - now, "server ejected");
    }

    /// A connection attempt failed. Returns true when this ejected the server.
    pub fn record_connect_failure(&self, policy: &Passive, now: u64) -> bool {
        self.failures.fetch_add(1, Relaxed);
        let streak = self.connect_fail_streak.fetch_add(1, Relaxed) + 1;
        if policy.connect_failures > 0
            && streak >= policy.connect_failures
            && self.ejected_until.load(Relaxed) <= now
        {
            self.connect_fail_streak.store(0, Relaxed);
            self.eject(policy, now);
            return true;
        }
        false
    }

    /// A response head arrived from this server.
    pub fn record_response(&self, status: u16, latency_us: u64, policy: &Passive, now: u64) {
        self.connect_fail_streak.store(0, Relaxed);
        let class = (status / 100).clamp(1, 5) as usize - 1;
        self.responses[class].fetch_add(1, Relaxed);
        self.latency.observe_us(latency_us);
        self.note_outcome(status < 500, policy, now);
    }

    /// An upstream error after connecting (reset, timeout): no response to
    /// count or time, but it counts toward a burst of errors like a 5xx.
    pub fn record_upstream_error(&self, policy: &Passive, now: u64) {
        self.failures.fetch_add(1, Relaxed);
        self.note_outcome(false, policy, now);
    }

    /// Consecutive-error accounting shared by responses and upstream errors.
    fn note_outcome(&self, ok: bool, policy: &Passive, now: u64) {
        if ok {
            self.error_streak.store(0, Relaxed);
            if self.ejections.load(Relaxed) != 0 && self.ejected_until.load(Relaxed) <= now {
                self.ejections.store(0, Relaxed);
            }
            return;
        }
        let streak = self.error_streak.fetch_add(1, Relaxed) + 1;
        if policy.consecutive_5xx > 0
            && streak >= policy.consecutive_5xx
            && self.ejected_until.load(Relaxed) <= now
        {
            self.error_streak.store(0, Relaxed);
            self.eject(policy, now);
        }
    }

    /// One active check result; rise/fall thresholds apply.
    pub fn record_check(&self, ok: bool, rise: u32, fall: u32, now: u64) {
        let mut checks = self.checks.lock().unwrap_or_else(|p| p.into_inner());
        let h = checks.get_or_insert_with(|| Hysteresis::new(rise, fall));
        let transition = h.observe(ok);
        if ok && h.healthy() && transition.is_none() && self.ejected_until.load(Relaxed) != 0 {
            // a passing probe proves the server is reachable again: lift a
            // passive ejection early, re-admitting it through slow start
            if self.ejected_until.swap(0, Relaxed) > now {
                self.readmitted_at.store(now, Relaxed);
                tracing::info!(server = %self.id, "ejected server passed its health check; re-admitted");
            }
        }
        if let Some(up) = transition {
            self.active_up.store(up, Relaxed);
            if up {
                // back by active checks: lift any passive ejection at once
                self.ejected_until.store(0, Relaxed);
                self.ejections.store(0, Relaxed);
                self.connect_fail_streak.store(0, Relaxed);
                self.error_streak.store(0, Relaxed);
                tracing::info!(server = %self.id, "server healthy again");
            } else {
                tracing::warn!(server = %self.id, "server failed its health checks");
            }
        }
    }

    /// Forgets active-check state (the pool lost its health_check).
    pub fn clear_checks(&self) {
        *self.checks.lock().unwrap_or_else(|p| p.into_inner()) = None;
        self.active_up.store(true, Relaxed);
    }
}

/// Counts one open connection to a server for as long as it lives.
#[derive(Debug)]
pub struct ConnGuard {
    server: Arc<ServerState>,
    websocket: bool,
}

impl ConnGuard {
    pub fn new(server: Arc<ServerState>) -> Self {
        server.connections.fetch_add(1, Relaxed);
        server.conn_delta.fetch_add(1, Relaxed);
        ConnGuard {
            server,
            websocket: false,
        }
    }

    pub fn server(&self) -> &Arc<ServerState> {
        &self.server
    }

    /// This connection became a tunnel.
    pub fn mark_websocket(&mut self) {
        if !self.websocket {
            self.websocket = true;
            self.server.websockets.fetch_add(1, Relaxed);
        }
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.server.connections.fetch_sub(1, Relaxed);
        self.server.conn_delta.fetch_sub(1, Relaxed);
        if self.websocket {
            self.server.websockets.fetch_sub(1, Relaxed);
        }
    }
}

/// The map of live server state, by id.
#[derive(Debug, Default)]
pub struct Live {
    servers: RwLock<HashMap<Arc<str>, Arc<ServerState>>>,
}

impl Live {
    pub fn get_or_create(&self, id: &str) -> Arc<ServerState> {
        if let Some(s) = self
            .servers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
        {
            return s.clone();
        }
        let mut w = self.servers.write().unwrap_or_else(|p| p.into_inner());
        w.entry(Arc::from(id))
            .or_insert_with(|| Arc::new(ServerState::new(id)))
            .clone()
    }

    pub fn get(&self, id: &str) -> Option<Arc<ServerState>> {
        self.servers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
    }

    /// Drops servers no config mentions and nothing uses any more.
    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        let mut w = self.servers.write().unwrap_or_else(|p| p.into_inner());
        w.retain(|id, s| {
            keep(id)
                || s.connections.load(Relaxed) > 0
                || s.matches.load(Relaxed) > 0
                || Arc::strong_count(s) > 1
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn policy() -> Passive {
        Passive {
            connect_failures: 2,
            consecutive_5xx: 3,
            ejection: Duration::from_millis(100),
            max_ejection: Duration::from_millis(1000),
            slow_start: Duration::ZERO,
        }
    }

    #[test]
    fn connect_failures_eject_then_time_readmits() {
        let s = ServerState::new("a");
        let p = policy();
        assert!(!s.record_connect_failure(&p, 10));
        assert!(s.record_connect_failure(&p, 10));
        assert_eq!(s.health(50), Health::Ejected);
        assert!(!s.available(50, &p));
        assert_eq!(s.health(111), Health::Healthy);
        assert!(s.available(111, &p));
        // a repeat doubles
        s.record_connect_failure(&p, 200);
        s.record_connect_failure(&p, 200);
        assert_eq!(s.health(350), Health::Ejected);
        assert_eq!(s.health(401), Health::Healthy);
    }

    #[test]
    fn bursts_of_5xx_eject_and_a_success_resets() {
        let s = ServerState::new("a");
        let p = policy();
        s.record_response(500, 10, &p, 1);
        s.record_response(503, 10, &p, 1);
        s.record_response(200, 10, &p, 1);
        s.record_response(500, 10, &p, 1);
        assert_eq!(s.health(2), Health::Healthy);
        s.record_response(500, 10, &p, 1);
        s.record_response(500, 10, &p, 1);
        assert_eq!(s.health(2), Health::Ejected);
        assert_eq!(s.responses[4].load(Relaxed), 5);
    }

    #[test]
    fn upstream_errors_count_toward_bursts_without_faking_a_response() {
        let s = ServerState::new("a");
        let p = policy();
        s.record_upstream_error(&p, 1);
        s.record_response(502, 10, &p, 1);
        s.record_upstream_error(&p, 1);
        assert_eq!(s.health(2), Health::Ejected);
        assert_eq!(s.failures.load(Relaxed), 2);
        assert_eq!(
            s.responses[4].load(Relaxed),
            1,
            "only the real 502 is a response"
        );
        assert_eq!(s.latency.snapshot().1, 1, "only the real response is timed");
    }

    #[test]
    fn active_recovery_lifts_ejection_and_draining_blocks_new_traffic() {
        let s = ServerState::new("a");
        let p = policy();
        for _ in 0..2 {
            s.record_check(false, 1, 2, 1);
        }
        assert_eq!(s.health(1), Health::Unhealthy);
        s.record_connect_failure(&p, 1);
        s.record_connect_failure(&p, 1);
        s.record_check(true, 1, 2, 1);
        assert_eq!(s.health(2), Health::Healthy);
        s.draining.store(true, Relaxed);
        assert!(!s.available(2, &p));
        assert!(s.alive(2));
    }

    #[test]
    fn a_passing_probe_lifts_a_passive_ejection() {
        let s = ServerState::new("a");
        let p = Passive {
            slow_start: Duration::from_millis(1000),
            ..policy()
        };
        s.record_connect_failure(&p, 10);
        s.record_connect_failure(&p, 10);
        assert_eq!(s.health(20), Health::Ejected);
        s.record_check(true, 2, 2, 20);
        assert_eq!(s.health(21), Health::Healthy);
        // re-admitted through slow start: only a share of new traffic at first
        let taken = (0..1000).filter(|_| s.available(30, &p)).count();
        assert!(taken < 200, "{taken}");
    }

    #[test]
    fn conn_guard_counts() {
        let s = Arc::new(ServerState::new("a"));
        let mut g = ConnGuard::new(s.clone());
        g.mark_websocket();
        assert_eq!(
            (s.connections.load(Relaxed), s.websockets.load(Relaxed)),
            (1, 1)
        );
        drop(g);
        assert_eq!(
            (s.connections.load(Relaxed), s.websockets.load(Relaxed)),
            (0, 0)
        );
    }

    #[test]
    fn cluster_load_is_the_report_plus_what_this_proxy_opened_since() {
        let s = Arc::new(ServerState::new("a"));
        let g1 = ConnGuard::new(s.clone());
        assert_eq!(s.cluster_connections(), 1, "no report: the local count");
        s.apply_report(Some(100), Some(7));
        assert_eq!((s.cluster_connections(), s.cluster_matches()), (100, 7));
        let g2 = ConnGuard::new(s.clone());
        s.note_new_match();
        assert_eq!((s.cluster_connections(), s.cluster_matches()), (101, 8));
        drop((g1, g2));
        // closes since the report count too: one opened after it, one before
        assert_eq!(s.cluster_connections(), 99);
        s.apply_report(Some(0), None);
        assert_eq!((s.cluster_connections(), s.cluster_matches()), (0, 8));
        assert_eq!(s.reported_connections(), Some(0));
    }

    #[test]
    fn histogram_buckets() {
        let h = LatencyHistogram::default();
        h.observe_us(500);
        h.observe_us(20_000_000);
        let (sum, count, b) = h.snapshot();
        assert_eq!(count, 2);
        assert!((sum - 20.0005).abs() < 1e-9);
        assert_eq!(b[0], (0.001, 1));
        assert_eq!(b.last().unwrap().1, 1);
    }
}
